//! The command line `egress`: its arguments and the small subcommands. The agent itself
//! (`egress run`) is in `run`; `explain` words the verdicts `egress explain` prints.

pub mod explain;
mod run;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use log::error;

use crate::{
    config,
    datapath::{Maps, sys},
    plan,
    telemetry::{accesslog, admin},
};
use run::{datapath_config, load_config};

/// eBPF egress interception for service meshes: every TCP connect() of an intercepted cgroup is
/// redirected to this agent, let straight out, or refused, in the kernel, from mesh configuration.
#[derive(Parser)]
#[command(name = "egress", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach the datapath to a cgroup, program it from the configuration, and proxy
    /// redirected connections to their original destinations until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Run a command inside the intercepted cgroup.
    Exec {
        /// The intercepted cgroup [default: `egress` under the cgroup2 mount].
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Print the verdict for a destination and the rule that decided, from the live maps of a
    /// running agent, or from a configuration with --config.
    Explain {
        /// Decide from this configuration (file or directory) instead of the live maps.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the running agent pinned its maps.
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        #[command(flatten)]
        agent: AgentArgs,
        /// The connecting user [default: yours].
        #[arg(long)]
        uid: Option<u32>,
        /// The connecting group [default: yours].
        #[arg(long)]
        gid: Option<u32>,
        /// SO_MARK of the connecting socket.
        #[arg(long, default_value_t = 0)]
        socket_mark: u32,
        /// Network namespace cookie of the connecting socket [default: the agent's].
        #[arg(long)]
        netns_cookie: Option<u64>,
        /// Destination, IP:PORT (IPv6 as [ADDR]:PORT).
        destination: SocketAddr,
    },
    /// Print how many connects each rule decided, from the live per-CPU counters.
    Stats {
        /// Where the running agent pinned its maps.
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Show the running agent's configuration generation and the last rejected configuration.
    Status {
        #[arg(long, default_value_t = DEFAULT_ADMIN_PORT)]
        admin_port: u16,
    },
    /// Make the running agent reload its configuration now; prints what changed or every error.
    Reload {
        #[arg(long, default_value_t = DEFAULT_ADMIN_PORT)]
        admin_port: u16,
    },
    /// Check a configuration (file or directory) and print every problem.
    Validate { path: PathBuf },
}

const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/egress";
const DEFAULT_CGROUP: &str = "egress";
const DEFAULT_ADMIN_PORT: u16 = 15000;

/// Settings shared by the agent and `explain --config`.
#[derive(Args, Clone)]
struct AgentArgs {
    /// Port of the outbound listener on 127.0.0.1 and [::1].
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// SO_MARK the agent puts on its upstream sockets; the hooks let such sockets through.
    #[arg(long, default_value_t = 1337, value_parser = clap::value_parser!(u32).range(1..))]
    mark: u32,
}

#[derive(Args)]
struct RunArgs {
    /// Mesh configuration: a YAML file or a directory of them [default: capture every
    /// destination, ALLOW_ANY].
    #[arg(long)]
    config: Option<PathBuf>,
    /// The cgroup to intercept [default: create `egress` under the cgroup2 mount].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Directory on a bpf filesystem where the maps are pinned for `egress explain`.
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
    #[command(flatten)]
    agent: AgentArgs,
    /// How long the agent waits for an upstream to accept a connection (e.g. 10s, 500ms).
    /// Direct connections (TCP ServiceEntries) are the client's own: its timeout applies.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Age after which an original-destination record nobody claimed is removed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    orig_max_age: Duration,
    /// Capacity of each CIDR map (include/exclude, IPv4/IPv6).
    #[arg(long, default_value_t = egress_common::DEFAULT_MAX_CIDRS)]
    max_cidrs: u32,
    /// Capacity of each map of ServiceEntry (address, port) pairs (IPv4, IPv6).
    #[arg(long, default_value_t = egress_common::DEFAULT_MAX_ALLOWED)]
    max_service_entry_addresses: u32,
    /// Port of the admin endpoint on 127.0.0.1 (`egress status`, `egress reload`).
    #[arg(long, default_value_t = DEFAULT_ADMIN_PORT)]
    admin_port: u16,
    /// Do not listen: another transparent proxy serves the outbound port and reads the
    /// original destination with getsockopt(SO_ORIGINAL_DST), which the datapath answers. It
    /// then sees TCP ServiceEntry destinations too (otherwise the kernel lets those go direct).
    #[arg(long)]
    external_proxy: bool,
    /// Access log on standard output: a JSON line (or `key=value` text) per redirected or
    /// direct connection and per HTTP request. Written by a thread of its own: while standard output
    /// is not read, up to 8,192 records wait and later ones are dropped and counted (a warning
    /// on standard error), so that forwarding never waits for the log.
    #[arg(long, value_enum, default_value = "json")]
    access_log: accesslog::Format,
    /// On ports no ServiceEntry declares: how long to wait for the client's first bytes (to
    /// log the HTTP Host or TLS SNI) before relaying; the upstream is connected meanwhile, and
    /// a server that speaks first ends the wait.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    sniff_timeout: Duration,
    /// On declared HTTP and TLS ports: how long to wait for a request head or a ClientHello.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    header_timeout: Duration,
    /// On declared HTTP ports: how long an upstream connection is kept open after its
    /// response, for the next request to the same upstream (0s: a connection per request).
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    upstream_idle_timeout: Duration,
    /// With --external-proxy: the cgroup that proxy runs in [default: the agent's own].
    #[arg(long, requires = "external_proxy")]
    proxy_cgroup: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 10s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?} is not a duration such as 10s or 500ms")),
    }
}

/// `egress`: parse the command line and run the subcommand.
pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(args) => run::run(args),
        Cmd::Exec { cgroup, command } => exec(cgroup, command),
        Cmd::Explain {
            config,
            pin_path,
            agent,
            uid,
            gid,
            socket_mark,
            netns_cookie,
            destination,
        } => {
            let caller = explain::Caller {
                // SAFETY: getuid/getgid cannot fail.
                uid: uid.unwrap_or_else(|| unsafe { libc::getuid() }),
                gid: gid.unwrap_or_else(|| unsafe { libc::getgid() }),
                mark: socket_mark,
                netns: netns_cookie,
            };
            explain_cmd(config, &pin_path, &agent, &caller, destination)
        }
        Cmd::Stats { pin_path } => stats(&pin_path),
        Cmd::Status { admin_port } => {
            admin::request(admin_port, "GET", "/status").map(|b| print!("{b}"))
        }
        Cmd::Reload { admin_port } => {
            admin::request(admin_port, "POST", "/reload").map(|b| print!("{b}"))
        }
        Cmd::Validate { path } => return validate(&path),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn exec(cgroup: Option<PathBuf>, command: Vec<String>) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let cgroup = match cgroup {
        Some(c) => c,
        None => sys::cgroup2_root()?.join(DEFAULT_CGROUP),
    };
    if !cgroup.join("cgroup.procs").exists() {
        bail!(
            "{} is not a cgroup: start `egress run` first, or pass --cgroup",
            cgroup.display()
        );
    }
    sys::enter_cgroup(&cgroup, std::process::id())?;
    let err = std::process::Command::new(&command[0])
        .args(&command[1..])
        .exec();
    Err(err).with_context(|| format!("running {}", command[0]))
}

fn explain_cmd(
    config: Option<PathBuf>,
    pin_path: &Path,
    agent: &AgentArgs,
    caller: &explain::Caller,
    dst: SocketAddr,
) -> Result<()> {
    let line = match config {
        Some(path) => {
            let mesh = load_config(Some(&path))?;
            let plan = plan::compile(&mesh);
            let cfg = datapath_config(agent, plan.mode, 0, true);
            explain::explain(&plan, &cfg, dst, caller).join("\n")
        }
        None => {
            let maps = Maps::open(pin_path)?;
            let cfg = maps.config()?;
            explain::explain(&maps, &cfg, dst, caller).join("\n")
        }
    };
    println!("{line}");
    Ok(())
}

fn stats(pin_path: &Path) -> Result<()> {
    let counts = Maps::open(pin_path)?.counters()?;
    for (reason, n) in egress_common::Reason::ALL.iter().zip(counts) {
        println!("{:<8} {:<17} {n}", reason_verdict(*reason), reason.name());
    }
    Ok(())
}

/// The verdict a reason code stands for.
fn reason_verdict(r: egress_common::Reason) -> &'static str {
    use egress_common::Reason::*;
    match r {
        IncludedPort | IncludedCidr | RegistryAllowed | RegistryService => "redirect",
        RegistryDenied | ServiceNoEndpoints => "deny",
        TcpEntry => "direct",
        Agent | OtherNetns | ExcludedUid | ExcludedGid | ExcludedPort | AgentListener
        | ExcludedCidr | NotIncluded => "bypass",
    }
}

fn validate(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(l) => {
            for w in &l.warnings {
                println!("warning: {w}");
            }
            let c = &l.config;
            println!(
                "{}: valid ({} ServiceEntries, {} warnings)",
                path.display(),
                c.service_entries.len(),
                l.warnings.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            for w in &e.warnings {
                println!("warning: {w}");
            }
            for p in &e.errors {
                println!("error: {p}");
            }
            error!("{}: {} errors", path.display(), e.errors.len());
            ExitCode::FAILURE
        }
    }
}
