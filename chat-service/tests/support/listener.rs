//! The service behind its own listener (`chat_service::server::serve`, what the binary runs),
//! in-process on the rig's stores, so that tests see connection limits and the peer address.

use chat_service::config::Config;
use chat_service::server::{ConnectionLimits, serve};
use chat_service::{AppState, Secrets, SharedState};
use tokio_util::sync::CancellationToken;

/// Stops serving when dropped.
pub struct Served {
    pub address: std::net::SocketAddr,
    pub state: SharedState,
    stop: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn start_listener(config: Config) -> Served {
    start_listener_with_keys(config, None).await
}

/// As [`start_listener`], with these API keys as if from the environment.
pub async fn start_listener_with_keys(config: Config, api_keys: Option<&str>) -> Served {
    let rig = super::rig();
    let secrets = Secrets {
        redis_url: rig.redis_url().into(),
        mongodb_uri: rig.mongodb_url().into(),
        backend_api_keys: config.backends.iter().map(|_| None).collect(),
        api_keys: api_keys.map(str::to_string),
    };
    config.validate().expect("valid test config");
    let limits = ConnectionLimits::from(&config.limits);
    let state = AppState::new(config, secrets).await.expect("state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(serve(
        listener,
        chat_service::router(state.clone()),
        limits,
        stop.clone(),
    ));
    Served {
        address,
        state,
        stop,
    }
}
