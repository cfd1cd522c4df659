//! A workload's nameservers from a resolv.conf: what `spec.dns.capture: RESOLV_CONF` captures
//! the agent's own namespace's DNS queries to (a pod's come with its enrolment).

use std::net::IpAddr;

use log::debug;

/// The addresses of the `nameserver` lines of a resolv.conf, in order, each once. Comments
/// (`#` or `;`) and other options are ignored; a `nameserver` line without a valid address is
/// skipped with a debug log. An IPv6 address's zone (`fe80::1%eth0`) is dropped: the kernel
/// sees the address only.
pub fn nameservers(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(word) = words.next() else {
            debug!(
                "resolv.conf line {}: a nameserver without an address, skipped",
                i + 1
            );
            continue;
        };
        let addr = word.split_once('%').map_or(word, |(a, _)| a);
        match addr.parse::<IpAddr>() {
            Ok(a) if !out.contains(&a) => out.push(a),
            Ok(_) => {}
            Err(_) => debug!(
                "resolv.conf line {}: nameserver {word:?} is not an IP address, skipped",
                i + 1
            ),
        }
    }
    out
}

/// The nameservers of the resolv.conf at `path`; none when it cannot be read (logged).
pub fn read(path: &std::path::Path) -> Vec<IpAddr> {
    match std::fs::read_to_string(path) {
        Ok(text) => nameservers(&text),
        Err(e) => {
            debug!("reading {}: {e}", path.display());
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn nameserver_lines_in_order() {
        let text = "# generated\n\
                    search default.svc.cluster.local svc.cluster.local\n\
                    nameserver 10.96.0.10\n\
                    options ndots:5\n\
                    nameserver\t2001:db8::53  # trailing words are ignored\n\
                    nameserver 10.96.0.10\n\
                    \x20 nameserver 127.0.0.53\n\
                    nameserver fe80::1%eth0\n";
        assert_eq!(
            nameservers(text),
            ips(&["10.96.0.10", "2001:db8::53", "127.0.0.53", "fe80::1"])
        );
    }

    #[test]
    fn bad_lines_are_skipped() {
        let text = "nameserver\n\
                    nameserver dns.example\n\
                    nameserver 10.96.0.300\n\
                    #nameserver 198.18.0.1\n\
                    ;nameserver 198.18.0.2\n\
                    nameservers 198.18.0.3\n\
                    domain nameserver\n\
                    nameserver 198.18.0.53\n\
                    \u{0}\u{ff}garbage\n";
        assert_eq!(nameservers(text), ips(&["198.18.0.53"]));
        assert_eq!(nameservers(""), Vec::<IpAddr>::new());
    }

    #[test]
    fn an_unreadable_file_has_none() {
        assert!(read(std::path::Path::new("/nonexistent/resolv.conf")).is_empty());
    }
}
