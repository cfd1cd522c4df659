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
