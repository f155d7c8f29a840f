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
use crate::log::{now_ms, AfterAttempt, Attempt, Log, LogError, NotificationKey, Position, Status};

/// How many notifications one webhook keeps in memory at most, besides those in flight.
const MIN_WINDOW: usize = 256;

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
}

impl Queue {
    pub fn new(
        webhook: Webhook,
        client: reqwest::Client,
        log: Log,
        durable: watch::Receiver<Position>,
        rescan: watch::Receiver<u64>,
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
    /// their outcome is recorded.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), LogError> {
        let (done_tx, mut done_rx) = mpsc::channel::<Finished>(self.webhook.max_in_flight.max(1));
        loop {
            self.refill()?;
            self.dispatch(&done_tx)?;
            let wake = self.next_wake();
            tokio::select! {
                // An attempt finished: record it and decide what comes next.
                Some(finished) = done_rx.recv() => self.finish(finished)?,
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
                        self.cursor = None;
                        self.window.clear();
                    }
                }
                // The earliest retry in the window is due.
                _ = tokio::time::sleep(wake) => {}
                // Shutdown: stop sending, collect what is in flight.
                _ = stop.changed() => break,
            }
        }
        let deadline = tokio::time::sleep(Duration::from_secs(3));
        tokio::pin!(deadline);
        while self.in_flight > 0 {
            tokio::select! {
                Some(finished) = done_rx.recv() => self.finish(finished)?,
                _ = &mut deadline => break,
            }
        }
        Ok(())
    }

    fn refill(&mut self) -> Result<(), LogError> {
        let room = self
            .capacity()
            .saturating_sub(self.window.len() + self.in_flight);
        if room < self.capacity() / 2 {
            return Ok(());
        }
        let up_to = self.durable.borrow().commit_lsn;
        let items = self
            .log
            .pending(&self.webhook.id, self.cursor.as_ref(), up_to, room)?;
        for (key, status) in items {
            self.cursor = Some(key.clone());
            if self.in_flight_keys.contains(&key) {
                continue;
            }
            let slot = self.slot(key, &status);
            self.window.insert(slot, status);
        }
        Ok(())
    }

    fn dispatch(&mut self, done: &mpsc::Sender<Finished>) -> Result<(), LogError> {
        let now = now_ms();
        while self.in_flight < self.webhook.max_in_flight {
            let Some(entry) = self.window.first_entry() else {
                break;
            };
            if entry.get().next_at_ms > now {
                break;
            }
            let ((_, key), status) = entry.remove_entry();
            let Some(body) = self.log.body(&key)? else {
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
                let outcome = endpoint.attempt(&key.to_string(), &body).await;
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

    fn finish(&mut self, f: Finished) -> Result<(), LogError> {
        self.in_flight -= 1;
        self.in_flight_keys.remove(&f.key);
        let now = now_ms();
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
            payload_sha256: f.payload_sha256,
        };
        self.log.record_attempt(&f.key, &record, after)?;
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
        Ok(())
    }

    /// How long to sleep when nothing else happens: until the head of the window is due,
    /// at most a second (new notifications also wake the queue through `durable`).
    fn next_wake(&self) -> Duration {
        let now = now_ms();
        let due = match self.window.first_key_value() {
            Some((_, status)) if self.in_flight < self.webhook.max_in_flight => {
                status.next_at_ms.saturating_sub(now)
            }
            _ => 1000,
        };
        Duration::from_millis(due.clamp(1, 1000))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
