//! What `walhook deliveries` does with a delivery log: list, show, redeliver. The same code
//! runs in the CLI (when no `run` holds the data dir) and inside `run`, behind the control
//! socket, so the output is identical either way.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::log::{now_ms, Log, NotificationKey, State};

/// One `deliveries` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Request {
    List,
    Show { id: String },
    Redeliver { id: String },
    RedeliverDead,
}

impl Request {
    /// Whether the request changes the log (and queues must look at it again).
    pub fn queues_work(&self) -> bool {
        matches!(self, Request::Redeliver { .. } | Request::RedeliverDead)
    }
}

/// Carries out a request; `Ok` is the text to print, `Err` a one-line error.
pub fn execute(log: &Log, request: &Request) -> Result<String, String> {
    match request {
        Request::List => list(log),
        Request::Show { id } => show(log, id),
        Request::Redeliver { id } => {
            let key = parse_id(id)?;
            match log.redeliver(&key, now_ms()) {
                Ok(true) => Ok(format!("queued {key} for redelivery")),
                Ok(false) => Err(format!("no notification {id} in the delivery log")),
                Err(e) => Err(e.to_string()),
            }
        }
        Request::RedeliverDead => log
            .redeliver_dead(now_ms())
            .map(|n| format!("queued {n} dead notification(s) for redelivery"))
            .map_err(|e| e.to_string()),
    }
}

fn parse_id(id: &str) -> Result<NotificationKey, String> {
    NotificationKey::parse(id).ok_or_else(|| {
        format!("{id:?} is not a notification id; ids look like crm-sync_00000000016B3748_0 (see walhook deliveries list)")
    })
}

fn timestamp(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `list` shows this many notifications at most (the oldest), then how many more there are.
const LIST_LIMIT: usize = 1000;

fn list(log: &Log) -> Result<String, String> {
    let page = log.undelivered(LIST_LIMIT).map_err(|e| e.to_string())?;
    if page.total == 0 {
        return Ok("no pending or dead notifications".into());
    }
    let (total, dead) = (page.total, page.dead);
    let mut out = Vec::with_capacity(page.items.len() + 1);
    for (key, status) in page.items {
        let state = if status.dead { "dead" } else { "pending" };
        let last = log
            .detail(&key)
            .map_err(|e| e.to_string())?
            .and_then(|d| d.attempts.last().cloned())
            .map(|a| {
                a.error
                    .or_else(|| a.status.map(|s| format!("HTTP {s}")))
                    .unwrap_or_default()
            })
            .unwrap_or_else(|| "-".into());
        let next = if status.dead {
            "-".to_string()
        } else {
            timestamp(status.next_at_ms)
        };
        out.push(format!(
            "{key}\t{state}\tattempts={}\tnext={next}\tlast={last}",
            status.attempts
        ));
    }
    if total > LIST_LIMIT {
        out.push(format!(
            "... {} more not shown ({total} in all: {} pending, {dead} dead); `show ID` gives any one",
            total - LIST_LIMIT,
            total - dead
        ));
    }
    Ok(out.join("\n"))
}

fn show(log: &Log, id: &str) -> Result<String, String> {
    let key = parse_id(id)?;
    let detail = log
        .detail(&key)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no notification {id} in the delivery log"))?;
    let (state, next) = match &detail.state {
        State::Pending(s) => ("pending", Some(timestamp(s.next_at_ms))),
        State::Dead(_) => ("dead", None),
        State::Delivered { .. } => ("delivered", None),
    };
    let body: serde_json::Value = serde_json::from_slice(&detail.body).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&detail.body).into())
    });
    let attempts: Vec<serde_json::Value> = detail
        .attempts
        .iter()
        .map(|a| {
            serde_json::json!({
                "number": a.number,
                "at": timestamp(a.at_ms),
                "status": a.status,
                "error": a.error,
                "latency_ms": a.latency_ms,
                "response": a.response,
                "payload_sha256": a.payload_sha256,
            })
        })
        .collect();
    let out = serde_json::json!({
        "id": key.to_string(),
        "state": state,
        "next_attempt_at": next,
        "body": body,
        "attempts": attempts,
    });
    serde_json::to_string_pretty(&out).map_err(|e| e.to_string())
}
