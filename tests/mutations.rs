//! Mutation events end to end: row changes in PostgreSQL → signed notifications.

use serde_json::json;

use crate::support::{rows_of, signature_ok, Scenario, WAIT};

const CUSTOMERS: &str = "CREATE TABLE customers (id bigint PRIMARY KEY, email text, status text)";

const CUSTOMER_CONFIG: &str = r#"
[[event]]
name = "customer_changed"
table = "public.customers"
on = ["insert", "update", "delete"]

[[webhook]]
id = "crm-sync"
event = "customer_changed"
url = "{receiver}/hooks/crm"
secret = "{secret}"
"#;

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
