//! The host facts the agent needs: where cgroup v2 and bpffs are mounted, which cgroup a
//! process is in, and the agent's network namespace.

use std::{
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock, PoisonError},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::MapData;
use egress_common::NETNS_PROBE_V4;

/// One line of `/proc/self/mountinfo`: (mount point, filesystem type).
fn mounts() -> Result<Vec<(PathBuf, String)>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

fn parse_mountinfo_line(line: &str) -> Option<(PathBuf, String)> {
    // id parent major:minor root mount-point options [optional fields...] - fstype source ...
    let (left, right) = line.split_once(" - ")?;
    let mount_point = left.split(' ').nth(4)?;
    let fstype = right.split(' ').next()?;
    Some((
        PathBuf::from(unescape_octal(mount_point)),
        fstype.to_owned(),
    ))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 mount point, from `/proc/self/mountinfo` (never assumed).
pub fn cgroup2_root() -> Result<PathBuf> {
    mounts()?
        .into_iter()
        .find(|(_, t)| t == "cgroup2")
        .map(|(p, _)| p)
        .context(
            "no cgroup2 filesystem is mounted (see /proc/self/mountinfo): egress needs cgroup v2",
        )
}

/// The cgroup v2 directory a process is in.
pub fn cgroup_of(pid: &str) -> Result<PathBuf> {
    let root = cgroup2_root()?;
    Ok(root.join(cgroup_name(pid)?.trim_start_matches('/')))
}

/// The cgroup v2 path of a process below the mount point, as `/proc/PID/cgroup` gives it
/// (`/kubepods/...`).
pub fn cgroup_name(pid: &str) -> Result<String> {
    let path = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .with_context(|| format!("{path} has no cgroup v2 entry"))
}

/// Move a process into a cgroup.
pub fn enter_cgroup(cgroup: &Path, pid: u32) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).with_context(|| format!("writing {}", procs.display()))
}

/// The cgroup v2 id of a cgroup directory: its inode number, which the kernel's
/// `bpf_get_current_cgroup_id` returns for a task in it.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// How deep a cgroup is below the cgroup2 mount (the mount itself is 0).
pub fn cgroup_level(root: &Path, cgroup: &Path) -> Result<u32> {
    let rel = cgroup.strip_prefix(root).with_context(|| {
        format!(
            "{} is not below the cgroup2 mount {}",
            cgroup.display(),
            root.display()
        )
    })?;
    Ok(rel.components().count() as u32)
}

/// The cgroup the agent runs in, of its own: a child `egress-agent` of the cgroup it was
/// started in. The datapath recognises the agent's sockets by it (in every network namespace),
/// so no workload may share it; a workload cannot move itself there without write access to
/// the cgroup filesystem. Dropping it moves the agent back and removes the child if empty.
pub struct AgentCgroup {
    pub path: PathBuf,
    pub id: u64,
    /// Where the agent was started, when it moved.
    parent: Option<PathBuf>,
}

const AGENT_CGROUP: &str = "egress-agent";

impl AgentCgroup {
    pub fn enter() -> Result<AgentCgroup> {
        let current = cgroup_of("self")?;
        if current.file_name().is_some_and(|n| n == AGENT_CGROUP) {
            let id = cgroup_id(&current)?;
            return Ok(AgentCgroup {
                path: current,
                id,
                parent: None,
            });
        }
        let path = current.join(AGENT_CGROUP);
        let pid = std::process::id();
        // Another agent started here may remove the directory as it leaves: try again once.
        let mut tries = 0;
        loop {
            match std::fs::create_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("creating cgroup {}", path.display()));
                }
            }
            match enter_cgroup(&path, pid) {
                Ok(()) => break,
                Err(_) if tries == 0 => tries += 1,
                Err(e) => return Err(e),
            }
        }
        let id = cgroup_id(&path)?;
        Ok(AgentCgroup {
            path,
            id,
            parent: Some(current),
        })
    }
}

impl Drop for AgentCgroup {
    fn drop(&mut self) {
        if let Some(parent) = &self.parent
            && enter_cgroup(parent, std::process::id()).is_ok()
        {
            // Busy while another agent runs there: it removes it then.
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Make sure `pin_dir`'s parent is on a bpf filesystem, mounting one at `/sys/fs/bpf` if that
/// is where it should be and nothing is mounted there yet.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if parent != default {
        bail!(
            "{} is not on a bpf filesystem: mount one (mount -t bpf bpf DIR) or pass another --pin-path",
            parent.display()
        );
    }
    std::fs::create_dir_all(default).context("creating /sys/fs/bpf")?;
    let (src, dst, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: all pointers are valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
    }
    log::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Where the kernel has no `SO_NETNS_COOKIE` (before 5.14): the map `egress_netns_probe`
/// writes, once attached to the agent's cgroup (`use_netns_probe`).
static NETNS_PROBE: OnceLock<Mutex<aya::maps::HashMap<MapData, u64, u64>>> = OnceLock::new();

/// Whether this kernel answers `getsockopt(SO_NETNS_COOKIE)` (Linux 5.14 and later).
pub fn has_netns_cookie_option() -> Result<bool> {
    let sock = cookie_socket()?;
    match sockopt_u64(&sock, libc::SO_NETNS_COOKIE) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
        Err(e) => Err(e).context("getsockopt(SO_NETNS_COOKIE)"),
    }
}

/// Learn namespace cookies from `egress_netns_probe`'s map from now on, where
/// `has_netns_cookie_option` is false.
pub fn use_netns_probe(map: aya::maps::HashMap<MapData, u64, u64>) {
    let _ = NETNS_PROBE.set(Mutex::new(map));
}

/// The cookie of the network namespace the calling thread is in, as the kernel programs see it
/// (`bpf_get_netns_cookie`): `SO_NETNS_COOKIE` where the kernel has it, else a probe connect
/// that `egress_netns_probe` answers.
pub fn netns_cookie() -> Result<u64> {
    let sock = cookie_socket()?;
    match sockopt_u64(&sock, libc::SO_NETNS_COOKIE) {
        Ok(cookie) => Ok(cookie),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => probe_netns_cookie(&sock),
        Err(e) => Err(e).context("getsockopt(SO_NETNS_COOKIE)"),
    }
}

/// A UDP socket bound to no address in particular: a pod's namespace may have no address yet.
fn cookie_socket() -> Result<UdpSocket> {
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("a socket to learn the namespace cookie")
}

fn probe_netns_cookie(sock: &UdpSocket) -> Result<u64> {
    let probe = NETNS_PROBE.get().context(
        "getsockopt(SO_NETNS_COOKIE) needs Linux 5.14 or later, and egress_netns_probe is not attached",
    )?;
    match sock.connect((Ipv4Addr::from(NETNS_PROBE_V4), 0)) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        other => bail!("egress_netns_probe did not answer the probe connect: {other:?}"),
    }
    let cookie = sockopt_u64(sock, libc::SO_COOKIE).context("getsockopt(SO_COOKIE)")?;
    let mut map = probe.lock().unwrap_or_else(PoisonError::into_inner);
    let netns = map
        .get(&cookie, 0)
        .context("egress_netns_probe recorded nothing for the probe connect")?;
    let _ = map.remove(&cookie);
    Ok(netns)
}

/// A `u64` socket option of `SOL_SOCKET`.
fn sockopt_u64(sock: &UdpSocket, opt: libc::c_int) -> std::io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd and out-pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// Raise the soft open-file limit to the hard one: every proxied connection holds two sockets.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max
    {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid pointer to an initialised rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// Give the memory the allocator keeps after a burst (parsing a large configuration, a wave
/// of connections) back to the system: glibc's malloc returns only the top of its main heap
/// by itself, and keeps what its per-thread arenas freed.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free pages of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `bpf(2)` with `attr` of `size` bytes.
fn bpf(cmd: libc::c_long, attr: *mut u8, size: usize) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` points to `size` initialised bytes laid out as the command's union member.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// An object pinned on a bpf filesystem (a link, here), opened.
pub fn pinned_object(path: &Path) -> Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} has a NUL byte", path.display()))?;
    // union bpf_attr, BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32).
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(
        BPF_OBJ_GET,
        (&raw mut attr).cast(),
        std::mem::size_of::<ObjGet>(),
    )
    .with_context(|| format!("opening pinned {}", path.display()))?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// A cgroup link's id and the cgroup v2 id it is attached to (0 once that cgroup is gone).
pub fn link_info(link: &std::os::fd::OwnedFd) -> Result<(u32, u64)> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-aligned union whose
    // cgroup member starts with cgroup_id (u64).
    #[repr(C)]
    struct LinkInfo {
        kind: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        cgroup_id: u64,
        attach_type: u32,
        _rest: [u32; 13],
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_LINK_TYPE_CGROUP: u32 = 3;
    // SAFETY: plain integers.
    let mut info: LinkInfo = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: (&raw mut info) as u64,
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        (&raw mut attr).cast(),
        std::mem::size_of::<InfoByFd>(),
    )
    .context("reading a pinned link's information")?;
    if info.kind != BPF_LINK_TYPE_CGROUP {
        bail!(
            "the pinned link is of type {}, not a cgroup link",
            info.kind
        );
    }
    Ok((info.id, info.cgroup_id))
}

/// Whether a link of this id still exists (something holds it: a pin or a process).
pub fn link_exists(id: u32) -> bool {
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    #[repr(C)]
    struct GetById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = GetById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    match bpf(
        BPF_LINK_GET_FD_BY_ID,
        (&raw mut attr).cast(),
        std::mem::size_of::<GetById>(),
    ) {
        Ok(fd) => {
            // SAFETY: a descriptor the kernel just returned to us alone.
            unsafe { libc::close(fd as i32) };
            true
        }
        Err(_) => false,
    }
}

/// Make a link run another program, atomically: every hook call runs the old program or the
/// new one (`BPF_LINK_UPDATE`, Linux 5.7).
pub fn link_update(link: &std::os::fd::OwnedFd, prog: &std::os::fd::OwnedFd) -> Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(
        BPF_LINK_UPDATE,
        (&raw mut attr).cast(),
        std::mem::size_of::<LinkUpdate>(),
    )
    .context("BPF_LINK_UPDATE")?;
    Ok(())
}

/// A TCP listener that the agent replacing this one can bind beside it (`SO_REUSEPORT`):
/// the probes, metrics and admin ports answer throughout an upgrade. Non-blocking.
pub fn shared_listener(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    tcp_listener(addr, true, 1024)
}

/// A non-blocking TCP listener with `SO_REUSEADDR` (and `SO_REUSEPORT` when `shared`).
pub fn tcp_listener(
    addr: std::net::SocketAddr,
    shared: bool,
    backlog: i32,
) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.cloexec(),
        None,
    )?;
    s.set_reuse_address(true)?;
    if shared {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let l = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw";
        assert_eq!(
            parse_mountinfo_line(l),
            Some((
                PathBuf::from("/sys/fs/cgroup/unified"),
                "cgroup2".to_owned()
            ))
        );
        let l = r"50 31 0:40 / /mnt/with\040space rw - bpf bpf rw";
        assert_eq!(
            parse_mountinfo_line(l),
            Some((PathBuf::from("/mnt/with space"), "bpf".to_owned()))
        );
        assert_eq!(parse_mountinfo_line("garbage"), None);
    }
}
