//! Privileged tests of what outlives the agent: killed (`kill -9`: a crash, the OOM killer),
//! stopped (SIGTERM) and started again on the same pinned state, the failure mode in force
//! while none runs, maps of another layout replaced under attached programs, and `egress
//! uninstall`. Stand-ins on 127.20.0.0/16, each test with its own cgroup, ports and pins.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    process::{Command, Output},
};

use egress_tests::{
    Agent, AgentOpts, Cgroup, Servers, egress_bin, free_port, privileged, probe, unique,
};

const MESH: &str = r#"
apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: default}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  failureMode: FAILURE
  interception:
    includeOutboundIPRanges: "127.20.0.0/16"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: relayed, namespace: default}
spec:
  hosts: [relayed.example]
  addresses: [127.20.1.0/24]
  ports: [{number: PORT, name: tcp, protocol: TCP}]
  # The agent connects to the endpoint: connections to the address are redirected to it.
  resolution: STATIC
  endpoints: [{address: 127.20.1.5}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.example]
  addresses: [127.20.5.0/24]
  ports: [{number: PORT, name: tcp, protocol: TCP}]
  resolution: NONE
"#;

fn mesh(port: u16, failure: &str) -> String {
    MESH.replace("PORT", &port.to_string())
        .replace("FAILURE", failure)
}

/// A cgroup, an agent intercepting it, and the three stand-ins: one the agent relays to, one
/// a TCP entry lets straight out, one no entry allows.
struct Fixture {
    servers: Servers,
    agent: Agent,
    relayed: SocketAddr,
    direct: SocketAddr,
    unlisted: SocketAddr,
    port: u16,
    cg: Cgroup,
}

fn fixture(test: &str, tag: &str, failure: &str, extra: &[&str]) -> Option<Fixture> {
    if !privileged(test) {
        return None;
    }
    let cg = Cgroup::new(tag);
    let port = free_port();
    let agent = Agent::start(AgentOpts {
        config: &mesh(port, failure),
        cgroup: &cg,
        inside: false,
        extra: extra.iter().map(|s| s.to_string()).collect(),
    });
    let servers = Servers::new();
    let at = |a: &str| -> SocketAddr { format!("{a}:{port}").parse().unwrap() };
    Some(Fixture {
        relayed: servers.echo(at("127.20.1.5")),
        direct: servers.echo(at("127.20.5.7")),
        unlisted: servers.echo(at("127.20.2.5")),
        servers,
        agent,
        port,
        cg,
    })
}

impl Fixture {
    /// A 100-byte echo from the cgroup: `Ok(client address)` when the bytes came back, else
    /// `Err(errno)`.
    fn echo(&self, dst: SocketAddr) -> Result<SocketAddr, String> {
        let r = probe(Some(&self.cg), &["echo", &dst.to_string(), "100"]);
        match r.get("match").as_deref() {
            Some("true") => Ok(r.local()),
            _ => Err(r.get("errno").unwrap_or_else(|| format!("{r:?}"))),
        }
    }

    /// Through the agent: bytes back, and its access record names the original destination.
    fn assert_relayed(&self, when: &str) {
        let client = self
            .echo(self.relayed)
            .unwrap_or_else(|e| panic!("{when}: errno {e}"));
        self.agent
            .wait_conn(when, |c| c.get("peer") == client.to_string());
    }

    /// Straight out: the stand-in saw the client's own socket.
    fn assert_direct(&self, when: &str) {
        let client = self
            .echo(self.direct)
            .unwrap_or_else(|e| panic!("{when}: errno {e}"));
        assert_eq!(self.servers.wait_from(client).local, self.direct, "{when}");
    }

    fn assert_denied(&self, when: &str) {
        assert_eq!(
            self.echo(self.unlisted),
            Err("1".to_owned()),
            "{when}: REGISTRY_ONLY refuses with EPERM"
        );
    }

    /// `egress stats` from the pinned maps: it needs no agent.
    fn stats(&self) -> BTreeMap<String, u64> {
        self.agent.stats()
    }

    fn seen_at(&self, dst: SocketAddr) -> usize {
        self.servers
            .seen()
            .iter()
            .filter(|s| s.local == dst)
            .count()
    }
}

fn egress(args: &[&str]) -> Output {
    Command::new(egress_bin())
        .args(args)
        .output()
        .expect("running egress")
}

fn links(pin: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(pin.join("links"))
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_killed_agent_leaves_the_policy_in_force_and_refuses_redirects_until_the_next_takes_over() {
    let Some(mut f) = fixture(
        "a_killed_agent_leaves_the_policy_in_force_and_refuses_redirects_until_the_next_takes_over",
        "killed",
        "closed",
        &[],
    ) else {
        return;
    };
    f.assert_relayed("with the agent");
    f.assert_direct("with the agent");
    f.assert_denied("with the agent");
    let attached = links(&f.agent.pin);
    assert_eq!(
        attached,
        [
            "egress_bind4",
            "egress_bind6",
            "egress_connect4",
            "egress_connect6",
            "egress_dns_connect4",
            "egress_dns_connect6",
            "egress_getpeername4",
            "egress_getpeername6",
            "egress_recvmsg4",
            "egress_recvmsg6",
            "egress_sendmsg4",
            "egress_sendmsg6",
            "egress_sock_create",
            "egress_sockops",
        ]
    );

    f.agent.kill();
    assert_eq!(links(&f.agent.pin), attached, "the links outlive the agent");
    let before = f.stats();
    let relayed_seen = f.seen_at(f.relayed);
    // failureMode closed: refused at once, and nothing reached the destination.
    assert_eq!(f.echo(f.relayed), Err("111".to_owned()), "ECONNREFUSED");
    assert_eq!(f.seen_at(f.relayed), relayed_seen);
    f.assert_direct("while no agent runs");
    f.assert_denied("while no agent runs");
    let after = f.stats();
    assert_eq!(after["agent-down"], before["agent-down"] + 1, "{after:?}");
    assert_eq!(after["tcp-entry"], before["tcp-entry"] + 1, "{after:?}");
    assert_eq!(
        after["registry-denied"],
        before["registry-denied"] + 1,
        "{after:?}"
    );

    // The next agent takes the maps over: no re-programming from empty, no gap.
    let n = f.agent.logs().len();
    f.agent.start_again();
    f.agent.wait_log(n, "took over the maps pinned in");
    f.assert_relayed("after the restart");
    f.assert_denied("after the restart");
    // The agent serves DNS to its cgroup: IPv6 stub addresses are routed to lo here.
    assert!(stub_route(), "no route for the IPv6 DNS stub addresses");

    // `egress uninstall` refuses while an agent runs.
    let sock = f.agent.admin_socket.to_str().unwrap().to_owned();
    let pin = f.agent.pin.to_str().unwrap().to_owned();
    let state = std::env::temp_dir().join(format!("{}.json", unique("state")));
    let state = state.to_str().unwrap();
    let uninstall = [
        "uninstall",
        "--pin-path",
        &pin,
        "--admin-socket",
        &sock,
        "--state-file",
        state,
    ];
    let o = egress(&uninstall);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("an agent answers on {sock}")),
        "{err}"
    );

    // SIGTERM is a stop, not an uninstall. The stub route goes with the agent's DNS socket.
    f.agent.terminate();
    assert_eq!(links(&f.agent.pin), attached, "the links outlive a stop");
    assert!(!stub_route(), "the IPv6 DNS stub route outlived the agent");
    f.assert_denied("after a stop");
    assert_eq!(f.echo(f.relayed), Err("111".to_owned()), "after a stop");

    let o = egress(&uninstall);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("detached 14 programs"), "{out}");
    assert!(!f.agent.pin.exists(), "{out}");
    // Nothing decides for the cgroup any more: what was denied or redirected goes out as is.
    let client = f.echo(f.unlisted).expect("not intercepted after uninstall");
    assert_eq!(f.servers.wait_from(client).local, f.unlisted);
    let client = f.echo(f.relayed).expect("not intercepted after uninstall");
    assert_eq!(f.servers.wait_from(client).local, f.relayed);
}

/// Whether this namespace routes the IPv6 DNS stub addresses, `100::53:0/112`, to lo (read
/// from /proc/net/ipv6_route: destination, then prefix length in hex).
fn stub_route() -> bool {
    std::fs::read_to_string("/proc/net/ipv6_route")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("01000000000000000000000000530000 70 ") && l.ends_with(" lo"))
}

#[test]
fn failure_mode_open_lets_would_be_redirects_out_while_no_agent_runs() {
    let Some(mut f) = fixture(
        "failure_mode_open_lets_would_be_redirects_out_while_no_agent_runs",
        "open",
        "closed",
        &[],
    ) else {
        return;
    };
    // Switched by a reload, as an operator would.
    let n = f.agent.logs().len();
    f.agent.write_config(&mesh(f.port, "open"));
    f.agent.wait_log(n, "applied configuration generation 2");
    let dump = f.agent.config_dump();
    assert_eq!(dump["failure_mode"], "open", "{dump}");
    f.assert_relayed("with the agent");

    f.agent.kill();
    let before = f.stats();
    let client = f.echo(f.relayed).expect("failureMode open: straight out");
    // The stand-in saw the client itself: no agent in between.
    assert_eq!(f.servers.wait_from(client).local, f.relayed);
    f.assert_direct("while no agent runs");
    f.assert_denied("while no agent runs, denies still hold");
    let after = f.stats();
    assert_eq!(
        after["agent-down-open"],
        before["agent-down-open"] + 1,
        "{after:?}"
    );

    f.agent.start_again();
    f.assert_relayed("after the restart");
}

#[test]
fn maps_of_another_layout_are_replaced_under_the_attached_programs() {
    let Some(mut f) = fixture(
        "maps_of_another_layout_are_replaced_under_the_attached_programs",
        "layout",
        "closed",
        &["--max-cidrs", "1000"],
    ) else {
        return;
    };
    f.assert_relayed("with the first agent");
    f.agent.kill();
    // Another capacity: the pinned maps cannot be taken over as they are.
    let n = f.agent.logs().len();
    f.agent.start_again_with("--max-cidrs", "2000");
    let line = f.agent.wait_log(n, "are of another layout");
    assert!(line.contains("map INCLUDE_V4 is"), "{line}");
    assert!(
        !f.agent.pin.join("next").exists(),
        "the staged maps took their place"
    );
    f.assert_relayed("after the replacement");
    f.assert_direct("after the replacement");
    f.assert_denied("after the replacement");
    // The pinned maps are the new ones: `egress explain` reads the policy from them.
    let line = f.agent.explain(&f.unlisted.to_string(), &[]);
    assert!(line.ends_with("[registry-denied]"), "{line}");
    // And the next agent takes them over as they are.
    f.agent.kill();
    let n = f.agent.logs().len();
    f.agent.start_again();
    f.agent.wait_log(n, "took over the maps pinned in");
}
