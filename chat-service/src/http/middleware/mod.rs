//! The middleware stack, outermost first: [`request_id`], [`observe`] (timing, metrics, the one
//! place errors are logged), then on the API routes [`auth`], [`rate_limit`] and [`admission`].

pub mod admission;
pub mod auth;
pub mod observe;
pub mod rate_limit;
pub mod request_id;
