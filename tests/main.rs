//! walhook's integration tests: one binary, modules per capability. Every test runs the
//! real binary against a throwaway PostgreSQL cluster and a real local HTTP receiver.
mod bad_input;
mod classification_edges;
mod classifications;
mod columns;
mod delivery;
mod durability;
mod harness;
mod mutations;
mod relation_differential;
mod relations;
mod support;
mod tls;
mod transitions;
