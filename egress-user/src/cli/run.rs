//! `egress run`: the agent. Loads the configuration, programs and attaches the datapath, and
//! serves redirected connections, reloads and the admin endpoint until SIGINT/SIGTERM.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use egress_common::Config;
use log::{info, warn};

use super::{AgentArgs, DEFAULT_CGROUP, RunArgs};
use crate::{
    config::{self, MeshConfig},
    datapath::{self, Capacity, Datapath, Maps, OrigMaps, reload, sys},
    plan,
    proxy::{self, Proxy, upstream},
    registry,
    telemetry::{accesslog, admin, direct},
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
    mode: u8,
    netns_cookie: u64,
    direct: bool,
) -> Config {
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

pub(super) fn run(args: RunArgs) -> Result<()> {
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
