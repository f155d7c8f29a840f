//! Self-test of the harness in `support/`: the cluster and the receiver are real, so a broken
//! harness fails here first instead of as a puzzling walhook failure.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Answer, PgCluster, Plan, Receiver};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn cluster_runs_with_logical_wal_level() {
    let pg = PgCluster::start();
    pg.exec("CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'one'), (2, 'two');")
        .await;

    let client = pg.client().await;
    let row = client
        .query_one("SELECT count(*), max(name) FROM items", &[])
        .await
        .expect("query items");
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(row.get::<_, String>(1), "two");
    let row = client
        .query_one("SHOW wal_level", &[])
        .await
        .expect("show wal_level");
    assert_eq!(row.get::<_, String>(0), "logical");
    assert!(pg.url().ends_with(&format!(":{}/postgres", pg.port())));
}

#[tokio::test]
async fn two_clusters_run_side_by_side() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(PgCluster::start);
        let b = s.spawn(PgCluster::start);
        (
            a.join().expect("start cluster a"),
            b.join().expect("start cluster b"),
        )
    });
    assert_ne!(a.port(), b.port());
    a.exec("CREATE TABLE only_in_a (id int)").await;
    b.exec("CREATE TABLE only_in_b (id int)").await;
    let tables = |pg: &PgCluster| {
        let url = pg.url();
        async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(connection);
            let rows = client
                .query(
                    "SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'only_in_%'",
                    &[],
                )
                .await
                .expect("list tables");
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(tables(&a).await, ["only_in_a"]);
    assert_eq!(tables(&b).await, ["only_in_b"]);
}

#[tokio::test]
async fn cluster_keeps_data_and_port_across_restart_and_crash() {
    let pg = PgCluster::start();
    let port = pg.port();
    pg.exec("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await;

    pg.restart();
    pg.exec("INSERT INTO t VALUES (2)").await;

    pg.stop_immediate();
    pg.start_again();
    let client = pg.client().await;
    let row = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count after crash recovery");
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(pg.port(), port);
    assert!(pg
        .log_contents()
        .contains("database system was interrupted"));
}

#[tokio::test]
async fn dropping_a_cluster_stops_its_server() {
    let pg = PgCluster::start();
    let pid_file = pg.data_dir().join("postmaster.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("read postmaster.pid")
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("postmaster pid");
    let dir = pg.dir().to_path_buf();
    assert!(process_alive(pid));

    drop(pg);
    assert!(!process_alive(pid), "postmaster {pid} survived drop");
    assert!(!dir.exists(), "{} not removed", dir.display());
}

#[tokio::test]
async fn receiver_records_a_post() {
    let receiver = Receiver::start().await;
    let (status, body) = post(
        receiver.addr(),
        "/hooks/orders?x=1",
        &[
            ("Content-Type", "application/json"),
            ("X-Walhook-Id", "abc"),
        ],
        br#"{"table":"orders","op":"insert"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, b"ok");

    let recorded = receiver.wait_for_count(1, WAIT).await;
    let r = &recorded[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/hooks/orders");
    assert_eq!(r.query.as_deref(), Some("x=1"));
    assert_eq!(r.header("x-walhook-id"), Some("abc"));
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(r.json()["table"], "orders");
    assert_eq!(r.status, Some(200));
    assert_eq!(receiver.url("/a"), format!("http://{}/a", receiver.addr()));
}

#[tokio::test]
async fn fail_first_answers_failures_then_ok() {
    let receiver = Receiver::start().await;
    receiver.respond_with(Plan::fail_first(2, 500));
    let mut statuses = Vec::new();
    for i in 0..3 {
        let (status, _) = post(receiver.addr(), "/hook", &[], format!("{i}").as_bytes()).await;
        statuses.push(status);
    }
    assert_eq!(statuses, [500, 500, 200]);
    let recorded = receiver.requests();
    let bodies: Vec<String> = recorded.iter().map(|r| r.body_text()).collect();
    assert_eq!(bodies, ["0", "1", "2"]);
    let answered: Vec<Option<u16>> = recorded.iter().map(|r| r.status).collect();
    assert_eq!(answered, [Some(500), Some(500), Some(200)]);
}

#[tokio::test]
async fn plans_apply_per_path_prefix_with_headers() {
    let receiver = Receiver::start().await;
    receiver.respond_with(Plan::always(204));
    receiver.set_plan(
        "/busy",
        Plan::fail_first(1, 429).with_header("Retry-After", "2"),
    );
    receiver.set_plan("/busy/forever", Plan::always(503));

    let mut stream = TcpStream::connect(receiver.addr()).await.expect("connect");
    let first = exchange(&mut stream, "/busy/x", &[], b"").await;
    let second = exchange(&mut stream, "/busy/x", &[], b"").await;
    let third = exchange(&mut stream, "/busy/forever", &[], b"").await;
    let fourth = exchange(&mut stream, "/other", &[], b"").await;
    assert_eq!(first.0, 429);
    assert!(first.1.contains("retry-after: 2"), "{}", first.1);
    assert_eq!(second.0, 200);
    assert!(!second.1.contains("retry-after"), "{}", second.1);
    assert_eq!(third.0, 503);
    assert_eq!(fourth.0, 204);
    // One connection carried all four: keep-alive works.
    let conns: Vec<u64> = receiver.requests().iter().map(|r| r.conn).collect();
    assert_eq!(conns, [0, 0, 0, 0]);
}

#[tokio::test]
async fn delay_and_hang_up_plans() {
    let receiver = Receiver::start().await;
    receiver.set_plan("/slow", Plan::delay(Duration::from_millis(300)));
    receiver.set_plan(
        "/flaky",
        Plan::sequence([Answer::hang_up()], Answer::status(202)),
    );

    let started = std::time::Instant::now();
    let (status, _) = post(receiver.addr(), "/slow", &[], b"").await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    let mut stream = TcpStream::connect(receiver.addr()).await.expect("connect");
    let request = "POST /flaky HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n";
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut reply = Vec::new();
    // The receiver closes the connection without a response: EOF or reset, no bytes.
    let _ = stream.read_to_end(&mut reply).await;
    assert!(reply.is_empty(), "{}", String::from_utf8_lossy(&reply));

    let (status, _) = post(receiver.addr(), "/flaky", &[], b"").await;
    assert_eq!(status, 202);
    let answered: Vec<Option<u16>> = receiver
        .requests_to("/flaky")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(answered, [None, Some(202)]);
}

/// One POST on a fresh connection; returns (status, body).
async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect to receiver");
    let (status, _, body) = exchange(&mut stream, path, headers, body).await;
    (status, body)
}

/// Writes one raw HTTP/1.1 POST on `stream` and reads one response; returns (status,
/// lowercased head, body).
async fn exchange(
    stream: &mut TcpStream,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await.expect("send request");

    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.expect("read response");
        assert!(
            n > 0,
            "connection closed mid-response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().expect("content-length"));
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    (status, head, body)
}

/// Running and not a zombie (a dead postmaster may linger as a zombie until reaped).
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}
