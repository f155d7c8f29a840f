//! `columns = [...]` on an update event: an update counts only when one of the listed columns
//! really changed in the transaction, judged against the row state store (no REPLICA
//! IDENTITY FULL), with rows that existed before walhook started baselined silently.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{run_to_completion, signature_ok, Scenario, WAIT};

const SETUP: &str = "
CREATE TABLE customers (id bigint PRIMARY KEY, email text, status text, note text);
INSERT INTO customers VALUES (1, 'a@x', 'trial', 'n'), (2, 'b@x', 'active', 'n');
";

const CONFIG: &str = r#"
[[event]]
name = "status_changed"
table = "public.customers"
on = ["update"]
columns = ["status", "email"]

[[event]]
name = "created_or_moved"
table = "public.customers"
on = ["insert", "update"]
columns = ["status"]

[[webhook]]
id = "status"
event = "status_changed"
url = "{receiver}/hooks/status"
secret = "{secret}"

[[webhook]]
id = "moved"
event = "created_or_moved"
url = "{receiver}/hooks/moved"
secret = "{secret}"
"#;

/// How long a step waits, after its notifications arrived, for stray extra ones.
const QUIET: Duration = Duration::from_millis(700);

/// Runs `sql`, waits for `expected` new notifications in all, and returns the new ones as
/// (path, op, rows).
async fn step(s: &Scenario, seen: &mut usize, sql: &str, expected: usize) -> Vec<(String, Value)> {
    s.pg.exec(sql).await;
    s.receiver.wait_for_count(*seen + expected, WAIT).await;
    tokio::time::sleep(QUIET).await;
    let all = s.receiver.requests();
    let fresh: Vec<(String, Value)> = all[*seen..]
        .iter()
        .map(|r| {
            assert!(signature_ok(r), "bad signature on {r}");
            let body = r.json();
            (r.path.clone(), json!([body["op"], body["rows"]]))
        })
        .collect();
    *seen = all.len();
    let mut sorted = fresh.clone();
    sorted.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.to_string().cmp(&b.1.to_string())));
    sorted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_count_only_when_a_listed_column_changes() {
    let s = Scenario::new(SETUP, CONFIG).await;
    let walhook = s.start_walhook().await;
    let mut seen = 0;
    let status = "/hooks/status".to_string();
    let moved = "/hooks/moved".to_string();

    // Only another column; a listed column rewritten with the same value: nothing.
    let got = step(
        &s,
        &mut seen,
        "UPDATE customers SET note = 'x' WHERE id = 1",
        0,
    )
    .await;
    assert_eq!(got, vec![]);
    let got = step(
        &s,
        &mut seen,
        "UPDATE customers SET status = 'trial', email = 'a@x' WHERE id = 1",
        0,
    )
    .await;
    assert_eq!(got, vec![]);
    // A row from before walhook started: compared with its baseline.
    let got = step(
        &s,
        &mut seen,
        "UPDATE customers SET status = 'active' WHERE id = 1",
        2,
    )
    .await;
    assert_eq!(
        got,
        vec![
            (moved.clone(), json!(["update", [1]])),
            (status.clone(), json!(["update", [1]])),
        ]
    );
    // email is listed for one event only.
    let got = step(
        &s,
        &mut seen,
        "UPDATE customers SET email = 'b2@x' WHERE id = 2",
        1,
    )
    .await;
    assert_eq!(got, vec![(status.clone(), json!(["update", [2]]))]);
    // An insert (reported as usual) and a listed update in one transaction: both, with
    // their own ids.
    let got = step(
        &s,
        &mut seen,
        "BEGIN; INSERT INTO customers VALUES (3, 'c@x', 'trial', 'n');
         UPDATE customers SET status = 'churned' WHERE id = 2; COMMIT;",
        3,
    )
    .await;
    assert_eq!(
        got,
        vec![
            (moved.clone(), json!(["insert", [3]])),
            (moved.clone(), json!(["update", [2]])),
            (status.clone(), json!(["update", [2]])),
        ]
    );
    let ids: std::collections::BTreeSet<String> = s
        .receiver
        .requests()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(str::to_string))
        .collect();
    assert_eq!(
        ids.len(),
        s.receiver.requests().len(),
        "two requests share an id"
    );
    // Changed and changed back within one transaction: nothing.
    let got = step(
        &s,
        &mut seen,
        "BEGIN; UPDATE customers SET status = 'x' WHERE id = 1;
         UPDATE customers SET status = 'active' WHERE id = 1; COMMIT;",
        0,
    )
    .await;
    assert_eq!(got, vec![]);
    // A deleted and re-inserted row has no stale state.
    let got = step(
        &s,
        &mut seen,
        "DELETE FROM customers WHERE id = 3; INSERT INTO customers VALUES (3, 'c@x', 'new', 'n');",
        1,
    )
    .await;
    assert_eq!(got, vec![(moved.clone(), json!(["insert", [3]]))]);
    let got = step(
        &s,
        &mut seen,
        "UPDATE customers SET status = 'new' WHERE id = 3",
        0,
    )
    .await;
    assert_eq!(got, vec![]);
    drop(walhook);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_columns_are_config_errors() {
    let config = r#"
[[event]]
name = "no_update"
table = "public.customers"
on = ["insert"]
columns = ["status"]

[[event]]
name = "typo"
table = "public.customers"
on = ["update"]
columns = ["statuss"]

[[webhook]]
id = "a"
event = "typo"
url = "{receiver}/a"
secret = "{secret}"
"#;
    let s = Scenario::new(SETUP, config).await;
    let args = [
        "check".to_string(),
        "--database-url".into(),
        s.pg.url(),
        "--config".into(),
        s.config.display().to_string(),
    ];
    let (status, _, stderr) = run_to_completion(&args, &[], WAIT).await;
    assert!(!status.success());
    assert!(
        stderr.contains("\"no_update\"") && stderr.contains("lacks \"update\""),
        "{stderr}"
    );
    // Unknown columns are found against the database, once the config itself is valid.
    let fixed = config.replace("on = [\"insert\"]", "on = [\"insert\", \"update\"]");
    s.rewrite_config(&fixed);
    let (status, _, stderr) = run_to_completion(&args, &[], WAIT).await;
    assert!(!status.success());
    let line = stderr
        .lines()
        .find(|l| l.contains("statuss"))
        .unwrap_or_else(|| panic!("no line names the column:\n{stderr}"));
    assert!(
        line.contains("\"typo\"") && line.contains("public.customers") && line.contains("status"),
        "{line}"
    );
    let (status, _, stderr) = run_to_completion(&s.run_args(), &[], WAIT).await;
    assert!(!status.success());
    assert!(stderr.contains("statuss"), "{stderr}");
}
