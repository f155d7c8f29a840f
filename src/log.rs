//! The durable delivery log, in sled.
//!
//! Everything lives in one sled tree so that a transaction's notifications, their delivery
//! state and the stream position are written by one atomic batch. Keys start with a kind
//! byte, then the webhook id, a NUL, the transaction's commit LSN and the notification's
//! ordinal within (transaction, webhook), all big-endian so that a webhook's entries sort in
//! commit order:
//!
//! ```text
//! b'g' hook \0 lsn ordinal            → segment: that notification and the webhook's next
//!                                        ones of the same write, bodies included
//! b'd' hook \0 lsn ordinal            → delivered: at (ms since the Unix epoch) and the
//!                                        successful attempt
//! b'u' hook \0 lsn ordinal            → Status of a notification attempted without success
//!                                        (pending or dead), or redelivered
//! b'a' hook \0 lsn ordinal attempt    → Attempt record (a delivered entry holds its own
//!                                        successful attempt instead)
//! b'f' hook                           → floor: every notification of the webhook up to a
//!                                        key is delivered or has a `u` entry (a scan from the
//!                                        start reads those, then goes on from there)
//! b'm' "position"                     → commit LSN and end LSN of the last logged transaction
//! b'm' "layout"                       → this layout's version (6; the first had none)
//! b'm' "origin", "recheck", "applying", "spilling" → the database and slot; recheck
//!                                        numbering; a spilled transaction's progress
//! b't' ..., b'c' ..., b'q' ...          → the row state store (see `crate::state`)
//! b'x' ..., b'y' ...                    → a spilled transaction's scratch and staging areas
//!                                        (see `crate::derive::classification`)
//! b'j' sequence chunk                   → journal: row state entries an earlier walhook had
//!                                        still to write one by one (read at open only)
//! ```
//!
//! Notifications are written as segments: one sled entry per webhook per write (a group of
//! transactions), up to [`SEGMENT_BYTES`] of bodies. Each sled entry costs a tree insert,
//! and at thousands of notifications a second one entry per notification was most of the
//! stream's work. A notification with neither a `d` nor a `u` entry is pending, due since
//! it was logged: the common life of a notification, one success, writes one small `d`
//! entry. A segment value is the time it was logged (8 bytes, big-endian ms), then per
//! notification its LSN (8), ordinal (4), body length (4) and body. A `d` value is 8 bytes
//! of big-endian milliseconds (the top bit set when the successful attempt follows: a 4-byte
//! length and its JSON). Pruning removes delivered notifications from their segments.
//!
//! Earlier layouts kept one entry per notification: `b'p'` (Status and body, pending or
//! dead) and `b'd'` (delivered, with the body); the first kept the body apart under `b'n'`.
//! [`Log::open`] converts them.
//!
//! Progress invariant: the position key is written in the same batch as the last
//! notifications of its transaction, and the replication slot is acknowledged only after a
//! flush that covers that batch. A key is therefore a pure function of the WAL (commit LSN,
//! ordinal), so replaying a transaction writes the same keys again (a write never spans a
//! segment already in the log; one starting where the write has a notification is
//! replaced).
//!
//! Journal: sled 0.34 makes every read in the process wait while a batch is applied (one
//! global lock). The walhook that introduced layout 6 therefore put a large write's row
//! state entries in its batch as a few journal entries, then wrote them one by one and
//! removed the journal; that wrote the state twice. Now the stream has the group in flight
//! written only once it has read what the next group needs (`crate::run`), and every write
//! is one batch. [`Log::open`] still writes out what a journal left behind after a crash,
//! in the order it was written, before anything reads the state: such a data dir is read as
//! it was meant.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The first layout's separate bodies (converted at open).
const NOTIFICATION: u8 = b'n';
/// Layouts 2 and 3: a pending or dead notification with its body (converted at open).
const PENDING: u8 = b'p';
const SEGMENT: u8 = b'g';
const DELIVERED: u8 = b'd';
const STATUS: u8 = b'u';
const ATTEMPT: u8 = b'a';
const FLOOR: u8 = b'f';
const POSITION: &[u8] = b"mposition";
const ORIGIN: &[u8] = b"morigin";
/// The layout this version writes (the first had no such key); a newer one is refused.
const LAYOUT: &[u8] = b"mlayout";
/// 2: one entry per notification; 3: a delivered entry may hold its successful attempt;
/// 4: segments (see the module documentation); 5: row state may be compact (see
/// `crate::state`). Layouts 1 to 3 are converted at open, 4 needs nothing.
const LAYOUT_VERSION: u8 = 6;
/// A floor moves past at most this many notifications at a time.
const FLOOR_STEP: usize = 20_000;
/// A segment holds notifications until their bodies reach this size (one larger body gets a
/// segment of its own). sled rewrites a whole page to change one value, so segments stay
/// well under its page sizes.
const SEGMENT_BYTES: usize = 16 * 1024;
/// Journal entries, which an earlier walhook of layout 6 wrote (see the module's
/// documentation).
const JOURNAL: u8 = b'j';

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
    /// Bumped after every write that takes notifications out of segments (pruning, a
    /// transaction's leftover ordinals): a [`SegmentCache`] filled before is not used.
    segments_cut: Arc<std::sync::atomic::AtomicU64>,
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
            segments_cut: Arc::default(),
        };
        match log.tree.get(LAYOUT)?.as_deref() {
            Some([version]) if *version == LAYOUT_VERSION => {}
            // Layout 5 only adds the compact row state encoding, read beside the old one;
            // layout 6 the journal (which an earlier walhook would not write out).
            Some([4 | 5]) => {
                log.tree.insert(LAYOUT, &[LAYOUT_VERSION])?;
            }
            Some([2 | 3]) => {
                log.convert_to_segments()?;
                log.tree.insert(LAYOUT, &[LAYOUT_VERSION])?;
            }
            None => {
                log.convert_first_layout()?;
                log.convert_to_segments()?;
                log.tree.insert(LAYOUT, &[LAYOUT_VERSION])?;
            }
            Some(other) => {
                return Err(LogError::Layout {
                    dir: shown,
                    found: format!("{other:?}"),
                })
            }
        }
        log.write_out_journal()?;
        Ok(log)
    }

    /// Writes the row state entries of journals a crash left an earlier walhook (in the
    /// order they were written), removing each journal entry once its entries are written.
    fn write_out_journal(&self) -> Result<(), LogError> {
        let left: Vec<(sled::IVec, sled::IVec)> =
            self.tree.scan_prefix([JOURNAL]).collect::<Result<_, _>>()?;
        for (key, value) in &left {
            self.write_each(&decode_journal(key, value)?)?;
            self.tree.remove(key)?;
        }
        if !left.is_empty() {
            tracing::info!(
                entries = left.len(),
                "wrote out the row state journal of an interrupted write"
            );
        }
        Ok(())
    }

    /// Writes entries (`None` removes) one by one: each atomic, the whole not.
    fn write_each<'a>(&self, entries: impl IntoIterator<Item = &'a Entry>) -> Result<(), LogError> {
        for (key, value) in entries {
            match value {
                Some(value) => self.tree.insert(key.as_slice(), value.as_slice())?,
                None => self.tree.remove(key.as_slice())?,
            };
        }
        Ok(())
    }

    /// Moves the bodies of the first layout (`b'n'` entries) into their `p` or `d` entry, a
    /// page at a time, each page one atomic batch: a crash resumes where it stopped (an `n`
    /// entry left means its `p` or `d` entry is still in the first layout).
    fn convert_first_layout(&self) -> Result<(), LogError> {
        let mut converted = 0usize;
        loop {
            let page = self.first_page(NOTIFICATION)?;
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
                    // Layout 2's delivered entry: the time, then the body.
                    let mut value = decode_ms(&at).to_be_bytes().to_vec();
                    value.extend_from_slice(body);
                    batch.insert(delivered_key, value);
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

    /// The first entries of `kind` (a conversion page: converted ones are removed).
    fn first_page(&self, kind: u8) -> Result<Vec<(sled::IVec, sled::IVec)>, LogError> {
        Ok(self
            .tree
            .scan_prefix([kind])
            .take(BULK_CHUNK)
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// Moves the entries of layouts 2 and 3 (one per notification, the body inside) into
    /// segments of one notification each, a page at a time, each page one atomic batch: a
    /// crash resumes where it stopped (a `p` entry left, or a `d` entry with a body, is
    /// still to convert).
    fn convert_to_segments(&self) -> Result<(), LogError> {
        let mut converted = 0usize;
        let mut announce = |n: usize| {
            if converted == 0 && n > 0 {
                tracing::info!("converting the delivery log to segments (once; a crash resumes where it stopped)");
            }
            converted += n;
        };
        // Pending and dead: a segment, and the status unless it is a fresh one's.
        loop {
            let page = self.first_page(PENDING)?;
            if page.is_empty() {
                break;
            }
            announce(page.len());
            let mut batch = sled::Batch::default();
            for (key, value) in &page {
                let nkey = decode_key(key)?;
                let (status, body) = decode_pending(key, value)?;
                batch.insert(
                    nkey.encode(SEGMENT),
                    segment_value(status.created_ms, [SegmentNote::of(&nkey, body)]),
                );
                if status != fresh_status(status.created_ms) {
                    batch.insert(nkey.encode(STATUS), encode_json(&status));
                }
                batch.remove(key);
            }
            self.tree.apply_batch(batch)?;
            reclaim(2 * page.len());
        }
        // Delivered: the body leaves for a segment (logged then, as far as anyone knows).
        let mut from = vec![DELIVERED];
        loop {
            let page = self.scan_raw(&[DELIVERED], &from, BULK_CHUNK)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            from = last.to_vec();
            from.push(0);
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for (key, value) in &page {
                let entry = split_delivered(key, value)?;
                if entry.body.is_empty() {
                    continue;
                }
                let nkey = decode_key(key)?;
                batch.insert(
                    nkey.encode(SEGMENT),
                    segment_value(entry.at_ms, [SegmentNote::of(&nkey, entry.body)]),
                );
                batch.insert(key, delivered_value(entry.at_ms, entry.attempt));
                n += 1;
            }
            announce(n);
            self.tree.apply_batch(batch)?;
            reclaim(2 * n);
        }
        if converted > 0 {
            tracing::info!(
                notifications = converted,
                "delivery log converted to segments"
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

    /// As [`append`](Self::append), with row state writes (`None` removes the key), in the
    /// same atomic batch. Each webhook's notifications become segments.
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
        let mut by_hook: BTreeMap<&str, Vec<&NewNotification>> = BTreeMap::new();
        for n in notifications {
            by_hook.entry(&n.key.hook).or_default().push(n);
        }
        let mut segments = 0;
        for notes in by_hook.values_mut() {
            notes.sort_by_key(|n| (n.key.lsn, n.key.ordinal));
            notes.dedup_by_key(|n| (n.key.lsn, n.key.ordinal));
            let (Some(first), Some(last)) = (notes.first(), notes.last()) else {
                continue;
            };
            // Segments already in the log inside this write's range (a huge transaction's
            // chunks, written before its commit; an interrupted earlier pass's): no segment
            // of this write spans one, so segments never overlap, and one that starts where
            // this write has a notification is replaced.
            let (first, last) = (first.key.encode(SEGMENT), last.key.encode(SEGMENT));
            let mut starts = Vec::new();
            for old in self
                .tree
                .range::<&[u8], _>((Bound::Excluded(&first[..]), Bound::Included(&last[..])))
                .keys()
            {
                let k = decode_key(&old?)?;
                starts.push((k.lsn, k.ordinal));
            }
            let mut next_start = starts.into_iter().peekable();
            let mut rest = &notes[..];
            while !rest.is_empty() {
                let mut take = 1;
                let mut bytes = rest[0].body.len();
                while let Some(&start) = next_start.peek() {
                    if start > (rest[0].key.lsn, rest[0].key.ordinal) {
                        break;
                    }
                    next_start.next();
                }
                while take < rest.len() && bytes + rest[take].body.len() <= SEGMENT_BYTES {
                    let at = (rest[take].key.lsn, rest[take].key.ordinal);
                    if next_start.peek().is_some_and(|&start| at >= start) {
                        break;
                    }
                    bytes += rest[take].body.len();
                    take += 1;
                }
                let (chunk, later) = rest.split_at(take);
                rest = later;
                batch.insert(
                    chunk[0].key.encode(SEGMENT),
                    segment_value(
                        now_ms,
                        chunk.iter().map(|n| SegmentNote::of(&n.key, &n.body)),
                    ),
                );
                segments += 1;
            }
        }
        if let Some(position) = position {
            batch.insert(POSITION, encode_json(&position));
        }
        self.tree.apply_batch(batch)?;
        reclaim(state.len() + segments);
        Ok(())
    }

    /// Removes a webhook's notifications of transaction `lsn` from ordinal `from` on: left
    /// over from an earlier, interrupted pass over the same transaction that emitted more.
    pub fn truncate_transaction(&self, hook: &str, lsn: u64, from: u32) -> Result<(), LogError> {
        let lo = NotificationKey {
            hook: hook.to_string(),
            lsn,
            ordinal: from,
        };
        let hi = NotificationKey {
            hook: hook.to_string(),
            lsn,
            ordinal: u32::MAX,
        };
        let cut = |n: &SegmentNote<'_>| n.lsn == lsn && n.ordinal >= from;
        let mut batch = sled::Batch::default();
        let mut any = false;
        let start = self
            .segment_of(&lo)?
            .unwrap_or_else(|| hook_prefix(SEGMENT, hook));
        for entry in self.tree.range(start..=hi.encode(SEGMENT)) {
            let (key, value) = entry?;
            let (created, notes) = parse_segment(&key, &value)?;
            if !notes.iter().any(cut) {
                continue;
            }
            any = true;
            let kept: Vec<SegmentNote<'_>> = notes.into_iter().filter(|n| !cut(n)).collect();
            if kept.is_empty() {
                batch.remove(key);
            } else {
                batch.insert(key, segment_value(created, kept));
            }
        }
        for kind in [DELIVERED, STATUS, ATTEMPT] {
            let mut end = hi.encode(kind);
            end.extend_from_slice(&[0xFF; 4]);
            for entry in self.tree.range(lo.encode(kind)..=end) {
                batch.remove(entry?.0);
                any = true;
            }
        }
        if any {
            self.tree.apply_batch(batch)?;
            self.cut_segments();
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

    /// Hands `visit` each raw entry whose key starts with `prefix`, in key order, until it
    /// returns false.
    pub(crate) fn visit_raw(
        &self,
        prefix: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), LogError> {
        for entry in self.tree.scan_prefix(prefix) {
            let (key, value) = entry?;
            if !visit(&key, &value) {
                break;
            }
        }
        Ok(())
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
            self.write_raw(chunk)?;
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

    /// Pending (not dead) notifications of `hook` after `after` (all when `None`), in
    /// commit order, from transactions up to `up_to_lsn`; at most `limit`.
    pub fn pending(
        &self,
        hook: &str,
        after: Option<&NotificationKey>,
        up_to_lsn: u64,
        limit: usize,
    ) -> Result<Pending, LogError> {
        let mut out = Pending::default();
        let floor = self.floor(hook)?.1;
        let mut from = after.cloned();
        if let Some(floor) = floor.filter(|f| after.is_none_or(|a| a < f)) {
            // Up to the floor only notifications with a status wait.
            let start = match after {
                Some(a) => Bound::Excluded(a.encode(STATUS)),
                None => Bound::Included(hook_prefix(STATUS, hook)),
            };
            for entry in self
                .tree
                .range((start, Bound::Included(floor.encode(STATUS))))
            {
                let (key, value) = entry?;
                let key_of = decode_key(&key)?;
                if key_of.lsn > up_to_lsn {
                    return Ok(out);
                }
                let status: Status = decode_json(&key, &value)?;
                out.scanned_to = Some(key_of.clone());
                if !status.dead {
                    out.items.push((key_of, status));
                    if out.items.len() >= limit {
                        return Ok(out);
                    }
                }
            }
            if floor.lsn > up_to_lsn {
                return Ok(out);
            }
            out.scanned_to = Some(floor.clone());
            from = Some(floor);
        }
        self.walk(hook, from.as_ref(), up_to_lsn, |key, _, mark| {
            // Delivered and dead ones move the scan on too, so they are not read again on
            // every pass.
            out.scanned_to = Some(key.clone());
            if let Mark::Waiting(status, _) = mark {
                if !status.dead {
                    out.items.push((key, status));
                }
            }
            Ok(out.items.len() < limit)
        })?;
        Ok(out)
    }

    /// `hook`'s notifications up to its floor that wait: each has a status entry.
    fn waiting_under(
        &self,
        hook: &str,
        floor: Option<&NotificationKey>,
    ) -> Result<Vec<(NotificationKey, Status)>, LogError> {
        let Some(floor) = floor else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in self
            .tree
            .range(hook_prefix(STATUS, hook)..=floor.encode(STATUS))
        {
            let (key, value) = entry?;
            out.push((decode_key(&key)?, decode_json(&key, &value)?));
        }
        Ok(out)
    }

    /// The body of a notification (delivery reads it with [`Log::body_near`]).
    #[cfg(test)]
    pub fn body(&self, key: &NotificationKey) -> Result<Option<Vec<u8>>, LogError> {
        Ok(self.find(key)?.map(|(_, body)| body))
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
        // Notifications as this batch leaves them: waiting with a status, or delivered.
        let mut states: HashMap<&NotificationKey, Option<Status>> = HashMap::new();
        // Whether a status entry exists for them (to remove once delivered).
        let mut stored: HashMap<&NotificationKey, bool> = HashMap::new();
        for (key, attempt, after) in outcomes {
            let state = match states.get(key) {
                Some(state) => state.clone(),
                None => self.waiting_status(
                    key,
                    !matches!(after, AfterAttempt::Delivered),
                    &mut stored,
                )?,
            };
            let Some(mut status) = state else {
                // Not waiting (delivered by an earlier round, or gone): keep the attempt
                // record only.
                batch.insert(key.attempt_key(attempt.number), encode_json(attempt));
                continue;
            };
            if status.round != attempt.round {
                stale += 1;
                batch.insert(key.attempt_key(attempt.number), encode_json(attempt));
                continue;
            }
            if let AfterAttempt::Delivered = after {
                // The successful attempt lives in the delivered entry: the common case, a
                // first attempt's success, writes that one small entry.
                batch.insert(
                    key.encode(DELIVERED),
                    delivered_value(attempt.at_ms, Some(&encode_json(attempt))),
                );
                states.insert(key, None);
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
            states.insert(key, Some(status));
        }
        for (key, state) in states {
            match state {
                Some(status) => batch.insert(key.encode(STATUS), encode_json(&status)),
                None if stored.get(key).copied().unwrap_or(false) => {
                    batch.remove(key.encode(STATUS))
                }
                None => {}
            }
        }
        self.tree.apply_batch(batch)?;
        reclaim(2 * outcomes.len());
        Ok(stale)
    }

    /// A notification's status if it is waiting (pending or dead), `None` if it is
    /// delivered or, when `created` is needed (a failure: the status is stored), not in the
    /// log; notes in `stored` whether it has a status entry.
    fn waiting_status<'k>(
        &self,
        key: &'k NotificationKey,
        created: bool,
        stored: &mut HashMap<&'k NotificationKey, bool>,
    ) -> Result<Option<Status>, LogError> {
        if self.tree.get(key.encode(DELIVERED))?.is_some() {
            return Ok(None);
        }
        let status_key = key.encode(STATUS);
        if let Some(value) = self.tree.get(&status_key)? {
            stored.insert(key, true);
            return decode_json(&status_key, &value).map(Some);
        }
        stored.insert(key, false);
        if !created {
            // A first attempt's success: only the round counts.
            return Ok(Some(fresh_status(0)));
        }
        Ok(self.find(key)?.map(|(created, _)| fresh_status(created)))
    }

    /// The first `limit` pending and dead notifications, in key order, and how many there
    /// are in all.
    pub fn undelivered(&self, limit: usize) -> Result<Undelivered, LogError> {
        let mut out = Undelivered::default();
        for hook in self.segment_hooks()? {
            let floor = self.floor(&hook)?.1;
            let mut add = |key: NotificationKey, status: Status| {
                out.total += 1;
                if status.dead {
                    out.dead += 1;
                }
                if out.items.len() < limit {
                    out.items.push((key, status));
                }
            };
            for (key, status) in self.waiting_under(&hook, floor.as_ref())? {
                add(key, status);
            }
            self.walk(&hook, floor.as_ref(), u64::MAX, |key, _, mark| {
                if let Mark::Waiting(status, _) = mark {
                    add(key, status);
                }
                Ok(true)
            })?;
        }
        Ok(out)
    }

    /// One notification with its state and attempts.
    pub fn detail(&self, key: &NotificationKey) -> Result<Option<Detail>, LogError> {
        let Some((created, body)) = self.find(key)? else {
            return Ok(None);
        };
        let delivered_key = key.encode(DELIVERED);
        let status_key = key.encode(STATUS);
        // A delivered entry's own successful attempt.
        let mut successful = None;
        let state = if let Some(value) = self.tree.get(&delivered_key)? {
            let entry = split_delivered(&delivered_key, &value)?;
            if let Some(json) = entry.attempt {
                successful = Some(decode_json::<Attempt>(&delivered_key, json)?);
            }
            State::Delivered { at_ms: entry.at_ms }
        } else {
            let status = match self.tree.get(&status_key)? {
                Some(value) => decode_json(&status_key, &value)?,
                None => fresh_status(created),
            };
            if status.dead {
                State::Dead(status)
            } else {
                State::Pending(status)
            }
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
        batch.insert(key.encode(STATUS), encode_json(&status));
        if was_delivered {
            // The successful attempt leaves with the delivered entry: keep it on record.
            for attempt in &detail.attempts {
                batch.insert(key.attempt_key(attempt.number), encode_json(attempt));
            }
            batch.remove(key.encode(DELIVERED));
        }
        // (Under the webhook's floor too, a scan from the start finds it by its status.)
        self.tree.apply_batch(batch)?;
        Ok(true)
    }

    /// Redelivers every dead notification; returns how many.
    pub fn redeliver_dead(&self, now_ms: u64) -> Result<usize, LogError> {
        let mut dead = Vec::new();
        for entry in self.tree.scan_prefix([STATUS]) {
            let (key, value) = entry?;
            let status: Status = decode_json(&key, &value)?;
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
    /// `cutoff_ms`, and moves each webhook's floor up first. Returns how many. Each segment
    /// is rewritten under the status lock, with its delivery entries read again there: a
    /// redelivery meanwhile keeps its notification.
    pub fn prune_delivered(&self, cutoff_ms: u64) -> Result<usize, LogError> {
        let mut pruned = 0;
        for hook in self.segment_hooks()? {
            self.advance_floor(&hook)?;
            let mut candidates = Vec::new();
            for entry in self.tree.scan_prefix(hook_prefix(SEGMENT, &hook)) {
                let (key, value) = entry?;
                // Segments are logged in order, and nothing is delivered before it is logged.
                if segment_notes(&key, &value)?.0 >= cutoff_ms {
                    break;
                }
                candidates.push(key);
            }
            for key in candidates {
                let _status = self.status.lock().unwrap_or_else(|e| e.into_inner());
                let Some(value) = self.tree.get(&key)? else {
                    continue;
                };
                let (created, notes) = parse_segment(&key, &value)?;
                let mut batch = sled::Batch::default();
                let (Some(lo), Some(hi)) = (notes.first(), notes.last()) else {
                    batch.remove(key);
                    self.tree.apply_batch(batch)?;
                    continue;
                };
                let marks = self.marks(&hook, (lo.lsn, lo.ordinal), (hi.lsn, hi.ordinal))?;
                let old = |n: &SegmentNote<'_>| {
                    marks
                        .delivered
                        .get(&(n.lsn, n.ordinal))
                        .is_some_and(|d| decode_ms(d) < cutoff_ms)
                };
                let kept: Vec<SegmentNote<'_>> =
                    notes.iter().filter(|n| !old(n)).copied().collect();
                if kept.len() == notes.len() {
                    continue;
                }
                for n in notes.iter().filter(|n| old(n)) {
                    let nkey = NotificationKey {
                        hook: hook.clone(),
                        lsn: n.lsn,
                        ordinal: n.ordinal,
                    };
                    for attempt in self.tree.scan_prefix(nkey.encode(ATTEMPT)) {
                        batch.remove(attempt?.0);
                    }
                    batch.remove(nkey.encode(DELIVERED));
                    pruned += 1;
                }
                let removed = notes.len() - kept.len();
                if kept.is_empty() {
                    batch.remove(key);
                } else {
                    batch.insert(key, segment_value(created, kept));
                }
                self.tree.apply_batch(batch)?;
                self.cut_segments();
                reclaim(2 * removed);
            }
        }
        Ok(pruned)
    }

    /// The webhooks that have pending or dead notifications.
    pub fn hooks_with_undelivered(&self) -> Result<Vec<String>, LogError> {
        let mut hooks = Vec::new();
        for hook in self.segment_hooks()? {
            let floor = self.floor(&hook)?.1;
            // A status entry is a waiting notification's.
            let mut waiting = self
                .tree
                .scan_prefix(hook_prefix(STATUS, &hook))
                .next()
                .is_some();
            if !waiting {
                self.walk(&hook, floor.as_ref(), u64::MAX, |_, _, mark| {
                    waiting = matches!(mark, Mark::Waiting(..));
                    Ok(!waiting)
                })?;
            }
            if waiting {
                hooks.push(hook);
            }
        }
        Ok(hooks)
    }

    /// Counts of notifications and attempts, for tests and status output.
    pub fn counts(&self) -> Result<Counts, LogError> {
        let mut counts = Counts::default();
        for entry in self.tree.iter() {
            let (key, value) = entry?;
            match key.first() {
                Some(&SEGMENT) => counts.notifications += parse_segment(&key, &value)?.1.len(),
                Some(&DELIVERED) => {
                    counts.delivered += 1;
                    if decode_ms_raw(&value) & WITH_ATTEMPT != 0 {
                        counts.attempts += 1;
                    }
                }
                Some(&STATUS) => {
                    counts.dead += usize::from(decode_json::<Status>(&key, &value)?.dead);
                }
                Some(&ATTEMPT) => counts.attempts += 1,
                _ => {}
            }
        }
        counts.pending = counts
            .notifications
            .saturating_sub(counts.delivered + counts.dead);
        Ok(counts)
    }

    /// Moves `hook`'s floor past its delivered notifications and those with a status entry,
    /// up to the first one never attempted, so that scans from the start skip them (and
    /// find the waiting ones below it by their status entries). Returns whether it moved.
    /// (Compared and swapped: of two concurrent moves, the one from an older floor loses.)
    pub fn advance_floor(&self, hook: &str) -> Result<bool, LogError> {
        let (stored, floor) = self.floor(hook)?;
        let mut to = None;
        let mut passed = 0;
        self.walk(hook, floor.as_ref(), u64::MAX, |key, _, mark| {
            Ok(match mark {
                Mark::Delivered | Mark::Waiting(_, true) => {
                    to = Some(key);
                    passed += 1;
                    // A long way (a first move over a converted log): the rest next time.
                    passed < FLOOR_STEP
                }
                Mark::Waiting(_, false) => false,
            })
        })?;
        let Some(to) = to else {
            return Ok(false);
        };
        let mut value = to.lsn.to_be_bytes().to_vec();
        value.extend_from_slice(&to.ordinal.to_be_bytes());
        Ok(self
            .tree
            .compare_and_swap(floor_key(hook), stored, Some(value))?
            .is_ok())
    }

    /// `hook`'s floor entry as stored, and the notification it names, if any.
    fn floor(&self, hook: &str) -> Result<(Option<sled::IVec>, Option<NotificationKey>), LogError> {
        let stored = self.tree.get(floor_key(hook))?;
        let at = stored.as_deref().and_then(|v| {
            let lsn = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
            let ordinal = u32::from_be_bytes(v.get(8..12)?.try_into().ok()?);
            Some(NotificationKey {
                hook: hook.to_string(),
                lsn,
                ordinal,
            })
        });
        Ok((stored, at))
    }

    /// The key of the segment that holds `key`, if any: the last one starting at or before it.
    fn segment_of(&self, key: &NotificationKey) -> Result<Option<Vec<u8>>, LogError> {
        let prefix = hook_prefix(SEGMENT, &key.hook);
        match self.tree.range(prefix..=key.encode(SEGMENT)).next_back() {
            Some(entry) => Ok(Some(entry?.0.to_vec())),
            None => Ok(None),
        }
    }

    /// A notification's logging time and body.
    fn find(&self, key: &NotificationKey) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        self.find_near(key, &mut SegmentCache::default())
    }

    /// [`find`](Self::find), looking first in the segment `cache` holds, which then holds
    /// the segment read.
    fn find_near(
        &self,
        key: &NotificationKey,
        cache: &mut SegmentCache,
    ) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        let prefix = hook_prefix(SEGMENT, &key.hook);
        // Read before the segment: a cut after this makes the cache stale.
        let cuts = self.segments_cut.load(std::sync::atomic::Ordering::Acquire);
        if let Some((filled, segment, value)) = &cache.0 {
            if *filled == cuts && segment.starts_with(&prefix) {
                if let Some(found) = note_in(segment, value, key)? {
                    return Ok(Some(found));
                }
            }
        }
        let Some(entry) = self.tree.range(prefix..=key.encode(SEGMENT)).next_back() else {
            return Ok(None);
        };
        let (segment, value) = entry?;
        let found = note_in(&segment, &value, key)?;
        cache.0 = Some((cuts, segment, value));
        Ok(found)
    }

    /// Marks every [`SegmentCache`] stale (after a write took notifications out of
    /// segments).
    fn cut_segments(&self) {
        self.segments_cut
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The body of a notification, looking first in the segment `cache` holds (a queue
    /// sends the notifications of a segment one after the other). A notification is in one
    /// segment at most and its body never changes, so a segment read earlier that holds it
    /// holds its body, unless it was taken out since (pruned, or a leftover ordinal): then
    /// the cache is stale and not used.
    pub fn body_near(
        &self,
        key: &NotificationKey,
        cache: &mut SegmentCache,
    ) -> Result<Option<Vec<u8>>, LogError> {
        Ok(self.find_near(key, cache)?.map(|(_, body)| body))
    }

    /// Delivered entries and statuses of `hook`'s notifications from `lo` to `hi`.
    fn marks(&self, hook: &str, lo: (u64, u32), hi: (u64, u32)) -> Result<Marks, LogError> {
        let at = |kind: u8, (lsn, ordinal): (u64, u32)| {
            NotificationKey {
                hook: hook.to_string(),
                lsn,
                ordinal,
            }
            .encode(kind)
        };
        let mut marks = Marks::default();
        for entry in self.tree.range(at(DELIVERED, lo)..=at(DELIVERED, hi)) {
            let (key, value) = entry?;
            let k = decode_key(&key)?;
            marks.delivered.insert((k.lsn, k.ordinal), value);
        }
        for entry in self.tree.range(at(STATUS, lo)..=at(STATUS, hi)) {
            let (key, value) = entry?;
            let k = decode_key(&key)?;
            marks
                .status
                .insert((k.lsn, k.ordinal), decode_json(&key, &value)?);
        }
        Ok(marks)
    }

    /// Visits `hook`'s notifications in key order after `after` (all when `None`), of
    /// transactions up to `up_to_lsn`, each with its body and where it stands, while
    /// `visit` returns true.
    fn walk(
        &self,
        hook: &str,
        after: Option<&NotificationKey>,
        up_to_lsn: u64,
        mut visit: impl FnMut(NotificationKey, &[u8], Mark) -> Result<bool, LogError>,
    ) -> Result<(), LogError> {
        let start = match after {
            Some(key) => self.segment_of(key)?,
            None => None,
        }
        .unwrap_or_else(|| hook_prefix(SEGMENT, hook));
        let end = NotificationKey {
            hook: hook.to_string(),
            lsn: up_to_lsn,
            ordinal: u32::MAX,
        }
        .encode(SEGMENT);
        // The last notification visited: one an overlapping segment repeats is skipped.
        let mut last = after.map(|k| (k.lsn, k.ordinal));
        for entry in self.tree.range(start..=end) {
            let (key, value) = entry?;
            let (created, mut notes) = parse_segment(&key, &value)?;
            if let Some(l) = last {
                notes.retain(|n| (n.lsn, n.ordinal) > l);
            }
            let (Some(lo), Some(hi)) = (notes.first(), notes.last()) else {
                continue;
            };
            // (Only those after `after`: a queue reads on from the middle of a segment.)
            let marks = self.marks(hook, (lo.lsn, lo.ordinal), (hi.lsn, hi.ordinal))?;
            for n in &notes {
                let at = (n.lsn, n.ordinal);
                if n.lsn > up_to_lsn {
                    return Ok(());
                }
                if last.is_some_and(|l| at <= l) {
                    continue;
                }
                last = Some(at);
                let mark = if marks.delivered.contains_key(&at) {
                    Mark::Delivered
                } else {
                    match marks.status.get(&at) {
                        Some(status) => Mark::Waiting(status.clone(), true),
                        None => Mark::Waiting(fresh_status(created), false),
                    }
                };
                let key = NotificationKey {
                    hook: hook.to_string(),
                    lsn: n.lsn,
                    ordinal: n.ordinal,
                };
                if !visit(key, n.body, mark)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Every webhook with notifications in the log, in key order: one seek per webhook.
    fn segment_hooks(&self) -> Result<Vec<String>, LogError> {
        let mut hooks = Vec::new();
        let mut from = vec![SEGMENT];
        while let Some(entry) = self.tree.range(from.clone()..).next() {
            let (key, _) = entry?;
            if key.first() != Some(&SEGMENT) {
                break;
            }
            let key = decode_key(&key)?;
            // Just past every key of this webhook (the NUL after its id is followed by
            // binary LSNs; 0x01 sorts after the NUL).
            from = hook_prefix(SEGMENT, &key.hook);
            if let Some(last) = from.last_mut() {
                *last = 1;
            }
            hooks.push(key.hook);
        }
        Ok(hooks)
    }
}

/// Where a notification stands.
enum Mark {
    Delivered,
    /// Pending or dead; whether the status is stored (a `u` entry) rather than a fresh one.
    Waiting(Status, bool),
}

/// The delivery entries of a range of one webhook's notifications, by (LSN, ordinal).
#[derive(Default)]
struct Marks {
    delivered: HashMap<(u64, u32), sled::IVec>,
    status: HashMap<(u64, u32), Status>,
}

/// One notification in a segment.
#[derive(Clone, Copy)]
struct SegmentNote<'a> {
    lsn: u64,
    ordinal: u32,
    body: &'a [u8],
}

impl<'a> SegmentNote<'a> {
    fn of(key: &NotificationKey, body: &'a [u8]) -> SegmentNote<'a> {
        SegmentNote {
            lsn: key.lsn,
            ordinal: key.ordinal,
            body,
        }
    }
}

/// A segment value: when it was logged, then each notification's LSN, ordinal, body length
/// and body.
fn segment_value<'a>(created_ms: u64, notes: impl IntoIterator<Item = SegmentNote<'a>>) -> Vec<u8> {
    let mut value = created_ms.to_be_bytes().to_vec();
    for n in notes {
        value.extend_from_slice(&n.lsn.to_be_bytes());
        value.extend_from_slice(&n.ordinal.to_be_bytes());
        value.extend_from_slice(&(n.body.len() as u32).to_be_bytes());
        value.extend_from_slice(n.body);
    }
    value
}

/// A segment's logging time and its notifications, read one at a time.
fn segment_notes<'a>(key: &[u8], value: &'a [u8]) -> Result<(u64, SegmentNotes<'a>), LogError> {
    let created = value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| segment_corrupt(key))?;
    Ok((
        created,
        SegmentNotes {
            key: key.to_vec(),
            rest: &value[8..],
        },
    ))
}

/// The logging time and body of `key`'s notification if segment `segment` holds it (header
/// by header, copying only that body).
fn note_in(
    segment: &[u8],
    value: &[u8],
    key: &NotificationKey,
) -> Result<Option<(u64, Vec<u8>)>, LogError> {
    let (created, mut notes) = segment_notes(segment, value)?;
    notes
        .find(|n| {
            n.as_ref()
                .map_or(true, |n| (n.lsn, n.ordinal) == (key.lsn, key.ordinal))
        })
        .transpose()
        .map(|n| n.map(|n| (created, n.body.to_vec())))
}

/// The last segment read by [`Log::body_near`]: how many segment cuts had been made when it
/// was read, its key and its value (shared with sled's cache, not copied).
#[derive(Default)]
pub struct SegmentCache(Option<(u64, sled::IVec, sled::IVec)>);

impl SegmentCache {
    /// Lets go of the segment.
    pub fn clear(&mut self) {
        self.0 = None;
    }
}

/// A segment's logging time and all its notifications.
fn parse_segment<'a>(key: &[u8], value: &'a [u8]) -> Result<(u64, Vec<SegmentNote<'a>>), LogError> {
    let (created, notes) = segment_notes(key, value)?;
    Ok((created, notes.collect::<Result<_, _>>()?))
}

fn segment_corrupt(key: &[u8]) -> LogError {
    LogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: "segment shorter than its lengths say".into(),
    }
}

/// The notifications of a segment value, header by header (a body is not copied).
struct SegmentNotes<'a> {
    key: Vec<u8>,
    rest: &'a [u8],
}

impl<'a> Iterator for SegmentNotes<'a> {
    type Item = Result<SegmentNote<'a>, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let note = (|| {
            let head = self.rest.get(..16)?;
            let lsn = u64::from_be_bytes(head[..8].try_into().ok()?);
            let ordinal = u32::from_be_bytes(head[8..12].try_into().ok()?);
            let len = u32::from_be_bytes(head[12..16].try_into().ok()?) as usize;
            let body = self.rest.get(16..16 + len)?;
            self.rest = &self.rest[16 + len..];
            Some(SegmentNote { lsn, ordinal, body })
        })();
        if note.is_none() {
            self.rest = &[];
        }
        Some(note.ok_or_else(|| segment_corrupt(&self.key)))
    }
}

/// The status of a notification never attempted, logged at `created_ms`.
fn fresh_status(created_ms: u64) -> Status {
    Status {
        attempts: 0,
        round_failures: 0,
        next_at_ms: created_ms,
        dead: false,
        created_ms,
        round: 0,
    }
}

fn floor_key(hook: &str) -> Vec<u8> {
    let mut key = vec![FLOOR];
    key.extend_from_slice(hook.as_bytes());
    key
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

/// A journal entry's key: its write's sequence number, then its chunk.
#[cfg(test)]
fn journal_key(sequence: u64, chunk: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(13);
    key.push(JOURNAL);
    key.extend_from_slice(&sequence.to_be_bytes());
    key.extend_from_slice(&chunk.to_be_bytes());
    key
}

/// Row state entries as journal values of up to [`SEGMENT_BYTES`] each (a larger entry
/// alone): per entry the key's length (4 bytes, big-endian) and key, then 0 for a removal
/// or 1, the value's length (4) and value. (What the earlier walhook wrote; tests make
/// journals with it.)
#[cfg(test)]
fn encode_journal<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut chunk: Vec<u8> = Vec::new();
    for (key, value) in entries {
        let size = 9 + key.len() + value.as_ref().map_or(0, Vec::len);
        if !chunk.is_empty() && chunk.len() + size > SEGMENT_BYTES {
            chunks.push(std::mem::take(&mut chunk));
        }
        chunk.extend_from_slice(&(key.len() as u32).to_be_bytes());
        chunk.extend_from_slice(key);
        match value {
            None => chunk.push(0),
            Some(value) => {
                chunk.push(1);
                chunk.extend_from_slice(&(value.len() as u32).to_be_bytes());
                chunk.extend_from_slice(value);
            }
        }
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

/// A raw entry to write: a key, and its value (`None` removes it).
type Entry = (Vec<u8>, Option<Vec<u8>>);
type Entries = Vec<Entry>;

/// The entries of one journal value (see [`encode_journal`]).
fn decode_journal(key: &[u8], value: &[u8]) -> Result<Entries, LogError> {
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        *rest = tail;
        Some(head)
    }
    fn sized<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
        let length = take(rest, 4)?;
        take(rest, u32::from_be_bytes(length.try_into().ok()?) as usize)
    }
    let corrupt = |reason: &str| LogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: format!("journal entry: {reason}"),
    };
    let mut rest = value;
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let entry_key = sized(&mut rest).ok_or_else(|| corrupt("ends early"))?;
        let entry_value = match take(&mut rest, 1) {
            Some([0]) => None,
            Some([1]) => Some(
                sized(&mut rest)
                    .ok_or_else(|| corrupt("ends early"))?
                    .to_vec(),
            ),
            Some(_) => return Err(corrupt("unknown entry kind")),
            None => return Err(corrupt("ends early")),
        };
        entries.push((entry_key.to_vec(), entry_value));
    }
    Ok(entries)
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
/// JSON). Layouts 2 and 3 had the body after it.
fn delivered_value(at_ms: u64, attempt_json: Option<&[u8]>) -> Vec<u8> {
    let mut value = Vec::with_capacity(12 + attempt_json.map_or(0, <[u8]>::len));
    match attempt_json {
        Some(json) => {
            value.extend_from_slice(&(at_ms | WITH_ATTEMPT).to_be_bytes());
            value.extend_from_slice(&(json.len() as u32).to_be_bytes());
            value.extend_from_slice(json);
        }
        None => value.extend_from_slice(&at_ms.to_be_bytes()),
    }
    value
}

/// A `d` value's parts.
struct DeliveredEntry<'a> {
    at_ms: u64,
    /// The successful attempt's JSON, if the entry holds it.
    attempt: Option<&'a [u8]>,
    /// Layouts 2 and 3 only (empty once converted).
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

    /// A new log in a temporary dir (kept while the dir lives).
    fn fresh_log() -> (tempfile::TempDir, Log) {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path()).expect("open");
        (dir, log)
    }

    /// Opens a log closed a moment ago: sled releases its lock from a background thread.
    fn reopen(dir: &Path) -> Result<Log, LogError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Log::open(dir) {
                Err(LogError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// Raw entries of `kind` (for counting what a change writes).
    fn entries_of(log: &Log, kind: u8) -> usize {
        log.tree.scan_prefix([kind]).count()
    }

    #[test]
    fn a_delivery_keeps_its_successful_attempt_in_the_delivered_entry() {
        let (_dir, log) = fresh_log();
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
    fn layout_2_and_3_entries_convert_to_segments_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (old2, old3, fresh, dead) = (
            note("h", 7, 0),
            note("h", 8, 0),
            note("h", 9, 0),
            note("h", 9, 1),
        );
        let dead_status = Status {
            attempts: 3,
            round_failures: 3,
            next_at_ms: 77,
            dead: true,
            created_ms: 9,
            round: 0,
        };
        {
            let log = Log::open(dir.path()).expect("open");
            // Layout 2's delivered entry: time, body; its attempt apart.
            let mut v2 = 4242u64.to_be_bytes().to_vec();
            v2.extend_from_slice(&old2.body);
            // Layout 3's: time with the flag, its attempt, the body.
            let mut v3 = delivered_value(4343, Some(&encode_json(&attempt(1, 200))));
            v3.extend_from_slice(&old3.body);
            log.write_raw(&[
                (old2.key.encode(DELIVERED), Some(v2)),
                (old2.key.attempt_key(1), Some(encode_json(&attempt(1, 200)))),
                (old3.key.encode(DELIVERED), Some(v3)),
                (
                    fresh.key.encode(PENDING),
                    Some(pending_value(&encode_json(&fresh_status(9)), &fresh.body)),
                ),
                (
                    dead.key.encode(PENDING),
                    Some(pending_value(&encode_json(&dead_status), &dead.body)),
                ),
                (dead.key.attempt_key(3), Some(encode_json(&attempt(3, 500)))),
                (LAYOUT.to_vec(), Some(vec![3])),
            ])
            .expect("layout 3");
        }
        let log = reopen(dir.path()).expect("reopen");
        assert_eq!(
            log.get_raw(LAYOUT).expect("layout").as_deref(),
            Some(&[LAYOUT_VERSION][..])
        );
        assert_eq!(entries_of(&log, PENDING), 0);
        let d = log.detail(&old2.key).expect("detail").expect("exists");
        assert!(matches!(d.state, State::Delivered { at_ms: 4242 }));
        assert_eq!((d.body, d.attempts), (old2.body, vec![attempt(1, 200)]));
        let d = log.detail(&old3.key).expect("detail").expect("exists");
        assert!(matches!(d.state, State::Delivered { at_ms: 4343 }));
        assert_eq!((d.body, d.attempts), (old3.body, vec![attempt(1, 200)]));
        let d = log.detail(&fresh.key).expect("detail").expect("exists");
        assert_eq!(
            (d.state, d.body),
            (State::Pending(fresh_status(9)), fresh.body)
        );
        let d = log.detail(&dead.key).expect("detail").expect("exists");
        assert_eq!((d.state, d.body), (State::Dead(dead_status), dead.body));
        assert_eq!(entries_of(&log, STATUS), 1, "a fresh status is not stored");
        let counts = log.counts().expect("counts");
        assert_eq!(
            (
                counts.notifications,
                counts.pending,
                counts.dead,
                counts.delivered
            ),
            (4, 1, 1, 2)
        );
        // Opening again converts nothing more.
        drop(log);
        let log = reopen(dir.path()).expect("third open");
        assert_eq!(log.counts().expect("counts"), counts);
    }

    #[test]
    fn a_write_is_one_segment_per_webhook_up_to_the_segment_size() {
        let (_dir, log) = fresh_log();
        let small: Vec<NewNotification> = (0..100u32)
            .flat_map(|i| {
                [
                    note("a", 10 + u64::from(i), 0),
                    note("b", 10 + u64::from(i), 0),
                ]
            })
            .collect();
        log.append(&small, None, 0).expect("append");
        assert_eq!(entries_of(&log, SEGMENT), 2);
        // Bodies of 5 KB: three per segment.
        let big: Vec<NewNotification> = (0..7u32)
            .map(|i| NewNotification {
                key: key("c", 1, i),
                body: vec![b'x'; 5000],
            })
            .collect();
        log.append(&big, None, 0).expect("append");
        assert_eq!(entries_of(&log, SEGMENT), 2 + 3);
        let all = log
            .pending("c", None, u64::MAX, 100)
            .expect("pending")
            .items;
        assert_eq!(all.len(), 7);
        for n in big.iter().chain(&small) {
            assert_eq!(log.body(&n.key).expect("body").as_ref(), Some(&n.body));
        }
    }

    #[test]
    fn bodies_read_near_a_cached_segment_are_those_of_the_log() {
        let (_dir, log) = fresh_log();
        // Webhook "a": two segments (5 KB bodies, three per segment); "b": one.
        let notes: Vec<NewNotification> = (0..6u32)
            .map(|i| NewNotification {
                key: key("a", 1, i),
                body: format!("{i}").repeat(5000).into_bytes(),
            })
            .chain((0..3u32).map(|i| note("b", 1, i)))
            .collect();
        log.append(&notes, None, 0).expect("append");
        assert_eq!(entries_of(&log, SEGMENT), 3);
        let mut cache = SegmentCache::default();
        // In order, backwards, across webhooks, and twice over: always the body asked for.
        let order = [0, 1, 2, 3, 4, 5, 8, 7, 6, 5, 0, 6, 4, 2];
        for at in order {
            let n = &notes[at];
            assert_eq!(
                log.body_near(&n.key, &mut cache).expect("body").as_ref(),
                Some(&n.body),
                "{}",
                n.key
            );
        }
        // Not in the log (past the cached segment's last notification, or another
        // webhook's key where the cached segment has the same LSN and ordinal).
        for missing in [key("a", 1, 6), key("c", 1, 0), key("a", 2, 0)] {
            assert_eq!(log.body_near(&missing, &mut cache).expect("read"), None);
        }
        // Taken out of its segment after the cache read it: not answered from the cache.
        assert!(log
            .body_near(&key("b", 1, 2), &mut cache)
            .expect("body")
            .is_some());
        log.truncate_transaction("b", 1, 2).expect("truncate");
        assert_eq!(
            log.body_near(&key("b", 1, 2), &mut cache).expect("read"),
            None
        );
        assert!(log
            .body_near(&key("b", 1, 1), &mut cache)
            .expect("body")
            .is_some());
    }

    #[test]
    fn a_transaction_written_again_replaces_the_segments_of_the_earlier_pass() {
        let (_dir, log) = fresh_log();
        // An interrupted pass wrote transaction 5 in two chunks, and one more notification.
        log.append(&[note("h", 5, 0), note("h", 5, 1)], None, 0)
            .expect("chunk");
        log.append(
            &[note("h", 5, 2), note("h", 5, 3), note("h", 5, 4)],
            None,
            0,
        )
        .expect("chunk");
        // This pass writes it at once, with one notification fewer.
        let again: Vec<NewNotification> = (0..4).map(|i| note("h", 5, i)).collect();
        log.append(&again, None, 0).expect("again");
        log.truncate_transaction("h", 5, 4).expect("truncate");
        let keys: Vec<u32> = log
            .pending("h", None, u64::MAX, 100)
            .expect("pending")
            .items
            .into_iter()
            .map(|(k, _)| k.ordinal)
            .collect();
        assert_eq!(keys, vec![0, 1, 2, 3]);
        assert_eq!(log.counts().expect("counts").notifications, 4);
    }

    #[test]
    fn a_segment_shorter_than_its_lengths_is_reported_corrupt() {
        let (_dir, log) = fresh_log();
        let n = note("h", 3, 0);
        let mut value = segment_value(1, [SegmentNote::of(&n.key, &n.body)]);
        value.truncate(value.len() - 1);
        log.write_raw(&[(n.key.encode(SEGMENT), Some(value))])
            .expect("raw");
        match log.body(&n.key) {
            Err(LogError::Corrupt { reason, .. }) => assert!(reason.contains("segment")),
            other => panic!("not reported corrupt: {other:?}"),
        }
        assert!(log.pending("h", None, u64::MAX, 10).is_err());
    }

    #[test]
    fn the_floor_skips_delivered_notifications_and_keeps_waiting_ones_in_view() {
        let (_dir, log) = fresh_log();
        let notes: Vec<NewNotification> =
            (0..6u32).map(|i| note("h", 1 + u64::from(i), 0)).collect();
        log.append(&notes, None, 0).expect("append");
        let from_start = |log: &Log| -> Vec<u64> {
            log.pending("h", None, u64::MAX, 100)
                .expect("pending")
                .items
                .into_iter()
                .map(|(k, _)| k.lsn)
                .collect()
        };
        for i in [0, 1, 2, 4] {
            log.record_attempt(&notes[i].key, &attempt(1, 200), AfterAttempt::Delivered)
                .expect("delivered");
        }
        // The fifth is delivered too, but the fourth was never attempted: the floor stops
        // before it.
        assert!(log.advance_floor("h").expect("floor"));
        assert_eq!(log.floor("h").expect("floor").1, Some(notes[2].key.clone()));
        assert!(
            !log.advance_floor("h").expect("floor"),
            "nothing more to skip"
        );
        assert_eq!(from_start(&log), vec![4, 6]);
        // A redelivered notification under the floor is found from the start by its status.
        assert!(log.redeliver(&notes[1].key, 5).expect("redeliver"));
        assert_eq!(from_start(&log), vec![2, 4, 6]);
        // A failed one does not hold the floor back either, and a dead one is not pending.
        log.record_attempt(&notes[3].key, &attempt(1, 500), AfterAttempt::Dead)
            .expect("dead");
        assert!(log.advance_floor("h").expect("floor"));
        assert_eq!(log.floor("h").expect("floor").1, Some(notes[4].key.clone()));
        assert_eq!(from_start(&log), vec![2, 6]);
        // A page that ends among the status entries goes on from there.
        let first = log.pending("h", None, u64::MAX, 1).expect("pending");
        assert_eq!(first.items.len(), 1);
        let next = log
            .pending("h", first.scanned_to.as_ref(), u64::MAX, 10)
            .expect("pending");
        let lsns: Vec<u64> = next.items.into_iter().map(|(k, _)| k.lsn).collect();
        assert_eq!(lsns, vec![6]);
        let undelivered = log.undelivered(10).expect("undelivered");
        assert_eq!((undelivered.total, undelivered.dead), (3, 1));
        assert_eq!(log.hooks_with_undelivered().expect("hooks"), vec!["h"]);
        // Delivered again: gone from view, floor or not.
        let mut again = attempt(2, 200);
        again.round = 1;
        log.record_attempt(&notes[1].key, &again, AfterAttempt::Delivered)
            .expect("delivered");
        assert_eq!(from_start(&log), vec![6]);
        assert_eq!(log.counts().expect("counts").pending, 1);
    }

    #[test]
    fn a_huge_transactions_early_chunks_survive_the_group_that_ends_it() {
        let (_dir, log) = fresh_log();
        // Transaction 20's first chunks are written while it is still open; transaction 10,
        // committed before it began, waits in the group that 20's commit joins.
        log.append(&[note("h", 20, 0), note("h", 20, 1)], None, 0)
            .expect("chunk");
        log.append(&[note("h", 20, 2), note("h", 20, 3)], None, 0)
            .expect("chunk");
        log.append(
            &[note("h", 10, 0), note("h", 20, 4), note("h", 20, 5)],
            Some(Position {
                commit_lsn: 20,
                end_lsn: 21,
            }),
            0,
        )
        .expect("group");
        let keys: Vec<(u64, u32)> = log
            .pending("h", None, 20, 100)
            .expect("pending")
            .items
            .into_iter()
            .map(|(k, _)| (k.lsn, k.ordinal))
            .collect();
        assert_eq!(
            keys,
            vec![
                (10, 0),
                (20, 0),
                (20, 1),
                (20, 2),
                (20, 3),
                (20, 4),
                (20, 5)
            ]
        );
        for n in [note("h", 20, 0), note("h", 20, 3), note("h", 20, 5)] {
            assert_eq!(log.body(&n.key).expect("body"), Some(n.body));
        }
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
        let (_dir, log) = fresh_log();
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
        let (_dir, log) = fresh_log();
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
        let (_dir, log) = fresh_log();
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
        let (_dir, log) = fresh_log();
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
        let log = reopen(dir.path()).expect("reopen converts");
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
        let (_dir, log) = fresh_log();
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
        let (_dir, log) = fresh_log();
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
        let (_dir, log) = fresh_log();
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
        let (_dir, log) = fresh_log();
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
        match reopen(dir.path()) {
            Err(e @ LogError::Layout { .. }) => assert!(e.to_string().contains("newer walhook")),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("opened a newer layout"),
        }
    }

    proptest::proptest! {
        #[test]
        fn journal_entries_round_trip_in_chunks(
            entries in proptest::collection::vec(
                (proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
                 proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..9000))),
                0..12),
        ) {
            let chunks = encode_journal(&entries);
            let mut decoded = Vec::new();
            for chunk in &chunks {
                let mut one = decode_journal(b"j", chunk).expect("decodes");
                // Over a chunk's size only when it holds one entry.
                proptest::prop_assert!(chunk.len() <= SEGMENT_BYTES || one.len() == 1);
                decoded.append(&mut one);
            }
            proptest::prop_assert_eq!(decoded, entries);
        }

        #[test]
        fn decoding_a_journal_entry_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let _ = decode_journal(b"j", &bytes);
        }
    }

    #[test]
    fn a_layout_4_dir_opens_as_the_current_one_keeping_its_row_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let row = crate::state::row_key("public.accounts", "1");
        // A row as layout 4 wrote it: each record whole.
        let first = [
            &14u32.to_be_bytes()[..],
            b"account_active",
            &9u32.to_be_bytes()[..],
            &[1],
            &7u64.to_be_bytes()[..],
        ]
        .concat();
        {
            let log = Log::open(dir.path()).expect("open");
            log.write_raw(&[
                (LAYOUT.to_vec(), Some(vec![4])),
                (row.clone(), Some(first.clone())),
            ])
            .expect("layout 4");
        }
        let log = reopen(dir.path()).expect("reopen");
        assert_eq!(
            log.get_raw(LAYOUT).expect("layout").as_deref(),
            Some(&[LAYOUT_VERSION][..])
        );
        let bytes = log.get_raw(&row).expect("row").expect("kept");
        assert_eq!(bytes.as_ref(), &first[..]);
        let packed = crate::state::Packed::decode(&bytes).expect("decodes");
        let record = packed.get("account_active").expect("record");
        assert_eq!((record.value, record.lsn), (crate::state::Known::True, 7));
    }

    /// Row state entries `t<i>` of `size`-byte values (`fill` repeated).
    fn rows(count: usize, size: usize, fill: u8) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        (0..count)
            .map(|i| (format!("t{i:05}").into_bytes(), Some(vec![fill; size])))
            .collect()
    }

    fn journal_left(log: &Log) -> usize {
        log.tree.scan_prefix([JOURNAL]).count()
    }

    #[test]
    fn a_large_state_write_is_written_whole_with_its_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path()).expect("open");
        log.write_raw(&rows(10, 5, b'a')).expect("small write");
        // Many entries, a removal among them, values over a segment's size.
        let mut state = rows(3000, 300, b'b');
        state[3].1 = None;
        state[7].1 = Some(vec![b'c'; SEGMENT_BYTES + 10]);
        state[9].1 = Some(vec![b'd'; 64 * 1024 + 1]);
        let position = Position {
            commit_lsn: 9,
            end_lsn: 10,
        };
        log.append_with_state(&[note("h", 9, 0)], &state, Some(position), 1)
            .expect("large write");
        assert_eq!(journal_left(&log), 0);
        for (key, value) in &state {
            assert_eq!(log.get_raw(key).expect("read").as_deref(), value.as_deref());
        }
        assert_eq!(log.position().expect("position"), Some(position));
        assert_eq!(log.counts().expect("counts").notifications, 1);
    }

    #[test]
    fn a_journal_left_by_a_crash_is_written_out_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut state = rows(300, 200, b'n');
        state[0].1 = None;
        {
            let log = Log::open(dir.path()).expect("open");
            log.write_raw(&rows(2, 5, b'o')).expect("old rows");
            // What a crash after the batch leaves: the journal, its entries not written
            // out (`t00001` still has its old value); a later journal too.
            let chunks = encode_journal(&state);
            assert!(chunks.len() > 1, "{} chunks", chunks.len());
            let mut raw: Vec<_> = chunks
                .into_iter()
                .enumerate()
                .map(|(i, c)| (journal_key(3, i as u32), Some(c)))
                .collect();
            raw.push((
                journal_key(4, 0),
                Some(encode_journal(&rows(1, 3, b'z'))[0].clone()),
            ));
            log.tree
                .apply_batch(raw.iter().fold(sled::Batch::default(), |mut b, (k, v)| {
                    b.insert(k.as_slice(), v.as_deref().expect("value"));
                    b
                }))
                .expect("journal");
            assert_eq!(
                log.get_raw(b"t00001").expect("read").as_deref(),
                Some(&b"ooooo"[..])
            );
        }
        let log = reopen(dir.path()).expect("reopen");
        assert_eq!(journal_left(&log), 0);
        // Journal 3 removes `t00000`, the later 4 writes it again: written out in order.
        assert_eq!(
            log.get_raw(b"t00000").expect("read").as_deref(),
            Some(&b"zzz"[..])
        );
        for (key, value) in &state[1..] {
            assert_eq!(log.get_raw(key).expect("read").as_deref(), value.as_deref());
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
