//! Delivery semantics end to end: what counts as delivered, retries, timeouts, `Retry-After`,
//! dead-lettering and redelivery, ordering, keep-alive, the attempt log and its pruning.
//!
//! Every test drives the real binary against a throwaway cluster and the recording receiver,
//! with retry schedules of milliseconds or a few seconds so that each test takes seconds.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::support::{signature_ok, Answer, Plan, Recorded, Scenario, Walhook, WAIT};

const ORDERS: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, total numeric)";

/// The event every test subscribes to: one notification per inserting transaction.
const EVENT: &str = r#"
[[event]]
name = "order_placed"
table = "public.orders"
on = ["insert"]
"#;

/// A `[[webhook]]` section for `order_placed` posting to the receiver's `path`, with extra
/// `options` lines (timeout, retry, ordered...).
fn webhook(id: &str, path: &str, options: &str) -> String {
    format!(
        r#"
[[webhook]]
id = "{id}"
event = "order_placed"
url = "{{receiver}}{path}"
secret = "{{secret}}"
{options}
"#
    )
}

/// The whole config: the event and the given webhook sections (and any `[delivery]` last).
fn config(sections: &[String]) -> String {
    let mut text = EVENT.to_string();
    for section in sections {
        text.push_str(section);
    }
    text
}

/// How long to watch for requests that must not come: several times every retry delay the
/// tests configure after a failure that should have been final.
const QUIET: Duration = Duration::from_millis(1000);

fn webhook_id(r: &Recorded) -> String {
    r.header("webhook-id")
        .unwrap_or_else(|| panic!("request without webhook-id:\n{r}"))
        .to_string()
}

/// The primary keys the notification lists.
fn rows(r: &Recorded) -> Vec<Value> {
    r.json()["rows"].as_array().cloned().unwrap_or_default()
}

fn statuses(requests: &[Recorded]) -> Vec<Option<u16>> {
    requests.iter().map(|r| r.status).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SIGTERM; walhook must exit 0 within `WAIT`.
async fn stop(walhook: &mut Walhook) {
    walhook.sigterm();
    let status = walhook
        .wait_exit(WAIT)
        .await
        .unwrap_or_else(|| panic!("walhook still runs {WAIT:?} after SIGTERM"));
    assert!(
        status.success(),
        "walhook exited with {status} after SIGTERM"
    );
}

/// `walhook deliveries show ID`, parsed; panics when the command fails.
async fn show(s: &Scenario, id: &str) -> Value {
    let (ok, out, err) = s.deliveries(&["show", id]).await;
    assert!(ok, "deliveries show {id} failed:\n{err}");
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("deliveries show {id} printed no JSON ({e}):\n{out}"))
}

/// `walhook deliveries list`; panics when the command fails.
async fn list(s: &Scenario) -> String {
    let (ok, out, err) = s.deliveries(&["list"]).await;
    assert!(ok, "deliveries list failed:\n{err}");
    out
}

/// Waits `QUIET`, then asserts that `path` still got exactly `expected` requests.
async fn assert_no_more(s: &Scenario, path: &str, expected: usize) {
    tokio::time::sleep(QUIET).await;
    let got = s.receiver.requests_to(path);
    assert_eq!(
        got.len(),
        expected,
        "{path} got more requests than expected after {QUIET:?}:\n{}",
        crate::support::receiver::dump(&got)
    );
}

/// Every attempt of one notification is the same request, signed afresh: same `webhook-id`,
/// same body, a valid signature each time.
fn assert_same_notification(attempts: &[Recorded]) {
    let first = &attempts[0];
    for r in attempts {
        assert_eq!(webhook_id(r), webhook_id(first), "webhook-id changed: {r}");
        assert_eq!(r.body, first.body, "body changed between attempts: {r}");
        assert!(signature_ok(r), "bad signature on {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_200_counts_every_other_status_is_retried_until_200() {
    let retry = r#"retry = ["200ms", "200ms", "200ms"]"#;
    let codes = [204u16, 500, 201, 301, 400];
    let sections: Vec<String> = codes
        .iter()
        .map(|code| webhook(&format!("s{code}"), &format!("/hooks/s{code}"), retry))
        .collect();
    let s = Scenario::new(ORDERS, &config(&sections)).await;
    for code in codes {
        let mut plan = Plan::fail_first(2, code);
        if code == 301 {
            // Following the redirect would send the signed payload to a URL nobody configured.
            plan = plan.with_header("location", &s.receiver.url("/moved"));
        }
        s.receiver.set_plan(&format!("/hooks/s{code}"), plan);
    }
    let mut walhook = s.start_walhook().await;
    s.pg.exec("INSERT INTO orders VALUES (1, 9.5)").await;

    let paths: Vec<String> = codes.iter().map(|c| format!("/hooks/s{c}")).collect();
    s.receiver
        .wait_for(
            |got| {
                paths
                    .iter()
                    .all(|p| got.iter().filter(|r| &r.path == p).count() >= 3)
            },
            WAIT,
        )
        .await;
    // Then nothing more on any path: the first 200 is final.
    tokio::time::sleep(QUIET).await;
    for (code, path) in codes.iter().zip(&paths) {
        let attempts = s.receiver.requests_to(path);
        assert_eq!(
            statuses(&attempts),
            vec![Some(*code), Some(*code), Some(200)],
            "{path}: attempts until the first 200, and none after:\n{}",
            crate::support::receiver::dump(&attempts)
        );
        assert_same_notification(&attempts);
        assert_eq!(attempts[0].json()["hook_id"], format!("s{code}"));
        assert_eq!(rows(&attempts[0]), vec![json!(1)]);
        // The schedule's 200 ms (less 20 % jitter) pass between a failure and the next try.
        for pair in attempts.windows(2) {
            let gap = pair[1].at - pair[0].at;
            assert!(
                gap >= Duration::from_millis(150),
                "{path}: retried after {gap:?}"
            );
        }
    }
    assert!(
        s.receiver.requests_to("/moved").is_empty(),
        "the redirect was followed"
    );

    stop(&mut walhook).await;
    for (code, path) in codes.iter().zip(&paths) {
        let id = webhook_id(&s.receiver.requests_to(path)[0]);
        let detail = show(&s, &id).await;
        assert_eq!(detail["state"], "delivered", "{detail:#}");
        let attempts = detail["attempts"].as_array().expect("attempts");
        let numbers: Vec<&Value> = attempts.iter().map(|a| &a["number"]).collect();
        assert_eq!(numbers, [&json!(1), &json!(2), &json!(3)], "{detail:#}");
        let recorded: Vec<&Value> = attempts.iter().map(|a| &a["status"]).collect();
        assert_eq!(
            recorded,
            [&json!(code), &json!(code), &json!(200)],
            "{detail:#}"
        );
        let error = attempts[0]["error"]
            .as_str()
            .expect("a failed attempt has an error");
        assert!(error.contains(&code.to_string()), "{error}");
        if *code == 301 {
            assert!(error.contains("redirect"), "{error}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_attempt_is_retried_and_logged_as_a_timeout() {
    let section = webhook(
        "slow",
        "/hooks/slow",
        r#"timeout = "500ms"
retry = ["200ms", "200ms"]"#,
    );
    let s = Scenario::new(ORDERS, &config(&[section])).await;
    // The first answer comes long after the timeout; the retry is answered at once.
    s.receiver.set_plan(
        "/hooks/slow",
        Plan::sequence(
            [Answer::ok().with_delay(Duration::from_secs(3))],
            Answer::ok(),
        ),
    );
    let mut walhook = s.start_walhook().await;
    s.pg.exec("INSERT INTO orders VALUES (7, 1)").await;

    s.receiver.wait_for_count(2, WAIT).await;
    assert_no_more(&s, "/hooks/slow", 2).await;
    let attempts = s.receiver.requests_to("/hooks/slow");
    assert_same_notification(&attempts);
    let gap = attempts[1].at - attempts[0].at;
    assert!(
        gap >= Duration::from_millis(500),
        "retried {gap:?} after a 500ms timeout began"
    );

    stop(&mut walhook).await;
    let detail = show(&s, &webhook_id(&attempts[0])).await;
    assert_eq!(detail["state"], "delivered", "{detail:#}");
    let logged = detail["attempts"].as_array().expect("attempts");
    assert_eq!(logged.len(), 2, "{detail:#}");
    assert_eq!(logged[0]["status"], Value::Null, "no response: {detail:#}");
    let error = logged[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("timed out"), "{detail:#}");
    assert!(
        logged[0]["latency_ms"].as_u64().is_some_and(|ms| ms >= 500),
        "{detail:#}"
    );
    assert_eq!(logged[1]["status"], 200, "{detail:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_429_and_503_postpones_the_next_attempt() {
    // The schedule would retry after 100 ms; its longest delay (the clamp's ceiling) leaves
    // room for the 2 s the endpoint asks for.
    let retry = r#"retry = ["100ms", "5s"]"#;
    let s = Scenario::new(
        ORDERS,
        &config(&[
            webhook("busy", "/hooks/busy", retry),
            webhook("down", "/hooks/down", retry),
        ]),
    )
    .await;
    s.receiver.set_plan(
        "/hooks/busy",
        Plan::fail_first(1, 429).with_header("retry-after", "2"),
    );
    s.receiver.set_plan(
        "/hooks/down",
        Plan::fail_first(1, 503).with_header("retry-after", "2"),
    );
    let _walhook = s.start_walhook().await;
    s.pg.exec("INSERT INTO orders VALUES (3, 30)").await;

    s.receiver.wait_for_count(4, WAIT).await;
    for (path, code) in [("/hooks/busy", 429), ("/hooks/down", 503)] {
        let attempts = s.receiver.requests_to(path);
        assert_eq!(statuses(&attempts), vec![Some(code), Some(200)], "{path}");
        assert_same_notification(&attempts);
        let gap = attempts[1].at - attempts[0].at;
        assert!(
            gap >= Duration::from_millis(1800),
            "{path}: retried {gap:?} after `Retry-After: 2`"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_notifications_are_parked_dead_and_can_be_redelivered() {
    let section = webhook("orders", "/hooks/orders", r#"retry = ["100ms", "100ms"]"#);
    let s = Scenario::new(ORDERS, &config(&[section])).await;
    s.receiver.set_plan("/hooks/orders", Plan::always(500));
    let mut walhook = s.start_walhook().await;
    // Two transactions: two notifications, redelivered below in the two ways the CLI offers.
    s.pg.exec("INSERT INTO orders VALUES (1, 10)").await;
    s.pg.exec("INSERT INTO orders VALUES (2, 20)").await;

    s.receiver.wait_for_count(6, WAIT).await;
    assert_no_more(&s, "/hooks/orders", 6).await;
    let mut by_id: BTreeMap<String, Vec<Recorded>> = BTreeMap::new();
    for r in s.receiver.requests_to("/hooks/orders") {
        by_id.entry(webhook_id(&r)).or_default().push(r);
    }
    assert_eq!(by_id.len(), 2, "two notifications: {:?}", by_id.keys());
    for attempts in by_id.values() {
        assert_eq!(attempts.len(), 3, "1 attempt + 2 retries, then dead");
        assert_same_notification(attempts);
    }
    let first_of = |row: i64| -> String {
        by_id
            .iter()
            .find(|(_, attempts)| rows(&attempts[0]) == vec![json!(row)])
            .map(|(id, _)| id.clone())
            .unwrap_or_else(|| panic!("no notification lists row {row}"))
    };
    let (one, two) = (first_of(1), first_of(2));

    stop(&mut walhook).await;
    let listed = list(&s).await;
    for id in [&one, &two] {
        let line = listed
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("{id} not listed:\n{listed}"));
        assert!(line.contains("dead"), "{line}");
        assert!(line.contains("attempts=3"), "{line}");
        assert!(line.contains("500"), "the last outcome: {line}");
    }
    for (id, attempts) in &by_id {
        let detail = show(&s, id).await;
        assert_eq!(detail["id"], id.as_str());
        assert_eq!(detail["state"], "dead", "{detail:#}");
        assert_eq!(detail["body"], attempts[0].json(), "the body that was sent");
        let logged = detail["attempts"].as_array().expect("attempts");
        assert_eq!(logged.len(), 3, "{detail:#}");
        let sent_hash = sha256_hex(&attempts[0].body);
        for (i, a) in logged.iter().enumerate() {
            assert_eq!(a["number"], i + 1, "{detail:#}");
            assert_eq!(a["status"], 500, "{detail:#}");
            assert!(a["latency_ms"].is_u64(), "{detail:#}");
            assert!(a["at"].is_string(), "{detail:#}");
            assert_eq!(a["response"], "ok", "the response body head: {detail:#}");
            assert_eq!(a["payload_sha256"], sent_hash.as_str(), "{detail:#}");
        }
    }

    // An id the log does not hold is an error, not a silent no-op.
    let (ok, _, err) = s
        .deliveries(&["redeliver", "orders_00000000FFFFFFFF_9"])
        .await;
    assert!(!ok, "redelivering an unknown id succeeded");
    assert!(err.contains("orders_00000000FFFFFFFF_9"), "{err}");

    // One by id, then every remaining dead one.
    let (ok, out, err) = s.deliveries(&["redeliver", &one]).await;
    assert!(ok, "redeliver {one}: {err}");
    assert!(out.contains(&one), "{out}");
    let listed = list(&s).await;
    let state_of = |id: &str| {
        listed.lines().find(|l| l.starts_with(id)).map(|l| {
            if l.contains("dead") {
                "dead"
            } else {
                "pending"
            }
        })
    };
    assert_eq!(state_of(&one), Some("pending"), "{listed}");
    assert_eq!(state_of(&two), Some("dead"), "{listed}");
    let (ok, out, err) = s.deliveries(&["redeliver", "--dead"]).await;
    assert!(ok, "redeliver --dead: {err}");
    assert!(
        out.contains("queued 1 "),
        "only {two} was still dead: {out}"
    );

    s.receiver.set_plan("/hooks/orders", Plan::always(200));
    let mut walhook = s.start_walhook().await;
    s.receiver.wait_for_count(8, WAIT).await;
    assert_no_more(&s, "/hooks/orders", 8).await;
    let all = s.receiver.requests_to("/hooks/orders");
    let redelivered = &all[6..];
    assert_eq!(statuses(redelivered), vec![Some(200), Some(200)]);
    for r in redelivered {
        let id = webhook_id(r);
        let before = by_id
            .get(&id)
            .unwrap_or_else(|| panic!("redelivered under a new id: {r}"));
        assert_same_notification(&[before[0].clone(), r.clone()]);
    }

    stop(&mut walhook).await;
    assert!(
        list(&s).await.contains("no pending or dead notifications"),
        "both were delivered"
    );
    let detail = show(&s, &one).await;
    assert_eq!(detail["state"], "delivered", "{detail:#}");
    let logged = detail["attempts"].as_array().expect("attempts");
    assert_eq!(logged.len(), 4, "attempt numbering continues: {detail:#}");
    assert_eq!(logged[3]["number"], 4, "{detail:#}");
    assert_eq!(logged[3]["status"], 200, "{detail:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_webhook_delivers_in_commit_order_behind_a_failing_head() {
    let section = webhook(
        "ledger",
        "/hooks/ledger",
        r#"ordered = true
retry = ["300ms", "300ms"]"#,
    );
    let s = Scenario::new(ORDERS, &config(&[section])).await;
    s.receiver
        .set_plan("/hooks/ledger", Plan::fail_first(2, 500));
    let _walhook = s.start_walhook().await;
    for id in 1..=3 {
        s.pg.exec(&format!("INSERT INTO orders VALUES ({id}, {id})"))
            .await;
    }

    s.receiver.wait_for_count(5, WAIT).await;
    assert_no_more(&s, "/hooks/ledger", 5).await;
    let got = s.receiver.requests_to("/hooks/ledger");
    // Notification 1 holds the line through both failures; 2 and 3 are not even tried.
    let order: Vec<Vec<Value>> = got.iter().map(rows).collect();
    assert_eq!(
        order,
        vec![
            vec![json!(1)],
            vec![json!(1)],
            vec![json!(1)],
            vec![json!(2)],
            vec![json!(3)],
        ],
        "{}",
        crate::support::receiver::dump(&got)
    );
    assert_eq!(
        statuses(&got),
        vec![Some(500), Some(500), Some(200), Some(200), Some(200)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_webhook_delivers_later_notifications_while_one_retries() {
    let section = webhook("crm", "/hooks/crm", r#"retry = ["4s"]"#);
    let s = Scenario::new(ORDERS, &config(&[section])).await;
    s.receiver.set_plan("/hooks/crm", Plan::fail_first(1, 500));
    let _walhook = s.start_walhook().await;
    s.pg.exec("INSERT INTO orders VALUES (1, 1)").await;
    // Notification 1 has failed and waits about 4 s for its retry.
    s.receiver.wait_for_count(1, WAIT).await;
    s.pg.exec("INSERT INTO orders VALUES (2, 2)").await;
    s.pg.exec("INSERT INTO orders VALUES (3, 3)").await;

    let got = s.receiver.wait_for_count(4, WAIT).await;
    let order: Vec<Vec<Value>> = got.iter().map(rows).collect();
    let rows_and_status = |i: usize| (order[i].clone(), got[i].status);
    let dumped = crate::support::receiver::dump(&got);
    assert_eq!(rows_and_status(0), (vec![json!(1)], Some(500)), "{dumped}");
    let mut middle = vec![rows_and_status(1), rows_and_status(2)];
    middle.sort_by_key(|(rows, _)| rows[0].as_i64());
    assert_eq!(
        middle,
        vec![(vec![json!(2)], Some(200)), (vec![json!(3)], Some(200))],
        "2 and 3 go through while 1 waits for its retry: {dumped}"
    );
    assert_eq!(rows_and_status(3), (vec![json!(1)], Some(200)), "{dumped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_requests_reuse_one_connection() {
    let s = Scenario::new(ORDERS, &config(&[webhook("crm", "/hooks/crm", "")])).await;
    let walhook = s.start_walhook().await;
    // One at a time: concurrent requests would rightly open several connections. walhook
    // logs "delivered" after reading the response, when the connection is back in its pool.
    for id in 1..=4 {
        s.pg.exec(&format!("INSERT INTO orders VALUES ({id}, 0)"))
            .await;
        let got = s.receiver.wait_for_count(id, WAIT).await;
        let delivered = format!("delivered hook=crm id={}", webhook_id(&got[id - 1]));
        walhook.wait_log_contains(&delivered, WAIT).await;
    }
    let got = s.receiver.requests();
    let conns: Vec<u64> = got.iter().map(|r| r.conn).collect();
    assert!(
        conns.iter().all(|c| *c == conns[0]),
        "connections used: {conns:?}"
    );
}

/// The name and nice value of each of `pid`'s threads (the main thread first), from `/proc`.
fn thread_priorities(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc task dir") {
        let stat = std::fs::read_to_string(task.expect("task entry").path().join("stat"))
            .unwrap_or_default();
        // pid (comm) state ...: fields after the comm's closing parenthesis; nice is the 19th
        // field of the line, the 17th after the comm.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let name = head.split_once(" (").map_or("", |(_, n)| n).to_string();
        let nice = rest.split(' ').nth(16).and_then(|n| n.parse().ok());
        let main = head
            .split_once(" (")
            .is_some_and(|(tid, _)| tid == pid.to_string());
        match nice {
            Some(nice) if main => out.insert(0, (name, nice)),
            Some(nice) => out.push((name, nice)),
            None => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_runs_at_a_lower_cpu_priority_than_the_stream() {
    let s = Scenario::new(ORDERS, &config(&[webhook("crm", "/hooks/crm", "")])).await;
    let walhook = s.start_walhook().await;
    s.pg.exec("INSERT INTO orders VALUES (1, 0)").await;
    s.receiver.wait_for_count(1, WAIT).await;
    let threads = thread_priorities(walhook.pid());
    // Relative to the priority walhook was started with (the main thread runs the stream).
    let base = threads[0].1;
    let delivery: Vec<_> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("walhook-deliver"))
        .collect();
    assert!(!delivery.is_empty(), "no delivery threads in {threads:?}");
    assert!(
        delivery
            .iter()
            .all(|(_, nice)| *nice == (base + 10).min(19)),
        "delivery threads not 10 below the stream: {threads:?}"
    );
    // The runtime that writes the log and sled's I/O threads keep the stream's priority.
    let others: Vec<_> = threads
        .iter()
        .filter(|(name, _)| !name.starts_with("walhook-deliver"))
        .collect();
    assert!(
        others.iter().any(|(name, _)| name.starts_with("sled-io")),
        "{threads:?}"
    );
    assert!(others.iter().all(|(_, nice)| *nice == base), "{threads:?}");
}

/// Delivers one notification, stops walhook, waits past a 1 s retention, starts and stops
/// walhook again (pruning runs at start); returns the id and `show`'s answers before and after.
async fn deliver_and_restart(s: &Scenario, wait_for_prune: bool) -> (String, Value, Option<Value>) {
    let mut walhook = s.start_walhook().await;
    s.pg.exec("INSERT INTO orders VALUES (1, 1)").await;
    let got = s.receiver.wait_for_count(1, WAIT).await;
    let id = webhook_id(&got[0]);
    stop(&mut walhook).await;
    let before = show(s, &id).await;

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut walhook = s.start_walhook().await;
    if wait_for_prune {
        walhook
            .wait_log_contains("pruned delivered notifications", WAIT)
            .await;
        assert!(walhook.log().contains("pruned=1"), "{}", walhook.log());
    }
    stop(&mut walhook).await;
    assert_eq!(s.receiver.requests().len(), 1, "nothing delivered again");
    let (ok, out, err) = s.deliveries(&["show", &id]).await;
    let after = if ok {
        Some(serde_json::from_str(&out).expect("show prints JSON"))
    } else {
        assert!(err.contains("no notification"), "{err}");
        None
    };
    (id, before, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_notifications_are_pruned_after_the_retention() {
    let mut text = config(&[webhook("crm", "/hooks/crm", "")]);
    text.push_str("\n[delivery]\nretention = \"1s\"\n");
    let s = Scenario::new(ORDERS, &text).await;
    let (id, before, after) = deliver_and_restart(&s, true).await;
    assert_eq!(before["state"], "delivered", "{before:#}");
    assert_eq!(
        after, None,
        "{id} is still in the log after its retention and a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_notifications_are_kept_within_the_default_retention() {
    let s = Scenario::new(ORDERS, &config(&[webhook("crm", "/hooks/crm", "")])).await;
    let (id, before, after) = deliver_and_restart(&s, false).await;
    assert_eq!(before["state"], "delivered", "{before:#}");
    let after = after.unwrap_or_else(|| panic!("{id} was pruned within the default retention"));
    assert_eq!(after["state"], "delivered", "{after:#}");
    assert_eq!(after["attempts"][0]["status"], 200, "{after:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_works_while_run_holds_the_data_dir() {
    let section = webhook("orders", "/hooks/orders", r#"retry = ["100ms"]"#);
    let s = Scenario::new(ORDERS, &config(&[section])).await;
    s.receiver.set_plan("/hooks/orders", Plan::always(500));
    let mut walhook = s.start_walhook().await;
    s.pg.exec("INSERT INTO orders VALUES (1, 1)").await;
    s.pg.exec("INSERT INTO orders VALUES (2, 2)").await;
    s.receiver.wait_for_count(4, WAIT).await;
    assert_no_more(&s, "/hooks/orders", 4).await;
    let ids: Vec<String> = {
        let mut ids: Vec<String> = s.receiver.requests().iter().map(webhook_id).collect();
        ids.sort();
        ids.dedup();
        ids
    };
    assert_eq!(ids.len(), 2, "{ids:?}");

    // `run` holds the log: these go through its control socket.
    let listed = list(&s).await;
    for id in &ids {
        let line = listed
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("{id} not listed:\n{listed}"));
        assert!(
            line.contains("dead") && line.contains("attempts=2"),
            "{line}"
        );
    }
    assert_eq!(show(&s, &ids[0]).await["state"], "dead");

    // Redelivered while running: picked up at once, no restart.
    s.receiver.set_plan("/hooks/orders", Plan::always(200));
    let (ok, out, err) = s.deliveries(&["redeliver", "--dead"]).await;
    assert!(ok, "redeliver --dead: {err}");
    assert!(out.contains("queued 2 "), "{out}");
    s.receiver.wait_for_count(6, WAIT).await;
    assert_no_more(&s, "/hooks/orders", 6).await;
    let all = s.receiver.requests();
    let mut again: Vec<String> = all[4..].iter().map(webhook_id).collect();
    again.sort();
    assert_eq!(again, ids, "redelivered under the same ids");
    assert_eq!(statuses(&all[4..]), vec![Some(200), Some(200)]);
    assert!(list(&s).await.contains("no pending or dead notifications"));

    // A delivered notification can be sent again on request.
    let (ok, out, err) = s.deliveries(&["redeliver", &ids[1]]).await;
    assert!(ok, "redeliver {}: {err}", ids[1]);
    assert!(out.contains(&ids[1]), "{out}");
    let all = s.receiver.wait_for_count(7, WAIT).await;
    assert_eq!(webhook_id(&all[6]), ids[1]);
    let first = all
        .iter()
        .find(|r| webhook_id(r) == ids[1])
        .expect("the first attempt");
    assert_same_notification(&[first.clone(), all[6].clone()]);
    assert_no_more(&s, "/hooks/orders", 7).await;

    // Unknown ids are errors through the socket too.
    let (ok, _, err) = s.deliveries(&["show", "orders_00000000FFFFFFFF_9"]).await;
    assert!(!ok, "showing an unknown id succeeded");
    assert!(err.contains("no notification"), "{err}");

    stop(&mut walhook).await;
    // Stopped: the log is read directly, with the same answers.
    let detail = show(&s, &ids[1]).await;
    assert_eq!(detail["state"], "delivered", "{detail:#}");
    let logged: Vec<&Value> = detail["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|a| &a["status"])
        .collect();
    assert_eq!(
        logged,
        [&json!(500), &json!(500), &json!(200), &json!(200)],
        "{detail:#}"
    );
}

/// CPU time (user + system) `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no memory-safety preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).unwrap_or(100).max(1);
    Duration::from_millis(ticks * 1000 / per_second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_control_socket_deliveries_says_the_data_dir_is_in_use() {
    let s = Scenario::new(ORDERS, &config(&[webhook("crm", "/hooks/crm", "")])).await;
    // A Unix socket path holds at most ~107 bytes: `run` cannot serve DATA_DIR/control.sock.
    let data_dir = s.dir.path().join("d".repeat(120));
    let mut args = s.run_args();
    let at = args
        .iter()
        .position(|a| a == "--data-dir")
        .expect("run args name the data dir")
        + 1;
    args[at] = data_dir.display().to_string();
    let mut walhook = Walhook::spawn(&args, &[]);
    walhook.wait_log_contains("streaming", WAIT).await;

    let (status, out, err) = crate::support::run_to_completion(
        &[
            "deliveries",
            "--data-dir",
            &data_dir.display().to_string(),
            "list",
        ],
        &[],
        WAIT,
    )
    .await;
    assert!(!status.success(), "deliveries list succeeded:\n{out}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].contains("in use"), "{err}");
    assert!(
        lines[0].contains(&data_dir.display().to_string()),
        "names the data dir: {err}"
    );

    // Delivery is unaffected, and an idle run stays idle (it used to spin on the closed
    // channel the control socket leaves behind).
    s.pg.exec("INSERT INTO orders VALUES (1, 1)").await;
    s.receiver.wait_for_count(1, WAIT).await;
    let before = cpu_time(walhook.pid());
    let window = Duration::from_secs(2);
    tokio::time::sleep(window).await;
    let used = cpu_time(walhook.pid()) - before;
    assert!(
        used < window / 5,
        "an idle walhook used {used:?} of CPU in {window:?}"
    );
    stop(&mut walhook).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_from_an_outage_do_not_hold_back_new_notifications() {
    // More failures than one webhook keeps in memory (its window is 256), all waiting for a
    // retry a minute away: a notification committed after the endpoint recovers must still
    // go out at once.
    let s = Scenario::new(
        ORDERS,
        &config(&[webhook("crm", "/hooks/crm", "retry = [\"60s\"]")]),
    )
    .await;
    s.receiver.set_plan("/hooks/crm", Plan::always(503));
    let walhook = s.start_walhook().await;
    let outage: usize = 300;
    // One transaction each: COMMIT inside a DO block.
    s.pg.exec(&format!(
        "DO $$ BEGIN FOR i IN 1..{outage} LOOP INSERT INTO orders VALUES (i, 1); COMMIT; END LOOP; END $$"
    ))
    .await;
    s.receiver.wait_for_count(outage, WAIT).await;

    s.receiver.set_plan("/hooks/crm", Plan::always(200));
    s.pg.exec("INSERT INTO orders VALUES (100000, 1)").await;
    let got = s
        .receiver
        .wait_for(
            |r| {
                r.iter()
                    .any(|x| x.status == Some(200) && rows(x) == vec![json!(100000)])
            },
            Duration::from_secs(10),
        )
        .await;
    let failed_first = got.iter().filter(|r| r.status == Some(503)).count();
    assert_eq!(
        failed_first, outage,
        "every outage notification failed once"
    );
    drop(walhook);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_control_client_does_not_delay_shutdown() {
    let s = Scenario::new(ORDERS, &config(&[webhook("crm", "/hooks/crm", "")])).await;
    let mut walhook = s.start_walhook().await;
    // Connects to the control socket and says nothing.
    let socket = s.data_dir().join("control.sock");
    let _silent = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("control socket accepts");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    walhook.sigterm();
    let status = walhook
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("walhook exits despite the idle control client");
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
}
