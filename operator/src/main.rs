//! The `chat-operator` binary: parses flags, connects to the cluster and runs the reconciler
//! until SIGTERM or Ctrl+C.

use std::net::SocketAddr;
use std::time::Duration;

use chat_operator::leader::LeaseSettings;
use chat_operator::metrics::ApiRequests;
use chat_operator::{OperatorConfig, run};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "chat-operator",
    version,
    about = "Runs complete AI chat back ends from ChatService resources"
)]
struct Args {
    /// Watch only these namespaces, comma-separated (all namespaces when unset): a namespaced
    /// install, whose RBAC grants nothing elsewhere.
    #[arg(long, env = "WATCH_NAMESPACES", value_delimiter = ',')]
    watch_namespaces: Vec<String>,
    /// Address of the /metrics and /healthz server.
    #[arg(long, env = "METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    metrics_address: SocketAddr,
    /// Turn Lease-based leader election off (only for a single replica).
    #[arg(long, env = "DISABLE_LEADER_ELECTION")]
    disable_leader_election: bool,
    /// Namespace of the leader-election Lease (normally the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "chat-operator")]
    lease_namespace: String,
    /// Identity in the Lease; the pod name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds between re-checks of converged ChatServices.
    #[arg(long, env = "RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// ChatServices reconciled at once (0 = unbounded).
    #[arg(long, env = "MAX_CONCURRENT_RECONCILES", default_value_t = chat_operator::controller::DEFAULT_MAX_CONCURRENT_RECONCILES)]
    max_concurrent_reconciles: u16,
    /// Requests to the API server in flight at once, watches not counted; 0 is no cap.
    #[arg(long, env = "MAX_REQUESTS_IN_FLIGHT", default_value_t = chat_operator::in_flight::DEFAULT_MAX_REQUESTS_IN_FLIGHT)]
    max_requests_in_flight: usize,
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested; finishing in-flight reconciles");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn")),
        )
        .init();
    let args = Args::parse();
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("chat-operator-{}", std::process::id()));
    let api_requests = ApiRequests::default();
    let client =
        api_requests.limited_client(kube::Config::infer().await?, args.max_requests_in_flight)?;
    let config = OperatorConfig {
        namespaces: args
            .watch_namespaces
            .into_iter()
            .map(|ns| ns.trim().to_string())
            .filter(|ns| !ns.is_empty())
            .collect(),
        metrics_address: Some(args.metrics_address),
        operator_namespace: Some(args.lease_namespace.clone()),
        leader_election: (!args.disable_leader_election).then(|| LeaseSettings {
            namespace: args.lease_namespace,
            name: "chat-operator-leader".into(),
            identity: identity.clone(),
            duration: Duration::from_secs(15),
        }),
        resync: Duration::from_secs(args.resync_seconds),
        max_concurrent_reconciles: args.max_concurrent_reconciles,
        instance: Some(identity),
        api_requests: Some(api_requests),
        ..OperatorConfig::default()
    };
    run(client, config, shutdown_signal()).await?;
    Ok(())
}
