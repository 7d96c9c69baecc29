//! The conformance suite on the memory store.

keysmith::conformance_tests!(async {
    std::sync::Arc::new(keysmith::MemoryStore::new()) as std::sync::Arc<dyn keysmith::Store>
});
