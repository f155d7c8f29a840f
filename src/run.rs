//! `walhook run`: connect, prepare the publication and slot, stream, log, deliver.
//!
//! ```text
//!  replication stream ──► Assembler ──► log.append (sled, in memory) ──► applied (watch)
//!        ▲                                                                   │
//!        │ ack (update_applied_lsn)                                          ▼
//!        └──────────────── durable (watch) ◄──── flusher: log.flush() (one fsync per group)
//!                                │
//!                                └──► delivery queues (one per webhook) read up to `durable`
//! ```
//!
//! Group commit: the stream task appends committed transactions to sled without waiting (a
//! burst of them as one batch); the flusher task flushes whatever has been appended, then
//! publishes the position it covered. Only then is the slot acknowledged and are the
//! notifications delivered. The next flush covers everything appended meanwhile (sled 0.34's
//! `apply_batch` waits while a flush writes, so appends pile up in the replication client's
//! buffer, not in the log).

use std::path::PathBuf;
use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio::sync::watch;

use crate::classify::{self, baseline::baseline, Classification};
use crate::config::Config;
use crate::deliver::http::build_client;
use crate::deliver::queue::Queue;
use crate::derive::classification::{self, ClassifiedTable, Classifier, ClassifyError, StagedTxn};
use crate::log::{now_ms, Log, LogError, NewNotification, Origin, Position};
use crate::schema::describe_tables;
use crate::shutdown::{requested, Stop};
use crate::source::{self, Database, SourceError};
use crate::state::{self, ClassMeta};
use crate::txn::{Assembler, TxnError};

/// What `walhook run` needs.
#[derive(Clone)]
pub struct RunOptions {
    pub database_url: String,
    pub slot: String,
    pub publication: String,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub classifications: Option<PathBuf>,
}

impl std::fmt::Debug for RunOptions {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("database_url", &"<redacted>")
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("data_dir", &self.data_dir)
            .field("config", &self.config)
            .field("classifications", &self.classifications)
            .finish()
    }
}

/// Why `run` stopped with an error. Every variant is definite: transient faults are retried
/// inside and never surface here.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("{0}")]
    Source(String),
    #[error("{0}")]
    Stream(String),
}

impl From<SourceError> for RunError {
    fn from(e: SourceError) -> Self {
        RunError::Source(e.to_string())
    }
}

/// Backoff between reconnects: doubles from 500 ms to 30 s.
struct Backoff(Duration);

impl Backoff {
    const START: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Backoff {
        Backoff(Backoff::START)
    }

    fn reset(&mut self) {
        self.0 = Backoff::START;
    }

    /// Sleeps, unless a stop arrives first; returns false on stop.
    async fn wait(&mut self, stop: &mut Stop) -> bool {
        let delay = self.0;
        self.0 = (self.0 * 2).min(Backoff::MAX);
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = requested(stop) => false,
        }
    }
}

pub async fn run(opts: RunOptions, mut stop: Stop) -> Result<(), RunError> {
    let config = Config::load(&opts.config, |name| std::env::var(name).ok())
        .map_err(|e| RunError::Config(e.to_string()))?;
    let classifications = load_classifications(&opts, &config)?;
    let db = Database::parse(&opts.database_url)?;
    std::fs::create_dir_all(&opts.data_dir).map_err(|e| {
        RunError::Config(format!(
            "cannot create --data-dir {}: {e}",
            opts.data_dir.display()
        ))
    })?;
    let log = Log::open(&opts.data_dir)?;
    // A huge transaction whose state was being made current when walhook stopped.
    if classification::finish_applying(&log)? {
        tracing::info!("finished recording the state of a large transaction interrupted by a stop");
    }
    let mut tables = config.tables();
    for c in &classifications {
        if !tables.contains(&c.table) {
            tables.push(c.table.clone());
        }
    }

    // Prerequisites, publication and slot. Unreachable or restarting servers are waited
    // for; anything else is a problem for the user to fix.
    let mut backoff = Backoff::new();
    let (infos, confirmed, classified) = loop {
        // A stop is honoured here too: a baseline of a large table can take minutes.
        // Nothing is lost by dropping it half-way: a classification's baseline counts only
        // once it is complete, and an unfinished one starts over on the next start.
        let prepared = tokio::select! {
            prepared = prepare(&db, &opts, &tables, &log, &config, &classifications) => prepared,
            _ = requested(&mut stop) => {
                tracing::info!("stopped before streaming; an unfinished baseline starts over on the next start");
                return Ok(());
            }
        };
        match prepared {
            Ok(ready) => break ready,
            Err(PrepareError::Definite(e)) => return Err(RunError::Source(e)),
            Err(PrepareError::Transient(e)) => {
                tracing::warn!(database = %db.describe(), error = %e, "database not ready, retrying");
                if !backoff.wait(&mut stop).await {
                    return Ok(());
                }
            }
        }
    };

    // Notifications of a webhook removed from the config stay in the log, undelivered.
    for hook in log.hooks_with_undelivered()? {
        if !config.webhooks.iter().any(|w| w.id == hook) {
            tracing::warn!(webhook = %hook, "the log holds undelivered notifications of a webhook the config no longer has; they are kept (walhook deliveries list shows them): add the webhook back to deliver them");
        }
    }
    let position = log.position()?.unwrap_or_default();
    let (durable_tx, durable_rx) = watch::channel(position);
    let (stop_queues_tx, stop_queues) = watch::channel(false);
    let (rescan_tx, rescan_rx) = watch::channel(0u64);
    let http = build_client()
        .map_err(|e| RunError::Config(format!("cannot set up the HTTP client: {e}")))?;
    let delivery = crate::deliver::runtime()
        .map_err(|e| RunError::Config(format!("cannot start the delivery threads: {e}")))?;
    let mut queues = Vec::new();
    for webhook in &config.webhooks {
        let queue = Queue::new(
            webhook.clone(),
            http.clone(),
            log.clone(),
            durable_rx.clone(),
            rescan_rx.clone(),
            tokio::runtime::Handle::current(),
        );
        queues.push(delivery.spawn(queue.run(stop_queues.clone())));
    }
    let pruner = tokio::spawn(prune(log.clone(), config.retention, stop_queues.clone()));
    // Bound before streaming starts, so a `deliveries` call never finds it missing.
    let control = crate::control::bind(&opts.data_dir).map(|listener| {
        tokio::spawn(crate::control::serve(
            listener,
            opts.data_dir.clone(),
            log.clone(),
            rescan_tx,
            stop_queues.clone(),
        ))
    });

    let mut assembler = Assembler::new(&config, &infos, &classified, position.commit_lsn);
    let mut stream = Stream {
        db: &db,
        opts: &opts,
        log: &log,
        classifier: Classifier::new(classified, db.clone(), config.state_cache_bytes),
        spilled: None,
        hooks: config.webhooks.iter().map(|w| w.id.clone()).collect(),
        spill_marker: classification::spilled_at(&log)?,
        acked: confirmed,
        durable_tx,
        in_flight: None,
    };
    tracing::info!(slot = %opts.slot, publication = %opts.publication, resume = %confirmed, "streaming");
    let result = stream.run(&mut assembler, &mut stop).await;

    // Make the final acknowledgement certain: the replication session is closed now, so
    // move the slot with SQL (on a fresh connection: the database may have restarted).
    if result.is_ok() {
        let acked = stream.acked;
        let advanced = tokio::time::timeout(Duration::from_secs(3), async {
            let client = db.connect().await.ok()?;
            loop {
                match source::advance_slot(&client, &opts.slot, acked).await {
                    Ok(()) => return Some(()),
                    // The walsender may hold the slot for a moment after the stream ends.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
        .await;
        if !matches!(advanced, Ok(Some(()))) {
            tracing::warn!(position = %acked, "could not confirm the final position with SQL; the next start replays from the last acknowledged one (same notification ids)");
        }
    }

    // Let queues finish attempts in flight (their outcome is recorded), then stop.
    let _ = stop_queues_tx.send(true);
    for queue in queues {
        if let Err(e) = queue.await {
            tracing::error!(error = %e, "delivery queue panicked");
        }
    }
    drop(delivery);
    pruner.abort();
    if let Some(control) = control {
        let _ = control.await;
    }
    if result.is_ok() {
        tracing::info!(acknowledged = %stream.acked, "stopped");
    }
    result
}

/// The classifications the config's events use, read from `--classifications`.
fn load_classifications(
    opts: &RunOptions,
    config: &Config,
) -> Result<Vec<Classification>, RunError> {
    let (found, mut problems) = match &opts.classifications {
        Some(dir) => classify::load_dir(dir),
        None => (Vec::new(), Vec::new()),
    };
    problems.extend(classify::check_events(
        &config.transitions,
        opts.classifications
            .as_deref()
            .map(|dir| (dir, found.as_slice())),
    ));
    if !problems.is_empty() {
        return Err(RunError::Config(problems.join("\n")));
    }
    let used: Vec<Classification> = classify::used(&config.transitions, &found)
        .into_iter()
        .cloned()
        .collect();
    for c in found
        .iter()
        .filter(|c| !used.iter().any(|u| u.name == c.name))
    {
        tracing::info!(classification = %c.name, "no event uses this classification; it is not evaluated");
    }
    Ok(used)
}

enum PrepareError {
    Transient(String),
    Definite(String),
}

impl From<SourceError> for PrepareError {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Transient(m) => PrepareError::Transient(m),
            SourceError::Definite(m) => PrepareError::Definite(m),
        }
    }
}

type Prepared = (
    std::collections::BTreeMap<crate::config::TableName, crate::schema::TableInfo>,
    Lsn,
    Vec<ClassifiedTable>,
);

async fn prepare(
    db: &Database,
    opts: &RunOptions,
    tables: &[crate::config::TableName],
    log: &Log,
    config: &Config,
    classifications: &[Classification],
) -> Result<Prepared, PrepareError> {
    let client = db.connect().await?;
    let mut problems = source::check_server(&client).await?;
    let (mut infos, table_problems) = describe_tables(&client, tables)
        .await
        .map_err(SourceError::from)?;
    problems.extend(table_problems);
    problems.extend(classify::validate(&client, classifications).await?);
    // The tables classifications depend on are published too.
    let (mut classified, plan_problems) =
        classify::plan(&client, config, classifications, &mut infos).await?;
    problems.extend(plan_problems);
    let mut tables = tables.to_vec();
    for table in &classified {
        if !tables.contains(&table.table) {
            tables.push(table.table.clone());
        }
    }
    if !problems.is_empty() {
        return Err(PrepareError::Definite(problems.join("\n")));
    }
    let (system_identifier, database) = source::identify(&client).await?;
    let origin = Origin {
        system_identifier,
        database,
        slot: opts.slot.clone(),
    };
    check_origin(log, &origin, &opts.data_dir).map_err(PrepareError::Definite)?;
    source::ensure_publication(&client, &opts.publication, &tables).await?;
    // With classifications, a missing slot is created with an exported snapshot: their
    // baseline is read from exactly the state the stream starts after.
    let mut exported = None;
    let missing = !source::slot_exists(&client, &opts.slot).await?;
    if missing && !classified.is_empty() {
        exported = Some(source::create_slot_exporting(db, &opts.slot, false).await?);
    }
    let (confirmed, created) = source::ensure_slot(&client, &opts.slot).await?;
    let created = created || exported.is_some();
    if let Some(position) = log
        .position()
        .map_err(|e| PrepareError::Definite(e.to_string()))?
    {
        if created && position.commit_lsn > confirmed.0 {
            return Err(PrepareError::Definite(format!(
                "slot {:?} was just created at {confirmed}, but --data-dir {} already holds transactions up to {}: this database's WAL is behind the log's (a restored or replaced cluster?), so its notification ids would collide; use a new --data-dir",
                opts.slot,
                opts.data_dir.display(),
                Lsn(position.commit_lsn)
            )));
        }
        if created {
            tracing::warn!(slot = %opts.slot, "the slot was missing and has been created anew: changes made while it did not exist were not streamed");
        }
    }
    if log.origin().ok().flatten().is_none() {
        log.set_origin(&origin)
            .map_err(|e| PrepareError::Definite(e.to_string()))?;
    }
    baselines(
        db,
        opts,
        log,
        &mut classified,
        classifications,
        exported,
        created,
    )
    .await?;
    Ok((infos, confirmed, classified))
}

/// Brings every classification's state up to date: a classification that is new, whose SQL
/// changed, or whose stream was replaced (a new slot) is baselined from a snapshot, without
/// events; the state of classifications no event uses any more is dropped (its stream
/// stops maintaining it, so it would be stale if they came back).
async fn baselines(
    db: &Database,
    opts: &RunOptions,
    log: &Log,
    classified: &mut [ClassifiedTable],
    classifications: &[Classification],
    mut exported: Option<source::ExportedSnapshot>,
    slot_created: bool,
) -> Result<(), PrepareError> {
    let definite = |e: LogError| PrepareError::Definite(e.to_string());
    let classify_error = |e: ClassifyError| match e {
        ClassifyError::Transient(m) => PrepareError::Transient(m),
        e => PrepareError::Definite(e.to_string()),
    };
    let meta_prefix = state::meta_prefix();
    // State in the first layout (one entry per classification and row) is converted.
    let tables: std::collections::HashMap<String, String> = classified
        .iter()
        .flat_map(|t| {
            t.classes
                .iter()
                .map(|c| (c.name.clone(), t.table.to_string()))
        })
        .collect();
    let converted = state::convert_first_layout(log, &tables).map_err(definite)?;
    if converted > 0 {
        tracing::info!(
            entries = converted,
            "converted the row state of an earlier walhook to one entry per row"
        );
    }
    // Forget classifications that are no longer evaluated, or not on the same table.
    for (key, bytes) in log
        .scan_raw(&meta_prefix, &meta_prefix, usize::MAX)
        .map_err(definite)?
    {
        let name = String::from_utf8_lossy(&key[1..]).into_owned();
        let table = serde_json::from_slice::<ClassMeta>(&bytes)
            .map(|meta| meta.table)
            .unwrap_or_default();
        let current = classified
            .iter()
            .find(|t| t.classes.iter().any(|c| c.name == name));
        if current.is_some_and(|t| t.table.to_string() == table) {
            continue;
        }
        // The records first: a crash half-way leaves the meta, and the next start again.
        state::forget(log, &table, &name).map_err(definite)?;
        log.remove_prefix(&state::dependency_prefix(&name))
            .map_err(definite)?;
        log.write_raw(&[(key.to_vec(), None)]).map_err(definite)?;
        if current.is_none() {
            tracing::info!(classification = %name, "dropped the state of a classification no event uses");
        }
    }
    // Which need a baseline, and which are current.
    let mut needed = Vec::new();
    for (t, table) in classified.iter_mut().enumerate() {
        for (c, class) in table.classes.iter_mut().enumerate() {
            let fingerprint = if class.watch {
                classify::watch_fingerprint(class)
            } else {
                let Some(definition) = classifications.iter().find(|d| d.name == class.name) else {
                    continue;
                };
                classify::fingerprint(definition)
            };
            let stored: Option<ClassMeta> = log
                .get_raw(&state::meta_key(&class.name))
                .map_err(definite)?
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            match stored {
                Some(meta) if meta.fingerprint == fingerprint && !slot_created => {
                    class.active_from = meta.active_from;
                }
                _ => needed.push((t, c, fingerprint)),
            }
        }
    }
    if needed.is_empty() {
        return Ok(());
    }
    // The main slot was just created with a snapshot: the whole stream comes after it.
    // Otherwise a temporary slot marks the point S the baseline shows; the stream (always
    // behind S) applies the classification to transactions from S on.
    let main = exported.is_some();
    if exported.is_none() {
        // Slot names hold at most 63 characters.
        let slot: String = opts.slot.chars().take(40).collect();
        let name = format!("{slot}_baseline_{}", std::process::id());
        exported = Some(source::create_slot_exporting(db, &name, true).await.map_err(|e| match e {
            SourceError::Definite(m) => PrepareError::Definite(format!(
                "cannot create a temporary replication slot for the classification baseline ({m}); max_replication_slots must leave one slot free for it"
            )),
            e => e.into(),
        })?);
    }
    let Some(snapshot) = exported else {
        return Ok(());
    };
    let active_from = if main { 0 } else { snapshot.lsn.0 };
    for (t, c, fingerprint) in needed {
        let table = &classified[t];
        let meta = ClassMeta {
            fingerprint,
            active_from,
            table: table.table.to_string(),
        };
        baseline(db, &snapshot.name, log, table, c, &meta, classified)
            .await
            .map_err(classify_error)?;
        classified[t].classes[c].active_from = active_from;
    }
    log.flush().await.map_err(definite)?;
    drop(snapshot);
    Ok(())
}

/// Notification ids are WAL positions of one database: a data dir serves one database for
/// its whole life.
fn check_origin(log: &Log, origin: &Origin, data_dir: &std::path::Path) -> Result<(), String> {
    let Some(stored) = log.origin().map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let other_system = matches!(
        (&stored.system_identifier, &origin.system_identifier),
        (Some(a), Some(b)) if a != b
    );
    // Another slot on the same database streams the same WAL, so ids stay consistent.
    if other_system || stored.database != origin.database {
        let describe = |o: &Origin| {
            format!(
                "database {:?}{}",
                o.database,
                o.system_identifier
                    .as_ref()
                    .map(|s| format!(" (system {s})"))
                    .unwrap_or_default()
            )
        };
        return Err(format!(
            "--data-dir {} holds the delivery log of {}, but this run streams {}; one data dir serves one database (its notification ids are that database's WAL positions): use another --data-dir",
            data_dir.display(),
            describe(&stored),
            describe(origin)
        ));
    }
    Ok(())
}

/// The streaming side: one replication session after another, until stopped.
struct Stream<'a> {
    db: &'a Database,
    opts: &'a RunOptions,
    log: &'a Log,
    classifier: Classifier,
    /// The open transaction whose touched rows of classified tables went to the scratch
    /// area (its commit LSN), and the TRUNCATEs of it already applied there.
    spilled: Option<(
        u64,
        std::collections::HashMap<crate::config::TableName, u32>,
    )>,
    /// Every webhook's id.
    hooks: Vec<String>,
    /// The transaction an earlier pass spilled without finishing it (from the log).
    spill_marker: Option<u64>,
    /// The highest position reported to the server. Never moves backwards, across sessions
    /// too: a new session starts here.
    acked: Lsn,
    /// The last transaction flushed to the log.
    durable_tx: watch::Sender<Position>,
    /// The group being written to the log while the stream reads and evaluates the next.
    in_flight: Option<InFlight>,
}

/// A group written to the log on a blocking thread (sled's batch is most of a classified
/// group's cost), so that the stream meanwhile evaluates the next transactions: their
/// evaluation reads `state` as if it were in the log already. sled 0.34 makes every read
/// in the process wait while a batch is applied (one lock), so the job starts its batch
/// only when `go` is sent or dropped: once the next group's evaluation has read the stored
/// rows it compares with (so those reads do not wait for the batch, which then overlaps
/// PostgreSQL's evaluation of the last table and the comparison), or as soon as the stream
/// has nothing else to do (or ends in error). At most one is in flight; whatever reads the
/// log otherwise (a recheck, a spilled transaction, the end of a session) waits for it
/// first ([`Stream::settle`]).
struct InFlight {
    state: std::sync::Arc<classification::RowWrites>,
    /// Publishes the group's position to the flusher once written.
    job: tokio::task::JoinHandle<Result<(), LogError>>,
    /// Lets the job start its batch (sent or dropped).
    go: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The outcome of writing the group in flight (at once when there is none). The caller
/// drops the finished job.
async fn written(in_flight: &mut Option<InFlight>) -> Result<(), RunError> {
    let Some(in_flight) = in_flight.as_mut() else {
        return Ok(());
    };
    match (&mut in_flight.job).await {
        Ok(written) => Ok(written?),
        Err(e) => Err(RunError::Stream(format!("writing to the log failed: {e}"))),
    }
}

enum SessionEnd {
    Stopped,
    Failed(SourceError),
}

impl Stream<'_> {
    async fn run(&mut self, assembler: &mut Assembler, stop: &mut Stop) -> Result<(), RunError> {
        let mut backoff = Backoff::new();
        loop {
            // Committed transactions not written yet are streamed again.
            let logged = self.log.position()?.map_or(0, |p| p.commit_lsn);
            assembler.reset(logged);
            // What the cache holds may not have been written: it starts again from the log.
            let started = std::time::Instant::now();
            let warmed = self.classifier.warm(self.log).await;
            if warmed > 0 {
                tracing::info!(
                    rows = warmed,
                    seconds = started.elapsed().as_secs_f64(),
                    "row state cache filled from the log"
                );
            }
            self.spilled = None;
            let ended = self.session(assembler, stop, &mut backoff).await;
            if ended.is_err() {
                // Ending in error: the group in flight is written now, not once the stream
                // is dropped.
                self.release();
            }
            match ended? {
                SessionEnd::Stopped => return Ok(()),
                SessionEnd::Failed(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "replication interrupted, reconnecting");
                    if !backoff.wait(stop).await {
                        return Ok(());
                    }
                }
                SessionEnd::Failed(e) => return Err(RunError::Source(e.to_string())),
            }
        }
    }

    /// One replication session, with its own flusher. Returns how it ended; log failures
    /// and undecodable data are errors.
    async fn session(
        &mut self,
        assembler: &mut Assembler,
        stop: &mut Stop,
        backoff: &mut Backoff,
    ) -> Result<SessionEnd, RunError> {
        let replication = self
            .db
            .replication(&self.opts.slot, &self.opts.publication, self.acked);
        let mut client = match ReplicationClient::connect(replication).await {
            Ok(client) => client,
            Err(e) => return Ok(SessionEnd::Failed(e.into())),
        };

        // The flusher: one fsync covers every transaction appended since the last one.
        let (applied_tx, applied_rx) = watch::channel(None::<Position>);
        let flusher = tokio::spawn(flush_loop(
            self.log.clone(),
            applied_rx,
            self.durable_tx.clone(),
        ));
        let mut durable_rx = self.durable_tx.subscribe();
        let mut applied: Option<Position> = None;
        let mut durable_end = Lsn::ZERO;
        // A keepalive position seen while idle, acknowledged once everything before it is
        // durable.
        let mut idle_wal_end: Option<Lsn> = None;
        // Committed transactions not written to the log yet. They are written as one batch
        // once nothing more is ready to read (at once when the stream is quiet) or the group
        // is full: in sled 0.34 every batch costs synchronous writes of its own, so one per
        // small transaction would not keep up with the database.
        let mut staged = Staged::default();
        // Reading in bursts (see READ_PAUSE): when reading resumes, whether anything was
        // read since the last pause, and whether the staged group has waited a pause for
        // more of the stream.
        let mut resume_at: Option<tokio::time::Instant> = None;
        let mut read_since_pause = false;
        let mut waited = false;

        let end = loop {
            tokio::select! {
                // In this order: the last branch runs only when nothing else is ready.
                biased;
                // Stop reading; what was appended is flushed below.
                _ = requested(stop) => break SessionEnd::Stopped,
                // The flusher made more durable: acknowledge it.
                changed = durable_rx.changed() => {
                    if changed.is_err() {
                        break SessionEnd::Failed(SourceError::Transient("flusher stopped".into()));
                    }
                    let durable = *durable_rx.borrow_and_update();
                    // Acknowledge what the flush covered even while newer transactions keep
                    // arriving: under steady load the flusher is always one group behind.
                    durable_end = durable_end.max(Lsn(durable.end_lsn));
                    let caught_up = staged.is_empty()
                        && applied.is_none_or(|p| p.commit_lsn <= durable.commit_lsn);
                    let mut ack = durable_end;
                    if caught_up && !assembler.in_transaction() {
                        ack = ack.max(idle_wal_end.take().unwrap_or(Lsn::ZERO));
                    }
                    self.ack(&client, ack);
                }
                // A classification's recheck is due: its rows are evaluated again against
                // the live table (after the staged transactions, whose state comes first).
                _ = until(self.classifier.next_recheck()) => {
                    if !staged.is_empty() {
                        match self.write_staged(&mut staged, &applied_tx).await? {
                            Ok(position) => applied = position,
                            Err(e) => break SessionEnd::Failed(e),
                        }
                    }
                    self.settle().await?;
                    match self.recheck().await {
                        Ok(()) => {}
                        Err(ClassifyError::Transient(m)) => break SessionEnd::Failed(SourceError::Transient(m)),
                        Err(e) => return Err(RunError::Stream(e.to_string())),
                    }
                }
                // A pause in reading is over.
                _ = until(resume_at), if resume_at.is_some() => {
                    resume_at = None;
                }
                event = client.recv(), if resume_at.is_none() => {
                    read_since_pause = true;
                    let event = match event {
                        Ok(Some(event)) => event,
                        Ok(None) => break SessionEnd::Failed(SourceError::Transient("replication stream ended".into())),
                        Err(e) => break SessionEnd::Failed(e.into()),
                    };
                    match event {
                        ReplicationEvent::Begin { final_lsn, commit_time_micros, xid, .. } => {
                            assembler.begin(final_lsn, commit_time_micros, xid);
                        }
                        ReplicationEvent::XLogData { data, .. } => match assembler.change(&data) {
                            Ok(ready) => {
                                if !ready.is_empty() {
                                    self.log.append(&ready, None, now_ms())?;
                                }
                                let retyped = assembler.take_retyped();
                                if !retyped.is_empty() {
                                    // The transactions before are evaluated with the types
                                    // their values have.
                                    if !staged.is_empty() {
                                        match self.write_staged(&mut staged, &applied_tx).await? {
                                            Ok(position) => applied = position,
                                            Err(e) => break SessionEnd::Failed(e),
                                        }
                                    }
                                    match self.classifier.retype(&retyped).await {
                                        Ok(()) => {}
                                        Err(ClassifyError::Transient(m)) => break SessionEnd::Failed(SourceError::Transient(m)),
                                        Err(e) => return Err(RunError::Stream(e.to_string())),
                                    }
                                }
                                // A huge transaction's touched rows leave memory; so
                                // does one that truncated a classified table (every
                                // row of it is then gone: derived a page at a time).
                                let truncating = assembler.truncated_classified()
                                    && self.spilled.is_none();
                                if assembler.classified_rows() >= SPILL_ROWS || truncating {
                                    self.spill(assembler)?;
                                }
                            }
                            Err(TxnError::Protocol(m)) => break SessionEnd::Failed(SourceError::Transient(m)),
                            Err(e @ TxnError::Definite(_)) => return Err(RunError::Stream(e.to_string())),
                        },
                        ReplicationEvent::Commit { lsn, end_lsn, .. } => match assembler.commit(lsn, end_lsn) {
                            // A whole transaction went through: the session works, so the next
                            // interruption starts the backoff afresh. (Not at Begin: a stream
                            // that fails at the same place every time must back off.)
                            Ok(Some(committed)) if self.spilled.as_ref().is_some_and(|(l, _)| *l == lsn.0) => {
                                backoff.reset();
                                // The transactions before it come first.
                                if !staged.is_empty() {
                                    match self.write_staged(&mut staged, &applied_tx).await? {
                                        Ok(position) => applied = position,
                                        Err(e) => break SessionEnd::Failed(e),
                                    }
                                }
                                self.settle().await?;
                                match self.write_spilled(committed).await {
                                    Ok(position) => applied = Some(position),
                                    Err(ClassifyError::Transient(m)) => break SessionEnd::Failed(SourceError::Transient(m)),
                                    Err(e) => return Err(RunError::Stream(e.to_string())),
                                }
                                applied_tx.send_replace(applied);
                            }
                            Ok(Some(committed)) => {
                                backoff.reset();
                                if committed.spilled {
                                    for (hook, count) in &committed.ordinals {
                                        self.log.truncate_transaction(hook, lsn.0, *count)?;
                                    }
                                }
                                // An earlier pass over this transaction spilled it (under
                                // another config) and may have left notifications of
                                // every webhook: drop them, this pass writes its own.
                                if self.spill_marker == Some(lsn.0) {
                                    for hook in &self.hooks {
                                        let from = committed.ordinals.get(hook).copied().unwrap_or(0);
                                        self.log.truncate_transaction(hook, lsn.0, from)?;
                                    }
                                    classification::forget_spilled(self.log)?;
                                    self.spill_marker = None;
                                }
                                if staged.push(committed) {
                                    match self.write_staged(&mut staged, &applied_tx).await? {
                                        Ok(position) => applied = position,
                                        Err(e) => break SessionEnd::Failed(e),
                                    }
                                }
                            }
                            // Already in the log: a replay after a restart.
                            Ok(None) => {
                                if applied.is_none() && staged.is_empty() {
                                    self.ack(&client, end_lsn);
                                }
                            }
                            Err(TxnError::Protocol(m)) => break SessionEnd::Failed(SourceError::Transient(m)),
                            Err(e @ TxnError::Definite(_)) => return Err(RunError::Stream(e.to_string())),
                        },
                        ReplicationEvent::KeepAlive { wal_end, .. } => {
                            if !assembler.in_transaction() {
                                let durable = self.durable_tx.borrow().commit_lsn;
                                if staged.is_empty() && applied.is_none_or(|p| p.commit_lsn <= durable) {
                                    // Nothing is waiting for a flush: the server may drop
                                    // WAL up to here (an idle database never holds WAL).
                                    self.ack(&client, wal_end);
                                } else {
                                    idle_wal_end = Some(wal_end);
                                }
                            }
                        }
                        ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
                    }
                }
                // The group in flight is written: the next one may go.
                written = written(&mut self.in_flight), if self.in_flight.is_some() => {
                    self.in_flight = None;
                    written?;
                }
                // Nothing else is ready, and the stream has had a pause to send more: write
                // the staged transactions. A group of mutation notifications also waits for
                // the one in flight, growing meanwhile: under a steady stream one small batch
                // per transaction or two would cost more than the stream itself. A group with
                // classified transactions starts its evaluation at once (it overlaps the
                // write in flight).
                _ = std::future::ready(()), if !staged.is_empty() && waited
                    && (self.in_flight.is_none() || !staged.classified.is_empty()) => {
                    waited = false;
                    match self.write_staged(&mut staged, &applied_tx).await? {
                        Ok(position) => applied = position,
                        Err(e) => break SessionEnd::Failed(e),
                    }
                }
                // Nothing at all to do: the group in flight may be written now (under load the
                // next group's evaluation lets it go once it has read the rows it needs).
                _ = std::future::ready(()), if self.in_flight.as_ref().is_some_and(|f| f.go.is_some()) => {
                    self.release();
                }
                // Everything that had arrived is read: read again after a pause.
                _ = std::future::ready(()), if read_since_pause && resume_at.is_none() => {
                    read_since_pause = false;
                    waited = true;
                    resume_at = Some(tokio::time::Instant::now() + READ_PAUSE);
                }
            }
        };
        // Transactions staged when the loop ended are complete: write them too (nothing was
        // acknowledged for them, so dropping them is safe as well: the next session streams
        // them again).
        if !staged.is_empty() {
            match self.write_staged(&mut staged, &applied_tx).await? {
                Ok(position) => applied = position,
                Err(e) => {
                    tracing::warn!(error = %e, "classifications could not be evaluated; the transactions will be streamed again");
                }
            }
        }
        self.settle().await?;

        // Flush what this session appended, then acknowledge it before closing.
        drop(applied_tx);
        match flusher.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(RunError::Stream(format!("flusher task failed: {e}"))),
        }
        if let Some(pos) = applied {
            self.ack(&client, Lsn(pos.end_lsn));
        }
        if matches!(end, SessionEnd::Stopped) {
            // Give the worker one status interval to report the final position; the slot is
            // also advanced with SQL afterwards.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), client.shutdown()).await;
        Ok(end)
    }

    /// Evaluates the staged group's classifications (letting the group in flight go once
    /// the stored rows are read), then has it written to the log in one batch in the
    /// background ([`InFlight`]); returns the position it reaches, which the
    /// job publishes to the flusher once written. The inner error is the database going
    /// away: nothing was written, and the session ends; the group, never acknowledged, is
    /// streamed again.
    async fn write_staged(
        &mut self,
        staged: &mut Staged,
        applied_tx: &watch::Sender<Option<Position>>,
    ) -> Result<Result<Option<Position>, SourceError>, RunError> {
        let group = std::mem::take(staged);
        let pending = self.in_flight.as_ref().map(|f| f.state.clone());
        let release = self.in_flight.as_mut().and_then(|f| f.go.take());
        let (transitions, state) = match self
            .classifier
            .evaluate(&group.classified, self.log, pending, release)
            .await
        {
            Ok(derived) => derived,
            Err(ClassifyError::Transient(m)) => return Ok(Err(SourceError::Transient(m))),
            Err(e) => return Err(RunError::Stream(e.to_string())),
        };
        // The group before must be in the log before this one (its position is earlier).
        self.settle().await?;
        let mut notifications = group.notifications;
        notifications.extend(transitions);
        let state = std::sync::Arc::new(state);
        let position = group.position;
        let (log, written, applied) = (self.log.clone(), state.clone(), applied_tx.clone());
        let (go, gate) = tokio::sync::oneshot::channel::<()>();
        let job = tokio::task::spawn_blocking(move || {
            let _ = gate.blocking_recv();
            log.append_with_state(&notifications, &written, position, now_ms())?;
            applied.send_replace(position);
            Ok(())
        });
        self.in_flight = Some(InFlight {
            state,
            job,
            go: Some(go),
        });
        Ok(Ok(position))
    }

    /// Waits until the group in flight, if any, is written.
    async fn settle(&mut self) -> Result<(), RunError> {
        self.release();
        let result = written(&mut self.in_flight).await;
        self.in_flight = None;
        result
    }

    /// Lets the group in flight be written now.
    fn release(&mut self) {
        if let Some(go) = self.in_flight.as_mut().and_then(|f| f.go.take()) {
            let _ = go.send(());
        }
    }

    /// Moves the open transaction's touched rows of classified tables to the scratch area.
    fn spill(&mut self, assembler: &mut Assembler) -> Result<(), LogError> {
        let Some((lsn, changes)) = assembler.drain_changes() else {
            return Ok(());
        };
        let first = self.spilled.as_ref().is_none_or(|(l, _)| *l != lsn);
        if first {
            tracing::info!(lsn = %Lsn(lsn), "a large transaction: its rows of classified tables are kept in the data dir, not in memory");
            self.spilled = Some((lsn, Default::default()));
            self.spill_marker = Some(lsn);
        }
        if let Some((_, truncations)) = self.spilled.as_mut() {
            classification::spill(self.log, changes, first, Some(lsn), truncations)?;
        }
        Ok(())
    }

    /// Writes a spilled transaction: its remaining mutation notifications, its transitions
    /// (derived chunk by chunk from the scratch area), then its state and position.
    async fn write_spilled(
        &mut self,
        mut committed: crate::txn::Committed,
    ) -> Result<Position, ClassifyError> {
        let lsn = committed.position.commit_lsn;
        let changes = std::mem::take(&mut committed.changes);
        let truncated = changes.truncated();
        let (_, mut truncations) = self.spilled.take().unwrap_or_default();
        classification::spill(self.log, changes, false, None, &mut truncations)?;
        // Invisible to delivery until the position is written.
        self.log.append(&committed.notifications, None, now_ms())?;
        let transitions = self
            .classifier
            .evaluate_spilled(&committed.ctx, &truncated, &committed.ordinals, self.log)
            .await?;
        // An interrupted earlier pass may have written more notifications for a webhook.
        let mut counts = committed.ordinals;
        for hook in self.classifier.hooks() {
            counts.entry(hook).or_insert(0);
        }
        counts.extend(transitions);
        for (hook, count) in &counts {
            self.log.truncate_transaction(hook, lsn, *count)?;
        }
        classification::apply_staged(self.log, committed.position)?;
        self.spill_marker = None;
        Ok(committed.position)
    }

    /// Runs the due rechecks; their notifications are numbered after the log's last
    /// transaction, written, flushed, and handed to the queues.
    async fn recheck(&mut self) -> Result<(), ClassifyError> {
        let lsn = self.log.position()?.map_or(0, |p| p.commit_lsn);
        let at = crate::derive::mutation::TxnContext {
            xid: 0,
            lsn,
            lsn_text: Lsn(lsn).to_string(),
            committed_at: humantime::format_rfc3339_micros(std::time::SystemTime::now())
                .to_string(),
        };
        let (notifications, state) = self.classifier.recheck(self.log, &at).await?;
        if notifications.is_empty() && state.is_empty() {
            return Ok(());
        }
        self.log
            .append_with_state(&notifications, &state, None, now_ms())?;
        self.log.flush().await?;
        // Wake the queues: they read notifications up to the durable position, which this
        // did not move.
        self.durable_tx.send_modify(|_| {});
        if !notifications.is_empty() {
            tracing::info!(
                notifications = notifications.len(),
                "recheck found transitions"
            );
        }
        Ok(())
    }

    fn ack(&mut self, client: &ReplicationClient, lsn: Lsn) {
        if lsn > self.acked {
            self.acked = lsn;
            client.update_applied_lsn(lsn);
        }
    }
}

/// Committed transactions waiting to be written to the log as one batch.
#[derive(Default)]
struct Staged {
    notifications: Vec<NewNotification>,
    /// Transactions that touched classified tables, evaluated when the group is written.
    classified: Vec<StagedTxn>,
    classified_rows: usize,
    position: Option<Position>,
    transactions: usize,
    /// The notifications' bodies.
    bytes: usize,
}

impl Staged {
    fn is_empty(&self) -> bool {
        self.position.is_none()
    }

    /// Adds a transaction; true when the group is full and must be written now.
    fn push(&mut self, committed: crate::txn::Committed) -> bool {
        self.bytes += committed
            .notifications
            .iter()
            .map(|n| n.body.len())
            .sum::<usize>();
        self.notifications.extend(committed.notifications);
        if !committed.changes.is_empty() {
            self.classified_rows += committed.changes.rows();
            self.classified.push(StagedTxn {
                ctx: committed.ctx,
                changes: committed.changes,
                ordinals: committed.ordinals,
            });
        }
        self.position = Some(committed.position);
        self.transactions += 1;
        self.notifications.len() >= GROUP_NOTIFICATIONS
            || self.bytes >= GROUP_BYTES
            || self.transactions >= GROUP_TRANSACTIONS
            || self.classified_rows >= GROUP_CLASSIFIED_ROWS
    }
}

/// At most this many notifications of committed transactions wait to be written as one batch
/// (large groups matter when catching up: each costs a sled batch, and with classifications
/// an evaluation round trip),
const GROUP_NOTIFICATIONS: usize = 1024;
/// and at most this many bytes of their bodies (`max_rows` rows each at most),
const GROUP_BYTES: usize = 4 << 20;
/// and at most this many committed transactions (some have no notifications),
const GROUP_TRANSACTIONS: usize = 1024;
/// and at most this many touched rows of classified tables (evaluated together).
const GROUP_CLASSIFIED_ROWS: usize = 4096;
/// A transaction touching more rows of classified tables than this keeps them in the data
/// dir instead of memory.
const SPILL_ROWS: usize = 10_000;

/// When the stream has read everything that had arrived, it reads again only this much
/// later, and writes the transactions it staged after that. The walsender sends every
/// message as it decodes it: while walhook kept up with it, reading each one as it came
/// cost wakeups, `recv`s and TCP acknowledgements per message on both sides, and small
/// sled batches, so that walhook took several times the CPU it needs, from the walsender
/// it was waiting for (the benchmark's mutation-only run: 2.9–7.3 s of CPU for 200,000
/// rows, 1.1 s with this pause and [`crate::source::EVENT_BUFFER`]). A transaction's
/// notifications wait about this much longer (up to twice: tokio's timers round up to the
/// next millisecond).
const READ_PAUSE: Duration = Duration::from_millis(1);

/// When groups were written while a flush ran, the next flush starts at least this long
/// after it. Each flush is a write and an `fdatasync`: while walhook keeps up with a steady
/// stream of small transactions, a flush per group (a transaction or two) cost more than the
/// stream itself (the sled I/O threads took a sixth of the machine in the benchmark's
/// mutation-only run). A transaction arriving alone is flushed at once.
const FLUSH_SPACING: Duration = Duration::from_millis(2);

/// Flushes the log whenever transactions were appended (see [`FLUSH_SPACING`]), then
/// publishes the commit LSN the flush covered. Ends (after a last flush) when the session
/// drops `applied`.
async fn flush_loop(
    log: Log,
    mut applied: watch::Receiver<Option<Position>>,
    durable: watch::Sender<Position>,
) -> Result<(), LogError> {
    let mut flushed: Option<Position> = None;
    // When the last flush started, if more was written while it ran.
    let mut back_to_back: Option<tokio::time::Instant> = None;
    loop {
        let closed = applied.changed().await.is_err();
        if let (false, Some(started)) = (closed, back_to_back) {
            // Groups keep coming: this flush covers those written meanwhile too.
            tokio::time::sleep_until(started + FLUSH_SPACING).await;
        }
        let target = *applied.borrow_and_update();
        if target != flushed {
            let started = tokio::time::Instant::now();
            log.flush().await?;
            if let Some(pos) = target {
                durable.send_replace(pos);
            }
            flushed = target;
            back_to_back = applied.has_changed().unwrap_or(false).then_some(started);
        }
        if closed {
            return Ok(());
        }
    }
}

/// Prunes delivered notifications older than the retention, at start and every 10 minutes.
async fn prune(log: Log, retention: Duration, mut stop: Stop) {
    loop {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        // A scan of every delivered entry: off the runtime's threads.
        let pruning = log.clone();
        let pruned = tokio::task::spawn_blocking(move || pruning.prune_delivered(cutoff))
            .await
            .unwrap_or(Ok(0));
        match pruned {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "pruned delivered notifications past retention"),
            Err(e) => tracing::warn!(error = %e, "pruning the delivery log failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
            _ = requested(&mut stop) => return,
        }
    }
}

/// Sleeps until `when`; forever when there is nothing to wait for.
async fn until(when: Option<tokio::time::Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}
