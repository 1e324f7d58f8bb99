//! The back end's errors. [`EndpointError`] is what went wrong on one endpoint: it decides
//! failover, feeds the endpoint's breaker and labels the outcome metric. [`BackendError`] is why
//! the pool could not start a generation for a turn; the HTTP layer maps it to a status and a
//! Retry-After (in its error module), so no status of this service is chosen here. The upstream
//! status in [`EndpointError::Status`] is what the endpoint answered, a fact about it, not a
//! decision.

use std::fmt;
use std::time::Duration;

/// One request on one endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("status {status}: {body}")]
    Status { status: u16, body: String },
    #[error("malformed stream: {0}")]
    Malformed(String),
    #[error("no first token within {0:?}")]
    FirstTokenTimeout(Duration),
    #[error("generation exceeded {0:?}")]
    TotalTimeout(Duration),
    #[error("stream ended without a final message")]
    Truncated,
}

impl EndpointError {
    /// Whether another endpoint may succeed where this one failed: everything but a 4xx other
    /// than 429 (the request itself is wrong, any endpoint would refuse it).
    pub fn retryable(&self) -> bool {
        match self {
            EndpointError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => true,
        }
    }

    /// Whether the failure says something about the endpoint's health (opens its breaker):
    /// not a refusal of the request (4xx) nor a throttle (429).
    pub fn counts_against_endpoint(&self) -> bool {
        match self {
            EndpointError::Status { status, .. } => *status >= 500,
            _ => true,
        }
    }

    pub(super) fn is_timeout(&self) -> bool {
        match self {
            EndpointError::FirstTokenTimeout(_) | EndpointError::TotalTimeout(_) => true,
            EndpointError::Http(e) => e.is_timeout(),
            _ => false,
        }
    }

    /// Label of `chat_backend_requests_total{outcome}`.
    pub(super) fn outcome(&self) -> &'static str {
        match self {
            EndpointError::Status { status: 429, .. } => "throttled",
            EndpointError::Status { status, .. } if *status < 500 => "rejected",
            e if e.is_timeout() => "timeout",
            _ => "error",
        }
    }
}

/// Why no generation started for a turn.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No endpoint serves the model, or every attempt failed; the detail names each attempt.
    #[error("no LLM back end answered: {0}")]
    Unavailable(String),
    /// Every attempt failed and at least one of them timed out.
    #[error("LLM back end timed out: {0}")]
    Timeout(String),
    /// Every candidate endpoint is at its in-flight limit and the turn could not wait for one.
    #[error("LLM back ends saturated: {reason}")]
    Saturated {
        reason: Saturation,
        retry_after: Duration,
    },
    /// Every candidate endpoint has its circuit breaker open; the first lets a probe through
    /// after `retry_after`.
    #[error("every LLM back end has its circuit breaker open")]
    CircuitOpen { retry_after: Duration },
}

/// Why a turn found no endpoint below its in-flight limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saturation {
    /// The shortest queue was at `queueDepth`.
    QueueFull,
    /// The turn waited `queueTimeoutMs` in a queue.
    QueueTimeout,
    /// Permits or half-open probes kept being taken by others between choice and lease.
    Contention,
}

impl Saturation {
    /// Label of `chat_backend_shed_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Saturation::QueueFull => "queue_full",
            Saturation::QueueTimeout => "queue_timeout",
            Saturation::Contention => "contention",
        }
    }
}

impl fmt::Display for Saturation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Saturation::QueueFull => "queue full",
            Saturation::QueueTimeout => "queue timeout",
            Saturation::Contention => "contention",
        })
    }
}

/// The pool could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PoolStartError {
    #[error("http client for the back ends: {0}")]
    HttpClient(#[from] reqwest::Error),
}
