//! `egress explain`: the verdict for one destination and the rule that decided, from the live
//! maps or from a configuration file, through the same decision function as the kernel.

use std::net::{IpAddr, SocketAddr};

use egress_common::{
    Config, DNS_CAPTURE_ALL, Decision, MODE_REGISTRY_ONLY, Query, Reason, Tables, Verdict,
    Workload, decide, v4_unmapped,
};

use crate::plan::network;

/// Who makes the connect() being explained: a process (not the agent) of a workload.
#[derive(Clone, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The workload's name and its enrolment (`None`: a namespace that is not enrolled).
    pub workload: Option<(String, Workload)>,
    /// Whether the workload learnt the destination from a DNS answer that has not run out
    /// (`LEARNED`).
    pub learned: bool,
    /// A UDP datagram (connect or sendto), not a TCP connect.
    pub udp: bool,
    /// The workload's network namespace cookie: the key of its nameservers in
    /// `DNS_RESOLVERS`, which `spec.dns.capture: RESOLV_CONF` captures DNS queries to.
    pub netns: u64,
}

/// The Kubernetes Services the datapath translates.
pub trait Services {
    /// The endpoints of the Service at `vip`, if there is one.
    fn service(&self, vip: SocketAddr) -> Option<Vec<SocketAddr>>;
}

impl Services for crate::plan::Plan {
    fn service(&self, vip: SocketAddr) -> Option<Vec<SocketAddr>> {
        self.services.get(&vip).cloned()
    }
}

impl Services for crate::datapath::Maps {
    fn service(&self, vip: SocketAddr) -> Option<Vec<SocketAddr>> {
        crate::datapath::Maps::service(self, vip)
    }
}

/// IPv4-mapped IPv6 destinations are decided as IPv4.
fn unmap(dst: SocketAddr) -> SocketAddr {
    match dst.ip() {
        IpAddr::V6(a) => {
            v4_unmapped(&a.octets()).map_or(dst, |v4| SocketAddr::from((v4, dst.port())))
        }
        IpAddr::V4(_) => dst,
    }
}

/// Explain a connect() to `dst` by `caller`: one line, or one per endpoint when `dst` is a
/// Kubernetes Service the datapath translates.
pub fn explain<T: Tables + Services>(
    t: &T,
    cfg: &Config,
    dst: SocketAddr,
    caller: &Caller,
) -> Vec<String> {
    let dst = unmap(dst);
    // Kubernetes Services are translated for TCP; their UDP ports are allow entries.
    let service = if caller.workload.is_some() && !caller.udp {
        t.service(dst)
    } else {
        None
    };
    match service {
        None => vec![describe(
            &decide_one(t, cfg, dst, caller, false),
            cfg,
            dst,
            caller,
        )],
        Some(endpoints) if endpoints.is_empty() => vec![format!(
            "deny (Kubernetes Service {dst} has no endpoints) [{}]",
            Reason::ServiceNoEndpoints.name()
        )],
        Some(endpoints) => endpoints
            .iter()
            .map(|e| {
                let d = decide_one(t, cfg, *e, caller, true);
                format!(
                    "via endpoint {e} of Kubernetes Service {dst}: {}",
                    describe(&d, cfg, *e, caller)
                )
            })
            .collect(),
    }
}

fn decide_one<T: Tables>(
    t: &T,
    cfg: &Config,
    dst: SocketAddr,
    caller: &Caller,
    service: bool,
) -> Decision {
    // Any cgroup but the agent's.
    let cgroup = !cfg.agent_cgroup;
    let q = |c: &Caller| Query {
        dst: (),
        port: dst.port(),
        uid: c.uid,
        gid: c.gid,
        cgroup,
        service,
        udp: c.udp,
        netns: c.netns,
    };
    let base = q(caller);
    let wl = caller.workload.as_ref().map(|(_, w)| w);
    let d = match dst.ip() {
        IpAddr::V4(a) => decide(t, cfg, wl, &with_dst(base, a.octets())),
        IpAddr::V6(a) => decide(t, cfg, wl, &with_dst(base, a.octets())),
    };
    if caller.udp {
        return d;
    }
    egress_common::with_learned(cfg, d, || caller.learned)
}

fn with_dst<A>(q: Query<()>, dst: A) -> Query<A> {
    Query {
        dst,
        port: q.port,
        uid: q.uid,
        gid: q.gid,
        cgroup: q.cgroup,
        service: q.service,
        udp: q.udp,
        netns: q.netns,
    }
}

/// One line: `verdict (rule) [reason-code]`.
pub fn describe(d: &Decision, cfg: &Config, dst: SocketAddr, caller: &Caller) -> String {
    let ip = match dst.ip() {
        IpAddr::V6(a) => v4_unmapped(&a.octets()).map_or(IpAddr::V6(a), IpAddr::from),
        v4 => v4,
    };
    let net = network(ip, d.prefix_len);
    let port = dst.port();
    let mode = match &caller.workload {
        Some((_, w)) if w.mode == MODE_REGISTRY_ONLY => "REGISTRY_ONLY",
        _ => "ALLOW_ANY",
    };
    // An exclusion is a bypass, as in Istio: under REGISTRY_ONLY, a way past the registry.
    let hole = if mode == "REGISTRY_ONLY" {
        ": a hole in REGISTRY_ONLY, no ServiceEntry needed"
    } else {
        ""
    };
    let rule = match d.reason {
        Reason::Agent => "the agent's own connection, made from its cgroup".to_owned(),
        Reason::NotEnrolled => "made in a network namespace that is not enrolled".to_owned(),
        Reason::Loopback if ip.is_loopback() && ip == IpAddr::from([127, 0, 0, 1]) => {
            "the workload's own loopback: 127.0.0.1 is never captured".to_owned()
        }
        Reason::Loopback if !ip.is_loopback() => {
            format!("{ip} is the workload's own address, reached through loopback")
        }
        Reason::Loopback => "the workload's own loopback: no includeOutboundIPRanges \
             range inside loopback names it"
            .to_owned(),
        Reason::ExcludedUid => format!("excludeUids {}{hole}", caller.uid),
        Reason::ExcludedGid => format!("excludeGids {}{hole}", caller.gid),
        Reason::ExcludedPort => format!("excludeOutboundPorts {port}{hole}"),
        Reason::AgentListener => format!("the agent's outbound listener {dst}"),
        Reason::ExcludedCidr => format!("excludeOutboundIPRanges {net}{hole}"),
        Reason::IncludedPort => format!("includeOutboundPorts {port}"),
        Reason::IncludedCidr => format!("includeOutboundIPRanges {net}"),
        Reason::NotIncluded if cfg.enabled == 0 => "the datapath is not enabled".to_owned(),
        Reason::NotIncluded => "not in includeOutboundIPRanges or includeOutboundPorts".to_owned(),
        Reason::RegistryAllowed if d.prefix_len == 0 => format!(
            "{mode}: port {port} belongs to a ServiceEntry without addresses; the agent \
             decides by HTTP Host or TLS SNI"
        ),
        Reason::RegistryAllowed if caller.udp => {
            format!("{mode}: allowed by a UDP port of a ServiceEntry or Service, {net} port {port}")
        }
        Reason::RegistryAllowed => {
            format!("{mode}: allowed by ServiceEntry address {net} port {port}")
        }
        Reason::RegistryDenied if caller.udp => format!(
            "{mode}: no UDP port of a ServiceEntry or Service allows {ip} port {port}: the \
             datagram is refused with EPERM"
        ),
        Reason::RegistryDenied => {
            format!("{mode}: no ServiceEntry address allows {ip} port {port}")
        }
        Reason::RegistryService => {
            format!("{mode}: reached through a Kubernetes Service, which is registered")
        }
        Reason::ServiceNoEndpoints => format!("Kubernetes Service {dst} has no endpoints"),
        Reason::AgentDown => "no agent listens in the namespace and failureMode is closed: \
             connect() fails with ECONNREFUSED"
            .to_owned(),
        Reason::AgentDownOpen => {
            "no agent listens in the namespace and failureMode is open: it goes straight out"
                .to_owned()
        }
        Reason::Dns => {
            let which = if cfg.dns_capture == DNS_CAPTURE_ALL {
                "spec.dns.capture ALL: to any nameserver"
            } else if caller
                .workload
                .as_ref()
                .is_none_or(|(_, w)| w.nameservers == 0)
            {
                "spec.dns.capture RESOLV_CONF, but the workload's nameservers are not known: \
                 to any nameserver"
            } else {
                "spec.dns.capture RESOLV_CONF: to one of the workload's nameservers"
            };
            format!(
                "a DNS query ({which}): the agent's DNS server on port {} of the workload's \
                 namespace answers it or forwards it to {ip}",
                cfg.dns_port
            )
        }
        Reason::DnsOpen => "a DNS query, but no agent serves DNS in the namespace: it goes \
             to the nameserver (DNS fails open)"
            .to_owned(),
        Reason::TcpEntry => format!(
            "TCP ServiceEntry address {net} port {port}: nothing in the stream to decide, so it \
             goes straight out, accounted by the kernel"
        ),
        Reason::DnsLearned => format!(
            "the workload was answered {ip} for the host of a TCP ServiceEntry with port {port} \
             and the answer has not run out: it goes straight out, accounted by the kernel"
        ),
        Reason::AgentPort => format!("a bind of the agent's port {port}, refused"),
        Reason::UndecidedSocket => {
            "a raw, ICMP or SCTP socket, refused at creation (rawSockets)".to_owned()
        }
    };
    // Nothing relays a datagram: what TCP would redirect, UDP sends as it is.
    let verdict = if caller.udp && d.verdict == Verdict::Redirect && d.reason != Reason::Dns {
        "pass"
    } else {
        d.verdict.name()
    };
    format!("{verdict} ({rule}) [{}]", d.reason.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config,
        plan::{Plan, compile},
    };

    /// A process of a workload of Kubernetes namespace `ns`.
    fn caller(p: &Plan, ns: &str) -> Caller {
        let pol = p.policies.of(ns);
        Caller {
            uid: 0,
            gid: 0,
            workload: Some((
                format!("{ns}/client"),
                Workload {
                    view: pol.view,
                    mode: pol.mode,
                    ..Workload::default()
                },
            )),
            learned: false,
            udp: false,
            netns: 0,
        }
    }

    #[test]
    fn explains_a_datagram_by_the_udp_entries() {
        let l = config::parse_str(
            "m.yaml",
            "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\nspec:\n  \
             outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n  \
             interception: {excludeOutboundIPRanges: [198.19.0.0/16]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {name: ntp, namespace: default}\nspec:\n  hosts: [ntp.example]\n  \
             addresses: [198.51.100.0/24]\n  ports: [{number: 123, name: ntp, protocol: UDP}]\n",
        )
        .expect("valid");
        let p = compile(&l.config);
        let cfg = Config {
            enabled: 1,
            listener_port: 15001,
            listener_v4: [127, 0, 0, 1],
            direct: 1,
            ..Config::default()
        };
        let udp = Caller {
            udp: true,
            ..caller(&p, "default")
        };
        let line = |c: &Caller, s: &str| explain(&p, &cfg, s.parse().unwrap(), c).join("\n");
        assert_eq!(
            line(&udp, "198.51.100.7:123"),
            "pass (REGISTRY_ONLY: allowed by a UDP port of a ServiceEntry or Service, \
             198.51.100.0/24 port 123) [registry-allowed]"
        );
        assert_eq!(
            line(&udp, "198.51.100.7:443"),
            "deny (REGISTRY_ONLY: no UDP port of a ServiceEntry or Service allows 198.51.100.7 \
             port 443: the datagram is refused with EPERM) [registry-denied]"
        );
        // An exclusion bypasses, and says it is a hole.
        assert_eq!(
            line(&udp, "198.19.0.5:443"),
            "bypass (excludeOutboundIPRanges 198.19.0.0/16: a hole in REGISTRY_ONLY, no \
             ServiceEntry needed) [excluded-cidr]"
        );
        // The UDP port is no TCP port.
        assert_eq!(
            line(&caller(&p, "default"), "198.51.100.7:123"),
            "deny (REGISTRY_ONLY: no ServiceEntry address allows 198.51.100.7 port 123) \
             [registry-denied]"
        );
    }

    #[test]
    fn explains_with_the_rule_that_decided() {
        let l = config::parse_str(
            "m.yaml",
            "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\nspec:\n  \
             interception:\n    excludeOutboundIPRanges: [198.19.0.0/16]\n",
        )
        .expect("valid");
        let p = compile(&l.config);
        let cfg = Config {
            enabled: 1,
            listener_port: 15001,
            listener_v4: [127, 0, 0, 1],
            direct: 1,
            ..Config::default()
        };
        let line = |s: &str| {
            let dst: SocketAddr = s.parse().unwrap();
            explain(&p, &cfg, dst, &caller(&p, "default")).join("\n")
        };
        assert_eq!(
            line("198.18.0.10:80"),
            "redirect (includeOutboundIPRanges 0.0.0.0/0) [included-cidr]"
        );
        assert_eq!(
            line("198.19.3.4:80"),
            "bypass (excludeOutboundIPRanges 198.19.0.0/16) [excluded-cidr]"
        );
        // A v4-mapped destination is explained by the IPv4 rules.
        assert_eq!(
            line("[::ffff:198.19.3.4]:80"),
            "bypass (excludeOutboundIPRanges 198.19.0.0/16) [excluded-cidr]"
        );
        assert_eq!(
            line("[::1]:80"),
            "bypass (the workload's own loopback: no includeOutboundIPRanges range inside \
             loopback names it) [loopback]"
        );
        assert_eq!(
            line("127.0.0.1:6379"),
            "bypass (the workload's own loopback: 127.0.0.1 is never captured) [loopback]"
        );
        let outside = Caller {
            workload: None,
            ..caller(&p, "default")
        };
        assert_eq!(
            explain(&p, &cfg, "127.20.0.10:80".parse().unwrap(), &outside).join("\n"),
            "bypass (made in a network namespace that is not enrolled) [not-enrolled]"
        );
        assert_eq!(
            line("127.0.0.1:15001"),
            "bypass (the agent's outbound listener 127.0.0.1:15001) [agent-listener]"
        );
        // Under REGISTRY_ONLY a ServiceEntry without addresses opens its port to the agent.
        let l = config::parse_str(
            "m.yaml",
            "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\nspec:\n  \
             outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: h}\n\
             spec: {hosts: [httpbin.org], ports: [{number: 80, name: http, protocol: HTTP}]}\n",
        )
        .expect("valid");
        let p = compile(&l.config);
        let c = caller(&p, "default");
        assert_eq!(
            explain(&p, &cfg, "198.18.0.1:80".parse().unwrap(), &c).join("\n"),
            "redirect (REGISTRY_ONLY: port 80 belongs to a ServiceEntry without addresses; the \
             agent decides by HTTP Host or TLS SNI) [registry-allowed]"
        );
        assert_eq!(
            explain(&p, &cfg, "198.18.0.1:81".parse().unwrap(), &c).join("\n"),
            "deny (REGISTRY_ONLY: no ServiceEntry address allows 198.18.0.1 port 81) [registry-denied]"
        );
        // The same destination, learnt from a DNS answer the workload got.
        let learnt = Caller { learned: true, ..c };
        assert_eq!(
            explain(&p, &cfg, "198.18.0.1:81".parse().unwrap(), &learnt).join("\n"),
            "direct (the workload was answered 198.18.0.1 for the host of a TCP ServiceEntry \
             with port 81 and the answer has not run out: it goes straight out, accounted by \
             the kernel) [dns-learned]"
        );
        // A TCP entry by address needs nothing from the stream.
        let l = config::parse_str(
            "m.yaml",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\n\
             spec: {hosts: [db.example], addresses: [198.18.5.0/24], resolution: NONE, \
             ports: [{number: 5432, name: tcp, protocol: TCP}]}\n",
        )
        .expect("valid");
        let p = compile(&l.config);
        let c = caller(&p, "default");
        assert_eq!(
            explain(&p, &cfg, "198.18.5.9:5432".parse().unwrap(), &c).join("\n"),
            "direct (TCP ServiceEntry address 198.18.5.0/24 port 5432: nothing in the stream to \
             decide, so it goes straight out, accounted by the kernel) [tcp-entry]"
        );
    }

    #[test]
    fn dns_capture_is_explained() {
        let l = config::parse_str(
            "m.yaml",
            "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\n",
        )
        .expect("valid");
        let p = compile(&l.config);
        let cfg = Config {
            enabled: 1,
            listener_port: 15001,
            listener_v4: [127, 0, 0, 1],
            direct: 1,
            dns_port: 15053,
            ..Config::default()
        };
        let mut c = caller(&p, "default");
        let at = |cfg: &Config, c: &Caller, dst: &str| {
            explain(&p, cfg, dst.parse().unwrap(), c).join("\n")
        };
        let forwards = "the agent's DNS server on port 15053 of the workload's namespace \
                        answers it or forwards it to";
        assert_eq!(
            at(&cfg, &c, "198.18.0.54:53"),
            format!(
                "redirect (a DNS query (spec.dns.capture ALL: to any nameserver): {forwards} \
                 198.18.0.54) [dns]"
            )
        );
        let resolv = Config {
            dns_capture: egress_common::DNS_CAPTURE_RESOLV_CONF,
            ..cfg
        };
        assert_eq!(
            at(&resolv, &c, "198.18.0.54:53"),
            format!(
                "redirect (a DNS query (spec.dns.capture RESOLV_CONF, but the workload's \
                 nameservers are not known: to any nameserver): {forwards} 198.18.0.54) [dns]"
            )
        );
        // Nameservers known, and this is none of them (a compiled plan holds no workload's:
        // the live maps do, see tests/tests/dns.rs).
        if let Some((_, w)) = &mut c.workload {
            w.nameservers = 1;
        }
        assert_eq!(
            at(&resolv, &c, "198.18.0.54:53"),
            "redirect (includeOutboundIPRanges 0.0.0.0/0) [included-cidr]"
        );
    }
}
