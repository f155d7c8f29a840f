//! The usual test set-up in one place: a cluster with some tables, a receiver, a config
//! pointing at the receiver, a data dir, and the real walhook binary streaming.

use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;
use walhook::deliver::sign::{verify, SigningKey};

use super::{write_config, PgCluster, Receiver, Recorded, Walhook};

/// The Standard Webhooks test-vector secret; every test config signs with it.
pub const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// How long tests wait for something that should happen within a second or two.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Scenario {
    pub pg: PgCluster,
    pub receiver: Receiver,
    pub dir: TempDir,
    pub config: PathBuf,
}

impl Scenario {
    /// Starts a cluster, runs `setup_sql`, starts a receiver, and writes `config`, in which
    /// `{receiver}` stands for the receiver's base URL (no trailing slash) and `{secret}` for
    /// [`SECRET`].
    pub async fn new(setup_sql: &str, config: &str) -> Scenario {
        Scenario::with_pg(PgCluster::start(), setup_sql, config).await
    }

    /// [`Scenario::new`] on a cluster the test started itself, e.g. with
    /// [`PgCluster::start_with_ssl`].
    pub async fn with_pg(pg: PgCluster, setup_sql: &str, config: &str) -> Scenario {
        if !setup_sql.is_empty() {
            pg.exec(setup_sql).await;
        }
        let receiver = Receiver::start().await;
        let dir = tempfile::Builder::new()
            .prefix("walhook-test-")
            .tempdir()
            .expect("temp dir");
        let config = write_config(dir.path(), &expand(config, &receiver));
        Scenario {
            pg,
            receiver,
            dir,
            config,
        }
    }

    /// Replaces the config file (placeholders as in [`Scenario::new`]); a running walhook
    /// reads it when restarted.
    pub fn rewrite_config(&self, config: &str) {
        write_config(self.dir.path(), &expand(config, &self.receiver));
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Arguments of `walhook run` for this scenario (default slot and publication).
    pub fn run_args(&self) -> Vec<String> {
        self.run_args_for(&self.pg.url())
    }

    /// Arguments of `walhook run` for this scenario, connecting with `database_url` (e.g.
    /// [`PgCluster::url_with`] some `sslmode`).
    pub fn run_args_for(&self, database_url: &str) -> Vec<String> {
        vec![
            "run".into(),
            "--database-url".into(),
            database_url.into(),
            "--data-dir".into(),
            self.data_dir().display().to_string(),
            "--config".into(),
            self.config.display().to_string(),
        ]
    }

    /// Spawns `walhook run` and waits until it streams.
    pub async fn start_walhook(&self) -> Walhook {
        self.start_walhook_with(&[]).await
    }

    /// Spawns `walhook run` with `extra` arguments appended (e.g. `--publication NAME`) and
    /// waits until it streams.
    pub async fn start_walhook_with(&self, extra: &[&str]) -> Walhook {
        let mut args = self.run_args();
        args.extend(extra.iter().map(|a| a.to_string()));
        let walhook = Walhook::spawn(&args, &[]);
        walhook.wait_log_contains("streaming", WAIT).await;
        walhook
    }

    /// Spawns `walhook run` connecting with `database_url` and waits until it streams.
    pub async fn start_walhook_for(&self, database_url: &str) -> Walhook {
        let walhook = Walhook::spawn(&self.run_args_for(database_url), &[]);
        walhook.wait_log_contains("streaming", WAIT).await;
        walhook
    }

    /// `walhook check --database-url URL --config FILE` for this scenario's config:
    /// (exit status, stdout, stderr). Panics when it runs longer than [`WAIT`].
    pub async fn check_with(
        &self,
        database_url: &str,
    ) -> (std::process::ExitStatus, String, String) {
        let args = [
            "check".to_string(),
            "--database-url".into(),
            database_url.into(),
            "--config".into(),
            self.config.display().to_string(),
        ];
        super::run_to_completion(&args, &[], WAIT).await
    }

    /// `walhook deliveries --data-dir DIR <args>`: (success, stdout, stderr).
    pub async fn deliveries(&self, args: &[&str]) -> (bool, String, String) {
        let mut all = vec![
            "deliveries".to_string(),
            "--data-dir".into(),
            self.data_dir().display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let (status, out, err) = super::run_to_completion(&all, &[], WAIT).await;
        (status.success(), out, err)
    }

    /// The slot's confirmed flush position and the server's current WAL position, as
    /// comparable numbers.
    pub async fn slot_and_wal(&self, slot: &str) -> (u64, u64) {
        let client = self.pg.client().await;
        let row = client
            .query_one(
                "SELECT (confirmed_flush_lsn - '0/0')::text, (pg_current_wal_lsn() - '0/0')::text \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("slot exists");
        let num = |i: usize| row.get::<_, String>(i).parse::<u64>().expect("lsn number");
        (num(0), num(1))
    }
}

impl Scenario {
    /// How many chunks a table's TOAST table holds.
    pub async fn toast_chunks(&self, table: &str) -> i64 {
        let client = self.pg.client().await;
        let toast: String = client
            .query_one(
                "SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = $1::text::regclass",
                &[&table],
            )
            .await
            .expect("find the TOAST table")
            .get(0);
        client
            .query_one(&format!("SELECT count(*) FROM {toast}"), &[])
            .await
            .expect("count TOAST chunks")
            .get(0)
    }
}

/// The seed of a randomized test: environment variable `var` when set (to replay a run),
/// else a random one.
pub fn seed(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var} is a u64")),
        Err(_) => fastrand::u64(..),
    }
}

/// `config` with `{receiver}` and `{secret}` filled in.
fn expand(config: &str, receiver: &Receiver) -> String {
    let base = receiver.url("");
    config
        .replace("{receiver}", base.trim_end_matches('/'))
        .replace("{secret}", SECRET)
}

/// True when the request carries a valid Standard Webhooks signature made with [`SECRET`].
pub fn signature_ok(r: &Recorded) -> bool {
    let key = SigningKey::parse(SECRET).expect("test secret");
    let (Some(id), Some(ts), Some(sig)) = (
        r.header("webhook-id"),
        r.header("webhook-timestamp")
            .and_then(|t| t.parse::<i64>().ok()),
        r.header("webhook-signature"),
    ) else {
        return false;
    };
    verify(&[key], id, ts, &r.body, sig)
}

/// The `rows` of every request whose body has this `op`, in arrival order, flattened.
pub fn rows_of(requests: &[Recorded], op: &str) -> Vec<serde_json::Value> {
    requests
        .iter()
        .map(|r| r.json())
        .filter(|b| b["op"] == op)
        .flat_map(|b| b["rows"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// One event on every change of `public.customers`, delivered to the webhook `crm-sync` at
/// the receiver's `/hooks/crm` (for a table with an `id` primary key).
pub const CUSTOMER_CONFIG: &str = r#"
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
