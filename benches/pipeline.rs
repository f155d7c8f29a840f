//! The pipeline benchmark (a benchmark, not a test): walhook against `pg_recvlogical` on one
//! throwaway PostgreSQL cluster, in one run.
//!
//! ```sh
//! cargo bench --bench pipeline          # builds lib, bin and bench (release settings), runs
//! cargo bench --bench pipeline -- --rows 200000 --small-txns 5000 --pairs 1 --seconds 5
//! PIPELINE_ROWS=200000 cargo bench --bench pipeline     # the same settings by environment
//! ```
//!
//! Settings (argument / environment / default): `--rows` `PIPELINE_ROWS` 1000000,
//! `--small-txns` `PIPELINE_SMALL_TXNS` 20000, `--rate` `PIPELINE_RATE` 500 (tx/s),
//! `--seconds` `PIPELINE_SECONDS` 10, `--max-rows` `PIPELINE_MAX_ROWS` 1000 (the webhook's
//! `max_rows`), `--pairs` `PIPELINE_PAIRS` 2; diagnostic only: `--receiver-delay-ms`
//! `PIPELINE_RECEIVER_DELAY_MS` 0 (the throughput phases' receiver answers that late, so that
//! delivery hardly competes with streaming; not the real setting, and labelled so).
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
//!
//! Results are printed as a table and written to `target/bench-pipeline.json`.
//!
//! Caveats, also printed: the `confirmed_flush_lsn` clock includes walhook's replication
//! status interval (it reports a flushed position at most that often, see `src/source.rs`);
//! notifications are delivered only after the sled flush, so "all delivered" bounds the time
//! to durable from above. The receiver runs in this process, and the machine's cores are
//! shared with PostgreSQL (and whatever else runs): compare ratios, not absolute times.

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

/// The Standard Webhooks test-vector secret (any valid secret does).
const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const PUBLICATION: &str = "bench_pub";
/// Every run of the bench ends within this, cleaning up on the way out.
const OVERALL_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// One catch-up (pg_recvlogical or walhook) may take this long at most.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(15 * 60);
const POLL: Duration = Duration::from_millis(10);
/// What walhook logs during the bench: production-like, not the tests' debug level.
const WALHOOK_LOG: &str = "info";

const TARGET_RATIO: f64 = 0.8;
const TARGET_P99_MS: f64 = 50.0;
const TARGET_RSS_MB: f64 = 150.0;

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
        Settings {
            rows: get("rows", "PIPELINE_ROWS", 1_000_000),
            small_txns: get("small-txns", "PIPELINE_SMALL_TXNS", 20_000),
            rate: get("rate", "PIPELINE_RATE", 500),
            seconds: get("seconds", "PIPELINE_SECONDS", 10),
            max_rows: get("max-rows", "PIPELINE_MAX_ROWS", 1000),
            pairs: get("pairs", "PIPELINE_PAIRS", 2),
            receiver_delay_ms: get_or_zero("receiver-delay-ms", "PIPELINE_RECEIVER_DELAY_MS"),
        }
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

    let large = b.large_transaction().await;
    let small = b.small_transactions().await;
    let latency = b.latency().await;
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
            "walhook_log": WALHOOK_LOG,
            "walhook_bin": b.bin.display().to_string(),
        },
        "large_transaction": large,
        "small_transactions": small,
        "latency": latency,
        "targets": {
            "throughput_ratio_min": TARGET_RATIO,
            "p99_ms_max": TARGET_P99_MS,
            "peak_rss_mb_max": TARGET_RSS_MB,
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
        eprintln!("pipeline bench: walhook on {slot} up to {end}");
        let receiver = Receiver::start().await;
        if self.settings.receiver_delay_ms > 0 {
            receiver.respond_with(Plan::delay(Duration::from_millis(
                self.settings.receiver_delay_ms,
            )));
        }
        let (mut walhook, spawned) = self.spawn_walhook(slot, &receiver);
        let spawned_wall = SystemTime::now();
        let confirmed = self
            .wait_confirmed(slot, end, &mut walhook, CATCH_UP_TIMEOUT)
            .await;
        let confirmed_wall = SystemTime::now();
        let seconds = confirmed.duration_since(spawned).as_secs_f64();
        let rss_at_end = vm_kb(walhook.pid(), "VmHWM");
        let cpu_at_end = cpu_seconds(walhook.pid());
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
        let mut got = receiver.requests();
        while (got.len() as u64) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            got = receiver.requests();
        }
        let delivered_s = got
            .iter()
            .map(|r| r.at)
            .max()
            .filter(|_| got.len() as u64 >= expected)
            .map(|at| at.duration_since(spawned).as_secs_f64());
        let rss_after_delivery = vm_kb(walhook.pid(), "VmHWM");
        walhook.sigterm();
        let _ = walhook.wait_exit(Duration::from_secs(10)).await;
        Timed {
            seconds,
            detail: json!({
                "seconds_from_spawn": seconds,
                "seconds_from_streaming_log_line": from_streaming,
                "startup_seconds": startup,
                "cpu_seconds_at_confirmed": cpu_at_end,
                "peak_rss_mb_at_confirmed": rss_at_end.map(|kb| kb as f64 / 1024.0),
                "peak_rss_mb_after_delivery": rss_after_delivery.map(|kb| kb as f64 / 1024.0),
                "notifications_expected": expected,
                "notifications_received": got.len(),
                "all_delivered_seconds_from_spawn": delivered_s,
            }),
        }
    }

    /// `walhook run` on `slot`, delivering to `receiver`, with a fresh data dir. Returns the
    /// process and when it was spawned.
    fn spawn_walhook(&self, slot: &str, receiver: &Receiver) -> (Walhook, Instant) {
        let dir = self.work.path().join(slot);
        std::fs::create_dir_all(&dir).expect("walhook dir");
        let config = write_config(
            &dir,
            &format!(
                r#"
[[event]]
name = "bench_insert"
table = "public.bench"
on = ["insert"]

[[webhook]]
id = "bench"
event = "bench_insert"
url = "{url}"
secret = "{SECRET}"
max_rows = {max_rows}
"#,
                url = receiver.url("/hooks/bench"),
                max_rows = self.settings.max_rows,
            ),
        );
        let args: Vec<String> = vec![
            "run".into(),
            "--database-url".into(),
            self.pg.url(),
            "--slot".into(),
            slot.into(),
            "--publication".into(),
            PUBLICATION.into(),
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--config".into(),
            config.display().to_string(),
        ];
        let spawned = Instant::now();
        let walhook = Walhook::spawn(&args, &[("RUST_LOG", WALHOOK_LOG)]);
        (walhook, spawned)
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
        let mut cmd = tokio::process::Command::new(self.pg.program("pgbench"));
        cmd.args(args)
            .arg("-f")
            .arg(self.work.path().join("insert.sql"))
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
    let _ = writeln!(
        s,
        "{:<30} {:>22} {:>22} {:>7} {:>8} {:>4}",
        "workload", "pg_recvlogical", "walhook", "ratio", "target", "met"
    );
    for (key, label) in [
        ("large_transaction", "1 txn x {rows} rows"),
        ("small_transactions", "{rows} txns x 1 row"),
    ] {
        let p = &r[key];
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
    let rss = &r["large_transaction"]["walhook_peak_rss_mb"];
    let _ = writeln!(
        s,
        "{:<30} {}   target < {TARGET_RSS_MB} MB: {}",
        "peak RSS, large transaction",
        opt(rss, " MB (VmHWM)"),
        yes(&r["large_transaction"]["rss_target_met"]),
    );
    let _ = writeln!(s);
    for key in ["large_transaction", "small_transactions"] {
        let p = &r[key];
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
    let _ = writeln!(
        s,
        "notes: ratio = walhook rows/s / pg_recvlogical rows/s over all pairs (total time of each side). \
         The confirmed_flush_lsn clock includes walhook's replication status interval (src/source.rs): \
         it acknowledges a flushed position at most that often. Notifications are delivered only after \
         the sled flush, so 'all delivered' bounds the durable time from above."
    );
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
