//! DNS capture on a node: a pod's queries (UDP and TCP to port 53) reach the agent's DNS server
//! in the pod's own network namespace, which answers the names the registry owns and forwards
//! the rest to the nameserver the client asked, from the pod's namespace. The nameserver is
//! Debian's dnsmasq in the node's ext namespace (198.19.0.2, and 198.19.0.3 as a second one)
//! serving stand-in names, among them one with 200 addresses and a TXT record over 512 bytes,
//! or another dnsmasq on the pod's own loopback at 127.0.0.53 (as systemd-resolved's stub). The
//! clients, real resolvers all:
//!
//! - dig: connected UDP with and without EDNS, TCP, truncated answers (`+ignore`);
//! - glibc's resolver through `getent ahosts`: connected UDP, and TCP again after a truncated
//!   answer;
//! - musl's resolver (`getaddrinfo` in a program built with `musl-gcc -static`): unconnected UDP
//!   (sendto) to every nameserver at once, taking a reply only from a nameserver it asked;
//! - Go's own resolver (a program built with Debian's Go, without cgo): connected UDP, A and
//!   AAAA at once;
//! - Python's socket module: unconnected UDP (sendto/recvfrom) on IPv4, IPv4-mapped and IPv6
//!   sockets, printing where the reply came from.
//!
//! The nameservers are asked over IPv4 and IPv6 (dnsmasq on 2001:db8:2::2 too).

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use egress_tests::{
    Agent, ConnLine, NodeOpts, Servers, TempDir, checked,
    configs::MY_HTTPBIN,
    dnsmasq::Dnsmasq,
    egress_bin,
    l7::StandIns,
    node::{EXT_V4, EXT_V6, Node, Pod},
    privileged,
};
use serde_json::json;

const MESH: &str = "apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: node}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  interception: {includeOutboundIPRanges: \"*\"}
";

/// The stand-in names dnsmasq serves.
const NAME: &str = "httpbin.org";
const NAME_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 80);
/// A name with `MANY_COUNT` addresses (198.19.1.1 onwards): 3,238 bytes over TCP, more than a
/// UDP client takes with or without EDNS.
const MANY: &str = "many.test";
const MANY_COUNT: u8 = 200;
/// A name whose TXT record is three strings of `TXT_LEN` bytes: 652 bytes with EDNS, more than
/// a client without EDNS takes, less than one with it.
const BIG_TXT: &str = "txt.test";
const TXT_LEN: usize = 200;
/// The ext namespace's second address, where the same dnsmasq listens too: a second nameserver.
const EXT2_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 3);

/// dig's options for every query: one try, 3 s at most.
const DIG: [&str; 2] = ["+time=3", "+tries=1"];

/// `MANY_COUNT` addresses in 198.19.`third`.0/24, from .1.
fn many(third: u8) -> BTreeSet<IpAddr> {
    (1..=MANY_COUNT)
        .map(|i| IpAddr::V4(Ipv4Addr::new(198, 19, third, i)))
        .collect()
}

/// The strings of `BIG_TXT`'s record: a's, b's and c's.
fn txt_strings() -> Vec<String> {
    ["a", "b", "c"].map(|c| c.repeat(TXT_LEN)).to_vec()
}

/// The pods' nameserver in the ext namespace, on `EXT_V4`, `EXT2_V4` and `EXT_V6`, logging every query
/// with its source: `NAME`, `MANY` (from a hosts file) and `BIG_TXT`, and what `extra` gives.
fn upstream(node: &Node, dir: &TempDir, extra: &[String]) -> Dnsmasq {
    node.add_ext_address(EXT2_V4);
    let hosts = dir.path().join("many.hosts");
    let lines: String = many(1).iter().map(|a| format!("{a} {MANY}\n")).collect();
    std::fs::write(&hosts, lines).unwrap();
    Dnsmasq::start(
        node.ext(),
        &[IpAddr::V4(EXT_V4), IpAddr::V4(EXT2_V4), IpAddr::V6(EXT_V6)],
        dir.path().join("dnsmasq.log"),
        &[
            "--log-queries".to_owned(),
            format!("--host-record={NAME},{NAME_V4}"),
            format!("--addn-hosts={}", hosts.display()),
            format!("--txt-record={BIG_TXT},{}", txt_strings().join(",")),
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        .collect::<Vec<_>>(),
    )
}

/// A node agent with egress-cni chained, one pod, and the upstream nameserver. Dropped pods
/// first, then the agent and the nameserver.
struct World {
    pod: Pod,
    /// Kept for its pods and namespaces, which go with it.
    _node: Node,
    agent: Agent,
    upstream: Dnsmasq,
    dir: TempDir,
    /// More lines for the pod's resolv.conf (`search`).
    resolv_extra: std::cell::RefCell<String>,
}

fn world(tag: &str) -> World {
    world_with(tag, MESH)
}

fn world_with(tag: &str, config: &str) -> World {
    world_full(tag, config, "team-a", &[], &[])
}

/// A world whose pod is in Kubernetes namespace `namespace`, whose agent gets `agent_args`
/// and whose nameserver `records` too.
fn world_full(
    tag: &str,
    config: &str,
    namespace: &str,
    agent_args: &[&str],
    records: &[String],
) -> World {
    world_node(tag, config, (namespace, agent_args, records), None)
}

/// `world_full`, with the runtime passing the pod's nameservers `dns` to egress-cni (its `dns`
/// capability, as `egress cni install` chains it) when given.
fn world_node(
    tag: &str,
    config: &str,
    (namespace, agent_args, records): (&str, &[&str], &[String]),
    dns: Option<&[Ipv4Addr]>,
) -> World {
    let dir = TempDir::new(tag);
    let agent = Agent::start_node(NodeOpts {
        config,
        state_file: &dir.path().join("workloads.json"),
        admin_socket: &dir.path().join("admin.sock"),
        extra: agent_args.iter().map(|a| a.to_string()).collect(),
    });
    let bin = egress_bin().parent().unwrap().to_path_buf();
    let mut plugin = json!({"type": "egress-cni", "adminSocket": dir.path().join("admin.sock")});
    let mut node = Node::builder(tag).cni_dir(bin);
    if let Some(servers) = dns {
        plugin["capabilities"] = json!({"dns": true});
        node = node.capability_arg(
            "dns",
            json!({"servers": servers, "searches": ["team-a.svc.cluster.local"]}),
        );
    }
    let node = node.chain(plugin).build();
    let pod = node.add_pod(namespace, "client");
    let upstream = upstream(&node, &dir, records);
    World {
        pod,
        _node: node,
        agent,
        upstream,
        dir,
        resolv_extra: Default::default(),
    }
}

/// What dig printed for one query.
#[derive(Debug)]
struct Dug {
    /// The header's flags (`qr`, `aa`, `tc`, ...).
    flags: Vec<String>,
    /// The answer section's records, their data only (`198.19.0.80`, `"abc" "def"`).
    answers: Vec<String>,
    /// The response's size in bytes ("MSG SIZE rcvd").
    size: usize,
}

impl Dug {
    fn parse(out: &str) -> Dug {
        let flags = out
            .lines()
            .find_map(|l| l.strip_prefix(";; flags:"))
            .and_then(|f| f.split(';').next())
            .unwrap_or_else(|| panic!("no flags in dig's output:\n{out}"));
        let size = out
            .lines()
            .find_map(|l| l.strip_prefix(";; MSG SIZE  rcvd:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no message size in dig's output:\n{out}"));
        let answers = out
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with(';'))
            .map(|l| l.split_whitespace().skip(4).collect::<Vec<_>>().join(" "))
            .collect();
        Dug {
            flags: flags.split_whitespace().map(str::to_owned).collect(),
            answers,
            size,
        }
    }

    fn truncated(&self) -> bool {
        self.flags.iter().any(|f| f == "tc")
    }

    /// The answer's addresses.
    fn addresses(&self) -> BTreeSet<IpAddr> {
        self.answers
            .iter()
            .map(|a| a.parse().unwrap_or_else(|e| panic!("{a}: {e} ({self:?})")))
            .collect()
    }
}

impl World {
    /// `program ARGS` in the pod, with /etc/resolv.conf naming the upstream only; its
    /// standard output.
    fn run(&self, program: impl AsRef<OsStr>, args: &[&str]) -> String {
        self.run_with(&[EXT_V4], program, args)
    }

    /// `program ARGS` in the pod, with /etc/resolv.conf naming `nameservers` (a mount
    /// namespace of its own with the file bind-mounted); its standard output.
    fn run_with<A: Into<IpAddr> + Copy>(
        &self,
        nameservers: &[A],
        program: impl AsRef<OsStr>,
        args: &[&str],
    ) -> String {
        let resolv = self.dir.path().join("resolv.conf");
        let listed: String = nameservers
            .iter()
            .map(|&ns| format!("nameserver {}\n", ns.into()))
            .collect();
        let extra = self.resolv_extra.borrow();
        std::fs::write(
            &resolv,
            format!("{listed}{extra}options timeout:2 attempts:1\n"),
        )
        .unwrap();
        checked(
            self.pod
                .command("unshare")
                .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                .arg("mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"")
                .arg(&resolv)
                .arg(program)
                .args(args),
        )
    }

    /// The addresses the agent allocated to `entry` (`ServiceEntry NS/NAME`), from
    /// `/config_dump`.
    fn allocated(&self, entry: &str) -> BTreeSet<IpAddr> {
        let dump = self.agent.config_dump();
        dump["allocated"][entry]
            .as_array()
            .unwrap_or_else(|| panic!("{dump}"))
            .iter()
            .filter_map(|a| a.as_str()?.parse().ok())
            .collect()
    }

    /// Add `lines` to the pod's resolv.conf.
    fn write_resolv(&self, lines: &str) {
        self.resolv_extra.borrow_mut().push_str(lines);
    }

    /// The DNS access record of the first query for `name` (with the trailing dot).
    fn record_for(&self, name: &str) -> ConnLine {
        self.agent
            .wait_record("dns", name, |r| r.get("query_name") == name)
    }

    /// `dig +short ARGS` (one try) asking `nameservers`; its output, trimmed.
    fn short_with<A: Into<IpAddr> + Copy>(&self, nameservers: &[A], args: &[&str]) -> String {
        let all = [&DIG[..], &["+short"], args].concat();
        self.run_with(nameservers, "dig", &all).trim().to_owned()
    }

    fn short(&self, args: &[&str]) -> String {
        self.short_with(&[EXT_V4], args)
    }

    fn dig(&self, extra: &[&str]) -> String {
        self.short(&[&[NAME, "A"], extra].concat())
    }

    /// `dig ARGS` (one try) asking the upstream: the header, the answer and the size.
    fn dig_full(&self, args: &[&str]) -> Dug {
        let shown = ["+noall", "+comments", "+answer", "+stats"];
        Dug::parse(&self.run("dig", &[&DIG[..], &shown, args].concat()))
    }

    /// `getent ahosts NAME` in the pod, asking `nameservers`: the addresses.
    fn getent_with<A: Into<IpAddr> + Copy>(
        &self,
        nameservers: &[A],
        name: &str,
    ) -> BTreeSet<IpAddr> {
        let out = self.run_with(nameservers, "getent", &["ahosts", name]);
        out.lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// The access record of a `protocol` query for `NAME` of `qtype`.
    fn record(&self, protocol: &str, qtype: &str) -> ConnLine {
        self.record_of(NAME, protocol, qtype, EXT_V4)
    }

    /// The access record of a `protocol` query for `name` of `qtype` sent to nameserver `ns`.
    fn record_of(
        &self,
        name: &str,
        protocol: &str,
        qtype: &str,
        ns: impl Into<IpAddr>,
    ) -> ConnLine {
        let ns = SocketAddr::from((ns.into(), 53)).to_string();
        self.agent
            .wait_record("dns", &format!("{protocol} {qtype} {name} to {ns}"), |r| {
                r.get("protocol") == protocol
                    && r.get("query_type") == qtype
                    && r.get("query_name") == format!("{name}.")
                    && r.get("orig_dst") == ns
            })
    }
}

/// Sends a query for NAME with sendto() on an unconnected socket (IPv4, or IPv6 to the
/// nameserver's IPv4-mapped address, or to an IPv6 nameserver), then prints where recvfrom()
/// says the reply came from, its ID matching, and its answer's address.
const UNCONNECTED: &str = r#"
import socket, struct, sys
if ":" in sys.argv[1]:
    family, ns = socket.AF_INET6, sys.argv[1]
elif sys.argv[2] == "6":
    family, ns = socket.AF_INET6, "::ffff:" + sys.argv[1]
else:
    family, ns = socket.AF_INET, sys.argv[1]
name = b"".join(bytes([len(l)]) + l for l in sys.argv[3].encode().split(b".")) + b"\0"
q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1)
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(q, (ns, 53))
r, src = s.recvfrom(4096)
print(src[0], src[1], r[:2] == q[:2], socket.inet_ntoa(r[-4:]))
"#;

#[test]
fn pods_dns_queries_are_forwarded_from_their_namespace_and_fail_open() {
    if !privileged("pods_dns_queries_are_forwarded_from_their_namespace_and_fail_open") {
        return;
    }
    let mut w = world("dns");
    let pod_ip = IpAddr::V4(w.pod.ipv4);
    let ns: SocketAddr = (EXT_V4, 53).into();

    // dig over UDP (connected), with EDNS and without: the answer, checked by dig against the
    // nameserver it asked.
    assert_eq!(w.dig(&[]).trim(), NAME_V4.to_string());
    assert_eq!(w.dig(&["+noedns"]).trim(), NAME_V4.to_string());
    let rec = w.record("udp", "A");
    assert_eq!(rec.get("orig_dst"), ns.to_string(), "{rec:?}");
    assert_eq!(rec.get("answered_by"), "nameserver", "{rec:?}");
    assert_eq!(rec.get("rcode"), "NOERROR", "{rec:?}");
    assert_eq!(rec.get("workload"), "team-a/client", "{rec:?}");
    assert_eq!(rec.get("reason"), "dns", "{rec:?}");
    // Forwarded from the pod's own namespace: the nameserver saw the pod's address.
    let up: SocketAddr = rec.get("upstream_local").parse().unwrap();
    assert_eq!(up.ip(), pod_ip, "{rec:?}");
    assert!(w.upstream.saw("A", NAME, pod_ip), "{}", w.upstream.log());

    // dig over TCP: redirected to the agent's DNS listener, forwarded over TCP.
    assert_eq!(w.dig(&["+tcp"]).trim(), NAME_V4.to_string());
    let rec = w.record("tcp", "A");
    assert_eq!(rec.get("orig_dst"), ns.to_string(), "{rec:?}");
    assert_eq!(rec.get("answered_by"), "nameserver", "{rec:?}");

    // Several queries on one TCP connection (dig keeps it open across its names).
    let out = w.run(
        "dig",
        &[
            "+time=3",
            "+tries=1",
            "+short",
            "+tcp",
            "+keepopen",
            NAME,
            "A",
            NAME,
            "TXT",
        ],
    );
    assert_eq!(out.trim(), NAME_V4.to_string(), "{out}");
    w.record("tcp", "TXT");

    // glibc: getent ahosts asks for A and AAAA over one connected UDP socket.
    let out = w.run("getent", &["ahosts", NAME]);
    assert!(out.contains(&NAME_V4.to_string()), "{out}");
    w.record("udp", "AAAA");
    assert!(w.upstream.saw("AAAA", NAME, pod_ip), "{}", w.upstream.log());

    // Unconnected UDP, IPv4 and IPv4-mapped on an IPv6 socket: recvfrom() names the
    // nameserver, port 53.
    for family in ["4", "6"] {
        let out = w.run(
            "/usr/bin/python3",
            &["-c", UNCONNECTED, &EXT_V4.to_string(), family, NAME],
        );
        let src = if family == "6" {
            format!("::ffff:{EXT_V4}")
        } else {
            EXT_V4.to_string()
        };
        assert_eq!(
            out.trim(),
            format!("{src} 53 True {NAME_V4}"),
            "IPv{family}"
        );
    }
    let counted = w.agent.workload_stats("team-a/client");
    assert!(counted.get("dns").copied().unwrap_or(0) >= 6, "{counted:?}");

    // Agent down: the queries go straight to the nameserver (DNS fails open), even under
    // REGISTRY_ONLY, over UDP and TCP.
    let records = w.agent.records("dns").len();
    let before = w.upstream.queries();
    w.agent.kill();
    assert_eq!(w.dig(&[]).trim(), NAME_V4.to_string());
    assert_eq!(w.dig(&["+tcp"]).trim(), NAME_V4.to_string());
    let out = w.run(
        "/usr/bin/python3",
        &["-c", UNCONNECTED, &EXT_V4.to_string(), "4", NAME],
    );
    assert_eq!(out.trim(), format!("{EXT_V4} 53 True {NAME_V4}"));
    assert_eq!(w.upstream.queries(), before + 3, "{}", w.upstream.log());
    assert_eq!(w.agent.records("dns").len(), records);
}

/// The mesh of the registry tests: REGISTRY_ONLY, every destination intercepted, addresses
/// allocated in a range of the test's own.
macro_rules! registry_only {
    () => {
        "apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: node}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  interception: {includeOutboundIPRanges: \"*\"}
  autoAllocate: {ipv4Range: 198.18.200.0/24, ipv6Range: \"2001:db8:240::/48\"}
"
    };
}

/// Names the registry owns: an HTTP entry by host (an address allocated for it, in a range of
/// the test's own), an HTTP entry with its address. (A TCP entry by host is the nameserver's
/// to answer: its addresses are learnt from the answers.)
const REGISTRY: &str = concat!(
    registry_only!(),
    "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: team-a}
spec:
  hosts: [db.example]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: team-a}
spec:
  hosts: [api.example]
  addresses: [198.19.0.81]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
"
);

#[test]
fn names_the_registry_owns_are_answered_by_the_agent() {
    if !privileged("names_the_registry_owns_are_answered_by_the_agent") {
        return;
    }
    let w = world_with("dnsreg", REGISTRY);
    let dump = w.agent.config_dump();
    let allocated = dump["allocated"]["ServiceEntry team-a/db"].clone();
    let v4 = allocated[0]
        .as_str()
        .unwrap_or_else(|| panic!("{dump}"))
        .to_owned();
    let before = w.upstream.queries();
    // The allocated address, from the agent, over UDP with and without EDNS and over TCP.
    assert_eq!(w.short(&["db.example", "A"]), v4);
    assert_eq!(w.short(&["+noedns", "db.example", "A"]), v4);
    assert_eq!(w.short(&["+tcp", "db.example", "A"]), v4);
    // An entry's own address.
    assert_eq!(w.short(&["api.example", "A"]), "198.19.0.81");
    // glibc.
    let getent = w.run("getent", &["ahostsv4", "db.example"]);
    assert!(getent.starts_with(&v4), "{getent}");
    // A type the name has no record of: NOERROR, no answer, an SOA (never NXDOMAIN).
    let aaaa = w.run(
        "dig",
        &[
            "+time=3",
            "+tries=1",
            "+noall",
            "+comments",
            "+authority",
            "api.example",
            "AAAA",
        ],
    );
    assert!(aaaa.contains("status: NOERROR"), "{aaaa}");
    assert!(aaaa.contains("SOA"), "{aaaa}");
    assert!(aaaa.contains("ANSWER: 0"), "{aaaa}");
    // None of it reached the nameserver; a name the registry does not own still does.
    assert_eq!(w.upstream.queries(), before, "{}", w.upstream.log());
    assert_eq!(w.short(&[NAME, "A"]), NAME_V4.to_string());
    assert!(w.upstream.queries() > before);
    let rec = w
        .agent
        .wait_record("dns", "the agent's answer for db.example", |r| {
            r.get("query_name") == "db.example." && r.get("protocol") == "udp"
        });
    assert_eq!(rec.get("answered_by"), "agent", "{rec:?}");
}

/// `getaddrinfo()` for `argv[1]`, any family: its addresses, one a line. Linked statically
/// against musl, whose resolver sends every query with `sendto()` on one unconnected socket to
/// every nameserver at once and takes a reply only from an address and port it sent to.
const GETADDRINFO: &str = r#"
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    struct addrinfo hints, *res, *ai;
    if (argc != 2) {
        fprintf(stderr, "usage: %s NAME\n", argv[0]);
        return 2;
    }
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    int err = getaddrinfo(argv[1], NULL, &hints, &res);
    if (err != 0) {
        fprintf(stderr, "%s: %s\n", argv[1], gai_strerror(err));
        return 1;
    }
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        char text[INET6_ADDRSTRLEN];
        const void *addr = ai->ai_family == AF_INET6
            ? (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr
            : (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr;
        puts(inet_ntop(ai->ai_family, addr, text, sizeof text));
    }
    freeaddrinfo(res);
    return 0;
}
"#;

/// `GETADDRINFO` built with `musl-gcc -static` in `dir`: the program.
fn musl_getaddrinfo(dir: &TempDir) -> PathBuf {
    assert!(
        Path::new("/usr/bin/musl-gcc").exists(),
        "musl-gcc is missing (Debian's musl-tools: cargo xtask setup)"
    );
    let src = dir.path().join("getaddrinfo.c");
    let exe = dir.path().join("getaddrinfo");
    std::fs::write(&src, GETADDRINFO).unwrap();
    checked(
        Command::new("musl-gcc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&exe)
            .arg(&src),
    );
    exe
}

#[test]
fn musls_resolver_asks_every_nameserver_and_takes_their_replies() {
    if !privileged("musls_resolver_asks_every_nameserver_and_takes_their_replies") {
        return;
    }
    let w = world_with("dnsmusl", REGISTRY);
    let getaddrinfo = musl_getaddrinfo(&w.dir);
    let both = [EXT_V4, EXT2_V4];
    let resolve = |name: &str| -> BTreeSet<IpAddr> {
        let out = w.run_with(&both, &getaddrinfo, &[name]);
        out.lines()
            .map(|l| l.parse().unwrap_or_else(|e| panic!("{l}: {e}\n{out}")))
            .collect()
    };
    // A name the nameservers have: the replies reached musl, which took them as coming from
    // the nameservers it asked, port 53.
    assert_eq!(resolve(NAME), BTreeSet::from([IpAddr::V4(NAME_V4)]));
    for ns in both {
        for qtype in ["A", "AAAA"] {
            let rec = w.record_of(NAME, "udp", qtype, ns);
            assert_eq!(rec.get("answered_by"), "nameserver", "{rec:?}");
            assert_eq!(rec.get("rcode"), "NOERROR", "{rec:?}");
        }
    }
    // A name the registry owns: the agent's addresses, both families, whichever nameserver
    // musl asked.
    let allocated = w.allocated("ServiceEntry team-a/db");
    assert_eq!(allocated.len(), 2, "{allocated:?}");
    assert_eq!(resolve("db.example"), allocated);
    for ns in both {
        for qtype in ["A", "AAAA"] {
            let rec = w.record_of("db.example", "udp", qtype, ns);
            assert_eq!(rec.get("answered_by"), "agent", "{rec:?}");
        }
    }
}

#[test]
fn an_ipv6_nameserver_is_asked_through_the_agent_over_udp_and_tcp() {
    if !privileged("an_ipv6_nameserver_is_asked_through_the_agent_over_udp_and_tcp") {
        return;
    }
    let mut w = world_with("dns6", REGISTRY);
    let ns6 = IpAddr::V6(EXT_V6);
    let pod_ip = IpAddr::V6(w.pod.ipv6);
    // The pod's namespace routes the IPv6 stub addresses to its loopback, where the agent's
    // DNS socket on [::] takes what the kernel sends there.
    let local = || {
        checked(
            w.pod
                .command("ip")
                .args(["-6", "route", "show", "table", "local"]),
        )
    };
    assert!(
        local().contains("local 100::53:0/112 dev lo"),
        "{}",
        local()
    );

    // dig over UDP (connected, IPv6) and TCP: the nameserver's answer, forwarded from the
    // pod's namespace (the nameserver saw the pod's IPv6 address); dig checks that the reply
    // came from the nameserver it asked.
    for (transport, protocol) in [("+notcp", "udp"), ("+tcp", "tcp")] {
        let out = w.short_with(&[ns6], &[transport, NAME, "A"]);
        assert_eq!(out, NAME_V4.to_string(), "{protocol}");
        let rec = w.record_of(NAME, protocol, "A", ns6);
        assert_eq!(rec.get("answered_by"), "nameserver", "{rec:?}");
        assert_eq!(rec.get("reason"), "dns", "{rec:?}");
        let up: SocketAddr = rec.get("upstream_local").parse().unwrap();
        assert_eq!(up.ip(), pod_ip, "{rec:?}");
    }
    assert!(w.upstream.saw("A", NAME, pod_ip), "{}", w.upstream.log());

    // glibc (connected UDP, A and AAAA on one socket) and musl (unconnected sendto, to the
    // IPv6 and the IPv4 nameserver at once): each takes the replies as its nameservers'.
    assert_eq!(
        w.getent_with(&[ns6], NAME),
        BTreeSet::from([IpAddr::V4(NAME_V4)])
    );
    w.record_of(NAME, "udp", "AAAA", ns6);
    let getaddrinfo = musl_getaddrinfo(&w.dir);
    let both = [ns6, IpAddr::V4(EXT_V4)];
    let out = w.run_with(&both, &getaddrinfo, &["db.example"]);
    let got: BTreeSet<IpAddr> = out.lines().map(|l| l.parse().unwrap()).collect();
    // A name the registry owns, answered by the agent whichever nameserver was asked.
    let allocated = w.allocated("ServiceEntry team-a/db");
    assert_eq!(got, allocated, "{out}");
    for ns in both {
        let rec = w.record_of("db.example", "udp", "AAAA", ns);
        assert_eq!(rec.get("answered_by"), "agent", "{rec:?}");
    }

    // Python's sendto/recvfrom on an IPv6 socket: the reply comes from the nameserver, port 53.
    let unconnected = |w: &World| {
        w.run(
            "/usr/bin/python3",
            &["-c", UNCONNECTED, &EXT_V6.to_string(), "6", NAME],
        )
    };
    assert_eq!(
        unconnected(&w).trim(),
        format!("{EXT_V6} 53 True {NAME_V4}")
    );
    let counted = w.agent.workload_stats("team-a/client");
    assert!(counted.get("dns").copied().unwrap_or(0) >= 7, "{counted:?}");

    // Agent down: straight to the nameserver (DNS fails open).
    let records = w.agent.records("dns").len();
    let before = w.upstream.queries();
    w.agent.kill();
    assert_eq!(w.short_with(&[ns6], &[NAME, "A"]), NAME_V4.to_string());
    assert_eq!(
        unconnected(&w).trim(),
        format!("{EXT_V6} 53 True {NAME_V4}")
    );
    assert_eq!(w.upstream.queries(), before + 2, "{}", w.upstream.log());
    assert_eq!(w.agent.records("dns").len(), records);
}

/// A program on Go's own resolver (`net.Resolver{PreferGo: true}`, as in a static Go binary):
/// the addresses `LookupHost` gives for its argument, one a line.
const GO_LOOKUP: &str = r#"package main

import (
	"context"
	"fmt"
	"net"
	"os"
)

func main() {
	r := &net.Resolver{PreferGo: true}
	addrs, err := r.LookupHost(context.Background(), os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for _, a := range addrs {
		fmt.Println(a)
	}
}
"#;

/// `GO_LOOKUP` built with Debian's Go (without cgo) in `dir`: the program.
fn go_lookup(dir: &TempDir) -> PathBuf {
    assert!(
        Path::new("/usr/bin/go").exists(),
        "go is missing (Debian's golang-go: cargo xtask setup)"
    );
    let src = dir.path().join("lookup.go");
    let exe = dir.path().join("lookup");
    std::fs::write(&src, GO_LOOKUP).unwrap();
    checked(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&exe)
            .arg(&src)
            .env("CGO_ENABLED", "0")
            .env("GOCACHE", dir.path().join("go-cache"))
            .env("GOPATH", dir.path().join("go"))
            .env("GO111MODULE", "off"),
    );
    exe
}

#[test]
fn gos_resolver_takes_the_agents_replies_from_ipv4_and_ipv6_nameservers() {
    if !privileged("gos_resolver_takes_the_agents_replies_from_ipv4_and_ipv6_nameservers") {
        return;
    }
    let w = world_with("dnsgo", REGISTRY);
    let lookup = go_lookup(&w.dir);
    let allocated = w.allocated("ServiceEntry team-a/db");
    for ns in [IpAddr::V4(EXT_V4), IpAddr::V6(EXT_V6)] {
        let resolve = |name: &str| -> BTreeSet<IpAddr> {
            let out = w.run_with(&[ns], &lookup, &[name]);
            out.lines()
                .map(|l| l.parse().unwrap_or_else(|e| panic!("{l}: {e}\n{out}")))
                .collect()
        };
        // Go sends A and AAAA at once over connected UDP sockets and takes only a reply
        // from the nameserver it asked with its question.
        assert_eq!(resolve(NAME), BTreeSet::from([IpAddr::V4(NAME_V4)]), "{ns}");
        for qtype in ["A", "AAAA"] {
            let rec = w.record_of(NAME, "udp", qtype, ns);
            assert_eq!(rec.get("answered_by"), "nameserver", "{rec:?}");
        }
        assert_eq!(resolve("db.example"), allocated, "{ns}");
        let rec = w.record_of("db.example", "udp", "AAAA", ns);
        assert_eq!(rec.get("answered_by"), "agent", "{rec:?}");
    }
}

/// A ServiceEntry whose host has `MANY_COUNT` addresses of its own (198.19.2.1 onwards), which
/// the agent answers with: as long an answer as `MANY`'s.
const POOL: &str = "pool.example";

fn pool_entry() -> String {
    let addresses: Vec<String> = many(2).iter().map(IpAddr::to_string).collect();
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pool, namespace: team-a}}
spec:
  hosts: [{POOL}]
  addresses: [{}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: NONE
",
        addresses.join(", ")
    )
}

#[test]
fn large_answers_are_truncated_over_udp_and_whole_over_tcp() {
    if !privileged("large_answers_are_truncated_over_udp_and_whole_over_tcp") {
        return;
    }
    let w = world_with("dnsbig", &format!("{REGISTRY}{}", pool_entry()));
    // 200 addresses, from the nameserver and from the agent.
    for (name, addresses, by) in [(MANY, many(1), "nameserver"), (POOL, many(2), "agent")] {
        // Over UDP, more than the client takes without EDNS and with dig's 1,232 bytes: a
        // response within that size, with TC set (dig told not to retry over TCP).
        // The cut keeps the first addresses that fit whole, for clients that never ask over
        // TCP (musl before 1.2.4).
        for (edns, limit) in [(&["+noedns"][..], 512), (&[][..], 1232)] {
            let d = w.dig_full(&[edns, &["+ignore", name, "A"]].concat());
            assert!(d.truncated(), "{name} {edns:?}: {d:?}");
            assert!(d.size <= limit, "{name} {edns:?}: {d:?}");
            let kept = d.addresses();
            assert!(
                kept.len() > 20 && kept.is_subset(&addresses),
                "{name}: {d:?}"
            );
        }
        let musl = musl_getaddrinfo(&w.dir);
        let out = w.run(&musl, &[name]);
        assert!(out.lines().count() > 20, "musl, {name}: {out}");
        // glibc takes TC as its cue to ask again over TCP, where the answer comes whole.
        assert_eq!(w.getent_with(&[EXT_V4], name), addresses, "{name}");
        let rec = w.record_of(name, "tcp", "A", EXT_V4);
        assert_eq!(rec.get("answered_by"), by, "{rec:?}");
        assert_eq!(rec.get("rcode"), "NOERROR", "{rec:?}");
        let d = w.dig_full(&["+tcp", name, "A"]);
        assert!(!d.truncated(), "{d:?}");
        assert_eq!(d.addresses(), addresses, "{name}");
    }
    // A TXT record of 652 bytes: cut for a client without EDNS, whole with EDNS over UDP and
    // over TCP.
    let whole: Vec<String> = txt_strings().iter().map(|s| format!("\"{s}\"")).collect();
    let whole = whole.join(" ");
    let d = w.dig_full(&["+noedns", "+ignore", BIG_TXT, "TXT"]);
    assert!(d.truncated() && d.size <= 512, "{d:?}");
    for transport in [&[][..], &["+tcp"]] {
        let d = w.dig_full(&[transport, &[BIG_TXT, "TXT"]].concat());
        assert!(!d.truncated() && d.size > 512, "{transport:?}: {d:?}");
        assert_eq!(d.answers, std::slice::from_ref(&whole), "{transport:?}");
    }
    w.record_of(BIG_TXT, "udp", "TXT", EXT_V4);
    w.record_of(BIG_TXT, "tcp", "TXT", EXT_V4);
}

/// A nameserver on the pod's loopback, as systemd-resolved's stub listener, serving a name of
/// its own.
const LOOPBACK_NS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);
const LOCAL: &str = "local.test";
const LOCAL_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 53, 53);

#[test]
fn a_nameserver_on_the_pods_loopback_is_asked_through_the_agent() {
    if !privileged("a_nameserver_on_the_pods_loopback_is_asked_through_the_agent") {
        return;
    }
    let w = world("dnslo");
    // Declared after the world, so stopped before the pod's namespace goes.
    let local = Dnsmasq::start(
        &w.pod.sandbox.netns,
        &[LOOPBACK_NS],
        w.dir.path().join("loopback.log"),
        &[
            "--log-queries".to_owned(),
            format!("--host-record={LOCAL},{LOCAL_V4}"),
        ],
    );
    for (transport, protocol) in [(&[][..], "udp"), (&["+tcp"][..], "tcp")] {
        let out = w.short_with(&[LOOPBACK_NS], &[transport, &[LOCAL, "A"]].concat());
        assert_eq!(out, LOCAL_V4.to_string(), "{protocol}");
        let rec = w.record_of(LOCAL, protocol, "A", LOOPBACK_NS);
        assert_eq!(rec.get("answered_by"), "nameserver", "{rec:?}");
        assert_eq!(rec.get("rcode"), "NOERROR", "{rec:?}");
        // Forwarded inside the pod's namespace, over its loopback.
        let up: SocketAddr = rec.get("upstream_local").parse().unwrap();
        assert!(up.ip().is_loopback(), "{rec:?}");
    }
    assert_eq!(
        w.getent_with(&[LOOPBACK_NS], LOCAL),
        BTreeSet::from([IpAddr::V4(LOCAL_V4)])
    );
    w.record_of(LOCAL, "udp", "AAAA", LOOPBACK_NS);
    assert!(local.queries() >= 4, "{}", local.log());
    assert_eq!(w.upstream.queries(), 0, "{}", w.upstream.log());
}

/// A TCP ServiceEntry by host, resolved by DNS: its name is the nameserver's to answer (the
/// address allocated for it is not), and no address on its port is allowed but those the
/// workload was answered for it (and the allocated one, which leads to the agent).
const TCP_HOST: &str = concat!(
    registry_only!(),
    "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: team-a}
spec:
  hosts: [db.example]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: DNS
"
);

/// Connects to `argv[1]` port `argv[2]` (a name, resolved by glibc, or an address), at once,
/// sends a line and prints the address connected to and what came back, or the errno.
const CONNECT: &str = r#"
import errno, socket, sys
try:
    addr = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), socket.AF_INET, socket.SOCK_STREAM)[0][4]
    s = socket.create_connection(addr, timeout=5)
    s.sendall(b"ping\n")
    print(addr[0], s.recv(100).decode().strip())
except OSError as e:
    print("errno", errno.errorcode.get(e.errno, e.errno))
"#;

#[test]
fn a_tcp_host_goes_direct_to_what_the_workload_was_answered_until_it_runs_out() {
    if !privileged("a_tcp_host_goes_direct_to_what_the_workload_was_answered_until_it_runs_out") {
        return;
    }
    // dnsmasq answers db.example with TTL 1; the agent keeps learnt addresses 4 s past it.
    let records = [
        format!("--host-record=db.example,{EXT_V4}"),
        "--local-ttl=1".to_owned(),
    ];
    let w = world_full(
        "dnslearn",
        TCP_HOST,
        "team-a",
        &["--dns-grace", "4s"],
        &records,
    );
    let servers = Servers::new();
    let echo = servers.echo_on(w._node.ext().listen((EXT_V4, 5432).into()));
    let connect = |to: &str| {
        w.run("/usr/bin/python3", &["-c", CONNECT, to, "5432"])
            .trim()
            .to_owned()
    };
    // Not learnt: the address is no ServiceEntry's, so REGISTRY_ONLY refuses it in the kernel.
    assert_eq!(connect(&EXT_V4.to_string()), "errno EPERM");
    let denied = w.agent.workload_stats("team-a/client");
    assert!(
        denied.get("registry-denied").copied().unwrap_or(0) >= 1,
        "{denied:?}"
    );
    // The entry has an allocated address, but its name is the nameserver's to answer.
    let dump = w.agent.config_dump();
    assert!(
        dump["allocated"]["ServiceEntry team-a/db"].is_array(),
        "{dump}"
    );
    // Resolved, then connected at once: straight out, to the echo stand-in.
    assert_eq!(connect("db.example"), format!("{EXT_V4} ping"));
    let rec = w.record_for("db.example.");
    assert_eq!(rec.get("answered_by"), "nameserver", "{rec:?}");
    let counted = w.agent.workload_stats("team-a/client");
    assert_eq!(counted.get("dns-learned").copied(), Some(1), "{counted:?}");
    let direct = w
        .agent
        .wait_record("connection", "the learnt connection's close", |r| {
            r.get("orig_dst") == format!("{EXT_V4}:5432")
        });
    assert_eq!(direct.get("reason"), "dns-learned", "{direct:?}");
    // `egress explain` for the workload says so while it lasts.
    let admin = w.dir.path().join("admin.sock");
    let workload = ["--workload", "team-a/client", "--admin-socket"];
    let args = [&workload[..], &[admin.to_str().unwrap()]].concat();
    let said = w.agent.explain(&format!("{EXT_V4}:5432"), &args);
    assert!(said.ends_with("[dns-learned]"), "{said}");
    // The same address, from the same workload, after the TTL and the grace: refused again.
    std::thread::sleep(std::time::Duration::from_millis(5500));
    assert_eq!(connect(&EXT_V4.to_string()), "errno EPERM");
    // An answer over TCP teaches it as well.
    assert_eq!(w.short(&["+tcp", "db.example", "A"]), EXT_V4.to_string());
    assert_eq!(connect(&EXT_V4.to_string()), format!("{EXT_V4} ping"));
    let metrics = w.agent.metrics();
    assert!(
        metrics.contains("egress_dns_learned_entries 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("egress_dns_learned_expired_total"),
        "{metrics}"
    );
    // Learnt only from the nameservers `spec.dns.learnFrom` names: once what was learnt ran
    // out, the same answer from another nameserver opens nothing.
    let n = w.agent.logs().len();
    let only_ext2 = TCP_HOST.replace(
        "  autoAllocate:",
        "  dns: {learnFrom: [198.19.0.3]}\n  autoAllocate:",
    );
    w.agent.write_config(&only_ext2);
    w.agent.wait_log(n, "applied configuration generation 2");
    std::thread::sleep(std::time::Duration::from_millis(5500));
    assert_eq!(w.short(&["db.example", "A"]), EXT_V4.to_string());
    assert_eq!(connect(&EXT_V4.to_string()), "errno EPERM");
    let _ = echo;
}

#[test]
fn a_nameserver_that_refuses_gets_the_client_servfail_at_once() {
    if !privileged("a_nameserver_that_refuses_gets_the_client_servfail_at_once") {
        return;
    }
    let w = world("dnsfail");
    // The node's end of the link to ext: a host with nothing on port 53, which answers the
    // forwarded query with an ICMP port unreachable.
    let refusing = Ipv4Addr::new(198, 19, 0, 1);
    let out = w.run_with(
        &[refusing],
        "dig",
        &["+time=3", "+tries=1", &format!("@{refusing}"), NAME, "A"],
    );
    assert!(out.contains("status: SERVFAIL"), "{out}");
    let rec = w.record_of(NAME, "udp", "A", refusing);
    assert_eq!(rec.get("rcode"), "SERVFAIL", "{rec:?}");
    assert_eq!(rec.get("answered_by"), "agent", "{rec:?}");
    assert_ne!(rec.get("result"), "ok", "{rec:?}");
    // glibc goes on to the next nameserver and resolves.
    let out = w.run_with(&[refusing, EXT_V4], "getent", &["ahostsv4", NAME]);
    assert!(out.contains(&NAME_V4.to_string()), "{out}");
}

#[test]
fn the_external_name_seed_task_resolves_and_reaches_httpbin_through_dns() {
    if !privileged("the_external_name_seed_task_resolves_and_reaches_httpbin_through_dns") {
        return;
    }
    for mode in ["ALLOW_ANY", "REGISTRY_ONLY"] {
        let config = format!("{}{MY_HTTPBIN}", MESH.replace("REGISTRY_ONLY", mode));
        // httpbin.org is the ext namespace's own address: its stand-in listens there.
        let records = [format!("--host-record=httpbin.org,{EXT_V4}")];
        let w = world_full(
            &format!("dnsxn{}", &mode[..1]),
            &config,
            "default",
            &[],
            &records,
        );
        let stand = StandIns::new();
        let httpbin = stand.http_on(w._node.ext().listen((EXT_V4, 80).into()));
        // The short name through the pod's search domains, as getent asks.
        w.write_resolv("search default.svc.cluster.local svc.cluster.local cluster.local\n");
        let out = w.run("getent", &["ahostsv4", "my-httpbin"]);
        assert!(out.contains(&EXT_V4.to_string()), "{mode}: {out}");
        let path = format!("/headers-{mode}");
        let out = w.run(
            "curl",
            &[
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
                &format!("http://my-httpbin.default.svc.cluster.local{path}"),
            ],
        );
        assert_eq!(out.trim(), "200", "{mode}");
        let hit = &stand.hits_for(&path)[0];
        assert_eq!(
            (hit.local, hit.host.as_str()),
            (httpbin, "my-httpbin.default.svc.cluster.local"),
            "{mode}: the stand-in saw the client's Host"
        );
        let rec = w.record_for("my-httpbin.default.svc.cluster.local.");
        assert_eq!(rec.get("answered_by"), "agent+nameserver", "{rec:?}");
        let r = w
            .agent
            .wait_record("request", &path, |r| r.get("path") == path);
        assert_eq!(
            r.get("matched"),
            "Service default/my-httpbin",
            "{mode}: {r:?}"
        );
        assert_eq!(r.get("upstream"), format!("{EXT_V4}:80"), "{mode}: {r:?}");
    }
}

#[test]
fn an_upgrade_hands_the_dns_sockets_and_what_was_learnt_over() {
    if !privileged("an_upgrade_hands_the_dns_sockets_and_what_was_learnt_over") {
        return;
    }
    let records = [format!("--host-record=db.example,{EXT_V4}")];
    let mut w = world_full(
        "dnsup",
        TCP_HOST,
        "team-a",
        &["--dns-grace", "5m"],
        &records,
    );
    let servers = Servers::new();
    let _echo = servers.echo_on(w._node.ext().listen((EXT_V4, 5432).into()));
    assert_eq!(w.short(&["db.example", "A"]), EXT_V4.to_string());
    // A new agent beside the running one (a DaemonSet's rolling update) takes the workload
    // and its sockets over; the old one stops.
    let new = w.agent.start_beside();
    new.wait_log(0, "took over 1 workloads and their listeners");
    let mut old = std::mem::replace(&mut w.agent, new);
    old.terminate();
    assert!(old.exited());
    // Queries over UDP (to an IPv4 and an IPv6 nameserver) and TCP reach the new agent on
    // the sockets handed over, and the old agent left the pod's IPv6 stub route in place.
    assert_eq!(w.dig(&[]), NAME_V4.to_string());
    assert_eq!(w.dig(&["+tcp"]), NAME_V4.to_string());
    let ns6 = IpAddr::V6(EXT_V6);
    assert_eq!(w.short_with(&[ns6], &[NAME, "A"]), NAME_V4.to_string());
    w.record("udp", "A");
    w.record("tcp", "A");
    w.record_of(NAME, "udp", "A", ns6);
    // What the workload learnt before stays in the kernel: it still goes straight out.
    let out = w.run(
        "/usr/bin/python3",
        &["-c", CONNECT, &EXT_V4.to_string(), "5432"],
    );
    assert_eq!(out.trim(), format!("{EXT_V4} ping"));
    let counted = w.agent.workload_stats("team-a/client");
    assert!(
        counted.get("dns-learned").copied().unwrap_or(0) >= 1,
        "{counted:?}"
    );
}

/// A nameserver the pod was not enrolled with, answering `NAME` with `OTHER_V4`.
const OTHER_NS_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 4);
const OTHER_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 90);
/// What the registry answers for `NAME`: its ServiceEntry's address.
const ENTRY_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 5, 80);

/// ALLOW_ANY, every address intercepted, DNS captured as `capture` says, and `NAME` a
/// ServiceEntry with an address of its own.
fn capture_mesh(capture: &str) -> String {
    format!(
        "apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {{name: node}}
spec:
  interception: {{includeOutboundIPRanges: \"*\"}}
  dns: {{capture: {capture}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: httpbin, namespace: team-a}}
spec:
  hosts: [{NAME}]
  addresses: [{ENTRY_V4}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: NONE
"
    )
}

#[test]
fn resolv_conf_captures_only_the_pods_own_nameservers() {
    if !privileged("resolv_conf_captures_only_the_pods_own_nameservers") {
        return;
    }
    for capture in ["RESOLV_CONF", "ALL"] {
        // The runtime gives egress-cni the pod's nameserver: the upstream, EXT_V4.
        let w = world_node(
            "dnsresolv",
            &capture_mesh(capture),
            ("team-a", &[], &[]),
            Some(&[EXT_V4]),
        );
        w._node.add_ext_address(OTHER_NS_V4);
        let other = Dnsmasq::start(
            w._node.ext(),
            &[OTHER_NS_V4],
            w.dir.path().join("other.log"),
            &[
                "--log-queries".to_owned(),
                format!("--host-record={NAME},{OTHER_V4}"),
            ],
        );
        // The enrolment carries the nameserver: in the agent's listing and its dump.
        let socket = w.dir.path().join("admin.sock");
        let listed = w
            .agent
            .egress(&["workloads", "--admin-socket", socket.to_str().unwrap()]);
        let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
        assert!(
            listed.starts_with("team-a/client ")
                && listed.contains(&format!(" nameservers={EXT_V4} ")),
            "{capture}: {listed}"
        );
        let dump = w.agent.config_dump();
        assert_eq!(dump["dns"]["capture"], capture, "{dump}");
        assert_eq!(
            dump["workloads"][0]["nameservers"],
            json!([EXT_V4]),
            "{dump}"
        );
        let pod_ip = IpAddr::V4(w.pod.ipv4);
        // The pod's own nameserver: the agent answers from the registry, over UDP and TCP.
        for transport in ["+notcp", "+tcp"] {
            assert_eq!(
                w.short_with(&[EXT_V4], &[transport, NAME, "A"]),
                ENTRY_V4.to_string(),
                "{capture} {transport}"
            );
        }
        let explain = |ns: Ipv4Addr| {
            w.agent.explain(
                &format!("{ns}:53"),
                &[
                    "--workload",
                    "team-a/client",
                    "--admin-socket",
                    socket.to_str().unwrap(),
                ],
            )
        };
        assert!(
            explain(EXT_V4).ends_with("[dns]"),
            "{capture}: {}",
            explain(EXT_V4)
        );
        // Another nameserver: under RESOLV_CONF it is no DNS capture, the query goes to it (UDP
        // left alone, TCP through the outbound listener as any connection) and it answers;
        // under ALL the agent answers.
        let want = if capture == "ALL" { ENTRY_V4 } else { OTHER_V4 };
        for transport in ["+notcp", "+tcp"] {
            assert_eq!(
                w.short_with(&[OTHER_NS_V4], &[transport, NAME, "A"]),
                want.to_string(),
                "{capture} {transport}: {}",
                other.log()
            );
        }
        // The pod's nameserver's IPv6 address is another nameserver to the kernel: under
        // RESOLV_CONF it answers itself, over UDP (the IPv6 stub range) and TCP alike.
        let at_v6 = format!("@{EXT_V6}");
        let want = if capture == "ALL" { ENTRY_V4 } else { NAME_V4 };
        for transport in ["+notcp", "+tcp"] {
            assert_eq!(
                w.short_with(&[EXT_V4], &[&at_v6, transport, NAME, "A"]),
                want.to_string(),
                "{capture} {transport} {at_v6}"
            );
        }
        let line = explain(OTHER_NS_V4);
        if capture == "ALL" {
            assert!(other.queries() == 0, "{}", other.log());
            assert!(
                line.contains("spec.dns.capture ALL") && line.ends_with("[dns]"),
                "{line}"
            );
        } else {
            assert!(other.saw("A", NAME, pod_ip), "{}", other.log());
            assert_eq!(
                line,
                "redirect (includeOutboundIPRanges 0.0.0.0/0) [included-cidr]"
            );
            assert!(explain(EXT_V4).contains("RESOLV_CONF: to one of the workload's nameservers"));
        }
        // The agent's access records: the queries it took, to the other nameserver only under
        // ALL.
        for protocol in ["udp", "tcp"] {
            w.record_of(NAME, protocol, "A", EXT_V4);
        }
        if capture == "ALL" {
            for protocol in ["udp", "tcp"] {
                let rec = w.record_of(NAME, protocol, "A", OTHER_NS_V4);
                assert_eq!(rec.get("answered_by"), "agent", "{rec:?}");
            }
        } else {
            let other_ns = SocketAddr::from((OTHER_NS_V4, 53)).to_string();
            let to_other = w
                .agent
                .count_records("dns", |r| r.get("orig_dst") == other_ns);
            assert_eq!(to_other, 0, "{capture}");
        }
    }
}
