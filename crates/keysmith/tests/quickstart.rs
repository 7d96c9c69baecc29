//! The quickstart example, run as a test.

#[allow(dead_code)]
#[path = "../examples/quickstart.rs"]
mod quickstart;

#[tokio::test]
async fn quickstart_story_holds() {
    quickstart::run(false).await.expect("the quickstart story");
}
