//! The enrolment API: requests as they travel over the agent's admin socket (a Unix socket,
//! reachable by root only, since whoever enrols or releases a pod decides whether its
//! connections are mediated), and the client that `egress enroll`, `egress unenroll`,
//! `egress workloads` and `egress-cni` share.
//!
//! `POST /workloads/enroll` (an `EnrollRequest`), `POST /workloads/unenroll` and
//! `POST /workloads/check` (a `Selector`), `GET /workloads`.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Where the agent listens for enrolments unless `--admin-socket` says otherwise.
pub const DEFAULT_ADMIN_SOCKET: &str = "/var/run/egress/admin.sock";
/// Where a node agent keeps its enrolments across restarts.
pub const DEFAULT_STATE_FILE: &str = "/var/run/egress/workloads.json";

/// Enrol a network namespace as a workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnrollRequest {
    /// `/var/run/netns/NAME` or `/proc/PID/ns/net`, as the agent sees it.
    pub netns: PathBuf,
    /// Kubernetes namespace: its Sidecar and the ServiceEntries exported to it apply.
    pub namespace: String,
    pub name: String,
    /// The pod's uid, when known.
    #[serde(default)]
    pub uid: String,
    /// The runtime's container (sandbox) id, which DEL and CHECK name the pod by.
    #[serde(default)]
    pub container_id: Option<String>,
    /// The pod's nameservers (its resolv.conf's, which the runtime gives CNI plugins as
    /// `runtimeConfig.dns.servers`): under `spec.dns.capture: RESOLV_CONF`, DNS queries to
    /// these are captured and to no other; none known, all are.
    #[serde(default)]
    pub nameservers: Vec<std::net::IpAddr>,
}

/// Which enrolled workload a request is about: any field given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// `NAMESPACE/NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

/// Why a request did not succeed.
#[derive(Debug)]
pub enum Error {
    /// No agent answered on the socket.
    Unreachable(String),
    /// The agent answered with an error.
    Refused(String),
    /// The agent is handing over to a new one: the same request a moment later reaches it.
    Busy(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Unreachable(e) => write!(f, "the agent is not reachable: {e}"),
            Error::Busy(e) => write!(f, "{e}"),
            Error::Refused(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

/// Enrol; the agent answers once interception of the namespace is in force.
pub fn enroll(socket: &Path, req: &EnrollRequest) -> Result<String, Error> {
    let body = serde_json::to_string(req).map_err(|e| Error::Refused(e.to_string()))?;
    expect_ok(request(socket, "POST", "/workloads/enroll", &body)?)
}

/// Release a workload: its listeners, connections and map entries.
pub fn unenroll(socket: &Path, sel: &Selector) -> Result<String, Error> {
    let body = serde_json::to_string(sel).map_err(|e| Error::Refused(e.to_string()))?;
    expect_ok(request(socket, "POST", "/workloads/unenroll", &body)?)
}

/// Whether a workload is enrolled.
pub fn check(socket: &Path, sel: &Selector) -> Result<bool, Error> {
    let body = serde_json::to_string(sel).map_err(|e| Error::Refused(e.to_string()))?;
    match request(socket, "POST", "/workloads/check", &body)? {
        (200, _) => Ok(true),
        (404, _) => Ok(false),
        (_, body) => Err(Error::Refused(body.trim_end().to_owned())),
    }
}

/// The enrolled workloads, one line each, with their counters.
pub fn list(socket: &Path) -> Result<String, Error> {
    expect_ok(request(socket, "GET", "/workloads", "")?)
}

fn expect_ok((code, body): (u16, String)) -> Result<String, Error> {
    match code {
        200 => Ok(body),
        503 => Err(Error::Busy(body.trim_end().to_owned())),
        _ => Err(Error::Refused(body.trim_end().to_owned())),
    }
}

/// One HTTP/1.1 request over the Unix socket: the status code and the body.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), Error> {
    let unreachable = |e: std::io::Error| {
        Error::Unreachable(format!(
            "{}: {e} (is `egress run --node` running with this --admin-socket?)",
            socket.display()
        ))
    };
    let mut s = UnixStream::connect(socket).map_err(unreachable)?;
    // Enrolment waits for the namespace's listeners and map entries, not for traffic.
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: egress\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(body.as_bytes()))
        .map_err(unreachable)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(unreachable)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::Unreachable(format!("malformed response: {resp:?}")))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::Unreachable(format!("malformed status line: {head:?}")))?;
    Ok((code, body.to_owned()))
}
