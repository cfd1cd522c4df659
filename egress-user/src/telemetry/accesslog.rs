//! Access log: one line per redirected connection, one per HTTP request and one per DNS query,
//! on standard output, as JSON (default) or `key=value` text (`--access-log json|text|off`).

use std::{
    collections::HashMap,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use egress_common::{OrigDst, Reason};
use serde::{Serialize, Serializer};

use crate::{datapath::orig_addr, telemetry::metrics::Metrics, workloads::Workload};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Text,
    Off,
}

/// One access-log record. Absent fields are left out of the line. Addresses and the time
/// stay in their binary form until the line is written: a record lives as long as its
/// connection, and thousands of idle connections should not each hold five small strings.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    /// UTC, RFC 3339 with milliseconds: when the connection or request started.
    #[serde(serialize_with = "time_rfc3339")]
    pub time: SystemTime,
    /// `connection`, `request` or `dns`.
    pub kind: &'static str,
    /// The enrolled workload, `NAMESPACE/NAME`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<str>>,
    /// The client process: its cgroup (v2 path), pid, uid and gid at connect().
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// The client socket's address, as the agent sees it.
    pub peer: SocketAddr,
    /// The destination the client dialled.
    pub orig_dst: SocketAddr,
    /// Why the kernel sent the connection here (its reason code), or `netfilter`.
    pub reason: &'static str,
    /// How the agent mediated it: `http`, `http2` (passed through as TCP), `tls`, `tcp`, or
    /// `passthrough` for ports no entry declares.
    pub protocol: &'static str,
    /// `allow` or `deny`.
    pub verdict: &'static str,
    /// Why: `registered` (a resource matched), `allow-any`, `not-registered`; an HTTP
    /// connection's record says `per-request` (each request has its own).
    pub policy: &'static str,
    /// The resource that matched: `ServiceEntry namespace/name` or a Kubernetes Service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<String>,
    /// The host of that ServiceEntry the connection or request is for (Istio's
    /// `destination_service`): the one that matched the Host or SNI, else its first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The VirtualService route and DestinationRule that applied to a request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_origination: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The HTTP status sent to the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// A DNS query's name (presentation form), type (`A`, `AAAA`, ... or `TYPE65534`), the
    /// response's code (`NOERROR`, `NXDOMAIN`, ...) and who answered: `agent` or `nameserver`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answered_by: Option<&'static str>,
    /// Upstream attempts made for a request (1 without retries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Bytes from the client and to it (for a request: body bytes).
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Until the last byte (connection) or the end of the response body (request).
    pub duration_ms: u64,
    /// For a request: until the upstream's response head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<u64>,
    /// The address the agent connected to, and its own end of that connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_local: Option<SocketAddr>,
    /// `ok`, or what went wrong: `connect-failed`, `timeout`, `denied`, `reset`, `error`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The connection was counted as opened in the metrics when it connected upstream (a
    /// direct connection's is counted when its record comes from the kernel, at its close).
    #[serde(skip)]
    pub opened_counted: bool,
}

impl Default for Record {
    fn default() -> Self {
        let none = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        Record {
            time: UNIX_EPOCH,
            kind: "",
            workload: None,
            cgroup: None,
            pid: None,
            uid: None,
            gid: None,
            peer: none,
            orig_dst: none,
            reason: "",
            protocol: "",
            verdict: "",
            policy: "",
            matched: None,
            service: None,
            route: None,
            tls_origination: None,
            host: None,
            sni: None,
            method: None,
            path: None,
            status: None,
            query_name: None,
            query_type: None,
            rcode: None,
            answered_by: None,
            attempts: None,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            upstream_ms: None,
            upstream: None,
            upstream_local: None,
            result: "",
            error: None,
            opened_counted: false,
        }
    }
}

fn time_rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

/// A redirected connection: who made it and where it was going.
pub struct Conn {
    /// The workload whose listener accepted it.
    pub workload: Arc<Workload>,
    pub peer: SocketAddr,
    pub dst: SocketAddr,
    /// The kernel's reason code for redirecting it, or `netfilter`.
    pub reason: &'static str,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub start: Instant,
    pub time: SystemTime,
    /// The client's cgroup, named when the connection arrives (only if records are written:
    /// a cgroup not seen before costs a /proc read).
    pub cgroup: Option<Arc<str>>,
}

impl Conn {
    /// A connection the kernel recorded, starting now: who made it and where it was going.
    pub fn recorded(
        workload: Arc<Workload>,
        peer: SocketAddr,
        rec: &OrigDst,
        cgroup: Option<Arc<str>>,
    ) -> Conn {
        Conn {
            workload,
            peer,
            dst: orig_addr(rec),
            reason: Reason::from_u32(rec.reason).map_or("unknown", Reason::name),
            pid: Some(rec.pid),
            uid: Some(rec.uid),
            gid: Some(rec.gid),
            start: Instant::now(),
            time: SystemTime::now(),
            cgroup,
        }
    }

    /// An access-log record of this connection, with the workload filled in.
    pub fn record(&self, kind: &'static str, protocol: &'static str) -> Box<Record> {
        Box::new(Record {
            time: self.time,
            kind,
            workload: Some(self.workload.label.clone()),
            cgroup: self.cgroup.clone(),
            pid: self.pid,
            uid: self.uid,
            gid: self.gid,
            peer: self.peer,
            orig_dst: self.dst,
            reason: self.reason,
            protocol,
            verdict: "allow",
            policy: "registered",
            result: "ok",
            ..Record::default()
        })
    }
}

/// Records queued for the writer at most. A reader of standard output that falls behind (a
/// log collector restarting, a full disk behind it) must not stall forwarding: records beyond
/// this many are dropped and counted, and the count is logged once the writer catches up.
const QUEUED_RECORDS: usize = 8_192;
/// Bytes written at once at most, when records have piled up.
const WRITE_BATCH: usize = 256 << 10;
/// How often the writer looks for records while they keep coming.
const POLL: Duration = Duration::from_millis(5);
/// How long a shutdown waits for queued records to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Where records go: a writer thread behind a bounded queue.
#[derive(Clone)]
pub struct Log {
    pub format: Format,
    writer: Option<Arc<Writer>>,
    /// Every record feeds the metrics, whatever the format (`off` included).
    metrics: Option<Arc<Metrics>>,
}

struct Writer {
    tx: std::sync::mpsc::SyncSender<String>,
    /// Records queued and not yet written.
    pending: AtomicU64,
    dropped: AtomicU64,
}

impl Log {
    pub fn new(format: Format, metrics: Option<Arc<Metrics>>) -> std::io::Result<Log> {
        if format == Format::Off {
            return Ok(Log {
                format,
                writer: None,
                metrics,
            });
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(QUEUED_RECORDS);
        let w = Arc::new(Writer {
            tx,
            pending: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let shared = w.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_records(&rx, &shared))?;
        Ok(Log {
            format,
            writer: Some(w),
            metrics,
        })
    }

    /// A stream connected upstream: counted as opened now, closed when its record is written.
    pub fn opened(&self, r: &mut Record) {
        if let Some(m) = &self.metrics {
            m.opened(r);
            r.opened_counted = true;
        }
    }

    /// Records dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.writer
            .as_ref()
            .map_or(0, |w| w.dropped.load(Ordering::Relaxed))
    }

    pub fn write(&self, r: &Record) {
        if let Some(m) = &self.metrics {
            m.observe(r);
        }
        let Some(w) = &self.writer else { return };
        let line = match self.format {
            Format::Off => return,
            Format::Json => match serde_json::to_string(r) {
                Ok(l) => l,
                Err(_) => return,
            },
            Format::Text => text(r),
        };
        w.pending.fetch_add(1, Ordering::Relaxed);
        if w.tx.try_send(line).is_err() {
            w.pending.fetch_sub(1, Ordering::Relaxed);
            w.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wait (a little) until the queued records are written: on shutdown.
    pub fn flush(&self) {
        let Some(w) = &self.writer else { return };
        let deadline = std::time::Instant::now() + FLUSH_WAIT;
        while w.pending.load(Ordering::Relaxed) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The writer thread: whatever has queued up goes out in one write. While records keep coming
/// it looks for them every `POLL`, instead of being woken for each (a wakeup per connection,
/// on another core, costs the worker more than the write did); idle, it waits to be woken.
fn write_records(rx: &std::sync::mpsc::Receiver<String>, w: &Writer) {
    let mut reported = 0;
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(line) = next.take() {
            batch.clear();
            let mut n = 1;
            batch.extend_from_slice(line.as_bytes());
            batch.push(b'\n');
            while batch.len() < WRITE_BATCH
                && let Ok(line) = rx.try_recv()
            {
                batch.extend_from_slice(line.as_bytes());
                batch.push(b'\n');
                n += 1;
            }
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            drop(out);
            w.pending.fetch_sub(n, Ordering::Relaxed);
            let dropped = w.dropped.load(Ordering::Relaxed);
            if dropped > reported {
                log::warn!(
                    "access log: {dropped} records dropped since start ({} now): standard output is not keeping up",
                    dropped - reported
                );
                reported = dropped;
            }
            std::thread::sleep(POLL);
            next = rx.try_recv().ok();
        }
    }
}

/// `kind key=value ...`, values with spaces or quotes quoted.
fn text(r: &Record) -> String {
    let serde_json::Value::Object(map) = serde_json::to_value(r).unwrap_or_default() else {
        return String::new();
    };
    let mut s = r.kind.to_owned();
    for (k, v) in map {
        if k == "kind" {
            continue;
        }
        let v = match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        if v.is_empty() || v.contains([' ', '"', '=']) {
            s.push_str(&format!(" {k}={v:?}"));
        } else {
            s.push_str(&format!(" {k}={v}"));
        }
    }
    s
}

/// `SystemTime` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Names kept at most; past that the cache starts over.
const MAX_CGROUP_NAMES: usize = 16_384;

/// Cgroup v2 paths by cgroup id, so that records name the client's workload without a /proc
/// read per connection. A cgroup id is the inode number of the cgroup's directory and is not
/// reused while the system runs: a name, once checked against it, stays right.
pub struct CgroupNames {
    /// Where cgroup v2 is mounted.
    root: PathBuf,
    names: Mutex<HashMap<u64, Arc<str>>>,
}

impl CgroupNames {
    pub fn new(root: PathBuf) -> Self {
        CgroupNames {
            root,
            names: Mutex::default(),
        }
    }

    /// The path of cgroup `id`, which process `pid` was in when it connected.
    pub fn name(&self, id: u64, pid: u32) -> Option<Arc<str>> {
        if let Some(n) = self.names.lock().ok()?.get(&id) {
            return Some(n.clone());
        }
        let path = crate::datapath::sys::cgroup_name(&pid.to_string()).ok()?;
        let name: Arc<str> = path.as_str().into();
        // The process may have moved since: keep only a name that is the cgroup `id`.
        let dir = self.root.join(path.trim_start_matches('/'));
        if std::fs::metadata(dir).is_ok_and(|m| m.ino() == id)
            && let Ok(mut names) = self.names.lock()
        {
            if names.len() >= MAX_CGROUP_NAMES {
                names.clear();
            }
            names.insert(id, name.clone());
        }
        Some(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn text_lines_quote_what_needs_it() {
        let r = Record {
            kind: "request",
            peer: "127.0.0.1:5".parse().unwrap(),
            error: Some("no answer within 1s".into()),
            result: "timeout",
            ..Record::default()
        };
        let t = text(&r);
        assert!(
            t.starts_with("request time=1970-01-01T00:00:00.000Z peer=127.0.0.1:5 "),
            "{t}"
        );
        assert!(t.contains(" error=\"no answer within 1s\""), "{t}");
        assert!(t.contains(" result=timeout"), "{t}");
        assert!(!t.contains("sni"), "{t}");
    }
}
