//! `egress run`: the agent. Loads the configuration, programs and attaches the datapath, and
//! serves redirected connections, reloads and the admin endpoint until SIGINT/SIGTERM.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use egress_common::Config;
use log::{info, warn};

use super::{AgentArgs, DEFAULT_CGROUP, RunArgs};
use crate::{
    config::{self, FailureMode, MeshConfig, alloc::Allocator},
    datapath::{self, Capacity, Datapath, Maps, OrigMaps, Pinned, reload, sys},
    dns, plan,
    proxy::{self, Proxy, upstream},
    registry,
    telemetry::{
        self, accesslog, admin, direct,
        health::{self, Health},
        metrics::{self, Metrics},
    },
    workloads::{self, handover, netns},
};

/// Load and compile a configuration, printing its warnings; or the built-in default.
pub(super) fn load_config(path: Option<&Path>) -> Result<MeshConfig> {
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
pub(super) fn datapath_config(
    agent: &AgentArgs,
    (agent_cgroup, agent_netns): (u64, u64),
    direct: bool,
    mesh: &MeshConfig,
) -> Config {
    Config {
        agent_cgroup,
        agent_netns,
        listener_port: agent.outbound_port,
        enabled: 1,
        direct: u8::from(direct),
        listener_v4: Ipv4Addr::LOCALHOST.octets(),
        listener_v6: Ipv6Addr::LOCALHOST.octets(),
        failure_open: u8::from(mesh.failure_mode == FailureMode::Open),
        raw_sockets: crate::config::RawSockets::code(mesh.raw_sockets),
        dns_capture: mesh.dns_capture.kernel(),
        dns_port: agent.dns_port,
        ..Config::default()
    }
}

/// What `run` made and removes again if it fails before it serves. Once it serves, all of it
/// stays when the agent stops: the programs keep deciding from the pinned maps until an agent
/// takes them over again or `egress uninstall` removes them.
#[derive(Default)]
struct Created {
    /// Pins of a datapath that was not there before.
    pins: Option<PathBuf>,
    /// Maps staged beside pinned ones of another layout.
    staged: Option<PathBuf>,
    cgroup: Option<PathBuf>,
}

impl Created {
    /// The agent serves: what it made is the node's now.
    fn keep(&mut self) {
        (self.pins, self.staged, self.cgroup) = (None, None, None);
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        if let Some(p) = &self.pins {
            datapath::unpin(p);
        }
        if let Some(p) = &self.staged {
            let _ = std::fs::remove_dir_all(p);
        }
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

/// Where the programs are attached, and which cgroup of the agent's own namespace is
/// intercepted (with its (id, level) when the attachment is wider than it).
struct Attach {
    at: PathBuf,
    own: Option<(PathBuf, (u64, u32))>,
}

fn attach_points(args: &RunArgs, root: &Path, created: &mut Created) -> Result<Attach> {
    let named = match &args.cgroup {
        Some(c) => {
            if !c.join("cgroup.procs").exists() {
                bail!("--cgroup {}: not a cgroup v2 directory", c.display());
            }
            Some(c.clone())
        }
        None => None,
    };
    if args.node {
        let own = match named {
            Some(c) => {
                let limit = (sys::cgroup_id(&c)?, sys::cgroup_level(root, &c)?);
                Some((c, limit))
            }
            None => None,
        };
        return Ok(Attach {
            at: root.to_path_buf(),
            own,
        });
    }
    let c = match named {
        Some(c) => c,
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
    Ok(Attach {
        at: c.clone(),
        own: Some((c, (0, 0))),
    })
}

pub(super) fn run(args: RunArgs) -> Result<()> {
    // First, so that a probe during start-up gets a 503 naming what is pending.
    let health = Health::new();
    if args.health_port != 0 {
        let at = SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.health_port));
        // Served by a thread of its own, blocking.
        let l = sys::shared_listener(at)
            .and_then(|l| l.set_nonblocking(false).map(|()| l))
            .with_context(|| format!("health endpoint {at} (--health-port)"))?;
        health::serve(l, health.clone()).context("starting the health thread")?;
    }
    health.pending("loading the configuration");
    let mut mesh = load_config(args.config.as_deref())?;
    let mut alloc =
        Allocator::load(Some(&args.allocations_file)).learning(args.agent.dns_port != 0);
    alloc.assign(&mut mesh)?;
    let failure = mesh.failure_mode;
    let plan = plan::compile(&mesh);
    let reg = registry::Registry::compile(&mesh)?;
    let shared_registry: registry::Shared = Arc::new(std::sync::RwLock::new(Arc::new(reg)));
    let cap = Capacity {
        cidrs: args.max_cidrs,
        allowed: args.max_service_entry_addresses,
        orig: egress_common::DEFAULT_MAX_ORIG,
    };
    reload::check_capacity(&plan, &cap)?;
    let own_label = workloads::parse_label(&args.workload).context("--workload")?;
    sys::raise_nofile_limit();
    netns::init_home()?;
    let root = sys::cgroup2_root()?;
    let mut created = Created::default();
    let attach = attach_points(&args, &root, &mut created)?;
    // The datapath knows the agent's sockets by this cgroup, in every namespace.
    let agent_cgroup = sys::AgentCgroup::enter()?;
    sys::ensure_bpffs(&args.pin_path)?;
    let mut dp = Datapath::load(cap, &args.pin_path)?;
    match dp.pinned() {
        Pinned::Fresh => created.pins = Some(args.pin_path.clone()),
        Pinned::Reused => {}
        Pinned::Replaced(_) => created.staged = Some(dp.maps_dir().to_path_buf()),
    }
    let maps_dir = dp.maps_dir().to_path_buf();
    let mut maps = Maps::open(&maps_dir)?;
    // An agent running on the same admin socket hands its workloads over (an upgrade): from
    // here on it refuses enrolments, and serves on until this one serves.
    let handover_path = handover::socket_path(&args.admin_socket);
    let mut taken = match handover::take(&handover_path) {
        Ok(t) => t,
        Err(e) => {
            warn!("{e:#}: starting from the enrolment state instead");
            None
        }
    };
    // Its upstream connections are still the agent's while it drains.
    let prev_agent = match (&taken, maps.config()) {
        (Some(_), Ok(c)) if c.agent_cgroup != agent_cgroup.id => c.agent_cgroup,
        _ => 0,
    };
    if let Some(t) = &taken {
        info!(
            "taking over {} workloads from the agent that runs at {}",
            t.workloads.len(),
            handover_path.display()
        );
    }
    dp.load_programs()?;
    if !sys::has_netns_cookie_option()? {
        sys::use_netns_probe(dp.attach_netns_probe(&agent_cgroup.path)?);
        info!(
            "no SO_NETNS_COOKIE on this kernel (Linux 5.14): network namespace cookies come \
             from egress_netns_probe, attached to {}",
            agent_cgroup.path.display()
        );
    }
    let cfg = datapath_config(
        &args.agent,
        (agent_cgroup.id, sys::netns_cookie()?),
        !args.external_proxy,
        &mesh,
    );
    let cfg = Config {
        agent_cgroup_prev: prev_agent,
        ..cfg
    };
    health.pending("programming the maps");
    let start = std::time::Instant::now();
    match dp.pinned() {
        Pinned::Reused => {
            let n = maps.resync(&plan, cfg)?;
            info!(
                "took over the maps pinned in {} (they kept deciding while no agent ran): \
                 {n} changes to this configuration in {:.1?}",
                args.pin_path.display(),
                start.elapsed()
            );
        }
        pinned => {
            if let Pinned::Replaced(why) = pinned {
                warn!(
                    "the maps pinned in {} are of another layout ({why}): new ones are filled \
                     beside them and take their place when the programs are switched",
                    args.pin_path.display()
                );
            }
            maps.program(&plan, cfg)?;
            info!("programmed the maps in {:.1?}", start.elapsed());
        }
    }

    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let _entered = rt.enter();
    let orig = Arc::new(Mutex::new(OrigMaps::open(&maps_dir)?));
    // Off with --metrics-port 0: the records then feed nothing.
    let metrics = (args.metrics_port != 0).then(|| Arc::new(Metrics::default()));
    let log = accesslog::Log::new(args.access_log, metrics.clone())
        .context("starting the access-log writer")?;
    let upstreams = Arc::new(upstream::Pool::new(args.upstream_idle_timeout));
    let learner = Arc::new(dns::Learner::new(
        datapath::LearnedMap::open(&maps_dir)?,
        args.dns_grace,
    ));
    let px = Arc::new(Proxy {
        orig: orig.clone(),
        mark: args.mark,
        connect_timeout: args.connect_timeout,
        pipes: proxy::PipePool::default(),
        registry: shared_registry.clone(),
        log: log.clone(),
        sniff_timeout: args.sniff_timeout,
        header_timeout: args.header_timeout,
        cgroups: accesslog::CgroupNames::new(root.clone()),
        upstreams: upstreams.clone(),
        stop: tokio::sync::watch::channel(false).0,
        live: Arc::default(),
        learner: learner.clone(),
    });
    // Names the registry owns are answered by the agent, the rest forwarded to the nameserver
    // the client asked; a response for a UDP client fits its size. The names follow reloads.
    let names: Arc<std::sync::RwLock<Arc<dns::Names>>> =
        Arc::new(std::sync::RwLock::new(Arc::new(dns::Names::build(&mesh))));
    let dns = Arc::new(dns::server::Dns {
        answer: {
            let names = names.clone();
            Box::new(move |query, namespace| match names.read() {
                Ok(names) => names.clone().handle(query, namespace),
                // Poisoned: nothing the registry says can be trusted; the nameserver answers.
                Err(_) => dns::Action::Forward,
            })
        },
        learn: {
            let (names, learner) = (names.clone(), learner.clone());
            Box::new(move |wl, ns, response| {
                if let Ok(names) = names.read() {
                    let now = datapath::monotonic_ns();
                    let who = (wl.cookie, wl.namespace.as_str());
                    learner.observe(who, &names, ns, response, now);
                }
            })
        },
        limit: Box::new(dns::fit_udp),
        nameservers: dns::server::Nameservers::open(&maps_dir)?,
        orig: orig.clone(),
        log: log.clone(),
        mark: args.mark,
        stop: px.stop.subscribe(),
    });
    let serve: workloads::Serve = {
        let (px, dns, handle) = (px.clone(), dns.clone(), rt.handle().clone());
        Box::new(move |wl, sockets| {
            let _in_runtime = handle.enter();
            let mut handles = Vec::new();
            let tcp = |l| tokio::net::TcpListener::from_std(l);
            for l in sockets.outbound {
                match tcp(l) {
                    Ok(l) => {
                        handles.push(handle.spawn(px.clone().serve(l, wl.clone())).abort_handle())
                    }
                    Err(e) => warn!("serving a listener of {}: {e}", wl.label),
                }
            }
            for l in sockets.dns_tcp {
                match tcp(l) {
                    Ok(l) => handles.push(
                        handle
                            .spawn(dns.clone().serve_tcp(l, wl.clone()))
                            .abort_handle(),
                    ),
                    Err(e) => warn!("serving a DNS listener of {}: {e}", wl.label),
                }
            }
            for u in sockets.dns_udp {
                match tokio::net::UdpSocket::from_std(u) {
                    Ok(u) => handles.push(
                        handle
                            .spawn(dns.clone().serve_udp(u, wl.clone()))
                            .abort_handle(),
                    ),
                    Err(e) => warn!("serving the DNS socket of {}: {e}", wl.label),
                }
            }
            handles
        })
    };
    let forget: workloads::Forget = {
        let (upstreams, metrics) = (upstreams.clone(), metrics.clone());
        Box::new(move |wl| {
            upstreams.forget(wl.cookie);
            if let Some(m) = &metrics {
                m.forget(&wl.label);
            }
        })
    };
    let port = args.agent.outbound_port;
    let dns_port = args.agent.dns_port;
    let listen = workloads::Listen {
        port: (!args.external_proxy).then_some(port),
        dns: (dns_port != 0).then_some(dns_port),
    };
    let state = args.node.then(|| args.state_file.clone());
    let mut wls = workloads::Workloads::new(state, listen, serve, forget);
    let own_dns = attach.own.is_some() && dns_port != 0;
    if let Some((cgroup, limit)) = &attach.own {
        let given = taken.as_mut().and_then(handover::Taken::own);
        wls.enroll_own(&mut maps, &plan.policies, own_label, *limit, given)
            .with_context(|| format!("intercepting cgroup {}", cgroup.display()))?;
    }
    let handed_over = taken.is_some();
    if let Some(mut t) = taken {
        health.pending("taking the workloads over from the agent that runs");
        let n = wls.adopt(&mut maps, &plan.policies, std::mem::take(&mut t.workloads));
        match t.confirm() {
            Ok(()) => info!(
                "took over {n} workloads and their listeners: the agent that ran stops \
                 accepting and drains its connections"
            ),
            Err(e) => warn!("{e:#}"),
        }
    } else if args.node {
        health.pending("replaying the enrolled workloads");
        wls.replay(&mut maps, &plan.policies);
    }
    let pruned = wls.prune(&mut maps);
    if pruned > 0 {
        info!("removed {pruned} enrolments left in the maps that nothing stands behind now");
    }
    health.pending("starting the admin endpoints and attaching the programs");
    let table = wls.table();
    let sweep_table = table.clone();
    if let Err(e) = alloc.save() {
        warn!("keeping the address allocations: {e:#}");
    }
    let mut reloader = reload::Reloader::new(
        args.config.clone(),
        maps,
        (mesh, plan, alloc),
        cap,
        shared_registry.clone(),
        (wls, args.node),
    );
    {
        let learner = learner.clone();
        reloader.on_applied(Box::new(move |mesh| {
            let built = Arc::new(dns::Names::build(mesh));
            learner.retarget(&built);
            if let Ok(mut n) = names.write() {
                *n = built;
            }
        }));
    }
    let status = reloader.status();
    health.control(status.clone());
    if let Some(m) = &metrics {
        m.attach(Arc::new(AgentState {
            maps: Mutex::new(Maps::open(&maps_dir)?),
            status: status.clone(),
            workloads: table.clone(),
            log: log.clone(),
            learner: learner.clone(),
        }));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || reloader.run(rx))
        .context("starting the control thread")?;
    // Kept alive for as long as the agent runs.
    let _watcher = match &args.config {
        Some(path) => Some(
            reload::watch(path, tx.clone())
                .with_context(|| format!("watching {} for changes", path.display()))?,
        ),
        None => None,
    };

    rt.block_on(async {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, args.admin_port));
        let admin_listener = sys::shared_listener(admin)
            .and_then(tokio::net::TcpListener::from_std)
            .with_context(|| format!("admin endpoint {admin}"))?;
        let tcp = admin::Listener::Tcp(admin_listener);
        tokio::spawn(admin::serve(tcp, tx.clone(), status.clone()));
        if let Some(m) = &metrics {
            let at = SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.metrics_port));
            let l = sys::shared_listener(at)
                .and_then(tokio::net::TcpListener::from_std)
                .with_context(|| format!("metrics endpoint {at} (--metrics-port)"))?;
            tokio::spawn(telemetry::metrics::serve(l, m.clone()));
        }
        // Enrolment needs the socket on a node; elsewhere it only lists the workload. After
        // a handover the agent that ran still answers there: this one takes the path over.
        match admin::bind_unix(&args.admin_socket, handed_over) {
            Ok(l) => {
                tokio::spawn(admin::serve(admin::Listener::Unix(l), tx.clone(), status));
            }
            Err(e) if args.node => return Err(e.context("--admin-socket")),
            Err(e) => warn!("no admin socket: {e:#}"),
        }
        let gave_over = serve_handover(&handover_path, &tx, &px)?;
        let ours = Ours::new(&[&args.admin_socket, &handover_path]);
        // Opened before `commit` moves staged maps to where the next agent looks.
        let closes = direct::Closes::open(&maps_dir)?;
        dp.attach_interception(&attach.at)?;
        dp.commit()?;
        if args.external_proxy {
            let pc = match &args.proxy_cgroup {
                Some(p) => p.clone(),
                None => agent_cgroup.path.clone(),
            };
            dp.attach_getsockopt(&pc)?;
            info!(
                "answering SO_ORIGINAL_DST for a transparent proxy in cgroup {}",
                pc.display()
            );
        }
        tokio::spawn(closes.serve(
            log.clone(),
            shared_registry.clone(),
            accesslog::CgroupNames::new(root.clone()),
            table,
        ));
        tokio::spawn(upstreams.clone().sweep());
        let max_age = args.orig_max_age;
        let sweeper = tx.clone();
        let (learner, sweep_table) = (learner.clone(), sweep_table);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5).min(max_age));
            loop {
                tick.tick().await;
                let n = orig.lock().map(|mut m| m.sweep(max_age)).unwrap_or(0);
                if n > 0 {
                    info!("removed {n} original-destination records older than {max_age:?}");
                }
                let enrolled = |netns| sweep_table.read().is_ok_and(|t| t.contains_key(&netns));
                learner.sweep(datapath::monotonic_ns(), enrolled);
                // Pods deleted without a DEL: release what the agent holds of them.
                let _ = sweeper.send(reload::Msg::Sweep);
                // What a wave of connections freed goes back to the system.
                sys::release_free_memory();
            }
        });
        let what = match (&attach.own, args.node) {
            (Some((c, _)), false) => format!("cgroup {}", c.display()),
            (Some((c, _)), true) => format!(
                "enrolled network namespaces and cgroup {} (node mode)",
                c.display()
            ),
            (None, _) => "enrolled network namespaces (node mode)".to_owned(),
        };
        println!("{}", attach.own.as_ref().map_or(&attach.at, |(c, _)| c).display());
        created.keep();
        health.ready();
        info!(
            "ready: intercepting {what}, attached at {}; outbound listener 127.0.0.1:{port} [::1]:{port}{}; admin {admin} and {}; {}",
            attach.at.display(),
            if args.external_proxy {
                " (external proxy)"
            } else {
                ""
            },
            args.admin_socket.display(),
            if dns_port == 0 {
                "DNS not captured".to_owned()
            } else {
                format!("DNS on port {dns_port} (UDP, and TCP on 127.0.0.1 and [::1])")
            },
        );
        wait_for_signals(&tx).await?;
        let live = px.live.load(std::sync::atomic::Ordering::Relaxed);
        if live > 0 {
            info!(
                "stopping: no longer accepting; draining {live} connections (at most {:?}, --drain-timeout)",
                args.drain_timeout
            );
        }
        let cut = px.drain(args.drain_timeout).await;
        if cut > 0 {
            warn!("{cut} connections were still open after {:?}: they are cut", args.drain_timeout);
        }
        // After a handover the paths are the new agent's.
        if !gave_over.load(std::sync::atomic::Ordering::Relaxed) {
            ours.remove();
            // The IPv6 DNS stub route this agent's own namespace got for its cgroup: with
            // the agent's socket gone, DNS there goes to the nameservers (it fails open).
            if own_dns
                && let Err(e) = workloads::netns::stub_route(workloads::netns::Route::Remove)
            {
                warn!("removing the IPv6 DNS stub route: {e}");
            }
        }
        info!(
            "stopping: the programs stay attached at {} and decide from the maps pinned in {} \
             (failureMode {}) until an agent takes them over; `egress uninstall` removes them",
            attach.at.display(),
            args.pin_path.display(),
            failure.name()
        );
        log.flush();
        anyhow::Ok(())
    })?;
    drop(dp);
    drop(created);
    drop(agent_cgroup);
    Ok(())
}

/// Sockets this agent bound, removed when it stops unless another agent bound their paths
/// since. A file is known by its inode and change time together: a file system may give a new
/// file the inode of one just removed.
struct Ours(Vec<(PathBuf, Option<FileId>)>);

/// (inode, change time in seconds and nanoseconds).
type FileId = (u64, i64, i64);

fn file_id(p: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(p)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

impl Ours {
    fn new(paths: &[&Path]) -> Ours {
        Ours(
            paths
                .iter()
                .map(|p| (p.to_path_buf(), file_id(p)))
                .collect(),
        )
    }

    fn remove(&self) {
        for (p, id) in &self.0 {
            if id.is_some() && file_id(p) == *id {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Hand the workloads to a new agent that asks on `path`: the control thread lists them and
/// refuses enrolments from then on; once the new agent serves them, this one stops accepting.
/// The flag returned is set then.
fn serve_handover(
    path: &Path,
    tx: &std::sync::mpsc::Sender<reload::Msg>,
    px: &Arc<Proxy>,
) -> Result<Arc<std::sync::atomic::AtomicBool>> {
    let gave_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = handover::bind(path)?;
    let ask = std::sync::Mutex::new(tx.clone());
    let hand = move || {
        let (reply, rx) = std::sync::mpsc::channel();
        let sent = ask
            .lock()
            .map(|tx| tx.send(reload::Msg::HandOver(reply)).is_ok())
            .unwrap_or(false);
        if !sent {
            return None;
        }
        rx.recv_timeout(Duration::from_secs(30)).ok()
    };
    let (tell, px, flag) = (
        std::sync::Mutex::new(tx.clone()),
        px.clone(),
        gave_over.clone(),
    );
    let done = move |taken: bool| {
        if let Ok(tx) = tell.lock() {
            let _ = tx.send(reload::Msg::HandedOver(taken));
        }
        if taken {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = px.stop.send(true);
            info!(
                "handed over to a new agent: no longer accepting; draining {} connections \
                 until stopped",
                px.live.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    };
    handover::serve(listener, hand, done)?;
    Ok(gave_over)
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

/// egress's own metrics: the agent's state as a scrape reads it.
struct AgentState {
    /// The pinned maps, for the kernel's counters.
    maps: Mutex<Maps>,
    status: Arc<Mutex<reload::Status>>,
    workloads: workloads::Table,
    log: accesslog::Log,
    learner: Arc<dns::Learner>,
}

impl AgentState {
    fn status(&self) -> std::sync::MutexGuard<'_, reload::Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl metrics::State for AgentState {
    fn connects(&self) -> Vec<(&'static str, &'static str, u64)> {
        let counts = match self.maps.lock().map(|m| m.counters()) {
            Ok(Ok(c)) => c,
            _ => return Vec::new(),
        };
        egress_common::Reason::ALL
            .iter()
            .zip(counts)
            .map(|(r, n)| (r.name(), super::reason_verdict(*r), n))
            .collect()
    }

    fn workloads(&self) -> u64 {
        self.workloads.read().map_or(0, |t| t.len() as u64)
    }

    fn generation(&self) -> u64 {
        self.status().generation
    }

    fn reload_failures(&self) -> u64 {
        self.status().failures
    }

    fn log_dropped(&self) -> u64 {
        self.log.dropped()
    }

    fn maps(&self) -> Vec<(&'static str, u64, u64)> {
        self.status().maps.clone()
    }

    fn dns_learned(&self) -> dns::learn::Counts {
        self.learner.counts()
    }
}
