//! Handing the enrolled workloads from a running agent to the one that replaces it (a rolling
//! update of the DaemonSet, an upgrade by hand), without a moment where a workload's listener
//! is closed.
//!
//! The running agent listens on a Unix socket beside its admin socket (`admin.handover` for
//! `admin.sock`, root only). A starting agent connects there before it enrols anything:
//!
//! 1. new → old: `handover 1\n`;
//! 2. old → new: the workloads as a JSON list (a 4-byte big-endian length first), each with
//!    how many outbound listeners and DNS sockets follow for it; then the sockets themselves,
//!    duplicated, as `SCM_RIGHTS` in messages of one byte and at most 250 descriptors;
//! 3. the new agent enrols each workload with the sockets it was given (the same sockets:
//!    connections queued on them wait for whichever agent accepts first) and serves them;
//! 4. new → old: `taken\n`. The old agent stops accepting, refuses enrolments from then on
//!    and drains the connections it is relaying until it is stopped.
//!
//! If the new agent goes away before step 4, the old one carries on as before.

use std::{
    io::{self, Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use log::{info, warn};
use serde::{Deserialize, Serialize};

const HELLO: &[u8] = b"handover 1\n";
const TAKEN: &[u8] = b"taken\n";
/// Descriptors per message (the kernel takes at most 253).
const FDS_PER_MESSAGE: usize = 250;
/// How long the old agent waits for the new one to serve what it was given: enrolling a
/// thousand namespaces takes a few seconds.
const TAKE_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the agent whose admin socket is `admin_socket` hands its workloads over.
pub fn socket_path(admin_socket: &Path) -> PathBuf {
    admin_socket.with_extension("handover")
}

/// One workload as handed over: what the new agent needs to enrol it as it was.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Handed {
    /// Where it was enrolled from; `None` for the agent's own namespace.
    pub netns: Option<PathBuf>,
    /// That path's namespace (device, inode) as the old agent holds it.
    pub id: Option<(u64, u64)>,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container_id: Option<String>,
    /// How many outbound listeners follow for it.
    pub listeners: usize,
    /// How many DNS sockets (UDP and TCP) follow its outbound listeners; none from an agent
    /// without DNS capture, and the new agent then opens them itself.
    #[serde(default)]
    pub dns: usize,
    /// The nameservers it was enrolled with.
    #[serde(default)]
    pub nameservers: Vec<std::net::IpAddr>,
}

/// What a starting agent was handed, until it confirms that it serves it.
pub struct Taken {
    stream: UnixStream,
    pub workloads: Vec<(Handed, super::Sockets)>,
}

/// Ask the agent running at `path` for its workloads; `None` when none answers there.
pub fn take(path: &Path) -> Result<Option<Taken>> {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let what = || {
        format!(
            "taking the workloads over from the agent at {}",
            path.display()
        )
    };
    stream.write_all(HELLO).with_context(what)?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).with_context(what)?;
    let mut list = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut list).with_context(what)?;
    let handed: Vec<Handed> = serde_json::from_slice(&list).with_context(what)?;
    let total: usize = handed.iter().map(|h| h.listeners + h.dns).sum();
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(total);
    while fds.len() < total {
        let got = recv_fds(&stream).with_context(what)?;
        if got.is_empty() {
            bail!(
                "{}: the running agent sent fewer sockets than it listed",
                what()
            );
        }
        fds.extend(got);
    }
    let mut fds = fds.into_iter();
    let workloads = handed
        .into_iter()
        .map(|h| {
            let mut s = super::Sockets {
                outbound: fds
                    .by_ref()
                    .take(h.listeners)
                    .map(std::net::TcpListener::from)
                    .collect(),
                ..super::Sockets::default()
            };
            for fd in fds.by_ref().take(h.dns) {
                if socket2::SockRef::from(&fd).r#type().ok() == Some(socket2::Type::DGRAM) {
                    s.dns_udp.push(std::net::UdpSocket::from(fd));
                } else {
                    s.dns_tcp.push(std::net::TcpListener::from(fd));
                }
            }
            (h, s)
        })
        .collect();
    Ok(Some(Taken { stream, workloads }))
}

impl Taken {
    /// The sockets of the agent's own namespace, when the old agent had them.
    pub fn own(&mut self) -> Option<super::Sockets> {
        let i = self.workloads.iter().position(|(h, _)| h.netns.is_none())?;
        Some(self.workloads.swap_remove(i).1)
    }

    /// Tell the old agent that this one serves everything it was given: it stops accepting.
    pub fn confirm(mut self) -> Result<()> {
        self.stream
            .write_all(TAKEN)
            .context("telling the agent that ran that its workloads are served")
    }
}

/// The running agent's side: serve handovers on `listener` on a thread of its own. `hand`
/// lists the workloads with duplicates of their listeners (and from then on, enrolments are
/// refused), or `None` when it cannot (the new agent then starts from the state file);
/// `done(true)` once the new agent serves them, `done(false)` if it went away first.
pub fn serve(
    listener: UnixListener,
    hand: impl Fn() -> Option<Vec<(Handed, Vec<OwnedFd>)>> + Send + 'static,
    done: impl Fn(bool) + Send + 'static,
) -> Result<()> {
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let mut hello = [0u8; HELLO.len()];
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                if s.read_exact(&mut hello).is_err() || hello != HELLO {
                    continue;
                }
                let Some(workloads) = hand() else {
                    warn!("could not list the workloads for a new agent");
                    done(false);
                    continue;
                };
                let n = workloads.len();
                match send(&mut s, workloads) {
                    Ok(()) => {
                        info!("handing {n} workloads over to a new agent");
                    }
                    Err(e) => {
                        warn!("handing the workloads over: {e:#}");
                        done(false);
                        continue;
                    }
                }
                let _ = s.set_read_timeout(Some(TAKE_TIMEOUT));
                let mut taken = [0u8; TAKEN.len()];
                if s.read_exact(&mut taken).is_ok() && taken == TAKEN {
                    done(true);
                    return;
                }
                warn!("the new agent went away before it served the workloads: serving them on");
                done(false);
            }
        })
        .context("starting the handover thread")?;
    Ok(())
}

fn send(s: &mut UnixStream, workloads: Vec<(Handed, Vec<OwnedFd>)>) -> Result<()> {
    let (list, fds): (Vec<Handed>, Vec<Vec<OwnedFd>>) = workloads.into_iter().unzip();
    let body = serde_json::to_vec(&list)?;
    s.write_all(&(body.len() as u32).to_be_bytes())?;
    s.write_all(&body)?;
    let fds: Vec<RawFd> = fds.iter().flatten().map(|f| f.as_raw_fd()).collect();
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        send_fds(s, chunk)?;
    }
    // `fds` (the duplicates) close here: the new agent holds its own now.
    Ok(())
}

/// The buffers of a one-byte message with room for `size` bytes of descriptors.
struct OneByte {
    byte: [u8; 1],
    iov: libc::iovec,
    control: Vec<u8>,
}

impl OneByte {
    fn new(size: usize) -> OneByte {
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(size as u32) } as usize;
        OneByte {
            byte: [0],
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 1,
            },
            control: vec![0u8; space],
        }
    }

    /// A message header pointing into these buffers, valid while they do not move.
    fn header(&mut self) -> libc::msghdr {
        self.iov.iov_base = self.byte.as_mut_ptr().cast();
        // SAFETY: msghdr is plain data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut self.iov;
        msg.msg_iovlen = 1;
        msg.msg_control = self.control.as_mut_ptr().cast();
        msg.msg_controllen = self.control.len() as _;
        msg
    }
}

/// One byte with `fds` attached.
fn send_fds(s: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    let size = std::mem::size_of_val(fds);
    let mut m = OneByte::new(size);
    let msg = m.header();
    // SAFETY: the control buffer has room for one header and `fds`.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(size as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
    }
    // SAFETY: a valid socket and message.
    if unsafe { libc::sendmsg(s.as_raw_fd(), &raw const msg, 0) } != 1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One byte and the descriptors attached to it (none at the end of the stream).
fn recv_fds(s: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut m = OneByte::new(FDS_PER_MESSAGE * std::mem::size_of::<RawFd>());
    let mut msg = m.header();
    // SAFETY: a valid socket and message; descriptors received are close-on-exec.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    out.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were cut off (MSG_CTRUNC)"));
    }
    Ok(out)
}

/// Bind the handover socket (root only), replacing what an agent that ran before left there.
pub fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_cross_over_with_their_workloads_in_order() {
        let dir = std::env::temp_dir().join(format!("egress-handover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.handover");
        let l = bind(&path).unwrap();
        // More sockets than fit in one message.
        let listeners: Vec<std::net::TcpListener> = (0..260)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let handed = |i: usize, n: usize| Handed {
            netns: (i > 0).then(|| PathBuf::from(format!("/var/run/netns/p{i}"))),
            id: Some((1, i as u64)),
            namespace: "team".into(),
            name: format!("p{i}"),
            uid: String::new(),
            container_id: None,
            listeners: n,
            dns: 0,
            nameservers: vec![std::net::IpAddr::from([198, 18, 0, i as u8])],
        };
        let dups: Vec<OwnedFd> = listeners
            .iter()
            .map(|l| OwnedFd::from(l.try_clone().unwrap()))
            .collect();
        // The agent's own namespace also hands its DNS sockets over: UDP and TCP.
        let dns_udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dns_tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dns_dups = vec![
            OwnedFd::from(dns_udp.try_clone().unwrap()),
            OwnedFd::from(dns_tcp.try_clone().unwrap()),
        ];
        let hand = std::sync::Mutex::new(Some((dups, dns_dups)));
        let (tx, rx) = std::sync::mpsc::channel();
        serve(
            l,
            move || {
                let (fds, dns) = hand.lock().unwrap().take()?;
                let mut fds = fds.into_iter();
                let own: Vec<OwnedFd> = fds.by_ref().take(2).chain(dns).collect();
                let mut out = vec![(
                    Handed {
                        dns: 2,
                        ..handed(0, 2)
                    },
                    own,
                )];
                for i in 1..130 {
                    out.push((handed(i, 2), fds.by_ref().take(2).collect()));
                }
                Some(out)
            },
            move |ok| tx.send(ok).unwrap(),
        )
        .unwrap();
        let mut taken = take(&path).unwrap().expect("an agent answers");
        assert_eq!(taken.workloads.len(), 130);
        let own = taken.own().expect("the agent's own listeners");
        assert_eq!(own.outbound[1].local_addr().unwrap(), addrs[1]);
        let udp = own.dns_udp.first().expect("the DNS socket");
        assert_eq!(udp.local_addr().unwrap(), dns_udp.local_addr().unwrap());
        assert_eq!(own.dns_tcp.len(), 1);
        assert_eq!(
            own.dns_tcp[0].local_addr().unwrap(),
            dns_tcp.local_addr().unwrap()
        );
        for (h, s) in &taken.workloads {
            let i = h.id.unwrap().1 as usize;
            assert_eq!(h, &handed(i, 2));
            let ls = &s.outbound;
            assert_eq!(ls[0].local_addr().unwrap(), addrs[2 * i]);
            assert_eq!(ls[1].local_addr().unwrap(), addrs[2 * i + 1]);
        }
        // The same sockets: a connection queued on one is accepted through the other.
        let (h, s) = &taken.workloads[0];
        let ls = &s.outbound;
        let i = h.id.unwrap().1 as usize;
        let c = std::net::TcpStream::connect(addrs[2 * i]).unwrap();
        let (s, peer) = ls[0].accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        drop((s, c));
        taken.confirm().unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        // Nobody answers any more: a starting agent starts from its state file.
        drop(listeners);
        let _ = std::fs::remove_file(&path);
        assert!(take(&path).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
