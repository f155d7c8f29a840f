//! Delivery: signing ([`sign`]), one HTTP attempt ([`http`]), the retry schedule
//! ([`retry`]) and each webhook's queue over the log ([`queue`]).

pub mod http;
pub mod queue;
pub mod retry;
pub mod sign;

/// How much lower than the stream delivery runs (a Unix nice increment).
const DELIVERY_NICE: i32 = 10;

/// The runtime the delivery queues and their HTTP requests run on: threads of their own at
/// a lower CPU priority than the stream. When the machine is short of CPU (catching up a
/// backlog), taking WAL off the database, which holds it until walhook confirms, comes
/// before delivering from walhook's own log; on a machine with CPU to spare nothing
/// changes. The queues write to the log through the main runtime (see
/// [`queue::Queue::new`]'s `writer`), so that no thread walhook's storage starts inherits
/// this priority.
pub fn runtime() -> std::io::Result<Runtime> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("walhook-deliver")
        .on_thread_start(|| {
            // SAFETY: getpriority and setpriority only read their integer arguments; on
            // Linux, `who = 0` with PRIO_PROCESS means the calling thread. A failure (a
            // sandbox forbidding it) only leaves delivery at the stream's priority.
            unsafe {
                let current = libc::getpriority(libc::PRIO_PROCESS, 0);
                libc::setpriority(libc::PRIO_PROCESS, 0, (current + DELIVERY_NICE).min(19));
            }
        })
        .enable_all()
        .build()?;
    Ok(Runtime(Some(runtime)))
}

/// The delivery runtime; dropping it (on any way out of `run`) shuts it down without
/// blocking, which a runtime dropped inside another one must not do.
pub struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0
            .as_ref()
            .expect("the delivery runtime lives until dropped")
            .spawn(future)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
