//! TLS to PostgreSQL, through the command line only: `--database-url` with `sslmode` and
//! `sslrootcert`, against a cluster with `ssl = on` and a certificate from a throwaway CA
//! ([`PgCluster::start_with_ssl`]), or against a cluster without SSL.
//!
//! That a session really is encrypted is read from the server: `pg_stat_ssl` for the
//! sessions walhook holds open, and the `log_connections` lines of the SSL cluster's log
//! ("... application_name=walhook SSL enabled ...") for every connection it ever made,
//! short-lived `check` connections included.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{rows_of, signature_ok, PgCluster, Scenario, Walhook, CUSTOMER_CONFIG, WAIT};

const CUSTOMERS: &str = "CREATE TABLE customers (id bigint PRIMARY KEY, email text)";

/// A refusal (bad certificate, no SSL on the server) is known at the handshake: well within
/// this, and well within walhook's own 10 s connect timeout.
const FAST: Duration = Duration::from_secs(5);

/// `sslmode=MODE&sslrootcert=PATH`
fn verify(mode: &str, root: &Path) -> String {
    format!("sslmode={mode}&sslrootcert={}", root.display())
}

/// Runs `walhook check` with `url` and asserts it passes.
async fn assert_check_passes(s: &Scenario, url: &str) {
    let (status, stdout, stderr) = s.check_with(url).await;
    assert!(
        status.success() && stdout.contains("ok:"),
        "check with {url} failed ({status}):\n{stdout}{stderr}"
    );
}

/// Runs `walhook check` with `url`, asserts it fails quickly with exactly one error line,
/// and returns that line.
async fn check_refuses(s: &Scenario, url: &str) -> String {
    let started = Instant::now();
    let (status, stdout, stderr) = s.check_with(url).await;
    let took = started.elapsed();
    assert!(
        !status.success(),
        "check with {url} exited 0:\n{stdout}{stderr}"
    );
    assert!(took < FAST, "check with {url} took {took:?} to fail");
    let errors: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("walhook: error: "))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "check with {url}: expected one error line, stderr:\n{stderr}"
    );
    // Shown when the test fails later.
    eprintln!("check with {url} refused: {}", errors[0]);
    errors[0].to_string()
}

/// Starts `walhook run` with `url` and waits until it has either exited (non-zero) or logged
/// a warning or error for which `mentions` holds (walhook may keep retrying a connection);
/// asserts it never streamed and returns its log.
async fn run_refuses(s: &Scenario, url: &str, mentions: impl Fn(&str) -> bool) -> String {
    let mut walhook = Walhook::spawn(&s.run_args_for(url), &[]);
    let deadline = Instant::now() + WAIT;
    let log = loop {
        let exited = walhook.try_exit();
        let log = walhook.log();
        let reported = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("error:"))
            .any(&mentions);
        if let Some(status) = exited {
            assert!(!status.success(), "run with {url} exited 0:\n{log}");
            assert!(reported, "run with {url} exited without saying why:\n{log}");
            break log;
        }
        if reported {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "run with {url} neither exited nor reported the problem within {WAIT:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        !log.contains("streaming"),
        "run with {url} streamed:\n{log}"
    );
    log
}

/// Inserts a row and asserts that exactly its signed notification arrives.
async fn assert_insert_notifies(s: &Scenario, id: i64) {
    let before = s.receiver.requests().len();
    s.pg.exec(&format!(
        "INSERT INTO customers VALUES ({id}, 'c{id}@example.com')"
    ))
    .await;
    let got = s.receiver.wait_for_count(before + 1, WAIT).await;
    let new = &got[before..];
    assert_eq!(rows_of(new, "insert"), vec![json!(id)], "{new:?}");
    for r in new {
        assert!(signature_ok(r), "bad signature on {r}");
        assert_eq!(r.json()["hook_id"], "crm-sync");
        assert_eq!(r.path, "/hooks/crm");
    }
}

/// `(backend_type, ssl)` of every server session whose application_name is walhook.
async fn walhook_sessions(pg: &PgCluster) -> Vec<(String, bool)> {
    pg.client()
        .await
        .query(
            "SELECT a.backend_type, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'walhook' ORDER BY a.backend_type",
            &[],
        )
        .await
        .expect("query pg_stat_ssl")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Asserts that walhook holds a replication session and that each of its sessions uses SSL.
async fn assert_sessions_encrypted(pg: &PgCluster) {
    let encrypted: i64 = pg
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND application_name = 'walhook'",
            &[],
        )
        .await
        .expect("count encrypted sessions")
        .get(0);
    assert!(encrypted > 0, "no encrypted walhook session");
    let sessions = walhook_sessions(pg).await;
    assert!(
        sessions.iter().any(|(kind, _)| kind == "walsender"),
        "walhook holds no replication session: {sessions:?}"
    );
    assert!(
        sessions.iter().all(|(_, ssl)| *ssl),
        "a walhook session without SSL: {sessions:?}"
    );
}

/// The server log's `log_connections` lines for walhook's connections.
fn walhook_connections_logged(pg: &PgCluster) -> Vec<String> {
    pg.log_contents()
        .lines()
        .filter(|l| l.contains("connection authorized") && l.contains("application_name=walhook"))
        .map(str::to_string)
        .collect()
}

/// Asserts the server logged a replication connection of walhook's (so the TLS settings
/// reached that connection too), and returns every walhook connection line.
fn assert_replication_logged(pg: &PgCluster) -> Vec<String> {
    let lines = walhook_connections_logged(pg);
    assert!(
        lines.iter().any(|l| l.contains("replication connection")),
        "no replication connection of walhook's in the server log:\n{lines:#?}"
    );
    lines
}

/// `psql` (libpq, the reference client) with `sslmode` and `sslrootcert` as in the URLs the
/// tests give walhook: Ok(whether the session is encrypted) or Err(stderr).
fn libpq_connects(pg: &PgCluster, mode: &str, root: &Path) -> Result<bool, String> {
    let out = Command::new(pg.program("psql"))
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode={mode} sslrootcert={} connect_timeout=5",
            pg.port(),
            root.display()
        ))
        .args(["-X", "-A", "-t", "-c"])
        .arg("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "t")
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The harness itself: libpq accepts the SSL clusters' certificates exactly where walhook
/// should, so a failure below is walhook's, not the certificates'.
#[test]
fn harness_certificates_behave_for_libpq() {
    let pg = PgCluster::start_with_ssl();
    let ssl = pg.ssl().clone();
    for mode in ["require", "verify-ca", "verify-full"] {
        assert_eq!(libpq_connects(&pg, mode, &ssl.ca_cert), Ok(true), "{mode}");
    }
    let wrong = libpq_connects(&pg, "verify-full", &ssl.other_ca_cert);
    assert!(
        wrong
            .as_ref()
            .is_err_and(|e| e.contains("certificate verify failed")),
        "{wrong:?}"
    );
    assert_eq!(
        libpq_connects(&pg, "disable", &ssl.ca_cert),
        Ok(false),
        "plain connections are still accepted"
    );

    let localhost_only = PgCluster::start_with_ssl_sans("DNS:localhost");
    let ca = localhost_only.ssl().ca_cert.clone();
    assert_eq!(libpq_connects(&localhost_only, "verify-ca", &ca), Ok(true));
    let by_ip = libpq_connects(&localhost_only, "verify-full", &ca);
    assert!(
        by_ip
            .as_ref()
            .is_err_and(|e| e.contains("does not match host name")),
        "{by_ip:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_sql_and_replication_and_streams() {
    let s = Scenario::with_pg(PgCluster::start_with_ssl(), CUSTOMERS, CUSTOMER_CONFIG).await;
    let url = s.pg.url_with("sslmode=require");
    assert_check_passes(&s, &url).await;
    let _walhook = s.start_walhook_for(&url).await;
    assert_insert_notifies(&s, 1).await;
    assert_sessions_encrypted(&s.pg).await;

    // Every connection check and run made, the short-lived SQL ones included.
    let lines = assert_replication_logged(&s.pg);
    assert!(
        lines.iter().any(|l| !l.contains("replication connection")),
        "no SQL connection of walhook's in the server log:\n{lines:#?}"
    );
    for line in &lines {
        assert!(
            line.contains("SSL enabled"),
            "a walhook connection without SSL: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca_streams() {
    let s = Scenario::with_pg(PgCluster::start_with_ssl(), CUSTOMERS, CUSTOMER_CONFIG).await;
    // The host is an IP address: it is matched against the certificate's IP SAN.
    let url = s.pg.url_with(&verify("verify-full", &s.pg.ssl().ca_cert));
    assert_check_passes(&s, &url).await;
    let _walhook = s.start_walhook_for(&url).await;
    assert_insert_notifies(&s, 1).await;
    assert_insert_notifies(&s, 2).await;
    assert_sessions_encrypted(&s.pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_an_unrelated_ca_is_refused() {
    let s = Scenario::with_pg(PgCluster::start_with_ssl(), CUSTOMERS, CUSTOMER_CONFIG).await;
    let url =
        s.pg.url_with(&verify("verify-full", &s.pg.ssl().other_ca_cert));
    let mentions_certificate = |l: &str| l.to_lowercase().contains("certificate");
    let error = check_refuses(&s, &url).await;
    assert!(
        mentions_certificate(&error),
        "the error does not mention the certificate: {error}"
    );
    run_refuses(&s, &url, mentions_certificate).await;
    // Refused at the handshake: no connection of walhook's got as far as authentication
    // (so none fell back to an unverified or plain one).
    let lines = walhook_connections_logged(&s.pg);
    assert!(lines.is_empty(), "walhook connected anyway:\n{lines:#?}");
    assert!(walhook_sessions(&s.pg).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_ssl_is_refused() {
    let s = Scenario::new(CUSTOMERS, CUSTOMER_CONFIG).await;
    let url = s.pg.url_with("sslmode=require");
    // The option names (from an echoed URL or a hint) do not count as saying why.
    let mentions_tls = |l: &str| {
        let l = l
            .to_lowercase()
            .replace("sslmode", "")
            .replace("sslrootcert", "");
        l.contains("tls") || l.contains("ssl")
    };
    let error = check_refuses(&s, &url).await;
    assert!(
        mentions_tls(&error),
        "the error does not mention TLS: {error}"
    );
    run_refuses(&s, &url, mentions_tls).await;
    let sessions = walhook_sessions(&s.pg).await;
    assert!(
        sessions.is_empty(),
        "walhook connected anyway: {sessions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_host_name() {
    // The certificate names only localhost.
    let pg = PgCluster::start_with_ssl_sans("DNS:localhost");
    let s = Scenario::with_pg(pg, CUSTOMERS, CUSTOMER_CONFIG).await;
    let ca = s.pg.ssl().ca_cert.clone();

    let by_ip = s.pg.url_with(&verify("verify-full", &ca));
    assert!(by_ip.contains("@127.0.0.1:"), "{by_ip}");
    let error = check_refuses(&s, &by_ip).await;
    assert!(
        error.to_lowercase().contains("certificate"),
        "the error does not mention the certificate: {error}"
    );

    // By the name the certificate lists, the same CA is accepted.
    let by_name = by_ip.replace("@127.0.0.1:", "@localhost:");
    assert_check_passes(&s, &by_name).await;
    let _walhook = s.start_walhook_for(&by_name).await;
    assert_insert_notifies(&s, 1).await;
    assert_sessions_encrypted(&s.pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_checks_the_chain_but_not_the_host_name() {
    // The certificate names only localhost; the URL's host is 127.0.0.1.
    let pg = PgCluster::start_with_ssl_sans("DNS:localhost");
    let s = Scenario::with_pg(pg, CUSTOMERS, CUSTOMER_CONFIG).await;
    let url = s.pg.url_with(&verify("verify-ca", &s.pg.ssl().ca_cert));
    assert_check_passes(&s, &url).await;
    let _walhook = s.start_walhook_for(&url).await;
    assert_insert_notifies(&s, 1).await;
    assert_sessions_encrypted(&s.pg).await;
    assert_replication_logged(&s.pg);

    // The chain is still checked.
    let wrong =
        s.pg.url_with(&verify("verify-ca", &s.pg.ssl().other_ca_cert));
    let error = check_refuses(&s, &wrong).await;
    assert!(
        error.to_lowercase().contains("certificate"),
        "the error does not mention the certificate: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_authenticates_where_the_server_requires_one() {
    let s = Scenario::with_pg(PgCluster::start_with_ssl(), CUSTOMERS, CUSTOMER_CONFIG).await;
    s.pg.require_client_certificates().await;
    let ssl = s.pg.ssl().clone();

    // Without one, the server refuses walhook, and walhook says why.
    let error = check_refuses(&s, &s.pg.url_with("sslmode=require")).await;
    assert!(
        error.to_lowercase().contains("certificate"),
        "the error does not mention the certificate: {error}"
    );

    let url = s.pg.url_with(&format!(
        "{}&sslcert={}&sslkey={}",
        verify("verify-full", &ssl.ca_cert),
        ssl.client_cert.display(),
        ssl.client_key.display()
    ));
    assert_check_passes(&s, &url).await;
    let _walhook = s.start_walhook_for(&url).await;
    assert_insert_notifies(&s, 1).await;
    assert_sessions_encrypted(&s.pg).await;
    assert_replication_logged(&s.pg);
}
