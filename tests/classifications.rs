//! Classification files, checked by `walhook check --classifications DIR` against a real
//! database: the shipped examples pass; each kind of bad file is named with its line and fix.

use std::path::Path;

use crate::support::{run_to_completion, Scenario, WAIT};

const SCHEMA: &str = "
CREATE TABLE customers (id bigint PRIMARY KEY, email text NOT NULL, status text NOT NULL,
                        deleted_at timestamptz);
CREATE TABLE contracts (id bigint PRIMARY KEY, customer_id bigint REFERENCES customers,
                        starts_on date NOT NULL, ends_on date, signed boolean NOT NULL DEFAULT false);
CREATE TABLE bookings (id uuid PRIMARY KEY, customer_id bigint REFERENCES customers,
                       status text NOT NULL, paid_cents integer NOT NULL DEFAULT 0,
                       price_cents integer NOT NULL);
CREATE TABLE notes (body text);
";

const CONFIG: &str = r#"
[[event]]
name = "customer_changed"
table = "public.customers"
on = ["insert"]

[[webhook]]
id = "crm"
event = "customer_changed"
url = "{receiver}/hooks"
secret = "{secret}"
"#;

/// The arguments of `walhook check` with `--classifications dir`.
fn check_args(s: &Scenario, dir: &Path) -> [String; 7] {
    [
        "check".to_string(),
        "--database-url".into(),
        s.pg.url(),
        "--config".into(),
        s.config.display().to_string(),
        "--classifications".into(),
        dir.display().to_string(),
    ]
}

/// `walhook check` with `--classifications dir`: (success, error lines).
async fn check(s: &Scenario, dir: &Path) -> (bool, Vec<String>) {
    let (status, _, stderr) = run_to_completion(&check_args(s, dir), &[], WAIT).await;
    let errors = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("walhook: error: "))
        .map(str::to_string)
        .collect();
    (status.success(), errors)
}

/// A foreign key a condition follows with no index on its columns makes every lookup a scan
/// (the baseline goes quadratic): `check` (and `run`) say so in one line with the fix, and
/// stop saying it once the index exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_foreign_key_without_an_index_is_named_with_the_fix() {
    // Only classifications an event uses are planned.
    let config = format!(
        "{CONFIG}\n[[event]]\nname = \"became_active\"\nclassification = \"customer_active\"\n\
         from = \"false\"\nto = \"true\"\n\n[[webhook]]\nid = \"lifecycle\"\nevent = \"became_active\"\n\
         url = \"{{receiver}}/hooks\"\nsecret = \"{{secret}}\"\n"
    );
    let s = Scenario::new(SCHEMA, &config).await;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/classifications");
    let args = check_args(&s, &examples);
    let warned = |stderr: &str| {
        stderr
            .lines()
            .filter(|l| l.contains("no index on contracts (customer_id)"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let (status, _, stderr) = run_to_completion(&args, &[], WAIT).await;
    assert!(status.success(), "{stderr}");
    let lines = warned(&stderr);
    assert!(!lines.is_empty(), "no warning:\n{stderr}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("fix: CREATE INDEX ON contracts (customer_id)")),
        "{lines:#?}"
    );
    s.pg.exec("CREATE INDEX ON contracts (customer_id)").await;
    let (status, _, stderr) = run_to_completion(&args, &[], WAIT).await;
    assert!(status.success(), "{stderr}");
    assert!(warned(&stderr).is_empty(), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_examples_pass_every_check() {
    let s = Scenario::new(SCHEMA, CONFIG).await;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/classifications");
    let (ok, errors) = check(&s, &examples).await;
    assert!(ok, "{errors:#?}");
    assert!(errors.is_empty(), "{errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_file_is_named_with_its_line_and_fix() {
    let s = Scenario::new(SCHEMA, CONFIG).await;
    let dir = s.dir.path().join("classifications");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let files = [
        (
            "good.sql",
            "-- fine\nSELECT id FROM customers c WHERE c.status = 'active'\n",
        ),
        (
            "not_the_key.sql",
            "-- selects the wrong column\nSELECT email FROM customers WHERE status = 'x'\n",
        ),
        (
            "typo.sql",
            "-- a typo on line 4\nSELECT id\nFROM customers\nWHERE statuss = 'x'\n",
        ),
        (
            "no_table.sql",
            "SELECT id FROM public.customer WHERE true\n",
        ),
        ("no_key.sql", "SELECT body FROM notes WHERE body <> ''\n"),
        (
            "qualified.sql",
            "SELECT id FROM public.customers\nWHERE public.customers.status = 'x'\n",
        ),
        ("wrong_form.sql", "SELECT id FROM customers ORDER BY id\n"),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write");
    }
    let (ok, errors) = check(&s, &dir).await;
    assert!(!ok);
    let line_for = |file: &str| -> String {
        let matching: Vec<&String> = errors.iter().filter(|e| e.contains(file)).collect();
        assert_eq!(matching.len(), 1, "{file}: {errors:#?}");
        matching[0].clone()
    };
    let e = line_for("not_the_key.sql:2:");
    assert!(
        e.contains("selects (email)") && e.contains("primary key of public.customers is (id)"),
        "{e}"
    );
    let e = line_for("typo.sql:4:");
    assert!(
        e.contains("PostgreSQL rejects the query") && e.contains("statuss"),
        "{e}"
    );
    let e = line_for("no_table.sql");
    assert!(e.contains("public.customer does not exist"), "{e}");
    let e = line_for("no_key.sql");
    assert!(
        e.contains("no primary key") && e.contains("ADD PRIMARY KEY"),
        "{e}"
    );
    let e = line_for("qualified.sql:2:");
    assert!(e.contains("cannot be evaluated on a row image"), "{e}");
    let e = line_for("wrong_form.sql:1:");
    assert!(
        e.contains("ORDER is not allowed") || e.contains("no WHERE"),
        "{e}"
    );
    assert!(
        errors.iter().all(|e| !e.contains("good.sql")),
        "good.sql was reported: {errors:#?}"
    );
    // Six bad files, one line each.
    assert_eq!(errors.len(), 6, "{errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classification_events_must_name_a_classification_file() {
    let config = r#"
[[event]]
name = "became_active"
classification = "customer_active"
from = "false"
to = "true"

[[event]]
name = "typo"
classification = "customer_actve"
from = "any"
to = "null"

[[webhook]]
id = "crm"
event = "became_active"
url = "{receiver}/hooks"
secret = "{secret}"
"#;
    let s = Scenario::new(SCHEMA, config).await;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/classifications");
    let (ok, errors) = check(&s, &examples).await;
    assert!(!ok);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors.iter().any(|e| e.contains("\"typo\"")
            && e.contains("no customer_actve.sql")
            && e.contains("customer_active")),
        "{errors:#?}"
    );
    // `run` refuses the same config with the same line, before touching the database, and
    // without --classifications says which flag is missing.
    let mut args = s.run_args();
    args.extend([
        "--classifications".to_string(),
        examples.display().to_string(),
    ]);
    let (status, _, stderr) = run_to_completion(&args, &[], WAIT).await;
    assert!(!status.success());
    assert!(
        stderr.contains("walhook: error:") && stderr.contains("no customer_actve.sql"),
        "{stderr}"
    );
    let (status, _, stderr) = run_to_completion(&s.run_args(), &[], WAIT).await;
    assert!(!status.success());
    assert!(stderr.contains("pass --classifications DIR"), "{stderr}");
    assert!(
        !s.data_dir().exists(),
        "nothing was created before the config was refused"
    );
}
