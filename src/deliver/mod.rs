//! Delivery: signing ([`sign`]), one HTTP attempt ([`http`]), the retry schedule
//! ([`retry`]) and each webhook's queue over the log ([`queue`]).

pub mod http;
pub mod queue;
pub mod retry;
pub mod sign;

/// How much lower than the stream delivery runs (a nice increment; Linux only: elsewhere
/// setpriority would lower the whole process).
const DELIVERY_NICE: i32 = 10;

/// The runtime the delivery queues and their HTTP requests run on: threads of their own at
/// a lower CPU priority than the stream. When the machine is short of CPU (catching up a
/// backlog), taking WAL off the database, which holds it until walhook confirms, comes
/// before delivering from walhook's own log; on a machine with CPU to spare nothing
/// changes. The queues write to the log through the main runtime (see
/// [`queue::Queue::new`]'s `writer`), so that the sled I/O threads a write may start do not
/// inherit this priority. They still read the log themselves: sled holds a shared lock
/// only for the microseconds of each read, which a write waits for.
pub fn runtime() -> std::io::Result<Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.thread_name("walhook-deliver").enable_all();
    #[cfg(target_os = "linux")]
    {
        // Absolute, from the priority walhook runs at: the runtime's blocking threads are
        // started from its (already lowered) workers and must not go lower still.
        // SAFETY: getpriority and setpriority only read their integer arguments; on Linux,
        // `who = 0` with PRIO_PROCESS means the calling thread alone. A failure (a sandbox
        // forbidding it) only leaves delivery at the stream's priority.
        let lowered = (unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) } + DELIVERY_NICE).min(19);
        builder.on_thread_start(move || unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, lowered);
        });
    }
    Ok(Runtime(Some(builder.build()?)))
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
