//! Delivery: signing ([`sign`]), one HTTP attempt ([`http`]), the retry schedule
//! ([`retry`]) and each webhook's queue over the log ([`queue`]).

pub mod http;
pub mod queue;
pub mod retry;
pub mod sign;
