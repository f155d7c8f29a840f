//! The control socket: lets `walhook deliveries` work while `walhook run` holds the data dir.
//!
//! sled admits one process per database, so a running `run` serves `DATA_DIR/control.sock`
//! (a Unix socket, reachable only by users who can reach the data dir). A client sends one
//! JSON line, an [`inspect::Request`]; the server answers one JSON line, a [`Response`]. A
//! request that changes the log bumps the rescan generation, which makes every delivery
//! queue re-read its pending notifications.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::inspect::{self, Request};
use crate::log::Log;
use crate::shutdown::{requested, Stop};

/// How long one connection may take, request and answer.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// A request line is small; anything longer is not ours.
const MAX_LINE: u64 = 64 * 1024;

/// The answer to one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// The text to print (on success) or the error (otherwise).
    pub output: String,
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// Binds the control socket. Failing to bind is not fatal: `deliveries` then reports the
/// data dir as in use, as it would without the socket.
pub fn bind(data_dir: &Path) -> Option<UnixListener> {
    let path = socket_path(data_dir);
    // A socket left by a killed process: we hold the data dir's lock, so it is stale.
    let _ = std::fs::remove_file(&path);
    match UnixListener::bind(&path) {
        Ok(listener) => Some(listener),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "cannot serve the control socket; `walhook deliveries` will need run to be stopped");
            None
        }
    }
}

/// Serves the control socket until `stop`, then removes it.
pub async fn serve(
    listener: UnixListener,
    data_dir: PathBuf,
    log: Log,
    rescan: watch::Sender<u64>,
    mut stop: Stop,
) {
    let path = socket_path(&data_dir);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                // Each connection on its own task, with a deadline: a client that connects
                // and says nothing must not hold up other clients or shutdown.
                Ok((stream, _)) => {
                    let (log, rescan) = (log.clone(), rescan.clone());
                    tokio::spawn(async move {
                        let answered = tokio::time::timeout(
                            ANSWER_WITHIN,
                            answer(stream, &log, &rescan),
                        )
                        .await;
                        match answered {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::debug!(error = %e, "control connection failed"),
                            Err(_) => tracing::debug!("control connection timed out"),
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
            },
            // Shutdown: stop answering and remove the socket so clients fall back to the log.
            _ = requested(&mut stop) => break,
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Answers one connection. Requests are handled one at a time: they are rare and quick.
async fn answer(stream: UnixStream, log: &Log, rescan: &watch::Sender<u64>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_LINE))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response {
            ok: false,
            output: format!("control socket: malformed request ({e})"),
        },
        Ok(request) => {
            // Listing a large log scans it: keep that off the runtime's threads.
            let result = {
                let (log, request) = (log.clone(), request.clone());
                tokio::task::spawn_blocking(move || inspect::execute(&log, &request))
                    .await
                    .unwrap_or_else(|e| Err(format!("control request failed: {e}")))
            };
            if result.is_ok() && request.queues_work() {
                // Durable before we say so, then let the queues pick the work up.
                if let Err(e) = log.flush().await {
                    tracing::warn!(error = %e, "flushing a redelivery failed");
                }
                rescan.send_modify(|generation| *generation += 1);
            }
            match result {
                Ok(output) => Response { ok: true, output },
                Err(output) => Response { ok: false, output },
            }
        }
    };
    let mut bytes = serde_json::to_vec(&response).unwrap_or_default();
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    write.shutdown().await
}

/// Sends one request to the `run` that serves `data_dir`.
pub async fn request(data_dir: &Path, request: &Request) -> std::io::Result<Response> {
    let stream = UnixStream::connect(socket_path(data_dir)).await?;
    let (read, mut write) = stream.into_split();
    let mut bytes = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    let mut line = String::new();
    BufReader::new(read.take(16 * 1024 * 1024))
        .read_line(&mut line)
        .await?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}
