//! Configuration → datapath plan: exactly the entries the maps must hold. Pure and
//! deterministic; `Plan` also answers the decision's lookups in memory, so `egress explain
//! --config` decides without a kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use egress_common::{MODE_ALLOW_ANY, MODE_REGISTRY_ONLY, PORT_EXCLUDE, PORT_INCLUDE, Tables};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::{MeshConfig, Mode};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub mode: u8,
    pub include_v4: BTreeSet<Ipv4Net>,
    pub include_v6: BTreeSet<Ipv6Net>,
    pub exclude_v4: BTreeSet<Ipv4Net>,
    pub exclude_v6: BTreeSet<Ipv6Net>,
    pub ports: BTreeMap<u16, u8>,
    pub exclude_uids: BTreeSet<u32>,
    pub exclude_gids: BTreeSet<u32>,
    /// (port, network) pairs that ServiceEntry addresses allow under REGISTRY_ONLY.
    pub allow_v4: BTreeSet<(u16, Ipv4Net)>,
    pub allow_v6: BTreeSet<(u16, Ipv6Net)>,
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
    let (include_v4, include_v6) = split(&i.include_ranges);
    let (exclude_v4, exclude_v6) = split(&i.exclude_ranges);
    let mut ports = BTreeMap::new();
    for p in &i.include_ports {
        *ports.entry(*p).or_insert(0) |= PORT_INCLUDE;
    }
    for p in &i.exclude_ports {
        *ports.entry(*p).or_insert(0) |= PORT_EXCLUDE;
    }
    let mut allow_v4 = BTreeSet::new();
    let mut allow_v6 = BTreeSet::new();
    for se in &c.service_entries {
        for port in &se.spec.ports {
            let Ok(port) = u16::try_from(port.number) else {
                continue;
            };
            for a in &se.addresses {
                match a.trunc() {
                    IpNet::V4(n) => allow_v4.insert((port, n)),
                    IpNet::V6(n) => allow_v6.insert((port, n)),
                };
            }
        }
    }
    Plan {
        mode: match c.mode {
            Mode::AllowAny => MODE_ALLOW_ANY,
            Mode::RegistryOnly => MODE_REGISTRY_ONLY,
        },
        include_v4,
        include_v6,
        exclude_v4,
        exclude_v6,
        ports,
        exclude_uids: i.exclude_uids.iter().copied().collect(),
        exclude_gids: i.exclude_gids.iter().copied().collect(),
        allow_v4,
        allow_v6,
    }
}

fn lpm<'a, N: 'a + Copy>(
    nets: impl Iterator<Item = &'a N>,
    contains: impl Fn(&N) -> bool,
    len: impl Fn(&N) -> u8,
) -> Option<u8> {
    nets.filter(|n| contains(n)).map(len).max()
}

impl Tables for Plan {
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
    fn allow_v4(&self, a: [u8; 4], port: u16) -> Option<u8> {
        let a = Ipv4Addr::from(a);
        lpm(
            self.allow_v4.iter(),
            |(p, n)| *p == port && n.contains(&a),
            |(_, n)| n.prefix_len(),
        )
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
    fn allow_v6(&self, a: [u8; 16], port: u16) -> Option<u8> {
        let a = Ipv6Addr::from(a);
        lpm(
            self.allow_v6.iter(),
            |(p, n)| *p == port && n.contains(&a),
            |(_, n)| n.prefix_len(),
        )
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
    use egress_common::{Config, Query, Reason, Verdict, decide};

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
        assert_eq!(p.mode, MODE_REGISTRY_ONLY);
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
                (443, "127.20.1.0/24".parse().unwrap()),
                (8443, "127.20.1.0/24".parse().unwrap())
            ])
        );
        assert_eq!(
            p.allow_v6,
            BTreeSet::from([
                (443, "2001:db8::5/128".parse().unwrap()),
                (8443, "2001:db8::5/128".parse().unwrap())
            ])
        );
        assert_eq!(compile(&l.config), p, "deterministic");

        let cfg = Config {
            enabled: 1,
            listener_port: 15001,
            mode: p.mode,
            ..Config::default()
        };
        let q = |dst: [u8; 4], port| Query {
            dst,
            port,
            uid: 0,
            gid: 0,
            mark: 0,
            netns: 0,
        };
        let d = decide(&p, &cfg, &q([127, 20, 1, 9], 443));
        assert_eq!(
            (d.verdict, d.reason, d.prefix_len),
            (Verdict::Redirect, Reason::RegistryAllowed, 24)
        );
        let d = decide(&p, &cfg, &q([127, 20, 2, 9], 443));
        assert_eq!(
            (d.verdict, d.reason),
            (Verdict::Deny, Reason::RegistryDenied)
        );
        let d = decide(&p, &cfg, &q([127, 20, 9, 1], 443));
        assert_eq!(
            (d.verdict, d.reason, d.prefix_len),
            (Verdict::Bypass, Reason::ExcludedCidr, 24)
        );
    }

    #[test]
    fn default_configuration_captures_everything() {
        let p = compile(&MeshConfig::default());
        assert_eq!(p.include_v4, BTreeSet::from(["0.0.0.0/0".parse().unwrap()]));
        assert_eq!(p.include_v6, BTreeSet::from(["::/0".parse().unwrap()]));
        assert_eq!(p.mode, MODE_ALLOW_ANY);
        assert_eq!(
            network("127.20.9.7".parse().unwrap(), 16).to_string(),
            "127.20.0.0/16"
        );
    }
}
