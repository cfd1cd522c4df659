//! The outbound listener: every redirected connection is matched to its original destination
//! (recorded by the kernel programs), forwarded there over a marked socket that the hooks let
//! through, and logged in one line.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use egress_common::{
    MAP_ORIG_BY_COOKIE, MAP_ORIG_BY_PEER, OrigDst, PeerKey, Reason, v4_mapped, v4_unmapped,
};
use log::{info, warn};
use socket2::SockRef;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use tokio::{
    io::Interest,
    net::{TcpListener, TcpSocket, TcpStream},
};

/// The original-destination maps, shared by the connection tasks and the sweeper.
pub struct OrigMaps {
    pub by_cookie: HashMap<MapData, u64, OrigDst>,
    pub by_peer: HashMap<MapData, PeerKey, OrigDst>,
}

impl OrigMaps {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(OrigMaps {
            by_cookie: crate::datapath::open(pin_dir, MAP_ORIG_BY_COOKIE)?,
            by_peer: crate::datapath::open(pin_dir, MAP_ORIG_BY_PEER)?,
        })
    }

    /// Take the record of the client whose socket is `peer`, removing it from the map.
    fn take(&mut self, peer: SocketAddr) -> Option<OrigDst> {
        let key = peer_key(peer);
        let rec = self.by_peer.get(&key, 0).ok()?;
        let _ = self.by_peer.remove(&key);
        Some(rec)
    }

    /// Remove records older than `max_age`: connects that never reached the agent (refused,
    /// abandoned) and accepted connections the sock_ops close hook could not clear. Returns how
    /// many were removed.
    pub fn sweep(&mut self, max_age: Duration) -> usize {
        let now = monotonic_ns();
        let max = max_age.as_nanos() as u64;
        let stale = |r: &OrigDst| now.saturating_sub(r.created_ns) > max;
        let cookies: Vec<u64> = self
            .by_cookie
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, r)| stale(r))
            .map(|(k, _)| k)
            .collect();
        let peers: Vec<PeerKey> = self
            .by_peer
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, r)| stale(r))
            .map(|(k, _)| k)
            .collect();
        let n = cookies.len() + peers.len();
        for k in cookies {
            let _ = self.by_cookie.remove(&k);
        }
        for k in peers {
            let _ = self.by_peer.remove(&k);
        }
        n
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The key the kernel used for the client socket that is our peer.
pub fn peer_key(peer: SocketAddr) -> PeerKey {
    let addr = match peer.ip() {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    };
    PeerKey {
        addr,
        port: peer.port(),
        _pad: 0,
    }
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

pub struct Proxy {
    pub orig: Arc<Mutex<OrigMaps>>,
    /// `SO_MARK` of upstream sockets, which the hooks bypass.
    pub mark: u32,
    pub connect_timeout: Duration,
    pub pipes: PipePool,
}

impl Proxy {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((sock, peer)) => {
                    let px = self.clone();
                    tokio::spawn(async move { px.handle(sock, peer).await });
                }
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning.
                    warn!("accept on {:?}: {e}", listener.local_addr().ok());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
        let rec = self.orig.lock().map(|mut m| m.take(peer)).unwrap_or(None);
        let (dst, who) = match rec {
            Some(rec) => {
                let dst = orig_addr(&rec);
                let reason = Reason::from_u32(rec.reason).map_or("unknown", Reason::name);
                let who = format!(
                    "peer={peer} orig_dst={dst} verdict=redirect reason={reason} pid={} uid={} gid={}",
                    rec.pid, rec.uid, rec.gid
                );
                (dst, who)
            }
            // Not redirected by our hooks: perhaps by iptables REDIRECT, which conntrack answers.
            None => match netfilter_original_dst(&client) {
                Some(dst) => (
                    dst,
                    format!("peer={peer} orig_dst={dst} verdict=redirect reason=netfilter"),
                ),
                None => {
                    warn!(
                        "conn peer={peer} result=no-original-destination: not a redirected connection, reset"
                    );
                    reset(&client);
                    return;
                }
            },
        };
        let upstream = match self.connect(dst).await {
            Ok(s) => s,
            Err(e) => {
                info!(
                    "conn {who} upstream=- bytes_up=0 bytes_down=0 duration_ms={} result=connect-failed error=\"{e}\"",
                    start.elapsed().as_millis()
                );
                reset(&client);
                return;
            }
        };
        let local = upstream
            .local_addr()
            .map_or_else(|_| "-".to_owned(), |a| a.to_string());
        let (up, down, result) = relay(client, upstream, &self.pipes).await;
        let result = match result {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("error error=\"{e}\""),
        };
        info!(
            "conn {who} upstream={local} bytes_up={up} bytes_down={down} duration_ms={} result={result}",
            start.elapsed().as_millis()
        );
    }

    async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let sock = match dst {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        SockRef::from(&sock).set_mark(self.mark)?;
        match tokio::time::timeout(self.connect_timeout, sock.connect(dst)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.connect_timeout),
            )),
        }
    }
}

/// The destination before an iptables `REDIRECT`, from conntrack (`SO_ORIGINAL_DST`), if the
/// connection was redirected to us that way: not when it was addressed to us directly.
fn netfilter_original_dst(s: &TcpStream) -> Option<SocketAddr> {
    let local = s.local_addr().ok()?;
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let (level, len) = match local {
        SocketAddr::V4(_) => (libc::SOL_IP, std::mem::size_of::<libc::sockaddr_in>()),
        SocketAddr::V6(_) => (libc::SOL_IPV6, std::mem::size_of::<libc::sockaddr_in6>()),
    };
    let mut len = len as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            egress_common::SO_ORIGINAL_DST,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    let dst = match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            SocketAddr::from((
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            SocketAddr::from((
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => return None,
    };
    (dst != local).then_some(dst)
}

/// Close with a reset rather than a FIN, so that the client sees the failure at once.
fn reset(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Copy both ways until both are done, honouring half-close. On an error in either direction
/// both sockets are reset. Returns bytes client→upstream, upstream→client, and the outcome.
async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    pipes: &PipePool,
) -> (u64, u64, io::Result<()>) {
    let (mut up, mut down) = (0u64, 0u64);
    let result = tokio::try_join!(
        splice_half(&client, &upstream, pipes, &mut up),
        splice_half(&upstream, &client, pipes, &mut down)
    )
    .map(|_| ());
    if result.is_err() {
        reset(&client);
        reset(&upstream);
    }
    (up, down, result)
}

/// Bytes moved by one splice(2) call at most.
const SPLICE_CHUNK: usize = 1 << 20;
/// Pipes kept for reuse; more are created under load and closed when given back.
const POOLED_PIPES: usize = 256;

/// A pipe for splice(2): `r` and `w` ends, non-blocking, as large as the system allows up to
/// `SPLICE_CHUNK`.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid out-array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two fresh descriptors that nothing else owns.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Larger pipes mean fewer calls per byte on streams; the default (64 KiB) still works.
        // SAFETY: plain fcntl on our own descriptor.
        unsafe {
            libc::fcntl(
                w.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                SPLICE_CHUNK as libc::c_int,
            )
        };
        Ok(Pipe { r, w })
    }
}

/// Pipes are taken only while bytes are in flight, so an idle connection holds none.
#[derive(Default)]
pub struct PipePool(Mutex<Vec<Pipe>>);

impl PipePool {
    fn take(&self) -> io::Result<Pipe> {
        match self.0.lock().ok().and_then(|mut v| v.pop()) {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Return an empty pipe.
    fn give(&self, p: Pipe) {
        if let Ok(mut v) = self.0.lock()
            && v.len() < POOLED_PIPES
        {
            v.push(p);
        }
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One direction: `src` → pipe → `dst` with splice(2), no copy through user space. At EOF
/// the FIN is passed on (half-close) and the other direction stays open.
async fn splice_half(
    src: &TcpStream,
    dst: &TcpStream,
    pipes: &PipePool,
    count: &mut u64,
) -> io::Result<()> {
    loop {
        src.readable().await?;
        let pipe = pipes.take()?;
        let n = match src.try_io(Interest::READABLE, || {
            splice(src.as_raw_fd(), pipe.w.as_raw_fd(), SPLICE_CHUNK)
        }) {
            Ok(0) => {
                pipes.give(pipe);
                return SockRef::from(dst).shutdown(std::net::Shutdown::Write);
            }
            Ok(n) => n,
            Err(e) => {
                pipes.give(pipe);
                if e.kind() == io::ErrorKind::WouldBlock {
                    continue;
                }
                return Err(e);
            }
        };
        // Drain the pipe into `dst`. On an error the pipe, not empty, is dropped, not pooled.
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.r.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(k) => left -= k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        pipes.give(pipe);
        *count += n as u64;
    }
}
