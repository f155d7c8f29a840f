//! walhook's integration tests: one binary, modules per capability.
mod harness;
mod support;
