//! What the first bytes of a redirected stream say: a TLS ClientHello's server name, an HTTP/1
//! request head's method, path and Host, or HTTP/2's connection preface.
//!
//! Pure functions over the bytes received so far (read with `MSG_PEEK`, so nothing is consumed):
//! each answers `Incomplete` while more bytes could change the answer, and never reads past
//! what it was given. Self-contained (std and httparse only); the fuzz targets in
//! `egress-user/fuzz` call them through the library.

/// Largest ClientHello accepted (the handshake message, across records). Real ones are a few
/// hundred bytes to a few KiB; post-quantum key shares stay well below this.
pub const MAX_HELLO: usize = 64 * 1024;
/// Largest HTTP/1 request head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// HTTP/2's client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a stream's first bytes show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Not enough bytes to tell.
    Incomplete,
    /// A TLS handshake record.
    Tls,
    /// An HTTP/1 request line.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// Anything else (a server-first protocol sends nothing; this is a client that sends
    /// something we do not parse).
    Other,
}

/// Tell the protocol from a stream's first bytes.
pub fn classify(b: &[u8]) -> Kind {
    let Some(&first) = b.first() else {
        return Kind::Incomplete;
    };
    if first == 0x16 {
        return match b.get(1) {
            None => Kind::Incomplete,
            Some(3) => Kind::Tls,
            Some(_) => Kind::Other,
        };
    }
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Kind::Http2
        } else {
            Kind::Incomplete
        };
    }
    // An HTTP/1 request line starts with a method token and a space.
    for (i, &c) in b.iter().enumerate().take(21) {
        if c == b' ' {
            return if i > 0 { Kind::Http1 } else { Kind::Other };
        }
        if !is_tchar(c) {
            return Kind::Other;
        }
    }
    if b.len() > 20 {
        Kind::Other
    } else {
        Kind::Incomplete
    }
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// A ClientHello, read without terminating TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hello {
    Incomplete,
    /// Not a well-formed ClientHello; the text says what was wrong.
    Invalid(&'static str),
    /// The server name (lower-case), if the client sent one.
    Complete {
        sni: Option<String>,
    },
}

/// A cursor over bytes that fails instead of reading past the end.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize)
    }
    /// A vector with a `len_bytes`-byte length prefix.
    fn vec(&mut self, len_bytes: usize) -> Option<&'a [u8]> {
        let n = match len_bytes {
            1 => self.u8()? as usize,
            2 => self.u16()? as usize,
            _ => self.u24()?,
        };
        self.take(n)
    }
}

/// Parse the ClientHello at the start of a TLS stream: the handshake message may span several
/// records (RFC 8446 §5.1), which are joined first.
pub fn client_hello(b: &[u8]) -> Hello {
    let mut records = Reader { b };
    let mut msg: Vec<u8> = Vec::new();
    loop {
        // Enough of the handshake message to know its length, and all of it?
        if msg.len() >= 4 {
            let len = (msg[1] as usize) << 16 | (msg[2] as usize) << 8 | msg[3] as usize;
            if msg[0] != 1 {
                return Hello::Invalid("first handshake message is not a ClientHello");
            }
            if len + 4 > MAX_HELLO {
                return Hello::Invalid("ClientHello too large");
            }
            if msg.len() >= len + 4 {
                return parse_hello_body(&msg[4..len + 4]);
            }
        }
        let Some(header) = records.take(5) else {
            return Hello::Incomplete;
        };
        if header[0] != 0x16 {
            return Hello::Invalid("not a TLS handshake record");
        }
        if header[1] != 3 {
            return Hello::Invalid("unknown TLS record version");
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len == 0 || len > 16384 + 2048 {
            return Hello::Invalid("bad TLS record length");
        }
        let Some(fragment) = records.take(len) else {
            return Hello::Incomplete;
        };
        msg.extend_from_slice(fragment);
    }
}

fn parse_hello_body(body: &[u8]) -> Hello {
    match hello_sni(body) {
        Ok(sni) => Hello::Complete { sni },
        Err(e) => Hello::Invalid(e),
    }
}

const TRUNCATED: &str = "ClientHello shorter than its fields";

fn hello_sni(body: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader { b: body };
    let version = r.u16().ok_or(TRUNCATED)?;
    if version >> 8 != 3 {
        return Err("unknown ClientHello version");
    }
    r.take(32).ok_or(TRUNCATED)?; // random
    let session = r.vec(1).ok_or(TRUNCATED)?;
    if session.len() > 32 {
        return Err("session id longer than 32 bytes");
    }
    let suites = r.vec(2).ok_or(TRUNCATED)?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err("bad cipher suite list");
    }
    let compression = r.vec(1).ok_or(TRUNCATED)?;
    if compression.is_empty() {
        return Err("empty compression method list");
    }
    if r.b.is_empty() {
        return Ok(None); // no extensions at all
    }
    let mut exts = Reader {
        b: r.vec(2).ok_or(TRUNCATED)?,
    };
    let mut sni = None;
    while !exts.b.is_empty() {
        let typ = exts.u16().ok_or(TRUNCATED)?;
        let data = exts.vec(2).ok_or(TRUNCATED)?;
        if typ != 0 {
            continue;
        }
        if sni.is_some() {
            return Err("two server_name extensions");
        }
        sni = server_name(data)?;
    }
    Ok(sni)
}

/// The `host_name` entry of a server_name extension (RFC 6066 §3).
fn server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader { b: data };
    let mut list = Reader {
        b: r.vec(2).ok_or("bad server_name extension")?,
    };
    if !r.b.is_empty() {
        return Err("bad server_name extension");
    }
    let mut host = None;
    while !list.b.is_empty() {
        let typ = list.u8().ok_or("bad server_name extension")?;
        let name = list.vec(2).ok_or("bad server_name extension")?;
        if typ == 0 && host.is_none() {
            host = Some(hostname(name).ok_or("server name is not a host name")?);
        }
    }
    Ok(host)
}

/// A DNS name as sent in SNI or Host: labels of 1 to 63 ASCII letters, digits, `-` or `_`,
/// joined by `.`; lower-cased; one trailing dot (the root) is removed.
fn hostname(b: &[u8]) -> Option<String> {
    let b = b.strip_suffix(b".").unwrap_or(b);
    if b.is_empty()
        || b.len() > 253
        || !b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        || b.split(|&c| c == b'.')
            .any(|l| l.is_empty() || l.len() > 63)
    {
        return None;
    }
    Some(String::from_utf8_lossy(b).to_ascii_lowercase())
}

/// An HTTP/1 request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Head {
    Incomplete,
    Invalid(String),
    Complete(Request),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// From the Host header, or the authority of an absolute-form target; lower-case, no port.
    pub host: Option<String>,
    /// Length of the head in bytes, up to and including the blank line.
    pub len: usize,
}

/// Parse an HTTP/1 request head.
pub fn http_head(b: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(b) {
        Ok(httparse::Status::Partial) if b.len() >= MAX_HEAD => {
            Head::Invalid(format!("request head larger than {MAX_HEAD} bytes"))
        }
        Ok(httparse::Status::Partial) => Head::Incomplete,
        Err(e) => Head::Invalid(format!("malformed request head: {e}")),
        Ok(httparse::Status::Complete(len)) => {
            let path = req.path.unwrap_or("").to_owned();
            let from_header = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .map(|h| h.value);
            let authority = match from_header {
                Some(v) => Some(v),
                None => absolute_authority(&path).map(str::as_bytes),
            };
            let host = match authority {
                Some(a) => match authority_host(a) {
                    Some(h) => Some(h),
                    None => return Head::Invalid("Host is not a host name or address".into()),
                },
                None => None,
            };
            Head::Complete(Request {
                method: req.method.unwrap_or("").to_owned(),
                path,
                host,
                len,
            })
        }
    }
}

/// `http://authority/...` → `authority` (the scheme in any case, RFC 3986 §3.1).
fn absolute_authority(target: &str) -> Option<&str> {
    let scheme = |s: &str| {
        target
            .get(..s.len())
            .filter(|p| p.eq_ignore_ascii_case(s))
            .map(|_| &target[s.len()..])
    };
    let rest = scheme("http://").or_else(|| scheme("https://"))?;
    Some(rest.split(['/', '?', '#']).next().unwrap_or(rest))
}

/// The host of an authority (`host`, `host:port`, `[v6]:port`), lower-case, without the port.
/// IP literals are returned as written (IPv6 without brackets).
pub fn authority_host(a: &[u8]) -> Option<String> {
    let a = std::str::from_utf8(a).ok()?.trim();
    if let Some(v6) = a.strip_prefix('[') {
        let (addr, rest) = v6.split_once(']')?;
        if !(rest.is_empty() || rest.strip_prefix(':').is_some_and(valid_port)) {
            return None;
        }
        return addr
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|ip| ip.to_string());
    }
    let host = match a.rsplit_once(':') {
        Some((h, p)) if valid_port(p) => h,
        Some(_) => return None,
        None => a,
    };
    hostname(host.as_bytes())
}

fn valid_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit())
}

/// Whether a ServiceEntry host pattern covers `host`: exact (case-insensitive), `*` for any,
/// or `*.example.com` for any name below example.com.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => {
            host.len() > suffix.len()
                && host
                    .get(host.len() - suffix.len()..)
                    .is_some_and(|s| s.eq_ignore_ascii_case(suffix))
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as TLS 1.2/1.3 clients send it, with `sni` if given.
    pub(crate) fn hello(sni: Option<&str>) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let mut entry = vec![0u8];
            entry.extend((name.len() as u16).to_be_bytes());
            entry.extend(name.as_bytes());
            let mut list = (entry.len() as u16).to_be_bytes().to_vec();
            list.extend(entry);
            exts.extend(0u16.to_be_bytes());
            exts.extend((list.len() as u16).to_be_bytes());
            exts.extend(list);
        }
        // supported_versions: TLS 1.3
        exts.extend([0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0);
        body.extend([0, 2, 0x13, 0x01]);
        body.extend([1, 0]);
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut msg = vec![1];
        msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((msg.len() as u16).to_be_bytes());
        rec.extend(msg);
        rec
    }

    #[test]
    fn server_name_from_a_client_hello() {
        let h = hello(Some("WWW.Google.com"));
        assert_eq!(classify(&h), Kind::Tls);
        assert_eq!(
            client_hello(&h),
            Hello::Complete {
                sni: Some("www.google.com".into())
            }
        );
        assert_eq!(client_hello(&hello(None)), Hello::Complete { sni: None });
        // Every strict prefix asks for more bytes, never a wrong answer.
        for n in 0..h.len() {
            assert_eq!(client_hello(&h[..n]), Hello::Incomplete, "prefix {n}");
        }
    }

    #[test]
    fn a_client_hello_split_across_records() {
        let h = hello(Some("a.example"));
        let msg = &h[5..];
        let (a, b) = msg.split_at(10);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend([0x16, 3, 1]);
            two.extend((part.len() as u16).to_be_bytes());
            two.extend(part);
        }
        assert_eq!(
            client_hello(&two),
            Hello::Complete {
                sni: Some("a.example".into())
            }
        );
    }

    #[test]
    fn malformed_client_hellos_are_named() {
        let mut h = hello(Some("a.example"));
        h[5] = 2; // a ServerHello
        assert_eq!(
            client_hello(&h),
            Hello::Invalid("first handshake message is not a ClientHello")
        );
        let mut h = hello(Some("a.example"));
        h[0] = 0x17;
        assert_eq!(
            client_hello(&h),
            Hello::Invalid("not a TLS handshake record")
        );
        let h = hello(Some("bad name!"));
        assert_eq!(
            client_hello(&h),
            Hello::Invalid("server name is not a host name")
        );
        // The record claims more bytes than the handshake message holds.
        let mut h = hello(Some("a.example"));
        let n = h.len();
        h[8] = 0xff; // message length's low byte
        h.truncate(n);
        assert!(matches!(
            client_hello(&h),
            Hello::Incomplete | Hello::Invalid(_)
        ));
    }

    #[test]
    fn http_heads() {
        let Head::Complete(r) = http_head(b"GET /headers HTTP/1.1\r\nHost: HTTPBin.org:80\r\n\r\n")
        else {
            panic!()
        };
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.host.as_deref()),
            ("GET", "/headers", Some("httpbin.org"))
        );
        let Head::Complete(r) = http_head(b"GET http://a.example/x HTTP/1.1\r\n\r\n") else {
            panic!()
        };
        assert_eq!(r.host.as_deref(), Some("a.example"));
        let Head::Complete(r) = http_head(b"GET HTTPS://B.example/x HTTP/1.1\r\n\r\n") else {
            panic!()
        };
        assert_eq!(r.host.as_deref(), Some("b.example"));
        for bad in ["a..b", ".a", "a..", &format!("{}.b", "x".repeat(64))] {
            let head = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert!(
                matches!(http_head(head.as_bytes()), Head::Invalid(_)),
                "{bad}"
            );
        }
        let Head::Complete(r) = http_head(b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n") else {
            panic!()
        };
        assert_eq!(r.host.as_deref(), Some("::1"));
        assert_eq!(http_head(b"GET / HTTP/1.1\r\nHo"), Head::Incomplete);
        assert!(matches!(
            http_head(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
            Head::Invalid(_)
        ));
        assert!(matches!(http_head(b"\x01\x02 /\r\n\r\n"), Head::Invalid(_)));
    }

    #[test]
    fn protocols_by_first_bytes() {
        assert_eq!(classify(b""), Kind::Incomplete);
        assert_eq!(classify(b"GE"), Kind::Incomplete);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Kind::Http1);
        assert_eq!(classify(b"PRI * HTTP/2"), Kind::Incomplete);
        assert_eq!(classify(H2_PREFACE), Kind::Http2);
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Kind::Other);
        assert_eq!(classify(b"\x16\x03\x01"), Kind::Tls);
        assert_eq!(classify(b"\x00\x00"), Kind::Other);
    }

    #[test]
    fn host_patterns() {
        assert!(host_matches("httpbin.org", "HTTPBIN.org"));
        assert!(!host_matches("httpbin.org", "www.httpbin.org"));
        assert!(host_matches("*.wikipedia.org", "en.wikipedia.org"));
        assert!(host_matches("*.wikipedia.org", "a.b.wikipedia.org"));
        assert!(!host_matches("*.wikipedia.org", "wikipedia.org"));
        assert!(host_matches("*", "anything"));
    }
}
