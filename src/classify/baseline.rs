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

use serde_json::Value;
use tokio_postgres::SimpleQueryMessage;

use crate::config::quote_ident;
use crate::derive::classification::{ClassifiedTable, ClassifyError, Evaluator};
use crate::log::Log;
use crate::schema::KeyColumn;
use crate::source::Database;
use crate::state::{self, ClassMeta, Record};
use crate::txn::key_json;

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
    key: &[KeyColumn],
    meta: &ClassMeta,
) -> Result<u64, ClassifyError> {
    let spec = &table.classes[class];
    // Forget the old state first: a baseline interrupted half-way leaves no meta, so the
    // next start baselines again.
    log.write_raw(&[(state::meta_key(&spec.name), None)])?;
    log.remove_prefix(&state::class_prefix(&spec.name))?;

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
        .map(|k| format!("{}::text", quote_ident(&k.name)))
        .chain(
            table
                .columns
                .iter()
                .map(|(name, _)| format!("{}::text", quote_ident(name))),
        )
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
                value: value[0],
                lsn: 0,
                columns,
            };
            writes.push((state::row_key(&spec.name, label), Some(record.encode())));
        }
        log.write_raw(&writes)?;
        progress.advance(images.len() as u64);
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

/// The primary key's JSON text, as the stream names the row: a scalar for a one-column key,
/// an object in key order for a composite one.
fn key_text<'a>(key: &[KeyColumn], get: impl Fn(usize) -> Option<&'a str>) -> String {
    let value = |i: usize| key_json(get(i).unwrap_or("").as_bytes(), key[i].type_oid);
    if key.len() == 1 {
        return value(0).to_string();
    }
    let mut object = serde_json::Map::with_capacity(key.len());
    for (i, column) in key.iter().enumerate() {
        object.insert(column.name.clone(), value(i));
    }
    Value::Object(object).to_string()
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
