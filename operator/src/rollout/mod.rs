//! Canary rollouts of a back end or a model (`spec.rollout`): the schema ([`spec`]) and the
//! state machine that moves it ([`machine`]).
//!
//! A rollout moves through the steps of `spec.rollout.steps`. Each reconcile, [`step`] reads
//! what the chat pods counted in the step's window ([`window`]), the machine decides, and the
//! decided weight is rendered into the chat-service config (the chat pods split sessions by
//! it) and written to `status.rollout`, which is all the state there is: an operator that
//! restarts reads it back and continues.

pub mod machine;
pub mod spec;
pub mod step;
pub mod window;
