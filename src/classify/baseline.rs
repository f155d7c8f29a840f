//! The silent baseline: every existing row's value of a classification, read from a snapshot
//! consistent with a replication slot, stored without events.
//!
//! ```text
//!  CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT ──► consistent point S + snapshot name
//!        │ (session held open)
//!        ▼
//!  BEGIN REPEATABLE READ; SET TRANSACTION SNAPSHOT; DECLARE CURSOR; FETCH n ... (batches)
//!        ▼
//!  conditions evaluated on each batch (same query as the stream's) ──► records in sled
//!        ▼
//!  meta: fingerprint + active_from = S ──► the stream applies the classification only to
//!                                          transactions committed at or after S
//! ```
//!
//! Memory holds one batch at a time, so a table of any size fits.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use tokio_postgres::SimpleQueryMessage;

use crate::config::quote_ident;
use crate::derive::classification::{
    key_text, ClassifiedTable, ClassifyError, Dependency, Evaluator,
};
use crate::log::{Log, LogError};
use crate::source::Database;
use crate::state::{self, ClassMeta, Packed, Record};

/// Rows read and evaluated per round trip.
const BATCH: usize = 2000;

/// Builds the state of `table.classes[class]` from `snapshot` (replacing any earlier state),
/// then records `meta`. Returns how many rows the table has.
pub async fn baseline(
    db: &Database,
    snapshot: &str,
    log: &Log,
    table: &ClassifiedTable,
    class: usize,
    meta: &ClassMeta,
    dependencies: &[ClassifiedTable],
) -> Result<u64, ClassifyError> {
    let spec = &table.classes[class];
    let key = &table.key;
    // Forget the old state first. Meanwhile the meta matches no query (an interrupted
    // baseline is done again at the next start) but still names the table (a
    // classification dropped from the config after the interruption is forgotten there).
    let table_text = table.table.to_string();
    let unfinished = ClassMeta {
        fingerprint: String::new(),
        active_from: 0,
        table: table_text.clone(),
    };
    log.write_raw(&[(
        state::meta_key(&spec.name),
        Some(serde_json::to_vec(&unfinished).unwrap_or_default()),
    )])?;
    state::forget(log, &table_text, &spec.name)?;
    log.remove_prefix(&state::dependency_prefix(&spec.name))?;

    let client = db.connect().await?;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            crate::config::quote_literal(snapshot)
        ))
        .await
        .map_err(crate::source::SourceError::from)?;
    let total: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {}", table.table.quoted()),
            &[],
        )
        .await
        .map_err(crate::source::SourceError::from)?
        .get(0);
    let selected: Vec<String> = key
        .iter()
        .map(|k| quote_ident(&k.name))
        .chain(table.columns.iter().map(|(name, _)| quote_ident(name)))
        .collect();
    client
        .batch_execute(&format!(
            "DECLARE walhook_baseline NO SCROLL CURSOR FOR SELECT {} FROM {}",
            selected.join(", "),
            table.table.quoted()
        ))
        .await
        .map_err(crate::source::SourceError::from)?;

    let mut progress = Progress::new(&spec.name, &table.table.to_string(), total.max(0) as u64);
    let mut evaluator = Evaluator::new(client, true);
    let fetch = format!("FETCH {BATCH} FROM walhook_baseline");
    loop {
        let messages = evaluator
            .client()
            .simple_query(&fetch)
            .await
            .map_err(crate::source::SourceError::from)?;
        let mut labels = Vec::with_capacity(BATCH);
        let mut images = Vec::with_capacity(BATCH);
        for message in &messages {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            labels.push(key_text(key, |i| row.get(i)));
            images.push(
                (0..table.columns.len())
                    .map(|c| row.get(key.len() + c).map(str::to_string))
                    .collect::<Vec<_>>(),
            );
        }
        if images.is_empty() {
            break;
        }
        let values = evaluator
            .evaluate(table, Some(class), &images, &labels)
            .await?;
        let mut writes = Vec::with_capacity(images.len());
        for ((label, image), value) in labels.iter().zip(&images).zip(values) {
            let columns = spec
                .columns
                .iter()
                .map(|name| {
                    let at = table.columns.iter().position(|(n, _)| n == name);
                    (name.clone(), at.and_then(|at| image[at].clone()))
                })
                .collect();
            let record = Record {
                value: value[class],
                lsn: 0,
                columns,
            };
            // The row's records of the other classifications stay as they are.
            let row_key = state::row_key(&table_text, label);
            let mut packed = match log.get_raw(&row_key)? {
                Some(bytes) => Packed::decode(&bytes).map_err(|reason| LogError::Corrupt {
                    key: String::from_utf8_lossy(&row_key).into_owned(),
                    reason,
                })?,
                None => Packed::default(),
            };
            packed.set(&spec.name, Some(record));
            writes.push((row_key, packed.stored()));
        }
        log.write_bulk(&writes)?;
        progress.advance(images.len() as u64);
    }
    for (index, dep) in spec.deps.iter().enumerate() {
        dependency_baseline(
            evaluator.client(),
            log,
            &spec.name,
            index,
            dep,
            dependencies,
        )
        .await?;
    }
    evaluator
        .client()
        .batch_execute("COMMIT")
        .await
        .map_err(crate::source::SourceError::from)?;
    log.write_raw(&[(
        state::meta_key(&spec.name),
        Some(serde_json::to_vec(meta).unwrap_or_default()),
    )])?;
    progress.finish();
    Ok(total.max(0) as u64)
}

/// Records, under the open snapshot, where each row of a dependency's table points (its
/// `via` values), so that its later update or delete re-evaluates the right base rows.
async fn dependency_baseline(
    client: &tokio_postgres::Client,
    log: &Log,
    class: &str,
    index: usize,
    dep: &Dependency,
    tables: &[ClassifiedTable],
) -> Result<(), ClassifyError> {
    let Some(table) = tables.iter().find(|t| t.table == dep.table) else {
        return Ok(());
    };
    let key = &table.key;
    let selected: Vec<String> = key
        .iter()
        .map(|k| &k.name)
        .chain(&dep.via)
        .map(|name| quote_ident(name))
        .collect();
    let not_null: Vec<String> = dep
        .via
        .iter()
        .map(|name| format!("{} IS NOT NULL", quote_ident(name)))
        .collect();
    let source = |e| ClassifyError::from(crate::source::SourceError::from(e));
    client
        .batch_execute(&format!(
            "DECLARE walhook_dependency NO SCROLL CURSOR FOR SELECT {} FROM {} WHERE {}",
            selected.join(", "),
            dep.table.quoted(),
            not_null.join(" AND ")
        ))
        .await
        .map_err(source)?;
    let fetch = format!("FETCH {BATCH} FROM walhook_dependency");
    loop {
        let messages = client.simple_query(&fetch).await.map_err(source)?;
        let mut writes = Vec::new();
        for message in &messages {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            let label = key_text(key, |i| row.get(i));
            let record = Record {
                value: crate::state::Known::False,
                lsn: 0,
                columns: dep
                    .via
                    .iter()
                    .enumerate()
                    .map(|(i, name)| (name.clone(), row.get(key.len() + i).map(str::to_string)))
                    .collect(),
            };
            writes.push((
                state::dependency_key(class, index, &label),
                Some(Packed::pointer(record).encode()),
            ));
        }
        if writes.is_empty() {
            break;
        }
        log.write_bulk(&writes)?;
    }
    client
        .batch_execute("CLOSE walhook_dependency")
        .await
        .map_err(source)?;
    Ok(())
}

/// Baseline progress: a bar on a terminal, a log line every few seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    name: String,
    table: String,
    total: u64,
    done: u64,
    started: Instant,
    logged: Instant,
}

impl Progress {
    fn new(name: &str, table: &str, total: u64) -> Progress {
        tracing::info!(
            classification = name,
            table,
            rows = total,
            "baseline started"
        );
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "baseline {msg} [{bar:30}] {pos}/{len} rows ({per_sec}, {eta} left)",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(name.to_string());
            bar
        });
        Progress {
            bar,
            name: name.to_string(),
            table: table.to_string(),
            total,
            done: 0,
            started: Instant::now(),
            logged: Instant::now(),
        }
    }

    fn advance(&mut self, rows: u64) {
        self.done += rows;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
        } else if self.logged.elapsed() >= Duration::from_secs(5) {
            self.logged = Instant::now();
            tracing::info!(
                classification = %self.name,
                table = %self.table,
                done = self.done,
                rows = self.total,
                "baseline in progress"
            );
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        tracing::info!(
            classification = %self.name,
            table = %self.table,
            rows = self.done,
            seconds = format!("{:.1}", self.started.elapsed().as_secs_f64()),
            "baseline done (no events for existing rows)"
        );
    }
}
