//! Derivation: from a transaction's row changes to the notifications they cause.
//!
//! [`mutation`] turns row operations (insert, update, delete, truncate) into grouped
//! notifications, one per transaction, webhook and operation, at most `max_rows` rows each.
//! [`classification`] turns the rows' images into transitions of their classifications'
//! values, evaluated in PostgreSQL.

pub mod classification;
pub mod mutation;
