//! The connect-time decision, written once: the kernel programs call it with map lookups, the
//! unit tests with in-memory tables, and `egress explain` with the live maps.
//!
//! Order, after Istio's outbound chain: the agent itself, other network namespaces, excluded
//! uid/gid, excluded port, the agent's listener, excluded CIDR (longest prefix), included port,
//! included CIDR, else bypass. A connection that would be redirected to an address and port
//! that only TCP ServiceEntries relaying to the dialled address declare goes straight out,
//! accounted in the kernel (`Direct`): the agent would only have copied its bytes. Among the
//! other redirected connections, `REGISTRY_ONLY` with no allowed L4 entry for the address and
//! port is denied.

use crate::maps::{Config, MODE_REGISTRY_ONLY, PORT_EXCLUDE, PORT_INCLUDE};

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
    /// The socket carries the agent's mark: its own upstream connection.
    Agent = 0,
    /// Made in a network namespace other than the agent's.
    OtherNetns = 1,
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
}

/// Number of reason codes: the size of the counters map.
pub const REASON_COUNT: u32 = 15;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::Agent,
        Reason::OtherNetns,
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
    ];

    /// Stable name used in logs, metrics and `egress explain`.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Agent => "agent",
            Reason::OtherNetns => "other-netns",
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
    /// `SO_MARK` of the socket.
    pub mark: u32,
    /// Network namespace cookie of the socket.
    pub netns: u64,
    /// Dialled through a Kubernetes Service (the destination is one of its endpoints): the
    /// registry knows it.
    pub service: bool,
}

/// The lookups the decision needs. CIDR lookups are longest-prefix matches returning the
/// matched prefix length.
pub trait Tables {
    fn uid_excluded(&self, uid: u32) -> bool;
    fn gid_excluded(&self, gid: u32) -> bool;
    /// `PORT_INCLUDE` and/or `PORT_EXCLUDE`, or 0.
    fn port_flags(&self, port: u16) -> u8;
    fn include_v4(&self, addr: [u8; 4]) -> Option<u8>;
    fn exclude_v4(&self, addr: [u8; 4]) -> Option<u8>;
    fn allow_v4(&self, addr: [u8; 4], port: u16) -> Option<u8>;
    /// (port, address) ranges whose connections go straight out (`Verdict::Direct`).
    fn direct_v4(&self, addr: [u8; 4], port: u16) -> Option<u8>;
    fn include_v6(&self, addr: [u8; 16]) -> Option<u8>;
    fn exclude_v6(&self, addr: [u8; 16]) -> Option<u8>;
    fn allow_v6(&self, addr: [u8; 16], port: u16) -> Option<u8>;
    fn direct_v6(&self, addr: [u8; 16], port: u16) -> Option<u8>;
}

/// An address family's part in the decision.
pub trait Addr: Copy {
    fn is_listener(&self, cfg: &Config) -> bool;
    fn include<T: Tables>(&self, t: &T) -> Option<u8>;
    fn exclude<T: Tables>(&self, t: &T) -> Option<u8>;
    fn allow<T: Tables>(&self, t: &T, port: u16) -> Option<u8>;
    fn direct<T: Tables>(&self, t: &T, port: u16) -> Option<u8>;
}

impl Addr for [u8; 4] {
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
    fn allow<T: Tables>(&self, t: &T, port: u16) -> Option<u8> {
        t.allow_v4(*self, port)
    }
    #[inline(always)]
    fn direct<T: Tables>(&self, t: &T, port: u16) -> Option<u8> {
        t.direct_v4(*self, port)
    }
}

impl Addr for [u8; 16] {
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
    fn allow<T: Tables>(&self, t: &T, port: u16) -> Option<u8> {
        t.allow_v6(*self, port)
    }
    #[inline(always)]
    fn direct<T: Tables>(&self, t: &T, port: u16) -> Option<u8> {
        t.direct_v6(*self, port)
    }
}

/// Decide one connect(). IPv4-mapped IPv6 destinations must be passed as `[u8; 4]`, so that a
/// v6 socket cannot evade a v4 rule.
#[inline(always)]
pub fn decide<T: Tables, A: Addr>(t: &T, cfg: &Config, q: &Query<A>) -> Decision {
    use Reason::*;
    use Verdict::*;
    if cfg.enabled == 0 {
        return Decision::new(Bypass, NotIncluded, 0);
    }
    if cfg.agent_mark != 0 && q.mark == cfg.agent_mark {
        return Decision::new(Bypass, Agent, 0);
    }
    if cfg.netns_cookie != 0 && q.netns != cfg.netns_cookie {
        return Decision::new(Bypass, OtherNetns, 0);
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
    if q.port == cfg.listener_port && q.dst.is_listener(cfg) {
        return Decision::new(Bypass, AgentListener, 0);
    }
    if let Some(p) = q.dst.exclude(t) {
        return Decision::new(Bypass, ExcludedCidr, p);
    }
    let redirect = if port_flags & PORT_INCLUDE != 0 {
        Decision::new(Redirect, IncludedPort, 0)
    } else if let Some(p) = q.dst.include(t) {
        Decision::new(Redirect, IncludedCidr, p)
    } else {
        return Decision::new(Bypass, NotIncluded, 0);
    };
    if cfg.mode == MODE_REGISTRY_ONLY && q.service {
        return Decision::new(Redirect, RegistryService, 0);
    }
    if cfg.direct != 0
        && let Some(p) = q.dst.direct(t, q.port)
    {
        return Decision::new(Direct, TcpEntry, p);
    }
    if cfg.mode == MODE_REGISTRY_ONLY {
        return match q.dst.allow(t, q.port) {
            Some(p) => Decision::new(Redirect, RegistryAllowed, p),
            None => Decision::new(Deny, RegistryDenied, 0),
        };
    }
    redirect
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
        allow: Vec<([u8; 16], u8, u16)>,
        direct: Vec<([u8; 16], u8, u16)>,
    }

    fn lpm_port(list: &[([u8; 16], u8, u16)], a: [u8; 16], port: u16) -> Option<u8> {
        list.iter()
            .filter(|(net, p, pt)| *pt == port && matches(net, *p, &a))
            .map(|(_, p, _)| *p)
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
        fn allow_v4(&self, a: [u8; 4], port: u16) -> Option<u8> {
            self.allow_v6(crate::v4_mapped(a), port).map(|p| p - 96)
        }
        fn include_v6(&self, a: [u8; 16]) -> Option<u8> {
            lpm(&self.include, a)
        }
        fn exclude_v6(&self, a: [u8; 16]) -> Option<u8> {
            lpm(&self.exclude, a)
        }
        fn allow_v6(&self, a: [u8; 16], port: u16) -> Option<u8> {
            lpm_port(&self.allow, a, port)
        }
        fn direct_v4(&self, a: [u8; 4], port: u16) -> Option<u8> {
            self.direct_v6(crate::v4_mapped(a), port).map(|p| p - 96)
        }
        fn direct_v6(&self, a: [u8; 16], port: u16) -> Option<u8> {
            lpm_port(&self.direct, a, port)
        }
    }

    fn v4(s: [u8; 4], p: u8) -> ([u8; 16], u8) {
        (crate::v4_mapped(s), p + 96)
    }

    const MARK: u32 = 1337;
    const NETNS: u64 = 4096;

    fn cfg(mode: u8) -> Config {
        Config {
            netns_cookie: NETNS,
            agent_mark: MARK,
            listener_port: 15001,
            mode,
            enabled: 1,
            listener_v4: [127, 0, 0, 1],
            listener_v6: core::net::Ipv6Addr::LOCALHOST.octets(),
            direct: 1,
            _pad: [0; 3],
        }
    }

    fn q<A>(dst: A, port: u16) -> Query<A> {
        Query {
            dst,
            port,
            uid: 1000,
            gid: 1000,
            mark: 0,
            netns: NETNS,
            service: false,
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
                (crate::v4_mapped([127, 20, 1, 0]), 120, 443),
                (crate::v4_mapped([127, 20, 1, 0]), 120, 5432)
            ],
            direct: std::vec![(crate::v4_mapped([127, 20, 1, 0]), 120, 5432)],
        }
    }

    fn check<A: Addr>(t: &Mem, c: &Config, q: &Query<A>, v: Verdict, r: Reason, p: u8) {
        assert_eq!(decide(t, c, q), Decision::new(v, r, p), "{:?}", r);
    }

    #[test]
    fn order_follows_istio_outbound_chain() {
        let t = tables();
        let c = cfg(MODE_ALLOW_ANY);
        let d = [127, 20, 0, 10];
        check(
            &t,
            &c,
            &q(d, 80),
            Verdict::Redirect,
            Reason::IncludedCidr,
            16,
        );
        check(
            &t,
            &c,
            &Query {
                mark: MARK,
                ..q(d, 80)
            },
            Verdict::Bypass,
            Reason::Agent,
            0,
        );
        check(
            &t,
            &c,
            &Query {
                netns: 1,
                ..q(d, 80)
            },
            Verdict::Bypass,
            Reason::OtherNetns,
            0,
        );
        check(
            &t,
            &c,
            &Query {
                uid: 4242,
                ..q(d, 80)
            },
            Verdict::Bypass,
            Reason::ExcludedUid,
            0,
        );
        check(
            &t,
            &c,
            &Query {
                gid: 4343,
                ..q(d, 80)
            },
            Verdict::Bypass,
            Reason::ExcludedGid,
            0,
        );
        check(&t, &c, &q(d, 22), Verdict::Bypass, Reason::ExcludedPort, 0);
        // An excluded port wins over an included one.
        check(
            &t,
            &c,
            &q(d, 9000),
            Verdict::Bypass,
            Reason::ExcludedPort,
            0,
        );
        check(
            &t,
            &c,
            &q([127, 0, 0, 1], 15001),
            Verdict::Bypass,
            Reason::AgentListener,
            0,
        );
        // Same port, another address: not the listener.
        check(
            &t,
            &c,
            &q([127, 0, 0, 2], 15001),
            Verdict::Redirect,
            Reason::IncludedCidr,
            0,
        );
        check(
            &t,
            &c,
            &q([127, 20, 9, 1], 80),
            Verdict::Bypass,
            Reason::ExcludedCidr,
            24,
        );
        // An excluded CIDR wins over an included port.
        check(
            &t,
            &c,
            &q([127, 21, 3, 4], 8443),
            Verdict::Bypass,
            Reason::ExcludedCidr,
            16,
        );
        check(
            &t,
            &c,
            &q(d, 8443),
            Verdict::Redirect,
            Reason::IncludedPort,
            0,
        );
    }

    #[test]
    fn not_included_is_bypassed() {
        let mut t = tables();
        t.include = std::vec![v4([127, 20, 0, 0], 16)];
        let c = cfg(MODE_ALLOW_ANY);
        check(
            &t,
            &c,
            &q([127, 30, 0, 1], 80),
            Verdict::Bypass,
            Reason::NotIncluded,
            0,
        );
        check(
            &t,
            &c,
            &q([0u8; 16], 80),
            Verdict::Bypass,
            Reason::NotIncluded,
            0,
        );
        // An included port redirects outside the included ranges too.
        check(
            &t,
            &c,
            &q([127, 30, 0, 1], 8443),
            Verdict::Redirect,
            Reason::IncludedPort,
            0,
        );
    }

    #[test]
    fn registry_only_denies_what_no_entry_allows() {
        let t = tables();
        let c = cfg(MODE_REGISTRY_ONLY);
        check(
            &t,
            &c,
            &q([127, 20, 1, 7], 443),
            Verdict::Redirect,
            Reason::RegistryAllowed,
            24,
        );
        check(
            &t,
            &c,
            &q([127, 20, 1, 7], 80),
            Verdict::Deny,
            Reason::RegistryDenied,
            0,
        );
        check(
            &t,
            &c,
            &q([127, 20, 2, 7], 443),
            Verdict::Deny,
            Reason::RegistryDenied,
            0,
        );
        // Bypassed destinations are not subject to the registry.
        check(
            &t,
            &c,
            &q([127, 20, 9, 1], 443),
            Verdict::Bypass,
            Reason::ExcludedCidr,
            24,
        );
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        check(&t, &c, &q(v6, 80), Verdict::Deny, Reason::RegistryDenied, 0);
        // An endpoint reached through a Kubernetes Service is registered.
        let via_service = Query {
            service: true,
            ..q([127, 20, 2, 7], 443)
        };
        check(
            &t,
            &c,
            &via_service,
            Verdict::Redirect,
            Reason::RegistryService,
            0,
        );
        // ... but still subject to the interception rules.
        let excluded = Query {
            service: true,
            ..q([127, 20, 9, 1], 443)
        };
        check(&t, &c, &excluded, Verdict::Bypass, Reason::ExcludedCidr, 24);
    }

    #[test]
    fn tcp_entries_go_straight_out_in_either_mode() {
        let t = tables();
        for mode in [MODE_ALLOW_ANY, MODE_REGISTRY_ONLY] {
            let c = cfg(mode);
            check(
                &t,
                &c,
                &q([127, 20, 1, 7], 5432),
                Verdict::Direct,
                Reason::TcpEntry,
                24,
            );
            // Only connections that would be redirected: exclusions still win.
            check(
                &t,
                &c,
                &q([127, 20, 9, 1], 5432),
                Verdict::Bypass,
                Reason::ExcludedCidr,
                24,
            );
            // Another port of the same range is the agent's to decide.
            let other = decide(&t, &c, &q([127, 20, 1, 7], 443));
            assert_eq!(other.verdict, Verdict::Redirect, "{other:?}");
            // With an external proxy, it mediates these too.
            let external = Config { direct: 0, ..c };
            let d = decide(&t, &external, &q([127, 20, 1, 7], 5432));
            assert_eq!(d.verdict, Verdict::Redirect, "{d:?}");
        }
        // Under REGISTRY_ONLY, a Kubernetes Service stays with the agent, which names it.
        let via_service = Query {
            service: true,
            ..q([127, 20, 1, 7], 5432)
        };
        check(
            &t,
            &cfg(MODE_REGISTRY_ONLY),
            &via_service,
            Verdict::Redirect,
            Reason::RegistryService,
            0,
        );
    }

    #[test]
    fn ipv6_follows_its_own_rules() {
        let mut t = tables();
        let doc: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        t.exclude.push((
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            32,
        ));
        let c = cfg(MODE_ALLOW_ANY);
        check(
            &t,
            &c,
            &q(doc, 80),
            Verdict::Bypass,
            Reason::ExcludedCidr,
            32,
        );
        check(
            &t,
            &c,
            &q(c.listener_v6, 15001),
            Verdict::Bypass,
            Reason::AgentListener,
            0,
        );
        check(
            &t,
            &c,
            &q(c.listener_v6, 80),
            Verdict::Redirect,
            Reason::IncludedCidr,
            0,
        );
    }

    #[test]
    fn disabled_config_bypasses_everything() {
        let t = tables();
        let c = Config {
            enabled: 0,
            ..cfg(MODE_REGISTRY_ONLY)
        };
        check(
            &t,
            &c,
            &q([127, 20, 0, 10], 80),
            Verdict::Bypass,
            Reason::NotIncluded,
            0,
        );
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
        assert_eq!(crate::allow_key_v4(443, a), [1, 187, 198, 18, 0, 1]);
    }
}
