//! What deploy/ and `egress cni install` give a cluster: manifests the Kubernetes API accepts,
//! a DaemonSet that runs flags the binary has with a configuration it loads, and the CNI plugin
//! kept chained when the pod network rewrites its configuration.
//!
//! No root needed: the manifests are checked offline (`kubernetes-validate`, which
//! `cargo xtask setup` installs with pip), the CNI directories are temporary ones.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use egress_tests::{TempDir, cannot_run, container::CAPABILITIES, egress_bin};
use serde_json::{Value, json};

/// Kubernetes versions the manifests are validated against: the oldest with every field they
/// use (`appArmorProfile` is 1.30's) and a recent one; both ship with kubernetes-validate.
const KUBERNETES: &[&str] = &["1.30.0", "1.34.0"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every `*.yaml` under deploy/.
fn manifests() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no manifest in deploy/");
    v
}

/// Every document of every manifest, as JSON.
fn documents() -> Vec<Value> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    for path in manifests() {
        let text = std::fs::read_to_string(&path).unwrap();
        for de in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(de)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/"))
}

#[test]
fn every_manifest_validates_against_the_kubernetes_api_schemas() {
    let test = "every_manifest_validates_against_the_kubernetes_api_schemas";
    let have = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        cannot_run(
            test,
            "the kubernetes-validate Python package is missing (`cargo xtask setup` installs it)",
        );
        return;
    }
    for path in manifests() {
        for version in KUBERNETES {
            let o = Command::new("python3")
                .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
                .args(["--kubernetes-version", version])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{} against Kubernetes {version}:\n{}{}",
                path.display(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

/// The flags `egress SUBCOMMAND... --help` lists.
fn flags_of(subcommand: &[&str]) -> Vec<String> {
    let o = Command::new(egress_bin())
        .args(subcommand)
        .arg("--help")
        .output()
        .expect("running egress");
    assert!(o.status.success(), "egress {subcommand:?} --help failed");
    // Option lines only (`  -h, --help`, `      --config <CONFIG>`), not flags the
    // descriptions mention.
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with('-'))
        .flat_map(|l| {
            l.split_whitespace()
                .take_while(|w| w.starts_with('-') || w.starts_with('<'))
                .filter(|w| w.starts_with("--"))
                .map(|w| w.trim_end_matches(',').to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Each container's command line from `egress` on: (subcommand words, flags given).
fn egress_commands(pod: &Value) -> Vec<(String, Vec<String>, Vec<String>)> {
    let mut out = Vec::new();
    for list in ["initContainers", "containers"] {
        for c in pod[list].as_array().into_iter().flatten() {
            let words: Vec<String> = c["command"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(c["args"].as_array().into_iter().flatten())
                .map(|w| w.as_str().expect("command words are strings").to_owned())
                .collect();
            let Some(at) = words.iter().position(|w| w == "egress") else {
                continue;
            };
            let rest = &words[at + 1..];
            let sub: Vec<String> = rest
                .iter()
                .take_while(|w| !w.starts_with('-'))
                .cloned()
                .collect();
            let flags = rest
                .iter()
                .filter(|w| w.starts_with("--"))
                .map(|w| w.split('=').next().unwrap().to_owned())
                .collect();
            out.push((c["name"].as_str().unwrap().to_owned(), sub, flags));
        }
    }
    out
}

#[test]
fn the_daemonset_runs_flags_the_binary_has_with_a_configuration_it_loads() {
    let docs = documents();
    let ds = find(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let commands = egress_commands(pod);
    let names: Vec<&str> = commands.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["install-cni", "egress", "cni-watch"]);
    for (name, sub, flags) in &commands {
        let sub: Vec<&str> = sub.iter().map(String::as_str).collect();
        let known = flags_of(&sub);
        for f in flags {
            assert!(
                known.contains(f),
                "container {name}: `egress {}` has no flag {f} (egress {} --help lists {known:?})",
                sub.join(" "),
                sub.join(" ")
            );
        }
    }
    let (_, sub, _) = &commands[1];
    assert_eq!(sub, &["run"]);

    // The agent's --config is the ConfigMap's file where the pod mounts it, and it loads.
    let agent = &pod["containers"][0];
    let words: Vec<&str> = agent["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    let config = words[words.iter().position(|w| *w == "--config").unwrap() + 1];
    let mount = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| config.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("{config} is on no volume of the agent"));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let cm_name = volume["configMap"]["name"].as_str().expect("a ConfigMap");
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == cm_name)
        .unwrap_or_else(|| panic!("no ConfigMap {cm_name}"));
    let file = Path::new(config).file_name().unwrap().to_str().unwrap();
    let mesh = cm["data"][file]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {cm_name} has no {file}"));
    assert!(
        mesh.contains("failureMode: closed"),
        "the shipped configuration fails closed"
    );
    let dir = TempDir::new("deploy-config");
    let path = dir.path().join(file);
    std::fs::write(&path, mesh).unwrap();
    let o = Command::new(egress_bin())
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the ConfigMap's {file} does not load:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );

    // The capabilities the container tests give the agent are the manifest's.
    let caps: Vec<&str> = agent["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(caps, CAPABILITIES);
    assert_eq!(
        agent["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    // No host ports: the surge pod of a rolling update must fit beside the old one.
    for c in pod["containers"].as_array().unwrap() {
        assert!(c.get("ports").is_none(), "{} declares ports", c["name"]);
    }
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
}

/// `egress cni install --watch` in the background; SIGTERM on drop.
struct Watch(Child);

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn chained(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["plugins"].as_array().cloned())
        .is_some_and(|p| {
            p.last()
                == Some(
                    &json!({"type": "egress-cni", "adminSocket": "/var/run/egress/admin.sock",
                                "capabilities": {"dns": true}}),
                )
        })
}

/// Wait (at most 10 s) until `path` chains the plugin last.
fn wait_chained(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !chained(path) {
        assert!(
            Instant::now() < deadline,
            "{what}: {} was not chained within 10 s: {:?}",
            path.display(),
            std::fs::read_to_string(path)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Replace a file as a CNI agent does: a temporary file, then rename.
fn rewrite(path: &Path, conf: &Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(conf).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn cni_install_watch_keeps_the_plugin_chained_and_uninstall_removes_it() {
    let dir = TempDir::new("cni");
    let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    let calico = json!({
        "name": "k8s-pod-network", "cniVersion": "0.3.1",
        "plugins": [
            {"type": "calico", "ipam": {"type": "calico-ipam"}},
            {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
        ]
    });
    let primary = conf.join("10-calico.conflist");
    std::fs::write(&primary, calico.to_string()).unwrap();
    // The plugin beside the binary under test, as the image has it.
    let plugin = egress_bin().with_file_name("egress-cni");
    let watch = Watch(
        Command::new(egress_bin())
            .args(["cni", "install", "--watch", "--cni-bin-dir"])
            .arg(&bin)
            .arg("--cni-conf-dir")
            .arg(&conf)
            .arg("--plugin")
            .arg(&plugin)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting egress cni install --watch"),
    );
    wait_chained(&primary, "at start");
    let got = read(&primary);
    assert_eq!(
        got["plugins"].as_array().unwrap()[..2],
        calico["plugins"].as_array().unwrap()[..]
    );
    assert_eq!(got["name"], "k8s-pod-network");
    assert_eq!(
        std::fs::read(bin.join("egress-cni")).unwrap(),
        std::fs::read(&plugin).unwrap()
    );

    // The pod network's agent writes its file again, without the entry.
    rewrite(&primary, &calico);
    wait_chained(&primary, "after the primary CNI rewrote its file");
    // In place this time (truncate and write), as some do.
    std::fs::write(&primary, calico.to_string()).unwrap();
    wait_chained(&primary, "after an in-place rewrite");

    // A new file that sorts first is the primary network from now on: a single-plugin .conf,
    // which becomes a .conflist.
    let first = conf.join("05-bridge.conf");
    rewrite(
        &first,
        &json!({"cniVersion": "1.0.0", "name": "bridge", "type": "bridge"}),
    );
    let list = conf.join("05-bridge.conflist");
    wait_chained(&list, "after a new primary file appeared");
    assert!(
        !first.exists(),
        "{} is left beside its .conflist",
        first.display()
    );

    // Stopping the watch leaves the entry: pods wait for an agent rather than start unmediated.
    drop(watch);
    assert!(chained(&list));

    let o = Command::new(egress_bin())
        .args(["cni", "uninstall", "--cni-bin-dir"])
        .arg(&bin)
        .arg("--cni-conf-dir")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!chained(&list) && !chained(&primary));
    assert_eq!(read(&primary)["plugins"], calico["plugins"]);
    assert!(!bin.join("egress-cni").exists());
}
