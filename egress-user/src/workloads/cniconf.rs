//! Chaining `egress-cni` into the node's CNI configuration, as `egress cni install` does (and
//! undoing it, for `egress cni uninstall` and `egress uninstall`).
//!
//! The container runtime uses the lexicographically first `*.conflist`, `*.conf` or `*.json`
//! file of its configuration directory (libcni's `ConfFiles`, sorted): the primary network.
//! `egress-cni` is appended to that file's `plugins`; a single-plugin `.conf` becomes a
//! `.conflist` with the same stem holding the original plugin, as libcni's
//! `ConfListFromConf` and Istio's install-cni do. Every other field and plugin is kept, and
//! every file is replaced atomically (a temporary file, then rename), so a runtime reading the
//! directory meanwhile sees the old file or the new one, never half of one.
//!
//! The pure part works on `serde_json::Value`s; the rest reads and writes the files.

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use log::{info, warn};
use serde_json::{Map, Value, json};

/// The plugin's `type`, which is also its binary's name in the CNI bin directory.
pub const PLUGIN: &str = "egress-cni";

/// The extensions the runtime reads network configurations from.
const EXTENSIONS: [&str; 3] = ["conflist", "conf", "json"];

/// The chained plugin's entry: `{"type": "egress-cni", "adminSocket": PATH, "capabilities":
/// {"dns": true}}`. The `dns` capability has the runtime pass the pod's DNS configuration as
/// `runtimeConfig.dns` (containerd's CRI does), whose `servers` are the pod's nameservers.
pub fn entry(admin_socket: &Path) -> Value {
    json!({
        "type": PLUGIN,
        "adminSocket": admin_socket.display().to_string(),
        "capabilities": {"dns": true}
    })
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN)
}

/// The configuration `conf` with `entry` chained, or `None` when it is there already. An
/// `egress-cni` entry that differs (another admin socket) is replaced where it is. A
/// configuration without `plugins` (a `.conf`) becomes a list holding it, then the entry.
pub fn with_entry(conf: &Value, entry: &Value) -> Result<Option<Value>, String> {
    let Value::Object(fields) = conf else {
        return Err("not a JSON object".into());
    };
    match fields.get("plugins") {
        Some(Value::Array(plugins)) => {
            let mut plugins = plugins.clone();
            match plugins.iter().position(is_ours) {
                Some(i) if plugins[i] == *entry => return Ok(None),
                Some(i) => plugins[i] = entry.clone(),
                None => plugins.push(entry.clone()),
            }
            let mut out = fields.clone();
            out.insert("plugins".into(), Value::Array(plugins));
            Ok(Some(Value::Object(out)))
        }
        Some(_) => Err("\"plugins\" is not a list".into()),
        None if fields.get("type").is_some_and(Value::is_string) => {
            if is_ours(conf) {
                return Err(format!(
                    "it configures {PLUGIN} alone: chain it after the pod network's plugins"
                ));
            }
            let mut list = Map::new();
            for key in ["cniVersion", "name"] {
                if let Some(v) = fields.get(key) {
                    list.insert(key.into(), v.clone());
                }
            }
            list.insert("plugins".into(), json!([conf, entry]));
            Ok(Some(Value::Object(list)))
        }
        None => Err("neither a \"plugins\" list nor a plugin \"type\"".into()),
    }
}

/// The configuration `conf` without any `egress-cni` entry, or `None` when it has none.
pub fn without_entry(conf: &Value) -> Option<Value> {
    let plugins = conf.get("plugins")?.as_array()?;
    if !plugins.iter().any(is_ours) {
        return None;
    }
    let mut out = conf.clone();
    out["plugins"] = Value::Array(plugins.iter().filter(|p| !is_ours(p)).cloned().collect());
    Some(out)
}

/// The network configuration files of `dir` in the order the runtime considers them.
pub fn conf_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the CNI configuration directory {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| EXTENSIONS.iter().any(|x| e == *x))
                && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The primary network's configuration file: the first of `conf_files`.
pub fn primary(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(conf_files(dir)?.into_iter().next())
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// Replace `path` with `bytes` atomically: a hidden temporary file beside it (whose name the
/// runtime does not read as a configuration), flushed, given `mode`, then renamed over it.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().context("a file path has a directory")?;
    let name = path.file_name().context("a file path has a name")?;
    let tmp = dir.join(format!(".{}.egress-tmp", name.to_string_lossy()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::from(e).context(format!("writing {}", path.display()))
    })
}

fn write_json(path: &Path, conf: &Value, mode: u32) -> Result<()> {
    let mut text = serde_json::to_string_pretty(conf).expect("a JSON value serialises");
    text.push('\n');
    write_atomically(path, text.as_bytes(), mode)
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777)
}

/// What `chain` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Chained {
    /// The entry was added (or its admin socket changed) in this file.
    Written(PathBuf),
    /// The primary configuration already chains the plugin as asked.
    Already(PathBuf),
    /// The directory holds no network configuration yet.
    NoConfig,
}

/// Chain `egress-cni` (talking to `admin_socket`) into the primary configuration of
/// `conf_dir`. A `.conf` is rewritten as `<stem>.conflist` and removed.
pub fn chain(conf_dir: &Path, admin_socket: &Path) -> Result<Chained> {
    let Some(path) = primary(conf_dir)? else {
        return Ok(Chained::NoConfig);
    };
    let conf = read_json(&path)?;
    let new = with_entry(&conf, &entry(admin_socket))
        .map_err(|why| anyhow::anyhow!("{}: {why}", path.display()))?;
    let Some(new) = new else {
        return Ok(Chained::Already(path));
    };
    let mode = mode_of(&path);
    if conf.get("plugins").is_some() {
        write_json(&path, &new, mode)?;
        return Ok(Chained::Written(path));
    }
    let list = path.with_extension("conflist");
    write_json(&list, &new, mode)?;
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(Chained::Written(list))
}

/// Remove every `egress-cni` entry from the network configurations of `conf_dir` (the
/// primary one may have changed since it was chained); the files it changed. A missing
/// directory has nothing to remove.
pub fn unchain(conf_dir: &Path) -> Result<Vec<PathBuf>> {
    if !conf_dir.exists() {
        return Ok(Vec::new());
    }
    let mut changed = Vec::new();
    for path in conf_files(conf_dir)? {
        // A file that is not ours to understand is not ours to change.
        let Ok(conf) = read_json(&path) else {
            continue;
        };
        if let Some(new) = without_entry(&conf) {
            write_json(&path, &new, mode_of(&path))?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// Install the plugin binary `src` as `bin_dir/egress-cni` (mode 0755), atomically, unless
/// the same bytes are there already; its path.
pub fn install_plugin(src: &Path, bin_dir: &Path) -> Result<PathBuf> {
    let bytes =
        std::fs::read(src).with_context(|| format!("reading the plugin {}", src.display()))?;
    let dst = bin_dir.join(PLUGIN);
    if std::fs::read(&dst).is_ok_and(|have| have == bytes) && mode_of(&dst) == 0o755 {
        return Ok(dst);
    }
    write_atomically(&dst, &bytes, 0o755)?;
    Ok(dst)
}

/// Remove `bin_dir/egress-cni`; whether it was there.
pub fn remove_plugin(bin_dir: &Path) -> Result<bool> {
    let path = bin_dir.join(PLUGIN);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Chain once and say so when a file was written.
fn chain_logged(conf_dir: &Path, admin_socket: &Path) -> Result<Chained> {
    let done = chain(conf_dir, admin_socket)?;
    if let Chained::Written(p) = &done {
        info!("chained {PLUGIN} into {}", p.display());
    }
    Ok(done)
}

/// `egress cni install`: install the plugin binary and chain it. Without a network
/// configuration in `conf_dir` (the pod network has not written one yet) this fails, naming the
/// directory, so that the kubelet runs it again.
pub fn install(plugin: &Path, bin_dir: &Path, conf_dir: &Path, admin_socket: &Path) -> Result<()> {
    let dst = install_plugin(plugin, bin_dir)?;
    info!("installed {}", dst.display());
    match chain_logged(conf_dir, admin_socket)? {
        Chained::Written(_) => Ok(()),
        Chained::Already(p) => {
            info!("{} already chains {PLUGIN}", p.display());
            Ok(())
        }
        Chained::NoConfig => bail!(
            "{} holds no network configuration (*.conflist, *.conf, *.json) to chain {PLUGIN} \
             into: the pod network has not written one yet",
            conf_dir.display()
        ),
    }
}

/// How often `watch` checks again without being told of a change: a directory replaced
/// whole (its watch goes with it) is noticed this way.
const RECHECK: Duration = Duration::from_secs(30);
/// Changes closer together than this are handled once (a runtime's write, then rename).
const DEBOUNCE: Duration = Duration::from_millis(100);

/// `egress cni install --watch`: keep `egress-cni` chained into the primary configuration of
/// `conf_dir` until SIGTERM or SIGINT. The pod network's own agent may rewrite its file
/// without the entry, or a new file may sort first and become the primary network: either way
/// the entry is added again within a fraction of a second. Stopping leaves the entry in place
/// (pods then fail to start until an agent answers, rather than start unmediated).
pub fn watch(conf_dir: &Path, admin_socket: &Path) -> Result<()> {
    use notify::{RecursiveMode, Watcher as _};
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if ev.is_ok_and(|ev| !ev.kind.is_access()) {
                let _ = tx.send(());
            }
        })?;
        watcher
            .watch(conf_dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", conf_dir.display()))?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        info!("keeping {PLUGIN} chained in {}", conf_dir.display());
        let mut waiting = false;
        loop {
            match chain_logged(conf_dir, admin_socket) {
                Ok(Chained::NoConfig) if !waiting => {
                    waiting = true;
                    info!(
                        "waiting for a network configuration in {}",
                        conf_dir.display()
                    );
                }
                Ok(Chained::NoConfig) => {}
                Ok(_) => waiting = false,
                // A file the pod network is half-way through, or one it got wrong: logged, and
                // tried again on its next change.
                Err(e) => warn!("{e:#}"),
            }
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tokio::time::sleep(RECHECK) => {}
                Some(()) = rx.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
            }
        }
        info!("stopped watching {}", conf_dir.display());
        Ok(())
    })
}

/// `egress cni uninstall`: unchain the plugin from every configuration and remove its binary.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<()> {
    for p in unchain(conf_dir)? {
        info!("removed {PLUGIN} from {}", p.display());
    }
    if remove_plugin(bin_dir)? {
        info!("removed {}", bin_dir.join(PLUGIN).display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calico() -> Value {
        json!({
            "name": "k8s-pod-network",
            "cniVersion": "0.3.1",
            "plugins": [
                {"type": "calico", "log_level": "info", "ipam": {"type": "calico-ipam"},
                 "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
                {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
                {"type": "bandwidth", "capabilities": {"bandwidth": true}}
            ],
            "disableCheck": false
        })
    }

    fn ours() -> Value {
        entry(Path::new("/var/run/egress/admin.sock"))
    }

    #[test]
    fn a_conflist_keeps_every_field_and_plugin_and_gets_the_entry_last() {
        let before = calico();
        let after = with_entry(&before, &ours()).unwrap().unwrap();
        let plugins = after["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 4);
        assert_eq!(plugins[..3], before["plugins"].as_array().unwrap()[..]);
        assert_eq!(plugins[3], ours());
        let mut rest = after.clone();
        rest.as_object_mut().unwrap().remove("plugins");
        let mut was = before.clone();
        was.as_object_mut().unwrap().remove("plugins");
        assert_eq!(rest, was);
        // Key order is kept too (the file reads as it did, plus one line).
        let keys: Vec<&String> = after.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "cniVersion", "plugins", "disableCheck"]);
    }

    #[test]
    fn chaining_twice_changes_nothing_and_another_socket_is_replaced_in_place() {
        let once = with_entry(&calico(), &ours()).unwrap().unwrap();
        assert_eq!(with_entry(&once, &ours()).unwrap(), None);
        let other = entry(Path::new("/run/other.sock"));
        let moved = with_entry(&once, &other).unwrap().unwrap();
        let plugins = moved["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 4);
        assert_eq!(plugins[3], other);
    }

    #[test]
    fn the_entry_asks_for_the_pods_dns_and_an_entry_without_it_is_replaced() {
        assert_eq!(
            ours(),
            json!({"type": "egress-cni", "adminSocket": "/var/run/egress/admin.sock",
                   "capabilities": {"dns": true}})
        );
        // An entry an earlier `egress cni install` wrote, without the capability.
        let mut old = calico();
        old["plugins"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "egress-cni", "adminSocket": "/var/run/egress/admin.sock"}));
        let now = with_entry(&old, &ours()).unwrap().unwrap();
        let plugins = now["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 4);
        assert_eq!(plugins[3]["capabilities"], json!({"dns": true}));
        assert_eq!(with_entry(&now, &ours()).unwrap(), None);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list_holding_it() {
        let conf = json!({"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge",
                          "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"}});
        let list = with_entry(&conf, &ours()).unwrap().unwrap();
        assert_eq!(
            list,
            json!({"cniVersion": "0.4.0", "name": "bridge-net", "plugins": [conf, ours()]})
        );
    }

    #[test]
    fn what_cannot_be_chained_says_why() {
        let bad = |v: Value| with_entry(&v, &ours()).unwrap_err();
        assert_eq!(bad(json!([1])), "not a JSON object");
        assert_eq!(bad(json!({"plugins": {}})), "\"plugins\" is not a list");
        assert!(bad(json!({"name": "x"})).contains("neither"));
        assert!(bad(ours()).contains("alone"));
    }

    #[test]
    fn unchaining_removes_only_the_entry() {
        let chained = with_entry(&calico(), &ours()).unwrap().unwrap();
        assert_eq!(without_entry(&chained).unwrap(), calico());
        assert_eq!(without_entry(&calico()), None);
        assert_eq!(without_entry(&json!({"type": "bridge"})), None);
    }

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let p =
                std::env::temp_dir().join(format!("egress-cniconf-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_first_file_by_name_is_chained_and_a_conf_is_replaced_by_a_conflist() {
        let d = Dir::new("files");
        let sock = Path::new("/var/run/egress/admin.sock");
        assert_eq!(chain(&d.0, sock).unwrap(), Chained::NoConfig);
        std::fs::write(d.0.join("README"), "not a configuration").unwrap();
        std::fs::write(d.0.join("20-other.conflist"), calico().to_string()).unwrap();
        let conf = json!({"cniVersion": "1.0.0", "name": "n", "type": "bridge"});
        std::fs::write(d.0.join("10-bridge.conf"), conf.to_string()).unwrap();
        std::fs::set_permissions(
            d.0.join("10-bridge.conf"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let list = d.0.join("10-bridge.conflist");
        assert_eq!(chain(&d.0, sock).unwrap(), Chained::Written(list.clone()));
        assert_eq!(
            names(&d.0),
            ["10-bridge.conflist", "20-other.conflist", "README"]
        );
        assert_eq!(mode_of(&list), 0o600);
        let written = read_json(&list).unwrap();
        assert_eq!(written["plugins"], json!([conf, ours()]));
        assert_eq!(chain(&d.0, sock).unwrap(), Chained::Already(list.clone()));
        // The other file was never the primary one.
        assert_eq!(read_json(&d.0.join("20-other.conflist")).unwrap(), calico());
        assert_eq!(unchain(&d.0).unwrap(), vec![list.clone()]);
        assert_eq!(read_json(&list).unwrap()["plugins"], json!([conf]));
        assert_eq!(unchain(&d.0).unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn errors_name_the_file() {
        let d = Dir::new("errors");
        let sock = Path::new("/s");
        std::fs::write(d.0.join("10-broken.conflist"), "{\"plugins\": [").unwrap();
        let e = format!("{:#}", chain(&d.0, sock).unwrap_err());
        assert!(e.contains("10-broken.conflist: not valid JSON"), "{e}");
        std::fs::write(d.0.join("05-odd.json"), "{\"name\": \"x\"}").unwrap();
        let e = format!("{:#}", chain(&d.0, sock).unwrap_err());
        assert!(e.contains("05-odd.json: neither a \"plugins\" list"), "{e}");
        let e = format!("{:#}", chain(&d.0.join("missing"), sock).unwrap_err());
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn the_plugin_is_installed_executable_once_and_removed() {
        let d = Dir::new("bin");
        let src = d.0.join("src");
        std::fs::write(&src, b"\x7fELF plugin").unwrap();
        let bin = d.0.join("bin");
        std::fs::create_dir(&bin).unwrap();
        let dst = install_plugin(&src, &bin).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"\x7fELF plugin");
        assert_eq!(mode_of(&dst), 0o755);
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let first = ino(&dst);
        install_plugin(&src, &bin).unwrap();
        assert_eq!(ino(&dst), first, "the same bytes are not written again");
        std::fs::write(&src, b"\x7fELF plugin v2").unwrap();
        install_plugin(&src, &bin).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"\x7fELF plugin v2");
        assert_eq!(names(&bin), ["egress-cni"]);
        assert!(remove_plugin(&bin).unwrap());
        assert!(!remove_plugin(&bin).unwrap());
    }
}
