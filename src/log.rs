//! The durable delivery log, in sled.
//!
//! Everything lives in one sled tree so that a transaction's notifications, their delivery
//! state and the stream position are written by one atomic batch. Keys start with a kind
//! byte, then the webhook id, a NUL, the transaction's commit LSN and the notification's
//! ordinal within (transaction, webhook), all big-endian so that a webhook's entries sort in
//! commit order:
//!
//! ```text
//! b'p' hook \0 lsn ordinal            → pending or dead: Status (attempts so far, next due
//!                                        time), then the body (the exact HTTP body)
//! b'd' hook \0 lsn ordinal            → delivered: at (ms since the Unix epoch), the
//!                                        successful attempt, then the body
//! b'a' hook \0 lsn ordinal attempt    → Attempt record (a delivered entry holds its own
//!                                        successful attempt instead)
//! b'm' "position"                     → commit LSN and end LSN of the last logged transaction
//! b'm' "layout"                       → this layout's version (3; the first had none)
//! b'm' "origin", "recheck", "applying", "spilling" → the database and slot; recheck
//!                                        numbering; a spilled transaction's progress
//! b't' ..., b'c' ..., b'q' ...          → the row state store (see `crate::state`)
//! b'x' ..., b'y' ...                    → a spilled transaction's scratch and staging areas
//!                                        (see `crate::derive::classification`)
//! ```
//!
//! One entry per notification, moved from `p` to `d` when delivered: each sled entry costs
//! a tree insert, and at thousands of notifications a second these inserts are most of the
//! stream's work. (The first layout kept the body apart under `b'n'`; [`Log::open`]
//! converts it.) A `p` value is a 4-byte big-endian length, that many bytes of Status JSON,
//! then the body; a `d` value is 8 bytes of big-endian milliseconds (the top bit set when
//! the successful attempt follows: a 4-byte length and its JSON; layout 2 had none), then
//! the body.
//!
//! Progress invariant: the position key is written in the same batch as the last
//! notifications of its transaction, and the replication slot is acknowledged only after a
//! flush that covers that batch. A key is therefore a pure function of the WAL (commit LSN,
//! ordinal), so replaying a transaction writes the same keys again.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The first layout's separate bodies (converted at open).
const NOTIFICATION: u8 = b'n';
const PENDING: u8 = b'p';
const DELIVERED: u8 = b'd';
const ATTEMPT: u8 = b'a';
const POSITION: &[u8] = b"mposition";
const ORIGIN: &[u8] = b"morigin";
/// The layout this version writes (the first had no such key); a newer one is refused.
const LAYOUT: &[u8] = b"mlayout";
/// 2: one entry per notification; 3: a delivered entry may hold its successful attempt
/// (see [`delivered_value`]), which layout 2 cannot read. A layout 2 log is read as is.
const LAYOUT_VERSION: u8 = 3;
/// Lets sled's epoch-based reclamation catch up after a batch of `writes` entries: every
/// write leaves the page it replaced (or more) for later, and crossbeam-epoch, which sled
/// uses, frees at most 8 bags of 64 such leftovers per collection, run every 128th pin. One
/// batch defers more than thousands of later reads collect, and without this a baseline held
/// 3 GB of dead pages at 1,000,000 rows in a test program (2,000 writes per batch); each
/// `flush` here collects (up to 512 leftovers) and tries to advance the epoch.
fn reclaim(writes: usize) {
    if writes < BULK_CHUNK {
        return;
    }
    for _ in 0..writes / 256 + 2 {
        crossbeam_epoch::pin().flush();
    }
}

/// Entries per batch of a bulk write. sled frees the pages a write replaces only as later
/// operations go by (epoch-based reclamation, a little per operation), so one batch of
/// thousands of writes leaves thousands of dead pages behind at once: a baseline written in
/// batches of 2,000 rows held 477 MB at 1,000,000 rows. Small batches keep that in step.
const BULK_CHUNK: usize = 128;
/// sled's page cache.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Why the log could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "data dir {dir} is in use by another walhook process (sled holds an exclusive lock); stop that process or use another --data-dir"
    )]
    Locked { dir: String },
    #[error("delivery log in {dir}: {source}")]
    Open { dir: String, source: sled::Error },
    #[error("delivery log: {0}")]
    Sled(#[from] sled::Error),
    #[error("delivery log: cannot sync to disk: {0}")]
    Sync(std::io::Error),
    #[error("delivery log holds a corrupt entry under key {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "data dir {dir} was written by a newer walhook (log layout {found}, this one knows up to {LAYOUT_VERSION}); run that version, or start with an empty --data-dir"
    )]
    Layout { dir: String, found: String },
}

/// Identifies one notification: the webhook, the commit LSN of its transaction, and its
/// ordinal among that webhook's notifications of the transaction. Its text form is the
/// `webhook-id` header: `crm-sync_00000000016B3748_0`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NotificationKey {
    pub hook: String,
    pub lsn: u64,
    pub ordinal: u32,
}

impl NotificationKey {
    fn encode(&self, kind: u8) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.hook.len() + 14);
        key.push(kind);
        key.extend_from_slice(self.hook.as_bytes());
        key.push(0);
        key.extend_from_slice(&self.lsn.to_be_bytes());
        key.extend_from_slice(&self.ordinal.to_be_bytes());
        key
    }

    fn attempt_key(&self, attempt: u32) -> Vec<u8> {
        let mut key = self.encode(ATTEMPT);
        key.extend_from_slice(&attempt.to_be_bytes());
        key
    }

    /// Decodes a key written by [`encode`](Self::encode) (any kind byte).
    fn decode(key: &[u8]) -> Option<NotificationKey> {
        let rest = key.get(1..)?;
        let nul = rest.iter().position(|b| *b == 0)?;
        let hook = std::str::from_utf8(&rest[..nul]).ok()?.to_string();
        let tail = rest.get(nul + 1..nul + 13)?;
        let lsn = u64::from_be_bytes(tail[..8].try_into().ok()?);
        let ordinal = u32::from_be_bytes(tail[8..12].try_into().ok()?);
        Some(NotificationKey { hook, lsn, ordinal })
    }

    /// Parses the `webhook-id` form back into a key.
    pub fn parse(id: &str) -> Option<NotificationKey> {
        let mut parts = id.rsplitn(3, '_');
        let ordinal = parts.next()?.parse().ok()?;
        let lsn_hex = parts.next()?;
        let hook = parts.next()?;
        if hook.is_empty() || lsn_hex.len() != 16 {
            return None;
        }
        let lsn = u64::from_str_radix(lsn_hex, 16).ok()?;
        Some(NotificationKey {
            hook: hook.to_string(),
            lsn,
            ordinal,
        })
    }
}

impl fmt::Display for NotificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{:016X}_{}", self.hook, self.lsn, self.ordinal)
    }
}

/// Where the log stands in the WAL: the last transaction it holds completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Position {
    pub commit_lsn: u64,
    pub end_lsn: u64,
}

/// Delivery state of a notification that is not delivered yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Attempts made so far, over all rounds (attempt records are numbered 1..=attempts).
    pub attempts: u32,
    /// Failed attempts in the current round; the retry schedule counts these. A redelivery
    /// starts a new round.
    pub round_failures: u32,
    /// When the next attempt is due (ms since the Unix epoch).
    pub next_at_ms: u64,
    /// Parked: the retry schedule is exhausted; kept until redelivered.
    pub dead: bool,
    /// When the notification was logged (ms since the Unix epoch).
    pub created_ms: u64,
    /// Which round of attempts this is: 0 at first, one more for every redelivery. An
    /// attempt of an earlier round (in flight, or finished but not yet recorded, when the
    /// redelivery came) is recorded, but does not change the status of the new round.
    #[serde(default)]
    pub round: u32,
}

/// One HTTP attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    pub at_ms: u64,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub latency_ms: u64,
    /// First 1 KiB of the response body.
    pub response: String,
    /// SHA-256 of the request body, hex: proves every attempt sent the same payload.
    pub payload_sha256: String,
    /// The round of attempts it belongs to (see [`Status::round`]).
    #[serde(default)]
    pub round: u32,
}

/// What happens to a notification after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    Delivered,
    RetryAt { next_at_ms: u64 },
    Dead,
}

/// Where one notification stands, for `walhook deliveries`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Pending(Status),
    Dead(Status),
    Delivered { at_ms: u64 },
}

/// One notification with its state and attempts, for `walhook deliveries show`.
#[derive(Debug, Clone)]
pub struct Detail {
    pub key: NotificationKey,
    pub body: Vec<u8>,
    pub state: State,
    pub attempts: Vec<Attempt>,
}

/// A notification on its way into the log.
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub key: NotificationKey,
    pub body: Vec<u8>,
}

/// The delivery log. Cheap to clone; all clones share one sled database.
#[derive(Clone)]
pub struct Log {
    db: sled::Db,
    tree: sled::Tree,
    /// sled's log file, synced after every flush.
    file: Arc<std::fs::File>,
    /// Serializes the read-modify-writes of delivery status (a finished attempt, a
    /// redelivery); with [`Status::round`], a redelivery made while an attempt is in flight
    /// is not undone by that attempt's outcome.
    status: Arc<std::sync::Mutex<()>>,
}

impl Log {
    /// Whether `dir` holds a log.
    pub fn exists(dir: &Path) -> bool {
        dir.join("log").exists()
    }

    /// Opens (or creates) the log in `dir`.
    pub fn open(dir: &Path) -> Result<Log, LogError> {
        let shown = dir.display().to_string();
        let db = sled::Config::new()
            .path(dir.join("log"))
            // sled caches up to 1 GiB by default; the log is read mostly at its head
            // and tail, so a small cache keeps the sidecar's memory modest.
            .cache_capacity(CACHE_BYTES)
            // Pages larger than a quarter of a segment go to blob files, which sled does not
            // sync; 4 MiB segments keep notifications (at most ~100 KB each) inline.
            .segment_size(4 * 1024 * 1024)
            .open()
            .map_err(|source| match &source {
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    LogError::Locked { dir: shown.clone() }
                }
                _ => LogError::Open {
                    dir: shown.clone(),
                    source,
                },
            })?;
        let tree = db.open_tree("log")?;
        let file =
            std::fs::File::open(dir.join("log").join("db")).map_err(|source| LogError::Open {
                dir: shown.clone(),
                source: sled::Error::Io(source),
            })?;
        let log = Log {
            db,
            tree,
            file: Arc::new(file),
            status: Arc::new(std::sync::Mutex::new(())),
        };
        match log.tree.get(LAYOUT)?.as_deref() {
            Some([version]) if *version == LAYOUT_VERSION => {}
            // Nothing to convert: its delivered entries are a special case of this layout's.
            Some([2]) => {
                log.tree.insert(LAYOUT, &[LAYOUT_VERSION])?;
            }
            None => {
                log.convert_first_layout()?;
                log.tree.insert(LAYOUT, &[LAYOUT_VERSION])?;
            }
            Some(other) => {
                return Err(LogError::Layout {
                    dir: shown,
                    found: format!("{other:?}"),
                })
            }
        }
        Ok(log)
    }

    /// Moves the bodies of the first layout (`b'n'` entries) into their `p` or `d` entry, a
    /// page at a time, each page one atomic batch: a crash resumes where it stopped (an `n`
    /// entry left means its `p` or `d` entry is still in the first layout).
    fn convert_first_layout(&self) -> Result<(), LogError> {
        let mut converted = 0usize;
        loop {
            let page = self
                .tree
                .scan_prefix([NOTIFICATION])
                .take(BULK_CHUNK)
                .collect::<Result<Vec<_>, _>>()?;
            if page.is_empty() {
                break;
            }
            if converted == 0 {
                tracing::info!("converting the delivery log to one entry per notification (once; a crash resumes where it stopped)");
            }
            let mut batch = sled::Batch::default();
            for (key, body) in &page {
                let nkey = decode_key(key)?;
                let pending_key = nkey.encode(PENDING);
                let delivered_key = nkey.encode(DELIVERED);
                if let Some(status) = self.tree.get(&pending_key)? {
                    batch.insert(pending_key, pending_value(&status, body));
                } else if let Some(at) = self.tree.get(&delivered_key)? {
                    batch.insert(delivered_key, delivered_value(decode_ms(&at), None, body));
                }
                // Neither: left over from a transaction cut short, never deliverable.
                batch.remove(key);
            }
            self.tree.apply_batch(batch)?;
            reclaim(2 * page.len());
            converted += page.len();
        }
        if converted > 0 {
            tracing::info!(
                notifications = converted,
                "delivery log converted to one entry per notification"
            );
        }
        Ok(())
    }

    /// The last transaction the log holds completely, if any.
    pub fn position(&self) -> Result<Option<Position>, LogError> {
        match self.tree.get(POSITION)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| LogError::Corrupt {
                        key: "position".into(),
                        reason: e.to_string(),
                    })
            }
        }
    }

    /// Writes notifications, and the position when given, in one atomic batch. Not durable
    /// until [`flush`](Self::flush) returns.
    pub fn append(
        &self,
        notifications: &[NewNotification],
        position: Option<Position>,
        now_ms: u64,
    ) -> Result<(), LogError> {
        self.append_with_state(notifications, &[], position, now_ms)
    }

    /// As [`append`](Self::append), with row state writes (`None` removes the key) in the
    /// same atomic batch.
    pub fn append_with_state(
        &self,
        notifications: &[NewNotification],
        state: &[(Vec<u8>, Option<Vec<u8>>)],
        position: Option<Position>,
        now_ms: u64,
    ) -> Result<(), LogError> {
        let mut batch = sled::Batch::default();
        for (key, value) in state {
            match value {
                Some(value) => batch.insert(key.as_slice(), value.as_slice()),
                None => batch.remove(key.as_slice()),
            }
        }
        let status = Status {
            attempts: 0,
            round_failures: 0,
            next_at_ms: now_ms,
            dead: false,
            created_ms: now_ms,
            round: 0,
        };
        let status = encode_json(&status);
        for n in notifications {
            // No delivered record can exist for this key: delivery reads only transactions
            // up to the logged position, and a restart skips every one of those.
            batch.insert(n.key.encode(PENDING), pending_value(&status, &n.body));
        }
        if let Some(position) = position {
            batch.insert(POSITION, encode_json(&position));
        }
        self.tree.apply_batch(batch)?;
        reclaim(state.len() + notifications.len());
        Ok(())
    }

    /// Removes a webhook's notifications of transaction `lsn` from ordinal `from` on: left
    /// over from an earlier, interrupted pass over the same transaction that emitted more.
    pub fn truncate_transaction(&self, hook: &str, lsn: u64, from: u32) -> Result<(), LogError> {
        let start = NotificationKey {
            hook: hook.to_string(),
            lsn,
            ordinal: from,
        };
        let end = NotificationKey {
            hook: hook.to_string(),
            lsn,
            ordinal: u32::MAX,
        };
        let mut batch = sled::Batch::default();
        let mut any = false;
        for entry in self.tree.range(start.encode(PENDING)..=end.encode(PENDING)) {
            let (key, _) = entry?;
            batch.remove(key);
            any = true;
        }
        if any {
            self.tree.apply_batch(batch)?;
        }
        Ok(())
    }

    /// One raw entry (the row state store's keys live beside the log's).
    pub(crate) fn get_raw(&self, key: &[u8]) -> Result<Option<sled::IVec>, LogError> {
        Ok(self.tree.get(key)?)
    }

    /// Raw entries whose key starts with `prefix`, in key order, from `from` on.
    pub(crate) fn scan_raw(
        &self,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(sled::IVec, sled::IVec)>, LogError> {
        let mut out = Vec::new();
        for entry in self.tree.range(from..) {
            let (key, value) = entry?;
            if !key.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((key, value));
        }
        Ok(out)
    }

    /// Removes every entry whose key starts with `prefix` (in small batches; not atomic).
    pub(crate) fn remove_prefix(&self, prefix: &[u8]) -> Result<usize, LogError> {
        let mut removed = 0;
        loop {
            let keys = self
                .tree
                .scan_prefix(prefix)
                .keys()
                .take(10_000)
                .collect::<Result<Vec<_>, _>>()?;
            if keys.is_empty() {
                return Ok(removed);
            }
            for chunk in keys.chunks(BULK_CHUNK) {
                let mut batch = sled::Batch::default();
                for key in chunk {
                    batch.remove(key);
                }
                self.tree.apply_batch(batch)?;
            }
            removed += keys.len();
        }
    }

    /// Writes raw entries (`None` removes) in one atomic batch.
    pub(crate) fn write_raw(&self, entries: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), LogError> {
        self.append_with_state(&[], entries, None, 0)
    }

    /// Writes raw entries (`None` removes) in batches of [`BULK_CHUNK`] (an even number, so
    /// pairs of entries stay together), each atomic, the whole not: for bulk writes that
    /// a crash may cut short (a baseline, the scratch and staging areas).
    pub(crate) fn write_bulk(
        &self,
        entries: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), LogError> {
        for chunk in entries.chunks(BULK_CHUNK) {
            self.append_with_state(&[], chunk, None, 0)?;
        }
        Ok(())
    }

    /// Makes everything written so far durable (one fsync for all of it: group commit).
    pub async fn flush(&self) -> Result<(), LogError> {
        self.db.flush_async().await?;
        // sled 0.34 writes its log with sync_file_range, which neither flushes the drive's
        // cache nor the file's size: fdatasync the log file so a power loss keeps it too.
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|e| LogError::Sync(std::io::Error::other(e)))?
            .map_err(LogError::Sync)?;
        Ok(())
    }

    /// The database and slot this log was written from, if recorded.
    pub fn origin(&self) -> Result<Option<Origin>, LogError> {
        match self.tree.get(ORIGIN)? {
            None => Ok(None),
            Some(bytes) => decode_json(ORIGIN, &bytes).map(Some),
        }
    }

    /// Records the database and slot this log is written from.
    pub fn set_origin(&self, origin: &Origin) -> Result<(), LogError> {
        self.tree.insert(ORIGIN, encode_json(origin))?;
        Ok(())
    }

    /// Pending (not dead) notifications of `hook` after `after`, in commit order, from
    /// transactions up to `up_to_lsn`; at most `limit`.
    pub fn pending(
        &self,
        hook: &str,
        after: Option<&NotificationKey>,
        up_to_lsn: u64,
        limit: usize,
    ) -> Result<Pending, LogError> {
        let start = match after {
            Some(key) => {
                let mut k = key.encode(PENDING);
                k.push(0); // just past `after`
                k
            }
            None => hook_prefix(PENDING, hook),
        };
        let end = NotificationKey {
            hook: hook.to_string(),
            lsn: up_to_lsn,
            ordinal: u32::MAX,
        }
        .encode(PENDING);
        let mut out = Pending::default();
        for entry in self.tree.range(start..=end) {
            let (key, value) = entry?;
            let (status, _) = decode_pending(&key, &value)?;
            let nkey = decode_key(&key)?;
            // Dead entries move the scan on too, so they are not read again on every pass.
            out.scanned_to = Some(nkey.clone());
            if status.dead {
                continue;
            }
            out.items.push((nkey, status));
            if out.items.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The body of a notification.
    pub fn body(&self, key: &NotificationKey) -> Result<Option<Vec<u8>>, LogError> {
        let pending_key = key.encode(PENDING);
        if let Some(value) = self.tree.get(&pending_key)? {
            return Ok(Some(decode_pending(&pending_key, &value)?.1.to_vec()));
        }
        let delivered_key = key.encode(DELIVERED);
        match self.tree.get(&delivered_key)? {
            Some(value) => Ok(Some(split_delivered(&delivered_key, &value)?.body.to_vec())),
            None => Ok(None),
        }
    }

    /// Records an attempt and its consequence.
    pub fn record_attempt(
        &self,
        key: &NotificationKey,
        attempt: &Attempt,
        after: AfterAttempt,
    ) -> Result<(), LogError> {
        self.record_attempts(&[(key.clone(), attempt.clone(), after)])
            .map(|_| ())
    }

    /// Records several attempts and their consequences in one batch (sled forces disk writes
    /// around every batch, so finished attempts are recorded together). Attempts of the
    /// same notification apply in order: a failure then a quick retry's success may share a
    /// batch. Returns how many attempts belonged to an earlier round than the one the log
    /// now holds (a redelivery came meanwhile): recorded, without consequence; the caller
    /// should read the log afresh.
    pub fn record_attempts(
        &self,
        outcomes: &[(NotificationKey, Attempt, AfterAttempt)],
    ) -> Result<usize, LogError> {
        let _status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let mut batch = sled::Batch::default();
        let mut stale = 0;
        // Pending entries as this batch leaves them (None: moved to delivered).
        let mut pending: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        for (key, attempt, after) in outcomes {
            let pending_key = key.encode(PENDING);
            let value = match pending.get(&pending_key) {
                Some(value) => value.clone(),
                None => self.tree.get(&pending_key)?.map(|v| v.to_vec()),
            };
            let Some(value) = value else {
                // Not pending (delivered by an earlier round, or cut short): keep the
                // attempt record only.
                batch.insert(key.attempt_key(attempt.number), encode_json(attempt));
                continue;
            };
            let (mut status, body) = decode_pending(&pending_key, &value)?;
            if status.round != attempt.round {
                stale += 1;
                batch.insert(key.attempt_key(attempt.number), encode_json(attempt));
                continue;
            }
            if let AfterAttempt::Delivered = after {
                // The body moves on, with the successful attempt: one entry fewer per
                // delivery, and the common case is a first attempt's success. (Pruning
                // removes only delivered notifications, so an attempted one is never
                // pruned under it.)
                batch.insert(
                    key.encode(DELIVERED),
                    delivered_value(attempt.at_ms, Some(attempt), body),
                );
                pending.insert(pending_key, None);
                continue;
            }
            batch.insert(key.attempt_key(attempt.number), encode_json(attempt));
            status.attempts = status.attempts.max(attempt.number);
            status.round_failures += 1;
            match after {
                AfterAttempt::Delivered => {}
                AfterAttempt::RetryAt { next_at_ms } => status.next_at_ms = *next_at_ms,
                AfterAttempt::Dead => status.dead = true,
            }
            pending.insert(
                pending_key,
                Some(pending_value(&encode_json(&status), body)),
            );
        }
        for (key, value) in pending {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        self.tree.apply_batch(batch)?;
        reclaim(3 * outcomes.len());
        Ok(stale)
    }

    /// The first `limit` pending and dead notifications, in key order, and how many there
    /// are in all.
    pub fn undelivered(&self, limit: usize) -> Result<Undelivered, LogError> {
        let mut out = Undelivered::default();
        for entry in self.tree.scan_prefix([PENDING]) {
            let (key, value) = entry?;
            let (status, _) = decode_pending(&key, &value)?;
            out.total += 1;
            if status.dead {
                out.dead += 1;
            }
            if out.items.len() < limit {
                out.items.push((decode_key(&key)?, status));
            }
        }
        Ok(out)
    }

    /// One notification with its state and attempts.
    pub fn detail(&self, key: &NotificationKey) -> Result<Option<Detail>, LogError> {
        let pending_key = key.encode(PENDING);
        let delivered_key = key.encode(DELIVERED);
        // A delivered entry's own successful attempt.
        let mut successful = None;
        let (state, body) = if let Some(value) = self.tree.get(&pending_key)? {
            let (status, body) = decode_pending(&pending_key, &value)?;
            let body = body.to_vec();
            if status.dead {
                (State::Dead(status), body)
            } else {
                (State::Pending(status), body)
            }
        } else if let Some(value) = self.tree.get(&delivered_key)? {
            let entry = split_delivered(&delivered_key, &value)?;
            if let Some(json) = entry.attempt {
                successful = Some(decode_json::<Attempt>(&delivered_key, json)?);
            }
            (State::Delivered { at_ms: entry.at_ms }, entry.body.to_vec())
        } else {
            return Ok(None);
        };
        let mut attempts: Vec<Attempt> = Vec::new();
        for entry in self.tree.scan_prefix(key.encode(ATTEMPT)) {
            let (k, value) = entry?;
            attempts.push(decode_json(&k, &value)?);
        }
        attempts.extend(successful);
        attempts.sort_by_key(|a| a.number);
        Ok(Some(Detail {
            key: key.clone(),
            body,
            state,
            attempts,
        }))
    }

    /// Queues a notification (dead, delivered or pending) for a new round of attempts, due
    /// now. Returns false when the log does not hold it.
    pub fn redeliver(&self, key: &NotificationKey, now_ms: u64) -> Result<bool, LogError> {
        let _status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let Some(detail) = self.detail(key)? else {
            return Ok(false);
        };
        let was_delivered = matches!(detail.state, State::Delivered { .. });
        let (attempts, created_ms, round) = match detail.state {
            State::Pending(s) | State::Dead(s) => (s.attempts, s.created_ms, s.round),
            State::Delivered { .. } => (
                detail.attempts.iter().map(|a| a.number).max().unwrap_or(0),
                now_ms,
                detail.attempts.iter().map(|a| a.round).max().unwrap_or(0),
            ),
        };
        let status = Status {
            attempts,
            round_failures: 0,
            next_at_ms: now_ms,
            dead: false,
            created_ms,
            round: round + 1,
        };
        let mut batch = sled::Batch::default();
        batch.insert(
            key.encode(PENDING),
            pending_value(&encode_json(&status), &detail.body),
        );
        if was_delivered {
            // The successful attempt leaves with the delivered entry: keep it on record.
            for attempt in &detail.attempts {
                batch.insert(key.attempt_key(attempt.number), encode_json(attempt));
            }
        }
        batch.remove(key.encode(DELIVERED));
        self.tree.apply_batch(batch)?;
        Ok(true)
    }

    /// Redelivers every dead notification; returns how many.
    pub fn redeliver_dead(&self, now_ms: u64) -> Result<usize, LogError> {
        let mut dead = Vec::new();
        for entry in self.tree.scan_prefix([PENDING]) {
            let (key, value) = entry?;
            let (status, _) = decode_pending(&key, &value)?;
            if status.dead {
                dead.push(decode_key(&key)?);
            }
        }
        for key in &dead {
            self.redeliver(key, now_ms)?;
        }
        Ok(dead.len())
    }

    /// Removes delivered notifications (body, record and attempts) delivered before
    /// `cutoff_ms`. Returns how many.
    pub fn prune_delivered(&self, cutoff_ms: u64) -> Result<usize, LogError> {
        let mut pruned = 0;
        let mut batch = sled::Batch::default();
        for entry in self.tree.scan_prefix([DELIVERED]) {
            let (key, value) = entry?;
            if decode_ms(&value) >= cutoff_ms {
                continue;
            }
            let nkey = decode_key(&key)?;
            for attempt in self.tree.scan_prefix(nkey.encode(ATTEMPT)) {
                batch.remove(attempt?.0);
            }
            batch.remove(key);
            pruned += 1;
            if pruned % 1000 == 0 {
                self.tree.apply_batch(std::mem::take(&mut batch))?;
                reclaim(2000);
            }
        }
        self.tree.apply_batch(batch)?;
        reclaim(2 * (pruned % 1000));
        Ok(pruned)
    }

    /// The webhooks that have pending or dead notifications: one seek per webhook.
    pub fn hooks_with_undelivered(&self) -> Result<Vec<String>, LogError> {
        let mut hooks = Vec::new();
        let mut from = vec![PENDING];
        while let Some(entry) = self.tree.range(from.clone()..).next() {
            let (key, _) = entry?;
            if key.first() != Some(&PENDING) {
                break;
            }
            let key = decode_key(&key)?;
            // Just past every key of this webhook (the NUL after its id is followed by
            // binary LSNs; 0x01 sorts after the NUL).
            from = hook_prefix(PENDING, &key.hook);
            if let Some(last) = from.last_mut() {
                *last = 1;
            }
            hooks.push(key.hook);
        }
        Ok(hooks)
    }

    /// Counts of entries per kind, for tests and status output.
    pub fn counts(&self) -> Result<Counts, LogError> {
        let mut counts = Counts::default();
        for entry in self.tree.iter() {
            let (key, value) = entry?;
            match key.first() {
                Some(&DELIVERED) => {
                    counts.notifications += 1;
                    counts.delivered += 1;
                    if decode_ms_raw(&value) & WITH_ATTEMPT != 0 {
                        counts.attempts += 1;
                    }
                }
                Some(&ATTEMPT) => counts.attempts += 1,
                Some(&PENDING) => {
                    counts.notifications += 1;
                    let (status, _) = decode_pending(&key, &value)?;
                    if status.dead {
                        counts.dead += 1
                    } else {
                        counts.pending += 1
                    }
                }
                _ => {}
            }
        }
        Ok(counts)
    }
}

/// Undelivered notifications: the first ones, and counts of all.
#[derive(Debug, Default)]
pub struct Undelivered {
    pub items: Vec<(NotificationKey, Status)>,
    pub total: usize,
    pub dead: usize,
}

/// A page of pending notifications, and the last key the scan looked at (dead entries
/// included): the next page starts after it.
#[derive(Debug, Default)]
pub struct Pending {
    pub items: Vec<(NotificationKey, Status)>,
    pub scanned_to: Option<NotificationKey>,
}

/// Which database and slot a log belongs to: its keys are positions in that database's WAL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// `pg_control_system()`'s system identifier, when the role may read it.
    pub system_identifier: Option<String>,
    pub database: String,
    pub slot: String,
}

/// How many entries of each kind the log holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub notifications: usize,
    pub pending: usize,
    pub dead: usize,
    pub delivered: usize,
    pub attempts: usize,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hook_prefix(kind: u8, hook: &str) -> Vec<u8> {
    let mut key = vec![kind];
    key.extend_from_slice(hook.as_bytes());
    key.push(0);
    key
}

fn decode_key(key: &[u8]) -> Result<NotificationKey, LogError> {
    NotificationKey::decode(key).ok_or_else(|| LogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: "not a notification key".into(),
    })
}

/// A `d` value's delivered-at time.
fn decode_ms(value: &[u8]) -> u64 {
    decode_ms_raw(value) & !WITH_ATTEMPT
}

/// A `d` value's first 8 bytes, flag included.
fn decode_ms_raw(value: &[u8]) -> u64 {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// In a `d` value's time: the successful attempt follows.
const WITH_ATTEMPT: u64 = 1 << 63;

/// A `p` value: the Status JSON's length (4 bytes, big-endian), the JSON, the body.
fn pending_value(status_json: &[u8], body: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(4 + status_json.len() + body.len());
    value.extend_from_slice(&(status_json.len() as u32).to_be_bytes());
    value.extend_from_slice(status_json);
    value.extend_from_slice(body);
    value
}

/// The Status JSON and the body of a `p` value.
fn split_pending<'a>(key: &[u8], value: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), LogError> {
    let corrupt = || LogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: "pending entry shorter than its header says".into(),
    };
    length_prefixed(value).ok_or_else(corrupt)
}

/// A 4-byte big-endian length, that many bytes, the rest: the JSON section of `p` and `d`
/// values. `None` when `bytes` is shorter than its length says.
fn length_prefixed(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let json = bytes.get(4..4 + len)?;
    Some((json, &bytes[4 + len..]))
}

/// The Status and the body of a `p` value.
fn decode_pending<'a>(key: &[u8], value: &'a [u8]) -> Result<(Status, &'a [u8]), LogError> {
    let (json, body) = split_pending(key, value)?;
    Ok((decode_json(key, json)?, body))
}

/// A `d` value: when it was delivered (8 bytes, big-endian ms, with [`WITH_ATTEMPT`] set
/// when the successful attempt follows as its JSON's length (4 bytes, big-endian) and the
/// JSON), then the body. Layout 2 wrote no attempt.
fn delivered_value(at_ms: u64, attempt: Option<&Attempt>, body: &[u8]) -> Vec<u8> {
    let attempt = attempt.map(encode_json);
    let mut value = Vec::with_capacity(12 + attempt.as_ref().map_or(0, Vec::len) + body.len());
    match &attempt {
        Some(json) => {
            value.extend_from_slice(&(at_ms | WITH_ATTEMPT).to_be_bytes());
            value.extend_from_slice(&(json.len() as u32).to_be_bytes());
            value.extend_from_slice(json);
        }
        None => value.extend_from_slice(&at_ms.to_be_bytes()),
    }
    value.extend_from_slice(body);
    value
}

/// A `d` value's parts.
struct DeliveredEntry<'a> {
    at_ms: u64,
    /// The successful attempt's JSON, if the entry holds it.
    attempt: Option<&'a [u8]>,
    body: &'a [u8],
}

fn split_delivered<'a>(key: &[u8], value: &'a [u8]) -> Result<DeliveredEntry<'a>, LogError> {
    let corrupt = || LogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: "delivered entry shorter than its header says".into(),
    };
    let head = value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(corrupt)?;
    if head & WITH_ATTEMPT == 0 {
        return Ok(DeliveredEntry {
            at_ms: head,
            attempt: None,
            body: &value[8..],
        });
    }
    let (json, body) = length_prefixed(&value[8..]).ok_or_else(corrupt)?;
    Ok(DeliveredEntry {
        at_ms: head & !WITH_ATTEMPT,
        attempt: Some(json),
        body,
    })
}

fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode_json<T: for<'de> Deserialize<'de>>(key: &[u8], value: &[u8]) -> Result<T, LogError> {
    serde_json::from_slice(value).map_err(|e| LogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hook: &str, lsn: u64, ordinal: u32) -> NotificationKey {
        NotificationKey {
            hook: hook.into(),
            lsn,
            ordinal,
        }
    }

    fn note(hook: &str, lsn: u64, ordinal: u32) -> NewNotification {
        NewNotification {
            key: key(hook, lsn, ordinal),
            body: format!("{{\"lsn\":{lsn},\"n\":{ordinal}}}").into_bytes(),
        }
    }

    fn attempt(number: u32, status: u16) -> Attempt {
        Attempt {
            number,
            at_ms: 1000 + number as u64,
            status: Some(status),
            error: None,
            latency_ms: 3,
            response: "ok".into(),
            payload_sha256: "00".into(),
            round: 0,
        }
    }

    /// Raw entries of `kind` (for counting what a change writes).
    fn entries_of(log: &Log, kind: u8) -> usize {
        log.tree.scan_prefix([kind]).count()
    }

    #[test]
    fn a_delivery_keeps_its_successful_attempt_in_the_delivered_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path()).expect("open");
        log.append(&[note("h", 1, 0), note("h", 1, 1)], None, 0)
            .expect("append");
        let (k0, k1) = (key("h", 1, 0), key("h", 1, 1));
        log.record_attempt(&k0, &attempt(1, 200), AfterAttempt::Delivered)
            .expect("first try");
        log.record_attempt(
            &k1,
            &attempt(1, 503),
            AfterAttempt::RetryAt { next_at_ms: 5 },
        )
        .expect("failure");
        log.record_attempt(&k1, &attempt(2, 200), AfterAttempt::Delivered)
            .expect("second try");
        // One `a` entry: the failure. The successes live in their `d` entries.
        assert_eq!(entries_of(&log, ATTEMPT), 1);
        assert_eq!(log.counts().expect("counts").attempts, 3);
        let d0 = log.detail(&k0).expect("detail").expect("exists");
        assert!(matches!(d0.state, State::Delivered { at_ms: 1001 }));
        assert_eq!(d0.attempts, vec![attempt(1, 200)]);
        assert_eq!(d0.body, note("h", 1, 0).body);
        assert_eq!(log.body(&k0).expect("body"), Some(note("h", 1, 0).body));
        let d1 = log.detail(&k1).expect("detail").expect("exists");
        assert_eq!(d1.attempts, vec![attempt(1, 503), attempt(2, 200)]);

        // A redelivery keeps the successful attempt on record as its own entry.
        assert!(log.redeliver(&k0, 60).expect("redeliver"));
        let again = log.detail(&k0).expect("detail").expect("exists");
        assert!(matches!(again.state, State::Pending(_)));
        assert_eq!(again.attempts, vec![attempt(1, 200)]);
        assert_eq!(again.body, note("h", 1, 0).body);
        // Pruning removes a delivered entry with its attempts, embedded or not.
        assert_eq!(log.prune_delivered(u64::MAX).expect("prune"), 1);
        assert_eq!(
            entries_of(&log, ATTEMPT),
            1,
            "k0's attempt stays: it is pending"
        );
    }

    #[test]
    fn a_layout_2_log_reads_as_before_and_is_marked_3() {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = note("h", 7, 0);
        {
            let log = Log::open(dir.path()).expect("open");
            // What layout 2 wrote for a delivered notification: time, body; its attempt apart.
            let mut old = 4242u64.to_be_bytes().to_vec();
            old.extend_from_slice(&n.body);
            log.write_raw(&[
                (n.key.encode(DELIVERED), Some(old)),
                (n.key.attempt_key(1), Some(encode_json(&attempt(1, 200)))),
                (LAYOUT.to_vec(), Some(vec![2])),
            ])
            .expect("layout 2");
        }
        let log = Log::open(dir.path()).expect("reopen");
        assert_eq!(
            log.get_raw(LAYOUT).expect("layout").as_deref(),
            Some(&[3u8][..])
        );
        let d = log.detail(&n.key).expect("detail").expect("exists");
        assert!(matches!(d.state, State::Delivered { at_ms: 4242 }));
        assert_eq!(d.body, n.body);
        assert_eq!(d.attempts, vec![attempt(1, 200)]);
    }

    #[test]
    fn ids_round_trip() {
        let k = key("crm-sync_x", 0x16B3748, 7);
        assert_eq!(k.to_string(), "crm-sync_x_00000000016B3748_7");
        assert_eq!(NotificationKey::parse(&k.to_string()), Some(k.clone()));
        assert_eq!(NotificationKey::decode(&k.encode(PENDING)), Some(k));
        assert_eq!(NotificationKey::parse("nope"), None);
        assert_eq!(NotificationKey::parse("h_123_1"), None);
    }

    #[tokio::test]
    async fn pending_respects_order_visibility_and_hooks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path()).expect("open");
        log.append(
            &[note("a", 20, 0), note("a", 10, 1), note("b", 10, 0)],
            Some(Position {
                commit_lsn: 10,
                end_lsn: 11,
            }),
            5,
        )
        .expect("append");
        log.append(&[note("a", 10, 0)], None, 5).expect("append");
        log.flush().await.expect("flush");
        assert_eq!(log.position().expect("pos").map(|p| p.end_lsn), Some(11));

        let keys = |v: Vec<(NotificationKey, Status)>| -> Vec<String> {
            v.into_iter().map(|(k, _)| k.to_string()).collect()
        };
        let visible = log.pending("a", None, 10, 100).expect("pending").items;
        assert_eq!(
            keys(visible),
            vec!["a_000000000000000A_0", "a_000000000000000A_1"]
        );
        let all = log
            .pending("a", None, u64::MAX, 100)
            .expect("pending")
            .items;
        assert_eq!(all.len(), 3);
        let after = log
            .pending("a", Some(&key("a", 10, 0)), u64::MAX, 1)
            .expect("pending")
            .items;
        assert_eq!(keys(after), vec!["a_000000000000000A_1"]);
        assert_eq!(
            log.pending("b", None, u64::MAX, 100)
                .expect("b")
                .items
                .len(),
            1
        );
    }

    #[test]
    fn attempts_move_notifications_through_their_states() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path()).expect("open");
        log.append(&[note("h", 1, 0), note("h", 1, 1)], None, 0)
            .expect("append");
        let k0 = key("h", 1, 0);
        let k1 = key("h", 1, 1);
        log.record_attempt(
            &k0,
            &attempt(1, 500),
            AfterAttempt::RetryAt { next_at_ms: 99 },
        )
        .expect("retry");
        log.record_attempt(&k0, &attempt(2, 200), AfterAttempt::Delivered)
            .expect("delivered");
        log.record_attempt(&k1, &attempt(1, 404), AfterAttempt::Dead)
            .expect("dead");

        let d0 = log.detail(&k0).expect("detail").expect("exists");
        assert!(matches!(d0.state, State::Delivered { at_ms: 1002 }));
        assert_eq!(d0.attempts.len(), 2);
        let d1 = log.detail(&k1).expect("detail").expect("exists");
        assert!(matches!(d1.state, State::Dead(ref s) if s.attempts == 1 && s.round_failures == 1));
        assert!(log
            .pending("h", None, u64::MAX, 10)
            .expect("p")
            .items
            .is_empty());

        assert_eq!(log.redeliver_dead(50).expect("redeliver"), 1);
        let again = log.pending("h", None, u64::MAX, 10).expect("p").items;
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].1.round_failures, 0);
        assert_eq!(again[0].1.attempts, 1, "attempt numbering continues");

        assert!(log.redeliver(&k0, 60).expect("redeliver delivered"));
        assert_eq!(
            log.pending("h", None, u64::MAX, 10).expect("p").items.len(),
            2
        );
        assert!(!log.redeliver(&key("h", 9, 9), 60).expect("missing"));
    }

    #[test]
    fn attempts_of_one_notification_in_one_batch_apply_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path()).expect("open");
        log.append(&[note("h", 1, 0), note("h", 2, 0)], None, 0)
            .expect("append");
        let (k1, k2) = (key("h", 1, 0), key("h", 2, 0));
        log.record_attempts(&[
            (
                k1.clone(),
                attempt(1, 500),
                AfterAttempt::RetryAt { next_at_ms: 7 },
            ),
            (
                k2.clone(),
                attempt(1, 500),
                AfterAttempt::RetryAt { next_at_ms: 7 },
            ),
            (k1.clone(), attempt(2, 200), AfterAttempt::Delivered),
            (
                k2.clone(),
                attempt(2, 503),
                AfterAttempt::RetryAt { next_at_ms: 9 },
            ),
        ])
        .expect("record");
        let d1 = log.detail(&k1).expect("detail").expect("exists");
        assert!(matches!(d1.state, State::Delivered { at_ms: 1002 }));
        assert_eq!(d1.body, note("h", 1, 0).body);
        assert_eq!(d1.attempts.len(), 2);
        let d2 = log.detail(&k2).expect("detail").expect("exists");
        assert!(
            matches!(d2.state, State::Pending(ref s) if s.attempts == 2 && s.round_failures == 2 && s.next_at_ms == 9),
            "{:?}",
            d2.state
        );
        assert_eq!(d2.body, note("h", 2, 0).body);
    }

    #[test]
    fn an_attempt_recorded_after_a_redelivery_does_not_undo_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path()).expect("open");
        log.append(&[note("h", 1, 0), note("h", 2, 0)], None, 0)
            .expect("append");
        let (k1, k2) = (key("h", 1, 0), key("h", 2, 0));
        // Both attempts were made in round 0; the redeliveries come before they are recorded.
        assert!(log.redeliver(&k1, 50).expect("redeliver"));
        assert!(log.redeliver(&k2, 50).expect("redeliver"));
        let stale = log
            .record_attempts(&[
                (k1.clone(), attempt(1, 500), AfterAttempt::Dead),
                (k2.clone(), attempt(1, 200), AfterAttempt::Delivered),
            ])
            .expect("record");
        assert_eq!(stale, 2);
        for k in [&k1, &k2] {
            let d = log.detail(k).expect("detail").expect("exists");
            assert!(
                matches!(d.state, State::Pending(ref s) if s.round == 1 && !s.dead && s.next_at_ms == 50),
                "{k}: {:?}",
                d.state
            );
            assert_eq!(d.attempts.len(), 1, "the attempt itself is kept");
        }
        // An attempt of the new round counts.
        let mut second = attempt(2, 200);
        second.round = 1;
        assert_eq!(
            log.record_attempts(&[(k2.clone(), second, AfterAttempt::Delivered)])
                .expect("record"),
            0
        );
        let d = log.detail(&k2).expect("detail").expect("exists");
        assert!(matches!(d.state, State::Delivered { .. }), "{:?}", d.state);
        // Redelivered once more, from delivered: the round goes on from its attempts.
        assert!(log.redeliver(&k2, 60).expect("redeliver"));
        let d = log.detail(&k2).expect("detail").expect("exists");
        assert!(
            matches!(d.state, State::Pending(ref s) if s.round == 2),
            "{:?}",
            d.state
        );
    }

    #[test]
    fn the_first_layout_converts_at_open_keeping_bodies_and_states() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = |dead: bool, attempts: u32| Status {
            attempts,
            round_failures: attempts,
            next_at_ms: 42,
            dead,
            created_ms: 5,
            round: 0,
        };
        // 300 notifications (more than one conversion page): pending, dead or delivered.
        {
            let log = Log::open(dir.path()).expect("open");
            let mut entries = Vec::new();
            for i in 0..300u32 {
                let n = note("h", 10 + i as u64, 0);
                entries.push((n.key.encode(NOTIFICATION), Some(n.body.clone())));
                let value = match i % 3 {
                    0 => (n.key.encode(PENDING), encode_json(&status(false, 0))),
                    1 => (n.key.encode(PENDING), encode_json(&status(true, 3))),
                    _ => (
                        n.key.encode(DELIVERED),
                        (900 + i as u64).to_be_bytes().to_vec(),
                    ),
                };
                entries.push((value.0, Some(value.1)));
            }
            // A body whose transaction was cut short: no state at all.
            entries.push((key("h", 1, 9).encode(NOTIFICATION), Some(b"{}".to_vec())));
            // The first layout had no layout key.
            entries.push((LAYOUT.to_vec(), None));
            log.write_bulk(&entries).expect("first layout");
        }
        let log = Log::open(dir.path()).expect("reopen converts");
        assert!(log
            .scan_raw(&[NOTIFICATION], &[NOTIFICATION], 1)
            .expect("scan")
            .is_empty());
        for i in 0..300u32 {
            let n = note("h", 10 + i as u64, 0);
            let d = log.detail(&n.key).expect("detail").expect("kept");
            assert_eq!(d.body, n.body, "body of {}", n.key);
            match i % 3 {
                0 => assert_eq!(d.state, State::Pending(status(false, 0))),
                1 => assert_eq!(d.state, State::Dead(status(true, 3))),
                _ => assert_eq!(
                    d.state,
                    State::Delivered {
                        at_ms: 900 + i as u64
                    }
                ),
            }
        }
        let counts = log.counts().expect("counts");
        assert_eq!(
            (
                counts.notifications,
                counts.pending,
                counts.dead,
                counts.delivered
            ),
            (300, 100, 100, 100)
        );
        assert_eq!(
            log.pending("h", None, u64::MAX, 1000)
                .expect("pending")
                .items
                .len(),
            100
        );
    }

    #[test]
    fn pruning_removes_only_old_delivered_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path()).expect("open");
        log.append(
            &[note("h", 1, 0), note("h", 2, 0), note("h", 3, 0)],
            None,
            0,
        )
        .expect("append");
        let mut old = attempt(1, 200);
        old.at_ms = 100;
        log.record_attempt(&key("h", 1, 0), &old, AfterAttempt::Delivered)
            .expect("old");
        let mut new = attempt(1, 200);
        new.at_ms = 900;
        log.record_attempt(&key("h", 2, 0), &new, AfterAttempt::Delivered)
            .expect("new");
        assert_eq!(log.prune_delivered(500).expect("prune"), 1);
        let counts = log.counts().expect("counts");
        assert_eq!(counts.notifications, 2);
        assert_eq!(counts.delivered, 1);
        assert_eq!(counts.pending, 1);
        assert_eq!(counts.attempts, 1);
        assert!(log.detail(&key("h", 1, 0)).expect("detail").is_none());
    }

    #[test]
    fn bulk_writes_and_prefix_removal_span_many_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path()).expect("open");
        let entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..1000u32)
            .map(|i| {
                (
                    format!("x{i:04}").into_bytes(),
                    Some(i.to_be_bytes().to_vec()),
                )
            })
            .collect();
        log.write_bulk(&entries).expect("bulk");
        // Every other one removed again, across batch boundaries.
        let removals: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..1000u32)
            .step_by(2)
            .map(|i| (format!("x{i:04}").into_bytes(), None))
            .collect();
        log.write_bulk(&removals).expect("bulk removals");
        let left = log.scan_raw(b"x", b"x", usize::MAX).expect("scan");
        assert_eq!(left.len(), 500);
        assert!(left.iter().all(|(k, v)| k.as_ref()
            == format!(
                "x{:04}",
                u32::from_be_bytes(v.as_ref().try_into().expect("4 bytes"))
            )
            .as_bytes()
            && u32::from_be_bytes(v.as_ref().try_into().expect("4 bytes")) % 2 == 1));
        log.write_raw(&[(b"y".to_vec(), Some(b"kept".to_vec()))])
            .expect("other key");
        assert_eq!(log.remove_prefix(b"x").expect("remove"), 500);
        assert!(log
            .scan_raw(b"x", b"x", usize::MAX)
            .expect("scan")
            .is_empty());
        assert_eq!(
            log.get_raw(b"y").expect("get").as_deref(),
            Some(&b"kept"[..])
        );
    }

    #[test]
    fn webhooks_with_undelivered_notifications_are_listed_once_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path()).expect("open");
        let notes: Vec<NewNotification> = [("a", 1), ("a", 2), ("a.b", 1), ("b", 7)]
            .iter()
            .map(|(hook, lsn)| note(hook, *lsn, 0))
            .collect();
        log.append(&notes, None, 0).expect("append");
        assert_eq!(
            log.hooks_with_undelivered().expect("hooks"),
            vec!["a", "a.b", "b"]
        );
    }

    #[test]
    fn truncate_transaction_drops_leftover_ordinals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path()).expect("open");
        log.append(
            &[note("h", 5, 0), note("h", 5, 1), note("h", 5, 2)],
            None,
            0,
        )
        .expect("append");
        log.truncate_transaction("h", 5, 1).expect("truncate");
        assert_eq!(log.counts().expect("counts").notifications, 1);
    }

    #[test]
    fn a_log_of_a_newer_layout_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = Log::open(dir.path()).expect("open");
            assert_eq!(
                log.get_raw(LAYOUT).expect("layout").as_deref(),
                Some(&[LAYOUT_VERSION][..])
            );
            log.write_raw(&[(LAYOUT.to_vec(), Some(vec![LAYOUT_VERSION + 1]))])
                .expect("newer");
        }
        match Log::open(dir.path()) {
            Err(e @ LogError::Layout { .. }) => assert!(e.to_string().contains("newer walhook")),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("opened a newer layout"),
        }
    }

    #[test]
    fn a_second_open_of_the_same_dir_says_it_is_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _log = Log::open(dir.path()).expect("open");
        match Log::open(dir.path()) {
            Err(e @ LogError::Locked { .. }) => assert!(e.to_string().contains("in use")),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("second open succeeded"),
        }
    }
}
