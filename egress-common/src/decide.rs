//! The connect-time decision, written once: the kernel programs call it with map lookups, the
//! unit tests with in-memory tables, and `egress explain` with the live maps.
//!
//! Order, after Istio's outbound chain: the agent itself, a namespace (or cgroup) that is not
//! enrolled, excluded uid/gid, excluded port, DNS (port 53, whatever the nameserver, loopback
//! ones included, as Istio's DNS capture with `--capture-all-dns`; under `RESOLV_CONF` only to
//! the workload's own nameservers, when it has any), the agent's listener, loopback, excluded CIDR
//! (longest prefix), included port, included CIDR, else bypass. A connection that would be
//! redirected to an address and port that only TCP ServiceEntries relaying to the dialled
//! address declare goes straight out, accounted in the kernel (`Direct`): the agent would only
//! have copied its bytes; so does one to an address and port the workload learnt from a DNS
//! answer for a host of a TCP ServiceEntry without addresses (`DnsLearned`). Among the other
//! redirected connections, `REGISTRY_ONLY` (the workload's mode) with no allowed L4 entry in
//! the workload's view for the address and port is denied.

use crate::maps::{
    Config, DNS_CAPTURE_ALL, DNS_PORT, MODE_REGISTRY_ONLY, PORT_EXCLUDE, PORT_INCLUDE, VIEW_UDP,
    Workload,
};

/// What happens to a connect().
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Leave it alone: it goes straight out.
    Bypass = 0,
    /// Send it to the agent's listener, remembering the original destination.
    Redirect = 1,
    /// Refuse it: connect() fails with EPERM.
    Deny = 2,
    /// Allowed by a TCP ServiceEntry: it goes straight out, and the kernel accounts for it
    /// (bytes, duration, outcome) and reports its close to the agent's access log.
    Direct = 3,
}

impl Verdict {
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Bypass => "bypass",
            Verdict::Redirect => "redirect",
            Verdict::Deny => "deny",
            Verdict::Direct => "direct",
        }
    }
}

/// Which rule decided. Counted per CPU in the kernel, indexed by the discriminant.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Made by the agent (its cgroup): its own upstream connection.
    Agent = 0,
    /// Made in a network namespace that is not enrolled (or, in the agent's own namespace on
    /// a node, outside the cgroup it intercepts there).
    NotEnrolled = 1,
    /// `excludeUids`.
    ExcludedUid = 2,
    /// `excludeGids`.
    ExcludedGid = 3,
    /// `excludeOutboundPorts`.
    ExcludedPort = 4,
    /// The destination is the agent's own listener.
    AgentListener = 5,
    /// `excludeOutboundIPRanges`.
    ExcludedCidr = 6,
    /// `includeOutboundPorts`.
    IncludedPort = 7,
    /// `includeOutboundIPRanges`.
    IncludedCidr = 8,
    /// Not in `includeOutboundIPRanges` nor `includeOutboundPorts`.
    NotIncluded = 9,
    /// Redirected under `REGISTRY_ONLY`, allowed by a ServiceEntry address and port.
    RegistryAllowed = 10,
    /// Redirected under `REGISTRY_ONLY`, but no ServiceEntry allows the address and port.
    RegistryDenied = 11,
    /// Redirected under `REGISTRY_ONLY`: dialled through a Kubernetes Service, which is in the
    /// registry.
    RegistryService = 12,
    /// Dialled a Kubernetes Service that has no endpoints: refused.
    ServiceNoEndpoints = 13,
    /// Would be redirected, but the address and port belong to TCP ServiceEntries with
    /// `resolution: NONE` only: nothing in the stream decides, so it goes straight out.
    TcpEntry = 14,
    /// To the workload's own loopback (127.0.0.0/8, ::1) and not named by an included range
    /// inside it; to 127.0.0.1, never captured; or to one of the workload's own addresses.
    /// As Istio's `-o lo -j RETURN`.
    Loopback = 15,
    /// Would be redirected, but no agent listens in the namespace (it is down or restarting)
    /// and `failureMode` is closed: the redirect stands, and connect() fails at once with
    /// ECONNREFUSED.
    AgentDown = 16,
    /// Would be redirected, but no agent listens and `failureMode` is open: it goes straight
    /// out, unmediated.
    AgentDownOpen = 17,
    /// A DNS query (UDP or TCP to port 53): sent to the agent's DNS sockets in the workload's
    /// namespace, which answer it or forward it to the nameserver the client asked.
    Dns = 18,
    /// A DNS query that would be captured, but no agent serves DNS in the namespace (or the
    /// kernel's nameserver table is full): it goes to the nameserver the client asked. DNS
    /// fails open, whatever `failureMode` says.
    DnsOpen = 19,
    /// To an address the workload learnt from a DNS answer for a host of a TCP ServiceEntry
    /// without addresses, on one of its ports, before the answer ran out: straight out, as a
    /// TCP entry by address.
    DnsLearned = 20,
    /// Not a connect: a bind() of the agent's outbound or DNS port by a workload in its
    /// namespace, refused (EPERM) so that nobody but the agent listens there.
    AgentPort = 21,
    /// Not a connect: the creation of a socket no other hook decides (raw, ICMP, SCTP) by
    /// a workload whose `spec.rawSockets` (or mode) refuses them, refused (EPERM).
    UndecidedSocket = 22,
}

/// Number of reason codes: the size of the counters map, and of a workload's counters.
pub const REASON_COUNT: u32 = 23;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::Agent,
        Reason::NotEnrolled,
        Reason::ExcludedUid,
        Reason::ExcludedGid,
        Reason::ExcludedPort,
        Reason::AgentListener,
        Reason::ExcludedCidr,
        Reason::IncludedPort,
        Reason::IncludedCidr,
        Reason::NotIncluded,
        Reason::RegistryAllowed,
        Reason::RegistryDenied,
        Reason::RegistryService,
        Reason::ServiceNoEndpoints,
        Reason::TcpEntry,
        Reason::Loopback,
        Reason::AgentDown,
        Reason::AgentDownOpen,
        Reason::Dns,
        Reason::DnsOpen,
        Reason::DnsLearned,
        Reason::AgentPort,
        Reason::UndecidedSocket,
    ];

    /// Stable name used in logs, metrics and `egress explain`.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Agent => "agent",
            Reason::NotEnrolled => "not-enrolled",
            Reason::ExcludedUid => "excluded-uid",
            Reason::ExcludedGid => "excluded-gid",
            Reason::ExcludedPort => "excluded-port",
            Reason::AgentListener => "agent-listener",
            Reason::ExcludedCidr => "excluded-cidr",
            Reason::IncludedPort => "included-port",
            Reason::IncludedCidr => "included-cidr",
            Reason::NotIncluded => "not-included",
            Reason::RegistryAllowed => "registry-allowed",
            Reason::RegistryDenied => "registry-denied",
            Reason::RegistryService => "registry-service",
            Reason::ServiceNoEndpoints => "service-no-endpoints",
            Reason::TcpEntry => "tcp-entry",
            Reason::Loopback => "loopback",
            Reason::AgentDown => "agent-down",
            Reason::AgentDownOpen => "agent-down-open",
            Reason::Dns => "dns",
            Reason::DnsOpen => "dns-open",
            Reason::DnsLearned => "dns-learned",
            Reason::AgentPort => "agent-port",
            Reason::UndecidedSocket => "undecided-socket",
        }
    }

    pub fn from_u32(v: u32) -> Option<Reason> {
        Reason::ALL.get(v as usize).copied()
    }
}

/// The outcome, with the prefix length of the CIDR that decided (for the CIDR reasons,
/// `RegistryAllowed` and `TcpEntry`; 0 otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    pub prefix_len: u8,
}

impl Decision {
    #[inline(always)]
    const fn new(verdict: Verdict, reason: Reason, prefix_len: u8) -> Self {
        Decision {
            verdict,
            reason,
            prefix_len,
        }
    }
}

/// One connect(), as the hook sees it.
#[derive(Clone, Copy, Debug)]
pub struct Query<A> {
    pub dst: A,
    /// Destination port, host order.
    pub port: u16,
    pub uid: u32,
    pub gid: u32,
    /// cgroup v2 id of the connecting task.
    pub cgroup: u64,
    /// Dialled through a Kubernetes Service (the destination is one of its endpoints): the
    /// registry knows it.
    pub service: bool,
    /// A UDP datagram (at connect or at sendmsg), not a TCP connect: allowed only by UDP
    /// entries (keys of the view `view | VIEW_UDP`), never direct (nothing relays it).
    pub udp: bool,
    /// The caller's network namespace cookie: which workload's nameservers
    /// (`Tables::nameserver`) a DNS query is checked against.
    pub netns: u64,
}

/// The lookups the decision needs. CIDR lookups are longest-prefix matches returning the
/// matched prefix length; allow and direct lookups are within one view (`Workload::view`).
pub trait Tables {
    /// Whether the connecting task is in cgroup `id` (at depth `level`) or below it.
    fn in_cgroup(&self, id: u64, level: u32) -> bool;
    fn uid_excluded(&self, uid: u32) -> bool;
    fn gid_excluded(&self, gid: u32) -> bool;
    /// `PORT_INCLUDE` and/or `PORT_EXCLUDE`, or 0.
    fn port_flags(&self, port: u16) -> u8;
    fn include_v4(&self, addr: [u8; 4]) -> Option<u8>;
    fn exclude_v4(&self, addr: [u8; 4]) -> Option<u8>;
    fn allow_v4(&self, view: u16, addr: [u8; 4], port: u16) -> Option<u8>;
    /// (port, address) ranges whose connections go straight out (`Verdict::Direct`).
    fn direct_v4(&self, view: u16, addr: [u8; 4], port: u16) -> Option<u8>;
    fn include_v6(&self, addr: [u8; 16]) -> Option<u8>;
    fn exclude_v6(&self, addr: [u8; 16]) -> Option<u8>;
    fn allow_v6(&self, view: u16, addr: [u8; 16], port: u16) -> Option<u8>;
    fn direct_v6(&self, view: u16, addr: [u8; 16], port: u16) -> Option<u8>;
    /// Whether the workload of namespace `netns` was enrolled with nameserver `addr`
    /// (IPv4-mapped for IPv4; `DNS_RESOLVERS`). Asked only for a DNS query under
    /// `DNS_CAPTURE_RESOLV_CONF` from a workload with nameservers.
    fn nameserver(&self, netns: u64, addr: [u8; 16]) -> bool;
}

/// An address family's part in the decision.
pub trait Addr: Copy {
    fn is_listener(&self, cfg: &Config) -> bool;
    fn include<T: Tables>(&self, t: &T) -> Option<u8>;
    fn exclude<T: Tables>(&self, t: &T) -> Option<u8>;
    fn allow<T: Tables>(&self, t: &T, view: u16, port: u16) -> Option<u8>;
    fn direct<T: Tables>(&self, t: &T, view: u16, port: u16) -> Option<u8>;
    /// The address as IPv6, IPv4 in mapped form.
    fn mapped(&self) -> [u8; 16];
    /// In the loopback range (127.0.0.0/8, ::1).
    fn is_loopback(&self) -> bool;
    /// One of the workload's own addresses.
    fn is_own(&self, wl: &Workload) -> bool;
    /// 127.0.0.1 itself, which is never captured.
    fn is_localhost(&self) -> bool;
    /// The shortest included prefix that names loopback explicitly (8 for 127.0.0.0/8, 128
    /// for ::1): a match at least this long is not just a catch-all range.
    const LOOPBACK_PREFIX: u8;
}

impl Addr for [u8; 4] {
    const LOOPBACK_PREFIX: u8 = 8;
    #[inline(always)]
    fn is_loopback(&self) -> bool {
        self[0] == 127
    }
    #[inline(always)]
    fn is_localhost(&self) -> bool {
        *self == [127, 0, 0, 1]
    }
    #[inline(always)]
    fn is_own(&self, wl: &Workload) -> bool {
        // Whole-word comparisons: a few instructions in the kernel.
        let (a, own) = (u32::from_ne_bytes(*self), wl.own_v4);
        a != 0 && (a == u32::from_ne_bytes(own[0]) || a == u32::from_ne_bytes(own[1]))
    }
    #[inline(always)]
    fn is_listener(&self, cfg: &Config) -> bool {
        *self == cfg.listener_v4
    }
    #[inline(always)]
    fn include<T: Tables>(&self, t: &T) -> Option<u8> {
        t.include_v4(*self)
    }
    #[inline(always)]
    fn exclude<T: Tables>(&self, t: &T) -> Option<u8> {
        t.exclude_v4(*self)
    }
    #[inline(always)]
    fn allow<T: Tables>(&self, t: &T, view: u16, port: u16) -> Option<u8> {
        t.allow_v4(view, *self, port)
    }
    #[inline(always)]
    fn direct<T: Tables>(&self, t: &T, view: u16, port: u16) -> Option<u8> {
        t.direct_v4(view, *self, port)
    }
    #[inline(always)]
    fn mapped(&self) -> [u8; 16] {
        crate::v4_mapped(*self)
    }
}

impl Addr for [u8; 16] {
    const LOOPBACK_PREFIX: u8 = 128;
    #[inline(always)]
    fn is_loopback(&self) -> bool {
        u128::from_be_bytes(*self) == 1
    }
    #[inline(always)]
    fn is_localhost(&self) -> bool {
        false
    }
    #[inline(always)]
    fn is_own(&self, wl: &Workload) -> bool {
        let (a, own) = (u128::from_ne_bytes(*self), wl.own_v6);
        a != 0 && (a == u128::from_ne_bytes(own[0]) || a == u128::from_ne_bytes(own[1]))
    }
    #[inline(always)]
    fn is_listener(&self, cfg: &Config) -> bool {
        *self == cfg.listener_v6
    }
    #[inline(always)]
    fn include<T: Tables>(&self, t: &T) -> Option<u8> {
        t.include_v6(*self)
    }
    #[inline(always)]
    fn exclude<T: Tables>(&self, t: &T) -> Option<u8> {
        t.exclude_v6(*self)
    }
    #[inline(always)]
    fn allow<T: Tables>(&self, t: &T, view: u16, port: u16) -> Option<u8> {
        t.allow_v6(view, *self, port)
    }
    #[inline(always)]
    fn direct<T: Tables>(&self, t: &T, view: u16, port: u16) -> Option<u8> {
        t.direct_v6(view, *self, port)
    }
    #[inline(always)]
    fn mapped(&self) -> [u8; 16] {
        *self
    }
}

/// Decide one connect() made in a namespace whose enrolment is `wl` (`None`: not enrolled).
/// IPv4-mapped IPv6 destinations must be passed as `[u8; 4]`, so that a v6 socket cannot evade
/// a v4 rule.
#[inline(always)]
pub fn decide<T: Tables, A: Addr>(
    t: &T,
    cfg: &Config,
    wl: Option<&Workload>,
    q: &Query<A>,
) -> Decision {
    use Reason::*;
    use Verdict::*;
    if cfg.enabled == 0 {
        return Decision::new(Bypass, NotIncluded, 0);
    }
    if q.cgroup == cfg.agent_cgroup
        || (cfg.agent_cgroup_prev != 0 && q.cgroup == cfg.agent_cgroup_prev)
    {
        return Decision::new(Bypass, Agent, 0);
    }
    let Some(wl) = wl else {
        return Decision::new(Bypass, NotEnrolled, 0);
    };
    if wl.cgroup_id != 0 && !t.in_cgroup(wl.cgroup_id, wl.cgroup_level) {
        return Decision::new(Bypass, NotEnrolled, 0);
    }
    if t.uid_excluded(q.uid) {
        return Decision::new(Bypass, ExcludedUid, 0);
    }
    if t.gid_excluded(q.gid) {
        return Decision::new(Bypass, ExcludedGid, 0);
    }
    let port_flags = t.port_flags(q.port);
    if port_flags & PORT_EXCLUDE != 0 {
        return Decision::new(Bypass, ExcludedPort, 0);
    }
    // Whatever the nameserver (a resolver on the workload's loopback, 127.0.0.53, too); under
    // `RESOLV_CONF` only the workload's own, unless none is known. A query to another one is
    // no capture: the rules below decide it as any other connection.
    if q.port == DNS_PORT
        && cfg.dns_port != 0
        && (cfg.dns_capture == DNS_CAPTURE_ALL
            || wl.nameservers == 0
            || t.nameserver(q.netns, q.dst.mapped()))
    {
        return Decision::new(Redirect, Dns, 0);
    }
    if q.port == cfg.listener_port && q.dst.is_listener(cfg) {
        return Decision::new(Bypass, AgentListener, 0);
    }
    // The workload's own loopback is its business (a local cache, a sidecar database), as
    // Istio's `-o lo -j RETURN`: only an included range inside loopback captures it, and
    // 127.0.0.1 never. Its own pod addresses are reached through loopback too.
    let loopback = q.dst.is_loopback();
    let mut included = None;
    if loopback {
        included = q.dst.include(t);
        if q.dst.is_localhost() || !matches!(included, Some(p) if p >= A::LOOPBACK_PREFIX) {
            return Decision::new(Bypass, Loopback, 0);
        }
    } else if q.dst.is_own(wl) {
        return Decision::new(Bypass, Loopback, 0);
    }
    if let Some(p) = q.dst.exclude(t) {
        return Decision::new(Bypass, ExcludedCidr, p);
    }
    if !loopback {
        included = q.dst.include(t);
    }
    let redirect = if port_flags & PORT_INCLUDE != 0 {
        Decision::new(Redirect, IncludedPort, 0)
    } else if let Some(p) = included {
        Decision::new(Redirect, IncludedCidr, p)
    } else {
        return Decision::new(Bypass, NotIncluded, 0);
    };
    if wl.mode == MODE_REGISTRY_ONLY && q.service {
        return Decision::new(Redirect, RegistryService, 0);
    }
    if cfg.direct != 0
        && !q.udp
        && let Some(p) = q.dst.direct(t, wl.view, q.port)
    {
        return Decision::new(Direct, TcpEntry, p);
    }
    if wl.mode == MODE_REGISTRY_ONLY {
        let view = if q.udp { wl.view | VIEW_UDP } else { wl.view };
        return match q.dst.allow(t, view, q.port) {
            Some(p) => Decision::new(Redirect, RegistryAllowed, p),
            None => Decision::new(Deny, RegistryDenied, 0),
        };
    }
    redirect
}

/// What a decision becomes when the workload learnt its destination (address and port) from a
/// DNS answer for a host of a TCP ServiceEntry without addresses: a connection the agent would
/// have taken (redirected by an included port or range, or denied under `REGISTRY_ONLY`) goes
/// straight out (`DnsLearned`), as one to a TCP entry by address; exclusions, DNS, Services
/// and TCP entries by address decided before. `learnt` (a map lookup) is asked only then.
/// Apart from `decide` so that the connect programs' stack, which `decide` fills, is not
/// outgrown.
#[inline(always)]
pub fn with_learned(cfg: &Config, d: Decision, learnt: impl FnOnce() -> bool) -> Decision {
    use Reason::*;
    let taken = matches!(
        d.reason,
        IncludedPort | IncludedCidr | RegistryAllowed | RegistryDenied
    );
    if cfg.direct != 0 && taken && learnt() {
        Decision::new(Verdict::Direct, DnsLearned, 0)
    } else {
        d
    }
}

/// What a redirect becomes when no agent listens in the caller's namespace (the kernel
/// looks its listener up): under `failureMode: closed` it stands, counted `AgentDown`, and the
/// connect() finds nobody at the listener's address (ECONNREFUSED, at once, without a packet
/// leaving the namespace); under `open` it goes straight out, counted `AgentDownOpen`. A DNS
/// query goes to its nameserver either way (`DnsOpen`): refusing name resolution would stop
/// every workload of the node while an agent restarts, and the connections that follow are
/// still decided. Any other decision is the maps' alone and holds whether the agent runs or
/// not.
#[inline(always)]
pub fn without_agent(cfg: &Config, d: Decision) -> Decision {
    if d.verdict != Verdict::Redirect {
        return d;
    }
    if d.reason == Reason::Dns {
        return Decision::new(Verdict::Bypass, Reason::DnsOpen, 0);
    }
    if cfg.failure_open != 0 {
        Decision::new(Verdict::Bypass, Reason::AgentDownOpen, 0)
    } else {
        Decision::new(Verdict::Redirect, Reason::AgentDown, 0)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::maps::MODE_ALLOW_ANY;
    use std::vec::Vec;

    /// In-memory tables: linear longest-prefix match over (address, prefix) lists.
    #[derive(Default)]
    struct Mem {
        uids: Vec<u32>,
        gids: Vec<u32>,
        ports: Vec<(u16, u8)>,
        include: Vec<([u8; 16], u8)>,
        exclude: Vec<([u8; 16], u8)>,
        /// (view, net, prefix, port)
        allow: Vec<(u16, [u8; 16], u8, u16)>,
        direct: Vec<(u16, [u8; 16], u8, u16)>,
        /// The cgroup the connecting task is in (or below).
        in_cgroup: u64,
        /// (namespace, nameserver), as `DNS_RESOLVERS`.
        nameservers: Vec<(u64, [u8; 16])>,
    }

    type PortNets = [(u16, [u8; 16], u8, u16)];

    fn lpm_port(list: &PortNets, view: u16, a: [u8; 16], port: u16) -> Option<u8> {
        list.iter()
            .filter(|(v, net, p, pt)| *v == view && *pt == port && matches(net, *p, &a))
            .map(|(_, _, p, _)| *p)
            .max()
    }

    fn lpm(list: &[([u8; 16], u8)], a: [u8; 16]) -> Option<u8> {
        list.iter()
            .filter(|(net, p)| matches(net, *p, &a))
            .map(|(_, p)| *p)
            .max()
    }

    fn matches(net: &[u8; 16], prefix: u8, a: &[u8; 16]) -> bool {
        let n = u128::from_be_bytes(*net);
        let x = u128::from_be_bytes(*a);
        let mask = if prefix == 0 {
            0
        } else {
            u128::MAX << (128 - prefix)
        };
        n & mask == x & mask
    }

    // IPv4 entries are stored mapped with prefix + 96 and reported without it.
    fn lpm4(list: &[([u8; 16], u8)], a: [u8; 4]) -> Option<u8> {
        lpm(list, crate::v4_mapped(a)).map(|p| p - 96)
    }

    impl Tables for Mem {
        fn in_cgroup(&self, id: u64, _level: u32) -> bool {
            self.in_cgroup == id
        }
        fn uid_excluded(&self, uid: u32) -> bool {
            self.uids.contains(&uid)
        }
        fn gid_excluded(&self, gid: u32) -> bool {
            self.gids.contains(&gid)
        }
        fn port_flags(&self, port: u16) -> u8 {
            self.ports
                .iter()
                .filter(|(p, _)| *p == port)
                .fold(0, |acc, (_, f)| acc | f)
        }
        fn include_v4(&self, a: [u8; 4]) -> Option<u8> {
            lpm4(&self.include, a)
        }
        fn exclude_v4(&self, a: [u8; 4]) -> Option<u8> {
            lpm4(&self.exclude, a)
        }
        fn allow_v4(&self, view: u16, a: [u8; 4], port: u16) -> Option<u8> {
            self.allow_v6(view, crate::v4_mapped(a), port)
                .map(|p| p - 96)
        }
        fn include_v6(&self, a: [u8; 16]) -> Option<u8> {
            lpm(&self.include, a)
        }
        fn exclude_v6(&self, a: [u8; 16]) -> Option<u8> {
            lpm(&self.exclude, a)
        }
        fn allow_v6(&self, view: u16, a: [u8; 16], port: u16) -> Option<u8> {
            lpm_port(&self.allow, view, a, port)
        }
        fn direct_v4(&self, view: u16, a: [u8; 4], port: u16) -> Option<u8> {
            self.direct_v6(view, crate::v4_mapped(a), port)
                .map(|p| p - 96)
        }
        fn direct_v6(&self, view: u16, a: [u8; 16], port: u16) -> Option<u8> {
            lpm_port(&self.direct, view, a, port)
        }
        fn nameserver(&self, netns: u64, a: [u8; 16]) -> bool {
            self.nameservers.contains(&(netns, a))
        }
    }

    fn v4(s: [u8; 4], p: u8) -> ([u8; 16], u8) {
        (crate::v4_mapped(s), p + 96)
    }

    const AGENT_CGROUP: u64 = 77;
    const POD_CGROUP: u64 = 4096;
    const POD_NETNS: u64 = 4097;

    fn cfg() -> Config {
        Config {
            agent_cgroup: AGENT_CGROUP,
            agent_netns: 1,
            listener_port: 15001,
            enabled: 1,
            direct: 1,
            listener_v4: [127, 0, 0, 1],
            listener_v6: core::net::Ipv6Addr::LOCALHOST.octets(),
            ..Config::default()
        }
    }

    fn wl(mode: u8) -> Workload {
        Workload {
            mode,
            ..Workload::default()
        }
    }

    fn q<A>(dst: A, port: u16) -> Query<A> {
        Query {
            dst,
            port,
            uid: 1000,
            gid: 1000,
            cgroup: POD_CGROUP,
            service: false,
            udp: false,
            netns: POD_NETNS,
        }
    }

    fn tables() -> Mem {
        Mem {
            uids: std::vec![4242],
            gids: std::vec![4343],
            ports: std::vec![
                (22, PORT_EXCLUDE),
                (8443, PORT_INCLUDE),
                (9000, PORT_INCLUDE | PORT_EXCLUDE)
            ],
            include: std::vec![v4([127, 20, 0, 0], 16), v4([0, 0, 0, 0], 0), ([0; 16], 0)],
            exclude: std::vec![v4([127, 20, 9, 0], 24), v4([127, 21, 0, 0], 16)],
            allow: std::vec![
                (0, crate::v4_mapped([127, 20, 1, 0]), 120, 443),
                (0, crate::v4_mapped([127, 20, 1, 0]), 120, 5432)
            ],
            direct: std::vec![(0, crate::v4_mapped([127, 20, 1, 0]), 120, 5432)],
            in_cgroup: POD_CGROUP,
            nameservers: std::vec![],
        }
    }

    /// Decide for a workload in `mode` (view 0, whole namespace).
    fn check<A: Addr>(t: &Mem, mode: u8, q: &Query<A>, v: Verdict, r: Reason, p: u8) {
        check_wl(t, &cfg(), Some(&wl(mode)), q, v, r, p);
    }

    fn check_wl<A: Addr>(
        t: &Mem,
        c: &Config,
        w: Option<&Workload>,
        q: &Query<A>,
        v: Verdict,
        r: Reason,
        p: u8,
    ) {
        assert_eq!(decide(t, c, w, q), Decision::new(v, r, p), "{:?}", r);
    }

    #[test]
    fn order_follows_istio_outbound_chain() {
        use Reason::*;
        use Verdict::*;
        let t = tables();
        let any = MODE_ALLOW_ANY;
        let d = [127, 20, 0, 10];
        check(&t, any, &q(d, 80), Redirect, IncludedCidr, 16);
        let agent = Query {
            cgroup: AGENT_CGROUP,
            ..q(d, 80)
        };
        check(&t, any, &agent, Bypass, Agent, 0);
        check(
            &t,
            any,
            &Query {
                uid: 4242,
                ..q(d, 80)
            },
            Bypass,
            ExcludedUid,
            0,
        );
        check(
            &t,
            any,
            &Query {
                gid: 4343,
                ..q(d, 80)
            },
            Bypass,
            ExcludedGid,
            0,
        );
        check(&t, any, &q(d, 22), Bypass, ExcludedPort, 0);
        // An excluded port wins over an included one.
        check(&t, any, &q(d, 9000), Bypass, ExcludedPort, 0);
        check(&t, any, &q([127, 0, 0, 1], 15001), Bypass, AgentListener, 0);
        check(&t, any, &q([127, 20, 9, 1], 80), Bypass, ExcludedCidr, 24);
        // An excluded CIDR wins over an included port.
        check(&t, any, &q([127, 20, 9, 1], 8443), Bypass, ExcludedCidr, 24);
        check(&t, any, &q(d, 8443), Redirect, IncludedPort, 0);
    }

    #[test]
    fn datagrams_are_allowed_by_udp_entries_only_and_never_go_direct() {
        use Reason::*;
        use Verdict::*;
        let mut t = tables();
        // A UDP entry for 127.20.2.0/24 port 443, in view 0's UDP keys.
        t.allow
            .push((VIEW_UDP, crate::v4_mapped([127, 20, 2, 0]), 120, 443));
        let only = MODE_REGISTRY_ONLY;
        let udp = |dst: [u8; 4], port| Query {
            udp: true,
            ..q(dst, port)
        };
        check(
            &t,
            only,
            &udp([127, 20, 2, 7], 443),
            Redirect,
            RegistryAllowed,
            24,
        );
        // A TCP entry's address and port (allowed, even direct, for TCP) lets no datagram
        // through; a UDP entry's lets no connection through.
        check(&t, only, &q([127, 20, 1, 7], 5432), Direct, TcpEntry, 24);
        check(
            &t,
            only,
            &udp([127, 20, 1, 7], 5432),
            Deny,
            RegistryDenied,
            0,
        );
        check(
            &t,
            only,
            &udp([127, 20, 1, 7], 443),
            Deny,
            RegistryDenied,
            0,
        );
        check(&t, only, &q([127, 20, 2, 7], 443), Deny, RegistryDenied, 0);
        // Exclusions, loopback and ALLOW_ANY are as for TCP.
        check(
            &t,
            only,
            &udp([127, 20, 9, 1], 443),
            Bypass,
            ExcludedCidr,
            24,
        );
        check(&t, only, &udp([127, 0, 0, 1], 443), Bypass, Loopback, 0);
        check(
            &t,
            MODE_ALLOW_ANY,
            &udp([127, 20, 1, 7], 5432),
            Redirect,
            IncludedCidr,
            16,
        );
    }

    #[test]
    fn only_enrolled_namespaces_and_cgroups_are_decided() {
        use Reason::*;
        use Verdict::*;
        let t = tables();
        let c = cfg();
        let d = q([127, 20, 0, 10], 80);
        // A namespace that is not enrolled is left alone, even under REGISTRY_ONLY.
        check_wl(&t, &c, None, &d, Bypass, NotEnrolled, 0);
        // The agent's own sockets are recognised by its cgroup, in any namespace.
        let agent = Query {
            cgroup: AGENT_CGROUP,
            ..d
        };
        check_wl(&t, &c, None, &agent, Bypass, Agent, 0);
        let only = wl(MODE_REGISTRY_ONLY);
        check_wl(&t, &c, Some(&only), &agent, Bypass, Agent, 0);
        // A workload limited to a cgroup: its processes are decided, the others are not.
        let in_cgroup = Workload {
            cgroup_id: POD_CGROUP,
            cgroup_level: 3,
            ..wl(MODE_ALLOW_ANY)
        };
        check_wl(&t, &c, Some(&in_cgroup), &d, Redirect, IncludedCidr, 16);
        let elsewhere = Workload {
            cgroup_id: POD_CGROUP + 1,
            ..in_cgroup
        };
        check_wl(&t, &c, Some(&elsewhere), &d, Bypass, NotEnrolled, 0);
    }

    #[test]
    fn loopback_is_the_workloads_own_unless_named() {
        use Reason::*;
        use Verdict::*;
        let mut t = tables();
        let only = MODE_REGISTRY_ONLY;
        // "*" alone does not capture loopback: not 127.0.0.1, not ::1, not 127.0.0.2.
        check(&t, only, &q([127, 0, 0, 1], 6379), Bypass, Loopback, 0);
        check(&t, only, &q([127, 0, 0, 2], 15001), Bypass, Loopback, 0);
        check(&t, only, &q(cfg().listener_v6, 80), Bypass, Loopback, 0);
        // A range inside loopback names it: decided as any other destination.
        check(&t, only, &q([127, 20, 0, 10], 80), Deny, RegistryDenied, 0);
        t.include.push(v4([127, 0, 0, 0], 8));
        t.include.push((cfg().listener_v6, 128));
        check(
            &t,
            MODE_ALLOW_ANY,
            &q([127, 0, 0, 2], 80),
            Redirect,
            IncludedCidr,
            8,
        );
        check(
            &t,
            MODE_ALLOW_ANY,
            &q(cfg().listener_v6, 80),
            Redirect,
            IncludedCidr,
            128,
        );
        // 127.0.0.1 never, even named.
        check(&t, only, &q([127, 0, 0, 1], 6379), Bypass, Loopback, 0);
        // An included port does not capture loopback either.
        t.include.clear();
        check(&t, only, &q([127, 0, 0, 2], 8443), Bypass, Loopback, 0);
    }

    #[test]
    fn the_workloads_own_addresses_are_its_loopback() {
        let t = tables();
        let pod = Workload {
            own_v4: [[198, 18, 0, 5], [0; 4]],
            own_v6: [
                [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
                [0; 16],
            ],
            ..wl(MODE_REGISTRY_ONLY)
        };
        let c = cfg();
        let own4 = q([198, 18, 0, 5], 8080);
        check_wl(
            &t,
            &c,
            Some(&pod),
            &own4,
            Verdict::Bypass,
            Reason::Loopback,
            0,
        );
        let own6 = q(pod.own_v6[0], 8080);
        check_wl(
            &t,
            &c,
            Some(&pod),
            &own6,
            Verdict::Bypass,
            Reason::Loopback,
            0,
        );
        // Another pod's address is not.
        let other = q([198, 18, 0, 6], 8080);
        check_wl(
            &t,
            &c,
            Some(&pod),
            &other,
            Verdict::Deny,
            Reason::RegistryDenied,
            0,
        );
        // An unused slot matches nothing.
        let zero = q([0, 0, 0, 0], 8080);
        check_wl(
            &t,
            &c,
            Some(&pod),
            &zero,
            Verdict::Deny,
            Reason::RegistryDenied,
            0,
        );
    }

    #[test]
    fn a_marked_socket_is_decided_like_any_other() {
        // The query carries no mark: SO_MARK (settable with CAP_NET_RAW) proves nothing.
        let t = tables();
        check(
            &t,
            MODE_REGISTRY_ONLY,
            &q([127, 20, 1, 7], 80),
            Verdict::Deny,
            Reason::RegistryDenied,
            0,
        );
    }

    #[test]
    fn not_included_is_bypassed() {
        let mut t = tables();
        t.include = std::vec![v4([127, 20, 0, 0], 16)];
        let any = MODE_ALLOW_ANY;
        check(
            &t,
            any,
            &q([198, 18, 0, 1], 80),
            Verdict::Bypass,
            Reason::NotIncluded,
            0,
        );
        check(
            &t,
            any,
            &q([0u8; 16], 80),
            Verdict::Bypass,
            Reason::NotIncluded,
            0,
        );
        // An included port redirects outside the included ranges too.
        check(
            &t,
            any,
            &q([198, 18, 0, 1], 8443),
            Verdict::Redirect,
            Reason::IncludedPort,
            0,
        );
    }

    #[test]
    fn registry_only_denies_what_no_entry_allows() {
        use Reason::*;
        use Verdict::*;
        let t = tables();
        let only = MODE_REGISTRY_ONLY;
        check(
            &t,
            only,
            &q([127, 20, 1, 7], 443),
            Redirect,
            RegistryAllowed,
            24,
        );
        check(&t, only, &q([127, 20, 1, 7], 80), Deny, RegistryDenied, 0);
        check(&t, only, &q([127, 20, 2, 7], 443), Deny, RegistryDenied, 0);
        // Bypassed destinations are not subject to the registry.
        check(&t, only, &q([127, 20, 9, 1], 443), Bypass, ExcludedCidr, 24);
        let doc: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        check(&t, only, &q(doc, 80), Deny, RegistryDenied, 0);
        // An endpoint reached through a Kubernetes Service is registered.
        let via_service = Query {
            service: true,
            ..q([127, 20, 2, 7], 443)
        };
        check(&t, only, &via_service, Redirect, RegistryService, 0);
        // ... but still subject to the interception rules.
        let excluded = Query {
            service: true,
            ..q([127, 20, 9, 1], 443)
        };
        check(&t, only, &excluded, Bypass, ExcludedCidr, 24);
    }

    #[test]
    fn each_workload_sees_its_own_view_and_mode() {
        use Reason::*;
        use Verdict::*;
        let mut t = tables();
        // View 1 (a namespace an entry is exported to) allows port 80 as well.
        t.allow
            .push((1, crate::v4_mapped([127, 20, 1, 0]), 120, 80));
        t.direct
            .push((1, crate::v4_mapped([127, 20, 3, 0]), 120, 5432));
        let c = cfg();
        let d = q([127, 20, 1, 7], 80);
        let team_a = wl(MODE_REGISTRY_ONLY);
        let team_b = Workload { view: 1, ..team_a };
        check_wl(&t, &c, Some(&team_a), &d, Deny, RegistryDenied, 0);
        check_wl(&t, &c, Some(&team_b), &d, Redirect, RegistryAllowed, 24);
        let db = q([127, 20, 3, 9], 5432);
        check_wl(&t, &c, Some(&team_a), &db, Deny, RegistryDenied, 0);
        check_wl(&t, &c, Some(&team_b), &db, Direct, TcpEntry, 24);
        // The same destination passes for an ALLOW_ANY workload of the first view.
        let any = wl(MODE_ALLOW_ANY);
        check_wl(&t, &c, Some(&any), &d, Redirect, IncludedCidr, 16);
    }

    #[test]
    fn tcp_entries_go_straight_out_in_either_mode() {
        let t = tables();
        for mode in [MODE_ALLOW_ANY, MODE_REGISTRY_ONLY] {
            check(
                &t,
                mode,
                &q([127, 20, 1, 7], 5432),
                Verdict::Direct,
                Reason::TcpEntry,
                24,
            );
            // Only connections that would be redirected: exclusions still win.
            check(
                &t,
                mode,
                &q([127, 20, 9, 1], 5432),
                Verdict::Bypass,
                Reason::ExcludedCidr,
                24,
            );
            let w = wl(mode);
            // Another port of the same range is the agent's to decide.
            let other = decide(&t, &cfg(), Some(&w), &q([127, 20, 1, 7], 443));
            assert_eq!(other.verdict, Verdict::Redirect, "{other:?}");
            // With an external proxy, it mediates these too.
            let external = Config { direct: 0, ..cfg() };
            let d = decide(&t, &external, Some(&w), &q([127, 20, 1, 7], 5432));
            assert_eq!(d.verdict, Verdict::Redirect, "{d:?}");
        }
        // Under REGISTRY_ONLY, a Kubernetes Service stays with the agent, which names it.
        let via_service = Query {
            service: true,
            ..q([127, 20, 1, 7], 5432)
        };
        check(
            &t,
            MODE_REGISTRY_ONLY,
            &via_service,
            Verdict::Redirect,
            Reason::RegistryService,
            0,
        );
    }

    #[test]
    fn addresses_learnt_from_dns_go_straight_out_where_the_agent_would_have_taken_them() {
        use Reason::*;
        use Verdict::*;
        let t = tables();
        let learnt = [198, 18, 7, 7];
        let learnt6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        let after = |c: &Config, d: Decision, learnt: bool| with_learned(c, d, || learnt);
        let at = |mode, q: &Query<[u8; 4]>| decide(&t, &cfg(), Some(&wl(mode)), q);
        for mode in [MODE_ALLOW_ANY, MODE_REGISTRY_ONLY] {
            // Redirected (ALLOW_ANY) or denied (REGISTRY_ONLY): straight out once learnt.
            let d = at(mode, &q(learnt, 5432));
            assert_eq!(
                d.verdict,
                if mode == MODE_ALLOW_ANY {
                    Redirect
                } else {
                    Deny
                }
            );
            let l = after(&cfg(), d, true);
            assert_eq!(l, Decision::new(Direct, DnsLearned, 0));
            assert_eq!(after(&cfg(), d, false), d);
            let d6 = decide(&t, &cfg(), Some(&wl(mode)), &q(learnt6, 5432));
            assert_eq!(after(&cfg(), d6, true).reason, DnsLearned);
            // What was decided before stays: exclusions, TCP entries by address.
            for q in [q([127, 20, 9, 1], 5432), q([127, 20, 1, 7], 5432)] {
                let d = at(mode, &q);
                assert_eq!(after(&cfg(), d, true), d, "{q:?}");
            }
        }
        // A Service's endpoint stays with the agent, which names it.
        let via_service = Query {
            service: true,
            ..q(learnt, 5432)
        };
        let d = decide(&t, &cfg(), Some(&wl(MODE_REGISTRY_ONLY)), &via_service);
        assert_eq!(after(&cfg(), d, true), d);
        // With an external proxy, nothing goes straight out.
        let external = Config { direct: 0, ..cfg() };
        let d = at(MODE_ALLOW_ANY, &q(learnt, 5432));
        assert_eq!(after(&external, d, true), d);
    }

    #[test]
    fn ipv6_follows_its_own_rules() {
        let mut t = tables();
        let doc: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        t.exclude.push((
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            32,
        ));
        t.include.push((cfg().listener_v6, 128));
        let any = MODE_ALLOW_ANY;
        check(
            &t,
            any,
            &q(doc, 80),
            Verdict::Bypass,
            Reason::ExcludedCidr,
            32,
        );
        check(
            &t,
            any,
            &q(cfg().listener_v6, 15001),
            Verdict::Bypass,
            Reason::AgentListener,
            0,
        );
        check(
            &t,
            any,
            &q(cfg().listener_v6, 80),
            Verdict::Redirect,
            Reason::IncludedCidr,
            128,
        );
    }

    #[test]
    fn disabled_config_bypasses_everything() {
        let t = tables();
        let c = Config {
            enabled: 0,
            ..cfg()
        };
        check_wl(
            &t,
            &c,
            Some(&wl(MODE_REGISTRY_ONLY)),
            &q([127, 20, 0, 10], 80),
            Verdict::Bypass,
            Reason::NotIncluded,
            0,
        );
    }

    #[test]
    fn a_replaced_agent_is_still_the_agent_while_it_drains() {
        let t = tables();
        let c = Config {
            agent_cgroup: 99,
            agent_cgroup_prev: AGENT_CGROUP,
            ..cfg()
        };
        let mut query = q([127, 20, 0, 10], 80);
        query.cgroup = AGENT_CGROUP;
        check_wl(
            &t,
            &c,
            Some(&wl(MODE_REGISTRY_ONLY)),
            &query,
            Verdict::Bypass,
            Reason::Agent,
            0,
        );
        // No previous agent: cgroup 0 is nobody's.
        query.cgroup = 0;
        let c = Config {
            agent_cgroup_prev: 0,
            ..c
        };
        let d = decide(&t, &c, Some(&wl(MODE_ALLOW_ANY)), &query);
        assert_eq!(d.verdict, Verdict::Redirect);
    }

    #[test]
    fn without_an_agent_redirects_fail_closed_or_go_out_and_the_rest_holds() {
        let t = tables();
        let w = wl(MODE_REGISTRY_ONLY);
        let allowed = decide(&t, &cfg(), Some(&w), &q([127, 20, 1, 7], 443));
        assert_eq!(allowed.verdict, Verdict::Redirect);
        assert_eq!(
            without_agent(&cfg(), allowed),
            Decision::new(Verdict::Redirect, Reason::AgentDown, 0)
        );
        let open = Config {
            failure_open: 1,
            ..cfg()
        };
        assert_eq!(
            without_agent(&open, allowed),
            Decision::new(Verdict::Bypass, Reason::AgentDownOpen, 0)
        );
        // Denies, direct entries and bypasses are the maps' own: the same either way.
        for d in [
            decide(&t, &cfg(), Some(&w), &q([127, 20, 0, 10], 80)),
            decide(&t, &cfg(), Some(&w), &q([127, 21, 0, 1], 80)),
            decide(&t, &cfg(), None, &q([127, 20, 0, 10], 80)),
        ] {
            assert_ne!(d.verdict, Verdict::Redirect, "{d:?}");
            assert_eq!(without_agent(&cfg(), d), d);
            assert_eq!(without_agent(&open, d), d);
        }
    }

    #[test]
    fn dns_queries_are_captured_after_the_exclusions_and_before_loopback() {
        use Reason::*;
        use Verdict::*;
        let mut t = tables();
        let c = Config {
            dns_port: 15053,
            ..cfg()
        };
        let w = wl(MODE_REGISTRY_ONLY);
        // Whatever the nameserver: external, on the workload's loopback (127.0.0.53 and
        // 127.0.0.1), IPv6, excluded or not included, and under REGISTRY_ONLY.
        for ns in [
            [198, 18, 0, 53],
            [127, 0, 0, 53],
            [127, 0, 0, 1],
            [127, 21, 0, 1],
        ] {
            check_wl(&t, &c, Some(&w), &q(ns, 53), Redirect, Dns, 0);
        }
        check_wl(&t, &c, Some(&w), &q([0u8; 16], 53), Redirect, Dns, 0);
        check_wl(&t, &c, Some(&w), &q(LOCALHOST_V6, 53), Redirect, Dns, 0);
        // Before it: the agent, namespaces not enrolled, excluded uid, gid and port.
        let agent = Query {
            cgroup: AGENT_CGROUP,
            ..q([198, 18, 0, 53], 53)
        };
        check_wl(&t, &c, Some(&w), &agent, Bypass, Agent, 0);
        check_wl(
            &t,
            &c,
            None,
            &q([198, 18, 0, 53], 53),
            Bypass,
            NotEnrolled,
            0,
        );
        let uid = Query {
            uid: 4242,
            ..q([198, 18, 0, 53], 53)
        };
        check_wl(&t, &c, Some(&w), &uid, Bypass, ExcludedUid, 0);
        t.ports.push((53, PORT_EXCLUDE));
        check_wl(
            &t,
            &c,
            Some(&w),
            &q([198, 18, 0, 53], 53),
            Bypass,
            ExcludedPort,
            0,
        );
        // Capture off: port 53 is a port like any other.
        t.ports.clear();
        check(
            &t,
            MODE_ALLOW_ANY,
            &q([127, 0, 0, 53], 53),
            Bypass,
            Loopback,
            0,
        );
        check(
            &t,
            MODE_REGISTRY_ONLY,
            &q([198, 18, 0, 53], 53),
            Deny,
            RegistryDenied,
            0,
        );
    }

    const LOCALHOST_V6: [u8; 16] = core::net::Ipv6Addr::LOCALHOST.octets();

    #[test]
    fn dns_fails_open_whatever_the_failure_mode() {
        let t = tables();
        for failure_open in [0, 1] {
            let c = Config {
                dns_port: 15053,
                failure_open,
                ..cfg()
            };
            let d = decide(
                &t,
                &c,
                Some(&wl(MODE_REGISTRY_ONLY)),
                &q([198, 18, 0, 53], 53),
            );
            assert_eq!(d, Decision::new(Verdict::Redirect, Reason::Dns, 0));
            assert_eq!(
                without_agent(&c, d),
                Decision::new(Verdict::Bypass, Reason::DnsOpen, 0)
            );
        }
    }

    #[test]
    fn resolv_conf_captures_only_the_workloads_own_nameservers() {
        use Reason::*;
        use Verdict::*;
        let own4 = [198, 18, 0, 53];
        let t = Mem {
            nameservers: std::vec![
                (POD_NETNS, crate::v4_mapped(own4)),
                (POD_NETNS, crate::v4_mapped([127, 0, 0, 53])),
                (POD_NETNS, LOCALHOST_V6),
                // Another workload's.
                (POD_NETNS + 1, crate::v4_mapped([198, 18, 0, 54])),
            ],
            ..tables()
        };
        let c = Config {
            dns_port: 15053,
            dns_capture: crate::DNS_CAPTURE_RESOLV_CONF,
            ..cfg()
        };
        let known = Workload {
            nameservers: 3,
            ..wl(MODE_ALLOW_ANY)
        };
        let at = |c: &Config, w: &Workload, q: &Query<[u8; 4]>| decide(&t, c, Some(w), q);
        let dns = Decision::new(Redirect, Dns, 0);
        // Its own nameservers: captured, on its loopback too, and over IPv6.
        assert_eq!(at(&c, &known, &q(own4, 53)), dns);
        assert_eq!(at(&c, &known, &q([127, 0, 0, 53], 53)), dns);
        assert_eq!(decide(&t, &c, Some(&known), &q(LOCALHOST_V6, 53)), dns);
        // Another one (another workload's too): no DNS capture, the other rules decide it as
        // any connection.
        let other = q([198, 18, 0, 54], 53);
        let included = Decision::new(Redirect, IncludedCidr, 0);
        assert_eq!(at(&c, &known, &other), included);
        assert_eq!(
            at(&c, &known, &q([127, 0, 0, 54], 53)),
            Decision::new(Bypass, Loopback, 0)
        );
        let registry_only = Workload {
            mode: MODE_REGISTRY_ONLY,
            ..known
        };
        assert_eq!(
            at(&c, &registry_only, &other),
            Decision::new(Deny, RegistryDenied, 0)
        );
        // Its own nameserver from another namespace is another's.
        let elsewhere = Query {
            netns: POD_NETNS + 2,
            ..q(own4, 53)
        };
        assert_eq!(at(&c, &known, &elsewhere), included);
        // Port 53 only.
        assert_eq!(at(&c, &known, &q(own4, 5353)), included);
        // The exclusions still come first.
        let excluded = Query {
            uid: 4242,
            ..q(own4, 53)
        };
        assert_eq!(
            at(&c, &known, &excluded),
            Decision::new(Bypass, ExcludedUid, 0)
        );
        // A workload without known nameservers is captured whole.
        assert_eq!(at(&c, &wl(MODE_ALLOW_ANY), &other), dns);
        // Under ALL, every nameserver, whatever the workload has.
        let all = Config {
            dns_capture: crate::DNS_CAPTURE_ALL,
            ..c
        };
        assert_eq!(at(&all, &known, &other), dns);
        assert_eq!(at(&all, &known, &q([127, 0, 0, 54], 53)), dns);
        // Without DNS capture, nothing is a DNS query.
        let off = Config { dns_port: 0, ..c };
        assert_eq!(at(&off, &known, &q(own4, 53)), included);
    }

    #[test]
    fn nameserver_slots_name_stub_addresses() {
        for i in [0u16, 1, 255, 256, 0xfffe, 0xffff] {
            let a = crate::dns_stub_v4(i);
            assert_eq!(&a[..2], &[127, 53]);
            assert_eq!(crate::dns_stub_index(a), Some(i));
        }
        assert_eq!(crate::dns_stub_index([127, 0, 0, 53]), None);
        assert_eq!(crate::dns_stub_index([10, 53, 0, 1]), None);
        // IPv6: 100::53:XY, inside the discard-only 100::/64.
        for i in [0u16, 1, 0x0102, 0xffff] {
            let a = crate::dns_stub_v6(i);
            assert_eq!(
                std::net::Ipv6Addr::from(a),
                std::net::Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0x53, i)
            );
            assert_eq!(crate::dns_stub_v6_index(&a), Some(i));
        }
        let mut other = crate::dns_stub_v6(1);
        other[13] = 0x54;
        assert_eq!(crate::dns_stub_v6_index(&other), None);
        assert_eq!(
            crate::dns_stub_v6_index(&std::net::Ipv6Addr::LOCALHOST.octets()),
            None
        );
        // A nameserver's probes are consecutive slots, from the same start every time; other
        // nameservers start elsewhere.
        let ns = crate::v4_mapped([198, 18, 0, 53]);
        let first = crate::dns_slot(&ns, 0);
        assert_eq!(crate::dns_slot(&ns, 0), first);
        for p in 1..crate::DNS_PROBES {
            assert_eq!(crate::dns_slot(&ns, p), first.wrapping_add(p as u16));
        }
        let starts: std::collections::BTreeSet<u16> = (0u8..=255)
            .map(|i| crate::dns_slot(&crate::v4_mapped([198, 18, 1, i]), 0))
            .collect();
        assert!(starts.len() > 240, "{} distinct starts", starts.len());
    }

    #[test]
    fn reason_codes_round_trip() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
            assert_eq!(Reason::from_u32(i as u32), Some(*r));
        }
        assert_eq!(Reason::from_u32(REASON_COUNT), None);
    }

    #[test]
    fn mapped_addresses_round_trip() {
        let a = [198, 18, 0, 1];
        assert_eq!(crate::v4_unmapped(&crate::v4_mapped(a)), Some(a));
        assert_eq!(crate::v4_unmapped(&[0u8; 16]), None);
        assert_eq!(
            crate::allow_key_v4(2, 443, a),
            [0, 2, 1, 187, 198, 18, 0, 1]
        );
    }
}
