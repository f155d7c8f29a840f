//! Bad input, against the real binary and a real cluster: `walhook check` and `walhook run`
//! refuse it with one clear line per problem on stderr (what, where, how to fix) and a
//! non-zero exit; `check` reports every problem in one run; `run` refuses a bad config before
//! it touches the database; `run` refuses an invalidated slot.

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::support::{run_to_completion, write_config, Scenario, SECRET, WAIT};

const ITEMS: &str = "CREATE TABLE items (id bigint PRIMARY KEY, note text)";

/// A config that is right in every way; each test breaks one thing in it.
const GOOD: &str = r#"
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

/// How long `run` may take to refuse bad input: it must not wait for anything.
const FAST: Duration = Duration::from_secs(5);

/// What a one-shot command did.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Outcome {
    /// The error lines on stderr, without their `walhook: error: ` prefix.
    fn errors(&self) -> Vec<String> {
        self.stderr
            .lines()
            .filter_map(|l| l.strip_prefix("walhook: error: "))
            .map(str::to_string)
            .collect()
    }

    /// Asserts a failure with exactly one error line, which contains every needle; returns it.
    fn single_error(&self, needles: &[&str]) -> String {
        assert!(!self.status.success(), "exited 0:\n{}", self.stderr);
        let errors = self.errors();
        assert_eq!(
            errors.len(),
            1,
            "expected one error line, stderr:\n{}",
            self.stderr
        );
        for needle in needles {
            assert!(
                errors[0].contains(needle),
                "error line lacks {needle:?}:\n{}",
                errors[0]
            );
        }
        errors[0].clone()
    }
}

async fn walhook(args: Vec<String>, envs: &[(&str, &str)]) -> Outcome {
    let started = Instant::now();
    let (status, stdout, stderr) = run_to_completion(&args, envs, WAIT).await;
    Outcome {
        status,
        stdout,
        stderr,
        took: started.elapsed(),
    }
}

/// `walhook check` for the scenario's config, connecting with `url`.
async fn check(s: &Scenario, url: &str, envs: &[(&str, &str)]) -> Outcome {
    let args = vec![
        "check".into(),
        "--database-url".into(),
        url.into(),
        "--config".into(),
        s.config.display().to_string(),
    ];
    walhook(args, envs).await
}

/// `walhook run` for the scenario, connecting with `url`; it must exit by itself.
async fn run(s: &Scenario, url: &str, envs: &[(&str, &str)]) -> Outcome {
    let mut args = s.run_args();
    let at = args
        .iter()
        .position(|a| a == "--database-url")
        .expect("run args name the database")
        + 1;
    args[at] = url.to_string();
    walhook(args, envs).await
}

/// Replaces the scenario's config with `text` (`{receiver}` and `{secret}` filled in).
fn rewrite_config(s: &Scenario, text: &str) {
    let text = text
        .replace("{receiver}", s.receiver.url("").trim_end_matches('/'))
        .replace("{secret}", SECRET);
    write_config(s.dir.path(), &text);
}

/// Asserts `run` refused quickly and left the database as it was: no slot, no publication.
async fn assert_run_refused_untouched(s: &Scenario, out: &Outcome) {
    assert!(!out.status.success(), "run exited 0:\n{}", out.stderr);
    assert!(
        out.took < FAST,
        "run took {:?} to refuse bad input",
        out.took
    );
    let client = s.pg.client().await;
    let slots: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .expect("count slots")
        .get(0);
    let publications: i64 = client
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .expect("count publications")
        .get(0);
    assert_eq!(
        (slots, publications),
        (0, 0),
        "run created a slot or publication"
    );
}

/// 1-based line and column of the first occurrence of `needle` in `text`.
fn line_column(text: &str, needle: &str) -> (usize, usize) {
    let at = text.find(needle).expect("needle in text");
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = at - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_setup_passes_check() {
    let s = Scenario::new(ITEMS, GOOD).await;
    let out = check(&s, &s.pg.url(), &[]).await;
    assert!(
        out.status.success(),
        "check refused a good setup:\n{}",
        out.stderr
    );
    assert!(out.errors().is_empty(), "{}", out.stderr);
    assert!(out.stdout.starts_with("ok"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misspelt_key_is_named_with_its_file_line_and_column() {
    let s = Scenario::new(ITEMS, GOOD).await;
    let text = GOOD.replace("url = ", "ulr = ");
    rewrite_config(&s, &text);
    let (line, column) = line_column(&text, "ulr = ");
    let place = format!("{}:{line}:{column}", shown(&s.config));
    let fix = "fix the spelling or remove the key";

    let out = check(&s, &s.pg.url(), &[]).await;
    out.single_error(&[&place, "ulr", fix]);
    let out = run(&s, &s.pg.url(), &[]).await;
    out.single_error(&[&place, "ulr", fix]);
    assert_run_refused_untouched(&s, &out).await;

    // An unknown section is refused the same way.
    let text = format!("{GOOD}\n[deliveries]\nretention = \"1d\"\n");
    rewrite_config(&s, &text);
    let (line, column) = line_column(&text, "deliveries]");
    let place = format!("{}:{line}:{column}", shown(&s.config));
    let out = check(&s, &s.pg.url(), &[]).await;
    out.single_error(&[&place, "deliveries"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_on_a_missing_table() {
    let s = Scenario::new(ITEMS, &GOOD.replace("public.items", "public.itemz")).await;
    let needles = ["public.itemz", "does not exist", "fix the table name"];
    check(&s, &s.pg.url(), &[]).await.single_error(&needles);
    let out = run(&s, &s.pg.url(), &[]).await;
    out.single_error(&needles);
    assert_run_refused_untouched(&s, &out).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_primary_key() {
    let s = Scenario::new("CREATE TABLE items (id bigint, note text)", GOOD).await;
    let needles = [
        "public.items",
        "primary key",
        "ALTER TABLE \"public\".\"items\" ADD PRIMARY KEY",
    ];
    check(&s, &s.pg.url(), &[]).await.single_error(&needles);
    let out = run(&s, &s.pg.url(), &[]).await;
    out.single_error(&needles);
    assert_run_refused_untouched(&s, &out).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_replica_identity_nothing() {
    let s = Scenario::new(
        &format!("{ITEMS}; ALTER TABLE items REPLICA IDENTITY NOTHING"),
        GOOD,
    )
    .await;
    let needles = [
        "public.items",
        "REPLICA IDENTITY NOTHING",
        "ALTER TABLE \"public\".\"items\" REPLICA IDENTITY DEFAULT",
    ];
    check(&s, &s.pg.url(), &[]).await.single_error(&needles);
    let out = run(&s, &s.pg.url(), &[]).await;
    out.single_error(&needles);
    assert_run_refused_untouched(&s, &out).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_naming_an_unknown_event() {
    let s = Scenario::new(
        ITEMS,
        &GOOD.replace("event = \"item_changed\"", "event = \"item_chnged\""),
    )
    .await;
    let file = shown(&s.config);
    let needles = [
        file.as_str(),
        "[[webhook]] #1",
        "\"item_chnged\" is not defined",
        "item_changed",
    ];
    check(&s, &s.pg.url(), &[]).await.single_error(&needles);
    let out = run(&s, &s.pg.url(), &[]).await;
    out.single_error(&needles);
    assert_run_refused_untouched(&s, &out).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_url() {
    let s = Scenario::new(ITEMS, GOOD).await;
    let file = shown(&s.config);
    for (url, what) in [
        ("http//example.com/hooks", "malformed"),
        ("ftp://example.com/hooks", "http:// or https://"),
    ] {
        rewrite_config(
            &s,
            &GOOD.replace("\"{receiver}/hooks/audit\"", &format!("\"{url}\"")),
        );
        let needles = [file.as_str(), "[[webhook]] #1", url, what];
        check(&s, &s.pg.url(), &[]).await.single_error(&needles);
        let out = run(&s, &s.pg.url(), &[]).await;
        out.single_error(&needles);
        assert_run_refused_untouched(&s, &out).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_that_is_not_whsec_base64() {
    let s = Scenario::new(ITEMS, GOOD).await;
    let file = shown(&s.config);
    for (secret, what) in [
        ("C2FVsBQIhrscChlQIMV+b5sSYspob7oD", "whsec_<base64 key>"),
        ("whsec_C2FV$$QIhrscChl!!", "not valid base64"),
        ("whsec_", "no key"),
    ] {
        rewrite_config(&s, &GOOD.replace("{secret}", secret));
        let needles = [file.as_str(), "[[webhook]] #1", what];
        let out = check(&s, &s.pg.url(), &[]).await;
        out.single_error(&needles);
        let run_out = run(&s, &s.pg.url(), &[]).await;
        run_out.single_error(&needles);
        assert_run_refused_untouched(&s, &run_out).await;
        // Secrets are never printed, not even wrong ones.
        if secret.len() > "whsec_".len() {
            let tail = &secret[secret.len() - 10..];
            for text in [&out.stderr, &out.stdout, &run_out.stderr, &run_out.stdout] {
                assert!(!text.contains(tail), "the secret leaked:\n{text}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_env_variable() {
    let var = "AUDIT_HOOK_SECRET";
    let text = GOOD.replace("secret = \"{secret}\"", &format!("secret_env = \"{var}\""));
    let s = Scenario::new(ITEMS, &text).await;
    let needles = [
        shown(&s.config),
        "[[webhook]] #1".into(),
        format!("{var:?}"),
        "not set".into(),
    ];
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    check(&s, &s.pg.url(), &[]).await.single_error(&needles);
    let out = run(&s, &s.pg.url(), &[]).await;
    out.single_error(&needles);
    assert_run_refused_untouched(&s, &out).await;

    // Set, the same config is fine.
    let out = check(&s, &s.pg.url(), &[(var, SECRET)]).await;
    assert!(out.status.success(), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_not_logical() {
    let s = Scenario::new(ITEMS, GOOD).await;
    s.pg.exec("ALTER SYSTEM SET wal_level = replica").await;
    s.pg.restart();
    let needles = [
        "wal_level",
        "\"replica\"",
        "ALTER SYSTEM SET wal_level = logical",
    ];
    check(&s, &s.pg.url(), &[]).await.single_error(&needles);
    let out = run(&s, &s.pg.url(), &[]).await;
    out.single_error(&needles);
    assert_run_refused_untouched(&s, &out).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication() {
    let s = Scenario::new(
        &format!("{ITEMS}; CREATE ROLE app LOGIN; GRANT SELECT ON items TO app"),
        GOOD,
    )
    .await;
    let url = s.pg.url().replace("postgres@", "app@");
    assert_ne!(url, s.pg.url());
    let needles = [
        "\"app\"",
        "REPLICATION",
        "ALTER ROLE \"app\" WITH REPLICATION",
    ];
    check(&s, &url, &[]).await.single_error(&needles);
    let out = run(&s, &url, &[]).await;
    out.single_error(&needles);
    assert_run_refused_untouched(&s, &out).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_every_problem_in_one_run() {
    let config = r#"
[[event]]
name = "item_changed"
table = "public.items"
on = ["insert"]

[[event]]
name = "gone"
table = "public.nowhere"
on = ["delete"]

[[event]]
name = "keyless"
table = "public.logs"
on = ["insert"]

[[webhook]]
id = "audit"
event = "item_changd"
url = "{receiver}/hooks/audit"
secret = "{secret}"

[[webhook]]
id = "crm"
event = "item_changed"
url = "https//crm.example.com"
secret = "whsec_%%%"

[[webhook]]
id = "billing"
event = "gone"
url = "https://billing.example.com/hooks"
secret_env = "BILLING_SECRET"
"#;
    let s = Scenario::new(
        &format!("{ITEMS}; CREATE TABLE logs (at timestamptz, line text); CREATE ROLE app LOGIN; GRANT SELECT ON items, logs TO app"),
        config,
    )
    .await;
    let url = s.pg.url().replace("postgres@", "app@");
    let out = check(&s, &url, &[]).await;
    assert!(!out.status.success(), "{}", out.stdout);
    let errors = out.errors();
    let expected: [&[&str]; 7] = [
        &["[[webhook]] #1", "\"item_changd\" is not defined"],
        &["[[webhook]] #2", "https//crm.example.com"],
        &["[[webhook]] #2", "not valid base64"],
        &["[[webhook]] #3", "\"BILLING_SECRET\"", "not set"],
        &["public.nowhere", "does not exist"],
        &["public.logs", "ADD PRIMARY KEY"],
        &["ALTER ROLE \"app\" WITH REPLICATION"],
    ];
    for needles in expected {
        assert!(
            errors.iter().any(|e| needles.iter().all(|n| e.contains(n))),
            "no error line with {needles:?} in:\n{}",
            out.stderr
        );
    }
    assert_eq!(
        errors.len(),
        expected.len(),
        "one line per problem:\n{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_a_bad_config_without_connecting() {
    let s = Scenario::new(ITEMS, &GOOD.replace("on = ", "onn = ")).await;
    // Nothing listens on this port: a `run` that tried the database would wait for it.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let url = format!("postgresql://postgres@127.0.0.1:{closed}/postgres");
    let out = run(&s, &url, &[]).await;
    out.single_error(&["onn", "unknown field"]);
    assert!(out.took < FAST, "took {:?}", out.took);
    assert!(
        !s.data_dir().exists(),
        "run created its data dir before refusing the config"
    );
    let out = run(&s, &s.pg.url(), &[]).await;
    assert_run_refused_untouched(&s, &out).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_an_invalidated_slot() {
    let s = Scenario::new(ITEMS, GOOD).await;
    s.pg.exec("SELECT pg_create_logical_replication_slot('walhook', 'pgoutput')")
        .await;
    // Let the server drop WAL the slot still needs: it invalidates the slot at the next
    // checkpoint once the slot is more than 1 MB behind.
    s.pg.exec("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        .await;
    s.pg.exec("SELECT pg_reload_conf()").await;
    for n in 0..3 {
        s.pg.exec(&format!(
            "INSERT INTO items VALUES ({n}, 'x'); SELECT pg_switch_wal()"
        ))
        .await;
    }
    s.pg.exec("CHECKPOINT").await;
    let client = s.pg.client().await;
    let status: Option<String> = client
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walhook'",
            &[],
        )
        .await
        .expect("slot")
        .get(0);
    assert_eq!(
        status.as_deref(),
        Some("lost"),
        "the slot was not invalidated"
    );

    let out = run(&s, &s.pg.url(), &[]).await;
    out.single_error(&[
        "\"walhook\"",
        "invalidated",
        "pg_drop_replication_slot('walhook')",
    ]);
    assert!(out.took < FAST, "took {:?}", out.took);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_free_wal_sender() {
    let s = Scenario::new(ITEMS, GOOD).await;
    s.pg.exec("ALTER SYSTEM SET max_wal_senders = 0").await;
    s.pg.restart();
    check(&s, &s.pg.url(), &[]).await.single_error(&[
        "replication connection",
        "refused",
        "max_wal_senders",
    ]);
}
