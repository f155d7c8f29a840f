//! Shared harness for walhook's integration tests: real parts only.
//!
//! - [`pg::PgCluster`]: a throwaway PostgreSQL cluster (`wal_level=logical`) per test.
//! - [`receiver::Receiver`]: a local HTTP server that records every request and answers
//!   according to a programmable [`receiver::Plan`].
//! - [`process::Walhook`]: the real `walhook` binary as a child process, with its log.
//!
//! Starting or restarting a cluster blocks the calling thread for a fraction of a second, and
//! the receiver answers from tasks on the test's runtime, so tests that combine them should use
//! `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`: a blocked current-thread
//! runtime cannot answer the webhooks walhook is sending meanwhile.

// Every test module uses a different subset of the harness.
#![allow(dead_code)]

pub mod pg;
pub mod process;
pub mod receiver;
pub mod scenario;

// Re-exported for test modules; each uses only some of them.
pub use pg::PgCluster;
#[allow(unused_imports)]
pub use process::{run_to_completion, write_config, Walhook};
#[allow(unused_imports)]
pub use receiver::{Answer, Plan, Receiver, Recorded};
#[allow(unused_imports)]
pub use scenario::{rows_of, seed, signature_ok, Scenario, CUSTOMER_CONFIG, SECRET, WAIT};
