//! Network namespaces of enrolled workloads. A socket belongs to the namespace of the thread
//! that created it, so the agent creates a workload's listeners and upstream sockets on a
//! thread that has entered the workload's namespace for just that call, and comes back.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
    sync::OnceLock,
};

use anyhow::{Context as _, Result, bail};

/// `NS_GET_NSTYPE` (linux/nsfs.h): which kind of namespace an nsfs file is.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// The agent's own network namespace, where every thread returns after a call inside a
/// workload's. Opened once, before any thread enters another namespace.
static HOME: OnceLock<OwnedFd> = OnceLock::new();

/// Remember the agent's own namespace. Call it at start, from a thread in that namespace.
pub fn init_home() -> Result<()> {
    if HOME.get().is_none() {
        let fd = open_ns(Path::new("/proc/thread-self/ns/net"))?;
        let _ = HOME.set(fd);
    }
    Ok(())
}

fn open_ns(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("{}: not a valid path", path.display()))?;
    // SAFETY: a valid C string; the fd is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("opening {}", path.display()));
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an ioctl without arguments on a valid fd.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNET {
        bail!(
            "{} is not a network namespace (give a /var/run/netns/NAME or /proc/PID/ns/net path)",
            path.display()
        );
    }
    Ok(fd)
}

/// (device, inode) of a file: a network namespace's identity while it lives.
fn stat_id(fd: RawFd) -> io::Result<(u64, u64)> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out-pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}

/// (device, inode) of what `path` names now, if anything.
pub fn path_id(path: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    use std::os::unix::fs::MetadataExt as _;
    Some((meta.dev(), meta.ino()))
}

/// An open network namespace. Holding it keeps the namespace alive: drop it when the workload
/// is released.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    /// nsfs device and inode: the namespace's identity (a path may later name another one).
    pub id: (u64, u64),
    /// The kernel's cookie for it, which the datapath keys workloads by.
    pub cookie: u64,
}

impl NetNs {
    /// Open the namespace a path names (a `/var/run/netns/NAME` bind mount or
    /// `/proc/PID/ns/net`).
    pub fn open(path: &Path) -> Result<NetNs> {
        let fd = open_ns(path)?;
        let id = stat_id(fd.as_raw_fd()).with_context(|| format!("stat {}", path.display()))?;
        let mut ns = NetNs { fd, id, cookie: 0 };
        ns.cookie = ns
            .run(crate::datapath::sys::netns_cookie)?
            .with_context(|| format!("the cookie of network namespace {}", path.display()))?;
        Ok(ns)
    }

    /// Run `f` on this thread inside the namespace, then return to the agent's own.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let home = HOME
            .get()
            .context("the agent's own network namespace was not recorded")?;
        // SAFETY: setns on a valid namespace fd; it affects this thread only.
        if unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error()).context("entering the workload's namespace");
        }
        // Back home when `f` returns, and also if it panics.
        let _back = Home(home);
        Ok(f())
    }
}

/// Returns the thread to the agent's own namespace when dropped.
struct Home<'a>(&'a OwnedFd);

impl Drop for Home<'_> {
    fn drop(&mut self) {
        // SAFETY: setns on a valid namespace fd; it affects this thread only.
        if unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            // A thread left in a workload's namespace would open the next connection's sockets
            // there: nothing is safe after this.
            let e = io::Error::last_os_error();
            log::error!("could not return to the agent's network namespace: {e}; aborting");
            std::process::abort();
        }
    }
}

/// A socket fd closed on drop (for short-lived helper sockets).
struct Socket(OwnedFd);

impl Socket {
    fn new(domain: libc::c_int, ty: libc::c_int) -> io::Result<Socket> {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created, owned here.
        Ok(Socket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

/// Bring the loopback interface of the current thread's namespace up, as a runtime does for
/// a pod: the agent's listeners there are bound to 127.0.0.1 and ::1.
pub fn loopback_up() -> io::Result<()> {
    let s = Socket::new(libc::AF_INET, libc::SOCK_DGRAM)?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, c) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *c as libc::c_char;
    }
    // SAFETY: valid socket and ifreq.
    if unsafe { libc::ioctl(s.0.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the union member SIOCGIFFLAGS filled.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: as above.
    if unsafe { libc::ioctl(s.0.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The current thread's namespace's own addresses, outside loopback and link-local: at most
/// two of each family, as the datapath keeps them (`Workload::own_v4`, `own_v6`).
pub fn own_addresses() -> io::Result<super::Own> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr of the family it names.
        match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let a = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !a.is_loopback() && !a.is_link_local() && !v4.contains(&a.octets()) {
                    v4.push(a.octets());
                }
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let a = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if !a.is_loopback() && !a.is_unicast_link_local() && !v6.contains(&a.octets()) {
                    v6.push(a.octets());
                }
            }
            _ => {}
        }
    }
    // SAFETY: the list getifaddrs allocated.
    unsafe { libc::freeifaddrs(list) };
    let (mut own4, mut own6) = ([[0u8; 4]; 2], [[0u8; 16]; 2]);
    for (slot, a) in own4.iter_mut().zip(v4) {
        *slot = a;
    }
    for (slot, a) in own6.iter_mut().zip(v6) {
        *slot = a;
    }
    Ok((own4, own6))
}

/// What `stub_route` does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Route {
    Add,
    Remove,
}

/// Add (or replace) or remove, in the current thread's namespace, the route that makes the
/// IPv6 DNS stub addresses (`100::53:0/112`) local: `local 100::53:0/112 dev lo table local`,
/// as `ip -6 route add local ...` would. The datapath sends UDP queries for IPv6 nameservers
/// there, and the agent's DNS socket on `[::]` takes them. Whether a route was added or
/// removed: removing one that is not there is no error.
pub fn stub_route(what: Route) -> io::Result<bool> {
    const RTM_NEWROUTE: u16 = 24;
    const RTM_DELROUTE: u16 = 25;
    const NLMSG_ERROR: u16 = 2;
    const RT_TABLE_LOCAL: u8 = 255;
    const RTPROT_STATIC: u8 = 4;
    const RT_SCOPE_HOST: u8 = 254;
    const RTN_LOCAL: u8 = 2;
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    // SAFETY: a NUL-terminated name.
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if lo == 0 {
        return Err(io::Error::last_os_error());
    }
    let (ty, flags) = match what {
        Route::Add => (
            RTM_NEWROUTE,
            libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE,
        ),
        Route::Remove => (RTM_DELROUTE, libc::NLM_F_REQUEST | libc::NLM_F_ACK),
    };
    // nlmsghdr (16), rtmsg (12), RTA_DST (4 + 16), RTA_OIF (4 + 4).
    let mut m = Vec::with_capacity(56);
    m.extend_from_slice(&56u32.to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&(flags as u16).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[
        libc::AF_INET6 as u8,
        egress_common::DNS_STUB_V6_BITS,
        0,
        0,
        RT_TABLE_LOCAL,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&20u16.to_ne_bytes());
    m.extend_from_slice(&RTA_DST.to_ne_bytes());
    m.extend_from_slice(&egress_common::dns_stub_v6(0));
    m.extend_from_slice(&8u16.to_ne_bytes());
    m.extend_from_slice(&RTA_OIF.to_ne_bytes());
    m.extend_from_slice(&lo.to_ne_bytes());
    debug_assert_eq!(m.len(), 56);

    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, owned here.
    let s = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a valid socket and buffer; the kernel is the destination of an unbound socket.
    if unsafe { libc::send(s.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    loop {
        // SAFETY: a valid socket and buffer.
        let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = &buf[..n as usize];
        // nlmsghdr then, for NLMSG_ERROR, the error code (0: the acknowledgement).
        if got.len() < 20 {
            return Err(io::Error::other("short netlink answer"));
        }
        if u16::from_ne_bytes([got[4], got[5]]) != NLMSG_ERROR {
            continue;
        }
        let code = i32::from_ne_bytes([got[16], got[17], got[18], got[19]]);
        return match (code, what) {
            (0, _) => Ok(true),
            (e, Route::Remove) if -e == libc::ESRCH => Ok(false),
            (e, _) => Err(io::Error::from_raw_os_error(-e)),
        };
    }
}
