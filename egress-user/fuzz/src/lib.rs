//! What the fuzz targets share: the agent's first-bytes parsers, from its library, and checks
//! that more than one target makes.

pub use egress_user::sniff;

use sniff::{H2_PREFACE, Kind, classify};

/// Where to cut `len` bytes to check an answer against its prefixes' answers: every length up
/// to 128 bytes; beyond, the first and last 16, 32 evenly spaced ones, and `extra` (lengths
/// where the format changes state, e.g. record boundaries). All below `len`, sorted, unique.
pub fn cut_points(len: usize, extra: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut cuts: Vec<usize> = if len <= 128 {
        (0..len).collect()
    } else {
        (0..16)
            .chain(len - 16..len)
            .chain((1..32).map(|i| len * i / 32))
            .collect()
    };
    cuts.extend(extra.into_iter().filter(|&c| c < len));
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// `classify` decides on at most the first bytes of a stream (`Incomplete` only while shorter
/// than the HTTP/2 preface), and once it decides, more bytes never change its answer.
pub fn check_classify(data: &[u8]) {
    let kind = classify(data);
    if kind == Kind::Incomplete {
        assert!(
            data.len() < H2_PREFACE.len(),
            "classify: Incomplete after {} bytes",
            data.len()
        );
    } else {
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"\x16\x03 PRI");
        assert_eq!(classify(&longer), kind, "classify: bytes appended");
    }
    for cut in cut_points(data.len().min(H2_PREFACE.len() + 1), []) {
        let k = classify(&data[..cut]);
        assert!(
            k == Kind::Incomplete || k == kind,
            "classify: the first {cut} bytes say {k:?}, all {} say {kind:?}",
            data.len()
        );
    }
}

/// A host name or IP literal as the parsers return it: a lower-case DNS name of at most 253
/// bytes, or an IPv6 address in its canonical text form.
pub fn check_host_shape(h: &str) {
    assert!(!h.is_empty(), "empty host");
    if h.contains(':') {
        let ip: std::net::Ipv6Addr = h
            .parse()
            .unwrap_or_else(|e| panic!("host {h:?} has a ':' but is no IPv6 address: {e}"));
        assert_eq!(ip.to_string(), h, "IPv6 host not in canonical form");
    } else {
        assert!(h.len() <= 253, "host {h:?} longer than 253 bytes");
        assert!(
            h.bytes().all(|c| c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || matches!(c, b'-' | b'_' | b'.')),
            "host {h:?} has a byte outside [a-z0-9._-]"
        );
        assert!(
            h.split('.').all(|l| !l.is_empty() && l.len() <= 63),
            "host {h:?} has an empty or over-long label"
        );
    }
}
