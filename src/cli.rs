//! The command line: `run`, `check` and `deliveries`. Every flag can also come from the
//! environment as `WALHOOK_<FLAG>`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::log::{Log, NotificationKey, State};
use crate::run::{run, RunOptions};
use crate::schema::describe_tables;
use crate::source::{self, Database, PublicationState};

#[derive(Parser, Debug)]
#[command(
    name = "walhook",
    version,
    about = "Tails PostgreSQL logical replication and delivers signed webhooks, at least once."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stream changes and deliver webhooks until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Validate the config and the database prerequisites without streaming.
    Check(CheckArgs),
    /// Inspect and redeliver notifications in the delivery log (while `run` is stopped).
    Deliveries(DeliveriesArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// PostgreSQL connection URL, e.g. postgresql://walhook:secret@127.0.0.1:5432/app
    #[arg(long, env = "WALHOOK_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Logical replication slot (created when missing).
    #[arg(long, env = "WALHOOK_SLOT", default_value = "walhook")]
    slot: String,
    /// Publication (created when missing).
    #[arg(long, env = "WALHOOK_PUBLICATION", default_value = "walhook")]
    publication: String,
    /// Directory of the durable delivery log.
    #[arg(long, env = "WALHOOK_DATA_DIR")]
    data_dir: PathBuf,
    /// Config file (TOML).
    #[arg(long, env = "WALHOOK_CONFIG")]
    config: PathBuf,
    /// Directory of classification SQL files (not implemented yet).
    #[arg(long, env = "WALHOOK_CLASSIFICATIONS")]
    classifications: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = "WALHOOK_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Config file (TOML).
    #[arg(long, env = "WALHOOK_CONFIG")]
    config: PathBuf,
    /// Also check this publication (`run` creates it when missing).
    #[arg(long, env = "WALHOOK_PUBLICATION")]
    publication: Option<String>,
    /// Directory of classification SQL files (not implemented yet).
    #[arg(long, env = "WALHOOK_CLASSIFICATIONS")]
    classifications: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct DeliveriesArgs {
    /// Directory of the durable delivery log.
    #[arg(long, env = "WALHOOK_DATA_DIR")]
    data_dir: PathBuf,
    #[command(subcommand)]
    action: DeliveriesAction,
}

#[derive(Subcommand, Debug)]
enum DeliveriesAction {
    /// Pending and dead notifications with their attempts.
    List,
    /// One notification: body, state and every attempt (JSON).
    Show { id: String },
    /// Queue a notification (or, with --dead, every dead one) for a new round of attempts.
    Redeliver {
        id: Option<String>,
        #[arg(long)]
        dead: bool,
    },
}

/// Parses the command line and runs it; the binary only calls this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run_command(args).await,
            Command::Check(args) => check_command(args).await,
            Command::Deliveries(args) => deliveries_command(args),
        }
    })
}

fn fail(message: &str) -> ExitCode {
    for line in message.lines() {
        eprintln!("walhook: error: {line}");
    }
    ExitCode::FAILURE
}

async fn run_command(args: RunArgs) -> ExitCode {
    let stop = match crate::shutdown::on_signals() {
        Ok(stop) => stop,
        Err(e) => return fail(&format!("cannot install signal handlers: {e}")),
    };
    let opts = RunOptions {
        database_url: args.database_url,
        slot: args.slot,
        publication: args.publication,
        data_dir: args.data_dir,
        config: args.config,
        classifications: args.classifications,
    };
    match run(opts, stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}

async fn check_command(args: CheckArgs) -> ExitCode {
    let mut problems = Vec::new();
    let config = match Config::load(&args.config, |name| std::env::var(name).ok()) {
        Ok(config) => Some(config),
        Err(e) => {
            problems.extend(e.problems());
            None
        }
    };
    if let Some(dir) = &args.classifications {
        problems.push(format!(
            "--classifications {}: classification events are not implemented in this version of walhook; remove the flag",
            dir.display()
        ));
    }
    match Database::parse(&args.database_url) {
        Err(e) => problems.push(e.to_string()),
        Ok(db) => match db.connect().await {
            Err(e) => problems.push(format!("cannot connect to {}: {e}", db.describe())),
            Ok(client) => {
                let tables = config.as_ref().map(Config::tables).unwrap_or_default();
                if let Err(e) =
                    check_database(&client, &tables, args.publication.as_deref(), &mut problems)
                        .await
                {
                    problems.push(format!("checking {}: {e}", db.describe()));
                }
            }
        },
    }
    if problems.is_empty() {
        println!("ok: config and database are ready for walhook run");
        ExitCode::SUCCESS
    } else {
        fail(&problems.join("\n"))
    }
}

async fn check_database(
    client: &tokio_postgres::Client,
    tables: &[crate::config::TableName],
    publication: Option<&str>,
    problems: &mut Vec<String>,
) -> Result<(), source::SourceError> {
    problems.extend(source::check_server(client).await?);
    let (_, table_problems) = describe_tables(client, tables).await?;
    problems.extend(table_problems);
    problems.extend(source::check_table_privileges(client, tables).await?);
    if let Some(name) = publication {
        if let PublicationState::Tables {
            created_by_walhook: false,
            missing,
        } = source::publication_state(client, name, tables).await?
        {
            if !missing.is_empty() {
                problems.push(source::publication_lacks(name, &missing));
            }
        }
    }
    Ok(())
}

fn deliveries_command(args: DeliveriesArgs) -> ExitCode {
    let log = match Log::open(&args.data_dir) {
        Ok(log) => log,
        Err(e) => return fail(&e.to_string()),
    };
    let now = crate::log::now_ms();
    let result = match args.action {
        DeliveriesAction::List => list(&log),
        DeliveriesAction::Show { id } => show(&log, &id),
        DeliveriesAction::Redeliver { id: None, dead: true } => log
            .redeliver_dead(now)
            .map(|n| println!("queued {n} dead notification(s) for redelivery"))
            .map_err(|e| e.to_string()),
        DeliveriesAction::Redeliver { id: Some(id), dead: false } => match parse_id(&id) {
            Err(e) => Err(e),
            Ok(key) => match log.redeliver(&key, now) {
                Ok(true) => {
                    println!("queued {key} for redelivery");
                    Ok(())
                }
                Ok(false) => Err(format!("no notification {id} in {}", args.data_dir.display())),
                Err(e) => Err(e.to_string()),
            },
        },
        DeliveriesAction::Redeliver { .. } => {
            Err("redeliver takes either an ID or --dead; e.g. walhook deliveries --data-dir DIR redeliver --dead".into())
        }
    };
    // sled flushes on drop as well; flush explicitly so a redelivery is durable at exit.
    let flushed = futures_flush(&log);
    match result.and(flushed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn futures_flush(log: &Log) -> Result<(), String> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(log.flush()))
        .map_err(|e| e.to_string())
}

fn parse_id(id: &str) -> Result<NotificationKey, String> {
    NotificationKey::parse(id).ok_or_else(|| {
        format!("{id:?} is not a notification id; ids look like crm-sync_00000000016B3748_0 (see walhook deliveries list)")
    })
}

fn timestamp(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn list(log: &Log) -> Result<(), String> {
    let entries = log.undelivered().map_err(|e| e.to_string())?;
    if entries.is_empty() {
        println!("no pending or dead notifications");
    }
    for (key, status) in entries {
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
        println!(
            "{key}\t{state}\tattempts={}\tnext={next}\tlast={last}",
            status.attempts
        );
    }
    Ok(())
}

fn show(log: &Log, id: &str) -> Result<(), String> {
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
    println!(
        "{}",
        serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
    );
    Ok(())
}
