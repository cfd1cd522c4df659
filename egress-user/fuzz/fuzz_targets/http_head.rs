//! `http_head`, `authority_host` and `host_matches` on arbitrary bytes.
//!
//! Besides never panicking:
//! - `http_head` decides on the head alone: a `Complete(r)` has `0 < r.len <= data.len()`, ends
//!   in a line feed, and `data[..r.len]` and `data` with bytes appended give the same
//!   `Complete(r)`; every shorter prefix is `Incomplete`; an `Invalid` stays `Invalid` with
//!   bytes appended and its prefixes are `Incomplete` or `Invalid`; an `Incomplete` has only
//!   `Incomplete` prefixes;
//! - a complete head starts (after the empty lines RFC 9112 lets a server skip) with
//!   `method SP path SP`, the method a token; `classify` calls it HTTP/1 unless it starts with
//!   an empty line or a method longer than the 20 bytes `classify` looks at (then `Other`);
//! - its host, when there is one, is a lower-case DNS name or a canonical IPv6 address, and
//!   there is none only without a Host header and an `http(s)://` target;
//! - `authority_host` ignores ASCII case, returns such a host, and gives it back for
//!   `host`, `host:port`, `[v6]` and `[v6]:port`;
//! - `host_matches` is reflexive, ignores ASCII case, `*` matches anything, and `*suffix`
//!   matches exactly the longer hosts ending in `suffix`;
//! - `classify`'s own invariants (see `check_classify`).

#![no_main]

use egress_fuzz::{
    check_classify, check_host_shape, cut_points,
    sniff::{Head, Kind, MAX_HEAD, Request, authority_host, classify, host_matches, http_head},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check_classify(data);
    check_head(data);
    check_authority(data);
    check_host_matches(data);
});

fn check_head(data: &[u8]) {
    let head = http_head(data);
    // Inputs this long are rejected while partial; fuzz inputs stay far below it.
    if data.len() >= MAX_HEAD {
        return;
    }
    let mut edges = Vec::new();
    match &head {
        Head::Complete(r) => {
            check_request(data, r);
            edges.extend([r.len - 1, r.len]);
        }
        Head::Invalid(_) => {
            for tail in [&b"\r\n\r\n"[..], data] {
                let mut longer = data.to_vec();
                longer.extend_from_slice(tail);
                let h = http_head(&longer);
                assert!(
                    matches!(h, Head::Invalid(_)),
                    "Invalid became {h:?} with {} bytes appended",
                    tail.len()
                );
            }
        }
        Head::Incomplete => {}
    }
    for cut in cut_points(data.len(), edges) {
        let h = http_head(&data[..cut]);
        let ok = match &head {
            Head::Complete(r) if cut < r.len => h == Head::Incomplete,
            Head::Complete(_) => h == head,
            Head::Invalid(_) => matches!(h, Head::Incomplete | Head::Invalid(_)),
            Head::Incomplete => h == Head::Incomplete,
        };
        assert!(
            ok,
            "the first {cut} bytes say {h:?}, all {} say {head:?}",
            data.len()
        );
    }
}

fn check_request(data: &[u8], r: &Request) {
    assert!(
        0 < r.len && r.len <= data.len(),
        "head length {} of {} bytes",
        r.len,
        data.len()
    );
    let head = &data[..r.len];
    assert_eq!(head.last(), Some(&b'\n'), "head does not end a line");
    let complete = Head::Complete(r.clone());
    assert_eq!(http_head(head), complete, "the head alone");
    for tail in [&b"\r\n"[..], b"GET / HTTP/1.1\r\n\r\n", data] {
        let mut longer = data.to_vec();
        longer.extend_from_slice(tail);
        assert_eq!(
            http_head(&longer),
            complete,
            "{} bytes appended",
            tail.len()
        );
    }

    // The request line, after any empty lines.
    let mut start = 0;
    loop {
        match &head[start..] {
            [b'\r', b'\n', ..] => start += 2,
            [b'\n', ..] => start += 1,
            _ => break,
        }
    }
    let m = r.method.as_bytes();
    assert!(
        !m.is_empty() && m.iter().all(|&c| is_tchar(c)),
        "method {:?} is not a token",
        r.method
    );
    assert!(!r.path.is_empty(), "empty request target");
    let line = [m, b" ", r.path.as_bytes(), b" "].concat();
    assert!(
        head[start..].starts_with(&line),
        "request line does not start with {:?}",
        String::from_utf8_lossy(&line)
    );
    let want = if start == 0 && m.len() <= 20 {
        Kind::Http1
    } else {
        Kind::Other
    };
    assert_eq!(classify(data), want, "classify of a complete head");

    match &r.host {
        Some(h) => check_host(h),
        None => {
            // The scheme is matched as written: `HTTP://host/` (RFC 3986 lets a scheme be
            // any case) gives no host.
            let p = &r.path;
            assert!(
                !p.starts_with("http://") && !p.starts_with("https://"),
                "no host from absolute-form target {:?}",
                r.path
            );
            assert!(
                !head
                    .to_ascii_lowercase()
                    .windows(6)
                    .any(|w| w == b"\nhost:"),
                "no host despite a Host header"
            );
        }
    }
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// A host as `http_head` and `authority_host` return it, and that `authority_host` gives it
/// back in an authority.
fn check_host(h: &str) {
    check_host_shape(h);
    assert!(host_matches(h, h), "{h:?} does not match itself");
    assert!(host_matches("*", h), "* does not match {h:?}");
    let forms = if h.contains(':') {
        vec![format!("[{h}]"), format!("[{h}]:8080")]
    } else {
        vec![h.to_owned(), format!("{h}:443"), format!(" {h}:1 ")]
    };
    for a in forms {
        assert_eq!(
            authority_host(a.as_bytes()).as_deref(),
            Some(h),
            "authority {a:?}"
        );
    }
}

fn check_authority(data: &[u8]) {
    let host = authority_host(data);
    assert_eq!(
        authority_host(&data.to_ascii_uppercase()),
        host,
        "authority_host depends on ASCII case"
    );
    if let Some(h) = &host {
        check_host(h);
    }
}

fn check_host_matches(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let (pattern, host) = s.split_once('\n').unwrap_or((&s, ""));
    let m = host_matches(pattern, host);
    assert_eq!(
        host_matches(&pattern.to_ascii_uppercase(), &host.to_ascii_lowercase()),
        m,
        "host_matches depends on ASCII case"
    );
    assert_eq!(
        host_matches(pattern, &host.to_ascii_uppercase()),
        m,
        "host_matches depends on ASCII case"
    );
    assert!(host_matches(host, host), "{host:?} does not match itself");
    assert!(host_matches("*", host), "* does not match {host:?}");
    if let Some(suffix) = pattern.strip_prefix('*').filter(|_| pattern != "*") {
        let want = host.len() > suffix.len()
            && host
                .to_ascii_lowercase()
                .ends_with(&suffix.to_ascii_lowercase());
        assert_eq!(m, want, "{pattern:?} against {host:?}");
        let below = format!("x{host}{suffix}");
        assert!(
            host_matches(pattern, &below),
            "{pattern:?} against {below:?}"
        );
    } else if pattern != "*" {
        assert_eq!(
            m,
            pattern.eq_ignore_ascii_case(host),
            "{pattern:?} against {host:?}"
        );
    }
}
