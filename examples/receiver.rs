//! A webhook receiver for the demo: verifies each request's Standard Webhooks signature,
//! prints what arrived, answers 200 (exactly what walhook counts as delivered).
//!
//! ```text
//! cargo run --example receiver -- 127.0.0.1:8080 whsec_...
//! ```
//!
//! It also shows what a real receiver does: reject a bad signature or a stale timestamp
//! (replay protection), and deduplicate on `webhook-id` (delivery is at least once).

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use walhook::deliver::sign::{verify, SigningKey};

/// Requests signed longer ago than this are refused, as the Standard Webhooks spec advises.
const TOLERANCE_SECS: i64 = 300;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let secret = args
        .next()
        .or_else(|| std::env::var("RECEIVER_SECRET").ok())
        .ok_or("usage: receiver ADDR whsec_SECRET")?;
    let key = SigningKey::parse(&secret)?;
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("receiver listening on http://{addr}/");
    loop {
        let (stream, _) = listener.accept().await?;
        let key = key.clone();
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| handle(req, key.clone(), Arc::clone(&seen)));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    key: SigningKey,
    seen: Arc<Mutex<HashSet<String>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (id, ts, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return Ok(answer(StatusCode::BAD_REQUEST, "unreadable body")),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let Ok(timestamp) = ts.parse::<i64>() else {
        return Ok(answer(StatusCode::BAD_REQUEST, "missing webhook-timestamp"));
    };
    if (now - timestamp).abs() > TOLERANCE_SECS {
        println!("REJECTED {id}: timestamp {timestamp} is too far from now");
        return Ok(answer(StatusCode::BAD_REQUEST, "stale timestamp"));
    }
    if !verify(&[key], &id, timestamp, &body, &signature) {
        println!("REJECTED {id}: bad signature");
        return Ok(answer(StatusCode::UNAUTHORIZED, "bad signature"));
    }
    let first_time = seen
        .lock()
        .map(|mut s| s.insert(id.clone()))
        .unwrap_or(true);
    let note = if first_time {
        "signature ok"
    } else {
        "signature ok, duplicate id: already processed"
    };
    println!("{id} ({note}) {}", String::from_utf8_lossy(&body));
    Ok(answer(StatusCode::OK, "ok"))
}

fn answer(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}
