//! The row state store: what walhook remembers about each row of a classified table, kept
//! in the delivery log's sled tree so that it is written in the same atomic batch as the
//! notifications it produced (and the stream position).
//!
//! ```text
//! b's' classification \0 key-json  → Record: the row's value, the commit LSN that wrote
//!                                     it, and the columns the condition reads
//! b'c' classification               → ClassMeta: which SQL the state was built for, and
//!                                     from which commit LSN on the stream maintains it
//! b'r' classification \0 dep key-json → Record: the values with which a row of a table the
//!                                     condition depends on points to base rows (its
//!                                     foreign key), so that an update or delete that does
//!                                     not carry them still re-evaluates the old base rows
//! ```
//!
//! A row without a record does not exist (its value is `null`). Records are per
//! classification, not per table: a classification baselined later (at a newer snapshot than
//! the stream's position) then never mixes its state with that of the others.

use serde::{Deserialize, Serialize};

const STATE: u8 = b's';
const CLASS: u8 = b'c';
const DEPENDENCY: u8 = b'r';

/// The key of `row` (its primary key as JSON text) under classification `class`.
pub fn row_key(class: &str, row: &str) -> Vec<u8> {
    let mut key = class_prefix(class);
    key.extend_from_slice(row.as_bytes());
    key
}

/// The prefix of every row key of `class`.
pub fn class_prefix(class: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(class.len() + 24);
    key.push(STATE);
    key.extend_from_slice(class.as_bytes());
    key.push(0);
    key
}

/// The primary key JSON text of a row key under `prefix`.
pub fn row_of(prefix: &[u8], key: &[u8]) -> Option<String> {
    key.strip_prefix(prefix)
        .and_then(|k| std::str::from_utf8(k).ok())
        .map(str::to_string)
}

/// The prefix of every dependency record of `class`.
pub fn dependency_prefix(class: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(class.len() + 24);
    key.push(DEPENDENCY);
    key.extend_from_slice(class.as_bytes());
    key.push(0);
    key
}

/// The key of `row` of dependency number `dep` of `class`.
pub fn dependency_key(class: &str, dep: usize, row: &str) -> Vec<u8> {
    let mut key = dependency_prefix(class);
    key.push(dep as u8);
    key.extend_from_slice(row.as_bytes());
    key
}

pub fn meta_key(class: &str) -> Vec<u8> {
    let mut key = vec![CLASS];
    key.extend_from_slice(class.as_bytes());
    key
}

/// The prefix of every classification's meta key.
pub fn meta_prefix() -> Vec<u8> {
    vec![CLASS]
}

/// A stored value. A failed evaluation (e.g. a division by zero) keeps the row's last known
/// value; `Unknown` is the value of a row whose condition has never evaluated cleanly (its
/// last known value is `null`: before it, the row did not exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    False,
    True,
    Unknown,
}

/// One row's state under one classification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub value: Known,
    /// Commit LSN of the transaction that wrote the record (0 for a baseline).
    pub lsn: u64,
    /// The columns the condition reads, by name: `None` is SQL NULL.
    pub columns: Vec<(String, Option<String>)>,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.columns.len() * 24);
        out.push(match self.value {
            Known::False => 0,
            Known::True => 1,
            Known::Unknown => 2,
        });
        out.extend_from_slice(&self.lsn.to_be_bytes());
        for (name, value) in &self.columns {
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            match value {
                None => out.push(0),
                Some(v) => {
                    out.push(1);
                    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    out.extend_from_slice(v.as_bytes());
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, String> {
        let mut r = Reader(bytes);
        let value = match r.u8()? {
            0 => Known::False,
            1 => Known::True,
            2 => Known::Unknown,
            other => return Err(format!("unknown value tag {other}")),
        };
        let lsn = u64::from_be_bytes(r.take(8)?.try_into().map_err(|_| "short lsn")?);
        let mut columns = Vec::new();
        while !r.0.is_empty() {
            let name = r.text()?;
            let value = match r.u8()? {
                0 => None,
                1 => Some(r.text()?),
                other => return Err(format!("unknown column tag {other}")),
            };
            columns.push((name, value));
        }
        Ok(Record {
            value,
            lsn,
            columns,
        })
    }

    pub fn column(&self, name: &str) -> Option<&Option<String>> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated record".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn text(&mut self) -> Result<String, String> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().map_err(|_| "short length")?);
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())
    }
}

/// What a classification's state was built for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassMeta {
    /// A hash of the query: another query means another classification, baselined anew.
    pub fingerprint: String,
    /// Transactions committed at or after this LSN update the state; earlier ones were
    /// already in the baseline's snapshot.
    pub active_from: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn records_round_trip(
            value in 0u8..3,
            lsn in any::<u64>(),
            columns in proptest::collection::vec(("[a-zA-Z_ \"]{0,8}", proptest::option::of(".{0,20}")), 0..5),
        ) {
            let record = Record {
                value: [Known::False, Known::True, Known::Unknown][value as usize],
                lsn,
                columns,
            };
            prop_assert_eq!(Record::decode(&record.encode()), Ok(record));
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Record::decode(&bytes);
        }
    }

    #[test]
    fn keys_sort_by_classification_then_row() {
        let a = row_key("active", "42");
        assert!(a.starts_with(&class_prefix("active")));
        assert_eq!(row_of(&class_prefix("active"), &a).as_deref(), Some("42"));
        // "active" rows never fall under the prefix of "active2".
        assert!(!row_key("active2", "1").starts_with(&class_prefix("active")));
    }
}
