//! A real local HTTP/1.1 webhook receiver that records every request and answers according to
//! a programmable plan.
//!
//! ```text
//! TcpListener(127.0.0.1:0) ── accept ──> one task per connection (hyper http1, keep-alive)
//!                                            │  per request: read the whole body, then under
//!                                            ▼  one lock: pick the answer, record the request
//!                                         Shared { requests, plans }
//! ```
//!
//! Without a plan every request gets `200 ok`. `set_plan("/orders", Plan::fail_first(2, 500))`
//! makes the first two requests whose path starts with `/orders` get 500, then 200; the
//! longest matching prefix wins. The server stops when the `Receiver` is dropped.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// One request as it arrived, and what the receiver answered.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Position in arrival order, from 0.
    pub seq: usize,
    /// Which TCP connection carried it (from 0, in accept order): shows keep-alive reuse.
    pub conn: u64,
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub query: Option<String>,
    /// Names lowercased, in arrival order; a repeated header appears once per value.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// When the request head arrived (before its body was read).
    pub at: Instant,
    /// The status answered, or `None` when the plan hung up without answering.
    pub status: Option<u16>,
}

impl Recorded {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; panics with the body text when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request #{} to {} has a non-JSON body ({e}):\n{}",
                self.seq,
                self.path,
                self.body_text()
            )
        })
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl fmt::Display for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self
            .status
            .map_or_else(|| "hung up".to_string(), |s| s.to_string());
        writeln!(
            f,
            "#{} conn {} {} {}{} -> {status}",
            self.seq,
            self.conn,
            self.method,
            self.path,
            self.query
                .as_deref()
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        )?;
        for (name, value) in &self.headers {
            writeln!(f, "  {name}: {value}")?;
        }
        let body = self.body_text();
        let shown: String = body.chars().take(2000).collect();
        let ellipsis = if shown.len() < body.len() { "…" } else { "" };
        write!(f, "  body: {shown}{ellipsis}")
    }
}

/// One answer: status, headers, body, how long to wait before sending it — or hanging up
/// without answering.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub delay: Duration,
    /// Close the connection without any response (after `delay`).
    pub hang_up: bool,
}

impl Answer {
    /// `status` with body "ok". Panics on a status outside 100..=999.
    pub fn status(status: u16) -> Answer {
        assert!(
            StatusCode::from_u16(status).is_ok(),
            "{status} is not an HTTP status"
        );
        Answer {
            status,
            headers: Vec::new(),
            body: Bytes::from_static(b"ok"),
            delay: Duration::ZERO,
            hang_up: false,
        }
    }

    pub fn ok() -> Answer {
        Answer::status(200)
    }

    /// Close the connection without answering: the client sees the connection reset or closed.
    pub fn hang_up() -> Answer {
        Answer {
            hang_up: true,
            ..Answer::ok()
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Answer {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn with_body(mut self, body: impl Into<Bytes>) -> Answer {
        self.body = body.into();
        self
    }

    pub fn with_delay(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }
}

/// Answers for the requests to one path prefix: `first` in order, one per request, then
/// `then` for every request after.
#[derive(Clone, Debug)]
pub struct Plan {
    first: VecDeque<Answer>,
    then: Answer,
}

impl Plan {
    /// Every request gets `status`.
    pub fn always(status: u16) -> Plan {
        Plan::sequence([], Answer::status(status))
    }

    /// The first `n` requests get `status`, later ones 200.
    pub fn fail_first(n: usize, status: u16) -> Plan {
        Plan::sequence(vec![Answer::status(status); n], Answer::ok())
    }

    /// Every request gets 200, `delay` after it arrived (for timeout tests).
    pub fn delay(delay: Duration) -> Plan {
        Plan::sequence([], Answer::ok().with_delay(delay))
    }

    /// Every request is answered by closing the connection.
    pub fn hang_up() -> Plan {
        Plan::sequence([], Answer::hang_up())
    }

    /// `first` in order, one per request, then `then` forever.
    pub fn sequence(first: impl IntoIterator<Item = Answer>, then: Answer) -> Plan {
        Plan {
            first: first.into_iter().collect(),
            then,
        }
    }

    /// Adds a header to the plan's scripted answers: the `first` ones when there are any
    /// (`fail_first(2, 429).with_header("Retry-After", "2")` puts it on the two 429s only),
    /// otherwise the answer given to every request.
    pub fn with_header(self, name: &str, value: &str) -> Plan {
        self.map_scripted(|a| a.with_header(name, value))
    }

    /// Delays the plan's scripted answers (same rule as `with_header`).
    pub fn with_delay(self, delay: Duration) -> Plan {
        self.map_scripted(|a| a.with_delay(delay))
    }

    /// Sets the body of the plan's scripted answers (same rule as `with_header`).
    pub fn with_body(self, body: impl Into<Bytes>) -> Plan {
        let body = body.into();
        self.map_scripted(|a| a.with_body(body.clone()))
    }

    fn map_scripted(mut self, f: impl Fn(Answer) -> Answer) -> Plan {
        if self.first.is_empty() {
            self.then = f(self.then);
        } else {
            self.first = self.first.into_iter().map(f).collect();
        }
        self
    }

    fn next_answer(&mut self) -> Answer {
        self.first.pop_front().unwrap_or_else(|| self.then.clone())
    }
}

#[derive(Default)]
struct State {
    requests: Vec<Recorded>,
    /// (path prefix, plan); the longest matching prefix wins.
    plans: Vec<(String, Plan)>,
}

impl State {
    fn answer_for(&mut self, path: &str) -> Answer {
        self.plans
            .iter_mut()
            .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or_else(Answer::ok, |(_, plan)| plan.next_answer())
    }
}

pub struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// The accept loop; it owns every connection task, so aborting it stops them all.
    server: JoinHandle<()>,
}

impl Receiver {
    /// Binds 127.0.0.1:0 and serves on the current runtime until dropped.
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver on 127.0.0.1:0");
        let addr = listener.local_addr().expect("receiver address");
        let state = Arc::new(Mutex::new(State::default()));
        let server = tokio::spawn(serve(listener, state.clone()));
        Receiver {
            addr,
            state,
            server,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT{path}`; `path` starts with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The plan for every path without a more specific one.
    pub fn respond_with(&self, plan: Plan) {
        self.set_plan("/", plan);
    }

    /// The plan for paths starting with `path_prefix`, replacing any earlier plan for the
    /// same prefix (its remaining scripted answers are discarded).
    pub fn set_plan(&self, path_prefix: &str, plan: Plan) {
        let mut state = self.state.lock().expect("receiver state");
        state.plans.retain(|(prefix, _)| prefix != path_prefix);
        state.plans.push((path_prefix.to_string(), plan));
    }

    /// Everything received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().expect("receiver state").requests.clone()
    }

    /// How many requests arrived so far (without copying them, for tight polling loops).
    pub fn count(&self) -> usize {
        self.state.lock().expect("receiver state").requests.len()
    }

    /// Everything received so far whose path is exactly `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        let mut requests = self.requests();
        requests.retain(|r| r.path == path);
        requests
    }

    /// Polls every 20 ms until `pred` holds for what has arrived, and returns it. Panics with
    /// a dump of every request when `timeout` passes first.
    pub async fn wait_for(
        &self,
        pred: impl Fn(&[Recorded]) -> bool,
        timeout: Duration,
    ) -> Vec<Recorded> {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.requests();
            if pred(&requests) {
                return requests;
            }
            if Instant::now() >= deadline {
                panic!(
                    "receiver: condition not met after {timeout:?}; {} request(s) arrived:\n{}",
                    requests.len(),
                    dump(&requests)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        self.wait_for(|requests| requests.len() >= n, timeout).await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Renders requests for failure messages.
pub fn dump(requests: &[Recorded]) -> String {
    requests
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>) {
    // Owned here so that aborting this task (on drop) drops the set, which aborts every
    // connection task.
    let mut connections = JoinSet::new();
    let mut next_conn = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // E.g. out of file descriptors: let it pass rather than spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let conn = next_conn;
                next_conn += 1;
                let state = state.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), conn, req));
                    // Errors here are the client going away or our deliberate hang-ups.
                    let _ = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            // Reaps finished connections so the set does not grow for the whole test.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A service error: hyper closes the connection without answering.
#[derive(Debug)]
struct HangUp;

impl fmt::Display for HangUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("receiver plan: hang up")
    }
}

impl std::error::Error for HangUp {}

async fn handle(
    state: Arc<Mutex<State>>,
    conn: u64,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, HangUp> {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    // A body that fails to arrive is the client's problem, not a request to record.
    let body = body.collect().await.map_err(|_| HangUp)?.to_bytes();
    let answer = {
        let mut state = state.lock().expect("receiver state");
        let answer = state.answer_for(parts.uri.path());
        let seq = state.requests.len();
        state.requests.push(Recorded {
            seq,
            conn,
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| {
                    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    (name.as_str().to_string(), value)
                })
                .collect(),
            body,
            at,
            status: (!answer.hang_up).then_some(answer.status),
        });
        answer
    };
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    if answer.hang_up {
        return Err(HangUp);
    }
    let mut response = Response::builder().status(answer.status);
    for (name, value) in &answer.headers {
        response = response.header(name, value);
    }
    Ok(response
        .body(Full::new(answer.body))
        .expect("status and headers come from the test's plan"))
}
