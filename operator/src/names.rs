//! The names the operator gives: its field manager, the labels on every child, the child objects'
//! names and the keys of the Secrets it writes. Deterministic, so a re-created operator finds
//! what an earlier one made; shared by every step, so it depends on nothing but the resource.

use kube::ResourceExt;

use crate::crd::ChatService;

/// The one field manager every server-side apply uses.
pub const FIELD_MANAGER: &str = "chat-operator";
/// Names the ChatService a child belongs to; the selector for watches and pruning.
pub const LABEL_CHATSERVICE: &str = "chatoperator.dev/chatservice";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const MANAGED_BY: &str = "chat-operator";

/// Key of the generated Redis password.
pub const REDIS_PASSWORD_KEY: &str = "password";
/// Keys of the generated MongoDB root credentials.
pub const MONGODB_USERNAME_KEY: &str = "username";
pub const MONGODB_PASSWORD_KEY: &str = "password";
/// Keys of the connection Secret the chat pods read.
pub const MONGODB_URI_KEY: &str = "uri";
pub const REDIS_URL_KEY: &str = "redis-url";

/// The part of the stack a child object belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Chat,
    Redis,
    Mongodb,
    Ollama,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Chat => "chat-service",
            Component::Redis => "redis",
            Component::Mongodb => "mongodb",
            Component::Ollama => "ollama",
        }
    }
}

/// Names of the children of one ChatService.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildNames {
    base: String,
}

impl ChildNames {
    pub fn of(cr: &ChatService) -> Self {
        Self {
            base: cr.name_any(),
        }
    }
    /// The ChatService's own name.
    pub fn base(&self) -> &str {
        &self.base
    }
    /// Deployment, Service, ServiceAccount, HPA, PDB and Ingress of the chat pods.
    pub fn chat(&self) -> String {
        self.base.clone()
    }
    pub fn config_map(&self) -> String {
        format!("{}-config", self.base)
    }
    pub fn connection_secret(&self) -> String {
        format!("{}-connection", self.base)
    }
    pub fn redis(&self) -> String {
        format!("{}-redis", self.base)
    }
    pub fn redis_password(&self) -> String {
        format!("{}-redis-password", self.base)
    }
    pub fn mongodb(&self) -> String {
        format!("{}-mongodb", self.base)
    }
    pub fn mongodb_credentials(&self) -> String {
        format!("{}-mongodb-credentials", self.base)
    }
    pub fn ollama(&self) -> String {
        format!("{}-ollama", self.base)
    }
    /// The workload, Service and NetworkPolicy of `component`.
    pub fn component(&self, component: Component) -> String {
        match component {
            Component::Chat => self.chat(),
            Component::Redis => self.redis(),
            Component::Mongodb => self.mongodb(),
            Component::Ollama => self.ollama(),
        }
    }
}
