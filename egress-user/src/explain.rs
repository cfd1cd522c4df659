//! `egress explain`: the verdict for one destination and the rule that decided, from the live
//! maps or from a configuration file, through the same decision function as the kernel.

use std::net::{IpAddr, SocketAddr};

use egress_common::{Config, Decision, Query, Reason, Tables, decide, v4_unmapped};

use crate::plan::network;

/// Decide `dst` as a connect() by `uid`/`gid` from the agent's network namespace would be.
pub fn explain<T: Tables>(t: &T, cfg: &Config, dst: SocketAddr, uid: u32, gid: u32) -> Decision {
    fn q<A>(dst: A, port: u16, uid: u32, gid: u32, netns: u64) -> Query<A> {
        Query {
            dst,
            port,
            uid,
            gid,
            mark: 0,
            netns,
        }
    }
    let (port, netns) = (dst.port(), cfg.netns_cookie);
    match dst.ip() {
        IpAddr::V4(a) => decide(t, cfg, &q(a.octets(), port, uid, gid, netns)),
        IpAddr::V6(a) => match v4_unmapped(&a.octets()) {
            Some(v4) => decide(t, cfg, &q(v4, port, uid, gid, netns)),
            None => decide(t, cfg, &q(a.octets(), port, uid, gid, netns)),
        },
    }
}

/// One line: `verdict (rule) [reason-code]`.
pub fn describe(d: &Decision, cfg: &Config, dst: SocketAddr, uid: u32, gid: u32) -> String {
    let ip = match dst.ip() {
        IpAddr::V6(a) => v4_unmapped(&a.octets()).map_or(IpAddr::V6(a), |v| IpAddr::from(v)),
        v4 => v4,
    };
    let net = network(ip, d.prefix_len);
    let port = dst.port();
    let rule = match d.reason {
        Reason::Agent => format!("the agent's own connection, socket mark {}", cfg.agent_mark),
        Reason::OtherNetns => "made in another network namespace than the agent's".to_owned(),
        Reason::ExcludedUid => format!("excludeUids {uid}"),
        Reason::ExcludedGid => format!("excludeGids {gid}"),
        Reason::ExcludedPort => format!("excludeOutboundPorts {port}"),
        Reason::AgentListener => format!("the agent's outbound listener {dst}"),
        Reason::ExcludedCidr => format!("excludeOutboundIPRanges {net}"),
        Reason::IncludedPort => format!("includeOutboundPorts {port}"),
        Reason::IncludedCidr => format!("includeOutboundIPRanges {net}"),
        Reason::NotIncluded if cfg.enabled == 0 => "the datapath is not enabled".to_owned(),
        Reason::NotIncluded => "not in includeOutboundIPRanges or includeOutboundPorts".to_owned(),
        Reason::RegistryAllowed => {
            format!("REGISTRY_ONLY: allowed by ServiceEntry address {net} port {port}")
        }
        Reason::RegistryDenied => {
            format!("REGISTRY_ONLY: no ServiceEntry address allows {ip} port {port}")
        }
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
            ..Config::default()
        };
        let line = |s: &str| {
            let dst: SocketAddr = s.parse().unwrap();
            describe(&explain(&p, &cfg, dst, 0, 0), &cfg, dst, 0, 0)
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
    }
}
