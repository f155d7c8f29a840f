//! walhook: tails PostgreSQL logical replication, derives row events and delivers signed
//! webhooks at least once.
//!
//! Layers, each one module: WAL bytes → [`pgoutput`] message → [`txn`] transaction →
//! [`derive`] notification → [`log`] entry (sled) → [`deliver`] HTTP attempt. [`run`]
//! wires them together; [`source`] talks to PostgreSQL; [`cli`] is the command line.

pub mod classify;
pub mod cli;
pub mod config;
pub mod control;
pub mod deliver;
pub mod derive;
pub mod inspect;
pub mod log;
pub mod pgoutput;
pub mod run;
pub mod schema;
pub mod shutdown;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod txn;
