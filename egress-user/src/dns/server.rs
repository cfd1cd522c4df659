//! The DNS server of every enrolled namespace. The datapath sends a workload's DNS queries here:
//!
//! - UDP, at connect or sendmsg, to a stub address 127.53.X.Y (IPv4 nameservers) or 100::53:XY
//!   (IPv6 ones) on the DNS port, where X.Y is the slot the kernel gave the nameserver the client
//!   asked (`DNS_NAMESERVERS`). Two sockets per namespace, bound to 0.0.0.0 and [::] with
//!   packet info, take them (the IPv6 stub range is routed to the loopback device there:
//!   `workloads::netns::stub_route`); a datagram addressed to anything else (a remote host
//!   sending to the pod's address) is dropped. The reply leaves from the same stub address,
//!   which the kernel's recvmsg hook turns back into the nameserver's address and port 53 for
//!   the client.
//! - TCP, at connect, to the listener on 127.0.0.1 or ::1, with the original destination
//!   recorded as for the outbound listener (`ORIG_BY_PEER`).
//!
//! Each query is first offered to `Dns::answer` (the registry's names), which may also send an
//! alias's target upstream (a chase); what it does not answer is forwarded over the same
//! transport, from a socket made in the workload's namespace (which
//! the datapath lets through: it is the agent's), to the nameserver the client asked. UDP
//! responses go through `Dns::limit` (the client's UDP size). What the nameserver answered is
//! shown to `Dns::learn` before the client gets it. One access record per query.

use std::{
    borrow::Cow,
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, RawFd},
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use egress_common::{DNS_PORT, MAP_DNS_NAMESERVERS, dns_stub_index, dns_stub_v6_index};
use log::warn;
use socket2::SockRef;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::{TcpListener, TcpStream, UdpSocket},
};

use super::{Action, Chase};
use crate::{
    datapath::{OrigMaps, orig_addr},
    telemetry::accesslog::{self, Record},
    workloads::Workload,
};

/// Decides a query (given the query and the Kubernetes namespace of the workload that asked):
/// answer it, forward it, chase an alias's target upstream, or drop it.
pub type Answer = Box<dyn Fn(&[u8], &str) -> Action + Send + Sync>;
/// Learns from a response of a nameserver relayed to a workload (forwarded or chased), before
/// it is sent on.
pub type Learn = Box<dyn Fn(&Workload, IpAddr, &[u8]) + Send + Sync>;
/// What a UDP response becomes before it is sent to the client (given the query): within the
/// size the client can take.
pub type Limit = Box<dyn Fn(&[u8], Vec<u8>) -> Vec<u8> + Send + Sync>;

/// How long a forwarded query waits for the nameserver (resolvers retry after about 5 s).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TCP client may stay silent between queries (RFC 7766 asks for seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// UDP queries of one namespace being answered at once; more are dropped (the client retries).
const MAX_UDP_IN_FLIGHT: usize = 1024;
/// The largest DNS message over either transport.
const MAX_MESSAGE: usize = 65_535;

/// A UDP socket of a namespace's DNS server: every address of the family, port `port`, with
/// the destination of each datagram reported (`IP_PKTINFO`, `IPV6_RECVPKTINFO`). The IPv6 one
/// is IPv6-only and may send from addresses the namespace does not have (`IPV6_FREEBIND`): its
/// replies leave from a stub address, which is routed to it but assigned nowhere. Made in the
/// caller's namespace.
pub fn udp_socket(port: u16, v6: bool) -> io::Result<std::net::UdpSocket> {
    let (domain, any) = if v6 {
        (
            socket2::Domain::IPV6,
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        )
    } else {
        (
            socket2::Domain::IPV4,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        )
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM.cloexec(), None)?;
    s.set_nonblocking(true)?;
    let opts: &[(libc::c_int, libc::c_int)] = if v6 {
        s.set_only_v6(true)?;
        &[
            (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
            (libc::IPPROTO_IPV6, libc::IPV6_FREEBIND),
        ]
    } else {
        &[(libc::IPPROTO_IP, libc::IP_PKTINFO)]
    };
    let on: libc::c_int = 1;
    for &(level, name) in opts {
        // SAFETY: a valid socket and an int option.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                name,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    s.bind(&any.into())?;
    Ok(s.into())
}

/// The nameserver slot of a stub address, if it is one (127.53.0.0/16 or 100::53:0/112).
pub fn stub_slot(stub: IpAddr) -> Option<u16> {
    match stub {
        IpAddr::V4(a) => dns_stub_index(a.octets()),
        IpAddr::V6(a) => dns_stub_v6_index(&a.octets()),
    }
}

/// The nameservers behind the stub addresses, as the kernel gave them slots. A slot, once
/// given, keeps its nameserver for as long as the maps live, so what was read once is kept.
pub struct Nameservers {
    lookup: Box<dyn Fn(u16) -> Option<[u8; 16]> + Send + Sync>,
    known: RwLock<HashMap<u16, IpAddr>>,
}

impl Nameservers {
    /// Over a lookup of slot → nameserver (IPv4-mapped).
    pub fn new(lookup: impl Fn(u16) -> Option<[u8; 16]> + Send + Sync + 'static) -> Self {
        Nameservers {
            lookup: Box::new(lookup),
            known: RwLock::default(),
        }
    }

    /// Over the pinned `DNS_NAMESERVERS` map in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let map: aya::maps::HashMap<aya::maps::MapData, u32, [u8; 16]> =
            crate::datapath::open(dir, MAP_DNS_NAMESERVERS)?;
        let map = Mutex::new(map);
        Ok(Nameservers::new(move |slot| {
            map.lock().ok()?.get(&u32::from(slot), 0).ok()
        }))
    }

    /// The nameserver a query sent to stub address `stub` was for.
    pub fn of(&self, stub: IpAddr) -> Option<IpAddr> {
        let slot = stub_slot(stub)?;
        if let Some(ip) = self.known.read().ok()?.get(&slot) {
            return Some(*ip);
        }
        let ip = crate::datapath::orig_addr_of(&(self.lookup)(slot)?, 0).ip();
        self.known.write().ok()?.insert(slot, ip);
        Some(ip)
    }
}

/// The DNS server, shared by every namespace's sockets.
pub struct Dns {
    pub answer: Answer,
    pub learn: Learn,
    pub limit: Limit,
    pub nameservers: Nameservers,
    /// Original destinations of the TCP queries.
    pub orig: Arc<Mutex<OrigMaps>>,
    pub log: accesslog::Log,
    /// `SO_MARK` of the forwarding sockets, as the proxy's upstream sockets.
    pub mark: u32,
    /// Set once the agent stops serving (it stops, or a new agent took the sockets over).
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// A datagram as the UDP socket received it.
#[derive(Clone, Copy, Debug)]
struct Datagram {
    len: usize,
    from: SocketAddr,
    /// The address it was sent to.
    to: IpAddr,
}

impl Dns {
    /// Serve a namespace's UDP socket until `stop`; the queries in flight are this task's.
    pub async fn serve_udp(self: Arc<Self>, sock: UdpSocket, wl: Arc<Workload>) {
        let sock = Arc::new(sock);
        let mut queries = tokio::task::JoinSet::new();
        let mut stop = self.stop.clone();
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            tokio::select! {
                () = async { let _ = stop.wait_for(|s| *s).await; } => break,
                got = sock.async_io(Interest::READABLE, || recv_pktinfo(sock.as_raw_fd(), &mut buf)) => match got {
                    Ok(Some(d)) => {
                        // Only what the datapath sent to a stub address, and not too many: the
                        // queries answered already count no more.
                        while queries.try_join_next().is_some() {}
                        if stub_slot(d.to).is_none()
                            || queries.len() >= MAX_UDP_IN_FLIGHT
                        {
                            continue;
                        }
                        let query = buf[..d.len].to_vec();
                        queries.spawn(self.clone().udp_query(sock.clone(), wl.clone(), d, query));
                    }
                    // Truncated, or without its destination: not a query of ours.
                    Ok(None) => {}
                    Err(e) => {
                        warn!("DNS: receiving on UDP ({}): {e}", wl.label);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = queries.join_next(), if !queries.is_empty() => {}
            }
        }
        while queries.join_next().await.is_some() {}
    }

    async fn udp_query(
        self: Arc<Self>,
        sock: Arc<UdpSocket>,
        wl: Arc<Workload>,
        d: Datagram,
        query: Vec<u8>,
    ) {
        let Some(ns) = self.nameservers.of(d.to) else {
            warn!(
                "DNS: a query from {} ({}) to {} names no nameserver: dropped",
                d.from, wl.label, d.to
            );
            return;
        };
        let ns = SocketAddr::new(ns, DNS_PORT);
        let mut q = Query::new(&wl, d.from, ns, "udp", &query);
        let asked = async |upstream: Vec<u8>| {
            tokio::time::timeout(FORWARD_TIMEOUT, self.forward_udp(&wl, ns, &upstream))
                .await
                .unwrap_or_else(|_| Err(Failed::timeout()))
        };
        let response = match (self.answer)(&query, &wl.namespace) {
            Action::Answer(a) | Action::Refuse(a) => Some(q.answered(a)),
            Action::Forward => q
                .forwarded(&query, asked(query.clone()).await)
                .inspect(|r| (self.learn)(&wl, ns.ip(), r)),
            Action::Chase(c) => {
                let got = asked(c.query(message_id(&query))).await;
                q.chased(&query, &c, got)
                    .inspect(|r| (self.learn)(&wl, ns.ip(), r))
            }
            Action::Ignore => None,
        };

        if let Some(r) = response {
            let r = (self.limit)(&query, r);
            q.rec.bytes_down = r.len() as u64;
            let sent = sock
                .async_io(Interest::WRITABLE, || {
                    send_from(sock.as_raw_fd(), &r, d.from, d.to)
                })
                .await;
            if let Err(e) = sent {
                q.failed("error", e.to_string());
            }
        }
        self.log.write(&q.done());
    }

    /// Send `query` to `ns` from the workload's namespace and wait for the response with its
    /// ID (anything else the nameserver sends is ignored).
    async fn forward_udp(
        &self,
        wl: &Workload,
        ns: SocketAddr,
        query: &[u8],
    ) -> Result<(Vec<u8>, SocketAddr), Failed> {
        let s = wl.udp_socket(ns.is_ipv6()).map_err(Failed::error)?;
        SockRef::from(&s)
            .set_mark(self.mark)
            .map_err(Failed::error)?;
        let s = UdpSocket::from_std(s).map_err(Failed::error)?;
        s.connect(ns).await.map_err(Failed::connect)?;
        let local = s.local_addr().map_err(Failed::error)?;
        s.send(query).await.map_err(Failed::error)?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let n = s.recv(&mut buf).await.map_err(Failed::error)?;
            if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Ok((buf, local));
            }
        }
    }

    /// Serve a namespace's TCP listener until `stop`; the connections are this task's.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener, wl: Arc<Workload>) {
        let mut conns = tokio::task::JoinSet::new();
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                () = async { let _ = stop.wait_for(|s| *s).await; } => break,
                accepted = listener.accept() => match accepted {
                    Ok((sock, peer)) => {
                        conns.spawn(self.clone().tcp_conn(sock, peer, wl.clone()));
                    }
                    Err(e) => {
                        warn!("DNS: accept ({}): {e}", wl.label);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        while conns.join_next().await.is_some() {}
    }

    /// One client connection: its queries in order, each answered or forwarded on one
    /// connection to the nameserver (opened at the first forwarded query), until the client
    /// closes or stays silent for `TCP_IDLE`.
    async fn tcp_conn(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr, wl: Arc<Workload>) {
        let rec = self
            .orig
            .lock()
            .map(|mut m| m.take(wl.cookie, peer))
            .unwrap_or(None);
        let Some(rec) = rec else {
            warn!(
                "DNS: TCP connection from {peer} ({}) with no original destination: closed",
                wl.label
            );
            return;
        };
        let ns = orig_addr(&rec);
        let mut upstream_conn: Option<TcpStream> = None;
        loop {
            let query = match tokio::time::timeout(TCP_IDLE, read_message(&mut client)).await {
                Ok(Ok(Some(q))) => q,
                _ => break,
            };
            let mut q = Query::new(&wl, peer, ns, "tcp", &query);
            (q.rec.pid, q.rec.uid, q.rec.gid) = (Some(rec.pid), Some(rec.uid), Some(rec.gid));
            let action = (self.answer)(&query, &wl.namespace);
            let chase = match &action {
                Action::Chase(c) => Some(c.query(message_id(&query))),
                _ => None,
            };
            let mut asked = async |upstream: &[u8]| {
                tokio::time::timeout(
                    FORWARD_TIMEOUT,
                    self.forward_tcp(&mut upstream_conn, &wl, ns, upstream),
                )
                .await
                .unwrap_or_else(|_| Err(Failed::timeout()))
            };
            let response = match action {
                Action::Answer(a) | Action::Refuse(a) => Some(q.answered(a)),
                Action::Forward => q
                    .forwarded(&query, asked(&query).await)
                    .inspect(|r| (self.learn)(&wl, ns.ip(), r)),
                Action::Chase(c) => {
                    let got = asked(chase.as_deref().unwrap_or_default()).await;
                    q.chased(&query, &c, got)
                        .inspect(|r| (self.learn)(&wl, ns.ip(), r))
                }
                Action::Ignore => None,
            };

            let Some(r) = response else {
                // The client sees its connection close, and retries.
                self.log.write(&q.done());
                break;
            };
            q.rec.bytes_down = r.len() as u64;
            let written = write_message(&mut client, &r).await;
            if let Err(e) = &written {
                q.failed("error", e.to_string());
            }
            self.log.write(&q.done());
            if written.is_err() {
                break;
            }
        }
    }

    /// Send `query` on the connection to `ns` (opened from the workload's namespace if there is
    /// none) and read one response. A connection that failed is dropped.
    async fn forward_tcp(
        &self,
        upstream: &mut Option<TcpStream>,
        wl: &Workload,
        ns: SocketAddr,
        query: &[u8],
    ) -> Result<(Vec<u8>, SocketAddr), Failed> {
        if upstream.is_none() {
            let s = wl.socket(ns.is_ipv6()).map_err(Failed::error)?;
            SockRef::from(&s)
                .set_mark(self.mark)
                .map_err(Failed::error)?;
            *upstream = Some(s.connect(ns).await.map_err(Failed::connect)?);
        }
        let Some(s) = upstream.as_mut() else {
            return Err(Failed::error(io::ErrorKind::NotConnected.into()));
        };
        let local = s.local_addr().map_err(Failed::error)?;
        let got = async {
            write_message(s, query).await?;
            read_message(s)
                .await?
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
        }
        .await;
        match got {
            Ok(r) => Ok((r, local)),
            Err(e) => {
                *upstream = None;
                Err(Failed::error(e))
            }
        }
    }
}

/// Why a forwarded query got no response: the record's `result` and `error`.
struct Failed(&'static str, String);

impl Failed {
    fn timeout() -> Failed {
        Failed("timeout", format!("no response within {FORWARD_TIMEOUT:?}"))
    }
    fn connect(e: io::Error) -> Failed {
        Failed("connect-failed", e.to_string())
    }
    fn error(e: io::Error) -> Failed {
        Failed("error", e.to_string())
    }
}

/// One query's access record while it is served.
struct Query {
    rec: Record,
    start: Instant,
}

impl Query {
    fn new(
        wl: &Workload,
        peer: SocketAddr,
        ns: SocketAddr,
        protocol: &'static str,
        query: &[u8],
    ) -> Query {
        let (name, qtype) = question(query).map_or((None, None), |(n, t)| {
            (Some(n), Some(type_name(t).into_owned()))
        });
        Query {
            rec: Record {
                time: SystemTime::now(),
                kind: "dns",
                workload: Some(wl.label.clone()),
                peer,
                orig_dst: ns,
                reason: egress_common::Reason::Dns.name(),
                protocol,
                verdict: "allow",
                policy: "registered",
                query_name: name,
                query_type: qtype,
                bytes_up: query.len() as u64,
                result: "ok",
                ..Record::default()
            },
            start: Instant::now(),
        }
    }

    fn answered(&mut self, response: Vec<u8>) -> Vec<u8> {
        self.rec.answered_by = Some("agent");
        self.rec.rcode = rcode(&response).map(|c| rcode_name(c).into_owned());
        response
    }

    /// The nameserver's response to `query`, or, when it sent none, SERVFAIL from the agent.
    fn forwarded(
        &mut self,
        query: &[u8],
        got: Result<(Vec<u8>, SocketAddr), Failed>,
    ) -> Option<Vec<u8>> {
        self.rec.answered_by = Some("nameserver");
        self.rec.upstream = Some(self.rec.orig_dst);
        match got {
            Ok((r, local)) => {
                self.rec.upstream_local = Some(local);
                self.rec.upstream_ms = Some(self.start.elapsed().as_millis() as u64);
                self.rec.rcode = rcode(&r).map(|c| rcode_name(c).into_owned());
                Some(r)
            }
            Err(Failed(result, error)) => {
                self.failed(result, error);
                self.rec.answered_by = Some("agent");
                let r = super::servfail(query)?;
                self.rec.rcode = rcode(&r).map(|c| rcode_name(c).into_owned());
                Some(r)
            }
        }
    }

    /// The response to `query`, a chased alias: the upstream's answer for the target, spliced
    /// behind the registry's CNAMEs (SERVFAIL when the upstream's is not an answer to the chase,
    /// or when it sent none).
    fn chased(
        &mut self,
        query: &[u8],
        chase: &Chase,
        got: Result<(Vec<u8>, SocketAddr), Failed>,
    ) -> Option<Vec<u8>> {
        let failed = got.is_err();
        let upstream = self.forwarded(query, got)?;
        if failed {
            return Some(upstream);
        }
        self.rec.answered_by = Some("agent+nameserver");
        let r = chase.splice(&upstream);
        self.rec.rcode = rcode(&r).map(|c| rcode_name(c).into_owned());
        Some(r)
    }

    fn failed(&mut self, result: &'static str, error: String) {
        self.rec.result = result;
        self.rec.error = Some(error);
    }

    fn done(mut self) -> Record {
        self.rec.duration_ms = self.start.elapsed().as_millis() as u64;
        self.rec
    }
}

/// A length-prefixed message (RFC 1035 4.2.2); `None` when the peer closed between messages.
async fn read_message(s: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

async fn write_message(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "message over 65,535 bytes"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await
}

/// Control buffer for one `in_pktinfo` or `in6_pktinfo`, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct PktinfoControl([u8; 64]);

/// A socket address as the kernel reads and writes it: `sockaddr_in` or `sockaddr_in6`.
#[repr(C)]
union RawAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl RawAddr {
    fn new(a: SocketAddr) -> (RawAddr, libc::socklen_t) {
        match a {
            SocketAddr::V4(a) => (
                RawAddr {
                    v4: libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: a.port().to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from(*a.ip()).to_be(),
                        },
                        sin_zero: [0; 8],
                    },
                },
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            SocketAddr::V6(a) => (
                RawAddr {
                    v6: libc::sockaddr_in6 {
                        sin6_family: libc::AF_INET6 as libc::sa_family_t,
                        sin6_port: a.port().to_be(),
                        sin6_flowinfo: 0,
                        sin6_addr: libc::in6_addr {
                            s6_addr: a.ip().octets(),
                        },
                        sin6_scope_id: a.scope_id(),
                    },
                },
                size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            ),
        }
    }

    fn get(&self) -> Option<SocketAddr> {
        // SAFETY: every member starts with the family, which says which one the kernel wrote.
        unsafe {
            match i32::from(self.v4.sin_family) {
                libc::AF_INET => Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(self.v4.sin_addr.s_addr)),
                    u16::from_be(self.v4.sin_port),
                ))),
                libc::AF_INET6 => Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(self.v6.sin6_addr.s6_addr),
                    u16::from_be(self.v6.sin6_port),
                    0,
                    self.v6.sin6_scope_id,
                ))),
                _ => None,
            }
        }
    }
}

/// Receive one datagram with the address it was sent to; `None` when it was truncated or came
/// without packet info.
fn recv_pktinfo(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<Datagram>> {
    // SAFETY: plain data, filled in by recvmsg(2) below.
    let mut from: RawAddr = unsafe { std::mem::zeroed() };
    let mut control = PktinfoControl([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut from).cast();
    msg.msg_namelen = size_of::<RawAddr>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: a valid socket; every pointer in `msg` is valid for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Ok(None);
    }
    let mut to = None;
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = libc::CMSG_DATA(c)
                        .cast::<libc::in_pktinfo>()
                        .read_unaligned();
                    to = Some(IpAddr::from(Ipv4Addr::from(u32::from_be(
                        info.ipi_addr.s_addr,
                    ))));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = libc::CMSG_DATA(c)
                        .cast::<libc::in6_pktinfo>()
                        .read_unaligned();
                    to = Some(IpAddr::from(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(to.zip(from.get()).map(|(to, from)| Datagram {
        len: n as usize,
        from,
        to,
    }))
}

/// Send `data` to `to` from local address `from` (`IP_PKTINFO`, `IPV6_PKTINFO`; the same
/// family).
fn send_from(fd: RawFd, data: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<usize> {
    let (dst, dst_len) = RawAddr::new(to);
    let mut control = PktinfoControl([0; 64]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw const dst).cast_mut().cast();
    msg.msg_namelen = dst_len;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: one control message of packet info in a buffer with room for either kind.
    unsafe {
        let size = match from {
            IpAddr::V4(_) => size_of::<libc::in_pktinfo>(),
            IpAddr::V6(_) => size_of::<libc::in6_pktinfo>(),
        } as u32;
        msg.msg_controllen = libc::CMSG_SPACE(size) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_len = libc::CMSG_LEN(size) as _;
        match from {
            IpAddr::V4(a) => {
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                libc::CMSG_DATA(c)
                    .cast::<libc::in_pktinfo>()
                    .write_unaligned(libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(a).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    });
            }
            IpAddr::V6(a) => {
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                libc::CMSG_DATA(c)
                    .cast::<libc::in6_pktinfo>()
                    .write_unaligned(libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: a.octets(),
                        },
                        ipi6_ifindex: 0,
                    });
            }
        }
    }
    // SAFETY: a valid socket and message.
    let n = unsafe { libc::sendmsg(fd, &msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The question of a message: its name in presentation form (bytes other than letters,
/// digits, `-` and `_` escaped as `\DDD`) and its type.
fn question(msg: &[u8]) -> Option<(String, u16)> {
    if u16::from_be_bytes([*msg.get(4)?, *msg.get(5)?]) == 0 {
        return None;
    }
    let mut name = String::new();
    let mut at = 12;
    loop {
        let len = usize::from(*msg.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        // A question name is not compressed (labels are at most 63 bytes).
        if len > 63 || name.len() > 1024 {
            return None;
        }
        for &b in msg.get(at..at + len)? {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                name.push(char::from(b));
            } else {
                name.push_str(&format!("\\{b:03}"));
            }
        }
        name.push('.');
        at += len;
    }
    if name.is_empty() {
        name.push('.');
    }
    let qtype = u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]);
    Some((name, qtype))
}

/// A message's ID.
fn message_id(msg: &[u8]) -> u16 {
    msg.first_chunk::<2>()
        .map_or(0, |id| u16::from_be_bytes(*id))
}

/// A response's RCODE (the header's four bits).
fn rcode(msg: &[u8]) -> Option<u8> {
    Some(msg.get(3)? & 0x0f)
}

fn type_name(t: u16) -> Cow<'static, str> {
    Cow::Borrowed(match t {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        64 => "SVCB",
        65 => "HTTPS",
        255 => "ANY",
        _ => return Cow::Owned(format!("TYPE{t}")),
    })
}

fn rcode_name(c: u8) -> Cow<'static, str> {
    Cow::Borrowed(match c {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => return Cow::Owned(format!("RCODE{c}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The stub address of nameserver slot `slot`, where the datapath sends its UDP queries.
    fn stub_address(slot: u16) -> IpAddr {
        IpAddr::from(egress_common::dns_stub_v4(slot))
    }

    #[test]
    fn stub_addresses_name_the_nameservers_the_kernel_gave_slots() {
        let reads = Arc::new(AtomicU32::new(0));
        let table = Arc::new(Mutex::new(HashMap::from([
            (1u16, egress_common::v4_mapped([198, 18, 0, 53])),
            (0x0102, egress_common::v4_mapped([127, 0, 0, 53])),
        ])));
        let ns = {
            let (reads, table) = (reads.clone(), table.clone());
            Nameservers::new(move |slot| {
                reads.fetch_add(1, Ordering::Relaxed);
                table.lock().unwrap().get(&slot).copied()
            })
        };
        assert_eq!(stub_address(1), IpAddr::from([127, 53, 0, 1]));
        assert_eq!(ns.of(stub_address(1)), Some(IpAddr::from([198, 18, 0, 53])));
        assert_eq!(
            ns.of(IpAddr::from([127, 53, 1, 2])),
            Some(IpAddr::from([127, 0, 0, 53]))
        );
        // Read once: a slot keeps its nameserver.
        assert_eq!(ns.of(stub_address(1)), Some(IpAddr::from([198, 18, 0, 53])));
        assert_eq!(reads.load(Ordering::Relaxed), 2);
        // Not a stub address: no lookup. A slot the kernel has not given yet: asked again
        // next time, and found once it is given.
        assert_eq!(ns.of(IpAddr::from([127, 0, 0, 1])), None);
        // The IPv6 stub of a slot names the same nameserver; ::1 is no stub.
        let v6: Ipv6Addr = "100::53:102".parse().unwrap();
        assert_eq!(IpAddr::from(egress_common::dns_stub_v6(0x0102)), v6);
        assert_eq!(ns.of(v6.into()), Some(IpAddr::from([127, 0, 0, 53])));
        assert_eq!(ns.of(Ipv6Addr::LOCALHOST.into()), None);
        assert_eq!(ns.of("100::54:102".parse().unwrap()), None);
        assert_eq!(ns.of(stub_address(7)), None);
        table
            .lock()
            .unwrap()
            .insert(7, egress_common::v4_mapped([198, 18, 0, 54]));
        assert_eq!(ns.of(stub_address(7)), Some(IpAddr::from([198, 18, 0, 54])));
        assert_eq!(reads.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn queries_are_named_in_presentation_form() {
        // ID, flags, one question, no other records; then the question.
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in [&b"www"[..], b"exa mple", b"org"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label);
        }
        q.extend_from_slice(&[0, 0, 28, 0, 1]);
        assert_eq!(question(&q), Some(("www.exa\\032mple.org.".to_owned(), 28)));
        assert_eq!(type_name(28), "AAAA");
        assert_eq!(type_name(65_534), "TYPE65534");
        // Cut short, or a compression pointer where labels are expected: no name.
        assert_eq!(question(&q[..q.len() - 3]), None);
        let mut ptr = q[..12].to_vec();
        ptr.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(question(&ptr), None);
        // The root.
        let mut root = q[..12].to_vec();
        root.extend_from_slice(&[0, 0, 2, 0, 1]);
        assert_eq!(question(&root), Some((".".to_owned(), 2)));
        let mut resp = q.clone();
        resp[3] = 0x83;
        assert_eq!(rcode(&resp).map(rcode_name).as_deref(), Some("NXDOMAIN"));
    }
}
