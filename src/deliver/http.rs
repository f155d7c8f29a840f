//! One HTTP attempt: POST a signed notification to an endpoint and report what happened.
//!
//! An attempt never fails as a Rust error: timeouts, refused connections and non-200 statuses
//! all come back as an [`Outcome`] for the attempt log and the retry schedule. Success is
//! exactly HTTP 200; redirects are not followed. One deadline covers connecting, the response
//! headers and reading the first KiB of the body, so a slow endpoint costs at most `timeout`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use tokio::time::{timeout_at, Instant};

use super::retry::parse_retry_after;
use super::sign::{signature_header, SigningKey};

pub const USER_AGENT: &str = concat!("walhook/", env!("CARGO_PKG_VERSION"));

/// The attempt log keeps the first KiB of the response: enough to see an error page, small
/// enough that a misbehaving endpoint cannot fill the log or the heap.
const BODY_HEAD_LIMIT: usize = 1024;

/// Error strings go into the attempt log and the CLI listing: one short line.
const ERROR_LIMIT: usize = 200;

/// Builds the client shared by all endpoints: no redirects followed (a 3xx is a failed
/// attempt, and following one would send signed payloads to a URL nobody configured),
/// keep-alive pool, rustls. Proxies from the usual environment variables are honoured.
pub fn build_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(USER_AGENT)
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
}

/// Where and how to deliver: the URL, the per-attempt timeout and the signing keys (several
/// during a secret rotation).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: Url,
    pub timeout: Duration,
    pub keys: Vec<SigningKey>,
    client: reqwest::Client,
}

/// What one attempt produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `None` when no response arrived (timeout, connection refused...).
    pub status: Option<u16>,
    /// One short line: "timed out after 15s", "connection refused", "HTTP 500"... For a 200
    /// it is `None` unless reading the body head failed, which does not undo the success: the
    /// endpoint had already accepted the notification.
    pub error: Option<String>,
    /// From the start of the attempt until the body head was read.
    pub latency: Duration,
    /// The first 1 KiB of the response body, lossy UTF-8.
    pub body_head: String,
    /// The endpoint's `Retry-After`, only for 429 and 503.
    pub retry_after: Option<Duration>,
}

impl Outcome {
    /// Exactly HTTP 200: stricter than "any 2xx" so that an endpoint cannot acknowledge by
    /// accident (a 204 from a catch-all route, a 202 from a queue that may still drop it).
    pub fn is_success(&self) -> bool {
        self.status == Some(200)
    }

    pub(crate) fn no_response(started: Instant, error: String) -> Outcome {
        Outcome {
            status: None,
            error: Some(error),
            latency: started.elapsed(),
            body_head: String::new(),
            retry_after: None,
        }
    }
}

impl Endpoint {
    pub fn new(
        client: reqwest::Client,
        url: Url,
        timeout: Duration,
        keys: Vec<SigningKey>,
    ) -> Self {
        Endpoint {
            url,
            timeout,
            keys,
            client,
        }
    }

    /// POSTs `body` as `application/json` with the Standard Webhooks headers. The timestamp is
    /// taken fresh for every attempt: receivers reject stale timestamps, and a retry a day
    /// later must not look like a replay.
    pub async fn attempt(&self, msg_id: &str, body: &[u8]) -> Outcome {
        let started = Instant::now();
        // The timeout comes from configuration; `Instant + Duration` panics on overflow, and a
        // deadline a year away is as good as none.
        let deadline = started
            .checked_add(self.timeout)
            .unwrap_or_else(|| started + Duration::from_secs(365 * 24 * 3600));
        let timestamp = unix_now();

        let mut request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(reqwest::header::USER_AGENT, USER_AGENT)
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", timestamp.to_string());
        // Without keys there is nothing to sign; an empty header would only look like a bug.
        if !self.keys.is_empty() {
            let signature = signature_header(&self.keys, msg_id, timestamp, body);
            request = request.header("webhook-signature", signature);
        }
        let request = request.body(body.to_vec());

        let response = match timeout_at(deadline, request.send()).await {
            Err(_) => return Outcome::no_response(started, self.timed_out("")),
            Ok(Err(err)) => return Outcome::no_response(started, describe(&err)),
            Ok(Ok(response)) => response,
        };

        let status = response.status();
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(parse_retry_after),
            _ => None,
        };
        let status_error = status_error(&response);
        let (head, read_error) = self.read_head(response, deadline).await;

        Outcome {
            status: Some(status.as_u16()),
            // For a failure the status says most; for a 200 a body problem is worth noting.
            error: status_error.or(read_error),
            latency: started.elapsed(),
            body_head: String::from_utf8_lossy(&head).into_owned(),
            retry_after,
        }
    }

    /// Reads at most `BODY_HEAD_LIMIT` bytes of the body (plus whatever the last chunk holds),
    /// then drops the response. A body left unread costs the keep-alive connection, which is
    /// cheaper than downloading whatever the endpoint decided to send.
    async fn read_head(
        &self,
        mut response: reqwest::Response,
        deadline: Instant,
    ) -> (Vec<u8>, Option<String>) {
        let mut head = Vec::new();
        while head.len() < BODY_HEAD_LIMIT {
            match timeout_at(deadline, response.chunk()).await {
                Err(_) => return (head, Some(self.timed_out(" reading the body"))),
                Ok(Err(err)) => return (head, Some(describe(&err))),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => {
                    let wanted = BODY_HEAD_LIMIT - head.len();
                    head.extend_from_slice(&chunk[..wanted.min(chunk.len())]);
                }
            }
        }
        (head, None)
    }

    fn timed_out(&self, during: &str) -> String {
        format!(
            "timed out after {}{during}",
            humantime::format_duration(self.timeout)
        )
    }
}

fn unix_now() -> i64 {
    // A clock before 1970 signs with 0, which receivers reject as stale: the right signal for a
    // broken clock.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `None` for 200; otherwise "HTTP <code>", with a hint where the reason is not obvious.
fn status_error(response: &reqwest::Response) -> Option<String> {
    let status = response.status();
    let code = status.as_u16();
    if code == 200 {
        None
    } else if status.is_success() {
        Some(format!("HTTP {code} (only 200 counts as delivered)"))
    } else if status.is_redirection() {
        // Showing where it pointed helps fix the configured URL (http → https, trailing slash).
        let target = response
            .headers()
            .get(LOCATION)
            .and_then(|value| value.to_str().ok())
            .map(|location| format!(" to {location}"))
            .unwrap_or_default();
        Some(one_line(&format!(
            "HTTP {code} (redirect{target} not followed)"
        )))
    } else {
        Some(format!("HTTP {code}"))
    }
}

/// A short description of a failed request. reqwest's own Display is "error sending request
/// for url (...)", which says nothing; the cause is at the bottom of the `source()` chain.
fn describe(err: &reqwest::Error) -> String {
    let (cause, is_os_error) = root_cause(err);
    // OS errors ("connection refused", "connection reset by peer") are clear alone; others
    // (DNS, TLS, protocol) need to say which step failed.
    if is_os_error {
        return one_line(&cause);
    }
    let step = if err.is_builder() {
        "invalid request"
    } else if err.is_connect() {
        "connect"
    } else if err.is_body() || err.is_decode() {
        "reading the body"
    } else {
        "request"
    };
    one_line(&format!("{step}: {cause}"))
}

/// The innermost error's message, and whether it is an OS error. `io::Error` needs special
/// care: its `source()` skips the error it wraps (a rustls or DNS error), so descend with
/// `get_ref()` instead.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> (String, bool) {
    let mut current = err;
    loop {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            match io.get_ref() {
                Some(inner) => {
                    current = inner;
                    continue;
                }
                None if io.raw_os_error().is_some() => return (os_message(io), true),
                None => return (io.to_string(), false),
            }
        }
        match current.source() {
            Some(source) => current = source,
            None => return (current.to_string(), false),
        }
    }
}

/// "Connection refused (os error 111)" → "connection refused": the code adds nothing for a
/// reader, and the log reads better in lower case.
fn os_message(err: &std::io::Error) -> String {
    let text = err.to_string();
    let text = text
        .rfind(" (os error ")
        .map_or(text.as_str(), |end| &text[..end]);
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Collapses whitespace (header values and error messages can contain line breaks) and caps
/// the length.
fn one_line(text: &str) -> String {
    let mut line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some((cut, _)) = line.char_indices().nth(ERROR_LIMIT) {
        line.truncate(cut);
        line.push('…');
    }
    line
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::Future;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::{Body, Frame, Incoming};
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;
    use crate::deliver::sign::verify;

    type TestBody = BoxBody<Bytes, Infallible>;

    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const OTHER_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const PAYLOAD: &[u8] = br#"{"table":"public.orders","op":"insert"}"#;

    /// A real HTTP/1 server on 127.0.0.1:0 answering every request with `handler`.
    struct TestServer {
        addr: SocketAddr,
        /// Accepted TCP connections, to observe keep-alive.
        connections: Arc<AtomicUsize>,
        /// Requests that reached the handler.
        requests: Arc<AtomicUsize>,
    }

    impl TestServer {
        async fn start<F, Fut>(handler: F) -> TestServer
        where
            F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = Response<TestBody>> + Send + 'static,
        {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let connections = Arc::new(AtomicUsize::new(0));
            let requests = Arc::new(AtomicUsize::new(0));
            let handler = Arc::new(handler);
            let (accepted, handled) = (connections.clone(), requests.clone());
            // The accept loop lives as long as the test's runtime; each connection gets its own
            // task so a handler that sleeps does not block others.
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let (handler, handled) = (handler.clone(), handled.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |request| {
                            handled.fetch_add(1, Ordering::SeqCst);
                            let response = handler(request);
                            async move { Ok::<_, Infallible>(response.await) }
                        });
                        // Clients that hang up early (timeouts, body head read) end up here.
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            TestServer {
                addr,
                connections,
                requests,
            }
        }

        fn url(&self, path: &str) -> Url {
            Url::parse(&format!("http://{}{path}", self.addr)).unwrap()
        }

        fn endpoint(&self, timeout: Duration) -> Endpoint {
            endpoint(self.url("/hook"), timeout)
        }
    }

    fn endpoint(url: Url, timeout: Duration) -> Endpoint {
        let keys = vec![SigningKey::parse(SECRET).unwrap()];
        Endpoint::new(build_client().unwrap(), url, timeout, keys)
    }

    fn respond(status: u16, body: impl Into<Bytes>) -> Response<TestBody> {
        Response::builder()
            .status(status)
            .body(Full::new(body.into()).boxed())
            .unwrap()
    }

    /// A response body that never ends, to prove the client stops reading.
    struct Endless;

    impl Body for Endless {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                &[b'x'; 16 * 1024],
            )))))
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn sends_signed_standard_webhooks_headers() {
        let (seen, mut requests) = mpsc::unbounded_channel();
        let server = TestServer::start(move |request: Request<Incoming>| {
            let seen = seen.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                seen.send((parts, body)).unwrap();
                respond(200, "ok")
            }
        })
        .await;
        let mut endpoint = server.endpoint(TIMEOUT);
        endpoint.keys.push(SigningKey::parse(OTHER_SECRET).unwrap());

        let before = unix_now();
        let outcome = endpoint.attempt("msg_1", PAYLOAD).await;
        let after = unix_now();
        assert!(outcome.is_success(), "{outcome:?}");

        let (parts, body) = requests.recv().await.unwrap();
        assert_eq!(parts.method, "POST");
        assert_eq!(parts.uri.path(), "/hook");
        assert_eq!(body.as_ref(), PAYLOAD);
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(header("content-type"), "application/json");
        assert_eq!(header("user-agent"), USER_AGENT);
        assert!(USER_AGENT.starts_with("walhook/"));
        assert_eq!(header("webhook-id"), "msg_1");
        let timestamp: i64 = header("webhook-timestamp").parse().unwrap();
        assert!(before <= timestamp && timestamp <= after);

        // One signature per key; a receiver knowing either secret accepts the delivery.
        let signature = header("webhook-signature");
        assert_eq!(signature.split(' ').count(), 2);
        for secret in [SECRET, OTHER_SECRET] {
            let key = [SigningKey::parse(secret).unwrap()];
            assert!(verify(&key, "msg_1", timestamp, PAYLOAD, &signature));
            assert!(!verify(&key, "msg_1", timestamp, b"{}", &signature));
        }
    }

    #[tokio::test]
    async fn omits_the_signature_without_keys() {
        let (seen, mut requests) = mpsc::unbounded_channel();
        let server = TestServer::start(move |request: Request<Incoming>| {
            let _ = seen.send(request.headers().clone());
            async { respond(200, "") }
        })
        .await;
        let mut endpoint = server.endpoint(TIMEOUT);
        endpoint.keys.clear();
        assert!(endpoint.attempt("msg_1", PAYLOAD).await.is_success());
        let headers = requests.recv().await.unwrap();
        assert!(headers.get("webhook-signature").is_none());
        assert!(headers.get("webhook-id").is_some());
    }

    #[tokio::test]
    async fn ok_is_success() {
        let server = TestServer::start(|_| async { respond(200, "thanks") }).await;
        let outcome = server.endpoint(TIMEOUT).attempt("msg_1", PAYLOAD).await;
        assert!(outcome.is_success());
        assert_eq!(outcome.status, Some(200));
        assert_eq!(outcome.error, None);
        assert_eq!(outcome.body_head, "thanks");
        assert_eq!(outcome.retry_after, None);
        assert!(outcome.latency < TIMEOUT);
    }

    #[tokio::test]
    async fn other_statuses_are_failures() {
        for (status, expected) in [
            (201, "HTTP 201 (only 200 counts as delivered)"),
            (204, "HTTP 204 (only 200 counts as delivered)"),
            (400, "HTTP 400"),
            (500, "HTTP 500"),
        ] {
            let server = TestServer::start(move |_| async move {
                let body = if status == 204 { "" } else { "nope" };
                respond(status, body)
            })
            .await;
            let outcome = server.endpoint(TIMEOUT).attempt("msg_1", PAYLOAD).await;
            assert!(!outcome.is_success(), "{status}");
            assert_eq!(outcome.status, Some(status));
            assert_eq!(outcome.error.as_deref(), Some(expected));
            assert_eq!(outcome.retry_after, None, "{status}");
            if status != 204 {
                assert_eq!(outcome.body_head, "nope");
            }
        }
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let target = TestServer::start(|_| async { respond(200, "") }).await;
        let location = target.url("/elsewhere").to_string();
        let server = TestServer::start(move |_| {
            let location = location.clone();
            async move {
                Response::builder()
                    .status(301)
                    .header("location", location)
                    .body(Empty::new().boxed())
                    .unwrap()
            }
        })
        .await;

        let outcome = server.endpoint(TIMEOUT).attempt("msg_1", PAYLOAD).await;
        assert!(!outcome.is_success());
        assert_eq!(outcome.status, Some(301));
        let error = outcome.error.unwrap();
        assert!(
            error.starts_with("HTTP 301 (redirect to http://127.0.0.1:"),
            "{error}"
        );
        assert_eq!(server.requests.load(Ordering::SeqCst), 1);
        assert_eq!(target.connections.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn retry_after_is_read_on_429_and_503_only() {
        for (status, expected) in [
            (429, Some(Duration::from_secs(7))),
            (503, Some(Duration::from_secs(7))),
            (500, None),
        ] {
            let server = TestServer::start(move |_| async move {
                Response::builder()
                    .status(status)
                    .header("retry-after", "7")
                    .body(Empty::new().boxed())
                    .unwrap()
            })
            .await;
            let outcome = server.endpoint(TIMEOUT).attempt("msg_1", PAYLOAD).await;
            assert_eq!(outcome.status, Some(status));
            assert_eq!(outcome.retry_after, expected, "{status}");
            assert_eq!(outcome.error, Some(format!("HTTP {status}")));
        }
    }

    #[tokio::test]
    async fn unparsable_retry_after_is_ignored() {
        let server = TestServer::start(|_| async {
            Response::builder()
                .status(429)
                .header("retry-after", "later")
                .body(Empty::new().boxed())
                .unwrap()
        })
        .await;
        let outcome = server.endpoint(TIMEOUT).attempt("msg_1", PAYLOAD).await;
        assert_eq!(outcome.status, Some(429));
        assert_eq!(outcome.retry_after, None);
    }

    #[tokio::test]
    async fn slow_response_times_out() {
        let server = TestServer::start(|_| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            respond(200, "too late")
        })
        .await;
        let timeout = Duration::from_millis(300);
        let outcome = server.endpoint(timeout).attempt("msg_1", PAYLOAD).await;
        assert!(!outcome.is_success());
        assert_eq!(outcome.status, None);
        assert_eq!(outcome.error.as_deref(), Some("timed out after 300ms"));
        assert!(outcome.latency >= timeout);
        assert!(
            outcome.latency < Duration::from_secs(5),
            "{:?}",
            outcome.latency
        );
    }

    #[tokio::test]
    async fn slow_body_after_200_keeps_the_success() {
        // Headers and a first chunk arrive at once, then the body stalls: the endpoint has
        // accepted the notification, so the deadline only cuts the body head short.
        let server = TestServer::start(|_| async {
            let (sender, receiver) = mpsc::channel::<Bytes>(1);
            tokio::spawn(async move {
                let _ = sender.send(Bytes::from_static(b"accepted")).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(sender);
            });
            Response::new(ChannelBody(receiver).boxed())
        })
        .await;
        let outcome = server
            .endpoint(Duration::from_millis(300))
            .attempt("msg_1", PAYLOAD)
            .await;
        assert!(outcome.is_success());
        assert_eq!(outcome.body_head, "accepted");
        assert_eq!(
            outcome.error.as_deref(),
            Some("timed out after 300ms reading the body")
        );
        assert!(outcome.latency < Duration::from_secs(5));
    }

    /// A body fed from a channel, to stall mid-body.
    struct ChannelBody(mpsc::Receiver<Bytes>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|data| Ok(Frame::data(data))))
        }
    }

    #[tokio::test]
    async fn connection_refused() {
        // Bind to learn a free port, then close it so nothing listens there.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);

        let url = Url::parse(&format!("http://{addr}/hook")).unwrap();
        let outcome = endpoint(url, TIMEOUT).attempt("msg_1", PAYLOAD).await;
        assert!(!outcome.is_success());
        assert_eq!(outcome.status, None);
        assert_eq!(outcome.error.as_deref(), Some("connection refused"));
        assert_eq!(outcome.body_head, "");
    }

    #[test]
    fn root_cause_sees_through_io_errors() {
        // OS errors lose their code and capital: they read well alone.
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(
            root_cause(&refused),
            ("connection refused".to_owned(), true)
        );

        // rustls and DNS failures arrive wrapped in an io::Error whose source() skips them.
        #[derive(Debug)]
        struct Inner;
        impl std::fmt::Display for Inner {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("invalid peer certificate: UnknownIssuer")
            }
        }
        impl std::error::Error for Inner {}
        let wrapped = std::io::Error::new(std::io::ErrorKind::InvalidData, Inner);
        assert_eq!(
            root_cause(&wrapped),
            ("invalid peer certificate: UnknownIssuer".to_owned(), false)
        );
    }

    #[tokio::test]
    async fn large_body_is_cut_to_one_kib() {
        let server = TestServer::start(|_| async { respond(200, vec![b'a'; 1024 * 1024]) }).await;
        let outcome = server.endpoint(TIMEOUT).attempt("msg_1", PAYLOAD).await;
        assert!(outcome.is_success());
        assert_eq!(outcome.body_head.len(), 1024);
        assert!(outcome.body_head.bytes().all(|b| b == b'a'));
    }

    #[tokio::test]
    async fn endless_body_is_not_downloaded() {
        let server = TestServer::start(|_| async { Response::new(Endless.boxed()) }).await;
        let outcome = server.endpoint(TIMEOUT).attempt("msg_1", PAYLOAD).await;
        // Reading the whole body would end in a timeout error.
        assert!(outcome.is_success());
        assert_eq!(outcome.error, None);
        assert_eq!(outcome.body_head.len(), 1024);
    }

    #[tokio::test]
    async fn invalid_utf8_is_kept_lossily() {
        let server = TestServer::start(|_| async { respond(500, &b"bad \xff byte"[..]) }).await;
        let outcome = server.endpoint(TIMEOUT).attempt("msg_1", PAYLOAD).await;
        assert_eq!(outcome.body_head, "bad \u{fffd} byte");
    }

    #[tokio::test]
    async fn connections_are_kept_alive() {
        let server = TestServer::start(|_| async { respond(200, "ok") }).await;
        let endpoint = server.endpoint(TIMEOUT);
        for _ in 0..3 {
            assert!(endpoint.attempt("msg_1", PAYLOAD).await.is_success());
        }
        assert_eq!(server.requests.load(Ordering::SeqCst), 3);
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn huge_timeout_does_not_panic() {
        let server = TestServer::start(|_| async { respond(200, "ok") }).await;
        let outcome = server
            .endpoint(Duration::MAX)
            .attempt("msg_1", PAYLOAD)
            .await;
        assert!(outcome.is_success());
    }

    #[test]
    fn errors_are_one_short_line() {
        assert_eq!(one_line("a\nb\r\n  c"), "a b c");
        let long = one_line(&"x".repeat(1000));
        assert_eq!(long.chars().count(), ERROR_LIMIT + 1);
        assert!(long.ends_with('…'));
    }
}
