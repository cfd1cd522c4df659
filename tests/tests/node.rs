//! Privileged tests of the node fixture (`egress_tests::node`): pods enrolled by the CNI
//! plugins as a runtime enrolls them, each in its own network namespace, reach stand-ins in
//! the ext namespace from their own addresses; removing pods and dropping the node leave
//! nothing behind.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
};

use egress_tests::{
    Servers, TempDir, checked,
    node::{CniCommand, EXT_V4, EXT_V6, Node, Pod},
    privileged,
};
use serde_json::json;

/// The names `ip netns list` shows.
fn netns_list() -> Vec<String> {
    checked(Command::new("ip").args(["netns", "list"]))
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// The interfaces of the root network namespace (`ip link` there).
fn root_links() -> Vec<String> {
    checked(Command::new("ip").args(["-o", "link", "show"]))
        .lines()
        .filter_map(|l| Some(l.split(": ").nth(1)?.split('@').next()?.to_owned()))
        .collect()
}

/// `curl http://ADDR/` from the pod: the body (the address the server was reached at) and the
/// local address curl connected from.
fn curl(pod: &Pod, addr: SocketAddr) -> (String, String) {
    let out = checked(pod.command("curl").args([
        "-sS",
        "-g",
        "--max-time",
        "10",
        "-w",
        "\n%{local_ip}",
        &format!("http://{addr}/"),
    ]));
    let (body, local) = out
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("curl {addr}: {out:?}"));
    (body.to_owned(), local.to_owned())
}

#[test]
fn pods_reach_stand_ins_in_ext_from_their_own_addresses() {
    if !privileged("pods_reach_stand_ins_in_ext_from_their_own_addresses") {
        return;
    }
    let node = Node::new("smoke");
    let a = node.add_pod("default", "client-a");
    let b = node.add_pod("other", "client-b");
    assert_ne!(a.ipv4, b.ipv4);
    assert_ne!(a.ipv6, b.ipv6);
    let servers = Servers::new();
    let ext = node.ext();
    let families = [IpAddr::from(EXT_V4), IpAddr::from(EXT_V6)].map(|ip| {
        let at = SocketAddr::new(ip, 0);
        (
            servers.echo_on(ext.listen(at)),
            servers.whoami_on(ext.listen(at)),
            servers.http_on(ext.listen(at)),
        )
    });
    for pod in [&a, &b] {
        let who = format!("pod {}/{}", pod.sandbox.namespace, pod.sandbox.name);
        for ((echo, whoami, http), src) in families
            .into_iter()
            .zip([IpAddr::from(pod.ipv4), IpAddr::from(pod.ipv6)])
        {
            let r = pod.probe(&["echo", &echo.to_string(), "1000"]);
            assert_eq!(r.code, Some(0), "{who} to {echo}: {r:?}");
            assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
            let local = r.local();
            assert_eq!(local.ip(), src, "{who} connected to {echo} from {local}");
            let seen = servers.wait_from(local);
            assert_eq!((seen.local, seen.received), (echo, 1000), "{seen:?}");

            let r = pod.probe(&["hold", "1", &whoami.to_string()]);
            assert_eq!(r.code, Some(0), "{who} to {whoami}: {r:?}");
            servers.wait(&format!("a connection from {src} to {whoami}"), |s| {
                s.peer.ip() == src && s.local == whoami
            });

            let (body, from) = curl(pod, http);
            assert_eq!(body, http.to_string(), "{who}: curl {http}");
            assert_eq!(from, src.to_string(), "{who}: curl {http}");
        }
        let check = node.cni(CniCommand::Check, pod);
        assert!(check.success(), "{check}");
    }
    let names = [
        node.netns().name(),
        ext.name(),
        a.sandbox.netns.name(),
        b.sandbox.netns.name(),
    ]
    .map(str::to_owned);
    let ipam = node.ipam_dir().to_owned();
    assert!(netns_list().contains(&names[2]), "{:?}", netns_list());
    // The node's links are made in its namespaces, never in the root one.
    let root = root_links();
    for link in ["cni0", "ext0", "node0"] {
        assert!(
            !root.contains(&link.to_owned()),
            "{link} in the root namespace: {root:?}"
        );
    }
    drop(servers);
    drop(node);
    let left: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!ipam.exists(), "{} left behind", ipam.display());
}

#[test]
fn pods_are_removed_with_del_before_or_after_their_namespace() {
    if !privileged("pods_are_removed_with_del_before_or_after_their_namespace") {
        return;
    }
    let node = Node::new("remove");
    let a = node.add_pod("default", "del-first");
    let b = node.add_pod("default", "netns-first");
    let c = node.add_pod("default", "del-only");
    for pod in [&a, &b, &c] {
        assert!(node.reserved(pod.ipv4.into()) && node.reserved(pod.ipv6.into()));
    }

    // DEL, then the namespace.
    node.remove_pod(&a);
    assert!(!netns_list().contains(&a.sandbox.netns.name().to_owned()));
    assert!(!node.reserved(a.ipv4.into()) && !node.reserved(a.ipv6.into()));

    // The namespace, then DEL: the plugins cope with a namespace that is gone.
    node.delete_netns(&b);
    assert!(!netns_list().contains(&b.sandbox.netns.name().to_owned()));
    let check = node.cni(CniCommand::Check, &b);
    assert!(
        !check.success(),
        "CHECK passed without a namespace: {check}"
    );
    node.remove_pod(&b);
    assert!(!node.reserved(b.ipv4.into()) && !node.reserved(b.ipv6.into()));

    // DEL alone: the namespace stays, its interface and addresses do not.
    node.cni(CniCommand::Del, &c).assert_ok();
    assert!(netns_list().contains(&c.sandbox.netns.name().to_owned()));
    assert!(!node.reserved(c.ipv4.into()));
    let links = checked(c.command("ip").args(["-o", "link", "show"]));
    assert!(!links.contains("eth0"), "eth0 is still there: {links}");

    // A pod added now gets an address again (host-local hands out freed ones later on).
    let d = node.add_pod("default", "after");
    assert!(node.reserved(d.ipv4.into()));
}

#[test]
fn a_chained_plugin_from_another_directory_runs_after_bridge() {
    if !privileged("a_chained_plugin_from_another_directory_runs_after_bridge") {
        return;
    }
    // As egress-cni will come: a plugin of its own name in a directory of its own. Here it is
    // Debian's tuning, which refuses to run without the bridge's result as `prevResult`.
    let bin = TempDir::new("cni-bin");
    let plugin = bin.path().join("egress-test-tuning");
    std::os::unix::fs::symlink("/usr/lib/cni/tuning", &plugin)
        .unwrap_or_else(|e| panic!("linking {}: {e}", plugin.display()));
    let node = Node::builder("chain")
        .cni_dir(bin.path())
        .chain(json!({
            "type": "egress-test-tuning",
            "sysctl": {"net.ipv4.conf.eth0.arp_notify": "1"},
            "dataDir": bin.path().join("state"),
        }))
        .build();
    let pod = node.add_pod("default", "tuned");
    let set = checked(
        pod.command("cat")
            .arg("/proc/sys/net/ipv4/conf/eth0/arp_notify"),
    );
    assert_eq!(set.trim(), "1", "tuning did not run in the pod");
    node.cni(CniCommand::Check, &pod).assert_ok();

    // A failure names the plugin that answered, and what it said.
    let again = node.cni(CniCommand::Add, &pod);
    assert!(!again.success(), "a second ADD passed: {again}");
    assert_eq!(again.plugin, "bridge", "{again}");
    let msg = again.json()["msg"].as_str().unwrap_or_default().to_owned();
    assert!(msg.contains("already exists"), "{again}");
}
