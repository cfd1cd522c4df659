//! The outbound listener: every redirected connection is matched to its original destination
//! (recorded by the kernel programs), mediated by the protocol its ServiceEntry port declares
//! (HTTP by Host, TLS by SNI, TCP by address; undeclared ports pass through after a look at
//! their first bytes), forwarded over a marked socket that the hooks let through, and logged.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    config::Mode,
    datapath::OrigMaps,
    proxy::{http, upstream},
    registry::{self, Proto, Target, View},
    sniff,
    telemetry::accesslog::{self, Conn, Record},
    workloads::Workload,
};
use egress_common::Reason;
use log::warn;
use socket2::SockRef;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use tokio::{
    io::Interest,
    net::{TcpListener, TcpStream},
};

/// Connections a listener queues before the agent accepts them (the kernel caps it at
/// `net.core.somaxconn`). Every workload on the node connects through this one listener: a
/// burst beyond the queue would have its SYNs dropped and retried a second later.
pub const LISTEN_BACKLOG: u32 = 4096;

pub struct Proxy {
    pub orig: Arc<Mutex<OrigMaps>>,
    /// `SO_MARK` of upstream sockets, for iptables rules that exempt them (the hooks know
    /// the agent by its cgroup).
    pub mark: u32,
    pub connect_timeout: Duration,
    pub pipes: PipePool,
    pub registry: registry::Shared,
    pub log: accesslog::Log,
    /// How long to wait for a client's first bytes on a port no ServiceEntry declares
    /// before passing the connection on (server-first protocols send nothing).
    pub sniff_timeout: Duration,
    /// How long to wait for a request head or ClientHello on a declared HTTP or TLS port.
    pub header_timeout: Duration,
    /// The clients' cgroups by id, for the records.
    pub cgroups: accesslog::CgroupNames,
    /// Idle upstream HTTP connections, for the next request to the same upstream.
    pub upstreams: Arc<upstream::Pool>,
    /// Set once the agent stops accepting (it stops, or a new agent took its listeners over):
    /// the listeners are let go, and the connections accepted already go on to their end.
    pub stop: tokio::sync::watch::Sender<bool>,
    /// Connections being served, across workloads.
    pub live: Arc<std::sync::atomic::AtomicUsize>,
    /// What the workloads were answered through the agent's DNS.
    pub learner: Arc<crate::dns::Learner>,
}

/// One served connection, counted in `Proxy::live` while it lasts.
struct Live(Arc<std::sync::atomic::AtomicUsize>);

impl Live {
    fn new(n: &Arc<std::sync::atomic::AtomicUsize>) -> Live {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Live(n.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a client's first bytes showed on a port no ServiceEntry declares.
enum Sniffed {
    Host(String),
    Sni(String),
    Nothing,
}

/// What a connection's first steps decided.
enum Decided {
    /// A stream to relay to its upstream (when one was connected) or to refuse (`None`).
    Stream(Option<io::Result<TcpStream>>, Box<Record>),
    /// An HTTP connection, served request by request.
    Http(Box<Conn>),
}

/// The outcome of waiting for a client's first bytes.
enum Peeked<T> {
    Got(T),
    /// The client sent nothing (more) within the time allowed.
    Timeout,
    /// The client closed (or failed) before enough bytes came.
    Closed,
    /// More bytes than the parser accepts, still incomplete.
    TooLong,
}

impl<T> Peeked<T> {
    fn got(self) -> Option<T> {
        match self {
            Peeked::Got(t) => Some(t),
            _ => None,
        }
    }
}

impl Proxy {
    /// Accept the workload's redirected connections. The connections are this task's own:
    /// when the workload is released and the task aborted, they end with it, and every socket
    /// the agent held in the workload's namespace is closed.
    /// Once `stop` is set, the listener is let go (another agent may hold it still) and the
    /// task ends with its last connection.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, wl: Arc<Workload>) {
        let mut conns = tokio::task::JoinSet::new();
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                () = async { let _ = stop.wait_for(|s| *s).await; } => break,
                accepted = listener.accept() => match accepted {
                    Ok((sock, peer)) => {
                        let px = self.clone();
                        let wl = wl.clone();
                        let live = Live::new(&self.live);
                        conns.spawn(async move {
                            px.handle(sock, peer, wl).await;
                            drop(live);
                        });
                    }
                    Err(e) => {
                        // Out of descriptors or memory: back off instead of spinning.
                        warn!("accept on {:?} ({}): {e}", listener.local_addr().ok(), wl.label);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                // Finished connections leave the set as they end.
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        while conns.join_next().await.is_some() {}
    }

    /// Stop accepting everywhere and wait until the connections accepted so far end, for at
    /// most `grace`; returns how many were left to be cut.
    pub async fn drain(&self, grace: Duration) -> usize {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let n = self.live.load(std::sync::atomic::Ordering::Relaxed);
            if n == 0 || tokio::time::Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The original destination of an accepted connection, from the kernel's record or, for
    /// a connection iptables redirected, from conntrack.
    fn original(&self, client: &TcpStream, peer: SocketAddr, wl: Arc<Workload>) -> Option<Conn> {
        let rec = self
            .orig
            .lock()
            .map(|mut m| m.take(wl.cookie, peer))
            .unwrap_or(None);
        let conn = match rec {
            Some(rec) => {
                // Only when records are written: a new cgroup costs a /proc read.
                let cgroup = if self.log.format == accesslog::Format::Off {
                    None
                } else {
                    self.cgroups.name(rec.cgroup_id, rec.pid)
                };
                Conn::recorded(wl, peer, &rec, cgroup)
            }
            None => Conn {
                workload: wl,
                peer,
                dst: netfilter_original_dst(client)?,
                reason: "netfilter",
                pid: None,
                uid: None,
                gid: None,
                start: Instant::now(),
                time: SystemTime::now(),
                cgroup: None,
            },
        };
        Some(conn)
    }

    async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr, wl: Arc<Workload>) {
        let Some(conn) = self.original(&client, peer, wl) else {
            warn!(
                "conn peer={peer} result=no-original-destination: not a redirected connection, reset"
            );
            reset(&client);
            return;
        };
        // A task is as large as the largest state it can be in, and most of a connection's
        // life is spent relaying: the steps before (deciding, serving HTTP) are boxed, so
        // that thousands of relayed streams do not each carry room for them.
        let start = conn.start;
        let (upstream, rec) = match Box::pin(self.decide(conn, &client)).await {
            Decided::Stream(upstream, rec) => (upstream, rec),
            Decided::Http(conn) => return Box::pin(http::serve(self.clone(), *conn, client)).await,
        };
        self.finish(client, upstream, rec, start).await
    }

    /// Which protocol mediates the connection and, for streams, whether and where it goes.
    async fn decide(&self, conn: Conn, client: &TcpStream) -> Decided {
        let reg = registry::load(&self.registry);
        let reg = reg.view(&conn.workload.namespace);
        // Connections dialled through a Kubernetes Service are in the registry as they are.
        if conn.reason == Reason::RegistryService.name() {
            let mut rec = conn.record("connection", "tcp");
            rec.matched = Some("Kubernetes Service".into());
            rec.service = reg.kubernetes_service(conn.dst.ip()).map(str::to_owned);
            return self.stream(&conn, Some(Target::Addr(conn.dst)), rec).await;
        }
        match reg.protocol(conn.dst) {
            Some(Proto::Http) => {
                let first =
                    self.peek(client, self.header_timeout, sniff::MAX_HEAD, |b| {
                        match sniff::classify(b) {
                            sniff::Kind::Incomplete => None,
                            k => Some(k),
                        }
                    })
                    .await;
                if !matches!(first, Peeked::Got(sniff::Kind::Http2)) {
                    return Decided::Http(Box::new(conn));
                }
                // HTTP/2 with prior knowledge is not parsed: it passes as TCP, matched by
                // address only.
                let mut rec = conn.record("connection", "http2");
                let m = reg.by_address(conn.dst);
                let target = self.policy(&reg, &mut rec, m, None, conn.dst);
                self.stream(&conn, target, rec).await
            }
            Some(Proto::Tls) => self.tls(&conn, client, &reg).await,
            Some(Proto::Tcp) => {
                let mut rec = conn.record("connection", "tcp");
                // A port that entries without addresses declare TCP: they allow it.
                let m = reg
                    .by_address(conn.dst)
                    .or_else(|| reg.by_port(conn.dst.port()));
                let target = self.policy(&reg, &mut rec, m, None, conn.dst);
                self.stream(&conn, target, rec).await
            }
            None => self.passthrough(&conn, client, &reg).await,
        }
    }

    /// Connect a decided stream to its target (if it has one), from the workload's namespace.
    async fn stream(&self, conn: &Conn, target: Option<Target>, rec: Box<Record>) -> Decided {
        let up = match target {
            Some(t) => Some(self.connect_target(conn, &t).await),
            None => None,
        };
        Decided::Stream(up, rec)
    }

    /// Decide a stream by the entry that matched it (if any) and the mode; fill the verdict
    /// into `rec`. Returns where to connect, or `None` to refuse.
    fn policy(
        &self,
        reg: &View<'_>,
        rec: &mut Record,
        m: Option<registry::Match<'_>>,
        host: Option<&str>,
        dst: SocketAddr,
    ) -> Option<Target> {
        match m {
            Some(m) => {
                rec.matched = Some(m.entry.id.clone());
                rec.service = Some(m.entry.service(host).to_owned());
                rec.policy = "registered";
                let t = m.entry.target(m.port, host, dst);
                if t.is_none() {
                    rec.error = Some("the ServiceEntry has no endpoints".into());
                }
                t
            }
            None if reg.mode == Mode::AllowAny => {
                rec.policy = "allow-any";
                Some(Target::Addr(dst))
            }
            None => {
                rec.policy = "not-registered";
                None
            }
        }
    }

    /// Relay to the upstream connected for the client, or refuse (reset) when there is none
    /// or connecting failed; log either way.
    async fn finish(
        &self,
        client: TcpStream,
        upstream: Option<io::Result<TcpStream>>,
        mut rec: Box<Record>,
        start: Instant,
    ) {
        match upstream {
            None => {
                rec.verdict = "deny";
                rec.result = "denied";
                reset(&client);
            }
            Some(Err(e)) => {
                rec.result = "connect-failed";
                rec.error = Some(e.to_string());
                reset(&client);
            }
            Some(Ok(upstream)) => {
                rec.upstream = upstream.peer_addr().ok();
                rec.upstream_local = upstream.local_addr().ok();
                self.log.opened(&mut rec);
                let (up, down, result) = relay(client, upstream, &self.pipes).await;
                rec.bytes_up = up;
                rec.bytes_down = down;
                if let Err(e) = result {
                    rec.result = "error";
                    rec.error = Some(e.to_string());
                }
            }
        }
        rec.duration_ms = start.elapsed().as_millis() as u64;
        self.log.write(&rec);
    }

    /// A declared TLS port: allowed by the ClientHello's server name, never decrypted.
    async fn tls(&self, conn: &Conn, client: &TcpStream, reg: &View<'_>) -> Decided {
        let mut rec = conn.record("connection", "tls");
        let hello =
            self.peek(client, self.header_timeout, sniff::MAX_HELLO + 5, |b| {
                match sniff::client_hello(b) {
                    sniff::Hello::Incomplete => None,
                    sniff::Hello::Complete { sni } => Some(Ok(sni)),
                    sniff::Hello::Invalid(why) => Some(Err(why)),
                }
            })
            .await;
        let sni = match hello {
            Peeked::Got(Ok(sni)) => sni,
            Peeked::Got(Err(why)) => {
                rec.error = Some(format!("malformed ClientHello: {why}"));
                None
            }
            Peeked::Timeout => {
                rec.error = Some(format!("no ClientHello within {:?}", self.header_timeout));
                None
            }
            Peeked::TooLong => {
                rec.error = Some("ClientHello too large".into());
                None
            }
            Peeked::Closed => {
                rec.error = Some("client closed before its ClientHello".into());
                None
            }
        };
        rec.sni = sni.clone();
        let m = sni
            .as_deref()
            .and_then(|s| reg.by_host(s, conn.dst.port()))
            .or_else(|| reg.by_address(conn.dst));
        let target = self.policy(reg, &mut rec, m, sni.as_deref(), conn.dst);
        if target.is_none() && rec.error.is_none() {
            rec.error = Some(match &sni {
                Some(s) => format!(
                    "SNI {s:?} is not registered on port {} (REGISTRY_ONLY)",
                    conn.dst.port()
                ),
                None => "no SNI to match (REGISTRY_ONLY)".into(),
            });
        }
        self.stream(conn, target, rec).await
    }

    /// A port no entry declares: look at the first bytes to log the host, and pass through.
    /// An allowed connection is connected upstream while its first bytes come, and a server
    /// that speaks first (SMTP, MySQL, ...) ends the wait for them.
    async fn passthrough(&self, conn: &Conn, client: &TcpStream, reg: &View<'_>) -> Decided {
        let mut rec = conn.record("connection", "passthrough");
        let target = self.policy(reg, &mut rec, None, None, conn.dst);
        let sniff = self.peek(
            client,
            self.sniff_timeout,
            sniff::MAX_HEAD,
            |b| match sniff::classify(b) {
                sniff::Kind::Incomplete => None,
                sniff::Kind::Tls => match sniff::client_hello(b) {
                    sniff::Hello::Incomplete => None,
                    sniff::Hello::Complete { sni: Some(s) } => Some(Sniffed::Sni(s)),
                    _ => Some(Sniffed::Nothing),
                },
                sniff::Kind::Http1 => match sniff::http_head(b) {
                    sniff::Head::Incomplete => None,
                    sniff::Head::Complete(r) => {
                        Some(r.host.map_or(Sniffed::Nothing, Sniffed::Host))
                    }
                    sniff::Head::Invalid(_) => Some(Sniffed::Nothing),
                },
                _ => Some(Sniffed::Nothing),
            },
        );
        let (sniffed, upstream) = match target {
            // Refused: the first bytes only tell the log what was asked for.
            None => (sniff.await.got(), None),
            Some(t) => {
                let connect = self.connect_target(conn, &t);
                tokio::pin!(sniff, connect);
                let (sniffed, up) = tokio::select! {
                    s = &mut sniff => (s.got(), connect.await),
                    up = &mut connect => match up {
                        Ok(u) => {
                            let sniffed = tokio::select! {
                                s = &mut sniff => s.got(),
                                _ = u.readable() => None,
                            };
                            (sniffed, Ok(u))
                        }
                        Err(e) => (None, Err(e)),
                    },
                };
                (sniffed, Some(up))
            }
        };
        match sniffed {
            Some(Sniffed::Host(h)) => rec.host = Some(h),
            Some(Sniffed::Sni(s)) => rec.sni = Some(s),
            _ => {}
        }
        Decided::Stream(upstream, rec)
    }

    /// Wait (at most `wait`) until `parse` can say something about the client's first bytes,
    /// which stay in the socket (`MSG_PEEK`) for whoever reads next. The bytes are looked at
    /// in a buffer of the worker thread, never held across an await: a connection waiting for
    /// its first bytes costs no buffer (thousands of idle ones would otherwise each keep one).
    async fn peek<T>(
        &self,
        s: &TcpStream,
        wait: Duration,
        max: usize,
        mut parse: impl FnMut(&[u8]) -> Option<T>,
    ) -> Peeked<T> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut last = 0;
        loop {
            if tokio::time::timeout_at(deadline, s.readable())
                .await
                .is_err()
            {
                return Peeked::Timeout;
            }
            let peeked = s.try_io(Interest::READABLE, || {
                SCRATCH.with_borrow_mut(|buf| {
                    if buf.len() < max {
                        buf.resize(max, 0);
                    }
                    let n = peek_into(s.as_raw_fd(), &mut buf[..max])?;
                    let got = if n > last { parse(&buf[..n]) } else { None };
                    Ok((n, got))
                })
            });
            let n = match peeked {
                Ok((_, Some(t))) => return Peeked::Got(t),
                Ok((0, None)) => return Peeked::Closed,
                Ok((n, None)) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Peeked::Closed,
            };
            if n >= max {
                return Peeked::TooLong;
            }
            if n == last {
                // The socket stays readable with the same bytes: wait for more to arrive.
                if tokio::time::Instant::now() >= deadline {
                    return Peeked::Timeout;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            last = n;
        }
    }

    /// Connect to an upstream: an address, or a name resolved now (every address is tried in
    /// turn), within `connect_timeout` in all, from the workload's network namespace, so that
    /// the upstream sees the pod's own address. A name the workload was answered the address
    /// it dialled for (an ExternalName's target, through the agent's DNS) is not resolved
    /// again: that address is the upstream, as the client meant.
    pub async fn connect_target(&self, conn: &Conn, target: &Target) -> io::Result<TcpStream> {
        let wl = &conn.workload;
        let work = async {
            match target {
                Target::Addr(a) => self.connect_one(wl, *a).await,
                Target::Name(name, port)
                    if self.learner.answered(
                        wl.cookie,
                        &name.to_ascii_lowercase(),
                        conn.dst.ip(),
                        crate::datapath::monotonic_ns(),
                    ) =>
                {
                    self.connect_one(wl, SocketAddr::new(conn.dst.ip(), *port))
                        .await
                }
                Target::Name(name, port) => {
                    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), *port))
                        .await
                        .map_err(|e| io::Error::new(e.kind(), format!("resolving {name}: {e}")))?
                        .collect();
                    let mut last = io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("resolving {name}: no address"),
                    );
                    for a in addrs {
                        match self.connect_one(wl, a).await {
                            Ok(s) => return Ok(s),
                            Err(e) => last = io::Error::new(e.kind(), format!("{a}: {e}")),
                        }
                    }
                    Err(last)
                }
            }
        };
        match tokio::time::timeout(self.connect_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.connect_timeout),
            )),
        }
    }

    async fn connect_one(&self, wl: &Workload, dst: SocketAddr) -> io::Result<TcpStream> {
        let sock = wl.socket(dst.is_ipv6())?;
        SockRef::from(&sock).set_mark(self.mark)?;
        sock.connect(dst).await
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

/// recv(2) with `MSG_PEEK`: the bytes stay queued.
fn peek_into(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length; the descriptor is open.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
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
                // The other side may be gone already (it closed after its last bytes).
                return match SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                    r => r,
                };
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
