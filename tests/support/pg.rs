//! A throwaway PostgreSQL cluster per test, stopped and deleted on drop.
//!
//! ```text
//! <tempdir>/          owned by the server's user; holds the unix socket and its lock file
//!   data/             PGDATA, a copy of a template made by one `initdb` per installation
//!     harness.conf    wal_level=logical, port, socket dir... (included by postgresql.conf)
//!   postgres.log      server log, see `PgCluster::log_contents`
//!   tls/              only for `PgCluster::start_with_ssl`: CA, server certificate and key
//! ```
//!
//! `initdb` costs more than the rest of a cluster start put together, so it runs once: its
//! result is kept under `CARGO_TARGET_TMPDIR` and copied for each cluster. All copies share one
//! database system identifier; a test that needs a distinct one uses `PgCluster::start_fresh`.
//!
//! `initdb` refuses to run as root and CI runs as root: then the temp dir belongs to the
//! `postgres` user and `initdb`/`pg_ctl` run through `runuser -u postgres --`.

use std::ffi::CString;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

/// Bump when `initdb`'s flags or the template's `postgresql.conf` change, so stale templates
/// left in the target dir by earlier runs are not reused.
const TEMPLATE_FORMAT: &str = "v1";

/// How many times `start` picks a new port when the one it chose was taken meanwhile by a
/// test running in parallel.
const START_ATTEMPTS: usize = 8;

pub struct PgCluster {
    // Declared first so that `Drop for PgCluster` (which runs before fields drop) stops the
    // server while its directory still exists.
    dir: TempDir,
    port: u16,
    install: &'static Install,
    /// Connection reused by `exec`; emptied on restart so that no caller gets a dead one.
    cached: Mutex<Option<Client>>,
    /// Set for a cluster started with `start_with_ssl`.
    ssl: Option<SslFiles>,
}

/// The certificates of a cluster started with [`PgCluster::start_with_ssl`], all PEM, in
/// `<cluster dir>/tls/` (owned by the server's user; the key is mode 0600). Made by the
/// `openssl` CLI with P-256 keys, valid for two days.
#[derive(Debug, Clone)]
pub struct SslFiles {
    /// The CA that signed the server certificate: the right `sslrootcert`.
    pub ca_cert: PathBuf,
    /// A second, unrelated CA (signed nothing the server presents): a wrong `sslrootcert`.
    pub other_ca_cert: PathBuf,
    /// The server certificate (`ssl_cert_file`), with the subjectAltNames asked for.
    pub server_cert: PathBuf,
    /// The server key (`ssl_key_file`).
    pub server_key: PathBuf,
    /// A client certificate for the user `postgres` (CN), signed by the CA (`ssl_ca_file`),
    /// and its key: the right `sslcert` and `sslkey`.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// The subjectAltNames of the server certificate made by [`PgCluster::start_with_ssl`].
pub const DEFAULT_SANS: &str = "IP:127.0.0.1,DNS:localhost";

impl PgCluster {
    /// Starts a cluster from the shared `initdb` template. Panics with the server log when
    /// the cluster cannot start.
    pub fn start() -> PgCluster {
        let install = Install::get();
        Self::start_with(install, |data| copy_dir(template(install), data), None)
    }

    /// Like [`start`](Self::start), with `ssl = on` and a server certificate for
    /// [`DEFAULT_SANS`] signed by a throwaway CA (see [`ssl`](Self::ssl)). Also sets
    /// `log_connections = on`, so the server log says of every connection whether it used
    /// SSL. `pg_hba.conf` is initdb's: its `host` lines accept SSL and plain connections.
    pub fn start_with_ssl() -> PgCluster {
        Self::start_with_ssl_sans(DEFAULT_SANS)
    }

    /// [`start_with_ssl`](Self::start_with_ssl) with a server certificate whose
    /// subjectAltName is `sans` (openssl syntax, e.g. `"DNS:localhost"`).
    pub fn start_with_ssl_sans(sans: &str) -> PgCluster {
        let install = Install::get();
        Self::start_with(
            install,
            |data| copy_dir(template(install), data),
            Some(sans),
        )
    }

    /// Starts a cluster from its own `initdb` (slower): for tests that need a database system
    /// identifier no other cluster has.
    pub fn start_fresh() -> PgCluster {
        let install = Install::get();
        Self::start_with(install, |data| install.initdb(data), None)
    }

    fn start_with(
        install: &'static Install,
        make_data_dir: impl FnOnce(&Path),
        ssl_sans: Option<&str>,
    ) -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("walhook-pg-")
            .tempdir()
            .expect("create the cluster's temp dir");
        install.give_to_server_user(dir.path());
        make_data_dir(&dir.path().join("data"));
        let ssl = ssl_sans.map(|sans| make_ssl_files(install, &dir.path().join("tls"), sans));
        let mut cluster = PgCluster {
            dir,
            port: 0,
            install,
            cached: Mutex::new(None),
            ssl,
        };
        for attempt in 1..=START_ATTEMPTS {
            cluster.port = free_port();
            cluster.write_settings();
            let out = cluster
                .pg_ctl(&["start", "-w", "-t", "60"])
                .expect("run pg_ctl");
            if out.status.success() {
                return cluster;
            }
            let log = cluster.log_contents();
            let port_taken = log.contains("could not bind") || log.contains("already in use");
            if !port_taken || attempt == START_ATTEMPTS {
                panic!(
                    "PostgreSQL did not start (attempt {attempt}, port {}):\n{}\n--- server log ---\n{log}",
                    cluster.port,
                    describe(&out)
                );
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// `postgresql://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// [`url`](Self::url) with a query string, e.g. `url_with("sslmode=require")`.
    pub fn url_with(&self, query: &str) -> String {
        format!("{}?{query}", self.url())
    }

    /// The certificates of a cluster started with [`start_with_ssl`](Self::start_with_ssl);
    /// panics for a cluster without SSL.
    pub fn ssl(&self) -> &SslFiles {
        self.ssl
            .as_ref()
            .expect("this cluster was not started with start_with_ssl")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir holding `data/`, the log and the unix socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A program of the installation this cluster runs, e.g. `pgbench` or `pg_recvlogical`
    /// (client programs may run as any user: they connect over TCP with [`url`](Self::url)).
    pub fn program(&self, name: &str) -> PathBuf {
        self.install.bindir.join(name)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server log so far (empty if there is none yet).
    pub fn log_contents(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A new connection as `postgres` to database `postgres`; its connection task runs on the
    /// current runtime.
    pub async fn client(&self) -> Client {
        let (client, connection) = match tokio_postgres::connect(&self.url(), NoTls).await {
            Ok(pair) => pair,
            Err(e) => panic!(
                "connect to {}: {e:?}\n--- server log ---\n{}",
                self.url(),
                self.log_contents()
            ),
        };
        // The connection object does the actual I/O; it ends when the client is dropped or
        // the server goes away.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// For a cluster started with SSL: TLS connections over TCP must then authenticate with
    /// a client certificate of the cluster's CA whose CN is the user (`cert` in
    /// `pg_hba.conf`); plain ones (the harness's own) are still trusted.
    pub async fn require_client_certificates(&self) {
        self.ssl();
        let hba = "local all all trust\n\
                   hostnossl all all 127.0.0.1/32 trust\n\
                   hostnossl replication all 127.0.0.1/32 trust\n\
                   hostssl all all 127.0.0.1/32 cert\n\
                   hostssl replication all 127.0.0.1/32 cert\n";
        let path = self.data_dir().join("pg_hba.conf");
        fs::write(&path, hba).expect("write pg_hba.conf");
        self.install.give_to_server_user(&path);
        self.exec("SELECT pg_reload_conf()").await;
    }

    /// Runs `sql` (one or more statements) with `batch_execute`; panics with the error and the
    /// statement text when it fails.
    pub async fn exec(&self, sql: &str) {
        // Taken out of the mutex so that no lock is held across `.await`.
        let cached = self.cached.lock().expect("client cache").take();
        let client = match cached {
            Some(client) if !client.is_closed() => client,
            _ => self.client().await,
        };
        if let Err(e) = client.batch_execute(sql).await {
            let detail = e
                .as_db_error()
                .map(|db| format!("{db}"))
                .unwrap_or_else(|| format!("{e:?}"));
            panic!("SQL failed: {detail}\n--- statement ---\n{sql}");
        }
        *self.cached.lock().expect("client cache") = Some(client);
    }

    /// `pg_ctl restart -m fast`: same port, same data. Existing connections break.
    pub fn restart(&self) {
        self.forget_client();
        let out = self
            .pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"])
            .expect("run pg_ctl");
        self.expect_success("restart", &out);
    }

    /// `pg_ctl stop -m immediate`: the server dies without a shutdown checkpoint, as in a
    /// crash; `start_again` runs crash recovery.
    pub fn stop_immediate(&self) {
        self.forget_client();
        let out = self
            .pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "60"])
            .expect("run pg_ctl");
        self.expect_success("stop -m immediate", &out);
    }

    /// `pg_ctl stop -m fast`: a clean shutdown.
    pub fn stop_fast(&self) {
        self.forget_client();
        let out = self
            .pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"])
            .expect("run pg_ctl");
        self.expect_success("stop -m fast", &out);
    }

    /// Starts a stopped cluster again on the same port.
    pub fn start_again(&self) {
        let out = self
            .pg_ctl(&["start", "-w", "-t", "60"])
            .expect("run pg_ctl");
        self.expect_success("start", &out);
    }

    fn forget_client(&self) {
        if let Ok(mut cached) = self.cached.lock() {
            cached.take();
        }
    }

    /// Settings live in a file rather than on pg_ctl's command line so that every later
    /// `start_again` and `restart` keeps them, port included.
    fn write_settings(&self) {
        let socket_dir = self.dir.path().display();
        let mut settings = format!(
            "# Written by the walhook test harness for this cluster.\n\
             wal_level = logical\n\
             max_replication_slots = 20\n\
             max_wal_senders = 20\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{socket_dir}'\n\
             # Only makes the test cluster fast; walhook's own durability is unaffected.\n\
             fsync = off\n\
             wal_sender_timeout = '60s'\n\
             log_replication_commands = on\n",
            port = self.port,
        );
        if let Some(ssl) = &self.ssl {
            settings.push_str(&format!(
                "ssl = on\n\
                 ssl_cert_file = '{cert}'\n\
                 ssl_key_file = '{key}'\n\
                 ssl_ca_file = '{ca}'\n\
                 log_connections = on\n",
                cert = ssl.server_cert.display(),
                key = ssl.server_key.display(),
                ca = ssl.ca_cert.display(),
            ));
        }
        let path = self.data_dir().join("harness.conf");
        fs::write(&path, settings).expect("write harness.conf");
        self.install.give_to_server_user(&path);
    }

    /// Runs pg_ctl on this cluster; an `Err` only when pg_ctl could not be run at all.
    fn pg_ctl(&self, args: &[&str]) -> std::io::Result<Output> {
        let data = self.data_dir();
        let log = self.log_path();
        let mut cmd = self.install.command("pg_ctl", self.dir.path());
        cmd.args(args).arg("-D").arg(&data).arg("-l").arg(&log);
        cmd.output()
    }

    fn expect_success(&self, what: &str, out: &Output) {
        if !out.status.success() {
            panic!(
                "pg_ctl {what} failed (port {}):\n{}\n--- server log ---\n{}",
                self.port,
                describe(out),
                self.log_contents()
            );
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Shown with the failing test's output.
            eprintln!(
                "--- PostgreSQL log (port {}), last lines ---\n{}",
                self.port,
                tail(&self.log_contents(), 60)
            );
        }
        let pid_file = self.data_dir().join("postmaster.pid");
        if !pid_file.exists() {
            return;
        }
        let stopped = self
            .pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"])
            .is_ok_and(|out| out.status.success());
        if stopped {
            return;
        }
        // pg_ctl failed or timed out: kill the postmaster; its children exit when they notice
        // it is gone.
        if let Ok(text) = fs::read_to_string(&pid_file) {
            if let Some(pid) = text
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Where the PostgreSQL binaries are and which user runs them.
struct Install {
    bindir: PathBuf,
    /// `pg_ctl --version`, e.g. "pg_ctl (PostgreSQL) 15.10 (Debian 15.10-1)".
    version: String,
    /// uid/gid of `postgres` when we are root (initdb refuses root); None otherwise.
    server_user: Option<(u32, u32)>,
}

impl Install {
    fn get() -> &'static Install {
        static INSTALL: OnceLock<Install> = OnceLock::new();
        INSTALL.get_or_init(Install::detect)
    }

    fn detect() -> Install {
        let from_pg_config = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
            .filter(|dir| dir.join("pg_ctl").exists());
        let bindir = from_pg_config.unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
        assert!(
            bindir.join("initdb").exists() && bindir.join("pg_ctl").exists(),
            "no initdb/pg_ctl in {} (from `pg_config --bindir` or the default); \
             install the PostgreSQL 15 server package",
            bindir.display()
        );
        let out = Command::new(bindir.join("pg_ctl"))
            .arg("--version")
            .output()
            .expect("run pg_ctl --version");
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();

        // SAFETY: geteuid cannot fail and touches no memory.
        let server_user = if unsafe { libc::geteuid() } == 0 {
            Some(lookup_user("postgres"))
        } else {
            None
        };
        Install {
            bindir,
            version,
            server_user,
        }
    }

    /// `program` from the PostgreSQL bin dir, run as the server's user, in `cwd` (which that
    /// user must be able to enter).
    fn command(&self, program: &str, cwd: &Path) -> Command {
        let path = self.bindir.join(program);
        let mut cmd = match self.server_user {
            Some(_) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", "postgres", "--"]).arg(path);
                cmd
            }
            None => Command::new(path),
        };
        cmd.current_dir(cwd);
        cmd
    }

    fn give_to_server_user(&self, path: &Path) {
        if let Some((uid, gid)) = self.server_user {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
        }
    }

    /// `initdb` into `data` (whose parent belongs to the server's user), set up to include the
    /// per-cluster `harness.conf`.
    fn initdb(&self, data: &Path) {
        let parent = data.parent().expect("data dir has a parent");
        let out = self
            .command("initdb", parent)
            .arg("-D")
            .arg(data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            // Byte-order collation and UTF-8 regardless of the machine's locale.
            .args(["-E", "UTF8", "--locale=C"])
            .output()
            .expect("run initdb");
        if !out.status.success() {
            panic!("initdb {} failed:\n{}", data.display(), describe(&out));
        }
        let conf = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str("\ninclude_if_exists = 'harness.conf'\n");
        fs::write(&conf, text).expect("write postgresql.conf");
    }
}

/// The shared `initdb` result for this installation, made on first use. It lives in the
/// target dir so that later runs reuse it; it is published with an atomic rename, so test
/// processes racing to make it never see a half-written one.
fn template(install: &'static Install) -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let key: String = format!(
            "{TEMPLATE_FORMAT}-{}-uid{}",
            install.version,
            install.server_user.map_or(0, |(uid, _)| uid)
        )
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let template = root.join(format!("pg-template-{key}"));
        if template.join("PG_VERSION").exists() {
            return template;
        }
        let scratch = tempfile::Builder::new()
            .prefix("walhook-initdb-")
            .tempdir()
            .expect("create initdb scratch dir");
        install.give_to_server_user(scratch.path());
        install.initdb(&scratch.path().join("data"));
        // Copy next to the final name first: a rename is atomic only within a file system.
        let staging = root.join(format!("pg-template-{key}.{}", std::process::id()));
        copy_dir(&scratch.path().join("data"), &staging);
        if fs::rename(&staging, &template).is_err() {
            // Another test process published it first; theirs is as good as ours.
            let _ = fs::remove_dir_all(&staging);
        }
        template
    })
}

/// The OpenSSL config `make_ssl_files` signs with: a CA profile and a server profile.
const OPENSSL_CONF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
subjectAltName = ${ENV::WALHOOK_TEST_SANS}
";

/// Makes `dir` with two CAs and a server certificate for `sans` signed by the first, using
/// the `openssl` CLI; everything is given to the server's user, the server key mode 0600.
fn make_ssl_files(install: &Install, dir: &Path, sans: &str) -> SslFiles {
    use std::os::unix::fs::PermissionsExt;

    fs::create_dir(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let conf = dir.join("openssl.cnf");
    fs::write(&conf, OPENSSL_CONF).expect("write openssl.cnf");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .env("OPENSSL_CONF", &conf)
            .env("WALHOOK_TEST_SANS", sans)
            .output()
            .expect("run openssl (is the openssl CLI installed?)");
        if !out.status.success() {
            panic!("openssl {args:?} failed:\n{}", describe(&out));
        }
    };
    let key = |name: &str| {
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            name,
        ])
    };
    let ca = |name: &str, subject: &str| {
        key(&format!("{name}.key"));
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-config",
            "openssl.cnf",
            "-extensions",
            "ca",
            "-key",
            &format!("{name}.key"),
            "-subj",
            subject,
            "-days",
            "2",
            "-out",
            &format!("{name}.crt"),
        ]);
    };
    ca("ca", "/CN=walhook test CA");
    ca("other-ca", "/CN=walhook unrelated test CA");
    // A certificate `name`.crt for `subject`, with the `extensions` section of the config,
    // signed by the CA.
    let signed = |name: &str, subject: &str, extensions: &str| {
        key(&format!("{name}.key"));
        let (csr, crt) = (format!("{name}.csr"), format!("{name}.crt"));
        let key = format!("{name}.key");
        openssl(&[
            "req",
            "-new",
            "-config",
            "openssl.cnf",
            "-key",
            &key,
            "-subj",
            subject,
            "-out",
            &csr,
        ]);
        let serial = format!("0x{:016x}", fastrand::u64(1..));
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &serial,
            "-days",
            "2",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            extensions,
            "-out",
            &crt,
        ]);
    };
    signed("server", "/CN=walhook test server", "server");
    // The client certificate, for the user the tests connect as.
    signed("client", "/CN=postgres", "client");
    for entry in fs::read_dir(dir).expect("list the tls dir") {
        install.give_to_server_user(&entry.expect("tls dir entry").path());
    }
    install.give_to_server_user(dir);
    let server_key = dir.join("server.key");
    fs::set_permissions(&server_key, fs::Permissions::from_mode(0o600))
        .expect("chmod 0600 the server key");
    SslFiles {
        ca_cert: dir.join("ca.crt"),
        other_ca_cert: dir.join("other-ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key,
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    }
}

/// `cp -a`: keeps modes and ownership (the data dir must stay 0700 and owned by the server's
/// user).
fn copy_dir(from: &Path, to: &Path) {
    let out = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .expect("run cp");
    if !out.status.success() {
        panic!(
            "cp -a {} {} failed:\n{}",
            from.display(),
            to.display(),
            describe(&out)
        );
    }
}

fn lookup_user(name: &str) -> (u32, u32) {
    let c_name = CString::new(name).expect("user name has no NUL");
    // SAFETY: getpwnam returns NULL or a pointer to a static record, which is read at once;
    // the test harness does not call getpwnam from other threads meanwhile except through
    // this OnceLock-guarded path.
    let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
    if entry.is_null() {
        panic!("running as root but there is no `{name}` user to run PostgreSQL as");
    }
    // SAFETY: non-null, checked above.
    unsafe { ((*entry).pw_uid, (*entry).pw_gid) }
}

/// A port that was free a moment ago. Another process may take it before PostgreSQL binds it;
/// `start` then retries with a new one.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn describe(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
