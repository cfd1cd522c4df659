//! The kernel side as the agent sees it: load the object, pin its maps, program them from a
//! plan, attach the programs to cgroups, and read the live maps (`egress explain`, counters,
//! original destinations).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, CgroupSockopt, SockOps, links::FdLink,
    },
};
use egress_common::{
    ALL_MAPS, ALLOW_KEY_HEAD_BITS, AllowKeyV4, AllowKeyV6, Backend, BackendKey, Config, LearnedKey,
    MAP_ALLOW_V4, MAP_ALLOW_V6, MAP_BACKENDS, MAP_CONFIG, MAP_COUNTERS, MAP_DIRECT_V4,
    MAP_DIRECT_V6, MAP_DNS_RESOLVERS, MAP_EXCLUDE_GIDS, MAP_EXCLUDE_UIDS, MAP_EXCLUDE_V4,
    MAP_EXCLUDE_V6, MAP_INCLUDE_V4, MAP_INCLUDE_V6, MAP_LEARNED, MAP_NETNS_PROBE, MAP_ORIG_BY_PEER,
    MAP_PORTS, MAP_SERVICES_V4, MAP_SERVICES_V6, MAP_WL_COUNTERS, MAP_WORKLOADS, OrigDst, PeerKey,
    ResolverKey, Service, ServiceKeyV4, ServiceKeyV6, SockAddr16, Tables, Workload, allow_key_v4,
    allow_key_v6, decide::REASON_COUNT, v4_mapped, v4_unmapped,
};
use ipnet::{Ipv4Net, Ipv6Net};
use log::info;

use super::sys;
use crate::plan::{Entry, Op, Plan, diff};

/// A socket address as the maps key and store it (IPv4 as v4-mapped IPv6).
pub fn sock_addr16(a: SocketAddr) -> SockAddr16 {
    let addr = match a.ip() {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    };
    SockAddr16 {
        addr,
        port: a.port(),
        _pad: 0,
    }
}

/// The original-destination map, shared by the connection tasks and the sweeper.
pub struct OrigMaps {
    pub by_peer: HashMap<MapData, PeerKey, OrigDst>,
}

impl OrigMaps {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(OrigMaps {
            by_peer: open(pin_dir, MAP_ORIG_BY_PEER)?,
        })
    }

    /// Take the record of the client whose socket is `peer` in the network namespace
    /// `netns`, removing it from the map.
    pub fn take(&mut self, netns: u64, peer: SocketAddr) -> Option<OrigDst> {
        // The kernel keyed the record by the client socket that is our peer.
        let a = sock_addr16(peer);
        let key = PeerKey {
            netns,
            addr: a.addr,
            port: a.port,
            _pad: [0; 6],
        };
        let rec = self.by_peer.get(&key, 0).ok()?;
        let _ = self.by_peer.remove(&key);
        Some(rec)
    }

    /// Remove records older than `max_age`: connections whose handshake completed but that
    /// neither the agent accepted nor the sock_ops close hook could clear (a full accept
    /// queue that reset them). Returns how many were removed.
    pub fn sweep(&mut self, max_age: Duration) -> usize {
        let now = monotonic_ns();
        let max = max_age.as_nanos() as u64;
        let stale: Vec<PeerKey> = self
            .by_peer
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, r)| now.saturating_sub(r.created_ns) > max)
            .map(|(k, _)| k)
            .collect();
        let n = stale.len();
        for k in stale {
            let _ = self.by_peer.remove(&k);
        }
        n
    }
}

/// The pinned `LEARNED` map: what workloads learnt from DNS answers (`dns::Learner`).
pub struct LearnedMap(std::sync::Mutex<HashMap<MapData, LearnedKey, u64>>);

impl LearnedMap {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(LearnedMap(std::sync::Mutex::new(open(
            pin_dir,
            MAP_LEARNED,
        )?)))
    }

    /// Whether the workload of `netns` learnt `dst` and it has not run out: what the connect
    /// hook checks.
    pub fn holds(&self, netns: u64, dst: SocketAddr) -> bool {
        let key = learned_key(netns, dst.ip(), dst.port());
        self.0
            .lock()
            .ok()
            .and_then(|m| m.get(&key, 0).ok())
            .is_some_and(|until| until > monotonic_ns())
    }
}

fn learned_key(netns: u64, addr: IpAddr, port: u16) -> LearnedKey {
    let a = sock_addr16(SocketAddr::new(addr, port));
    LearnedKey {
        netns,
        addr: a.addr,
        port,
        _pad: [0; 6],
    }
}

impl crate::dns::learn::Kernel for LearnedMap {
    fn set(&self, netns: u64, addr: IpAddr, port: u16, until: Option<u64>) {
        let Ok(mut m) = self.0.lock() else {
            return;
        };
        let key = learned_key(netns, addr, port);
        let r = match until {
            Some(u) => m.insert(key, u, 0),
            None => m.remove(&key),
        };
        if let Err(e) = r
            && until.is_some()
        {
            log::warn!("writing {addr} port {port} to {MAP_LEARNED}: {e}");
        }
    }

    fn sweep(&self, now: u64) -> u64 {
        let Ok(mut m) = self.0.lock() else {
            return 0;
        };
        let gone: Vec<LearnedKey> = m
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, until)| *until <= now)
            .map(|(k, _)| k)
            .collect();
        gone.iter().filter(|k| m.remove(k).is_ok()).count() as u64
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The destination the client dialled.
pub fn orig_addr(r: &OrigDst) -> SocketAddr {
    orig_addr_of(&r.addr, r.port)
}

/// A socket address from its map form (IPv4 as `::ffff:a.b.c.d`).
pub fn orig_addr_of(addr: &[u8; 16], port: u16) -> SocketAddr {
    let ip = match v4_unmapped(addr) {
        Some(a) => IpAddr::V4(Ipv4Addr::from(a)),
        None => IpAddr::V6(Ipv6Addr::from(*addr)),
    };
    SocketAddr::new(ip, port)
}

fn resolver_key(netns: u64, addr: IpAddr) -> ResolverKey {
    ResolverKey {
        netns,
        addr: sock_addr16(SocketAddr::new(addr, 0)).addr,
    }
}

fn service_key_v4(a: Ipv4Addr, port: u16) -> ServiceKeyV4 {
    ServiceKeyV4 {
        addr: a.octets(),
        port,
        _pad: 0,
    }
}

fn service_key_v6(a: Ipv6Addr, port: u16) -> ServiceKeyV6 {
    ServiceKeyV6 {
        addr: a.octets(),
        port,
        _pad: 0,
    }
}

/// Insert or delete one LPM entry whose value is the prefix length.
fn lpm_set<K: aya::Pod>(
    map: &mut LpmTrie<MapData, K, u32>,
    bits: u32,
    data: K,
    len: u8,
    add: bool,
) -> Result<(), aya::maps::MapError> {
    let key = Key::new(bits, data);
    if add {
        map.insert(&key, u32::from(len), 0)
    } else {
        map.remove(&key)
    }
}

/// Insert or delete a (view, port, range) entry of an allow or direct trie. View and port
/// first, then address: a prefix of 32 + n bits is one view, one port and an /n range.
fn port_net_set4(
    map: &mut LpmTrie<MapData, AllowKeyV4, u32>,
    (view, port): (u16, u16),
    n: Ipv4Net,
    add: bool,
) -> Result<(), aya::maps::MapError> {
    let key = allow_key_v4(view, port, n.network().octets());
    lpm_set(
        map,
        ALLOW_KEY_HEAD_BITS + u32::from(n.prefix_len()),
        key,
        n.prefix_len(),
        add,
    )
}

fn port_net_set6(
    map: &mut LpmTrie<MapData, AllowKeyV6, u32>,
    (view, port): (u16, u16),
    n: Ipv6Net,
    add: bool,
) -> Result<(), aya::maps::MapError> {
    let key = allow_key_v6(view, port, n.network().octets());
    lpm_set(
        map,
        ALLOW_KEY_HEAD_BITS + u32::from(n.prefix_len()),
        key,
        n.prefix_len(),
        add,
    )
}

fn set_flag<K: aya::Pod + Eq + std::hash::Hash>(
    map: &mut HashMap<MapData, K, u8>,
    key: K,
    add: bool,
) -> Result<(), aya::maps::MapError> {
    if add {
        map.insert(key, 1, 0)
    } else {
        map.remove(&key)
    }
}

static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-kern"));

const PROG_CONNECT4: &str = "egress_connect4";
const PROG_CONNECT6: &str = "egress_connect6";
const PROG_SOCKOPS: &str = "egress_sockops";
const PROG_SOCK_CREATE: &str = "egress_sock_create";
const PROG_GETSOCKOPT: &str = "egress_getsockopt";
const PROG_GETPEERNAME4: &str = "egress_getpeername4";
const PROG_GETPEERNAME6: &str = "egress_getpeername6";
const PROG_NETNS_PROBE: &str = "egress_netns_probe";
const PROG_DNS_CONNECT4: &str = "egress_dns_connect4";
const PROG_DNS_CONNECT6: &str = "egress_dns_connect6";
const PROG_SENDMSG4: &str = "egress_sendmsg4";
const PROG_SENDMSG6: &str = "egress_sendmsg6";
const PROG_RECVMSG4: &str = "egress_recvmsg4";
const PROG_RECVMSG6: &str = "egress_recvmsg6";
const PROG_BIND4: &str = "egress_bind4";
const PROG_BIND6: &str = "egress_bind6";
const SOCK_ADDR_PROGRAMS: [&str; 12] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_DNS_CONNECT4,
    PROG_DNS_CONNECT6,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_RECVMSG4,
    PROG_RECVMSG6,
    PROG_BIND4,
    PROG_BIND6,
];
/// Every program attached to the intercepted cgroup through a pinned link.
fn linked_programs() -> impl Iterator<Item = &'static str> {
    SOCK_ADDR_PROGRAMS
        .into_iter()
        .chain([PROG_SOCKOPS, PROG_SOCK_CREATE])
}

/// Capacities of the sized maps.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub cidrs: u32,
    pub allowed: u32,
    pub orig: u32,
}

/// What `Datapath::load` found pinned, and so what the maps hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pinned {
    /// Nothing: the maps are new and empty.
    Fresh,
    /// The maps of an agent that ran before (it stopped, crashed or is being replaced), with
    /// the policy they were left with: the programs attached to them kept deciding from it.
    Reused,
    /// Maps of another layout (an older or newer egress): new maps are filled beside them and
    /// take their place once the programs are switched; the reason says what differed.
    Replaced(String),
}

/// Where staged maps wait while the programs still use the old ones.
const STAGED: &str = "next";
/// Where the links of the intercepting programs are pinned.
const LINKS: &str = "links";

/// The loaded object. The intercepting programs' links are pinned (`<pin dir>/links/`), so
/// they stay attached when the agent exits; the others die with it.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    maps_dir: PathBuf,
    pinned: Pinned,
}

/// The maps' sizes as this agent creates them: the object's, with the capacities set.
fn sizes(cap: Capacity) -> Vec<(&'static str, u32)> {
    // Twice the capacity: a reload adds the new entries before it removes the old ones, so
    // even a configuration replaced whole fits. LPM tries allocate entries as they are
    // inserted, so the headroom costs nothing until it is used.
    let mut v: Vec<(&'static str, u32)> = [
        MAP_INCLUDE_V4,
        MAP_INCLUDE_V6,
        MAP_EXCLUDE_V4,
        MAP_EXCLUDE_V6,
    ]
    .into_iter()
    .map(|m| (m, cap.cidrs.saturating_mul(2)))
    .collect();
    for m in [MAP_ALLOW_V4, MAP_ALLOW_V6, MAP_DIRECT_V4, MAP_DIRECT_V6] {
        v.push((m, cap.allowed.saturating_mul(2)));
    }
    v.push((MAP_ORIG_BY_PEER, cap.orig));
    v
}

/// Whether every map pinned in `dir` is one this object would create: same type, key and
/// value sizes, flags and capacity. `Ok(None)`: nothing is pinned; `Err(reason)`: the first
/// difference (or a map missing).
fn pinned_layout(dir: &Path, cap: Capacity) -> Result<Option<()>, String> {
    let present: Vec<&str> = ALL_MAPS
        .into_iter()
        .filter(|m| dir.join(m).exists())
        .collect();
    if present.is_empty() {
        return Ok(None);
    }
    let obj =
        aya_obj::Object::parse(KERNEL_OBJECT).map_err(|e| format!("parsing the object: {e}"))?;
    let sizes = sizes(cap);
    for name in ALL_MAPS {
        let Some(def) = obj.maps.get(name) else {
            return Err(format!("map {name} is not in this object"));
        };
        if !present.contains(&name) {
            return Err(format!("map {name} is not pinned"));
        }
        let info = aya::maps::MapInfo::from_pin(dir.join(name))
            .map_err(|e| format!("reading pinned map {name}: {e}"))?;
        let max = sizes
            .iter()
            .find(|(m, _)| *m == name)
            .map_or(def.max_entries(), |(_, n)| *n);
        let kind = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let want = (
            def.map_type(),
            def.key_size(),
            def.value_size(),
            def.map_flags(),
            max,
        );
        let got = (
            kind,
            info.key_size(),
            info.value_size(),
            info.map_flags(),
            info.max_entries(),
        );
        if want != got {
            return Err(format!(
                "map {name} is (type, key, value, flags, capacity) {got:?}, this agent's {want:?}"
            ));
        }
    }
    Ok(Some(()))
}

impl Datapath {
    /// Load the object (maps created or taken over, programs not yet loaded). Maps pinned in
    /// `pin_dir` by an agent that ran before are taken over when their layout is this
    /// object's (`Pinned::Reused`): the policy in force stays in force. Otherwise new maps are
    /// pinned (in `pin_dir`, or beside the old ones until `commit`).
    pub fn load(cap: Capacity, pin_dir: &Path) -> Result<Self> {
        if KERNEL_OBJECT.is_empty() {
            bail!("this binary was built with AYA_BUILD_SKIP=1 and carries no kernel programs");
        }
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating {}", pin_dir.display()))?;
        let pinned = match pinned_layout(pin_dir, cap) {
            Ok(None) => Pinned::Fresh,
            Ok(Some(())) => Pinned::Reused,
            Err(why) => Pinned::Replaced(why),
        };
        let maps_dir = match &pinned {
            Pinned::Replaced(_) => pin_dir.join(STAGED),
            _ => pin_dir.to_path_buf(),
        };
        if maps_dir != pin_dir {
            // A replacement that did not finish before.
            let _ = std::fs::remove_dir_all(&maps_dir);
            std::fs::create_dir_all(&maps_dir)
                .with_context(|| format!("creating {}", maps_dir.display()))?;
        }
        let mut loader = EbpfLoader::new();
        for (m, n) in sizes(cap) {
            loader.map_max_entries(m, n);
        }
        let paths: Vec<(&str, PathBuf)> = ALL_MAPS
            .into_iter()
            .map(|m| (m, maps_dir.join(m)))
            .collect();
        // Opened where pinned and compatible (checked above), else created and pinned there.
        for (m, p) in &paths {
            loader.map_pin_path(m, p.as_path());
        }
        let ebpf = loader
            .load(KERNEL_OBJECT)
            .context("loading the kernel object")?;
        Ok(Datapath {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            maps_dir,
            pinned,
        })
    }

    /// What was pinned when the agent started.
    pub fn pinned(&self) -> &Pinned {
        &self.pinned
    }

    /// Where this agent's maps are pinned until `commit`: the pin directory, or the staging
    /// directory beside maps of another layout.
    pub fn maps_dir(&self) -> &Path {
        &self.maps_dir
    }

    /// Once the programs use the new maps: staged maps take the old ones' place, where
    /// `egress explain` and the next agent look for them.
    pub fn commit(&mut self) -> Result<()> {
        if self.maps_dir == self.pin_dir {
            return Ok(());
        }
        for name in ALL_MAPS {
            let (from, to) = (self.maps_dir.join(name), self.pin_dir.join(name));
            std::fs::rename(&from, &to)
                .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
        }
        let _ = std::fs::remove_dir(&self.maps_dir);
        self.maps_dir = self.pin_dir.clone();
        Ok(())
    }

    /// Load every program into the kernel, logging each one's verified instruction count.
    pub fn load_programs(&mut self) -> Result<()> {
        for name in SOCK_ADDR_PROGRAMS.into_iter().chain([PROG_NETNS_PROBE]) {
            let p: &mut CgroupSockAddr = self.program(name)?.try_into()?;
            p.load().with_context(|| format!("verifying {name}"))?;
        }
        let p: &mut SockOps = self.program(PROG_SOCKOPS)?.try_into()?;
        p.load()
            .with_context(|| format!("verifying {PROG_SOCKOPS}"))?;
        let p: &mut CgroupSock = self.program(PROG_SOCK_CREATE)?.try_into()?;
        p.load()
            .with_context(|| format!("verifying {PROG_SOCK_CREATE}"))?;
        let p: &mut CgroupSockopt = self.program(PROG_GETSOCKOPT)?.try_into()?;
        p.load()
            .with_context(|| format!("verifying {PROG_GETSOCKOPT}"))?;
        for (name, prog) in self.ebpf.programs() {
            let count = prog
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count())
                .map_or_else(
                    || "unknown (kernels report it from 5.16)".to_owned(),
                    |n| n.to_string(),
                );
            info!("loaded {name}: verified_instructions={count}");
        }
        Ok(())
    }

    fn program(&mut self, name: &str) -> Result<&mut aya::programs::Program> {
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))
    }

    /// Attach connect4/6 (TCP, and UDP), sendmsg4/6, recvmsg4/6, bind4/6, getpeername4/6 and
    /// sock_ops to the intercepted cgroup, through
    /// links pinned in `<pin dir>/links/`: they stay attached when the agent exits, so the
    /// maps keep deciding while it is down. Links an agent pinned before on the same cgroup
    /// are switched to this agent's programs in place (`BPF_LINK_UPDATE`), so there is no
    /// moment without a program; links on another cgroup are replaced.
    pub fn attach_interception(&mut self, cgroup: &Path) -> Result<()> {
        let fd = open_cgroup(cgroup)?;
        let id = sys::cgroup_id(cgroup)?;
        let dir = self.pin_dir.join(LINKS);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for name in linked_programs() {
            let pin = dir.join(name);
            let prog = self.program(name)?;
            let prog_fd = match prog {
                aya::programs::Program::CgroupSockAddr(p) => p.fd()?.as_fd().try_clone_to_owned(),
                aya::programs::Program::SockOps(p) => p.fd()?.as_fd().try_clone_to_owned(),
                aya::programs::Program::CgroupSock(p) => p.fd()?.as_fd().try_clone_to_owned(),
                _ => bail!("program {name} is not a cgroup program"),
            }
            .context("duplicating a program fd")?;
            if pin.exists() {
                let link = sys::pinned_object(&pin)?;
                if sys::link_info(&link)?.1 == id {
                    sys::link_update(&link, &prog_fd).with_context(|| {
                        format!("switching {} to this agent's {name}", pin.display())
                    })?;
                    continue;
                }
                // Attached elsewhere by an agent with other settings: that attachment goes.
                std::fs::remove_file(&pin)
                    .with_context(|| format!("removing {}", pin.display()))?;
            }
            let link: FdLink = match self.program(name)? {
                aya::programs::Program::CgroupSockAddr(p) => {
                    let l = p
                        .attach(&fd, CgroupAttachMode::Single)
                        .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
                    p.take_link(l)?.try_into()?
                }
                aya::programs::Program::SockOps(p) => {
                    let l = p
                        .attach(&fd, CgroupAttachMode::Single)
                        .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
                    p.take_link(l)?.try_into()?
                }
                aya::programs::Program::CgroupSock(p) => {
                    let l = p
                        .attach(&fd, CgroupAttachMode::Single)
                        .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
                    p.take_link(l)?.try_into()?
                }
                _ => bail!("program {name} is not a cgroup program"),
            };
            link.pin(&pin)
                .with_context(|| format!("pinning the link of {name} at {}", pin.display()))?;
        }
        Ok(())
    }

    /// Attach `egress_netns_probe` to the agent's own cgroup and hand over the map it writes
    /// (for kernels without `SO_NETNS_COOKIE`: see `sys::netns_cookie`).
    pub fn attach_netns_probe(&mut self, cgroup: &Path) -> Result<HashMap<MapData, u64, u64>> {
        let fd = open_cgroup(cgroup)?;
        let p: &mut CgroupSockAddr = self.program(PROG_NETNS_PROBE)?.try_into()?;
        p.attach(&fd, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {PROG_NETNS_PROBE} to {}", cgroup.display()))?;
        let map = self
            .ebpf
            .take_map(MAP_NETNS_PROBE)
            .with_context(|| format!("map {MAP_NETNS_PROBE} missing from the object"))?;
        Ok(HashMap::try_from(map)?)
    }

    /// Attach the `SO_ORIGINAL_DST` emulation to the cgroup a transparent proxy runs in.
    pub fn attach_getsockopt(&mut self, cgroup: &Path) -> Result<()> {
        let fd = open_cgroup(cgroup)?;
        let p: &mut CgroupSockopt = self.program(PROG_GETSOCKOPT)?.try_into()?;
        p.attach(&fd, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {PROG_GETSOCKOPT} to {}", cgroup.display()))?;
        Ok(())
    }
}

fn open_cgroup(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("opening cgroup {}", path.display()))
}

/// The links pinned in `pin_dir` that exist: (path, link id).
pub fn pinned_links(pin_dir: &Path) -> Vec<(PathBuf, u32)> {
    linked_programs()
        .map(|name| pin_dir.join(LINKS).join(name))
        .filter_map(|p| {
            let fd = sys::pinned_object(&p).ok()?;
            let (id, _) = sys::link_info(&fd).ok()?;
            Some((p, id))
        })
        .collect()
}

/// Remove what an agent pinned in `pin_dir`: the links first (the programs detach once no
/// running agent holds them), then the maps. Returns the paths removed.
pub fn unpin(pin_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let links = pin_dir.join(LINKS);
    for name in linked_programs() {
        let p = links.join(name);
        if std::fs::remove_file(&p).is_ok() {
            removed.push(p);
        }
    }
    let _ = std::fs::remove_dir(&links);
    for dir in [pin_dir.join(STAGED), pin_dir.to_path_buf()] {
        for name in ALL_MAPS {
            let p = dir.join(name);
            if std::fs::remove_file(&p).is_ok() {
                removed.push(p);
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
    removed
}

/// The pinned maps of a running datapath.
pub struct Maps {
    config: Array<MapData, Config>,
    include_v4: LpmTrie<MapData, [u8; 4], u32>,
    include_v6: LpmTrie<MapData, [u8; 16], u32>,
    exclude_v4: LpmTrie<MapData, [u8; 4], u32>,
    exclude_v6: LpmTrie<MapData, [u8; 16], u32>,
    allow_v4: LpmTrie<MapData, AllowKeyV4, u32>,
    allow_v6: LpmTrie<MapData, AllowKeyV6, u32>,
    direct_v4: LpmTrie<MapData, AllowKeyV4, u32>,
    direct_v6: LpmTrie<MapData, AllowKeyV6, u32>,
    ports: HashMap<MapData, u16, u8>,
    exclude_uids: HashMap<MapData, u32, u8>,
    exclude_gids: HashMap<MapData, u32, u8>,
    counters: PerCpuArray<MapData, u64>,
    services_v4: HashMap<MapData, ServiceKeyV4, Service>,
    services_v6: HashMap<MapData, ServiceKeyV6, Service>,
    backends: HashMap<MapData, BackendKey, Backend>,
    workloads: HashMap<MapData, u64, Workload>,
    wl_counters: PerCpuArray<MapData, u64>,
    dns_resolvers: HashMap<MapData, ResolverKey, u8>,
    /// The Services the maps hold, and the next free backend id.
    service_ids: BTreeMap<SocketAddr, Service>,
    next_service_id: u32,
}

pub fn open<T>(dir: &Path, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is `egress run` running with this --pin-path?)",
            path.display()
        )
    })?;
    let map = Map::from_map_data(data).with_context(|| format!("map {}", path.display()))?;
    T::try_from(map).with_context(|| format!("map {} has an unexpected type", path.display()))
}

impl Maps {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Maps {
            config: open(dir, MAP_CONFIG)?,
            include_v4: open(dir, MAP_INCLUDE_V4)?,
            include_v6: open(dir, MAP_INCLUDE_V6)?,
            exclude_v4: open(dir, MAP_EXCLUDE_V4)?,
            exclude_v6: open(dir, MAP_EXCLUDE_V6)?,
            allow_v4: open(dir, MAP_ALLOW_V4)?,
            allow_v6: open(dir, MAP_ALLOW_V6)?,
            direct_v4: open(dir, MAP_DIRECT_V4)?,
            direct_v6: open(dir, MAP_DIRECT_V6)?,
            ports: open(dir, MAP_PORTS)?,
            exclude_uids: open(dir, MAP_EXCLUDE_UIDS)?,
            exclude_gids: open(dir, MAP_EXCLUDE_GIDS)?,
            counters: open(dir, MAP_COUNTERS)?,
            services_v4: open(dir, MAP_SERVICES_V4)?,
            services_v6: open(dir, MAP_SERVICES_V6)?,
            backends: open(dir, MAP_BACKENDS)?,
            workloads: open(dir, MAP_WORKLOADS)?,
            wl_counters: open(dir, MAP_WL_COUNTERS)?,
            dns_resolvers: open(dir, MAP_DNS_RESOLVERS)?,
            service_ids: BTreeMap::new(),
            next_service_id: 0,
        })
    }

    pub fn config(&self) -> Result<Config> {
        Ok(self.config.get(&0, 0)?)
    }

    /// What would-be redirects do while no agent listens (`failureMode`), and what the
    /// sockets no hook decides get (`rawSockets`), from now on.
    pub fn set_mesh_settings(&mut self, mesh: &crate::config::MeshConfig) -> Result<()> {
        let cfg = Config {
            failure_open: u8::from(mesh.failure_mode == crate::config::FailureMode::Open),
            raw_sockets: crate::config::RawSockets::code(mesh.raw_sockets),
            ..self.config()?
        };
        self.config.set(0, cfg, 0).context("writing CONFIG")
    }

    /// Which DNS queries are captured (`spec.dns.capture`), from now on.
    pub fn set_dns_capture(&mut self, capture: crate::config::DnsCapture) -> Result<()> {
        let cfg = Config {
            dns_capture: capture.kernel(),
            ..self.config()?
        };
        self.config.set(0, cfg, 0).context("writing CONFIG")
    }

    /// Fill freshly created maps with `plan`, then enable the datapath with `cfg`.
    pub fn program(&mut self, plan: &Plan, cfg: Config) -> Result<()> {
        self.config
            .set(0, Config { enabled: 0, ..cfg }, 0)
            .context("writing CONFIG")?;
        for op in diff(&Plan::default(), plan) {
            self.apply(&op)?;
        }
        self.config.set(0, cfg, 0).context("writing CONFIG")?;
        Ok(())
    }

    /// Bring maps an agent left behind (`Pinned::Reused`) to `plan`, then `cfg`, with the
    /// datapath enabled throughout: what they hold is read back and the `diff` to the plan
    /// applied, additions first, so the policy they kept deciding from is never relaxed on the
    /// way. Returns the number of steps.
    pub fn resync(&mut self, plan: &Plan, cfg: Config) -> Result<usize> {
        let held = self.held().context("reading the pinned maps back")?;
        let ops = diff(&held, plan);
        for op in &ops {
            self.apply(op)?;
        }
        self.config.set(0, cfg, 0).context("writing CONFIG")?;
        Ok(ops.len())
    }

    /// What the maps hold, as a plan (the policies aside: they live in `WORKLOADS`). Also
    /// learns the Services' endpoint ids, so that replacing a set frees the slots in use.
    fn held(&mut self) -> Result<Plan> {
        fn nets<K: aya::Pod, N: Ord>(
            t: &LpmTrie<MapData, K, u32>,
            f: impl Fn(K, u8) -> Option<N>,
        ) -> Result<BTreeSet<N>> {
            let mut out = BTreeSet::new();
            for k in t.keys() {
                let k = k?;
                if let Some(n) = f(k.data(), k.prefix_len() as u8) {
                    out.insert(n);
                }
            }
            Ok(out)
        }
        fn port_nets<K: aya::Pod + AsRef<[u8]>, N: Ord>(
            t: &LpmTrie<MapData, K, u32>,
            f: impl Fn(K, u8) -> Option<N>,
        ) -> Result<BTreeSet<(u16, u16, N)>> {
            let mut out = BTreeSet::new();
            for k in t.keys() {
                let k = k?;
                let d = k.data();
                let b = d.as_ref();
                let (view, port) = (
                    u16::from_be_bytes([b[0], b[1]]),
                    u16::from_be_bytes([b[2], b[3]]),
                );
                let len = k.prefix_len().saturating_sub(ALLOW_KEY_HEAD_BITS) as u8;
                if let Some(n) = f(d, len) {
                    out.insert((view, port, n));
                }
            }
            Ok(out)
        }
        let v4 = |a: [u8; 4], len: u8| Ipv4Net::new(Ipv4Addr::from(a), len).ok();
        let v6 = |a: [u8; 16], len: u8| Ipv6Net::new(Ipv6Addr::from(a), len).ok();
        let a4 = |k: AllowKeyV4, len: u8| v4([k[4], k[5], k[6], k[7]], len);
        let a6 = |k: AllowKeyV6, len: u8| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&k[4..]);
            v6(a, len)
        };
        let mut plan = Plan {
            include_v4: nets(&self.include_v4, v4)?,
            include_v6: nets(&self.include_v6, v6)?,
            exclude_v4: nets(&self.exclude_v4, v4)?,
            exclude_v6: nets(&self.exclude_v6, v6)?,
            allow_v4: port_nets(&self.allow_v4, a4)?,
            allow_v6: port_nets(&self.allow_v6, a6)?,
            direct_v4: port_nets(&self.direct_v4, a4)?,
            direct_v6: port_nets(&self.direct_v6, a6)?,
            ..Plan::default()
        };
        for e in self.ports.iter() {
            let (port, flags) = e?;
            plan.ports.insert(port, flags);
        }
        for k in self.exclude_uids.keys() {
            plan.exclude_uids.insert(k?);
        }
        for k in self.exclude_gids.keys() {
            plan.exclude_gids.insert(k?);
        }
        let mut services = Vec::new();
        for e in self.services_v4.iter() {
            let (k, svc) = e?;
            services.push((SocketAddr::from((k.addr, k.port)), svc));
        }
        for e in self.services_v6.iter() {
            let (k, svc) = e?;
            services.push((SocketAddr::from((k.addr, k.port)), svc));
        }
        for (vip, svc) in services {
            let mut endpoints = self.service(vip).unwrap_or_default();
            endpoints.sort();
            plan.services.insert(vip, endpoints);
            self.service_ids.insert(vip, svc);
            self.next_service_id = self.next_service_id.max(svc.id.wrapping_add(1));
        }
        Ok(plan)
    }

    /// Apply one step of a `diff` to the maps. `Op::Policies` is the enrolled workloads'
    /// business (`Workloads::repoint`): nothing to do here.
    pub fn apply(&mut self, op: &Op) -> Result<()> {
        let (e, add) = match op {
            Op::Policies(_) => return Ok(()),
            Op::Add(e) => (e, true),
            Op::Remove(e) => (e, false),
        };
        let r = match e.clone() {
            Entry::Service(vip, backends) => {
                return if add {
                    self.put_service(vip, &backends)
                } else {
                    self.drop_service(vip)
                }
                .with_context(|| format!("applying {op:?}"));
            }
            Entry::Include4(n) => lpm_set(
                &mut self.include_v4,
                n.prefix_len().into(),
                n.network().octets(),
                n.prefix_len(),
                add,
            ),
            Entry::Include6(n) => lpm_set(
                &mut self.include_v6,
                n.prefix_len().into(),
                n.network().octets(),
                n.prefix_len(),
                add,
            ),
            Entry::Exclude4(n) => lpm_set(
                &mut self.exclude_v4,
                n.prefix_len().into(),
                n.network().octets(),
                n.prefix_len(),
                add,
            ),
            Entry::Exclude6(n) => lpm_set(
                &mut self.exclude_v6,
                n.prefix_len().into(),
                n.network().octets(),
                n.prefix_len(),
                add,
            ),
            Entry::Allow4(view, port, n) => port_net_set4(&mut self.allow_v4, (view, port), n, add),
            Entry::Allow6(view, port, n) => port_net_set6(&mut self.allow_v6, (view, port), n, add),
            Entry::Direct4(view, port, n) => {
                port_net_set4(&mut self.direct_v4, (view, port), n, add)
            }
            Entry::Direct6(view, port, n) => {
                port_net_set6(&mut self.direct_v6, (view, port), n, add)
            }
            Entry::Uid(u) => set_flag(&mut self.exclude_uids, u, add),
            Entry::Gid(g) => set_flag(&mut self.exclude_gids, g, add),
            Entry::Port(port, bit) => {
                let old = self.ports.get(&port, 0).unwrap_or(0);
                let new = if add { old | bit } else { old & !bit };
                if new == 0 {
                    self.ports.remove(&port)
                } else {
                    self.ports.insert(port, new, 0)
                }
            }
        };
        r.with_context(|| format!("applying {op:?}"))
    }

    /// Write a Service's endpoints under a fresh id, point the Service at them in one update,
    /// then free the slots of the set it replaces: a connect sees the old set or the new one.
    fn put_service(
        &mut self,
        vip: SocketAddr,
        backends: &[SocketAddr],
    ) -> Result<(), aya::maps::MapError> {
        let svc = Service {
            id: self.next_service_id,
            count: backends.len() as u32,
        };
        self.next_service_id = self.next_service_id.wrapping_add(1);
        for (i, b) in backends.iter().enumerate() {
            let key = BackendKey {
                id: svc.id,
                index: i as u32,
            };
            self.backends.insert(key, sock_addr16(*b), 0)?;
        }
        self.write_service(vip, Some(svc))?;
        if let Some(old) = self.service_ids.insert(vip, svc) {
            self.free_backends(old);
        }
        Ok(())
    }

    fn drop_service(&mut self, vip: SocketAddr) -> Result<(), aya::maps::MapError> {
        self.write_service(vip, None)?;
        if let Some(old) = self.service_ids.remove(&vip) {
            self.free_backends(old);
        }
        Ok(())
    }

    fn write_service(
        &mut self,
        vip: SocketAddr,
        svc: Option<Service>,
    ) -> Result<(), aya::maps::MapError> {
        match (vip.ip(), svc) {
            (IpAddr::V4(a), Some(s)) => {
                self.services_v4.insert(service_key_v4(a, vip.port()), s, 0)
            }
            (IpAddr::V4(a), None) => self.services_v4.remove(&service_key_v4(a, vip.port())),
            (IpAddr::V6(a), Some(s)) => {
                self.services_v6.insert(service_key_v6(a, vip.port()), s, 0)
            }
            (IpAddr::V6(a), None) => self.services_v6.remove(&service_key_v6(a, vip.port())),
        }
    }

    fn free_backends(&mut self, svc: Service) {
        for index in 0..svc.count {
            let _ = self.backends.remove(&BackendKey { id: svc.id, index });
        }
    }

    /// The endpoints of the Service at `vip`, if one is in force.
    pub fn service(&self, vip: SocketAddr) -> Option<Vec<SocketAddr>> {
        let svc = match vip.ip() {
            IpAddr::V4(a) => self.services_v4.get(&service_key_v4(a, vip.port()), 0),
            IpAddr::V6(a) => self.services_v6.get(&service_key_v6(a, vip.port()), 0),
        }
        .ok()?;
        Some(
            (0..svc.count)
                .filter_map(|index| self.backends.get(&BackendKey { id: svc.id, index }, 0).ok())
                .map(|b| orig_addr_of(&b.addr, b.port))
                .collect(),
        )
    }

    /// The per-reason counters, summed over CPUs, indexed by reason code.
    pub fn counters(&self) -> Result<Vec<u64>> {
        (0..REASON_COUNT)
            .map(|i| Ok(self.counters.get(&i, 0)?.iter().sum()))
            .collect()
    }

    /// A workload's per-reason counters, summed over CPUs.
    pub fn workload_counters(&self, slot: u32) -> Result<Vec<u64>> {
        (0..REASON_COUNT)
            .map(|i| {
                Ok(self
                    .wl_counters
                    .get(&(slot * REASON_COUNT + i), 0)?
                    .iter()
                    .sum())
            })
            .collect()
    }

    /// Start a workload slot's counters from zero (a slot is reused after a release).
    pub fn zero_workload_counters(&mut self, slot: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        for i in 0..REASON_COUNT {
            let zero = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])?;
            self.wl_counters
                .set(slot * REASON_COUNT + i, zero, 0)
                .context("writing WL_COUNTERS")?;
        }
        Ok(())
    }

    /// Enrol (or update) the workload of a network namespace.
    pub fn set_workload(&mut self, netns: u64, w: Workload) -> Result<()> {
        self.workloads
            .insert(netns, w, 0)
            .context("writing WORKLOADS")
    }

    pub fn remove_workload(&mut self, netns: u64) -> Result<()> {
        self.workloads
            .remove(&netns)
            .context("removing from WORKLOADS")
    }

    /// Write a workload's nameservers into `DNS_RESOLVERS`, before its `WORKLOADS` entry
    /// says how many it has: returns those written.
    pub fn set_nameservers(&mut self, netns: u64, nameservers: &[IpAddr]) -> Vec<IpAddr> {
        nameservers
            .iter()
            .filter(|a| {
                let r = self.dns_resolvers.insert(resolver_key(netns, **a), 1, 0);
                if let Err(e) = &r {
                    log::warn!("writing nameserver {a} to {MAP_DNS_RESOLVERS}: {e}");
                }
                r.is_ok()
            })
            .copied()
            .collect()
    }

    /// Remove a workload's nameservers from `DNS_RESOLVERS`, after its `WORKLOADS` entry.
    pub fn remove_nameservers(&mut self, netns: u64, nameservers: &[IpAddr]) {
        for a in nameservers {
            let _ = self.dns_resolvers.remove(&resolver_key(netns, *a));
        }
    }

    /// Every (namespace, nameserver) in `DNS_RESOLVERS`.
    pub fn nameservers(&self) -> Vec<(u64, IpAddr)> {
        self.dns_resolvers
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.netns, orig_addr_of(&k.addr, 0).ip()))
            .collect()
    }

    /// The enrolment of a network namespace, if any.
    pub fn workload(&self, netns: u64) -> Option<Workload> {
        self.workloads.get(&netns, 0).ok()
    }

    /// Every enrolled namespace: (cookie, entry).
    pub fn workloads(&self) -> Vec<(u64, Workload)> {
        self.workloads.iter().filter_map(Result::ok).collect()
    }
}

fn found(r: Result<u32, aya::maps::MapError>) -> Option<u8> {
    r.ok().map(|p| p as u8)
}

impl Tables for Maps {
    /// The maps have no caller: `explain` asks for a caller in the workload's cgroup.
    fn in_cgroup(&self, _id: u64, _level: u32) -> bool {
        true
    }
    fn uid_excluded(&self, uid: u32) -> bool {
        self.exclude_uids.get(&uid, 0).is_ok()
    }
    fn gid_excluded(&self, gid: u32) -> bool {
        self.exclude_gids.get(&gid, 0).is_ok()
    }
    fn port_flags(&self, port: u16) -> u8 {
        self.ports.get(&port, 0).unwrap_or(0)
    }
    fn include_v4(&self, a: [u8; 4]) -> Option<u8> {
        found(self.include_v4.get(&Key::new(32, a), 0))
    }
    fn exclude_v4(&self, a: [u8; 4]) -> Option<u8> {
        found(self.exclude_v4.get(&Key::new(32, a), 0))
    }
    fn allow_v4(&self, view: u16, a: [u8; 4], port: u16) -> Option<u8> {
        let key = Key::new(ALLOW_KEY_HEAD_BITS + 32, allow_key_v4(view, port, a));
        found(self.allow_v4.get(&key, 0))
    }
    fn direct_v4(&self, view: u16, a: [u8; 4], port: u16) -> Option<u8> {
        let key = Key::new(ALLOW_KEY_HEAD_BITS + 32, allow_key_v4(view, port, a));
        found(self.direct_v4.get(&key, 0))
    }
    fn include_v6(&self, a: [u8; 16]) -> Option<u8> {
        found(self.include_v6.get(&Key::new(128, a), 0))
    }
    fn exclude_v6(&self, a: [u8; 16]) -> Option<u8> {
        found(self.exclude_v6.get(&Key::new(128, a), 0))
    }
    fn allow_v6(&self, view: u16, a: [u8; 16], port: u16) -> Option<u8> {
        let key = Key::new(ALLOW_KEY_HEAD_BITS + 128, allow_key_v6(view, port, a));
        found(self.allow_v6.get(&key, 0))
    }
    fn direct_v6(&self, view: u16, a: [u8; 16], port: u16) -> Option<u8> {
        let key = Key::new(ALLOW_KEY_HEAD_BITS + 128, allow_key_v6(view, port, a));
        found(self.direct_v6.get(&key, 0))
    }
    fn nameserver(&self, netns: u64, addr: [u8; 16]) -> bool {
        self.dns_resolvers
            .get(&ResolverKey { netns, addr }, 0)
            .is_ok()
    }
}
