//! Addresses for ServiceEntries that declare hosts but no `addresses` (as Istio's DNS proxy
//! allocates them with `ISTIO_META_DNS_AUTO_ALLOCATE`): one IPv4 and one IPv6 address per
//! entry, from `spec.autoAllocate` (240.240.0.0/16 and 2001:2::/48 unless set), shared by its
//! hosts as `addresses` would be. DNS answers them for the entry's hosts, and the agent knows
//! the entry by them, so a TCP entry by host is told apart from the others on its port.
//!
//! Entries with `resolution: NONE` (the client's own address is the destination) and wildcard
//! hosts get none, as in Istio.
//!
//! An address never moves: an entry keeps it across reloads and restarts (the allocations are
//! kept in a file) whatever other entries come and go, and starts where a hash of the entry's
//! name points, so that even a lost file mostly gives the same addresses back. An address
//! freed by a removed entry is not given to another for an hour, so that clients that cached
//! it do not reach the wrong service.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use ipnet::{Ipv4Net, Ipv6Net};
use log::warn;
use serde::{Deserialize, Serialize};

use super::{MeshConfig, ServiceEntry};

/// How long a freed address waits before another entry may get it.
pub const QUARANTINE_SECS: u64 = 3600;

/// The allocations in force and the freed addresses still waiting, as kept on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocations {
    /// `namespace/name` → its addresses.
    entries: BTreeMap<String, Pair>,
    /// Addresses freed, with when (seconds since the epoch).
    freed: Vec<(IpAddr, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Pair {
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

/// The allocator: the allocations and the file they are kept in.
#[derive(Clone, Debug)]
pub struct Allocator {
    path: Option<PathBuf>,
    held: Allocations,
    /// The agent captures DNS: TCP hosts are learnt from the answers.
    learn: bool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The entries that get addresses: hosts, no addresses, a resolution other than NONE, no
/// wildcard host.
fn wants_addresses(se: &ServiceEntry) -> bool {
    se.addresses.is_empty()
        && !se.spec.hosts.is_empty()
        && se.spec.hosts.iter().all(|h| !h.contains('*'))
        && matches!(
            se.spec.resolution.as_deref(),
            Some("DNS" | "DNS_ROUND_ROBIN" | "STATIC")
        )
}

/// FNV-1a of the entry's name: where its search for a free address starts.
fn start(key: &str) -> u128 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    u128::from(h)
}

impl Allocator {
    /// The allocations kept in `path` (none when it does not exist yet; a file that cannot be
    /// read is named in a warning and started over).
    pub fn load(path: Option<&Path>) -> Allocator {
        let held = match path.map(std::fs::read) {
            Some(Ok(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(
                    "the address allocations {} are not valid ({e}): allocating again",
                    path.map_or(String::new(), |p| p.display().to_string())
                );
                Allocations::default()
            }),
            Some(Err(e)) if e.kind() != std::io::ErrorKind::NotFound => {
                warn!(
                    "reading the address allocations {}: {e}: allocating again",
                    path.map_or(String::new(), |p| p.display().to_string())
                );
                Allocations::default()
            }
            _ => Allocations::default(),
        };
        Allocator {
            path: path.map(Path::to_path_buf),
            held,
            learn: false,
        }
    }

    /// When the agent captures DNS: the configurations `assign` is given then learn the
    /// addresses of their TCP hosts from DNS answers (`MeshConfig::learn_from_dns`).
    pub fn learning(mut self, on: bool) -> Allocator {
        self.learn = on;
        self
    }

    /// Give every entry of `c` that wants addresses its own (kept, or new), in
    /// `ServiceEntry::allocated`; free those of entries that are gone. Nothing is written to
    /// disk: `save` does, once the configuration is in force.
    pub fn assign(&mut self, c: &mut MeshConfig) -> Result<()> {
        c.learn_from_dns = self.learn;
        let range = &c.auto_allocate;
        if !range.enabled {
            return Ok(());
        }
        let t = now();
        self.held
            .freed
            .retain(|(_, at)| t.saturating_sub(*at) < QUARANTINE_SECS);
        let wanted: Vec<String> = c
            .service_entries
            .iter()
            .filter(|se| wants_addresses(se))
            .map(|se| format!("{}/{}", se.namespace, se.name))
            .collect();
        // Gone, or outside the ranges now: freed first, so that their addresses wait.
        let gone: Vec<String> = self
            .held
            .entries
            .iter()
            .filter(|(k, p)| {
                !wanted.contains(k) || !range.v4.contains(&p.v4) || !range.v6.contains(&p.v6)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(p) = self.held.entries.remove(&k) {
                self.held.freed.push((IpAddr::V4(p.v4), t));
                self.held.freed.push((IpAddr::V6(p.v6), t));
            }
        }
        for key in &wanted {
            if self.held.entries.contains_key(key) {
                continue;
            }
            let v4 = self.free_v4(range.v4, key)?;
            let v6 = self.free_v6(range.v6, key)?;
            self.held.entries.insert(key.clone(), Pair { v4, v6 });
        }
        for se in &mut c.service_entries {
            let key = format!("{}/{}", se.namespace, se.name);
            se.allocated = match self.held.entries.get(&key) {
                Some(p) => vec![IpAddr::V4(p.v4), IpAddr::V6(p.v6)],
                None => Vec::new(),
            };
        }
        Ok(())
    }

    fn taken(&self, a: IpAddr) -> bool {
        self.held.freed.iter().any(|(f, _)| *f == a)
            || self.held.entries.values().any(|p| match a {
                IpAddr::V4(v4) => p.v4 == v4,
                IpAddr::V6(v6) => p.v6 == v6,
            })
    }

    fn free_v4(&self, net: Ipv4Net, key: &str) -> Result<Ipv4Addr> {
        // Not the network nor the broadcast address.
        let size = (1u64 << (32 - net.prefix_len())) - 2;
        let base = u32::from(net.network());
        let first = (start(key) % u128::from(size)) as u64;
        for i in 0..size {
            let a = Ipv4Addr::from(base + 1 + ((first + i) % size) as u32);
            if !self.taken(IpAddr::V4(a)) {
                return Ok(a);
            }
        }
        bail!("no address left in {net} for ServiceEntry {key} (spec.autoAllocate.ipv4Range)")
    }

    fn free_v6(&self, net: Ipv6Net, key: &str) -> Result<Ipv6Addr> {
        let bits = 128 - u32::from(net.prefix_len());
        let size = if bits >= 127 {
            u128::MAX - 1
        } else {
            (1u128 << bits) - 1
        };
        let base = u128::from(net.network());
        let first = start(key) % size;
        // The range is far larger than any configuration: a bounded search is enough.
        for i in 0..size.min(1 << 20) {
            let a = Ipv6Addr::from(base + 1 + (first + i) % size);
            if !self.taken(IpAddr::V6(a)) {
                return Ok(a);
            }
        }
        bail!("no address left in {net} for ServiceEntry {key} (spec.autoAllocate.ipv6Range)")
    }

    /// Keep the allocations for the next start (written whole, then renamed).
    pub fn save(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.held)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;

    fn mesh(n: usize, extra: &str) -> MeshConfig {
        let mut text = String::from(extra);
        for i in 0..n {
            text.push_str(&format!(
                "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
                 metadata: {{name: se{i}, namespace: team}}\n\
                 spec: {{hosts: [h{i}.example], ports: [{{number: 5432, name: tcp, protocol: TCP}}], \
                 resolution: DNS}}\n"
            ));
        }
        parse_str("m.yaml", &text).unwrap().config
    }

    fn of<'a>(c: &'a MeshConfig, name: &str) -> &'a [IpAddr] {
        &c.service_entries
            .iter()
            .find(|se| se.name == name)
            .unwrap()
            .allocated
    }

    #[test]
    fn an_entry_keeps_its_addresses_across_reloads_and_restarts() {
        let dir = std::env::temp_dir().join(format!("egress-alloc-{}", std::process::id()));
        let path = dir.join("addresses.json");
        let mut a = Allocator::load(Some(&path));
        let mut c = mesh(1, "");
        a.assign(&mut c).unwrap();
        let first = of(&c, "se0").to_vec();
        assert_eq!(first.len(), 2);
        assert!(
            matches!(first[0], IpAddr::V4(v) if "240.240.0.0/16".parse::<Ipv4Net>().unwrap().contains(&v))
        );
        assert!(
            matches!(first[1], IpAddr::V6(v) if "2001:2::/48".parse::<Ipv6Net>().unwrap().contains(&v))
        );
        a.save().unwrap();
        // Fifty more entries, then a restart: the first keeps its addresses, all distinct.
        let mut c = mesh(51, "");
        let mut b = Allocator::load(Some(&path));
        b.assign(&mut c).unwrap();
        assert_eq!(of(&c, "se0"), first);
        let mut all: Vec<IpAddr> = c
            .service_entries
            .iter()
            .flat_map(|se| se.allocated.clone())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 102);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn freed_addresses_wait_and_some_entries_get_none() {
        let mut a = Allocator::load(None);
        let mut c = mesh(2, "");
        a.assign(&mut c).unwrap();
        let gone = of(&c, "se1").to_vec();
        // se1 is removed: its addresses wait; a new entry gets others.
        let mut c = mesh(1, "");
        c.service_entries.extend(
            mesh(0, "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
                 metadata: {name: se1-again, namespace: team}\n\
                 spec: {hosts: [again.example], ports: [{number: 80, name: http, protocol: HTTP}], \
                 resolution: DNS}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
                 metadata: {name: passthrough, namespace: team}\n\
                 spec: {hosts: [p.example], ports: [{number: 80, name: http, protocol: HTTP}], \
                 resolution: NONE}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
                 metadata: {name: wild, namespace: team}\n\
                 spec: {hosts: [\"*.w.example\"], ports: [{number: 80, name: http, protocol: HTTP}], \
                 resolution: DNS, endpoints: [{address: w.example}]}\n")
            .service_entries,
        );
        a.assign(&mut c).unwrap();
        let again = of(&c, "se1-again");
        assert_eq!(again.len(), 2);
        assert!(
            again.iter().all(|x| !gone.contains(x)),
            "{again:?} {gone:?}"
        );
        assert!(of(&c, "passthrough").is_empty());
        assert!(of(&c, "wild").is_empty());
    }

    #[test]
    fn a_full_range_is_an_error_naming_the_entry_and_the_knob() {
        let head = "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\n\
                    spec: {autoAllocate: {ipv4Range: 127.240.0.0/28, ipv6Range: \"2001:db8:ff::/64\"}}\n";
        let mut a = Allocator::load(None);
        let mut c = mesh(14, head);
        a.assign(&mut c).unwrap();
        let mut c = mesh(15, head);
        let e = a.assign(&mut c).unwrap_err().to_string();
        assert!(
            e.contains("no address left in 127.240.0.0/28 for ServiceEntry team/se14"),
            "{e}"
        );
        assert!(e.contains("spec.autoAllocate.ipv4Range"), "{e}");
        // Turned off: nothing is allocated.
        let off = "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\n\
                   spec: {autoAllocate: {enabled: false}}\n";
        let mut c = mesh(1, off);
        Allocator::load(None).assign(&mut c).unwrap();
        assert!(of(&c, "se0").is_empty());
    }
}
