//! `backends` (the LLM servers a turn may go to) and `models` (what a request may ask for).

use serde::{Deserialize, Serialize};

use crate::defaults;

/// Wire protocol an LLM back end speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Ollama's native API (`/api/chat` NDJSON streaming, `/api/tags`).
    Ollama,
    /// Any OpenAI-compatible server (`/v1/chat/completions` SSE, `/v1/models`).
    Openai,
}

/// One LLM back end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendConfig {
    /// Unique name, used in metrics and logs.
    pub name: String,
    /// Base URL, e.g. `http://ollama:11434` or `https://llm.example.com` (without `/v1`).
    pub url: String,
    pub protocol: Protocol,
    /// Relative share of traffic for weighted strategies.
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    /// Name of the environment variable holding this back end's API key, if it needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// When set, the DNS name of a headless Service whose pods are balanced individually: every
    /// address it resolves to becomes an endpoint `<name>/<ip>` reached with `url`'s scheme and
    /// port (or the port given as `host:port` here). Meant for in-cluster plain HTTP; with
    /// `https` the certificate would have to name the pod IPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discover_dns: Option<String>,
    /// Models this back end serves; empty means any model in `models.allowed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelsConfig {
    /// Model used when a request names none.
    pub default: String,
    /// Models a request may name; empty means only the default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<String>,
}

impl BackendConfig {
    /// An Ollama server at `url`, with every optional setting at its default.
    pub fn ollama(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self::new(name, url, Protocol::Ollama)
    }

    /// An OpenAI-compatible server at `url` (without `/v1`), with every optional setting at its
    /// default.
    pub fn openai(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self::new(name, url, Protocol::Openai)
    }

    fn new(name: impl Into<String>, url: impl Into<String>, protocol: Protocol) -> Self {
        Self {
            name: name.into(),
            url: url.into(),
            protocol,
            weight: defaults::weight(),
            api_key_env: None,
            discover_dns: None,
            models: Vec::new(),
        }
    }
}

impl ModelsConfig {
    /// Only `default` may be asked for.
    pub fn new(default: impl Into<String>) -> Self {
        Self {
            default: default.into(),
            allowed: Vec::new(),
        }
    }
}
