//! The agent as the DaemonSet runs it: started from its image in a container with the
//! DaemonSet's mounts and capabilities, on the host's network, deciding for workload containers
//! enrolled through it (`docker exec AGENT egress enroll`). Stand-ins for external services
//! listen on the workload network's gateway address, on the host.
//!
//! Needs root, Docker and the images `cargo xtask image` makes (`cargo xtask test` builds them
//! first).

use std::net::SocketAddr;

use egress_tests::{
    Servers,
    container::{AgentContainer, Network, Workload, usable},
    eventually,
};

const WORKLOAD: &str = "team/pod-a";

/// REGISTRY_ONLY: `web.example` by Host on the HTTP stand-in's port (through the agent), the
/// TCP stand-in's address and port by a TCP entry (direct, in the kernel); the rest is denied.
fn mesh(failure_mode: &str, http: SocketAddr, tcp: SocketAddr) -> String {
    format!(
        "apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {{name: default}}
spec:
  failureMode: {failure_mode}
  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}
  interception: {{includeOutboundIPRanges: \"*\"}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: team}}
spec:
  hosts: [web.example]
  ports: [{{number: {}, name: http, protocol: HTTP}}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: team}}
spec:
  hosts: [db.example]
  addresses: [{}/32]
  ports: [{{number: {}, name: tcp, protocol: TCP}}]
  resolution: NONE
",
        http.port(),
        tcp.ip(),
        tcp.port()
    )
}

/// What `egress-probe raw` received (spaces as `_`, line ends escaped).
fn reply(r: &egress_tests::ProbeResult) -> String {
    r.get("text")
        .unwrap_or_default()
        .trim_matches('"')
        .to_owned()
}

/// The stand-ins on the gateway, the network, the agent and one enrolled workload. Dropped
/// in this order: the workload, the agent, the network.
struct Setup {
    workload: Workload,
    agent: AgentContainer,
    _net: Network,
    servers: Servers,
    http: SocketAddr,
    tcp: SocketAddr,
    /// A port no entry declares, with a server behind it: a bypass would reach it.
    other: SocketAddr,
}

impl Setup {
    fn new(tag: &str, failure_mode: &str) -> Setup {
        let net = Network::new(tag);
        let servers = Servers::new();
        let gw = |port| SocketAddr::from((net.gateway, port));
        let http = servers.http(gw(0));
        let tcp = servers.echo(gw(0));
        let other = servers.echo(gw(0));
        let agent = AgentContainer::start(&mesh(failure_mode, http, tcp));
        let workload = Workload::start(&net, tag);
        let out = agent.enroll(&workload, WORKLOAD);
        assert!(out.contains("enrolled team/pod-a"), "{out}");
        Setup {
            workload,
            agent,
            _net: net,
            servers,
            http,
            tcp,
            other,
        }
    }

    /// `GET /` with `Host: web.example` from the workload. The probe half-closes only after
    /// the response has come (a second later): the agent's HTTP server ends a connection whose
    /// client half-closed before its response.
    fn get(&self) -> egress_tests::ProbeResult {
        let req = "GET / HTTP/1.1\r\nhost: web.example\r\nconnection: close\r\n\r\n";
        let hex: String = req.bytes().map(|b| format!("{b:02x}")).collect();
        self.workload
            .probe(&["raw", &self.http.to_string(), &hex, "1000"])
    }

    /// A redirect through the agent: 200 from the stand-in, and the agent's access record
    /// naming the workload and the host.
    fn assert_redirected(&self) {
        let r = self.get();
        let text = reply(&r);
        assert!(
            text.starts_with("HTTP/1.1_200_OK") && text.ends_with(&self.http.to_string()),
            "{r:?}\nagent log:\n{}",
            self.agent.log()
        );
        let local = r.local();
        let rec = self.agent.wait_record("the GET through the agent", |rec| {
            rec["kind"] == "request" && rec["peer"] == local.to_string()
        });
        assert_eq!(rec["workload"], WORKLOAD, "{rec}");
        assert_eq!(rec["host"], "web.example", "{rec}");
        assert_eq!(rec["status"], 200, "{rec}");
        assert_eq!(rec["orig_dst"], self.http.to_string(), "{rec}");
        assert_eq!(rec["upstream"], self.http.to_string(), "{rec}");
        assert!(rec["bytes_down"].as_u64().unwrap_or(0) > 0, "{rec}");
    }

    /// A deny under REGISTRY_ONLY: connect() fails with EPERM, nothing reaches the server.
    fn assert_denied(&self) {
        let r = self
            .workload
            .probe(&["echo", &self.other.to_string(), "10"]);
        assert_eq!(r.get("errno").as_deref(), Some("1"), "{r:?}");
        assert!(
            self.servers.seen().iter().all(|s| s.local != self.other),
            "a denied connect reached {}",
            self.other
        );
    }

    /// A direct connection: the stand-in sees the workload container's own address.
    fn assert_direct(&self) {
        let r = self
            .workload
            .probe(&["echo", &self.tcp.to_string(), "1000"]);
        assert_eq!(r.code, Some(0), "{r:?}");
        let seen = self.servers.wait_from(r.local());
        assert_eq!(seen.peer.ip(), self.workload.ip, "{seen:?}");
        assert_eq!(seen.local, self.tcp);
        assert_eq!(seen.received, 1000);
    }
}

#[test]
fn a_workload_container_is_redirected_denied_and_sent_direct_again_after_the_agent_restarts() {
    if !usable(
        "a_workload_container_is_redirected_denied_and_sent_direct_again_after_the_agent_restarts",
    ) {
        return;
    }
    let s = Setup::new("ctr-basic", "closed");
    s.assert_redirected();
    s.assert_denied();
    s.assert_direct();
    // An OOM kill or a crash, then the runtime starting the container again: the workload is
    // replayed from the state file, not enrolled again.
    s.agent.kill();
    s.agent.restart();
    s.assert_redirected();
    s.assert_denied();
    s.assert_direct();
}

#[test]
fn while_the_agent_container_is_down_its_failure_mode_decides() {
    if !usable("while_the_agent_container_is_down_its_failure_mode_decides") {
        return;
    }
    let s = Setup::new("ctr-down", "closed");
    s.assert_redirected();
    s.agent.kill();
    // closed: what would go through the agent is refused at once; denials and direct
    // entries keep working from the maps.
    let r = s.get();
    assert_eq!(
        r.get("errno").as_deref(),
        Some("111"),
        "failureMode closed: a would-be redirect while the agent is down: {r:?}"
    );
    s.assert_denied();
    s.assert_direct();
    s.agent.restart();
    s.assert_redirected();

    // open, by a reload of the configuration: would-be redirects go straight to their
    // destination while the agent is down (no access record: no agent saw them).
    s.agent.write_config(&mesh("open", s.http, s.tcp));
    assert!(
        eventually(20, || s
            .agent
            .log()
            .contains("applied configuration generation 2")),
        "the agent did not apply the open configuration:\n{}",
        s.agent.log()
    );
    s.agent.kill();
    let r = s.get();
    assert!(
        reply(&r).starts_with("HTTP/1.1_200_OK"),
        "failureMode open: a would-be redirect while the agent is down: {r:?}"
    );
    s.assert_denied();
    s.assert_direct();
    s.agent.restart();
    s.assert_redirected();
}
