//! The row state store: what walhook remembers about each row of a classified table, kept
//! in the delivery log's sled tree so that it is written in the same atomic batch as the
//! notifications it produced (and the stream position).
//!
//! ```text
//! b't' table \0 key-json            → Packed: the row's Record under each classification
//!                                     of the table that keeps state for it: its value, the
//!                                     commit LSN that wrote it, the columns its condition reads
//! b'c' classification               → ClassMeta: which SQL the state was built for, its
//!                                     table, and from which commit LSN on the stream
//!                                     maintains it
//! b'q' classification \0 dep key-json → Packed, one Record named "": the values with which a
//!                                     row of a table the condition depends on points to base
//!                                     rows (its foreign key), so that an update or delete that
//!                                     does not carry them still re-evaluates the old base rows
//! ```
//!
//! A row without a record does not exist (its value is `null`). Records are per
//! classification: a classification baselined later (at a newer snapshot than the stream's
//! position) then never mixes its state with that of the others. They are stored together,
//! one sled entry per row, because sled's cost is per entry: reading and rewriting five
//! small records costs about six times as much as one five times as large. The entry holds
//! each distinct column once ([`Packed::encode`]); rows an earlier walhook wrote with every
//! record whole are read as they are and take the compact form when next written (log
//! layout 5 marks a data dir that may hold it, so that an earlier walhook refuses it).

use serde::{Deserialize, Serialize};

const ROW: u8 = b't';
const CLASS: u8 = b'c';
const DEPENDENCY: u8 = b'q';
/// Where the first layout kept one record per classification and row,
const LEGACY_ROW: u8 = b's';
/// and its dependency pointers, a bare record each.
const LEGACY_DEPENDENCY: u8 = b'r';
/// The name of a dependency pointer's one record.
pub const POINTER: &str = "";

/// The key of `row` (its primary key as JSON text) of `table` ("schema.name").
pub fn row_key(table: &str, row: &str) -> Vec<u8> {
    let mut key = table_prefix(table);
    key.extend_from_slice(row.as_bytes());
    key
}

/// The prefix of every row key of `table`.
pub fn table_prefix(table: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(table.len() + 24);
    key.push(ROW);
    key.extend_from_slice(table.as_bytes());
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

impl Known {
    /// Its byte in an encoded record.
    fn code(self) -> u8 {
        match self {
            Known::False => 0,
            Known::True => 1,
            Known::Unknown => 2,
        }
    }

    fn from_code(code: u8) -> Result<Known, String> {
        match code {
            0 => Ok(Known::False),
            1 => Ok(Known::True),
            2 => Ok(Known::Unknown),
            other => Err(format!("unknown value tag {other}")),
        }
    }
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
        out.push(self.value.code());
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
        let value = Known::from_code(r.u8()?)?;
        let lsn = u64::from_be_bytes(r.take(8)?.try_into().map_err(|_| "short lsn")?);
        let mut columns = Vec::new();
        while !r.0.is_empty() {
            columns.push(r.column(Reader::text)?);
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

    /// A column: its name, then a tag (0: SQL NULL, 1: a value follows), each text read by
    /// `text`.
    fn column(
        &mut self,
        text: fn(&mut Self) -> Result<String, String>,
    ) -> Result<(String, Option<String>), String> {
        let name = text(self)?;
        let value = match self.u8()? {
            0 => None,
            1 => Some(text(self)?),
            other => return Err(format!("unknown column tag {other}")),
        };
        Ok((name, value))
    }

    /// A LEB128 unsigned integer (see `put_varint`).
    fn varint(&mut self) -> Result<u64, String> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            n |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err("varint too long".into())
    }

    /// A text with a varint length (see `put_text`).
    fn short_text(&mut self) -> Result<String, String> {
        let len = usize::try_from(self.varint()?).map_err(|_| "length out of range")?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())
    }
}

/// One row's records, one per classification (by name) that keeps state for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packed(Vec<(String, Record)>);

impl Packed {
    /// A dependency pointer: one record, named [`POINTER`].
    pub fn pointer(record: Record) -> Packed {
        Packed(vec![(POINTER.to_string(), record)])
    }

    pub fn get(&self, class: &str) -> Option<&Record> {
        self.0.iter().find(|(n, _)| n == class).map(|(_, r)| r)
    }

    /// Sets (`Some`) or removes (`None`) the record of `class`.
    pub fn set(&mut self, class: &str, record: Option<Record>) {
        let at = self.0.iter().position(|(n, _)| n == class);
        match (at, record) {
            (Some(i), Some(record)) => self.0[i].1 = record,
            (Some(i), None) => {
                self.0.remove(i);
            }
            (None, Some(record)) => self.0.push((class.to_string(), record)),
            (None, None) => {}
        }
    }

    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.0.iter().map(|(_, r)| r)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value to store: `None` (remove the key) when no record is left.
    pub fn stored(&self) -> Option<Vec<u8>> {
        (!self.is_empty()).then(|| self.encode())
    }

    /// The compact encoding: [`COMPACT`], each distinct column (name and value) once, then
    /// each record with the indexes of its columns. The records of a row mostly hold the same
    /// columns at the same values (they differ only while a classification baselined at a
    /// newer snapshot waits for the stream to reach it), so a column several conditions read
    /// is stored once.
    pub fn encode(&self) -> Vec<u8> {
        let mut columns: Vec<(&str, Option<&str>)> = Vec::new();
        let mut indexes: Vec<Vec<usize>> = Vec::with_capacity(self.0.len());
        for (_, record) in &self.0 {
            let mut of_record = Vec::with_capacity(record.columns.len());
            for (name, value) in &record.columns {
                let column = (name.as_str(), value.as_deref());
                let at = match columns.iter().position(|c| *c == column) {
                    Some(at) => at,
                    None => {
                        columns.push(column);
                        columns.len() - 1
                    }
                };
                of_record.push(at);
            }
            indexes.push(of_record);
        }
        let mut out = Vec::with_capacity(64 + columns.len() * 24 + self.0.len() * 32);
        out.push(COMPACT);
        put_varint(&mut out, columns.len() as u64);
        for (name, value) in &columns {
            put_text(&mut out, name);
            match value {
                None => out.push(0),
                Some(v) => {
                    out.push(1);
                    put_text(&mut out, v);
                }
            }
        }
        put_varint(&mut out, self.0.len() as u64);
        for ((name, record), of_record) in self.0.iter().zip(&indexes) {
            put_text(&mut out, name);
            out.push(record.value.code());
            put_varint(&mut out, record.lsn);
            put_varint(&mut out, of_record.len() as u64);
            for at in of_record {
                put_varint(&mut out, *at as u64);
            }
        }
        out
    }

    /// Reads either encoding: the compact one, or the first one (each record whole, see
    /// [`Record::encode`]), which rows written by an earlier walhook keep until next written.
    pub fn decode(bytes: &[u8]) -> Result<Packed, String> {
        match bytes.split_first() {
            Some((&COMPACT, rest)) => Self::decode_compact(rest),
            _ => Self::decode_records(bytes),
        }
    }

    fn decode_compact(bytes: &[u8]) -> Result<Packed, String> {
        let mut r = Reader(bytes);
        let count = r.varint()?;
        let mut columns: Vec<(String, Option<String>)> = Vec::new();
        for _ in 0..count {
            columns.push(r.column(Reader::short_text)?);
        }
        let count = r.varint()?;
        let mut records = Vec::new();
        for _ in 0..count {
            let name = r.short_text()?;
            let value = Known::from_code(r.u8()?)?;
            let lsn = r.varint()?;
            let n = r.varint()?;
            let mut of_record = Vec::new();
            for _ in 0..n {
                let at = r.varint()?;
                let column = usize::try_from(at)
                    .ok()
                    .and_then(|at| columns.get(at))
                    .ok_or_else(|| format!("column index {at} out of range"))?;
                of_record.push(column.clone());
            }
            records.push((
                name,
                Record {
                    value,
                    lsn,
                    columns: of_record,
                },
            ));
        }
        if !r.0.is_empty() {
            return Err("trailing bytes".into());
        }
        Ok(Packed(records))
    }

    fn decode_records(bytes: &[u8]) -> Result<Packed, String> {
        let mut r = Reader(bytes);
        let mut records = Vec::new();
        while !r.0.is_empty() {
            let name = r.text()?;
            let len = u32::from_be_bytes(r.take(4)?.try_into().map_err(|_| "short length")?);
            records.push((name, Record::decode(r.take(len as usize)?)?));
        }
        Ok(Packed(records))
    }

    /// The first encoding (tests of reading rows an earlier walhook wrote).
    #[cfg(test)]
    fn encode_records(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, record) in &self.0 {
            let record = record.encode();
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(record.len() as u32).to_be_bytes());
            out.extend_from_slice(&record);
        }
        out
    }
}

/// The first byte of a compactly encoded row. The first encoding starts with a name's
/// length as a big-endian u32, whose first byte is 0 for any name under 16 MB.
const COMPACT: u8 = 0xFF;

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    put_varint(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

/// Removes `class`'s records from every row of `table` (in batches; not atomic).
pub fn forget(log: &crate::log::Log, table: &str, class: &str) -> Result<(), crate::log::LogError> {
    let prefix = table_prefix(table);
    let mut from = prefix.clone();
    loop {
        let page = log.scan_raw(&prefix, &from, 10_000)?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        from = last.to_vec();
        from.push(0);
        let mut writes = Vec::new();
        for (key, bytes) in &page {
            let mut packed =
                Packed::decode(bytes).map_err(|reason| crate::log::LogError::Corrupt {
                    key: String::from_utf8_lossy(key).into_owned(),
                    reason,
                })?;
            if packed.get(class).is_some() {
                packed.set(class, None);
                writes.push((key.to_vec(), packed.stored()));
            }
        }
        log.write_bulk(&writes)?;
    }
}

/// Converts row state of the first layout (`b's'` classification \0 row → Record, and
/// `b'r'` pointers holding a bare Record) to the current one, keeping every value, so that
/// the stream goes on from the log's position as before. Each page is one atomic batch that
/// writes the new entries and removes the old ones, so a crash half-way resumes where it
/// stopped. `tables` maps each configured classification to its table ("schema.name");
/// the state and meta of any other classification are dropped. Returns how many old
/// entries there were.
pub fn convert_first_layout(
    log: &crate::log::Log,
    tables: &std::collections::HashMap<String, String>,
) -> Result<usize, crate::log::LogError> {
    let corrupt = |key: &[u8], reason: String| crate::log::LogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    };
    let mut converted = 0;
    for kind in [LEGACY_ROW, LEGACY_DEPENDENCY] {
        loop {
            let page = log.scan_raw(&[kind], &[kind], 1000)?;
            if page.is_empty() {
                break;
            }
            converted += page.len();
            let mut rows: std::collections::BTreeMap<Vec<u8>, Packed> = Default::default();
            let mut writes = Vec::with_capacity(page.len() * 2);
            for (key, bytes) in &page {
                writes.push((key.to_vec(), None));
                let Some(split) = key.iter().position(|b| *b == 0) else {
                    continue;
                };
                let class = String::from_utf8_lossy(&key[1..split]).into_owned();
                let Some(table) = tables.get(&class) else {
                    continue;
                };
                let record = Record::decode(bytes).map_err(|r| corrupt(key, r))?;
                if kind == LEGACY_DEPENDENCY {
                    let mut new_key = key.to_vec();
                    new_key[0] = DEPENDENCY;
                    writes.push((new_key, Some(Packed::pointer(record).encode())));
                    continue;
                }
                let row = String::from_utf8_lossy(&key[split + 1..]).into_owned();
                let row_key = row_key(table, &row);
                let packed = match rows.entry(row_key) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        let packed = match log.get_raw(e.key())? {
                            Some(b) => Packed::decode(&b).map_err(|r| corrupt(e.key(), r))?,
                            None => Packed::default(),
                        };
                        e.insert(packed)
                    }
                };
                packed.set(&class, Some(record));
            }
            writes.extend(rows.into_iter().map(|(key, packed)| (key, packed.stored())));
            log.write_raw(&writes)?;
        }
    }
    if converted > 0 {
        let prefix = meta_prefix();
        let mut writes = Vec::new();
        for (key, bytes) in log.scan_raw(&prefix, &prefix, usize::MAX)? {
            let class = String::from_utf8_lossy(&key[1..]).into_owned();
            let Ok(mut meta) = serde_json::from_slice::<ClassMeta>(&bytes) else {
                continue;
            };
            if !meta.table.is_empty() {
                continue;
            }
            match tables.get(&class) {
                Some(table) => {
                    meta.table = table.clone();
                    writes.push((key.to_vec(), serde_json::to_vec(&meta).ok()));
                }
                None => writes.push((key.to_vec(), None)),
            }
        }
        log.write_raw(&writes)?;
    }
    Ok(converted)
}

/// What a classification's state was built for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassMeta {
    /// A hash of the query: another query means another classification, baselined anew.
    pub fingerprint: String,
    /// Transactions committed at or after this LSN update the state; earlier ones were
    /// already in the baseline's snapshot.
    pub active_from: u64,
    /// The table whose rows hold its records ("schema.name").
    #[serde(default)]
    pub table: String,
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
            let _ = Packed::decode(&bytes);
        }

        #[test]
        fn packed_rows_round_trip_and_keep_each_classification_apart(
            names in proptest::collection::vec("[a-z_.]{0,6}", 0..6),
            lsns in proptest::collection::vec(any::<u64>(), 6),
        ) {
            let mut packed = Packed::default();
            for (name, lsn) in names.iter().zip(&lsns) {
                packed.set(name, Some(Record { value: Known::True, lsn: *lsn, columns: vec![(name.clone(), None)] }));
            }
            prop_assert_eq!(Packed::decode(&packed.encode()), Ok(packed.clone()));
            // The last set of each name wins, and removing one leaves the others.
            for (name, lsn) in names.iter().zip(&lsns).rev() {
                if names.iter().zip(&lsns).rev().find(|(n, _)| *n == name).map(|(_, l)| l) == Some(lsn) {
                    prop_assert_eq!(packed.get(name).map(|r| r.lsn), Some(*lsn));
                }
            }
            if let Some(first) = names.first() {
                packed.set(first, None);
                prop_assert!(packed.get(first).is_none());
                for name in names.iter().filter(|n| *n != first) {
                    prop_assert!(packed.get(name).is_some());
                }
            }
            prop_assert_eq!(packed.stored().is_none(), packed.is_empty());
        }

        #[test]
        fn rows_in_either_encoding_decode_to_the_same_records(
            records in proptest::collection::vec(
                (
                    "[a-z_]{0,6}",
                    0u8..3,
                    any::<u64>(),
                    // Names and values from small sets, so that records share columns.
                    proptest::collection::vec(
                        ("[ab]{1,2}", proptest::option::of("[xy]{0,2}")),
                        0..4,
                    ),
                ),
                0..6,
            ),
        ) {
            let mut packed = Packed::default();
            for (name, value, lsn, columns) in records {
                let value = [Known::False, Known::True, Known::Unknown][value as usize];
                packed.set(&name, Some(Record { value, lsn, columns }));
            }
            let compact = packed.encode();
            prop_assert_eq!(compact.first(), Some(&COMPACT));
            prop_assert_eq!(Packed::decode(&compact), Ok(packed.clone()));
            prop_assert_eq!(Packed::decode(&packed.encode_records()), Ok(packed.clone()));
        }
    }

    #[test]
    fn a_column_several_classifications_keep_is_stored_once() {
        let columns = |names: &[&str]| -> Vec<(String, Option<String>)> {
            names
                .iter()
                .map(|n| {
                    (
                        n.to_string(),
                        Some("2026-11-27 12:00:00.123456+00".to_string()),
                    )
                })
                .collect()
        };
        let mut packed = Packed::default();
        for (class, names) in [
            ("account_active", &["status", "deleted_at"][..]),
            ("account_paying", &["plan", "balance_cents", "status"]),
            ("account_overdrawn", &["balance_cents", "deleted_at"]),
        ] {
            let record = Record {
                value: Known::True,
                lsn: 123_456_789,
                columns: columns(names),
            };
            packed.set(class, Some(record));
        }
        let (compact, first) = (packed.encode(), packed.encode_records());
        // Four distinct columns instead of seven column entries, and shorter lengths: 237
        // bytes against 424.
        assert!(
            compact.len() * 10 < first.len() * 6,
            "compact {} bytes, first encoding {}",
            compact.len(),
            first.len()
        );
        assert_eq!(Packed::decode(&compact), Ok(packed));
        // A column index past the columns is an error, not a panic.
        let mut bad = compact.clone();
        let last = bad.len() - 1;
        bad[last] = 9;
        assert!(Packed::decode(&bad).is_err());
    }

    #[test]
    fn the_first_layout_converts_keeping_every_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = crate::log::Log::open(dir.path()).expect("open");
        let record = |lsn| Record {
            value: Known::True,
            lsn,
            columns: vec![("status".into(), Some("active".into()))],
        };
        let meta = |table: &str| {
            serde_json::to_vec(&ClassMeta {
                fingerprint: "f".into(),
                active_from: 7,
                table: table.into(),
            })
            .ok()
        };
        let legacy = |kind: u8, rest: &str| {
            let mut key = vec![kind];
            key.extend_from_slice(rest.as_bytes());
            key
        };
        log.write_raw(&[
            (legacy(LEGACY_ROW, "a\u{0}1"), Some(record(1).encode())),
            (legacy(LEGACY_ROW, "b\u{0}1"), Some(record(2).encode())),
            (legacy(LEGACY_ROW, "gone\u{0}1"), Some(record(3).encode())),
            (
                legacy(LEGACY_DEPENDENCY, "a\u{0}\u{0}9"),
                Some(record(4).encode()),
            ),
            (meta_key("a"), meta("")),
            (meta_key("gone"), meta("")),
        ])
        .expect("first layout");
        let tables = [("a", "public.t"), ("b", "public.t")]
            .into_iter()
            .map(|(c, t)| (c.to_string(), t.to_string()))
            .collect();
        assert_eq!(convert_first_layout(&log, &tables).expect("convert"), 4);
        let row = log
            .get_raw(&row_key("public.t", "1"))
            .expect("get")
            .expect("the row");
        let packed = Packed::decode(&row).expect("packed");
        assert_eq!(packed.get("a"), Some(&record(1)));
        assert_eq!(packed.get("b"), Some(&record(2)));
        assert!(packed.get("gone").is_none());
        let mut pointer = dependency_prefix("a");
        pointer.extend_from_slice(&[0, b'9']);
        let pointer = log.get_raw(&pointer).expect("get").expect("the pointer");
        assert_eq!(Packed::decode(&pointer), Ok(Packed::pointer(record(4))));
        for kind in [LEGACY_ROW, LEGACY_DEPENDENCY] {
            assert!(log.scan_raw(&[kind], &[kind], 10).expect("scan").is_empty());
        }
        let a: ClassMeta =
            serde_json::from_slice(&log.get_raw(&meta_key("a")).expect("get").expect("meta"))
                .expect("meta json");
        assert_eq!((a.table.as_str(), a.active_from), ("public.t", 7));
        assert!(log.get_raw(&meta_key("gone")).expect("get").is_none());
        // Nothing left to do the second time.
        assert_eq!(convert_first_layout(&log, &tables).expect("again"), 0);
    }

    #[test]
    fn keys_sort_by_table_then_row() {
        let a = row_key("public.a", "42");
        assert!(a.starts_with(&table_prefix("public.a")));
        assert_eq!(row_of(&table_prefix("public.a"), &a).as_deref(), Some("42"));
        // "public.a" rows never fall under the prefix of "public.a2".
        assert!(!row_key("public.a2", "1").starts_with(&table_prefix("public.a")));
    }
}
