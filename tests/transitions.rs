//! Classification events end to end (DESIGN.md "Classification events", issue 3): a row's
//! value in a classification — true (exists, satisfies the WHERE), false (exists, does not),
//! null (does not exist) — before and after each committed transaction, and a signed
//! notification per (transaction, webhook, actual from, actual to) when it changed.
//!
//! The step tests ([`Steps`]) run some SQL, wait for exactly the transitions it must cause and
//! compare them, then go on: a missing, extra or misattributed notification fails at the step
//! that caused it. The differential tests run a seeded random workload (set
//! `TRANSITIONS_SEED` to replay one) with ground truth from PostgreSQL itself: before and after
//! every transaction, the workload's own connection reads which rows exist and runs the
//! classification file's SQL; walhook's transitions must equal it exactly, for every from/to
//! combination, also across `kill -9`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::{Client, NoTls};

use crate::support::{signature_ok, Plan, Recorded, Scenario, Walhook, WAIT};

const CUSTOMERS: &str =
    "CREATE TABLE customers (id bigint PRIMARY KEY, status text, deleted_at timestamptz);";

/// The classification every customers test uses, as its file holds it.
const CUSTOMER_ACTIVE: &str = "\
-- A customer is active when it is not deleted and has status 'active'.
SELECT id FROM public.customers WHERE status = 'active' AND deleted_at IS NULL
";

/// The log line of a process that has connected and started streaming.
const STREAMING: &str = " streaming slot=";

/// How long a step waits, after its notifications arrived, for stray extra ones.
const QUIET: Duration = Duration::from_millis(500);

/// How long the differential tests wait for walhook to catch up with the workload.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// About 10 kB of text that does not compress: long enough to be stored out of line.
const BIG_TEXT: &str = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 320) i)";

/// A row's value in a classification: `Some(true)` in it, `Some(false)` exists but not in it,
/// `None` does not exist.
type Val = Option<bool>;

const T: Val = Some(true);
const F: Val = Some(false);
const N: Val = None;

fn show(v: Val) -> &'static str {
    match v {
        Some(true) => "true",
        Some(false) => "false",
        None => "null",
    }
}

/// One side of an event's transition, as the config names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    True,
    False,
    Null,
    Any,
}

impl Side {
    const ALL: [Side; 4] = [Side::True, Side::False, Side::Null, Side::Any];

    fn name(self) -> &'static str {
        match self {
            Side::True => "true",
            Side::False => "false",
            Side::Null => "null",
            Side::Any => "any",
        }
    }

    fn matches(self, v: Val) -> bool {
        match self {
            Side::True => v == T,
            Side::False => v == F,
            Side::Null => v == N,
            Side::Any => true,
        }
    }
}

/// Every (from, to) an event may name: all 16 but true→true, false→false and null→null
/// (a config error); any→any is allowed.
fn valid_pairs() -> Vec<(Side, Side)> {
    let mut pairs = Vec::new();
    for from in Side::ALL {
        for to in Side::ALL {
            if from != to || from == Side::Any {
                pairs.push((from, to));
            }
        }
    }
    assert_eq!(pairs.len(), 13);
    pairs
}

/// One classification event and the webhook subscribed to it: event `on_{id}`, webhook
/// `{id}` at `{receiver}/hooks/{id}`.
struct Hook {
    id: String,
    classification: &'static str,
    from: Side,
    to: Side,
    /// Extra lines for the `[[webhook]]` section (e.g. `retry = [...]`).
    extra: &'static str,
}

fn hook(id: &str, classification: &'static str, from: Side, to: Side) -> Hook {
    Hook {
        id: id.to_string(),
        classification,
        from,
        to,
        extra: "",
    }
}

/// The config for `hooks`: every `[[event]]` first, then every `[[webhook]]`.
fn config(hooks: &[Hook]) -> String {
    let mut text = String::new();
    for h in hooks {
        text.push_str(&format!(
            "[[event]]\nname = \"on_{}\"\nclassification = \"{}\"\nfrom = \"{}\"\nto = \"{}\"\n\n",
            h.id,
            h.classification,
            h.from.name(),
            h.to.name()
        ));
    }
    for h in hooks {
        text.push_str(&format!(
            "[[webhook]]\nid = \"{id}\"\nevent = \"on_{id}\"\nurl = \"{{receiver}}/hooks/{id}\"\nsecret = \"{{secret}}\"\n{}\n\n",
            h.extra,
            id = h.id
        ));
    }
    text
}

/// The id of the webhook for (from, to) in the differential tests, e.g. `false_any`.
fn pair_id(from: Side, to: Side) -> String {
    format!("{}_{}", from.name(), to.name())
}

/// One webhook per valid (from, to), all on `customer_active`.
fn all_pair_hooks() -> Vec<Hook> {
    valid_pairs()
        .into_iter()
        .map(|(from, to)| hook(&pair_id(from, to), "customer_active", from, to))
        .collect()
}

/// Writes `files` (stem, SQL) as `NAME.sql` into the scenario's classification dir and
/// returns the dir for `--classifications`.
fn classification_dir(s: &Scenario, files: &[(&str, &str)]) -> String {
    let dir = s.dir.path().join("classifications");
    std::fs::create_dir_all(&dir).expect("create the classification dir");
    for (name, sql) in files {
        std::fs::write(dir.join(format!("{name}.sql")), sql).expect("write a classification");
    }
    dir.display().to_string()
}

async fn start(s: &Scenario, dir: &str) -> Walhook {
    s.start_walhook_with(&["--classifications", dir]).await
}

/// `0/16B3748` → a comparable number.
fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text
        .split_once('/')
        .unwrap_or_else(|| panic!("LSN {text:?} has no '/'"));
    let hi = u64::from_str_radix(hi, 16).unwrap_or_else(|_| panic!("LSN {text:?}"));
    let lo = u64::from_str_radix(lo, 16).unwrap_or_else(|_| panic!("LSN {text:?}"));
    (hi << 32) | lo
}

/// One transition notification (one distinct webhook-id).
#[derive(Clone, Debug)]
struct Note {
    webhook_id: String,
    hook: String,
    from: Val,
    to: Val,
    /// As sent.
    rows: Vec<i64>,
    lsn: u64,
}

/// `hook: from -> to [rows, sorted]`, how steps compare notifications.
fn label(hook: &str, from: Val, to: Val, rows: &[i64]) -> String {
    let mut rows = rows.to_vec();
    rows.sort_unstable();
    format!("{hook}: {} -> {} {rows:?}", show(from), show(to))
}

impl Note {
    fn label(&self) -> String {
        label(&self.hook, self.from, self.to, &self.rows)
    }
}

/// Every request as a transition notification, one per distinct webhook-id. Checks on the way
/// that every request is signed, that every request carrying an id carries the same body byte
/// for byte (retries and replays), and the body's shape: hook_id (matching the url), event,
/// table, op "transition", classification, lsn, committed_at, transition {from, to} with the
/// actual values, and rows as integers, none twice.
fn notes(requests: &[Recorded], classification: &str, table: &str) -> Vec<Note> {
    let mut first: BTreeMap<String, &Recorded> = BTreeMap::new();
    for r in requests {
        assert!(signature_ok(r), "bad signature on {r}");
        let id = r
            .header("webhook-id")
            .unwrap_or_else(|| panic!("no webhook-id header on {r}"))
            .to_string();
        match first.get(&id) {
            Some(earlier) => assert_eq!(
                earlier.body, r.body,
                "webhook-id {id} was sent with two different bodies:\n{earlier}\n{r}"
            ),
            None => {
                first.insert(id, r);
            }
        }
    }
    first
        .into_iter()
        .map(|(id, r)| parse_note(id, r, classification, table))
        .collect()
}

fn transition_side(r: &Recorded, body: &Value, key: &str) -> Val {
    let transition = body["transition"]
        .as_object()
        .unwrap_or_else(|| panic!("no \"transition\" object in {r}"));
    match transition.get(key) {
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::Null) => None,
        other => panic!("transition.{key} is {other:?}, not true, false or null, in {r}"),
    }
}

fn parse_note(webhook_id: String, r: &Recorded, classification: &str, table: &str) -> Note {
    let body = r.json();
    let hook = body["hook_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no hook_id in {r}"))
        .to_string();
    assert_eq!(r.path, format!("/hooks/{hook}"), "hook_id vs url: {r}");
    assert_eq!(body["event"], format!("on_{hook}"), "{r}");
    assert_eq!(body["table"], table, "{r}");
    assert_eq!(body["op"], "transition", "{r}");
    assert_eq!(body["classification"], classification, "{r}");
    assert!(
        body["committed_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "committed_at: {r}"
    );
    let lsn = parse_lsn(
        body["lsn"]
            .as_str()
            .unwrap_or_else(|| panic!("no lsn in {r}")),
    );
    let from = transition_side(r, &body, "from");
    let to = transition_side(r, &body, "to");
    assert_ne!(from, to, "a transition from a value to itself: {r}");
    let rows: Vec<i64> = body["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows array in {r}"))
        .iter()
        .map(|v| {
            v.as_i64()
                .unwrap_or_else(|| panic!("row {v} is not a JSON integer in {r}"))
        })
        .collect();
    assert!(!rows.is_empty(), "a notification without rows: {r}");
    let distinct: BTreeSet<i64> = rows.iter().copied().collect();
    assert_eq!(distinct.len(), rows.len(), "a row listed twice: {r}");
    Note {
        webhook_id,
        hook,
        from,
        to,
        rows,
        lsn,
    }
}

/// An expected notification in a step: (webhook id, from, to, rows in any order).
type Expect<'a> = (&'a str, Val, Val, &'a [i64]);

/// Step-by-step checking: notifications are compared per step, by webhook-id, so a replayed
/// notification (same id) never counts again.
struct Steps<'a> {
    s: &'a Scenario,
    classification: &'a str,
    table: &'a str,
    seen: BTreeSet<String>,
    /// Only these webhooks' notifications (all when empty).
    hooks: &'a [&'a str],
}

impl<'a> Steps<'a> {
    fn new(s: &'a Scenario, classification: &'a str, table: &'a str) -> Steps<'a> {
        Steps {
            s,
            classification,
            table,
            seen: BTreeSet::new(),
            hooks: &[],
        }
    }

    /// Steps that look only at `hooks`' notifications (when several classifications run).
    fn of_hooks(mut self, hooks: &'a [&'a str]) -> Steps<'a> {
        self.hooks = hooks;
        self
    }

    /// Notifications with a webhook-id no earlier step saw.
    fn fresh(&self) -> Vec<Note> {
        let requests: Vec<Recorded> = self
            .s
            .receiver
            .requests()
            .into_iter()
            .filter(|r| {
                self.hooks.is_empty() || self.hooks.iter().any(|h| r.path == format!("/hooks/{h}"))
            })
            .collect();
        notes(&requests, self.classification, self.table)
            .into_iter()
            .filter(|n| !self.seen.contains(&n.webhook_id))
            .collect()
    }

    /// Runs `sql` (one transaction unless it says BEGIN/COMMIT itself for several statements)
    /// and expects exactly `expected`.
    async fn run(&mut self, sql: &str, expected: &[Expect<'_>]) {
        self.s.pg.exec(sql).await;
        self.expect(sql, expected).await;
    }

    /// Waits for as many new notifications as `expected` lists (up to `WAIT`), then `QUIET`
    /// for stray ones, and compares.
    async fn expect(&mut self, what: &str, expected: &[Expect<'_>]) {
        let mut want: Vec<String> = expected
            .iter()
            .map(|(hook, from, to, rows)| label(hook, *from, *to, rows))
            .collect();
        want.sort();
        let deadline = Instant::now() + WAIT;
        while self.fresh().len() < want.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(QUIET).await;
        let fresh = self.fresh();
        let mut got: Vec<String> = fresh.iter().map(Note::label).collect();
        got.sort();
        assert_eq!(
            got, want,
            "notifications after this step (left: received, right: expected):\n{what}"
        );
        self.seen.extend(fresh.into_iter().map(|n| n.webhook_id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_fire_on_insert_update_delete() {
    let mut became = hook("became_active", "customer_active", Side::False, Side::True);
    // The first attempt gets 500; the retry comes a second later with the same webhook-id.
    became.extra = "retry = [\"1s\"]";
    let hooks = [
        hook("all", "customer_active", Side::Any, Side::Any),
        became,
        hook("gone", "customer_active", Side::Any, Side::Null),
        hook("joined", "customer_active", Side::Null, Side::True),
    ];
    let s = Scenario::new(CUSTOMERS, &config(&hooks)).await;
    s.receiver
        .set_plan("/hooks/became_active", Plan::fail_first(1, 500));
    let dir = classification_dir(&s, &[("customer_active", CUSTOMER_ACTIVE)]);
    let _walhook = start(&s, &dir).await;
    let mut st = Steps::new(&s, "customer_active", "public.customers");

    // Inserts: null → true, null → false (two rows in one notification).
    st.run(
        "INSERT INTO customers VALUES (1, 'active', NULL), (2, 'trial', NULL), (3, 'active', now())",
        &[
            ("all", N, T, &[1]),
            ("all", N, F, &[2, 3]),
            ("joined", N, T, &[1]),
        ],
    )
    .await;
    st.run(
        "UPDATE customers SET status = 'active' WHERE id = 2",
        &[("all", F, T, &[2]), ("became_active", F, T, &[2])],
    )
    .await;
    st.run(
        "UPDATE customers SET deleted_at = now() WHERE id = 1",
        &[("all", T, F, &[1])],
    )
    .await;
    // Updates that leave the value as it was: false → false, true → true.
    st.run("UPDATE customers SET status = 'churned' WHERE id = 1", &[])
        .await;
    st.run("UPDATE customers SET status = 'active' WHERE id = 2", &[])
        .await;
    // One statement, two rows, two different outcomes (1 stays false: churned).
    st.run(
        "UPDATE customers SET deleted_at = NULL WHERE id IN (1, 3)",
        &[("all", F, T, &[3]), ("became_active", F, T, &[3])],
    )
    .await;
    // A NULL status makes the WHERE NULL: the row exists and is not in it.
    st.run(
        "UPDATE customers SET status = NULL WHERE id IN (2, 3)",
        &[("all", T, F, &[2, 3])],
    )
    .await;
    st.run(
        "DELETE FROM customers WHERE id IN (1, 2)",
        &[("all", F, N, &[1, 2]), ("gone", F, N, &[1, 2])],
    )
    .await;
    st.run(
        "UPDATE customers SET status = 'active' WHERE id = 3",
        &[("all", F, T, &[3]), ("became_active", F, T, &[3])],
    )
    .await;
    st.run(
        "DELETE FROM customers WHERE id = 3",
        &[("all", T, N, &[3]), ("gone", T, N, &[3])],
    )
    .await;
    st.run(
        "INSERT INTO customers VALUES (4, 'active', NULL), (5, 'active', NULL), (6, 'trial', NULL)",
        &[
            ("all", N, T, &[4, 5]),
            ("all", N, F, &[6]),
            ("joined", N, T, &[4, 5]),
        ],
    )
    .await;
    // Three different transitions in one transaction: one notification each per webhook.
    st.run(
        "BEGIN;
         UPDATE customers SET status = 'trial' WHERE id = 4;
         UPDATE customers SET status = 'active' WHERE id = 6;
         DELETE FROM customers WHERE id = 5;
         COMMIT;",
        &[
            ("all", T, F, &[4]),
            ("all", F, T, &[6]),
            ("all", T, N, &[5]),
            ("became_active", F, T, &[6]),
            ("gone", T, N, &[5]),
        ],
    )
    .await;

    // Every notification was eventually answered 200; the one that first got 500 was retried
    // under the same webhook-id (and `notes` checked: with the same body).
    let answered = |requests: &[Recorded]| {
        let mut ok: BTreeMap<&str, bool> = BTreeMap::new();
        for r in requests {
            let e = ok
                .entry(r.header("webhook-id").unwrap_or(""))
                .or_insert(false);
            *e |= r.status == Some(200);
        }
        ok.values().all(|v| *v)
    };
    let requests = s.receiver.wait_for(answered, WAIT).await;
    let became: Vec<&Recorded> = requests
        .iter()
        .filter(|r| r.path == "/hooks/became_active")
        .collect();
    assert_eq!(became[0].status, Some(500), "{}", became[0]);
    let first_id = became[0].header("webhook-id");
    assert!(
        became
            .iter()
            .any(|r| r.header("webhook-id") == first_id && r.status == Some(200)),
        "the failed notification was not retried under its webhook-id {first_id:?}"
    );
    notes(&requests, "customer_active", "public.customers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_per_transaction() {
    let hooks = [hook("all", "customer_active", Side::Any, Side::Any)];
    let s = Scenario::new(CUSTOMERS, &config(&hooks)).await;
    let dir = classification_dir(&s, &[("customer_active", CUSTOMER_ACTIVE)]);
    let _walhook = start(&s, &dir).await;
    let mut st = Steps::new(&s, "customer_active", "public.customers");

    st.run(
        "INSERT INTO customers VALUES (1, 'active', NULL), (2, 'trial', NULL)",
        &[("all", N, T, &[1]), ("all", N, F, &[2])],
    )
    .await;
    // 1 flips and flips back: nothing. 2 flips once, in the same transaction: proof that the
    // transaction was seen.
    st.run(
        "BEGIN;
         UPDATE customers SET status = 'trial' WHERE id = 1;
         UPDATE customers SET status = 'active' WHERE id = 1;
         UPDATE customers SET status = 'active' WHERE id = 2;
         COMMIT;",
        &[("all", F, T, &[2])],
    )
    .await;
    // Insert + update: only null → final. Insert + delete: null → null, nothing. Delete +
    // reinsert the same: true → true, nothing. Delete + reinsert different: true → false.
    st.run(
        "BEGIN;
         INSERT INTO customers VALUES (3, 'trial', NULL);
         UPDATE customers SET status = 'active' WHERE id = 3;
         INSERT INTO customers VALUES (4, 'active', NULL);
         DELETE FROM customers WHERE id = 4;
         DELETE FROM customers WHERE id = 2;
         INSERT INTO customers VALUES (2, 'active', NULL);
         DELETE FROM customers WHERE id = 1;
         INSERT INTO customers VALUES (1, 'trial', NULL);
         COMMIT;",
        &[("all", N, T, &[3]), ("all", T, F, &[1])],
    )
    .await;
    // Now 1 false, 2 true, 3 true. Everyone out, some back, 1 flipping three times:
    // 1 false → true, 2 true → true (nothing), 3 true → false.
    st.run(
        "BEGIN;
         UPDATE customers SET deleted_at = now();
         UPDATE customers SET deleted_at = NULL WHERE id IN (1, 2);
         UPDATE customers SET status = 'active' WHERE id = 1;
         UPDATE customers SET status = 'trial' WHERE id = 1;
         UPDATE customers SET status = 'active' WHERE id = 1;
         COMMIT;",
        &[("all", F, T, &[1]), ("all", T, F, &[3])],
    )
    .await;
    // A key moved away and back: 2 stays true, 10 never exists. 5 is the proof.
    st.run(
        "BEGIN;
         UPDATE customers SET id = 10 WHERE id = 2;
         UPDATE customers SET id = 2 WHERE id = 10;
         INSERT INTO customers VALUES (5, 'active', NULL);
         COMMIT;",
        &[("all", N, T, &[5])],
    )
    .await;
    // Every row toggled twice by whole-table statements: nothing; then 6 is inserted.
    st.run(
        "BEGIN;
         UPDATE customers SET status = CASE WHEN status = 'active' THEN 'trial' ELSE 'active' END;
         UPDATE customers SET status = CASE WHEN status = 'active' THEN 'trial' ELSE 'active' END;
         INSERT INTO customers VALUES (6, 'trial', NULL);
         COMMIT;",
        &[("all", N, F, &[6])],
    )
    .await;
    st.run("DELETE FROM customers WHERE id = 6", &[("all", F, N, &[6])])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_is_silent() {
    let hooks = [hook("all", "customer_active", Side::Any, Side::Any)];
    // Before walhook first runs: 1 true, 2 false, 3 false (deleted), 4 true.
    let setup = format!(
        "{CUSTOMERS}
         INSERT INTO customers VALUES (1, 'active', NULL), (2, 'trial', NULL),
                                      (3, 'active', now()), (4, 'active', NULL);"
    );
    let s = Scenario::new(&setup, &config(&hooks)).await;
    let dir = classification_dir(&s, &[("customer_active", CUSTOMER_ACTIVE)]);
    let mut walhook = start(&s, &dir).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let early = s.receiver.requests();
    assert!(
        early.is_empty(),
        "the baseline fired {} notification(s):\n{}",
        early.len(),
        crate::support::receiver::dump(&early)
    );
    let mut st = Steps::new(&s, "customer_active", "public.customers");

    // false → false: nothing. The next steps compare with the true prior values.
    st.run("UPDATE customers SET status = 'churned' WHERE id = 2", &[])
        .await;
    st.run(
        "UPDATE customers SET deleted_at = now() WHERE id = 1",
        &[("all", T, F, &[1])],
    )
    .await;
    st.run(
        "UPDATE customers SET status = 'active' WHERE id = 2",
        &[("all", F, T, &[2])],
    )
    .await;
    st.run(
        "DELETE FROM customers WHERE id IN (3, 4)",
        &[("all", F, N, &[3]), ("all", T, N, &[4])],
    )
    .await;

    // Changes made while walhook is stopped are transitions when it comes back, not a new
    // baseline; and coming back fires nothing else.
    walhook.sigterm();
    let status = walhook.wait_exit(WAIT).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "walhook did not exit 0 on SIGTERM: {status:?}"
    );
    s.pg.exec("UPDATE customers SET deleted_at = NULL WHERE id = 1")
        .await;
    s.pg.exec("INSERT INTO customers VALUES (5, 'trial', NULL)")
        .await;
    walhook.restart();
    walhook.wait_log_count(STREAMING, 2).await;
    st.expect(
        "while stopped: 1 undeleted, 5 inserted",
        &[("all", F, T, &[1]), ("all", N, F, &[5])],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    st.expect("nothing more after the restart", &[]).await;
}

/// A data dir written by a walhook that kept one state entry per classification and row
/// (`b's'` + classification + NUL + row → Record): converted at start, keeping every
/// value, so a change made while walhook was stopped is still a transition afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_of_an_earlier_layout_is_converted() {
    use walhook::state::{row_key, Known, Record};
    let hooks = [hook("all", "customer_active", Side::Any, Side::Any)];
    let setup = format!(
        "{CUSTOMERS}
         INSERT INTO customers VALUES (1, 'active', NULL), (2, 'trial', NULL);"
    );
    let s = Scenario::new(&setup, &config(&hooks)).await;
    let dir = classification_dir(&s, &[("customer_active", CUSTOMER_ACTIVE)]);
    let mut walhook = start(&s, &dir).await;
    walhook.sigterm();
    let status = walhook.wait_exit(WAIT).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    s.pg.exec("UPDATE customers SET status = 'active' WHERE id = 2")
        .await;
    {
        // The baseline's state, as the first layout kept it.
        let log = walhook::log::Log::open(&s.data_dir()).expect("open the data dir's log");
        let legacy = |row: &str, value: Known, status: &str| {
            let mut key = b"scustomer_active\0".to_vec();
            key.extend_from_slice(row.as_bytes());
            let record = Record {
                value,
                lsn: 0,
                columns: vec![
                    ("status".to_string(), Some(status.to_string())),
                    ("deleted_at".to_string(), None),
                ],
            };
            (key, Some(record.encode()))
        };
        log.append_with_state(
            &[],
            &[
                (row_key("public.customers", "1"), None),
                (row_key("public.customers", "2"), None),
                legacy("1", Known::True, "active"),
                legacy("2", Known::False, "trial"),
            ],
            None,
            0,
        )
        .expect("write the first layout");
        log.flush().await.expect("flush");
    }
    walhook.restart();
    walhook.wait_log_count(STREAMING, 2).await;
    assert!(
        walhook.log().contains("converted the row state"),
        "no word of the conversion:\n{}",
        walhook.log()
    );
    let mut st = Steps::new(&s, "customer_active", "public.customers");
    st.expect(
        "the change made while stopped, against the converted value",
        &[("all", F, T, &[2])],
    )
    .await;
    st.run(
        "UPDATE customers SET status = 'churned' WHERE id IN (1, 2)",
        &[("all", T, F, &[1, 2])],
    )
    .await;
}

const CUSTOMERS_AND_CONTRACTS: &str = "
CREATE TABLE customers (id bigint PRIMARY KEY, status text);
CREATE TABLE contracts (id bigint PRIMARY KEY, customer_id bigint REFERENCES customers,
                        signed boolean NOT NULL DEFAULT false);
";

/// A customer with a signed contract: reads contracts, tied to customers by
/// contracts_customer_id_fkey (contracts point to the customer).
const CUSTOMER_CONTRACTED: &str = "\
SELECT id FROM public.customers c
WHERE EXISTS (SELECT 1 FROM contracts k WHERE k.customer_id = c.id AND k.signed)
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_child_rows_flip_the_parent() {
    let hooks = [hook("all", "customer_contracted", Side::Any, Side::Any)];
    // Before the first start: customer 3 holds signed contract 30 (a pointer only the
    // baseline knows, since contracts has the default replica identity).
    let setup = format!(
        "{CUSTOMERS_AND_CONTRACTS}
         INSERT INTO customers VALUES (1, 'a'), (2, 'b'), (3, 'c');
         INSERT INTO contracts VALUES (30, 3, true);"
    );
    let s = Scenario::new(&setup, &config(&hooks)).await;
    let dir = classification_dir(&s, &[("customer_contracted", CUSTOMER_CONTRACTED)]);
    let _walhook = start(&s, &dir).await;
    let mut st = Steps::new(&s, "customer_contracted", "public.customers");
    st.run(
        "INSERT INTO contracts VALUES (10, 1, true)",
        &[("all", F, T, &[1])],
    )
    .await;
    // Re-pointing: the old customer (from the state store) and the new one.
    st.run(
        "UPDATE contracts SET customer_id = 2 WHERE id = 10",
        &[("all", T, F, &[1]), ("all", F, T, &[2])],
    )
    .await;
    st.run(
        "UPDATE contracts SET customer_id = 1 WHERE id = 30",
        &[("all", T, F, &[3]), ("all", F, T, &[1])],
    )
    .await;
    st.run(
        "UPDATE contracts SET signed = false WHERE id = 10",
        &[("all", T, F, &[2])],
    )
    .await;
    // An unsigned contract changing hands changes nothing.
    st.run("UPDATE contracts SET customer_id = 3 WHERE id = 10", &[])
        .await;
    st.run(
        "DELETE FROM contracts WHERE id = 30",
        &[("all", T, F, &[1])],
    )
    .await;
    // The customer's own change and a contract change in one transaction: one transition.
    st.run(
        "BEGIN; UPDATE customers SET status = 'x' WHERE id = 3;
         UPDATE contracts SET signed = true WHERE id = 10; COMMIT;",
        &[("all", F, T, &[3])],
    )
    .await;
}

/// A transaction the walsender decodes before other sessions can see it (its commit waits
/// for a synchronous standby that never comes) is evaluated only once it is visible: the
/// condition reads contracts, and an evaluation that ran at once would not see the new one,
/// leave customer 1 false and never fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_decoded_before_it_is_visible_is_evaluated_once_it_is() {
    let hooks = [hook("all", "customer_contracted", Side::Any, Side::Any)];
    let setup = format!("{CUSTOMERS_AND_CONTRACTS} INSERT INTO customers VALUES (1, 'a');");
    let s = Scenario::new(&setup, &config(&hooks)).await;
    let dir = classification_dir(&s, &[("customer_contracted", CUSTOMER_CONTRACTED)]);
    let _walhook = start(&s, &dir).await;
    let mut st = Steps::new(&s, "customer_contracted", "public.customers");

    s.pg.exec("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        .await;
    s.pg.exec("SELECT pg_reload_conf()").await;
    // A connection started once the server has reloaded its settings.
    let deadline = Instant::now() + WAIT;
    let holder = loop {
        let client = s.pg.client().await;
        let names: String = client
            .query_one("SHOW synchronous_standby_names", &[])
            .await
            .expect("SHOW")
            .get(0);
        if names == "nobody" {
            break client;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not reload its settings"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let held = tokio::spawn(async move {
        holder
            .batch_execute("INSERT INTO contracts VALUES (10, 1, true)")
            .await
    });

    // The commit is flushed locally and then waits; the walsender sends it meanwhile.
    let watcher = s.pg.client().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let sent: bool = watcher
            .query_one(
                "SELECT count(*) > 0 AND bool_and(r.sent_lsn >= f.lsn)
                   FROM pg_stat_replication r, (SELECT pg_current_wal_flush_lsn() AS lsn) f
                  WHERE r.application_name = 'walhook'",
                &[],
            )
            .await
            .expect("pg_stat_replication")
            .get(0);
        if sent {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the walsender did not send the held transaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let walhook evaluate it if it were going to, while it is still invisible.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !held.is_finished(),
        "the insert committed without waiting: the test did not hold it"
    );
    assert!(
        st.fresh().is_empty(),
        "a notification arrived while the transaction was invisible"
    );

    s.pg.exec("ALTER SYSTEM RESET synchronous_standby_names")
        .await;
    s.pg.exec("SELECT pg_reload_conf()").await;
    held.await
        .expect("the held insert's task")
        .expect("the held insert");
    st.expect(
        "the insert held before it was visible",
        &[("all", F, T, &[1])],
    )
    .await;
}

/// A contract whose customer is active: reads customers, which contracts point to.
const CONTRACT_OF_ACTIVE: &str = "\
SELECT id FROM public.contracts k
WHERE EXISTS (SELECT 1 FROM customers c WHERE c.id = k.customer_id AND c.status = 'active')
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_parent_row_flips_its_children() {
    let hooks = [hook("all", "contract_of_active", Side::Any, Side::Any)];
    let setup = format!(
        "{CUSTOMERS_AND_CONTRACTS}
         INSERT INTO customers VALUES (1, 'active'), (2, 'trial');
         INSERT INTO contracts VALUES (10, 1), (11, 1), (20, 2);"
    );
    let s = Scenario::new(&setup, &config(&hooks)).await;
    let dir = classification_dir(&s, &[("contract_of_active", CONTRACT_OF_ACTIVE)]);
    let _walhook = start(&s, &dir).await;
    let mut st = Steps::new(&s, "contract_of_active", "public.contracts");
    st.run(
        "UPDATE customers SET status = 'churned' WHERE id = 1",
        &[("all", T, F, &[10, 11])],
    )
    .await;
    st.run(
        "UPDATE customers SET status = 'active' WHERE id = 2",
        &[("all", F, T, &[20])],
    )
    .await;
    // The contract's own change: evaluated on its image as usual.
    st.run(
        "UPDATE contracts SET customer_id = 2 WHERE id = 10",
        &[("all", F, T, &[10])],
    )
    .await;
    st.run(
        "INSERT INTO customers VALUES (3, 'active'); INSERT INTO contracts VALUES (30, 3);",
        &[("all", N, T, &[30])],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recheck_catches_time_passing() {
    let hooks = [hook("due", "invoice_overdue", Side::False, Side::True)];
    let setup = "CREATE TABLE invoices (id bigint PRIMARY KEY, due_at timestamptz NOT NULL);";
    let s = Scenario::new(setup, &config(&hooks)).await;
    let overdue = "-- recheck: 1s\nSELECT id FROM public.invoices WHERE due_at < now()\n";
    let dir = classification_dir(&s, &[("invoice_overdue", overdue)]);
    let _walhook = start(&s, &dir).await;
    let mut st = Steps::new(&s, "invoice_overdue", "public.invoices");
    // Not overdue yet (null → false: not subscribed); three seconds later it is, with no
    // change to the row.
    s.pg.exec(
        "INSERT INTO invoices VALUES (1, now() + interval '3 seconds'), (2, now() + interval '1 hour')",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    st.expect("before the due time", &[]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    st.expect("after the due time", &[("due", F, T, &[1])])
        .await;
    let recheck = s
        .receiver
        .requests()
        .iter()
        .map(|r| r.json())
        .find(|b| b["rows"] == serde_json::json!([1]))
        .expect("the recheck notification");
    assert_eq!(recheck["recheck"], true, "{recheck}");
    // Later rechecks find nothing new.
    tokio::time::sleep(Duration::from_secs(2)).await;
    st.expect("two more rechecks", &[]).await;
    // A row change after the recheck compares with the rechecked value.
    st.run(
        "UPDATE invoices SET due_at = now() + interval '1 day' WHERE id = 1",
        &[],
    )
    .await;
    st.run(
        "UPDATE invoices SET due_at = now() - interval '1 day' WHERE id = 1",
        &[("due", F, T, &[1])],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_condition_does_not_wedge_the_stream() {
    let hooks = [hook("all", "ratio_high", Side::Any, Side::Any)];
    let setup = "CREATE TABLE ratios (id bigint PRIMARY KEY, num int NOT NULL, den int NOT NULL);";
    let s = Scenario::new(setup, &config(&hooks)).await;
    let ratio_high = "SELECT id FROM public.ratios WHERE num / den > 1\n";
    let dir = classification_dir(&s, &[("ratio_high", ratio_high)]);
    let walhook = start(&s, &dir).await;
    let mut st = Steps::new(&s, "ratio_high", "public.ratios");
    // Row 2 divides by zero: reported, and the other rows of the transaction go through.
    st.run(
        "INSERT INTO ratios VALUES (1, 10, 2), (2, 10, 0), (3, 1, 5)",
        &[("all", N, T, &[1]), ("all", N, F, &[3])],
    )
    .await;
    let log = walhook.log();
    let line = log
        .lines()
        .find(|l| l.contains("condition fails for this row"))
        .unwrap_or_else(|| panic!("no error line for row 2:\n{log}"));
    assert!(
        line.contains("ratio_high") && line.contains("row=2") && line.contains("division by zero"),
        "{line}"
    );
    // Once it evaluates, row 2 goes from its last known value (it did not exist).
    st.run(
        "UPDATE ratios SET den = 1 WHERE id = 2",
        &[("all", N, T, &[2])],
    )
    .await;
    // A failure keeps the last known value: true, then false.
    st.run("UPDATE ratios SET den = 0 WHERE id = 1", &[]).await;
    st.run(
        "UPDATE ratios SET den = 20 WHERE id = 1",
        &[("all", T, F, &[1])],
    )
    .await;
    st.run("DELETE FROM ratios WHERE id = 3", &[("all", F, N, &[3])])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_classification_is_baselined_again_silently() {
    let hooks = [hook("all", "customer_active", Side::Any, Side::Any)];
    let setup = format!(
        "{CUSTOMERS}
         INSERT INTO customers VALUES (1, 'active', NULL), (2, 'trial', NULL), (3, 'new', NULL);"
    );
    let s = Scenario::new(&setup, &config(&hooks)).await;
    let dir = classification_dir(&s, &[("customer_active", CUSTOMER_ACTIVE)]);
    let mut walhook = start(&s, &dir).await;
    let mut st = Steps::new(&s, "customer_active", "public.customers");
    st.run(
        "UPDATE customers SET status = 'active' WHERE id = 3",
        &[("all", F, T, &[3])],
    )
    .await;
    walhook.sigterm();
    assert!(walhook.wait_exit(WAIT).await.is_some_and(|s| s.success()));
    // Trial customers count as active from now on: row 2 is true under the new SQL, but
    // that is the new baseline, not an event.
    classification_dir(
        &s,
        &[(
            "customer_active",
            "SELECT id FROM public.customers WHERE status IN ('active', 'trial') AND deleted_at IS NULL\n",
        )],
    );
    walhook.restart();
    walhook.wait_log_count(STREAMING, 2).await;
    assert!(
        walhook.log().matches("baseline done").count() >= 2,
        "no second baseline:\n{}",
        walhook.log()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    st.expect("after the new baseline", &[]).await;
    st.run(
        "UPDATE customers SET status = 'churned' WHERE id = 2",
        &[("all", T, F, &[2])],
    )
    .await;
    st.run("UPDATE customers SET status = 'trial' WHERE id = 1", &[])
        .await;
}

/// A row inserted while walhook was stopped, before a classification is added: the new
/// classification's baseline (at a later snapshot) holds the row, and the stream, replaying
/// the insert for the classification that was there, must keep that record rather than
/// take the inserted row for one with no state at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_inserted_before_a_later_baseline_keeps_the_new_baselines_record() {
    let first = [hook("all", "customer_active", Side::Any, Side::Any)];
    let setup = format!("{CUSTOMERS} INSERT INTO customers VALUES (1, 'active', NULL);");
    let s = Scenario::new(&setup, &config(&first)).await;
    let dir = classification_dir(&s, &[("customer_active", CUSTOMER_ACTIVE)]);
    let mut walhook = start(&s, &dir).await;
    let mut all = Steps::new(&s, "customer_active", "public.customers").of_hooks(&["all"]);
    let mut live = Steps::new(&s, "customer_live", "public.customers").of_hooks(&["live"]);
    all.run(
        "UPDATE customers SET status = 'trial' WHERE id = 1",
        &[("all", T, F, &[1])],
    )
    .await;
    walhook.sigterm();
    assert!(walhook.wait_exit(WAIT).await.is_some_and(|s| s.success()));

    s.pg.exec("INSERT INTO customers VALUES (4, 'active', NULL)")
        .await;
    classification_dir(&s, &[("customer_live", CUSTOMER_ACTIVE)]);
    s.rewrite_config(&config(&[
        hook("all", "customer_active", Side::Any, Side::Any),
        hook("live", "customer_live", Side::Any, Side::Any),
    ]));
    walhook.restart();
    walhook.wait_log_count(STREAMING, 2).await;
    // The insert is streamed again for customer_active only; customer_live baselined it.
    all.expect("after the restart", &[("all", N, T, &[4])])
        .await;
    live.expect("after the restart", &[]).await;
    s.pg.exec("UPDATE customers SET status = 'churned' WHERE id = 4")
        .await;
    all.expect("row 4 churned", &[("all", T, F, &[4])]).await;
    live.expect("row 4 churned", &[("live", T, F, &[4])]).await;
}

/// The rows of every transition (from, to) of `hook` among the notifications with an id not
/// in `seen`, once `total` rows arrived (or `WAIT` passed); checks `max_rows` on the way.
async fn rows_by_transition(
    s: &Scenario,
    seen: &mut BTreeSet<String>,
    total: usize,
    max_rows: usize,
) -> BTreeMap<(&'static str, &'static str), BTreeSet<i64>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let fresh: Vec<Note> = notes(&s.receiver.requests(), "even", "public.items")
            .into_iter()
            .filter(|n| !seen.contains(&n.webhook_id))
            .collect();
        let count: usize = fresh.iter().map(|n| n.rows.len()).sum();
        if count >= total || Instant::now() >= deadline {
            tokio::time::sleep(QUIET).await;
            let mut out: BTreeMap<(&str, &str), BTreeSet<i64>> = BTreeMap::new();
            for n in notes(&s.receiver.requests(), "even", "public.items") {
                if !seen.insert(n.webhook_id.clone()) {
                    continue;
                }
                assert!(n.rows.len() <= max_rows, "{} rows > max_rows", n.rows.len());
                let rows = out.entry((show(n.from), show(n.to))).or_default();
                for row in n.rows {
                    assert!(rows.insert(row), "row {row} listed twice");
                }
            }
            return out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_transaction_streams_through_the_data_dir() {
    let hooks = [Hook {
        extra: "max_rows = 5000",
        ..hook("all", "even", Side::Any, Side::Any)
    }];
    let setup = "CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL);";
    let s = Scenario::new(setup, &config(&hooks)).await;
    let dir = classification_dir(
        &s,
        &[("even", "SELECT id FROM public.items WHERE n % 2 = 0\n")],
    );
    let mut walhook = start(&s, &dir).await;
    let mut seen = BTreeSet::new();
    let set = |range: std::ops::RangeInclusive<i64>, even: bool| -> BTreeSet<i64> {
        range.filter(|i| (i % 2 == 0) == even).collect()
    };

    s.pg.exec("INSERT INTO items SELECT i, i FROM generate_series(1, 30000) i")
        .await;
    let got = rows_by_transition(&s, &mut seen, 30_000, 5000).await;
    let want = BTreeMap::from([
        (("null", "true"), set(1..=30_000, true)),
        (("null", "false"), set(1..=30_000, false)),
    ]);
    assert!(
        got == want,
        "the insert's transitions differ: {:?}",
        summary(&got)
    );
    assert!(
        walhook.log().contains("a large transaction"),
        "the transaction was not spilled:\n{}",
        walhook.log()
    );

    // 5001..20000 change parity; 1..5000 change and change back (net: nothing).
    s.pg.exec(
        "BEGIN; UPDATE items SET n = n + 1 WHERE id <= 20000;
         UPDATE items SET n = n - 1 WHERE id <= 5000; COMMIT;",
    )
    .await;
    let got = rows_by_transition(&s, &mut seen, 15_000, 5000).await;
    let want = BTreeMap::from([
        (("true", "false"), set(5001..=20_000, true)),
        (("false", "true"), set(5001..=20_000, false)),
    ]);
    assert!(
        got == want,
        "the update's transitions differ: {:?}",
        summary(&got)
    );

    // The state is the transaction's: a crash now and a restart change nothing, and the
    // next change compares with it.
    walhook.kill9();
    walhook.restart();
    walhook.wait_log_count(STREAMING, 2).await;
    let mut st = Steps::new(&s, "even", "public.items");
    st.seen = seen;
    st.run(
        "UPDATE items SET n = 0 WHERE id IN (5001, 5002, 25001)",
        &[("all", F, T, &[5002, 25001])],
    )
    .await;
}

/// (from, to) → how many rows, and the first few.
fn summary(got: &BTreeMap<(&str, &str), BTreeSet<i64>>) -> Vec<String> {
    got.iter()
        .map(|((f, t), rows)| {
            format!(
                "{f}->{t}: {} rows, first {:?}",
                rows.len(),
                rows.iter().take(5).collect::<Vec<_>>()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_columns_come_from_the_state_store() {
    // `doc` is stored out of line, uncompressed; the predicate reads it. Default replica
    // identity: an update that leaves `doc` alone carries it as "unchanged" in the WAL.
    let setup = "
        CREATE TABLE docs (id bigint PRIMARY KEY, title text, doc text);
        ALTER TABLE docs ALTER COLUMN doc SET STORAGE EXTERNAL;";
    let big_doc = "\
-- A document that is long and not a draft.
SELECT id FROM public.docs WHERE length(doc) > 5000 AND title <> 'draft'
";
    let hooks = [hook("all", "big_doc", Side::Any, Side::Any)];
    let s = Scenario::new(setup, &config(&hooks)).await;
    // Shows what the WAL carries (a separate statement: a slot cannot be created in a
    // transaction that has written).
    s.pg.exec("SELECT pg_create_logical_replication_slot('witness', 'test_decoding')")
        .await;
    let dir = classification_dir(&s, &[("big_doc", big_doc)]);
    let mut walhook = start(&s, &dir).await;
    let mut st = Steps::new(&s, "big_doc", "public.docs");

    st.run(
        &format!(
            "INSERT INTO docs VALUES (1, 'a', {BIG_TEXT}), (2, 'a', 'short'), (3, 'draft', {BIG_TEXT})"
        ),
        &[("all", N, T, &[1]), ("all", N, F, &[2, 3])],
    )
    .await;
    assert!(
        s.toast_chunks("docs").await > 0,
        "precondition: docs.doc is stored out of line"
    );
    // 1 stays true (its doc, unchanged, is still long); 3 becomes true only if its unchanged
    // doc is known to be long.
    st.run(
        "BEGIN;
         UPDATE docs SET title = 'b' WHERE id = 1;
         UPDATE docs SET title = 'final' WHERE id = 3;
         COMMIT;",
        &[("all", F, T, &[3])],
    )
    .await;
    let unchanged = witness_unchanged_toast(&s).await;
    assert!(
        unchanged >= 2,
        "precondition: the title updates carry doc as an unchanged TOAST datum in the WAL \
         (found {unchanged})"
    );

    // The values must survive a crash: they live in the state store, not in memory.
    walhook.kill9();
    walhook.restart();
    walhook.wait_log_count(STREAMING, 2).await;
    st.run(
        &format!(
            "BEGIN;
             UPDATE docs SET title = 'c' WHERE id = 1;
             INSERT INTO docs VALUES (4, 'a', {BIG_TEXT});
             COMMIT;"
        ),
        &[("all", N, T, &[4])],
    )
    .await;
    st.run(
        "BEGIN;
         UPDATE docs SET title = 'draft' WHERE id = 1;
         UPDATE docs SET title = 'again' WHERE id = 3;
         COMMIT;",
        &[("all", T, F, &[1])],
    )
    .await;
    st.run(
        "UPDATE docs SET title = 'z' WHERE id = 1",
        &[("all", F, T, &[1])],
    )
    .await;
    // The big column itself changes: now the value changes for real (4 stays long).
    st.run(
        "BEGIN;
         UPDATE docs SET doc = 'tiny' WHERE id = 3;
         UPDATE docs SET doc = doc || 'x' WHERE id = 4;
         COMMIT;",
        &[("all", T, F, &[3])],
    )
    .await;
    st.run(
        &format!("UPDATE docs SET doc = {BIG_TEXT} WHERE id = 2"),
        &[("all", F, T, &[2])],
    )
    .await;
}

/// How many changes on the `witness` slot (test_decoding) carry an unchanged TOAST datum.
async fn witness_unchanged_toast(s: &Scenario) -> usize {
    let client = s.pg.client().await;
    client
        .query(
            "SELECT data FROM pg_logical_slot_peek_changes('witness', NULL, NULL)",
            &[],
        )
        .await
        .expect("peek the witness slot")
        .iter()
        .filter(|row| row.get::<_, String>(0).contains("unchanged-toast-datum"))
        .count()
}

// ---------------------------------------------------------------------------------------------
// Differential tests: a random workload, ground truth from PostgreSQL.

/// Row ids the workload uses: 1..=ROWS.
const ROWS: i64 = 40;
/// Transactions per workload.
const TXNS: usize = 150;

/// The generator's model of a row, only to write valid statements (no duplicate keys); the
/// ground truth is PostgreSQL's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    status: Option<&'static str>,
    deleted: bool,
}

/// "active" twice: members should be common.
const STATUSES: [Option<&str>; 5] = [
    Some("active"),
    Some("active"),
    Some("trial"),
    Some("churned"),
    None,
];

fn random_row(rng: &mut fastrand::Rng) -> Row {
    Row {
        status: STATUSES[rng.usize(..STATUSES.len())],
        deleted: rng.u8(..4) == 0,
    }
}

fn status_sql(status: Option<&str>) -> String {
    status.map_or_else(|| "NULL".to_string(), |s| format!("'{s}'"))
}

fn deleted_sql(deleted: bool) -> &'static str {
    if deleted {
        "now()"
    } else {
        "NULL"
    }
}

fn row_sql(id: i64, row: Row) -> String {
    format!(
        "({id}, {}, {})",
        status_sql(row.status),
        deleted_sql(row.deleted)
    )
}

fn set_row_sql(id: i64, row: Row) -> String {
    format!(
        "UPDATE customers SET status = {}, deleted_at = {} WHERE id = {id};",
        status_sql(row.status),
        deleted_sql(row.deleted)
    )
}

fn pick_present(rng: &mut fastrand::Rng, rows: &BTreeMap<i64, Row>) -> Option<i64> {
    let ids: Vec<i64> = rows.keys().copied().collect();
    (!ids.is_empty()).then(|| ids[rng.usize(..ids.len())])
}

fn pick_absent(rng: &mut fastrand::Rng, rows: &BTreeMap<i64, Row>) -> Option<i64> {
    let ids: Vec<i64> = (1..=ROWS).filter(|id| !rows.contains_key(id)).collect();
    (!ids.is_empty()).then(|| ids[rng.usize(..ids.len())])
}

fn id_list(ids: &[i64]) -> String {
    ids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One random statement (or a short flip-back sequence), applied to the model.
fn statement(rng: &mut fastrand::Rng, rows: &mut BTreeMap<i64, Row>) -> Vec<String> {
    match rng.u8(..12) {
        // Insert one to three rows.
        0 | 1 => {
            let mut values = Vec::new();
            for _ in 0..rng.usize(1..=3) {
                let Some(id) = pick_absent(rng, rows) else {
                    break;
                };
                let row = random_row(rng);
                rows.insert(id, row);
                values.push(row_sql(id, row));
            }
            if values.is_empty() {
                return Vec::new();
            }
            vec![format!(
                "INSERT INTO customers VALUES {};",
                values.join(", ")
            )]
        }
        // The status of one row.
        2 | 3 => {
            let Some(id) = pick_present(rng, rows) else {
                return Vec::new();
            };
            let status = STATUSES[rng.usize(..STATUSES.len())];
            rows.get_mut(&id).expect("present").status = status;
            vec![format!(
                "UPDATE customers SET status = {} WHERE id = {id};",
                status_sql(status)
            )]
        }
        // deleted_at of one row.
        4 => {
            let Some(id) = pick_present(rng, rows) else {
                return Vec::new();
            };
            let deleted = rng.bool();
            rows.get_mut(&id).expect("present").deleted = deleted;
            vec![format!(
                "UPDATE customers SET deleted_at = {} WHERE id = {id};",
                deleted_sql(deleted)
            )]
        }
        // Both columns of one row.
        5 => {
            let Some(id) = pick_present(rng, rows) else {
                return Vec::new();
            };
            let row = random_row(rng);
            rows.insert(id, row);
            vec![set_row_sql(id, row)]
        }
        // The status of a few ids, present or not.
        6 => {
            let ids: Vec<i64> = (0..rng.usize(2..=5)).map(|_| rng.i64(1..=ROWS)).collect();
            let status = STATUSES[rng.usize(..STATUSES.len())];
            for id in &ids {
                if let Some(row) = rows.get_mut(id) {
                    row.status = status;
                }
            }
            vec![format!(
                "UPDATE customers SET status = {} WHERE id IN ({});",
                status_sql(status),
                id_list(&ids)
            )]
        }
        // deleted_at of a range of ids.
        7 => {
            let lo = rng.i64(1..=ROWS);
            let hi = lo + rng.i64(0..8);
            let deleted = rng.bool();
            for (_, row) in rows.range_mut(lo..=hi) {
                row.deleted = deleted;
            }
            vec![format!(
                "UPDATE customers SET deleted_at = {} WHERE id BETWEEN {lo} AND {hi};",
                deleted_sql(deleted)
            )]
        }
        // Delete one or two rows.
        8 => {
            let mut ids = Vec::new();
            for _ in 0..rng.usize(1..=2) {
                if let Some(id) = pick_present(rng, rows) {
                    rows.remove(&id);
                    ids.push(id);
                }
            }
            if ids.is_empty() {
                return Vec::new();
            }
            vec![format!(
                "DELETE FROM customers WHERE id IN ({});",
                id_list(&ids)
            )]
        }
        // Flip and flip back within the transaction.
        9 | 10 => match rng.u8(..3) {
            0 => {
                let Some(id) = pick_present(rng, rows) else {
                    return Vec::new();
                };
                let old = rows[&id];
                let mut other = random_row(rng);
                if other == old {
                    other.deleted = !other.deleted;
                }
                vec![set_row_sql(id, other), set_row_sql(id, old)]
            }
            1 => {
                let Some(id) = pick_present(rng, rows) else {
                    return Vec::new();
                };
                let old = rows[&id];
                vec![
                    format!("DELETE FROM customers WHERE id = {id};"),
                    format!("INSERT INTO customers VALUES {};", row_sql(id, old)),
                ]
            }
            _ => {
                let Some(id) = pick_absent(rng, rows) else {
                    return Vec::new();
                };
                vec![
                    format!(
                        "INSERT INTO customers VALUES {};",
                        row_sql(id, random_row(rng))
                    ),
                    format!("DELETE FROM customers WHERE id = {id};"),
                ]
            }
        },
        // A key change: the old id stops existing, the new one starts.
        _ => {
            let (Some(from), Some(to)) = (pick_present(rng, rows), pick_absent(rng, rows)) else {
                return Vec::new();
            };
            let row = rows.remove(&from).expect("present");
            rows.insert(to, row);
            vec![format!("UPDATE customers SET id = {to} WHERE id = {from};")]
        }
    }
}

struct Workload {
    /// Creates the table and the rows that exist before walhook first runs.
    setup: String,
    /// Each a whole transaction: BEGIN; ...; COMMIT;
    txns: Vec<String>,
}

fn workload(seed: u64) -> Workload {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut rows: BTreeMap<i64, Row> = BTreeMap::new();
    for id in 1..=ROWS {
        if rng.u8(..5) < 2 {
            rows.insert(id, random_row(&mut rng));
        }
    }
    let mut setup = CUSTOMERS.to_string();
    if !rows.is_empty() {
        let values: Vec<String> = rows.iter().map(|(id, row)| row_sql(*id, *row)).collect();
        setup.push_str(&format!(
            "\nINSERT INTO customers VALUES {};",
            values.join(", ")
        ));
    }
    let txns = (0..TXNS)
        .map(|_| {
            let mut stmts = Vec::new();
            for _ in 0..rng.usize(1..=4) {
                stmts.extend(statement(&mut rng, &mut rows));
            }
            format!("BEGIN;\n{}\nCOMMIT;", stmts.join("\n"))
        })
        .collect();
    Workload { setup, txns }
}

/// One row's value changing in one transaction (number `txn` of the workload).
#[derive(Clone, Copy, Debug)]
struct Transition {
    txn: usize,
    row: i64,
    from: Val,
    to: Val,
}

/// Every row that exists, with whether the classification's own query lists it.
async fn row_values(client: &Client) -> BTreeMap<i64, bool> {
    let existing: BTreeSet<i64> = client
        .query("SELECT id FROM customers", &[])
        .await
        .expect("read the rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let members: BTreeSet<i64> = client
        .query(CUSTOMER_ACTIVE, &[])
        .await
        .expect("run the classification")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(members.is_subset(&existing));
    existing
        .into_iter()
        .map(|id| (id, members.contains(&id)))
        .collect()
}

/// Commits `txns` in order on a connection of its own, `pace` apart, and returns the ground
/// truth: per transaction, every row whose value before it differs from the value after it.
async fn run_workload(url: String, txns: Vec<String>, pace: Duration) -> Vec<Transition> {
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .expect("connect for the workload");
    // Drives the connection; ends with the client.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut truth = Vec::new();
    let mut last = row_values(&client).await;
    for (n, sql) in txns.iter().enumerate() {
        let before = row_values(&client).await;
        assert_eq!(
            before, last,
            "someone else changed customers between transactions"
        );
        if let Err(e) = client.batch_execute(sql).await {
            panic!("workload transaction {n} failed: {e:?}\n{sql}");
        }
        let after = row_values(&client).await;
        let ids: BTreeSet<i64> = before.keys().chain(after.keys()).copied().collect();
        for row in ids {
            let (from, to) = (before.get(&row).copied(), after.get(&row).copied());
            if from != to {
                truth.push(Transition {
                    txn: n,
                    row,
                    from,
                    to,
                });
            }
        }
        last = after;
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
    }
    truth
}

/// The ground truth should exercise every concrete transition, or some webhooks prove
/// nothing.
fn assert_truth_covers_every_transition(truth: &[Transition]) {
    let kinds: BTreeSet<(Val, Val)> = truth.iter().map(|t| (t.from, t.to)).collect();
    for from in [T, F, N] {
        for to in [T, F, N] {
            if from != to {
                assert!(
                    kinds.contains(&(from, to)),
                    "the workload never makes {} -> {}; the test would prove little",
                    show(from),
                    show(to)
                );
            }
        }
    }
}

/// Rows per webhook (of the 13) that ground truth predicts.
fn expected_counts(truth: &[Transition]) -> BTreeMap<String, usize> {
    valid_pairs()
        .into_iter()
        .map(|(from, to)| {
            let n = truth
                .iter()
                .filter(|t| from.matches(t.from) && to.matches(t.to))
                .count();
            (pair_id(from, to), n)
        })
        .collect()
}

/// Waits until every webhook received (by distinct webhook-id) at least as many row
/// transitions as ground truth predicts and nothing new arrived for a second, or
/// `SETTLE_TIMEOUT` passed; returns what arrived either way (the comparison explains).
async fn settle_on_truth(s: &Scenario, truth: &[Transition]) -> Vec<Note> {
    let expected = expected_counts(truth);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut seen = usize::MAX;
    let mut stable_since = Instant::now();
    loop {
        let requests = s.receiver.requests();
        if requests.len() != seen {
            seen = requests.len();
            stable_since = Instant::now();
        }
        let notes = notes(&requests, "customer_active", "public.customers");
        let mut got: BTreeMap<&str, usize> = BTreeMap::new();
        for n in &notes {
            *got.entry(n.hook.as_str()).or_insert(0) += n.rows.len();
        }
        let reached = expected
            .iter()
            .all(|(hook, want)| got.get(hook.as_str()).copied().unwrap_or(0) >= *want);
        if reached && stable_since.elapsed() >= Duration::from_secs(1) {
            return notes;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "not settled after {SETTLE_TIMEOUT:?}: expected rows per webhook {expected:?}, got {got:?}"
            );
            return notes;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

type Key = (i64, Val, Val);

fn show_key((row, from, to): &Key) -> String {
    format!("row {row}: {} -> {}", show(*from), show(*to))
}

/// Lists what `want` has and `got` lacks ("missing") and the reverse ("extra").
fn multiset_diff(
    want: &BTreeMap<Key, usize>,
    got: &BTreeMap<Key, usize>,
) -> (Vec<String>, Vec<String>) {
    let mut missing = Vec::new();
    let mut extra = Vec::new();
    let keys: BTreeSet<&Key> = want.keys().chain(got.keys()).collect();
    for k in keys {
        let (w, g) = (
            want.get(k).copied().unwrap_or(0),
            got.get(k).copied().unwrap_or(0),
        );
        if w > g {
            missing.push(format!("{} ×{}", show_key(k), w - g));
        }
        if g > w {
            extra.push(format!("{} ×{}", show_key(k), g - w));
        }
    }
    (missing, extra)
}

/// walhook's notifications (deduplicated by webhook-id) against ground truth:
/// - per webhook, the multiset of (row, actual from, actual to) equals exactly what ground truth
///   predicts for the webhook's (from, to) filter, and every notification matches the filter;
/// - per webhook, one notification per (transaction, from, to);
/// - per row, the sequence of transitions (any→any, ordered by LSN) equals ground truth's;
/// - all of one transaction's notifications, on every webhook, carry one LSN, and LSNs grow
///   with commit order.
fn assert_matches_truth(notes: &[Note], truth: &[Transition]) {
    let mut problems: Vec<String> = Vec::new();
    let known: BTreeSet<String> = valid_pairs()
        .into_iter()
        .map(|(f, t)| pair_id(f, t))
        .collect();
    for n in notes {
        if !known.contains(&n.hook) {
            problems.push(format!("a notification for unknown webhook {}", n.hook));
        }
    }

    for (from, to) in valid_pairs() {
        let hook = pair_id(from, to);
        let mut want: BTreeMap<Key, usize> = BTreeMap::new();
        for t in truth {
            if from.matches(t.from) && to.matches(t.to) {
                *want.entry((t.row, t.from, t.to)).or_insert(0) += 1;
            }
        }
        let mut got: BTreeMap<Key, usize> = BTreeMap::new();
        let mut groups: BTreeSet<(u64, Val, Val)> = BTreeSet::new();
        for n in notes.iter().filter(|n| n.hook == hook) {
            if !(from.matches(n.from) && to.matches(n.to)) {
                problems.push(format!(
                    "webhook {hook} received {} -> {} (rows {:?})",
                    show(n.from),
                    show(n.to),
                    n.rows
                ));
            }
            if !groups.insert((n.lsn, n.from, n.to)) {
                problems.push(format!(
                    "webhook {hook}: two notifications (different webhook-ids) for {} -> {} at lsn {:X}",
                    show(n.from),
                    show(n.to),
                    n.lsn
                ));
            }
            for row in &n.rows {
                *got.entry((*row, n.from, n.to)).or_insert(0) += 1;
            }
        }
        if got != want {
            let (missing, extra) = multiset_diff(&want, &got);
            problems.push(format!(
                "webhook {hook}: {} row transitions expected, {} received\n  missing: {missing:?}\n  extra: {extra:?}",
                want.values().sum::<usize>(),
                got.values().sum::<usize>()
            ));
        }
    }

    // Per row, in order: any→any sees every transition.
    let all = pair_id(Side::Any, Side::Any);
    let mut got_seq: BTreeMap<i64, Vec<(u64, Val, Val)>> = BTreeMap::new();
    for n in notes.iter().filter(|n| n.hook == all) {
        for row in &n.rows {
            got_seq.entry(*row).or_default().push((n.lsn, n.from, n.to));
        }
    }
    for seq in got_seq.values_mut() {
        seq.sort_by_key(|(lsn, _, _)| *lsn);
    }
    let mut want_seq: BTreeMap<i64, Vec<(usize, Val, Val)>> = BTreeMap::new();
    for t in truth {
        want_seq
            .entry(t.row)
            .or_default()
            .push((t.txn, t.from, t.to));
    }
    let rows: BTreeSet<i64> = got_seq.keys().chain(want_seq.keys()).copied().collect();
    let mut txn_lsns: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
    for row in rows {
        let got = got_seq.get(&row).cloned().unwrap_or_default();
        let want = want_seq.get(&row).cloned().unwrap_or_default();
        let got_ft: Vec<String> = got
            .iter()
            .map(|(_, f, t)| format!("{}->{}", show(*f), show(*t)))
            .collect();
        let want_ft: Vec<String> = want
            .iter()
            .map(|(_, f, t)| format!("{}->{}", show(*f), show(*t)))
            .collect();
        if got_ft != want_ft {
            problems.push(format!(
                "row {row}: transitions by lsn {got_ft:?}, ground truth in commit order {want_ft:?}"
            ));
            continue;
        }
        for ((lsn, _, _), (txn, _, _)) in got.iter().zip(&want) {
            txn_lsns.entry(*txn).or_default().insert(*lsn);
        }
    }
    let mut previous: Option<(usize, u64)> = None;
    for (txn, lsns) in &txn_lsns {
        if lsns.len() > 1 {
            problems.push(format!(
                "transaction {txn}: its transitions carry different lsns {lsns:X?}"
            ));
        }
        let lsn = *lsns.iter().next().expect("one lsn at least");
        if let Some((p_txn, p_lsn)) = previous {
            if lsn <= p_lsn {
                problems.push(format!(
                    "transaction {txn} has lsn {lsn:X}, not after transaction {p_txn}'s {p_lsn:X}"
                ));
            }
        }
        previous = Some((*txn, lsn));
    }

    // Every webhook's notification names a (row, lsn) that any→any names the same way.
    let mut by_row_lsn: BTreeMap<(i64, u64), (Val, Val)> = BTreeMap::new();
    for n in notes.iter().filter(|n| n.hook == all) {
        for row in &n.rows {
            by_row_lsn.insert((*row, n.lsn), (n.from, n.to));
        }
    }
    for n in notes.iter().filter(|n| n.hook != all) {
        for row in &n.rows {
            if by_row_lsn.get(&(*row, n.lsn)) != Some(&(n.from, n.to)) {
                problems.push(format!(
                    "webhook {}: row {row} {} -> {} at lsn {:X}, which any_any reports as {:?}",
                    n.hook,
                    show(n.from),
                    show(n.to),
                    n.lsn,
                    by_row_lsn.get(&(*row, n.lsn))
                ));
            }
        }
    }

    assert!(
        problems.is_empty(),
        "{} problem(s) against the ground truth ({} transitions in {} notifications):\n{}",
        problems.len(),
        truth.len(),
        notes.len(),
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_random_workload() {
    let seed = crate::support::seed("TRANSITIONS_SEED");
    eprintln!("workload seed {seed} (TRANSITIONS_SEED={seed} replays it)");
    let w = workload(seed);
    let s = Scenario::new(&w.setup, &config(&all_pair_hooks())).await;
    let dir = classification_dir(&s, &[("customer_active", CUSTOMER_ACTIVE)]);
    let _walhook = start(&s, &dir).await;
    // As fast as it goes: walhook lags behind, and must still see every transaction's values.
    let truth = run_workload(s.pg.url(), w.txns, Duration::ZERO).await;
    eprintln!("ground truth: {} transitions", truth.len());
    assert_truth_covers_every_transition(&truth);
    let notes = settle_on_truth(&s, &truth).await;
    assert_matches_truth(&notes, &truth);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_workload_keeps_transitions_exact() {
    let seed = crate::support::seed("TRANSITIONS_SEED");
    eprintln!("workload seed {seed} (TRANSITIONS_SEED={seed} replays it)");
    let w = workload(seed);
    let s = Scenario::new(&w.setup, &config(&all_pair_hooks())).await;
    let dir = classification_dir(&s, &[("customer_active", CUSTOMER_ACTIVE)]);
    let mut walhook = start(&s, &dir).await;
    let load = tokio::spawn(run_workload(s.pg.url(), w.txns, Duration::from_millis(10)));
    let mut rng = fastrand::Rng::with_seed(seed.rotate_left(17) ^ 0x5eed);
    let mut kills_under_load = 0;
    for k in 1..=2 {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..900))).await;
        if !load.is_finished() {
            kills_under_load += 1;
        }
        // SIGKILL, then the same arguments and data dir again.
        walhook.restart();
        // The next kill hits a process that streams again, not one still starting.
        walhook.wait_log_count(STREAMING, k + 1).await;
    }
    let truth = load.await.expect("workload task");
    assert!(
        kills_under_load >= 1,
        "the workload ended before the first kill; the test would prove little"
    );
    eprintln!(
        "ground truth: {} transitions; {kills_under_load} kill(s) under load",
        truth.len()
    );
    assert_truth_covers_every_transition(&truth);
    // Duplicates are allowed only under one webhook-id with one body (checked by `notes`).
    let notes = settle_on_truth(&s, &truth).await;
    let requests = s.receiver.requests().len();
    eprintln!("{requests} requests, {} distinct webhook-ids", notes.len());
    assert_matches_truth(&notes, &truth);
}
