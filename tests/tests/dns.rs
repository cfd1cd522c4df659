//! DNS capture on a node: a pod's queries (UDP and TCP to port 53) reach the agent's DNS server
//! in the pod's own network namespace, which forwards them to the nameserver the client asked,
//! from the pod's namespace. The nameserver is Debian's dnsmasq in the node's ext namespace
//! (198.19.0.2) serving stand-in names; the clients are dig (connected UDP, TCP), glibc's
//! resolver through `getent ahosts` (connected UDP) and Python's socket module for
//! unconnected UDP (sendto/recvfrom), which checks where the reply came from.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
};

use egress_tests::{
    Agent, ConnLine, NodeOpts, Servers, TempDir, checked, egress_bin, eventually,
    l7::StandIns,
    node::{EXT_V4, Node, Pod},
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

/// dnsmasq serving `NAME` on 198.19.0.2:53 in the ext namespace, logging every query with its
/// source to a file; stopped on drop.
struct Upstream {
    child: Child,
    log: PathBuf,
}

impl Upstream {
    /// With `extra` arguments too (more records).
    fn start(node: &Node, dir: &TempDir, extra: &[String]) -> Upstream {
        let log = dir.path().join("dnsmasq.log");
        let child = node
            .ext()
            .command("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--user=root",
                "--pid-file=",
                "--port=53",
                "--log-queries",
            ])
            .arg(format!("--listen-address={EXT_V4}"))
            .arg(format!("--host-record={NAME},{NAME_V4}"))
            .arg(format!("--log-facility={}", log.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting dnsmasq (Debian's dnsmasq-base: cargo xtask setup)");
        let up = Upstream { child, log };
        assert!(
            eventually(10, || up.log().contains("started")),
            "dnsmasq did not start: {}",
            up.log()
        );
        up
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether dnsmasq logged a query of `qtype` for `NAME` from `from`.
    fn saw(&self, qtype: &str, from: IpAddr) -> bool {
        self.log()
            .lines()
            .any(|l| l.contains(&format!("query[{qtype}] {NAME} from {from}")))
    }

    /// How many queries it logged so far.
    fn queries(&self) -> usize {
        self.log().lines().filter(|l| l.contains("query[")).count()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node agent with egress-cni chained, one pod, and the upstream nameserver. Dropped pods
/// first, then the agent and the nameserver.
struct World {
    pod: Pod,
    /// Kept for its pods and namespaces, which go with it.
    _node: Node,
    agent: Agent,
    upstream: Upstream,
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
/// and whose nameserver `dnsmasq_args` too.
fn world_full(
    tag: &str,
    config: &str,
    namespace: &str,
    agent_args: &[&str],
    dnsmasq_args: &[String],
) -> World {
    let dir = TempDir::new(tag);
    let agent = Agent::start_node(NodeOpts {
        config,
        state_file: &dir.path().join("workloads.json"),
        admin_socket: &dir.path().join("admin.sock"),
        extra: agent_args.iter().map(|a| a.to_string()).collect(),
    });
    let bin = egress_bin().parent().unwrap().to_path_buf();
    let node = Node::builder(tag)
        .cni_dir(bin)
        .chain(json!({"type": "egress-cni", "adminSocket": dir.path().join("admin.sock")}))
        .build();
    let pod = node.add_pod(namespace, "client");
    let upstream = Upstream::start(&node, &dir, dnsmasq_args);
    World {
        pod,
        _node: node,
        agent,
        upstream,
        dir,
        resolv_extra: Default::default(),
    }
}

impl World {
    /// `program ARGS` in the pod, with /etc/resolv.conf naming the upstream only (a mount
    /// namespace of its own with the file bind-mounted); its standard output.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let resolv = self.dir.path().join("resolv.conf");
        std::fs::write(
            &resolv,
            format!(
                "nameserver {EXT_V4}\n{}options timeout:2 attempts:1\n",
                self.resolv_extra.borrow()
            ),
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

    /// Add `lines` to the pod's resolv.conf.
    fn write_resolv(&self, lines: &str) {
        self.resolv_extra.borrow_mut().push_str(lines);
    }

    /// The DNS access record of the first query for `name` (with the trailing dot).
    fn record_for(&self, name: &str) -> ConnLine {
        self.agent
            .wait_record("dns", name, |r| r.get("query_name") == name)
    }

    fn dig(&self, extra: &[&str]) -> String {
        let mut args = vec!["+time=3", "+tries=1", "+short", NAME, "A"];
        args.extend_from_slice(extra);
        self.run("dig", &args)
    }

    /// The access record of a `protocol` query for `NAME` of `qtype`.
    fn record(&self, protocol: &str, qtype: &str) -> ConnLine {
        self.agent
            .wait_record("dns", &format!("{protocol} {qtype} {NAME}"), |r| {
                r.get("protocol") == protocol
                    && r.get("query_type") == qtype
                    && r.get("query_name") == format!("{NAME}.")
            })
    }
}

/// Sends a query for NAME with sendto() on an unconnected socket (IPv4, or IPv6 to the
/// nameserver's IPv4-mapped address), then prints where recvfrom() says the reply came from,
/// its ID matching, and its answer's address.
const UNCONNECTED: &str = r#"
import socket, struct, sys
family, ns = (socket.AF_INET6, "::ffff:" + sys.argv[1]) if sys.argv[2] == "6" else (socket.AF_INET, sys.argv[1])
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
    assert!(w.upstream.saw("A", pod_ip), "{}", w.upstream.log());

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
    assert!(w.upstream.saw("AAAA", pod_ip), "{}", w.upstream.log());

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

/// Names the registry owns: an HTTP entry by host (an address allocated for it, in a range of
/// the test's own), an HTTP entry with its address. (A TCP entry by host gets none: its
/// addresses are learnt from the nameserver's answers.)
const REGISTRY: &str = "apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: node}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  interception: {includeOutboundIPRanges: \"*\"}
  autoAllocate: {ipv4Range: 198.18.200.0/24, ipv6Range: \"2001:db8:240::/48\"}
---
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
";

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
    let short = |args: &[&str]| {
        let mut a = vec!["+time=3", "+tries=1", "+short"];
        a.extend_from_slice(args);
        w.run("dig", &a).trim().to_owned()
    };
    // The allocated address, from the agent, over UDP with and without EDNS and over TCP.
    assert_eq!(short(&["db.example", "A"]), v4);
    assert_eq!(short(&["+noedns", "db.example", "A"]), v4);
    assert_eq!(short(&["+tcp", "db.example", "A"]), v4);
    // An entry's own address.
    assert_eq!(short(&["api.example", "A"]), "198.19.0.81");
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
    assert_eq!(short(&[NAME, "A"]), NAME_V4.to_string());
    assert!(w.upstream.queries() > before);
    let rec = w
        .agent
        .wait_record("dns", "the agent's answer for db.example", |r| {
            r.get("query_name") == "db.example." && r.get("protocol") == "udp"
        });
    assert_eq!(rec.get("answered_by"), "agent", "{rec:?}");
}

/// A TCP ServiceEntry by host, resolved by DNS: no address is allocated for it, and no address
/// on its port is allowed but those the workload was answered for it.
const TCP_HOST: &str = "apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: node}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  interception: {includeOutboundIPRanges: \"*\"}
  autoAllocate: {ipv4Range: 198.18.200.0/24, ipv6Range: \"2001:db8:240::/48\"}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: team-a}
spec:
  hosts: [db.example]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: DNS
";

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
    // dnsmasq answers db.example with TTL 1; the agent keeps learnt addresses 2 s past it.
    let records = [
        format!("--host-record=db.example,{EXT_V4}"),
        "--local-ttl=1".to_owned(),
    ];
    let w = world_full(
        "dnslearn",
        TCP_HOST,
        "team-a",
        &["--dns-grace", "2s"],
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
    // No address was allocated: the name is the nameserver's to answer.
    let dump = w.agent.config_dump();
    assert!(
        dump["allocated"].get("ServiceEntry team-a/db").is_none(),
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
    // The same address, from the same workload, after the TTL and the grace: refused again.
    std::thread::sleep(std::time::Duration::from_millis(3500));
    assert_eq!(connect(&EXT_V4.to_string()), "errno EPERM");
    let metrics = w.agent.metrics();
    assert!(metrics.contains("egress_dns_learned_entries"), "{metrics}");
    let _ = echo;
}

/// Istio's "Kubernetes Services for Egress Traffic": an ExternalName Service for httpbin.org,
/// with a DestinationRule that sends plain HTTP.
const MY_HTTPBIN: &str = "---
apiVersion: v1
kind: Service
metadata:
  name: my-httpbin
  namespace: default
spec:
  type: ExternalName
  externalName: httpbin.org
  ports:
  - name: http
    protocol: TCP
    port: 80
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: my-httpbin
  namespace: default
spec:
  host: my-httpbin.default.svc.cluster.local
  trafficPolicy:
    tls:
      mode: DISABLE
";

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
