//! The PostgreSQL side: connections, prerequisites, the publication and the logical slot.
//!
//! Errors are split the way Materialize splits them: [`SourceError::Transient`] (the server
//! is unreachable, restarting, or the slot is still held by a dying walsender) is retried
//! with backoff; [`SourceError::Definite`] (bad settings, missing privileges, an invalidated
//! slot) stops walhook with a message that says what to do.

use std::str::FromStr;
use std::time::Duration;

use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationConfig};
use tokio_postgres::config::Host;

use crate::config::{quote_ident, quote_literal, TableName};

/// Marks publications walhook created, so it may add tables to them (and only to them).
const PUBLICATION_COMMENT: &str = "created by walhook";

/// How many replication events (row changes, transaction boundaries) wait between the
/// socket and the stream at most. Small on purpose: with the stream reading in bursts
/// (`run.rs`, `READ_PAUSE`), the replication worker then stops reading when its buffer is
/// full and what arrives meanwhile waits in the socket, to be read in larger pieces. With
/// 4,096 (a few MB of ordinary rows) the pause alone did not cut walhook's CPU; with 256 it
/// did (see `READ_PAUSE`).
pub const EVENT_BUFFER: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Definite(String),
}

impl SourceError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Transient(_))
    }
}

/// SQLSTATEs that clear up by themselves: connection failures, resource shortages, a server
/// shutting down or starting up, an object in use (a slot held by a dying walsender).
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code == "55006"
        || code.starts_with("40")
}

impl From<tokio_postgres::Error> for SourceError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) if !transient_sqlstate(db.code().code()) => SourceError::Definite(format!(
                "PostgreSQL: {} (SQLSTATE {})",
                db.message(),
                db.code().code()
            )),
            Some(db) => SourceError::Transient(format!("PostgreSQL: {}", db.message())),
            None => {
                let text = one_line(&e);
                // A certificate that does not check out, or a server without TLS where
                // sslmode demands it, will not change by retrying.
                if tls_is_definite(&text) {
                    SourceError::Definite(format!(
                        "PostgreSQL connection: {text}; check sslmode and sslrootcert in --database-url"
                    ))
                } else {
                    SourceError::Transient(format!("PostgreSQL connection: {text}"))
                }
            }
        }
    }
}

impl From<PgWireError> for SourceError {
    fn from(e: PgWireError) -> Self {
        match &e {
            PgWireError::Server(message) => {
                let code = message
                    .rsplit_once("(SQLSTATE ")
                    .map(|(_, c)| c.trim_end_matches(')'))
                    .unwrap_or("");
                if transient_sqlstate(code) {
                    SourceError::Transient(format!("replication: {message}"))
                } else {
                    SourceError::Definite(format!("replication: {message}"))
                }
            }
            PgWireError::Auth(message) => SourceError::Definite(format!(
                "replication connection refused: {message}; check the user and password in --database-url"
            )),
            // A certificate or setting that does not check out will not by retrying; a
            // connection lost during the handshake may.
            PgWireError::Tls(message) if tls_is_definite(message) => SourceError::Definite(format!(
                "replication TLS: {message}; check sslmode and sslrootcert in --database-url"
            )),
            PgWireError::Tls(message) => SourceError::Transient(format!("replication TLS: {message}")),
            _ => SourceError::Transient(format!("replication: {e}")),
        }
    }
}

/// Whether a TLS failure says the settings or the certificate are wrong (rather than the
/// connection being lost during the handshake).
fn tls_is_definite(message: &str) -> bool {
    [
        "invalid peer certificate",
        "does not support TLS",
        "TLS config error",
        "invalid SNI",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// An error with its sources, on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text.replace('\n', " ")
}

/// A parsed `--database-url`.
#[derive(Clone)]
pub struct Database {
    config: tokio_postgres::Config,
    tls: crate::tls::Settings,
    connector: tokio_postgres_rustls::MakeRustlsConnect,
}

impl std::fmt::Debug for Database {
    // The URL may hold a password: show only where it points.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Database({})", self.describe())
    }
}

impl Database {
    pub fn parse(url: &str) -> Result<Database, SourceError> {
        let (url, tls) = crate::tls::split(url).map_err(SourceError::Definite)?;
        let mut config = tokio_postgres::Config::from_str(&url).map_err(|e| {
            SourceError::Definite(format!(
                "--database-url is not a PostgreSQL connection string ({e}); write e.g. postgresql://user:password@host:5432/dbname"
            ))
        })?;
        // Whatever sslmode the rest still holds was missed by `split`: never override it.
        if config.get_ssl_mode() != tokio_postgres::config::SslMode::Prefer {
            return Err(SourceError::Definite(
                "--database-url: sslmode could not be read unambiguously; percent-encode special characters in the user and password (e.g. ? as %3F)".into(),
            ));
        }
        config.ssl_mode(tls.mode.for_tokio_postgres());
        tls.check().map_err(SourceError::Definite)?;
        let connector = tls.connector().map_err(SourceError::Definite)?;
        if config.get_user().is_none() {
            return Err(SourceError::Definite(
                "--database-url names no user; write it in, e.g. postgresql://walhook@127.0.0.1:5432/app".into(),
            ));
        }
        if config.get_hosts().is_empty() {
            return Err(SourceError::Definite(
                "--database-url names no host; write e.g. postgresql://user@127.0.0.1:5432/dbname"
                    .into(),
            ));
        }
        Ok(Database {
            config,
            tls,
            connector,
        })
    }

    /// `user@host:port/dbname`, without the password.
    pub fn describe(&self) -> String {
        format!(
            "{}@{}:{}/{}",
            self.user(),
            self.host(),
            self.port(),
            self.dbname()
        )
    }

    fn user(&self) -> String {
        self.config.get_user().unwrap_or("postgres").to_string()
    }

    fn dbname(&self) -> String {
        self.config
            .get_dbname()
            .map(str::to_string)
            .unwrap_or_else(|| self.user())
    }

    fn host(&self) -> String {
        match self.config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            #[cfg(unix)]
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".into(),
        }
    }

    fn port(&self) -> u16 {
        self.config.get_ports().first().copied().unwrap_or(5432)
    }

    /// A regular SQL connection; its driver task ends with the connection.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, SourceError> {
        let mut config = self.config.clone();
        config.connect_timeout(Duration::from_secs(10));
        config.application_name("walhook");
        let (client, connection) = config.connect(self.connector.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "SQL connection closed");
            }
        });
        Ok(client)
    }

    /// Settings for a replication session on `slot`, starting at `start`.
    pub fn replication(&self, slot: &str, publication: &str, start: Lsn) -> ReplicationConfig {
        let password = self
            .config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        ReplicationConfig::new(
            self.host(),
            self.user(),
            password,
            self.dbname(),
            slot,
            publication,
        )
        .with_port(self.port())
        .with_start_lsn(start)
        .with_ack_lsn(start)
        // Acknowledgements reach the server within this interval of a flush (a status
        // message is a few dozen bytes: forty a second under load cost nothing, and keep the
        // slot close behind the log).
        .with_status_interval(Duration::from_millis(25))
        .with_wakeup_interval(Duration::from_secs(5))
        .with_buffer_size(EVENT_BUFFER)
        .with_application_name("walhook")
        .with_tls(self.tls.for_replication(&self.host()))
    }
}

/// Server-wide prerequisites: `wal_level = logical` and a role allowed to replicate.
/// Returns one line per problem.
pub async fn check_server(client: &tokio_postgres::Client) -> Result<Vec<String>, SourceError> {
    let mut problems = Vec::new();
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        problems.push(format!(
            "wal_level is {wal_level:?}, logical replication needs \"logical\": run ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
        ));
    }
    let row = client
        .query_one(
            "SELECT rolname::text, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (role, superuser, replication): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if !superuser && !replication {
        problems.push(format!(
            "role {role:?} may not stream replication: run ALTER ROLE {} WITH REPLICATION (see sql/role.sql)",
            quote_ident(&role)
        ));
    }
    Ok(problems)
}

/// What the role lacks on the tables (SELECT is needed for the publication's initial checks
/// and for later features that read rows). One line per problem.
pub async fn check_table_privileges(
    client: &tokio_postgres::Client,
    tables: &[TableName],
) -> Result<Vec<String>, SourceError> {
    let mut problems = Vec::new();
    for table in tables {
        let row = client
            .query_one(
                "SELECT has_table_privilege(c.oid, 'SELECT') FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&table.schema, &table.name],
            )
            .await;
        if let Ok(row) = row {
            if !row.get::<_, bool>(0) {
                problems.push(format!(
                    "the role may not read {table}: GRANT SELECT ON {} TO <walhook role>",
                    table.quoted()
                ));
            }
        }
    }
    Ok(problems)
}

/// How a publication stands against the tables the config needs.
pub enum PublicationState {
    Missing,
    /// Publishes every table.
    AllTables,
    Tables {
        created_by_walhook: bool,
        missing: Vec<TableName>,
    },
}

pub async fn publication_state(
    client: &tokio_postgres::Client,
    name: &str,
    tables: &[TableName],
) -> Result<PublicationState, SourceError> {
    let rows = client
        .query(
            "SELECT puballtables, coalesce(obj_description(oid, 'pg_publication'), '') \
             FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?;
    let Some(row) = rows.first() else {
        return Ok(PublicationState::Missing);
    };
    if row.get::<_, bool>(0) {
        return Ok(PublicationState::AllTables);
    }
    let created_by_walhook = row.get::<_, String>(1) == PUBLICATION_COMMENT;
    let published: Vec<TableName> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| TableName {
            schema: r.get(0),
            name: r.get(1),
        })
        .collect();
    let missing = tables
        .iter()
        .filter(|t| !published.contains(t))
        .cloned()
        .collect();
    Ok(PublicationState::Tables {
        created_by_walhook,
        missing,
    })
}

/// Creates the publication when missing, adds tables to one walhook created; a publication
/// the user made is used as it is, and a table it lacks is a definite error.
pub async fn ensure_publication(
    client: &tokio_postgres::Client,
    name: &str,
    tables: &[TableName],
) -> Result<(), SourceError> {
    let list = tables
        .iter()
        .map(TableName::quoted)
        .collect::<Vec<_>>()
        .join(", ");
    let partitioned = partitioned_tables(client, tables).await?;
    // First, because the option decides how pg_publication_tables lists a partitioned
    // table: itself when on, its partitions when off.
    publish_via_root(client, name, &partitioned).await?;
    match publication_state(client, name, tables).await? {
        PublicationState::Missing => {
            let with = if partitioned.is_empty() {
                ""
            } else {
                " WITH (publish_via_partition_root = true)"
            };
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {list}{with}; COMMENT ON PUBLICATION {} IS {}",
                    quote_ident(name),
                    quote_ident(name),
                    quote_literal(PUBLICATION_COMMENT)
                ))
                .await?;
            tracing::info!(publication = name, tables = %list, "created publication");
        }
        PublicationState::AllTables => {}
        PublicationState::Tables { missing, .. } if missing.is_empty() => {}
        PublicationState::Tables {
            created_by_walhook: true,
            missing,
        } => {
            let add = missing
                .iter()
                .map(TableName::quoted)
                .collect::<Vec<_>>()
                .join(", ");
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {add}",
                    quote_ident(name)
                ))
                .await?;
            tracing::info!(publication = name, tables = %add, "added tables to publication");
        }
        PublicationState::Tables { missing, .. } => {
            return Err(SourceError::Definite(publication_lacks(name, &missing)));
        }
    }
    Ok(())
}

/// The configured tables that are partitioned, quoted. Their rows live in partitions, and a
/// publication reports the changes under each partition's own name unless
/// `publish_via_partition_root` is on; walhook matches changes to the configured table by
/// name, so without the option they would be missed.
async fn partitioned_tables(
    client: &tokio_postgres::Client,
    tables: &[TableName],
) -> Result<Vec<String>, SourceError> {
    let mut partitioned = Vec::new();
    for table in tables {
        let rows = client
            .query(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind = 'p'",
                &[&table.schema, &table.name],
            )
            .await?;
        if !rows.is_empty() {
            partitioned.push(table.quoted());
        }
    }
    Ok(partitioned)
}

/// Turns `publish_via_partition_root` on for an existing publication walhook created when
/// `partitioned` tables are configured; a user's publication without it is an error.
async fn publish_via_root(
    client: &tokio_postgres::Client,
    name: &str,
    partitioned: &[String],
) -> Result<(), SourceError> {
    if partitioned.is_empty() {
        return Ok(());
    }
    let rows = client
        .query(
            "SELECT pubviaroot, coalesce(obj_description(oid, 'pg_publication'), '') \
             FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?;
    let Some(row) = rows.first() else {
        return Ok(());
    };
    if row.get::<_, bool>(0) {
        return Ok(());
    }
    let alter = format!(
        "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
        quote_ident(name)
    );
    if row.get::<_, String>(1) != PUBLICATION_COMMENT {
        return Err(SourceError::Definite(format!(
            "publication {name:?} reports changes of the partitioned table(s) {} under each partition's name, which walhook does not match to the configured table; run {alter}",
            partitioned.join(", ")
        )));
    }
    client.batch_execute(&alter).await?;
    tracing::info!(
        publication = name,
        "set publish_via_partition_root: changes of partitioned tables carry the table's name"
    );
    Ok(())
}

pub fn publication_lacks(name: &str, missing: &[TableName]) -> String {
    let list = missing
        .iter()
        .map(TableName::quoted)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "publication {name:?} was not created by walhook and does not publish {list}; run ALTER PUBLICATION {} ADD TABLE {list}, or pass another --publication",
        quote_ident(name)
    )
}

/// Creates the logical slot when missing; checks an existing one. Returns its confirmed
/// flush position, where streaming resumes, and whether it was created now.
pub async fn ensure_slot(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<(Lsn, bool), SourceError> {
    let rows = client
        .query(
            "SELECT plugin::text, slot_type, database::text = current_database(), \
                    coalesce(wal_status, ''), confirmed_flush_lsn::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let Some(row) = rows.first() else {
        let row = client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await?;
        let lsn = parse_lsn(row.get(0))?;
        tracing::info!(slot, %lsn, "created logical replication slot");
        return Ok((lsn, true));
    };
    let plugin: Option<String> = row.get(0);
    let slot_type: String = row.get(1);
    let same_db: Option<bool> = row.get(2);
    let wal_status: String = row.get(3);
    let confirmed: Option<String> = row.get(4);
    if slot_type != "logical" || plugin.as_deref() != Some("pgoutput") {
        return Err(SourceError::Definite(format!(
            "replication slot {slot:?} exists but is not a logical pgoutput slot; drop it (SELECT pg_drop_replication_slot('{slot}')) or pass another --slot"
        )));
    }
    if same_db != Some(true) {
        return Err(SourceError::Definite(format!(
            "replication slot {slot:?} belongs to another database; pass another --slot"
        )));
    }
    if wal_status == "lost" {
        return Err(SourceError::Definite(format!(
            "replication slot {slot:?} was invalidated (wal_status = lost: the WAL it needed was removed, see max_slot_wal_keep_size); changes since then are gone. Drop it (SELECT pg_drop_replication_slot('{slot}')) and start again"
        )));
    }
    match confirmed {
        Some(lsn) => Ok((parse_lsn(&lsn)?, false)),
        None => Ok((Lsn::ZERO, false)),
    }
}

/// Moves the slot's confirmed position to `lsn` with SQL, once no walsender holds it.
/// Used at shutdown so the final acknowledgement does not depend on a status message.
pub async fn advance_slot(
    client: &tokio_postgres::Client,
    slot: &str,
    lsn: Lsn,
) -> Result<(), SourceError> {
    client
        .query(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn) \
             WHERE (SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1) < $2::text::pg_lsn",
            &[&slot, &lsn.to_string()],
        )
        .await?;
    Ok(())
}

fn parse_lsn(text: &str) -> Result<Lsn, SourceError> {
    Lsn::parse(text).map_err(|e| SourceError::Definite(format!("server sent an {e}")))
}

/// Which database this is: the cluster's system identifier (when the role may read
/// `pg_control_system()`) and the database name.
pub async fn identify(
    client: &tokio_postgres::Client,
) -> Result<(Option<String>, String), SourceError> {
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    let system = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .ok()
        .map(|row| row.get(0));
    Ok((system, database))
}

/// Whether the connected role may stream replication (REPLICATION or superuser).
pub async fn may_replicate(client: &tokio_postgres::Client) -> Result<bool, SourceError> {
    Ok(client
        .query_one(
            "SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?
        .get(0))
}

/// Opens a replication session and asks IDENTIFY_SYSTEM, as `run` will: catches a server
/// that admits SQL but no walsender (max_wal_senders used up or 0). `None` when it works.
pub async fn check_replication_connection(db: &Database) -> Option<String> {
    let config = db.replication("walhook_check", "walhook_check", Lsn::ZERO);
    let attempt = async {
        let mut client = pgwire_replication::ReplicationClient::connect_gated(config).await?;
        client.identify_system().await
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(_)) => None,
        Ok(Err(PgWireError::Tls(message))) if tls_is_definite(&message) => Some(format!(
            "a replication connection to {} failed in TLS ({message}); check sslmode and sslrootcert in --database-url",
            db.describe()
        )),
        Ok(Err(e)) => Some(format!(
            "a replication connection to {} is refused ({e}); max_wal_senders must leave a sender free for walhook (see sql/settings.sql)",
            db.describe()
        )),
        Err(_) => Some(format!(
            "a replication connection to {} did not answer within 10 s",
            db.describe()
        )),
    }
}

/// A replication slot created with an exported snapshot: the snapshot shows the database
/// exactly as of the slot's consistent point, and stays usable (`SET TRANSACTION SNAPSHOT`)
/// while `session` is open. Dropping it ends the session (and a temporary slot with it).
pub struct ExportedSnapshot {
    pub session: ReplicationClient,
    /// The slot's consistent point: transactions committed from here on are streamed,
    /// earlier ones are in the snapshot.
    pub lsn: Lsn,
    pub name: String,
}

/// Creates logical slot `slot` (pgoutput) on a gated replication session, exporting its
/// snapshot. A temporary slot lives only as long as the session.
pub async fn create_slot_exporting(
    db: &Database,
    slot: &str,
    temporary: bool,
) -> Result<ExportedSnapshot, SourceError> {
    let config = db.replication(slot, "walhook_unused", Lsn::ZERO);
    let mut session = ReplicationClient::connect_gated(config).await?;
    let command = format!(
        "CREATE_REPLICATION_SLOT {} {}LOGICAL pgoutput EXPORT_SNAPSHOT",
        quote_ident(slot),
        if temporary { "TEMPORARY " } else { "" }
    );
    let rows = session.simple_query(&command).await?;
    let field = |i: usize| {
        rows.first()
            .and_then(|r| r.get(i).cloned().flatten())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .ok_or_else(|| {
                SourceError::Transient(format!("CREATE_REPLICATION_SLOT returned no field {i}"))
            })
    };
    let lsn = parse_lsn(&field(1)?)?;
    let name = field(2)?;
    if temporary {
        tracing::debug!(slot, %lsn, "created a temporary slot for a baseline");
    } else {
        tracing::info!(slot, %lsn, "created logical replication slot");
    }
    Ok(ExportedSnapshot { session, lsn, name })
}

/// Whether slot `slot` exists.
pub async fn slot_exists(client: &tokio_postgres::Client, slot: &str) -> Result<bool, SourceError> {
    Ok(!client
        .query(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .is_empty())
}
