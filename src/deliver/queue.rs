//! One webhook's delivery queue: reads its pending notifications from the log, sends them,
//! records every attempt, and schedules retries.
//!
//! Each webhook has its own task, HTTP concurrency limit and window, so a slow or dead
//! endpoint only ever delays itself (DESIGN.md invariant 7). Memory is bounded: the queue
//! holds a window of notifications in memory and reads the next ones from the log as the
//! window drains, so a dead endpoint fills the log on disk, not the heap.
//!
//! ```text
//!  log (pending, up to the durable LSN) ──refill──► window ──due──► attempt task (≤ max_in_flight)
//!        ▲                                            ▲                     │
//!        └──── record attempt: delivered / retry / dead ◄──── outcome ──────┘
//! ```
//!
//! With `ordered = true` the window is sorted by commit order and only its head is ever in
//! flight: a failing head blocks the webhook until it is delivered or parked as dead.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::config::Webhook;
use crate::deliver::http::{Endpoint, Outcome};
use crate::log::{
    now_ms, AfterAttempt, Attempt, Log, LogError, NotificationKey, Position, SegmentCache, Status,
};

/// How many notifications one webhook keeps in memory at most, besides those in flight.
const MIN_WINDOW: usize = 256;

/// Finished attempts are written to the log together (sled forces two disk writes around
/// every batch, and every read in the process waits while one is applied, which at
/// thousands of deliveries a second costs more than the HTTP requests): at most this long
/// after the first of them finished (a crash in between only sends those again), ...
const RECORD_DELAY: Duration = Duration::from_millis(50);
/// ... or as soon as this many are waiting, and always before the queue reads the log from
/// its start again.
const RECORD_BATCH: usize = 256;

/// The webhook's floor in the log moves at most this often.
const FLOOR_EVERY: Duration = Duration::from_secs(1);

/// Where a notification sorts in the window: by due time, or by commit order when ordered.
type Slot = (u64, NotificationKey);

struct Finished {
    key: NotificationKey,
    status: Status,
    attempt: u32,
    payload_sha256: String,
    outcome: Outcome,
}

/// One webhook's queue.
pub struct Queue {
    webhook: Webhook,
    endpoint: Arc<Endpoint>,
    log: Log,
    /// The last transaction flushed to the log: nothing later is delivered, so
    /// a receiver never sees a notification the log could lose.
    durable: watch::Receiver<Position>,
    window: BTreeMap<Slot, Status>,
    in_flight: usize,
    /// The last key read from the log; the next refill reads after it.
    cursor: Option<NotificationKey>,
    /// False once the stream has gone (shutdown): `durable` will not change any more.
    streaming: bool,
    /// Bumped when notifications behind the cursor became pending again (a redelivery).
    rescan: watch::Receiver<u64>,
    /// False once the control socket has gone (it could not bind, or shutdown): `rescan`
    /// will not change any more, and polling a closed channel would spin.
    rescanning: bool,
    /// Keys being attempted right now, so a rescan does not send them twice.
    in_flight_keys: HashSet<NotificationKey>,
    /// The earliest due time of retries evicted from a full window: a rescan brings them back.
    evicted_due: Option<u64>,
    /// Finished attempts not yet written to the log, and when the first of them finished.
    /// Their consequences already hold in memory; a crash before they are written only
    /// means the notification is sent again (same webhook-id) after restart.
    unrecorded: Vec<(NotificationKey, Attempt, AfterAttempt)>,
    unrecorded_since: Option<tokio::time::Instant>,
    /// When the webhook's floor in the log was last moved ([`Log::advance_floor`]).
    floor_moved: tokio::time::Instant,
    /// Where attempt records are written: the main runtime, not the delivery runtime this
    /// queue runs on (see `run.rs`), so that a sled I/O thread started by a write never
    /// inherits the delivery threads' lower CPU priority.
    writer: tokio::runtime::Handle,
    /// The segment the last body was read from: the next one is most often in it.
    segment: SegmentCache,
}

impl Queue {
    pub fn new(
        webhook: Webhook,
        client: reqwest::Client,
        log: Log,
        durable: watch::Receiver<Position>,
        rescan: watch::Receiver<u64>,
        writer: tokio::runtime::Handle,
    ) -> Queue {
        let endpoint = Arc::new(Endpoint::new(
            client,
            webhook.url.clone(),
            webhook.timeout,
            webhook.keys.clone(),
        ));
        Queue {
            webhook,
            endpoint,
            log,
            durable,
            window: BTreeMap::new(),
            in_flight: 0,
            cursor: None,
            streaming: true,
            rescan,
            rescanning: true,
            in_flight_keys: HashSet::new(),
            evicted_due: None,
            unrecorded: Vec::new(),
            unrecorded_since: None,
            floor_moved: tokio::time::Instant::now(),
            writer,
            segment: SegmentCache::default(),
        }
    }

    fn capacity(&self) -> usize {
        MIN_WINDOW.max(self.webhook.max_in_flight * 16)
    }

    fn slot(&self, key: NotificationKey, status: &Status) -> Slot {
        if self.webhook.ordered {
            (0, key)
        } else {
            (status.next_at_ms, key)
        }
    }

    /// Runs until `stop` turns true, then waits (briefly) for attempts in flight so that
    /// their outcome is recorded. A log error is reported at once and the queue starts over
    /// from the log after a pause: one webhook's trouble never ends its deliveries silently.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let (done_tx, mut done_rx) = mpsc::channel::<Finished>(self.webhook.max_in_flight.max(1));
        loop {
            let ready = match self.refill().await {
                Ok(()) => self.dispatch(&done_tx),
                Err(e) => Err(e),
            };
            if let Err(e) = ready {
                if !self.pause_after(e, &mut stop).await {
                    break;
                }
                continue;
            }
            let wake = self.next_wake();
            let record_at = self.unrecorded_since.map(|since| since + RECORD_DELAY);
            let recording = record_at.is_some();
            let record_at = record_at.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                // An attempt finished: record it and decide what comes next.
                Some(finished) = done_rx.recv() => {
                    let mut all = vec![finished];
                    while let Ok(more) = done_rx.try_recv() {
                        all.push(more);
                    }
                    if let Err(e) = self.finish(all).await {
                        if !self.pause_after(e, &mut stop).await {
                            break;
                        }
                    }
                }
                // The first of the waiting attempt records has waited long enough.
                _ = tokio::time::sleep_until(record_at), if recording => {
                    if let Err(e) = self.write_records().await {
                        if !self.pause_after(e, &mut stop).await {
                            break;
                        }
                    }
                }
                // A newer transaction became durable: there may be more to read.
                changed = self.durable.changed(), if self.streaming => {
                    // The stream is gone (shutting down): keep delivering what we have
                    // until told to stop.
                    self.streaming = changed.is_ok();
                }
                // Redelivered notifications: read the log again from the start.
                changed = self.rescan.changed(), if self.rescanning => {
                    self.rescanning = changed.is_ok();
                    if self.rescanning {
                        self.start_over();
                    }
                }
                // The earliest retry in the window is due, or one that was evicted from it.
                _ = tokio::time::sleep(wake) => {
                    if self.evicted_due.is_some_and(|due| due <= now_ms()) {
                        self.start_over();
                    }
                }
                // Shutdown: stop sending, collect what is in flight.
                _ = stop.changed() => break,
            }
        }
        let deadline = tokio::time::sleep(Duration::from_secs(3));
        tokio::pin!(deadline);
        while self.in_flight > 0 {
            tokio::select! {
                Some(finished) = done_rx.recv() => {
                    if let Err(e) = self.finish(vec![finished]).await {
                        tracing::error!(hook = %self.webhook.id, error = %e, "recording an attempt failed");
                    }
                }
                _ = &mut deadline => break,
            }
        }
        if let Err(e) = self.write_records().await {
            tracing::error!(hook = %self.webhook.id, error = %e, "recording attempts failed");
        }
    }

    /// Reports a log error, waits a little (or until stop), and makes the queue read the log
    /// afresh. Returns false when stopping.
    async fn pause_after(&mut self, e: LogError, stop: &mut watch::Receiver<bool>) -> bool {
        tracing::error!(hook = %self.webhook.id, error = %e, "delivery queue failed; retrying in 5 s");
        self.start_over();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => true,
            _ = stop.changed() => false,
        }
    }

    /// Forgets the window; the next refill reads pending notifications from the log's start
    /// (those in flight are skipped).
    fn start_over(&mut self) {
        self.cursor = None;
        self.window.clear();
        self.evicted_due = None;
    }

    async fn refill(&mut self) -> Result<(), LogError> {
        let capacity = self.capacity();
        let mut room = capacity.saturating_sub(self.window.len() + self.in_flight);
        if room < capacity / 2 && !self.webhook.ordered {
            self.evict_waiting();
            room = capacity.saturating_sub(self.window.len() + self.in_flight);
        }
        // Read in pages of at least half the window, not one by one.
        if room < capacity / 2 {
            return Ok(());
        }
        // Read from the start again (a rescan), the log must include every finished
        // attempt, or a delivered notification would be sent again. Past the cursor are
        // only notifications this queue has not attempted.
        if self.cursor.is_none() {
            self.write_records().await?;
        }
        let up_to = self.durable.borrow().commit_lsn;
        let page = self
            .log
            .pending(&self.webhook.id, self.cursor.as_ref(), up_to, room)?;
        if page.scanned_to.is_some() {
            self.cursor = page.scanned_to;
        }
        for (key, status) in page.items {
            if self.in_flight_keys.contains(&key) {
                continue;
            }
            let slot = self.slot(key, &status);
            self.window.insert(slot, status);
        }
        Ok(())
    }

    /// Makes room for new notifications when the window fills with retries that are not due:
    /// those due later than a second from now leave it (they keep their due time in the log)
    /// and come back by a rescan when the first of them is due. Without this, a burst of
    /// failures during an outage would hold back every later notification until their
    /// retries (minutes to hours away) were done.
    fn evict_waiting(&mut self) {
        let horizon = now_ms() + 1000;
        let first_key = NotificationKey {
            hook: String::new(),
            lsn: 0,
            ordinal: 0,
        };
        let later = self.window.split_off(&(horizon, first_key));
        if let Some(((due, _), _)) = later.first_key_value() {
            self.evicted_due = Some(self.evicted_due.map_or(*due, |d| d.min(*due)));
        }
    }

    fn dispatch(&mut self, done: &mpsc::Sender<Finished>) -> Result<(), LogError> {
        let now = now_ms();
        while self.in_flight < self.webhook.max_in_flight {
            let Some(entry) = self.window.first_entry() else {
                // Nothing left to send: the segment need not stay in memory.
                self.segment.clear();
                break;
            };
            if entry.get().next_at_ms > now {
                break;
            }
            let ((_, key), status) = entry.remove_entry();
            let Some(body) = self.log.body_near(&key, &mut self.segment)? else {
                // Pruned underneath us (only delivered entries are pruned): nothing to send.
                continue;
            };
            self.in_flight += 1;
            self.in_flight_keys.insert(key.clone());
            let endpoint = Arc::clone(&self.endpoint);
            let done = done.clone();
            let attempt = status.attempts + 1;
            tokio::spawn(async move {
                let payload_sha256 = hex(&Sha256::digest(&body));
                let started = tokio::time::Instant::now();
                let id = key.to_string();
                // In a task of its own, so that a panic in the HTTP stack is a failed attempt
                // (retried) rather than a slot of `max_in_flight` lost for good.
                let outcome =
                    match tokio::spawn(async move { endpoint.attempt(&id, &body).await }).await {
                        Ok(outcome) => outcome,
                        Err(e) => Outcome::no_response(
                            started,
                            format!("the attempt failed inside walhook: {e}"),
                        ),
                    };
                // The queue outlives its attempts except at shutdown, where a lost result
                // only means the notification is sent again after restart.
                let _ = done
                    .send(Finished {
                        key,
                        status,
                        attempt,
                        payload_sha256,
                        outcome,
                    })
                    .await;
            });
        }
        Ok(())
    }

    /// Writes the waiting attempt records to the log, in one batch, on the writer runtime
    /// (kept until written: a failed write is tried again).
    async fn write_records(&mut self) -> Result<(), LogError> {
        if !self.unrecorded.is_empty() {
            let log = self.log.clone();
            let records = std::mem::take(&mut self.unrecorded);
            // Now and then the webhook's floor moves past what was delivered, so that a scan
            // from the start (after a redelivery, an error) does not read it all again.
            let floor =
                (self.floor_moved.elapsed() >= FLOOR_EVERY).then(|| self.webhook.id.clone());
            if floor.is_some() {
                self.floor_moved = tokio::time::Instant::now();
            }
            let written = self
                .writer
                .spawn(async move {
                    let result = log.record_attempts(&records);
                    if let (Ok(_), Some(hook)) = (&result, floor) {
                        // Only an optimization: the records are written.
                        if let Err(e) = log.advance_floor(&hook) {
                            tracing::warn!(hook = %hook, error = %e, "moving the webhook's floor in the log failed");
                        }
                    }
                    (result, records)
                })
                .await;
            match written {
                // A redelivery came while these were in flight or waiting: read the log
                // afresh, where the new round is.
                Ok((Ok(stale), _)) if stale > 0 => self.start_over(),
                Ok((Ok(_), _)) => {}
                Ok((Err(e), records)) => {
                    self.unrecorded = records;
                    return Err(e);
                }
                // The write panicked: the records are gone; the notifications are sent
                // again after a restart, or when the queue reads the log afresh.
                Err(e) => return Err(LogError::Sync(std::io::Error::other(e))),
            }
        }
        self.unrecorded_since = None;
        Ok(())
    }

    /// Takes finished attempts: schedules what follows each at once, and records them in the
    /// log with the others waiting (see [`RECORD_DELAY`]).
    async fn finish(&mut self, finished: Vec<Finished>) -> Result<(), LogError> {
        let now = now_ms();
        let mut records = Vec::with_capacity(finished.len());
        for f in &finished {
            self.in_flight -= 1;
            self.in_flight_keys.remove(&f.key);
            let after = if f.outcome.is_success() {
                AfterAttempt::Delivered
            } else {
                match self
                    .webhook
                    .retry
                    .next_delay(f.status.round_failures + 1, f.outcome.retry_after)
                {
                    Some(delay) => AfterAttempt::RetryAt {
                        next_at_ms: now + delay.as_millis() as u64,
                    },
                    None => AfterAttempt::Dead,
                }
            };
            let record = Attempt {
                number: f.attempt,
                at_ms: now,
                status: f.outcome.status,
                error: f.outcome.error.clone(),
                latency_ms: f.outcome.latency.as_millis() as u64,
                response: f.outcome.body_head.clone(),
                payload_sha256: f.payload_sha256.clone(),
                round: f.status.round,
            };
            records.push((f.key.clone(), record, after));
        }
        for (f, (_, _, after)) in finished.into_iter().zip(&records) {
            self.after_attempt(f, *after, now);
        }
        self.unrecorded.extend(records);
        self.unrecorded_since
            .get_or_insert_with(tokio::time::Instant::now);
        if self.unrecorded.len() >= RECORD_BATCH {
            self.write_records().await?;
        }
        Ok(())
    }

    fn after_attempt(&mut self, f: Finished, after: AfterAttempt, now: u64) {
        let what = f
            .outcome
            .error
            .clone()
            .or_else(|| f.outcome.status.map(|s| format!("HTTP {s}")))
            .unwrap_or_default();
        match after {
            AfterAttempt::Delivered => {
                tracing::debug!(hook = %self.webhook.id, id = %f.key, attempt = f.attempt, "delivered")
            }
            AfterAttempt::RetryAt { next_at_ms } => {
                tracing::warn!(hook = %self.webhook.id, id = %f.key, attempt = f.attempt, outcome = %what,
                    retry_in_ms = next_at_ms.saturating_sub(now), "delivery failed, will retry");
                let mut status = f.status;
                status.attempts = f.attempt;
                status.round_failures += 1;
                status.next_at_ms = next_at_ms;
                let slot = self.slot(f.key, &status);
                self.window.insert(slot, status);
            }
            AfterAttempt::Dead => {
                tracing::error!(hook = %self.webhook.id, id = %f.key, attempt = f.attempt, outcome = %what,
                    "delivery failed and the retry schedule is exhausted: parked as dead (walhook deliveries redeliver --dead)");
            }
        }
    }

    /// How long to sleep when nothing else happens: until the head of the window is due,
    /// at most a second (new notifications also wake the queue through `durable`).
    fn next_wake(&self) -> Duration {
        let now = now_ms();
        let head = match self.window.first_key_value() {
            Some((_, status)) if self.in_flight < self.webhook.max_in_flight => {
                status.next_at_ms.saturating_sub(now)
            }
            _ => 1000,
        };
        let evicted = self.evicted_due.map_or(1000, |due| due.saturating_sub(now));
        Duration::from_millis(head.min(evicted).clamp(1, 1000))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
