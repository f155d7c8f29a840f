//! Decoder for pgoutput, PostgreSQL's built-in logical decoding output plugin, protocol
//! version 1.
//!
//! Every change a logical replication slot emits reaches us as one pgoutput message: the
//! payload of an XLogData frame (or one row of `pg_logical_slot_get_binary_changes`). The first
//! byte is a tag, the rest big-endian integers, NUL-terminated strings and length-prefixed
//! column values:
//!
//! ```text
//! 'B' Begin     final LSN, commit time, xid
//! 'O' Origin    origin's commit LSN, origin name          (only for replicated-in changes)
//! 'R' Relation  table OID, schema, name, replica identity, columns   (before first use, after DDL)
//! 'Y' Type      type OID, schema, name                    (before a relation using a custom type)
//! 'I' Insert    table OID, 'N' new tuple
//! 'U' Update    table OID, ['K' key | 'O' old tuple], 'N' new tuple
//! 'D' Delete    table OID, 'K' key | 'O' old tuple
//! 'T' Truncate  options, table OIDs
//! 'M' Message   pg_logical_emit_message(): transactional flag, LSN, prefix, content
//! 'C' Commit    flags, commit LSN, end LSN, commit time
//! ```
//!
//! Version 1 has no streaming: no xid fields inside changes and none of the stream, prepare
//! or two-phase messages of later versions (those tags are rejected with an error saying so).
//!
//! Contract, because this runs on every replicated row:
//!
//! - **Pure.** [`decode`] takes one message and returns one [`Message`]; no I/O, no state.
//!   Tying a tuple to its columns is the transaction layer's job (it caches [`Relation`]s).
//! - **Never panics.** Every read is bounds-checked, declared counts are checked against the
//!   bytes actually left before anything is allocated, and a malformed message becomes a
//!   [`DecodeError`] naming the message, the field and the byte offset.
//! - **Zero-copy values.** [`Value::Text`] and [`Value::Binary`] are slices of the input
//!   [`Bytes`] (a reference-count bump, not a copy); the only per-tuple allocation is the
//!   `Vec` of values.
//! - **Strict.** Bytes left over after a complete message are an error: they mean we and the
//!   server disagree about the format, and silently ignoring them could drop data.

use std::fmt;

use bytes::Bytes;
pub use pgwire_replication::Lsn;

/// [`Message::Truncate`] option bit: `TRUNCATE ... CASCADE`.
pub const TRUNCATE_CASCADE: u8 = 1;
/// [`Message::Truncate`] option bit: `TRUNCATE ... RESTART IDENTITY`.
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

/// One decoded pgoutput message. Timestamps are microseconds since 2000-01-01 00:00 UTC
/// (the PostgreSQL epoch), exactly as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        /// LSN of the transaction's commit record; the matching Commit carries it again.
        final_lsn: Lsn,
        commit_time_micros: i64,
        xid: u32,
    },
    Commit {
        /// Unused by the server so far (always 0); kept raw rather than validated.
        flags: u8,
        commit_lsn: Lsn,
        /// End of the commit record: the position to confirm as flushed.
        end_lsn: Lsn,
        commit_time_micros: i64,
    },
    Origin {
        /// The commit LSN on the origin server, not ours.
        commit_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        id: u32,
        /// Empty for `pg_catalog`.
        namespace: String,
        name: String,
    },
    Insert {
        relation_id: u32,
        new: Tuple,
    },
    Update {
        relation_id: u32,
        /// Present only with REPLICA IDENTITY FULL ([`OldTuple::Full`]) or when a key column
        /// changed ([`OldTuple::Key`]).
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relation_id: u32,
        old: OldTuple,
    },
    Truncate {
        /// Bit set of [`TRUNCATE_CASCADE`] and [`TRUNCATE_RESTART_IDENTITY`].
        options: u8,
        relation_ids: Vec<u32>,
    },
    /// A message written with `pg_logical_emit_message()`.
    LogicalMessage {
        /// A non-transactional message arrives outside any Begin/Commit, even if the
        /// emitting transaction later rolls back.
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        /// Zero-copy slice of the input.
        content: Bytes,
    },
}

impl Message {
    /// Which message this is, as named in [`DecodeError`]s.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Begin { .. } => MessageKind::Begin,
            Message::Commit { .. } => MessageKind::Commit,
            Message::Origin { .. } => MessageKind::Origin,
            Message::Relation(_) => MessageKind::Relation,
            Message::Type { .. } => MessageKind::Type,
            Message::Insert { .. } => MessageKind::Insert,
            Message::Update { .. } => MessageKind::Update,
            Message::Delete { .. } => MessageKind::Delete,
            Message::Truncate { .. } => MessageKind::Truncate,
            Message::LogicalMessage { .. } => MessageKind::LogicalMessage,
        }
    }
}

/// A table's shape as the server describes it. It is sent before the first change to the
/// table in a replication session and again after any DDL that changes it, so a cache keyed
/// by [`Relation::id`] must be replaced, not merged, on every Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    /// In tuple order. Generated columns are not sent and so are absent.
    pub columns: Vec<RelationColumn>,
}

/// `pg_class.relreplident`: which columns an Update or Delete carries for the old row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `'d'`: the primary key.
    Default,
    /// `'n'`: nothing; Update and Delete cannot be published for such a table.
    Nothing,
    /// `'f'`: every column.
    Full,
    /// `'i'`: the columns of a chosen unique index.
    Index,
    /// Kept rather than rejected so a future server value does not stop replication.
    Unknown(u8),
}

impl ReplicaIdentity {
    fn from_byte(b: u8) -> Self {
        match b {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            other => ReplicaIdentity::Unknown(other),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (with REPLICA IDENTITY FULL, every column is).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`: -1 when the type has none, e.g. `numeric(10,2)` is `(10 << 16 | 2) + 4`.
    pub type_modifier: i32,
}

/// One column of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `'n'`. Also used for the non-key columns of an [`OldTuple::Key`].
    Null,
    /// `'u'`: a TOASTed value the update did not change, so the server did not send it. It is
    /// *not* NULL: the previous value still stands and must be taken from elsewhere.
    UnchangedToast,
    /// `'t'`: the value in the type's text output format (zero-copy slice of the input).
    Text(Bytes),
    /// `'b'`: the type's binary send format, only when the slot was started with
    /// `binary 'true'` (zero-copy slice of the input).
    Binary(Bytes),
}

/// The columns of one row, in the order of the latest [`Relation`] for its table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Value>);

/// The old row an Update or Delete carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `'K'`: only the replica identity columns hold values; all others are [`Value::Null`]
    /// placeholders, not real NULLs.
    Key(Tuple),
    /// `'O'`: the whole old row (REPLICA IDENTITY FULL). Unchanged TOAST columns may still be
    /// [`Value::UnchangedToast`].
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// Which message a [`DecodeError`] occurred in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Begin,
    Commit,
    Origin,
    Relation,
    Type,
    Insert,
    Update,
    Delete,
    Truncate,
    LogicalMessage,
}

impl MessageKind {
    /// The tag byte that starts this message.
    pub fn tag(self) -> u8 {
        match self {
            MessageKind::Begin => b'B',
            MessageKind::Commit => b'C',
            MessageKind::Origin => b'O',
            MessageKind::Relation => b'R',
            MessageKind::Type => b'Y',
            MessageKind::Insert => b'I',
            MessageKind::Update => b'U',
            MessageKind::Delete => b'D',
            MessageKind::Truncate => b'T',
            MessageKind::LogicalMessage => b'M',
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        Some(match tag {
            b'B' => MessageKind::Begin,
            b'C' => MessageKind::Commit,
            b'O' => MessageKind::Origin,
            b'R' => MessageKind::Relation,
            b'Y' => MessageKind::Type,
            b'I' => MessageKind::Insert,
            b'U' => MessageKind::Update,
            b'D' => MessageKind::Delete,
            b'T' => MessageKind::Truncate,
            b'M' => MessageKind::LogicalMessage,
            _ => return None,
        })
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The protocol documentation's names, so an error can be looked up there.
        f.write_str(match self {
            MessageKind::Begin => "Begin",
            MessageKind::Commit => "Commit",
            MessageKind::Origin => "Origin",
            MessageKind::Relation => "Relation",
            MessageKind::Type => "Type",
            MessageKind::Insert => "Insert",
            MessageKind::Update => "Update",
            MessageKind::Delete => "Delete",
            MessageKind::Truncate => "Truncate",
            MessageKind::LogicalMessage => "Message",
        })
    }
}

/// Which tuple of a message a [`Field`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TuplePart {
    New,
    Key,
    Old,
}

impl fmt::Display for TuplePart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TuplePart::New => "new tuple",
            TuplePart::Key => "key tuple",
            TuplePart::Old => "old tuple",
        })
    }
}

/// The field a [`DecodeError`] is about. Column and relation indices count from 0, like the
/// `Vec`s they end up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Field {
    FinalLsn,
    CommitTime,
    Xid,
    CommitFlags,
    CommitLsn,
    EndLsn,
    OriginLsn,
    OriginName,
    RelationId,
    Namespace,
    RelationName,
    ReplicaIdentity,
    ColumnCount,
    ColumnFlags(u16),
    ColumnName(u16),
    ColumnTypeOid(u16),
    ColumnTypeModifier(u16),
    TypeOid,
    TypeNamespace,
    TypeName,
    /// The `'N'`, `'K'` or `'O'` byte that introduces a tuple.
    TupleMarker,
    TupleColumnCount(TuplePart),
    /// The column's kind byte (`'n'`, `'u'`, `'t'` or `'b'`).
    TupleColumn(TuplePart, u16),
    TupleValueLength(TuplePart, u16),
    TupleValue(TuplePart, u16),
    RelationCount,
    TruncateOptions,
    TruncateRelationId(u32),
    MessageFlags,
    MessageLsn,
    MessagePrefix,
    ContentLength,
    Content,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::FinalLsn => f.write_str("final LSN"),
            Field::CommitTime => f.write_str("commit timestamp"),
            Field::Xid => f.write_str("transaction id"),
            Field::CommitFlags => f.write_str("flags"),
            Field::CommitLsn => f.write_str("commit LSN"),
            Field::EndLsn => f.write_str("end LSN"),
            Field::OriginLsn => f.write_str("origin commit LSN"),
            Field::OriginName => f.write_str("origin name"),
            Field::RelationId => f.write_str("relation id"),
            Field::Namespace => f.write_str("namespace"),
            Field::RelationName => f.write_str("relation name"),
            Field::ReplicaIdentity => f.write_str("replica identity"),
            Field::ColumnCount => f.write_str("column count"),
            Field::ColumnFlags(i) => write!(f, "flags of column {i}"),
            Field::ColumnName(i) => write!(f, "name of column {i}"),
            Field::ColumnTypeOid(i) => write!(f, "type OID of column {i}"),
            Field::ColumnTypeModifier(i) => write!(f, "type modifier of column {i}"),
            Field::TypeOid => f.write_str("type OID"),
            Field::TypeNamespace => f.write_str("type namespace"),
            Field::TypeName => f.write_str("type name"),
            Field::TupleMarker => f.write_str("tuple marker"),
            Field::TupleColumnCount(part) => write!(f, "{part} column count"),
            Field::TupleColumn(part, i) => write!(f, "{part} column {i}"),
            Field::TupleValueLength(part, i) => write!(f, "length of {part} column {i}"),
            Field::TupleValue(part, i) => write!(f, "value of {part} column {i}"),
            Field::RelationCount => f.write_str("relation count"),
            Field::TruncateOptions => f.write_str("options"),
            Field::TruncateRelationId(i) => write!(f, "relation id {i}"),
            Field::MessageFlags => f.write_str("flags"),
            Field::MessageLsn => f.write_str("message LSN"),
            Field::MessagePrefix => f.write_str("prefix"),
            Field::ContentLength => f.write_str("content length"),
            Field::Content => f.write_str("content"),
        }
    }
}

/// A message that is not valid pgoutput v1. Offsets count bytes from the start of the
/// message, the tag being byte 0.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput: empty message")]
    Empty,
    #[error("pgoutput: unknown message tag {} at byte 0", ShowByte(*.tag))]
    UnknownTag { tag: u8 },
    #[error(
        "pgoutput: message tag {} ({name}) exists only in protocol version 2 or later, \
         but the slot must be read with proto_version '1'",
        ShowByte(*.tag)
    )]
    LaterProtocolVersion { tag: u8, name: &'static str },
    #[error(
        "pgoutput {message}: truncated {field} at byte {offset} \
         (needs {needed} bytes, has {remaining})"
    )]
    Truncated {
        message: MessageKind,
        field: Field,
        offset: usize,
        needed: usize,
        remaining: usize,
    },
    #[error("pgoutput {message}: unterminated {field} at byte {offset} (no NUL before the end)")]
    UnterminatedString {
        message: MessageKind,
        field: Field,
        offset: usize,
    },
    #[error(
        "pgoutput {message}: unexpected {field} {} at byte {offset} (expected {expected})",
        ShowByte(*.found)
    )]
    UnexpectedByte {
        message: MessageKind,
        field: Field,
        offset: usize,
        found: u8,
        expected: &'static str,
    },
    #[error("pgoutput {message}: {field} is negative ({length}) at byte {offset}")]
    NegativeLength {
        message: MessageKind,
        field: Field,
        offset: usize,
        length: i32,
    },
    #[error(
        "pgoutput {message}: {field} {count} at byte {offset} cannot fit in the {remaining} \
         bytes that follow"
    )]
    CountTooLarge {
        message: MessageKind,
        field: Field,
        offset: usize,
        count: u32,
        remaining: usize,
    },
    #[error(
        "pgoutput {message}: {count} unexpected trailing bytes at byte {offset} \
         after a complete message"
    )]
    TrailingBytes {
        message: MessageKind,
        offset: usize,
        count: usize,
    },
}

impl DecodeError {
    /// Byte offset of the problem within the message.
    pub fn offset(&self) -> usize {
        match self {
            DecodeError::Empty | DecodeError::UnknownTag { .. } => 0,
            DecodeError::LaterProtocolVersion { .. } => 0,
            DecodeError::Truncated { offset, .. }
            | DecodeError::UnterminatedString { offset, .. }
            | DecodeError::UnexpectedByte { offset, .. }
            | DecodeError::NegativeLength { offset, .. }
            | DecodeError::CountTooLarge { offset, .. }
            | DecodeError::TrailingBytes { offset, .. } => *offset,
        }
    }
}

/// Shows a byte as `'X' (0x58)` when printable, else `0x01`, since tags and markers are
/// ASCII letters but a corrupt byte can be anything.
struct ShowByte(u8);

impl fmt::Display for ShowByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}' (0x{:02x})", char::from(self.0), self.0)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// Tags of protocol versions 2 to 4, recognised only to give a better error than "unknown".
fn later_version_message(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        b'p' => "Stream Prepare",
        _ => return None,
    })
}

/// Decodes one pgoutput v1 message. Never panics; see the module documentation.
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = data.first() else {
        return Err(DecodeError::Empty);
    };
    let Some(kind) = MessageKind::from_tag(tag) else {
        return Err(match later_version_message(tag) {
            Some(name) => DecodeError::LaterProtocolVersion { tag, name },
            None => DecodeError::UnknownTag { tag },
        });
    };
    let mut r = Reader { data, pos: 1, kind };
    let message = match kind {
        MessageKind::Begin => Message::Begin {
            final_lsn: r.lsn(Field::FinalLsn)?,
            commit_time_micros: r.i64(Field::CommitTime)?,
            xid: r.u32(Field::Xid)?,
        },
        MessageKind::Commit => Message::Commit {
            flags: r.u8(Field::CommitFlags)?,
            commit_lsn: r.lsn(Field::CommitLsn)?,
            end_lsn: r.lsn(Field::EndLsn)?,
            commit_time_micros: r.i64(Field::CommitTime)?,
        },
        MessageKind::Origin => Message::Origin {
            commit_lsn: r.lsn(Field::OriginLsn)?,
            name: r.string(Field::OriginName)?,
        },
        MessageKind::Relation => Message::Relation(relation(&mut r)?),
        MessageKind::Type => Message::Type {
            id: r.u32(Field::TypeOid)?,
            namespace: r.string(Field::TypeNamespace)?,
            name: r.string(Field::TypeName)?,
        },
        MessageKind::Insert => {
            let relation_id = r.u32(Field::RelationId)?;
            r.expect_marker(b'N', "'N'")?;
            Message::Insert {
                relation_id,
                new: tuple(&mut r, TuplePart::New)?,
            }
        }
        MessageKind::Update => update(&mut r)?,
        MessageKind::Delete => {
            let relation_id = r.u32(Field::RelationId)?;
            let at = r.pos;
            let old = match r.u8(Field::TupleMarker)? {
                b'K' => OldTuple::Key(tuple(&mut r, TuplePart::Key)?),
                b'O' => OldTuple::Full(tuple(&mut r, TuplePart::Old)?),
                found => return Err(r.unexpected(Field::TupleMarker, at, found, "'K' or 'O'")),
            };
            Message::Delete { relation_id, old }
        }
        MessageKind::Truncate => truncate(&mut r)?,
        MessageKind::LogicalMessage => {
            // Only bit 0 is defined; other bits are ignored so a future flag cannot stop us.
            let transactional = r.u8(Field::MessageFlags)? & 1 != 0;
            let lsn = r.lsn(Field::MessageLsn)?;
            let prefix = r.string(Field::MessagePrefix)?;
            let len = r.length(Field::ContentLength)?;
            Message::LogicalMessage {
                transactional,
                lsn,
                prefix,
                content: r.bytes(len, Field::Content)?,
            }
        }
    };
    r.finish()?;
    Ok(message)
}

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = r.u32(Field::RelationId)?;
    let namespace = r.string(Field::Namespace)?;
    let name = r.string(Field::RelationName)?;
    let replica_identity = ReplicaIdentity::from_byte(r.u8(Field::ReplicaIdentity)?);
    let at = r.pos;
    let count = r.u16(Field::ColumnCount)?;
    // Smallest column: flags (1) + empty name (1) + type OID (4) + type modifier (4).
    r.check_count(u32::from(count), 10, Field::ColumnCount, at)?;
    let mut columns = Vec::with_capacity(usize::from(count));
    for i in 0..count {
        // Only bit 0 ("part of the key") is defined; ignore the rest, as the server may
        // define more without changing the protocol version.
        let is_key = r.u8(Field::ColumnFlags(i))? & 1 != 0;
        columns.push(RelationColumn {
            is_key,
            name: r.string(Field::ColumnName(i))?,
            type_oid: r.u32(Field::ColumnTypeOid(i))?,
            type_modifier: r.i32(Field::ColumnTypeModifier(i))?,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn update(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let relation_id = r.u32(Field::RelationId)?;
    let at = r.pos;
    let old = match r.u8(Field::TupleMarker)? {
        b'N' => None,
        b'K' => Some(OldTuple::Key(tuple(r, TuplePart::Key)?)),
        b'O' => Some(OldTuple::Full(tuple(r, TuplePart::Old)?)),
        found => return Err(r.unexpected(Field::TupleMarker, at, found, "'K', 'O' or 'N'")),
    };
    if old.is_some() {
        r.expect_marker(b'N', "'N'")?;
    }
    Ok(Message::Update {
        relation_id,
        old,
        new: tuple(r, TuplePart::New)?,
    })
}

fn truncate(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let at = r.pos;
    let count = r.u32(Field::RelationCount)?;
    let options = r.u8(Field::TruncateOptions)?;
    r.check_count(count, 4, Field::RelationCount, at)?;
    // check_count bounded `count` by the input length, so it fits in usize.
    let mut relation_ids = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for i in 0..count {
        relation_ids.push(r.u32(Field::TruncateRelationId(i))?);
    }
    Ok(Message::Truncate {
        options,
        relation_ids,
    })
}

/// TupleData: a column count, then per column a kind byte and, for text and binary values, a
/// length and the value itself.
fn tuple(r: &mut Reader<'_>, part: TuplePart) -> Result<Tuple, DecodeError> {
    let at = r.pos;
    let count = r.u16(Field::TupleColumnCount(part))?;
    // Every column takes at least its kind byte.
    r.check_count(u32::from(count), 1, Field::TupleColumnCount(part), at)?;
    let mut values = Vec::with_capacity(usize::from(count));
    for i in 0..count {
        let at = r.pos;
        let value = match r.u8(Field::TupleColumn(part, i))? {
            b'n' => Value::Null,
            b'u' => Value::UnchangedToast,
            b't' => Value::Text(r.value(part, i)?),
            b'b' => Value::Binary(r.value(part, i)?),
            found => {
                return Err(r.unexpected(
                    Field::TupleColumn(part, i),
                    at,
                    found,
                    "'n', 'u', 't' or 'b'",
                ))
            }
        };
        values.push(value);
    }
    Ok(Tuple(values))
}

/// A cursor over one message. Invariant: `pos <= data.len()`, so `remaining` cannot underflow.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    kind: MessageKind,
}

impl<'a> Reader<'a> {
    fn rest(&self) -> &'a [u8] {
        self.data.get(self.pos..).unwrap_or_default()
    }

    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn array<const N: usize>(&mut self, field: Field) -> Result<[u8; N], DecodeError> {
        match self.rest().first_chunk::<N>() {
            Some(chunk) => {
                self.pos += N;
                Ok(*chunk)
            }
            None => Err(self.truncated(field, N)),
        }
    }

    fn u8(&mut self, field: Field) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    fn u16(&mut self, field: Field) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: Field) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: Field) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn i64(&mut self, field: Field) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    fn lsn(&mut self, field: Field) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    /// A NUL-terminated string. Only names (schemas, tables, columns, types, origins,
    /// message prefixes) are strings; they are decoded lossily because an invalid byte in
    /// a name is no reason to stop replication, and the OIDs, not the names, identify things.
    fn string(&mut self, field: Field) -> Result<String, DecodeError> {
        let rest = self.rest();
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::UnterminatedString {
                message: self.kind,
                field,
                offset: self.pos,
            });
        };
        let raw = rest.get(..nul).unwrap_or_default();
        self.pos += nul + 1;
        Ok(String::from_utf8_lossy(raw).into_owned())
    }

    /// An Int32 length; the server never sends a negative one.
    fn length(&mut self, field: Field) -> Result<usize, DecodeError> {
        let at = self.pos;
        let length = self.i32(field)?;
        usize::try_from(length).map_err(|_| DecodeError::NegativeLength {
            message: self.kind,
            field,
            offset: at,
            length,
        })
    }

    /// `len` bytes as a zero-copy slice of the input.
    fn bytes(&mut self, len: usize, field: Field) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(self.truncated(field, len));
        }
        let start = self.pos;
        self.pos += len;
        Ok(self.data.slice(start..self.pos))
    }

    fn value(&mut self, part: TuplePart, i: u16) -> Result<Bytes, DecodeError> {
        let len = self.length(Field::TupleValueLength(part, i))?;
        self.bytes(len, Field::TupleValue(part, i))
    }

    fn expect_marker(&mut self, want: u8, expected: &'static str) -> Result<(), DecodeError> {
        let at = self.pos;
        match self.u8(Field::TupleMarker)? {
            found if found == want => Ok(()),
            found => Err(self.unexpected(Field::TupleMarker, at, found, expected)),
        }
    }

    /// Rejects a declared element count that cannot fit in what is left, before anything is
    /// allocated for it: a corrupt count must not turn into a multi-gigabyte `Vec`.
    fn check_count(
        &self,
        count: u32,
        min_size: usize,
        field: Field,
        at: usize,
    ) -> Result<(), DecodeError> {
        let fits = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(min_size))
            .is_some_and(|needed| needed <= self.remaining());
        if fits {
            Ok(())
        } else {
            Err(DecodeError::CountTooLarge {
                message: self.kind,
                field,
                offset: at,
                count,
                remaining: self.remaining(),
            })
        }
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                message: self.kind,
                offset: self.pos,
                count,
            }),
        }
    }

    fn truncated(&self, field: Field, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.kind,
            field,
            offset: self.pos,
            needed,
            remaining: self.remaining(),
        }
    }

    fn unexpected(
        &self,
        field: Field,
        at: usize,
        found: u8,
        expected: &'static str,
    ) -> DecodeError {
        DecodeError::UnexpectedByte {
            message: self.kind,
            field,
            offset: at,
            found,
            expected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Messages captured from PostgreSQL 15.18 with
    // `SELECT encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('cap', NULL, NULL,
    //  'proto_version', '1', 'publication_names', 'walhook_pub', 'messages', 'true')`
    // (plus 'binary', 'true' for INSERT_BINARY) after this schema:
    //
    //   CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');                          -- OID 16385
    //   CREATE TABLE customers (id int PRIMARY KEY, name text, mood mood,
    //                           score numeric(10,2));                             -- OID 16391
    //   CREATE TABLE audit_full (id int PRIMARY KEY, note text);                  -- OID 16398
    //   ALTER TABLE audit_full REPLICA IDENTITY FULL;
    //   CREATE TABLE trunc_a (id serial PRIMARY KEY);                             -- OID 16406
    //   CREATE TABLE trunc_b (id serial PRIMARY KEY, a_id int REFERENCES trunc_a); -- OID 16413
    //   CREATE TABLE docs (id int PRIMARY KEY, counter int, body text);           -- OID 16424
    //   ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
    //   CREATE TABLE by_index (k int NOT NULL, v text);                           -- OID 16431
    //   CREATE UNIQUE INDEX by_index_k ON by_index (k);
    //   ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_k;
    //   CREATE TABLE no_ident (v text);                                           -- OID 16437
    //   ALTER TABLE no_ident REPLICA IDENTITY NOTHING;
    //   CREATE PUBLICATION walhook_pub FOR ALL TABLES;

    /// Begin of `INSERT INTO customers VALUES (1, 'Ada', 'happy', 12.50), (2, NULL, 'ok', NULL)`.
    const BEGIN: &str = "42000000000154d89800030439ed3f7a8d000002e2";
    /// Sent before the customers Relation because its `mood` column has a non-built-in type.
    const TYPE_MOOD: &str = "59000040017075626c6963006d6f6f6400";
    const RELATION_CUSTOMERS: &str = "52000040077075626c696300637573746f6d657273006400040169640000\
        000017ffffffff006e616d650000000019ffffffff006d6f6f640000004001ffffffff0073636f7265000000\
        06a4000a0006";
    const INSERT_ADA: &str = "49000040074e0004740000000131740000000341646174000000056861707079\
        740000000531322e3530";
    const INSERT_WITH_NULLS: &str = "49000040074e00047400000001326e74000000026f6b6e";
    /// Commit matching BEGIN.
    const COMMIT: &str = "4300000000000154d898000000000154d8c800030439ed3f7a8d";
    /// `UPDATE customers SET name = 'Ada Lovelace' WHERE id = 1`: key unchanged, no old tuple.
    const UPDATE_NO_OLD: &str = "55000040074e0004740000000131740000000c416461204c6f76656c6163\
        6574000000056861707079740000000531322e3530";
    /// `UPDATE customers SET id = 10 WHERE id = 1`: primary key changed, so 'K'.
    const UPDATE_KEY: &str = "55000040074b00047400000001316e6e6e4e000474000000023130740000000c\
        416461204c6f76656c61636574000000056861707079740000000531322e3530";
    /// `DELETE FROM customers WHERE id = 2`.
    const DELETE_KEY: &str = "44000040074b00047400000001326e6e6e";
    const RELATION_AUDIT_FULL: &str =
        "520000400e7075626c69630061756469745f66756c6c0066000201696400\
        00000017ffffffff016e6f74650000000019ffffffff";
    /// `UPDATE audit_full SET note = 'second' WHERE id = 7` (was 'first').
    const UPDATE_FULL: &str = "550000400e4f0002740000000137740000000566697273744e0002740000000137\
        74000000067365636f6e64";
    /// `DELETE FROM audit_full WHERE id = 7`.
    const DELETE_FULL: &str = "440000400e4f000274000000013774000000067365636f6e64";
    /// `TRUNCATE trunc_a, trunc_b RESTART IDENTITY CASCADE`.
    const TRUNCATE_TWO: &str = "540000000203000040160000401d";
    /// `TRUNCATE trunc_b`.
    const TRUNCATE_ONE: &str = "5400000001000000401d";
    /// `SELECT pg_logical_emit_message(true, 'walhook', 'hello txn')`.
    const MESSAGE_TRANSACTIONAL: &str =
        "4d01000000000154fa6077616c686f6f6b000000000968656c6c6f2074786e";
    /// `SELECT pg_logical_emit_message(false, 'walhook.bin', '\x00ff10'::bytea)`.
    const MESSAGE_NON_TRANSACTIONAL: &str =
        "4d00000000000154fad877616c686f6f6b2e62696e000000000300ff10";
    const RELATION_DOCS: &str = "52000040287075626c696300646f6373006400030169640000000017ffffff\
        ff00636f756e7465720000000017ffffffff00626f64790000000019ffffffff";
    /// After inserting (1, 0, 10 240 chars of md5 hex) into docs (body stored out of line):
    /// `UPDATE docs SET counter = counter + 1 WHERE id = 1`, so body is unchanged TOAST.
    const UPDATE_UNCHANGED_TOAST: &str = "55000040284e000374000000013174000000013175";
    const RELATION_BY_INDEX: &str = "520000402f7075626c69630062795f696e64657800690002016b00000000\
        17ffffffff00760000000019ffffffff";
    const RELATION_NO_IDENT: &str = "52000040357075626c6963006e6f5f6964656e74006e00010076000000\
        0019ffffffff";
    // A transaction replayed through a replication origin:
    //   SELECT pg_replication_origin_create('upstream_eu');
    //   SELECT pg_replication_origin_session_setup('upstream_eu');
    //   BEGIN;
    //   SELECT pg_replication_origin_xact_setup('0/ABCDEF0', '2024-01-02 03:04:05+00');
    //   INSERT INTO customers VALUES (3, 'Grace', 'sad', 1);
    //   COMMIT;
    const BEGIN_ORIGIN: &str = "420000000001552ce80002b0ec8515f340000002f3";
    const ORIGIN: &str = "4f000000000abcdef0757073747265616d5f657500";
    const INSERT_GRACE: &str = "49000040074e00047400000001337400000005477261636574000000037361\
        647400000004312e3030";
    /// The same insert decoded with `'binary', 'true'`.
    const INSERT_GRACE_BINARY: &str =
        "49000040074e000462000000040000000362000000054772616365620000\
        0003736164620000000a00010000000000020001";
    const COMMIT_ORIGIN: &str = "43000000000001552ce80000000001552d300002b0ec8515f340";

    const CAPTURED: &[&str] = &[
        BEGIN,
        TYPE_MOOD,
        RELATION_CUSTOMERS,
        INSERT_ADA,
        INSERT_WITH_NULLS,
        COMMIT,
        UPDATE_NO_OLD,
        UPDATE_KEY,
        DELETE_KEY,
        RELATION_AUDIT_FULL,
        UPDATE_FULL,
        DELETE_FULL,
        TRUNCATE_TWO,
        TRUNCATE_ONE,
        MESSAGE_TRANSACTIONAL,
        MESSAGE_NON_TRANSACTIONAL,
        RELATION_DOCS,
        UPDATE_UNCHANGED_TOAST,
        RELATION_BY_INDEX,
        RELATION_NO_IDENT,
        BEGIN_ORIGIN,
        ORIGIN,
        INSERT_GRACE,
        INSERT_GRACE_BINARY,
        COMMIT_ORIGIN,
    ];

    const INT4: u32 = 23;
    const TEXT: u32 = 25;
    const NUMERIC: u32 = 1700;
    const MOOD: u32 = 16385;
    const CUSTOMERS: u32 = 16391;
    const AUDIT_FULL: u32 = 16398;

    /// Decodes a test constant; the constants are ours, so a bad digit is a bug in the test.
    fn hex(s: &str) -> Bytes {
        assert!(s.len().is_multiple_of(2), "odd hex length");
        let digits: Vec<u8> = s
            .as_bytes()
            .chunks(2)
            .map(|pair| {
                let pair = std::str::from_utf8(pair).expect("ascii hex");
                u8::from_str_radix(pair, 16).expect("hex digit")
            })
            .collect();
        Bytes::from(digits)
    }

    fn decode_hex(s: &str) -> Message {
        decode(&hex(s)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn column(is_key: bool, name: &str, type_oid: u32, type_modifier: i32) -> RelationColumn {
        RelationColumn {
            is_key,
            name: name.to_owned(),
            type_oid,
            type_modifier,
        }
    }

    fn replica_identity_byte(ri: ReplicaIdentity) -> u8 {
        match ri {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
            ReplicaIdentity::Unknown(b) => b,
        }
    }

    /// The inverse of `decode`, written from the protocol documentation independently of the
    /// decoder, so that round trips and re-encoding captured messages check every field.
    fn encode(m: &Message) -> Vec<u8> {
        fn cstr(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        fn tuple(out: &mut Vec<u8>, t: &Tuple) {
            out.extend_from_slice(&(t.0.len() as u16).to_be_bytes());
            for v in &t.0 {
                match v {
                    Value::Null => out.push(b'n'),
                    Value::UnchangedToast => out.push(b'u'),
                    Value::Text(b) | Value::Binary(b) => {
                        out.push(if matches!(v, Value::Text(_)) {
                            b't'
                        } else {
                            b'b'
                        });
                        out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                        out.extend_from_slice(b);
                    }
                }
            }
        }
        fn old_tuple(out: &mut Vec<u8>, old: &OldTuple) {
            out.push(match old {
                OldTuple::Key(_) => b'K',
                OldTuple::Full(_) => b'O',
            });
            tuple(out, old.tuple());
        }
        let mut out = vec![m.kind().tag()];
        match m {
            Message::Begin {
                final_lsn,
                commit_time_micros,
                xid,
            } => {
                out.extend_from_slice(&final_lsn.0.to_be_bytes());
                out.extend_from_slice(&commit_time_micros.to_be_bytes());
                out.extend_from_slice(&xid.to_be_bytes());
            }
            Message::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time_micros,
            } => {
                out.push(*flags);
                out.extend_from_slice(&commit_lsn.0.to_be_bytes());
                out.extend_from_slice(&end_lsn.0.to_be_bytes());
                out.extend_from_slice(&commit_time_micros.to_be_bytes());
            }
            Message::Origin { commit_lsn, name } => {
                out.extend_from_slice(&commit_lsn.0.to_be_bytes());
                cstr(&mut out, name);
            }
            Message::Relation(r) => {
                out.extend_from_slice(&r.id.to_be_bytes());
                cstr(&mut out, &r.namespace);
                cstr(&mut out, &r.name);
                out.push(replica_identity_byte(r.replica_identity));
                out.extend_from_slice(&(r.columns.len() as u16).to_be_bytes());
                for c in &r.columns {
                    out.push(u8::from(c.is_key));
                    cstr(&mut out, &c.name);
                    out.extend_from_slice(&c.type_oid.to_be_bytes());
                    out.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            Message::Type {
                id,
                namespace,
                name,
            } => {
                out.extend_from_slice(&id.to_be_bytes());
                cstr(&mut out, namespace);
                cstr(&mut out, name);
            }
            Message::Insert { relation_id, new } => {
                out.extend_from_slice(&relation_id.to_be_bytes());
                out.push(b'N');
                tuple(&mut out, new);
            }
            Message::Update {
                relation_id,
                old,
                new,
            } => {
                out.extend_from_slice(&relation_id.to_be_bytes());
                if let Some(old) = old {
                    old_tuple(&mut out, old);
                }
                out.push(b'N');
                tuple(&mut out, new);
            }
            Message::Delete { relation_id, old } => {
                out.extend_from_slice(&relation_id.to_be_bytes());
                old_tuple(&mut out, old);
            }
            Message::Truncate {
                options,
                relation_ids,
            } => {
                out.extend_from_slice(&(relation_ids.len() as u32).to_be_bytes());
                out.push(*options);
                for id in relation_ids {
                    out.extend_from_slice(&id.to_be_bytes());
                }
            }
            Message::LogicalMessage {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                out.push(u8::from(*transactional));
                out.extend_from_slice(&lsn.0.to_be_bytes());
                cstr(&mut out, prefix);
                out.extend_from_slice(&(content.len() as i32).to_be_bytes());
                out.extend_from_slice(content);
            }
        }
        out
    }

    // ---- Captured messages, every field asserted ----

    #[test]
    fn begin() {
        assert_eq!(
            decode_hex(BEGIN),
            Message::Begin {
                final_lsn: Lsn(0x0154_D898),
                // 2026-11-27 05:16:10.139277 UTC (the capture machine's clock).
                commit_time_micros: 849_071_770_139_277,
                xid: 738,
            }
        );
    }

    #[test]
    fn commit() {
        assert_eq!(
            decode_hex(COMMIT),
            Message::Commit {
                flags: 0,
                commit_lsn: Lsn(0x0154_D898),
                end_lsn: Lsn(0x0154_D8C8),
                commit_time_micros: 849_071_770_139_277,
            }
        );
    }

    #[test]
    fn lsn_prints_like_postgres() {
        let Message::Commit { end_lsn, .. } = decode_hex(COMMIT) else {
            panic!("not a commit");
        };
        assert_eq!(end_lsn.to_string(), "0/154D8C8");
    }

    #[test]
    fn type_message_for_enum_column() {
        assert_eq!(
            decode_hex(TYPE_MOOD),
            Message::Type {
                id: MOOD,
                namespace: "public".into(),
                name: "mood".into(),
            }
        );
    }

    #[test]
    fn relation_with_primary_key_typmod_and_custom_type() {
        assert_eq!(
            decode_hex(RELATION_CUSTOMERS),
            Message::Relation(Relation {
                id: CUSTOMERS,
                namespace: "public".into(),
                name: "customers".into(),
                replica_identity: ReplicaIdentity::Default,
                columns: vec![
                    column(true, "id", INT4, -1),
                    column(false, "name", TEXT, -1),
                    column(false, "mood", MOOD, -1),
                    column(false, "score", NUMERIC, (10 << 16 | 2) + 4),
                ],
            })
        );
    }

    #[test]
    fn relation_replica_identity_full_marks_every_column_key() {
        assert_eq!(
            decode_hex(RELATION_AUDIT_FULL),
            Message::Relation(Relation {
                id: AUDIT_FULL,
                namespace: "public".into(),
                name: "audit_full".into(),
                replica_identity: ReplicaIdentity::Full,
                columns: vec![column(true, "id", INT4, -1), column(true, "note", TEXT, -1)],
            })
        );
    }

    #[test]
    fn relation_replica_identity_index() {
        assert_eq!(
            decode_hex(RELATION_BY_INDEX),
            Message::Relation(Relation {
                id: 16431,
                namespace: "public".into(),
                name: "by_index".into(),
                replica_identity: ReplicaIdentity::Index,
                columns: vec![column(true, "k", INT4, -1), column(false, "v", TEXT, -1)],
            })
        );
    }

    #[test]
    fn relation_replica_identity_nothing() {
        assert_eq!(
            decode_hex(RELATION_NO_IDENT),
            Message::Relation(Relation {
                id: 16437,
                namespace: "public".into(),
                name: "no_ident".into(),
                replica_identity: ReplicaIdentity::Nothing,
                columns: vec![column(false, "v", TEXT, -1)],
            })
        );
    }

    #[test]
    fn relation_for_toast_table() {
        assert_eq!(
            decode_hex(RELATION_DOCS),
            Message::Relation(Relation {
                id: 16424,
                namespace: "public".into(),
                name: "docs".into(),
                replica_identity: ReplicaIdentity::Default,
                columns: vec![
                    column(true, "id", INT4, -1),
                    column(false, "counter", INT4, -1),
                    column(false, "body", TEXT, -1),
                ],
            })
        );
    }

    #[test]
    fn insert() {
        assert_eq!(
            decode_hex(INSERT_ADA),
            Message::Insert {
                relation_id: CUSTOMERS,
                new: Tuple(vec![text("1"), text("Ada"), text("happy"), text("12.50")]),
            }
        );
    }

    #[test]
    fn insert_with_nulls() {
        assert_eq!(
            decode_hex(INSERT_WITH_NULLS),
            Message::Insert {
                relation_id: CUSTOMERS,
                new: Tuple(vec![text("2"), Value::Null, text("ok"), Value::Null]),
            }
        );
    }

    #[test]
    fn insert_binary_values() {
        assert_eq!(
            decode_hex(INSERT_GRACE_BINARY),
            Message::Insert {
                relation_id: CUSTOMERS,
                new: Tuple(vec![
                    Value::Binary(Bytes::from_static(&[0, 0, 0, 3])),
                    Value::Binary(Bytes::from_static(b"Grace")),
                    // Enums send their label.
                    Value::Binary(Bytes::from_static(b"sad")),
                    // numeric_send of 1.00: ndigits 1, weight 0, sign +, dscale 2, digit 1.
                    Value::Binary(Bytes::from_static(&[0, 1, 0, 0, 0, 0, 0, 2, 0, 1])),
                ]),
            }
        );
    }

    #[test]
    fn update_without_old_tuple() {
        assert_eq!(
            decode_hex(UPDATE_NO_OLD),
            Message::Update {
                relation_id: CUSTOMERS,
                old: None,
                new: Tuple(vec![
                    text("1"),
                    text("Ada Lovelace"),
                    text("happy"),
                    text("12.50"),
                ]),
            }
        );
    }

    #[test]
    fn update_with_changed_key() {
        assert_eq!(
            decode_hex(UPDATE_KEY),
            Message::Update {
                relation_id: CUSTOMERS,
                // Non-key columns of a key tuple are 'n' placeholders.
                old: Some(OldTuple::Key(Tuple(vec![
                    text("1"),
                    Value::Null,
                    Value::Null,
                    Value::Null,
                ]))),
                new: Tuple(vec![
                    text("10"),
                    text("Ada Lovelace"),
                    text("happy"),
                    text("12.50"),
                ]),
            }
        );
    }

    #[test]
    fn update_with_full_old_tuple() {
        assert_eq!(
            decode_hex(UPDATE_FULL),
            Message::Update {
                relation_id: AUDIT_FULL,
                old: Some(OldTuple::Full(Tuple(vec![text("7"), text("first")]))),
                new: Tuple(vec![text("7"), text("second")]),
            }
        );
    }

    #[test]
    fn update_with_unchanged_toast_column() {
        assert_eq!(
            decode_hex(UPDATE_UNCHANGED_TOAST),
            Message::Update {
                relation_id: 16424,
                old: None,
                new: Tuple(vec![text("1"), text("1"), Value::UnchangedToast]),
            }
        );
    }

    #[test]
    fn delete_with_key() {
        let message = decode_hex(DELETE_KEY);
        assert_eq!(
            message,
            Message::Delete {
                relation_id: CUSTOMERS,
                old: OldTuple::Key(Tuple(vec![
                    text("2"),
                    Value::Null,
                    Value::Null,
                    Value::Null
                ])),
            }
        );
        let Message::Delete { old, .. } = message else {
            panic!("not a delete");
        };
        assert_eq!(old.tuple().0.first(), Some(&text("2")));
    }

    #[test]
    fn delete_with_full_old_tuple() {
        assert_eq!(
            decode_hex(DELETE_FULL),
            Message::Delete {
                relation_id: AUDIT_FULL,
                old: OldTuple::Full(Tuple(vec![text("7"), text("second")])),
            }
        );
    }

    #[test]
    fn truncate_two_tables_with_options() {
        assert_eq!(
            decode_hex(TRUNCATE_TWO),
            Message::Truncate {
                options: TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY,
                relation_ids: vec![16406, 16413],
            }
        );
    }

    #[test]
    fn truncate_without_options() {
        assert_eq!(
            decode_hex(TRUNCATE_ONE),
            Message::Truncate {
                options: 0,
                relation_ids: vec![16413],
            }
        );
    }

    #[test]
    fn transactional_logical_message() {
        assert_eq!(
            decode_hex(MESSAGE_TRANSACTIONAL),
            Message::LogicalMessage {
                transactional: true,
                lsn: Lsn(0x0154_FA60),
                prefix: "walhook".into(),
                content: Bytes::from_static(b"hello txn"),
            }
        );
    }

    #[test]
    fn non_transactional_logical_message_with_binary_content() {
        assert_eq!(
            decode_hex(MESSAGE_NON_TRANSACTIONAL),
            Message::LogicalMessage {
                transactional: false,
                lsn: Lsn(0x0154_FAD8),
                prefix: "walhook.bin".into(),
                content: Bytes::from_static(&[0x00, 0xff, 0x10]),
            }
        );
    }

    #[test]
    fn transaction_from_replication_origin() {
        // pg_replication_origin_xact_setup's timestamp becomes the commit timestamp.
        const JAN_2_2024_030405: i64 = 757_479_845_000_000;
        assert_eq!(
            decode_hex(BEGIN_ORIGIN),
            Message::Begin {
                final_lsn: Lsn(0x0155_2CE8),
                commit_time_micros: JAN_2_2024_030405,
                xid: 755,
            }
        );
        assert_eq!(
            decode_hex(ORIGIN),
            Message::Origin {
                commit_lsn: Lsn(0x0ABC_DEF0),
                name: "upstream_eu".into(),
            }
        );
        assert_eq!(
            decode_hex(INSERT_GRACE),
            Message::Insert {
                relation_id: CUSTOMERS,
                new: Tuple(vec![text("3"), text("Grace"), text("sad"), text("1.00")]),
            }
        );
        assert_eq!(
            decode_hex(COMMIT_ORIGIN),
            Message::Commit {
                flags: 0,
                commit_lsn: Lsn(0x0155_2CE8),
                end_lsn: Lsn(0x0155_2D30),
                commit_time_micros: JAN_2_2024_030405,
            }
        );
    }

    #[test]
    fn message_kind_matches_tag() {
        for captured in CAPTURED {
            let data = hex(captured);
            let message = decode_hex(captured);
            assert_eq!(data.first(), Some(&message.kind().tag()), "{captured}");
        }
    }

    #[test]
    fn captured_messages_reencode_to_the_same_bytes() {
        // Proves the decoder dropped nothing: the independent encoder rebuilds the server's
        // exact bytes from the decoded value.
        for captured in CAPTURED {
            let data = hex(captured);
            assert_eq!(encode(&decode_hex(captured)), data.to_vec(), "{captured}");
        }
    }

    #[test]
    fn values_are_slices_of_the_input() {
        let data = hex(UPDATE_FULL);
        let input = data.as_ptr_range();
        let Ok(Message::Update {
            old: Some(old),
            new,
            ..
        }) = decode(&data)
        else {
            panic!("not an update with an old tuple");
        };
        for value in old.tuple().0.iter().chain(&new.0) {
            let Value::Text(bytes) = value else {
                panic!("expected text, got {value:?}");
            };
            let slice = bytes.as_ptr_range();
            assert!(input.start <= slice.start && slice.end <= input.end);
        }
    }

    // ---- Hand-built messages ----

    #[test]
    fn null_unchanged_toast_and_text_round_trip() {
        let mut raw = vec![b'I'];
        raw.extend_from_slice(&42u32.to_be_bytes());
        raw.push(b'N');
        raw.extend_from_slice(&3u16.to_be_bytes());
        raw.push(b'n');
        raw.push(b'u');
        raw.push(b't');
        raw.extend_from_slice(&5i32.to_be_bytes());
        raw.extend_from_slice(b"hello");
        let expected = Message::Insert {
            relation_id: 42,
            new: Tuple(vec![Value::Null, Value::UnchangedToast, text("hello")]),
        };
        assert_eq!(decode(&Bytes::from(raw.clone())), Ok(expected.clone()));
        assert_eq!(encode(&expected), raw);
    }

    #[test]
    fn empty_tuple_and_empty_text_value() {
        let insert = |columns: &[u8]| {
            let mut raw = vec![b'I', 0, 0, 0, 1, b'N'];
            raw.extend_from_slice(columns);
            decode(&Bytes::from(raw))
        };
        assert_eq!(
            insert(&[0, 0]),
            Ok(Message::Insert {
                relation_id: 1,
                new: Tuple::default(),
            })
        );
        assert_eq!(
            insert(&[0, 1, b't', 0, 0, 0, 0]),
            Ok(Message::Insert {
                relation_id: 1,
                new: Tuple(vec![text("")]),
            })
        );
    }

    #[test]
    fn origin_and_type_with_empty_names() {
        // pg_catalog types are sent with an empty namespace.
        let mut raw = vec![b'Y', 0, 0, 0, 25, 0];
        raw.extend_from_slice(b"text\0");
        assert_eq!(
            decode(&Bytes::from(raw)),
            Ok(Message::Type {
                id: 25,
                namespace: String::new(),
                name: "text".into(),
            })
        );
        let raw = Bytes::from_static(&[b'O', 0, 0, 0, 0, 0, 0, 0, 9, 0]);
        assert_eq!(
            decode(&raw),
            Ok(Message::Origin {
                commit_lsn: Lsn(9),
                name: String::new(),
            })
        );
    }

    #[test]
    fn names_are_decoded_lossily() {
        let raw = Bytes::from_static(&[b'Y', 0, 0, 0, 1, b'a', 0xff, 0, 0xc3, 0x28, 0]);
        assert_eq!(
            decode(&raw),
            Ok(Message::Type {
                id: 1,
                namespace: "a\u{fffd}".into(),
                name: "\u{fffd}(".into(),
            })
        );
    }

    #[test]
    fn unknown_replica_identity_is_kept() {
        let mut raw = hex(RELATION_NO_IDENT).to_vec();
        let at = 1 + 4 + "public\0no_ident\0".len();
        assert_eq!(raw.get(at), Some(&b'n'));
        raw[at] = b'x';
        let Ok(Message::Relation(relation)) = decode(&Bytes::from(raw)) else {
            panic!("not a relation");
        };
        assert_eq!(relation.replica_identity, ReplicaIdentity::Unknown(b'x'));
    }

    #[test]
    fn logical_message_flag_bits_beyond_transactional_are_ignored() {
        let mut raw = hex(MESSAGE_TRANSACTIONAL).to_vec();
        raw[1] = 0x03;
        let Ok(Message::LogicalMessage { transactional, .. }) = decode(&Bytes::from(raw)) else {
            panic!("not a logical message");
        };
        assert!(transactional);
    }

    // ---- Errors ----

    #[test]
    fn truncated_tuple_names_the_column_and_offset() {
        // Four columns declared, three present: '1', NULL, NULL.
        let raw = Bytes::from_static(&[
            b'I', 0, 0, 0x40, 0x07, b'N', 0, 4, b't', 0, 0, 0, 1, b'1', b'n', b'n',
        ]);
        let err = decode(&raw).expect_err("truncated");
        assert_eq!(
            err,
            DecodeError::Truncated {
                message: MessageKind::Insert,
                field: Field::TupleColumn(TuplePart::New, 3),
                offset: 16,
                needed: 1,
                remaining: 0,
            }
        );
        assert_eq!(
            err.to_string(),
            "pgoutput Insert: truncated new tuple column 3 at byte 16 (needs 1 bytes, has 0)"
        );
        assert_eq!(err.offset(), 16);
    }

    #[test]
    fn truncated_value_in_old_tuple() {
        let data = hex(UPDATE_FULL);
        // Cut inside "first", the old tuple's column 1 (value starts at byte 19).
        let err = decode(&data.slice(..21)).expect_err("truncated");
        assert_eq!(
            err.to_string(),
            "pgoutput Update: truncated value of old tuple column 1 at byte 19 \
             (needs 5 bytes, has 2)"
        );
    }

    #[test]
    fn huge_column_count_is_rejected_before_allocating() {
        let raw = Bytes::from_static(&[b'I', 0, 0, 0, 1, b'N', 0xff, 0xff, b'n', b'n', b'n']);
        let err = decode(&raw).expect_err("too many columns");
        assert_eq!(
            err,
            DecodeError::CountTooLarge {
                message: MessageKind::Insert,
                field: Field::TupleColumnCount(TuplePart::New),
                offset: 6,
                count: 65535,
                remaining: 3,
            }
        );
        assert_eq!(
            err.to_string(),
            "pgoutput Insert: new tuple column count 65535 at byte 6 cannot fit in the 3 bytes \
             that follow"
        );
    }

    #[test]
    fn huge_relation_column_count_is_rejected() {
        let mut raw = vec![b'R', 0, 0, 0, 1, b'p', 0, b't', 0, b'd', 0x00, 0x02];
        // One complete 10-byte column where two are declared.
        raw.extend_from_slice(&[1, 0, 0, 0, 0, 23, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            decode(&Bytes::from(raw)),
            Err(DecodeError::CountTooLarge {
                message: MessageKind::Relation,
                field: Field::ColumnCount,
                offset: 10,
                count: 2,
                remaining: 10,
            })
        ));
    }

    #[test]
    fn huge_truncate_count_is_rejected() {
        let raw = Bytes::from_static(&[b'T', 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 1]);
        assert_eq!(
            decode(&raw),
            Err(DecodeError::CountTooLarge {
                message: MessageKind::Truncate,
                field: Field::RelationCount,
                offset: 1,
                count: u32::MAX,
                remaining: 4,
            })
        );
    }

    #[test]
    fn negative_and_oversized_value_lengths() {
        let raw = Bytes::from_static(&[b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0xff, 0xff, 0xff, 0xfe]);
        let err = decode(&raw).expect_err("negative length");
        assert_eq!(
            err.to_string(),
            "pgoutput Insert: length of new tuple column 0 is negative (-2) at byte 9"
        );
        let raw = Bytes::from_static(&[b'I', 0, 0, 0, 1, b'N', 0, 1, b'b', 0x7f, 0xff, 0xff, 0xff]);
        assert_eq!(
            decode(&raw),
            Err(DecodeError::Truncated {
                message: MessageKind::Insert,
                field: Field::TupleValue(TuplePart::New, 0),
                offset: 13,
                needed: i32::MAX as usize,
                remaining: 0,
            })
        );
        let mut raw = hex(MESSAGE_TRANSACTIONAL).to_vec();
        let len_at = 1 + 1 + 8 + "walhook\0".len();
        raw[len_at] = 0x80;
        assert!(matches!(
            decode(&Bytes::from(raw)),
            Err(DecodeError::NegativeLength {
                message: MessageKind::LogicalMessage,
                field: Field::ContentLength,
                offset,
                ..
            }) if offset == len_at
        ));
    }

    #[test]
    fn bad_tuple_markers() {
        // Insert needs 'N'.
        let raw = Bytes::from_static(&[b'I', 0, 0, 0, 1, b'K', 0, 0]);
        assert_eq!(
            decode(&raw).expect_err("bad marker").to_string(),
            "pgoutput Insert: unexpected tuple marker 'K' (0x4b) at byte 5 (expected 'N')"
        );
        // Delete needs 'K' or 'O'.
        let raw = Bytes::from_static(&[b'D', 0, 0, 0, 1, b'N', 0, 0]);
        assert_eq!(
            decode(&raw).expect_err("bad marker").to_string(),
            "pgoutput Delete: unexpected tuple marker 'N' (0x4e) at byte 5 (expected 'K' or 'O')"
        );
        // Update: an old tuple must be followed by 'N', not a second old tuple.
        let raw = Bytes::from_static(&[b'U', 0, 0, 0, 1, b'K', 0, 0, b'O', 0, 0]);
        assert_eq!(
            decode(&raw),
            Err(DecodeError::UnexpectedByte {
                message: MessageKind::Update,
                field: Field::TupleMarker,
                offset: 8,
                found: b'O',
                expected: "'N'",
            })
        );
        let raw = Bytes::from_static(&[b'U', 0, 0, 0, 1, 0x00, 0, 0]);
        assert_eq!(
            decode(&raw).expect_err("bad marker").to_string(),
            "pgoutput Update: unexpected tuple marker 0x00 at byte 5 (expected 'K', 'O' or 'N')"
        );
    }

    #[test]
    fn bad_column_kind() {
        let raw = Bytes::from_static(&[b'I', 0, 0, 0, 1, b'N', 0, 2, b'n', b'x']);
        assert_eq!(
            decode(&raw).expect_err("bad kind").to_string(),
            "pgoutput Insert: unexpected new tuple column 1 'x' (0x78) at byte 9 \
             (expected 'n', 'u', 't' or 'b')"
        );
    }

    #[test]
    fn unterminated_string() {
        let raw = Bytes::from_static(&[b'R', 0, 0, 0, 1, b'p', b'u', b'b']);
        assert_eq!(
            decode(&raw),
            Err(DecodeError::UnterminatedString {
                message: MessageKind::Relation,
                field: Field::Namespace,
                offset: 5,
            })
        );
    }

    #[test]
    fn empty_unknown_and_later_version_tags() {
        assert_eq!(decode(&Bytes::new()), Err(DecodeError::Empty));
        let err = decode(&Bytes::from_static(b"X123")).expect_err("unknown");
        assert_eq!(err, DecodeError::UnknownTag { tag: b'X' });
        assert_eq!(
            err.to_string(),
            "pgoutput: unknown message tag 'X' (0x58) at byte 0"
        );
        assert_eq!(
            decode(&Bytes::from_static(&[0x00])),
            Err(DecodeError::UnknownTag { tag: 0 })
        );
        let err = decode(&Bytes::from_static(b"S\0\0\0\x01\x01")).expect_err("v2");
        assert_eq!(
            err,
            DecodeError::LaterProtocolVersion {
                tag: b'S',
                name: "Stream Start"
            }
        );
        assert!(err.to_string().contains("proto_version '1'"), "{err}");
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for captured in CAPTURED {
            let data = hex(captured);
            let mut longer = data.to_vec();
            longer.push(0);
            assert_eq!(
                decode(&Bytes::from(longer)),
                Err(DecodeError::TrailingBytes {
                    message: decode_hex(captured).kind(),
                    offset: data.len(),
                    count: 1,
                }),
                "{captured}"
            );
        }
    }

    #[test]
    fn every_strict_prefix_of_a_captured_message_is_an_error() {
        for captured in CAPTURED {
            let data = hex(captured);
            for len in 0..data.len() {
                let err = decode(&data.slice(..len)).expect_err(captured);
                assert!(err.offset() <= len, "{err} for {len} bytes of {captured}");
            }
        }
    }

    // ---- Properties ----

    fn name() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            any::<char>().prop_filter("NUL ends a name", |c| *c != '\0'),
            0..8,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    fn payload() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..12).prop_map(Bytes::from)
    }

    fn tuple() -> impl Strategy<Value = Tuple> {
        let value = prop_oneof![
            Just(Value::Null),
            Just(Value::UnchangedToast),
            payload().prop_map(Value::Text),
            payload().prop_map(Value::Binary),
        ];
        proptest::collection::vec(value, 0..6).prop_map(Tuple)
    }

    fn old_tuple() -> impl Strategy<Value = OldTuple> {
        prop_oneof![
            tuple().prop_map(OldTuple::Key),
            tuple().prop_map(OldTuple::Full)
        ]
    }

    fn lsn() -> impl Strategy<Value = Lsn> {
        any::<u64>().prop_map(Lsn)
    }

    fn relation() -> impl Strategy<Value = Relation> {
        let replica_identity = prop_oneof![
            Just(ReplicaIdentity::Default),
            Just(ReplicaIdentity::Nothing),
            Just(ReplicaIdentity::Full),
            Just(ReplicaIdentity::Index),
            any::<u8>()
                .prop_filter("known identities decode as themselves", |b| {
                    !b"dnfi".contains(b)
                })
                .prop_map(ReplicaIdentity::Unknown),
        ];
        let column = (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(
            |(is_key, name, type_oid, type_modifier)| RelationColumn {
                is_key,
                name,
                type_oid,
                type_modifier,
            },
        );
        (
            any::<u32>(),
            name(),
            name(),
            replica_identity,
            proptest::collection::vec(column, 0..5),
        )
            .prop_map(
                |(id, namespace, name, replica_identity, columns)| Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                },
            )
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time_micros, xid)| {
                Message::Begin {
                    final_lsn,
                    commit_time_micros,
                    xid,
                }
            }),
            (any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_time_micros)| Message::Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time_micros,
                }
            ),
            (lsn(), name()).prop_map(|(commit_lsn, name)| Message::Origin { commit_lsn, name }),
            relation().prop_map(Message::Relation),
            (any::<u32>(), name(), name()).prop_map(|(id, namespace, name)| Message::Type {
                id,
                namespace,
                name,
            }),
            (any::<u32>(), tuple())
                .prop_map(|(relation_id, new)| Message::Insert { relation_id, new }),
            (any::<u32>(), proptest::option::of(old_tuple()), tuple()).prop_map(
                |(relation_id, old, new)| Message::Update {
                    relation_id,
                    old,
                    new,
                }
            ),
            (any::<u32>(), old_tuple())
                .prop_map(|(relation_id, old)| Message::Delete { relation_id, old }),
            (any::<u8>(), proptest::collection::vec(any::<u32>(), 0..5)).prop_map(
                |(options, relation_ids)| Message::Truncate {
                    options,
                    relation_ids,
                }
            ),
            (any::<bool>(), lsn(), name(), payload()).prop_map(
                |(transactional, lsn, prefix, content)| Message::LogicalMessage {
                    transactional,
                    lsn,
                    prefix,
                    content,
                }
            ),
        ]
    }

    /// Decodes without panicking and checks the error's own claims, formatting it so the
    /// `Display` code runs on every error too.
    fn decode_checked(data: &[u8]) {
        if let Err(err) = decode(&Bytes::copy_from_slice(data)) {
            assert!(err.offset() <= data.len(), "{err} for {} bytes", data.len());
            assert!(err.to_string().starts_with("pgoutput"));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn encoded_messages_round_trip(message in message()) {
            let encoded = encode(&message);
            prop_assert_eq!(decode(&Bytes::from(encoded.clone())), Ok(message));
            // And their strict prefixes are errors.
            for len in 0..encoded.len() {
                prop_assert!(decode(&Bytes::copy_from_slice(&encoded[..len])).is_err());
            }
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(
            data in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            decode_checked(&data);
        }

        #[test]
        fn never_panics_on_arbitrary_bytes_after_a_valid_tag(
            tag in proptest::sample::select(b"BCORYIUDTM".to_vec()),
            rest in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut data = vec![tag];
            data.extend(rest);
            decode_checked(&data);
        }

    }

    proptest! {
        // Cheap cases that reach the deepest paths, so many of them.
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn never_panics_on_mutated_captured_messages(
            captured in proptest::sample::select(CAPTURED),
            edits in proptest::collection::vec((0u8..4, any::<usize>(), any::<u8>()), 1..5),
        ) {
            let mut data = hex(captured).to_vec();
            for (op, at, byte) in edits {
                let at = at % (data.len() + 1);
                match op {
                    0 if at < data.len() => data[at] = byte,
                    1 => data.insert(at, byte),
                    2 if at < data.len() => { data.remove(at); }
                    3 => data.truncate(at),
                    // XOR a single bit: the mutation most likely to keep the message parseable
                    // deep into its tuples.
                    _ if at < data.len() => data[at] ^= 1 << (byte % 8),
                    _ => {}
                }
            }
            decode_checked(&data);
        }
    }
}
