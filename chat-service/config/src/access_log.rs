//! `accessLog`: one log line per HTTP request, off by default. The service's own logs say what
//! went wrong (every failed request is logged at `warn` whatever this says); an access log says
//! what was asked, which costs a formatted line and a write per request, so it is opt-in and may
//! be sampled.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Log each request (method, route, status, milliseconds, request id) at `info`, target
    /// `access`.
    #[serde(default)]
    pub enabled: bool,
    /// Log one request in this many (1: every request). At least 1.
    #[serde(default = "one")]
    pub sample_every: u32,
}

fn one() -> u32 {
    1
}

impl AccessLogConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            sample_every: 1,
        }
    }
}
