//! Configuration → datapath plan: exactly the entries the maps must hold. Pure and
//! deterministic; `Plan` also answers the decision's lookups in memory, so `egress explain
//! --config` decides without a kernel.
//!
//! Workloads of different Kubernetes namespaces may see different ServiceEntries
//! (`exportTo`) and modes (a namespace's Sidecar). Each distinct set of visible entries is a
//! *view*: the allow and direct entries are keyed by view, and each namespace's `Policy` names
//! its view and mode. View 0 is what a namespace the configuration does not name sees.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use egress_common::{
    MODE_ALLOW_ANY, MODE_REGISTRY_ONLY, PORT_EXCLUDE, PORT_INCLUDE, Tables, VIEW_UDP,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::{MeshConfig, Mode, ServiceEntry};

/// (view, port, network) triples, as the allow and direct tries key them.
pub type PortNets<N> = BTreeSet<(u16, u16, N)>;

/// (port, network) pairs of one view.
type PortNets1<N> = BTreeSet<(u16, N)>;

/// What a workload's namespace gets: which entries it sees, and its mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub view: u16,
    /// `MODE_ALLOW_ANY` or `MODE_REGISTRY_ONLY`.
    pub mode: u8,
}

/// Every namespace's policy: those the configuration names, and the default for the others
/// (view 0, the mesh-wide mode or the root namespace's Sidecar's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    pub default: Policy,
    pub namespaces: BTreeMap<String, Policy>,
}

impl Policies {
    pub fn of(&self, namespace: &str) -> Policy {
        self.namespaces
            .get(namespace)
            .copied()
            .unwrap_or(self.default)
    }

    /// How many views the allow and direct entries are keyed by.
    pub fn views(&self) -> usize {
        self.namespaces
            .values()
            .map(|p| usize::from(p.view) + 1)
            .max()
            .unwrap_or(1)
    }
}

/// `ALLOW_ANY` or `REGISTRY_ONLY`, for logs.
pub fn mode_name(mode: u8) -> &'static str {
    if mode == MODE_REGISTRY_ONLY {
        "REGISTRY_ONLY"
    } else {
        "ALLOW_ANY"
    }
}

fn mode_code(m: Mode) -> u8 {
    match m {
        Mode::AllowAny => MODE_ALLOW_ANY,
        Mode::RegistryOnly => MODE_REGISTRY_ONLY,
    }
}

/// Who sees a ServiceEntry (`exportTo`): every namespace, or those named (`.` is its own;
/// `~` alone, none).
pub fn exported_to(se: &ServiceEntry) -> Option<BTreeSet<String>> {
    let e = &se.spec.export_to;
    if e.is_empty() || e.iter().any(|n| n == "*") {
        return None;
    }
    Some(
        e.iter()
            .filter(|n| *n != "~")
            .map(|n| {
                if n == "." {
                    se.namespace.clone()
                } else {
                    n.clone()
                }
            })
            .collect(),
    )
}

/// The views: for each, the indices of the ServiceEntries it sees (view 0: those exported
/// to every namespace); and each namespace the configuration names, with its view.
pub fn views(c: &MeshConfig) -> (Vec<Vec<usize>>, BTreeMap<String, u16>) {
    let exports: Vec<Option<BTreeSet<String>>> =
        c.service_entries.iter().map(exported_to).collect();
    let mut named: BTreeSet<String> = exports.iter().flatten().flatten().cloned().collect();
    named.extend(c.sidecars.iter().map(|s| s.namespace.clone()));
    let sees = |ns: Option<&str>| -> Vec<usize> {
        exports
            .iter()
            .enumerate()
            .filter(|(_, e)| match (e, ns) {
                (None, _) => true,
                (Some(set), Some(ns)) => set.contains(ns),
                (Some(_), None) => false,
            })
            .map(|(i, _)| i)
            .collect()
    };
    let mut views = vec![sees(None)];
    let mut of = BTreeMap::new();
    for ns in named {
        let v = sees(Some(&ns));
        let id = match views.iter().position(|x| *x == v) {
            Some(i) => i,
            None => {
                views.push(v);
                views.len() - 1
            }
        };
        of.insert(ns, id as u16);
    }
    (views, of)
}

/// The policy of each namespace the configuration names (with its view from `views`), and the
/// default.
pub fn policies(c: &MeshConfig, view_of: &BTreeMap<String, u16>) -> Policies {
    // A Sidecar without a workload selector sets its namespace's mode; the root namespace's
    // sets every other namespace's.
    let mode_of = |ns: &str| {
        c.sidecars
            .iter()
            .filter(|s| s.namespace == ns && s.spec.workload_selector.is_none())
            .find_map(|s| s.spec.outbound_traffic_policy.as_ref().map(|p| p.mode))
    };
    let default_mode = mode_of(c.root_namespace()).unwrap_or(c.mode);
    Policies {
        default: Policy {
            view: 0,
            mode: mode_code(default_mode),
        },
        namespaces: view_of
            .iter()
            .map(|(ns, view)| {
                let mode = mode_of(ns).unwrap_or(default_mode);
                (
                    ns.clone(),
                    Policy {
                        view: *view,
                        mode: mode_code(mode),
                    },
                )
            })
            .collect(),
    }
}

/// What the maps hold. `Plan::default()` is empty maps in ALLOW_ANY mode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub policies: Policies,
    pub include_v4: BTreeSet<Ipv4Net>,
    pub include_v6: BTreeSet<Ipv6Net>,
    pub exclude_v4: BTreeSet<Ipv4Net>,
    pub exclude_v6: BTreeSet<Ipv6Net>,
    pub ports: BTreeMap<u16, u8>,
    pub exclude_uids: BTreeSet<u32>,
    pub exclude_gids: BTreeSet<u32>,
    /// (view, port, network) triples that ServiceEntry addresses allow under REGISTRY_ONLY.
    pub allow_v4: PortNets<Ipv4Net>,
    pub allow_v6: PortNets<Ipv6Net>,
    /// (view, port, network) triples whose connections go straight out (`Verdict::Direct`):
    /// declared only by TCP entries that relay to the dialled address (see `direct`).
    pub direct_v4: PortNets<Ipv4Net>,
    pub direct_v6: PortNets<Ipv6Net>,
    /// Kubernetes Service address (cluster IP, port) → its ready endpoints, sorted. A connect
    /// to the former goes to one of the latter; none refuses it.
    pub services: BTreeMap<SocketAddr, Vec<SocketAddr>>,
}

fn split(nets: &[IpNet]) -> (BTreeSet<Ipv4Net>, BTreeSet<Ipv6Net>) {
    let mut v4 = BTreeSet::new();
    let mut v6 = BTreeSet::new();
    for n in nets {
        match n.trunc() {
            IpNet::V4(n) => v4.insert(n),
            IpNet::V6(n) => v6.insert(n),
        };
    }
    (v4, v6)
}

pub fn compile(c: &MeshConfig) -> Plan {
    let i = &c.interception;
    let (mut include_v4, mut include_v6) = split(&i.include_ranges);
    // Addresses allocated to ServiceEntries are the agent's to serve, whatever the included
    // ranges say (their exclusions still win).
    if c.service_entries.iter().any(|se| !se.allocated.is_empty()) {
        include_v4.insert(c.auto_allocate.v4);
        include_v6.insert(c.auto_allocate.v6);
    }
    let (exclude_v4, exclude_v6) = split(&i.exclude_ranges);
    let mut ports = BTreeMap::new();
    for p in &i.include_ports {
        *ports.entry(*p).or_insert(0) |= PORT_INCLUDE;
    }
    for p in &i.exclude_ports {
        *ports.entry(*p).or_insert(0) |= PORT_EXCLUDE;
    }
    let (views, view_of) = views(c);
    let udp_services = udp_services(c);
    let mut allow_v4 = BTreeSet::new();
    let mut allow_v6 = BTreeSet::new();
    let mut direct_v4 = BTreeSet::new();
    let mut direct_v6 = BTreeSet::new();
    for (view, seen) in views.iter().enumerate() {
        let view = view as u16;
        let entries = || seen.iter().map(|i| &c.service_entries[*i]);
        for se in entries() {
            // Learnt per workload from DNS answers instead (`DnsLearned`).
            let learned = if c.learn_from_dns {
                crate::registry::learned_ports(se)
            } else {
                Vec::new()
            };
            for spec_port in &se.spec.ports {
                let Ok(port) = u16::try_from(spec_port.number) else {
                    continue;
                };
                // UDP ports allow datagrams to the entry's addresses, in the view's UDP keys;
                // nothing matches a datagram by host.
                if crate::registry::is_udp(spec_port.protocol.as_deref()) {
                    for a in &se.addresses {
                        match a.trunc() {
                            IpNet::V4(n) => allow_v4.insert((view | VIEW_UDP, port, n)),
                            IpNet::V6(n) => allow_v6.insert((view | VIEW_UDP, port, n)),
                        };
                    }
                    continue;
                }
                // Entries without addresses are matched by Host or SNI in the agent: the kernel
                // lets every address on their ports through to it. Ports learnt from DNS let
                // through only the entry's allocated addresses (to the agent, which knows the
                // entry by them); the learnt ones go straight out.
                let any = [IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())];
                let allocated: Vec<IpNet> = se.allocated.iter().map(|a| IpNet::from(*a)).collect();
                let nets = if !se.addresses.is_empty() {
                    &se.addresses[..]
                } else if learned.contains(&port) {
                    &allocated[..]
                } else {
                    &any[..]
                };
                for a in nets {
                    match a.trunc() {
                        IpNet::V4(n) => allow_v4.insert((view, port, n)),
                        IpNet::V6(n) => allow_v6.insert((view, port, n)),
                    };
                }
            }
        }
        // Kubernetes Services' UDP ports: their cluster IPs (kube-proxy translates them after
        // the hook) and their ready endpoints, in every view.
        for (addr, port) in &udp_services {
            match IpNet::from(*addr) {
                IpNet::V4(n) => allow_v4.insert((view | VIEW_UDP, *port, n)),
                IpNet::V6(n) => allow_v6.insert((view | VIEW_UDP, *port, n)),
            };
        }
        let (d4, d6) = direct(entries());
        direct_v4.extend(d4.into_iter().map(|(p, n)| (view, p, n)));
        direct_v6.extend(d6.into_iter().map(|(p, n)| (view, p, n)));
        // ExternalName Services are matched by Host or SNI too, in every namespace.
        for port in c
            .services
            .iter()
            .filter(|s| s.external_name())
            .flat_map(|s| &s.spec.ports)
        {
            let Ok(p) = u16::try_from(port.port) else {
                continue;
            };
            if port.protocol.as_deref().unwrap_or("TCP") == "TCP" {
                allow_v4.insert((view, p, Ipv4Net::default()));
                allow_v6.insert((view, p, Ipv6Net::default()));
            }
        }
    }
    let mut services: BTreeMap<SocketAddr, Vec<SocketAddr>> = BTreeMap::new();
    for svc in c.services.iter().filter(|s| s.translated()) {
        let sets: Vec<_> = c
            .endpoints
            .iter()
            .filter(|e| e.namespace == svc.namespace && e.service == svc.name)
            .collect();
        let tcp = svc
            .spec
            .ports
            .iter()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP");
        for sp in tcp {
            let Ok(port) = u16::try_from(sp.port) else {
                continue;
            };
            let mut backends = Vec::new();
            for set in &sets {
                let Some(bport) = set.port_for(sp.name.as_deref(), svc.spec.ports.len()) else {
                    continue;
                };
                backends.extend(set.addresses.iter().map(|a| SocketAddr::new(*a, bport)));
            }
            for vip in &svc.cluster_ips {
                let mut same_family: Vec<SocketAddr> = backends
                    .iter()
                    .filter(|b| b.is_ipv4() == vip.is_ipv4())
                    .copied()
                    .collect();
                same_family.sort();
                same_family.dedup();
                services.insert(SocketAddr::new(*vip, port), same_family);
            }
        }
    }
    Plan {
        services,
        policies: policies(c, &view_of),
        include_v4,
        include_v6,
        exclude_v4,
        exclude_v6,
        ports,
        exclude_uids: i.exclude_uids.iter().copied().collect(),
        exclude_gids: i.exclude_gids.iter().copied().collect(),
        allow_v4,
        allow_v6,
        direct_v4,
        direct_v6,
    }
}

/// The (address, port) pairs of Kubernetes Services' UDP ports: cluster IPs and the ready
/// endpoints behind them.
fn udp_services(c: &MeshConfig) -> BTreeSet<(IpAddr, u16)> {
    let mut out = BTreeSet::new();
    for svc in c.services.iter().filter(|s| !s.external_name()) {
        let udp = svc
            .spec
            .ports
            .iter()
            .filter(|p| crate::registry::is_udp(p.protocol.as_deref()));
        for sp in udp {
            let Ok(port) = u16::try_from(sp.port) else {
                continue;
            };
            out.extend(svc.cluster_ips.iter().map(|a| (*a, port)));
            for set in c
                .endpoints
                .iter()
                .filter(|e| e.namespace == svc.namespace && e.service == svc.name)
            {
                if let Some(bport) = set.port_for(sp.name.as_deref(), svc.spec.ports.len()) {
                    out.extend(set.addresses.iter().map(|a| (*a, bport)));
                }
            }
        }
    }
    out
}

/// The (port, network) pairs the kernel can allow straight out: those whose every
/// connection the agent would relay, unchanged, to the address and port dialled. A pair of a
/// TCP entry with `resolution: NONE` (no target port) qualifies unless an entry that needs the
/// agent (HTTP or TLS, resolved, another port) declares the same port on an overlapping
/// network: the agent matches addresses entry by entry, the kernel by longest prefix, and
/// with no such overlap the two cannot disagree. Overlapping qualified pairs are all kept:
/// whichever matches, the connection goes to where it was dialled.
fn direct<'a>(
    entries: impl Iterator<Item = &'a ServiceEntry>,
) -> (PortNets1<Ipv4Net>, PortNets1<Ipv6Net>) {
    let mut relayed = Vec::new();
    let mut mediated = Vec::new();
    for se in entries.filter(|se| !se.addresses.is_empty()) {
        let direct_ports = crate::registry::relayed_ports(se);
        for port in se
            .spec
            .ports
            .iter()
            .filter(|p| !crate::registry::is_udp(p.protocol.as_deref()))
            .filter_map(|p| u16::try_from(p.number).ok())
        {
            let to = if direct_ports.contains(&port) {
                &mut relayed
            } else {
                &mut mediated
            };
            to.extend(se.addresses.iter().map(|a| (port, a.trunc())));
        }
    }
    let overlaps = |a: &IpNet, b: &IpNet| a.contains(&b.network()) || b.contains(&a.network());
    let (mut v4, mut v6) = (BTreeSet::new(), BTreeSet::new());
    for (port, net) in relayed {
        if mediated
            .iter()
            .any(|(p, n)| *p == port && overlaps(n, &net))
        {
            continue;
        }
        match net {
            IpNet::V4(n) => v4.insert((port, n)),
            IpNet::V6(n) => v6.insert((port, n)),
        };
    }
    (v4, v6)
}

/// One map entry, as the datapath plan sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Include4(Ipv4Net),
    Include6(Ipv6Net),
    Exclude4(Ipv4Net),
    Exclude6(Ipv6Net),
    Allow4(u16, u16, Ipv4Net),
    Allow6(u16, u16, Ipv6Net),
    Direct4(u16, u16, Ipv4Net),
    Direct6(u16, u16, Ipv6Net),
    /// A `PORT_INCLUDE` or `PORT_EXCLUDE` bit of a port.
    Port(u16, u8),
    Uid(u32),
    Gid(u32),
    /// A Service address and its whole endpoint set: adding it replaces the set in force.
    Service(SocketAddr, Vec<SocketAddr>),
}

/// One step of moving the maps from one plan to another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Add(Entry),
    Remove(Entry),
    /// Give every namespace its new policy (view and mode): enrolled workloads are pointed
    /// at it.
    Policies(Policies),
}

impl Plan {
    /// Every entry, grouped as `diff` orders them: first those that can only make more
    /// connections bypass (exclusions), then those that can only make more connections
    /// redirect or pass the registry (inclusions, allow entries).
    fn entries(&self) -> (Vec<Entry>, Vec<Entry>) {
        let mut widen_bypass = Vec::new();
        widen_bypass.extend(self.exclude_v4.iter().map(|n| Entry::Exclude4(*n)));
        widen_bypass.extend(self.exclude_v6.iter().map(|n| Entry::Exclude6(*n)));
        widen_bypass.extend(self.exclude_uids.iter().map(|u| Entry::Uid(*u)));
        widen_bypass.extend(self.exclude_gids.iter().map(|g| Entry::Gid(*g)));
        let mut widen_redirect = Vec::new();
        widen_redirect.extend(self.include_v4.iter().map(|n| Entry::Include4(*n)));
        widen_redirect.extend(self.include_v6.iter().map(|n| Entry::Include6(*n)));
        widen_redirect.extend(
            self.allow_v4
                .iter()
                .map(|(v, p, n)| Entry::Allow4(*v, *p, *n)),
        );
        widen_redirect.extend(
            self.allow_v6
                .iter()
                .map(|(v, p, n)| Entry::Allow6(*v, *p, *n)),
        );
        widen_redirect.extend(
            self.direct_v4
                .iter()
                .map(|(v, p, n)| Entry::Direct4(*v, *p, *n)),
        );
        widen_redirect.extend(
            self.direct_v6
                .iter()
                .map(|(v, p, n)| Entry::Direct6(*v, *p, *n)),
        );
        widen_redirect.extend(
            self.services
                .iter()
                .map(|(vip, b)| Entry::Service(*vip, b.clone())),
        );
        for (port, flags) in &self.ports {
            if flags & PORT_EXCLUDE != 0 {
                widen_bypass.push(Entry::Port(*port, PORT_EXCLUDE));
            }
            if flags & PORT_INCLUDE != 0 {
                widen_redirect.push(Entry::Port(*port, PORT_INCLUDE));
            }
        }
        (widen_bypass, widen_redirect)
    }

    fn contains(&self, e: &Entry) -> bool {
        match e {
            Entry::Include4(n) => self.include_v4.contains(n),
            Entry::Include6(n) => self.include_v6.contains(n),
            Entry::Exclude4(n) => self.exclude_v4.contains(n),
            Entry::Exclude6(n) => self.exclude_v6.contains(n),
            Entry::Allow4(v, p, n) => self.allow_v4.contains(&(*v, *p, *n)),
            Entry::Allow6(v, p, n) => self.allow_v6.contains(&(*v, *p, *n)),
            Entry::Direct4(v, p, n) => self.direct_v4.contains(&(*v, *p, *n)),
            Entry::Direct6(v, p, n) => self.direct_v6.contains(&(*v, *p, *n)),
            Entry::Port(p, bit) => self.ports.get(p).is_some_and(|f| f & bit != 0),
            Entry::Uid(u) => self.exclude_uids.contains(u),
            Entry::Gid(g) => self.exclude_gids.contains(g),
            Entry::Service(vip, b) => self.services.get(vip) == Some(b),
        }
    }

    /// Whether removing `e` is part of moving to this plan: not for a Service this plan keeps
    /// with other endpoints (adding those replaced the old set already).
    fn drops(&self, e: &Entry) -> bool {
        match e {
            Entry::Service(vip, _) => !self.services.contains_key(vip),
            e => !self.contains(e),
        }
    }

    /// Apply one step to this in-memory copy, exactly as `Maps::apply` does to the maps.
    pub fn apply(&mut self, op: &Op) {
        fn set<T: Ord + Copy>(s: &mut BTreeSet<T>, v: T, add: bool) {
            if add {
                s.insert(v);
            } else {
                s.remove(&v);
            }
        }
        let (e, add) = match op {
            Op::Policies(p) => {
                self.policies = p.clone();
                return;
            }
            Op::Add(e) => (e, true),
            Op::Remove(e) => (e, false),
        };
        match e.clone() {
            Entry::Service(vip, b) => {
                if add {
                    self.services.insert(vip, b);
                } else {
                    self.services.remove(&vip);
                }
            }
            Entry::Include4(n) => set(&mut self.include_v4, n, add),
            Entry::Include6(n) => set(&mut self.include_v6, n, add),
            Entry::Exclude4(n) => set(&mut self.exclude_v4, n, add),
            Entry::Exclude6(n) => set(&mut self.exclude_v6, n, add),
            Entry::Allow4(v, p, n) => set(&mut self.allow_v4, (v, p, n), add),
            Entry::Allow6(v, p, n) => set(&mut self.allow_v6, (v, p, n), add),
            Entry::Direct4(v, p, n) => set(&mut self.direct_v4, (v, p, n), add),
            Entry::Direct6(v, p, n) => set(&mut self.direct_v6, (v, p, n), add),
            Entry::Uid(u) => set(&mut self.exclude_uids, u, add),
            Entry::Gid(g) => set(&mut self.exclude_gids, g, add),
            Entry::Port(p, bit) => {
                let f = self.ports.entry(p).or_insert(0);
                *f = if add { *f | bit } else { *f & !bit };
                if *f == 0 {
                    self.ports.remove(&p);
                }
            }
        }
    }
}

/// The steps that move maps holding `old` to `new`, entry by entry, ordered so that no
/// intermediate state gives a connection a verdict that `old` and `new` agree it must not have:
///
/// 1. add new exclusions: they only bypass more, and nothing both plans redirect is excluded
///    by either;
/// 2. add new inclusions and allow entries: they only redirect or allow more, and whatever both
///    plans bypass stays excluded (by the old or the new exclusions, both present) or stays
///    outside every inclusion; a Service's new endpoint set replaces the old one in one write;
///    direct entries too: what both plans send direct stays covered by one, and what both
///    redirect or deny is covered by none in either plan, so by none in between;
/// 3. switch the policies (each namespace's view and mode), once the allow and direct entries
///    of the new plan are in place, for every view;
/// 4. remove old inclusions, allow and direct entries;
/// 5. remove old exclusions.
pub fn diff(old: &Plan, new: &Plan) -> Vec<Op> {
    let (old_bypass, old_redirect) = old.entries();
    let (new_bypass, new_redirect) = new.entries();
    let mut ops = Vec::new();
    let added = |e: &&Entry| !old.contains(e);
    ops.extend(new_bypass.iter().filter(added).map(|e| Op::Add(e.clone())));
    ops.extend(
        new_redirect
            .iter()
            .filter(added)
            .map(|e| Op::Add(e.clone())),
    );
    if old.policies != new.policies {
        ops.push(Op::Policies(new.policies.clone()));
    }
    let dropped = |e: &&Entry| new.drops(e);
    ops.extend(
        old_redirect
            .iter()
            .filter(dropped)
            .map(|e| Op::Remove(e.clone())),
    );
    ops.extend(
        old_bypass
            .iter()
            .filter(dropped)
            .map(|e| Op::Remove(e.clone())),
    );
    ops
}

fn lpm<'a, N: 'a + Copy>(
    nets: impl Iterator<Item = &'a N>,
    contains: impl Fn(&N) -> bool,
    len: impl Fn(&N) -> u8,
) -> Option<u8> {
    nets.filter(|n| contains(n)).map(len).max()
}

/// Longest prefix among the (view, port, network) triples of `view` and `port` that hold `a`.
fn port_lpm<N: Copy + Into<IpNet>>(
    set: &PortNets<N>,
    view: u16,
    port: u16,
    a: IpAddr,
) -> Option<u8> {
    let net = |n: &N| -> IpNet { (*n).into() };
    lpm(
        set.iter(),
        |(v, p, n)| *v == view && *p == port && net(n).contains(&a),
        |(_, _, n)| net(n).prefix_len(),
    )
}

impl Tables for Plan {
    /// A plan has no caller: `explain` asks for a caller in the workload's cgroup.
    fn in_cgroup(&self, _id: u64, _level: u32) -> bool {
        true
    }
    fn uid_excluded(&self, uid: u32) -> bool {
        self.exclude_uids.contains(&uid)
    }
    fn gid_excluded(&self, gid: u32) -> bool {
        self.exclude_gids.contains(&gid)
    }
    fn port_flags(&self, port: u16) -> u8 {
        self.ports.get(&port).copied().unwrap_or(0)
    }
    fn include_v4(&self, a: [u8; 4]) -> Option<u8> {
        let a = Ipv4Addr::from(a);
        lpm(
            self.include_v4.iter(),
            |n| n.contains(&a),
            |n| n.prefix_len(),
        )
    }
    fn exclude_v4(&self, a: [u8; 4]) -> Option<u8> {
        let a = Ipv4Addr::from(a);
        lpm(
            self.exclude_v4.iter(),
            |n| n.contains(&a),
            |n| n.prefix_len(),
        )
    }
    fn allow_v4(&self, view: u16, a: [u8; 4], port: u16) -> Option<u8> {
        port_lpm(&self.allow_v4, view, port, Ipv4Addr::from(a).into())
    }
    fn direct_v4(&self, view: u16, a: [u8; 4], port: u16) -> Option<u8> {
        port_lpm(&self.direct_v4, view, port, Ipv4Addr::from(a).into())
    }
    fn include_v6(&self, a: [u8; 16]) -> Option<u8> {
        let a = Ipv6Addr::from(a);
        lpm(
            self.include_v6.iter(),
            |n| n.contains(&a),
            |n| n.prefix_len(),
        )
    }
    fn exclude_v6(&self, a: [u8; 16]) -> Option<u8> {
        let a = Ipv6Addr::from(a);
        lpm(
            self.exclude_v6.iter(),
            |n| n.contains(&a),
            |n| n.prefix_len(),
        )
    }
    fn allow_v6(&self, view: u16, a: [u8; 16], port: u16) -> Option<u8> {
        port_lpm(&self.allow_v6, view, port, Ipv6Addr::from(a).into())
    }
    fn direct_v6(&self, view: u16, a: [u8; 16], port: u16) -> Option<u8> {
        port_lpm(&self.direct_v6, view, port, Ipv6Addr::from(a).into())
    }
    /// A plan holds no enrolments, so no workload's nameservers.
    fn nameserver(&self, _netns: u64, _addr: [u8; 16]) -> bool {
        false
    }
}

/// The network of `addr` with `prefix_len` bits, for saying which CIDR matched.
pub fn network(addr: IpAddr, prefix_len: u8) -> IpNet {
    IpNet::new(addr, prefix_len)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| IpNet::from(addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use egress_common::{Config, Query, Reason, Verdict, Workload, decide};

    /// The datapath's settings in these tests: the agent is cgroup 0, callers are not.
    fn test_config() -> Config {
        Config {
            enabled: 1,
            listener_port: 15001,
            direct: 1,
            ..Config::default()
        }
    }

    /// The enrolment of a workload of Kubernetes namespace `ns` under `p`.
    fn workload(p: &Plan, ns: &str) -> Workload {
        let pol = p.policies.of(ns);
        Workload {
            view: pol.view,
            mode: pol.mode,
            ..Workload::default()
        }
    }

    #[test]
    fn compiles_the_seed_configuration() {
        let l = config::parse_str(
            "m.yaml",
            r#"
apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: d}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  interception:
    includeOutboundIPRanges: "127.20.0.0/16,2001:db8::/32"
    excludeOutboundIPRanges: "127.20.9.7/24"
    includeOutboundPorts: [8443]
    excludeOutboundPorts: [22, 8443]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: tcp-ext, namespace: ns}
spec:
  hosts: [tcp.example]
  addresses: [127.20.1.0/24, "2001:db8::5"]
  ports: [{number: 443, name: tls, protocol: TLS}, {number: 8443, name: alt, protocol: TCP}]
"#,
        )
        .expect("valid");
        let p = compile(&l.config);
        assert_eq!(p.policies.default.mode, MODE_REGISTRY_ONLY);
        assert_eq!(
            p.include_v4,
            BTreeSet::from(["127.20.0.0/16".parse().unwrap()])
        );
        assert_eq!(
            p.include_v6,
            BTreeSet::from(["2001:db8::/32".parse().unwrap()])
        );
        // Host bits are cleared.
        assert_eq!(
            p.exclude_v4,
            BTreeSet::from(["127.20.9.0/24".parse().unwrap()])
        );
        assert_eq!(
            p.ports,
            BTreeMap::from([(22, PORT_EXCLUDE), (8443, PORT_INCLUDE | PORT_EXCLUDE)])
        );
        assert_eq!(
            p.allow_v4,
            BTreeSet::from([
                (0, 443, "127.20.1.0/24".parse().unwrap()),
                (0, 8443, "127.20.1.0/24".parse().unwrap())
            ])
        );
        assert_eq!(
            p.allow_v6,
            BTreeSet::from([
                (0, 443, "2001:db8::5/128".parse().unwrap()),
                (0, 8443, "2001:db8::5/128".parse().unwrap())
            ])
        );
        assert_eq!(compile(&l.config), p, "deterministic");
        // The TCP port of an entry by address goes straight out; its TLS port is the agent's.
        assert_eq!(
            p.direct_v4,
            BTreeSet::from([(0, 8443, "127.20.1.0/24".parse().unwrap())])
        );
        assert_eq!(
            p.direct_v6,
            BTreeSet::from([(0, 8443, "2001:db8::5/128".parse().unwrap())])
        );

        let cfg = test_config();
        let wl = workload(&p, "ns");
        let q = |dst: [u8; 4], port| Query {
            dst,
            port,
            uid: 0,
            gid: 0,
            cgroup: 1,
            service: false,
            udp: false,
            netns: 0,
        };
        let d = decide(&p, &cfg, Some(&wl), &q([127, 20, 1, 9], 443));
        assert_eq!(
            (d.verdict, d.reason, d.prefix_len),
            (Verdict::Redirect, Reason::RegistryAllowed, 24)
        );
        let d = decide(&p, &cfg, Some(&wl), &q([127, 20, 2, 9], 443));
        assert_eq!(
            (d.verdict, d.reason),
            (Verdict::Deny, Reason::RegistryDenied)
        );
        let d = decide(&p, &cfg, Some(&wl), &q([127, 20, 9, 1], 443));
        assert_eq!(
            (d.verdict, d.reason, d.prefix_len),
            (Verdict::Bypass, Reason::ExcludedCidr, 24)
        );
    }

    #[test]
    fn udp_ports_allow_datagrams_in_the_views_udp_keys_only() {
        let l = config::parse_str(
            "m.yaml",
            r#"
apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: d}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: quic, namespace: ns}
spec:
  hosts: [quic.example]
  addresses: [127.20.1.0/24]
  ports: [{number: 443, name: https, protocol: HTTPS}, {number: 8443, name: tcp, protocol: TCP}]
---
# QUIC beside HTTPS on one port number: Istio takes a port number once per entry.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: quic-udp, namespace: ns}
spec:
  hosts: [quic.example]
  addresses: [127.20.1.0/24]
  ports: [{number: 443, name: quic, protocol: UDP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: by-host, namespace: ns}
spec:
  hosts: [udp.example]
  ports: [{number: 5353, name: udp, protocol: UDP}]
  resolution: DNS
---
apiVersion: v1
kind: Service
metadata: {name: statsd, namespace: ns}
spec:
  clusterIP: 127.30.0.10
  ports: [{name: metrics, port: 8125, protocol: UDP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: statsd, namespace: ns}
subsets:
- addresses: [{ip: 127.30.1.5}]
  ports: [{name: metrics, port: 9125, protocol: UDP}]
"#,
        )
        .expect("valid");
        let p = compile(&l.config);
        let net = |s: &str| -> Ipv4Net { s.parse().unwrap() };
        assert_eq!(
            p.allow_v4,
            BTreeSet::from([
                (0, 443, net("127.20.1.0/24")),
                (0, 8443, net("127.20.1.0/24")),
                // The entry's UDP port, for datagrams only; the entry by host, none: nothing
                // matches a datagram by name.
                (VIEW_UDP, 443, net("127.20.1.0/24")),
                // The Service's UDP port: its cluster IP, and its endpoint's port.
                (VIEW_UDP, 8125, net("127.30.0.10/32")),
                (VIEW_UDP, 9125, net("127.30.1.5/32")),
            ])
        );
        // The TCP port still goes straight out: the UDP port on the same port number and
        // range needs nothing of the agent.
        assert_eq!(
            p.direct_v4,
            BTreeSet::from([(0, 8443, net("127.20.1.0/24"))])
        );
    }

    #[test]
    fn direct_only_where_no_entry_needing_the_agent_overlaps() {
        let se_with = |name: &str, addr: &str, port: &str, resolution: &str| {
            format!(
                "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\n\
                 spec: {{hosts: [{name}.example], addresses: [{addr}], ports: [{port}], \
                 resolution: {resolution}}}\n"
            )
        };
        let se = |name: &str, addr: &str, port: &str| se_with(name, addr, port, "NONE");
        let tcp = "{number: 5432, name: tcp, protocol: TCP}";
        let yaml = [
            se("db", "127.20.0.0/16", tcp),
            // Another range of the same port, inside the first, sent to endpoints: the agent's.
            se_with("resolved", "127.20.7.0/24", tcp, "STATIC"),
            // A target port: the agent connects elsewhere.
            se(
                "moved",
                "127.30.0.1",
                "{number: 5432, name: tcp, protocol: TCP, targetPort: 5433}",
            ),
            se("other", "127.40.0.0/24", tcp),
            // The same port named as HTTP on a range inside another TCP one.
            se(
                "mongo",
                "127.50.0.0/16",
                "{number: 27017, name: mongo, protocol: MONGO}",
            ),
            se(
                "web",
                "127.50.1.0/24",
                "{number: 27017, name: http, protocol: HTTP}",
            ),
        ]
        .concat();
        let l = config::parse_str("m.yaml", &yaml).expect("valid");
        let p = compile(&l.config);
        assert_eq!(
            p.direct_v4,
            BTreeSet::from([(0, 5432, "127.40.0.0/24".parse().unwrap())])
        );
    }

    /// The resources of the egress tasks, as their documentation gives them.
    const SEEDS: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin-ext
spec:
  hosts:
  - httpbin.org
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: google-ext
spec:
  hosts:
  - www.google.com
  ports:
  - number: 443
    name: https
    protocol: HTTPS
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: tcp-ext
spec:
  hosts:
  - tcp.example.com
  addresses:
  - 198.18.10.0/24
  ports:
  - number: 443
    name: tcp
    protocol: TCP
  location: MESH_EXTERNAL
  resolution: NONE
---
kind: Service
apiVersion: v1
metadata:
  name: my-httpbin
spec:
  type: ExternalName
  externalName: httpbin.org
  ports:
  - name: http
    protocol: TCP
    port: 80
---
kind: Service
apiVersion: v1
metadata:
  name: my-wikipedia
spec:
  ports:
  - protocol: TCP
    port: 443
    name: tls
---
kind: Endpoints
apiVersion: v1
metadata:
  name: my-wikipedia
subsets:
  - addresses:
      - ip: 198.35.26.96
      - ip: 208.80.153.224
    ports:
      - port: 443
        name: tls
"#;

    #[test]
    fn compiles_the_seed_resources() {
        let l = config::parse_str("seeds.yaml", SEEDS).expect("valid");
        let c = &l.config;
        assert_eq!(c.service_entries.len(), 3);
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.endpoints.len(), 1);
        let p = compile(&l.config);
        // The TCP entry is decided by address; the HTTP and HTTPS entries without addresses,
        // and my-httpbin's ExternalName on 80, open their ports to the agent, which matches
        // Host and SNI.
        assert_eq!(
            p.allow_v4,
            BTreeSet::from([
                (0, 80, "0.0.0.0/0".parse().unwrap()),
                (0, 443, "0.0.0.0/0".parse().unwrap()),
                (0, 443, "198.18.10.0/24".parse().unwrap())
            ])
        );
        assert_eq!(
            p.allow_v6,
            BTreeSet::from([
                (0, 80, "::/0".parse().unwrap()),
                (0, 443, "::/0".parse().unwrap())
            ])
        );
        // The cluster assigns my-wikipedia's cluster IP; without one there is nothing to
        // translate, and the warning says so.
        assert!(p.services.is_empty());
        let warnings: Vec<String> = l.warnings.iter().map(|w| w.to_string()).collect();
        let has = |s: &str| warnings.iter().any(|w| w.contains(s));
        assert!(
            has("doc 5 Service default/my-wikipedia: spec.clusterIP: no cluster IP"),
            "{warnings:?}"
        );
        assert!(!has("ServiceEntry"), "{warnings:?}");
        assert!(!has("my-httpbin"), "{warnings:?}");

        // With the address the cluster assigned, connects to it go to either endpoint.
        let assigned = SEEDS.replace(
            "spec:\n  ports:\n  - protocol: TCP",
            "spec:\n  clusterIP: 10.96.0.50\n  ports:\n  - protocol: TCP",
        );
        let p = compile(
            &config::parse_str("seeds.yaml", &assigned)
                .expect("valid")
                .config,
        );
        assert_eq!(
            p.services,
            BTreeMap::from([(
                "10.96.0.50:443".parse().unwrap(),
                vec![
                    "198.35.26.96:443".parse().unwrap(),
                    "208.80.153.224:443".parse().unwrap()
                ]
            )])
        );
    }

    #[test]
    fn default_configuration_captures_everything() {
        let p = compile(&MeshConfig::default());
        assert_eq!(p.include_v4, BTreeSet::from(["0.0.0.0/0".parse().unwrap()]));
        assert_eq!(p.include_v6, BTreeSet::from(["::/0".parse().unwrap()]));
        assert_eq!(p.policies.default.mode, MODE_ALLOW_ANY);
        assert_eq!(
            network("127.20.9.7".parse().unwrap(), 16).to_string(),
            "127.20.0.0/16"
        );
    }

    mod diff {
        use super::*;
        use crate::config::{Interception, ServiceEntry, ServiceEntrySpec, ServicePort, k8s};
        use egress_common::Verdict;
        use proptest::prelude::*;

        // A small universe, so that random rules overlap often.
        fn net4() -> impl Strategy<Value = IpNet> {
            (0u8..16, 28u8..=32)
                .prop_map(|(a, p)| IpNet::new([10, 0, 0, a].into(), p).unwrap().trunc())
        }
        fn net6() -> impl Strategy<Value = IpNet> {
            (0u8..16, 124u8..=128).prop_map(|(a, p)| {
                let mut o = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                o[15] = a;
                IpNet::new(o.into(), p).unwrap().trunc()
            })
        }
        fn nets() -> impl Strategy<Value = Vec<IpNet>> {
            prop::collection::vec(
                prop_oneof![4 => net4(), 1 => net6(), 1 => Just("0.0.0.0/0".parse().unwrap())],
                0..5,
            )
        }
        const PORTS: [u16; 3] = [80, 443, 8080];
        fn ports() -> impl Strategy<Value = Vec<u16>> {
            prop::collection::vec(prop::sample::select(&PORTS[..]), 0..3)
        }
        fn ids() -> impl Strategy<Value = Vec<u32>> {
            prop::collection::vec(prop::sample::select(&[0u32, 7][..]), 0..2)
        }
        fn entry() -> impl Strategy<Value = ServiceEntry> {
            (
                nets(),
                prop::collection::vec(prop::sample::select(&PORTS[..]), 1..3),
                prop::sample::select(&[None, Some("HTTP"), Some("TCP")][..]),
            )
                .prop_map(|(addresses, ports, protocol)| ServiceEntry {
                    namespace: "default".into(),
                    name: "se".into(),
                    spec: ServiceEntrySpec {
                        hosts: vec!["a.example".into()],
                        ports: ports
                            .iter()
                            .map(|p| ServicePort {
                                number: u32::from(*p),
                                name: None,
                                protocol: protocol.map(str::to_owned),
                                target_port: None,
                            })
                            .collect(),
                        ..Default::default()
                    },
                    addresses,
                    allocated: Vec::new(),
                })
        }
        fn config() -> impl Strategy<Value = MeshConfig> {
            (
                any::<bool>(),
                nets(),
                nets(),
                ports(),
                ports(),
                ids(),
                ids(),
                prop::collection::vec(entry(), 0..3),
                prop::collection::vec(service(), 0..3),
            )
                .prop_map(
                    |(ro, inc, exc, ip, ep, uids, gids, service_entries, services)| MeshConfig {
                        mode: if ro {
                            Mode::RegistryOnly
                        } else {
                            Mode::AllowAny
                        },
                        interception: Interception {
                            include_ranges: inc,
                            exclude_ranges: exc,
                            include_ports: ip,
                            exclude_ports: ep,
                            exclude_uids: uids,
                            exclude_gids: gids,
                        },
                        service_entries,
                        services: services.iter().map(|(s, _)| s.clone()).collect(),
                        endpoints: services.into_iter().map(|(_, e)| e).collect(),
                        ..Default::default()
                    },
                )
        }

        /// A selector-less Service on 10.0.1.x:80 with endpoints among 10.0.0.0/28.
        fn service() -> impl Strategy<Value = (k8s::Service, k8s::EndpointSet)> {
            (0u8..4, prop::collection::vec(0u8..16, 0..3)).prop_map(|(vip, eps)| {
                let name = format!("s{vip}");
                let svc = k8s::Service {
                    namespace: "default".into(),
                    name: name.clone(),
                    spec: k8s::ServiceSpec {
                        ports: vec![k8s::ServicePort {
                            name: None,
                            protocol: None,
                            port: 80,
                            target_port: None,
                            app_protocol: None,
                        }],
                        ..Default::default()
                    },
                    cluster_ips: vec![IpAddr::from([10, 0, 1, vip])],
                };
                let set = k8s::EndpointSet {
                    namespace: "default".into(),
                    service: name,
                    addresses: eps
                        .into_iter()
                        .map(|e| IpAddr::from([10, 0, 0, e]))
                        .collect(),
                    ports: vec![(None, 8080)],
                };
                (svc, set)
            })
        }

        /// The verdict of every connect the universe allows: each address, port and id.
        fn verdicts(p: &Plan) -> Vec<Verdict> {
            let cfg = test_config();
            let wl = workload(p, "default");
            let mut out = Vec::new();
            for a in 0u8..16 {
                for port in PORTS {
                    for (uid, gid) in [(0, 0), (7, 0), (0, 7)] {
                        let q4 = Query {
                            dst: [10, 0, 0, a],
                            port,
                            uid,
                            gid,
                            cgroup: 1,
                            service: false,
                            udp: false,
                            netns: 0,
                        };
                        out.push(decide(p, &cfg, Some(&wl), &q4).verdict);
                        let mut v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                        v6[15] = a;
                        let q6 = Query {
                            dst: v6,
                            port,
                            uid,
                            gid,
                            cgroup: 1,
                            service: false,
                            udp: false,
                            netns: 0,
                        };
                        out.push(decide(p, &cfg, Some(&wl), &q6).verdict);
                    }
                }
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn applying_the_diff_reaches_the_new_plan_and_never_breaks_what_both_agree_on(a in config(), b in config()) {
                let (pa, pb) = (compile(&a), compile(&b));
                let (va, vb) = (verdicts(&pa), verdicts(&pb));
                let mut live = pa.clone();
                for op in diff(&pa, &pb) {
                    live.apply(&op);
                    let v = verdicts(&live);
                    for i in 0..v.len() {
                        if va[i] == vb[i] {
                            prop_assert_eq!(v[i], va[i], "connect #{} after {:?}", i, op);
                        }
                    }
                    // A Service in both plans always has the old or the new endpoint set.
                    for (vip, old) in &pa.services {
                        if let Some(new) = pb.services.get(vip) {
                            let now = live.services.get(vip);
                            prop_assert!(now == Some(old) || now == Some(new), "{} after {:?}", vip, op);
                        }
                    }
                }
                prop_assert_eq!(&live, &pb);
                prop_assert!(diff(&pb, &pb).is_empty());
            }
        }
    }
}
