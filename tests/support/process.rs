//! The real `walhook` binary as a child process: spawned with its output in a log file, killed
//! with SIGKILL on drop.
//!
//! The child's environment is the test's minus every `WALHOOK_*` variable (the CLI reads
//! those), plus `RUST_LOG=walhook=debug,info` and `NO_COLOR=1` unless the test sets them.

use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::pg::tail;

/// Path of the binary cargo built for this test run.
pub fn walhook_bin() -> &'static str {
    env!("CARGO_BIN_EXE_walhook")
}

pub struct Walhook {
    child: Child,
    args: Vec<OsString>,
    envs: Vec<(String, String)>,
    log_path: PathBuf,
    /// Holds the log; kept until the `Walhook` is dropped.
    _dir: TempDir,
}

impl Walhook {
    /// Starts `walhook <args>` with stdout and stderr appended to one log file.
    pub fn spawn(args: &[impl AsRef<OsStr>], envs: &[(&str, &str)]) -> Walhook {
        let dir = tempfile::Builder::new()
            .prefix("walhook-proc-")
            .tempdir()
            .expect("create walhook's temp dir");
        let log_path = dir.path().join("walhook.log");
        let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = start_child(&args, &envs, &log_path);
        Walhook {
            child,
            args,
            envs,
            log_path,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap. A no-op if it already exited.
    pub fn kill9(&mut self) {
        // Fails only when the child was already reaped; either way it is gone afterwards.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and returns at once; see `wait_exit`.
    pub fn sigterm(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the child is not reaped yet, so
        // the pid is still ours.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for walhook")
    }

    /// Waits (polling, without blocking the runtime) up to `timeout` for the process to exit.
    /// `None` when it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the process if it still runs and starts it again with the same arguments and
    /// environment, appending to the same log (after a marker line).
    pub fn restart(&mut self) {
        self.kill9();
        let mut log = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log_path)
            .expect("open walhook log");
        writeln!(log, "===== test harness: walhook restarted =====").expect("write walhook log");
        self.child = start_child(&self.args, &self.envs, &self.log_path);
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Polls the log every 20 ms until it contains `needle`; panics with the log on timeout.
    pub async fn wait_log_contains(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("walhook log has no {needle:?} after {timeout:?}:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (up to 20 s, like the tests' `WAIT`) until `needle` occurs at least `n` times
    /// in the log, e.g. the n-th "streaming" line after restarts.
    pub async fn wait_log_count(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if log.matches(needle).count() >= n {
                return;
            }
            if Instant::now() >= deadline {
                panic!("walhook log has {needle:?} fewer than {n} times:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Walhook {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            // Shown with the failing test's output.
            eprintln!(
                "--- walhook log (pid {}), last lines ---\n{}",
                self.child.id(),
                tail(&self.log(), 200)
            );
        }
    }
}

fn start_child(args: &[OsString], envs: &[(String, String)], log_path: &Path) -> Child {
    let log = OpenOptions::new()
        .append(true)
        .create(true)
        .open(log_path)
        .expect("open walhook log");
    let stderr = log.try_clone().expect("clone walhook log handle");
    let mut cmd = command(args, envs);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr));
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", walhook_bin()))
}

fn command(args: &[OsString], envs: &[(String, String)]) -> Command {
    let mut cmd = Command::new(walhook_bin());
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("WALHOOK_") {
            cmd.env_remove(key);
        }
    }
    if !envs.iter().any(|(k, _)| k == "RUST_LOG") {
        cmd.env("RUST_LOG", "walhook=debug,info");
    }
    if !envs.iter().any(|(k, _)| k == "NO_COLOR") {
        // The log is searched for plain text.
        cmd.env("NO_COLOR", "1");
    }
    cmd.envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd
}

/// Runs a one-shot command such as `walhook check ...` and returns its exit status, stdout and
/// stderr. Panics when it runs longer than `timeout` (the process is killed).
pub async fn run_to_completion(
    args: &[impl AsRef<OsStr>],
    envs: &[(&str, &str)],
    timeout: Duration,
) -> (ExitStatus, String, String) {
    let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut cmd = tokio::process::Command::from(command(&args, &envs));
    // If the timeout drops the future below, the child is killed with it.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", walhook_bin()));
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
        Ok(Err(e)) => panic!("wait for walhook {args:?}: {e}"),
        Err(_) => panic!("walhook {args:?} still running after {timeout:?}; killed"),
    }
}

/// Writes `toml` to `dir/walhook.toml` and returns that path.
pub fn write_config(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join("walhook.toml");
    fs::write(&path, toml).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}
