//! Node mode: one agent (`egress run --node`) serves every pod of a node, each pod in a network
//! namespace of its own, enrolled by `egress-cni` chained after the pod network's plugins
//! (Debian's bridge and host-local, run as a runtime runs them). Stand-ins for external
//! services live in the node's ext namespace (198.19.0.2, 2001:db8:2::2).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use egress_tests::{
    Agent, Cgroup, ConnLine, NodeOpts, Servers, TempDir, checked, egress_bin, eventually,
    l7::{StandIns, TestCa, curl_with},
    node::{CniCommand, EXT_V4, EXT_V6, Node, Pod},
    privileged, probe,
};
use serde_json::json;

/// Every destination captured, ALLOW_ANY unless a Sidecar says otherwise.
const MESH: &str = "apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: node}
spec:
  outboundTrafficPolicy: {mode: ALLOW_ANY}
  interception: {includeOutboundIPRanges: \"*\"}
";

/// A node whose pods egress-cni enrols with a node agent. Dropped in this order: the pods
/// (DEL through egress-cni), the agent, then its state directory.
struct Cluster {
    node: Node,
    agent: Agent,
    dir: TempDir,
}

impl Cluster {
    fn new(tag: &str, config: &str) -> Cluster {
        let dir = TempDir::new(tag);
        let agent = start_agent(&dir, config);
        let node = Node::builder(tag)
            .cni_dir(bin_dir())
            .chain(json!({"type": "egress-cni", "adminSocket": dir.path().join("admin.sock")}))
            .build();
        Cluster { node, agent, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }
}

fn start_agent(dir: &TempDir, config: &str) -> Agent {
    Agent::start_node(NodeOpts {
        config,
        state_file: &dir.path().join("workloads.json"),
        admin_socket: &dir.path().join("admin.sock"),
        extra: vec![],
    })
}

/// Where `egress` and `egress-cni` were built.
fn bin_dir() -> PathBuf {
    egress_bin().parent().unwrap().to_path_buf()
}

fn label(pod: &Pod) -> String {
    format!("{}/{}", pod.sandbox.namespace, pod.sandbox.name)
}

fn pod_ip(pod: &Pod, v6: bool) -> IpAddr {
    if v6 { pod.ipv6.into() } else { pod.ipv4.into() }
}

/// `egress ARGS` against the cluster's agent, which must succeed: its standard output.
fn egress(c: &Cluster, args: &[&str]) -> String {
    let sock = c.socket();
    let mut cmd = Command::new(egress_bin());
    cmd.args(args);
    if !args.contains(&"--admin-socket") {
        cmd.arg("--admin-socket").arg(&sock);
    }
    checked(&mut cmd)
}

/// The access record of the connection `pod` made from `local` to `dst`.
fn record(c: &Cluster, pod: &Pod, local: SocketAddr, dst: SocketAddr) -> ConnLine {
    let who = label(pod);
    c.agent.wait_conn(&format!("{who} to {dst}"), |r| {
        r.get("workload") == who
            && r.get("peer") == local.to_string()
            && r.get("orig_dst") == dst.to_string()
    })
}

#[test]
fn pods_connect_through_the_agent_from_their_own_addresses() {
    if !privileged("pods_connect_through_the_agent_from_their_own_addresses") {
        return;
    }
    let c = Cluster::new("via", MESH);
    let a = c.node.add_pod("team-a", "client-a");
    let b = c.node.add_pod("team-b", "client-b");
    let servers = Servers::new();
    for v6 in [false, true] {
        let ip: IpAddr = if v6 { EXT_V6.into() } else { EXT_V4.into() };
        let echo = servers.echo_on(c.node.ext().listen(SocketAddr::new(ip, 0)));
        for pod in [&a, &b] {
            let r = pod.probe(&["echo", &echo.to_string(), "1000"]);
            assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
            // The pod dialled the stand-in and reached the agent on its own loopback.
            assert!(r.local().ip().is_loopback(), "{r:?}");
            let rec = record(&c, pod, r.local(), echo);
            assert_eq!(rec.get("reason"), "included-cidr");
            assert_eq!(
                (rec.get("bytes_up"), rec.get("bytes_down")),
                ("1000", "1000")
            );
            // The agent connected from the pod's namespace: the stand-in saw the pod.
            let up: SocketAddr = rec.get("upstream_local").parse().unwrap();
            assert_eq!(up.ip(), pod_ip(pod, v6), "{}: {rec:?}", label(pod));
            let seen = servers.wait_from(up);
            assert_eq!((seen.local, seen.received), (echo, 1000), "{seen:?}");
        }
    }
    // One agent process served both pods; `egress workloads` names them with counters.
    let list = egress(&c, &["workloads"]);
    for pod in [&a, &b] {
        let line = list
            .lines()
            .find(|l| l.starts_with(&format!("{} ", label(pod))))
            .unwrap_or_else(|| panic!("{} not listed: {list}", label(pod)));
        assert!(line.contains("redirect=2"), "{line}");
        assert!(line.contains(&pod.sandbox.container_id), "{line}");
    }
    let stats = egress(
        &c,
        &[
            "stats",
            "--pin-path",
            c.agent.pin.to_str().unwrap(),
            "--workload",
            &label(&a),
        ],
    );
    assert!(
        stats.starts_with(&format!("workload {}", label(&a))),
        "{stats}"
    );
    // In all, the counters are followed by each workload's share, by name.
    let all = egress(&c, &["stats", "--pin-path", c.agent.pin.to_str().unwrap()]);
    for pod in [&a, &b] {
        assert!(all.contains(&format!("\n{} netns=", label(pod))), "{all}");
    }
    assert!(
        stats
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["redirect", "included-cidr", "2"]),
        "{stats}"
    );
}

#[test]
fn pods_http_hosts_tls_names_and_timeouts_are_mediated() {
    if !privileged("pods_http_hosts_tls_names_and_timeouts_are_mediated") {
        return;
    }
    let config = format!(
        "{}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web.example]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: default}}
spec:
  hosts: [secure.example]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web.example]
  http:
  - match: [{{uri: {{prefix: /delay}}}}]
    timeout: 1s
    route: [{{destination: {{host: web.example}}}}]
  - route: [{{destination: {{host: web.example}}}}]
",
        MESH.replace("ALLOW_ANY", "REGISTRY_ONLY")
    );
    let c = Cluster::new("l7", &config);
    let pod = c.node.add_pod("shop", "frontend");
    let ca = TestCa::new("node-l7");
    let stand = StandIns::new();
    let ext = c.node.ext();
    stand.http_on(ext.listen(SocketAddr::from((EXT_V4, 80))));
    stand.https_on(
        ext.listen(SocketAddr::from((EXT_V4, 443))),
        ca.server_config(&["secure.example"]),
    );
    let curl = |args: &[&str]| curl_with(pod.command("curl"), args);

    let ok = curl(&[
        "--resolve",
        "web.example:80:198.19.0.2",
        "http://web.example/hello",
    ]);
    assert_eq!(ok.status, 200, "{ok:?}");
    let hit = &stand.hits_for("/hello")[0];
    assert_eq!(
        (hit.host.as_str(), hit.peer.ip()),
        ("web.example", pod.ipv4.into())
    );
    let req = c
        .agent
        .wait_record("request", "the request", |r| r.get("path") == "/hello");
    assert_eq!(req.get("workload"), label(&pod));
    assert_eq!(req.get("matched"), "ServiceEntry default/web");

    let no = curl(&[
        "--resolve",
        "other.example:80:198.19.0.2",
        "http://other.example/",
    ]);
    assert_eq!(no.status, 502, "{no:?}");
    assert!(
        no.body.contains("\"other.example\" is not registered"),
        "{no:?}"
    );

    let tls = curl(&[
        "--cacert",
        ca.path().to_str().unwrap(),
        "--resolve",
        "secure.example:443:198.19.0.2",
        "https://secure.example/tls",
    ]);
    assert_eq!(tls.status, 200, "{tls:?}");
    let hit = &stand.hits_for("/tls")[0];
    assert_eq!(hit.sni.as_deref(), Some("secure.example"));
    assert_eq!(hit.peer.ip(), IpAddr::from(pod.ipv4));

    let slow = curl(&[
        "--resolve",
        "web.example:80:198.19.0.2",
        "http://web.example/delay/5",
    ]);
    assert_eq!(slow.status, 504, "{slow:?}");
    assert!(slow.elapsed < Duration::from_secs(4), "{slow:?}");
}

#[test]
fn namespaces_get_their_sidecars_mode_and_the_entries_exported_to_them() {
    if !privileged("namespaces_get_their_sidecars_mode_and_the_entries_exported_to_them") {
        return;
    }
    let servers = Servers::new();
    let config = |db: u16| {
        format!(
            "{MESH}---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: team-a}}
spec: {{outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: team-b}}
spec: {{outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: team-c}}
spec: {{outboundTrafficPolicy: {{mode: ALLOW_ANY}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: team-b}}
spec:
  hosts: [db.example]
  addresses: [198.19.0.2, \"2001:db8:2::2\"]
  ports: [{{number: {db}, name: tcp, protocol: TCP}}]
  resolution: NONE
  exportTo: [\".\"]
"
        )
    };
    // Both stand-ins listen in ext, which exists once the node does; then the ServiceEntry
    // names the second one's port (a reload re-points every workload's policy).
    let c = Cluster::new("policy", &config(1));
    let other = servers.echo_on(c.node.ext().listen(SocketAddr::from((EXT_V4, 0))));
    let db = servers.echo_on(c.node.ext().listen(SocketAddr::from((EXT_V4, 0))));
    let db6 = servers.echo_on(c.node.ext().listen(SocketAddr::from((EXT_V6, db.port()))));
    c.agent.write_config(&config(db.port()));
    c.agent.wait_log(0, "applied configuration generation 2");
    let a = c.node.add_pod("team-a", "client-a");
    let b = c.node.add_pod("team-b", "client-b");
    let free = c.node.add_pod("team-c", "client-c");
    let errno = |pod: &Pod, dst: &str| {
        let r = pod.probe(&["echo", dst, "10"]);
        match r.get("match").as_deref() {
            Some("true") => 0,
            _ => r
                .get("errno")
                .and_then(|e| e.parse().ok())
                .unwrap_or_else(|| panic!("{dst}: {r:?}")),
        }
    };
    let other = other.to_string();
    let db_mapped = format!("[::ffff:198.19.0.2]:{}", db.port());
    let other_mapped = format!("[::ffff:198.19.0.2]:{}", other.rsplit(':').next().unwrap());
    // An unregistered destination: refused at connect() for team-a, passed for team-c.
    assert_eq!(errno(&a, &other), libc::EPERM, "team-a to {other}");
    assert_eq!(errno(&free, &other), 0, "team-c to {other}");
    // An entry exported to team-b only: team-b's connects go straight out, team-a's fail.
    assert_eq!(errno(&b, &db.to_string()), 0);
    assert_eq!(errno(&b, &db6.to_string()), 0);
    assert_eq!(errno(&a, &db.to_string()), libc::EPERM);
    assert_eq!(errno(&a, &db6.to_string()), libc::EPERM);
    // IPv4 on an IPv6 socket follows the IPv4 rules, for each workload.
    assert_eq!(errno(&b, &db_mapped), 0);
    assert_eq!(errno(&a, &db_mapped), libc::EPERM);
    assert_eq!(errno(&a, &other_mapped), libc::EPERM);
    assert_eq!(errno(&free, &other_mapped), 0);
    let rec = c.agent.wait_conn("team-b's direct connection", |r| {
        r.get("workload") == label(&b) && r.get("orig_dst") == db.to_string()
    });
    assert_eq!(rec.get("reason"), "tcp-entry");
    assert_eq!(rec.get("matched"), "ServiceEntry team-b/db");

    let explain = |pod: &Pod, dst: &str| {
        egress(
            &c,
            &[
                "explain",
                "--pin-path",
                c.agent.pin.to_str().unwrap(),
                "--workload",
                &label(pod),
                dst,
            ],
        )
        .trim_end()
        .to_owned()
    };
    assert!(
        explain(&a, &other).ends_with("[registry-denied]"),
        "{}",
        explain(&a, &other)
    );
    assert!(explain(&b, &db.to_string()).ends_with("[tcp-entry]"));
    assert!(explain(&a, &db.to_string()).ends_with("[registry-denied]"));
    assert!(explain(&free, &other).ends_with("[included-cidr]"));
}

#[test]
fn loopback_marks_and_namespaces_that_are_not_enrolled() {
    if !privileged("loopback_marks_and_namespaces_that_are_not_enrolled") {
        return;
    }
    let c = Cluster::new("edges", &MESH.replace("ALLOW_ANY", "REGISTRY_ONLY"));
    let pod = c.node.add_pod("default", "client");
    let servers = Servers::new();
    // The pod's own 127.0.0.1 service (a local cache, a sidecar): never captured.
    let local = servers.echo_on(pod.sandbox.netns.listen("127.0.0.1:0".parse().unwrap()));
    let r = pod.probe(&["echo", &local.to_string(), "100"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    // Its own pod address is reached through loopback too.
    let own = servers.echo_on(
        pod.sandbox
            .netns
            .listen(SocketAddr::new(pod.ipv4.into(), 0)),
    );
    let r = pod.probe(&["echo", &own.to_string(), "100"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    let ext = servers.echo_on(c.node.ext().listen(SocketAddr::from((EXT_V4, 0))));
    // Denied: unregistered under REGISTRY_ONLY ...
    let r = pod.probe(&["echo", &ext.to_string(), "10"]);
    assert_eq!(r.get("errno").as_deref(), Some("1"), "{r:?}");
    // ... also for a root process that marks its socket as the agent's used to be marked.
    let r = pod.probe(&["--mark", "1337", "echo", &ext.to_string(), "10"]);
    assert_eq!(r.get("errno").as_deref(), Some("1"), "{r:?}");
    let stats = egress(
        &c,
        &[
            "stats",
            "--pin-path",
            c.agent.pin.to_str().unwrap(),
            "--workload",
            &label(&pod),
        ],
    );
    let count = |reason: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(1) == Some(&reason)).then(|| f[2].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("{reason}: {stats}"))
    };
    assert_eq!(
        (count("loopback"), count("registry-denied")),
        (2, 2),
        "{stats}"
    );

    // A namespace that was never enrolled: left alone (the stand-in sees the probe's own
    // socket), and counted.
    let plain = Node::new("plain");
    let outsider = plain.add_pod("default", "outsider");
    let echo = servers.echo_on(plain.ext().listen(SocketAddr::from((EXT_V4, 0))));
    let before = c.agent.stats()["not-enrolled"];
    let r = outsider.probe(&["echo", &echo.to_string(), "10"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    let seen = servers.wait_from(r.local());
    assert_eq!(seen.received, 10);
    assert!(c.agent.stats()["not-enrolled"] > before);
    assert!(
        !egress(&c, &["workloads"]).contains("outsider"),
        "never enrolled"
    );
}

/// The agent's open descriptors: (all, sockets, network namespaces).
fn agent_fds(pid: u32) -> (usize, usize, usize) {
    let mut all = 0;
    let (mut sockets, mut netns) = (0, 0);
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        all += 1;
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        sockets += usize::from(t.starts_with("socket:"));
        netns += usize::from(t.starts_with("net:"));
    }
    (all, sockets, netns)
}

/// Entries of a pinned hash map of the agent.
fn map_entries(agent: &Agent, name: &str) -> usize {
    use aya::maps::{HashMap, Map, MapData};
    let data = MapData::from_pin(agent.pin.join(name)).unwrap();
    let map: HashMap<_, u64, egress_common::Workload> =
        HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
    map.keys().count()
}

#[test]
fn two_hundred_pods_come_and_go_and_the_agent_holds_nothing_of_them() {
    if !privileged("two_hundred_pods_come_and_go_and_the_agent_holds_nothing_of_them") {
        return;
    }
    let c = Cluster::new("churn", MESH);
    let servers = Servers::new();
    let echo = servers.echo_on(c.node.ext().listen(SocketAddr::from((EXT_V4, 0))));
    // One pod first, so that everything the agent keeps once (runtime, pools) exists.
    let first = c.node.add_pod("default", "warm");
    let r = first.probe(&["echo", &echo.to_string(), "10"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    c.node.remove_pod(&first);
    let pid = c.agent.pid();
    let base = agent_fds(pid);
    let base_entries = map_entries(&c.agent, egress_common::MAP_WORKLOADS);
    let started = Instant::now();
    for i in 0..200 {
        let pod = c.node.add_pod("default", &format!("churn-{i}"));
        if i % 20 == 0 {
            // Some of them carry a connection through the agent before they go.
            let r = pod.probe(&["echo", &echo.to_string(), "10"]);
            assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
            assert_eq!(
                map_entries(&c.agent, egress_common::MAP_WORKLOADS),
                base_entries + 1
            );
        }
        c.node.remove_pod(&pod);
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "too slow: {i} cycles"
        );
    }
    let settled = eventually(10, || agent_fds(pid) == base);
    assert!(
        settled,
        "descriptors {base:?} before, {:?} after",
        agent_fds(pid)
    );
    assert_eq!(
        map_entries(&c.agent, egress_common::MAP_WORKLOADS),
        base_entries
    );
    assert!(egress(&c, &["workloads"]).is_empty());
    // No deleted namespace is still held: the only one is the agent's own.
    assert_eq!(agent_fds(pid).2, base.2);
    let held: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .filter(|t| t.starts_with("net:"))
        .collect();
    assert!(held.len() <= 1, "namespaces held: {held:?}");
}

#[test]
fn the_cni_plugin_fails_closed_and_tells_enrolled_from_not() {
    if !privileged("the_cni_plugin_fails_closed_and_tells_enrolled_from_not") {
        return;
    }
    let c = Cluster::new("cni", MESH);
    let pod = c.node.add_pod("default", "checked");
    let check = c.node.cni(CniCommand::Check, &pod);
    assert!(check.success(), "{check}");
    egress(&c, &["unenroll", "--workload", &label(&pod)]);
    let check = c.node.cni(CniCommand::Check, &pod);
    assert!(!check.success(), "CHECK passed for a released pod: {check}");
    assert_eq!(check.plugin, "egress-cni", "{check}");
    assert!(
        check.json()["msg"]
            .as_str()
            .unwrap()
            .contains("not enrolled"),
        "{check}"
    );

    // The agent goes away: ADD fails and says what it could not reach; DEL succeeds.
    let Cluster { node, agent, dir } = c;
    drop(agent);
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        node.add_pod("default", "unmediated")
    }));
    let msg = match err {
        Ok(_) => panic!("a pod was added while the agent was down"),
        Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(msg.contains("egress-cni"), "{msg}");
    assert!(msg.contains("not reachable"), "{msg}");
    assert!(
        msg.contains(&dir.path().join("admin.sock").display().to_string()),
        "{msg}"
    );
    let del = node.cni(CniCommand::Del, &pod);
    assert!(del.success(), "DEL failed with the agent down: {del}");
    drop(node);
}

#[test]
fn enrolments_outlive_a_restart_and_pods_gone_meanwhile_are_dropped() {
    if !privileged("enrolments_outlive_a_restart_and_pods_gone_meanwhile_are_dropped") {
        return;
    }
    let config = MESH.replace("ALLOW_ANY", "REGISTRY_ONLY");
    let c = Cluster::new("restart", &config);
    let kept = c.node.add_pod("default", "kept");
    let gone = c.node.add_pod("default", "gone");
    let servers = Servers::new();
    let ext = servers.echo_on(c.node.ext().listen(SocketAddr::from((EXT_V4, 0))));
    let denied = |pod: &Pod| pod.probe(&["echo", &ext.to_string(), "10"]).get("errno");
    assert_eq!(denied(&kept).as_deref(), Some("1"));
    let Cluster { node, agent, dir } = c;
    drop(agent);
    // While the agent is down, one pod is deleted without a DEL reaching the agent.
    node.delete_netns(&gone);
    let agent = start_agent(&dir, &config);
    let c = Cluster { node, agent, dir };
    c.agent.wait_log(0, "dropped default/gone");
    assert_eq!(
        denied(&kept).as_deref(),
        Some("1"),
        "interception after the restart"
    );
    let list = egress(&c, &["workloads"]);
    assert!(list.starts_with("default/kept "), "{list}");
    assert_eq!(list.lines().count(), 1, "{list}");
}

#[test]
fn a_namespace_that_existed_before_the_agent_is_enrolled_by_hand() {
    if !privileged("a_namespace_that_existed_before_the_agent_is_enrolled_by_hand") {
        return;
    }
    // A pod of a plain node (no egress-cni), made before the agent starts.
    let plain = Node::new("byhand");
    let pod = plain.add_pod("legacy", "old");
    let servers = Servers::new();
    let echo = servers.echo_on(plain.ext().listen(SocketAddr::from((EXT_V4, 0))));
    let dir = TempDir::new("byhand");
    let agent = start_agent(&dir, MESH);
    let sock = dir.path().join("admin.sock");
    let path = pod.sandbox.netns.path();
    let out = checked(
        Command::new(egress_bin())
            .args(["enroll", path.to_str().unwrap(), "--workload", "legacy/old"])
            .args([
                "--nameserver",
                "198.19.0.2",
                "--nameserver",
                "2001:db8:2::2",
            ])
            .arg("--admin-socket")
            .arg(&sock),
    );
    assert!(out.contains("enrolled legacy/old"), "{out}");
    // Its nameservers, as given, in the listing.
    let listed = checked(
        Command::new(egress_bin())
            .arg("workloads")
            .arg("--admin-socket")
            .arg(&sock),
    );
    assert!(
        listed.contains(" nameservers=198.19.0.2,2001:db8:2::2 "),
        "{listed}"
    );
    let r = pod.probe(&["echo", &echo.to_string(), "100"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    let rec = agent.wait_conn("the enrolled pod's connection", |r| {
        r.get("workload") == "legacy/old"
    });
    let up: SocketAddr = rec.get("upstream_local").parse().unwrap();
    assert_eq!(up.ip(), IpAddr::from(pod.ipv4));
    // Released by hand: left alone again.
    let out = checked(
        Command::new(egress_bin())
            .args(["unenroll", path.to_str().unwrap()])
            .arg("--admin-socket")
            .arg(&sock),
    );
    assert!(out.contains("released legacy/old"), "{out}");
    let r = pod.probe(&["echo", &echo.to_string(), "10"]);
    assert_eq!(servers.wait_from(r.local()).received, 10, "{r:?}");
    // A path that is not a network namespace is refused, naming it.
    let o = Command::new(egress_bin())
        .args([
            "enroll",
            "/etc/hostname",
            "--workload",
            "legacy/x",
            "--admin-socket",
        ])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/etc/hostname is not a network namespace"),
        "{err}"
    );
    // A nameserver that is not an IP address is refused before the agent is asked.
    let o = Command::new(egress_bin())
        .args(["enroll", path.to_str().unwrap(), "--workload", "legacy/old"])
        .args(["--nameserver", "dns.example", "--admin-socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--nameserver"), "{err}");
    drop(agent);
}

#[test]
fn included_ports_and_ranges_decide_outside_loopback() {
    if !privileged("included_ports_and_ranges_decide_outside_loopback") {
        return;
    }
    // The ext namespace is the node's own: fixed ports cannot collide there.
    let config = "apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: node}
spec:
  interception:
    includeOutboundIPRanges: \"198.19.0.128/25\"
    includeOutboundPorts: [8443]
";
    let c = Cluster::new("ports", config);
    let pod = c.node.add_pod("default", "client");
    let servers = Servers::new();
    let by_port = servers.echo_on(c.node.ext().listen(SocketAddr::from((EXT_V4, 8443))));
    let outside = servers.echo_on(c.node.ext().listen(SocketAddr::from((EXT_V4, 9000))));

    // Outside the included ranges, on an included port: through the agent.
    let r = pod.probe(&["echo", &by_port.to_string(), "30"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    let rec = record(&c, &pod, r.local(), by_port);
    assert_eq!(rec.get("reason"), "included-port");
    // Outside both: the pod's own socket reaches the server, the agent never sees it.
    let r = pod.probe(&["echo", &outside.to_string(), "20"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    assert_eq!(r.local().ip(), IpAddr::from(pod.ipv4));
    assert_eq!(servers.wait_from(r.local()).received, 20);
    assert!(
        c.agent
            .conns()
            .iter()
            .all(|l| l.get("orig_dst") != outside.to_string())
    );
    let stats = egress(
        &c,
        &[
            "stats",
            "--pin-path",
            c.agent.pin.to_str().unwrap(),
            "--workload",
            &label(&pod),
        ],
    );
    for want in [
        ["redirect", "included-port", "1"],
        ["bypass", "not-included", "1"],
    ] {
        assert!(
            stats
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == want),
            "{want:?}: {stats}"
        );
    }
}

#[test]
fn on_a_node_the_agents_own_namespace_is_intercepted_only_in_the_cgroup_named() {
    if !privileged("on_a_node_the_agents_own_namespace_is_intercepted_only_in_the_cgroup_named") {
        return;
    }
    let cg = Cgroup::new("node-own");
    let dir = TempDir::new("node-own");
    let agent = Agent::start_node(NodeOpts {
        config: "apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: node}
spec:
  interception: {includeOutboundIPRanges: [127.20.0.0/16]}
",
        state_file: &dir.path().join("workloads.json"),
        admin_socket: &dir.path().join("admin.sock"),
        extra: vec!["--cgroup".to_owned(), cg.path.display().to_string()],
    });
    let servers = Servers::new();
    let echo = servers.echo("127.20.0.77:0".parse().unwrap());
    // In the cgroup: through the agent, as the workload of the agent's own namespace.
    let r = probe(Some(&cg), &["echo", &echo.to_string(), "10"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    let rec = agent.wait_conn("the cgroup's connection", |l| {
        l.get("peer") == r.local().to_string()
    });
    assert_eq!(rec.get("workload"), "default/egress");
    // The node's other processes in that namespace: left alone, counted.
    let before = agent.stats()["not-enrolled"];
    let r = probe(None, &["echo", &echo.to_string(), "10"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    assert_eq!(servers.wait_from(r.local()).received, 10);
    // (Every other connect of the machine runs a node agent's hook too: at least this one.)
    assert!(agent.stats()["not-enrolled"] > before);
}

#[test]
fn metrics_count_what_the_pods_did_under_istios_names_and_labels() {
    if !privileged("metrics_count_what_the_pods_did_under_istios_names_and_labels") {
        return;
    }
    let ext_v4 = EXT_V4.to_string();
    let config = format!(
        "{}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web.example]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: cache, namespace: default}}
spec:
  hosts: [cache.example]
  ports: [{{number: 6379, name: redis, protocol: TCP}}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db.example]
  addresses: [{ext_v4}/32]
  ports: [{{number: 5432, name: pg, protocol: TCP}}]
  resolution: NONE
",
        MESH.replace("ALLOW_ANY", "REGISTRY_ONLY")
    );
    let c = Cluster::new("metrics", &config);
    let pod = c.node.add_pod("shop", "frontend");
    let ext = c.node.ext();
    let stand = StandIns::new();
    stand.http_on(ext.listen(SocketAddr::from((EXT_V4, 80))));
    let servers = Servers::new();
    let cache = servers.echo_on(ext.listen(SocketAddr::from((EXT_V4, 6379))));
    let db = servers.echo_on(ext.listen(SocketAddr::from((EXT_V4, 5432))));
    let curl = |url: &str, host: &str| {
        let resolve = format!("{host}:80:{EXT_V4}");
        curl_with(pod.command("curl"), &["--resolve", &resolve, url]).status
    };
    for _ in 0..2 {
        assert_eq!(curl("http://web.example/hello", "web.example"), 200);
    }
    assert_eq!(curl("http://other.example/", "other.example"), 502);
    // A TCP port declared without addresses: through the agent; one with an address: straight
    // out, accounted by the kernel; an address no entry declares: refused at connect.
    for (dst, reason) in [(cache, "registry-allowed"), (db, "tcp-entry")] {
        let r = pod.probe(&["echo", &dst.to_string(), "1000"]);
        assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
        c.agent.wait_conn(&format!("the connection to {dst}"), |l| {
            l.get("orig_dst") == dst.to_string() && l.get("reason") == reason
        });
    }
    let denied = pod.probe(&["echo", &format!("{EXT_V4}:9999"), "10"]);
    assert_eq!(denied.get("errno").as_deref(), Some("1"), "{denied:?}");
    let requests = c
        .agent
        .wait_record("request", "three requests", |r| r.get("status") == "502");
    assert_eq!(requests.get("workload"), "shop/frontend");

    let page = c.agent.metrics();
    let pod_labels = [
        ("reporter", "source"),
        ("source_workload", "frontend"),
        ("source_workload_namespace", "shop"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut l = pod_labels.to_vec();
        l.extend_from_slice(extra);
        l
    };
    let m = |name: &str, labels: &[(&str, &str)]| egress_tests::metric(&page, name, labels);
    let web = with(&[
        ("destination_service", "web.example"),
        ("response_code", "200"),
    ]);
    assert_eq!(m("istio_requests_total", &web), 2.0, "{page}");
    assert_eq!(
        m("istio_request_duration_milliseconds_count", &web),
        2.0,
        "{page}"
    );
    let black_hole = with(&[
        ("destination_service", "BlackHoleCluster"),
        ("response_code", "502"),
    ]);
    assert_eq!(m("istio_requests_total", &black_hole), 1.0, "{page}");
    for service in ["cache.example", "db.example"] {
        let tcp = with(&[
            ("destination_service", service),
            ("request_protocol", "tcp"),
        ]);
        for (name, want) in [
            ("istio_tcp_connections_opened_total", 1.0),
            ("istio_tcp_connections_closed_total", 1.0),
            ("istio_tcp_sent_bytes_total", 1000.0),
            ("istio_tcp_received_bytes_total", 1000.0),
        ] {
            assert_eq!(m(name, &tcp), want, "{name} {service}:\n{page}");
        }
    }
    // egress's own: the kernel's counters, the workloads, the configuration and its maps.
    let deny = [("reason", "registry-denied"), ("verdict", "deny")];
    assert_eq!(m("egress_connects_total", &deny), 1.0, "{page}");
    assert_eq!(m("egress_workloads_enrolled", &[]), 1.0, "{page}");
    assert_eq!(m("egress_config_generation", &[]), 1.0, "{page}");
    assert_eq!(m("egress_config_reload_failures_total", &[]), 0.0, "{page}");
    assert!(
        m("egress_map_entries", &[("map", "DIRECT_V4")]) >= 1.0,
        "{page}"
    );
    // The page is what Prometheus reads: promtool parses and lints it.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus: cargo xtask setup)");
    {
        use std::io::Write as _;
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .unwrap();
    }
    let out = promtool.wait_with_output().unwrap();
    // Exit 1 is a page that does not parse; 3 is lint findings. The one finding expected is
    // about a name Istio fixed, which dashboards query as it is.
    let findings = String::from_utf8_lossy(&out.stderr);
    let istios = "istio_request_duration_milliseconds use base unit \"seconds\"";
    assert!(
        out.status.success()
            || out.status.code() == Some(3) && findings.lines().all(|l| l.starts_with(istios)),
        "{out:?}\n{page}"
    );
    // The pod goes: so do its series (pods come and go on a node; series must not pile up).
    c.node.remove_pod(&pod);
    let page = c.agent.metrics();
    assert!(!page.contains("source_workload=\"frontend\""), "{page}");
    assert_eq!(
        egress_tests::metric(&page, "egress_workloads_enrolled", &[]),
        0.0
    );
}

#[test]
fn a_rolling_restart_hands_the_pods_over_without_a_failed_connect() {
    if !privileged("a_rolling_restart_hands_the_pods_over_without_a_failed_connect") {
        return;
    }
    let c = Cluster::new("rolling", MESH);
    let pod = c.node.add_pod("team-a", "steady");
    let servers = Servers::new();
    let echo = servers.echo_on(c.node.ext().listen(SocketAddr::from((EXT_V4, 0))));
    let dst = echo.to_string();
    // 200 connections a second for 20 s, and two 8 MiB transfers of about 6 s each, all
    // started before the new agent and through the old one.
    let load = {
        let (pod, dst) = (pod.clone(), dst.clone());
        std::thread::spawn(move || pod.probe(&["load", "20", "200", &dst]))
    };
    let long: Vec<_> = (0..2)
        .map(|_| {
            let (pod, dst) = (pod.clone(), dst.clone());
            std::thread::spawn(move || pod.probe(&["--pace", "40", "echo", &dst, "8388608"]))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let Cluster {
        node,
        agent: mut old,
        dir,
    } = c;
    let new = old.start_beside();
    new.wait_log(0, "took over 1 workloads and their listeners");
    old.wait_log(0, "handed over to a new agent: no longer accepting");
    // The rolling update then stops the old one: it drains what it relays, then exits.
    let before_stop = Instant::now();
    old.terminate();
    assert!(old.exited());
    for t in long {
        let r = t.join().unwrap();
        assert_eq!(
            r.get("match").as_deref(),
            Some("true"),
            "long transfer: {r:?}"
        );
    }
    assert!(
        old.logs().iter().all(|l| !l.contains("they are cut")),
        "the old agent cut connections ({:?} to stop):\n{}",
        before_stop.elapsed(),
        old.logs().join("\n")
    );
    let r = load.join().unwrap();
    assert_eq!(r.get("failed").as_deref(), Some("0"), "{}", r.stdout);
    let attempts: u64 = r.get("attempts").unwrap().parse().unwrap();
    assert!(attempts >= 2000, "{}", r.stdout);
    // The new agent relays the pod's connections and answers on the admin socket.
    let c = Cluster {
        node,
        agent: new,
        dir,
    };
    let r = pod.probe(&["echo", &dst, "1000"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    record(&c, &pod, r.local(), echo);
    let list = egress(&c, &["workloads"]);
    assert!(list.starts_with("team-a/steady "), "{list}");
    // The stopped agent left the new one's sockets alone: the next upgrade works as well.
    let Cluster {
        node,
        agent: mut second,
        dir,
    } = c;
    let third = second.start_beside();
    third.wait_log(0, "took over 1 workloads and their listeners");
    second.terminate();
    let c = Cluster {
        node,
        agent: third,
        dir,
    };
    let r = pod.probe(&["echo", &dst, "1000"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    record(&c, &pod, r.local(), echo);
    let list = egress(&c, &["workloads"]);
    assert!(list.starts_with("team-a/steady "), "{list}");
    // The stopped agents' guards remove the pins and sockets all shared: they go last.
    drop(c);
    drop(second);
    drop(old);
}

#[test]
fn a_stopped_node_agent_keeps_the_pods_policy_until_egress_uninstall_removes_everything() {
    if !privileged(
        "a_stopped_node_agent_keeps_the_pods_policy_until_egress_uninstall_removes_everything",
    ) {
        return;
    }
    let config = MESH.replace("ALLOW_ANY", "REGISTRY_ONLY");
    let mut c = Cluster::new("uninstall", &config);
    let pod = c.node.add_pod("default", "kept");
    let servers = Servers::new();
    let ext = servers.echo_on(c.node.ext().listen(SocketAddr::from((EXT_V4, 0))));
    let errno = |pod: &Pod| pod.probe(&["echo", &ext.to_string(), "10"]).get("errno");
    assert_eq!(errno(&pod).as_deref(), Some("1"));
    let state = c.dir.path().join("workloads.json");
    let handover = c.dir.path().join("admin.handover");
    assert!(state.exists() && handover.exists());
    // SIGTERM: a stop, not an uninstall. The pod stays under REGISTRY_ONLY.
    c.agent.terminate();
    assert_eq!(errno(&pod).as_deref(), Some("1"), "after a stop");
    let pin = c.agent.pin.clone();
    let out = checked(
        Command::new(egress_bin())
            .arg("uninstall")
            .arg("--pin-path")
            .arg(&pin)
            .arg("--state-file")
            .arg(&state)
            .arg("--admin-socket")
            .arg(c.socket()),
    );
    assert!(out.contains("detached 14 programs"), "{out}");
    // The route the agent gave the pod's namespace for its IPv6 DNS stub addresses.
    assert!(
        out.contains("removed the DNS stub route of default/kept"),
        "{out}"
    );
    let routes = checked(
        pod.command("ip")
            .args(["-6", "route", "show", "table", "local"]),
    );
    assert!(!routes.contains("100::53:0/112"), "{routes}");
    assert!(!pin.exists(), "{out}");
    assert!(!state.exists(), "{out}");
    assert!(!handover.exists(), "{out}");
    // Nothing decides for the pod any more: the stand-in sees it directly.
    let r = pod.probe(&["echo", &ext.to_string(), "10"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    assert_eq!(r.local().ip(), IpAddr::from(pod.ipv4), "{r:?}");
    assert_eq!(servers.wait_from(r.local()).local, ext);
}
