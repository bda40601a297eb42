//! `tollctl`: Tollgate's config as code (dump, diff, sync, apply, validate) and cluster
//! operations, against any node of a cluster (it moves on when one is down).
//!
//! Exit codes: 0 done (for `diff`: nothing differs), 2 `diff` found differences, 1 an
//! error (which names the file, entity and field where it can).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};
use tollgate_client::ctl::output::{self, Output, Style};
use tollgate_client::ctl::{self, CtlError};
use tollgate_client::AdminClient;

#[derive(Parser)]
#[command(name = "tollctl", version, about = "Tollgate's config as code and cluster operations")]
struct Cli {
    /// Admin API URLs of one or more nodes, comma-separated; the next is tried when one
    /// cannot be reached.
    #[arg(long, env = "TOLLGATE_ADMIN", value_delimiter = ',', default_value = "http://127.0.0.1:8001", global = true)]
    admin: Vec<String>,
    /// The admin token (`--admin-token` of the nodes).
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// CA certificates (PEM) to trust for `https://` Admin URLs (`--admin-tls-cert`).
    #[arg(long, env = "TOLLGATE_CACERT", global = true)]
    cacert: Option<PathBuf>,
    /// Output: human (tables, diffs), json or yaml.
    #[arg(short = 'o', long, default_value = "human", global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the cluster's config as a declarative file (YAML unless `-o json`).
    Dump {
        /// Only entities carrying every one of these tags.
        #[arg(long = "select-tag")]
        select_tag: Vec<String>,
    },
    /// Show what `sync` would change: exit 0 when nothing, 2 when something.
    Diff {
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// Compare only entities carrying every one of these tags.
        #[arg(long = "select-tag")]
        select_tag: Vec<String>,
    },
    /// Make the cluster's config equal to the file, in one write (all or nothing).
    Sync {
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// Manage only entities carrying these tags; leave every other one alone.
        #[arg(long = "select-tag")]
        select_tag: Vec<String>,
    },
    /// Create and update what the file holds; never delete.
    Apply {
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
    /// Check a file offline with the nodes' own validation.
    Validate {
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
    /// One entity by id or name (`tollctl get services svc`).
    Get { entity: String, key: String },
    /// Every entity of a kind (`tollctl list routes`).
    List { entity: String },
    /// Delete one entity by id or name.
    Delete { entity: String, key: String },
    /// Every node: role, term, applied index, config version, gossip liveness, lag.
    Status,
    /// Raft membership changes.
    Members {
        #[command(subcommand)]
        action: Members,
    },
    /// Leadership.
    Leader {
        #[command(subcommand)]
        action: Leader,
    },
    /// An upstream's targets and their health, as the cluster sees it.
    Health { upstream: String },
    /// A cluster rate-limiting plugin's ledger.
    RateLimits { plugin: String },
    /// Shell completions for bash, zsh or fish.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum Members {
    /// Add a node: `tollctl members add 4 10.0.0.4:7946`.
    Add { node_id: u64, address: String },
    /// Remove a node.
    Remove { node_id: u64 },
}

#[derive(Subcommand)]
enum Leader {
    /// Move leadership to another node.
    Transfer,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let style = Style::detect();
    match run(cli, style).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("{}", style_error(style, &error.to_string()));
            ExitCode::from(1)
        }
    }
}

fn style_error(style: Style, message: &str) -> String {
    format!("{} {message}", Style { color: style.color }.paint(output::RED, "error:"))
}

async fn run(cli: Cli, style: Style) -> Result<ExitCode, CtlError> {
    let mut client = AdminClient::new(cli.admin.clone());
    if let Some(token) = &cli.token {
        client = client.with_token(token.clone());
    }
    if let Some(cacert) = &cli.cacert {
        client = client.with_ca_file(cacert).map_err(|error| CtlError::Usage(format!("--cacert {error}")))?;
    }
    let out = cli.output;
    match cli.command {
        Command::Dump { select_tag } => {
            let document = client.get("/config").await?.body;
            let selected = ctl::select_tagged(&document, &select_tag);
            let out = if out == Output::Human { Output::Yaml } else { out };
            ctl::emit(out, &selected, |_| String::new())?;
        }
        Command::Diff { file, select_tag } => {
            let loaded = load(&file)?;
            let changes = ctl::plan(&client, &loaded, &select_tag, true).await?.changes;
            ctl::emit(out, &ctl::changes_json(&changes), |_| ctl::render_changes(&changes, style))?;
            return Ok(if changes.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) });
        }
        Command::Sync { file, select_tag } => {
            let loaded = load(&file)?;
            let progress = Progress::start(format!("syncing {} entities", loaded.entities));
            let client = client.with_timeout(ctl::SYNC_TIMEOUT);
            let written = ctl::write_file(&client, &loaded, &select_tag, true).await;
            progress.stop();
            report_written(out, style, written?)?;
        }
        Command::Apply { file } => {
            let loaded = load(&file)?;
            let progress = Progress::start(format!("applying {} entities", loaded.entities));
            let client = client.with_timeout(ctl::SYNC_TIMEOUT);
            let written = ctl::write_file(&client, &loaded, &[], false).await;
            progress.stop();
            report_written(out, style, written?)?;
        }
        Command::Validate { file } => {
            let loaded = load(&file)?;
            let answer = json!({"file": file.display().to_string(), "valid": true, "entities": loaded.entities});
            ctl::emit(out, &answer, |_| format!("{}: valid ({} entities)", file.display(), loaded.entities))?;
        }
        Command::Get { entity, key } => {
            let kind = ctl::entity_kind(&entity)?;
            let found = client.get(&ctl::entity_path(&client, kind, &key).await?).await?.body;
            let out = if out == Output::Human { Output::Yaml } else { out };
            ctl::emit(out, &found, |_| String::new())?;
        }
        Command::List { entity } => {
            let kind = ctl::entity_kind(&entity)?;
            let all = Value::Array(ctl::list(&client, kind).await?);
            ctl::emit(out, &all, list_table)?;
        }
        Command::Delete { entity, key } => {
            let kind = ctl::entity_kind(&entity)?;
            client.delete(&ctl::entity_path(&client, kind, &key).await?).await?;
            ctl::emit(out, &json!({"deleted": {"entity": kind.table(), "key": key}}), |_| {
                format!("deleted {} {key}", kind.table())
            })?;
        }
        Command::Status => {
            let status = ctl::cluster_status(&client).await?;
            ctl::emit(out, &status, status_table)?;
        }
        Command::Members { action } => {
            let reply = match action {
                Members::Add { node_id, address } => {
                    client.post("/cluster/members", &json!({"node_id": node_id, "address": address})).await?
                }
                Members::Remove { node_id } => client.delete(&format!("/cluster/members/{node_id}")).await?,
            };
            ctl::emit(out, &reply.body, output::short)?;
        }
        Command::Leader { action: Leader::Transfer } => {
            return Err(CtlError::Usage(
                "leader transfer is not supported by the Admin API: a leader hands leadership to its most \
                 caught-up voter when it stops (SIGTERM), so restart the leader to move it"
                    .into(),
            ));
        }
        Command::Health { upstream } => {
            let health = client.get(&format!("/upstreams/{}/health", ctl::escape(&upstream))).await?.body;
            ctl::emit(out, &health, health_table)?;
        }
        Command::RateLimits { plugin } => {
            let ledger = client.get(&format!("/rate-limits/{}", ctl::escape(&plugin))).await?.body;
            let out = if out == Output::Human { Output::Yaml } else { out };
            ctl::emit(out, &ledger, |_| String::new())?;
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tollctl", &mut std::io::stdout());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn load(file: &std::path::Path) -> Result<ctl::Loaded, CtlError> {
    let loaded = ctl::load_file(file)?;
    for warning in &loaded.warnings {
        eprintln!("warning: {}: {warning}", file.display());
    }
    Ok(loaded)
}

fn report_written(out: Output, style: Style, written: ctl::Written) -> Result<(), CtlError> {
    let elapsed_ms = written.elapsed.as_millis() as u64;
    let answer = json!({"changes": ctl::changes_json(&written.changes), "elapsed_ms": elapsed_ms});
    ctl::emit(out, &answer, |_| {
        if written.changes.is_empty() {
            "nothing to change".to_string()
        } else {
            format!("{}\ndone in {elapsed_ms} ms (one write)", ctl::render_changes(&written.changes, style))
        }
    })
}

fn list_table(entities: &Value) -> String {
    let rows: Vec<Vec<String>> = entities
        .as_array()
        .into_iter()
        .flatten()
        .map(|entity| {
            let name = ["name", "username", "key", "target", "group"]
                .iter()
                .find_map(|field| entity.get(*field).filter(|v| !v.is_null()))
                .map_or_else(|| "-".to_string(), output::short);
            let tags = entity.get("tags").map_or_else(|| "-".to_string(), output::short);
            vec![output::short(&entity["id"]), name, tags]
        })
        .collect();
    output::table(&["id", "name", "tags"], &rows)
}

fn status_table(status: &Value) -> String {
    let rows: Vec<Vec<String>> = status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|node| {
            ["node_id", "address", "role", "term", "applied_index", "config_version", "gossip", "lag"]
                .iter()
                .map(|field| output::short(&node[*field]))
                .collect()
        })
        .collect();
    let head = format!("leader {} · term {}", output::short(&status["leader_id"]), output::short(&status["term"]));
    let table = output::table(&["node", "address", "role", "term", "applied", "config", "gossip", "lag"], &rows);
    format!("{head}\n{table}")
}

fn health_table(health: &Value) -> String {
    let rows: Vec<Vec<String>> = health["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|target| {
            ["target", "weight", "health", "observed_by"].iter().map(|field| output::short(&target[*field])).collect()
        })
        .collect();
    output::table(&["target", "weight", "health", "observed by"], &rows)
}

/// A line on stderr while a long operation runs (only on a terminal).
struct Progress {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn start(what: String) -> Progress {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return Progress { task: None };
        }
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
            for frame in frames.iter().cycle() {
                eprint!("\r{frame} {what} … {:.1} s", started.elapsed().as_secs_f64());
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        });
        Progress { task: Some(task) }
    }

    fn stop(self) {
        if let Some(task) = self.task {
            task.abort();
            eprint!("\r\u{1b}[2K");
        }
    }
}
