//! Privileged integration tests of the datapath: real cgroups, the real agent, real sockets.
//! Stand-in external services live on 127.0.0.0/8 and [::1]; every test has its own cgroup,
//! agent, ports and pinned maps.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Command, Stdio},
};

use egress_tests::{
    Agent, AgentOpts, Cgroup, Servers, eventually, free_port, pattern_hash, privileged, probe,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn start(config: &str, cg: &Cgroup) -> Agent {
    Agent::start(AgentOpts {
        config,
        cgroup: cg,
        inside: false,
        extra: vec![],
    })
}

/// Counters that went up between two `egress stats` readings.
fn increments(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

fn one(reason: &str) -> BTreeMap<String, u64> {
    BTreeMap::from([(reason.to_owned(), 1)])
}

/// The bracketed reason code of an `egress explain` line.
fn explained_reason(line: &str) -> &str {
    line.rsplit_once('[')
        .and_then(|(_, r)| r.strip_suffix(']'))
        .unwrap_or("")
}

const ALLOW_ANY: &str = r#"
apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: default}
spec:
  outboundTrafficPolicy: {mode: ALLOW_ANY}
  interception:
    includeOutboundIPRanges: ["127.20.0.0/16", "::1/128"]
    excludeOutboundIPRanges: ["127.20.9.0/24"]
    includeOutboundPorts: [INCLUDED_PORT]
    excludeOutboundPorts: [EXCLUDED_PORT]
    excludeUids: [4242]
    excludeGids: [4343]
"#;

struct Ports {
    any: u16,
    included: u16,
    excluded: u16,
}

fn allow_any(p: &Ports) -> String {
    ALLOW_ANY
        .replace("INCLUDED_PORT", &p.included.to_string())
        .replace("EXCLUDED_PORT", &p.excluded.to_string())
}

/// A test's cgroup, ports, agent (ALLOW_ANY configuration) and servers. Fields drop in order:
/// servers and agent stop before the cgroup is removed.
struct Fixture {
    servers: Servers,
    agent: Agent,
    p: Ports,
    cg: Cgroup,
}

/// The fixture, or `None` when the privileged test cannot run here (and need not).
fn fixture(test: &str, tag: &str) -> Option<Fixture> {
    if !privileged(test) {
        return None;
    }
    let cg = Cgroup::new(tag);
    let p = ports();
    let agent = start(&allow_any(&p), &cg);
    Some(Fixture {
        servers: Servers::new(),
        agent,
        p,
        cg,
    })
}

fn ports() -> Ports {
    Ports {
        any: free_port(),
        included: free_port(),
        excluded: free_port(),
    }
}

#[test]
fn redirect_delivers_exact_bytes_and_reports_the_original_destination() {
    let Some(Fixture {
        cg,
        p,
        agent,
        servers,
    }) = fixture(
        "redirect_delivers_exact_bytes_and_reports_the_original_destination",
        "redirect",
    )
    else {
        return;
    };
    let dst = servers.echo(sa(&format!("127.20.0.10:{}", p.any)));
    for n in [0u64, 1, 64 * 1024, 64 * 1024 * 1024] {
        let r = probe(Some(&cg), &["echo", &dst.to_string(), &n.to_string()]);
        assert_eq!(r.code, Some(0), "{n} bytes: {r:?}");
        assert_eq!(r.get("match").as_deref(), Some("true"), "{n} bytes: {r:?}");
        let client = r.local();
        let conn = agent.wait_conn(&format!("the {n}-byte connection"), |c| {
            c.get("peer") == client.to_string()
        });
        assert_eq!(conn.get("orig_dst"), dst.to_string());
        assert_eq!(conn.get("reason"), "included-cidr");
        assert_eq!(conn.get("result"), "ok");
        assert_eq!(conn.get("bytes_up"), n.to_string());
        assert_eq!(conn.get("bytes_down"), n.to_string());
        // The upstream was reached by the agent's socket, not the client's, and got every byte.
        assert_eq!(conn.get("upstream"), dst.to_string());
        let upstream: SocketAddr = conn.get("upstream_local").parse().unwrap();
        assert_ne!(upstream, client);
        let seen = servers.wait_from(upstream);
        assert_eq!(seen.local, dst);
        assert_eq!(seen.received, n);
        assert_eq!(seen.hash, pattern_hash(n));
    }
    let stats = agent.stats();
    assert_eq!(stats["included-cidr"], 4, "{stats:?}");
}

/// Each case: where the probe connects, as whom, and what must happen.
struct Case {
    dst: SocketAddr,
    args: &'static [&'static str],
    reason: &'static str,
}

#[test]
fn bypassed_connections_go_straight_out_and_explain_agrees() {
    let Some(Fixture {
        cg,
        p,
        agent,
        servers,
    }) = fixture(
        "bypassed_connections_go_straight_out_and_explain_agrees",
        "bypass",
    )
    else {
        return;
    };
    let cases = [
        Case {
            dst: servers.echo(sa(&format!("127.20.9.10:{}", p.any))),
            args: &[],
            reason: "excluded-cidr",
        },
        Case {
            dst: servers.echo(sa(&format!("127.20.0.11:{}", p.excluded))),
            args: &[],
            reason: "excluded-port",
        },
        Case {
            dst: servers.echo(sa(&format!("127.20.0.12:{}", p.any))),
            args: &["--as-uid", "4242"],
            reason: "excluded-uid",
        },
        Case {
            dst: servers.echo(sa(&format!("127.20.0.13:{}", p.any))),
            args: &["--as-gid", "4343"],
            reason: "excluded-gid",
        },
        // Loopback that no included range names: the workload's own business (the
        // not-included case needs a destination outside loopback: node_mode.rs has it).
        Case {
            dst: servers.echo(sa(&format!("127.30.0.1:{}", p.any))),
            args: &[],
            reason: "loopback",
        },
    ];
    for c in &cases {
        let before = agent.stats();
        let mut args: Vec<&str> = c.args.to_vec();
        let dst = c.dst.to_string();
        args.extend(["echo", &dst, "5"]);
        let r = probe(Some(&cg), &args);
        assert_eq!(r.code, Some(0), "{}: {r:?}", c.reason);
        // The upstream's peer is the client's own socket.
        let seen = servers.wait_from(r.local());
        assert_eq!((seen.local, seen.received), (c.dst, 5), "{}", c.reason);
        assert_eq!(
            increments(&before, &agent.stats()),
            one(c.reason),
            "{}",
            c.reason
        );
        let (uid, gid) = match c.reason {
            "excluded-uid" => ("4242", "0"),
            "excluded-gid" => ("0", "4343"),
            _ => ("0", "0"),
        };
        let line = agent.explain(&dst, &["--uid", uid, "--gid", gid]);
        assert!(line.starts_with("bypass ("), "{line}");
        assert_eq!(explained_reason(&line), c.reason, "{line}");
    }
    // The agent saw none of them.
    let conns = agent.conns();
    for c in &cases {
        assert!(
            conns.iter().all(|l| l.get("orig_dst") != c.dst.to_string()),
            "agent saw {}: {conns:?}",
            c.dst
        );
    }
    assert!(
        agent
            .explain(&format!("127.20.9.200:{}", p.any), &[])
            .contains("excludeOutboundIPRanges 127.20.9.0/24"),
    );
}

#[test]
fn redirect_reasons_and_the_agent_listener_match_explain() {
    let Some(Fixture {
        cg,
        p,
        agent,
        servers,
    }) = fixture(
        "redirect_reasons_and_the_agent_listener_match_explain",
        "explain",
    )
    else {
        return;
    };
    // Inside includeOutboundIPRanges: redirected. (An included port outside them, which
    // needs a destination outside loopback, is in node_mode.rs.)
    let dst = servers.echo(sa(&format!("127.20.0.20:{}", p.any)));
    let before = agent.stats();
    let r = probe(Some(&cg), &["echo", &dst.to_string(), "3"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    let conn = agent.wait_conn("the connection", |c| c.get("peer") == r.local().to_string());
    assert_eq!(
        (conn.get("orig_dst"), conn.get("reason")),
        (dst.to_string().as_str(), "included-cidr")
    );
    assert_eq!(increments(&before, &agent.stats()), one("included-cidr"));
    assert_eq!(
        agent.explain(&dst.to_string(), &[]),
        "redirect (includeOutboundIPRanges 127.20.0.0/16) [included-cidr]"
    );
    // Straight to the agent's listener: not redirected onto itself; the agent, finding no
    // original destination, resets it.
    let listener = format!("127.0.0.1:{}", agent.port);
    let before = agent.stats();
    let r = probe(Some(&cg), &["echo", &listener, "3"]);
    assert_ne!(r.get("match").as_deref(), Some("true"), "{r:?}");
    assert_eq!(increments(&before, &agent.stats()), one("agent-listener"));
    assert_eq!(
        explained_reason(&agent.explain(&listener, &[])),
        "agent-listener"
    );
    assert!(eventually(10, || agent
        .logs()
        .iter()
        .any(|l| l.contains("result=no-original-destination"))));
}

const REGISTRY_ONLY: &str = r#"
apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: default}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  interception:
    includeOutboundIPRanges: "127.20.0.0/16"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tcp-ext, namespace: default}
spec:
  hosts: [tcp.example]
  addresses: [127.20.1.0/24]
  ports:
  - {number: PORT, name: tcp, protocol: TCP}
  # Endpoints: the agent connects to them, so allowed connections go through it (a TCP entry
  # relaying to the address dialled would go straight out, see TCP_ENTRY).
  resolution: STATIC
  endpoints: [{address: 127.20.1.5}]
"#;

#[test]
fn registry_only_denies_at_connect_what_no_service_entry_allows() {
    if !privileged("registry_only_denies_at_connect_what_no_service_entry_allows") {
        return;
    }
    let cg = Cgroup::new("registry");
    let port = free_port();
    let other = free_port();
    let agent = start(&REGISTRY_ONLY.replace("PORT", &port.to_string()), &cg);
    let servers = Servers::new();
    let allowed = servers.echo(sa(&format!("127.20.1.5:{port}")));
    let unlisted = servers.echo(sa(&format!("127.20.2.5:{port}")));
    let wrong_port = servers.echo(sa(&format!("127.20.1.5:{other}")));

    let before = agent.stats();
    let r = probe(Some(&cg), &["echo", &allowed.to_string(), "100"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    agent.wait_conn("the allowed connection", |c| {
        c.get("orig_dst") == allowed.to_string()
    });
    assert_eq!(increments(&before, &agent.stats()), one("registry-allowed"));
    assert_eq!(
        agent.explain(&allowed.to_string(), &[]),
        format!(
            "redirect (REGISTRY_ONLY: allowed by ServiceEntry address 127.20.1.0/24 port {port}) [registry-allowed]"
        )
    );

    for dst in [unlisted, wrong_port] {
        let before = agent.stats();
        let r = probe(Some(&cg), &["echo", &dst.to_string(), "1"]);
        // connect() itself fails with EPERM: nothing left the host.
        assert_eq!(r.get("errno").as_deref(), Some("1"), "{dst}: {r:?}");
        assert!(r.stdout.contains("connect_error"), "{r:?}");
        assert_eq!(increments(&before, &agent.stats()), one("registry-denied"));
        assert!(
            agent
                .explain(&dst.to_string(), &[])
                .starts_with("deny (REGISTRY_ONLY")
        );
    }
    assert!(
        servers.seen().iter().all(|s| s.local == allowed),
        "{:?}",
        servers.seen()
    );
}

const TCP_ENTRY: &str = r#"
apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: default}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  interception:
    includeOutboundIPRanges: "127.20.0.0/16,::1/128"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.example]
  addresses: [127.20.5.0/24, "::1"]
  ports:
  - {number: PORT, name: tcp, protocol: TCP}
  resolution: NONE
"#;

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn tcp_entries_go_straight_out_and_the_kernel_accounts_for_each_connection() {
    if !privileged("tcp_entries_go_straight_out_and_the_kernel_accounts_for_each_connection") {
        return;
    }
    let cg = Cgroup::new("direct");
    let port = free_port();
    let agent = start(&TCP_ENTRY.replace("PORT", &port.to_string()), &cg);
    let servers = Servers::new();
    let dst = servers.echo(sa(&format!("127.20.5.7:{port}")));
    assert_eq!(
        agent.explain(&dst.to_string(), &[]),
        format!(
            "direct (TCP ServiceEntry address 127.20.5.0/24 port {port}: nothing in the stream \
             to decide, so it goes straight out, accounted by the kernel) [tcp-entry]"
        )
    );

    // The client ends its side first (FIN_WAIT2, then TIME-WAIT on the server's FIN).
    let before = agent.stats();
    for n in [0u64, 1, 64 * 1024, 8 * 1024 * 1024] {
        let r = probe(Some(&cg), &["echo", &dst.to_string(), &n.to_string()]);
        assert_eq!(r.get("match").as_deref(), Some("true"), "{n} bytes: {r:?}");
        let client = r.local();
        // The server was reached by the client's own socket: nothing in between.
        let seen = servers.wait_from(client);
        assert_eq!(
            (seen.local, seen.received, seen.hash),
            (dst, n, pattern_hash(n))
        );
        let conn = agent.wait_conn(&format!("the {n}-byte connection"), |c| {
            c.get("peer") == client.to_string()
        });
        assert_eq!(conn.get("orig_dst"), dst.to_string(), "{conn:?}");
        assert_eq!(conn.get("reason"), "tcp-entry", "{conn:?}");
        assert_eq!(conn.get("protocol"), "tcp", "{conn:?}");
        assert_eq!(conn.get("matched"), "ServiceEntry default/db", "{conn:?}");
        assert_eq!(conn.get("result"), "ok", "{conn:?}");
        assert_eq!(conn.get("bytes_up"), n.to_string(), "{conn:?}");
        assert_eq!(conn.get("bytes_down"), n.to_string(), "{conn:?}");
        assert_eq!(Some(conn.get("pid").to_owned()), r.get("pid"), "{conn:?}");
        assert_eq!(conn.get("upstream"), "", "no agent connection: {conn:?}");
    }
    // IPv6 (connect6) likewise.
    let dst6 = servers.echo(sa(&format!("[::1]:{port}")));
    let r = probe(Some(&cg), &["echo", &dst6.to_string(), "1000"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    let client = r.local();
    assert_eq!(servers.wait_from(client).local, dst6);
    let conn = agent.wait_conn("the IPv6 connection", |c| {
        c.get("peer") == client.to_string()
    });
    assert_eq!(
        (
            conn.get("orig_dst"),
            conn.get("bytes_up"),
            conn.get("bytes_down")
        ),
        (dst6.to_string().as_str(), "1000", "1000"),
        "{conn:?}"
    );
    assert_eq!(
        increments(&before, &agent.stats()),
        BTreeMap::from([("tcp-entry".to_owned(), 5)])
    );

    // The server ends first (the client closes from CLOSE_WAIT through LAST_ACK).
    let web = servers.http(sa(&format!("127.20.5.8:{port}")));
    let request = "GET / HTTP/1.1\r\nHost: db.example\r\n\r\n";
    let r = probe(Some(&cg), &["raw", &web.to_string(), &hex(request), "300"]);
    assert_eq!(r.get("end").as_deref(), Some("eof"), "{r:?}");
    let received = r.get("received").unwrap();
    assert!(r.get("text").unwrap().contains("HTTP/1.1_200"), "{r:?}");
    let client = r.local();
    let conn = agent.wait_conn("the HTTP exchange", |c| c.get("peer") == client.to_string());
    assert_eq!(conn.get("result"), "ok", "{conn:?}");
    assert_eq!(conn.get("bytes_up"), request.len().to_string(), "{conn:?}");
    assert_eq!(conn.get("bytes_down"), received, "{conn:?}");

    // Nothing listens: the client's own connect is refused, as it would be without egress.
    let closed = sa(&format!("127.20.5.9:{port}"));
    let r = probe(Some(&cg), &["echo", &closed.to_string(), "1"]);
    assert_eq!(r.get("errno").as_deref(), Some("111"), "{r:?}");
    let conn = agent.wait_conn("the refused connection", |c| {
        c.get("orig_dst") == closed.to_string()
    });
    assert_eq!(conn.get("result"), "connect-failed", "{conn:?}");
    assert_eq!((conn.get("bytes_up"), conn.get("bytes_down")), ("0", "0"));

    // Every connection's record went up to the agent: nothing is left in the kernel.
    assert_eq!(agent.orig_entries(), 0);
}

/// A connect the kernel refuses after the hook ran (the connection exists already:
/// EADDRNOTAVAIL) leaves the socket free to connect elsewhere: what the hook recorded for the
/// first destination must not follow it to the second.
#[test]
fn a_socket_that_connects_again_carries_nothing_of_its_failed_connect() {
    if !privileged("a_socket_that_connects_again_carries_nothing_of_its_failed_connect") {
        return;
    }
    let cg = Cgroup::new("reconnect");
    let port = free_port();
    // The TCP entry's configuration under ALLOW_ANY: the rest of 127.20/16 goes through the
    // agent.
    let config = TCP_ENTRY
        .replace("{mode: REGISTRY_ONLY}", "{mode: ALLOW_ANY}")
        .replace("PORT", &port.to_string());
    let agent = start(&config, &cg);
    let servers = Servers::new();
    let bypassed = servers.whoami(sa(&format!("127.23.0.1:{port}")));
    let redirected = servers.whoami(sa(&format!("127.20.6.1:{port}")));
    let direct = servers.echo(sa(&format!("127.20.5.7:{port}")));
    assert!(
        agent
            .explain(&redirected.to_string(), &[])
            .starts_with("redirect")
    );
    assert!(
        agent
            .explain(&direct.to_string(), &[])
            .starts_with("direct")
    );

    for (first, what) in [(redirected, "redirected"), (direct, "direct")] {
        let local = sa(&format!("127.0.0.1:{}", free_port()));
        let r = probe(
            Some(&cg),
            &[
                "reconnect",
                &local.to_string(),
                &first.to_string(),
                &bypassed.to_string(),
            ],
        );
        assert_eq!(r.get("first_errno").as_deref(), Some("99"), "{what}: {r:?}");
        // getpeername() and the server agree: the second destination, reached directly.
        assert_eq!(r.get("peer"), Some(bypassed.to_string()), "{what}: {r:?}");
        assert_eq!(
            r.get("reached"),
            Some(bypassed.to_string()),
            "{what}: {r:?}"
        );
        // The connection that held the address pair is logged once it closes; the bypassed
        // one, which closed first, is not logged at all.
        let held = agent.wait_conn(&format!("the {what} connection"), |c| {
            c.get("peer") == local.to_string() && c.get("bytes_up") == "1"
        });
        assert_eq!(held.get("orig_dst"), first.to_string(), "{held:?}");
        let from_local: Vec<_> = agent
            .conns()
            .into_iter()
            .filter(|c| c.get("peer") == local.to_string())
            .collect();
        assert_eq!(from_local.len(), 1, "{what}: {from_local:?}");
    }
}

#[test]
fn ipv6_and_v4_mapped_destinations_follow_the_rules_of_their_address() {
    let Some(Fixture {
        cg,
        p,
        agent,
        servers,
    }) = fixture(
        "ipv6_and_v4_mapped_destinations_follow_the_rules_of_their_address",
        "ipv6",
    )
    else {
        return;
    };
    let v6 = servers.echo(sa(&format!("[::1]:{}", p.any)));
    let v4 = servers.echo(sa(&format!("127.20.0.30:{}", p.any)));
    let v4_excluded = servers.echo(sa(&format!("127.20.9.30:{}", p.any)));

    // IPv6 to [::1] (included as ::1/128): through the agent's [::1] listener.
    let r = probe(Some(&cg), &["echo", &v6.to_string(), "4096"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    let conn = agent.wait_conn("the IPv6 connection", |c| {
        c.get("peer") == r.local().to_string()
    });
    assert_eq!(conn.get("orig_dst"), v6.to_string());
    assert_ne!(
        servers
            .wait_from(conn.get("upstream_local").parse().unwrap())
            .peer,
        r.local()
    );

    // An IPv6 socket dialling ::ffff:127.20.0.30 is decided by the IPv4 rules (included) ...
    let mapped = format!("[::ffff:127.20.0.30]:{}", p.any);
    let r = probe(Some(&cg), &["echo", &mapped, "4096"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    assert!(r.local().is_ipv6(), "the client used an IPv6 socket: {r:?}");
    let conn = agent.wait_conn("the v4-mapped connection", |c| {
        c.get("peer") == unmap(r.local()).to_string()
    });
    assert_eq!(conn.get("orig_dst"), v4.to_string());
    assert_eq!(
        servers
            .wait_from(conn.get("upstream_local").parse().unwrap())
            .local,
        v4
    );

    // ... and by the IPv4 exclusions: 127.20.9.0/24 goes straight out even from a v6 socket.
    let before = agent.stats();
    let r = probe(
        Some(&cg),
        &["echo", &format!("[::ffff:127.20.9.30]:{}", p.any), "7"],
    );
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    let seen = servers.wait_from(unmap(r.local()));
    assert_eq!(seen.local, v4_excluded);
    assert_eq!(increments(&before, &agent.stats()), one("excluded-cidr"));
    assert_eq!(
        explained_reason(&agent.explain(&format!("[::ffff:127.20.9.30]:{}", p.any), &[])),
        "excluded-cidr"
    );
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        v4 => v4,
    }
}

#[test]
fn processes_outside_the_cgroup_are_untouched() {
    // The cgroup is kept (bound) while the agent intercepts it; the client stays outside.
    let Some(Fixture {
        cg: _cg,
        p,
        agent,
        servers,
    }) = fixture("processes_outside_the_cgroup_are_untouched", "outside")
    else {
        return;
    };
    let dst = servers.echo(sa(&format!("127.20.0.40:{}", p.any)));
    let r = probe(None, &["echo", &dst.to_string(), "10"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    assert_eq!(servers.wait_from(r.local()).received, 10);
    assert!(
        agent.stats().values().all(|v| *v == 0),
        "{:?}",
        agent.stats()
    );
    assert!(agent.conns().is_empty());
}

#[test]
fn the_agents_own_upstream_connections_are_not_redirected_back() {
    if !privileged("the_agents_own_upstream_connections_are_not_redirected_back") {
        return;
    }
    let cg = Cgroup::new("noloop");
    let p = ports();
    // The agent runs inside the cgroup it intercepts, with every destination included (the
    // loopback stand-ins by name: "*" alone leaves loopback to the workload).
    let config = "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\nspec:\n  \
                  interception: {includeOutboundIPRanges: [\"*\", 127.20.0.0/16]}\n";
    let agent = Agent::start(AgentOpts {
        config,
        cgroup: &cg,
        inside: true,
        extra: vec![],
    });
    let servers = Servers::new();
    let dst = servers.echo(sa(&format!("127.20.0.50:{}", p.any)));
    let r = probe(Some(&cg), &["echo", &dst.to_string(), "1000"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    let conn = agent.wait_conn("the connection", |c| c.get("peer") == r.local().to_string());
    let seen = servers.wait_from(conn.get("upstream_local").parse().unwrap());
    assert_eq!(seen.received, 1000);
    let stats = agent.stats();
    assert_eq!(
        (stats["included-cidr"], stats["agent"]),
        (1, 1),
        "{stats:?}"
    );
    assert_eq!(agent.conns().len(), 1, "{:?}", agent.logs());
}

#[test]
fn a_thousand_concurrent_connections_recover_their_own_destinations_and_the_maps_drain() {
    if !privileged(
        "a_thousand_concurrent_connections_recover_their_own_destinations_and_the_maps_drain",
    ) {
        return;
    }
    let cg = Cgroup::new("many");
    let p = ports();
    let agent = start(&allow_any(&p), &cg);
    let servers = Servers::new();
    // Listeners, accepted sockets and the probe's own: about 3,000 descriptors in play.
    let limit = egress_tests::raise_nofile_limit();
    assert!(
        limit >= 4096,
        "this test needs RLIMIT_NOFILE >= 4096; the hard limit here is {limit}"
    );
    // 1,000 distinct destinations: 100 addresses x 10 ports.
    let ports: Vec<u16> = (0..10).map(|_| free_port()).collect();
    let mut dsts = Vec::new();
    for a in 1..=100 {
        for port in &ports {
            dsts.push(
                servers
                    .whoami(sa(&format!(
                        "127.20.{}.{}:{port}",
                        100 + a / 50,
                        a % 50 + 1
                    )))
                    .to_string(),
            );
        }
    }
    let mut args = vec!["hold", "1000"];
    args.extend(dsts.iter().map(String::as_str));
    let r = probe(Some(&cg), &args);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.get("ok").as_deref(), Some("1000"), "{r:?}");
    assert_eq!(agent.stats()["included-cidr"], 1000);
    assert!(
        eventually(20, || agent.orig_entries() == 0),
        "original-destination maps not empty after the connections closed: {:?}",
        agent.orig_entries()
    );

    // A batch of connects to a dead upstream: each client is reset, nothing is left behind.
    let dead = format!("127.20.120.1:{}", free_port());
    for _ in 0..20 {
        let r = probe(Some(&cg), &["echo", &dead, "10"]);
        // Reset, on loopback sometimes before connect() even returns.
        assert!(matches!(r.code, Some(3 | 4)), "{r:?}");
        assert!(
            r.stdout.contains("kind=ConnectionReset") || r.stdout.contains("kind=BrokenPipe"),
            "{r:?}"
        );
    }
    assert!(eventually(10, || agent
        .conns()
        .iter()
        .filter(|c| c.get("result") == "connect-failed")
        .count()
        == 20));
    assert!(
        eventually(20, || agent.orig_entries() == 0),
        "original-destination maps not empty after dead-upstream connects: {:?}",
        agent.orig_entries()
    );
}

#[test]
fn a_stalled_reader_of_the_access_log_stalls_no_connection_and_drops_are_counted() {
    let Some(Fixture {
        servers,
        agent,
        p,
        cg,
    }) = fixture(
        "a_stalled_reader_of_the_access_log_stalls_no_connection_and_drops_are_counted",
        "stalled-log",
    )
    else {
        return;
    };
    let echo = servers.echo(sa(&format!("127.20.1.50:{}", p.any)));
    // Nobody reads the agent's standard output: its pipe fills after a few hundred records.
    agent.pause_access_log(true);
    // More connections than the agent queues records for (8,192).
    const N: u64 = 12_000;
    let r = probe(Some(&cg), &["pings", &N.to_string(), &echo.to_string()]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.get("ok"), Some(N.to_string()), "{r:?}");
    agent.pause_access_log(false);
    // Every connection is either in the log or in the count of dropped records.
    let dropped = || {
        agent
            .logs()
            .iter()
            .filter_map(|l| {
                let (_, rest) = l.split_once("access log: ")?;
                rest.split_once(" records dropped since start")?
                    .0
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0)
    };
    assert!(
        eventually(30, || agent.conns().len() as u64 + dropped() == N),
        "records written {} + dropped {} != {N} connections",
        agent.conns().len(),
        dropped()
    );
    assert!(
        dropped() > 0,
        "no record was dropped: the test did not fill the queue"
    );
    assert!(
        agent
            .conns()
            .iter()
            .all(|c| c.get("upstream") == echo.to_string())
    );
}

/// An agent in `--external-proxy` mode: clients in one cgroup, the proxy in another.
struct ExternalProxy {
    agent: Agent,
    p: Ports,
    proxy_cg: Cgroup,
    clients: Cgroup,
}

fn external_proxy(tag: &str) -> ExternalProxy {
    let clients = Cgroup::new(&format!("{tag}-clients"));
    let proxy_cg = Cgroup::new(&format!("{tag}-proxy"));
    let p = ports();
    let agent = Agent::start(AgentOpts {
        config: &allow_any(&p),
        cgroup: &clients,
        inside: false,
        extra: vec![
            "--external-proxy".into(),
            "--proxy-cgroup".into(),
            proxy_cg.path.display().to_string(),
        ],
    });
    ExternalProxy {
        agent,
        p,
        proxy_cg,
        clients,
    }
}

#[test]
fn getsockopt_original_dst_serves_a_transparent_proxy() {
    if !privileged("getsockopt_original_dst_serves_a_transparent_proxy") {
        return;
    }
    let ExternalProxy {
        clients,
        proxy_cg,
        p,
        agent,
    } = external_proxy("sockopt");
    // A plain listener in the proxy's cgroup stands where the agent would: it asks
    // getsockopt(SOL_IP / SOL_IPV6, SO_ORIGINAL_DST) and sends the answer back.
    let l4 = format!("127.0.0.1:{}", agent.port);
    let l6 = format!("[::1]:{}", agent.port);
    let mut server = Command::new(egress_tests::egress_bin())
        .args(["exec", "--cgroup", proxy_cg.path.to_str().unwrap(), "--"])
        .arg(egress_tests::probe_bin())
        .args(["origdst-server", "3", &l4, &l6])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    // `hold` checks that the line it reads back is the address it dialled.
    for dst in [format!("127.20.0.60:{}", p.any), format!("[::1]:{}", p.any)] {
        let r = probe(Some(&clients), &["hold", "1", &dst]);
        assert_eq!(r.get("ok").as_deref(), Some("1"), "{dst}: {r:?}");
    }
    // A connection that was not redirected gets the kernel's own answer, untouched.
    let r = probe(None, &["hold", "1", &l4]);
    assert!(r.stdout.contains("reached=\"error:"), "{r:?}");
    assert!(server.wait().unwrap().success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(
        rest.contains(&format!("orig=127.20.0.60:{}", p.any)),
        "{rest}"
    );
    assert!(rest.contains(&format!("orig=[::1]:{}", p.any)), "{rest}");
    // The records of the proxied connections are gone once their clients closed.
    assert!(
        eventually(10, || agent.orig_entries() == 0),
        "{:?}",
        agent.orig_entries()
    );
}

/// A network namespace made by the test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("egress-test-{}", std::process::id());
        let ok = |args: &[&str]| {
            assert!(
                Command::new("ip").args(args).status().unwrap().success(),
                "ip {args:?}"
            )
        };
        ok(&["netns", "add", &name]);
        let ns = Netns(name);
        ok(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn connects_from_another_network_namespace_are_bypassed() {
    if !privileged("connects_from_another_network_namespace_are_bypassed") {
        return;
    }
    let cg = Cgroup::new("netns");
    let p = ports();
    let agent = start(&allow_any(&p), &cg);
    let ns = Netns::new();
    // The agent's loopback listener is unreachable from there: the connection is left alone
    // and meets that namespace's own (empty) loopback.
    let dst = format!("127.20.0.70:{}", p.any);
    let before = agent.stats();
    // Into the cgroup first: `ip netns exec` remounts /sys, hiding the cgroup2 mount.
    let o = Command::new(egress_tests::egress_bin())
        .args(["exec", "--cgroup", cg.path.to_str().unwrap(), "--"])
        .args(["ip", "netns", "exec", &ns.0])
        .arg(egress_tests::probe_bin())
        .args(["echo", &dst, "1"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("errno=111"),
        "expected ECONNREFUSED inside the namespace: {out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(increments(&before, &agent.stats()), one("not-enrolled"));
}

#[test]
fn a_bad_configuration_is_reported_and_attaches_nothing() {
    if !privileged("a_bad_configuration_is_reported_and_attaches_nothing") {
        return;
    }
    let cg = Cgroup::new("badconfig");
    let r = egress_tests::run_refused(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: wikipedia-ext}\n\
         spec:\n  hosts: [en.wikipedia.org]\n  addresses: [\"91.198.174.0/33\"]\n  ports: [{number: 443, name: t, protocol: TLS}]\n",
        &cg,
        &[],
    );
    assert!(
        r.stderr.contains(&format!(
            "{} doc 1 ServiceEntry default/wikipedia-ext: spec.addresses[0]: \"91.198.174.0/33\" is not an IP address or CIDR",
            r.file.display()
        )),
        "{}",
        r.stderr
    );
    // Nothing is attached: a client in the cgroup reaches its destination directly.
    let servers = Servers::new();
    let dst = servers.echo(sa(&format!("127.20.0.80:{}", free_port())));
    let r = probe(Some(&cg), &["echo", &dst.to_string(), "3"]);
    assert_eq!(servers.wait_from(r.local()).received, 3);
}

#[test]
fn connect4_is_verified_small_and_its_size_is_logged() {
    if !privileged("connect4_is_verified_small_and_its_size_is_logged") {
        return;
    }
    let cg = Cgroup::new("insns");
    let p = ports();
    let logs = start(&allow_any(&p), &cg).stop();
    let count = |prog: &str| -> u32 {
        let l = logs
            .iter()
            .find(|l| l.contains(&format!("loaded {prog}: verified_instructions=")))
            .unwrap_or_else(|| panic!("no instruction count for {prog}: {logs:?}"));
        l.rsplit('=').next().unwrap().parse().unwrap()
    };
    for prog in [
        "egress_connect4",
        "egress_connect6",
        "egress_getpeername4",
        "egress_getpeername6",
        "egress_sockops",
        "egress_getsockopt",
        "egress_dns_connect4",
        "egress_dns_connect6",
        "egress_sendmsg4",
        "egress_sendmsg6",
        "egress_recvmsg4",
        "egress_recvmsg6",
        "egress_bind4",
        "egress_bind6",
        "egress_sock_create",
    ] {
        assert!(count(prog) > 0);
    }
    // No logging on the hot path: connect4 stays within a small verifier budget. (About 8,900
    // today: the verifier walks the decision once for plain destinations and once for
    // translated Kubernetes Service endpoints, each path split again by the workload's
    // cgroup, loopback and own-address checks; the lookup of addresses learnt from DNS on the
    // redirect and deny paths adds about 2,000, and the lookup of the workload's nameservers
    // under `spec.dns.capture: RESOLV_CONF` (before the decision, whose paths it splits)
    // about 3,200; one aya-log call alone adds about 500. The kernel's limit is 1,000,000.)
    assert!(
        count("egress_connect4") < 9500,
        "connect4 grew to {} instructions",
        count("egress_connect4")
    );
}

#[test]
fn an_upstream_that_never_answers_gets_the_client_reset_not_hung() {
    if !privileged("an_upstream_that_never_answers_gets_the_client_reset_not_hung") {
        return;
    }
    let cg = Cgroup::new("timeout");
    let p = ports();
    let agent = Agent::start(AgentOpts {
        config: &allow_any(&p),
        cgroup: &cg,
        inside: false,
        extra: vec!["--connect-timeout".into(), "1s".into()],
    });
    // A listener that never accepts, its queue filled from outside the cgroup: further SYNs are
    // dropped, so the agent's connect never completes.
    let dst = sa(&format!("127.20.0.90:{}", p.any));
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&dst.into()).unwrap();
    sock.listen(0).unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&dst.into());
        fillers.push(s);
    }
    let r = probe(Some(&cg), &["echo", &dst.to_string(), "10"]);
    assert!(
        matches!(r.code, Some(3 | 4)),
        "the client must see the failure: {r:?}"
    );
    assert!(r.stdout.contains("kind=ConnectionReset"), "{r:?}");
    let conn = agent.wait_conn("the timed-out connection", |c| {
        c.get("orig_dst") == dst.to_string()
    });
    assert_eq!(conn.get("result"), "connect-failed");
    assert!(
        conn.get("error").starts_with("no answer within"),
        "{conn:?}"
    );
    drop((fillers, sock));
}

/// Whether something listens on TCP `port` (IPv4), from /proc/net/tcp.
fn tcp_listening(port: u16) -> bool {
    let hex = format!(":{port:04X} ");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .any(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| format!("{a} ").ends_with(&hex))
                && l.split_whitespace().nth(3) == Some("0A")
        })
}

#[test]
fn haproxy_in_transparent_mode_stands_in_for_the_agent() {
    if !privileged("haproxy_in_transparent_mode_stands_in_for_the_agent") {
        return;
    }
    let Some(haproxy) = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        panic!("haproxy is not installed: `cargo xtask setup` installs Debian's package");
    };
    let ExternalProxy {
        clients,
        proxy_cg,
        p,
        agent,
    } = external_proxy("haproxy");
    // `server s 0.0.0.0:0`: connect to wherever the client meant to go, as HAProxy learns it
    // from getsockopt(SOL_IP, SO_ORIGINAL_DST).
    let cfg = std::env::temp_dir().join(format!("egress-test-haproxy-{}.cfg", std::process::id()));
    std::fs::write(
        &cfg,
        format!(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend fe\n  bind 127.0.0.1:{}\n  default_backend be\nbackend be\n  server s 0.0.0.0:0\n",
            agent.port
        ),
    )
    .unwrap();
    let mut hap = Command::new(egress_tests::egress_bin())
        .args([
            "exec",
            "--cgroup",
            proxy_cg.path.to_str().unwrap(),
            "--",
            haproxy,
            "-db",
            "-f",
        ])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Not by connecting: a connection without a record would send HAProxy to itself.
    let listening = eventually(10, || tcp_listening(agent.port));
    let servers = Servers::new();
    let dst = servers.echo(sa(&format!("127.20.0.95:{}", p.any)));
    let r = if listening {
        Some(probe(Some(&clients), &["echo", &dst.to_string(), "65536"]))
    } else {
        None
    };
    let _ = hap.kill();
    let _ = hap.wait();
    let _ = std::fs::remove_file(&cfg);
    let r = r.expect("haproxy did not start listening");
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    // The echo server was reached at the original destination, by HAProxy's socket.
    let seen = servers.wait("the proxied connection", |s| s.local == dst);
    assert_ne!(seen.peer, r.local());
    assert_eq!((seen.received, seen.hash), (65536, pattern_hash(65536)));
}

#[test]
fn behind_iptables_redirect_the_agent_finds_the_original_destination_from_conntrack() {
    if !privileged(
        "behind_iptables_redirect_the_agent_finds_the_original_destination_from_conntrack",
    ) {
        return;
    }
    let Some(Fixture {
        cg: _cg,
        p,
        agent,
        servers,
    }) = fixture("iptables-redirect", "iptables")
    else {
        return;
    };
    // Classic interception instead of the hooks: a client outside the cgroup, a nat rule.
    let _rule = egress_tests::IptablesRedirect::new("127.53.0.0/16", agent.port, 1337);
    let dst = servers.echo(sa(&format!("127.53.0.10:{}", p.any)));
    let r = probe(None, &["echo", &dst.to_string(), "4096"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    let conn = agent.wait_conn("the REDIRECTed connection", |c| {
        c.get("peer") == r.local().to_string()
    });
    assert_eq!(
        (conn.get("orig_dst"), conn.get("reason")),
        (dst.to_string().as_str(), "netfilter")
    );
    assert_eq!(
        servers
            .wait_from(conn.get("upstream_local").parse().unwrap())
            .received,
        4096
    );
}
