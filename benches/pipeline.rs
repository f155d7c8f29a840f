//! The pipeline benchmark (a benchmark, not a test): walhook against `pg_recvlogical` on one
//! throwaway PostgreSQL cluster, in one run.
//!
//! ```sh
//! cargo bench --bench pipeline          # builds lib, bin and bench (release settings), runs
//! cargo bench --bench pipeline -- --rows 200000 --small-txns 5000 --pairs 1 --seconds 5
//! PIPELINE_ROWS=200000 cargo bench --bench pipeline     # the same settings by environment
//! cargo bench --bench pipeline -- --only classifications --pairs 1   # phases 4 and 5 only
//! ```
//!
//! Settings (argument / environment / default): `--rows` `PIPELINE_ROWS` 1000000,
//! `--small-txns` `PIPELINE_SMALL_TXNS` 20000, `--rate` `PIPELINE_RATE` 500 (tx/s),
//! `--seconds` `PIPELINE_SECONDS` 10, `--max-rows` `PIPELINE_MAX_ROWS` 1000 (the webhook's
//! `max_rows`), `--pairs` `PIPELINE_PAIRS` 2, `--class-rows` `PIPELINE_CLASS_ROWS` 200000
//! (rows changed in phase 4), `--baseline-rows` `PIPELINE_BASELINE_ROWS` 1000000 (phase 5's
//! table), `--only` `PIPELINE_ONLY` all (a comma-separated list of phases: `large`, `small`,
//! `latency`, `classified`, `baseline`; `classifications` stands for the last two); diagnostic
//! only: `--receiver-delay-ms` `PIPELINE_RECEIVER_DELAY_MS` 0 (the throughput phases'
//! receiver answers that late, so that delivery hardly competes with streaming; not the real
//! setting, and labelled so).
//!
//! `cargo bench` also builds the `walhook` binary (a bench target is selected, so cargo builds
//! the package's binaries with the bench profile, i.e. release settings, into
//! `target/release/walhook`); the bench runs it from `CARGO_BIN_EXE_walhook` and stops with a
//! clear message if it is missing (then: `cargo build --release --bin walhook`).
//!
//! What it measures, all against the same cluster (the test harness's settings:
//! `wal_level=logical`, **`fsync=off`**, 127.0.0.1, random port):
//!
//! 1. **Large transaction**: a table `bench (id bigint primary key, payload text)`, a
//!    publication, one pair of pgoutput slots per comparison made beforehand, then ONE
//!    transaction inserting `rows` rows. `pg_recvlogical --start -E <end> -o proto_version=1
//!    -f /dev/null --no-loop` is timed from spawn to exit; `walhook run` (one insert event, one
//!    webhook to a local receiver answering 200 at once) from spawn until its slot's
//!    `confirmed_flush_lsn` reaches the end (polled every 10 ms). `<end>` is
//!    `pg_current_wal_lsn()` right after the commit. Peak RSS is walhook's VmHWM.
//! 2. **Many small transactions**: the same with `small_txns` one-row transactions from
//!    `pgbench -n -c 1 -t N`.
//!
//!    Each comparison runs `pairs` times back to back, alternating which side goes first;
//!    the ratio is walhook's rows/s over pg_recvlogical's, from each side's total time.
//! 3. **Latency**: after `VACUUM ANALYZE` and `CHECKPOINT` (so that the earlier phases'
//!    aftermath does not run meanwhile), walhook on a fresh slot, caught up; `pgbench -R rate
//!    -T seconds -c 2` one-row inserts; latency = arrival at the receiver (head received) −
//!    the body's `committed_at` (same machine clock).
//! 4. **Classifications** (issue 3: classified rows/s ≥ 0.5 × mutation-only rows/s): a table
//!    `bench_accounts` (status, plan, balance, score, country, dates; `class_rows / 2` rows,
//!    at least 1000) in its own publication, and five classifications of it ([`CLASSES`]:
//!    conditions over several columns, with functions, each with an event `any → any` or
//!    `false → true`, so that every row image is evaluated). One pair of slots per
//!    comparison, made beforehand; walhook runs once on each before the workload and is
//!    stopped with SIGTERM once it logs "streaming". That first run is what makes the
//!    comparison possible: on an existing slot, walhook baselines new classifications from a
//!    temporary slot made at start and classifies only transactions committed after it
//!    (`src/run.rs`, `baselines`); started after the workload, it would baseline the
//!    workload's result and classify nothing. Then `pgbench -M prepared -c 1` runs
//!    `class_rows / 5` transactions of one insert and one update of four consecutive existing
//!    rows ([`ACCOUNTS_SCRIPT`]), and each pair times, alternating which goes first as above,
//!    walhook with one mutation event (inserts and updates of the table, one webhook) and
//!    walhook with the same event plus the five classification events (six webhooks), each
//!    from spawn until its slot's `confirmed_flush_lsn` reaches the end. The ratio is
//!    classified rows/s over mutation-only rows/s, rows counting inserts and updates.
//!    Then the **store floor** ([`sled_floor`]): sled alone doing the classified run's state
//!    reads and writes and its classification notifications' segments, shaped as the run
//!    (its data dir's entries), with nothing else: `mutation-only / (mutation-only + floor)`
//!    estimates the best ratio a design that keeps per-row state in sled could reach here
//!    (an estimate: work that overlaps the store's could beat it).
//! 5. **Baseline**: a table `bench_baseline` of `baseline_rows` rows (the same columns,
//!    `VACUUM ANALYZE`d), one classification, no slot: walhook creates the slot with an
//!    exported snapshot and baselines from it, as on a first deployment. Timed from spawn
//!    until its log says "baseline done" (also: until "streaming", and walhook's own
//!    `seconds=` on that line, which leaves out start-up and slot creation).
//!
//! Each phase drops its slots when done with them (the cluster allows 20).
//!
//! Results are printed as a table and written to `target/bench-pipeline.json`.
//!
//! Caveats, also printed: the `confirmed_flush_lsn` clock includes walhook's replication
//! status interval (it reports a flushed position at most that often, see `src/source.rs`);
//! notifications are delivered only after the sled flush, so "all delivered" bounds the time
//! to durable from above. The receiver runs in this process, and the machine's cores are
//! shared with PostgreSQL (and whatever else runs): compare ratios, not absolute times.
//! Phase 4: the classified run starts with the baselined state in its data dir (five
//! records per existing row), the mutation-only one with an almost empty one; delivery of
//! the classified run's extra notifications competes with its streaming, as it would in
//! production; how many transitions fire is not known beforehand, so after the timed part
//! it waits until no notification arrived for 3 s. The conditions read only the row's own
//! columns: dependencies on other tables and `recheck` are not measured.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use tokio_postgres::Client;

#[allow(dead_code)]
#[path = "../tests/support/pg.rs"]
mod pg;
#[allow(dead_code)]
#[path = "../tests/support/process.rs"]
mod process;
#[allow(dead_code)]
#[path = "../tests/support/receiver.rs"]
mod receiver;

use pg::PgCluster;
use process::{walhook_bin, write_config, Walhook};
use receiver::{Plan, Receiver, Recorded};

/// walhook's allocator (src/main.rs): the store floor of phase 4 runs sled as walhook does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Standard Webhooks test-vector secret (any valid secret does).
const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const PUBLICATION: &str = "bench_pub";
/// Every run of the bench ends within this, cleaning up on the way out.
const OVERALL_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// One catch-up (pg_recvlogical or walhook) may take this long at most.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(15 * 60);
const POLL: Duration = Duration::from_millis(10);
/// A catch-up whose notification count is not known beforehand has delivered everything
/// once none arrived for this long.
const QUIET: Duration = Duration::from_secs(3);
/// What walhook logs during the bench: production-like, not the tests' debug level.
const WALHOOK_LOG: &str = "info";

const TARGET_RATIO: f64 = 0.8;
const TARGET_P99_MS: f64 = 50.0;
const TARGET_RSS_MB: f64 = 150.0;
/// Rows/s with five classifications over mutation-only rows/s (issue 3).
const TARGET_CLASS_RATIO: f64 = 0.5;

/// The phases, in the order they run; `--only` picks some (`classifications` = the last two).
const PHASES: [&str; 5] = ["large", "small", "latency", "classified", "baseline"];
/// The classification phases' tables have their own publications, so that the earlier
/// phases' slots never decode their changes.
const CLASS_PUBLICATION: &str = "bench_class_pub";
const BASELINE_PUBLICATION: &str = "bench_baseline_pub";
/// Each transaction of the classification workload inserts one account and updates four.
const CLASS_ROWS_PER_TXN: u64 = 5;

/// The five classifications of phase 4, over the columns of [`accounts_table`] (the row
/// is `a`): name, condition, and the transition the event reports. `any → any` fires on every
/// change of value (and on every insert: null → true or false), `false → true` on one
/// direction; either way every row image must be evaluated.
const CLASSES: [(&str, &str, &str, &str); 5] = [
    (
        "account_active",
        "a.status = 'active' AND a.deleted_at IS NULL",
        "false",
        "true",
    ),
    (
        "account_paying",
        "a.plan <> 'free' AND a.balance_cents >= 0 AND a.status IN ('active', 'trial')",
        "any",
        "any",
    ),
    (
        "account_overdrawn",
        "a.balance_cents < -1000 AND a.deleted_at IS NULL",
        "false",
        "true",
    ),
    (
        "account_engaged",
        "a.score >= 80 AND a.last_seen > a.signed_up_at + interval '7 days'",
        "any",
        "any",
    ),
    (
        "account_eu",
        "upper(a.country) IN ('DE', 'FR', 'NL', 'IT', 'ES') AND a.status <> 'closed'",
        "any",
        "any",
    ),
];

/// Phase 4's pgbench script: each transaction signs up one account and records activity on
/// four consecutive existing ones (status, balance, score and sometimes plan change, so the
/// classifications flip). `:accounts` is the table's size before the workload.
const ACCOUNTS_SCRIPT: &str = r"\set a random(1, :accounts - 3)
BEGIN;
INSERT INTO bench_accounts (id, email, status, plan, balance_cents, score, country, signed_up_at, last_seen)
  VALUES (nextval('bench_account_ids'), 'new' || currval('bench_account_ids') || '@example.com',
          (ARRAY['trial', 'active'])[1 + floor(random() * 2)::int], 'free', 0,
          floor(random() * 101)::int,
          (ARRAY['DE', 'FR', 'NL', 'US', 'GB', 'JP', 'BR'])[1 + floor(random() * 7)::int],
          now(), now());
UPDATE bench_accounts
   SET status = (ARRAY['active', 'active', 'trial', 'suspended', 'closed'])[1 + floor(random() * 5)::int],
       plan = CASE WHEN random() < 0.1 THEN (ARRAY['free', 'pro', 'team'])[1 + floor(random() * 3)::int] ELSE plan END,
       balance_cents = balance_cents + floor(random() * 4001)::int - 2000,
       score = floor(random() * 101)::int,
       last_seen = now()
 WHERE id BETWEEN :a AND :a + 3;
END;
";

struct Settings {
    rows: u64,
    small_txns: u64,
    rate: u64,
    seconds: u64,
    max_rows: u64,
    /// Back-to-back comparisons per throughput workload, alternating which side goes first.
    pairs: u64,
    /// Diagnostic only: the receiver of the throughput phases answers after this long, so
    /// that delivery hardly competes with streaming (0: answer at once, the real setting).
    receiver_delay_ms: u64,
    /// Rows changed by the classification workload (mutation-only vs five classifications).
    class_rows: u64,
    /// Rows of the table the classification baseline reads.
    baseline_rows: u64,
    /// The phases to run (`--only`), in the order of [`PHASES`].
    phases: Vec<&'static str>,
}

impl Settings {
    /// From `--rows N` style arguments, else `PIPELINE_ROWS` style environment variables,
    /// else the issue's defaults. Unknown arguments (cargo passes `--bench`) are ignored.
    fn load() -> Settings {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let text = |flag: &str, env: &str| -> Option<String> {
            let from_args = args.iter().enumerate().find_map(|(i, a)| {
                if let Some(v) = a.strip_prefix(&format!("--{flag}=")) {
                    Some(v.to_string())
                } else if a == &format!("--{flag}") {
                    args.get(i + 1).cloned()
                } else {
                    None
                }
            });
            from_args.or_else(|| std::env::var(env).ok())
        };
        let number = |flag: &str, env: &str, t: &str| -> u64 {
            t.trim()
                .replace('_', "")
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("--{flag} / {env}: {t:?} is not a whole number"))
        };
        let get = |flag: &str, env: &str, default: u64| -> u64 {
            match text(flag, env) {
                None => default,
                Some(t) => match number(flag, env, &t) {
                    0 => panic!("--{flag} / {env}: must be at least 1"),
                    n => n,
                },
            }
        };
        let get_or_zero =
            |flag: &str, env: &str| -> u64 { text(flag, env).map_or(0, |t| number(flag, env, &t)) };
        let phases = match text("only", "PIPELINE_ONLY") {
            None => PHASES.to_vec(),
            Some(list) => {
                let mut wanted: Vec<&str> = Vec::new();
                for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    match name {
                        "classifications" => wanted.extend(["classified", "baseline"]),
                        name => match PHASES.iter().find(|p| **p == name) {
                            Some(p) => wanted.push(p),
                            None => panic!(
                                "--only / PIPELINE_ONLY: unknown phase {name:?}; phases: {}, or classifications (= classified,baseline)",
                                PHASES.join(", ")
                            ),
                        },
                    }
                }
                let phases: Vec<&'static str> = PHASES
                    .iter()
                    .copied()
                    .filter(|p| wanted.contains(p))
                    .collect();
                assert!(!phases.is_empty(), "--only / PIPELINE_ONLY: no phase named");
                phases
            }
        };
        Settings {
            rows: get("rows", "PIPELINE_ROWS", 1_000_000),
            small_txns: get("small-txns", "PIPELINE_SMALL_TXNS", 20_000),
            rate: get("rate", "PIPELINE_RATE", 500),
            seconds: get("seconds", "PIPELINE_SECONDS", 10),
            max_rows: get("max-rows", "PIPELINE_MAX_ROWS", 1000),
            pairs: get("pairs", "PIPELINE_PAIRS", 2),
            receiver_delay_ms: get_or_zero("receiver-delay-ms", "PIPELINE_RECEIVER_DELAY_MS"),
            class_rows: get("class-rows", "PIPELINE_CLASS_ROWS", 200_000),
            baseline_rows: get("baseline-rows", "PIPELINE_BASELINE_ROWS", 1_000_000),
            phases,
        }
    }

    fn runs(&self, phase: &str) -> bool {
        self.phases.contains(&phase)
    }
}

fn main() -> ExitCode {
    let settings = Settings::load();
    let bin = PathBuf::from(walhook_bin());
    if !bin.is_file() {
        eprintln!(
            "walhook binary {} is missing: run `cargo build --release --bin walhook` (cargo bench --bench pipeline normally builds it)",
            bin.display()
        );
        return ExitCode::FAILURE;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Dropping the bench future (timeout, Ctrl-C) drops the cluster, walhook and every child
    // process, which stops them.
    let outcome = runtime.block_on(async {
        tokio::select! {
            done = tokio::time::timeout(OVERALL_TIMEOUT, bench(settings, bin)) => {
                done.map_err(|_| format!("the benchmark did not finish within {OVERALL_TIMEOUT:?}"))
            }
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pipeline bench: {e}; the cluster and processes were stopped");
            ExitCode::FAILURE
        }
    }
}

/// The cluster, a SQL connection and a scratch dir shared by the phases.
struct Bench {
    pg: PgCluster,
    sql: Client,
    work: tempfile::TempDir,
    bin: PathBuf,
    settings: Settings,
}

async fn bench(settings: Settings, bin: PathBuf) {
    let started_at = SystemTime::now();
    let load_before = loadavg();
    eprintln!("pipeline bench: starting a throwaway PostgreSQL cluster");
    let pg = PgCluster::start();
    let sql = pg.client().await;
    let work = tempfile::Builder::new()
        .prefix("walhook-bench-")
        .tempdir()
        .expect("bench temp dir");
    let b = Bench {
        pg,
        sql,
        work,
        bin,
        settings,
    };
    let server_version: String = b
        .sql
        .query_one("SHOW server_version", &[])
        .await
        .expect("server version")
        .get(0);
    let fsync: String = b
        .sql
        .query_one("SHOW fsync", &[])
        .await
        .expect("fsync")
        .get(0);
    b.pg.exec(&format!(
        "CREATE TABLE bench (id bigint PRIMARY KEY, payload text);
         CREATE SEQUENCE bench_ids START 1000000000001;
         CREATE PUBLICATION {PUBLICATION} FOR TABLE bench;"
    ))
    .await;
    std::fs::write(
        b.work.path().join("insert.sql"),
        "INSERT INTO bench (id, payload) VALUES (nextval('bench_ids'), md5(random()::text));\n",
    )
    .expect("write pgbench script");

    let large = if b.settings.runs("large") {
        b.large_transaction().await
    } else {
        Value::Null
    };
    let small = if b.settings.runs("small") {
        b.small_transactions().await
    } else {
        Value::Null
    };
    let latency = if b.settings.runs("latency") {
        b.latency().await
    } else {
        Value::Null
    };
    let classified = if b.settings.runs("classified") {
        b.classified().await
    } else {
        Value::Null
    };
    let baseline = if b.settings.runs("baseline") {
        b.baseline().await
    } else {
        Value::Null
    };
    let load_after = loadavg();

    let date = humantime::format_rfc3339_seconds(started_at).to_string();
    let report = json!({
        "date": date,
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "postgres": {
            "version": server_version,
            "fsync": fsync,
            "note": "throwaway cluster with the test harness settings (fsync=off, wal_level=logical); walhook still syncs its sled log to disk",
        },
        "settings": {
            "rows": b.settings.rows,
            "small_txns": b.settings.small_txns,
            "rate_tx_per_s": b.settings.rate,
            "seconds": b.settings.seconds,
            "max_rows": b.settings.max_rows,
            "pairs": b.settings.pairs,
            "receiver_delay_ms": b.settings.receiver_delay_ms,
            "class_rows": b.settings.class_rows,
            "baseline_rows": b.settings.baseline_rows,
            "phases": b.settings.phases,
            "walhook_log": WALHOOK_LOG,
            "walhook_bin": b.bin.display().to_string(),
        },
        "large_transaction": large,
        "small_transactions": small,
        "latency": latency,
        "classifications": classified,
        "baseline": baseline,
        "targets": {
            "throughput_ratio_min": TARGET_RATIO,
            "p99_ms_max": TARGET_P99_MS,
            "peak_rss_mb_max": TARGET_RSS_MB,
            "classified_ratio_min": TARGET_CLASS_RATIO,
        },
    });
    println!("{}", render(&report));
    let out = target_dir().join("bench-pipeline.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&report).expect("report json") + "\n",
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
    println!("written: {}", out.display());
}

impl Bench {
    /// Phase 1: one transaction of `rows` rows.
    async fn large_transaction(&self) -> Value {
        let rows = self.settings.rows;
        let slots = self.create_slot_pairs("large").await;
        eprintln!("pipeline bench: inserting {rows} rows in one transaction");
        let t = Instant::now();
        self.pg
            .exec(&format!(
                "INSERT INTO bench SELECT g, md5(g::text) FROM generate_series(1, {rows}) g"
            ))
            .await;
        let insert_s = t.elapsed().as_secs_f64();
        let end = self.wal_lsn().await;
        let notifications = rows.div_ceil(self.settings.max_rows);
        let runs = self.run_pairs(&slots, &end, notifications).await;
        let mut result = compare("1 transaction", rows, insert_s, &end, &runs);
        // The highest peak over walhook's runs, each read when its slot reached the end.
        let rss = runs
            .iter()
            .filter_map(|r| r.hook.detail["peak_rss_mb_at_confirmed"].as_f64())
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        result["walhook_peak_rss_mb"] = json!(rss);
        result["rss_target_met"] = json!(rss.is_some_and(|m| m < TARGET_RSS_MB));
        result
    }

    /// Phase 2: `small_txns` one-row transactions.
    async fn small_transactions(&self) -> Value {
        let n = self.settings.small_txns;
        let slots = self.create_slot_pairs("small").await;
        eprintln!("pipeline bench: {n} one-row transactions with pgbench");
        let t = Instant::now();
        let out = self.pgbench(&["-n", "-c", "1", "-t", &n.to_string()]).await;
        let generate_s = t.elapsed().as_secs_f64();
        let processed = processed(&out);
        assert_eq!(
            processed,
            Some(n),
            "pgbench did not commit {n} transactions:\n{out}"
        );
        let end = self.wal_lsn().await;
        let runs = self.run_pairs(&slots, &end, n).await;
        compare("one-row transactions", n, generate_s, &end, &runs)
    }

    /// Phase 3: commit → received latency at a steady rate.
    async fn latency(&self) -> Value {
        let s = &self.settings;
        let slot = "walhook_latency";
        // Settle what the throughput phases left behind (autovacuum of a million fresh rows,
        // a checkpoint) so that it does not run during the measurement.
        self.pg.exec("VACUUM ANALYZE bench").await;
        self.pg.exec("CHECKPOINT").await;
        self.create_slot(slot).await;
        let receiver = Receiver::start().await;
        let (mut walhook, _) = self.spawn_walhook(slot, &receiver);
        walhook
            .wait_log_contains("streaming", Duration::from_secs(60))
            .await;
        // Caught up: the slot is at the server's position (nothing else is writing).
        let here = self.wal_lsn().await;
        self.wait_confirmed(slot, &here, &mut walhook, Duration::from_secs(60))
            .await;
        let before: i64 = self
            .sql
            .query_one("SELECT coalesce(max(id), 0) FROM bench", &[])
            .await
            .expect("max id")
            .get(0);

        eprintln!(
            "pipeline bench: latency, {} tx/s for {} s with pgbench -R",
            s.rate, s.seconds
        );
        // Wall clock of the receiver's monotonic arrival instants.
        let anchor = (Instant::now(), SystemTime::now());
        let out = self
            .pgbench(&[
                "-n",
                "-c",
                "2",
                "-j",
                "1",
                "-R",
                &s.rate.to_string(),
                "-T",
                &s.seconds.to_string(),
            ])
            .await;
        let sent: i64 = self
            .sql
            .query_one("SELECT count(*) FROM bench WHERE id > $1", &[&before])
            .await
            .expect("count sent")
            .get(0);
        let sent = sent as u64;
        // Everything should arrive well within this; what has not is reported as missing.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = receiver.requests();
        while rows_in(&got) < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            got = receiver.requests();
        }
        let rss = vm_kb(walhook.pid(), "VmHWM");
        walhook.sigterm();
        let _ = walhook.wait_exit(Duration::from_secs(10)).await;
        self.drop_slot(slot).await;

        let mut latencies: Vec<f64> = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for r in &got {
            let body = r.json();
            let committed = body["committed_at"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .unwrap_or_else(|| panic!("no committed_at in {}", r.body_text()));
            let arrived = anchor.1 + r.at.saturating_duration_since(anchor.0);
            let ms = match arrived.duration_since(committed) {
                Ok(d) => d.as_secs_f64() * 1000.0,
                Err(e) => -e.duration().as_secs_f64() * 1000.0,
            };
            latencies.push(ms);
            if let Some(id) = r.header("webhook-id") {
                ids.insert(id.to_string());
            }
        }
        latencies.sort_by(f64::total_cmp);
        let received_rows = rows_in(&got);
        let p50 = percentile(&latencies, 0.50);
        let p99 = percentile(&latencies, 0.99);
        json!({
            "rate_tx_per_s": s.rate,
            "seconds": s.seconds,
            "sent_tx": sent,
            "pgbench_tps": tps(&out),
            "received_requests": got.len(),
            "distinct_webhook_ids": ids.len(),
            "received_rows": received_rows,
            "p50_ms": p50,
            "p90_ms": percentile(&latencies, 0.90),
            "p99_ms": p99,
            "max_ms": latencies.last().copied(),
            "min_ms": latencies.first().copied(),
            "walhook_peak_rss_mb": rss.map(|kb| kb as f64 / 1024.0),
            "target_p99_met": p99.is_some_and(|p| p <= TARGET_P99_MS) && received_rows == sent,
        })
    }

    /// Phase 4: many rows changed in small transactions, streamed by walhook with a mutation
    /// event only, and with the same event plus five classifications of the changed table.
    async fn classified(&self) -> Value {
        let s = &self.settings;
        let accounts = (s.class_rows / 2).max(1000);
        let txns = s.class_rows.div_ceil(CLASS_ROWS_PER_TXN);
        let rows = txns * CLASS_ROWS_PER_TXN;
        eprintln!("pipeline bench: classifications, an accounts table of {accounts} rows");
        self.pg
            .exec(&format!(
                "{}; {}; CREATE SEQUENCE bench_account_ids START {};
                 CREATE PUBLICATION {CLASS_PUBLICATION} FOR TABLE bench_accounts;",
                accounts_table("bench_accounts"),
                fill_accounts("bench_accounts", accounts),
                accounts + 1
            ))
            .await;
        self.pg.exec("VACUUM ANALYZE bench_accounts").await;
        let dir = self.work.path().join("classifications");
        std::fs::create_dir_all(&dir).expect("classifications dir");
        for (name, condition, _, _) in CLASSES {
            std::fs::write(
                dir.join(format!("{name}.sql")),
                format!("-- Benchmark classification.\nSELECT id FROM public.bench_accounts a WHERE {condition}\n"),
            )
            .expect("write classification");
        }
        let script = self.work.path().join("accounts.sql");
        std::fs::write(&script, ACCOUNTS_SCRIPT).expect("write pgbench script");
        let mutation_config = accounts_config(&[], s.max_rows);
        let classified_config = accounts_config(&CLASSES, s.max_rows);
        let mutation = Launch {
            config: &mutation_config,
            publication: CLASS_PUBLICATION,
            classifications: None,
        };
        let classified = Launch {
            config: &classified_config,
            publication: CLASS_PUBLICATION,
            classifications: Some(&dir),
        };

        // Both slots of each pair exist before the workload, and walhook has run on each once:
        // the classified one baselined there (from a temporary slot, see src/run.rs
        // `baselines`), so the stream classifies every transaction of the workload.
        let mut slots = Vec::new();
        let mut prestarts = Vec::new();
        for i in 1..=s.pairs {
            let pair = (
                format!("walhook_mutation_{i}"),
                format!("walhook_classified_{i}"),
            );
            self.create_slot(&pair.0).await;
            self.create_slot(&pair.1).await;
            self.prestart(&pair.0, &mutation).await;
            prestarts.push(self.prestart(&pair.1, &classified).await);
            slots.push(pair);
        }

        eprintln!("pipeline bench: {txns} transactions of 1 insert + 4 updates with pgbench");
        let t = Instant::now();
        let out = self
            .pgbench_script(
                &script,
                &[
                    "-n",
                    "-M",
                    "prepared",
                    "-c",
                    "1",
                    "-t",
                    &txns.to_string(),
                    "-D",
                    &format!("accounts={accounts}"),
                ],
            )
            .await;
        let generate_s = t.elapsed().as_secs_f64();
        assert_eq!(
            processed(&out),
            Some(txns),
            "pgbench did not commit {txns} transactions:\n{out}"
        );
        let end = self.wal_lsn().await;

        // Per transaction, one notification per operation (more with a small max_rows).
        let per_txn = 1u64.div_ceil(s.max_rows) + 4u64.div_ceil(s.max_rows);
        let mut runs = Vec::new();
        for (i, (mutation_slot, classified_slot)) in slots.iter().enumerate() {
            let mutation_first = i % 2 == 0;
            let only = Expect::Exactly(per_txn * txns);
            // Plus the transitions, whose number is not known beforehand.
            let more = Expect::Quiet {
                at_least: per_txn * txns,
            };
            let (m, c) = if mutation_first {
                let m = self.catch_up(mutation_slot, &mutation, &end, only).await;
                let c = self
                    .catch_up(classified_slot, &classified, &end, more)
                    .await;
                (m, c)
            } else {
                let c = self
                    .catch_up(classified_slot, &classified, &end, more)
                    .await;
                let m = self.catch_up(mutation_slot, &mutation, &end, only).await;
                (m, c)
            };
            self.drop_slot(mutation_slot).await;
            self.drop_slot(classified_slot).await;
            runs.push(ClassPair {
                mutation_first,
                mutation: m,
                classified: c,
            });
        }
        let mut result =
            compare_classified(accounts, txns, rows, generate_s, &end, &prestarts, &runs);
        // The last classified run's data dir: its state, and its notifications (delivered).
        let data = self
            .work
            .path()
            .join(&slots[slots.len() - 1].1)
            .join("data")
            .join("log");
        let scratch = self.work.path().join("sled-floor");
        // Only the classification events' notifications: the mutation event's are in the
        // mutation-only run's time already.
        let received = |side: fn(&ClassPair) -> &Timed| {
            runs.iter()
                .filter_map(|r| side(r).detail["notifications_received"].as_u64())
                .max()
                .unwrap_or(0)
        };
        let notified = received(|r| &r.classified).saturating_sub(received(|r| &r.mutation));
        let floor =
            tokio::task::spawn_blocking(move || sled_floor(&data, &scratch, txns, notified))
                .await
                .expect("sled floor");
        let mutation_s = result["mutation_only"]["mean_seconds"]
            .as_f64()
            .unwrap_or(0.0);
        if let Some(floor_s) = floor["seconds"].as_f64() {
            result["ratio_estimate"] = json!(mutation_s / (mutation_s + floor_s));
        }
        result["sled_floor"] = floor;
        result
    }

    /// Phase 5: walhook's first start with one classification of a table of `baseline_rows`
    /// rows, timed until it logs that the baseline is done.
    async fn baseline(&self) -> Value {
        let n = self.settings.baseline_rows;
        eprintln!("pipeline bench: baseline, a table of {n} rows");
        let t = Instant::now();
        self.pg
            .exec(&format!(
                "{}; {}; CREATE PUBLICATION {BASELINE_PUBLICATION} FOR TABLE bench_baseline;",
                accounts_table("bench_baseline"),
                fill_accounts("bench_baseline", n),
            ))
            .await;
        // Settled, as a production table is: hint bits set, statistics known.
        self.pg.exec("VACUUM ANALYZE bench_baseline").await;
        self.pg.exec("CHECKPOINT").await;
        let generate_s = t.elapsed().as_secs_f64();
        let dir = self.work.path().join("baseline_classifications");
        std::fs::create_dir_all(&dir).expect("classifications dir");
        let (name, condition, from, to) = CLASSES[0];
        std::fs::write(
            dir.join(format!("{name}.sql")),
            format!("SELECT id FROM public.bench_baseline a WHERE {condition}\n"),
        )
        .expect("write classification");
        let config = format!(
            r#"
[[event]]
name = "baseline_event"
classification = "{name}"
from = "{from}"
to = "{to}"

[[webhook]]
id = "baseline"
event = "baseline_event"
url = "{{url}}/baseline"
secret = "{SECRET}"
"#
        );
        let launch = Launch {
            config: &config,
            publication: BASELINE_PUBLICATION,
            classifications: Some(&dir),
        };
        // No slot yet: walhook creates it with an exported snapshot and baselines from that,
        // as on a first deployment.
        let slot = "walhook_baseline";
        let receiver = Receiver::start().await;
        let (mut walhook, spawned) = self.spawn_walhook_with(slot, &receiver, &launch);
        let done = self
            .wait_logged(&mut walhook, "INFO baseline done", CATCH_UP_TIMEOUT)
            .await;
        let streaming = self
            .wait_logged(&mut walhook, "INFO streaming", Duration::from_secs(60))
            .await;
        // The high-water mark over the baseline and its final flush.
        let rss = vm_kb(walhook.pid(), "VmHWM");
        let log = walhook.log();
        walhook.sigterm();
        let _ = walhook.wait_exit(Duration::from_secs(10)).await;
        self.drop_slot(slot).await;
        let seconds = done.duration_since(spawned).as_secs_f64();
        // walhook's own figures, from its "baseline done" line: rows=N seconds="S".
        let done_line = log.lines().find(|l| l.contains("INFO baseline done"));
        let field = |key: &str| -> Option<f64> {
            done_line?
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
                .map(|v| v.trim_matches('"'))
                .and_then(|v| v.parse().ok())
        };
        json!({
            "rows": n,
            "classification": name,
            "condition": condition,
            "generate_seconds": generate_s,
            "seconds_to_baseline_done": seconds,
            "rows_per_s": n as f64 / seconds,
            "seconds_to_streaming": streaming.duration_since(spawned).as_secs_f64(),
            "walhook_rows": field("rows"),
            "walhook_seconds": field("seconds"),
            "walhook_log": log
                .lines()
                .filter(|l| l.contains("baseline") || l.contains("streaming"))
                .collect::<Vec<_>>(),
            "peak_rss_mb": rss.map(|kb| kb as f64 / 1024.0),
        })
    }

    /// Starts walhook on `slot` until it streams, then stops it (SIGTERM). With
    /// classifications, this first run on an existing slot baselines them from a temporary
    /// slot made now, so that the stream applies them to everything committed afterwards.
    /// Returns the seconds from spawn to its "streaming" line.
    async fn prestart(&self, slot: &str, launch: &Launch<'_>) -> f64 {
        eprintln!("pipeline bench: walhook on {slot} once, before the workload");
        let receiver = Receiver::start().await;
        let (mut walhook, spawned) = self.spawn_walhook_with(slot, &receiver, launch);
        let streaming = self
            .wait_logged(&mut walhook, "streaming", CATCH_UP_TIMEOUT)
            .await;
        walhook.sigterm();
        if walhook.wait_exit(Duration::from_secs(30)).await.is_none() {
            panic!(
                "walhook on {slot} did not stop within 30 s of SIGTERM:\n{}",
                pg::tail(&walhook.log(), 40)
            );
        }
        streaming.duration_since(spawned).as_secs_f64()
    }

    /// One (pg_recvlogical, walhook) pair of slots per comparison, made before the workload.
    async fn create_slot_pairs(&self, workload: &str) -> Vec<(String, String)> {
        let mut slots = Vec::new();
        for i in 1..=self.settings.pairs {
            let pair = (
                format!("recv_{workload}_{i}"),
                format!("walhook_{workload}_{i}"),
            );
            self.create_slot(&pair.0).await;
            self.create_slot(&pair.1).await;
            slots.push(pair);
        }
        slots
    }

    /// Runs each pair back to back, pg_recvlogical first in odd pairs, walhook first in even
    /// ones, so that a drift in the machine's load does not favour one side.
    async fn run_pairs(&self, slots: &[(String, String)], end: &str, expected: u64) -> Vec<Pair> {
        let mut runs = Vec::new();
        for (i, (recv_slot, hook_slot)) in slots.iter().enumerate() {
            let recv_first = i % 2 == 0;
            let (recv, hook) = if recv_first {
                let recv = self.pg_recvlogical(recv_slot, end).await;
                let hook = self.walhook_catch_up(hook_slot, end, expected).await;
                (recv, hook)
            } else {
                let hook = self.walhook_catch_up(hook_slot, end, expected).await;
                let recv = self.pg_recvlogical(recv_slot, end).await;
                (recv, hook)
            };
            self.drop_slot(recv_slot).await;
            self.drop_slot(hook_slot).await;
            runs.push(Pair {
                recv_first,
                recv,
                hook,
            });
        }
        runs
    }

    async fn create_slot(&self, name: &str) {
        self.sql
            .query_one(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')::text",
                &[&name],
            )
            .await
            .unwrap_or_else(|e| panic!("create slot {name}: {e}"));
    }

    async fn wal_lsn(&self) -> String {
        self.sql
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("pg_current_wal_lsn")
            .get(0)
    }

    /// `pg_recvlogical` on `slot` from its start to `end`, output to /dev/null.
    async fn pg_recvlogical(&self, slot: &str, end: &str) -> Timed {
        eprintln!("pipeline bench: pg_recvlogical on {slot} up to {end}");
        let mut cmd = tokio::process::Command::new(self.pg.program("pg_recvlogical"));
        cmd.args(["-d", &self.pg.url(), "--slot", slot, "--start", "-E", end])
            .args(["-o", "proto_version=1", "-o"])
            .arg(format!("publication_names={PUBLICATION}"))
            .args(["-f", "/dev/null", "--no-loop"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let start = Instant::now();
        let child = cmd.spawn().expect("spawn pg_recvlogical");
        let out = tokio::time::timeout(CATCH_UP_TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("pg_recvlogical still running after {CATCH_UP_TIMEOUT:?}"))
            .expect("wait for pg_recvlogical");
        let seconds = start.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "pg_recvlogical failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Timed {
            seconds,
            detail: json!({}),
        }
    }

    /// Starts `walhook run` on `slot` (fresh data dir, fresh receiver) and times it until the
    /// slot's confirmed position reaches `end`; then waits for the `expected` notifications.
    async fn walhook_catch_up(&self, slot: &str, end: &str, expected: u64) -> Timed {
        let config = self.insert_config();
        let launch = Launch {
            config: &config,
            publication: PUBLICATION,
            classifications: None,
        };
        self.catch_up(slot, &launch, end, Expect::Exactly(expected))
            .await
    }

    /// Starts `walhook run` on `slot` as `launch` says (fresh receiver) and times it until the
    /// slot's confirmed position reaches `end`; then waits for the notifications (`expect`).
    async fn catch_up(&self, slot: &str, launch: &Launch<'_>, end: &str, expect: Expect) -> Timed {
        eprintln!("pipeline bench: walhook on {slot} up to {end}");
        let receiver = Receiver::start().await;
        if self.settings.receiver_delay_ms > 0 {
            receiver.respond_with(Plan::delay(Duration::from_millis(
                self.settings.receiver_delay_ms,
            )));
        }
        let (mut walhook, spawned) = self.spawn_walhook_with(slot, &receiver, launch);
        let spawned_wall = SystemTime::now();
        let confirmed = self
            .wait_confirmed(slot, end, &mut walhook, CATCH_UP_TIMEOUT)
            .await;
        let confirmed_wall = SystemTime::now();
        let seconds = confirmed.duration_since(spawned).as_secs_f64();
        let rss_at_end = vm_kb(walhook.pid(), "VmHWM");
        let cpu_at_end = cpu_seconds(walhook.pid());
        let received_at_confirmed = receiver.count();
        let streaming_wall = streaming_logged_at(&walhook.log());
        let from_streaming = streaming_wall
            .and_then(|s| confirmed_wall.duration_since(s).ok())
            .map(|d| d.as_secs_f64());
        let startup = streaming_wall
            .and_then(|s| s.duration_since(spawned_wall).ok())
            .map(|d| d.as_secs_f64());

        // Delivery is not part of the throughput figure, but it runs meanwhile (with a slowed
        // receiver it would take long: then it is not waited for).
        let wait = if self.settings.receiver_delay_ms > 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(300)
        };
        let deadline = Instant::now() + wait;
        // Polled by count: copying every recorded request each time made this loop take a
        // core of its own once hundreds of thousands had arrived, slowing delivery down.
        let mut count = receiver.count();
        let mut changed = Instant::now();
        let complete = |count: usize, changed: Instant| match expect {
            Expect::Exactly(n) => count as u64 >= n,
            Expect::Quiet { at_least } => count as u64 >= at_least && changed.elapsed() >= QUIET,
        };
        while !complete(count, changed) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = receiver.count();
            if now != count {
                changed = Instant::now();
            }
            count = now;
        }
        let done = complete(count, changed);
        let got = receiver.requests();
        let delivered_s = got
            .iter()
            .map(|r| r.at)
            .max()
            .filter(|_| done)
            .map(|at| at.duration_since(spawned).as_secs_f64());
        let rss_after_delivery = vm_kb(walhook.pid(), "VmHWM");
        walhook.sigterm();
        let _ = walhook.wait_exit(Duration::from_secs(10)).await;
        // Per webhook (one path each): notifications and the rows they list.
        let mut by_path = serde_json::Map::new();
        for r in &got {
            let entry = by_path
                .entry(r.path.clone())
                .or_insert_with(|| json!({ "notifications": 0, "rows": 0 }));
            let rows = r.json()["rows"].as_array().map_or(0, |a| a.len() as u64);
            entry["notifications"] = json!(entry["notifications"].as_u64().unwrap_or(0) + 1);
            entry["rows"] = json!(entry["rows"].as_u64().unwrap_or(0) + rows);
        }
        Timed {
            seconds,
            detail: json!({
                "seconds_from_spawn": seconds,
                "seconds_from_streaming_log_line": from_streaming,
                "startup_seconds": startup,
                "cpu_seconds_at_confirmed": cpu_at_end,
                "peak_rss_mb_at_confirmed": rss_at_end.map(|kb| kb as f64 / 1024.0),
                "peak_rss_mb_after_delivery": rss_after_delivery.map(|kb| kb as f64 / 1024.0),
                "notifications_expected": match expect {
                    Expect::Exactly(n) => json!(n),
                    Expect::Quiet { .. } => Value::Null,
                },
                "notifications_received_at_confirmed": received_at_confirmed,
                "notifications_received": got.len(),
                "notifications_by_path": by_path,
                "all_delivered_seconds_from_spawn": delivered_s,
            }),
        }
    }

    /// `walhook run` on `slot` with the one-insert-event config of the first three phases,
    /// delivering to `receiver`, with a fresh data dir. Returns the process and when it was
    /// spawned.
    fn spawn_walhook(&self, slot: &str, receiver: &Receiver) -> (Walhook, Instant) {
        let config = self.insert_config();
        let launch = Launch {
            config: &config,
            publication: PUBLICATION,
            classifications: None,
        };
        self.spawn_walhook_with(slot, receiver, &launch)
    }

    /// The config of the first three phases: one insert event on `bench`, one webhook.
    fn insert_config(&self) -> String {
        format!(
            r#"
[[event]]
name = "bench_insert"
table = "public.bench"
on = ["insert"]

[[webhook]]
id = "bench"
event = "bench_insert"
url = "{{url}}/bench"
secret = "{SECRET}"
max_rows = {max_rows}
"#,
            max_rows = self.settings.max_rows,
        )
    }

    /// `walhook run` on `slot` as `launch` says, delivering to `receiver`. The data dir is
    /// `slot`'s own: fresh on the slot's first run, kept (with its classification state) on
    /// the next. Returns the process and when it was spawned.
    fn spawn_walhook_with(
        &self,
        slot: &str,
        receiver: &Receiver,
        launch: &Launch<'_>,
    ) -> (Walhook, Instant) {
        let dir = self.work.path().join(slot);
        std::fs::create_dir_all(&dir).expect("walhook dir");
        let config = write_config(
            &dir,
            &launch.config.replace("{url}", &receiver.url("/hooks")),
        );
        let mut args: Vec<String> = vec![
            "run".into(),
            "--database-url".into(),
            self.pg.url(),
            "--slot".into(),
            slot.into(),
            "--publication".into(),
            launch.publication.into(),
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--config".into(),
            config.display().to_string(),
        ];
        if let Some(classifications) = launch.classifications {
            args.push("--classifications".into());
            args.push(classifications.display().to_string());
        }
        let spawned = Instant::now();
        let walhook = Walhook::spawn(&args, &[("RUST_LOG", WALHOOK_LOG)]);
        (walhook, spawned)
    }

    /// Polls walhook's log every 10 ms until a line contains `needle`; returns when it saw
    /// it. Panics with the log when walhook exits first or `timeout` passes.
    async fn wait_logged(&self, walhook: &mut Walhook, needle: &str, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if walhook.log().contains(needle) {
                return Instant::now();
            }
            if let Some(status) = walhook.try_exit() {
                panic!(
                    "walhook exited ({status}) before logging {needle:?}:\n{}",
                    walhook.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "walhook has not logged {needle:?} after {timeout:?}:\n{}",
                    pg::tail(&walhook.log(), 40)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Drops a replication slot that is done with (freeing its WAL and a slot for the next
    /// phases). The walsender may hold it for a moment after walhook exits: retried.
    async fn drop_slot(&self, name: &str) {
        for _ in 0..50 {
            let dropped = self
                .sql
                .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                .await;
            if dropped.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("pipeline bench: could not drop slot {name}; it stays until the cluster goes");
    }

    /// Polls every 10 ms until `slot`'s confirmed_flush_lsn ≥ `end`; returns when it saw it.
    async fn wait_confirmed(
        &self,
        slot: &str,
        end: &str,
        walhook: &mut Walhook,
        timeout: Duration,
    ) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            let row = self
                .sql
                .query_one(
                    "SELECT coalesce(confirmed_flush_lsn >= $1::text::pg_lsn, false), \
                            coalesce(confirmed_flush_lsn::text, '') \
                     FROM pg_replication_slots WHERE slot_name = $2",
                    &[&end, &slot],
                )
                .await
                .expect("slot position");
            if row.get::<_, bool>(0) {
                return Instant::now();
            }
            if let Some(status) = walhook.try_exit() {
                panic!(
                    "walhook exited ({status}) before slot {slot} reached {end}:\n{}",
                    walhook.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "slot {slot} at {} has not reached {end} after {timeout:?}; walhook log:\n{}",
                    row.get::<_, String>(1),
                    pg::tail(&walhook.log(), 40)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Runs pgbench with `args` and the one-row insert script; returns its stdout.
    async fn pgbench(&self, args: &[&str]) -> String {
        self.pgbench_script(&self.work.path().join("insert.sql"), args)
            .await
    }

    /// Runs pgbench with `args` and `script`; returns its stdout.
    async fn pgbench_script(&self, script: &Path, args: &[&str]) -> String {
        let mut cmd = tokio::process::Command::new(self.pg.program("pgbench"));
        cmd.args(args)
            .arg("-f")
            .arg(script)
            .args(["-h", "127.0.0.1", "-p", &self.pg.port().to_string()])
            .args(["-U", "postgres", "postgres"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().expect("spawn pgbench");
        let out = tokio::time::timeout(CATCH_UP_TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("pgbench still running after {CATCH_UP_TIMEOUT:?}"))
            .expect("wait for pgbench");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "pgbench failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

/// What one walhook run streams: its config (`{url}` stands for the receiver's base URL),
/// publication, and classifications directory.
struct Launch<'a> {
    config: &'a str,
    publication: &'a str,
    classifications: Option<&'a Path>,
}

/// The notifications a catch-up waits for after it is timed (delivery runs meanwhile, and
/// must not spill into the next run).
#[derive(Clone, Copy)]
enum Expect {
    /// Exactly this many.
    Exactly(u64),
    /// At least this many, then none for [`QUIET`]: how many transitions fire is not known
    /// beforehand.
    Quiet { at_least: u64 },
}

/// One timed catch-up and what else was seen.
struct Timed {
    seconds: f64,
    detail: Value,
}

/// One back-to-back comparison.
struct Pair {
    recv_first: bool,
    recv: Timed,
    hook: Timed,
}

/// The pairs of one workload: per pair and overall (total time of each side).
fn compare(what: &str, rows: u64, generate_s: f64, end: &str, runs: &[Pair]) -> Value {
    let recv_total: f64 = runs.iter().map(|r| r.recv.seconds).sum();
    let hook_total: f64 = runs.iter().map(|r| r.hook.seconds).sum();
    let n = runs.len() as f64;
    let recv_rate = rows as f64 * n / recv_total;
    let hook_rate = rows as f64 * n / hook_total;
    let ratio = hook_rate / recv_rate;
    let pairs: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "first": if r.recv_first { "pg_recvlogical" } else { "walhook" },
                "pg_recvlogical_seconds": r.recv.seconds,
                "walhook_seconds": r.hook.seconds,
                "ratio": r.recv.seconds / r.hook.seconds,
                "walhook": r.hook.detail,
            })
        })
        .collect();
    json!({
        "workload": what,
        "rows": rows,
        "generate_seconds": generate_s,
        "end_lsn": end,
        "pg_recvlogical": { "mean_seconds": recv_total / n, "rows_per_s": recv_rate },
        "walhook": { "mean_seconds": hook_total / n, "rows_per_s": hook_rate },
        "ratio": ratio,
        "target_met": ratio >= TARGET_RATIO,
        "pairs": pairs,
    })
}

/// One back-to-back comparison of phase 4.
struct ClassPair {
    mutation_first: bool,
    mutation: Timed,
    classified: Timed,
}

/// Phase 4's pairs: per pair and overall (total time of each side).
fn compare_classified(
    accounts: u64,
    txns: u64,
    rows: u64,
    generate_s: f64,
    end: &str,
    prestarts: &[f64],
    runs: &[ClassPair],
) -> Value {
    let mutation_total: f64 = runs.iter().map(|r| r.mutation.seconds).sum();
    let classified_total: f64 = runs.iter().map(|r| r.classified.seconds).sum();
    let n = runs.len() as f64;
    let mutation_rate = rows as f64 * n / mutation_total;
    let classified_rate = rows as f64 * n / classified_total;
    let ratio = classified_rate / mutation_rate;
    let pairs: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "first": if r.mutation_first { "mutation-only" } else { "classified" },
                "mutation_only_seconds": r.mutation.seconds,
                "classified_seconds": r.classified.seconds,
                "ratio": r.mutation.seconds / r.classified.seconds,
                "mutation_only": r.mutation.detail,
                "classified": r.classified.detail,
            })
        })
        .collect();
    json!({
        "workload": "transactions of 1 insert + 4 updates",
        "table_rows_before": accounts,
        "transactions": txns,
        "rows": rows,
        "classifications": CLASSES
            .iter()
            .map(|(name, condition, from, to)| json!({
                "name": name, "condition": condition, "from": from, "to": to,
            }))
            .collect::<Vec<_>>(),
        "generate_seconds": generate_s,
        "end_lsn": end,
        "prestart_baseline_seconds": prestarts,
        "mutation_only": { "mean_seconds": mutation_total / n, "rows_per_s": mutation_rate },
        "classified": { "mean_seconds": classified_total / n, "rows_per_s": classified_rate },
        "ratio": ratio,
        "target_met": ratio >= TARGET_CLASS_RATIO,
        "pairs": pairs,
    })
}

/// The store's share of the classified run, measured alone: sled doing only the writes that
/// a design keeping per-row state in sled (as issue 3 asks) must do beyond the mutation-only
/// run's, in the run's shape. A fresh tree with walhook's sled settings (`src/log.rs`) gets
/// the classified run's state entries (copied from its data dir); then per transaction the
/// four updated rows and the new one are read and written back (values of the stored size),
/// plus the classification events' `notified` notifications (bodies of the run's mean size)
/// written as walhook writes them, in segments: per batch of 128 transactions (walhook's
/// largest group here), one entry per classification webhook, split at 16 KB of bodies. No
/// flush, decoding, evaluation or encoding. `mutation-only / (mutation-only + this)` estimates the ratio such
/// a design could reach if nothing else cost anything and nothing overlapped; walhook does
/// overlap its log writes with the next group's evaluation, so it is an estimate, not a
/// strict bound.
fn sled_floor(data: &Path, scratch: &Path, txns: u64, notified: u64) -> Value {
    let source = match sled::Config::new()
        .path(data)
        .segment_size(4 * 1024 * 1024)
        .open()
    {
        Ok(db) => db,
        Err(e) => return json!({ "error": format!("opening {}: {e}", data.display()) }),
    };
    let tree = source.open_tree("log").expect("the log tree");
    let mut state: Vec<(sled::IVec, sled::IVec)> = Vec::new();
    let (mut bodies, mut body_bytes) = (0u64, 0u64);
    for entry in tree.iter() {
        let (key, value) = entry.expect("reading the log");
        match key.first() {
            Some(b't') => state.push((key, value)),
            // A segment: its time, then per notification a 16-byte header and the body
            // (src/log.rs).
            Some(b'g') => {
                let mut at = 8;
                while let Some(head) = value.get(at + 12..at + 16) {
                    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
                    bodies += 1;
                    body_bytes += len as u64;
                    at += 16 + len;
                }
            }
            _ => {}
        }
    }
    drop(tree);
    drop(source);
    let Some((first_key, _)) = state.first() else {
        return json!({ "error": "no state entries in the classified run's data dir" });
    };
    let prefix_len = first_key
        .iter()
        .position(|b| *b == 0)
        .map_or(0, |at| at + 1);
    let prefix = first_key[..prefix_len].to_vec();
    let state_bytes = state.iter().map(|(_, v)| v.len()).sum::<usize>() / state.len();
    // A notification in a segment: its header, its body.
    let body = vec![b'x'; 16 + (body_bytes / bodies.max(1)) as usize];
    let per_txn = notified as f64 / txns as f64;

    let shape = Shape {
        state: &state,
        prefix: &prefix,
        body: &body,
        per_txn,
        txns,
    };
    let seconds = floor_run(scratch, &shape, true);
    let state_only = floor_run(scratch, &shape, false);
    json!({
        "seconds": seconds,
        "state_only_seconds": state_only,
        "state_entries": state.len(),
        "state_entry_mean_bytes": state_bytes,
        "notification_mean_bytes": body.len(),
        "notifications_per_transaction": per_txn,
        "transactions": txns,
    })
}

/// What [`floor_run`] writes: the run's state entries, the state key prefix, a notification
/// entry's value, and how many per transaction.
struct Shape<'a> {
    state: &'a [(sled::IVec, sled::IVec)],
    prefix: &'a [u8],
    body: &'a [u8],
    per_txn: f64,
    txns: u64,
}

/// One timed pass of [`sled_floor`] on a fresh tree in `scratch`; `notifications`: whether
/// the notification entries are written too (else the state alone).
fn floor_run(scratch: &Path, shape: &Shape<'_>, notifications: bool) -> f64 {
    let _ = std::fs::remove_dir_all(scratch);
    let db = sled::Config::new()
        .path(scratch)
        .cache_capacity(64 * 1024 * 1024)
        .segment_size(4 * 1024 * 1024)
        .open()
        .expect("a scratch sled");
    let floor = db.open_tree("log").expect("the floor tree");
    let existing = shape.state.len() as u64;
    for chunk in shape.state.chunks(128) {
        let mut batch = sled::Batch::default();
        for (key, value) in chunk {
            batch.insert(key.clone(), value.clone());
        }
        floor.apply_batch(batch).expect("preload");
    }
    let template = shape.state[0].1.to_vec();
    let row_key = |id: u64| {
        let mut key = shape.prefix.to_vec();
        key.extend_from_slice(id.to_string().as_bytes());
        key
    };
    let mut rng = fastrand::Rng::with_seed(7);
    let (mut next_id, mut sequence, mut emitted) = (existing + 1, 0u64, 0f64);
    let started = Instant::now();
    for group in 0..shape.txns.div_ceil(128) {
        let mut batch = sled::Batch::default();
        let mut group_notes = 0usize;
        for t in group * 128..((group + 1) * 128).min(shape.txns) {
            let start = rng.u64(1..existing.saturating_sub(3).max(2));
            for id in (start..start + 4).chain([next_id]) {
                let key = row_key(id);
                let mut value = floor
                    .get(&key)
                    .expect("read")
                    .map_or_else(|| template.clone(), |v| v.to_vec());
                if let Some(b) = value.last_mut() {
                    *b = b.wrapping_add(1);
                }
                batch.insert(key, value);
            }
            next_id += 1;
            // The run's notifications, spread evenly over its transactions.
            while notifications && emitted < shape.per_txn * (t + 1) as f64 {
                emitted += 1.0;
                group_notes += 1;
            }
        }
        // The group's notifications as segments: one per classification webhook, split
        // at 16 KB of bodies.
        let bytes = group_notes * shape.body.len();
        let segments = if group_notes == 0 {
            0
        } else {
            CLASSES.len().max(bytes.div_ceil(16 * 1024))
        };
        for _ in 0..segments {
            sequence += 1;
            let mut key = b"g".to_vec();
            key.extend_from_slice(&sequence.to_be_bytes());
            batch.insert(key, vec![b'x'; 8 + bytes / segments]);
        }
        floor.apply_batch(batch).expect("write");
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(floor);
    drop(db);
    let _ = std::fs::remove_dir_all(scratch);
    seconds
}

/// The accounts table of the classification phases.
fn accounts_table(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (
             id bigint PRIMARY KEY,
             email text NOT NULL,
             status text NOT NULL,
             plan text NOT NULL,
             balance_cents bigint NOT NULL,
             score integer NOT NULL,
             country text NOT NULL,
             signed_up_at timestamptz NOT NULL,
             last_seen timestamptz NOT NULL,
             deleted_at timestamptz
         )"
    )
}

/// Fills `name` with accounts 1..=`rows`, spread deterministically over the values the
/// classifications test.
fn fill_accounts(name: &str, rows: u64) -> String {
    format!(
        "INSERT INTO {name}
         SELECT g, 'user' || g || '@example.com',
                (ARRAY['active', 'active', 'trial', 'suspended', 'closed'])[1 + g % 5],
                (ARRAY['free', 'free', 'pro', 'team'])[1 + g % 4],
                (g * 7919) % 20000 - 5000,
                (g * 31) % 101,
                (ARRAY['DE', 'FR', 'NL', 'US', 'GB', 'JP', 'BR'])[1 + g % 7],
                timestamptz '2025-01-01' + (g % 365) * interval '1 day',
                timestamptz '2025-01-01' + (g % 365 + g % 30) * interval '1 day',
                CASE WHEN g % 50 = 0 THEN timestamptz '2026-01-01' END
         FROM generate_series(1::bigint, {rows}) g"
    )
}

/// Phase 4's config: the mutation event (inserts and updates of `bench_accounts`) and one
/// event per classification of `classes`, each with its own webhook (`{url}/<name>`).
fn accounts_config(classes: &[(&str, &str, &str, &str)], max_rows: u64) -> String {
    let mut toml = String::from(
        r#"
[[event]]
name = "account_changed"
table = "public.bench_accounts"
on = ["insert", "update"]

[[webhook]]
id = "changed"
event = "account_changed"
url = "{url}/changed"
"#,
    );
    let _ = writeln!(toml, "secret = \"{SECRET}\"\nmax_rows = {max_rows}");
    for (name, _, from, to) in classes {
        let _ = write!(
            toml,
            r#"
[[event]]
name = "{name}_{from}_{to}"
classification = "{name}"
from = "{from}"
to = "{to}"

[[webhook]]
id = "{name}"
event = "{name}_{from}_{to}"
url = "{{url}}/{name}"
secret = "{SECRET}"
max_rows = {max_rows}
"#
        );
    }
    toml
}

/// The results as a table.
fn render(r: &Value) -> String {
    let mut s = String::new();
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let opt = |v: &Value, unit: &str| match v.as_f64() {
        Some(x) => format!("{x:.2}{unit}"),
        None => "-".to_string(),
    };
    let yes = |b: &Value| {
        if b.as_bool() == Some(true) {
            "yes"
        } else {
            "NO"
        }
    };
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "walhook pipeline benchmark, {}",
        r["date"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "PostgreSQL {} throwaway cluster, test-harness settings: fsync={} (!), wal_level=logical, 127.0.0.1",
        r["postgres"]["version"].as_str().unwrap_or("?"),
        r["postgres"]["fsync"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        s,
        "{} CPUs, load average before {} / after {} (shared machine: absolute times are noisy, compare ratios)",
        r["machine"]["cpus"],
        r["machine"]["loadavg_before"].as_str().unwrap_or("?"),
        r["machine"]["loadavg_after"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        s,
        "walhook: release build, RUST_LOG={}, max_rows={}, one webhook answering 200 {}; timed from spawn until the slot's confirmed_flush_lsn >= end (polled every 10 ms)",
        r["settings"]["walhook_log"].as_str().unwrap_or("?"),
        r["settings"]["max_rows"],
        match r["settings"]["receiver_delay_ms"].as_u64() {
            Some(ms) if ms > 0 => format!(
                "after {ms} ms in the throughput phases (DIAGNOSTIC: delivery throttled, not the real setting)"
            ),
            _ => "at once".to_string(),
        },
    );
    let _ = writeln!(s);
    if ["large_transaction", "small_transactions", "latency"]
        .iter()
        .any(|key| !r[*key].is_null())
    {
        let _ = writeln!(
            s,
            "{:<30} {:>22} {:>22} {:>7} {:>8} {:>4}",
            "workload", "pg_recvlogical", "walhook", "ratio", "target", "met"
        );
    }
    for (key, label) in [
        ("large_transaction", "1 txn x {rows} rows"),
        ("small_transactions", "{rows} txns x 1 row"),
    ] {
        let p = &r[key];
        if p.is_null() {
            continue;
        }
        let label = label.replace("{rows}", &p["rows"].to_string());
        let _ = writeln!(
            s,
            "{:<30} {:>7.2} s {:>9.0} r/s {:>7.2} s {:>9.0} r/s {:>7.2} {:>8} {:>4}",
            label,
            f(&p["pg_recvlogical"]["mean_seconds"]),
            f(&p["pg_recvlogical"]["rows_per_s"]),
            f(&p["walhook"]["mean_seconds"]),
            f(&p["walhook"]["rows_per_s"]),
            f(&p["ratio"]),
            format!(">= {TARGET_RATIO}"),
            yes(&p["target_met"]),
        );
    }
    let l = &r["latency"];
    if !l.is_null() {
        let _ = writeln!(
        s,
        "{:<30} sent {} tx, received {} rows in {} requests; p50 {} p90 {} p99 {} max {}   target p99 <= {TARGET_P99_MS} ms: {}",
        format!("latency @ {} tx/s x {} s", l["rate_tx_per_s"], l["seconds"]),
        l["sent_tx"],
        l["received_rows"],
        l["received_requests"],
        opt(&l["p50_ms"], " ms"),
        opt(&l["p90_ms"], " ms"),
        opt(&l["p99_ms"], " ms"),
        opt(&l["max_ms"], " ms"),
        yes(&l["target_p99_met"]),
    );
    }
    if !r["large_transaction"].is_null() {
        let rss = &r["large_transaction"]["walhook_peak_rss_mb"];
        let _ = writeln!(
            s,
            "{:<30} {}   target < {TARGET_RSS_MB} MB: {}",
            "peak RSS, large transaction",
            opt(rss, " MB (VmHWM)"),
            yes(&r["large_transaction"]["rss_target_met"]),
        );
    }
    let c = &r["classifications"];
    if !c.is_null() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<30} {:>22} {:>22} {:>7} {:>8} {:>4}",
            "classifications", "mutation-only", "+ 5 classifications", "ratio", "target", "met"
        );
        let _ = writeln!(
            s,
            "{:<30} {:>7.2} s {:>9.0} r/s {:>7.2} s {:>9.0} r/s {:>7.2} {:>8} {:>4}",
            format!("{} txns x (1 ins + 4 upd)", c["transactions"]),
            f(&c["mutation_only"]["mean_seconds"]),
            f(&c["mutation_only"]["rows_per_s"]),
            f(&c["classified"]["mean_seconds"]),
            f(&c["classified"]["rows_per_s"]),
            f(&c["ratio"]),
            format!(">= {TARGET_CLASS_RATIO}"),
            yes(&c["target_met"]),
        );
        let floor = &c["sled_floor"];
        if let Some(seconds) = floor["seconds"].as_f64() {
            let _ = writeln!(
                s,
                "{:<30} {:>7.2} s: sled alone, the classified run's state reads/writes and its classification \
                 notifications' segments ({:.2} s of it the state alone); estimate mutation-only / (mutation-only + it) = {:.2}",
                "  store floor",
                seconds,
                f(&floor["state_only_seconds"]),
                f(&c["ratio_estimate"]),
            );
        } else if !floor.is_null() {
            let _ = writeln!(s, "  store floor: not measured: {}", floor["error"]);
        }
    }
    let b = &r["baseline"];
    if !b.is_null() {
        let _ = writeln!(
            s,
            "{:<30} {} to 'baseline done' ({:.0} rows/s), 'streaming' at {}; walhook's own figure {}; peak RSS {}",
            format!("baseline, {} rows x 1 class.", b["rows"]),
            opt(&b["seconds_to_baseline_done"], " s from spawn"),
            f(&b["rows_per_s"]),
            opt(&b["seconds_to_streaming"], " s"),
            opt(&b["walhook_seconds"], " s"),
            opt(&b["peak_rss_mb"], " MB (VmHWM)"),
        );
    }
    let _ = writeln!(s);
    for key in ["large_transaction", "small_transactions"] {
        let p = &r[key];
        if p.is_null() {
            continue;
        }
        let _ = writeln!(
            s,
            "{key}: generated in {:.2} s, {} rows",
            f(&p["generate_seconds"]),
            p["rows"]
        );
        for (i, pair) in p["pairs"].as_array().into_iter().flatten().enumerate() {
            let d = &pair["walhook"];
            let _ = writeln!(
                s,
                "  pair {} ({} first): pg_recvlogical {:.2} s, walhook {:.2} s, ratio {:.2}; walhook startup {}, from its 'streaming' line {}, CPU {}, peak RSS {}, all {} notifications delivered {} after spawn",
                i + 1,
                pair["first"].as_str().unwrap_or("?"),
                f(&pair["pg_recvlogical_seconds"]),
                f(&pair["walhook_seconds"]),
                f(&pair["ratio"]),
                opt(&d["startup_seconds"], " s"),
                opt(&d["seconds_from_streaming_log_line"], " s"),
                opt(&d["cpu_seconds_at_confirmed"], " s"),
                opt(&d["peak_rss_mb_at_confirmed"], " MB"),
                d["notifications_expected"],
                opt(&d["all_delivered_seconds_from_spawn"], " s"),
            );
        }
    }
    if !c.is_null() {
        let _ = writeln!(
            s,
            "classifications: {} accounts before, {} rows changed, generated in {:.2} s; baselines before the workload (5 classifications x {} rows) took {} s from spawn",
            c["table_rows_before"],
            c["rows"],
            f(&c["generate_seconds"]),
            c["table_rows_before"],
            c["prestart_baseline_seconds"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| format!("{:.2}", f(v)))
                .collect::<Vec<_>>()
                .join(", "),
        );
        for (i, pair) in c["pairs"].as_array().into_iter().flatten().enumerate() {
            let m = &pair["mutation_only"];
            let k = &pair["classified"];
            let _ = writeln!(
                s,
                "  pair {} ({} first): mutation-only {:.2} s, classified {:.2} s, ratio {:.2}; CPU {} vs {}, peak RSS {} vs {}; notifications {} vs {} ({} vs {} by the time the slot reached the end), all delivered {} vs {} after spawn",
                i + 1,
                pair["first"].as_str().unwrap_or("?"),
                f(&pair["mutation_only_seconds"]),
                f(&pair["classified_seconds"]),
                f(&pair["ratio"]),
                opt(&m["cpu_seconds_at_confirmed"], " s"),
                opt(&k["cpu_seconds_at_confirmed"], " s"),
                opt(&m["peak_rss_mb_at_confirmed"], " MB"),
                opt(&k["peak_rss_mb_at_confirmed"], " MB"),
                m["notifications_received"],
                k["notifications_received"],
                m["notifications_received_at_confirmed"],
                k["notifications_received_at_confirmed"],
                opt(&m["all_delivered_seconds_from_spawn"], " s"),
                opt(&k["all_delivered_seconds_from_spawn"], " s"),
            );
            if let Some(paths) = k["notifications_by_path"].as_object() {
                let listed: Vec<String> = paths
                    .iter()
                    .map(|(path, v)| {
                        format!(
                            "{} {}/{}",
                            path.trim_start_matches("/hooks/"),
                            v["notifications"],
                            v["rows"]
                        )
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "    classified run, notifications/rows per webhook: {}",
                    listed.join(", ")
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "notes: ratio = walhook rows/s / pg_recvlogical rows/s over all pairs (total time of each side). \
         The confirmed_flush_lsn clock includes walhook's replication status interval (src/source.rs): \
         it acknowledges a flushed position at most that often. Notifications are delivered only after \
         the sled flush, so 'all delivered' bounds the durable time from above."
    );
    if !c.is_null() {
        let _ = writeln!(
            s,
            "classifications: ratio = classified rows/s / mutation-only rows/s over all pairs; both \
             runs stream the same WAL on their own slot, made and started once (the classified one \
             baselining) before the workload."
        );
    }
    s
}

/// The number of rows the notifications in `requests` list.
fn rows_in(requests: &[Recorded]) -> u64 {
    requests
        .iter()
        .map(|r| r.json()["rows"].as_array().map_or(0, |a| a.len() as u64))
        .sum()
}

fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// pgbench's "number of transactions actually processed: N[/M]".
fn processed(out: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
}

/// pgbench's "tps = X (...)".
fn tps(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// When walhook logged "streaming" (its log lines start with an RFC 3339 timestamp).
fn streaming_logged_at(log: &str) -> Option<SystemTime> {
    log.lines()
        .find(|l| l.contains("streaming"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|t| humantime::parse_rfc3339(t).ok())
}

/// A `Vm*` line of /proc/PID/status, in KiB.
fn vm_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// User + system CPU time of a process so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `target/`: the parent of the bench's `CARGO_TARGET_TMPDIR` (`target/tmp`).
fn target_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).to_path_buf()
}
