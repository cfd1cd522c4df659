//! What workloads learn from the DNS answers the agent relays to them.
//!
//! An answer (forwarded, or chased behind an ExternalName's CNAME) whose chain of names reaches
//! a host of a TCP ServiceEntry without addresses (`Names::learned_ports`) teaches the workload
//! that asked its addresses: each (address, port of the host) goes into the kernel's `LEARNED`
//! map for the workload's network namespace until the answer's TTL and a grace period have run
//! out, so that its connection goes straight out (`DnsLearned`) and, under `REGISTRY_ONLY`, no
//! other address on that port does. The entries are written before the answer is passed on:
//! the client's connect right after it is never refused. The target of an ExternalName Service
//! is remembered too (no kernel entry): the agent then connects to the very address the client
//! was answered for it.
//!
//! Bounded per workload: at most [`MAX_PER_HOST`] addresses per host (the one refreshed longest
//! ago goes first: hosts such as S3 answer with ever new addresses) and [`MAX_NAMES_PER_ADDRESS`]
//! hosts per address (further ones are not recorded); both counted.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Mutex,
    time::Duration,
};

use hickory_proto::{
    op::Message,
    rr::{Name, RData},
};

use super::{Names, names::MAX_CHAIN};

/// Addresses a workload keeps per host.
pub const MAX_PER_HOST: usize = 256;
/// Hosts a workload keeps per address.
pub const MAX_NAMES_PER_ADDRESS: usize = 16;

/// The kernel's `LEARNED` map as the learner writes it.
pub trait Kernel: Send + Sync {
    /// Set (netns, address, port) to run out at `until` (CLOCK_MONOTONIC ns), or remove it.
    fn set(&self, netns: u64, addr: IpAddr, port: u16, until: Option<u64>);
    /// Remove every entry that ran out by `now`, whoever wrote it (an agent before this one
    /// too); how many went.
    fn sweep(&self, now: u64) -> u64;
}

/// The learner's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// (namespace, address, port) entries in force.
    pub entries: u64,
    /// Addresses dropped for a host's cap.
    pub host_cap: u64,
    /// Addresses not recorded for a further host: the address's cap.
    pub address_cap: u64,
    /// Entries that ran out.
    pub expired: u64,
}

/// What every workload learnt.
pub struct Learner {
    kernel: Box<dyn Kernel>,
    grace: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    books: HashMap<u64, Book>,
    counts: Counts,
}

/// One workload's.
#[derive(Default)]
struct Book {
    /// Its Kubernetes namespace: which entries it sees.
    namespace: String,
    /// By name (lower case, no trailing dot).
    hosts: HashMap<String, Host>,
    /// By address: the hosts it was learnt for.
    by_addr: HashMap<IpAddr, Vec<String>>,
    /// What the kernel holds: (address, port) → until.
    installed: BTreeMap<(IpAddr, u16), u64>,
}

#[derive(Default)]
struct Host {
    /// The ports its addresses open in the kernel (none for an ExternalName's target).
    ports: Vec<u16>,
    /// Its addresses, each with when it runs out.
    addrs: Vec<(IpAddr, u64)>,
}

impl Learner {
    /// Over the kernel's map; an answer holds for its TTL and `grace` more.
    pub fn new(kernel: impl Kernel + 'static, grace: Duration) -> Learner {
        Learner {
            kernel: Box::new(kernel),
            grace,
            state: Mutex::default(),
        }
    }

    /// Learn from `response`, an answer of nameserver `ns` relayed to the workload of network
    /// namespace `netns` in Kubernetes namespace `namespace`, at `now` (CLOCK_MONOTONIC ns).
    /// Nothing is learnt from a nameserver `spec.dns.learnFrom` does not name.
    pub fn observe(
        &self,
        (netns, namespace): (u64, &str),
        names: &Names,
        ns: IpAddr,
        response: &[u8],
        now: u64,
    ) {
        if !names.learns() || !names.learns_from(ns) {
            return;
        }
        let Some((chain, addrs)) = chain(response) else {
            return;
        };
        let wanted: Vec<(String, Vec<u16>)> = chain
            .into_iter()
            .filter_map(|name| {
                let ports = names.learned_ports(&name, namespace);
                (!ports.is_empty() || names.is_alias_target(&name)).then_some((name, ports))
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let State { books, counts } = &mut *state;
        let book = books.entry(netns).or_default();
        book.namespace = namespace.to_owned();
        let mut touched = Vec::new();
        for (name, ports) in wanted {
            for (addr, ttl) in &addrs {
                let until = now
                    .saturating_add(u64::from(*ttl) * 1_000_000_000)
                    .saturating_add(self.grace.as_nanos() as u64);
                let hosts = book.by_addr.entry(*addr).or_default();
                if !hosts.contains(&name) {
                    if hosts.len() >= MAX_NAMES_PER_ADDRESS {
                        counts.address_cap += 1;
                        continue;
                    }
                    hosts.push(name.clone());
                }
                let host = book.hosts.entry(name.clone()).or_default();
                host.ports.clone_from(&ports);
                match host.addrs.iter_mut().find(|(a, _)| a == addr) {
                    Some((_, u)) => *u = (*u).max(until),
                    None => host.addrs.push((*addr, until)),
                }
                touched.push(*addr);
                if host.addrs.len() > MAX_PER_HOST
                    && let Some(oldest) = (0..host.addrs.len()).min_by_key(|i| host.addrs[*i].1)
                {
                    let (gone, _) = host.addrs.swap_remove(oldest);
                    unlink(&mut book.by_addr, gone, &name);
                    counts.host_cap += 1;
                    touched.push(gone);
                }
            }
        }
        self.sync(netns, book, touched);
        counts.entries = books.values().map(|b| b.installed.len() as u64).sum();
    }

    /// Whether the workload of `netns` was answered `addr` for `name` (lower case, no trailing
    /// dot), and the answer has not run out by `now`.
    pub fn answered(&self, netns: u64, name: &str, addr: IpAddr, now: u64) -> bool {
        self.state.lock().is_ok_and(|s| {
            s.books
                .get(&netns)
                .and_then(|b| b.hosts.get(name))
                .is_some_and(|h| h.addrs.iter().any(|(a, u)| *a == addr && *u > now))
        })
    }

    /// Drop what ran out by `now`, in the books and in the kernel, and what workloads that
    /// are no longer `enrolled` learnt.
    pub fn sweep(&self, now: u64, enrolled: impl Fn(u64) -> bool) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let State { books, counts } = &mut *state;
        books.retain(|netns, book| {
            let keep = enrolled(*netns);
            if !keep {
                for (addr, port) in book.installed.keys() {
                    self.kernel.set(*netns, *addr, *port, None);
                }
            }
            keep
        });
        let installed = |books: &HashMap<u64, Book>| -> u64 {
            books.values().map(|b| b.installed.len() as u64).sum()
        };
        let before = installed(books);
        for (netns, book) in books.iter_mut() {
            let mut touched = Vec::new();
            for (name, host) in &mut book.hosts {
                host.addrs.retain(|(a, u)| {
                    let keep = *u > now;
                    if !keep {
                        touched.push(*a);
                        unlink(&mut book.by_addr, *a, name);
                    }
                    keep
                });
            }
            book.hosts.retain(|_, h| !h.addrs.is_empty());
            self.sync(*netns, book, touched);
        }
        books.retain(|_, b| !b.hosts.is_empty());
        counts.entries = installed(books);
        // And what an agent before this one left to run out.
        counts.expired += before - counts.entries + self.kernel.sweep(now);
    }

    /// A new configuration: each host keeps its addresses with the ports its entries now give
    /// it; a host no entry declares any more (nor an ExternalName names) is dropped.
    pub fn retarget(&self, names: &Names) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let State { books, counts } = &mut *state;
        for (netns, book) in books.iter_mut() {
            let mut touched = Vec::new();
            let namespace = book.namespace.clone();
            book.hosts.retain(|name, host| {
                host.ports = names.learned_ports(name, &namespace);
                let keep = !host.ports.is_empty() || names.is_alias_target(name);
                touched.extend(host.addrs.iter().map(|(a, _)| *a));
                if !keep {
                    for (a, _) in &host.addrs {
                        unlink(&mut book.by_addr, *a, name);
                    }
                }
                keep
            });
            self.sync(*netns, book, touched);
        }
        books.retain(|_, b| !b.hosts.is_empty());
        counts.entries = books.values().map(|b| b.installed.len() as u64).sum();
    }

    pub fn counts(&self) -> Counts {
        self.state.lock().map(|s| s.counts).unwrap_or_default()
    }

    /// Bring the kernel's entries of `addrs` in line with the book: for each port of the hosts
    /// an address is learnt for, the latest of their deadlines.
    fn sync(&self, netns: u64, book: &mut Book, mut addrs: Vec<IpAddr>) {
        addrs.sort_unstable();
        addrs.dedup();
        for addr in addrs {
            let mut want: BTreeMap<u16, u64> = BTreeMap::new();
            for name in book.by_addr.get(&addr).into_iter().flatten() {
                let Some(host) = book.hosts.get(name) else {
                    continue;
                };
                let Some((_, until)) = host.addrs.iter().find(|(a, _)| *a == addr) else {
                    continue;
                };
                for port in &host.ports {
                    let u = want.entry(*port).or_default();
                    *u = (*u).max(*until);
                }
            }
            let had: Vec<(u16, u64)> = book
                .installed
                .range((addr, 0)..=(addr, u16::MAX))
                .map(|((_, p), u)| (*p, *u))
                .collect();
            for (port, until) in &had {
                if !want.contains_key(port) {
                    self.kernel.set(netns, addr, *port, None);
                    book.installed.remove(&(addr, *port));
                } else if want[port] == *until {
                    want.remove(port);
                }
            }
            for (port, until) in want {
                self.kernel.set(netns, addr, port, Some(until));
                book.installed.insert((addr, port), until);
            }
            if book.by_addr.get(&addr).is_some_and(Vec::is_empty) {
                book.by_addr.remove(&addr);
            }
        }
    }
}

fn unlink(by_addr: &mut HashMap<IpAddr, Vec<String>>, addr: IpAddr, name: &str) {
    if let Some(hosts) = by_addr.get_mut(&addr) {
        hosts.retain(|h| h != name);
    }
}

/// A name as the learner keys it: lower case, without the trailing dot.
fn key(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

/// An address in an answer, with its TTL (seconds).
type Answered = (IpAddr, u32);

/// The names of an answer's chain, from the question's through its CNAMEs, and the addresses
/// (A and AAAA) of the last one, each with the least TTL along the chain; `None` when it has
/// no address.
fn chain(response: &[u8]) -> Option<(Vec<String>, Vec<Answered>)> {
    let m = Message::from_vec(response).ok()?;
    let mut name = m.queries.first()?.name().clone();
    let mut names = vec![key(&name)];
    let mut ttl = u32::MAX;
    for _ in 0..MAX_CHAIN {
        let next = m.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(t) if r.name == name => Some((t.0.clone(), r.ttl)),
            _ => None,
        });
        let Some((target, t)) = next else {
            break;
        };
        ttl = ttl.min(t);
        name = target;
        names.push(key(&name));
    }
    let addrs: Vec<Answered> = m
        .answers
        .iter()
        .filter(|r| r.name == name)
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((IpAddr::V4(a.0), ttl.min(r.ttl))),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), ttl.min(r.ttl))),
            _ => None,
        })
        .collect();
    (!addrs.is_empty()).then_some((names, addrs))
}
