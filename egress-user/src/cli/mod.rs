//! The command line `egress`: its arguments and the small subcommands. The agent itself
//! (`egress run`) is in `run`; `explain` words the verdicts `egress explain` prints.

mod cni;
pub mod explain;
mod run;
mod uninstall;

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
    datapath::{self, Maps, sys},
    plan,
    telemetry::{accesslog, admin},
    workloads::api,
};
use run::{datapath_config, load_config};

/// eBPF egress interception for service meshes: every TCP connect() and UDP datagram of an
/// enrolled workload (a pod's network namespace on a node, or an intercepted cgroup) is
/// redirected to this agent, let straight out, or refused, in the kernel, from mesh
/// configuration.
#[derive(Parser)]
#[command(name = "egress", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach the datapath to a cgroup (with --node, to the whole node, for enrolled network
    /// namespaces), program it from the configuration, and proxy redirected connections to
    /// their original destinations until SIGINT/SIGTERM.
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
    /// Enrol a network namespace with the running node agent: its connects are decided from
    /// now on, as a pod's that the CNI plugin enrolled.
    Enroll {
        /// The namespace: /var/run/netns/NAME or /proc/PID/ns/net.
        netns: PathBuf,
        /// The workload's identity, NAMESPACE/NAME (its Kubernetes namespace's policy applies).
        #[arg(long)]
        workload: String,
        /// The pod's uid, when there is one.
        #[arg(long, default_value = "")]
        uid: String,
        /// One of the workload's nameservers (its resolv.conf's; repeat for each): under
        /// `spec.dns.capture: RESOLV_CONF` only DNS queries to these are captured.
        #[arg(long = "nameserver", value_name = "IP")]
        nameservers: Vec<std::net::IpAddr>,
        #[arg(long, default_value = crate::workloads::api::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Release an enrolled workload: its connects are left alone from now on.
    Unenroll {
        /// The namespace it was enrolled from.
        #[arg(required_unless_present = "workload", conflicts_with = "workload")]
        netns: Option<PathBuf>,
        /// Or its identity, NAMESPACE/NAME.
        #[arg(long)]
        workload: Option<String>,
        #[arg(long, default_value = crate::workloads::api::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// List the enrolled workloads with their counters.
    Workloads {
        #[arg(long, default_value = crate::workloads::api::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
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
        /// The connecting workload, NAMESPACE/NAME [default: the agent's own namespace's].
        /// With --config: any workload of that Kubernetes namespace.
        #[arg(long)]
        workload: Option<String>,
        #[arg(long, default_value = crate::workloads::api::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// A UDP datagram (a UDP socket's connect, or sendto) instead of a TCP connect.
        #[arg(long)]
        udp: bool,
        /// Destination, IP:PORT (IPv6 as [ADDR]:PORT).
        destination: SocketAddr,
    },
    /// Print how many connects each rule decided, from the live per-CPU counters: in all, or
    /// for one workload.
    Stats {
        /// Where the running agent pinned its maps.
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Only this workload's connects, NAMESPACE/NAME.
        #[arg(long)]
        workload: Option<String>,
        #[arg(long, default_value = crate::workloads::api::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
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
    /// Check a configuration (file or directory) as `run` and a reload do, and print every
    /// problem: what validates also loads.
    Validate {
        path: PathBuf,
        /// The `run --max-cidrs` the configuration is to fit.
        #[arg(long, default_value_t = egress_common::DEFAULT_MAX_CIDRS)]
        max_cidrs: u32,
        /// The `run --max-service-entry-addresses` the configuration is to fit.
        #[arg(long, default_value_t = egress_common::DEFAULT_MAX_ALLOWED)]
        max_service_entry_addresses: u32,
    },
    /// Remove what agents leave on the node when they stop: detach the programs, remove the
    /// pinned links and maps, the enrolment state and address allocation files, the admin and
    /// handover sockets, the
    /// cgroup `egress run` made and (with the CNI directories) `egress-cni` from the node's
    /// network configuration and its binary. A stopped agent (SIGTERM, a crash) leaves them on
    /// purpose: the policy stays in force until the next agent takes it over. Refused while an
    /// agent runs.
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        #[arg(long, default_value = crate::workloads::api::DEFAULT_STATE_FILE)]
        state_file: PathBuf,
        #[arg(long, default_value = DEFAULT_ALLOCATIONS_FILE)]
        allocations_file: PathBuf,
        #[arg(long, default_value = crate::workloads::api::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// The CNI configuration directory `egress cni install` chained the plugin in.
        #[arg(long, requires = "cni_bin_dir")]
        cni_conf_dir: Option<PathBuf>,
        /// The CNI binary directory it copied `egress-cni` to.
        #[arg(long, requires = "cni_conf_dir")]
        cni_bin_dir: Option<PathBuf>,
    },
    /// Install the CNI plugin `egress-cni` and chain it into the node's network
    /// configuration, or remove it.
    Cni {
        #[command(subcommand)]
        cmd: cni::Cmd,
    },
}

const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/egress";
const DEFAULT_ALLOCATIONS_FILE: &str = "/var/run/egress/addresses.json";
const DEFAULT_CGROUP: &str = "egress";
const DEFAULT_ADMIN_PORT: u16 = 15000;

/// Settings shared by the agent and `explain --config`.
#[derive(Args, Clone)]
struct AgentArgs {
    /// Port of the outbound listener on 127.0.0.1 and [::1] (in every enrolled namespace).
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Port of the DNS server in every enrolled namespace (UDP on every address, answering
    /// only queries the datapath sent to 127.53.0.0/16 or 100::53:0/112; TCP on 127.0.0.1 and
    /// [::1]). The workloads' DNS queries (port 53, UDP and TCP) go there; 0 leaves them
    /// alone.
    #[arg(long, default_value_t = egress_common::DEFAULT_DNS_PORT)]
    dns_port: u16,
}

#[derive(Args)]
struct RunArgs {
    /// Mesh configuration: a YAML file or a directory of them [default: capture every
    /// destination, ALLOW_ANY].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run for a node: the programs are attached at the root of the cgroup2 hierarchy and
    /// decide for enrolled network namespaces only (the CNI plugin, `egress enroll`); the
    /// agent's own namespace only with --cgroup.
    #[arg(long)]
    node: bool,
    /// The cgroup to intercept in the agent's own network namespace [default: create `egress`
    /// under the cgroup2 mount; with --node, none].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// The identity of the agent's own namespace's workload, NAMESPACE/NAME.
    #[arg(long, default_value = "default/egress")]
    workload: String,
    /// The admin socket (root only): enrolment, `egress workloads`.
    #[arg(long, default_value = crate::workloads::api::DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
    /// Where enrolments are kept across restarts (with --node).
    #[arg(long, default_value = crate::workloads::api::DEFAULT_STATE_FILE)]
    state_file: PathBuf,
    /// Where the addresses allocated to ServiceEntries without any are kept across restarts
    /// (`spec.autoAllocate`).
    #[arg(long, default_value = DEFAULT_ALLOCATIONS_FILE)]
    allocations_file: PathBuf,
    /// SO_MARK the agent puts on its upstream sockets, for iptables rules that exempt them
    /// (the datapath recognises the agent by its cgroup, which a workload cannot forge).
    #[arg(long, default_value_t = 1337, value_parser = clap::value_parser!(u32).range(1..))]
    mark: u32,
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
    /// Port of the Prometheus metrics (`/metrics`, `/stats/prometheus`), on every address as
    /// Istio's 15020 is, for the scraper; 0 turns them off.
    #[arg(long, default_value_t = 15020)]
    metrics_port: u16,
    /// Port of the kubelet probes (`/healthz/ready`, `/healthz/live`), on every address as
    /// Istio's 15021 is; 0 turns them off.
    #[arg(long, default_value_t = 15021)]
    health_port: u16,
    /// Do not listen: another transparent proxy serves the outbound port and reads the
    /// original destination with getsockopt(SO_ORIGINAL_DST), which the datapath answers. It
    /// then sees TCP ServiceEntry destinations too (otherwise the kernel lets those go direct).
    /// That proxy runs in the agent's own namespace: not with --node.
    #[arg(long, conflicts_with = "node")]
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
    /// When stopped (or once a new agent took its workloads over): how long the connections
    /// it relays may take to end before they are cut. Keep it below the DaemonSet's
    /// terminationGracePeriodSeconds.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// How long an address a workload was answered for the host of a TCP ServiceEntry stays
    /// open to it after the answer's TTL ran out (clients keep addresses a while past it).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    dns_grace: Duration,
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
        Cmd::Enroll {
            netns,
            workload,
            uid,
            nameservers,
            admin_socket,
        } => enroll(netns, &workload, (uid, nameservers), &admin_socket),
        Cmd::Unenroll {
            netns,
            workload,
            admin_socket,
        } => {
            let sel = api::Selector {
                netns,
                workload,
                ..api::Selector::default()
            };
            api::unenroll(&admin_socket, &sel)
                .map(|out| print!("{out}"))
                .map_err(Into::into)
        }
        Cmd::Workloads { admin_socket } => api::list(&admin_socket)
            .map(|out| print!("{out}"))
            .map_err(Into::into),
        Cmd::Explain {
            config,
            pin_path,
            agent,
            uid,
            gid,
            workload,
            admin_socket,
            udp,
            destination,
        } => {
            // SAFETY: getuid/getgid cannot fail.
            let uid = uid.unwrap_or_else(|| unsafe { libc::getuid() });
            let gid = gid.unwrap_or_else(|| unsafe { libc::getgid() });
            let who = (workload.as_deref(), admin_socket.as_path());
            explain_cmd(config, &pin_path, &agent, (uid, gid, udp), who, destination)
        }
        Cmd::Stats {
            pin_path,
            workload,
            admin_socket,
        } => stats(&pin_path, workload.as_deref(), &admin_socket),
        Cmd::Status { admin_port } => {
            admin::request(admin_port, "GET", "/status").map(|b| print!("{b}"))
        }
        Cmd::Reload { admin_port } => {
            admin::request(admin_port, "POST", "/reload").map(|b| print!("{b}"))
        }
        Cmd::Validate {
            path,
            max_cidrs,
            max_service_entry_addresses,
        } => {
            let cap = datapath::Capacity {
                cidrs: max_cidrs,
                allowed: max_service_entry_addresses,
                orig: egress_common::DEFAULT_MAX_ORIG,
            };
            return validate(&path, &cap);
        }
        Cmd::Uninstall {
            pin_path,
            state_file,
            allocations_file,
            admin_socket,
            cni_conf_dir,
            cni_bin_dir,
        } => uninstall::uninstall(&uninstall::Uninstall {
            pin_path: &pin_path,
            state_file: &state_file,
            allocations_file: &allocations_file,
            admin_socket: &admin_socket,
            cni: cni_conf_dir.as_deref().zip(cni_bin_dir.as_deref()),
        }),
        Cmd::Cni { cmd } => cni::run(cmd),
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

fn enroll(
    netns: PathBuf,
    workload: &str,
    (uid, nameservers): (String, Vec<std::net::IpAddr>),
    socket: &Path,
) -> Result<()> {
    let (namespace, name) = crate::workloads::parse_label(workload)?;
    let req = api::EnrollRequest {
        netns,
        namespace,
        name,
        uid,
        container_id: None,
        nameservers,
    };
    let out = api::enroll(socket, &req)?;
    print!("{out}");
    Ok(())
}

/// The (namespace cookie, counter slot) of an enrolled workload, from the running agent.
fn lookup(socket: &Path, label: &str) -> Result<(u64, u32)> {
    crate::workloads::parse_label(label)?;
    let body = api::request(socket, "GET", &format!("/workloads/lookup/{label}"), "")?;
    match body {
        (200, b) => {
            let mut it = b.split_whitespace().map(str::parse);
            match (it.next(), it.next()) {
                (Some(Ok(cookie)), Some(Ok(slot))) => Ok((cookie, slot as u32)),
                _ => bail!("unexpected answer from the agent: {b:?}"),
            }
        }
        (_, b) => bail!("{}", b.trim_end()),
    }
}

fn explain_cmd(
    config: Option<PathBuf>,
    pin_path: &Path,
    agent: &AgentArgs,
    (uid, gid, udp): (u32, u32, bool),
    (workload, socket): (Option<&str>, &Path),
    dst: SocketAddr,
) -> Result<()> {
    let line = match config {
        Some(path) => {
            let mesh = load_config(Some(&path))?;
            let plan = plan::compile(&mesh);
            let cfg = datapath_config(agent, (0, 0), true, &mesh);
            let label = workload.unwrap_or("default/egress");
            let (ns, _) = crate::workloads::parse_label(label)?;
            let p = plan.policies.of(&ns);
            let wl = egress_common::Workload {
                view: p.view,
                mode: p.mode,
                ..egress_common::Workload::default()
            };
            let caller = explain::Caller {
                uid,
                gid,
                workload: Some((label.to_owned(), wl)),
                learned: false,
                udp,
                netns: 0,
            };
            explain::explain(&plan, &cfg, dst, &caller).join("\n")
        }
        None => {
            let maps = Maps::open(pin_path)?;
            let cfg = maps.config()?;
            let (label, cookie) = match workload {
                Some(label) => (label.to_owned(), lookup(socket, label)?.0),
                // The agent's own namespace, when it intercepts there.
                None => ("the agent's namespace".to_owned(), cfg.agent_netns),
            };
            let learned =
                crate::datapath::LearnedMap::open(pin_path).is_ok_and(|l| l.holds(cookie, dst));
            let caller = explain::Caller {
                uid,
                gid,
                workload: maps.workload(cookie).map(|w| (label, w)),
                learned: learned && !udp,
                udp,
                netns: cookie,
            };
            explain::explain(&maps, &cfg, dst, &caller).join("\n")
        }
    };
    println!("{line}");
    Ok(())
}

fn stats(pin_path: &Path, workload: Option<&str>, socket: &Path) -> Result<()> {
    let maps = Maps::open(pin_path)?;
    let counts = match workload {
        Some(label) => {
            let (_, slot) = lookup(socket, label)?;
            println!("workload {label}");
            maps.workload_counters(slot)?
        }
        None => maps.counters()?,
    };
    for (reason, n) in egress_common::Reason::ALL.iter().zip(counts) {
        println!("{:<8} {:<17} {n}", reason_verdict(*reason), reason.name());
    }
    // In all: each enrolled workload's share too, when the agent answers on its socket.
    if workload.is_none()
        && let Ok(list) = api::list(socket)
        && !list.is_empty()
    {
        println!("\nworkloads:\n{list}");
    }
    Ok(())
}

/// The verdict a reason code stands for.
pub fn reason_verdict(r: egress_common::Reason) -> &'static str {
    use egress_common::Reason::*;
    match r {
        IncludedPort | IncludedCidr | RegistryAllowed | RegistryService | AgentDown | Dns => {
            "redirect"
        }
        RegistryDenied | ServiceNoEndpoints | AgentPort | UndecidedSocket => "deny",
        TcpEntry | DnsLearned => "direct",
        Agent | NotEnrolled | ExcludedUid | ExcludedGid | ExcludedPort | AgentListener
        | ExcludedCidr | NotIncluded | Loopback | AgentDownOpen | DnsOpen => "bypass",
    }
}

/// What `run` and a reload do with a loaded configuration before it is in force.
fn in_force(mesh: &mut config::MeshConfig, cap: &datapath::Capacity) -> Result<()> {
    config::alloc::Allocator::load(None).assign(mesh)?;
    datapath::reload::check_capacity(&plan::compile(mesh), cap)?;
    crate::registry::Registry::compile(mesh)?;
    Ok(())
}

/// Load a configuration and take it through what the agent does with it before it is in force
/// (addresses allocated, the plan fitted to the maps, the registry built with its CA files).
fn validate(path: &Path, cap: &datapath::Capacity) -> ExitCode {
    let (loaded, warnings) = match config::load(path) {
        Ok(l) => (Ok(l.config), l.warnings),
        Err(e) => (Err(e.errors), e.warnings),
    };
    for w in &warnings {
        println!("warning: {w}");
    }
    let checked =
        loaded.map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>());
    let checked = checked.and_then(|mut mesh| {
        in_force(&mut mesh, cap)
            .map(|()| mesh)
            .map_err(|e| vec![format!("{}: {e:#}", path.display())])
    });
    match checked {
        Ok(mesh) => {
            println!(
                "{}: valid ({} ServiceEntries, {} warnings)",
                path.display(),
                mesh.service_entries.len(),
                warnings.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for p in &errors {
                println!("error: {p}");
            }
            error!("{}: {} errors", path.display(), errors.len());
            ExitCode::FAILURE
        }
    }
}
