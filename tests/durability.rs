//! Durability (DESIGN.md invariants 1-3) and transient faults, against the real binary:
//! `kill -9` under load, replay, the slot never passing what the log holds, database
//! restarts, graceful shutdown, a database that is not up yet.
//!
//! Ground truth comes from PostgreSQL itself: every scenario creates a second logical slot,
//! `witness`, decoded with `test_decoding`, which lists every committed transaction with its
//! rows and its WAL positions (Begin and end of Commit). walhook's notifications and the
//! position of its slot are compared with that list.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::NoTls;

use crate::support::{signature_ok, PgCluster, Plan, Recorded, Scenario, Walhook, WAIT};

/// The table every test writes.
const ITEMS: &str = "CREATE TABLE items (id bigint PRIMARY KEY, txn int NOT NULL, note text)";

const CONFIG: &str = r#"
[[event]]
name = "item_changed"
table = "public.items"
on = ["insert", "update", "delete"]

[[webhook]]
id = "audit"
event = "item_changed"
url = "{receiver}/hooks/audit"
secret = "{secret}"
"#;

/// The log line of a process that has connected and started streaming.
const STREAMING: &str = " streaming slot=";
/// The warning logged when the replication session breaks and walhook reconnects.
const RECONNECTING: &str = "replication interrupted, reconnecting";

/// One operation of a transaction and the rows (ids) it touches.
#[derive(Clone, Debug)]
struct Change {
    op: &'static str,
    ids: Vec<i64>,
}

/// A transaction of a workload: at most one `Change` per operation.
type Txn = Vec<Change>;

fn change(op: &'static str, ids: impl IntoIterator<Item = i64>) -> Change {
    Change {
        op,
        ids: ids.into_iter().collect(),
    }
}

/// `count` insert-only transactions inserting ids from `first_id` on: one row each, three
/// rows in every fifth.
fn inserts(first_id: i64, count: usize) -> Vec<Txn> {
    let mut next = first_id;
    (0..count)
        .map(|t| {
            let rows = if t % 5 == 4 { 3 } else { 1 };
            let ids = next..next + rows;
            next += rows;
            vec![change("insert", ids)]
        })
        .collect()
}

/// The SQL of transaction number `n`.
fn txn_sql(n: usize, txn: &Txn) -> String {
    let mut sql = String::from("BEGIN;\n");
    for c in txn {
        let list = c
            .ids
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        match c.op {
            "insert" => {
                let values = c
                    .ids
                    .iter()
                    .map(|id| format!("({id}, {n})"))
                    .collect::<Vec<_>>()
                    .join(", ");
                sql.push_str(&format!("INSERT INTO items (id, txn) VALUES {values};\n"));
            }
            "update" => sql.push_str(&format!(
                "UPDATE items SET note = 'changed by {n}' WHERE id IN ({list});\n"
            )),
            "delete" => sql.push_str(&format!("DELETE FROM items WHERE id IN ({list});\n")),
            other => panic!("no SQL for op {other}"),
        }
    }
    sql.push_str("COMMIT;");
    sql
}

/// Commits `txns` one after another on a connection of its own, `pace` apart.
async fn run_load(url: String, txns: Vec<Txn>, pace: Duration) {
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .expect("connect for the load");
    // Drives the connection; ends with the client.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    for (n, txn) in txns.iter().enumerate() {
        let sql = txn_sql(n, txn);
        if let Err(e) = client.batch_execute(&sql).await {
            panic!("load transaction {n} failed: {e:?}\n{sql}");
        }
        tokio::time::sleep(pace).await;
    }
}

/// Commits `txns` now, in order, through the cluster's shared connection.
async fn commit_all(pg: &PgCluster, first_n: usize, txns: &[Txn]) {
    for (i, txn) in txns.iter().enumerate() {
        pg.exec(&txn_sql(first_n + i, txn)).await;
    }
}

/// What one notification must say: its op and its rows (sorted).
type Group = (String, Vec<i64>);

/// The notifications the workload must produce, as a multiset: one per (transaction, op).
fn expected_groups(txns: &[Txn]) -> BTreeMap<Group, usize> {
    let mut groups = BTreeMap::new();
    for txn in txns {
        for c in txn {
            let mut ids = c.ids.clone();
            ids.sort_unstable();
            ids.dedup();
            *groups.entry((c.op.to_string(), ids)).or_insert(0) += 1;
        }
    }
    groups
}

/// The notifications received, one per distinct webhook-id, as a multiset of groups.
fn received_groups(bodies: &BTreeMap<String, Value>) -> BTreeMap<Group, usize> {
    let mut groups = BTreeMap::new();
    for body in bodies.values() {
        let mut ids: Vec<i64> = body["rows"]
            .as_array()
            .expect("rows is an array")
            .iter()
            .map(|v| v.as_i64().expect("integer row id"))
            .collect();
        ids.sort_unstable();
        let op = body["op"].as_str().expect("op").to_string();
        *groups.entry((op, ids)).or_insert(0) += 1;
    }
    groups
}

/// `0/16B3748` → a comparable number.
fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').expect("LSN has a '/'");
    let hi = u64::from_str_radix(hi, 16).expect("LSN high half");
    let lo = u64::from_str_radix(lo, 16).expect("LSN low half");
    (hi << 32) | lo
}

/// The commit LSN a webhook-id (`hook_00000000016B3748_0`) names.
fn id_lsn(id: &str) -> u64 {
    let mut parts = id.rsplitn(3, '_');
    let _ordinal = parts.next();
    let hex = parts.next().unwrap_or_default();
    u64::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("{id:?} names no LSN"))
}

/// Every request's body by webhook-id, checking stable identity on the way: every request
/// carrying an id carries the same body, byte for byte; the id names the body's commit LSN;
/// every request is signed.
fn bodies_by_id(requests: &[Recorded]) -> BTreeMap<String, Value> {
    let mut raw: BTreeMap<String, &Recorded> = BTreeMap::new();
    for r in requests {
        assert!(signature_ok(r), "bad signature on {r}");
        let id = r
            .header("webhook-id")
            .expect("webhook-id header")
            .to_string();
        match raw.get(&id) {
            Some(first) => assert_eq!(
                first.body, r.body,
                "webhook-id {id} was sent with two different bodies:\n{first}\n{r}"
            ),
            None => {
                raw.insert(id, r);
            }
        }
    }
    raw.into_iter()
        .map(|(id, r)| {
            let body = r.json();
            let lsn = body["lsn"].as_str().expect("lsn in body");
            assert_eq!(
                id_lsn(&id),
                parse_lsn(lsn),
                "webhook-id {id} does not name the body's commit LSN {lsn}"
            );
            assert_eq!(body["hook_id"], "audit");
            (id, body)
        })
        .collect()
}

/// The ids listed as inserted by requests the receiver answered with 200.
fn delivered_ids(requests: &[Recorded]) -> BTreeSet<i64> {
    requests
        .iter()
        .filter(|r| r.status == Some(200))
        .map(|r| r.json())
        .filter(|b| b["op"] == "insert")
        .flat_map(|b| b["rows"].as_array().cloned().unwrap_or_default())
        .map(|v| v.as_i64().expect("integer row id"))
        .collect()
}

fn all_ids(txns: &[Txn]) -> BTreeSet<i64> {
    txns.iter()
        .flatten()
        .filter(|c| c.op == "insert")
        .flat_map(|c| c.ids.iter().copied())
        .collect()
}

/// A committed transaction as test_decoding reports it on the witness slot.
#[derive(Debug)]
struct Decoded {
    /// Position of its Begin (its first change).
    begin: u64,
    /// End of its commit record: what a consumer acknowledges once the transaction is safe.
    end: u64,
    /// (op, id) per row change.
    changes: Vec<(String, i64)>,
}

impl Decoded {
    fn ids(&self, op: &str) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .changes
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, id)| *id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Every transaction committed so far on `items`, in commit order (read without consuming
/// the witness slot).
async fn decoded(pg: &PgCluster) -> Vec<Decoded> {
    let client = pg.client().await;
    let rows = client
        .query(
            "SELECT (lsn - '0/0')::text, data FROM pg_logical_slot_peek_changes('witness', NULL, NULL)",
            &[],
        )
        .await
        .expect("peek the witness slot");
    let mut out = Vec::new();
    let mut open: Option<Decoded> = None;
    for row in rows {
        let lsn: u64 = row.get::<_, String>(0).parse().expect("numeric LSN");
        let data: String = row.get(1);
        if data.starts_with("BEGIN") {
            open = Some(Decoded {
                begin: lsn,
                end: 0,
                changes: Vec::new(),
            });
        } else if data.starts_with("COMMIT") {
            let mut txn = open.take().expect("COMMIT after BEGIN");
            txn.end = lsn;
            if !txn.changes.is_empty() {
                out.push(txn);
            }
        } else if let Some(rest) = data.strip_prefix("table public.items: ") {
            // "INSERT: id[bigint]:5 txn[integer]:0 note[text]:null"
            let (op, columns) = rest.split_once(": ").expect("op: columns");
            let id = columns
                .strip_prefix("id[bigint]:")
                .and_then(|c| c.split(' ').next())
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("no id in {data:?}"));
            let txn = open.as_mut().expect("change inside a transaction");
            txn.changes.push((op.to_lowercase(), id));
        }
    }
    out
}

/// The slot's confirmed flush position once no walsender holds it any more (so no status
/// update can still move it).
async fn settled_slot_position(s: &Scenario, slot: &str) -> u64 {
    let client = s.pg.client().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let row = client
            .query_one(
                "SELECT active, (confirmed_flush_lsn - '0/0')::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("slot exists");
        if !row.get::<_, bool>(0) {
            return row.get::<_, String>(1).parse().expect("numeric LSN");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot {slot} still active after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the receiver has seen no new request for `quiet`.
async fn settle(s: &Scenario, quiet: Duration) {
    let mut seen = s.receiver.requests().len();
    loop {
        tokio::time::sleep(quiet).await;
        let now = s.receiver.requests().len();
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// `walhook deliveries list`: (id, state) of every pending or dead notification.
async fn undelivered(s: &Scenario) -> Vec<(String, String)> {
    let (ok, out, err) = s.deliveries(&["list"]).await;
    assert!(ok, "deliveries list failed:\n{err}");
    out.lines()
        .filter(|l| l.contains('\t'))
        .map(|l| {
            let mut fields = l.split('\t');
            let id = fields.next().unwrap_or_default().to_string();
            let state = fields.next().unwrap_or_default().to_string();
            (id, state)
        })
        .collect()
}

/// The usual scenario plus the witness slot, created before walhook's own so that it sees
/// every transaction walhook can see. (A separate statement: a slot cannot be created in a
/// transaction that has written.)
/// Waits until every row of `txns` was delivered, then checks the notifications are exactly
/// one per (transaction, op) with exactly its rows.
async fn expect_exactly_delivered(s: &Scenario, txns: &[Txn]) {
    let expected = all_ids(txns);
    let got = s
        .receiver
        .wait_for(|r| delivered_ids(r).is_superset(&expected), WAIT)
        .await;
    assert_eq!(received_groups(&bodies_by_id(&got)), expected_groups(txns));
}

async fn scenario() -> Scenario {
    scenario_with(CONFIG).await
}

async fn scenario_with(config: &str) -> Scenario {
    let s = Scenario::new(ITEMS, config).await;
    s.pg.exec("SELECT pg_create_logical_replication_slot('witness', 'test_decoding')")
        .await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing() {
    let s = scenario().await;
    let mut walhook = s.start_walhook().await;
    let txns = inserts(1, 400);
    let load = tokio::spawn(run_load(s.pg.url(), txns.clone(), Duration::from_millis(8)));

    let mut rng = fastrand::Rng::new();
    eprintln!("kill schedule seed: {}", rng.get_seed());
    let mut kills_under_load = 0;
    for k in 1..=3 {
        tokio::time::sleep(Duration::from_millis(rng.u64(200..900))).await;
        if !load.is_finished() {
            kills_under_load += 1;
        }
        walhook.restart();
        // The next kill hits a process that streams again, not one still starting.
        walhook.wait_log_count(STREAMING, k + 1).await;
    }
    load.await.expect("load task");
    assert!(
        kills_under_load >= 2,
        "the load ended before the kills ({kills_under_load} of 3 under load)"
    );

    let expected = all_ids(&txns);
    let got = s
        .receiver
        .wait_for(|r| delivered_ids(r).is_superset(&expected), WAIT)
        .await;
    let bodies = bodies_by_id(&got);
    assert_eq!(
        received_groups(&bodies),
        expected_groups(&txns),
        "one notification per transaction, with exactly its rows"
    );
    assert!(
        walhook.try_exit().is_none(),
        "walhook exited:\n{}",
        walhook.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_a_crash_does_not_duplicate_the_log() {
    let s = scenario().await;
    let mut walhook = s.start_walhook().await;
    // A copy of walhook's slot from before any change: resuming from it later makes walhook
    // re-read every transaction of this test, all already in its log.
    s.pg.exec("SELECT pg_copy_logical_replication_slot('walhook', 'rewound')")
        .await;

    // Single-op transactions, and mixed ones that make one notification per op.
    let phase_a: Vec<Txn> = vec![
        vec![change("insert", [1, 2, 3])],
        vec![change("insert", [4])],
        vec![change("update", [1, 4])],
        vec![change("insert", [5, 6]), change("update", [2])],
        vec![change("delete", [3])],
        vec![change("insert", [7]), change("delete", [5])],
    ];
    commit_all(&s.pg, 0, &phase_a).await;
    let groups_a: usize = expected_groups(&phase_a).values().sum();
    s.receiver
        .wait_for(|r| bodies_by_id(r).len() >= groups_a, WAIT)
        .await;
    // Right after delivery: the acknowledgement may not have reached PostgreSQL yet.
    walhook.kill9();
    walhook.restart();
    walhook.wait_log_count(STREAMING, 2).await;

    let phase_b: Vec<Txn> = vec![
        vec![change("insert", [8, 9])],
        vec![change("update", [8]), change("delete", [9])],
        vec![change("update", [7])],
    ];
    commit_all(&s.pg, phase_a.len(), &phase_b).await;
    let groups_ab = groups_a + expected_groups(&phase_b).values().sum::<usize>();
    s.receiver
        .wait_for(|r| bodies_by_id(r).len() >= groups_ab, WAIT)
        .await;

    // Crash again and resume from the rewound slot: everything is replayed.
    walhook.kill9();
    let mut args = s.run_args();
    args.extend(["--slot".to_string(), "rewound".to_string()]);
    let mut walhook = Walhook::spawn(&args, &[]);
    walhook.wait_log_contains(STREAMING, WAIT).await;
    let phase_c: Vec<Txn> = vec![vec![change("insert", [10])]];
    commit_all(&s.pg, phase_a.len() + phase_b.len(), &phase_c).await;
    let all: Vec<Txn> = [phase_a, phase_b, phase_c].concat();
    let groups_all: usize = expected_groups(&all).values().sum();
    s.receiver
        .wait_for(|r| bodies_by_id(r).len() >= groups_all, WAIT)
        .await;
    // The replay went past every transaction of the test.
    let last_end = decoded(&s.pg).await.last().expect("transactions").end;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (rewound, _) = s.slot_and_wal("rewound").await;
        if rewound >= last_end {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rewound slot did not reach the last commit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    settle(&s, Duration::from_millis(300)).await;

    walhook.sigterm();
    let status = walhook.wait_exit(Duration::from_secs(5)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "walhook did not exit 0 on SIGTERM: {status:?}\n{}",
        walhook.log()
    );
    assert_eq!(
        undelivered(&s).await,
        Vec::<(String, String)>::new(),
        "nothing pending or dead"
    );
    let bodies = bodies_by_id(&s.receiver.requests());
    assert_eq!(
        bodies.len(),
        groups_all,
        "one webhook-id per (transaction, op)"
    );
    assert_eq!(received_groups(&bodies), expected_groups(&all));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_never_passes_what_the_log_holds() {
    // Retries every second (the default waits 5 s after the first failure), so that the
    // redelivery at the end is quick.
    let config = CONFIG.replace(
        "secret = \"{secret}\"",
        &format!(
            "secret = \"{{secret}}\"\nretry = [{}]",
            vec!["\"1s\""; 30].join(", ")
        ),
    );
    let s = scenario_with(&config).await;
    // Nothing is delivered: every notification stays in the log.
    s.receiver.respond_with(Plan::always(500));
    let mut walhook = s.start_walhook().await;
    let txns = inserts(1, 150);
    let load = tokio::spawn(run_load(s.pg.url(), txns.clone(), Duration::from_millis(5)));
    let mut rng = fastrand::Rng::new();
    let after = Duration::from_millis(rng.u64(700..1200));
    eprintln!("kill after {after:?} (seed {})", rng.get_seed());
    tokio::time::sleep(after).await;
    walhook.kill9();
    let confirmed = settled_slot_position(&s, "walhook").await;
    load.await.expect("load task");

    let decoded = decoded(&s.pg).await;
    assert_eq!(
        decoded.len(),
        txns.len(),
        "the witness saw every transaction"
    );
    // Each notification's id names its commit LSN, which lies inside its transaction.
    let logged: Vec<(String, String, u64)> = undelivered(&s)
        .await
        .into_iter()
        .map(|(id, state)| {
            let lsn = id_lsn(&id);
            (id, state, lsn)
        })
        .collect();

    let covered: Vec<&Decoded> = decoded.iter().filter(|t| t.end <= confirmed).collect();
    eprintln!(
        "slot at {confirmed}: {} of {} transactions acknowledged, {} notifications logged",
        covered.len(),
        decoded.len(),
        logged.len()
    );
    assert!(
        covered.len() >= 5,
        "the slot hardly moved during the load ({} of {} transactions acknowledged); the check would prove little",
        covered.len(),
        decoded.len()
    );
    for t in &covered {
        let ids = t.ids("insert");
        let mine: Vec<&(String, String, u64)> = logged
            .iter()
            .filter(|(_, _, lsn)| t.begin <= *lsn && *lsn < t.end)
            .collect();
        let [(id, state, lsn)] = mine.as_slice() else {
            panic!(
                "the slot is at {confirmed}, past the end ({}) of the transaction inserting {ids:?}, \
                 but the log holds {} notifications for it instead of one; logged: {logged:?}",
                t.end,
                mine.len()
            );
        };
        assert_eq!(state, "pending", "{id} was never delivered");
        let (ok, out, err) = s.deliveries(&["show", id]).await;
        assert!(ok, "deliveries show {id} failed:\n{err}");
        let shown: Value = serde_json::from_str(&out).expect("show prints JSON");
        assert_eq!(shown["state"], "pending", "{out}");
        let body = &shown["body"];
        let mut rows: Vec<i64> = body["rows"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default();
        rows.sort_unstable();
        assert_eq!((body["op"].as_str(), rows), (Some("insert"), ids), "{out}");
        assert_eq!(parse_lsn(body["lsn"].as_str().expect("lsn")), *lsn, "{out}");
    }

    // The endpoint recovers: a restart delivers every transaction, also those after the kill.
    s.receiver.respond_with(Plan::always(200));
    walhook.restart();
    expect_exactly_delivered(&s, &txns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restarts_mid_stream_are_retried() {
    let s = scenario().await;
    let mut walhook = s.start_walhook().await;
    let txns = inserts(1, 30);
    let (first, rest) = txns.split_at(10);
    let (second, third) = rest.split_at(10);

    commit_all(&s.pg, 0, first).await;
    let ids = all_ids(first);
    s.receiver
        .wait_for(|r| delivered_ids(r).is_superset(&ids), WAIT)
        .await;

    s.pg.restart();
    walhook.wait_log_count(RECONNECTING, 1).await;
    commit_all(&s.pg, 10, second).await;
    let ids = all_ids(&txns[..20]);
    s.receiver
        .wait_for(|r| delivered_ids(r).is_superset(&ids), WAIT)
        .await;

    let before = walhook.log().matches(RECONNECTING).count();
    s.pg.stop_immediate();
    s.pg.start_again();
    walhook.wait_log_count(RECONNECTING, before + 1).await;
    commit_all(&s.pg, 20, third).await;
    let ids = all_ids(&txns);
    let got = s
        .receiver
        .wait_for(|r| delivered_ids(r).is_superset(&ids), WAIT)
        .await;

    assert_eq!(received_groups(&bodies_by_id(&got)), expected_groups(&txns));
    let log = walhook.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains(RECONNECTING)),
        "no reconnect warning:\n{log}"
    );
    assert!(walhook.try_exit().is_none(), "walhook exited:\n{log}");

    walhook.sigterm();
    let status = walhook.wait_exit(Duration::from_secs(5)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "walhook did not exit 0 on SIGTERM after the restarts: {status:?}\n{}",
        walhook.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_and_acknowledges_what_was_delivered() {
    let s = scenario().await;
    let mut walhook = s.start_walhook().await;
    let txns = inserts(1, 400);
    let load = tokio::spawn(run_load(s.pg.url(), txns.clone(), Duration::from_millis(8)));
    let mut rng = fastrand::Rng::new();
    let after = Duration::from_millis(rng.u64(500..1200));
    eprintln!("SIGTERM after {after:?} (seed {})", rng.get_seed());
    tokio::time::sleep(after).await;
    walhook.sigterm();
    let asked = std::time::Instant::now();
    let status = walhook.wait_exit(Duration::from_secs(5)).await;
    eprintln!("exited {:?} after SIGTERM", asked.elapsed());
    assert!(
        !load.is_finished(),
        "the load ended before walhook stopped: not a shutdown under load"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "walhook did not exit 0 within 5 s of SIGTERM: {status:?}\n{}",
        walhook.log()
    );
    let confirmed = settled_slot_position(&s, "walhook").await;
    load.await.expect("load task");

    let delivered = delivered_ids(&s.receiver.requests());
    assert!(
        !delivered.is_empty(),
        "nothing was delivered before SIGTERM"
    );
    for t in decoded(&s.pg).await {
        if t.ids("insert").iter().any(|id| delivered.contains(id)) {
            assert!(
                t.end <= confirmed,
                "transaction inserting {:?} was delivered but the slot ({confirmed}) is before its end ({})",
                t.ids("insert"),
                t.end
            );
        }
    }

    walhook.restart();
    expect_exactly_delivered(&s, &txns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_at_start_is_waited_for() {
    let s = scenario().await;
    s.pg.stop_fast();
    let mut walhook = Walhook::spawn(&s.run_args(), &[]);
    walhook
        .wait_log_contains("database not ready, retrying", WAIT)
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        walhook.try_exit().is_none(),
        "walhook gave up on an unreachable database:\n{}",
        walhook.log()
    );
    let retries = walhook
        .log()
        .matches("database not ready, retrying")
        .count();
    assert!(retries >= 2, "retried only {retries} time(s) in 3 s");

    s.pg.start_again();
    walhook.wait_log_contains(STREAMING, WAIT).await;
    let txns = inserts(1, 5);
    commit_all(&s.pg, 0, &txns).await;
    let ids = all_ids(&txns);
    let got = s
        .receiver
        .wait_for(|r| delivered_ids(r).is_superset(&ids), WAIT)
        .await;
    assert_eq!(received_groups(&bodies_by_id(&got)), expected_groups(&txns));
}

/// A scenario whose walhook delivered one insert (row 1) and then stopped cleanly.
async fn delivered_one_then_stopped() -> Scenario {
    let s = Scenario::new(ITEMS, CONFIG).await;
    let mut walhook = s.start_walhook().await;
    s.pg.exec("INSERT INTO items VALUES (1, 1)").await;
    s.receiver.wait_for_count(1, WAIT).await;
    walhook.sigterm();
    let status = walhook.wait_exit(WAIT).await.expect("walhook exits");
    assert!(status.success(), "exit status {status}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_is_refused_for_another_database() {
    let s = delivered_one_then_stopped().await;

    // Another cluster (its own initdb: another system identifier), same table.
    let other = PgCluster::start_fresh();
    other.exec(ITEMS).await;
    let mut args = s.run_args();
    let at = args
        .iter()
        .position(|a| a == "--database-url")
        .expect("url arg")
        + 1;
    args[at] = other.url();
    let (status, _, stderr) = crate::support::run_to_completion(&args, &[], WAIT).await;
    assert!(
        !status.success(),
        "run accepted another database's data dir"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("walhook: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("holds the delivery log of") && errors[0].contains("another --data-dir"),
        "{stderr}"
    );
    // Refused before anything was created on the other database.
    let slots = other
        .client()
        .await
        .query("SELECT 1 FROM pg_replication_slots", &[])
        .await
        .expect("query");
    assert!(slots.is_empty(), "a slot was created on the other database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_column_renamed_while_stopped_does_not_wedge_the_stream() {
    let s = delivered_one_then_stopped().await;

    // While walhook is stopped: a change under the old column name, the rename, a change
    // under the new one. On restart the catalog has the new name, the stream starts with
    // the old one.
    s.pg.exec("INSERT INTO items VALUES (2, 2)").await;
    s.pg.exec("ALTER TABLE items RENAME COLUMN id TO item_id")
        .await;
    s.pg.exec("INSERT INTO items (item_id, txn) VALUES (3, 3)")
        .await;
    let _walhook = s.start_walhook().await;
    let got = s.receiver.wait_for_count(3, WAIT).await;
    // Delivery runs several requests at once: compare the set of rows.
    let mut rows: Vec<i64> = got
        .iter()
        .flat_map(|r| r.json()["rows"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_i64())
        .collect();
    rows.sort();
    assert_eq!(rows, vec![1, 2, 3]);
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_transaction_streams_through_in_bounded_memory() {
    // 400,000 rows with a 200-byte payload in one transaction: about 100 MB of row data.
    // walhook holds at most a chunk of rows (max_rows) and a bounded event buffer, so its
    // peak memory stays far below the transaction's size.
    let s = Scenario::new(
        "CREATE TABLE items (id bigint PRIMARY KEY, txn int NOT NULL, note text)",
        &CONFIG.replace(
            "secret = \"{secret}\"",
            "secret = \"{secret}\"\nmax_rows = 1000",
        ),
    )
    .await;
    let walhook = s.start_walhook().await;
    let rows: i64 = 400_000;
    s.pg.exec(&format!(
        "INSERT INTO items SELECT i, 1, repeat(md5(i::text), 6) || lpad(i::text, 8, '0') FROM generate_series(1, {rows}) i"
    ))
    .await;
    let expected = (rows as usize).div_ceil(1000);
    let got = s
        .receiver
        .wait_for(
            |r| r.iter().filter(|x| x.status == Some(200)).count() >= expected,
            Duration::from_secs(120),
        )
        .await;
    let delivered: usize = got
        .iter()
        .map(|r| r.json()["rows"].as_array().map_or(0, |a| a.len()))
        .sum();
    assert_eq!(delivered, rows as usize);
    let peak = peak_rss_mib(walhook.pid());
    // About 60 MiB are sled's buffers and cache and the runtime; buffering the whole
    // transaction would add its 100+ MB.
    assert!(
        peak < 100,
        "walhook's peak memory was {peak} MiB for a {rows}-row transaction"
    );
}
