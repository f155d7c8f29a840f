//! Classification events: a row's value of a classification (true, false, or null when the
//! row does not exist) changing between the start and the end of a committed transaction.
//!
//! ```text
//!  Assembler ── per transaction: each touched row's last image (TxnChanges) ──┐
//!                                                                             ▼
//!  staged group of transactions ─► images filled (unchanged TOAST from the store)
//!                                ─► one query per table evaluates every condition on every
//!                                   image (PostgreSQL, batched)
//!                                ─► per transaction, in order: value before (store, or an
//!                                   earlier transaction of the group) vs value after
//!                                ─► notifications + state writes, one atomic batch
//! ```
//!
//! Net per transaction comes for free: only each row's last image of a transaction is kept,
//! and it is compared with the stored value from before the transaction.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::types::ToSql;

use crate::classify::{evaluation_query, Condition};
use crate::config::{RelOp, Side, TableName};
use crate::derive::mutation::TxnContext;
use crate::log::{Log, LogError, NewNotification, NotificationKey};
use crate::schema::KeyColumn;
use crate::source::{Database, SourceError};
use crate::state::{self, Known, Packed, Record};

/// One column of a row image, as the WAL carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    Null,
    Text(String),
    /// An unchanged TOASTed value the server did not send: taken from the state store.
    Unchanged,
}

/// A touched row: its primary key and its last image in the transaction (`None`: deleted).
#[derive(Debug)]
pub struct RowChange {
    pub row: Value,
    pub after: Option<Vec<Cell>>,
    /// An UPDATE touched the row (a `columns` event reports only updates).
    pub updated: bool,
    /// The row got here by a primary key update from this key: its unchanged TOAST values
    /// are that row's.
    pub moved_from: Option<String>,
    /// The transaction's first touch of the row was an INSERT, with no TRUNCATE of the
    /// table before it: the row did not exist before the transaction.
    pub inserted: bool,
}

/// One table's touched rows in a transaction, in order of first touch.
#[derive(Debug, Default)]
pub struct TableChanges {
    /// The table was truncated; rows touched after the TRUNCATE are in `rows`.
    pub truncated: bool,
    pub rows: Vec<(String, RowChange)>,
    index: FxHashMap<String, usize>,
    /// How many TRUNCATEs of the table the transaction made so far (a spilled transaction's
    /// earlier rows are dropped when this grows).
    pub truncations: u32,
}

impl TableChanges {
    /// Records a row's new image (or its deletion). A later image of the same row replaces
    /// the earlier one; its unchanged TOAST cells keep the earlier image's values.
    pub fn touch(&mut self, row: Value, mut after: Option<Vec<Cell>>, updated: bool) {
        let key = row.to_string();
        match self.index.get(&key) {
            Some(&at) => {
                let change = &mut self.rows[at].1;
                change.updated |= updated;
                if let (Some(prev), Some(new)) = (&change.after, &mut after) {
                    for (cell, old) in new.iter_mut().zip(prev) {
                        if *cell == Cell::Unchanged {
                            *cell = old.clone();
                        }
                    }
                }
                change.after = after;
            }
            None => {
                self.index.insert(key.clone(), self.rows.len());
                self.rows.push((
                    key,
                    RowChange {
                        row,
                        after,
                        updated,
                        moved_from: None,
                        inserted: false,
                    },
                ));
            }
        }
    }

    /// Records a row an INSERT wrote.
    pub fn insert(&mut self, row: Value, after: Vec<Cell>) {
        let first = !self.index.contains_key(&row.to_string());
        let truncated = self.truncated;
        self.touch(row, Some(after), false);
        if first && !truncated {
            if let Some((_, change)) = self.rows.last_mut() {
                change.inserted = true;
            }
        }
    }

    /// A primary key update: the row leaves `old` (gone) and arrives at `new`, carrying the
    /// old row's values where the new image has unchanged TOAST cells.
    pub fn moved(&mut self, old: Value, new: Value, mut after: Vec<Cell>) {
        let old_key = old.to_string();
        if let Some(prev) = self
            .index
            .get(&old_key)
            .and_then(|&at| self.rows[at].1.after.as_ref())
        {
            for (cell, earlier) in after.iter_mut().zip(prev) {
                if *cell == Cell::Unchanged {
                    *cell = earlier.clone();
                }
            }
        }
        let unfilled = after.contains(&Cell::Unchanged);
        self.touch(old, None, false);
        let key = new.to_string();
        self.touch(new, Some(after), true);
        if let Some(&at) = self.index.get(&key) {
            self.rows[at].1.moved_from = unfilled.then_some(old_key);
        }
    }

    pub fn truncate(&mut self) {
        self.rows.clear();
        self.index.clear();
        self.truncated = true;
        self.truncations += 1;
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && !self.truncated
    }
}

/// The classified tables' changes of one transaction.
#[derive(Debug, Default)]
pub struct TxnChanges {
    pub tables: BTreeMap<TableName, TableChanges>,
}

impl TxnChanges {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    pub fn rows(&self) -> usize {
        self.tables.values().map(TableChanges::len).sum()
    }

    /// Takes the touched rows out, leaving which tables were truncated.
    pub fn drain(&mut self) -> TxnChanges {
        let mut out = TxnChanges::default();
        for (table, changes) in &mut self.tables {
            out.tables.insert(
                table.clone(),
                TableChanges {
                    truncated: changes.truncated,
                    rows: std::mem::take(&mut changes.rows),
                    index: std::mem::take(&mut changes.index),
                    truncations: changes.truncations,
                },
            );
        }
        out
    }

    /// The tables the transaction truncated.
    pub fn truncated(&self) -> Vec<TableName> {
        self.tables
            .iter()
            .filter(|(_, c)| c.truncated)
            .map(|(t, _)| t.clone())
            .collect()
    }
}

/// A committed transaction waiting for its classifications to be evaluated.
pub struct StagedTxn {
    pub ctx: TxnContext,
    pub changes: TxnChanges,
    /// How many mutation notifications each webhook got from the transaction: a `columns`
    /// event's updates are numbered after them.
    pub ordinals: BTreeMap<String, u32>,
}

/// A webhook's interest in transitions of one classification.
#[derive(Debug, Clone)]
pub struct TransitionSub {
    /// Index of the webhook in the config: orders the notifications of a transaction.
    pub webhook: usize,
    pub hook_id: String,
    pub event: String,
    pub from: Side,
    pub to: Side,
    pub max_rows: usize,
}

/// One classification as the stream evaluates it.
#[derive(Debug, Clone)]
pub struct ClassSpec {
    pub name: String,
    pub table: TableName,
    /// What the condition calls the row (the query's alias, or the table's name).
    pub alias: String,
    pub predicate: String,
    /// The columns the condition reads, by name (kept in the state store).
    pub columns: Vec<String>,
    /// Transactions committed at or after this LSN change the state.
    pub active_from: u64,
    pub subs: Vec<TransitionSub>,
    /// `-- recheck: INTERVAL`: every row is evaluated again against the live table this often.
    pub recheck: Option<std::time::Duration>,
    /// Other tables the condition reads, tied to the base rows by a foreign key.
    pub deps: Vec<Dependency>,
    /// Not a classification but an event's `columns = [...]` or `relation`: no condition;
    /// the state keeps the columns. For `columns`, an update where one of them differs is
    /// reported (`op: "update"`).
    pub watch: bool,
    /// A relation event's links, held by the rows of `table`.
    pub relation: Option<RelationPlan>,
}

/// A relation event: which links a row of the watched table holds, as (row of the event's
/// table, related row of the other end).
#[derive(Debug, Clone)]
pub struct RelationPlan {
    /// The constraint or join table, as the event names it.
    pub name: String,
    pub ops: Vec<crate::config::RelOp>,
    /// The event's table (its rows are the notification's `rows`).
    pub table: TableName,
    pub row: End,
    pub related: End,
}

/// One end of a link, seen from a row of the watched table.
#[derive(Debug, Clone)]
pub enum End {
    /// The watched row itself (its primary key).
    Own,
    /// The row a foreign key of the watched row points to: its columns (in the watched
    /// table), in the order of the referenced table's primary key `key`.
    Points {
        columns: Vec<String>,
        key: Vec<KeyColumn>,
    },
}

/// A foreign key between a classification's table and another table its condition reads:
/// a change of a row there re-evaluates the base rows it points to (before and after).
#[derive(Debug, Clone)]
pub struct Dependency {
    /// The other table.
    pub table: TableName,
    /// The foreign key's name, for messages.
    pub constraint: String,
    /// The other table's columns whose values name base rows: its foreign key columns (it
    /// references the base table), or the columns the base table's foreign key references.
    pub via: Vec<String>,
    /// The base table's columns, with SQL types, equal to `via`'s values, in that order.
    pub base: Vec<(String, String)>,
}

/// A classified table: its classifications and the columns their conditions read.
#[derive(Debug, Clone)]
pub struct ClassifiedTable {
    pub table: TableName,
    pub key: Vec<KeyColumn>,
    /// The union of the classifications' columns, in table order, with their SQL types:
    /// the columns of a row image.
    pub columns: Vec<(String, String)>,
    pub classes: Vec<ClassSpec>,
}

/// Why classifications could not be evaluated.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    /// The database went away: reconnect and evaluate again (nothing was written).
    #[error("{0}")]
    Transient(String),
    /// A condition cannot be evaluated at all (the table changed under it): the user must
    /// fix the classification.
    #[error("{0}")]
    Definite(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl From<SourceError> for ClassifyError {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Transient(m) => ClassifyError::Transient(m),
            SourceError::Definite(m) => ClassifyError::Definite(m),
        }
    }
}

/// Evaluates conditions over row images in PostgreSQL.
pub struct Evaluator {
    client: tokio_postgres::Client,
    statements: HashMap<String, tokio_postgres::Statement>,
    /// Inside a transaction (the baseline's snapshot), a failed statement needs a savepoint
    /// to leave the transaction usable.
    in_transaction: bool,
    /// Transactions whose visibility the next evaluation confirms first.
    unconfirmed: Vec<i64>,
}

/// At most this many row images go to PostgreSQL in one query.
const EVALUATION_BATCH: usize = 4096;

impl Evaluator {
    pub fn new(client: tokio_postgres::Client, in_transaction: bool) -> Evaluator {
        Evaluator {
            client,
            statements: HashMap::new(),
            in_transaction,
            unconfirmed: Vec::new(),
        }
    }

    /// The next evaluation confirms first that the transactions `xids` are visible to new
    /// snapshots, in the same round trip; [`Evaluator::confirm_visible`] does it alone if no
    /// evaluation came. The stream may carry a commit a moment before the committing backend
    /// makes it visible to others, and a condition's reads of other tables (`EXISTS (SELECT
    /// ... FROM other ...)`) must see the transaction it is evaluated for. Waiting gives up
    /// (with a warning) after 10 s.
    pub fn expect_visible(&mut self, xids: &[u32]) {
        self.unconfirmed = xids.iter().map(|x| i64::from(*x)).collect();
    }

    /// Waits until the transactions of [`Evaluator::expect_visible`] are visible, unless an
    /// evaluation confirmed it already.
    pub async fn confirm_visible(&mut self) -> Result<(), ClassifyError> {
        let xids = std::mem::take(&mut self.unconfirmed);
        if xids.is_empty() {
            return Ok(());
        }
        self.visible_after(&xids, std::time::Instant::now()).await
    }

    /// Polls until `xids` are visible, or 10 s after `started`.
    async fn visible_after(
        &mut self,
        xids: &[i64],
        started: std::time::Instant,
    ) -> Result<(), ClassifyError> {
        let check = self.visibility().await?;
        loop {
            if visible(&self.client, &check, xids).await? {
                return Ok(());
            }
            if started.elapsed() > std::time::Duration::from_secs(10) {
                tracing::warn!(
                    ?xids,
                    "committed transactions are still not visible after 10 s; evaluating anyway"
                );
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// The visibility check, prepared once (so that running it sends one message).
    async fn visibility(&mut self) -> Result<tokio_postgres::Statement, ClassifyError> {
        // A 32-bit xid becomes an xid8 in the epoch of the snapshot's xmax (or the one
        // before, when it is above xmax's low half: it wrapped since).
        const VISIBLE: &str = "
            WITH s AS (SELECT pg_current_snapshot() AS s),
                 m AS (SELECT s, pg_snapshot_xmax(s)::text::bigint AS xmax FROM s)
            SELECT coalesce(bool_and(pg_visible_in_snapshot(
                       (((CASE WHEN x <= (m.xmax & 4294967295) THEN m.xmax >> 32
                               ELSE (m.xmax >> 32) - 1 END) << 32) | x)::text::xid8, m.s)), true)
              FROM m, unnest($1::bigint[]) AS x";
        if let Some(statement) = self.statements.get(VISIBLE) {
            return Ok(statement.clone());
        }
        let statement = self
            .client
            .prepare(VISIBLE)
            .await
            .map_err(SourceError::from)?;
        self.statements
            .insert(VISIBLE.to_string(), statement.clone());
        Ok(statement)
    }

    pub fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }

    /// The value of every class of `table` (or only `only`) for every image. `labels` name
    /// the rows in error reports.
    pub async fn evaluate(
        &mut self,
        table: &ClassifiedTable,
        only: Option<usize>,
        images: &[Vec<Option<String>>],
        labels: &[String],
    ) -> Result<Vec<Vec<Known>>, ClassifyError> {
        let classes: Vec<usize> = match only {
            Some(i) => vec![i],
            None => (0..table.classes.len()).collect(),
        }
        .into_iter()
        .filter(|&i| !table.classes[i].watch)
        .collect();
        if classes.is_empty() {
            return Ok(vec![vec![Known::False; table.classes.len()]; images.len()]);
        }
        let mut out = Vec::with_capacity(images.len());
        for (chunk, names) in images
            .chunks(EVALUATION_BATCH)
            .zip(labels.chunks(EVALUATION_BATCH))
        {
            match self.run(table, &classes, chunk).await {
                Ok(values) => out.extend(values),
                Err(Failure::Rows(message)) => {
                    tracing::debug!(table = %table.table, error = %message, "a condition failed; evaluating row by row");
                    out.extend(self.row_by_row(table, &classes, chunk, names).await?);
                }
                Err(Failure::Fatal(e)) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Evaluates each image and class on its own, so that one row's error leaves the others'
    /// values known.
    async fn row_by_row(
        &mut self,
        table: &ClassifiedTable,
        classes: &[usize],
        images: &[Vec<Option<String>>],
        labels: &[String],
    ) -> Result<Vec<Vec<Known>>, ClassifyError> {
        let mut out = Vec::with_capacity(images.len());
        for (image, label) in images.iter().zip(labels) {
            let mut values = vec![Known::False; table.classes.len()];
            for &class in classes {
                match self.run(table, &[class], std::slice::from_ref(image)).await {
                    Ok(v) => values[class] = v[0][class],
                    Err(Failure::Rows(message)) => {
                        tracing::error!(
                            classification = %table.classes[class].name,
                            table = %table.table,
                            row = %label,
                            error = %message,
                            "the classification's condition fails for this row: the row keeps its last known value (no transition) until a later change evaluates cleanly"
                        );
                        values[class] = Known::Unknown;
                    }
                    Err(Failure::Fatal(e)) => return Err(e),
                }
            }
            out.push(values);
        }
        Ok(out)
    }

    async fn run(
        &mut self,
        table: &ClassifiedTable,
        classes: &[usize],
        images: &[Vec<Option<String>>],
    ) -> Result<Vec<Vec<Known>>, Failure> {
        let conditions: Vec<Condition<'_>> = classes
            .iter()
            .map(|&i| Condition {
                alias: &table.classes[i].alias,
                predicate: &table.classes[i].predicate,
            })
            .collect();
        let sql = evaluation_query(&table.columns, &conditions);
        let statement = match self.statements.get(&sql) {
            Some(s) => s.clone(),
            None => {
                let s = self
                    .client
                    .prepare(&sql)
                    .await
                    .map_err(|e| fatal(table, classes, e))?;
                self.statements.insert(sql, s.clone());
                s
            }
        };
        let numbers: Vec<i32> = (0..images.len() as i32).collect();
        let columns: Vec<Vec<Option<&str>>> = (0..table.columns.len())
            .map(|c| {
                images
                    .iter()
                    .map(|image| image.get(c).and_then(|v| v.as_deref()))
                    .collect()
            })
            .collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(columns.len() + 1);
        params.push(&numbers);
        for column in &columns {
            params.push(column);
        }
        if self.in_transaction {
            self.client
                .batch_execute("SAVEPOINT walhook_evaluation")
                .await
                .map_err(|e| Failure::Fatal(SourceError::from(e).into()))?;
        }
        let result = if self.unconfirmed.is_empty() || self.in_transaction {
            self.client.query(&statement, &params).await
        } else {
            // The visibility check and the evaluation in one round trip: the server runs
            // them in order, so the evaluation's snapshot is at least as new as the check's.
            let xids = std::mem::take(&mut self.unconfirmed);
            let started = std::time::Instant::now();
            let check_statement = self.visibility().await.map_err(Failure::Fatal)?;
            // Its first poll sends the check (a prepared statement: one message); only then
            // is the evaluation sent.
            let (seen, result) = {
                let mut check = std::pin::pin!(visible(&self.client, &check_statement, &xids));
                let sent = std::future::poll_fn(|cx| {
                    std::task::Poll::Ready(std::future::Future::poll(check.as_mut(), cx))
                })
                .await;
                match sent {
                    std::task::Poll::Ready(seen) => {
                        (seen, self.client.query(&statement, &params).await)
                    }
                    std::task::Poll::Pending => {
                        tokio::join!(check, self.client.query(&statement, &params))
                    }
                }
            };
            if seen.map_err(Failure::Fatal)? {
                result
            } else {
                self.visible_after(&xids, started)
                    .await
                    .map_err(Failure::Fatal)?;
                self.client.query(&statement, &params).await
            }
        };
        if self.in_transaction {
            let after = if result.is_ok() {
                "RELEASE SAVEPOINT walhook_evaluation"
            } else {
                "ROLLBACK TO SAVEPOINT walhook_evaluation"
            };
            self.client
                .batch_execute(after)
                .await
                .map_err(|e| Failure::Fatal(SourceError::from(e).into()))?;
        }
        let rows = match result {
            Ok(rows) => rows,
            Err(e) if is_row_error(&e) => {
                let message = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string());
                return Err(Failure::Rows(message));
            }
            Err(e) => return Err(fatal(table, classes, e)),
        };
        // Indexed by class, whichever classes were asked.
        let mut out = vec![vec![Known::False; table.classes.len()]; images.len()];
        for row in rows {
            let number: i32 = row.get(0);
            let Some(values) = out.get_mut(number as usize) else {
                continue;
            };
            for (i, &class) in classes.iter().enumerate() {
                if row.get::<_, bool>(i + 1) {
                    values[class] = Known::True;
                }
            }
        }
        Ok(out)
    }
}

/// Whether every one of `xids` is visible to a snapshot taken now (`check`: see
/// [`Evaluator::visibility`]).
async fn visible(
    client: &tokio_postgres::Client,
    check: &tokio_postgres::Statement,
    xids: &[i64],
) -> Result<bool, ClassifyError> {
    Ok(client
        .query_one(check, &[&xids])
        .await
        .map_err(SourceError::from)?
        .get(0))
}

enum Failure {
    /// The condition failed on some row's data (division by zero, a bad cast, ...).
    Rows(String),
    Fatal(ClassifyError),
}

/// Errors caused by a row's values rather than by the query or the connection: data
/// exceptions, integrity violations, errors raised by functions the condition calls.
fn is_row_error(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        let code = d.code().code();
        ["22", "23", "P0", "2F", "38", "39"]
            .iter()
            .any(|class| code.starts_with(class))
    })
}

fn fatal(table: &ClassifiedTable, classes: &[usize], e: tokio_postgres::Error) -> Failure {
    let source = SourceError::from(e);
    Failure::Fatal(match source {
        SourceError::Transient(m) => ClassifyError::Transient(m),
        SourceError::Definite(m) => {
            let names: Vec<&str> = classes
                .iter()
                .map(|&i| table.classes[i].name.as_str())
                .collect();
            ClassifyError::Definite(format!(
                "classification {} on {} can no longer be evaluated ({m}): the table changed under it; fix the classification's SQL (walhook check shows the problem) and restart",
                names.join(", "),
                table.table
            ))
        }
    })
}

/// Turns the staged transactions' changes into transition notifications and state writes.
pub struct Classifier {
    tables: BTreeMap<TableName, ClassifiedTable>,
    db: Database,
    evaluator: Option<Evaluator>,
    /// When each rechecked classification (table, index) is next due.
    rechecks: Vec<(TableName, usize, tokio::time::Instant)>,
    /// Rows the stream met recently, as the log holds them once the group in flight is
    /// written.
    cache: StateCache,
}

/// State writes: key → new record bytes (`None` removes), in key order.
pub type StateWrites = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A group's state writes, encoded, in key order: shared by the writer and the next
/// group's evaluation, which reads them while they are being written.
pub type RowWrites = StateWrites;

/// A row of the state store as the log holds it: its encoding ([`Packed::stored`]), `None`
/// when there is no row.
type Stored = Option<Box<[u8]>>;

/// Rows of the state store, each encoded as the log holds it once the group in flight is
/// written: a row the stream met recently is read without sled (whose reads wait while the
/// writer applies a batch, and which reads from disk what its own cache lost). Every row a
/// group read or wrote goes in when the group is handed to the writer; rows leave at random
/// once the size passes the budget. Encoded, a row takes a fifth of the memory it takes
/// decoded, so the budget holds five times as many. Whatever writes the store another way
/// (a recheck, a spilled transaction) empties it.
#[derive(Default)]
pub struct StateCache {
    rows: FxHashMap<Vec<u8>, Stored>,
    bytes: usize,
    budget: usize,
}

impl StateCache {
    pub fn new(budget: usize) -> StateCache {
        StateCache {
            budget,
            ..StateCache::default()
        }
    }

    /// The key and the encoding, and about what the map and the allocator add.
    fn weight(key_len: usize, stored: &Stored) -> usize {
        key_len + stored.as_ref().map_or(0, |b| b.len()) + 64
    }

    fn get(&self, key: &[u8]) -> Option<&Stored> {
        self.rows.get(key)
    }

    /// Takes a row out (a group about to change it puts it back when handed over).
    fn take(&mut self, key: &[u8]) -> Option<Stored> {
        let stored = self.rows.remove(key)?;
        self.bytes = self.bytes.saturating_sub(Self::weight(key.len(), &stored));
        Some(stored)
    }

    fn put(&mut self, key: Vec<u8>, stored: Stored) {
        if self.budget == 0 {
            return;
        }
        let key_len = key.len();
        let weight = Self::weight(key_len, &stored);
        if let Some(old) = self.rows.insert(key, stored) {
            self.bytes = self.bytes.saturating_sub(Self::weight(key_len, &old));
        }
        self.bytes += weight;
        if self.bytes > self.budget {
            // Down to three quarters, so that this runs once per quarter of the budget.
            let target = self.budget / 4 * 3;
            let mut bytes = self.bytes;
            self.rows.retain(|key, stored| {
                if bytes <= target {
                    return true;
                }
                bytes = bytes.saturating_sub(Self::weight(key.len(), stored));
                false
            });
            self.bytes = bytes;
        }
    }

    pub fn clear(&mut self) {
        self.rows.clear();
        self.bytes = 0;
    }

    /// Reads the stored rows under each of `prefixes` in, in key order, while they fit in
    /// three quarters of the budget (so that the stream's own rows do not evict them at
    /// once). Returns how many went in.
    fn warm(&mut self, log: &Log, prefixes: &[Vec<u8>]) -> Result<usize, LogError> {
        let room = self.budget / 4 * 3;
        let mut added = 0;
        for prefix in prefixes {
            if self.bytes >= room {
                break;
            }
            log.visit_raw(prefix, |key, value| {
                let stored: Stored = Some(Box::from(value));
                let weight = Self::weight(key.len(), &stored);
                if self.bytes + weight > room {
                    return false;
                }
                if self.rows.insert(key.to_vec(), stored).is_none() {
                    self.bytes += weight;
                    added += 1;
                }
                true
            })?;
        }
        Ok(added)
    }
}

impl Classifier {
    /// `cache_bytes`: the row state cache's budget (0: none).
    pub fn new(tables: Vec<ClassifiedTable>, db: Database, cache_bytes: usize) -> Classifier {
        let now = tokio::time::Instant::now();
        let rechecks = tables
            .iter()
            .flat_map(|t| {
                t.classes
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| c.recheck.map(|every| (t.table.clone(), i, now + every)))
            })
            .collect();
        Classifier {
            tables: tables.into_iter().map(|t| (t.table.clone(), t)).collect(),
            db,
            evaluator: None,
            rechecks,
            cache: StateCache::new(cache_bytes),
        }
    }

    /// Follows column type changes the stream reported ([`crate::txn::Assembler::take_retyped`]):
    /// a classified table's image columns are cast to the type the stream's values have now,
    /// so that a value only the new type can hold (`80.5` after `int` became `numeric`)
    /// still classifies. Transactions staged before the change must be written first.
    pub async fn retype(
        &mut self,
        retyped: &[(TableName, crate::txn::ColumnTypes)],
    ) -> Result<(), ClassifyError> {
        if self.evaluator.is_none() {
            let client = self.db.connect().await?;
            self.evaluator = Some(Evaluator::new(client, false));
        }
        let Some(evaluator) = self.evaluator.as_ref() else {
            return Err(ClassifyError::Transient("not connected".into()));
        };
        let result = retype_tables(evaluator, &mut self.tables, retyped).await;
        if matches!(result, Err(ClassifyError::Transient(_))) {
            self.evaluator = None;
        }
        result
    }

    /// When the next recheck is due, if any classification has one.
    pub fn next_recheck(&self) -> Option<tokio::time::Instant> {
        self.rechecks.iter().map(|(_, _, due)| *due).min()
    }

    /// Evaluates every due classification's rows again against the live tables, and returns
    /// the transitions found (against the stored values) with their state writes. They are
    /// numbered after `at`, the log's last transaction: ordinals from 2^31 on (a counter kept
    /// in the log), so they never collide with a transaction's own.
    pub async fn recheck(
        &mut self,
        log: &Log,
        at: &TxnContext,
    ) -> Result<(Vec<NewNotification>, StateWrites), ClassifyError> {
        // The store changes under the cache once these writes are.
        self.cache.clear();
        let now = tokio::time::Instant::now();
        let due: Vec<(TableName, usize)> = self
            .rechecks
            .iter()
            .filter(|(_, _, when)| *when <= now)
            .map(|(t, i, _)| (t.clone(), *i))
            .collect();
        if due.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        if self.evaluator.is_none() {
            let client = self.db.connect().await?;
            self.evaluator = Some(Evaluator::new(client, false));
        }
        let mut groups_rows: Vec<(usize, u8, u8, Vec<Value>, ClassSpec, TransitionSub)> =
            Vec::new();
        // Rows whose records changed, read once each (several classifications may share one).
        let mut rows: BTreeMap<Vec<u8>, Packed> = BTreeMap::new();
        for (table_name, index) in &due {
            let Some(table) = self.tables.get(table_name) else {
                continue;
            };
            let class = &table.classes[*index];
            let Some(evaluator) = self.evaluator.as_mut() else {
                break;
            };
            let result = stored_values(evaluator, table, *index, log).await;
            let changed = match result {
                Ok(changed) => changed,
                Err(ClassifyError::Transient(m)) => {
                    self.evaluator = None;
                    return Err(ClassifyError::Transient(m));
                }
                Err(e) => {
                    tracing::error!(classification = %class.name, error = %e, "recheck failed; rows keep their values until the next change or recheck");
                    continue;
                }
            };
            for (row, key, mut record, from, to) in changed {
                for sub in class
                    .subs
                    .iter()
                    .filter(|s| matches(s.from, from) && matches(s.to, to))
                {
                    match groups_rows
                        .iter_mut()
                        .find(|g| g.0 == sub.webhook && g.1 == code(from) && g.2 == code(to))
                    {
                        Some(g) => g.3.push(row.clone()),
                        None => groups_rows.push((
                            sub.webhook,
                            code(from),
                            code(to),
                            vec![row.clone()],
                            class.clone(),
                            sub.clone(),
                        )),
                    }
                }
                record.value = match to {
                    Side::True => Known::True,
                    _ => Known::False,
                };
                let packed = match rows.entry(key) {
                    std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                    std::collections::btree_map::Entry::Vacant(entry) => {
                        let packed = match log.get_raw(entry.key())? {
                            Some(bytes) => decode(entry.key(), &bytes)?,
                            None => Packed::default(),
                        };
                        entry.insert(packed)
                    }
                };
                packed.set(&class.name, Some(record));
            }
        }
        let mut writes: StateWrites = rows
            .into_iter()
            .map(|(key, packed)| (key, packed.stored()))
            .collect();
        for (table, index, when) in &mut self.rechecks {
            if due.iter().any(|(t, i)| t == table && i == index) {
                let every = self.tables[table].classes[*index]
                    .recheck
                    .unwrap_or(std::time::Duration::from_secs(60));
                *when = now + every;
            }
        }
        let mut groups: Groups<'_> = BTreeMap::new();
        for (webhook, from, to, rows, class, sub) in &groups_rows {
            groups.insert((*webhook, *from, *to), (rows.clone(), class, sub));
        }
        let counter = log
            .get_raw(RECHECK_COUNTER)?
            .and_then(|b| serde_json::from_slice::<(u64, u32)>(&b).ok())
            .filter(|(lsn, _)| *lsn == at.lsn)
            .map_or(0, |(_, next)| next);
        let notifications = emit(
            at,
            groups,
            &mut HashMap::new(),
            RECHECK_ORDINALS + counter,
            true,
        );
        let used = notifications
            .iter()
            .map(|n| n.key.ordinal - RECHECK_ORDINALS + 1)
            .max()
            .unwrap_or(counter);
        if !notifications.is_empty() {
            writes.push((
                RECHECK_COUNTER.to_vec(),
                Some(serde_json::to_vec(&(at.lsn, used)).unwrap_or_default()),
            ));
        }
        Ok((notifications, writes))
    }

    /// Every webhook that wants transitions.
    pub fn hooks(&self) -> Vec<String> {
        self.tables
            .values()
            .flat_map(|t| &t.classes)
            .flat_map(|c| &c.subs)
            .map(|s| s.hook_id.clone())
            .collect()
    }

    /// The notifications and state writes of `txns`, in commit order. `pending`: the state
    /// writes of the group before, if they may not be in the log yet; they are read as if
    /// they were. `release` lets that group's write start: sent once the stored rows are
    /// read, before PostgreSQL's evaluation is awaited (sled makes reads wait while a batch
    /// is applied), dropped at the latest on return.
    pub async fn evaluate(
        &mut self,
        txns: &[StagedTxn],
        log: &Log,
        pending: Option<Arc<RowWrites>>,
        mut release: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(Vec<NewNotification>, RowWrites), ClassifyError> {
        if txns.iter().all(|t| t.changes.is_empty()) {
            return Ok((Vec::new(), Vec::new()));
        }
        if self.evaluator.is_none() {
            // Connecting can take long: the group before does not wait for it.
            drop(release.take());
            let client = self.db.connect().await?;
            self.evaluator = Some(Evaluator::new(client, false));
        }
        let mut overlay = Overlay {
            pending,
            release,
            cache: std::mem::take(&mut self.cache),
            ..Overlay::default()
        };
        let result = self.derive(txns, log, &mut overlay, None).await;
        if matches!(result, Err(ClassifyError::Transient(_))) {
            self.evaluator = None;
        }
        let notifications = match result {
            Ok(notifications) => notifications,
            Err(e) => {
                // The rows this group took out are read from the log again.
                self.cache = std::mem::take(&mut overlay.cache);
                return Err(e);
            }
        };
        let (writes, cache) = overlay.finish();
        self.cache = cache;
        Ok((notifications, writes))
    }

    /// Empties the row state cache and fills it from the store (see [`StateCache::warm`]),
    /// as the stream (re)starts: a stream that starts behind, as after a restart, then
    /// reads the rows it meets first from memory rather than one by one from sled, which
    /// reads from disk what its own cache lost. One sequential pass costs a small part of
    /// what the reads it saves do. Returns how many rows went in.
    pub async fn warm(&mut self, log: &Log) -> usize {
        if self.cache.budget == 0 || self.tables.is_empty() {
            self.cache.clear();
            return 0;
        }
        let prefixes: Vec<Vec<u8>> = self
            .tables
            .keys()
            .map(|table| state::table_prefix(&table.to_string()))
            .collect();
        let budget = self.cache.budget;
        let mut cache = std::mem::take(&mut self.cache);
        cache.clear();
        let log = log.clone();
        let warmed = tokio::task::spawn_blocking(move || {
            let added = cache.warm(&log, &prefixes);
            (cache, added)
        })
        .await;
        // Only a shortcut: without it the stream reads the rows from the log.
        let failed = match warmed {
            Ok((cache, Ok(added))) => {
                self.cache = cache;
                return added;
            }
            Ok((_, Err(e))) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(error = %failed, "could not read the row state into its cache; the stream reads it from the log instead");
        self.cache = StateCache::new(budget);
        0
    }

    /// Derives the transitions of one spilled (huge) transaction from its changes in the
    /// scratch area, a chunk at a time: notifications are written as they come (invisible
    /// until the position is), state writes go to the staging area. Returns how many
    /// notifications each webhook got. The caller then makes the staged state current with
    /// [`apply_staged`].
    pub async fn evaluate_spilled(
        &mut self,
        ctx: &TxnContext,
        truncated: &[TableName],
        mutation_ordinals: &BTreeMap<String, u32>,
        log: &Log,
    ) -> Result<BTreeMap<String, u32>, ClassifyError> {
        if self.evaluator.is_none() {
            let client = self.db.connect().await?;
            self.evaluator = Some(Evaluator::new(client, false));
        }
        // The store changes under the cache once the staged state is applied.
        self.cache.clear();
        let mut overlay = Overlay {
            staged: true,
            ..Overlay::default()
        };
        let mut ordinals: HashMap<String, u32> = mutation_ordinals
            .iter()
            .map(|(h, n)| (h.clone(), *n))
            .collect();
        let names: Vec<TableName> = self.tables.keys().cloned().collect();
        for name in names {
            let prefix = scratch_prefix(&name);
            let mut from = prefix.clone();
            let mut first = true;
            loop {
                let page = log.scan_raw(&prefix, &from, EVALUATION_BATCH)?;
                let truncate = first && truncated.contains(&name);
                if page.is_empty() && !truncate {
                    break;
                }
                first = false;
                let mut changes = TableChanges {
                    truncated: truncate,
                    ..TableChanges::default()
                };
                for (key, bytes) in &page {
                    let Some(row) = state::row_of(&prefix, key) else {
                        continue;
                    };
                    let (after, updated, moved_from) =
                        decode_change(bytes).map_err(|reason| LogError::Corrupt {
                            key: String::from_utf8_lossy(key).into_owned(),
                            reason,
                        })?;
                    let row_json = serde_json::from_str(&row).unwrap_or(Value::String(row));
                    let at = changes.rows.len();
                    changes.touch(row_json, after, updated);
                    if let Some((_, change)) = changes.rows.get_mut(at) {
                        change.moved_from = moved_from;
                    }
                }
                if let Some((last, _)) = page.last() {
                    from = last.to_vec();
                    from.push(0);
                }
                let mut chunk = TxnChanges::default();
                chunk.tables.insert(name.clone(), changes);
                let chunk = [StagedTxn {
                    ctx: ctx.clone(),
                    changes: chunk,
                    ordinals: BTreeMap::new(),
                }];
                let result = self
                    .derive(&chunk, log, &mut overlay, Some(&mut ordinals))
                    .await;
                if matches!(result, Err(ClassifyError::Transient(_))) {
                    self.evaluator = None;
                }
                log.append(&result?, None, crate::log::now_ms())?;
                overlay.stage(log)?;
                if page.len() < EVALUATION_BATCH {
                    break;
                }
            }
        }
        Ok(ordinals.into_iter().collect())
    }

    /// Derives the transitions of `txns` in commit order. `spilled` is given for one
    /// spilled transaction's chunks: numbering goes on from chunk to chunk, and which rows
    /// the transaction touched is looked up in the scratch area. Otherwise every transaction
    /// numbers its notifications from 0.
    async fn derive(
        &mut self,
        txns: &[StagedTxn],
        log: &Log,
        overlay: &mut Overlay,
        mut spilled: Option<&mut HashMap<String, u32>>,
    ) -> Result<Vec<NewNotification>, ClassifyError> {
        let Some(evaluator) = self.evaluator.as_mut() else {
            return Err(ClassifyError::Transient("not connected".into()));
        };
        let xids: Vec<u32> = txns.iter().map(|t| t.ctx.xid).filter(|x| *x != 0).collect();
        evaluator.expect_visible(&xids);
        let in_scratch = spilled.is_some();
        // The last table whose stored rows pass 1 reads: once they are, the group before
        // may be written (while PostgreSQL evaluates).
        let last_read = self
            .tables
            .iter()
            .filter(|(name, table)| {
                !table.classes.is_empty()
                    && txns.iter().any(|t| t.changes.tables.contains_key(name))
            })
            .map(|(name, _)| name)
            .next_back();
        // Pass 1, per table: fill every image, then evaluate them all at once.
        let mut passes: HashMap<&TableName, TablePass> = HashMap::new();
        for (name, table) in &self.tables {
            let mut pass = TablePass::default();
            // By row: its image as of the transactions so far, and as it left by a key
            // update or a delete.
            let mut latest: FxHashMap<&str, usize> = FxHashMap::default();
            let mut departed: FxHashMap<&str, usize> = FxHashMap::default();
            let mut labels = Vec::new();
            for txn in txns {
                let mut at = Vec::new();
                if let Some(changes) = txn.changes.tables.get(name) {
                    if changes.truncated {
                        latest.clear();
                    }
                    at.reserve(changes.rows.len());
                    for (key, change) in &changes.rows {
                        let Some(cells) = &change.after else {
                            if let Some(image) = latest.remove(key.as_str()) {
                                departed.insert(key, image);
                            }
                            at.push(None);
                            continue;
                        };
                        // A row moved by a key update takes unchanged values from its old
                        // key.
                        let (source, previous) = match &change.moved_from {
                            Some(from) => (
                                from.as_str(),
                                latest.get(from.as_str()).or(departed.get(from.as_str())),
                            ),
                            None => (key.as_str(), latest.get(key.as_str())),
                        };
                        let previous = previous.map(|&i| &pass.images[i]);
                        let image = fill(table, source, cells, previous, txn, log, overlay)?;
                        latest.insert(key, pass.images.len());
                        at.push(Some(pass.images.len()));
                        pass.images.push(image);
                        labels.push(key.clone());
                    }
                }
                pass.at.push(at);
            }
            // A table only watched for dependencies has no conditions of its own.
            if !pass.images.is_empty() && !table.classes.is_empty() {
                let mut evaluation =
                    std::pin::pin!(evaluator.evaluate(table, None, &pass.images, &labels));
                // The first poll sends the query. While PostgreSQL evaluates, the rows'
                // stored state (which pass 2 compares with) is read from the log.
                let sent = std::future::poll_fn(|cx| {
                    std::task::Poll::Ready(std::future::Future::poll(evaluation.as_mut(), cx))
                })
                .await;
                pass.values = match sent {
                    std::task::Poll::Ready(values) => values?,
                    std::task::Poll::Pending => {
                        if !in_scratch {
                            prefetch(name, table, txns, log, overlay)?;
                        }
                        if last_read == Some(name) {
                            overlay.release();
                        }
                        evaluation.await?
                    }
                };
            }
            passes.insert(name, pass);
        }
        let image_of =
            |table: &TableName, t: usize, r: usize| passes.get(table).and_then(|p| p.image(t, r));

        // The stored rows pass 2 compares with are read (rows pass 1 did not read, such as
        // deleted ones, are read after the group before is written).
        overlay.release();
        // The dependencies' live reads below must see the transactions too.
        evaluator.confirm_visible().await?;
        // Pass 2, per transaction in commit order: before vs after.
        let touched_in = |table: &TableName, changes: Option<&TableChanges>, row: &str| {
            if in_scratch {
                log.get_raw(&scratch_key(table, row)).map(|v| v.is_some())
            } else {
                Ok(changes.is_some_and(|c| c.index.contains_key(row)))
            }
        };
        let mut notifications = Vec::new();
        for (t, txn) in txns.iter().enumerate() {
            let mut groups: Groups<'_> = BTreeMap::new();
            let mut links: Links<'_> = BTreeMap::new();
            for (name, changes) in &txn.changes.tables {
                let Some(table) = self.tables.get(name) else {
                    continue;
                };
                // A row the transaction inserted has no state to read, unless a
                // classification not maintained yet at this transaction keeps a record of it
                // (baselined at a later snapshot, where the row exists).
                let table_text = name.to_string();
                let keys: Vec<Vec<u8>> = changes
                    .rows
                    .iter()
                    .map(|(key, _)| state::row_key(&table_text, key))
                    .collect();
                if !in_scratch && table.classes.iter().all(|c| txn.ctx.lsn >= c.active_from) {
                    for (key, (_, change)) in keys.iter().zip(&changes.rows) {
                        if change.inserted {
                            overlay.absent(key.clone());
                        }
                    }
                }
                for (c, class) in table.classes.iter().enumerate() {
                    if txn.ctx.lsn < class.active_from {
                        continue;
                    }
                    let prefix = state::table_prefix(&table_text);
                    if let Some(plan) = &class.relation {
                        // A relation event: the links the watched row holds before and after.
                        let link = |row: &Value, record: Option<&Record>| {
                            let record = record?;
                            Some((
                                end_of(&plan.row, row, record)?,
                                end_of(&plan.related, row, record)?,
                            ))
                        };
                        let mut scan = Existing::new(&prefix, &class.name, changes.truncated);
                        while let Some(page) = scan.next(log, overlay, in_scratch)? {
                            for (key, record) in page {
                                let Some(row) = state::row_of(&prefix, &key) else {
                                    continue;
                                };
                                if touched_in(name, Some(changes), &row)? {
                                    continue;
                                }
                                let row_json =
                                    serde_json::from_str(&row).unwrap_or(Value::String(row));
                                if let Some((row, related)) = link(&row_json, Some(&record)) {
                                    add_link(
                                        &mut links,
                                        class,
                                        RelOp::Removed,
                                        &row,
                                        Some(&related),
                                    );
                                    add_link(&mut links, class, RelOp::RelatedChange, &row, None);
                                }
                                overlay.set(log, &key, &class.name, None)?;
                            }
                            if let Some(ordinals) = spilled.as_deref_mut() {
                                // A spilled transaction keeps one page in memory.
                                let notes =
                                    emit_links(&txn.ctx, std::mem::take(&mut links), ordinals);
                                log.append(&notes, None, crate::log::now_ms())?;
                                overlay.stage(log)?;
                            }
                        }
                        for (r, (key, change)) in changes.rows.iter().enumerate() {
                            let state_key = state::row_key(&table_text, key);
                            let before = overlay.record(log, &state_key, &class.name)?;
                            let after = change.after.as_ref().map(|_| Record {
                                value: Known::False,
                                lsn: txn.ctx.lsn,
                                columns: class_columns(table, class, image_of(name, t, r)),
                            });
                            let was = link(&change.row, before.as_ref());
                            let is = link(&change.row, after.as_ref());
                            if was != is {
                                if let Some((row, related)) = &was {
                                    add_link(&mut links, class, RelOp::Removed, row, Some(related));
                                }
                                if let Some((row, related)) = &is {
                                    add_link(&mut links, class, RelOp::Added, row, Some(related));
                                }
                            }
                            // Any change of the linking row counts for the rows it links.
                            for (row, _) in was.iter().chain(is.iter()) {
                                add_link(&mut links, class, RelOp::RelatedChange, row, None);
                            }
                            let unchanged = match (&before, &after) {
                                (Some(b), Some(a)) => b.columns == a.columns,
                                (None, None) => true,
                                _ => false,
                            };
                            if !unchanged {
                                overlay.set(log, &state_key, &class.name, after)?;
                            }
                        }
                        continue;
                    }
                    // Every row that existed is gone, unless the transaction wrote it again
                    // after the TRUNCATE (handled with the touched rows below).
                    let mut scan = Existing::new(&prefix, &class.name, changes.truncated);
                    while let Some(page) = scan.next(log, overlay, in_scratch)? {
                        for (key, record) in page {
                            let Some(row) = state::row_of(&prefix, &key) else {
                                continue;
                            };
                            if touched_in(name, Some(changes), &row)? {
                                continue;
                            }
                            // (A `columns` watch only forgets: the TRUNCATE is reported
                            // as such.)
                            if !class.watch {
                                let row_json: Value =
                                    serde_json::from_str(&row).unwrap_or(Value::String(row));
                                add(
                                    &mut groups,
                                    class,
                                    &row_json,
                                    side_of(Some(&record)),
                                    Side::Null,
                                );
                            }
                            overlay.set(log, &key, &class.name, None)?;
                        }
                        if let Some(ordinals) = spilled.as_deref_mut() {
                            // A spilled transaction keeps one page in memory.
                            let notes =
                                emit(&txn.ctx, std::mem::take(&mut groups), ordinals, 0, false);
                            log.append(&notes, None, crate::log::now_ms())?;
                            overlay.stage(log)?;
                        }
                    }
                    let positions = class_positions(table, class);
                    let evaluated = passes.get(name);
                    for (r, ((_, change), state_key)) in changes.rows.iter().zip(&keys).enumerate()
                    {
                        let image = evaluated.and_then(|p| p.image(t, r));
                        // The value before the transaction: an earlier transaction of the
                        // group, or the store.
                        let (packed, changed) = overlay.row(log, state_key)?;
                        let before = packed.get(&class.name);
                        let after = match (&change.after, evaluated.and_then(|p| p.value(t, r))) {
                            // A failed evaluation keeps the last known value: as if this
                            // change had not happened, for this classification.
                            (Some(_), Some(v)) => Some(match v[c] {
                                Known::Unknown => before.map_or(Known::Unknown, |b| b.value),
                                known => known,
                            }),
                            _ => None,
                        };
                        let same_columns =
                            before.is_some_and(|b| same_columns(b, class, &positions, image));
                        if class.watch {
                            // An update (the row was there before and after) where one of
                            // the columns differs.
                            if before.is_some()
                                && after.is_some()
                                && change.updated
                                && !same_columns
                            {
                                for sub in &class.subs {
                                    groups
                                        .entry((sub.webhook, UPDATE, UPDATE))
                                        .or_insert_with(|| (Vec::new(), class, sub))
                                        .0
                                        .push(change.row.clone());
                                }
                            }
                        } else {
                            add(
                                &mut groups,
                                class,
                                &change.row,
                                side_of(before),
                                side_of_value(after),
                            );
                        }
                        let unchanged = match (before, after) {
                            (Some(b), Some(a)) => b.value == a && same_columns,
                            (None, None) => true,
                            _ => false,
                        };
                        if !unchanged {
                            packed.set(
                                &class.name,
                                after.map(|value| Record {
                                    value,
                                    lsn: txn.ctx.lsn,
                                    columns: columns_at(class, &positions, image),
                                }),
                            );
                            *changed = true;
                        }
                    }
                }
            }
            // Dependencies: rows of other tables the conditions read changed; the base rows
            // they pointed to (before) and point to (after) are evaluated again, live.
            for (base_name, base) in &self.tables {
                for (c, class) in base.classes.iter().enumerate() {
                    if txn.ctx.lsn < class.active_from || class.deps.is_empty() {
                        continue;
                    }
                    let again = Reevaluation {
                        log,
                        base_name,
                        base,
                        class,
                        c,
                        base_changes: txn.changes.tables.get(base_name),
                        in_scratch,
                    };
                    let mut pointed: Vec<(usize, Vec<Option<String>>)> = Vec::new();
                    for (d, dep) in class.deps.iter().enumerate() {
                        let (Some(changes), Some(watched)) = (
                            txn.changes.tables.get(&dep.table),
                            self.tables.get(&dep.table),
                        ) else {
                            continue;
                        };
                        let mut prefix = state::dependency_prefix(&class.name);
                        prefix.push(d as u8);
                        if changes.truncated && spilled.is_some() {
                            // Every pointer of the table is gone: a page at a time, each
                            // page's base rows re-evaluated and written out before the next
                            // (memory holds one page).
                            let mut scan = Existing::new(&prefix, state::POINTER, true);
                            while let Some(page) = scan.next(log, overlay, true)? {
                                let mut pointed_page = Vec::with_capacity(page.len());
                                for (key, record) in page {
                                    pointed_page.push((
                                        d,
                                        record.columns.into_iter().map(|(_, v)| v).collect(),
                                    ));
                                    overlay.set(log, &key, state::POINTER, None)?;
                                }
                                again
                                    .run(evaluator, overlay, &pointed_page, &mut groups)
                                    .await?;
                                if let Some(ordinals) = spilled.as_deref_mut() {
                                    let notes = emit(
                                        &txn.ctx,
                                        std::mem::take(&mut groups),
                                        ordinals,
                                        0,
                                        false,
                                    );
                                    log.append(&notes, None, crate::log::now_ms())?;
                                    overlay.stage(log)?;
                                }
                            }
                        } else if changes.truncated {
                            for (key, record) in existing(log, &prefix, state::POINTER, overlay)? {
                                pointed.push((
                                    d,
                                    record.columns.into_iter().map(|(_, v)| v).collect(),
                                ));
                                overlay.set(log, &key, state::POINTER, None)?;
                            }
                        }
                        for (r, (key, change)) in changes.rows.iter().enumerate() {
                            let dep_key = state::dependency_key(&class.name, d, key);
                            if let Some(old) = overlay.record(log, &dep_key, state::POINTER)? {
                                pointed
                                    .push((d, old.columns.into_iter().map(|(_, v)| v).collect()));
                            }
                            let now: Option<Vec<Option<String>>> = change
                                .after
                                .as_ref()
                                .and_then(|_| image_of(&dep.table, t, r))
                                .map(|image| {
                                    dep.via
                                        .iter()
                                        .map(|name| {
                                            watched
                                                .columns
                                                .iter()
                                                .position(|(n, _)| n == name)
                                                .and_then(|at| image.get(at).cloned().flatten())
                                        })
                                        .collect()
                                })
                                .filter(|values: &Vec<Option<String>>| {
                                    values.iter().all(Option::is_some)
                                });
                            match now {
                                Some(values) => {
                                    pointed.push((d, values.clone()));
                                    let record = Record {
                                        value: Known::False,
                                        lsn: txn.ctx.lsn,
                                        columns: dep.via.iter().cloned().zip(values).collect(),
                                    };
                                    overlay.set(log, &dep_key, state::POINTER, Some(record))?;
                                }
                                None => {
                                    overlay.set(log, &dep_key, state::POINTER, None)?;
                                }
                            }
                        }
                    }
                    if pointed.is_empty() {
                        continue;
                    }
                    again.run(evaluator, overlay, &pointed, &mut groups).await?;
                }
            }
            // A webhook's own mutation notifications of the transaction come first.
            let mut fresh: HashMap<String, u32> =
                txn.ordinals.iter().map(|(h, n)| (h.clone(), *n)).collect();
            let ordinals = match spilled.as_deref_mut() {
                Some(ordinals) => ordinals,
                None => &mut fresh,
            };
            notifications.extend(emit(&txn.ctx, groups, ordinals, 0, false));
            notifications.extend(emit_links(&txn.ctx, links, ordinals));
        }
        Ok(notifications)
    }
}

/// Reads into `overlay` the stored state of the rows of `table` that `txns` touched and
/// pass 2 will look up: every row of a transaction that maintains a classification of the
/// table, except those it inserted (known absent). Reading a row early changes nothing: it
/// is the state from before the group either way.
fn prefetch(
    name: &TableName,
    table: &ClassifiedTable,
    txns: &[StagedTxn],
    log: &Log,
    overlay: &mut Overlay,
) -> Result<(), LogError> {
    let table_text = name.to_string();
    let mut key = state::table_prefix(&table_text);
    let prefix = key.len();
    for txn in txns {
        let Some(changes) = txn.changes.tables.get(name) else {
            continue;
        };
        if table.classes.iter().all(|c| txn.ctx.lsn < c.active_from) {
            continue;
        }
        for (row, change) in &changes.rows {
            if change.inserted {
                continue;
            }
            key.truncate(prefix);
            key.extend_from_slice(row.as_bytes());
            overlay.row(log, &key)?;
        }
    }
    Ok(())
}

/// One table's images in a group of transactions, filled and evaluated.
#[derive(Default)]
struct TablePass {
    images: Vec<Vec<Option<String>>>,
    /// By image: each classification's value (empty for a table without conditions).
    values: Vec<Vec<Known>>,
    /// By transaction, then touched row: the row's image (`None`: deleted).
    at: Vec<Vec<Option<usize>>>,
}

impl TablePass {
    /// Transaction `t`'s touched row `r`'s image number, unless deleted.
    fn index(&self, t: usize, r: usize) -> Option<usize> {
        *self.at.get(t)?.get(r)?
    }

    fn image(&self, t: usize, r: usize) -> Option<&Vec<Option<String>>> {
        self.images.get(self.index(t, r)?)
    }

    fn value(&self, t: usize, r: usize) -> Option<&Vec<Known>> {
        self.values.get(self.index(t, r)?)
    }
}

/// Re-evaluates the rows of one classification's table that changed rows of the tables its
/// condition depends on pointed to (before) or point to (after), live, and records their
/// transitions.
struct Reevaluation<'a> {
    log: &'a Log,
    base_name: &'a TableName,
    base: &'a ClassifiedTable,
    class: &'a ClassSpec,
    /// The classification's index in `base`.
    c: usize,
    /// The transaction's own changes of `base` (its rows are judged on their images).
    base_changes: Option<&'a TableChanges>,
    /// A spilled transaction: which rows it touched is in the scratch area.
    in_scratch: bool,
}

impl<'a> Reevaluation<'a> {
    /// Whether the transaction itself changed `row` of the base table.
    fn touched(&self, row: &str) -> Result<bool, LogError> {
        if self.in_scratch {
            Ok(self
                .log
                .get_raw(&scratch_key(self.base_name, row))?
                .is_some())
        } else {
            Ok(self.base_changes.is_some_and(|c| c.index.contains_key(row)))
        }
    }

    /// `pointed`: (dependency index, the values naming base rows).
    async fn run(
        &self,
        evaluator: &mut Evaluator,
        overlay: &mut Overlay,
        pointed: &[(usize, Vec<Option<String>>)],
        groups: &mut Groups<'a>,
    ) -> Result<(), ClassifyError> {
        let mut seen = HashSet::new();
        for (d, dep) in self.class.deps.iter().enumerate() {
            let mut values: Vec<Vec<Option<String>>> = pointed
                .iter()
                .filter(|(pd, _)| *pd == d)
                .map(|(_, v)| v.clone())
                .collect();
            values.sort();
            values.dedup();
            if values.is_empty() {
                continue;
            }
            // Which base rows: found live (by the key values); evaluated on
            // their stored images, as of the stream's position.
            let rows = match pointed_rows(evaluator.client(), self.base, dep, &values).await {
                Ok(rows) => rows,
                Err(ClassifyError::Definite(m)) => {
                    tracing::error!(classification = %self.class.name, dependency = %dep.constraint, error = %m, "finding the rows a changed row points to failed; they keep their values until their next change or recheck");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut candidates = Vec::new();
            for row in rows {
                if self.touched(&row)? || !seen.insert(row.clone()) {
                    continue;
                }
                let key = state::row_key(&self.base_name.to_string(), &row);
                // Rows the stream has not seen yet are its to report.
                if let Some(record) = overlay.record(self.log, &key, &self.class.name)? {
                    candidates.push((row, key, record));
                }
            }
            if candidates.is_empty() {
                continue;
            }
            let images: Vec<Vec<Option<String>>> = candidates
                .iter()
                .map(|(_, _, record)| {
                    self.base
                        .columns
                        .iter()
                        .map(|(name, _)| record.column(name).cloned().flatten())
                        .collect()
                })
                .collect();
            let labels: Vec<String> = candidates.iter().map(|(row, _, _)| row.clone()).collect();
            let values = evaluator
                .evaluate(self.base, Some(self.c), &images, &labels)
                .await?;
            for ((row, key, mut record), value) in candidates.into_iter().zip(values) {
                let (to, known) = match value[self.c] {
                    Known::True => (Side::True, Known::True),
                    Known::False => (Side::False, Known::False),
                    Known::Unknown => continue,
                };
                let from = side_of(Some(&record));
                if from == to {
                    continue;
                }
                let row_json = serde_json::from_str(&row).unwrap_or(Value::String(row));
                add(groups, self.class, &row_json, from, to);
                record.value = known;
                overlay.set(self.log, &key, &self.class.name, Some(record))?;
            }
        }
        Ok(())
    }
}

/// [`Classifier::retype`]'s work. Only the images' casts change: dependency lookups query
/// the live table, so they keep its types.
async fn retype_tables(
    evaluator: &Evaluator,
    tables: &mut BTreeMap<TableName, ClassifiedTable>,
    retyped: &[(TableName, crate::txn::ColumnTypes)],
) -> Result<(), ClassifyError> {
    for (name, types) in retyped {
        let Some(table) = tables.get_mut(name) else {
            continue;
        };
        let (oids, modifiers): (Vec<u32>, Vec<i32>) = types.iter().flatten().copied().unzip();
        let rows = evaluator
            .client()
            .query(
                "SELECT format_type(t, m) FROM unnest($1::oid[], $2::int4[]) \
                     WITH ORDINALITY AS u(t, m, n) ORDER BY n",
                &[&oids, &modifiers],
            )
            .await
            .map_err(SourceError::from)?;
        let mut named = rows.iter().map(|row| row.get::<_, String>(0));
        for ((column, sql_type), streamed) in table.columns.iter_mut().zip(types) {
            if streamed.is_none() {
                continue;
            }
            let Some(now) = named.next() else {
                break;
            };
            if *sql_type != now {
                tracing::info!(table = %name, column = %column, from = %sql_type, to = %now, "a classified column changed type: conditions read it as its new type from here on");
                *sql_type = now;
            }
        }
    }
    Ok(())
}

/// A row's value as a transition side. A row whose condition has never evaluated cleanly
/// still has its last known value: it did not exist.
fn side_of(record: Option<&Record>) -> Side {
    side_of_value(record.map(|r| r.value))
}

fn side_of_value(value: Option<Known>) -> Side {
    match value {
        None | Some(Known::Unknown) => Side::Null,
        Some(Known::True) => Side::True,
        Some(Known::False) => Side::False,
    }
}

fn matches(wanted: Side, actual: Side) -> bool {
    wanted == Side::Any || wanted == actual
}

/// Orders a transaction's notifications: null, false, true.
fn code(side: Side) -> u8 {
    match side {
        Side::Null => 0,
        Side::False => 1,
        Side::True => 2,
        Side::Any => 3,
    }
}

fn side_json(side: Side) -> Value {
    match side {
        Side::True => Value::Bool(true),
        Side::False => Value::Bool(false),
        _ => Value::Null,
    }
}

fn decode(key: &[u8], bytes: &[u8]) -> Result<Packed, LogError> {
    Packed::decode(bytes).map_err(|reason| LogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    })
}

/// `class`'s records under `prefix` that exist as of the transactions derived so far, in
/// key order.
fn existing(
    log: &Log,
    prefix: &[u8],
    class: &str,
    overlay: &Overlay,
) -> Result<Vec<(Vec<u8>, Record)>, LogError> {
    let mut all: BTreeMap<Vec<u8>, Packed> = BTreeMap::new();
    let mut pages = |scan: &[u8], staged: bool| -> Result<(), LogError> {
        let mut from = scan.to_vec();
        loop {
            let page = log.scan_raw(scan, &from, 10_000)?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            from = last.to_vec();
            from.push(0);
            for (key, bytes) in page {
                if staged {
                    let key = key[1..].to_vec();
                    let packed = decode_staged(&key, &bytes)?;
                    all.insert(key, packed);
                } else {
                    all.insert(key.to_vec(), decode(&key, &bytes)?);
                }
            }
        }
    };
    pages(prefix, false)?;
    if overlay.staged {
        pages(&staged_key(prefix), true)?;
    }
    for (key, stored) in overlay.pending_under(prefix) {
        all.insert(key.clone(), Overlay::decoded(key, stored.as_deref())?);
    }
    for (key, touched) in &overlay.rows {
        if key.starts_with(prefix) {
            all.insert(key.clone(), touched.row.0.clone());
        }
    }
    Ok(all
        .into_iter()
        .filter_map(|(key, packed)| packed.get(class).cloned().map(|r| (key, r)))
        .collect())
}

/// State keys with their records.
type Page = Vec<(Vec<u8>, Record)>;

/// A classification's records under a table's prefix that exist as of the transactions
/// derived so far (for a TRUNCATE): all at once for an ordinary group; a page at a time for a
/// spilled transaction, whose caller writes out what each page produced (memory holds one
/// page).
struct Existing {
    prefix: Vec<u8>,
    class: String,
    from: Vec<u8>,
    done: bool,
}

impl Existing {
    /// `active`: false yields nothing (the table was not truncated).
    fn new(prefix: &[u8], class: &str, active: bool) -> Existing {
        Existing {
            prefix: prefix.to_vec(),
            class: class.to_string(),
            from: prefix.to_vec(),
            done: !active,
        }
    }

    fn next(
        &mut self,
        log: &Log,
        overlay: &Overlay,
        paged: bool,
    ) -> Result<Option<Page>, LogError> {
        if self.done {
            return Ok(None);
        }
        if !paged {
            self.done = true;
            return existing(log, &self.prefix, &self.class, overlay).map(Some);
        }
        // A spilled transaction's earlier chunks only changed rows that exist in the store
        // (its new rows come from this table's own chunks, after the TRUNCATE's), so the
        // store's keys, with the staged writes over them, are all of them. (No group is in
        // flight then: the stream settles it before a spilled transaction.)
        debug_assert!(overlay.pending.is_none());
        let page = log.scan_raw(&self.prefix, &self.from, EVALUATION_BATCH)?;
        let Some((last, _)) = page.last() else {
            self.done = true;
            return Ok(None);
        };
        self.from = last.to_vec();
        self.from.push(0);
        let mut out = Vec::with_capacity(page.len());
        for (key, bytes) in page {
            let packed = match overlay.rows.get(key.as_ref()) {
                Some(touched) => touched.row.0.clone(),
                None => match overlay.staged_row(log, &key)? {
                    Some(packed) => packed,
                    None => decode(&key, &bytes)?,
                },
            };
            if let Some(record) = packed.get(&self.class) {
                out.push((key.to_vec(), record.clone()));
            }
        }
        Ok(Some(out))
    }
}

/// The rows the transactions being derived read and wrote, as of the transactions derived
/// so far. For a spilled transaction each chunk's writes move to the staging area (`b'y'` +
/// state key), so that memory holds one chunk; the store itself changes only once the whole
/// transaction is derived (a replay after a crash must find the state from before the
/// transaction).
#[derive(Default)]
struct Overlay {
    /// By state key: the rows read or written.
    rows: FxHashMap<Vec<u8>, Touched>,
    staged: bool,
    /// The previous group's state writes, while they are being written to the log.
    pending: Option<Arc<RowWrites>>,
    /// Rows as the log holds them once `pending` is written (empty for a spilled
    /// transaction).
    cache: StateCache,
    /// Lets the write of `pending` start (sent or dropped; see [`Classifier::evaluate`]).
    release: Option<tokio::sync::oneshot::Sender<()>>,
}

/// A row the transactions being derived read or wrote.
struct Touched {
    /// Its records as of the transactions derived so far, and whether they changed them.
    row: (Packed, bool),
    /// As it was read, encoded, so that an unchanged row goes back to the cache as it is
    /// (`None` for a spilled transaction's staged row: its overlay has no cache).
    read: Option<Stored>,
}

impl Overlay {
    /// Lets the write of `pending` start, if it waits.
    fn release(&mut self) {
        if let Some(release) = self.release.take() {
            let _ = release.send(());
        }
    }

    /// The row under `key` in the staging area, if there.
    fn staged_row(&self, log: &Log, key: &[u8]) -> Result<Option<Packed>, LogError> {
        if !self.staged {
            return Ok(None);
        }
        match log.get_raw(&staged_key(key))? {
            Some(bytes) => decode_staged(key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// The row under `key` as of before the transactions being derived: the pending writes
    /// of the group before, or the store.
    fn committed(&self, log: &Log, key: &[u8]) -> Result<Packed, LogError> {
        if let Some(stored) = self.cache.get(key) {
            return Self::decoded(key, stored.as_deref());
        }
        if let Some(stored) = self.pending_row(key) {
            return Self::decoded(key, stored.as_deref());
        }
        Self::decoded(key, log.get_raw(key)?.as_deref())
    }

    /// The row under `key` in the pending writes of the group before, if there.
    fn pending_row(&self, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        let pending = self.pending.as_deref()?;
        let at = pending
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .ok()?;
        Some(&pending[at].1)
    }

    /// The pending writes of keys starting with `prefix`.
    fn pending_under<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = &'a (Vec<u8>, Option<Vec<u8>>)> + 'a {
        let pending = self.pending.as_deref().map_or(&[][..], |p| p.as_slice());
        let from = pending.partition_point(|(k, _)| k.as_slice() < prefix);
        pending[from..]
            .iter()
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// The row under `key`, read once.
    fn row(&mut self, log: &Log, key: &[u8]) -> Result<&mut (Packed, bool), LogError> {
        if !self.rows.contains_key(key) {
            let touched = match self.cache.take(key) {
                Some(read) => Touched {
                    row: (Self::decoded(key, read.as_deref())?, false),
                    read: Some(read),
                },
                None => match self.staged_row(log, key)? {
                    Some(packed) => Touched {
                        row: (packed, false),
                        read: None,
                    },
                    None => {
                        let read: Stored = match self.pending_row(key) {
                            Some(stored) => stored.as_deref().map(Box::from),
                            None => log.get_raw(key)?.map(|b| Box::from(&b[..])),
                        };
                        Touched {
                            row: (Self::decoded(key, read.as_deref())?, false),
                            read: Some(read),
                        }
                    }
                },
            };
            self.rows.insert(key.to_vec(), touched);
        }
        Ok(&mut self.rows.get_mut(key).expect("inserted above").row)
    }

    /// A row as stored (`None`: no row), decoded.
    fn decoded(key: &[u8], stored: Option<&[u8]>) -> Result<Packed, LogError> {
        match stored {
            Some(bytes) => decode(key, bytes),
            None => Ok(Packed::default()),
        }
    }

    /// A row known not to exist before the transactions being derived, unless one of them
    /// wrote it already.
    fn absent(&mut self, key: Vec<u8>) {
        self.rows.entry(key).or_insert_with(|| Touched {
            row: (Packed::default(), false),
            read: Some(None),
        });
    }

    /// `class`'s record of the row under `key`.
    fn record(&mut self, log: &Log, key: &[u8], class: &str) -> Result<Option<Record>, LogError> {
        Ok(self.row(log, key)?.0.get(class).cloned())
    }

    /// Sets (or with `None` removes) `class`'s record of the row under `key`.
    fn set(
        &mut self,
        log: &Log,
        key: &[u8],
        class: &str,
        record: Option<Record>,
    ) -> Result<(), LogError> {
        let (packed, changed) = self.row(log, key)?;
        packed.set(class, record);
        *changed = true;
        Ok(())
    }

    /// The changed rows as state writes, in key order, and the cache with every row read
    /// or written put back.
    fn finish(self) -> (RowWrites, StateCache) {
        let mut cache = self.cache;
        let mut writes = Vec::new();
        for (key, touched) in self.rows {
            let (packed, changed) = touched.row;
            if changed {
                let stored = packed.stored();
                cache.put(key.clone(), stored.as_deref().map(Box::from));
                writes.push((key, stored));
            } else if let Some(read) = touched.read {
                cache.put(key, read);
            }
        }
        writes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        (writes, cache)
    }

    /// Moves the changed rows to the staging area (and forgets the rest).
    fn stage(&mut self, log: &Log) -> Result<(), LogError> {
        let entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = self
            .rows
            .drain()
            .filter(|(_, touched)| touched.row.1)
            .map(|(key, touched)| {
                let packed = touched.row.0;
                let mut value = vec![u8::from(!packed.is_empty())];
                if !packed.is_empty() {
                    value.extend(packed.encode());
                }
                (staged_key(&key), Some(value))
            })
            .collect();
        log.write_bulk(&entries)
    }
}

/// The staging area: a spilled transaction's state writes (`[1]` + record, `[0]` removal).
const STAGED: u8 = b'y';
/// The scratch area: a spilled transaction's touched rows, by table and row.
const SCRATCH: u8 = b'x';
/// Marks a spilled transaction whose staged state is being made current: its position.
const APPLYING: &[u8] = b"mapplying";
/// Marks the transaction being spilled (its commit LSN), until its position is written.
const SPILLING: &[u8] = b"mspilling";

fn staged_key(key: &[u8]) -> Vec<u8> {
    let mut staged = Vec::with_capacity(key.len() + 1);
    staged.push(STAGED);
    staged.extend_from_slice(key);
    staged
}

/// A staged row: `[1]` + its records, or `[0]` when none is left.
fn decode_staged(key: &[u8], bytes: &[u8]) -> Result<Packed, LogError> {
    match bytes.split_first() {
        Some((1, packed)) => decode(key, packed),
        _ => Ok(Packed::default()),
    }
}

fn scratch_prefix(table: &TableName) -> Vec<u8> {
    let mut key = vec![SCRATCH];
    key.extend_from_slice(table.to_string().as_bytes());
    key.push(0);
    key
}

fn scratch_key(table: &TableName, row: &str) -> Vec<u8> {
    let mut key = scratch_prefix(table);
    key.extend_from_slice(row.as_bytes());
    key
}

/// A spilled row change: `[0]` deleted (`[3]` deleted after an update), or `[1]` (`[2]`
/// updated; `[4]` + length + old key: moved there by a key update, with unchanged values
/// still to take from the old key's row) and per cell `0` null, `1` + length + text, `2`
/// unchanged.
fn encode_change(after: &Option<Vec<Cell>>, updated: bool, moved_from: Option<&str>) -> Vec<u8> {
    let Some(cells) = after else {
        return vec![if updated { 3 } else { 0 }];
    };
    let mut out = match moved_from {
        Some(from) => {
            let mut out = vec![4];
            out.extend_from_slice(&(from.len() as u32).to_be_bytes());
            out.extend_from_slice(from.as_bytes());
            out
        }
        None => vec![if updated { 2 } else { 1 }],
    };
    for cell in cells {
        match cell {
            Cell::Null => out.push(0),
            Cell::Text(t) => {
                out.push(1);
                out.extend_from_slice(&(t.len() as u32).to_be_bytes());
                out.extend_from_slice(t.as_bytes());
            }
            Cell::Unchanged => out.push(2),
        }
    }
    out
}

/// A spilled row change: its image (`None`: deleted), whether an UPDATE touched it, and the
/// key it was moved from (see [`encode_change`]).
type SpilledChange = (Option<Vec<Cell>>, bool, Option<String>);

fn decode_change(bytes: &[u8]) -> Result<SpilledChange, String> {
    let Some((&tag, mut rest)) = bytes.split_first() else {
        return Err("empty change".into());
    };
    let updated = tag >= 2;
    if tag == 0 || tag == 3 {
        return Ok((None, updated, None));
    }
    let moved_from = if tag == 4 {
        let (from, tail) = take_text(rest)?;
        rest = tail;
        Some(from)
    } else {
        None
    };
    let mut cells = Vec::new();
    while let Some((&kind, tail)) = rest.split_first() {
        rest = tail;
        cells.push(match kind {
            0 => Cell::Null,
            2 => Cell::Unchanged,
            1 => {
                let (text, tail) = take_text(rest)?;
                rest = tail;
                Cell::Text(text)
            }
            other => return Err(format!("unknown cell tag {other}")),
        });
    }
    Ok((Some(cells), updated, moved_from))
}

/// A 4-byte big-endian length and that many bytes of text, and what follows.
fn take_text(bytes: &[u8]) -> Result<(String, &[u8]), String> {
    if bytes.len() < 4 {
        return Err("truncated change".into());
    }
    let (len, tail) = bytes.split_at(4);
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if tail.len() < len {
        return Err("truncated change".into());
    }
    let (text, tail) = tail.split_at(len);
    Ok((String::from_utf8_lossy(text).into_owned(), tail))
}

/// Spills a huge transaction's touched rows out of memory into the scratch area. A row
/// already there keeps its earlier cells where the new image has unchanged TOAST values.
/// `first`: the transaction's first spill (clears what an interrupted earlier pass left in
/// the scratch and staging areas). `truncations` tracks the TRUNCATEs already applied.
pub fn spill(
    log: &Log,
    changes: TxnChanges,
    first: bool,
    changes_lsn: Option<u64>,
    truncations: &mut HashMap<TableName, u32>,
) -> Result<(), LogError> {
    if first {
        log.remove_prefix(&[SCRATCH])?;
        log.remove_prefix(&[STAGED])?;
        truncations.clear();
        if let Some(lsn) = changes_lsn {
            log.write_raw(&[(SPILLING.to_vec(), Some(lsn.to_be_bytes().to_vec()))])?;
        }
    }
    for (table, changes) in changes.tables {
        let seen = truncations.entry(table.clone()).or_insert(0);
        if changes.truncations > *seen {
            // Rows spilled before the TRUNCATE are gone with it.
            log.remove_prefix(&scratch_prefix(&table))?;
            *seen = changes.truncations;
        }
        let mut entries = Vec::with_capacity(changes.rows.len());
        for (row, change) in changes.rows {
            let key = scratch_key(&table, &row);
            let mut after = change.after;
            let mut updated = change.updated;
            let mut moved_from = change.moved_from;
            // Unchanged values come from the row's earlier image, or, for a row moved here
            // by a key update, from the old key's (both may be in the scratch area from an
            // earlier spill of this transaction: nothing is written before the loop ends).
            let mut earlier_keys = vec![key.clone()];
            if let Some(from) = &moved_from {
                earlier_keys.push(scratch_key(&table, from));
            }
            for (i, earlier_key) in earlier_keys.iter().enumerate() {
                let Some(bytes) = log.get_raw(earlier_key)? else {
                    continue;
                };
                let Ok((earlier, earlier_updated, earlier_moved)) = decode_change(&bytes) else {
                    continue;
                };
                if i == 0 {
                    updated |= earlier_updated;
                    moved_from = moved_from.or(earlier_moved);
                } else if earlier_moved.is_some() {
                    // The old key was itself moved: what it still lacks is its origin's.
                    moved_from = earlier_moved;
                }
                if let (Some(cells), Some(earlier)) = (&mut after, earlier) {
                    for (cell, old) in cells.iter_mut().zip(earlier) {
                        if *cell == Cell::Unchanged {
                            *cell = old;
                        }
                    }
                }
            }
            if !after
                .as_ref()
                .is_some_and(|cells| cells.contains(&Cell::Unchanged))
            {
                moved_from = None;
            }
            entries.push((
                key,
                Some(encode_change(&after, updated, moved_from.as_deref())),
            ));
        }
        log.write_bulk(&entries)?;
    }
    Ok(())
}

/// Makes a spilled transaction's staged state current and writes its position: first a
/// marker holding the position (a crash from here on is finished at the next start by
/// [`finish_applying`]), then the staged records in batches, then the position together
/// with the marker's removal.
pub fn apply_staged(log: &Log, position: crate::log::Position) -> Result<(), LogError> {
    log.write_raw(&[(
        APPLYING.to_vec(),
        Some(serde_json::to_vec(&position).unwrap_or_default()),
    )])?;
    finish_applying(log)?;
    Ok(())
}

/// Finishes making a spilled transaction's staged state current, if a crash interrupted
/// it. Returns whether there was one.
pub fn finish_applying(log: &Log) -> Result<bool, LogError> {
    let Some(bytes) = log.get_raw(APPLYING)? else {
        return Ok(false);
    };
    let position: crate::log::Position =
        serde_json::from_slice(&bytes).map_err(|e| LogError::Corrupt {
            key: "mapplying".into(),
            reason: e.to_string(),
        })?;
    let prefix = [STAGED];
    loop {
        let page = log.scan_raw(&prefix, &prefix, 10_000)?;
        if page.is_empty() {
            break;
        }
        let mut entries = Vec::with_capacity(page.len() * 2);
        for (key, bytes) in &page {
            let value = match bytes.split_first() {
                Some((1, record)) => Some(record.to_vec()),
                _ => None,
            };
            // A pair: the record made current and its staged copy removed, together.
            entries.push((key[1..].to_vec(), value));
            entries.push((key.to_vec(), None));
        }
        log.write_bulk(&entries)?;
    }
    log.remove_prefix(&[SCRATCH])?;
    log.append_with_state(
        &[],
        &[(APPLYING.to_vec(), None), (SPILLING.to_vec(), None)],
        Some(position),
        crate::log::now_ms(),
    )?;
    Ok(true)
}

/// The transaction a pass spilled and did not finish (its commit LSN), if any: a later pass
/// over it that does not spill must drop what that pass wrote.
pub fn spilled_at(log: &Log) -> Result<Option<u64>, LogError> {
    Ok(log
        .get_raw(SPILLING)?
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map(u64::from_be_bytes))
}

pub fn forget_spilled(log: &Log) -> Result<(), LogError> {
    log.write_raw(&[(SPILLING.to_vec(), None)])
}

/// `cells` with unchanged TOAST values filled in: from the row's previous image in the group,
/// else from the state store (any classification of the table that keeps the column and
/// is maintained at this transaction). A value found nowhere is not read by any condition.
fn fill(
    table: &ClassifiedTable,
    key: &str,
    cells: &[Cell],
    previous: Option<&Vec<Option<String>>>,
    txn: &StagedTxn,
    log: &Log,
    overlay: &Overlay,
) -> Result<Vec<Option<String>>, LogError> {
    let mut records: Option<Vec<Record>> = None;
    let mut out = Vec::with_capacity(cells.len());
    for (i, cell) in cells.iter().enumerate() {
        out.push(match cell {
            Cell::Null => None,
            Cell::Text(t) => Some(t.clone()),
            Cell::Unchanged => {
                if let Some(prev) = previous {
                    prev.get(i).cloned().flatten()
                } else {
                    if records.is_none() {
                        let k = state::row_key(&table.table.to_string(), key);
                        let packed = overlay.committed(log, &k)?;
                        let found = table
                            .classes
                            .iter()
                            .filter(|class| txn.ctx.lsn >= class.active_from)
                            .filter_map(|class| packed.get(&class.name).cloned())
                            .collect();
                        records = Some(found);
                    }
                    let name = &table.columns[i].0;
                    records
                        .iter()
                        .flatten()
                        .find_map(|r| r.column(name).cloned())
                        .flatten()
                }
            }
        });
    }
    Ok(out)
}

/// Where each column `class` keeps is in the table's images.
fn class_positions(table: &ClassifiedTable, class: &ClassSpec) -> Vec<Option<usize>> {
    class
        .columns
        .iter()
        .map(|name| table.columns.iter().position(|(n, _)| n == name))
        .collect()
}

/// Whether `record` holds the columns `class` keeps (at `positions`, see
/// [`class_positions`]) with the values of `image`: what [`class_columns`] would make.
fn same_columns(
    record: &Record,
    class: &ClassSpec,
    positions: &[Option<usize>],
    image: Option<&Vec<Option<String>>>,
) -> bool {
    record.columns.len() == class.columns.len()
        && record
            .columns
            .iter()
            .zip(class.columns.iter().zip(positions))
            .all(|((name, value), (wanted, at))| {
                name == wanted && value.as_deref() == image_value(image, *at)
            })
}

/// The columns `class` keeps, from a filled image of the table's columns.
fn class_columns(
    table: &ClassifiedTable,
    class: &ClassSpec,
    image: Option<&Vec<Option<String>>>,
) -> Vec<(String, Option<String>)> {
    columns_at(class, &class_positions(table, class), image)
}

/// [`class_columns`], with the columns' `positions` known.
fn columns_at(
    class: &ClassSpec,
    positions: &[Option<usize>],
    image: Option<&Vec<Option<String>>>,
) -> Vec<(String, Option<String>)> {
    class
        .columns
        .iter()
        .zip(positions)
        .map(|(name, at)| (name.clone(), image_value(image, *at).map(str::to_string)))
        .collect()
}

/// The value at `at` (a position from [`class_positions`]) of a filled image, if any.
fn image_value(image: Option<&Vec<Option<String>>>, at: Option<usize>) -> Option<&str> {
    at.and_then(|at| image.and_then(|i| i.get(at)))
        .and_then(|v| v.as_deref())
}

#[derive(Serialize)]
struct Body<'a> {
    hook_id: &'a str,
    event: &'a str,
    table: String,
    op: &'static str,
    rows: &'a [Value],
    lsn: &'a str,
    committed_at: &'a str,
    classification: &'a str,
    transition: Transition,
    /// Found by a periodic recheck, not by a transaction's own changes.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    recheck: bool,
}

/// A `columns` event's update: the same body as any mutation notification.
#[derive(Serialize)]
struct UpdateBody<'a> {
    hook_id: &'a str,
    event: &'a str,
    table: String,
    op: &'static str,
    rows: &'a [Value],
    lsn: &'a str,
    committed_at: &'a str,
}

/// The group key of a `columns` event's updates (transitions use 0..=2).
const UPDATE: u8 = 9;

#[derive(Serialize)]
struct Transition {
    from: Value,
    to: Value,
}

type Groups<'a> = BTreeMap<(usize, u8, u8), (Vec<Value>, &'a ClassSpec, &'a TransitionSub)>;

/// One transaction's notifications: per (webhook, actual from, actual to), at most
/// `max_rows` rows each; ordinals count per webhook from 0.
fn emit(
    ctx: &TxnContext,
    groups: Groups<'_>,
    ordinals: &mut HashMap<String, u32>,
    first: u32,
    recheck: bool,
) -> Vec<NewNotification> {
    let mut out = Vec::new();
    let decode_side = |c: u8| match c {
        0 => Side::Null,
        1 => Side::False,
        _ => Side::True,
    };
    for ((_, from, to), (rows, class, sub)) in groups {
        for chunk in rows.chunks(sub.max_rows.max(1)) {
            let ordinal = ordinals.entry(sub.hook_id.clone()).or_insert(first);
            if class.watch {
                let body = UpdateBody {
                    hook_id: &sub.hook_id,
                    event: &sub.event,
                    table: class.table.to_string(),
                    op: "update",
                    rows: chunk,
                    lsn: &ctx.lsn_text,
                    committed_at: &ctx.committed_at,
                };
                out.push(numbered(ctx, &sub.hook_id, ordinal, &body));
                continue;
            }
            let body = Body {
                hook_id: &sub.hook_id,
                event: &sub.event,
                table: class.table.to_string(),
                op: "transition",
                rows: chunk,
                lsn: &ctx.lsn_text,
                committed_at: &ctx.committed_at,
                classification: &class.name,
                transition: Transition {
                    from: side_json(decode_side(from)),
                    to: side_json(decode_side(to)),
                },
                recheck,
            };
            out.push(numbered(ctx, &sub.hook_id, ordinal, &body));
        }
    }
    out
}

/// Recheck notifications take ordinals from here on, after any transaction's own.
const RECHECK_ORDINALS: u32 = 1 << 31;
/// The last transaction a recheck was numbered after, and the next ordinal offset to use.
const RECHECK_COUNTER: &[u8] = b"mrecheck";

/// A row whose value now differs from its stored one: (row, state key, stored record,
/// from, to).
type LiveChange = (Value, Vec<u8>, Record, Side, Side);

/// Evaluates `class` (index `index` of `table`) again on every row's stored image, in
/// pages, and returns the rows whose value differs from the stored one. The row's own
/// columns are as of the stream's position (so a recheck never races the stream); `now()`
/// and other tables are read as they are now. A row whose condition fails keeps its value.
async fn stored_values(
    evaluator: &mut Evaluator,
    table: &ClassifiedTable,
    index: usize,
    log: &Log,
) -> Result<Vec<LiveChange>, ClassifyError> {
    let class = &table.classes[index];
    let prefix = state::table_prefix(&table.table.to_string());
    let mut from = prefix.clone();
    let mut changed = Vec::new();
    loop {
        let page = log.scan_raw(&prefix, &from, EVALUATION_BATCH)?;
        let Some((last, _)) = page.last() else {
            return Ok(changed);
        };
        from = last.to_vec();
        from.push(0);
        let mut records = Vec::with_capacity(page.len());
        let mut images = Vec::with_capacity(page.len());
        let mut labels = Vec::with_capacity(page.len());
        for (key, bytes) in &page {
            let Some(row) = state::row_of(&prefix, key) else {
                continue;
            };
            let Some(record) = decode(key, bytes)?.get(&class.name).cloned() else {
                continue;
            };
            images.push(
                table
                    .columns
                    .iter()
                    .map(|(name, _)| record.column(name).cloned().flatten())
                    .collect::<Vec<_>>(),
            );
            labels.push(row);
            records.push((key.to_vec(), record));
        }
        if images.is_empty() {
            continue;
        }
        let values = evaluator
            .evaluate(table, Some(index), &images, &labels)
            .await?;
        for (((key, record), row), value) in records.into_iter().zip(labels).zip(values) {
            let to = match value[index] {
                Known::True => Side::True,
                Known::False => Side::False,
                Known::Unknown => continue,
            };
            let from = side_of(Some(&record));
            if from != to {
                let row_json = serde_json::from_str(&row).unwrap_or(Value::String(row));
                changed.push((row_json, key, record, from, to));
            }
        }
    }
}

/// The primary key's JSON text, as the stream names the row: a scalar for a one-column key,
/// an object in key order for a composite one. `get(i)` is key column `i`'s text.
pub fn key_text<'a>(key: &[KeyColumn], get: impl Fn(usize) -> Option<&'a str>) -> String {
    let value = |i: usize| crate::txn::key_json(get(i).unwrap_or("").as_bytes(), key[i].type_oid);
    if key.len() == 1 {
        return value(0).to_string();
    }
    let mut object = serde_json::Map::with_capacity(key.len());
    for (i, column) in key.iter().enumerate() {
        object.insert(column.name.clone(), value(i));
    }
    Value::Object(object).to_string()
}

/// Adds a row's transition to the groups of every webhook that wants it.
fn add<'a>(groups: &mut Groups<'a>, class: &'a ClassSpec, row: &Value, from: Side, to: Side) {
    if from == to {
        return;
    }
    for sub in &class.subs {
        if matches(sub.from, from) && matches(sub.to, to) {
            groups
                .entry((sub.webhook, code(from), code(to)))
                .or_insert_with(|| (Vec::new(), class, sub))
                .0
                .push(row.clone());
        }
    }
}

/// The base rows (key JSON text) whose `dep.base` columns hold one of `values`, in the live
/// table.
async fn pointed_rows(
    client: &tokio_postgres::Client,
    table: &ClassifiedTable,
    dep: &Dependency,
    values: &[Vec<Option<String>>],
) -> Result<Vec<String>, ClassifyError> {
    use crate::config::quote_ident;
    // The type's output text, as the stream sees keys (not `::text`, which differs for
    // char(n), boolean, inet, ...).
    let keys: Vec<String> = table
        .key
        .iter()
        .map(|k| format!("format('%s', {})", quote_ident(&k.name)))
        .collect();
    let columns: Vec<String> = dep.base.iter().map(|(name, _)| quote_ident(name)).collect();
    let arrays: Vec<String> = dep
        .base
        .iter()
        .enumerate()
        .map(|(i, (_, sql_type))| format!("${}::text[]::{sql_type}[]", i + 1))
        .collect();
    let sql = format!(
        "SELECT {} FROM {} WHERE ({}) IN (SELECT * FROM unnest({}))",
        keys.join(", "),
        table.table.quoted(),
        columns.join(", "),
        arrays.join(", ")
    );
    let params: Vec<Vec<Option<&str>>> = (0..dep.base.len())
        .map(|i| {
            values
                .iter()
                .map(|v| v.get(i).and_then(|x| x.as_deref()))
                .collect()
        })
        .collect();
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    let rows = client.query(&sql, &refs).await.map_err(|e| {
        let message = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string());
        match SourceError::from(e) {
            SourceError::Transient(m) => ClassifyError::Transient(m),
            SourceError::Definite(_) => ClassifyError::Definite(message),
        }
    })?;
    let n = table.key.len();
    Ok(rows
        .iter()
        .map(|row| {
            let texts: Vec<Option<String>> = (0..n).map(|i| row.get(i)).collect();
            key_text(&table.key, |i| texts[i].as_deref())
        })
        .collect())
}

/// The links of one transaction per (webhook, op): (row, related), in order.
type Links<'a> = BTreeMap<
    (usize, RelOp),
    (
        Vec<(Value, Option<Value>)>,
        &'a ClassSpec,
        &'a TransitionSub,
    ),
>;

/// One end of a link held by a watched row (`row` its key) with state `record`; `None`
/// when a foreign key column is NULL (no link).
fn end_of(end: &End, row: &Value, record: &Record) -> Option<Value> {
    match end {
        End::Own => Some(row.clone()),
        End::Points { columns, key } => {
            let values: Vec<Option<&str>> = columns
                .iter()
                .map(|c| record.column(c).and_then(|v| v.as_deref()))
                .collect();
            if values.iter().any(Option::is_none) {
                return None;
            }
            serde_json::from_str(&key_text(key, |i| values[i])).ok()
        }
    }
}

/// Adds a link (or, for related_change, a row once) for every webhook of the relation
/// event that wants `op`.
fn add_link<'a>(
    links: &mut Links<'a>,
    class: &'a ClassSpec,
    op: RelOp,
    row: &Value,
    related: Option<&Value>,
) {
    let Some(plan) = &class.relation else {
        return;
    };
    if !plan.ops.contains(&op) {
        return;
    }
    for sub in &class.subs {
        let entry = links
            .entry((sub.webhook, op))
            .or_insert_with(|| (Vec::new(), class, sub));
        let link = (row.clone(), related.cloned());
        // related_change lists each row once; a link is added or removed once per
        // transaction anyway.
        if op == RelOp::RelatedChange && entry.0.contains(&link) {
            continue;
        }
        entry.0.push(link);
    }
}

#[derive(Serialize)]
struct RelationBody<'a> {
    hook_id: &'a str,
    event: &'a str,
    table: String,
    op: &'static str,
    relation: &'a str,
    rows: Vec<&'a Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    links: Vec<LinkJson<'a>>,
    lsn: &'a str,
    committed_at: &'a str,
}

#[derive(Serialize)]
struct LinkJson<'a> {
    row: &'a Value,
    related: &'a Value,
}

/// One transaction's relation notifications: per (webhook, op), at most `max_rows` links
/// (rows for related_change) each, numbered after the webhook's other notifications.
fn emit_links(
    ctx: &TxnContext,
    links: Links<'_>,
    ordinals: &mut HashMap<String, u32>,
) -> Vec<NewNotification> {
    let mut out = Vec::new();
    for ((_, op), (all, class, sub)) in links {
        let Some(plan) = &class.relation else {
            continue;
        };
        for chunk in all.chunks(sub.max_rows.max(1)) {
            let mut rows: Vec<&Value> = Vec::new();
            for (row, _) in chunk {
                if !rows.contains(&row) {
                    rows.push(row);
                }
            }
            let body = RelationBody {
                hook_id: &sub.hook_id,
                event: &sub.event,
                table: plan.table.to_string(),
                op: op.as_str(),
                relation: &plan.name,
                rows,
                links: chunk
                    .iter()
                    .filter_map(|(row, related)| {
                        related.as_ref().map(|related| LinkJson { row, related })
                    })
                    .collect(),
                lsn: &ctx.lsn_text,
                committed_at: &ctx.committed_at,
            };
            let ordinal = ordinals.entry(sub.hook_id.clone()).or_insert(0);
            out.push(numbered(ctx, &sub.hook_id, ordinal, &body));
        }
    }
    out
}

/// `hook`'s next notification of the transaction: numbered `ordinal`, which moves on.
fn numbered(
    ctx: &TxnContext,
    hook: &str,
    ordinal: &mut u32,
    body: &impl Serialize,
) -> NewNotification {
    let notification = NewNotification {
        key: NotificationKey {
            hook: hook.to_string(),
            lsn: ctx.lsn,
            ordinal: *ordinal,
        },
        // Serializing strings and JSON values cannot fail.
        body: serde_json::to_vec(body).unwrap_or_default(),
    };
    *ordinal += 1;
    notification
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(value: &str) -> Stored {
        let mut packed = Packed::default();
        packed.set(
            "c",
            Some(Record {
                value: Known::True,
                lsn: 1,
                columns: vec![("status".into(), Some(value.into()))],
            }),
        );
        packed.stored().map(Vec::into_boxed_slice)
    }

    #[test]
    fn the_state_cache_stays_within_its_budget_and_hands_rows_out_once() {
        let one = StateCache::weight(2, &row("active"));
        let mut cache = StateCache::new(one * 100);
        for i in 0..1000 {
            cache.put(format!("t{i}").into_bytes(), row("active"));
            assert!(cache.bytes <= one * 100, "{} after {i}", cache.bytes);
        }
        assert!(cache.rows.len() >= 75, "{} rows left", cache.rows.len());
        let sum: usize = cache
            .rows
            .iter()
            .map(|(k, p)| StateCache::weight(k.len(), p))
            .sum();
        assert_eq!(cache.bytes, sum);
        // A taken row is the caller's until it is put back.
        let key = cache.rows.keys().next().cloned().expect("a row");
        assert_eq!(cache.take(&key), Some(row("active")));
        assert_eq!(cache.take(&key), None);
        // A row known not to exist is kept as such, and a row put again replaces it.
        cache.put(key.clone(), None);
        assert_eq!(cache.get(&key), Some(&None));
        let bytes = cache.bytes;
        cache.put(key.clone(), row("gone"));
        assert_eq!(cache.bytes, bytes + row("gone").map_or(0, |b| b.len()));
        let decoded = Packed::decode(cache.get(&key).cloned().flatten().as_deref().unwrap_or(&[]));
        assert_eq!(
            decoded
                .ok()
                .as_ref()
                .and_then(|p| p.get("c"))
                .map(|r| r.columns.clone()),
            Some(vec![("status".to_string(), Some("gone".to_string()))])
        );
        cache.clear();
        assert_eq!((cache.rows.len(), cache.bytes), (0, 0));
        let mut off = StateCache::new(0);
        off.put(key.clone(), row("x"));
        assert!(off.get(&key).is_none());
    }

    #[test]
    fn the_state_cache_fills_from_the_store_up_to_three_quarters_of_its_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path()).expect("open");
        let a = state::table_prefix("public.a");
        let b = state::table_prefix("public.b");
        let key =
            |prefix: &[u8], i: usize| [prefix, format!("{{\"id\":{i:03}}}").as_bytes()].concat();
        let mut writes: StateWrites = (0..100)
            .map(|i| (key(&a, i), row("a").map(Vec::from)))
            .collect();
        writes.extend((0..100).map(|i| (key(&b, i), row("b").map(Vec::from))));
        // Not a row of either table: never read in.
        writes.push((state::meta_key("c"), Some(b"meta".to_vec())));
        log.write_raw(&writes).expect("write");
        let one = StateCache::weight(key(&a, 0).len(), &row("a"));

        let mut cache = StateCache::new(one * 400);
        assert_eq!(
            cache.warm(&log, &[a.clone(), b.clone()]).expect("warm"),
            200
        );
        assert_eq!(cache.get(&key(&b, 99)), Some(&row("b")));
        assert!(cache.get(&state::meta_key("c")).is_none());

        // A budget for 100 rows takes the first 75 in key order, and leaves room.
        let mut cache = StateCache::new(one * 100);
        assert_eq!(cache.warm(&log, &[a.clone(), b.clone()]).expect("warm"), 75);
        assert_eq!(cache.get(&key(&a, 74)), Some(&row("a")));
        assert!(cache.get(&key(&a, 75)).is_none());
        assert!(cache.bytes <= one * 75, "{}", cache.bytes);
    }

    #[test]
    fn spilled_changes_round_trip_with_their_origin() {
        let cells = vec![Cell::Null, Cell::Text("é\0x".into()), Cell::Unchanged];
        let cases: Vec<SpilledChange> = vec![
            (None, false, None),
            (None, true, None),
            (Some(cells.clone()), false, None),
            (Some(cells.clone()), true, None),
            (Some(cells.clone()), true, Some("{\"id\":1}".into())),
            (Some(Vec::new()), true, Some(String::new())),
        ];
        for (after, updated, moved_from) in cases {
            let bytes = encode_change(&after, updated, moved_from.as_deref());
            let decoded = decode_change(&bytes).expect("decodes");
            // A moved row is an updated one.
            let expected = (
                after.clone(),
                updated || moved_from.is_some(),
                moved_from.clone(),
            );
            assert_eq!(decoded, expected, "{bytes:?}");
            // Cut anywhere inside a length-prefixed part, it is an error, never a panic.
            for cut in 1..bytes.len() {
                let _ = decode_change(&bytes[..cut]);
            }
        }
        assert!(decode_change(&[4, 0, 0, 0, 9, b'x']).is_err());
    }
}
