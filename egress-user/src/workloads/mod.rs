//! Workloads: the network namespaces the node's datapath decides for, each with an identity
//! (Kubernetes namespace, pod name, pod uid). A namespace is enrolled by the CNI plugin, by
//! `egress enroll`, or (the agent's own, selected by cgroup) at start. Enrolling opens the
//! agent's listeners inside the namespace, then writes its `WORKLOADS` entry (view and mode
//! from its namespace's policy); releasing it removes the entry, stops the listeners and every
//! connection of the namespace, and closes every fd the agent held there, so that the
//! namespace can go when its pod does. Enrolments are kept in a state file and replayed at
//! start.
//!
//! The control thread (`datapath::reload`) owns this table, since it owns the maps: enrolments,
//! reloads and sweeps are serialised there.

pub mod api;
pub mod cniconf;
pub mod handover;
pub mod netns;
pub mod resolv;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::SystemTime,
};

use anyhow::{Context as _, Result, bail};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use crate::{
    datapath::Maps,
    plan::{Policies, Policy},
};
use api::{EnrollRequest, Selector};
use netns::NetNs;

/// A workload as its connections see it.
#[derive(Debug)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    /// `NAMESPACE/NAME`, as access records name it.
    pub label: Arc<str>,
    /// Its network namespace, entered to open its sockets; `None` for the agent's own.
    pub netns: Option<Arc<NetNs>>,
    /// The kernel's cookie for the namespace.
    pub cookie: u64,
}

impl Workload {
    /// A workload released before its last record was written: named by its cookie only.
    pub fn released(cookie: u64) -> Workload {
        Workload {
            namespace: String::new(),
            name: String::new(),
            label: format!("(released netns {cookie})").into(),
            netns: None,
            cookie,
        }
    }

    /// A TCP socket in the workload's namespace, so that what it connects to sees the pod's own
    /// address.
    pub fn socket(&self, v6: bool) -> io::Result<tokio::net::TcpSocket> {
        self.inside(|| {
            if v6 {
                tokio::net::TcpSocket::new_v6()
            } else {
                tokio::net::TcpSocket::new_v4()
            }
        })
    }

    /// A UDP socket in the workload's namespace on an ephemeral port, for a DNS query
    /// forwarded as the pod.
    pub fn udp_socket(&self, v6: bool) -> io::Result<std::net::UdpSocket> {
        self.inside(|| {
            let any = if v6 {
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
            } else {
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
            };
            let s = std::net::UdpSocket::bind(any)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
    }

    /// `make` a socket in the workload's namespace (the agent's own: here).
    fn inside<T>(&self, make: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        match &self.netns {
            None => make(),
            Some(ns) => ns.run(make).map_err(io::Error::other)?,
        }
    }
}

/// A workload's listening sockets: the outbound listeners, and the DNS server's UDP socket and
/// TCP listeners.
#[derive(Debug, Default)]
pub struct Sockets {
    pub outbound: Vec<std::net::TcpListener>,
    /// UDP on 0.0.0.0 and, where the namespace has IPv6, on [::].
    pub dns_udp: Vec<std::net::UdpSocket>,
    pub dns_tcp: Vec<std::net::TcpListener>,
}

impl Sockets {
    /// Duplicates of every socket, the outbound listeners first, for a new agent to take
    /// over; and how many of them are DNS sockets.
    fn duplicates(&self) -> io::Result<(Vec<std::os::fd::OwnedFd>, usize)> {
        use std::os::fd::AsFd as _;
        let fds: Vec<std::os::fd::BorrowedFd<'_>> = self
            .outbound
            .iter()
            .map(|l| l.as_fd())
            .chain(self.dns_udp.iter().map(|u| u.as_fd()))
            .chain(self.dns_tcp.iter().map(|l| l.as_fd()))
            .collect();
        let dns = fds.len() - self.outbound.len();
        let dups = fds
            .into_iter()
            .map(|f| f.try_clone_to_owned())
            .collect::<io::Result<Vec<_>>>()?;
        Ok((dups, dns))
    }
}

/// Enrolled workloads by namespace cookie, for whoever needs a name for a cookie (the direct
/// connections' records).
pub type Table = Arc<RwLock<HashMap<u64, Arc<Workload>>>>;

/// Hands a workload's sockets to the runtime; the handles stop them and every connection
/// and query they took.
pub type Serve = Box<dyn Fn(Arc<Workload>, Sockets) -> Vec<tokio::task::AbortHandle> + Send>;

/// Drops whatever the agent keeps for a released workload between connections (idle upstream
/// connections opened in its namespace, its metric series).
pub type Forget = Box<dyn Fn(&Workload) + Send>;

/// A workload as the control thread keeps it.
struct Enrolled {
    wl: Arc<Workload>,
    /// Where it was enrolled from; `None` for the agent's own namespace.
    path: Option<PathBuf>,
    uid: String,
    container_id: Option<String>,
    slot: u32,
    /// (cgroup id, level) the interception is limited to there, or (0, 0).
    cgroup: (u64, u32),
    /// Its own addresses, as the datapath keeps them.
    own: Own,
    /// The nameservers it was enrolled with, as many as `DNS_RESOLVERS` holds for it.
    nameservers: Vec<IpAddr>,
    /// Those written to `DNS_RESOLVERS`.
    resolvers: Vec<IpAddr>,
    policy: Policy,
    serving: Vec<tokio::task::AbortHandle>,
    /// Duplicates of its listening sockets, for a new agent to take over: the outbound
    /// listeners, then the last `dns` ones, its DNS sockets.
    listeners: Vec<std::os::fd::OwnedFd>,
    dns: usize,
    since: SystemTime,
}

impl Drop for Enrolled {
    fn drop(&mut self) {
        for h in &self.serving {
            h.abort();
        }
    }
}

/// Where a workload was enrolled from (`None`: the agent's own namespace), its pod uid,
/// container id and nameservers.
struct Who {
    path: Option<PathBuf>,
    uid: String,
    container_id: Option<String>,
    nameservers: Vec<IpAddr>,
}

/// A workload's own addresses: two IPv4 and two IPv6 slots, unused ones zero.
pub type Own = ([[u8; 4]; 2], [[u8; 16]; 2]);

/// One line of the state file.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Saved {
    netns: PathBuf,
    /// The namespace's (device, inode) when enrolled: a path that names another namespace
    /// now (a pod re-created, a pid reused) is not that workload.
    id: (u64, u64),
    namespace: String,
    name: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    container_id: Option<String>,
    #[serde(default)]
    nameservers: Vec<IpAddr>,
}

/// How the agent listens in each workload's namespace.
pub struct Listen {
    /// The outbound port on 127.0.0.1 and ::1; `None` when another proxy serves it.
    pub port: Option<u16>,
    /// The DNS port: UDP on 0.0.0.0, TCP on 127.0.0.1 and ::1; `None` without DNS capture.
    pub dns: Option<u16>,
}

pub struct Workloads {
    enrolled: BTreeMap<u64, Enrolled>,
    table: Table,
    state: Option<PathBuf>,
    listen: Listen,
    serve: Serve,
    forget: Forget,
    max: u32,
}

impl Workloads {
    pub fn new(state: Option<PathBuf>, listen: Listen, serve: Serve, forget: Forget) -> Self {
        Workloads {
            enrolled: BTreeMap::new(),
            table: Table::default(),
            state,
            listen,
            serve,
            forget,
            max: egress_common::DEFAULT_MAX_WORKLOADS,
        }
    }

    pub fn table(&self) -> Table {
        self.table.clone()
    }

    fn free_slot(&self) -> Result<u32> {
        let used: std::collections::BTreeSet<u32> =
            self.enrolled.values().map(|e| e.slot).collect();
        (0..self.max)
            .find(|s| !used.contains(s))
            .with_context(|| format!("{} workloads are enrolled: no room for more", self.max))
    }

    /// A workload's nameservers as the datapath keeps them: each once, at most
    /// `MAX_WORKLOAD_NAMESERVERS` (more are dropped with a warning).
    fn capped(label: &str, given: Vec<IpAddr>) -> Vec<IpAddr> {
        let max = egress_common::MAX_WORKLOAD_NAMESERVERS as usize;
        let mut out: Vec<IpAddr> = Vec::new();
        for a in given {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        if out.len() > max {
            warn!(
                "{label}: {} nameservers, the datapath keeps {max}: {} dropped (under \
                 spec.dns.capture RESOLV_CONF, queries to them are not captured)",
                out.len(),
                list_or_dash(&out[max..])
            );
            out.truncate(max);
        }
        out
    }

    /// Open the sockets in the current thread's namespace (the workload's, or the agent's);
    /// `given` ones (handed over) are kept. DNS sockets are opened when none were given (an
    /// agent of a version without them handed its listeners over).
    fn bind(&self, in_pod: bool, given: Option<Sockets>) -> Result<Sockets> {
        let mut s = given.unwrap_or_default();
        let outbound = self.listen.port.filter(|_| s.outbound.is_empty());
        let dns = self
            .listen
            .dns
            .filter(|_| s.dns_udp.is_empty() && s.dns_tcp.is_empty());
        // An agent of a version without it handed over IPv4 DNS sockets only.
        let udp6 = self.listen.dns.filter(|_| {
            !s.dns_udp
                .iter()
                .any(|u| u.local_addr().is_ok_and(|a| a.is_ipv6()))
        });
        if outbound.is_none() && dns.is_none() && udp6.is_none() {
            return Ok(s);
        }
        if in_pod {
            netns::loopback_up().context("bringing the namespace's loopback up")?;
        }
        if let Some(port) = outbound {
            s.outbound = loopback_listeners(port, in_pod)?;
        }
        if let Some(port) = dns {
            s.dns_tcp = loopback_listeners(port, in_pod)?;
            s.dns_udp.push(
                crate::dns::server::udp_socket(port, false)
                    .with_context(|| format!("binding UDP 0.0.0.0:{port} for DNS"))?,
            );
        }
        if let Some(port) = udp6 {
            // Queries to IPv6 nameservers need the stub range routed here; without IPv6 in
            // the namespace there are none to capture.
            match netns::stub_route(netns::Route::Add)
                .and_then(|_| crate::dns::server::udp_socket(port, true))
            {
                Ok(u) => s.dns_udp.push(u),
                // Their queries go to them (DNS fails open): the kernel finds no socket.
                Err(e) if in_pod => {
                    debug!("no DNS capture for IPv6 nameservers in this namespace: {e}")
                }
                Err(e) => warn!(
                    "no DNS capture for IPv6 nameservers (routing the stub range \
                     100::53:0/112 to lo and binding UDP [::]:{port}): {e}"
                ),
            }
        }
        Ok(s)
    }

    /// Enrol the agent's own namespace: its processes in `cgroup` ((id, level); (0, 0) when
    /// the programs are attached to that cgroup only, so every caller is in it). Its
    /// nameservers are those of the agent's /etc/resolv.conf.
    pub fn enroll_own(
        &mut self,
        maps: &mut Maps,
        policies: &Policies,
        (namespace, name): (String, String),
        cgroup: (u64, u32),
        given: Option<Sockets>,
    ) -> Result<()> {
        let cookie = crate::datapath::sys::netns_cookie()?;
        let listeners = self.bind(false, given)?;
        let wl = Arc::new(Workload {
            label: format!("{namespace}/{name}").into(),
            namespace,
            name,
            netns: None,
            cookie,
        });
        let who = Who {
            path: None,
            uid: String::new(),
            container_id: None,
            nameservers: resolv::read(std::path::Path::new("/etc/resolv.conf")),
        };
        self.install(maps, policies, wl, who, (cgroup, Own::default()), listeners)?;
        Ok(())
    }

    /// Serve a workload's listeners, then write its datapath entry: its nameservers, then
    /// its `WORKLOADS` entry.
    fn install(
        &mut self,
        maps: &mut Maps,
        policies: &Policies,
        wl: Arc<Workload>,
        who: Who,
        (cgroup, own): ((u64, u32), Own),
        listeners: Sockets,
    ) -> Result<String> {
        let Who {
            path,
            uid,
            container_id,
            nameservers,
        } = who;
        let slot = self.free_slot()?;
        let policy = policies.of(&wl.namespace);
        maps.zero_workload_counters(slot)?;
        let (dups, dns) = listeners.duplicates().context("duplicating a listener")?;
        let nameservers = Self::capped(&wl.label, nameservers);
        // The listeners are listening already: a connect redirected from now on is queued.
        let serving = (self.serve)(wl.clone(), listeners);
        let resolvers = maps.set_nameservers(wl.cookie, &nameservers);
        let resolv_conf = maps
            .config()
            .is_ok_and(|c| c.dns_port != 0 && c.dns_capture != egress_common::DNS_CAPTURE_ALL);
        if resolvers.is_empty() && resolv_conf {
            warn!(
                "{}: no nameservers known (none given at enrolment, or none written): under \
                 spec.dns.capture RESOLV_CONF its DNS queries to every nameserver are captured",
                wl.label
            );
        }
        let entry = kernel_entry(slot, policy, cgroup, own, resolvers.len());
        if let Err(e) = maps.set_workload(wl.cookie, entry) {
            maps.remove_nameservers(wl.cookie, &resolvers);
            for h in serving {
                h.abort();
            }
            return Err(e);
        }
        let line = format!(
            "enrolled {} (network namespace {}, cookie {}): view {} {}",
            wl.label,
            path.as_deref()
                .map_or("of the agent".into(), |p| p.display().to_string()),
            wl.cookie,
            policy.view,
            crate::plan::mode_name(policy.mode),
        );
        info!("{line}");
        self.table
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(wl.cookie, wl.clone());
        self.enrolled.insert(
            wl.cookie,
            Enrolled {
                wl,
                path,
                uid,
                container_id,
                slot,
                cgroup,
                own,
                nameservers,
                resolvers,
                policy,
                serving,
                listeners: dups,
                dns,
                since: SystemTime::now(),
            },
        );
        Ok(line)
    }

    /// Enrol a namespace; returns once connects made there are decided.
    pub fn enroll(
        &mut self,
        maps: &mut Maps,
        policies: &Policies,
        req: EnrollRequest,
    ) -> Result<String> {
        self.enroll_with(maps, policies, req, None)
    }

    /// Enrol the workloads a running agent handed over, on the listeners it gave: they are
    /// the same sockets, so nothing redirected meanwhile finds them closed. A namespace whose
    /// path names another one now is dropped. Returns how many were enrolled.
    pub fn adopt(
        &mut self,
        maps: &mut Maps,
        policies: &Policies,
        taken: Vec<(handover::Handed, Sockets)>,
    ) -> usize {
        let mut n = 0;
        for (h, listeners) in taken {
            let label = format!("{}/{}", h.namespace, h.name);
            let Some(path) = h.netns else { continue };
            if netns::path_id(&path) != h.id {
                info!(
                    "dropped {label}: its network namespace {} is gone",
                    path.display()
                );
                continue;
            }
            let req = EnrollRequest {
                netns: path,
                namespace: h.namespace,
                name: h.name,
                uid: h.uid,
                container_id: h.container_id,
                nameservers: h.nameservers,
            };
            match self.enroll_with(maps, policies, req, Some(listeners)) {
                Ok(_) => n += 1,
                Err(e) => warn!("could not take {label} over: {e:#}"),
            }
        }
        self.save();
        n
    }

    /// Every workload with duplicates of its listeners, for a new agent to take over.
    pub fn handed(&self) -> Vec<(handover::Handed, Vec<std::os::fd::OwnedFd>)> {
        self.enrolled
            .values()
            .filter_map(|e| {
                let fds = e
                    .listeners
                    .iter()
                    .map(|f| f.try_clone())
                    .collect::<io::Result<Vec<_>>>()
                    .ok()?;
                let h = handover::Handed {
                    netns: e.path.clone(),
                    id: e.wl.netns.as_ref().map(|ns| ns.id),
                    namespace: e.wl.namespace.clone(),
                    name: e.wl.name.clone(),
                    uid: e.uid.clone(),
                    container_id: e.container_id.clone(),
                    listeners: fds.len() - e.dns,
                    dns: e.dns,
                    nameservers: e.nameservers.clone(),
                };
                Some((h, fds))
            })
            .collect()
    }

    fn enroll_with(
        &mut self,
        maps: &mut Maps,
        policies: &Policies,
        req: EnrollRequest,
        given: Option<Sockets>,
    ) -> Result<String> {
        check_name("namespace", &req.namespace)?;
        check_name("name", &req.name)?;
        let ns = Arc::new(
            NetNs::open(&req.netns)
                .with_context(|| format!("enrolling {}/{}", req.namespace, req.name))?,
        );
        // The same sandbox enrolled again (a retried ADD, a re-created namespace), or the
        // same namespace under another identity: the newest enrolment wins.
        let stale: Vec<u64> = self
            .enrolled
            .iter()
            .filter(|(cookie, e)| {
                **cookie == ns.cookie
                    || (req.container_id.is_some() && e.container_id == req.container_id)
            })
            .map(|(c, _)| *c)
            .collect();
        for cookie in stale {
            if self.enrolled[&cookie].path.is_none() {
                bail!(
                    "{} is the agent's own network namespace, intercepted by cgroup",
                    req.netns.display()
                );
            }
            self.release(maps, cookie, "enrolled again");
        }
        let (listeners, own) = ns
            .run(|| -> Result<_> {
                let own = netns::own_addresses().context("listing its addresses")?;
                let listeners = self.bind(true, given)?;
                Ok((listeners, own))
            })?
            .with_context(|| format!("in network namespace {}", req.netns.display()))?;
        let wl = Arc::new(Workload {
            label: format!("{}/{}", req.namespace, req.name).into(),
            namespace: req.namespace,
            name: req.name,
            cookie: ns.cookie,
            netns: Some(ns),
        });
        let who = Who {
            path: Some(req.netns),
            uid: req.uid,
            container_id: req.container_id,
            nameservers: req.nameservers,
        };
        let line = self.install(maps, policies, wl, who, ((0, 0), own), listeners)?;
        self.save();
        Ok(line)
    }

    fn find(&self, sel: &Selector) -> Vec<u64> {
        if sel.container_id.is_none() && sel.netns.is_none() && sel.workload.is_none() {
            return Vec::new();
        }
        let by_path = sel.netns.as_deref().map(|p| (p, netns::path_id(p)));
        self.enrolled
            .iter()
            .filter(|(_, e)| e.path.is_some())
            .filter(|(_, e)| {
                sel.container_id
                    .as_ref()
                    .is_none_or(|c| e.container_id.as_ref() == Some(c))
                    && sel.workload.as_deref().is_none_or(|w| *e.wl.label == *w)
                    && by_path.is_none_or(|(p, id)| {
                        e.path.as_deref() == Some(p)
                            || e.wl.netns.as_ref().is_some_and(|ns| Some(ns.id) == id)
                    })
            })
            .map(|(c, _)| *c)
            .collect()
    }

    /// Release what the selector names; nothing enrolled is not an error (a DEL repeated, or
    /// after the agent dropped a namespace that was gone).
    pub fn unenroll(&mut self, maps: &mut Maps, sel: &Selector) -> Result<String> {
        if sel.container_id.is_none() && sel.netns.is_none() && sel.workload.is_none() {
            bail!("name the workload: a container id, a network namespace path or NAMESPACE/NAME");
        }
        let found = self.find(sel);
        if found.is_empty() {
            return Ok("not enrolled".to_owned());
        }
        let mut lines = Vec::new();
        for cookie in found {
            lines.push(self.release(maps, cookie, "unenrolled"));
        }
        self.save();
        Ok(lines.join("\n"))
    }

    pub fn is_enrolled(&self, sel: &Selector) -> bool {
        !self.find(sel).is_empty()
    }

    /// Remove a workload: its map entry first (new connects there are left alone), then its
    /// listeners, connections and idle upstream connections, and the namespace fd.
    fn release(&mut self, maps: &mut Maps, cookie: u64, why: &str) -> String {
        let Some(e) = self.enrolled.remove(&cookie) else {
            return String::new();
        };
        if let Err(err) = maps.remove_workload(cookie) {
            warn!("removing the datapath entry of {}: {err:#}", e.wl.label);
        }
        maps.remove_nameservers(cookie, &e.resolvers);
        self.table
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cookie);
        (self.forget)(&e.wl);
        let line = format!(
            "released {} ({why}; network namespace {})",
            e.wl.label,
            e.path
                .as_deref()
                .map_or("of the agent".into(), |p| p.display().to_string())
        );
        info!("{line}");
        drop(e);
        line
    }

    /// After a configuration change: give each workload its namespace's policy now. Runs
    /// where `plan::diff` switches policies, with both plans' allow entries in place.
    pub fn repoint(&mut self, maps: &mut Maps, policies: &Policies) -> Result<()> {
        for (cookie, e) in self.enrolled.iter_mut() {
            let p = policies.of(&e.wl.namespace);
            if p != e.policy {
                let entry = kernel_entry(e.slot, p, e.cgroup, e.own, e.resolvers.len());
                maps.set_workload(*cookie, entry)?;
                e.policy = p;
            }
        }
        Ok(())
    }

    /// Release workloads whose namespace is gone: the path no longer names it (deleted, or
    /// the process whose namespace it was has exited).
    pub fn sweep(&mut self, maps: &mut Maps) {
        let gone: Vec<u64> = self
            .enrolled
            .iter()
            .filter(|(_, e)| match (&e.path, &e.wl.netns) {
                (Some(p), Some(ns)) => netns::path_id(p) != Some(ns.id),
                _ => false,
            })
            .map(|(c, _)| *c)
            .collect();
        if gone.is_empty() {
            return;
        }
        for cookie in gone {
            self.release(maps, cookie, "its network namespace is gone");
        }
        self.save();
    }

    /// What `egress workloads` prints: one line per workload, with its counters.
    pub fn render(&self, maps: &Maps) -> String {
        let mut out = String::new();
        for e in self.enrolled.values() {
            let counts = maps.workload_counters(e.slot).unwrap_or_default();
            let sum = |verdict: &str| -> u64 {
                egress_common::Reason::ALL
                    .iter()
                    .zip(&counts)
                    .filter(|(r, _)| crate::cli::reason_verdict(**r) == verdict)
                    .map(|(_, n)| n)
                    .sum()
            };
            out.push_str(&format!(
                "{} netns={} cookie={} uid={} container={} view={} mode={} nameservers={} redirect={} direct={} deny={} bypass={} since={}\n",
                e.wl.label,
                e.path
                    .as_deref()
                    .map_or("(agent)".into(), |p| p.display().to_string()),
                e.wl.cookie,
                if e.uid.is_empty() { "-" } else { &e.uid },
                e.container_id.as_deref().unwrap_or("-"),
                e.policy.view,
                crate::plan::mode_name(e.policy.mode),
                list_or_dash(&e.nameservers),
                sum("redirect"),
                sum("direct"),
                sum("deny"),
                sum("bypass"),
                e.since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            ));
        }
        out
    }

    /// The enrolled workloads, for `/config_dump`.
    pub fn dump(&self) -> Vec<serde_json::Value> {
        self.enrolled
            .values()
            .map(|e| {
                serde_json::json!({
                    "workload": &*e.wl.label,
                    "netns": e.path.as_ref().map(|p| p.display().to_string()),
                    "cookie": e.wl.cookie,
                    "uid": e.uid,
                    "container": e.container_id,
                    "view": e.policy.view,
                    "mode": crate::plan::mode_name(e.policy.mode),
                    "nameservers": e.nameservers,
                    "since": e.since
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                })
            })
            .collect()
    }

    /// The cookie and slot of the workload `NAMESPACE/NAME`, for `explain` and `stats`.
    pub fn lookup(&self, label: &str) -> Option<(u64, u32)> {
        self.enrolled
            .values()
            .find(|e| *e.wl.label == *label)
            .map(|e| (e.wl.cookie, e.slot))
    }

    /// Write the enrolments (not the agent's own namespace) to the state file, atomically.
    fn save(&self) {
        let Some(path) = &self.state else {
            return;
        };
        let saved: Vec<Saved> = self
            .enrolled
            .values()
            .filter_map(|e| {
                Some(Saved {
                    netns: e.path.clone()?,
                    id: e.wl.netns.as_ref()?.id,
                    namespace: e.wl.namespace.clone(),
                    name: e.wl.name.clone(),
                    uid: e.uid.clone(),
                    container_id: e.container_id.clone(),
                    nameservers: e.nameservers.clone(),
                })
            })
            .collect();
        let write = || -> Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&saved)?)?;
            std::fs::rename(&tmp, path)?;
            Ok(())
        };
        if let Err(e) = write() {
            warn!("writing the enrolment state {}: {e:#}", path.display());
        }
    }

    /// Remove the `WORKLOADS` entries no enrolment of this agent stands behind: left in the
    /// pinned maps by an agent that ran before, for namespaces released or gone meanwhile, and
    /// the `DNS_RESOLVERS` entries no enrolment holds (those too, and nameservers a workload
    /// enrolled again no longer has). Returns how many workloads.
    pub fn prune(&self, maps: &mut Maps) -> usize {
        let n = maps
            .workloads()
            .into_iter()
            .filter(|(cookie, _)| !self.enrolled.contains_key(cookie))
            .filter(|(cookie, _)| maps.remove_workload(*cookie).is_ok())
            .count();
        for (cookie, ns) in maps.nameservers() {
            if !self
                .enrolled
                .get(&cookie)
                .is_some_and(|e| e.resolvers.contains(&ns))
            {
                maps.remove_nameservers(cookie, &[ns]);
            }
        }
        n
    }

    /// Enrol again what the state file holds, dropping namespaces that are gone (or that their
    /// path names another namespace now).
    pub fn replay(&mut self, maps: &mut Maps, policies: &Policies) {
        let Some(path) = self.state.clone() else {
            return;
        };
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                warn!("reading the enrolment state {}: {e}", path.display());
                return;
            }
        };
        let saved: Vec<Saved> = match serde_json::from_slice(&text) {
            Ok(s) => s,
            Err(e) => {
                warn!(
                    "the enrolment state {} is not valid ({e}): starting with no workloads",
                    path.display()
                );
                return;
            }
        };
        for s in saved {
            let label = format!("{}/{}", s.namespace, s.name);
            if netns::path_id(&s.netns) != Some(s.id) {
                info!(
                    "dropped {label}: its network namespace {} is gone",
                    s.netns.display()
                );
                continue;
            }
            let req = EnrollRequest {
                netns: s.netns,
                namespace: s.namespace,
                name: s.name,
                uid: s.uid,
                container_id: s.container_id,
                nameservers: s.nameservers,
            };
            if let Err(e) = self.enroll(maps, policies, req) {
                warn!("could not enrol {label} again: {e:#}");
            }
        }
        self.save();
    }
}

/// Remove the IPv6 DNS stub route (`netns::stub_route`) from the namespaces the state file at
/// `path` lists that are still there: what `egress uninstall` does for the pods. Returns the
/// workloads it was removed from.
pub fn remove_stub_routes(path: &std::path::Path) -> Vec<String> {
    let Ok(text) = std::fs::read(path) else {
        return Vec::new();
    };
    let saved: Vec<Saved> = serde_json::from_slice(&text).unwrap_or_default();
    if let Err(e) = netns::init_home() {
        warn!("{e:#}");
        return Vec::new();
    }
    saved
        .into_iter()
        .filter(|s| netns::path_id(&s.netns) == Some(s.id))
        .filter_map(|s| {
            let ns = NetNs::open(&s.netns).ok()?;
            let removed = ns.run(|| netns::stub_route(netns::Route::Remove)).ok()?;
            removed
                .is_ok_and(|r| r)
                .then(|| format!("{}/{}", s.namespace, s.name))
        })
        .collect()
}

/// The `WORKLOADS` value for a workload with `nameservers` in `DNS_RESOLVERS`.
fn kernel_entry(
    slot: u32,
    p: Policy,
    (cgroup_id, cgroup_level): (u64, u32),
    (own_v4, own_v6): Own,
    nameservers: usize,
) -> egress_common::Workload {
    egress_common::Workload {
        slot,
        view: p.view,
        mode: p.mode,
        nameservers: u8::try_from(nameservers).unwrap_or(u8::MAX),
        cgroup_id,
        cgroup_level,
        _pad2: 0,
        own_v4,
        own_v6,
    }
}

/// Addresses separated by commas, or `-` for none.
fn list_or_dash(v: &[IpAddr]) -> String {
    if v.is_empty() {
        return "-".to_owned();
    }
    v.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A listening socket with the agent's backlog. Not shared: a new agent takes it over
/// (`handover`) rather than binding beside it.
fn listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    crate::datapath::sys::tcp_listener(addr, false, crate::proxy::LISTEN_BACKLOG as i32)
}

/// Listeners on 127.0.0.1 and [::1] port `port`. A pod's namespace without IPv6 has no IPv6
/// connections to redirect either.
fn loopback_listeners(port: u16, in_pod: bool) -> Result<Vec<std::net::TcpListener>> {
    let mut out = vec![
        listener(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .with_context(|| format!("listening on 127.0.0.1:{port}"))?,
    ];
    match listener(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
        Ok(l) => out.push(l),
        Err(e) if in_pod && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
        Err(e) if in_pod && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
        Err(e) => return Err(e).with_context(|| format!("listening on [::1]:{port}")),
    }
    Ok(out)
}

/// Kubernetes names: DNS labels (RFC 1123), which keeps them safe in logs and lines.
fn check_name(what: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !ok {
        bail!("{what} {v:?} is not a Kubernetes name (lower-case letters, digits, '-', '.')");
    }
    Ok(())
}

/// The agent's identity for its own namespace from `--workload NAMESPACE/NAME`.
pub fn parse_label(s: &str) -> Result<(String, String)> {
    let (ns, name) = s
        .split_once('/')
        .with_context(|| format!("{s:?}: expected NAMESPACE/NAME"))?;
    check_name("namespace", ns)?;
    check_name("name", name)?;
    Ok((ns.to_owned(), name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_are_kubernetes_names() {
        assert_eq!(
            parse_label("team-a/web-0").unwrap(),
            ("team-a".to_owned(), "web-0".to_owned())
        );
        for bad in ["web-0", "Team/web", "a/", "/b", "a/b c", "a/b\nc"] {
            let e = parse_label(bad).unwrap_err().to_string();
            assert!(
                e.contains("is not a Kubernetes name") || e.contains("expected NAMESPACE/NAME"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn nameservers_are_kept_and_earlier_state_and_handovers_have_none() {
        let old = r#"{"netns": "/var/run/netns/a", "id": [1, 2], "namespace": "n", "name": "p"}"#;
        let s: Saved = serde_json::from_str(old).unwrap();
        assert!(s.nameservers.is_empty());
        let s = Saved {
            nameservers: vec![
                "10.96.0.10".parse().unwrap(),
                "2001:db8::53".parse().unwrap(),
            ],
            ..s
        };
        let back: Saved = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back.nameservers, s.nameservers);
        let old = r#"{"netns": null, "id": null, "namespace": "n", "name": "p", "uid": "",
                      "containerId": null, "listeners": 2}"#;
        let h: handover::Handed = serde_json::from_str(old).unwrap();
        assert!(h.nameservers.is_empty());
        let req: api::EnrollRequest = serde_json::from_str(
            r#"{"netns": "/x", "namespace": "n", "name": "p", "nameservers": ["10.96.0.10"]}"#,
        )
        .unwrap();
        assert_eq!(req.nameservers, vec![IpAddr::from([10, 96, 0, 10])]);
        let e = serde_json::from_str::<api::EnrollRequest>(
            r#"{"netns": "/x", "namespace": "n", "name": "p", "nameservers": ["dns.example"]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("invalid IP address syntax"), "{e}");
    }

    #[test]
    fn at_most_eight_nameservers_each_once() {
        let given: Vec<IpAddr> = (1..=10u8)
            .chain([1, 2])
            .map(|i| IpAddr::from([198, 18, 0, i]))
            .collect();
        let kept = Workloads::capped("n/p", given);
        assert_eq!(kept.len(), egress_common::MAX_WORKLOAD_NAMESERVERS as usize);
        assert_eq!(kept[0], IpAddr::from([198, 18, 0, 1]));
        assert_eq!(kept[7], IpAddr::from([198, 18, 0, 8]));
        let twice = vec![IpAddr::from([198, 18, 0, 1]); 2];
        assert_eq!(Workloads::capped("n/p", twice).len(), 1);
    }

    #[test]
    fn requests_with_unknown_fields_are_refused() {
        let ok: api::EnrollRequest =
            serde_json::from_str(r#"{"netns": "/var/run/netns/a", "namespace": "n", "name": "p"}"#)
                .unwrap();
        assert_eq!((ok.uid.as_str(), ok.container_id), ("", None));
        let e = serde_json::from_str::<api::Selector>(r#"{"containerID": "x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `containerID`"), "{e}");
    }
}
