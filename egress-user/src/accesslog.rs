//! Access log: one line per redirected connection and one per HTTP request, on standard output,
//! as JSON (default) or `key=value` text (`--access-log json|text|off`).

use std::{
    io::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Text,
    Off,
}

/// One access-log record. Absent fields are left out of the line.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Record {
    /// UTC, RFC 3339 with milliseconds: when the connection or request started.
    pub time: String,
    /// `connection` or `request`.
    pub kind: &'static str,
    /// The client workload: its cgroup (v2 path), pid, uid and gid at connect().
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// The client socket's address, as the agent sees it.
    pub peer: String,
    /// The destination the client dialled.
    pub orig_dst: String,
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
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_local: Option<String>,
    /// `ok`, or what went wrong: `connect-failed`, `timeout`, `denied`, `reset`, `error`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where records go.
#[derive(Clone, Copy, Debug)]
pub struct Log {
    pub format: Format,
}

impl Log {
    pub fn write(&self, r: &Record) {
        let line = match self.format {
            Format::Off => return,
            Format::Json => match serde_json::to_string(r) {
                Ok(l) => l,
                Err(_) => return,
            },
            Format::Text => text(r),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
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

/// The cgroup v2 path of a process, as `/proc/PID/cgroup` gives it.
pub fn cgroup_of(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
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
            peer: "127.0.0.1:5".into(),
            error: Some("no answer within 1s".into()),
            result: "timeout",
            ..Record::default()
        };
        let t = text(&r);
        assert!(t.starts_with("request time="), "{t}");
        assert!(t.contains(" error=\"no answer within 1s\""), "{t}");
        assert!(t.contains(" result=timeout"), "{t}");
        assert!(!t.contains("sni"), "{t}");
    }
}
