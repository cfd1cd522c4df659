//! The ways out a root workload tries under `REGISTRY_ONLY`, each a real attempt from a pod
//! that egress-cni enrolled with a node agent, against stand-ins in the node's ext namespace
//! (198.19.0.2 and 2001:db8:2::2). Each test names the hole it closes.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
};

use egress_tests::{
    Agent, NodeOpts, TempDir, checked, egress_bin, eventually,
    node::{EXT_V4, EXT_V6, Node, Pod},
    privileged,
};
use serde_json::json;

const MESH: &str = "apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: node}
spec:
  outboundTrafficPolicy: {mode: MODE}
  interception: {includeOutboundIPRanges: \"*\"EXCLUDE}
";

/// The UDP port of the stand-in sink.
const SINK_PORT: u16 = 7001;

/// A node agent with egress-cni chained, one pod, and a UDP sink in the ext namespace.
/// Dropped: the pod first, then the node, the agent and the sink.
struct World {
    pod: Pod,
    _node: Node,
    agent: Agent,
    sink: Sink,
    _dir: TempDir,
}

fn world(tag: &str, config: &str) -> World {
    let dir = TempDir::new(tag);
    let agent = Agent::start_node(NodeOpts {
        config,
        state_file: &dir.path().join("workloads.json"),
        admin_socket: &dir.path().join("admin.sock"),
        extra: vec![],
    });
    let bin = egress_bin().parent().unwrap().to_path_buf();
    let node = Node::builder(tag)
        .cni_dir(bin)
        .chain(json!({"type": "egress-cni", "adminSocket": dir.path().join("admin.sock")}))
        .build();
    let pod = node.add_pod("team-a", "client");
    let sink = Sink::start(&node, dir.path().join("sink.log"));
    World {
        pod,
        _node: node,
        agent,
        sink,
        _dir: dir,
    }
}

/// Python in the ext namespace: every datagram to port `SINK_PORT` on any address (IPv4 and
/// IPv6), logged as `SOURCE-ADDRESS PAYLOAD` a line.
const SINK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
log = open(sys.argv[2], "a", buffering=1)
log.write("ready\n")
while True:
    data, src = s.recvfrom(2048)
    a = src[0][7:] if src[0].startswith("::ffff:") else src[0]
    log.write(a + " " + data.decode(errors="replace") + "\n")
"#;

struct Sink {
    child: Child,
    log: PathBuf,
}

impl Sink {
    fn start(node: &Node, log: PathBuf) -> Sink {
        let child = node
            .ext()
            .command("/usr/bin/python3")
            .args(["-c", SINK, &SINK_PORT.to_string()])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let s = Sink { child, log };
        assert!(eventually(10, || s.lines().iter().any(|l| l == "ready")));
        s
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The sources of the datagrams whose payload was `tag`.
    fn got(&self, tag: &str) -> Vec<IpAddr> {
        self.lines()
            .iter()
            .filter_map(|l| {
                let (src, payload) = l.split_once(' ')?;
                (payload == tag).then(|| src.parse().ok())?
            })
            .collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One datagram from a UDP socket: `send` (sendto on an unconnected socket) or `connect`
/// (connect, then send) to `ADDRESS PORT` with payload `TAG`, on an IPv4 socket, or on an IPv6
/// one for an IPv6 or IPv4-mapped address. Prints `sent`, or `errno N` where the kernel
/// refused it (at connect or at send).
const SEND: &str = r#"
import errno, socket, sys
how, addr, port, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
try:
    if how == "connect":
        s.connect((addr, port))
        s.send(tag)
    else:
        s.sendto(tag, (addr, port))
    print("sent")
except OSError as e:
    print("errno", e.errno)
"#;

impl World {
    /// Python `script` with `args` in the pod, as root: what it printed, trimmed.
    fn py(&self, script: &str, args: &[&str]) -> String {
        checked(
            self.pod
                .command("/usr/bin/python3")
                .args(["-c", script])
                .args(args),
        )
        .trim()
        .to_owned()
    }

    /// Send a datagram from the pod: what SEND printed.
    fn send(&self, how: &str, addr: &str, tag: &str) -> String {
        self.py(SEND, &[how, addr, &SINK_PORT.to_string(), tag])
    }
}

/// The destinations every case tries: IPv4, IPv6, and IPv4 as an IPv4-mapped address on an
/// IPv6 socket.
fn destinations() -> [(&'static str, String); 3] {
    [
        ("v4", EXT_V4.to_string()),
        ("v6", EXT_V6.to_string()),
        ("mapped", format!("::ffff:{EXT_V4}")),
    ]
}

fn config(mode: &str, exclude: &str, extra: &str) -> String {
    format!(
        "{}{extra}",
        MESH.replace("MODE", mode).replace("EXCLUDE", exclude)
    )
}

/// A UDP ServiceEntry for the sink's addresses and port.
fn udp_entry() -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: sink, namespace: team-a}}
spec:
  hosts: [sink.example]
  addresses: [\"{EXT_V4}/32\", \"{EXT_V6}/128\"]
  ports: [{{number: {SINK_PORT}, name: udp-sink, protocol: UDP}}]
  resolution: NONE
  location: MESH_EXTERNAL
"
    )
}

/// Hole: datagrams were never decided, so under REGISTRY_ONLY any UDP (QUIC, anything) left
/// the pod for any destination. Now refused at once with EPERM at connect() or sendto(),
/// counted, and let through by a UDP ServiceEntry for the address and port, an excluded
/// range, or ALLOW_ANY.
#[test]
fn udp_to_an_unregistered_destination_is_refused_under_registry_only() {
    if !privileged("udp_to_an_unregistered_destination_is_refused_under_registry_only") {
        return;
    }
    let w = world("esc-udp", &config("REGISTRY_ONLY", "", ""));
    let pod_v4 = IpAddr::V4(w.pod.ipv4);
    let pod_v6 = IpAddr::V6(w.pod.ipv6);
    let denied_before = w
        .agent
        .workload_stats("team-a/client")
        .get("registry-denied")
        .copied()
        .unwrap_or(0);
    for (family, addr) in destinations() {
        for how in ["send", "connect"] {
            let tag = format!("denied-{how}-{family}");
            assert_eq!(w.send(how, &addr, &tag), "errno 1", "{how} {family}");
        }
    }
    let denied = w.agent.workload_stats("team-a/client")["registry-denied"];
    assert_eq!(denied, denied_before + 6);

    // A UDP entry for the sink's addresses and port lets exactly those through: from the
    // pod's own address, untouched. Another port of the same address stays refused, and so
    // does TCP to the entry's port (a UDP entry is no TCP entry).
    let n = w.agent.logs().len();
    w.agent
        .write_config(&config("REGISTRY_ONLY", "", &udp_entry()));
    w.agent.wait_log(n, "applied configuration generation 2");
    for (family, addr) in destinations() {
        for how in ["send", "connect"] {
            let tag = format!("allowed-{how}-{family}");
            assert_eq!(w.send(how, &addr, &tag), "sent", "{how} {family}");
            let from = if family == "v6" { pod_v6 } else { pod_v4 };
            assert!(
                eventually(5, || w.sink.got(&tag) == [from]),
                "{tag}: {:?}",
                w.sink.lines()
            );
        }
    }
    let other = w.py(SEND, &["send", &EXT_V4.to_string(), "7002", "other-port"]);
    assert_eq!(other, "errno 1");
    let tcp = w.pod.probe(&[
        "echo",
        &SocketAddr::from((EXT_V4, SINK_PORT)).to_string(),
        "1",
    ]);
    assert_eq!(tcp.get("errno").as_deref(), Some("1"), "{tcp:?}");

    // An excluded range bypasses, as in Istio: what it covers is not decided.
    let n = w.agent.logs().len();
    w.agent.write_config(&config(
        "REGISTRY_ONLY",
        &format!(", excludeOutboundIPRanges: \"{EXT_V4}/32\""),
        "",
    ));
    w.agent.wait_log(n, "applied configuration generation 3");
    assert_eq!(w.send("send", &EXT_V4.to_string(), "excluded-v4"), "sent");
    assert!(eventually(5, || w.sink.got("excluded-v4") == [pod_v4]));
    assert_eq!(w.send("send", &EXT_V6.to_string(), "still-v6"), "errno 1");

    // ALLOW_ANY: every datagram goes out.
    let n = w.agent.logs().len();
    w.agent.write_config(&config("ALLOW_ANY", "", ""));
    w.agent.wait_log(n, "applied configuration generation 4");
    for (family, addr) in destinations() {
        let tag = format!("allow-any-{family}");
        assert_eq!(w.send("connect", &addr, &tag), "sent", "{family}");
        assert!(eventually(5, || w.sink.got(&tag).len() == 1), "{tag}");
    }
    // Nothing denied was ever seen by the sink.
    assert!(
        w.sink
            .lines()
            .iter()
            .all(|l| !l.contains("denied-") && !l.contains("still-")),
        "{:?}",
        w.sink.lines()
    );
}

/// Binds a socket (`tcp` or `udp`) to `ADDRESS PORT` and prints `bound`, or `errno N`.
const BIND: &str = r#"
import socket, sys
kind, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET,
                  socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((addr, port))
    print("bound")
except OSError as e:
    print("errno", e.errno)
"#;

/// Hole: a root workload could bind the agent's outbound or DNS port in its own namespace
/// (on another of its addresses beside the agent's, or before the agent listens while it
/// restarts) and take what the datapath sends there. Now refused with EPERM on every address,
/// TCP and UDP, counted as `agent-port`; other ports bind as before.
#[test]
fn the_agents_ports_cannot_be_bound_in_the_workloads_namespace() {
    if !privileged("the_agents_ports_cannot_be_bound_in_the_workloads_namespace") {
        return;
    }
    let w = world("esc-bind", &config("REGISTRY_ONLY", "", ""));
    let bind = |kind: &str, addr: &str, port: u16| w.py(BIND, &[kind, addr, &port.to_string()]);
    let pod_v4 = w.pod.ipv4.to_string();
    let pod_v6 = w.pod.ipv6.to_string();
    let mut tries = 0;
    for port in [w.agent.port, w.agent.dns_port] {
        for addr in ["127.0.0.1", "0.0.0.0", "::1", "::", &pod_v4, &pod_v6] {
            for kind in ["tcp", "udp"] {
                assert_eq!(
                    bind(kind, addr, port),
                    "errno 1",
                    "{kind} {addr} port {port}"
                );
                tries += 1;
            }
        }
    }
    let counted = w.agent.workload_stats("team-a/client");
    assert_eq!(
        counted.get("agent-port").copied(),
        Some(tries),
        "{counted:?}"
    );
    // Any other port, and an ephemeral one, as before.
    let other = w.agent.port + 1;
    assert_eq!(bind("tcp", &pod_v4, other), "bound");
    assert_eq!(bind("udp", "::", other), "bound");
    assert_eq!(bind("tcp", "0.0.0.0", 0), "bound");
}

/// Hole: connecting to the agent's listener directly, with no redirected connection behind
/// it, must not make the agent connect anywhere. The agent finds no original destination and
/// resets the connection.
#[test]
fn a_direct_connect_to_the_agents_listener_is_reset_without_an_upstream() {
    if !privileged("a_direct_connect_to_the_agents_listener_is_reset_without_an_upstream") {
        return;
    }
    let w = world("esc-listener", &config("ALLOW_ANY", "", ""));
    let before = w.agent.records("connection").len();
    let listener = SocketAddr::from(([127, 0, 0, 1], w.agent.port)).to_string();
    let r = w.pod.probe(&["echo", &listener, "10"]);
    // Accepted, then closed with nothing echoed: no upstream to echo it.
    assert_ne!(r.get("match").as_deref(), Some("true"), "{r:?}");
    assert!(
        eventually(5, || w
            .agent
            .logs()
            .iter()
            .any(|l| l.contains("result=no-original-destination"))),
        "{:?}",
        w.agent.logs()
    );
    // Nothing was relayed anywhere.
    assert!(
        w.agent.records("connection")[before..]
            .iter()
            .all(|r| r.get("upstream").is_empty())
    );
}

/// Creates a socket `FAMILY TYPE PROTOCOL` (numbers) and prints `created`, or `errno N`.
const SOCKET: &str = r#"
import socket, sys
try:
    socket.socket(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    print("created")
except OSError as e:
    print("errno", e.errno)
"#;

/// Hole: raw IP sockets (CAP_NET_RAW, which runtimes give containers by default) and ICMP
/// datagram sockets build or send packets that no connect or sendmsg hook decides. Refused at
/// creation with EPERM to workloads under REGISTRY_ONLY, counted as `undecided-socket`;
/// `spec.rawSockets: allow` lets them be, `refuse` refuses them under ALLOW_ANY too. SCTP is
/// refused alike where the kernel has it (errno 93, EPROTONOSUPPORT, where it has not).
#[test]
fn raw_and_icmp_sockets_are_refused_at_creation_under_registry_only() {
    if !privileged("raw_and_icmp_sockets_are_refused_at_creation_under_registry_only") {
        return;
    }
    let w = world("esc-raw", &config("REGISTRY_ONLY", "", ""));
    // Ping sockets for every group in the pod's namespace, so that only the hook refuses.
    checked(
        w.pod
            .command("sysctl")
            .args(["-qw", "net.ipv4.ping_group_range=0 2147483647"]),
    );
    let create = |family: i32, ty: i32, proto: i32| {
        w.py(
            SOCKET,
            &[&family.to_string(), &ty.to_string(), &proto.to_string()],
        )
    };
    let (inet, inet6) = (libc::AF_INET, libc::AF_INET6);
    let undecided = [
        ("raw IPv4", inet, libc::SOCK_RAW, libc::IPPROTO_ICMP),
        (
            "raw IPv4 (IPPROTO_RAW)",
            inet,
            libc::SOCK_RAW,
            libc::IPPROTO_RAW,
        ),
        ("raw IPv6", inet6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6),
        ("ICMP datagram", inet, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
        (
            "ICMPv6 datagram",
            inet6,
            libc::SOCK_DGRAM,
            libc::IPPROTO_ICMPV6,
        ),
    ];
    for (what, f, t, p) in undecided {
        assert_eq!(create(f, t, p), "errno 1", "{what}");
    }
    let sctp = create(inet, libc::SOCK_STREAM, libc::IPPROTO_SCTP);
    assert!(sctp == "errno 1" || sctp == "errno 93", "SCTP: {sctp}");
    let counted = w.agent.workload_stats("team-a/client");
    assert!(
        counted.get("undecided-socket").copied().unwrap_or(0) >= undecided.len() as u64,
        "{counted:?}"
    );
    // The sockets the hooks decide are created as before.
    assert_eq!(create(inet, libc::SOCK_STREAM, 0), "created");
    assert_eq!(create(inet6, libc::SOCK_DGRAM, 0), "created");

    // rawSockets: allow.
    let n = w.agent.logs().len();
    w.agent.write_config(&format!(
        "{}  rawSockets: allow\n",
        config("REGISTRY_ONLY", "", "")
    ));
    w.agent.wait_log(n, "applied configuration generation 2");
    for (what, f, t, p) in undecided {
        assert_eq!(create(f, t, p), "created", "{what} with rawSockets: allow");
    }
    // ALLOW_ANY lets them be; rawSockets: refuse refuses them there too.
    let n = w.agent.logs().len();
    w.agent.write_config(&config("ALLOW_ANY", "", ""));
    w.agent.wait_log(n, "applied configuration generation 3");
    assert_eq!(create(inet, libc::SOCK_RAW, libc::IPPROTO_ICMP), "created");
    let n = w.agent.logs().len();
    w.agent.write_config(&format!(
        "{}  rawSockets: refuse\n",
        config("ALLOW_ANY", "", "")
    ));
    w.agent.wait_log(n, "applied configuration generation 4");
    assert_eq!(create(inet, libc::SOCK_RAW, libc::IPPROTO_ICMP), "errno 1");
}

/// A TCP connect to `ADDRESS PORT` from a socket marked 1337 (Istio's bypass mark), or with
/// `sendto(MSG_FASTOPEN)` (the connect inside the first send): prints `connected`, or
/// `errno N`.
const TCP_TRICKS: &str = r#"
import socket, sys
how, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(5)
try:
    if how == "mark":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 1337)
        s.connect((addr, port))
    else:
        s.sendto(b"hello", socket.MSG_FASTOPEN, (addr, port))
    print("connected")
except OSError as e:
    print("errno", e.errno)
"#;

/// Holes: Istio's sidecar lets sockets marked 1337 through, and a TCP Fast Open `sendto`
/// connects without calling connect(). Here the mark is nothing to the hooks and the Fast
/// Open send is decided as a connect: both refused with EPERM for an unregistered
/// destination under REGISTRY_ONLY.
#[test]
fn marked_sockets_and_fast_open_sends_are_decided_like_connects() {
    if !privileged("marked_sockets_and_fast_open_sends_are_decided_like_connects") {
        return;
    }
    let w = world("esc-tcp", &config("REGISTRY_ONLY", "", ""));
    for how in ["mark", "fastopen"] {
        for addr in [EXT_V4.to_string(), EXT_V6.to_string()] {
            let out = w.py(TCP_TRICKS, &[how, &addr, "8080"]);
            assert_eq!(out, "errno 1", "{how} {addr}");
        }
    }
}
