//! `firn` subcommands. `serve` runs the daemon; the others talk to it over the HTTP API,
//! except `remote`, which works on the configured object store directly (for checks,
//! drills and benchmarks) and needs no daemon.

mod remote;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::daemon::config::Config;
use crate::daemon::status::Status;
use crate::remote::limit::{Policy, Rate};

#[derive(Parser)]
#[command(name = "firn", version, about = "firn: an edge storage gateway")]
struct Cli {
    /// The config file (TOML). Without one, every key has its default.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until Ctrl-C.
    Serve,
    /// Show what the running gateway is doing.
    Status {
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show or change the bandwidth limits of the running gateway.
    Bandwidth {
        /// Base upload limit, e.g. 10MiB (per second) or unlimited.
        #[arg(long)]
        upload: Option<String>,
        /// Base download limit.
        #[arg(long)]
        download: Option<String>,
    },
    /// Create, list, show and delete block volumes (served over NBD).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Create, list, show and delete file shares (served over NFSv3).
    #[command(subcommand)]
    Share(ShareCommand),
    /// Work on the configured object store directly.
    #[command(subcommand)]
    Remote(remote::RemoteCommand),
    /// Print a new random master key (64 hex digits) for [keys] source = "env" or "file".
    Keygen,
}

/// A cached volume's own limits on local space.
#[derive(clap::Args)]
struct LimitArgs {
    /// Most bytes of the volume's log not yet in the bucket, e.g. 512MiB (default: [volumes]
    /// log_max); reserved on local disk while the volume is open.
    #[arg(long)]
    log_max: Option<String>,
    /// Most local bytes of the volume's uploaded data kept for reads, e.g. 20GiB (default:
    /// [volumes] cache_max).
    #[arg(long)]
    cache_max: Option<String>,
}

impl LimitArgs {
    /// The limits as API fields (absent ones left out).
    fn fields(&self) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
        let mut fields = serde_json::Map::new();
        for (key, value) in [("log_max", &self.log_max), ("cache_max", &self.cache_max)] {
            if let Some(value) = value {
                let value = if value == "default" {
                    "default".into()
                } else {
                    crate::size::parse_size(value)?.into()
                };
                fields.insert(key.into(), value);
            }
        }
        Ok(fields)
    }
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume.
    Create {
        name: String,
        /// Size, e.g. 10G or 512MiB; a multiple of 4 KiB.
        #[arg(long)]
        size: String,
        /// cached: the data lives in the bucket, hot data cached here, writes uploaded in the
        /// background; local: kept on this gateway's disk only (scratch).
        #[arg(long, default_value = "cached")]
        mode: String,
        #[arg(long)]
        read_only: bool,
        /// Address block (CIDR) whose NBD clients may attach; repeat for more. Default: [nbd] allow.
        #[arg(long)]
        allow: Vec<String>,
        /// TLS identity (PSK identity or client certificate common name) that may attach;
        /// repeat for more. Default: any client the door admits.
        #[arg(long = "client")]
        clients: Vec<String>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List volumes.
    List {
        /// List the cached volumes in the bucket that this gateway does not serve (those
        /// `takeover` can restore here).
        #[arg(long)]
        bucket: bool,
    },
    /// Serve here a cached volume from the bucket: restores the image of its newest commit
    /// (data is read on demand) and fences the gateway that served it before.
    Takeover {
        name: String,
        /// Which volume, when the bucket holds several of that name (`list --bucket` shows
        /// their ids).
        #[arg(long)]
        id: Option<String>,
        /// Take over although another gateway's lease is live, or the object store cannot
        /// fence the old gateway (it ignores If-None-Match). Only when that gateway is gone.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Show one volume.
    Show { name: String },
    /// Delete a volume and its data (a cached volume's objects in the bucket too).
    Delete {
        name: String,
        /// Delete although NBD clients are attached: their requests fail from then on.
        #[arg(long)]
        force: bool,
    },
    /// Grow a cached volume, online (clients that connect next see the new size).
    Resize {
        name: String,
        /// The new size, larger than the current one, e.g. 200G.
        #[arg(long)]
        size: String,
    },
    /// Change a cached volume's own limits on local space (`default`: [volumes]' again).
    /// Both hold at once: a smaller log_max gives its room on disk back, a larger one takes
    /// it (writes waiting for room go on).
    Limits {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

#[derive(Subcommand)]
enum ShareCommand {
    /// Create a share: NFS export `/<name>`, its files the objects under the prefix.
    Create {
        name: String,
        /// Where the files go in the bucket, ending in '/'. Default: `<name>/`.
        #[arg(long)]
        prefix: Option<String>,
        /// Another bucket on the same S3 endpoint, with the same credentials (default: the
        /// [remote] bucket). `[remote] prefix` does not apply there.
        #[arg(long)]
        bucket: Option<String>,
        #[arg(long)]
        read_only: bool,
        /// Address block (CIDR) whose NFS clients may mount the share; repeat for more.
        /// Default: [nfs] allow.
        #[arg(long)]
        allow: Vec<String>,
        /// Whose files NFS clients' root (or every user, or nobody) makes: root, all, none.
        #[arg(long, default_value = "root")]
        squash: String,
    },
    /// List shares.
    List,
    /// Show one share: its settings and upload status.
    Show { name: String },
    /// Bring the share in line with the bucket now: objects other tools put or deleted under
    /// its prefix show up or go.
    Refresh {
        name: String,
        /// Only this directory of the share (e.g. a/b).
        #[arg(long, default_value = "")]
        path: String,
    },
    /// List the files that reached the bucket (this run), oldest first: sequence number,
    /// time, size, object key.
    Uploads {
        name: String,
        /// Only those after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep listening and print each file as it reaches the bucket (until interrupted).
        #[arg(long)]
        follow: bool,
    },
    /// Remove a share from this gateway. Its objects in the bucket stay.
    Delete {
        name: String,
        /// Delete although some files are not yet in the bucket (they are lost).
        #[arg(long)]
        force: bool,
    },
}

/// `name` as one segment of an API path, percent-encoded: no name reaches another path
/// (`../volumes/x`) or adds to the query (`v?force=true`).
fn segment(name: &str) -> anyhow::Result<String> {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    if name.is_empty() || name == "." || name == ".." {
        bail!("no volume or share can be named {name:?}");
    }
    Ok(utf8_percent_encode(name, KEEP).to_string())
}

async fn share(client: &ApiClient, command: ShareCommand) -> anyhow::Result<()> {
    use serde_json::{Value, json};
    let line = |v: &Value| {
        format!(
            "{:<24} /{:<23} prefix {:<24} {}",
            v["name"].as_str().unwrap_or("?"),
            v["name"].as_str().unwrap_or("?"),
            v["prefix"].as_str().unwrap_or("?"),
            if v["read_only"].as_bool().unwrap_or(false) {
                "read-only"
            } else {
                ""
            }
        )
    };
    match command {
        ShareCommand::Create {
            name,
            prefix,
            bucket,
            read_only,
            allow,
            squash,
        } => {
            let body = json!({ "name": name, "prefix": prefix, "bucket": bucket, "read_only": read_only, "allow": allow, "squash": squash });
            let created: Value = client.post("shares", &body).await?;
            println!("created {}", line(&created).trim_end());
        }
        ShareCommand::List => {
            let shares: Vec<Value> = client.get("shares").await?;
            for v in &shares {
                println!("{}", line(v).trim_end());
            }
        }
        ShareCommand::Show { name } => {
            let v: Value = client.get(&format!("shares/{}", segment(&name)?)).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        ShareCommand::Refresh { name, path } => {
            let report: Value = client
                .post(
                    &format!("shares/{}/refresh", segment(&name)?),
                    &json!({ "path": path }),
                )
                .await?;
            println!(
                "refreshed {name}: {} added, {} updated, {} removed, {} skipped",
                report["added"], report["updated"], report["removed"], report["skipped"]
            );
        }
        ShareCommand::Uploads {
            name,
            after,
            follow,
        } => {
            let print = |u: &Value| {
                println!(
                    "{:>8} {} {:>12} {}",
                    u["seq"],
                    u["at"].as_str().unwrap_or("?"),
                    u["size"],
                    u["key"].as_str().unwrap_or("?")
                );
            };
            if follow {
                let mut response = client
                    .stream(&format!("shares/{}/events?after={after}", segment(&name)?))
                    .await?;
                // Server-Sent Events: `event:` and `data:` lines, a blank line after each.
                let (mut pending, mut event) = (Vec::new(), String::new());
                while let Some(chunk) = response.chunk().await? {
                    pending.extend_from_slice(&chunk);
                    while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=end).collect();
                        let line = String::from_utf8_lossy(&line);
                        let line = line.trim_end();
                        if let Some(name) = line.strip_prefix("event:") {
                            event = name.trim().to_string();
                        } else if let Some(data) = line.strip_prefix("data:") {
                            let data: Value = serde_json::from_str(data.trim())
                                .context("unexpected event from the API")?;
                            match event.as_str() {
                                "lost" => eprintln!(
                                    "uploads {} to {} are no longer remembered: missed",
                                    data["after"].as_u64().unwrap_or(0) + 1,
                                    data["oldest"].as_u64().unwrap_or(1).saturating_sub(1)
                                ),
                                _ => print(&data),
                            }
                            use std::io::Write;
                            std::io::stdout().flush()?;
                        }
                    }
                }
                bail!("the daemon ended the stream (share {name} deleted, or firn stopped)");
            }
            let uploads: Vec<Value> = client
                .get(&format!("shares/{}/uploads?after={after}", segment(&name)?))
                .await?;
            for u in &uploads {
                print(u);
            }
        }
        ShareCommand::Delete { name, force } => {
            let path = if force {
                format!("shares/{}?force=true", segment(&name)?)
            } else {
                format!("shares/{}", segment(&name)?)
            };
            client.delete(&path).await?;
            println!("deleted share {name} (its objects stay in the bucket)");
        }
    }
    Ok(())
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve) {
        // A command's output piped into one that stops reading (`firn share show x | head`)
        // ends the command quietly, as for any Unix tool, instead of a panic in `println!`.
        // The daemon keeps SIGPIPE ignored: a client that goes away is an error for that
        // connection alone.
        // SAFETY: no other thread runs yet, and the default action has no handler to race.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("firn: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The runtime that uploads run on: its threads (workers and blocking pool alike) run at
/// nice value `nice`, so on a busy CPU they yield to the threads serving clients.
fn upload_runtime(nice: i32) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name("firn-upload")
        .on_thread_start(move || crate::daemon::process::lower_thread_priority(nice))
        .enable_all()
        .build()
        .context("cannot start the upload runtime")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Keygen = cli.command {
        println!("{}", *crate::seal::MasterKey::generate().to_hex());
        return Ok(());
    }
    let config = Config::load(cli.config.as_deref())?;
    if let Command::Serve = cli.command {
        // While the process has one thread: the runtime below starts the others.
        crate::daemon::process::harden(&config.keys);
        crate::daemon::process::limit_malloc_arenas();
        crate::daemon::process::raise_open_files_limit();
    }
    let rt = runtime()?;
    match cli.command {
        Command::Serve => {
            let uploads = upload_runtime(config.remote.upload_nice)?;
            let served = rt.block_on(crate::daemon::serve(config, uploads.handle().clone()));
            // The volumes and shares have stopped their uploads by now, and nothing waits
            // on the limiter; the blocking threads still finishing (a put cleaning up what
            // it staged) get a moment.
            uploads.shutdown_timeout(std::time::Duration::from_secs(3));
            served
        }
        Command::Status { json } => {
            let client = ApiClient::new(&config)?;
            let status: serde_json::Value = rt.block_on(client.get("status"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                let status: Status = serde_json::from_value(status)?;
                print!("{}", status.render());
            }
            Ok(())
        }
        Command::Bandwidth { upload, download } => {
            let client = ApiClient::new(&config)?;
            let mut policy: Policy = rt.block_on(client.get("bandwidth"))?;
            if upload.is_some() || download.is_some() {
                let parse = |text: String| Rate::try_from(text).map_err(anyhow::Error::msg);
                if let Some(up) = upload {
                    policy.upload = parse(up)?;
                }
                if let Some(down) = download {
                    policy.download = parse(down)?;
                }
                policy = rt.block_on(client.put("bandwidth", &policy))?;
            }
            println!("upload {}, download {}", policy.upload, policy.download);
            for w in &policy.schedule {
                println!(
                    "  {} {}-{}: upload {}, download {}",
                    String::from(w.days),
                    String::from(w.start),
                    String::from(w.end),
                    w.upload,
                    w.download
                );
            }
            Ok(())
        }
        Command::Volume(command) => {
            let client = ApiClient::new(&config)?;
            rt.block_on(volume(&client, command))
        }
        Command::Share(command) => {
            let client = ApiClient::new(&config)?;
            rt.block_on(share(&client, command))
        }
        Command::Remote(command) => rt.block_on(remote::run(&config, command)),
        Command::Keygen => Ok(()),
    }
}

async fn volume(client: &ApiClient, command: VolumeCommand) -> anyhow::Result<()> {
    use serde_json::{Value, json};
    let line = |v: &Value| {
        format!(
            "{:<24} {:>12} {:<6} {}",
            v["name"].as_str().unwrap_or("?"),
            v["size"]
                .as_u64()
                .map(|s| crate::size::Human(s).to_string())
                .unwrap_or_default(),
            v["mode"].as_str().unwrap_or("?"),
            if v["read_only"].as_bool().unwrap_or(false) {
                "read-only"
            } else {
                ""
            }
        )
    };
    match command {
        VolumeCommand::Create {
            name,
            size,
            mode,
            read_only,
            allow,
            clients,
            limits,
        } => {
            let size = crate::size::parse_size(&size)?;
            let mut body = json!({ "name": name, "size": size, "mode": mode, "read_only": read_only, "allow": allow, "clients": clients });
            body.as_object_mut()
                .expect("an object")
                .extend(limits.fields()?);
            let created: Value = client.post("volumes", &body).await?;
            println!("created {}", line(&created).trim_end());
        }
        VolumeCommand::List { bucket: false } => {
            let volumes: Vec<Value> = client.get("volumes").await?;
            for v in &volumes {
                println!("{}", line(v).trim_end());
            }
        }
        VolumeCommand::List { bucket: true } => {
            let volumes: Vec<Value> = client.get("volumes?bucket=true").await?;
            for v in &volumes {
                println!(
                    "{:<24} {:>12} {:<6} id {}",
                    v["name"].as_str().unwrap_or("?"),
                    v["size"]
                        .as_u64()
                        .map(|s| crate::size::Human(s).to_string())
                        .unwrap_or_default(),
                    "cached",
                    v["id"].as_str().unwrap_or("?")
                );
            }
        }
        VolumeCommand::Takeover {
            name,
            id,
            force,
            limits,
        } => {
            let mut body = json!({ "force": force, "id": id });
            body.as_object_mut()
                .expect("an object")
                .extend(limits.fields()?);
            let taken: Value = client
                .post(&format!("volumes/{}/takeover", segment(&name)?), &body)
                .await?;
            println!("took over {}", line(&taken).trim_end());
        }
        VolumeCommand::Show { name } => {
            let v: Value = client.get(&format!("volumes/{}", segment(&name)?)).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        VolumeCommand::Delete { name, force } => {
            let path = if force {
                format!("volumes/{}?force=true", segment(&name)?)
            } else {
                format!("volumes/{}", segment(&name)?)
            };
            client.delete(&path).await?;
            println!("deleted {name}");
        }
        VolumeCommand::Resize { name, size } => {
            let size = crate::size::parse_size(&size)?;
            let resized: Value = client
                .post(
                    &format!("volumes/{}/resize", segment(&name)?),
                    &json!({ "size": size }),
                )
                .await?;
            println!("resized {}", line(&resized).trim_end());
        }
        VolumeCommand::Limits { name, limits } => {
            let fields = limits.fields()?;
            if fields.is_empty() {
                anyhow::bail!("nothing to change: give --log-max and/or --cache-max");
            }
            let info: Value = client
                .post(
                    &format!("volumes/{}/limits", segment(&name)?),
                    &Value::Object(fields),
                )
                .await?;
            let limit = |key: &str| match info.get(key).and_then(Value::as_u64) {
                Some(bytes) => crate::size::Human(bytes).to_string(),
                None => "default ([volumes])".to_string(),
            };
            println!(
                "limits of {name}: log_max {}, cache_max {}",
                limit("log_max"),
                limit("cache_max")
            );
        }
    }
    Ok(())
}

/// The management API as the CLI sees it: address from the config, token from the data
/// directory.
/// How long a read through the API may take: the slowest, a listing of the bucket's
/// volumes, waits at most for the bucket's probe.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ApiClient {
    fn new(config: &Config) -> anyhow::Result<ApiClient> {
        let token_path = config.local.data_dir.join(crate::daemon::TOKEN_FILE);
        let token = read_token(&token_path)?;
        // Never through a proxy the environment names (there for the uplink): the daemon is
        // on this machine, and the token would go to the proxy. And a daemon that does not
        // take the connection is named at once, not waited on; a call itself may be long (a
        // takeover restores a volume's image).
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()?;
        Ok(ApiClient {
            base: format!("http://{}/api/v1", config.http.listen),
            token,
            http,
        })
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let response = request.bearer_auth(&self.token).send().await.map_err(|e| {
            anyhow::anyhow!(
                "firn is not answering at {} ({e}); is `firn serve` running with this config?",
                self.base
            )
        })?;
        let status = response.status();
        let body = response.text().await?;
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or(body);
            bail!("{status}: {message}");
        }
        let body = if body.is_empty() { "null" } else { &body };
        serde_json::from_str(body).context("unexpected answer from the API")
    }

    async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.http.post(format!("{}/{path}", self.base)).json(body))
            .await
    }

    async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send::<serde_json::Value>(self.http.delete(format!("{}/{path}", self.base)))
            .await?;
        Ok(())
    }

    /// A long answer (an event stream), to read as it comes.
    async fn stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let response = self
            .http
            .get(format!("{}/{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "firn is not answering at {} ({e}); is `firn serve` running with this config?",
                    self.base
                )
            })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("{status}: {body}");
        }
        Ok(response)
    }

    /// A read: answered within `READ_TIMEOUT`, or the daemon is named as not answering (a
    /// stopped process's socket still takes the connection).
    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(
            self.http
                .get(format!("{}/{path}", self.base))
                .timeout(READ_TIMEOUT),
        )
        .await
    }

    async fn put<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.http.put(format!("{}/{path}", self.base)).json(body))
            .await
    }
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .with_context(|| {
            format!(
                "cannot read the API token from {} (it is made at the first `firn serve`)",
                path.display()
            )
        })
}
