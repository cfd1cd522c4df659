//! Privileged tests of configuration reloads: the live datapath follows the files, nothing both
//! configurations allow fails during the switch, and a broken edit changes nothing.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use egress_tests::{
    Agent, AgentOpts, Cgroup, Servers, egress_bin, free_port, privileged, probe, probe_bin,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn allow_any(exclude: &str) -> String {
    format!(
        "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {{name: d}}\nspec:\n  \
         outboundTrafficPolicy: {{mode: ALLOW_ANY}}\n  interception:\n    \
         includeOutboundIPRanges: [127.20.0.0/16]\n    excludeOutboundIPRanges: [{exclude}]\n"
    )
}

#[test]
fn an_invalid_edit_keeps_the_configuration_in_force_and_the_fix_applies() {
    if !privileged("an_invalid_edit_keeps_the_configuration_in_force_and_the_fix_applies") {
        return;
    }
    let cg = Cgroup::new("invalid-edit");
    let agent = Agent::start(AgentOpts {
        config: &allow_any("127.20.9.0/24"),
        cgroup: &cg,
        inside: false,
        extra: vec![],
    });
    let servers = Servers::new();
    let dst = servers.echo(sa(&format!("127.20.5.10:{}", free_port())));
    let through_agent = |why: &str| {
        let r = probe(Some(&cg), &["echo", &dst.to_string(), "8"]);
        assert_eq!(r.get("match").as_deref(), Some("true"), "{why}: {r:?}");
        let seen = servers.wait_from(
            agent
                .wait_conn(why, |c| c.get("peer") == r.local().to_string())
                .get("upstream_local")
                .parse()
                .unwrap(),
        );
        assert_eq!(seen.received, 8);
    };
    through_agent("before the edit");

    // A broken edit, written in place as an editor without atomic saves would.
    let n = agent.logs().len();
    agent.overwrite_config(&allow_any("127.20.5.0/33"));
    let rejected = agent.wait_log(n, "configuration rejected");
    assert!(
        rejected.contains("generation 1 stays in force"),
        "{rejected}"
    );
    let file = agent.config_path().display().to_string();
    let error = format!(
        "{file} doc 1 EgressConfig default/d: spec.interception.excludeOutboundIPRanges[0]: \"127.20.5.0/33\" is not an IP address or CIDR"
    );
    assert!(
        agent.logs()[n..].iter().any(|l| l.contains(&error)),
        "{:?}",
        &agent.logs()[n..]
    );
    let admin = agent.admin_port.to_string();
    let status = agent.egress(&["status", "--admin-port", &admin]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("generation: 1\n") && status.contains(&error),
        "{status}"
    );
    let reload = agent.egress(&["reload", "--admin-port", &admin]);
    assert!(!reload.status.success());
    assert!(String::from_utf8_lossy(&reload.stderr).contains(&error));
    // /config_dump says the same, with what is in force and its maps.
    let dump = agent.config_dump();
    assert_eq!(dump["generation"], 1, "{dump}");
    // The edit and the explicit reload (an editor's write may reach the watcher as two).
    assert!(dump["reload_failures"].as_u64() >= Some(2), "{dump}");
    assert!(
        dump["last_rejected"]
            .as_str()
            .is_some_and(|e| e.contains(&error)),
        "{dump}"
    );
    assert_eq!(dump["mode"], "ALLOW_ANY", "{dump}");
    let entries = |dump: &serde_json::Value, map: &str| {
        dump["maps"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["map"] == map))
            .map(|m| m["entries"].clone())
    };
    assert_eq!(entries(&dump, "EXCLUDE_V4"), Some(1.into()), "{dump}");
    assert_eq!(dump["workloads"][0]["workload"], "default/egress", "{dump}");
    through_agent("after the broken edit");
    // Other files beside the configuration (the agent's own log, say) cause no reload.
    let n = agent.logs().len();
    let sibling = agent.config_path().with_extension("log");
    for i in 0..5 {
        std::fs::write(&sibling, format!("line {i}\n")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let _ = std::fs::remove_file(&sibling);
    let reloads: Vec<String> = agent.logs()[n..]
        .iter()
        .filter(|l| l.contains("configuration rejected"))
        .cloned()
        .collect();
    assert!(reloads.is_empty(), "{reloads:?}");

    // The fix excludes the destination: it goes straight out from then on.
    let n = agent.logs().len();
    agent.overwrite_config(&allow_any("127.20.5.0/24"));
    agent.wait_log(n, "applied configuration generation 2");
    let r = probe(Some(&cg), &["echo", &dst.to_string(), "8"]);
    assert_eq!(servers.wait_from(r.local()).received, 8);
    let status = agent.egress(&["status", "--admin-port", &admin]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains("generation: 2\n") && !status.contains("rejected"),
        "{status}"
    );
    let dump = agent.config_dump();
    assert_eq!(dump["generation"], 2, "{dump}");
    assert!(dump["last_rejected"].is_null(), "{dump}");

    // Nothing changed since: an explicit reload says so, SIGHUP changes nothing either.
    let reload = agent.egress(&["reload", "--admin-port", &admin]);
    assert_eq!(String::from_utf8_lossy(&reload.stdout).trim(), "unchanged");
    let n = agent.logs().len();
    agent.signal(libc::SIGHUP);
    let r = probe(Some(&cg), &["echo", &dst.to_string(), "8"]);
    assert_eq!(servers.wait_from(r.local()).received, 8);
    assert!(
        !agent.logs()[n..]
            .iter()
            .any(|l| l.contains("applied configuration"))
    );
}

/// Under REGISTRY_ONLY, variant A allows `only_a`, variant B allows `only_b`, both allow `both`.
fn variant(a: bool, port: u16) -> String {
    let (only, extra) = if a {
        ("127.20.2.10", "127.20.200.0/24")
    } else {
        ("127.20.3.10", "127.20.201.0/24")
    };
    format!(
        "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {{name: d}}\nspec:\n  \
         outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}\n  interception:\n    \
         includeOutboundIPRanges: [127.20.0.0/16]\n    excludeOutboundIPRanges: [{extra}]\n---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: both}}\nspec:\n  \
         hosts: [both.example]\n  addresses: [127.20.1.0/24]\n  ports: [{{number: {port}, name: tcp, protocol: TCP}}]\n---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: only}}\nspec:\n  \
         hosts: [only.example]\n  addresses: [{only}]\n  ports: [{{number: {port}, name: tcp, protocol: TCP}}]\n"
    )
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[test]
fn rewriting_the_configuration_under_load_fails_no_connection_both_versions_allow() {
    if !privileged("rewriting_the_configuration_under_load_fails_no_connection_both_versions_allow")
    {
        return;
    }
    const SECS: u64 = 12;
    const RATE: u64 = 250;
    const REWRITES: usize = 20;
    let cg = Cgroup::new("reload-load");
    let port = free_port();
    let agent = Agent::start(AgentOpts {
        config: &variant(true, port),
        cgroup: &cg,
        inside: false,
        extra: vec![],
    });
    let servers = Servers::new();
    let both = servers.echo(sa(&format!("127.20.1.10:{port}")));
    let only_a = servers.echo(sa(&format!("127.20.2.10:{port}")));
    let only_b = servers.echo(sa(&format!("127.20.3.10:{port}")));
    let in_cgroup = |args: &[String]| {
        Command::new(egress_bin())
            .args(["exec", "--cgroup", cg.path.to_str().unwrap(), "--"])
            .arg(probe_bin())
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let load = in_cgroup(&[
        "load".into(),
        SECS.to_string(),
        RATE.to_string(),
        both.to_string(),
    ]);
    let watch = in_cgroup(&[
        "watch".into(),
        SECS.to_string(),
        "20".into(),
        only_a.to_string(),
        only_b.to_string(),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    // (when written, variant A?) for every rewrite, alternating B, A, B, ...
    let mut writes = vec![(0u128, true)];
    for i in 0..REWRITES {
        let a = i % 2 == 1;
        writes.push((unix_ms(), a));
        agent.write_config(&variant(a, port));
        std::thread::sleep(Duration::from_millis(500));
    }
    let load = load.wait_with_output().unwrap();
    let watch = watch.wait_with_output().unwrap();
    let load = String::from_utf8_lossy(&load.stdout).into_owned();
    let watch = String::from_utf8_lossy(&watch.stdout).into_owned();

    // Every configuration was applied, one generation each.
    let applied = agent
        .logs()
        .iter()
        .filter(|l| l.contains("applied configuration generation"))
        .count();
    assert_eq!(applied, REWRITES, "{:?}", agent.logs());

    // Not one connection that both versions allow failed, at a steady 200+ a second.
    let last = load.lines().last().unwrap_or("");
    let field = |k: &str| -> f64 {
        last.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    println!("load: {last}");
    assert_eq!(field("failed"), 0.0, "{load}");
    assert!(
        field("seconds") >= 10.0 && field("attempts") / field("seconds") >= 200.0,
        "{load}"
    );

    // The destinations only one version allows follow the version in force: each rewrite took
    // effect before the next one, half a second later.
    let mut seen: Vec<(u128, SocketAddr, bool)> = Vec::new();
    for l in watch.lines() {
        let f: BTreeMap<&str, &str> = l
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        let outcome = f["outcome"];
        assert!(outcome == "allowed" || outcome == "denied", "{l}");
        seen.push((
            f["t"].parse().unwrap(),
            f["dst"].parse().unwrap(),
            outcome == "allowed",
        ));
    }
    for (i, (from, a)) in writes.iter().enumerate() {
        let until = writes.get(i + 1).map_or(u128::MAX, |w| w.0);
        for dst in [only_a, only_b] {
            let allowed = (dst == only_a) == *a;
            let last = seen
                .iter()
                .rfind(|(t, d, _)| *d == dst && *t >= *from && *t < until);
            let Some((t, _, got)) = last else {
                panic!(
                    "no observation of {dst} while version {} was in force",
                    if *a { "A" } else { "B" }
                );
            };
            assert_eq!(
                *got,
                allowed,
                "{dst} at {t}, {} ms after rewrite {i}",
                t - from
            );
        }
    }
}

/// `count` distinct /32s in 10.0.0.0/8 (configuration data only: no traffic goes there).
fn many_cidrs(count: u32, changed: bool) -> String {
    let mut list: Vec<String> = (0..count)
        .map(|i| format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    if changed {
        list[0] = "10.255.255.255/32".to_owned();
    }
    // Istio's annotation spelling: one comma-separated string.
    format!(
        "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {{name: d}}\nspec:\n  \
         interception:\n    includeOutboundIPRanges: [127.20.0.0/16]\n    \
         excludeOutboundIPRanges: \"{}\"\n",
        list.join(",")
    )
}

#[test]
fn a_hundred_thousand_cidrs_load_apply_and_change_one_at_a_time() {
    if !privileged("a_hundred_thousand_cidrs_load_apply_and_change_one_at_a_time") {
        return;
    }
    let cg = Cgroup::new("100k");
    let agent = Agent::start(AgentOpts {
        config: &many_cidrs(100_000, false),
        cgroup: &cg,
        inside: false,
        extra: vec![],
    });
    let programmed = agent.wait_log(0, "programmed the maps in");
    println!(
        "100,000 CIDRs: {}",
        &programmed[programmed.find("programmed").unwrap()..]
    );
    assert!(
        agent
            .explain("10.1.134.159:80", &[])
            .contains("excludeOutboundIPRanges 10.1.134.159/32")
    );
    let admin = agent.admin_port.to_string();
    let status =
        String::from_utf8(agent.egress(&["status", "--admin-port", &admin]).stdout).unwrap();
    assert!(status.contains("exclude_v4=100000"), "{status}");

    let n = agent.logs().len();
    agent.write_config(&many_cidrs(100_000, true));
    let applied = agent.wait_log(n, "applied configuration generation 2");
    println!(
        "one CIDR changed: {}",
        &applied[applied.find("applied").unwrap()..]
    );
    assert!(applied.contains("; 2 changes applied in"), "{applied}");
    assert!(agent.explain("10.0.0.0:80", &[]).contains("[not-included]"));
    assert!(
        agent
            .explain("10.255.255.255:80", &[])
            .contains("[excluded-cidr]")
    );
}

#[test]
fn a_configuration_that_does_not_fit_is_refused_with_the_numbers() {
    if !privileged("a_configuration_that_does_not_fit_is_refused_with_the_numbers") {
        return;
    }
    let cg = Cgroup::new("capacity");
    let r = egress_tests::run_refused(&many_cidrs(2_000, false), &cg, &["--max-cidrs", "1000"]);
    assert!(
        r.stderr
            .contains("2000 IPv4 exclude CIDRs do not fit in maps of 1000 (raise --max-cidrs)"),
        "{}",
        r.stderr
    );
}

#[test]
fn probes_answer_503_naming_what_is_pending_until_the_agent_serves() {
    if !privileged("probes_answer_503_naming_what_is_pending_until_the_agent_serves") {
        return;
    }
    let cg = Cgroup::new("health");
    // A large configuration: loading and programming it takes a while.
    let agent = Agent::spawn(AgentOpts {
        config: &many_cidrs(100_000, false),
        cgroup: &cg,
        inside: false,
        extra: vec![],
    });
    let mut seen: Vec<(u16, String)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.last().is_none_or(|(code, _)| *code != 200) {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready after 60 s: {seen:?}\n{}",
            agent.logs().join("\n")
        );
        // Refused until the agent has bound the port.
        if let Ok(answer) = agent.probe_health("/healthz/ready") {
            seen.push(answer);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let (first, _) = &seen[0];
    assert_eq!(*first, 503, "{seen:?}");
    for (code, body) in &seen[..seen.len() - 1] {
        assert_eq!(*code, 503, "{seen:?}");
        assert!(body.starts_with("not ready: "), "{body:?}");
    }
    assert!(
        seen.iter()
            .any(|(_, b)| b == "not ready: loading the configuration\n"),
        "{seen:?}"
    );
    // Ready means the maps were programmed and the programs attached.
    assert!(
        agent
            .logs()
            .iter()
            .any(|l| l.contains("programmed the maps in")),
        "{}",
        agent.logs().join("\n")
    );
    agent.wait_ready();
    assert_eq!(
        agent.probe_health("/healthz/live").unwrap(),
        (200, "live\n".to_owned())
    );
    assert_eq!(agent.probe_health("/healthz/other").unwrap().0, 404);
}
