//! Names, keys and values of the BPF maps, as both sides see them.

/// `AF_INET` and `AF_INET6` as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Outbound traffic policy modes (`Workload::mode`).
pub const MODE_ALLOW_ANY: u8 = 0;
pub const MODE_REGISTRY_ONLY: u8 = 1;

/// Flags in the `PORTS` map.
pub const PORT_INCLUDE: u8 = 1;
pub const PORT_EXCLUDE: u8 = 2;

/// `SO_ORIGINAL_DST` (level `SOL_IP`) and `IP6T_SO_ORIGINAL_DST` (level `SOL_IPV6`).
pub const SO_ORIGINAL_DST: i32 = 80;

/// Map names, as they appear in the object file and under the pin directory.
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_INCLUDE_V4: &str = "INCLUDE_V4";
pub const MAP_INCLUDE_V6: &str = "INCLUDE_V6";
pub const MAP_EXCLUDE_V4: &str = "EXCLUDE_V4";
pub const MAP_EXCLUDE_V6: &str = "EXCLUDE_V6";
pub const MAP_ALLOW_V4: &str = "ALLOW_V4";
pub const MAP_ALLOW_V6: &str = "ALLOW_V6";
pub const MAP_PORTS: &str = "PORTS";
pub const MAP_EXCLUDE_UIDS: &str = "EXCLUDE_UIDS";
pub const MAP_EXCLUDE_GIDS: &str = "EXCLUDE_GIDS";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_ORIG_BY_PEER: &str = "ORIG_BY_PEER";
pub const MAP_SERVICES_V4: &str = "SERVICES_V4";
pub const MAP_SERVICES_V6: &str = "SERVICES_V6";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_DIRECT_V4: &str = "DIRECT_V4";
pub const MAP_DIRECT_V6: &str = "DIRECT_V6";
pub const MAP_SOCKS: &str = "SOCKS";
pub const MAP_DIRECT_CLOSED: &str = "DIRECT_CLOSED";
pub const MAP_DIRECT_LOST: &str = "DIRECT_LOST";
pub const MAP_WORKLOADS: &str = "WORKLOADS";
pub const MAP_WL_COUNTERS: &str = "WL_COUNTERS";
/// The nameservers captured UDP queries were sent to, by the index the kernel gave each
/// (`dns_stub_v4`): index → nameserver address (IPv4-mapped).
pub const MAP_DNS_NAMESERVERS: &str = "DNS_NAMESERVERS";
/// Addresses workloads learnt from DNS answers for hosts of TCP ServiceEntries without
/// addresses: (namespace, address, port) → when it runs out (`bpf_ktime_get_ns`). A connect
/// that matches one before then goes straight out (`Reason::DnsLearned`).
pub const MAP_LEARNED: &str = "LEARNED";
/// Each workload's own nameservers (its resolv.conf), for `spec.dns.capture: RESOLV_CONF`:
/// (namespace, nameserver address (IPv4-mapped)) → 1. Under it, a DNS query is captured only
/// to one of them (or from a workload that has none here).
pub const MAP_DNS_RESOLVERS: &str = "DNS_RESOLVERS";
/// Network namespace cookies learnt by probe, on kernels without `SO_NETNS_COOKIE` (before
/// 5.14): a socket's cookie → the cookie of the namespace it was made in. Not pinned: only the
/// agent that made it reads it.
pub const MAP_NETNS_PROBE: &str = "NETNS_PROBE";
/// The probe: a UDP connect to this address, port 0 (never a real destination), from the
/// agent's cgroup. `egress_netns_probe` records the caller's namespace cookie under the
/// socket's cookie and refuses the connect.
pub const NETNS_PROBE_V4: [u8; 4] = [127, 0, 0, 1];

/// Every map the agent pins, so that `egress explain` and tests can read the live datapath.
pub const ALL_MAPS: [&str; 25] = [
    MAP_CONFIG,
    MAP_INCLUDE_V4,
    MAP_INCLUDE_V6,
    MAP_EXCLUDE_V4,
    MAP_EXCLUDE_V6,
    MAP_ALLOW_V4,
    MAP_ALLOW_V6,
    MAP_PORTS,
    MAP_EXCLUDE_UIDS,
    MAP_EXCLUDE_GIDS,
    MAP_COUNTERS,
    MAP_ORIG_BY_PEER,
    MAP_SERVICES_V4,
    MAP_SERVICES_V6,
    MAP_BACKENDS,
    MAP_DIRECT_V4,
    MAP_DIRECT_V6,
    MAP_SOCKS,
    MAP_DIRECT_CLOSED,
    MAP_DIRECT_LOST,
    MAP_WORKLOADS,
    MAP_WL_COUNTERS,
    MAP_DNS_NAMESERVERS,
    MAP_LEARNED,
    MAP_DNS_RESOLVERS,
];

/// Default capacities; the agent may override them at load time.
pub const DEFAULT_MAX_CIDRS: u32 = 100_000;
pub const DEFAULT_MAX_ALLOWED: u32 = 65_536;
pub const DEFAULT_MAX_IDS: u32 = 4_096;
pub const DEFAULT_MAX_ORIG: u32 = 65_536;
pub const DEFAULT_MAX_SERVICES: u32 = 16_384;
/// Backend slots: twice the backends in force, since a service's new set is written before
/// its old one is removed.
pub const DEFAULT_MAX_BACKENDS: u32 = 131_072;
/// Enrolled workloads (network namespaces) a node's datapath decides for.
pub const DEFAULT_MAX_WORKLOADS: u32 = 1_024;
/// Learned (namespace, address, port) entries of the whole node; the least recently used go
/// first when it is full.
pub const DEFAULT_MAX_LEARNED: u32 = 65_536;
/// Nameservers a workload's entries in `DNS_RESOLVERS` hold at most; more are not captured
/// under `RESOLV_CONF` (resolvers use three).
pub const MAX_WORKLOAD_NAMESERVERS: u32 = 8;
/// Entries of `DNS_RESOLVERS`: every workload with its most nameservers.
pub const DEFAULT_MAX_DNS_RESOLVERS: u32 = DEFAULT_MAX_WORKLOADS * MAX_WORKLOAD_NAMESERVERS;
/// Bytes of the ring that carries closed direct connections to the agent: 7,710 records.
pub const DIRECT_CLOSED_BYTES: u32 = 1 << 20;
/// Records (128 bytes each and an 8-byte header in the ring) that wake the agent: 64. Fewer
/// wait for its timer.
pub const DIRECT_WAKEUP_BYTES: u64 = 64 * 136;

/// The datapath's settings: one entry in the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// cgroup v2 id of the agent's own cgroup: its sockets, in whatever network namespace
    /// it opens them, are its upstream connections. A workload cannot forge it (a socket mark
    /// it can: CAP_NET_RAW sets `SO_MARK` since Linux 5.17).
    pub agent_cgroup: u64,
    /// Network namespace cookie of the agent, where an external proxy asks for original
    /// destinations.
    pub agent_netns: u64,
    /// Port of the agent's outbound listener, host order.
    pub listener_port: u16,
    /// 1 once the agent has programmed the maps; 0 bypasses everything.
    pub enabled: u8,
    /// 1: connections to the ranges in `DIRECT_V4`/`DIRECT_V6` go straight out. 0 (an
    /// external proxy mediates): they are redirected like the others.
    pub direct: u8,
    /// IPv4 address of the outbound listener, network order bytes.
    pub listener_v4: [u8; 4],
    /// IPv6 address of the outbound listener.
    pub listener_v6: [u8; 16],
    /// The cgroup of the agent being replaced during a handover (0: none): its sockets are
    /// still the agent's while it drains.
    pub agent_cgroup_prev: u64,
    /// What a connect that would be redirected does when no agent listens in its namespace
    /// (`failureMode`): 0 closed (the redirect stands and connect() fails with
    /// ECONNREFUSED), 1 open (it goes straight out).
    pub failure_open: u8,
    /// Which DNS queries are captured (`spec.dns.capture`): `DNS_CAPTURE_ALL`, or
    /// `DNS_CAPTURE_RESOLV_CONF` (to the workload's own nameservers only).
    pub dns_capture: u8,
    /// Port of the agent's DNS sockets in every enrolled namespace, host order (UDP on
    /// 0.0.0.0, TCP on 127.0.0.1 and ::1); 0 leaves DNS queries alone.
    pub dns_port: u16,
    /// Sockets the other hooks do not decide (raw, ICMP, SCTP; `spec.rawSockets`), at
    /// creation in an enrolled namespace: `RAW_SOCKETS_BY_MODE`, `RAW_SOCKETS_REFUSE` or
    /// `RAW_SOCKETS_ALLOW`.
    pub raw_sockets: u8,
    pub _pad2: [u8; 3],
}

/// `Config::raw_sockets`: refused to workloads under `REGISTRY_ONLY`, allowed under
/// `ALLOW_ANY` (no `spec.rawSockets`).
pub const RAW_SOCKETS_BY_MODE: u8 = 0;
/// `Config::raw_sockets`: refused to every enrolled workload.
pub const RAW_SOCKETS_REFUSE: u8 = 1;
/// `Config::raw_sockets`: allowed to every workload.
pub const RAW_SOCKETS_ALLOW: u8 = 2;

/// An enrolled workload: the value of `WORKLOADS`, keyed by its network namespace cookie.
/// Connects from a namespace without one are left alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// The workload's counters in `WL_COUNTERS`: `slot * REASON_COUNT + reason`.
    pub slot: u32,
    /// Which ServiceEntries the workload sees (`exportTo`): the view of `ALLOW_*`/`DIRECT_*`
    /// keys.
    pub view: u16,
    /// `MODE_ALLOW_ANY` or `MODE_REGISTRY_ONLY`: the mesh's, or its namespace's Sidecar's.
    pub mode: u8,
    /// How many of its nameservers `DNS_RESOLVERS` holds; 0 (none known): under
    /// `DNS_CAPTURE_RESOLV_CONF`, its queries to every nameserver are captured.
    pub nameservers: u8,
    /// 0: every process of the namespace. Otherwise only processes in this cgroup v2 or
    /// below it (the agent's own namespace on a node, where its daemons live too).
    pub cgroup_id: u64,
    /// Depth of `cgroup_id` below the cgroup2 root (the root is 0).
    pub cgroup_level: u32,
    pub _pad2: u32,
    /// The workload's own addresses (its pod IPs; unused slots are zero): connections to them
    /// go out through loopback, which is the workload's own business.
    pub own_v4: [[u8; 4]; 2],
    pub own_v6: [[u8; 16]; 2],
}

/// `Config::dns_capture`: every DNS query, whatever the nameserver (Istio's
/// `--capture-all-dns`).
pub const DNS_CAPTURE_ALL: u8 = 0;
/// `Config::dns_capture`: only queries to the nameservers the workload was enrolled with
/// (`DNS_RESOLVERS`), as Istio's sidecar without `--capture-all-dns`.
pub const DNS_CAPTURE_RESOLV_CONF: u8 = 1;

/// Key of `DNS_RESOLVERS`: a workload's network namespace and one of its nameservers
/// (IPv4-mapped for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResolverKey {
    pub netns: u64,
    pub addr: [u8; 16],
}

/// The destination a redirected connection was made to, and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// The destination address; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// The destination port, host order.
    pub port: u16,
    pub _pad: u16,
    /// The `Reason` that redirected it.
    pub reason: u32,
    pub uid: u32,
    pub gid: u32,
    /// Thread-group id of the connecting process, in the initial pid namespace.
    pub pid: u32,
    pub _pad2: u32,
    /// Socket cookie of the client's socket.
    pub cookie: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the connect was redirected.
    pub created_ns: u64,
    /// The connecting task's cgroup v2 id (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// Network namespace cookie of the connecting socket: the workload.
    pub netns: u64,
}

/// A direct connection while it is open (in its socket's `SockRecord`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectOpen {
    /// What the connect hook stored: destination, reason, who, when (`created_ns`).
    pub conn: OrigDst,
    /// `bytes_received` when the socket entered `FIN_WAIT2`, or `u64::MAX`.
    pub received_at_fin_wait2: u64,
}

/// What the kernel keeps on a client socket it did not simply bypass (`SOCKS`, socket
/// storage): it lives and dies with the socket, so a connect that fails before the handshake
/// leaves nothing behind, and a socket with none costs the other hooks one pointer test.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRecord {
    /// The original destination (`SOCK_REDIRECTED`) or the direct connection being
    /// accounted (`SOCK_DIRECT`).
    pub open: DirectOpen,
    /// What the application dialled, which `getpeername` answers with (`SOCK_DIALLED`).
    pub dialled: SockAddr16,
    /// `SOCK_*` bits saying which fields are in use; 0 once the socket has closed.
    pub flags: u32,
}

/// `SockRecord::flags`: the socket was translated or redirected, `dialled` is set.
pub const SOCK_DIALLED: u32 = 1;
/// The socket was redirected to the agent: `open.conn` is its original destination, copied
/// to `ORIG_BY_PEER` once the handshake completes.
pub const SOCK_REDIRECTED: u32 = 2;
/// The socket went straight out and is accounted until it closes: `open`.
pub const SOCK_DIRECT: u32 = 4;

/// A direct connection's close, as the kernel reports it to the agent (`DIRECT_CLOSED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectClosed {
    pub open: DirectOpen,
    /// `bpf_ktime_get_ns()` at the close.
    pub closed_ns: u64,
    /// The socket's `bytes_acked` and `bytes_received` (RFC 4898). They count sequence
    /// space, so the SYN and the FINs are in them; `payload` takes those out.
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// The client socket's own address.
    pub local: SockAddr16,
    /// The TCP state the socket left for `TCP_CLOSE` (`TCP_SYN_SENT`: never connected).
    pub old_state: u32,
}

const _: () = assert!(core::mem::size_of::<DirectClosed>() == 128);

/// Linux TCP states (`include/net/tcp_states.h`) that a direct connection's close depends on.
pub const TCP_SYN_SENT: u32 = 2;
pub const TCP_FIN_WAIT2: u32 = 5;
pub const TCP_CLOSE_WAIT: u32 = 8;
pub const TCP_LAST_ACK: u32 = 9;
pub const TCP_CLOSING: u32 = 11;

impl DirectClosed {
    /// Payload bytes, sent (and acknowledged) and received, without the SYN and FINs in the
    /// kernel's counters. Which FINs went each way follows from the state the socket closed
    /// from: it reaches `TCP_CLOSE` from `LAST_ACK` or `CLOSING` when both FINs are through
    /// and its own acknowledged; from `FIN_WAIT2` with its own FIN acknowledged and the peer's
    /// FIN received if anything arrived since it entered `FIN_WAIT2` (a closed socket goes to
    /// TIME-WAIT from there at once, before the peer's FIN); from `CLOSE_WAIT` with only the
    /// peer's FIN; from the others by a reset or an abort, with neither.
    pub fn payload(&self) -> (u64, u64) {
        let (fin_acked, fin_received) = match self.old_state {
            TCP_SYN_SENT => return (0, 0),
            TCP_LAST_ACK | TCP_CLOSING => (1, 1),
            TCP_FIN_WAIT2 => (
                1,
                u64::from(self.bytes_received > self.open.received_at_fin_wait2),
            ),
            TCP_CLOSE_WAIT => (0, 1),
            _ => (0, 0),
        };
        (
            self.bytes_acked.saturating_sub(1 + fin_acked),
            self.bytes_received.saturating_sub(fin_received),
        )
    }
}

/// A socket address; IPv4 as `::ffff:a.b.c.d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr16 {
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of `ORIG_BY_PEER`: a client socket's network namespace and local address, which the
/// agent sees as the peer of the socket its listener in that namespace accepted. Every
/// namespace has its own 127.0.0.1, so the address alone is not a key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub netns: u64,
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: [u8; 6],
}
/// Key of `LEARNED`: the workload's network namespace, the address it learnt (IPv4-mapped)
/// and a port of the host it learnt it for. Laid out as `PeerKey`.
pub type LearnedKey = PeerKey;

/// One endpoint of a Kubernetes Service.
pub type Backend = SockAddr16;

/// Key of `SERVICES_V4`: a Service's cluster IP and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKeyV4 {
    pub addr: [u8; 4],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of `SERVICES_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKeyV6 {
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Value of `SERVICES_V4`/`SERVICES_V6`: the backends are `BACKENDS[(id, 0..count)]`. A
/// Service without endpoints (count 0) refuses connects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub id: u32,
    pub count: u32,
}

/// Key of `BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub id: u32,
    pub index: u32,
}

/// The port DNS queries are sent to.
pub const DNS_PORT: u16 = 53;
/// Default port of the agent's DNS sockets.
pub const DEFAULT_DNS_PORT: u16 = 15053;
/// Nameserver indexes: the last two bytes of a stub address 127.53.X.Y.
pub const DNS_NAMESERVER_SLOTS: u32 = 1 << 16;
/// Slots tried for a nameserver before its queries are left alone (the table is full).
pub const DNS_PROBES: u32 = 4;

/// The stub address that names nameserver slot `index` to the agent: 127.53.X.Y. A captured
/// UDP query is sent there (port `Config::dns_port`), and its reply comes from there.
#[inline(always)]
pub const fn dns_stub_v4(index: u16) -> [u8; 4] {
    let b = index.to_be_bytes();
    [127, 53, b[0], b[1]]
}

/// The nameserver slot a stub address names, if it is one (127.53.0.0/16).
#[inline(always)]
pub const fn dns_stub_index(a: [u8; 4]) -> Option<u16> {
    if a[0] == 127 && a[1] == 53 {
        Some(u16::from_be_bytes([a[2], a[3]]))
    } else {
        None
    }
}

/// The IPv6 stub addresses, `100::53:0/112` (inside RFC 6666's discard-only `100::/64`):
/// IPv6 has no loopback range, so the agent routes this one to the loopback device in each
/// namespace whose DNS it serves (a `local` route), and the last two bytes name a slot as the
/// IPv4 stubs do.
pub const DNS_STUB_V6_PREFIX: [u8; 14] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x53];
/// Prefix length of `DNS_STUB_V6_PREFIX`.
pub const DNS_STUB_V6_BITS: u8 = 112;

/// The IPv6 stub address of nameserver slot `index`: `100::53:XY`, for IPv6 nameservers.
#[inline(always)]
pub const fn dns_stub_v6(index: u16) -> [u8; 16] {
    let (p, b) = (DNS_STUB_V6_PREFIX, index.to_be_bytes());
    [
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13],
        b[0], b[1],
    ]
}

/// The nameserver slot an IPv6 stub address names, if it is one.
#[inline(always)]
pub fn dns_stub_v6_index(a: &[u8; 16]) -> Option<u16> {
    let p = DNS_STUB_V6_PREFIX;
    let mut i = 0;
    while i < 14 {
        if a[i] != p[i] {
            return None;
        }
        i += 1;
    }
    Some(u16::from_be_bytes([a[14], a[15]]))
}

/// The slot nameserver `ns` (IPv4-mapped) tries on attempt `probe` (0..`DNS_PROBES`): a hash
/// of its address, then the slots after it. The table is open addressing over a hash map
/// whose entries are only ever added with `BPF_NOEXIST`, so two CPUs giving a slot to two
/// nameservers at once cannot both win, and no atomic counter is needed (fetch-and-add in
/// BPF needs Linux 5.12).
#[inline(always)]
pub fn dns_slot(ns: &[u8; 16], probe: u32) -> u16 {
    // FNV-1a over the four words of the address.
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < 4 {
        let w = u32::from_ne_bytes([ns[4 * i], ns[4 * i + 1], ns[4 * i + 2], ns[4 * i + 3]]);
        h = (h ^ w).wrapping_mul(0x0100_0193);
        i += 1;
    }
    ((h ^ (h >> 16)) as u16).wrapping_add(probe as u16)
}

/// `::ffff:a.b.c.d` for an IPv4 address.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// The IPv4 address inside `::ffff:a.b.c.d`, if it is one.
#[inline(always)]
pub fn v4_unmapped(a: &[u8; 16]) -> Option<[u8; 4]> {
    if a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
    {
        Some([a[12], a[13], a[14], a[15]])
    } else {
        None
    }
}

/// The bit of a view number that makes it the view's UDP destinations: allow entries for UDP
/// ports are keyed `view | VIEW_UDP`, so a TCP entry never lets a datagram through, nor a UDP
/// entry a connection. Views are numbered below it.
pub const VIEW_UDP: u16 = 0x8000;

/// Key data of the `ALLOW_V4` and `DIRECT_V4` tries: view, port (both network order) then
/// address, so that a prefix of `32 + n` bits matches one view, one port and an `/n` range.
pub type AllowKeyV4 = [u8; 8];
/// Key data of the `ALLOW_V6` and `DIRECT_V6` tries, laid out as `AllowKeyV4`.
pub type AllowKeyV6 = [u8; 20];
/// Bits of an allow key before the address: view and port.
pub const ALLOW_KEY_HEAD_BITS: u32 = 32;

#[inline(always)]
pub const fn allow_key_v4(view: u16, port: u16, a: [u8; 4]) -> AllowKeyV4 {
    let (v, p) = (view.to_be_bytes(), port.to_be_bytes());
    [v[0], v[1], p[0], p[1], a[0], a[1], a[2], a[3]]
}

#[inline(always)]
pub const fn allow_key_v6(view: u16, port: u16, a: [u8; 16]) -> AllowKeyV6 {
    let (v, p) = (view.to_be_bytes(), port.to_be_bytes());
    [
        v[0], v[1], p[0], p[1], a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10],
        a[11], a[12], a[13], a[14], a[15],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with explicit padding fields and no pointers.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::DirectOpen {}
    unsafe impl aya::Pod for super::DirectClosed {}
    unsafe impl aya::Pod for super::SockAddr16 {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::ResolverKey {}
    unsafe impl aya::Pod for super::Workload {}
    unsafe impl aya::Pod for super::ServiceKeyV4 {}
    unsafe impl aya::Pod for super::ServiceKeyV6 {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::BackendKey {}
}
