//! Classification edge cases found in review, each once a bug: a primary key update with
//! unchanged TOAST values, char(n) keys (baseline vs stream text), a recheck with a failing
//! row, and a stream lagging behind the database (paused with SIGSTOP) while a recheck or a
//! dependency re-evaluation runs: rows are judged as of the stream's position.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Scenario, Walhook, WAIT};

/// All hooks `any -> any` on one classification.
fn config_any(classification: &str) -> String {
    format!(
        "[[event]]\nname = \"on_all\"\nclassification = \"{classification}\"\nfrom = \"any\"\nto = \"any\"\n\n\
         [[webhook]]\nid = \"all\"\nevent = \"on_all\"\nurl = \"{{receiver}}/hooks/all\"\nsecret = \"{{secret}}\"\n"
    )
}

fn dir_with(s: &Scenario, name: &str, sql: &str) -> String {
    let dir = s.dir.path().join("classifications");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.sql")), sql).unwrap();
    dir.display().to_string()
}

/// (from, to, rows) of every distinct notification so far, sorted.
fn transitions(s: &Scenario) -> Vec<String> {
    let mut seen = std::collections::BTreeMap::new();
    for r in s.receiver.requests() {
        let id = r.header("webhook-id").unwrap().to_string();
        seen.entry(id).or_insert_with(|| r.json());
    }
    let mut out: Vec<String> = seen
        .values()
        .map(|b: &Value| {
            format!(
                "{} -> {} {}",
                b["transition"]["from"], b["transition"]["to"], b["rows"]
            )
        })
        .collect();
    out.sort();
    out
}

async fn settle(s: &Scenario, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + WAIT;
    while transitions(s).len() < n && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    transitions(s)
}

const BIG_TEXT: &str = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 320) i)";

/// A primary-key change carries unchanged TOAST columns as 'u'; the new key's image must
/// take them from the old key's row, not from nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pk_change_keeps_unchanged_toast() {
    let setup = "CREATE TABLE docs (id bigint PRIMARY KEY, title text, doc text);
                 ALTER TABLE docs ALTER COLUMN doc SET STORAGE EXTERNAL;";
    let s = Scenario::new(setup, &config_any("big_doc")).await;
    let dir = dir_with(
        &s,
        "big_doc",
        "SELECT id FROM public.docs WHERE length(doc) > 5000\n",
    );
    let _w = s.start_walhook_with(&["--classifications", &dir]).await;
    s.pg.exec(&format!("INSERT INTO docs VALUES (1, 'a', {BIG_TEXT})"))
        .await;
    assert_eq!(settle(&s, 1).await, vec!["null -> true [1]"]);
    s.pg.exec("UPDATE docs SET id = 2 WHERE id = 1").await;
    // 1 leaves (true -> null), 2 appears with its long doc (null -> true).
    assert_eq!(
        settle(&s, 3).await,
        vec!["null -> true [1]", "null -> true [2]", "true -> null [1]"]
    );
}

/// The same inside a transaction large enough to be spilled to the data dir (more than
/// 10,000 classified rows): the row's move must survive the spill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pk_change_keeps_unchanged_toast_in_a_spilled_transaction() {
    let setup = "CREATE TABLE docs (id bigint PRIMARY KEY, title text, doc text);
                 ALTER TABLE docs ALTER COLUMN doc SET STORAGE EXTERNAL;";
    // Only transitions to and from true: the 12,000 filler rows go null -> false, unheard.
    let config = "[[event]]\nname = \"became\"\nclassification = \"big_doc\"\nfrom = \"any\"\nto = \"true\"\n\n\
                  [[event]]\nname = \"left\"\nclassification = \"big_doc\"\nfrom = \"true\"\nto = \"any\"\n\n\
                  [[webhook]]\nid = \"became\"\nevent = \"became\"\nurl = \"{receiver}/hooks/became\"\nsecret = \"{secret}\"\n\n\
                  [[webhook]]\nid = \"left\"\nevent = \"left\"\nurl = \"{receiver}/hooks/left\"\nsecret = \"{secret}\"\n";
    let s = Scenario::new(setup, config).await;
    let dir = dir_with(
        &s,
        "big_doc",
        "SELECT id FROM public.docs WHERE length(doc) > 5000\n",
    );
    let walhook = s.start_walhook_with(&["--classifications", &dir]).await;
    s.pg.exec(&format!("INSERT INTO docs VALUES (1, 'a', {BIG_TEXT})"))
        .await;
    assert_eq!(settle(&s, 1).await, vec!["null -> true [1]"]);
    s.pg.exec(
        "BEGIN;
         INSERT INTO docs SELECT i, 'filler', NULL FROM generate_series(100, 6099) i;
         UPDATE docs SET id = 2 WHERE id = 1;
         INSERT INTO docs SELECT i, 'filler', NULL FROM generate_series(6100, 12099) i;
         COMMIT;",
    )
    .await;
    assert_eq!(
        settle(&s, 3).await,
        vec!["null -> true [1]", "null -> true [2]", "true -> null [1]"]
    );
    assert!(
        walhook.log().contains("a large transaction"),
        "the transaction was not spilled:\n{}",
        walhook.log()
    );
}

/// A column whose type changes while walhook runs is read as its new type from then on
/// (the stream describes the table anew): a value the old type cannot hold still classifies.
/// Before, `80.5` was cast to the old `int`, failed, and the row kept its old value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_type_change_mid_stream_is_followed() {
    let setup = "CREATE TABLE scores (id bigint PRIMARY KEY, score int)";
    let s = Scenario::new(setup, &config_any("high")).await;
    let dir = dir_with(
        &s,
        "high",
        "SELECT id FROM public.scores WHERE score > 80\n",
    );
    let walhook = s.start_walhook_with(&["--classifications", &dir]).await;
    s.pg.exec("INSERT INTO scores VALUES (1, 10), (2, 90)")
        .await;
    assert_eq!(
        settle(&s, 2).await,
        vec!["null -> false [1]", "null -> true [2]"]
    );
    // In one transaction with the change, and in a later one.
    s.pg.exec(
        "BEGIN;
         ALTER TABLE scores ALTER COLUMN score TYPE numeric;
         UPDATE scores SET score = 80.5 WHERE id = 1;
         COMMIT;",
    )
    .await;
    s.pg.exec("UPDATE scores SET score = 79.5 WHERE id = 2")
        .await;
    assert_eq!(
        settle(&s, 4).await,
        vec![
            "false -> true [1]",
            "null -> false [1]",
            "null -> true [2]",
            "true -> false [2]"
        ]
    );
    assert!(
        walhook.log().contains("changed type"),
        "the type change was not logged:\n{}",
        walhook.log()
    );
}

/// SIGTERM during a baseline (before streaming) stops walhook at once, exit status 0; the
/// next start baselines again, silently, and the stream then judges changes against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_baseline_exits_and_the_next_start_baselines_again() {
    let setup = "CREATE TABLE t (id bigint PRIMARY KEY, status text);
                 INSERT INTO t SELECT i, 'x' FROM generate_series(1, 3000) i;";
    let s = Scenario::new(setup, &config_any("slow")).await;
    // A millisecond or more per row (the subquery names the row, so it runs for each): the
    // baseline takes seconds.
    let dir = dir_with(
        &s,
        "slow",
        "SELECT id FROM public.t WHERE status = 'a' OR (SELECT false FROM pg_sleep(0.001 + 0 * t.id))\n",
    );
    let mut args = s.run_args();
    args.extend(["--classifications".to_string(), dir.clone()]);
    let mut first = Walhook::spawn(&args, &[]);
    first.wait_log_contains("baseline started", WAIT).await;
    first.sigterm();
    let status = first.wait_exit(Duration::from_secs(5)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "no clean exit within 5 s of SIGTERM ({status:?}):\n{}",
        first.log()
    );
    assert!(
        first.log().contains("stopped before streaming"),
        "{}",
        first.log()
    );
    assert!(!first.log().contains("baseline done"), "{}", first.log());

    let _second = s.start_walhook_with(&["--classifications", &dir]).await;
    s.pg.exec("UPDATE t SET status = 'a' WHERE id = 42").await;
    assert_eq!(settle(&s, 1).await, vec!["false -> true [42]"]);
}

/// Baseline keys must equal stream keys (pgoutput's text) for char(n) keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bpchar_key_baseline_matches_stream() {
    let setup = "CREATE TABLE codes (code char(4) PRIMARY KEY, status text);
                 INSERT INTO codes VALUES ('ab', 'active');";
    let s = Scenario::new(setup, &config_any("active_code")).await;
    let dir = dir_with(
        &s,
        "active_code",
        "SELECT code FROM public.codes WHERE status = 'active'\n",
    );
    let _w = s.start_walhook_with(&["--classifications", &dir]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.pg.exec("UPDATE codes SET status = 'gone' WHERE code = 'ab'")
        .await;
    // The baselined row goes true -> false (not null -> false: the baseline is seen).
    assert_eq!(settle(&s, 1).await, vec!["true -> false [\"ab  \"]"]);
}

/// One row whose condition errors must not stop the recheck of every other row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recheck_survives_a_row_error() {
    let setup = "CREATE TABLE invoices (id bigint PRIMARY KEY, divisor int, due_at timestamptz);";
    let s = Scenario::new(setup, &config_any("overdue")).await;
    let dir = dir_with(
        &s,
        "overdue",
        "-- recheck: 1s\nSELECT id FROM public.invoices WHERE 100 / divisor > 0 AND due_at < now()\n",
    );
    let _w = s.start_walhook_with(&["--classifications", &dir]).await;
    s.pg.exec(
        "INSERT INTO invoices VALUES (1, 1, now() + interval '3 seconds'), (2, 0, now() + interval '1 hour')",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Row 1 becomes overdue by recheck. (Row 2 errors: it keeps null.)
    assert!(
        settle(&s, 2)
            .await
            .contains(&"false -> true [1]".to_string()),
        "got {:?}",
        transitions(&s)
    );
}

/// A recheck while the stream lags must not turn a true -> null (delete) into
/// true -> false + false -> null.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recheck_races_a_lagging_stream() {
    let setup = "CREATE TABLE t (id bigint PRIMARY KEY, status text);
                 INSERT INTO t VALUES (1, 'active');";
    let s = Scenario::new(setup, &config_any("act")).await;
    let dir = dir_with(
        &s,
        "act",
        "-- recheck: 1s\nSELECT id FROM public.t WHERE status = 'active'\n",
    );
    let w = s.start_walhook_with(&["--classifications", &dir]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = w.pid().to_string();
    // Lag: walhook is paused while two transactions commit; on resume the overdue recheck
    // runs before the stream is read.
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    s.pg.exec("DELETE FROM t WHERE id = 1").await;
    s.pg.exec("INSERT INTO t VALUES (1, 'trial')").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    // Truth per transaction: true -> null, then null -> false.
    assert_eq!(
        settle(&s, 2).await,
        vec!["null -> false [1]", "true -> null [1]"]
    );
}

/// The base row's own columns must be judged as of the transaction, not read live: with the
/// stream lagging (walhook stopped, restarted, or just behind), a dependency change followed
/// by a change of the base row loses both transitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_reevaluation_reads_future_base_row() {
    let setup = "CREATE TABLE customers (id bigint PRIMARY KEY, status text);
                 CREATE TABLE contracts (id bigint PRIMARY KEY, customer_id bigint REFERENCES customers,
                                         signed boolean NOT NULL DEFAULT false);
                 INSERT INTO customers VALUES (1, 'a');";
    let s = Scenario::new(setup, &config_any("cc")).await;
    let dir = dir_with(
        &s,
        "cc",
        "SELECT id FROM public.customers c WHERE c.status = 'a' AND \
         EXISTS (SELECT 1 FROM contracts k WHERE k.customer_id = c.id AND k.signed)\n",
    );
    let w = s.start_walhook_with(&["--classifications", &dir]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = w.pid().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    s.pg.exec("INSERT INTO contracts VALUES (10, 1, true)")
        .await; // 1: false -> true
    s.pg.exec("UPDATE customers SET status = 'b' WHERE id = 1")
        .await; // 1: true -> false
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    assert_eq!(
        settle(&s, 2).await,
        vec!["false -> true [1]", "true -> false [1]"]
    );
}

/// Waits until the distinct notifications list `rows` rows in all (or [`WAIT`] passes), then
/// a second more; returns each transition's rows ("from -> to" → ids), asserting that no row
/// is listed twice under one transition.
async fn rows_by_transition(
    s: &Scenario,
    rows: usize,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<i64>> {
    let distinct = || -> Vec<Value> {
        let mut ids = std::collections::BTreeSet::new();
        s.receiver
            .requests()
            .iter()
            .filter(|r| ids.insert(r.header("webhook-id").unwrap_or("").to_string()))
            .map(|r| r.json())
            .collect()
    };
    let count = || -> usize {
        distinct()
            .iter()
            .map(|b| b["rows"].as_array().map_or(0, |a| a.len()))
            .sum()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while count() < rows && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut by: std::collections::BTreeMap<String, std::collections::BTreeSet<i64>> =
        Default::default();
    for b in distinct() {
        let key = format!("{} -> {}", b["transition"]["from"], b["transition"]["to"]);
        for row in b["rows"].as_array().into_iter().flatten() {
            assert!(
                by.entry(key.clone())
                    .or_default()
                    .insert(row.as_i64().unwrap()),
                "{row} twice"
            );
        }
    }
    by
}

/// TRUNCATE of a table the condition depends on: every base row a removed row pointed to is
/// re-evaluated, once, a page of pointers at a time (more than one page here), except one
/// the same transaction points to again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncating_a_dependency_table_reevaluates_every_row_it_pointed_to() {
    let setup = "CREATE TABLE customers (id bigint PRIMARY KEY, status text);
                 CREATE TABLE contracts (id bigint PRIMARY KEY, customer_id bigint REFERENCES customers,
                                         signed boolean NOT NULL DEFAULT false);
                 INSERT INTO customers SELECT i, 'a' FROM generate_series(1, 4500) i;
                 INSERT INTO contracts SELECT i, i, true FROM generate_series(1, 4500) i;";
    let s = Scenario::new(setup, &config_any("cc")).await;
    let dir = dir_with(
        &s,
        "cc",
        "SELECT id FROM public.customers c WHERE c.status = 'a' AND \
         EXISTS (SELECT 1 FROM contracts k WHERE k.customer_id = c.id AND k.signed)\n",
    );
    let _w = s.start_walhook_with(&["--classifications", &dir]).await;
    s.pg.exec("BEGIN; TRUNCATE contracts; INSERT INTO contracts VALUES (1, 7, true); COMMIT;")
        .await;
    let by = rows_by_transition(&s, 4499).await;
    let expected: std::collections::BTreeSet<i64> = (1..=4500).filter(|i| *i != 7).collect();
    assert_eq!(by.len(), 1, "{:?}", by.keys().collect::<Vec<_>>());
    assert_eq!(by["true -> false"], expected);
}

/// TRUNCATE: every row that existed goes to null, except one written again in the same
/// transaction, which compares its value before with its value after. Also from a table of
/// several pages, so the paged derivation is exercised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_sends_every_row_to_null_once() {
    let setup = "CREATE TABLE t (id bigint PRIMARY KEY, status text);
                 INSERT INTO t SELECT i, CASE WHEN i % 2 = 0 THEN 'active' ELSE 'x' END
                 FROM generate_series(1, 4500) i;";
    let s = Scenario::new(setup, &config_any("act")).await;
    let dir = dir_with(
        &s,
        "act",
        "SELECT id FROM public.t WHERE status = 'active'\n",
    );
    let w = s.start_walhook_with(&["--classifications", &dir]).await;
    s.pg.exec(
        "BEGIN; TRUNCATE t; INSERT INTO t VALUES (2, 'x'), (3, 'x'), (9999, 'active'); COMMIT;",
    )
    .await;
    let by = rows_by_transition(&s, 4500).await;
    let evens: std::collections::BTreeSet<i64> =
        (1..=4500).filter(|i| i % 2 == 0 && *i != 2).collect();
    let odds: std::collections::BTreeSet<i64> =
        (1..=4500).filter(|i| i % 2 == 1 && *i != 3).collect();
    assert_eq!(by.len(), 4, "{:?}", by.keys().collect::<Vec<_>>());
    assert_eq!(by["true -> null"], evens);
    assert_eq!(by["false -> null"], odds);
    assert_eq!(by["true -> false"], [2].into());
    assert_eq!(by["null -> true"], [9999].into());
    assert!(
        w.log().contains("a large transaction"),
        "not derived page by page"
    );
}
