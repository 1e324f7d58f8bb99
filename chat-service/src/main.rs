//! The `chat-service` binary: reads the config, builds the state, serves until SIGTERM, then
//! refuses new connections and drains in-flight turns and streams up to `shutdownGraceSeconds`;
//! turns still running then are stored as incomplete before the process exits.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chat_service::config::Config;
use chat_service::server::ConnectionLimits;
use chat_service::{AppState, Secrets};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    name = "chat-service",
    version,
    about = "Chat back end deployed by ChatOperator"
)]
struct Args {
    /// YAML config file (the ConfigMap the operator renders).
    #[arg(
        long,
        env = "CHAT_SERVICE_CONFIG",
        default_value = "/etc/chat-service/config.yaml"
    )]
    config: PathBuf,
    /// Overrides `listen` from the config file.
    #[arg(long, env = "CHAT_SERVICE_LISTEN")]
    listen: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    chat_service::logging::init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!(%message, "chat-service failed");
            eprintln!("chat-service: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let config = Config::load_with(&args.config, |config| {
        if let Some(listen) = args.listen {
            config.listen = listen;
        }
    })
    .map_err(|e| e.to_string())?;
    let secrets = Secrets::from_env(&config).map_err(|e| e.to_string())?;
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    const FLUSH_BUDGET: Duration = Duration::from_secs(1);
    let listen = config.listen.clone();
    let state = AppState::new(config, secrets)
        .await
        .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%address, "listening");

    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutdown requested; draining");
        shutdown.cancel();
    });

    let app = chat_service::router(state.clone());
    let limits = ConnectionLimits::from(&state.config.limits);
    let mut server = tokio::spawn(chat_service::server::serve(
        listener,
        app,
        limits,
        state.shutdown.clone(),
    ));
    // Drained: every connection closed and every turn stored (turns whose client already left
    // are still being stored).
    let drained = async {
        let _ = (&mut server).await;
        state.turns.close();
        state.turns.wait().await;
    };
    let deadline = async {
        state.shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        () = drained => {
            tracing::info!("stopped");
            return Ok(());
        }
        () = deadline => {}
    }
    // Out of time: cut the turns still running; each stores its partial reply as incomplete,
    // bounded by the MongoDB timeout, which the pod's grace period leaves room for.
    tracing::warn!(
        ?grace,
        "grace period over; storing the turns still running as incomplete"
    );
    state.turn_deadline.cancel();
    state.turns.close();
    let store_budget =
        Duration::from_millis(state.config.history.mongodb.timeout_ms) + Duration::from_secs(1);
    if tokio::time::timeout(store_budget, state.turns.wait())
        .await
        .is_err()
    {
        tracing::error!("turns still being stored at exit");
    }
    // The cut turns' last events (an `error` saying `shutting_down`) are on their way to the
    // clients: let the connections send them before the process exits.
    if tokio::time::timeout(FLUSH_BUDGET, &mut server)
        .await
        .is_err()
    {
        tracing::warn!("connections still open at exit");
    }
    tracing::info!("stopped");
    Ok(())
}
