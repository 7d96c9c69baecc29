//! The `keysmith` binary.

use std::process::ExitCode;

use clap::Parser;
use keysmith_server::cli::{Cli, Command};
use keysmith_server::config::{self, LogFormat};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut overrides = serde_json::Map::new();
    if let Some(url) = &cli.database_url {
        overrides.insert("database_url".into(), url.clone().into());
    }
    if let Command::Serve(args) = &cli.command {
        if let Some(listen) = args.listen {
            overrides.insert("listen".into(), listen.to_string().into());
        }
        if args.no_bootstrap {
            overrides.insert("bootstrap".into(), false.into());
        }
        if let Some(format) = args.log_format {
            overrides.insert(
                "log_format".into(),
                serde_json::to_value(format).expect("enum"),
            );
        }
    }
    let config = match config::load(cli.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(2);
        }
    };
    let serving = matches!(cli.command, Command::Serve(_));
    init_logs(config.log_format, if serving { "info" } else { "warn" });
    if serving {
        return match keysmith_server::serve::run(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::from(1)
            }
        };
    }
    match keysmith_server::cli::run(cli, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

fn init_logs(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYSMITH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
