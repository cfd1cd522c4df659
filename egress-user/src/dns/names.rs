//! The names the registry owns and what each one is: addresses, or an alias of another name.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use hickory_proto::rr::Name;

use crate::{
    config::{MeshConfig, ServiceEntry, k8s},
    plan,
};

/// The cluster domain Kubernetes Service names end in.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// How many aliases an answer follows before it stops (a loop of ExternalName Services stops
/// earlier, at the first name seen twice).
pub(super) const MAX_CHAIN: usize = 8;

/// What the registry holds for one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Data {
    /// Its addresses, both families.
    Addrs(Vec<IpAddr>),
    /// A CNAME to this target (an ExternalName Service).
    Alias(Name),
}

/// One resource's claim on a name, and who sees it.
#[derive(Clone, Debug)]
struct Claim {
    data: Data,
    /// The namespaces that see it (`exportTo`); `None`: every one.
    seen_by: Option<BTreeSet<String>>,
}

/// The ports one TCP entry by host opens for the addresses its host is answered, and the
/// namespaces that see it (`None`: every one).
type Learnt = (Vec<u16>, Option<BTreeSet<String>>);

impl Claim {
    fn seen_from(&self, namespace: &str) -> bool {
        self.seen_by.as_ref().is_none_or(|s| s.contains(namespace))
    }
}

/// The names the agent answers for, from the mesh configuration: ServiceEntry hosts (exact and
/// `*.` wildcards) and Kubernetes Service names. Built whole on each reload; queries for any
/// other name are forwarded.
///
/// - A ServiceEntry host answers with the entry's addresses that are single IPs (/32, /128),
///   else with the addresses the agent allocated for the entry; an entry with neither claims
///   no name, nor does a TCP entry by host whose addresses are learnt from the nameserver's
///   answers (`registry::learned_ports`). A lone `*` host claims nothing. Entries are seen from the namespaces they are
///   exported to (`exportTo`).
/// - A selector-less Kubernetes Service answers with its cluster IPs, or, without one (headless,
///   or not written in the configuration), with its ready endpoints' addresses; an
///   ExternalName Service is a CNAME to its `externalName`. Its names are
///   `name.ns.svc.cluster.local`, `name.ns.svc` and `name.ns`, and `name` alone from a workload
///   in namespace `ns`. Services with a selector are the cluster's own and are left to its DNS.
///
/// Where several resources claim one name, a ServiceEntry comes before a Service, and the
/// addresses of all the claims of the first kind are merged; an exact name comes before a
/// wildcard, a longer wildcard before a shorter one.
///
/// It also knows which names' answers teach a workload something (`learned_ports`,
/// `is_alias_target`), for the answers the agent forwards.
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// Lower-case names without the trailing dot.
    exact: HashMap<String, Vec<Claim>>,
    /// By the suffix after `*.`, lower case.
    wildcards: HashMap<String, Vec<Claim>>,
    /// Hosts of TCP entries whose addresses are learnt from DNS answers: the ports each
    /// entry opens, and who sees it. Exact names, then wildcards by suffix.
    learnt: HashMap<String, Vec<Learnt>>,
    learnt_wildcards: HashMap<String, Vec<Learnt>>,
    /// The targets of ExternalName Services.
    alias_targets: BTreeSet<String>,
    /// The nameservers learnt from (`spec.dns.learnFrom`); empty: every one.
    learn_from: Vec<ipnet::IpNet>,
}

impl Names {
    /// The names of a mesh configuration.
    pub fn build(config: &MeshConfig) -> Names {
        let mut names = Names {
            learn_from: config.dns_learn_from.clone(),
            ..Names::default()
        };
        for se in &config.service_entries {
            let ports = if config.learn_from_dns {
                crate::registry::learned_ports(se)
            } else {
                Vec::new()
            };
            // Every port learnt: the nameserver's answers are the ones the workload uses (and
            // learns from), not the allocated addresses.
            let all_learnt = !ports.is_empty() && ports.len() == se.spec.ports.len();
            if !ports.is_empty() {
                for host in &se.spec.hosts {
                    let host = host.to_ascii_lowercase();
                    let table = match host.strip_prefix("*.") {
                        Some(suffix) => names.learnt_wildcards.entry(suffix.to_owned()),
                        None => names.learnt.entry(host),
                    };
                    table
                        .or_default()
                        .push((ports.clone(), plan::exported_to(se)));
                }
            }
            let Some(addrs) = entry_addresses(se).filter(|_| !all_learnt) else {
                continue;
            };
            let seen_by = plan::exported_to(se);
            for host in &se.spec.hosts {
                let host = host.to_ascii_lowercase();
                let claim = Claim {
                    data: Data::Addrs(addrs.clone()),
                    seen_by: seen_by.clone(),
                };
                let table = match host.strip_prefix("*.") {
                    Some(suffix) => names.wildcards.entry(suffix.to_owned()),
                    None if host == "*" => continue,
                    None => names.exact.entry(host),
                };
                table.or_default().push(claim);
            }
        }
        for svc in &config.services {
            let Some(data) = service_data(svc, &config.endpoints) else {
                continue;
            };
            if let Data::Alias(target) = &data {
                let t = target.to_ascii().to_ascii_lowercase();
                names
                    .alias_targets
                    .insert(t.trim_end_matches('.').to_owned());
            }
            let name = format!(
                "{}.{}.svc.{CLUSTER_DOMAIN}",
                svc.name.to_ascii_lowercase(),
                svc.namespace.to_ascii_lowercase()
            );
            names.exact.entry(name).or_default().push(Claim {
                data,
                seen_by: None,
            });
        }
        names
    }

    /// What `name` (lower case, no trailing dot) is, seen from `namespace`, and the name it is
    /// registered under. With `search`, the short forms of Kubernetes Service names count too:
    /// `name.ns.svc`, `name.ns`, and `name` for `name.<namespace>.svc.cluster.local`.
    pub(super) fn lookup(
        &self,
        name: &str,
        namespace: &str,
        search: bool,
    ) -> Option<(String, Data)> {
        if let Some(d) = self.exact_data(name, namespace) {
            return Some((name.to_owned(), d));
        }
        if search {
            let labels = name.split('.').count();
            let long = match labels {
                1 if !namespace.is_empty() => {
                    Some(format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}"))
                }
                2 => Some(format!("{name}.svc.{CLUSTER_DOMAIN}")),
                3 if name.ends_with(".svc") => Some(format!("{name}.{CLUSTER_DOMAIN}")),
                _ => None,
            };
            if let Some(long) = long
                && let Some(d) = self.exact_data(&long, namespace)
            {
                return Some((long, d));
            }
        }
        // The longest wildcard suffix first: the name after each of its dots in turn.
        name.match_indices('.')
            .filter_map(|(i, _)| self.wildcards.get(&name[i + 1..]))
            .find_map(|claims| merge(claims, namespace))
            .map(|d| (name.to_owned(), d))
    }

    /// The ports an address in an answer for `name` (lower case, no trailing dot) opens for a
    /// workload in `namespace`: those of the TCP entries by host it sees that claim the name,
    /// exactly or by the longest wildcard; none for any other name.
    pub fn learned_ports(&self, name: &str, namespace: &str) -> Vec<u16> {
        let seen = |claims: &Vec<Learnt>| {
            let mut ports: Vec<u16> = claims
                .iter()
                .filter(|(_, by)| by.as_ref().is_none_or(|s| s.contains(namespace)))
                .flat_map(|(p, _)| p.iter().copied())
                .collect();
            ports.sort_unstable();
            ports.dedup();
            (!ports.is_empty()).then_some(ports)
        };
        if let Some(p) = self.learnt.get(name).and_then(seen) {
            return p;
        }
        name.match_indices('.')
            .filter_map(|(i, _)| self.learnt_wildcards.get(&name[i + 1..]))
            .find_map(seen)
            .unwrap_or_default()
    }

    /// Whether any answer can teach a workload something: a TCP entry by host or an
    /// ExternalName Service is configured. Otherwise answers need not be read at all.
    pub fn learns(&self) -> bool {
        !self.learnt.is_empty()
            || !self.learnt_wildcards.is_empty()
            || !self.alias_targets.is_empty()
    }

    /// Whether the answers of nameserver `ns` may teach workloads addresses: every one, unless
    /// `spec.dns.learnFrom` names some.
    pub fn learns_from(&self, ns: IpAddr) -> bool {
        self.learn_from.is_empty() || self.learn_from.iter().any(|n| n.contains(&ns))
    }

    /// Whether an ExternalName Service names `name` (lower case, no trailing dot): the agent
    /// then connects to the address the client was answered for it.
    pub fn is_alias_target(&self, name: &str) -> bool {
        self.alias_targets.contains(name)
    }

    fn exact_data(&self, name: &str, namespace: &str) -> Option<Data> {
        self.exact.get(name).and_then(|c| merge(c, namespace))
    }
}

/// What the claims seen from `namespace` say: the first one's alias, or the addresses of all
/// those with addresses.
fn merge(claims: &[Claim], namespace: &str) -> Option<Data> {
    let mut seen = claims.iter().filter(|c| c.seen_from(namespace));
    match &seen.next()?.data {
        Data::Alias(target) => Some(Data::Alias(target.clone())),
        Data::Addrs(first) => {
            let mut all = first.clone();
            for c in seen {
                if let Data::Addrs(more) = &c.data {
                    all.extend(more);
                }
            }
            dedup(&mut all);
            Some(Data::Addrs(all))
        }
    }
}

/// A ServiceEntry's addresses for its hosts: those of `spec.addresses` that are single IPs,
/// else the allocated ones; `None` when it has neither.
fn entry_addresses(se: &ServiceEntry) -> Option<Vec<IpAddr>> {
    let mut single: Vec<IpAddr> = se
        .addresses
        .iter()
        .filter(|n| n.prefix_len() == n.max_prefix_len())
        .map(|n| n.addr())
        .collect();
    if single.is_empty() {
        single = se.allocated.clone();
    }
    dedup(&mut single);
    (!single.is_empty()).then_some(single)
}

/// What a Service's names are: ExternalName: an alias; selector-less: its cluster IPs, else its
/// ready endpoints' addresses; `None` for the cluster's own Services (with a selector) and for
/// those with no address at all.
fn service_data(svc: &k8s::Service, endpoints: &[k8s::EndpointSet]) -> Option<Data> {
    if svc.spec.type_.as_deref() == Some("ExternalName") {
        let target = svc.spec.external_name.as_deref()?;
        let mut name = Name::from_ascii(target).ok()?;
        name.set_fqdn(true);
        return Some(Data::Alias(name));
    }
    if svc.spec.selector.is_some() {
        return None;
    }
    let mut addrs = svc.cluster_ips.clone();
    if addrs.is_empty() {
        addrs = endpoints
            .iter()
            .filter(|e| e.namespace == svc.namespace && e.service == svc.name)
            .flat_map(|e| e.addresses.iter().copied())
            .collect();
    }
    dedup(&mut addrs);
    (!addrs.is_empty()).then_some(Data::Addrs(addrs))
}

/// Drops repeated addresses, keeping the first of each in place.
fn dedup(addrs: &mut Vec<IpAddr>) {
    let mut seen = BTreeSet::new();
    addrs.retain(|a| seen.insert(*a));
}
