//! `client_hello` on arbitrary bytes, and on well-formed ClientHellos built around a server name
//! taken from them.
//!
//! Besides never panicking:
//! - the answer never depends on bytes past the point where it was decided: a decided answer
//!   (Complete or Invalid) stays when bytes are appended, and every prefix answers Incomplete
//!   or the same;
//! - a returned server name is a lower-case DNS name (1 to 253 bytes of `[a-z0-9._-]`) that the
//!   handshake message holds, and only a stream that `classify` calls TLS gives one;
//! - how the handshake message is split into records does not change the answer;
//! - a well-formed ClientHello whose server_name is `name` gives `name` lower-cased (without one
//!   trailing dot) when it is a host name, `Invalid` when it is not, and `Incomplete` for each
//!   of its strict prefixes;
//! - `classify`'s own invariants (see `check_classify`).

#![no_main]

use egress_fuzz::{
    check_classify, check_host_shape, cut_points,
    sniff::{Hello, Kind, MAX_HELLO, classify, client_hello},
};
use libfuzzer_sys::fuzz_target;

/// The largest record fragment `client_hello` accepts (TLSCiphertext's limit).
const MAX_FRAGMENT: usize = 16384 + 2048;

fuzz_target!(|data: &[u8]| {
    check_classify(data);
    let hello = client_hello(data);
    check_arbitrary(data, &hello);
    check_built(data);
});

fn check_arbitrary(data: &[u8], hello: &Hello) {
    let decided = *hello != Hello::Incomplete;
    if decided {
        for tail in [&b"\x00"[..], b"\x16\x03\x01\x00\x01\x01", data] {
            let mut longer = data.to_vec();
            longer.extend_from_slice(tail);
            assert_eq!(
                client_hello(&longer),
                *hello,
                "{} bytes appended changed the answer",
                tail.len()
            );
        }
    }
    for cut in cut_points(data.len(), record_edges(data)) {
        let h = client_hello(&data[..cut]);
        assert!(
            h == Hello::Incomplete || h == *hello,
            "the first {cut} bytes say {h:?}, all {} say {hello:?}",
            data.len()
        );
    }
    let msg = handshake_message(data);
    if let Hello::Complete { sni } = hello {
        assert_eq!(
            classify(data),
            Kind::Tls,
            "a ClientHello not classified TLS"
        );
        let msg = msg
            .as_deref()
            .expect("Complete without a whole handshake message");
        if let Some(name) = sni {
            check_host_shape(name);
            assert!(
                !name.contains(':'),
                "server name {name:?} is an IPv6 literal"
            );
            let lower = msg.to_ascii_lowercase();
            assert!(
                lower.windows(name.len()).any(|w| w == name.as_bytes()),
                "server name {name:?} is not in the handshake message"
            );
        }
    }
    // The same handshake message in records of other sizes and versions gives the same answer.
    if let Some(msg) = msg {
        assert!(decided, "a whole handshake message, yet Incomplete");
        let odd = 1 + data.len() % 251;
        for (size, minor) in [(1, 0), (3, 1), (odd, 3), (MAX_FRAGMENT, 4)] {
            let framed = records(&msg, size, minor);
            assert_eq!(
                client_hello(&framed),
                *hello,
                "the message in records of {size} bytes"
            );
        }
    }
}

/// Lengths at which `data`, read as TLS records, ends a record header or a record, and the
/// lengths one byte short of those.
fn record_edges(data: &[u8]) -> Vec<usize> {
    let mut edges = Vec::new();
    let mut at = 0;
    while at + 5 <= data.len() && edges.len() < 64 {
        let end = at + 5 + u16::from_be_bytes([data[at + 3], data[at + 4]]) as usize;
        edges.extend([at + 4, at + 5, end - 1, end]);
        at = end;
    }
    edges
}

/// The handshake message at the start of a stream of well-formed handshake records, joined
/// across records: RFC 8446 §5.1 read independently of `client_hello`, without the ClientHello
/// body.
fn handshake_message(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut msg = Vec::new();
    loop {
        if msg.len() >= 4 {
            let len = u32::from_be_bytes([0, msg[1], msg[2], msg[3]]) as usize;
            if msg[0] != 1 || 4 + len > MAX_HELLO {
                return None;
            }
            if msg.len() >= 4 + len {
                msg.truncate(4 + len);
                return Some(msg);
            }
        }
        let (&[0x16, 3, _, hi, lo], rest) = b.split_first_chunk::<5>()? else {
            return None;
        };
        let len = u16::from_be_bytes([hi, lo]) as usize;
        if len == 0 || len > MAX_FRAGMENT || rest.len() < len {
            return None;
        }
        msg.extend_from_slice(&rest[..len]);
        b = &rest[len..];
    }
}

/// `msg` in handshake records of (at most) `size` bytes, with record version 3.`minor`.
fn records(msg: &[u8], size: usize, minor: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + msg.len().div_ceil(size) * 5);
    for chunk in msg.chunks(size) {
        out.extend([0x16, 3, minor]);
        out.extend((chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// ClientHellos with a server name taken from `data`, as it is and mapped onto host-name bytes.
fn check_built(data: &[u8]) {
    const HOST_BYTES: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_";
    let raw = &data[..data.len().min(300)];
    let mapped: Vec<u8> = data
        .iter()
        .take(254)
        .map(|&b| HOST_BYTES[b as usize % HOST_BYTES.len()])
        .collect();
    let split = data.first().map_or(0, |&b| b as usize);
    for name in [raw, &mapped] {
        let shown = name.escape_ascii();
        let msg = hello_message(name);
        // Two records, split somewhere inside the message.
        let at = 1 + split % (msg.len() - 1);
        let mut framed = records(&msg[..at], at, 1);
        framed.extend(records(&msg[at..], msg.len(), 3));
        let want = match expected_name(name) {
            Some(n) => Hello::Complete { sni: Some(n) },
            None => Hello::Invalid("server name is not a host name"),
        };
        assert_eq!(client_hello(&framed), want, "built around \"{shown}\"");
        for cut in cut_points(framed.len(), [4, 5, at + 4, at + 5, at + 10]) {
            assert_eq!(
                client_hello(&framed[..cut]),
                Hello::Incomplete,
                "{cut} bytes of a ClientHello built around \"{shown}\""
            );
        }
    }
}

/// A ClientHello handshake message as TLS 1.3 clients send one, with a GREASE extension before
/// the server_name one for `name` and supported_versions after it.
fn hello_message(name: &[u8]) -> Vec<u8> {
    let mut entry = vec![0u8]; // host_name
    entry.extend((name.len() as u16).to_be_bytes());
    entry.extend_from_slice(name);
    let mut list = (entry.len() as u16).to_be_bytes().to_vec();
    list.extend(entry);
    let mut exts = vec![0x0a, 0x0a, 0x00, 0x00]; // GREASE, empty
    exts.extend([0x00, 0x00]); // server_name
    exts.extend((list.len() as u16).to_be_bytes());
    exts.extend(list);
    exts.extend([0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]); // supported_versions: TLS 1.3
    let mut body = vec![3, 3];
    body.extend([0x5a; 32]); // random
    body.push(32); // legacy_session_id
    body.extend([0xa5; 32]);
    body.extend([0, 4, 0x13, 0x01, 0x13, 0x02]); // cipher suites
    body.extend([1, 0]); // compression: null
    body.extend((exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut msg = vec![1];
    msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend(body);
    msg
}

/// What a server_name of `name` means, per the parser's documentation: labels of 1 to 63
/// ASCII letters, digits, `-` or `_` joined by `.`, at most 253 bytes once one trailing dot is
/// dropped, lower-cased (keep in step with sniff.rs's `hostname`).
fn expected_name(name: &[u8]) -> Option<String> {
    let n = name.strip_suffix(b".").unwrap_or(name);
    let ok = !n.is_empty()
        && n.len() <= 253
        && n.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && n.split(|&c| c == b'.').all(|l| !l.is_empty() && l.len() <= 63);
    ok.then(|| String::from_utf8(n.to_ascii_lowercase()).expect("ASCII"))
}
