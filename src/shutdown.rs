//! Graceful shutdown on SIGTERM or SIGINT: one watch channel that every long-running task
//! selects on. Stop reading, flush, acknowledge, let attempts in flight finish, exit 0.

use tokio::sync::watch;

/// Turns true once a stop was requested.
pub type Stop = watch::Receiver<bool>;

/// Spawns the signal listener; the returned receiver turns true on SIGTERM or SIGINT.
pub fn on_signals() -> std::io::Result<Stop> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        // Either signal means the same thing: finish what is in hand and exit.
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
        }
        let _ = tx.send(true);
        // Keep the sender alive so receivers see `true`, not a closed channel.
        std::future::pending::<()>().await;
    });
    Ok(rx)
}

/// Resolves once a stop was requested (or the sender is gone).
pub async fn requested(stop: &mut Stop) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}
