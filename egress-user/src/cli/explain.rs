//! `egress explain`: the verdict for one destination and the rule that decided, from the live
//! maps or from a configuration file, through the same decision function as the kernel.

use std::net::{IpAddr, SocketAddr};

use egress_common::{Config, Decision, Query, Reason, Tables, decide, v4_unmapped};

use crate::plan::network;

/// Who makes the connect() being explained.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// `SO_MARK` of the socket.
    pub mark: u32,
    /// Network namespace cookie; `None` is the agent's namespace.
    pub netns: Option<u64>,
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
    match t.service(dst) {
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
    fn q<A>(dst: A, port: u16, c: &Caller, netns: u64, service: bool) -> Query<A> {
        Query {
            dst,
            port,
            uid: c.uid,
            gid: c.gid,
            mark: c.mark,
            netns,
            service,
        }
    }
    let (port, netns) = (dst.port(), caller.netns.unwrap_or(cfg.netns_cookie));
    match dst.ip() {
        IpAddr::V4(a) => decide(t, cfg, &q(a.octets(), port, caller, netns, service)),
        IpAddr::V6(a) => decide(t, cfg, &q(a.octets(), port, caller, netns, service)),
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
    let rule = match d.reason {
        Reason::Agent => format!("the agent's own connection, socket mark {}", cfg.agent_mark),
        Reason::OtherNetns => "made in another network namespace than the agent's".to_owned(),
        Reason::ExcludedUid => format!("excludeUids {}", caller.uid),
        Reason::ExcludedGid => format!("excludeGids {}", caller.gid),
        Reason::ExcludedPort => format!("excludeOutboundPorts {port}"),
        Reason::AgentListener => format!("the agent's outbound listener {dst}"),
        Reason::ExcludedCidr => format!("excludeOutboundIPRanges {net}"),
        Reason::IncludedPort => format!("includeOutboundPorts {port}"),
        Reason::IncludedCidr => format!("includeOutboundIPRanges {net}"),
        Reason::NotIncluded if cfg.enabled == 0 => "the datapath is not enabled".to_owned(),
        Reason::NotIncluded => "not in includeOutboundIPRanges or includeOutboundPorts".to_owned(),
        Reason::RegistryAllowed if d.prefix_len == 0 => format!(
            "REGISTRY_ONLY: port {port} belongs to a ServiceEntry without addresses; the agent \
             decides by HTTP Host or TLS SNI"
        ),
        Reason::RegistryAllowed => {
            format!("REGISTRY_ONLY: allowed by ServiceEntry address {net} port {port}")
        }
        Reason::RegistryDenied => {
            format!("REGISTRY_ONLY: no ServiceEntry address allows {ip} port {port}")
        }
        Reason::RegistryService => {
            "REGISTRY_ONLY: reached through a Kubernetes Service, which is registered".to_owned()
        }
        Reason::ServiceNoEndpoints => format!("Kubernetes Service {dst} has no endpoints"),
        Reason::TcpEntry => format!(
            "TCP ServiceEntry address {net} port {port}: nothing in the stream to decide, so it \
             goes straight out, accounted by the kernel"
        ),
    };
    format!("{} ({rule}) [{}]", d.verdict.name(), d.reason.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config, plan::compile};

    #[test]
    fn explains_with_the_rule_that_decided() {
        let l = config::parse_str(
            "m.yaml",
            "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\nspec:\n  \
             interception:\n    excludeOutboundIPRanges: [127.21.0.0/16]\n",
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
            let c = Caller {
                uid: 0,
                gid: 0,
                mark: 0,
                netns: None,
            };
            explain(&p, &cfg, dst, &c).join("\n")
        };
        assert_eq!(
            line("127.20.0.10:80"),
            "redirect (includeOutboundIPRanges 0.0.0.0/0) [included-cidr]"
        );
        assert_eq!(
            line("127.21.3.4:80"),
            "bypass (excludeOutboundIPRanges 127.21.0.0/16) [excluded-cidr]"
        );
        // A v4-mapped destination is explained by the IPv4 rules.
        assert_eq!(
            line("[::ffff:127.21.3.4]:80"),
            "bypass (excludeOutboundIPRanges 127.21.0.0/16) [excluded-cidr]"
        );
        assert_eq!(
            line("[::1]:80"),
            "redirect (includeOutboundIPRanges ::/0) [included-cidr]"
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
        let cfg = Config {
            mode: egress_common::MODE_REGISTRY_ONLY,
            ..cfg
        };
        let c = Caller {
            uid: 0,
            gid: 0,
            mark: 0,
            netns: None,
        };
        assert_eq!(
            explain(&p, &cfg, "198.18.0.1:80".parse().unwrap(), &c).join("\n"),
            "redirect (REGISTRY_ONLY: port 80 belongs to a ServiceEntry without addresses; the \
             agent decides by HTTP Host or TLS SNI) [registry-allowed]"
        );
        assert_eq!(
            explain(&p, &cfg, "198.18.0.1:81".parse().unwrap(), &c).join("\n"),
            "deny (REGISTRY_ONLY: no ServiceEntry address allows 198.18.0.1 port 81) [registry-denied]"
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
        assert_eq!(
            explain(&p, &cfg, "198.18.5.9:5432".parse().unwrap(), &c).join("\n"),
            "direct (TCP ServiceEntry address 198.18.5.0/24 port 5432: nothing in the stream to \
             decide, so it goes straight out, accounted by the kernel) [tcp-entry]"
        );
    }
}
