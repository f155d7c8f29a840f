//! Transaction assembly: Begin → row changes → Commit, with the relation cache.
//!
//! ```text
//! Begin(final_lsn) ─► Relation / Insert / Update / Delete / Truncate ... ─► Commit(lsn == final_lsn)
//!        │                         │ rows of subscribed tables                 │
//!        ▼                         ▼                                           ▼
//!   TxnContext              derive::mutation::Grouper ── full chunks ──►  remaining chunks
//!                                                        (written early)   + Position
//! ```
//!
//! The relation cache maps a relation OID to the table and the positions of its primary key
//! columns. pgoutput sends a Relation message before the first change of a relation in each
//! session and again after any schema change (even mid-transaction), so every Relation
//! message replaces the cached entry: columns added or dropped mid-stream are picked up.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use pgwire_replication::Lsn;
use serde_json::Value;

use crate::config::{Config, Op, TableName};
use crate::derive::classification::{Cell, ClassifiedTable, TxnChanges};
use crate::derive::mutation::{Grouper, Subscription, TxnContext};
use crate::log::{NewNotification, Position};
use crate::pgoutput::{self, Message, Relation, Tuple};
use crate::schema::{KeyColumn, TableInfo};

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Why the stream could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// The stream is not what pgoutput sends: reconnecting re-reads it from the slot.
    #[error("replication stream: {0}")]
    Protocol(String),
    /// The data cannot be turned into notifications; retrying cannot help.
    #[error("{0}")]
    Definite(String),
}

impl From<pgoutput::DecodeError> for TxnError {
    fn from(e: pgoutput::DecodeError) -> Self {
        TxnError::Protocol(e.to_string())
    }
}

/// What a configured table needs for derivation.
struct TableRoute {
    key: Vec<KeyColumn>,
    subscriptions: Vec<Subscription>,
    /// For a classified table: the columns of its row images, by name.
    image: Option<Vec<String>>,
}

/// A classified table's image columns' types as the stream describes them: type OID and
/// modifier, `None` where the relation lacks the column.
pub type ColumnTypes = Vec<Option<(u32, i32)>>;

/// A cached Relation message, resolved against the configured tables.
struct RelationRoute {
    table: TableName,
    /// Positions of the primary key columns in the relation's tuples; `None` for tables no
    /// event subscribes to.
    key: Option<Vec<(usize, KeyColumn)>>,
    /// For a classified table: the position of each image column in the tuples (`None`:
    /// the relation lacks it, e.g. dropped).
    image: Option<Vec<Option<usize>>>,
}

struct OpenTxn {
    ctx: TxnContext,
    grouper: Grouper,
    /// Row images of classified tables.
    changes: TxnChanges,
    /// Already in the log (a replay after a crash before the slot was acknowledged).
    skip: bool,
    /// Some notifications were written before the commit.
    spilled: bool,
}

/// A committed transaction's output.
#[derive(Debug)]
pub struct Committed {
    pub notifications: Vec<NewNotification>,
    pub position: Position,
    /// Whether notifications of this transaction were written before its commit; then the
    /// log must drop ordinals beyond `ordinals` left by an earlier interrupted pass.
    pub spilled: bool,
    pub ordinals: BTreeMap<String, u32>,
    pub ctx: TxnContext,
    /// The classified tables' touched rows, for classification events.
    pub changes: TxnChanges,
}

/// Turns the replication stream into committed transactions' notifications.
pub struct Assembler {
    tables: HashMap<TableName, TableRoute>,
    relations: HashMap<u32, RelationRoute>,
    txn: Option<OpenTxn>,
    /// Transactions whose commit LSN is at or below this are already in the log.
    logged_through: u64,
    /// Each classified table's image column types as the stream last described them.
    image_types: HashMap<TableName, ColumnTypes>,
    /// Classified tables whose image column types the stream described anew, not yet taken.
    retyped: Vec<(TableName, ColumnTypes)>,
}

impl Assembler {
    pub fn new(
        config: &Config,
        tables: &BTreeMap<TableName, TableInfo>,
        classified: &[ClassifiedTable],
        logged_through: u64,
    ) -> Assembler {
        let mut routes: HashMap<TableName, TableRoute> = HashMap::new();
        for (index, webhook) in config.webhooks.iter().enumerate() {
            for event in config.events.iter().filter(|e| e.name == webhook.event) {
                let Some(info) = tables.get(&event.table) else {
                    continue;
                };
                routes
                    .entry(event.table.clone())
                    .or_insert_with(|| TableRoute {
                        key: info.key.clone(),
                        subscriptions: Vec::new(),
                        image: None,
                    })
                    .subscriptions
                    .push(Subscription {
                        webhook: index,
                        hook_id: webhook.id.clone(),
                        event: event.name.clone(),
                        // With `columns`, updates are judged against the row state store
                        // when the transaction is written (derive::classification).
                        ops: event
                            .ops
                            .iter()
                            .copied()
                            .filter(|op| event.columns.is_empty() || *op != Op::Update)
                            .collect(),
                        max_rows: webhook.max_rows,
                    });
            }
        }
        for c in classified {
            let Some(info) = tables.get(&c.table) else {
                continue;
            };
            routes
                .entry(c.table.clone())
                .or_insert_with(|| TableRoute {
                    key: info.key.clone(),
                    subscriptions: Vec::new(),
                    image: None,
                })
                .image = Some(c.columns.iter().map(|(name, _)| name.clone()).collect());
        }
        Assembler {
            tables: routes,
            relations: HashMap::new(),
            txn: None,
            logged_through,
            image_types: HashMap::new(),
            retyped: Vec::new(),
        }
    }

    /// The classified tables whose column types the stream described for the first time, or
    /// differently from before (a column's type changed: its values now come in the new
    /// type), with the image columns' types.
    pub fn take_retyped(&mut self) -> Vec<(TableName, ColumnTypes)> {
        std::mem::take(&mut self.retyped)
    }

    /// Forgets the session's state before a reconnect: the server resends Relation messages
    /// and the interrupted transaction from the slot's confirmed position. Transactions after
    /// `logged_through` (the log's position) are taken again: ones committed but not
    /// written when the session failed must not be skipped.
    pub fn reset(&mut self, logged_through: u64) {
        self.relations.clear();
        // The session may have ended before the classifier took in a type change: the next
        // session's Relation messages report every table's types afresh.
        self.image_types.clear();
        self.retyped.clear();
        self.txn = None;
        self.logged_through = logged_through;
    }

    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// How many touched rows of classified tables the open transaction holds in memory.
    pub fn classified_rows(&self) -> usize {
        self.txn.as_ref().map_or(0, |t| t.changes.rows())
    }

    /// Whether the open transaction truncated a classified (or watched) table: its rows
    /// are then derived a page at a time, as a spilled transaction's.
    pub fn truncated_classified(&self) -> bool {
        self.txn
            .as_ref()
            .is_some_and(|t| t.changes.tables.values().any(|c| c.truncated))
    }

    /// Takes the open transaction's touched rows out of memory (to be spilled), with its
    /// commit LSN.
    pub fn drain_changes(&mut self) -> Option<(u64, TxnChanges)> {
        self.txn.as_mut().map(|t| (t.ctx.lsn, t.changes.drain()))
    }

    pub fn begin(&mut self, final_lsn: Lsn, commit_time_micros: i64, xid: u32) {
        let unix_micros = commit_time_micros.saturating_add(PG_EPOCH_OFFSET_MICROS);
        let committed_at = UNIX_EPOCH + Duration::from_micros(unix_micros.max(0) as u64);
        self.txn = Some(OpenTxn {
            ctx: TxnContext {
                xid,
                lsn: final_lsn.0,
                lsn_text: final_lsn.to_string(),
                committed_at: humantime::format_rfc3339_micros(committed_at).to_string(),
            },
            grouper: Grouper::default(),
            changes: TxnChanges::default(),
            skip: final_lsn.0 <= self.logged_through,
            spilled: false,
        });
    }

    /// Handles one pgoutput message between Begin and Commit. Returns notifications that are
    /// complete already (full chunks of a large transaction), to be written now.
    pub fn change(&mut self, data: &Bytes) -> Result<Vec<NewNotification>, TxnError> {
        let message = pgoutput::decode(data)?;
        match message {
            Message::Relation(relation) => {
                self.cache_relation(relation)?;
                Ok(Vec::new())
            }
            Message::Insert { relation_id, new } => self.row(relation_id, Op::Insert, &new, None),
            Message::Update {
                relation_id,
                old,
                new,
            } => self.row(
                relation_id,
                Op::Update,
                &new,
                old.as_ref().map(|o| o.tuple()),
            ),
            Message::Delete { relation_id, old } => {
                self.row(relation_id, Op::Delete, old.tuple(), None)
            }
            Message::Truncate { relation_ids, .. } => {
                let Some(txn) = self.txn.as_mut() else {
                    return Err(TxnError::Protocol("Truncate outside a transaction".into()));
                };
                if !txn.skip {
                    for id in relation_ids {
                        let Some(route) = self.relations.get(&id) else {
                            return Err(unknown_relation(id));
                        };
                        let Some(table) = self.tables.get(&route.table) else {
                            continue;
                        };
                        if table.image.is_some() {
                            txn.changes
                                .tables
                                .entry(route.table.clone())
                                .or_default()
                                .truncate();
                        }
                        for sub in table.subscriptions.iter().filter(|s| s.wants(Op::Truncate)) {
                            txn.grouper.add_truncate(&route.table, sub);
                        }
                    }
                }
                Ok(Vec::new())
            }
            // Types are described for the binary format; walhook reads text values. Origins
            // and logical messages do not change rows.
            Message::Type { .. } | Message::Origin { .. } | Message::LogicalMessage { .. } => {
                Ok(Vec::new())
            }
            Message::Begin { .. } | Message::Commit { .. } => Err(TxnError::Protocol(
                "Begin or Commit arrived as a row change".into(),
            )),
        }
    }

    /// Closes the transaction. `None` when it was already in the log.
    pub fn commit(&mut self, commit_lsn: Lsn, end_lsn: Lsn) -> Result<Option<Committed>, TxnError> {
        let Some(txn) = self.txn.take() else {
            return Err(TxnError::Protocol(format!(
                "Commit {commit_lsn} without a Begin"
            )));
        };
        if commit_lsn.0 != txn.ctx.lsn {
            return Err(TxnError::Protocol(format!(
                "Commit LSN {commit_lsn} differs from Begin's final LSN {}",
                txn.ctx.lsn_text
            )));
        }
        if txn.skip {
            return Ok(None);
        }
        let (notifications, mut ordinals) = txn.grouper.finish(&txn.ctx);
        if txn.spilled {
            // Every webhook's count, zero included: an earlier, interrupted pass under another
            // config may have spilled chunks for a webhook that gets none now.
            for sub in self.tables.values().flat_map(|t| &t.subscriptions) {
                ordinals.entry(sub.hook_id.clone()).or_insert(0);
            }
        }
        self.logged_through = commit_lsn.0;
        Ok(Some(Committed {
            notifications,
            position: Position {
                commit_lsn: commit_lsn.0,
                end_lsn: end_lsn.0,
            },
            spilled: txn.spilled,
            ordinals,
            ctx: txn.ctx,
            changes: txn.changes,
        }))
    }

    fn cache_relation(&mut self, relation: Relation) -> Result<(), TxnError> {
        let table = TableName {
            schema: relation.namespace.clone(),
            name: relation.name.clone(),
        };
        let (key, image): (_, Option<Vec<Option<usize>>>) = match self.tables.get(&table) {
            None => (None, None),
            Some(route) => (
                Some(key_positions(&table, &route.key, &relation)?),
                route.image.as_ref().map(|names| {
                    names
                        .iter()
                        .map(|name| relation.columns.iter().position(|c| &c.name == name))
                        .collect()
                }),
            ),
        };
        if let Some(positions) = &image {
            let types: ColumnTypes = positions
                .iter()
                .map(|at| at.map(|at| &relation.columns[at]))
                .map(|c| c.map(|c| (c.type_oid, c.type_modifier)))
                .collect();
            if self.image_types.get(&table) != Some(&types) {
                self.image_types.insert(table.clone(), types.clone());
                self.retyped.push((table.clone(), types));
            }
        }
        self.relations
            .insert(relation.id, RelationRoute { table, key, image });
        Ok(())
    }

    fn row(
        &mut self,
        relation_id: u32,
        op: Op,
        tuple: &Tuple,
        old: Option<&Tuple>,
    ) -> Result<Vec<NewNotification>, TxnError> {
        let Some(txn) = self.txn.as_mut() else {
            return Err(TxnError::Protocol(format!(
                "{} outside a transaction",
                op.as_str()
            )));
        };
        let Some(route) = self.relations.get(&relation_id) else {
            return Err(unknown_relation(relation_id));
        };
        if txn.skip {
            return Ok(Vec::new());
        }
        let (Some(key), Some(table)) = (&route.key, self.tables.get(&route.table)) else {
            return Ok(Vec::new());
        };
        let mut interested = table
            .subscriptions
            .iter()
            .filter(|s| s.wants(op))
            .peekable();
        if interested.peek().is_none() && route.image.is_none() {
            return Ok(Vec::new());
        }
        let row = row_key(&route.table, key, tuple, old)?;
        // A key change moves the row: the old key's row is gone.
        let moved = match op {
            Op::Update => old
                .and_then(|old| row_key(&route.table, key, old, None).ok())
                .filter(|old_row| *old_row != row),
            _ => None,
        };
        if let Some(positions) = &route.image {
            let changes = txn.changes.tables.entry(route.table.clone()).or_default();
            match op {
                Op::Delete => changes.touch(row.clone(), None, false),
                _ => {
                    let after = image(positions, tuple, old);
                    match &moved {
                        Some(old_row) => changes.moved(old_row.clone(), row.clone(), after),
                        None if op == Op::Insert => changes.insert(row.clone(), after),
                        None => changes.touch(row.clone(), Some(after), op == Op::Update),
                    }
                }
            }
        }
        for sub in interested {
            // An update that changed the key lists the old key too, first: a receiver that
            // reads the rows back finds it gone, as it would a deleted row.
            if let Some(old_row) = &moved {
                txn.grouper
                    .add_row(&txn.ctx, &route.table, sub, op, old_row.clone());
            }
            txn.grouper
                .add_row(&txn.ctx, &route.table, sub, op, row.clone());
        }
        let ready = txn.grouper.take_ready();
        if !ready.is_empty() {
            txn.spilled = true;
        }
        Ok(ready)
    }
}

/// Where the primary key columns sit in the relation's tuples. The key is known by name from
/// the catalog at start; a stream that is behind may still describe the table as it was
/// before a column was renamed, so then the relation's own key flags (the replica identity,
/// which is the primary key unless the table says otherwise) name the columns.
fn key_positions(
    table: &TableName,
    key: &[KeyColumn],
    relation: &Relation,
) -> Result<Vec<(usize, KeyColumn)>, TxnError> {
    let by_name: Option<Vec<(usize, KeyColumn)>> = key
        .iter()
        .map(|column| {
            relation
                .columns
                .iter()
                .position(|c| c.name == column.name)
                .map(|at| (at, column.clone()))
        })
        .collect();
    if let Some(positions) = by_name {
        return Ok(positions);
    }
    let flagged: Vec<(usize, KeyColumn)> = relation
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is_key)
        .map(|(at, c)| {
            (
                at,
                KeyColumn {
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                },
            )
        })
        .collect();
    let usable = matches!(
        relation.replica_identity,
        pgoutput::ReplicaIdentity::Default | pgoutput::ReplicaIdentity::Index
    ) && flagged.len() == key.len();
    if usable {
        return Ok(flagged);
    }
    Err(TxnError::Definite(format!(
        "table {table}: the replication stream describes the table without its primary key columns ({}); if the key was changed, the rows of the old key cannot be named: point walhook at a new --slot",
        key.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(", ")
    )))
}

/// The image columns of a row: from the new tuple, or for an unchanged TOAST value from the
/// old tuple when it is a full one (REPLICA IDENTITY FULL); otherwise left for the state
/// store to fill.
fn image(positions: &[Option<usize>], tuple: &Tuple, old: Option<&Tuple>) -> Vec<Cell> {
    let text = |v: &pgoutput::Value| match v {
        pgoutput::Value::Null => Some(Cell::Null),
        pgoutput::Value::Text(b) | pgoutput::Value::Binary(b) => {
            Some(Cell::Text(String::from_utf8_lossy(b).into_owned()))
        }
        pgoutput::Value::UnchangedToast => None,
    };
    positions
        .iter()
        .map(|at| {
            let Some(at) = *at else {
                return Cell::Null;
            };
            tuple
                .0
                .get(at)
                .and_then(text)
                .or_else(|| {
                    old.and_then(|o| o.0.get(at))
                        .filter(|v| !matches!(v, pgoutput::Value::Null))
                        .and_then(text)
                })
                .unwrap_or(Cell::Unchanged)
        })
        .collect()
}

fn unknown_relation(id: u32) -> TxnError {
    TxnError::Protocol(format!(
        "a change names relation {id} before its Relation message"
    ))
}

/// The row's primary key as JSON: a scalar for a one-column key, an object for a composite.
fn row_key(
    table: &TableName,
    key: &[(usize, KeyColumn)],
    tuple: &Tuple,
    old: Option<&Tuple>,
) -> Result<Value, TxnError> {
    let value_at = |at: usize, column: &KeyColumn| -> Result<Value, TxnError> {
        let pick = |t: &Tuple| match t.0.get(at) {
            Some(pgoutput::Value::Text(bytes)) | Some(pgoutput::Value::Binary(bytes)) => {
                Some(key_json(bytes, column.type_oid))
            }
            _ => None,
        };
        // An unchanged (TOASTed) key column is only in the old tuple, when there is one.
        pick(tuple).or_else(|| old.and_then(pick)).ok_or_else(|| {
            TxnError::Definite(format!(
                "table {table}: a row change carries no value for primary key column {:?}",
                column.name
            ))
        })
    };
    if let [(at, column)] = key {
        return value_at(*at, column);
    }
    let mut object = serde_json::Map::with_capacity(key.len());
    for (at, column) in key {
        object.insert(column.name.clone(), value_at(*at, column)?);
    }
    Ok(Value::Object(object))
}

/// Integers become JSON numbers; everything else keeps PostgreSQL's text form.
pub(crate) fn key_json(text: &[u8], type_oid: u32) -> Value {
    const INT8: u32 = 20;
    const INT2: u32 = 21;
    const INT4: u32 = 23;
    const OID: u32 = 26;
    let text = String::from_utf8_lossy(text);
    if matches!(type_oid, INT8 | INT2 | INT4 | OID) {
        if let Ok(n) = text.parse::<i64>() {
            return Value::from(n);
        }
    }
    Value::String(text.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_json() {
        assert_eq!(key_json(b"42", 23), Value::from(42));
        assert_eq!(key_json(b"-9000000000", 20), Value::from(-9_000_000_000i64));
        assert_eq!(key_json(b"42", 25), Value::from("42"));
        assert_eq!(
            key_json(b"a1b2c3d4-0000-0000-0000-000000000000", 2950),
            Value::from("a1b2c3d4-0000-0000-0000-000000000000")
        );
    }
}
