//! Privileged tests of Kubernetes Services for external services: a connect() to a
//! selector-less Service's cluster IP is translated in the kernel to one of its endpoints, and
//! getpeername() still answers with the cluster IP. Cluster IPs and endpoints are stand-ins on
//! 127.0.0.0/8.

use std::{collections::BTreeSet, net::SocketAddr, process::Command};

use egress_tests::{Agent, AgentOpts, Cgroup, Servers, egress_bin, free_port, privileged, probe};

const CLUSTER_IP: &str = "127.96.0.10";

/// `my-wikipedia` as in the Kubernetes egress task: a selector-less Service on port 443 with
/// Endpoints, here with a cluster IP and endpoints on loopback, plus one EndpointSlice.
fn config(
    mode: &str,
    include: &str,
    endpoint_port: u16,
    endpoints: &[&str],
    slice: &[&str],
) -> String {
    let addrs: Vec<String> = endpoints.iter().map(|a| format!("{{ip: {a}}}")).collect();
    let slice_addrs: Vec<String> = slice
        .iter()
        .map(|a| format!("{{addresses: [{a}]}}"))
        .collect();
    format!(
        "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {{name: d}}\nspec:\n  \
         outboundTrafficPolicy: {{mode: {mode}}}\n  interception: {{includeOutboundIPRanges: [{include}]}}\n---\n\
         kind: Service\napiVersion: v1\nmetadata: {{name: my-wikipedia, namespace: default}}\nspec:\n  \
         clusterIP: {CLUSTER_IP}\n  ports:\n  - {{protocol: TCP, port: 443, name: tls}}\n---\n\
         kind: Endpoints\napiVersion: v1\nmetadata: {{name: my-wikipedia, namespace: default}}\nsubsets:\n\
         - addresses: [{}]\n  ports:\n  - {{port: {endpoint_port}, name: tls}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: my-wikipedia-extra\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: my-wikipedia}}\naddressType: IPv4\n\
         endpoints: [{}]\nports:\n- {{name: tls, port: {endpoint_port}}}\n",
        addrs.join(", "),
        slice_addrs.join(", "),
    )
}

fn start(config: &str, cg: &Cgroup) -> Agent {
    Agent::start(AgentOpts {
        config,
        cgroup: cg,
        inside: false,
        extra: vec![],
    })
}

/// (getpeername, endpoint reached) of each connection `egress-probe many` made.
fn connections(out: &str) -> Vec<(SocketAddr, SocketAddr)> {
    out.lines()
        .filter_map(|l| {
            let mut peer = None;
            let mut reached = None;
            for w in l.split_whitespace() {
                if let Some(v) = w.strip_prefix("peer=") {
                    peer = v.parse().ok();
                }
                if let Some(v) = w.strip_prefix("reached=") {
                    reached = v.parse().ok();
                }
            }
            Some((peer?, reached?))
        })
        .collect()
}

#[test]
fn a_cluster_ip_lands_on_its_endpoints_and_getpeername_shows_the_cluster_ip() {
    if !privileged("a_cluster_ip_lands_on_its_endpoints_and_getpeername_shows_the_cluster_ip") {
        return;
    }
    let cg = Cgroup::new("svc");
    let port = free_port();
    let servers = Servers::new();
    let eps: Vec<SocketAddr> = ["127.40.0.1", "127.40.0.2", "127.40.0.3"]
        .iter()
        .map(|a| servers.whoami(format!("{a}:{port}").parse().unwrap()))
        .collect();
    // Endpoints outside the intercepted ranges: translated, then straight out.
    let agent = start(
        &config(
            "ALLOW_ANY",
            "127.20.0.0/16",
            port,
            &["127.40.0.1", "127.40.0.2"],
            &["127.40.0.3"],
        ),
        &cg,
    );
    let vip: SocketAddr = format!("{CLUSTER_IP}:443").parse().unwrap();
    let r = probe(Some(&cg), &["many", "60", &vip.to_string()]);
    let conns = connections(&r.stdout);
    assert_eq!(conns.len(), 60, "{r:?}");
    assert!(
        conns.iter().all(|(peer, _)| *peer == vip),
        "getpeername must show the cluster IP: {conns:?}"
    );
    let reached: BTreeSet<SocketAddr> = conns.iter().map(|(_, e)| *e).collect();
    assert_eq!(
        reached,
        eps.iter().copied().collect(),
        "connections spread over every endpoint"
    );
    let explain = agent.explain(&vip.to_string(), &[]);
    assert_eq!(explain.lines().count(), 3, "{explain}");
    assert!(
        explain
            .lines()
            .all(|l| l.contains(&format!("of Kubernetes Service {vip}"))),
        "{explain}"
    );

    // A real client by name, as `curl --resolve` would use the Service.
    let web = servers.http(format!("127.40.1.1:{port}").parse().unwrap());
    let n = agent.logs().len();
    agent.write_config(&config(
        "ALLOW_ANY",
        "127.20.0.0/16",
        port,
        &["127.40.1.1"],
        &[],
    ));
    agent.wait_log(n, "applied configuration generation 2");
    let out = Command::new(egress_bin())
        .args([
            "exec",
            "--cgroup",
            cg.path.to_str().unwrap(),
            "--",
            "curl",
            "-sS",
            "--max-time",
            "10",
        ])
        .arg("--resolve")
        .arg(format!("en.wikipedia.org:443:{CLUSTER_IP}"))
        .arg("http://en.wikipedia.org:443/wiki/Main_Page")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        web.to_string(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn through_the_agent_a_service_is_registered_and_getpeername_still_shows_the_cluster_ip() {
    if !privileged(
        "through_the_agent_a_service_is_registered_and_getpeername_still_shows_the_cluster_ip",
    ) {
        return;
    }
    let cg = Cgroup::new("svc-registry");
    let port = free_port();
    let servers = Servers::new();
    let ep = servers.whoami(format!("127.40.2.1:{port}").parse().unwrap());
    // Endpoints inside the intercepted ranges, REGISTRY_ONLY and no ServiceEntry.
    let agent = start(
        &config("REGISTRY_ONLY", "127.40.0.0/16", port, &["127.40.2.1"], &[]),
        &cg,
    );
    let vip = format!("{CLUSTER_IP}:443");
    let r = probe(Some(&cg), &["many", "3", &vip]);
    let conns = connections(&r.stdout);
    assert_eq!(conns.len(), 3, "{r:?}");
    for (peer, reached) in &conns {
        assert_eq!((peer.to_string(), *reached), (vip.clone(), ep));
    }
    let stats = agent.stats();
    assert_eq!(stats["registry-service"], 3, "{stats:?}");
    agent.wait_conn("a proxied Service connection", |c| {
        c.get("orig_dst") == ep.to_string()
    });
    // The endpoint itself, dialled directly, is not registered.
    let r = probe(Some(&cg), &["echo", &ep.to_string(), "1"]);
    assert_eq!(r.get("errno").as_deref(), Some("1"), "{r:?}");
    assert!(
        agent
            .explain(&ep.to_string(), &[])
            .ends_with("[registry-denied]")
    );
}

#[test]
fn a_service_without_endpoints_refuses_the_connect() {
    if !privileged("a_service_without_endpoints_refuses_the_connect") {
        return;
    }
    let cg = Cgroup::new("svc-empty");
    let agent = start(
        &config("ALLOW_ANY", "127.20.0.0/16", free_port(), &[], &[]),
        &cg,
    );
    let vip = format!("{CLUSTER_IP}:443");
    let r = probe(Some(&cg), &["echo", &vip, "1"]);
    assert_eq!(r.get("errno").as_deref(), Some("1"), "{r:?}");
    assert_eq!(agent.stats()["service-no-endpoints"], 1);
    assert_eq!(
        agent.explain(&vip, &[]),
        format!("deny (Kubernetes Service {vip} has no endpoints) [service-no-endpoints]")
    );
}
