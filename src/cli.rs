//! The command line: `run`, `check` and `deliveries`. Every flag can also come from the
//! environment as `WALHOOK_<FLAG>`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::classify;
use crate::config::Config;
use crate::control;
use crate::inspect::{self, Request};
use crate::log::{Log, LogError};
use crate::run::{run, RunOptions};
use crate::schema::describe_tables;
use crate::source::{self, Database, PublicationState};

#[derive(Parser)]
#[command(
    name = "walhook",
    version,
    about = "Tails PostgreSQL logical replication and delivers signed webhooks, at least once."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream changes and deliver webhooks until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Validate the config and the database prerequisites without streaming.
    Check(CheckArgs),
    /// Inspect and redeliver notifications in the delivery log (directly, or through a
    /// running `walhook run`'s control socket).
    Deliveries(DeliveriesArgs),
}

#[derive(clap::Args)]
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
    /// Directory of classification SQL files (DIR/NAME.sql defines classification NAME).
    #[arg(long, env = "WALHOOK_CLASSIFICATIONS")]
    classifications: Option<PathBuf>,
}

#[derive(clap::Args)]
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
    /// Directory of classification SQL files (DIR/NAME.sql defines classification NAME).
    #[arg(long, env = "WALHOOK_CLASSIFICATIONS")]
    classifications: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DeliveriesArgs {
    /// Directory of the durable delivery log.
    #[arg(long, env = "WALHOOK_DATA_DIR")]
    data_dir: PathBuf,
    #[command(subcommand)]
    action: DeliveriesAction,
}

#[derive(Subcommand)]
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
            Command::Deliveries(args) => deliveries_command(args).await,
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
    let classifications = args.classifications.as_ref().map(|dir| {
        let (found, file_problems) = classify::load_dir(dir);
        problems.extend(file_problems);
        (dir, found)
    });
    match Database::parse(&args.database_url) {
        Err(e) => problems.push(e.to_string()),
        Ok(db) => match db.connect().await {
            Err(e) => problems.push(format!("cannot connect to {}: {e}", db.describe())),
            Ok(client) => {
                // Only for a role that may replicate: otherwise that is the problem to report.
                if source::may_replicate(&client).await.unwrap_or(false) {
                    problems.extend(source::check_replication_connection(&db).await);
                }
                // An invalid config still names its tables: check them in the same run.
                let mut tables = config
                    .as_ref()
                    .map(Config::tables)
                    .unwrap_or_else(|| Config::tables_named_in(&args.config));
                // Classified tables, and the tables their conditions depend on, are
                // published too.
                // (`columns` events keep state too: their columns are checked here.)
                if let Some(config) = &config {
                    let found = classifications
                        .as_ref()
                        .map(|(_, found)| found.as_slice())
                        .unwrap_or_default();
                    let used: Vec<classify::Classification> =
                        classify::used(&config.transitions, found)
                            .into_iter()
                            .cloned()
                            .collect();
                    let mut base: Vec<_> = used.iter().map(|c| c.table.clone()).collect();
                    base.extend(
                        config
                            .events
                            .iter()
                            .filter(|e| !e.columns.is_empty())
                            .map(|e| e.table.clone()),
                    );
                    let planned = async {
                        let (mut infos, _) = crate::schema::describe_tables(&client, &base).await?;
                        classify::plan(&client, config, &used, &mut infos).await
                    };
                    match planned.await {
                        Ok((planned, plan_problems)) => {
                            problems.extend(plan_problems);
                            for t in planned {
                                if !tables.contains(&t.table) {
                                    tables.push(t.table);
                                }
                            }
                        }
                        Err(e) => problems.push(format!("checking classifications: {e}")),
                    }
                }
                if let Err(e) =
                    check_database(&client, &tables, args.publication.as_deref(), &mut problems)
                        .await
                {
                    problems.push(format!("checking {}: {e}", db.describe()));
                }
                if let Some((_, found)) = &classifications {
                    match classify::validate(&client, found).await {
                        Ok(p) => problems.extend(p),
                        Err(e) => problems.push(format!("checking classifications: {e}")),
                    }
                }
            }
        },
    }
    // Classification events must name a classification file.
    problems.extend(classify::check_events(
        config.iter().flat_map(|c| &c.transitions),
        classifications
            .as_ref()
            .map(|(dir, found)| (dir.as_path(), found.as_slice())),
    ));
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

async fn deliveries_command(args: DeliveriesArgs) -> ExitCode {
    let request = match args.action {
        DeliveriesAction::List => Request::List,
        DeliveriesAction::Show { id } => Request::Show { id },
        DeliveriesAction::Redeliver { id: None, dead: true } => Request::RedeliverDead,
        DeliveriesAction::Redeliver {
            id: Some(id),
            dead: false,
        } => Request::Redeliver { id },
        DeliveriesAction::Redeliver { .. } => {
            return fail("redeliver takes either an ID or --dead; e.g. walhook deliveries --data-dir DIR redeliver --dead")
        }
    };
    // Opening would create an empty log: a mistyped --data-dir must not look like "all clear".
    if !Log::exists(&args.data_dir) {
        return fail(&format!(
            "no delivery log in {}; pass the --data-dir that walhook run uses",
            args.data_dir.display()
        ));
    }
    let result = match Log::open(&args.data_dir) {
        Ok(log) => {
            let result = inspect::execute(&log, &request);
            // Make a redelivery durable before saying it is queued.
            match log.flush().await {
                Ok(()) => result,
                Err(e) => Err(e.to_string()),
            }
        }
        // A running `walhook run` holds the log: ask it through its control socket.
        Err(locked @ LogError::Locked { .. }) => {
            match control::request(&args.data_dir, &request).await {
                Ok(response) if response.ok => Ok(response.output),
                Ok(response) => Err(response.output),
                // No socket (or a path too long for one), or nobody behind it: the dir is
                // held some other way.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound
                            | std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::InvalidInput
                    ) =>
                {
                    Err(locked.to_string())
                }
                Err(e) => Err(format!(
                    "asking the running walhook through {}: {e}",
                    control::socket_path(&args.data_dir).display()
                )),
            }
        }
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(output) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}
