//! Mutation events end to end: row changes in PostgreSQL → signed notifications.
//!
//! Every test drives the real binary against a throwaway cluster and the recording receiver.
//! Expected rows come from the test's own SQL, or from PostgreSQL for values it generates.
//! Most tests go step by step ([`Arrivals`]): run some SQL, wait for exactly the
//! notifications it should cause, compare them, then the next step; a missing, extra or
//! misattributed notification fails at the step that caused it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    rows_of, run_to_completion, signature_ok, Plan, Receiver, Recorded, Scenario, CUSTOMER_CONFIG,
    WAIT,
};

const CUSTOMERS: &str = "CREATE TABLE customers (id bigint PRIMARY KEY, email text, status text)";

/// About 10 kB of text that does not compress: long enough to be stored out of line.
const BIG_TEXT: &str = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 320) i)";

/// How long a step waits, after its notifications arrived, for stray extra ones.
const QUIET: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_update_delete_notify_the_right_rows() {
    let s = Scenario::new(CUSTOMERS, CUSTOMER_CONFIG).await;
    let _walhook = s.start_walhook().await;
    s.pg.exec("INSERT INTO customers VALUES (1, 'a@x', 'trial'), (2, 'b@x', 'trial')")
        .await;
    s.pg.exec("UPDATE customers SET status = 'active' WHERE id = 2")
        .await;
    s.pg.exec("DELETE FROM customers WHERE id = 1").await;
    let got = s.receiver.wait_for_count(3, WAIT).await;
    assert_eq!(rows_of(&got, "insert"), vec![json!(1), json!(2)]);
    assert_eq!(rows_of(&got, "update"), vec![json!(2)]);
    assert_eq!(rows_of(&got, "delete"), vec![json!(1)]);
    for r in &got {
        assert!(signature_ok(r), "bad signature on {r}");
        let body = r.json();
        assert_eq!(body["hook_id"], "crm-sync");
        assert_eq!(body["event"], "customer_changed");
        assert_eq!(body["table"], "public.customers");
        assert_eq!(r.path, "/hooks/crm");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r
            .header("user-agent")
            .is_some_and(|ua| ua.starts_with("walhook/")));
        let id = r.header("webhook-id").expect("webhook-id");
        assert!(id.starts_with("crm-sync_"), "{id}");
        assert!(body["lsn"].as_str().is_some_and(|l| l.contains('/')));
        assert!(body["committed_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_numbers_strings_or_objects_in_key_column_order() {
    // Key order differs from both column order and alphabetical order, so an object built
    // in either of those orders is caught.
    let setup = "
        CREATE TABLE order_lines (line int, note text, order_id bigint, PRIMARY KEY (order_id, line));
        CREATE TABLE stock (bin smallint, warehouse text, PRIMARY KEY (warehouse, bin));
        CREATE TABLE tags (name text PRIMARY KEY, color text);
        CREATE TABLE devices (id uuid PRIMARY KEY, label text);";
    let config = [
        event("line_changed", "public.order_lines", ALL_OPS),
        event("stock_changed", "public.stock", ALL_OPS),
        event("tag_changed", "public.tags", ALL_OPS),
        event("device_changed", "public.devices", ALL_OPS),
        webhook("lines", "line_changed", ""),
        webhook("stock", "stock_changed", ""),
        webhook("tags", "tag_changed", ""),
        webhook("devices", "device_changed", ""),
    ]
    .concat();
    let s = Scenario::new(setup, &config).await;
    let _walhook = s.start_walhook().await;
    let mut arrivals = Arrivals::new(&s.receiver);

    let line = |order_id: i64, line: i32| json!({"order_id": order_id, "line": line});
    s.pg.exec(
        "INSERT INTO order_lines (order_id, line, note) \
         VALUES (9000000000, 1, 'a'), (9000000000, 2, 'b'), (-7, 1, 'c')",
    )
    .await;
    let got = arrivals
        .expect(&[(
            "lines",
            "insert",
            json!([line(9_000_000_000, 1), line(9_000_000_000, 2), line(-7, 1)]),
        )])
        .await;
    for row in got[0].json()["rows"].as_array().expect("rows") {
        assert_eq!(object_keys(row), ["order_id", "line"], "{row}");
    }
    s.pg.exec("UPDATE order_lines SET note = 'x' WHERE order_id = 9000000000 AND line = 2")
        .await;
    arrivals
        .expect(&[("lines", "update", json!([line(9_000_000_000, 2)]))])
        .await;
    s.pg.exec("DELETE FROM order_lines WHERE order_id = -7")
        .await;
    arrivals
        .expect(&[("lines", "delete", json!([line(-7, 1)]))])
        .await;

    s.pg.exec("INSERT INTO stock (warehouse, bin) VALUES ('north', 3)")
        .await;
    let got = arrivals
        .expect(&[("stock", "insert", json!([{"warehouse": "north", "bin": 3}]))])
        .await;
    let row = &got[0].json()["rows"][0];
    assert_eq!(object_keys(row), ["warehouse", "bin"], "{row}");

    // Text keys stay strings, even when they look like numbers.
    s.pg.exec(
        "INSERT INTO tags VALUES ('42', 'red'), ('o''brien \"q\"', 'blue'), ('ünï', 'x'); \
         UPDATE tags SET color = 'green' WHERE name = '42'",
    )
    .await;
    arrivals
        .expect(&[
            ("tags", "insert", json!(["42", "o'brien \"q\"", "ünï"])),
            ("tags", "update", json!(["42"])),
        ])
        .await;

    // A uuid key is its text form, as PostgreSQL prints it.
    let client = s.pg.client().await;
    let id: String = client
        .query_one(
            "INSERT INTO devices VALUES ('A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', 'lamp') \
             RETURNING id::text",
            &[],
        )
        .await
        .expect("insert device")
        .get(0);
    arrivals
        .expect(&[("devices", "insert", json!([id.clone()]))])
        .await;
    s.pg.exec("DELETE FROM devices").await;
    arrivals.expect(&[("devices", "delete", json!([id]))]).await;
    arrivals.quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_columns_do_not_hide_the_key() {
    // docs: a big non-key column; notes: a key big enough to be stored out of line itself,
    // so an update that leaves it unchanged carries it only in the old-key image.
    let setup = "
        CREATE TABLE docs (id bigint PRIMARY KEY, title text, body text);
        ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
        CREATE TABLE notes (slug text PRIMARY KEY, n int);
        ALTER TABLE notes ALTER COLUMN slug SET STORAGE EXTERNAL;";
    let config = [
        event("doc_changed", "public.docs", ALL_OPS),
        event("note_changed", "public.notes", ALL_OPS),
        webhook("docs", "doc_changed", ""),
        webhook("notes", "note_changed", ""),
    ]
    .concat();
    let s = Scenario::new(setup, &config).await;
    let mut walhook = s.start_walhook().await;
    let mut arrivals = Arrivals::new(&s.receiver);

    s.pg.exec(&format!(
        "INSERT INTO docs VALUES (1, 't1', {BIG_TEXT}), (2, 't2', {BIG_TEXT})"
    ))
    .await;
    assert!(
        s.toast_chunks("docs").await > 0,
        "precondition: docs.body is stored out of line"
    );
    arrivals.expect(&[("docs", "insert", json!([1, 2]))]).await;
    s.pg.exec("UPDATE docs SET title = 't1b' WHERE id = 1")
        .await;
    arrivals.expect(&[("docs", "update", json!([1]))]).await;
    // A key change with the big column unchanged: the old key, then the new one.
    s.pg.exec("UPDATE docs SET id = 3 WHERE id = 2").await;
    arrivals.expect(&[("docs", "update", json!([2, 3]))]).await;
    s.pg.exec("DELETE FROM docs WHERE id = 1").await;
    arrivals.expect(&[("docs", "delete", json!([1]))]).await;
    let body_intact: bool =
        s.pg.client()
            .await
            .query_one(
                &format!("SELECT body = {BIG_TEXT} FROM docs WHERE id = 3"),
                &[],
            )
            .await
            .expect("read doc")
            .get(0);
    assert!(body_intact);

    // 75 × 32 = 2,400 characters: over the out-of-line threshold, under the index limit.
    s.pg.exec(
        "INSERT INTO notes VALUES \
         ((SELECT string_agg(md5(i::text), '') FROM generate_series(1, 75) i), 0)",
    )
    .await;
    assert!(
        s.toast_chunks("notes").await > 0,
        "precondition: notes.slug is stored out of line"
    );
    let slug: String =
        s.pg.client()
            .await
            .query_one("SELECT slug FROM notes", &[])
            .await
            .expect("read slug")
            .get(0);
    arrivals
        .expect(&[("notes", "insert", json!([slug.clone()]))])
        .await;
    s.pg.exec("UPDATE notes SET n = n + 1").await;
    arrivals
        .expect(&[("notes", "update", json!([slug.clone()]))])
        .await;
    s.pg.exec("DELETE FROM notes").await;
    arrivals.expect(&[("notes", "delete", json!([slug]))]).await;
    arrivals.quiet().await;
    assert!(
        walhook.try_exit().is_none(),
        "walhook stopped:\n{}",
        walhook.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_full_updates_and_deletes_name_their_rows() {
    let setup = "
        CREATE TABLE accounts (id int PRIMARY KEY, owner text, bio text);
        ALTER TABLE accounts REPLICA IDENTITY FULL;
        ALTER TABLE accounts ALTER COLUMN bio SET STORAGE EXTERNAL;";
    let config = [
        event("account_changed", "public.accounts", ALL_OPS),
        webhook("accounts", "account_changed", ""),
    ]
    .concat();
    let s = Scenario::new(setup, &config).await;
    let _walhook = s.start_walhook().await;
    let mut arrivals = Arrivals::new(&s.receiver);

    s.pg.exec(&format!(
        "INSERT INTO accounts VALUES (1, 'ann', {BIG_TEXT}), (2, 'bob', NULL)"
    ))
    .await;
    arrivals
        .expect(&[("accounts", "insert", json!([1, 2]))])
        .await;
    s.pg.exec("UPDATE accounts SET owner = 'anna' WHERE id = 1")
        .await;
    arrivals.expect(&[("accounts", "update", json!([1]))]).await;
    s.pg.exec("UPDATE accounts SET id = 20 WHERE id = 2").await;
    arrivals
        .expect(&[("accounts", "update", json!([2, 20]))])
        .await;
    s.pg.exec(
        "BEGIN; DELETE FROM accounts WHERE id = 1; DELETE FROM accounts WHERE id = 20; COMMIT",
    )
    .await;
    arrivals
        .expect(&[("accounts", "delete", json!([1, 20]))])
        .await;
    arrivals.quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_mid_stream_keep_keys_right() {
    // `note` precedes the key column: dropping it moves the key to another position.
    let setup = "CREATE TABLE items (note text, id int PRIMARY KEY, extra text)";
    let config = [
        event("item_changed", "public.items", ALL_OPS),
        webhook("items", "item_changed", ""),
    ]
    .concat();
    let s = Scenario::new(setup, &config).await;
    let _walhook = s.start_walhook().await;
    let mut arrivals = Arrivals::new(&s.receiver);

    s.pg.exec("INSERT INTO items (note, id) VALUES ('n', 1)")
        .await;
    arrivals.expect(&[("items", "insert", json!([1]))]).await;

    s.pg.exec(
        "ALTER TABLE items ADD COLUMN price numeric; INSERT INTO items (id, price) VALUES (2, 9.5)",
    )
    .await;
    arrivals.expect(&[("items", "insert", json!([2]))]).await;

    // The schema changes inside the transaction, between two changes of the same table.
    s.pg.exec(
        "BEGIN; \
         INSERT INTO items (id) VALUES (3); \
         ALTER TABLE items ADD COLUMN color text DEFAULT 'red'; \
         INSERT INTO items (id, color) VALUES (4, 'blue'); \
         UPDATE items SET color = 'green' WHERE id = 3; \
         COMMIT",
    )
    .await;
    arrivals
        .expect(&[
            ("items", "insert", json!([3, 4])),
            ("items", "update", json!([3])),
        ])
        .await;

    s.pg.exec(
        "ALTER TABLE items DROP COLUMN note; \
         UPDATE items SET extra = 'e' WHERE id = 1; \
         INSERT INTO items (id) VALUES (5)",
    )
    .await;
    arrivals
        .expect(&[
            ("items", "update", json!([1])),
            ("items", "insert", json!([5])),
        ])
        .await;

    s.pg.exec("BEGIN; ALTER TABLE items DROP COLUMN extra; DELETE FROM items WHERE id = 2; COMMIT")
        .await;
    arrivals.expect(&[("items", "delete", json!([2]))]).await;

    // A volatile default rewrites the table; the rewrite itself is not a change of rows.
    s.pg.exec("ALTER TABLE items ADD COLUMN stamp timestamptz DEFAULT clock_timestamp()")
        .await;
    // A primary key update names the old key (gone) and the new one.
    s.pg.exec("UPDATE items SET id = 10 WHERE id = 1").await;
    arrivals
        .expect(&[("items", "update", json!([1, 10]))])
        .await;
    s.pg.exec("INSERT INTO items (id) VALUES (6)").await;
    arrivals.expect(&[("items", "insert", json!([6]))]).await;
    arrivals.quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_notifies_delete_subscribers_once_with_no_rows() {
    let setup = "
        CREATE TABLE a (id int PRIMARY KEY);
        CREATE TABLE b (id int PRIMARY KEY);";
    let config = [
        event("a_removed", "public.a", &["delete"]),
        event("a_created", "public.a", &["insert"]),
        event("b_changed", "public.b", ALL_OPS),
        webhook("a-deletes", "a_removed", ""),
        webhook("a-inserts", "a_created", ""),
        webhook("b-all", "b_changed", ""),
    ]
    .concat();
    let s = Scenario::new(setup, &config).await;
    let _walhook = s.start_walhook().await;
    let mut arrivals = Arrivals::new(&s.receiver);

    s.pg.exec("INSERT INTO a VALUES (1), (2); INSERT INTO b VALUES (1)")
        .await;
    arrivals
        .expect(&[
            ("a-inserts", "insert", json!([1, 2])),
            ("b-all", "insert", json!([1])),
        ])
        .await;

    s.pg.exec("TRUNCATE a").await;
    let got = arrivals
        .expect(&[("a-deletes", "truncate", json!([]))])
        .await;
    let body = got[0].json();
    assert_eq!(body["event"], "a_removed");
    assert_eq!(body["table"], "public.a");

    // Two configured tables in one statement: one notification per table's event.
    s.pg.exec("INSERT INTO a VALUES (3); TRUNCATE a, b").await;
    let got = arrivals
        .expect(&[
            ("a-inserts", "insert", json!([3])),
            ("a-deletes", "truncate", json!([])),
            ("b-all", "truncate", json!([])),
        ])
        .await;
    let truncates: Vec<Value> = got
        .iter()
        .map(Recorded::json)
        .filter(|b| b["op"] == "truncate")
        .collect();
    assert_eq!(truncates[0]["lsn"], truncates[1]["lsn"], "same transaction");
    let tables: BTreeSet<&str> = truncates
        .iter()
        .filter_map(|b| b["table"].as_str())
        .collect();
    assert_eq!(tables, BTreeSet::from(["public.a", "public.b"]));

    // The insert-only webhook got no truncate: a later insert is the next thing it sees.
    s.pg.exec("INSERT INTO a VALUES (4)").await;
    arrivals
        .expect(&[("a-inserts", "insert", json!([4]))])
        .await;
    arrivals.quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rows_splits_a_transaction_and_lists_each_row_once() {
    const ROWS: usize = 2500;
    const MAX_ROWS: usize = 1000;
    let setup = "CREATE TABLE readings (id int PRIMARY KEY, v int)";
    let config = [
        event("reading_changed", "public.readings", ALL_OPS),
        webhook(
            "chunks",
            "reading_changed",
            &format!("max_rows = {MAX_ROWS}"),
        ),
    ]
    .concat();
    let s = Scenario::new(setup, &config).await;
    let _walhook = s.start_walhook().await;

    s.pg.exec(&format!(
        "INSERT INTO readings SELECT g, 0 FROM generate_series(1, {ROWS}) g"
    ))
    .await;
    let chunks = ROWS.div_ceil(MAX_ROWS);
    let mut got = s.receiver.wait_for_count(chunks, WAIT).await;
    got.sort_by_key(ordinal);
    let sizes: Vec<usize> = got.iter().map(|r| row_count(&r.json())).collect();
    let expected_sizes: Vec<usize> = (0..chunks)
        .map(|i| MAX_ROWS.min(ROWS - i * MAX_ROWS))
        .collect();
    assert_eq!(sizes, expected_sizes);
    let ids: BTreeSet<&str> = got.iter().filter_map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids.len(), chunks, "distinct webhook-ids");
    let lsns: BTreeSet<String> = got.iter().map(|r| r.json()["lsn"].to_string()).collect();
    assert_eq!(lsns.len(), 1, "one transaction");
    let rows = rows_of(&got, "insert");
    let distinct: BTreeSet<i64> = rows.iter().filter_map(Value::as_i64).collect();
    assert_eq!(rows.len(), ROWS, "every row listed once");
    assert_eq!(distinct, (1..=ROWS as i64).collect::<BTreeSet<_>>());

    let mut arrivals = Arrivals::new(&s.receiver);
    arrivals.seen = chunks;
    s.pg.exec(
        "BEGIN; \
         UPDATE readings SET v = 1 WHERE id = 7; \
         UPDATE readings SET v = 2 WHERE id = 7; \
         UPDATE readings SET v = 3 WHERE id = 8; \
         UPDATE readings SET v = 4 WHERE id = 7; \
         COMMIT",
    )
    .await;
    arrivals
        .expect(&[("chunks", "update", json!([7, 8]))])
        .await;
    // One notification per op: a row inserted, updated and deleted in one transaction.
    s.pg.exec(
        "BEGIN; \
         INSERT INTO readings VALUES (5000, 0); \
         UPDATE readings SET v = 1 WHERE id = 5000; \
         DELETE FROM readings WHERE id = 5000; \
         COMMIT",
    )
    .await;
    arrivals
        .expect(&[
            ("chunks", "insert", json!([5000])),
            ("chunks", "update", json!([5000])),
            ("chunks", "delete", json!([5000])),
        ])
        .await;
    arrivals.quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_webhook_gets_its_own_notifications_and_unconfigured_tables_none() {
    let setup = "
        CREATE TABLE customers (id int PRIMARY KEY, status text);
        CREATE TABLE orders (id int PRIMARY KEY, customer_id int, state text);
        CREATE TABLE audit (id serial PRIMARY KEY, what text);
        CREATE PUBLICATION everything FOR ALL TABLES;";
    let config = [
        event("customer_changed", "public.customers", ALL_OPS),
        event("order_created", "public.orders", &["insert"]),
        webhook("crm", "customer_changed", ""),
        webhook("billing", "customer_changed", ""),
        webhook("shipping", "order_created", ""),
    ]
    .concat();
    let s = Scenario::new(setup, &config).await;
    let _walhook = s.start_walhook_with(&["--publication", "everything"]).await;
    let mut arrivals = Arrivals::new(&s.receiver);

    s.pg.exec("INSERT INTO customers VALUES (1, 'trial')").await;
    let got = arrivals
        .expect(&[
            ("crm", "insert", json!([1])),
            ("billing", "insert", json!([1])),
        ])
        .await;
    assert_eq!(got[0].json()["lsn"], got[1].json()["lsn"]);
    assert_ne!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    for r in &got {
        assert_eq!(r.json()["event"], "customer_changed");
    }

    s.pg.exec("INSERT INTO orders VALUES (100, 1, 'new')").await;
    let got = arrivals
        .expect(&[("shipping", "insert", json!([100]))])
        .await;
    assert_eq!(got[0].json()["event"], "order_created");

    // The unconfigured table is published too, alone and mixed into a transaction.
    s.pg.exec(
        "INSERT INTO audit (what) VALUES ('x'), ('y'); \
         UPDATE audit SET what = 'z'; \
         DELETE FROM audit WHERE what = 'z' AND id = 1; \
         BEGIN; \
         INSERT INTO audit (what) VALUES ('before'); \
         UPDATE customers SET status = 'active' WHERE id = 1; \
         INSERT INTO audit (what) VALUES ('after'); \
         COMMIT",
    )
    .await;
    arrivals
        .expect(&[
            ("crm", "update", json!([1])),
            ("billing", "update", json!([1])),
        ])
        .await;

    // An op the event does not subscribe to is silent.
    s.pg.exec("UPDATE orders SET state = 'paid'; DELETE FROM customers")
        .await;
    arrivals
        .expect(&[
            ("crm", "delete", json!([1])),
            ("billing", "delete", json!([1])),
        ])
        .await;
    arrivals.quiet().await;

    // The user's publication is used as it is; walhook made none of its own.
    let client = s.pg.client().await;
    let publications: Vec<(String, bool)> = client
        .query(
            "SELECT pubname::text, puballtables FROM pg_publication",
            &[],
        )
        .await
        .expect("list publications")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(publications, vec![("everything".to_string(), true)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_never_holds_wal() {
    let setup = "
        CREATE TABLE watched (id int PRIMARY KEY);
        CREATE TABLE scratch (id serial PRIMARY KEY, v text);";
    let config = [
        event("watched_created", "public.watched", &["insert"]),
        webhook("watch", "watched_created", ""),
    ]
    .concat();
    let s = Scenario::new(setup, &config).await;
    let _walhook = s.start_walhook().await;
    s.pg.exec("INSERT INTO watched VALUES (1)").await;
    s.receiver.wait_for_count(1, WAIT).await;
    let deadline = Instant::now() + WAIT;

    // Nothing happens: the slot still catches up with the server.
    let (_, wal) = s.slot_and_wal("walhook").await;
    wait_slot_reaches(&s, wal, deadline).await;

    // Only a table outside the publication is written, then the WAL segment is switched.
    for _ in 0..5 {
        s.pg.exec("INSERT INTO scratch (v) SELECT md5(g::text) FROM generate_series(1, 200) g")
            .await;
    }
    s.pg.exec("SELECT pg_switch_wal()").await;
    let (_, wal) = s.slot_and_wal("walhook").await;
    wait_slot_reaches(&s, wal, deadline).await;
    assert_eq!(
        s.receiver.requests().len(),
        1,
        "unpublished writes notify nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_does_not_delay_another() {
    const TRANSACTIONS: i64 = 20;
    const SLOW_IN_FLIGHT: usize = 4;
    let setup = "CREATE TABLE jobs (id int PRIMARY KEY)";
    let config = [
        event("job_created", "public.jobs", &["insert"]),
        webhook(
            "slow",
            "job_created",
            &format!("timeout = \"20s\"\nmax_in_flight = {SLOW_IN_FLIGHT}"),
        ),
        webhook("fast", "job_created", ""),
    ]
    .concat();
    let s = Scenario::new(setup, &config).await;
    s.receiver
        .set_plan("/hooks/slow", Plan::delay(Duration::from_secs(30)));
    let _walhook = s.start_walhook().await;

    for id in 1..=TRANSACTIONS {
        s.pg.exec(&format!("INSERT INTO jobs VALUES ({id})")).await;
    }
    let committed = Instant::now();
    let got = s
        .receiver
        .wait_for(
            |all| count_to(all, "/hooks/fast") >= TRANSACTIONS as usize,
            Duration::from_secs(5),
        )
        .await;
    let fast: Vec<&Recorded> = got.iter().filter(|r| r.path == "/hooks/fast").collect();
    let rows: BTreeSet<i64> = fast
        .iter()
        .flat_map(|r| r.json()["rows"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_i64())
        .collect();
    assert_eq!(rows, (1..=TRANSACTIONS).collect::<BTreeSet<_>>());
    assert_eq!(fast.len(), TRANSACTIONS as usize, "one per transaction");
    eprintln!(
        "fast endpoint had every notification {:?} after the last commit",
        committed.elapsed()
    );

    // The slow endpoint is reached, and stuck: no more requests than it may have in flight.
    let got = s
        .receiver
        .wait_for(
            |all| count_to(all, "/hooks/slow") >= 1,
            Duration::from_secs(5),
        )
        .await;
    let slow = count_to(&got, "/hooks/slow");
    assert!(
        slow <= SLOW_IN_FLIGHT,
        "{slow} requests to the hanging endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_creates_its_publication_and_adds_newly_configured_tables() {
    let setup = "
        CREATE TABLE a (id int PRIMARY KEY);
        CREATE TABLE b (id int PRIMARY KEY);";
    let only_a = [
        event("a_changed", "public.a", ALL_OPS),
        webhook("hook-a", "a_changed", ""),
    ]
    .concat();
    let s = Scenario::new(setup, &only_a).await;
    let walhook = s.start_walhook().await;
    assert_eq!(
        publication_tables(&s, "walhook").await,
        vec!["public.a".to_string()]
    );
    drop(walhook);

    // The config now names b too; the restarted walhook adds it to its publication.
    let both = [
        only_a,
        event("b_changed", "public.b", ALL_OPS),
        webhook("hook-b", "b_changed", ""),
    ]
    .concat();
    s.rewrite_config(&both);
    let _walhook = s.start_walhook().await;
    assert_eq!(
        publication_tables(&s, "walhook").await,
        vec!["public.a".to_string(), "public.b".to_string()]
    );
    let mut arrivals = Arrivals::new(&s.receiver);
    s.pg.exec("INSERT INTO b VALUES (1); INSERT INTO a VALUES (2)")
        .await;
    arrivals
        .expect(&[
            ("hook-b", "insert", json!([1])),
            ("hook-a", "insert", json!([2])),
        ])
        .await;
    arrivals.quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_publication_missing_a_table_is_refused_with_the_fix() {
    let setup = "
        CREATE TABLE a (id int PRIMARY KEY);
        CREATE TABLE b (id int PRIMARY KEY);
        CREATE PUBLICATION mine FOR TABLE a;";
    let config = [
        event("a_changed", "public.a", ALL_OPS),
        event("b_changed", "public.b", ALL_OPS),
        webhook("hook-a", "a_changed", ""),
        webhook("hook-b", "b_changed", ""),
    ]
    .concat();
    let s = Scenario::new(setup, &config).await;
    let error = refused(&s, &["--publication", "mine"]).await;
    assert!(error.contains("public.b"), "names the table: {error}");
    assert!(!error.contains("public.a"), "a is published: {error}");
    assert!(
        error.contains("ALTER PUBLICATION mine ADD TABLE public.b"),
        "gives the fix: {error}"
    );
    // The user's publication is left as it was.
    assert_eq!(
        publication_tables(&s, "mine").await,
        vec!["public.a".to_string()]
    );

    // After the fix, the same command streams both tables.
    s.pg.exec("ALTER PUBLICATION mine ADD TABLE b").await;
    let _walhook = s.start_walhook_with(&["--publication", "mine"]).await;
    let mut arrivals = Arrivals::new(&s.receiver);
    s.pg.exec("INSERT INTO a VALUES (1); INSERT INTO b VALUES (2)")
        .await;
    arrivals
        .expect(&[
            ("hook-a", "insert", json!([1])),
            ("hook-b", "insert", json!([2])),
        ])
        .await;
    arrivals.quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_notify_under_the_configured_name() {
    let setup = "
        CREATE TABLE visits (id int, region text, n int, PRIMARY KEY (id, region))
            PARTITION BY LIST (region);
        CREATE TABLE visits_eu PARTITION OF visits FOR VALUES IN ('eu');
        CREATE TABLE visits_us PARTITION OF visits FOR VALUES IN ('us');
        CREATE PUBLICATION mine FOR TABLE visits;";
    let config = [
        event("visit_changed", "public.visits", ALL_OPS),
        webhook("visits", "visit_changed", ""),
    ]
    .concat();
    let s = Scenario::new(setup, &config).await;

    // A user's publication that names changes after the partitions is refused, with the fix.
    let error = refused(&s, &["--publication", "mine"]).await;
    assert!(error.contains("public.visits"), "names the table: {error}");
    assert!(
        error.contains("ALTER PUBLICATION mine SET (publish_via_partition_root = true)"),
        "gives the fix: {error}"
    );

    // walhook's own publication reports them under the partitioned table's name.
    let _walhook = s.start_walhook().await;
    let mut arrivals = Arrivals::new(&s.receiver);
    let visit = |id: i32, region: &str| json!({"id": id, "region": region});
    s.pg.exec("INSERT INTO visits VALUES (1, 'eu'), (2, 'us')")
        .await;
    let got = arrivals
        .expect(&[("visits", "insert", json!([visit(1, "eu"), visit(2, "us")]))])
        .await;
    assert_eq!(got[0].json()["table"], "public.visits");
    s.pg.exec("UPDATE visits SET n = 1 WHERE id = 2").await;
    arrivals
        .expect(&[("visits", "update", json!([visit(2, "us")]))])
        .await;
    // A partition attached while walhook runs is covered too.
    s.pg.exec(
        "CREATE TABLE visits_asia PARTITION OF visits FOR VALUES IN ('asia'); \
         INSERT INTO visits VALUES (3, 'asia')",
    )
    .await;
    arrivals
        .expect(&[("visits", "insert", json!([visit(3, "asia")]))])
        .await;
    s.pg.exec("DELETE FROM visits WHERE id = 1").await;
    arrivals
        .expect(&[("visits", "delete", json!([visit(1, "eu")]))])
        .await;
    s.pg.exec("TRUNCATE visits").await;
    arrivals.expect(&[("visits", "truncate", json!([]))]).await;
    arrivals.quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_committed_changes_notify() {
    let setup = "CREATE TABLE seats (id int PRIMARY KEY, holder text)";
    let config = [
        event("seat_changed", "public.seats", ALL_OPS),
        webhook("seats", "seat_changed", ""),
    ]
    .concat();
    let s = Scenario::new(setup, &config).await;
    let _walhook = s.start_walhook().await;
    let mut arrivals = Arrivals::new(&s.receiver);

    // A rolled-back transaction notifies nothing; a rolled-back savepoint drops its rows.
    s.pg.exec(
        "BEGIN; INSERT INTO seats VALUES (100); ROLLBACK; \
         BEGIN; \
         INSERT INTO seats VALUES (1); \
         SAVEPOINT s; INSERT INTO seats VALUES (2); UPDATE seats SET holder = 'x' WHERE id = 1; \
         ROLLBACK TO SAVEPOINT s; \
         SAVEPOINT t; INSERT INTO seats VALUES (3); RELEASE SAVEPOINT t; \
         COMMIT",
    )
    .await;
    arrivals.expect(&[("seats", "insert", json!([1, 3]))]).await;

    // Upserts: the conflicting row is an update, the new one an insert, DO NOTHING nothing.
    s.pg.exec(
        "INSERT INTO seats VALUES (1, 'ann'), (4, 'bob') \
         ON CONFLICT (id) DO UPDATE SET holder = excluded.holder",
    )
    .await;
    arrivals
        .expect(&[
            ("seats", "update", json!([1])),
            ("seats", "insert", json!([4])),
        ])
        .await;
    s.pg.exec(
        "INSERT INTO seats VALUES (4, 'eve') ON CONFLICT DO NOTHING; INSERT INTO seats VALUES (5)",
    )
    .await;
    arrivals.expect(&[("seats", "insert", json!([5]))]).await;
    arrivals.quiet().await;
}

const ALL_OPS: &[&str] = &["insert", "update", "delete"];

/// An `[[event]]` section.
fn event(name: &str, table: &str, on: &[&str]) -> String {
    let on: Vec<String> = on.iter().map(|op| format!("\"{op}\"")).collect();
    format!(
        "[[event]]\nname = \"{name}\"\ntable = \"{table}\"\non = [{}]\n\n",
        on.join(", ")
    )
}

/// A `[[webhook]]` section posting to `{receiver}/hooks/ID`; `extra` holds more TOML lines.
fn webhook(id: &str, event: &str, extra: &str) -> String {
    format!(
        "[[webhook]]\nid = \"{id}\"\nevent = \"{event}\"\n\
         url = \"{{receiver}}/hooks/{id}\"\nsecret = \"{{secret}}\"\n{extra}\n\n"
    )
}

/// Follows the receiver step by step; see the module docs.
struct Arrivals<'a> {
    receiver: &'a Receiver,
    /// Requests already checked.
    seen: usize,
}

impl<'a> Arrivals<'a> {
    fn new(receiver: &'a Receiver) -> Arrivals<'a> {
        Arrivals { receiver, seen: 0 }
    }

    /// Waits for `expected.len()` more requests and checks that they are exactly the
    /// expected (webhook id, op, rows), in any order, each well-formed for its webhook.
    /// Returns them in the order of `expected`.
    async fn expect(&mut self, expected: &[(&str, &str, Value)]) -> Vec<Recorded> {
        let until = self.seen + expected.len();
        let all = self.receiver.wait_for_count(until, WAIT).await;
        let mut new: Vec<Recorded> = all[self.seen..until].to_vec();
        self.seen = until;
        for r in &new {
            check_envelope(r);
        }
        let key = |hook: &str, op: &str, rows: &Value| format!("{hook} {op} {rows}");
        let mut want: Vec<String> = expected.iter().map(|(h, o, r)| key(h, o, r)).collect();
        let mut got: Vec<String> = new
            .iter()
            .map(|r| {
                let b = r.json();
                key(
                    b["hook_id"].as_str().unwrap_or_default(),
                    b["op"].as_str().unwrap_or_default(),
                    &b["rows"],
                )
            })
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "notifications of this step");
        // Return them in the order the caller listed.
        new.sort_by_key(|r| {
            let b = r.json();
            let k = key(
                b["hook_id"].as_str().unwrap_or_default(),
                b["op"].as_str().unwrap_or_default(),
                &b["rows"],
            );
            expected
                .iter()
                .position(|(h, o, rows)| key(h, o, rows) == k)
        });
        new
    }

    /// Asserts that nothing beyond what was expected arrives for a moment.
    async fn quiet(&self) {
        tokio::time::sleep(QUIET).await;
        let all = self.receiver.requests();
        assert_eq!(
            all.len(),
            self.seen,
            "unexpected extra notifications:\n{}",
            crate::support::receiver::dump(&all[self.seen.min(all.len())..])
        );
    }
}

/// The parts of a notification that must agree with the webhook it was sent for.
fn check_envelope(r: &Recorded) {
    assert!(signature_ok(r), "bad signature on {r}");
    let body = r.json();
    let hook = body["hook_id"].as_str().unwrap_or_default();
    assert_eq!(r.path, format!("/hooks/{hook}"), "sent to its webhook: {r}");
    let id = r.header("webhook-id").unwrap_or_default();
    assert!(
        id.starts_with(&format!("{hook}_")),
        "webhook-id {id:?}: {r}"
    );
    assert!(body["rows"].is_array(), "{r}");
}

/// The keys of a JSON object in the order they were sent (serde_json keeps the order: the
/// crate is built with `preserve_order`).
fn object_keys(v: &Value) -> Vec<&str> {
    v.as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

fn row_count(body: &Value) -> usize {
    body["rows"].as_array().map_or(0, Vec::len)
}

/// The ordinal at the end of a `webhook-id` (`HOOK_LSN_ORDINAL`).
fn ordinal(r: &Recorded) -> u64 {
    r.header("webhook-id")
        .and_then(|id| id.rsplit('_').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("webhook-id without an ordinal: {r}"))
}

fn count_to(requests: &[Recorded], path: &str) -> usize {
    requests.iter().filter(|r| r.path == path).count()
}

/// Runs `walhook run` with `extra` arguments, expecting it to refuse: a non-zero exit and
/// exactly one error line, returned without quotes (identifiers in it may be quoted).
async fn refused(s: &Scenario, extra: &[&str]) -> String {
    let mut args = s.run_args();
    args.extend(extra.iter().map(|a| a.to_string()));
    let (status, _, stderr) = run_to_completion(&args, &[], WAIT).await;
    assert!(!status.success(), "run must refuse; stderr:\n{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("walhook: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line; stderr:\n{stderr}");
    errors[0].replace('"', "")
}

/// `schema.table` of every table in a publication, sorted.
async fn publication_tables(s: &Scenario, publication: &str) -> Vec<String> {
    let client = s.pg.client().await;
    client
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables \
             WHERE pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await
        .expect("list publication tables")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Polls until the slot's confirmed flush position reaches `target`; panics at `deadline`.
async fn wait_slot_reaches(s: &Scenario, target: u64, deadline: Instant) {
    let started = Instant::now();
    loop {
        let (confirmed, wal) = s.slot_and_wal("walhook").await;
        if confirmed >= target {
            eprintln!(
                "slot reached {target} after {:?} (server at {wal})",
                started.elapsed()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slot stuck at {confirmed}, behind {target} (server at {wal})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
