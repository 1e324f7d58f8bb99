//! The benchmark's parts, each comparing the service with a baseline measured in the same run
//! (numbered as in issue 7, and issue 15's instruction counts; `CHATOP_BENCH_ONLY` picks them).

pub mod history;
pub mod instructions;
pub mod latency;
pub mod memory;
pub mod model;
