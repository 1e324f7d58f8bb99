//! Where things are: the ports of each component and the chat pod's mount points, files and
//! variables. The rendered chat-service config and the objects that mount it both read these, so
//! the two cannot disagree.

/// Port of the chat service in its pods.
pub const CHAT_PORT: i32 = 8080;
/// Least seconds the chat service drains on SIGTERM; it is raised to the turn timeout
/// (`routing.totalTimeoutMs`) so that a turn that may still run can finish.
pub const SHUTDOWN_GRACE_SECONDS: u64 = 30;
/// The chat pod's preStop delay: the pod keeps serving while its endpoint is removed from the
/// Service, so no new turn arrives after SIGTERM.
pub const PRE_STOP_SECONDS: i64 = 5;
/// After the grace period the service stores the turns it cut as incomplete (bounded by the
/// MongoDB timeout plus 1 s) and gives their connections 1 s to send the last event before it
/// exits; the pod's grace period leaves this much for it (the default MongoDB timeout is 3 s).
pub const STORE_MARGIN_SECONDS: i64 = 5;
pub const REDIS_PORT: i32 = 6379;
pub const MONGODB_PORT: i32 = 27017;
pub const OLLAMA_PORT: i32 = 11434;

/// Key of the config file in the ConfigMap, and its mount point in the pods.
pub const CONFIG_KEY: &str = "config.yaml";
pub const CONFIG_DIR: &str = "/etc/chat-service";
/// Where the API-key file from `spec.auth.apiKeysSecret` is mounted.
pub const AUTH_DIR: &str = "/var/run/chat-service/auth";
pub const AUTH_FILE: &str = "api-keys";
/// Where the external MongoDB CA bundle is mounted.
pub const MONGODB_CA_DIR: &str = "/var/run/chat-service/mongodb-ca";
pub const MONGODB_CA_FILE: &str = "ca.pem";
/// Where the external Redis CA is mounted.
pub const REDIS_CA_DIR: &str = "/var/run/chat-service/redis-ca";
pub const REDIS_CA_FILE: &str = "ca.pem";
/// Where the `i`th tokenizer of `spec.context.tokenizers` is mounted; its file keeps the
/// ConfigMap key's name.
pub fn tokenizer_dir(i: usize) -> String {
    format!("/var/run/chat-service/tokenizers/{i}")
}
/// Name of the managed Ollama back end in the config (a CEL rule keeps users from taking it).
pub const MANAGED_OLLAMA_BACKEND: &str = "ollama";

/// Environment variable carrying an external back end's API key.
pub fn api_key_env(backend: &str) -> String {
    format!(
        "BACKEND_{}_API_KEY",
        backend.to_ascii_uppercase().replace('-', "_")
    )
}
