use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock, bpf_sock_addr, bpf_sock_tuple,
    },
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release, bpf_sk_storage_get,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie,
        bpf_ktime_get_ns,
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{SockAddrContext, SockContext, SockOpsContext, SockoptContext},
};
use egress_common::{
    AF_INET, AF_INET6, ALLOW_KEY_HEAD_BITS, AllowKeyV4, AllowKeyV6, Backend, BackendKey, Config,
    DEFAULT_MAX_ALLOWED, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_CIDRS, DEFAULT_MAX_DNS_RESOLVERS,
    DEFAULT_MAX_IDS, DEFAULT_MAX_LEARNED, DEFAULT_MAX_ORIG, DEFAULT_MAX_SERVICES,
    DEFAULT_MAX_WORKLOADS, DIRECT_CLOSED_BYTES, DIRECT_WAKEUP_BYTES, DNS_CAPTURE_ALL,
    DNS_NAMESERVER_SLOTS, DNS_PORT, DNS_PROBES, DirectClosed, DirectOpen, LearnedKey,
    MODE_REGISTRY_ONLY, NETNS_PROBE_V4, OrigDst, PeerKey, Query, RAW_SOCKETS_ALLOW,
    RAW_SOCKETS_BY_MODE, Reason, ResolverKey, SO_ORIGINAL_DST, SOCK_DIALLED, SOCK_DIRECT,
    SOCK_REDIRECTED, Service, ServiceKeyV4, ServiceKeyV6, SockAddr16, SockRecord, TCP_FIN_WAIT2,
    Tables, Verdict, Workload, allow_key_v4, allow_key_v6, decide,
    decide::{Addr, REASON_COUNT},
    dns_slot, dns_stub_index, dns_stub_v4, dns_stub_v6, dns_stub_v6_index, v4_mapped, v4_unmapped,
    with_learned, without_agent,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_UDP: u32 = 17;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static INCLUDE_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(DEFAULT_MAX_CIDRS, 0);
#[map]
static EXCLUDE_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(DEFAULT_MAX_CIDRS, 0);
#[map]
static INCLUDE_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(DEFAULT_MAX_CIDRS, 0);
#[map]
static EXCLUDE_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(DEFAULT_MAX_CIDRS, 0);
#[map]
static ALLOW_V4: LpmTrie<AllowKeyV4, u32> = LpmTrie::with_max_entries(DEFAULT_MAX_ALLOWED, 0);
#[map]
static ALLOW_V6: LpmTrie<AllowKeyV6, u32> = LpmTrie::with_max_entries(DEFAULT_MAX_ALLOWED, 0);
#[map]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(65_536, 0);
#[map]
static EXCLUDE_UIDS: HashMap<u32, u8> = HashMap::with_max_entries(DEFAULT_MAX_IDS, 0);
#[map]
static EXCLUDE_GIDS: HashMap<u32, u8> = HashMap::with_max_entries(DEFAULT_MAX_IDS, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT, 0);
#[map]
static ORIG_BY_PEER: LruHashMap<PeerKey, OrigDst> =
    LruHashMap::with_max_entries(DEFAULT_MAX_ORIG, 0);
#[map]
static SERVICES_V4: HashMap<ServiceKeyV4, Service> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map]
static SERVICES_V6: HashMap<ServiceKeyV6, Service> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map]
static BACKENDS: HashMap<BackendKey, Backend> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
/// (port, address) ranges that only TCP ServiceEntries relaying to the dialled address declare.
#[map]
static DIRECT_V4: LpmTrie<AllowKeyV4, u32> = LpmTrie::with_max_entries(DEFAULT_MAX_ALLOWED, 0);
#[map]
static DIRECT_V6: LpmTrie<AllowKeyV6, u32> = LpmTrie::with_max_entries(DEFAULT_MAX_ALLOWED, 0);
/// Per client socket that was not simply bypassed: what it dialled, its original destination
/// or its direct accounting (`SockRecord`). Freed with the socket.
#[btf_map]
static SOCKS: SkStorage<SockRecord> = SkStorage::new();
/// Closed direct connections, for the agent's access log.
#[map]
static DIRECT_CLOSED: RingBuf = RingBuf::with_byte_size(DIRECT_CLOSED_BYTES, 0);
/// Closes the ring had no room for.
#[map]
static DIRECT_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// Enrolled workloads by network namespace cookie: connects from any other namespace are left
/// alone.
#[map]
static WORKLOADS: HashMap<u64, Workload> = HashMap::with_max_entries(DEFAULT_MAX_WORKLOADS, 0);
/// Per workload and reason: `Workload::slot * REASON_COUNT + reason`.
#[map]
static WL_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_WORKLOADS * REASON_COUNT, 0);

/// Nameservers of captured UDP queries by slot: the stub address 127.53.X.Y a query is sent to
/// names the slot X.Y, which names the nameserver (IPv4-mapped) its reply must come from.
/// Slots are given by the kernel (`nameserver_slot`) and never taken back.
#[map]
static DNS_NAMESERVERS: HashMap<u32, [u8; 16]> = HashMap::with_max_entries(DNS_NAMESERVER_SLOTS, 0);

/// Addresses workloads learnt from the DNS answers the agent relayed, for hosts of TCP
/// ServiceEntries without addresses: (namespace, address, port) → when the answer runs out
/// (`bpf_ktime_get_ns`). Written by the agent before it passes the answer on.
#[map]
static LEARNED: LruHashMap<LearnedKey, u64> = LruHashMap::with_max_entries(DEFAULT_MAX_LEARNED, 0);

/// Each workload's own nameservers: (namespace, address (IPv4-mapped)) → 1. Under
/// `spec.dns.capture: RESOLV_CONF`, only queries to these are captured. Written by the agent
/// at enrolment, removed at release.
#[map]
static DNS_RESOLVERS: HashMap<ResolverKey, u8> =
    HashMap::with_max_entries(DEFAULT_MAX_DNS_RESOLVERS, 0);

/// Socket cookie → network namespace cookie, written by `egress_netns_probe`.
#[map]
static NETNS_PROBE: LruHashMap<u64, u64> = LruHashMap::with_max_entries(64, 0);

/// The decision's lookups, answered from the maps; and the one answer looked up before it.
struct Maps {
    /// `Tables::nameserver` for this connect's own namespace and destination
    /// (`own_nameserver`).
    nameserver: bool,
}

#[inline(always)]
fn prefix(v: Option<&u32>) -> Option<u8> {
    v.map(|p| *p as u8)
}

/// Prefix bits of an allow or direct trie lookup for one address: view, port, address.
const ALLOW_BITS_V4: u32 = ALLOW_KEY_HEAD_BITS + 32;
const ALLOW_BITS_V6: u32 = ALLOW_KEY_HEAD_BITS + 128;

impl Tables for Maps {
    #[inline(always)]
    fn in_cgroup(&self, id: u64, level: u32) -> bool {
        unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) == id }
    }
    #[inline(always)]
    fn uid_excluded(&self, uid: u32) -> bool {
        unsafe { EXCLUDE_UIDS.get(&uid) }.is_some()
    }
    #[inline(always)]
    fn gid_excluded(&self, gid: u32) -> bool {
        unsafe { EXCLUDE_GIDS.get(&gid) }.is_some()
    }
    #[inline(always)]
    fn port_flags(&self, port: u16) -> u8 {
        unsafe { PORTS.get(&port) }.copied().unwrap_or(0)
    }
    #[inline(always)]
    fn include_v4(&self, a: [u8; 4]) -> Option<u8> {
        prefix(INCLUDE_V4.get(Key::new(32, a)))
    }
    #[inline(always)]
    fn exclude_v4(&self, a: [u8; 4]) -> Option<u8> {
        prefix(EXCLUDE_V4.get(Key::new(32, a)))
    }
    #[inline(always)]
    fn allow_v4(&self, view: u16, a: [u8; 4], port: u16) -> Option<u8> {
        prefix(ALLOW_V4.get(Key::new(ALLOW_BITS_V4, allow_key_v4(view, port, a))))
    }
    #[inline(always)]
    fn direct_v4(&self, view: u16, a: [u8; 4], port: u16) -> Option<u8> {
        prefix(DIRECT_V4.get(Key::new(ALLOW_BITS_V4, allow_key_v4(view, port, a))))
    }
    #[inline(always)]
    fn include_v6(&self, a: [u8; 16]) -> Option<u8> {
        prefix(INCLUDE_V6.get(Key::new(128, a)))
    }
    #[inline(always)]
    fn exclude_v6(&self, a: [u8; 16]) -> Option<u8> {
        prefix(EXCLUDE_V6.get(Key::new(128, a)))
    }
    #[inline(always)]
    fn allow_v6(&self, view: u16, a: [u8; 16], port: u16) -> Option<u8> {
        prefix(ALLOW_V6.get(Key::new(ALLOW_BITS_V6, allow_key_v6(view, port, a))))
    }
    #[inline(always)]
    fn direct_v6(&self, view: u16, a: [u8; 16], port: u16) -> Option<u8> {
        prefix(DIRECT_V6.get(Key::new(ALLOW_BITS_V6, allow_key_v6(view, port, a))))
    }
    /// `decide` asks only about the connect it decides, whose answer came with `Maps`.
    #[inline(always)]
    fn nameserver(&self, _netns: u64, _addr: [u8; 16]) -> bool {
        self.nameserver
    }
}

/// Whether a query to `addr` (IPv4-mapped) port `port` goes to one of the nameservers of the
/// caller's namespace (`DNS_RESOLVERS`): looked up only where `decide` may ask (port 53 under
/// `RESOLV_CONF`), and before it. Looked up where `decide` asks (inline, or through a function
/// of its own), its key made LLVM reload spills on paths that never wrote them, which the
/// verifiers of Linux 5.10 and 6.1 reject as reads of uninitialised stack.
#[inline(always)]
fn own_nameserver(cfg: &Config, netns: u64, addr: &[u8; 16], port: u16) -> bool {
    if port != DNS_PORT || cfg.dns_capture == DNS_CAPTURE_ALL {
        return false;
    }
    let key = ResolverKey { netns, addr: *addr };
    unsafe { DNS_RESOLVERS.get(&key) }.is_some()
}

/// Whether `LEARNED` holds (netns, addr, port) and it has not run out.
#[inline(always)]
fn learned(netns: u64, addr: &[u8; 16], port: u16) -> bool {
    let key = LearnedKey {
        netns,
        addr: *addr,
        port,
        _pad: [0; 6],
    };
    unsafe { LEARNED.get(&key) }.is_some_and(|until| *until > unsafe { bpf_ktime_get_ns() })
}

/// Count a decision: in the totals, and in the workload's counters when it is enrolled.
#[inline(always)]
fn count(reason: u32, wl: Option<&Workload>) {
    if let Some(c) = COUNTERS.get_ptr_mut(reason) {
        unsafe { *c += 1 };
    }
    if let Some(w) = wl
        && let Some(c) = WL_COUNTERS.get_ptr_mut(w.slot * REASON_COUNT + reason)
    {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[inline(always)]
fn bytes_to_words(b: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// How the socket's destination is written: `user_ip4`, or `user_ip6` (IPv6, or IPv4 in mapped
/// form on an IPv6 socket).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
    Mapped,
}

/// Replace the destination the connect() goes to. `addr` is IPv4-mapped unless `fam` is V6.
#[inline(always)]
fn write_dst(ctx: &SockAddrContext, fam: Family, addr: [u8; 16], port: u16) {
    let sa = ctx.sock_addr;
    unsafe {
        if fam == Family::V4 {
            let v4 = [addr[12], addr[13], addr[14], addr[15]];
            write_volatile(addr_of_mut!((*sa).user_ip4), u32::from_ne_bytes(v4));
        } else {
            let w = bytes_to_words(addr);
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), w[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), w[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), w[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), w[3]);
        }
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(port.to_be()));
    }
}

/// A Kubernetes Service behind the dialled address, if any: one of its endpoints chosen at
/// random, or `Err` when it has none.
#[inline(always)]
fn pick_backend(svc: Option<&Service>) -> Option<Result<Backend, ()>> {
    let svc = svc?;
    if svc.count == 0 {
        return Some(Err(()));
    }
    let index = unsafe { bpf_get_prandom_u32() } % svc.count;
    let b = unsafe { BACKENDS.get(&BackendKey { id: svc.id, index }) }?;
    Some(Ok(*b))
}

/// One connect(): translate a Kubernetes Service address, decide, apply the verdict.
/// `dialled` is the destination as given (IPv4-mapped unless `fam` is V6).
#[inline(always)]
fn connect(ctx: &SockAddrContext, fam: Family, dialled: [u8; 16], port: u16) -> i32 {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let wl = unsafe { WORKLOADS.get(&netns) };
    // Services are translated for enrolled workloads only: the others are left alone.
    let svc = unsafe {
        match v4_unmapped(&dialled) {
            _ if wl.is_none() => None,
            Some(a) if fam != Family::V6 => SERVICES_V4.get(&ServiceKeyV4 {
                addr: a,
                port,
                _pad: 0,
            }),
            _ => SERVICES_V6.get(&ServiceKeyV6 {
                addr: dialled,
                port,
                _pad: 0,
            }),
        }
    };
    let (dst, dst_port, service) = match pick_backend(svc) {
        None => (dialled, port, false),
        Some(Ok(b)) => (b.addr, b.port, true),
        Some(Err(())) => {
            count(Reason::ServiceNoEndpoints as u32, wl);
            return 0;
        }
    };
    let who = Who { netns, wl };
    match (fam, v4_unmapped(&dst)) {
        (Family::V4 | Family::Mapped, Some(v4)) => {
            handle(ctx, who, fam, v4, dst, dst_port, dialled, port, service)
        }
        (Family::V6, _) => handle(ctx, who, fam, dst, dst, dst_port, dialled, port, service),
        // An IPv4 Service with an IPv6 endpoint cannot be reached from this socket.
        _ => 1,
    }
}

/// The connecting socket's network namespace and its enrolment.
#[derive(Clone, Copy)]
struct Who<'a> {
    netns: u64,
    wl: Option<&'a Workload>,
}

/// Decide one connect() to `dst` (IPv4-mapped form in `dst16`) and apply the verdict.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn handle<A: Addr>(
    ctx: &SockAddrContext,
    who: Who,
    fam: Family,
    dst: A,
    dst16: [u8; 16],
    port: u16,
    dialled: [u8; 16],
    dialled_port: u16,
    service: bool,
) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return 1;
    };
    let ids = bpf_get_current_uid_gid();
    let Who { netns, wl } = who;
    let q = Query {
        dst,
        port,
        uid: ids as u32,
        gid: (ids >> 32) as u32,
        cgroup: unsafe { bpf_get_current_cgroup_id() },
        service,
        udp: false,
        netns,
    };
    let maps = Maps {
        nameserver: own_nameserver(cfg, netns, &dst16, port),
    };
    let d = decide(&maps, cfg, wl, &q);
    let mut d = with_learned(cfg, d, || learned(netns, &dst16, port));
    // A DNS query over TCP goes to the agent's DNS listener, any other redirect to its
    // outbound listener; both record the original destination alike.
    let to_port = if d.reason == Reason::Dns {
        cfg.dns_port
    } else {
        cfg.listener_port
    };
    if d.verdict == Verdict::Redirect && !agent_listening(ctx, fam, cfg, to_port) {
        d = without_agent(cfg, d);
    }
    count(d.reason as u32, wl);
    // The agent's own sockets and namespaces that are not enrolled (every other connect of
    // a node) keep no record: nothing more to do.
    if d.reason == Reason::Agent || d.reason == Reason::NotEnrolled {
        return 1;
    }
    if d.verdict == Verdict::Deny || (d.verdict == Verdict::Bypass && !service) {
        // A record from an earlier connect of this socket (one that failed before the
        // handshake) no longer applies.
        let rec = unsafe { SOCKS.get_ptr_mut(ctx) };
        if !rec.is_null() {
            unsafe { (*rec).flags = 0 };
        }
        return if d.verdict == Verdict::Deny { 0 } else { 1 };
    }
    // The socket's record, created on its first connect and rewritten on any later one. If
    // it cannot be stored, a direct connection still goes where it was allowed to, unlogged,
    // and a redirected one finds no original destination at the agent, which resets it: a
    // redirect never turns into an unmediated bypass.
    let rec = unsafe { SOCKS.get_or_insert_ptr_mut(ctx, None) };
    if !rec.is_null() {
        let mut flags = 0;
        if d.verdict != Verdict::Bypass {
            flags = if d.verdict == Verdict::Direct {
                SOCK_DIRECT
            } else {
                SOCK_REDIRECTED
            };
            unsafe {
                (*rec).open = DirectOpen {
                    conn: OrigDst {
                        addr: dst16,
                        port,
                        _pad: 0,
                        reason: d.reason as u32,
                        uid: q.uid,
                        gid: q.gid,
                        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
                        _pad2: 0,
                        cookie: bpf_get_socket_cookie(ctx.as_ptr()),
                        created_ns: bpf_ktime_get_ns(),
                        cgroup_id: q.cgroup,
                        netns,
                    },
                    received_at_fin_wait2: u64::MAX,
                };
            }
        }
        // Translated or redirected: getpeername() answers with what the application dialled.
        if service || d.verdict == Verdict::Redirect {
            flags |= SOCK_DIALLED;
            unsafe {
                (*rec).dialled = SockAddr16 {
                    addr: dialled,
                    port: dialled_port,
                    _pad: 0,
                };
            }
        }
        unsafe { (*rec).flags = flags };
    }
    if d.verdict == Verdict::Direct && !service {
        return 1;
    }
    if d.verdict != Verdict::Redirect {
        write_dst(ctx, fam, dst16, port);
        return 1;
    }
    let listener = if fam == Family::V6 {
        cfg.listener_v6
    } else {
        v4_mapped(cfg.listener_v4)
    };
    write_dst(ctx, fam, listener, to_port);
    1
}

/// `bpf_sock_tuple` as the lookup of a listener reads it: addresses and ports in network
/// order, the source left zero.
#[repr(C)]
struct Tuple4 {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

#[repr(C)]
struct Tuple6 {
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
}

/// The helpers' "look in the caller's namespace".
const CURRENT_NETNS: u64 = u64::MAX;

/// Whether the agent's listener on `port` (outbound or DNS) is there in the connecting
/// socket's network namespace: a redirect to it would be accepted. It is not while the agent
/// is down or before it has replayed the namespace's enrolment (the listener dies with the
/// process that holds it; the programs and maps outlive it).
#[inline(always)]
fn agent_listening(ctx: &SockAddrContext, fam: Family, cfg: &Config, port: u16) -> bool {
    let dport = port.to_be();
    let sk = unsafe {
        if fam == Family::V6 {
            let mut t = Tuple6 {
                saddr: [1; 4],
                daddr: bytes_to_words(cfg.listener_v6),
                sport: 0,
                dport,
            };
            // Zeroed word by word: LLVM may make a zeroed 16-byte field a call to memset, a
            // function whose frame verifiers before Linux 6.x count as 32 bytes on top of
            // connect6's 488 (over the 512 allowed).
            for w in 0..4 {
                write_volatile(addr_of_mut!(t.saddr[w]), 0);
            }
            bpf_sk_lookup_tcp(
                ctx.as_ptr(),
                addr_of_mut!(t).cast::<bpf_sock_tuple>(),
                size_of::<Tuple6>() as u32,
                CURRENT_NETNS,
                0,
            )
        } else {
            let mut t = Tuple4 {
                saddr: 0,
                daddr: u32::from_ne_bytes(cfg.listener_v4),
                sport: 0,
                dport,
            };
            bpf_sk_lookup_tcp(
                ctx.as_ptr(),
                addr_of_mut!(t).cast::<bpf_sock_tuple>(),
                size_of::<Tuple4>() as u32,
                CURRENT_NETNS,
                0,
            )
        }
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// Whether the agent's DNS socket (UDP, `cfg.dns_port` on every address of the family) is
/// there in the caller's namespace to take a query sent to `stub` (IPv4-mapped for IPv4).
#[inline(always)]
fn dns_listening(ctx: &SockAddrContext, stub: [u8; 16], port: u16) -> bool {
    let dport = port.to_be();
    let sk = unsafe {
        if let Some(v4) = v4_unmapped(&stub) {
            let mut t = Tuple4 {
                saddr: 0,
                daddr: u32::from_ne_bytes(v4),
                sport: 0,
                dport,
            };
            bpf_sk_lookup_udp(
                ctx.as_ptr(),
                addr_of_mut!(t).cast::<bpf_sock_tuple>(),
                size_of::<Tuple4>() as u32,
                CURRENT_NETNS,
                0,
            )
        } else {
            let mut t = Tuple6 {
                saddr: [1; 4],
                daddr: bytes_to_words(stub),
                sport: 0,
                dport,
            };
            for w in 0..4 {
                write_volatile(addr_of_mut!(t.saddr[w]), 0);
            }
            bpf_sk_lookup_udp(
                ctx.as_ptr(),
                addr_of_mut!(t).cast::<bpf_sock_tuple>(),
                size_of::<Tuple6>() as u32,
                CURRENT_NETNS,
                0,
            )
        }
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// The slot of nameserver `ns` (IPv4-mapped) in `DNS_NAMESERVERS`, given on first use: the
/// first of its `DNS_PROBES` slots that holds it or that it can take. `None` when all are
/// another nameserver's.
#[inline(always)]
fn nameserver_slot(ns: &[u8; 16]) -> Option<u16> {
    let want = u128::from_ne_bytes(*ns);
    for p in 0..DNS_PROBES {
        let slot = dns_slot(ns, p);
        let key = u32::from(slot);
        if let Some(v) = unsafe { DNS_NAMESERVERS.get(&key) } {
            if u128::from_ne_bytes(*v) == want {
                return Some(slot);
            }
            continue;
        }
        if DNS_NAMESERVERS.insert(&key, ns, BPF_NOEXIST as u64).is_ok() {
            return Some(slot);
        }
        // Another CPU took the slot meanwhile: for the same nameserver, or another.
        if let Some(v) = unsafe { DNS_NAMESERVERS.get(&key) }
            && u128::from_ne_bytes(*v) == want
        {
            return Some(slot);
        }
    }
    None
}

/// An address as two words, to pass to a function of its own in registers.
#[inline(always)]
fn split(a: [u8; 16]) -> (u64, u64) {
    (
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

#[inline(always)]
fn join(hi: u64, lo: u64) -> [u8; 16] {
    let (h, l) = (hi.to_ne_bytes(), lo.to_ne_bytes());
    [
        h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], l[0], l[1], l[2], l[3], l[4], l[5], l[6],
        l[7],
    ]
}

/// `udp_decide` for the hooks, which refuse the datagram or rewrite its destination when it
/// says so: the write stays in the hook, where the family is a constant (through a family
/// chosen at run time, LLVM merges the stores into one through a selected context pointer,
/// which the verifier rejects).
#[inline(always)]
fn datagram(ctx: &SockAddrContext, fam: Family, dst: [u8; 16], port: u16, connected: bool) -> i32 {
    let (hi, lo) = split(dst);
    let to = udp_decide(ctx.sock_addr, hi, lo, port, connected);
    if to == REFUSE {
        return 0;
    }
    if to >= 0 {
        let (port, slot) = ((to >> 16) as u16, to as u16);
        let stub = if fam == Family::V6 {
            dns_stub_v6(slot)
        } else {
            v4_mapped(dns_stub_v4(slot))
        };
        write_dst(ctx, fam, stub, port);
    }
    1
}

/// Forget what an earlier connect of this socket recorded (a UDP socket connected again).
#[inline(always)]
fn clear_record(ctx: &SockAddrContext) {
    let rec = unsafe { SOCKS.get_ptr_mut(ctx) };
    if !rec.is_null() {
        unsafe { (*rec).flags = 0 };
    }
}

/// What `udp_decide` returns for a datagram that is refused (EPERM).
const REFUSE: i64 = -2;

/// A UDP datagram to `ns` port `port`, at connect (`connected`) or at sendmsg: decide it.
/// When it is a DNS query the agent takes, it goes to the stub address of its nameserver's
/// slot on the agent's DNS port instead (127.53.X.Y for IPv4 nameservers, 100::53:XY for IPv6
/// ones): returns `port << 16 | slot`; a connected socket keeps the nameserver for
/// getpeername(). A datagram the workload's policy denies (`REGISTRY_ONLY` with no UDP entry
/// for the address and port) is refused: `REFUSE`, counted. Anything else (not captured,
/// excluded, allowed, nobody serving DNS in the namespace, DNS to port 53 when DNS is not
/// captured) goes where it was sent: -1.
///
/// A function of its own (a BPF-to-BPF call) with a frame of its own; the address comes as
/// two words: five scalar arguments at most.
#[inline(never)]
fn udp_decide(sa: *mut bpf_sock_addr, hi: u64, lo: u64, port: u16, connected: bool) -> i64 {
    let ctx = &SockAddrContext::new(sa);
    let ns = join(hi, lo);
    let ns4 = v4_unmapped(&ns);
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let wl = unsafe { WORKLOADS.get(&netns) };
    let Some(cfg) = CONFIG.get(0) else {
        return -1;
    };
    // Without DNS capture, name resolution stays the nameservers' business.
    if port == DNS_PORT && cfg.dns_port == 0 {
        if connected {
            clear_record(ctx);
        }
        return -1;
    }
    let ids = bpf_get_current_uid_gid();
    let (uid, gid, cgroup) = (ids as u32, (ids >> 32) as u32, unsafe {
        bpf_get_current_cgroup_id()
    });
    let maps = Maps {
        nameserver: own_nameserver(cfg, netns, &ns, port),
    };
    let mut d = match ns4 {
        Some(dst) => decide(
            &maps,
            cfg,
            wl,
            &Query {
                dst,
                port,
                uid,
                gid,
                cgroup,
                service: false,
                udp: true,
                netns,
            },
        ),
        None => decide(
            &maps,
            cfg,
            wl,
            &Query {
                dst: ns,
                port,
                uid,
                gid,
                cgroup,
                service: false,
                udp: true,
                netns,
            },
        ),
    };
    // UDP is captured for DNS only. Denied datagrams are refused (and counted: a workload
    // that retries shows); every other verdict leaves it alone, uncounted (a count per
    // datagram would cost every unconnected socket's send).
    if d.reason != Reason::Dns {
        if connected {
            clear_record(ctx);
        }
        if d.verdict == Verdict::Deny {
            count(d.reason as u32, wl);
            return REFUSE;
        }
        return -1;
    }
    let slot = nameserver_slot(&ns);
    let stub = match ns4 {
        Some(_) => v4_mapped(dns_stub_v4(slot.unwrap_or(0))),
        None => dns_stub_v6(slot.unwrap_or(0)),
    };
    if slot.is_none() || !dns_listening(ctx, stub, cfg.dns_port) {
        d = without_agent(cfg, d);
    }
    count(d.reason as u32, wl);
    if d.verdict != Verdict::Redirect {
        if connected {
            clear_record(ctx);
        }
        return -1;
    }
    if connected {
        let rec = unsafe { SOCKS.get_or_insert_ptr_mut(ctx, None) };
        if !rec.is_null() {
            unsafe {
                (*rec).dialled = SockAddr16 {
                    addr: ns,
                    port: DNS_PORT,
                    _pad: 0,
                };
                (*rec).flags = SOCK_DIALLED;
            }
        }
    }
    (i64::from(cfg.dns_port) << 16) | i64::from(slot.unwrap_or(0))
}

/// A reply from a stub address (127.53.X.Y, or 100::53:XY) on the agent's DNS port, received
/// in an enrolled namespace: the nameserver of slot X.Y (IPv4-mapped for IPv4) it stands for.
#[inline(always)]
fn stub_reply_source(ctx: &SockAddrContext, slot: Option<u16>, port: u16) -> Option<[u8; 16]> {
    let slot = slot?;
    let cfg = CONFIG.get(0)?;
    if cfg.dns_port == 0 || port != cfg.dns_port {
        return None;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    unsafe { WORKLOADS.get(&netns) }?;
    unsafe { DNS_NAMESERVERS.get(&u32::from(slot)) }.copied()
}

#[inline(always)]
fn sock_type(ctx: &SockAddrContext) -> u32 {
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).type_)) }
}

#[inline(always)]
fn is_tcp(ctx: &SockAddrContext) -> bool {
    sock_type(ctx) == SOCK_STREAM
}

#[inline(always)]
fn is_udp(ctx: &SockAddrContext) -> bool {
    sock_type(ctx) == SOCK_DGRAM
        && unsafe { read_volatile(addr_of!((*ctx.sock_addr).protocol)) } == IPPROTO_UDP
}

#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    u16::from_be(unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_port)) } as u16)
}

#[inline(always)]
fn user_ip4(ctx: &SockAddrContext) -> [u8; 4] {
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_ip4)) }.to_ne_bytes()
}

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    if !is_tcp(&ctx) {
        return 1;
    }
    connect(&ctx, Family::V4, v4_mapped(user_ip4(&ctx)), user_port(&ctx))
}

/// UDP connects (glibc's resolver, dig, QUIC clients): decided as datagrams are (DNS to the
/// agent, denied ones refused). A program of its own beside `egress_connect4`, both
/// attached to the same hook (cgroup links run side by side). Together in one program, the
/// TCP path and this one make LLVM spill values on one path and reload them on another, which
/// verifiers before Linux 6.3 reject as reads of uninitialised stack, and their stacks add up
/// past 512 bytes as functions of their own.
#[cgroup_sock_addr(connect4)]
pub fn egress_dns_connect4(ctx: SockAddrContext) -> i32 {
    if !is_udp(&ctx) {
        return 1;
    }
    datagram(
        &ctx,
        Family::V4,
        v4_mapped(user_ip4(&ctx)),
        user_port(&ctx),
        true,
    )
}

/// An unconnected UDP datagram (sendto, sendmsg), on an IPv4 socket or to an IPv4-mapped
/// address on an IPv6 one (the kernel hands those to the IPv4 path, and this hook).
#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    datagram(
        &ctx,
        Family::V4,
        v4_mapped(user_ip4(&ctx)),
        user_port(&ctx),
        false,
    )
}

/// recvmsg()/recvfrom() of a datagram on an IPv4 socket: a DNS reply the agent sent from a
/// stub address shows the nameserver the query was sent to, port 53, as resolvers check.
#[cgroup_sock_addr(recvmsg4)]
pub fn egress_recvmsg4(ctx: SockAddrContext) -> i32 {
    let slot = dns_stub_index(user_ip4(&ctx));
    if let Some(ns) = stub_reply_source(&ctx, slot, user_port(&ctx)) {
        write_dst(&ctx, Family::V4, ns, DNS_PORT);
    }
    1
}

/// The same on an IPv6 socket: IPv4 replies come as IPv4-mapped addresses, IPv6 ones from
/// the IPv6 stub addresses.
#[cgroup_sock_addr(recvmsg6)]
pub fn egress_recvmsg6(ctx: SockAddrContext) -> i32 {
    let src = user_ip6(&ctx);
    let (slot, fam) = match v4_unmapped(&src) {
        Some(v4) => (dns_stub_index(v4), Family::Mapped),
        None => (dns_stub_v6_index(&src), Family::V6),
    };
    if let Some(ns) = stub_reply_source(&ctx, slot, user_port(&ctx)) {
        write_dst(&ctx, fam, ns, DNS_PORT);
    }
    1
}

/// An unconnected UDP datagram on an IPv6 socket to an IPv6 address (IPv4-mapped ones take
/// the IPv4 path and `egress_sendmsg4`).
#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6(ctx: SockAddrContext) -> i32 {
    let ip = user_ip6(&ctx);
    if v4_unmapped(&ip).is_some() {
        return 1;
    }
    datagram(&ctx, Family::V6, ip, user_port(&ctx), false)
}

/// The enrolled workload the calling task belongs to: in an enrolled namespace (and in the
/// workload's cgroup where it is limited to one), and not the agent. For the hooks that are
/// not connects (socket creation, bind).
#[inline(always)]
fn enrolled_caller(ctx: *mut c_void, cfg: &Config) -> Option<&'static Workload> {
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if cgroup == cfg.agent_cgroup || (cfg.agent_cgroup_prev != 0 && cgroup == cfg.agent_cgroup_prev)
    {
        return None;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx) };
    let wl = unsafe { WORKLOADS.get(&netns) }?;
    if wl.cgroup_id != 0 && !(Maps { nameserver: false }).in_cgroup(wl.cgroup_id, wl.cgroup_level) {
        return None;
    }
    Some(wl)
}

/// Socket types and protocols no other hook decides: raw sockets (they build their own
/// packets), ICMP datagram sockets (ping), SCTP.
const SOCK_RAW: u32 = 3;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_ICMPV6: u32 = 58;
const IPPROTO_SCTP: u32 = 132;

/// The creation of an IPv4 or IPv6 socket that no other hook decides (raw, ICMP, SCTP), in
/// an enrolled namespace: refused (EPERM) when `spec.rawSockets` says so, or, without it,
/// for a workload under `REGISTRY_ONLY`, whose other sockets are all decided. Counted.
/// Packet sockets (AF_PACKET) are not inet sockets and never reach this hook.
#[cgroup_sock(sock_create)]
pub fn egress_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    let (ty, proto) = unsafe {
        (
            read_volatile(addr_of!((*sk).type_)),
            read_volatile(addr_of!((*sk).protocol)),
        )
    };
    let undecided = ty == SOCK_RAW
        || (ty == SOCK_DGRAM && (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6))
        || proto == IPPROTO_SCTP;
    if !undecided {
        return 1;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return 1;
    };
    if cfg.enabled == 0 || cfg.raw_sockets == RAW_SOCKETS_ALLOW {
        return 1;
    }
    let Some(wl) = enrolled_caller(ctx.as_ptr(), cfg) else {
        return 1;
    };
    if cfg.raw_sockets == RAW_SOCKETS_BY_MODE && wl.mode != MODE_REGISTRY_ONLY {
        return 1;
    }
    count(Reason::UndecidedSocket as u32, Some(wl));
    0
}

/// bind() to the agent's outbound or DNS port in an enrolled namespace, by anyone but the
/// agent: refused (EPERM), so a workload cannot take the ports before the agent listens
/// (while it restarts) nor beside it. Port 0 (any free port) and every other port pass.
#[inline(always)]
fn bind_decision(ctx: &SockAddrContext) -> i32 {
    let port = user_port(ctx);
    if port == 0 {
        return 1;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return 1;
    };
    if cfg.enabled == 0
        || (port != cfg.listener_port && (cfg.dns_port == 0 || port != cfg.dns_port))
    {
        return 1;
    }
    let Some(wl) = enrolled_caller(ctx.as_ptr(), cfg) else {
        return 1;
    };
    count(Reason::AgentPort as u32, Some(wl));
    0
}

#[cgroup_sock_addr(bind4)]
pub fn egress_bind4(ctx: SockAddrContext) -> i32 {
    bind_decision(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn egress_bind6(ctx: SockAddrContext) -> i32 {
    bind_decision(&ctx)
}

/// How the agent learns a network namespace's cookie where `SO_NETNS_COOKIE` is missing
/// (Linux before 5.14). Attached to the agent's own cgroup there only: a UDP connect to
/// `NETNS_PROBE_V4` port 0 records the caller's namespace cookie under its socket's cookie and
/// is refused (EPERM), so it goes no further. Every other connect passes untouched.
#[cgroup_sock_addr(connect4)]
pub fn egress_netns_probe(ctx: SockAddrContext) -> i32 {
    let ty = unsafe { read_volatile(addr_of!((*ctx.sock_addr).type_)) };
    let ip = unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_ip4)) }.to_ne_bytes();
    if ty != SOCK_DGRAM || user_port(&ctx) != 0 || ip != NETNS_PROBE_V4 {
        return 1;
    }
    let (sock, netns) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    let _ = NETNS_PROBE.insert(&sock, &netns, BPF_ANY as u64);
    0
}

#[inline(always)]
fn user_ip6(ctx: &SockAddrContext) -> [u8; 16] {
    let sa = ctx.sock_addr;
    unsafe {
        words_to_bytes([
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ])
    }
}

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    if !is_tcp(&ctx) {
        return 1;
    }
    let ip = user_ip6(&ctx);
    // An IPv4 destination on an IPv6 socket follows the IPv4 rules.
    let fam = if v4_unmapped(&ip).is_some() {
        Family::Mapped
    } else {
        Family::V6
    };
    connect(&ctx, fam, ip, user_port(&ctx))
}

/// UDP connects on IPv6 sockets, beside `egress_connect6` as `egress_dns_connect4` is beside
/// `egress_connect4`.
#[cgroup_sock_addr(connect6)]
pub fn egress_dns_connect6(ctx: SockAddrContext) -> i32 {
    if !is_udp(&ctx) {
        return 1;
    }
    let ip = user_ip6(&ctx);
    let fam = if v4_unmapped(&ip).is_some() {
        Family::Mapped
    } else {
        Family::V6
    };
    datagram(&ctx, fam, ip, user_port(&ctx), true)
}

/// What a translated or redirected socket dialled.
#[inline(always)]
fn dialled(ctx: &SockAddrContext) -> Option<SockAddr16> {
    let rec = unsafe { SOCKS.get_ptr_mut(ctx) };
    if rec.is_null() {
        return None;
    }
    let rec = unsafe { &*rec };
    (rec.flags & SOCK_DIALLED != 0).then_some(rec.dialled)
}

/// getpeername() on a translated or redirected socket: the address the application dialled,
/// not the endpoint or the agent's listener.
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(d) = dialled(&ctx) {
        write_dst(&ctx, Family::V4, d.addr, d.port);
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(d) = dialled(&ctx) {
        write_dst(&ctx, Family::V6, d.addr, d.port);
    }
    1
}

/// The client socket's local address, in its network namespace (`netns`, which the connect
/// hook recorded): the key the agent will look up. Context fields are read with volatile
/// loads: the verifier rejects loads through a context pointer with an offset.
#[inline(always)]
fn peer_key_of(ctx: &SockOpsContext, netns: u64) -> PeerKey {
    let ops = ctx.ops;
    // Every field is loaded unconditionally and the values selected afterwards: a branch per
    // family lets LLVM merge the loads through a selected context pointer, which the verifier
    // rejects ("dereference of modified ctx ptr").
    let (family, ip4, ip6, port) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
            read_volatile(addr_of!((*ops).local_port)),
        )
    };
    let addr = if family == u32::from(AF_INET) {
        v4_mapped(ip4.to_ne_bytes())
    } else {
        words_to_bytes(ip6)
    };
    PeerKey {
        netns,
        addr,
        port: port as u16,
        _pad: [0; 6],
    }
}

/// The client socket's own address.
#[inline(always)]
fn local_addr_of(ctx: &SockOpsContext) -> SockAddr16 {
    let k = peer_key_of(ctx, 0);
    SockAddr16 {
        addr: k.addr,
        port: k.port,
        _pad: 0,
    }
}

#[sock_ops]
pub fn egress_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return 1;
    }
    // Only sockets the connect hook kept a record on matter; the others (bypassed) stop at
    // this pointer test, with no map lookup.
    let rec = sock_record(&ctx);
    if rec.is_null() {
        return 1;
    }
    let flags = unsafe { (*rec).flags };
    if flags == 0 {
        return 1;
    }
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // Ask to hear about this socket's state changes: a redirected socket's record at the
        // agent must not outlive it, and a direct connection is accounted at its close.
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // Runs before the client's final ACK: the record is in place before accept() returns.
        if flags & SOCK_REDIRECTED != 0 {
            let conn = unsafe { (*rec).open.conn };
            let _ = ORIG_BY_PEER.insert(&peer_key_of(&ctx, conn.netns), &conn, BPF_ANY as u64);
        }
    } else if ctx.arg(1) == TCP_FIN_WAIT2 {
        if flags & SOCK_DIRECT != 0 {
            let received = unsafe { read_volatile(addr_of!((*ctx.ops).bytes_received)) };
            unsafe { (*rec).open.received_at_fin_wait2 = received };
        }
    } else if ctx.arg(1) == BPF_TCP_CLOSE {
        if flags & SOCK_REDIRECTED != 0 {
            let netns = unsafe { (*rec).open.conn.netns };
            let _ = ORIG_BY_PEER.remove(&peer_key_of(&ctx, netns));
        }
        if flags & SOCK_DIRECT != 0 {
            let open = unsafe { (*rec).open };
            report_direct_close(&ctx, open);
        }
        // Closed: nothing of this connect applies any more (the socket may connect again).
        unsafe { (*rec).flags = 0 };
    }
    1
}

/// The `SOCKS` record of the socket a sock_ops callback is about, or null.
#[inline(always)]
fn sock_record(ctx: &SockOpsContext) -> *mut SockRecord {
    let sk = unsafe { read_volatile(addr_of!((*ctx.ops).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return core::ptr::null_mut();
    }
    let map = core::ptr::from_ref(&SOCKS).cast_mut().cast();
    unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) }.cast()
}

/// Hand a direct connection's close to the agent, or count it as lost when the ring is full.
#[inline(always)]
fn report_direct_close(ctx: &SockOpsContext, open: DirectOpen) {
    let ops = ctx.ops;
    let (acked, received) = unsafe {
        (
            read_volatile(addr_of!((*ops).bytes_acked)),
            read_volatile(addr_of!((*ops).bytes_received)),
        )
    };
    let closed = DirectClosed {
        open,
        closed_ns: unsafe { bpf_ktime_get_ns() },
        bytes_acked: acked,
        bytes_received: received,
        local: local_addr_of(ctx),
        old_state: ctx.arg(0),
    };
    match DIRECT_CLOSED.reserve::<DirectClosed>(0) {
        Some(mut entry) => {
            entry.write(closed);
            // Wake the agent only once a batch has piled up (it also drains on a short
            // timer): a wakeup per connection would cost more than the record.
            let flags = if DIRECT_CLOSED.query(BPF_RB_AVAIL_DATA as u64) >= DIRECT_WAKEUP_BYTES {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            entry.submit(flags as u64);
        }
        None => {
            if let Some(c) = DIRECT_LOST.get_ptr_mut(0) {
                unsafe { *c += 1 };
            }
        }
    }
}

#[cgroup_sockopt(getsockopt)]
pub fn egress_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    let (level, optname) = unsafe {
        (
            read_volatile(addr_of!((*so).level)),
            read_volatile(addr_of!((*so).optname)),
        )
    };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return 1;
    }
    let sk: *mut bpf_sock = unsafe { read_volatile(addr_of!((*so).__bindgen_anon_1.sk)) };
    if sk.is_null() {
        return 1;
    }
    // On an accepted socket the destination is the client: the key of the record.
    let (family, port) = unsafe {
        (
            read_volatile(addr_of!((*sk).family)),
            u16::from_be(read_volatile(addr_of!((*sk).dst_port))),
        )
    };
    // Loaded unconditionally, selected afterwards (see `peer_key_of`).
    let (ip4, ip6) = unsafe {
        (
            read_volatile(addr_of!((*sk).dst_ip4)),
            [
                read_volatile(addr_of!((*sk).dst_ip6[0])),
                read_volatile(addr_of!((*sk).dst_ip6[1])),
                read_volatile(addr_of!((*sk).dst_ip6[2])),
                read_volatile(addr_of!((*sk).dst_ip6[3])),
            ],
        )
    };
    let addr = if family == u32::from(AF_INET) {
        v4_mapped(ip4.to_ne_bytes())
    } else {
        words_to_bytes(ip6)
    };
    // The external proxy runs in the agent's namespace, where its clients connected.
    let Some(cfg) = CONFIG.get(0) else {
        return 1;
    };
    let key = PeerKey {
        netns: cfg.agent_netns,
        addr,
        port,
        _pad: [0; 6],
    };
    let Some(rec) = (unsafe { ORIG_BY_PEER.get(&key) }) else {
        return 1;
    };
    let rec = *rec;
    let optval = unsafe { read_volatile(addr_of!((*so).__bindgen_anon_2.optval)) } as *mut u8;
    let end = unsafe { read_volatile(addr_of!((*so).__bindgen_anon_3.optval_end)) } as *mut u8;
    let port_be = rec.port.to_be_bytes();
    let len: i32 = if level == SOL_IP {
        // struct sockaddr_in: family, port (network order), address, 8 bytes of zero.
        let Some(v4) = v4_unmapped(&rec.addr) else {
            return 1;
        };
        if (optval as usize) + 16 > end as usize {
            return 1;
        }
        let fam = AF_INET.to_ne_bytes();
        let out: [u8; 16] = [
            fam[0], fam[1], port_be[0], port_be[1], v4[0], v4[1], v4[2], v4[3], 0, 0, 0, 0, 0, 0,
            0, 0,
        ];
        unsafe { core::ptr::write_unaligned(optval as *mut [u8; 16], out) };
        16
    } else {
        // struct sockaddr_in6: family, port, flowinfo, address, scope id.
        if (optval as usize) + 28 > end as usize {
            return 1;
        }
        let fam = AF_INET6.to_ne_bytes();
        let head: [u8; 8] = [fam[0], fam[1], port_be[0], port_be[1], 0, 0, 0, 0];
        unsafe {
            core::ptr::write_unaligned(optval as *mut [u8; 8], head);
            core::ptr::write_unaligned(optval.add(8) as *mut [u8; 16], rec.addr);
            core::ptr::write_unaligned(optval.add(24) as *mut [u8; 4], [0; 4]);
        }
        28
    };
    unsafe {
        write_volatile(addr_of_mut!((*so).optlen), len);
        write_volatile(addr_of_mut!((*so).retval), 0);
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
