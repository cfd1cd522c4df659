//! `egress`: the agent and its CLI.

mod accesslog;
mod admin;
mod config;
mod datapath;
mod direct;
mod explain;
mod http;
mod istio;
mod k8s;
mod plan;
mod proxy;
mod registry;
mod reload;
mod sniff;
mod sys;
mod upstream;

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use egress_common::Config;
use log::{error, info, warn};

use crate::{
    config::MeshConfig,
    datapath::{Capacity, Datapath, Maps},
    proxy::{OrigMaps, Proxy},
};

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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(args) => run(args),
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

/// Load and compile a configuration, printing its warnings; or the built-in default.
fn load_config(path: Option<&Path>) -> Result<MeshConfig> {
    let Some(path) = path else {
        return Ok(MeshConfig::default());
    };
    match config::load(path) {
        Ok(l) => {
            for w in &l.warnings {
                warn!("{w}");
            }
            Ok(l.config)
        }
        Err(e) => {
            for w in &e.warnings {
                warn!("{w}");
            }
            Err(e.into())
        }
    }
}

/// The datapath's settings. `direct`: TCP entries by address go straight out (not when an
/// external proxy is to see every redirected connection).
fn datapath_config(agent: &AgentArgs, mode: u8, netns_cookie: u64, direct: bool) -> Config {
    Config {
        netns_cookie,
        agent_mark: agent.mark,
        listener_port: agent.outbound_port,
        mode,
        enabled: 1,
        listener_v4: Ipv4Addr::LOCALHOST.octets(),
        listener_v6: Ipv6Addr::LOCALHOST.octets(),
        direct: u8::from(direct),
        _pad: [0; 3],
    }
}

/// What `run` created and must remove, also when it fails half-way.
struct Created {
    pin_dir: PathBuf,
    cgroup: Option<PathBuf>,
}

impl Drop for Created {
    fn drop(&mut self) {
        datapath::unpin(&self.pin_dir);
        if let Some(c) = &self.cgroup
            && let Err(e) = std::fs::remove_dir(c)
        {
            warn!(
                "could not remove cgroup {}: {e} (processes still in it?)",
                c.display()
            );
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    let mesh = load_config(args.config.as_deref())?;
    let plan = plan::compile(&mesh);
    let reg = registry::Registry::compile(&mesh)?;
    let shared_registry: registry::Shared = Arc::new(std::sync::RwLock::new(Arc::new(reg)));
    let cap = Capacity {
        cidrs: args.max_cidrs,
        allowed: args.max_service_entry_addresses,
        orig: egress_common::DEFAULT_MAX_ORIG,
    };
    reload::check_capacity(&plan, &cap)?;
    sys::raise_nofile_limit();
    let root = sys::cgroup2_root()?;
    let mut created = Created {
        pin_dir: args.pin_path.clone(),
        cgroup: None,
    };
    let cgroup = match &args.cgroup {
        Some(c) => {
            if !c.join("cgroup.procs").exists() {
                bail!("--cgroup {}: not a cgroup v2 directory", c.display());
            }
            c.clone()
        }
        None => {
            let c = root.join(DEFAULT_CGROUP);
            if !c.exists() {
                std::fs::create_dir(&c)
                    .with_context(|| format!("creating cgroup {}", c.display()))?;
                created.cgroup = Some(c.clone());
            }
            c
        }
    };
    sys::ensure_bpffs(&args.pin_path)?;
    let mut dp = Datapath::load(cap, &args.pin_path)?;
    let mut maps = Maps::open(&args.pin_path)?;
    let cfg = datapath_config(
        &args.agent,
        plan.mode,
        sys::netns_cookie()?,
        !args.external_proxy,
    );
    let start = std::time::Instant::now();
    maps.program(&plan, cfg)?;
    info!("programmed the maps in {:.1?}", start.elapsed());
    dp.load_programs()?;
    let reloader = reload::Reloader::new(
        args.config.clone(),
        maps,
        (mesh, plan),
        cap,
        shared_registry.clone(),
    );
    let status = reloader.status();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("reload".into())
        .spawn(move || reloader.run(rx))
        .context("starting the reload thread")?;
    // Kept alive for as long as the agent runs.
    let _watcher = match &args.config {
        Some(path) => Some(
            reload::watch(path, tx.clone())
                .with_context(|| format!("watching {} for changes", path.display()))?,
        ),
        None => None,
    };

    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async {
        let port = args.agent.outbound_port;
        let listeners = if args.external_proxy {
            Vec::new()
        } else {
            let mut v = Vec::new();
            for addr in [
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
            ] {
                v.push(proxy::listen(addr).with_context(|| format!("listening on {addr}"))?);
            }
            v
        };
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, args.admin_port));
        let admin_listener = tokio::net::TcpListener::bind(admin)
            .await
            .with_context(|| format!("admin endpoint {admin}"))?;
        tokio::spawn(admin::serve(admin_listener, tx.clone(), status));
        dp.attach_interception(&cgroup)?;
        if args.external_proxy {
            let pc = match &args.proxy_cgroup {
                Some(p) => p.clone(),
                None => sys::cgroup_of("self")?,
            };
            dp.attach_getsockopt(&pc)?;
            info!(
                "answering SO_ORIGINAL_DST for a transparent proxy in cgroup {}",
                pc.display()
            );
        }
        let orig = Arc::new(Mutex::new(OrigMaps::open(&args.pin_path)?));
        let log = accesslog::Log::new(args.access_log).context("starting the access-log writer")?;
        let closes = direct::Closes::open(&args.pin_path)?;
        tokio::spawn(closes.serve(
            log.clone(),
            shared_registry.clone(),
            accesslog::CgroupNames::new(root.clone()),
        ));
        let upstreams = Arc::new(upstream::Pool::new(args.upstream_idle_timeout));
        let px = Arc::new(Proxy {
            orig: orig.clone(),
            mark: args.agent.mark,
            connect_timeout: args.connect_timeout,
            pipes: proxy::PipePool::default(),
            registry: shared_registry,
            log: log.clone(),
            sniff_timeout: args.sniff_timeout,
            header_timeout: args.header_timeout,
            cgroups: accesslog::CgroupNames::new(root.clone()),
            upstreams: upstreams.clone(),
        });
        tokio::spawn(upstreams.sweep());
        for l in listeners {
            tokio::spawn(px.clone().serve(l));
        }
        let max_age = args.orig_max_age;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5).min(max_age));
            loop {
                tick.tick().await;
                let n = orig.lock().map(|mut m| m.sweep(max_age)).unwrap_or(0);
                if n > 0 {
                    info!("removed {n} original-destination records older than {max_age:?}");
                }
                // What a wave of connections freed goes back to the system.
                sys::release_free_memory();
            }
        });
        println!("{}", cgroup.display());
        info!(
            "ready: intercepting cgroup {} outbound listener 127.0.0.1:{port} [::1]:{port}{} admin {admin}",
            cgroup.display(),
            if args.external_proxy {
                " (external proxy)"
            } else {
                ""
            }
        );
        wait_for_signals(&tx).await?;
        info!("shutting down: detaching from {}", cgroup.display());
        log.flush();
        anyhow::Ok(())
    })?;
    drop(dp);
    drop(created);
    Ok(())
}

/// Until SIGINT or SIGTERM; SIGHUP asks for a reload.
async fn wait_for_signals(tx: &std::sync::mpsc::Sender<reload::Msg>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = int.recv() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => {
                let _ = tx.send(reload::Msg::Reload { why: "SIGHUP", reply: None });
            }
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
