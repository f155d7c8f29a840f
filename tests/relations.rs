//! Relation events: links between rows through a foreign key or a join table, added and
//! removed per transaction (net), and changes of related rows, with the old link values
//! from the row state store (no REPLICA IDENTITY FULL).

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{run_to_completion, signature_ok, Scenario, WAIT};

const SCHEMA: &str = "
CREATE TABLE customers (id bigint PRIMARY KEY, name text);
CREATE TABLE contracts (id bigint PRIMARY KEY,
                        customer_id bigint REFERENCES customers ON DELETE SET NULL, note text);
CREATE TABLE tags (code text PRIMARY KEY);
CREATE TABLE customer_tags (customer_id bigint REFERENCES customers ON DELETE CASCADE,
                            tag text REFERENCES tags, PRIMARY KEY (customer_id, tag));
CREATE TABLE tag_links (id bigserial PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers,
                        tag text NOT NULL REFERENCES tags);
INSERT INTO customers VALUES (1, 'a'), (2, 'b'), (3, 'c');
INSERT INTO tags VALUES ('vip'), ('new');
INSERT INTO contracts VALUES (10, 1, 'x');
";

const CONFIG: &str = r#"
[[event]]
name = "customer_contract_linked"
table = "public.customers"
relation = "contracts_customer_id_fkey"
on = ["relation_added", "relation_removed"]

[[event]]
name = "contract_customer_linked"
table = "public.contracts"
relation = "contracts_customer_id_fkey"
on = ["relation_added", "relation_removed"]

[[event]]
name = "customer_contracts_changed"
table = "public.customers"
relation = "contracts_customer_id_fkey"
on = ["related_change"]

[[event]]
name = "customer_tagged"
table = "public.customers"
relation = "public.customer_tags"
on = ["relation_added", "relation_removed"]

[[event]]
name = "tag_used"
table = "public.tags"
relation = "public.tag_links"
on = ["relation_added", "relation_removed"]

[[webhook]]
id = "parent"
event = "customer_contract_linked"
url = "{receiver}/parent"
secret = "{secret}"

[[webhook]]
id = "child"
event = "contract_customer_linked"
url = "{receiver}/child"
secret = "{secret}"

[[webhook]]
id = "related"
event = "customer_contracts_changed"
url = "{receiver}/related"
secret = "{secret}"

[[webhook]]
id = "tagged"
event = "customer_tagged"
url = "{receiver}/tagged"
secret = "{secret}"

[[webhook]]
id = "used"
event = "tag_used"
url = "{receiver}/used"
secret = "{secret}"
"#;

/// How long a step waits, after its notifications arrived, for stray extra ones.
const QUIET: Duration = Duration::from_millis(700);

/// Runs `sql` (one transaction), waits for `expected` new requests, and returns the new
/// ones as `path op links-or-rows`, sorted.
async fn step(s: &Scenario, seen: &mut usize, sql: &str, expected: usize) -> Vec<String> {
    s.pg.exec(sql).await;
    s.receiver.wait_for_count(*seen + expected, WAIT).await;
    tokio::time::sleep(QUIET).await;
    let all = s.receiver.requests();
    let mut fresh: Vec<String> = all[*seen..]
        .iter()
        .map(|r| {
            assert!(signature_ok(r), "bad signature on {r}");
            let body = r.json();
            assert!(body["relation"].is_string(), "{r}");
            let what = if body["links"].is_array() {
                let mut links: Vec<String> = body["links"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|l| format!("{}>{}", l["row"], l["related"]))
                    .collect();
                links.sort();
                // rows: each link's row, once.
                let mut rows: Vec<Value> = body["links"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|l| l["row"].clone())
                    .collect();
                rows.dedup();
                assert_eq!(json!(rows), body["rows"], "rows vs links: {r}");
                links.join(",")
            } else {
                body["rows"].to_string()
            };
            format!("{} {} {}", r.path, body["op"].as_str().unwrap_or("?"), what)
        })
        .collect();
    *seen = all.len();
    fresh.sort();
    fresh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_key_and_join_table_links() {
    let s = Scenario::new(SCHEMA, CONFIG).await;
    let _walhook = s.start_walhook().await;
    let mut seen = 0;
    // Insert with a key: added, seen from both ends; related_change for the customer.
    let got = step(
        &s,
        &mut seen,
        "INSERT INTO contracts VALUES (11, 2, 'y')",
        3,
    )
    .await;
    assert_eq!(
        got,
        vec![
            "/child relation_added 11>2",
            "/parent relation_added 2>11",
            "/related related_change [2]",
        ]
    );
    // Re-pointing a contract that existed before walhook started (its old customer comes
    // from the baseline): removed(1) + added(3).
    let got = step(
        &s,
        &mut seen,
        "UPDATE contracts SET customer_id = 3 WHERE id = 10",
        5,
    )
    .await;
    assert_eq!(
        got,
        vec![
            "/child relation_added 10>3",
            "/child relation_removed 10>1",
            "/parent relation_added 3>10",
            "/parent relation_removed 1>10",
            "/related related_change [1,3]",
        ]
    );
    // A change that keeps the link: only related_change.
    let got = step(
        &s,
        &mut seen,
        "UPDATE contracts SET note = 'z' WHERE id = 10",
        1,
    )
    .await;
    assert_eq!(got, vec!["/related related_change [3]"]);
    // value → null, null → value.
    let got = step(
        &s,
        &mut seen,
        "UPDATE contracts SET customer_id = NULL WHERE id = 11",
        3,
    )
    .await;
    assert_eq!(
        got,
        vec![
            "/child relation_removed 11>2",
            "/parent relation_removed 2>11",
            "/related related_change [2]",
        ]
    );
    let got = step(
        &s,
        &mut seen,
        "UPDATE contracts SET customer_id = 1 WHERE id = 11",
        3,
    )
    .await;
    assert_eq!(
        got,
        vec![
            "/child relation_added 11>1",
            "/parent relation_added 1>11",
            "/related related_change [1]",
        ]
    );
    // Added and removed in one transaction: nothing (net, the row never existed).
    let got = step(
        &s,
        &mut seen,
        "BEGIN; INSERT INTO contracts VALUES (12, 2, 'w'); DELETE FROM contracts WHERE id = 12; COMMIT;",
        0,
    )
    .await;
    assert!(got.is_empty(), "{got:?}");
    // ON DELETE SET NULL is a change like any other.
    let got = step(&s, &mut seen, "DELETE FROM customers WHERE id = 1", 3).await;
    assert_eq!(
        got,
        vec![
            "/child relation_removed 11>1",
            "/parent relation_removed 1>11",
            "/related related_change [1]",
        ]
    );
    // Join table with a composite key: tagging and untagging; ON DELETE CASCADE.
    let got = step(
        &s,
        &mut seen,
        "INSERT INTO customer_tags VALUES (2, 'vip'), (2, 'new'), (3, 'vip')",
        1,
    )
    .await;
    assert_eq!(
        got,
        vec![r#"/tagged relation_added 2>"new",2>"vip",3>"vip""#]
    );
    let got = step(
        &s,
        &mut seen,
        "DELETE FROM customer_tags WHERE tag = 'new'",
        1,
    )
    .await;
    assert_eq!(got, vec![r#"/tagged relation_removed 2>"new""#]);
    let got = step(
        &s,
        &mut seen,
        "DELETE FROM contracts WHERE id = 10; DELETE FROM customers WHERE id = 3",
        4,
    )
    .await;
    assert_eq!(
        got,
        vec![
            "/child relation_removed 10>3",
            "/parent relation_removed 3>10",
            "/related related_change [3]",
            r#"/tagged relation_removed 3>"vip""#,
        ]
    );
    // Join table with a surrogate key, seen from the tag's end; moving a link row.
    let got = step(
        &s,
        &mut seen,
        "INSERT INTO tag_links (customer_id, tag) VALUES (2, 'vip')",
        1,
    )
    .await;
    assert_eq!(got, vec![r#"/used relation_added "vip">2"#]);
    let got = step(&s, &mut seen, "UPDATE tag_links SET tag = 'new'", 2).await;
    assert_eq!(
        got,
        vec![
            r#"/used relation_added "new">2"#,
            r#"/used relation_removed "vip">2"#
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_relations_are_config_errors() {
    let config = r#"
[[event]]
name = "unknown"
table = "public.customers"
relation = "no_such_fkey"
on = ["relation_added"]

[[event]]
name = "elsewhere"
table = "public.tags"
relation = "contracts_customer_id_fkey"
on = ["relation_added"]

[[event]]
name = "not_a_join"
table = "public.customers"
relation = "public.contracts"
on = ["relation_added"]

[[event]]
name = "wrong_end"
table = "public.contracts"
relation = "contracts_customer_id_fkey"
on = ["related_change"]

[[webhook]]
id = "a"
event = "unknown"
url = "{receiver}/a"
secret = "{secret}"
"#;
    let s = Scenario::new(SCHEMA, config).await;
    let args = [
        "check".to_string(),
        "--database-url".into(),
        s.pg.url(),
        "--config".into(),
        s.config.display().to_string(),
    ];
    let (status, _, stderr) = run_to_completion(&args, &[], WAIT).await;
    assert!(!status.success());
    let line = |event: &str| -> String {
        stderr
            .lines()
            .find(|l| l.contains(&format!("event \"{event}\"")))
            .unwrap_or_else(|| panic!("no line for {event}:\n{stderr}"))
            .to_string()
    };
    assert!(
        line("unknown").contains("not a foreign key constraint"),
        "{stderr}"
    );
    assert!(
        line("elsewhere").contains("not the event's table public.tags"),
        "{stderr}"
    );
    assert!(
        line("not_a_join").contains("exactly two foreign keys"),
        "{stderr}"
    );
    assert!(line("wrong_end").contains("related_change"), "{stderr}");
    // `run` refuses the same config at start-up, with the same lines.
    let (status, _, run_err) = run_to_completion(&s.run_args(), &[], WAIT).await;
    assert!(!status.success());
    for event in ["unknown", "elsewhere", "not_a_join", "wrong_end"] {
        assert!(run_err.contains(&format!("event \"{event}\"")), "{run_err}");
    }
    // Relation operations without `relation`, and row operations with it.
    s.rewrite_config(
        r#"
[[event]]
name = "x"
table = "public.customers"
on = ["relation_added"]

[[event]]
name = "y"
table = "public.customers"
relation = "contracts_customer_id_fkey"
on = ["insert"]

[[webhook]]
id = "a"
event = "x"
url = "{receiver}/a"
secret = "{secret}"
"#,
    );
    let (status, _, stderr) = run_to_completion(&args, &[], WAIT).await;
    assert!(!status.success());
    assert!(stderr.contains("needs `relation`"), "{stderr}");
    assert!(
        stderr.contains("\"insert\" in `on` of a relation event"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_keys_on_both_ends() {
    // The foreign key lists the parent's key columns in another order than its primary key.
    let setup = "
        CREATE TABLE sites (region text, num int, PRIMARY KEY (region, num));
        CREATE TABLE devices (serial text, batch int, site_num int, site_region text,
                              PRIMARY KEY (serial, batch),
                              CONSTRAINT devices_site FOREIGN KEY (site_num, site_region)
                                  REFERENCES sites (num, region));
        INSERT INTO sites VALUES ('eu', 1), ('us', 2);";
    let config = r#"
[[event]]
name = "site_devices"
table = "public.sites"
relation = "devices_site"
on = ["relation_added", "relation_removed"]

[[event]]
name = "device_site"
table = "public.devices"
relation = "devices_site"
on = ["relation_added", "relation_removed"]

[[webhook]]
id = "sites"
event = "site_devices"
url = "{receiver}/sites"
secret = "{secret}"

[[webhook]]
id = "devices"
event = "device_site"
url = "{receiver}/devices"
secret = "{secret}"
"#;
    let s = Scenario::new(setup, config).await;
    let _walhook = s.start_walhook().await;
    let mut seen = 0;
    let got = step(
        &s,
        &mut seen,
        "INSERT INTO devices VALUES ('d-1', 7, 1, 'eu')",
        2,
    )
    .await;
    assert_eq!(
        got,
        vec![
            r#"/devices relation_added {"serial":"d-1","batch":7}>{"region":"eu","num":1}"#,
            r#"/sites relation_added {"region":"eu","num":1}>{"serial":"d-1","batch":7}"#,
        ]
    );
    let got = step(
        &s,
        &mut seen,
        "UPDATE devices SET site_num = 2, site_region = 'us'",
        4,
    )
    .await;
    assert_eq!(
        got,
        vec![
            r#"/devices relation_added {"serial":"d-1","batch":7}>{"region":"us","num":2}"#,
            r#"/devices relation_removed {"serial":"d-1","batch":7}>{"region":"eu","num":1}"#,
            r#"/sites relation_added {"region":"us","num":2}>{"serial":"d-1","batch":7}"#,
            r#"/sites relation_removed {"region":"eu","num":1}>{"serial":"d-1","batch":7}"#,
        ]
    );
}
