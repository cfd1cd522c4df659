//! A Kubernetes node built the way a container runtime builds one, for node-mode tests: the
//! node is a network namespace, every pod another, enrolled by running the CNI plugins of the
//! node's network configuration list in order (Debian's `bridge` with `host-local`, then what
//! a test chains after it), as a runtime runs chained plugins. External stand-ins live in a
//! third namespace, `ext`, joined to the node by a veth pair:
//!
//! ```text
//! pod eth0 (198.18.0.x, 2001:db8:1::x) ── cni0 (198.18.0.1, 2001:db8:1::1)   node
//! node ext0 (198.19.0.1, 2001:db8:2::1) ── node0 (198.19.0.2, 2001:db8:2::2)  ext
//! ```
//!
//! Every `Node` is an L3 world of its own, so every node uses the same subnets. Nothing changes
//! in the root network namespace: forwarding is switched on inside the node's namespace only.
//! A node's namespaces, its pods' namespaces and its IPAM state (kept in a temporary directory,
//! never in /var/lib/cni) go when it drops, also when a test panics.

use std::{
    ffi::OsStr,
    fs::File,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
};

use serde_json::{Value, json};

use crate::{ProbeResult, TempDir, checked, probe_bin, unique};

/// The CNI network's name (`name` in every plugin's configuration).
pub const NETWORK: &str = "egress-pods";
/// The pods' subnets, handed out by host-local.
pub const POD_SUBNET_V4: &str = "198.18.0.0/24";
pub const POD_SUBNET_V6: &str = "2001:db8:1::/64";
/// The ext namespace's addresses, where stand-ins listen.
pub const EXT_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
pub const EXT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
/// The node's end of the link to ext, the ext namespace's route to the pods.
const NODE_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const NODE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
/// Where Debian's containernetworking-plugins puts the plugins; always first in CNI_PATH.
const CNI_DIR: &str = "/usr/lib/cni";
/// A plugin still running after this long is stopped (`timeout` exits 124 for it).
const PLUGIN_TIMEOUT_SECS: &str = "60";

/// Numbers the pods of this process, for unique namespace names and container ids.
static PODS: AtomicU32 = AtomicU32::new(0);

/// A network namespace made with `ip netns add`, by name (a handle; its owner deletes it).
#[derive(Clone, Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/NAME`, what a runtime passes as CNI_NETNS.
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    fn open(&self) -> std::io::Result<File> {
        File::open(self.path())
    }

    /// `program`, to be run inside this namespace: the child enters it with setns(2) before
    /// exec. Unlike `ip netns exec`, which mounts a sysfs of the namespace over /sys, this
    /// keeps the caller's mounts: the cgroup2 and bpf file systems under /sys stay in view.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.try_command(program)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.path().display()))
    }

    fn try_command(&self, program: impl AsRef<OsStr>) -> std::io::Result<Command> {
        let ns = self.open()?;
        let mut c = Command::new(program);
        // SAFETY: between fork and exec the closure only calls setns(2), which is
        // async-signal-safe, on a descriptor it owns.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        Ok(c)
    }

    /// Run `f` on a thread of its own that entered this namespace. Sockets keep the namespace
    /// they were made in, so what `f` opens can be used from any thread afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = self
            .open()
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.path().display()));
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns(2) on a descriptor we own; it moves this thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    panic!(
                        "entering network namespace {}: {}",
                        self.name,
                        std::io::Error::last_os_error()
                    );
                }
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// A listener on `addr` inside this namespace, made like the `Servers` make theirs
    /// (non-blocking, deep backlog): give it to `Servers::echo_on` and the like.
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        self.run(|| crate::bind(addr))
    }

    /// `ip -n NAME ARGS`; its output.
    fn ip(&self, args: &[&str]) -> String {
        checked(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Wait until `dev` is operationally up. A veth has its carrier some time after both ends
    /// are set up; until then IPv6 routes through it are not used, and the first packets
    /// sent that way are dropped (a TCP handshake then waits a second for its retransmission).
    fn wait_up(&self, dev: &str) {
        let state = || {
            let out = self.ip(&["-j", "link", "show", "dev", dev]);
            serde_json::from_str::<Value>(&out).ok()?[0]["operstate"]
                .as_str()
                .map(str::to_owned)
        };
        if !crate::eventually(5, || state().as_deref() == Some("UP")) {
            panic!("{dev} in {} is not up after 5 s: {:?}", self.name, state());
        }
    }

    /// `sysctl -w SETTINGS` inside this namespace: net.* settings are the namespace's own.
    fn sysctl(&self, settings: &[&str]) {
        checked(self.command("sysctl").arg("-qw").args(settings));
    }
}

/// A namespace this module added; deleted on drop unless `delete` did it already.
struct Owned {
    netns: Netns,
    live: bool,
}

impl Owned {
    /// `ip netns add NAME`, with its loopback up as a runtime brings it up.
    fn add(name: String) -> Owned {
        checked(Command::new("ip").args(["netns", "add", &name]));
        let ns = Owned {
            netns: Netns { name },
            live: true,
        };
        ns.netns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Delete it now; panics when `ip netns del` fails.
    fn delete(mut self) {
        self.live = false;
        checked(Command::new("ip").args(["netns", "del", &self.netns.name]));
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if self.live {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns.name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// What a runtime tells CNI plugins to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
}

impl CniCommand {
    fn as_str(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
            CniCommand::Check => "CHECK",
        }
    }
}

/// What the plugin that answered last wrote: the last of the chain, or the first that failed.
#[derive(Debug)]
pub struct CniOutput {
    /// Its `type`.
    pub plugin: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// The invocation, for messages.
    what: String,
}

impl CniOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics, saying what ran and what it wrote, unless the chain succeeded.
    pub fn assert_ok(self) -> CniOutput {
        assert!(self.success(), "{self}");
        self
    }

    /// Standard output as JSON: the result of an ADD, the error object of a failure.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{}: standard output is not JSON ({e})\n{self}", self.what))
    }
}

impl std::fmt::Display for CniOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}\nstdout: {}\nstderr: {}",
            self.what,
            self.status,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// A pod sandbox as the runtime knows it before CNI ADD: its network namespace and the
/// identity it passes to the plugins.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub netns: Netns,
    /// CNI_CONTAINERID, also K8S_POD_INFRA_CONTAINER_ID.
    pub container_id: String,
    /// The Kubernetes namespace.
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Sandbox {
    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.container_id, self.uid
        )
    }
}

/// A pod whose CNI ADD succeeded.
#[derive(Clone, Debug)]
pub struct Pod {
    pub sandbox: Sandbox,
    /// Its addresses, from the `ips` of the final ADD result.
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The final ADD result (the last plugin's), which CHECK and DEL get as `prevResult`.
    pub result: Value,
}

impl Pod {
    /// `program`, to be run inside the pod's network namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.sandbox.netns.command(program)
    }

    /// Run `egress-probe ARGS` inside the pod's network namespace.
    pub fn probe(&self, args: &[&str]) -> ProbeResult {
        self.command(probe_bin())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running egress-probe in {}: {e}", self.sandbox.netns.name))
            .into()
    }
}

/// The first IPv4 and the first IPv6 address of an ADD result's `ips`.
fn addresses(result: &Value) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let ips = result["ips"].as_array().into_iter().flatten();
    let parsed = ips.filter_map(|ip| {
        let cidr = ip["address"].as_str()?;
        cidr.split('/').next()?.parse::<IpAddr>().ok()
    });
    let (mut v4, mut v6) = (None, None);
    for ip in parsed {
        match ip {
            IpAddr::V4(a) => v4 = v4.or(Some(a)),
            IpAddr::V6(a) => v6 = v6.or(Some(a)),
        }
    }
    (v4, v6)
}

/// One plugin of the node's network configuration list.
struct Plugin {
    kind: String,
    exe: PathBuf,
    /// Its configuration object, without `cniVersion`, `name` and `prevResult`.
    conf: Value,
}

/// A sandbox the node made, until it is removed: what DEL needs, and its namespace while the
/// node owns it.
struct Attachment {
    sandbox: Sandbox,
    /// The final ADD result, once ADD succeeded.
    result: Option<Value>,
    netns: Option<Owned>,
}

/// How to build a `Node`: `Node::builder(tag)`, then `chain` and `cni_dir`, then `build`.
pub struct NodeBuilder {
    tag: String,
    chained: Vec<Value>,
    cni_dirs: Vec<PathBuf>,
    capability_args: serde_json::Map<String, Value>,
}

impl NodeBuilder {
    /// Chain `plugin` (a plugin's configuration object: `type` and its own keys) after bridge
    /// and the plugins chained before it; `cniVersion`, `name` and `prevResult` are added when
    /// it runs.
    pub fn chain(mut self, plugin: Value) -> NodeBuilder {
        self.chained.push(plugin);
        self
    }

    /// What the runtime passes for `capability` (`dns`: the pod's DNS configuration), as
    /// `runtimeConfig.<capability>` to each plugin whose configuration declares it
    /// (`"capabilities": {"dns": true}`), as libcni does.
    pub fn capability_arg(mut self, capability: &str, value: Value) -> NodeBuilder {
        self.capability_args.insert(capability.to_owned(), value);
        self
    }

    /// Look for plugins in `dir` too, after /usr/lib/cni, and pass it in CNI_PATH.
    pub fn cni_dir(mut self, dir: impl Into<PathBuf>) -> NodeBuilder {
        self.cni_dirs.push(dir.into());
        self
    }

    pub fn build(self) -> Node {
        let name = unique(&self.tag);
        let dirs: Vec<PathBuf> = std::iter::once(PathBuf::from(CNI_DIR))
            .chain(self.cni_dirs)
            .collect();
        let cni_path = std::env::join_paths(&dirs)
            .expect("CNI_PATH directories")
            .into_string()
            .expect("CNI_PATH is UTF-8");
        let ipam = TempDir::new(&format!("{}-ipam", self.tag));
        let bridge = json!({
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "dataDir": ipam.path(),
                "ranges": [[{"subnet": POD_SUBNET_V4}], [{"subnet": POD_SUBNET_V6}]],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            },
        });
        let plugins = std::iter::once(bridge)
            .chain(self.chained)
            .map(|conf| {
                let kind = conf["type"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a plugin configuration without \"type\": {conf}"))
                    .to_owned();
                let exe = dirs
                    .iter()
                    .map(|d| d.join(&kind))
                    .find(|p| p.is_file())
                    .unwrap_or_else(|| {
                        panic!(
                            "CNI plugin {kind} not found in CNI_PATH {cni_path} (Debian's \
                             containernetworking-plugins has bridge and host-local: cargo xtask setup)"
                        )
                    });
                Plugin { kind, exe, conf }
            })
            .collect();
        let node = Owned::add(name.clone());
        let ext = Owned::add(format!("{name}-ext"));
        // Forwarding, inside the node only. Interfaces made from now on copy `default`, so
        // their IPv6 addresses are usable at once, without duplicate address detection.
        let no_dad = [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ];
        node.netns.sysctl(&no_dad);
        node.netns
            .sysctl(&["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
        ext.netns.sysctl(&no_dad);
        node.netns.ip(&[
            "link",
            "add",
            "ext0",
            "type",
            "veth",
            "peer",
            "name",
            "node0",
            "netns",
            &ext.netns.name,
        ]);
        for (ns, dev, v4, v6) in [
            (&node.netns, "ext0", NODE_V4, NODE_V6),
            (&ext.netns, "node0", EXT_V4, EXT_V6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        for (ns, dev) in [(&node.netns, "ext0"), (&ext.netns, "node0")] {
            ns.wait_up(dev);
        }
        ext.netns
            .ip(&["route", "add", POD_SUBNET_V4, "via", &NODE_V4.to_string()]);
        ext.netns
            .ip(&["route", "add", POD_SUBNET_V6, "via", &NODE_V6.to_string()]);
        Node {
            pods: Mutex::new(Vec::new()),
            plugins,
            capability_args: self.capability_args,
            cni_path,
            ext,
            node,
            ipam,
        }
    }
}

/// A node: its network namespace, the ext namespace of stand-ins, and the pods it made.
/// On drop, every pod still there gets DEL and loses its namespace, then the node's
/// namespaces and IPAM directory go. Dropping never panics.
pub struct Node {
    // Dropped in this order (after `Drop::drop` ran DEL): pods' namespaces, ext, node, IPAM.
    pods: Mutex<Vec<Attachment>>,
    plugins: Vec<Plugin>,
    /// `runtimeConfig` entries by capability (`NodeBuilder::capability_arg`).
    capability_args: serde_json::Map<String, Value>,
    cni_path: String,
    ext: Owned,
    node: Owned,
    ipam: TempDir,
}

impl Node {
    /// A node whose network configuration list is bridge (with host-local) alone.
    pub fn new(tag: &str) -> Node {
        Node::builder(tag).build()
    }

    pub fn builder(tag: &str) -> NodeBuilder {
        NodeBuilder {
            tag: tag.to_owned(),
            chained: Vec::new(),
            cni_dirs: Vec::new(),
            capability_args: serde_json::Map::new(),
        }
    }

    /// The node's own network namespace (where the plugins run, and the bridge is).
    pub fn netns(&self) -> &Netns {
        &self.node.netns
    }

    /// The namespace of the external stand-ins, at `EXT_V4` and `EXT_V6`.
    pub fn ext(&self) -> &Netns {
        &self.ext.netns
    }

    /// Give the ext namespace `v4` too, beside `EXT_V4` on its link to the node: an address in
    /// 198.19.0.0/24, which the node and its pods reach already, for a second stand-in.
    pub fn add_ext_address(&self, v4: Ipv4Addr) {
        self.ext
            .netns
            .ip(&["addr", "add", &format!("{v4}/24"), "dev", "node0"]);
    }

    /// host-local's `dataDir`.
    pub fn ipam_dir(&self) -> &Path {
        self.ipam.path()
    }

    /// Whether host-local holds `ip` for a pod.
    pub fn reserved(&self, ip: IpAddr) -> bool {
        self.ipam_dir().join(NETWORK).join(ip.to_string()).exists()
    }

    fn pods(&self) -> MutexGuard<'_, Vec<Attachment>> {
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Make a pod as a runtime makes a sandbox: `ip netns add`, loopback up, then CNI ADD
    /// through the chain. Panics, with what the failing plugin wrote, when ADD fails.
    pub fn add_pod(&self, namespace: &str, name: &str) -> Pod {
        let n = PODS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let netns = Owned::add(format!("{}-p{n}", self.node.netns.name));
        let sandbox = Sandbox {
            netns: netns.netns.clone(),
            container_id: format!("{pid:032x}{n:032x}"),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: format!("{pid:08x}-0000-4000-8000-{n:012x}"),
        };
        self.pods().push(Attachment {
            sandbox: sandbox.clone(),
            result: None,
            netns: Some(netns),
        });
        let result = self.run(CniCommand::Add, &sandbox, None).assert_ok().json();
        let (Some(ipv4), Some(ipv6)) = addresses(&result) else {
            panic!("ADD result for pod {namespace}/{name} lacks an IPv4 or IPv6 address: {result}");
        };
        self.attachment(&sandbox, |pods, i| pods[i].result = Some(result.clone()));
        Pod {
            sandbox,
            ipv4,
            ipv6,
            result,
        }
    }

    /// Run `cmd` for `pod` through the chain as a runtime does: ADD in order, each plugin
    /// after the first given the one before's result; CHECK in order and DEL in reverse
    /// order, each given the pod's ADD result. Stops at the first plugin that fails.
    /// DEL leaves the pod's namespace alone (`remove_pod` deletes both).
    pub fn cni(&self, cmd: CniCommand, pod: &Pod) -> CniOutput {
        let prev = (cmd != CniCommand::Add).then_some(&pod.result);
        self.run(cmd, &pod.sandbox, prev)
    }

    fn run(&self, cmd: CniCommand, sandbox: &Sandbox, prev: Option<&Value>) -> CniOutput {
        self.try_run(cmd, sandbox, prev).unwrap_or_else(|e| {
            panic!(
                "running CNI {} for pod {}/{}: {e}",
                cmd.as_str(),
                sandbox.namespace,
                sandbox.name
            )
        })
    }

    fn try_run(
        &self,
        cmd: CniCommand,
        sandbox: &Sandbox,
        prev: Option<&Value>,
    ) -> std::io::Result<CniOutput> {
        let order: Box<dyn Iterator<Item = &Plugin>> = match cmd {
            CniCommand::Del => Box::new(self.plugins.iter().rev()),
            CniCommand::Add | CniCommand::Check => Box::new(self.plugins.iter()),
        };
        let mut prev = prev.cloned();
        let mut last = None;
        for plugin in order {
            let out = self.exec(cmd, plugin, sandbox, prev.as_ref())?;
            if !out.success() {
                return Ok(out);
            }
            if cmd == CniCommand::Add {
                prev = Some(out.json());
            }
            last = Some(out);
        }
        Ok(last.expect("the chain starts with bridge"))
    }

    /// One plugin, inside the node's namespace, its configuration on standard input.
    fn exec(
        &self,
        cmd: CniCommand,
        plugin: &Plugin,
        sandbox: &Sandbox,
        prev: Option<&Value>,
    ) -> std::io::Result<CniOutput> {
        let mut conf = plugin.conf.clone();
        conf["cniVersion"] = json!("1.0.0");
        conf["name"] = json!(NETWORK);
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let runtime: serde_json::Map<String, Value> = plugin
            .conf
            .get("capabilities")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter(|(_, on)| **on == Value::Bool(true))
            .filter_map(|(cap, _)| Some((cap.clone(), self.capability_args.get(cap)?.clone())))
            .collect();
        if !runtime.is_empty() {
            conf["runtimeConfig"] = Value::Object(runtime);
        }
        let mut child = self
            .node
            .netns
            .try_command("timeout")?
            .args(["--kill-after=5", PLUGIN_TIMEOUT_SECS])
            .arg(&plugin.exe)
            .env("CNI_COMMAND", cmd.as_str())
            .env("CNI_CONTAINERID", &sandbox.container_id)
            .env("CNI_NETNS", sandbox.netns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_path)
            .env("CNI_ARGS", sandbox.cni_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // A plugin that exits without reading its configuration says why on its own.
        let _ = child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(conf.to_string().as_bytes());
        let o = child.wait_with_output()?;
        Ok(CniOutput {
            plugin: plugin.kind.clone(),
            status: o.status,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            what: format!(
                "CNI {} of {} for pod {}/{} (container {}, CNI_NETNS {})",
                cmd.as_str(),
                plugin.exe.display(),
                sandbox.namespace,
                sandbox.name,
                sandbox.container_id,
                sandbox.netns.path().display()
            ),
        })
    }

    /// `f` on the node's list of attachments and the index of `sandbox`'s.
    fn attachment<T>(
        &self,
        sandbox: &Sandbox,
        f: impl FnOnce(&mut Vec<Attachment>, usize) -> T,
    ) -> T {
        let mut pods = self.pods();
        let i = pods
            .iter()
            .position(|a| a.sandbox.container_id == sandbox.container_id)
            .unwrap_or_else(|| {
                panic!(
                    "pod {}/{} is not on node {} (removed already?)",
                    sandbox.namespace, sandbox.name, self.node.netns.name
                )
            });
        f(&mut pods, i)
    }

    /// Remove a pod as a runtime does: CNI DEL (which must succeed), then its namespace
    /// (unless `delete_netns` deleted it first).
    pub fn remove_pod(&self, pod: &Pod) {
        self.cni(CniCommand::Del, pod).assert_ok();
        let gone = self.attachment(&pod.sandbox, |pods, i| pods.remove(i));
        if let Some(ns) = gone.netns {
            ns.delete();
        }
    }

    /// Delete the pod's network namespace without DEL (which the node still runs when the
    /// pod is removed or the node drops).
    pub fn delete_netns(&self, pod: &Pod) {
        let ns = self.attachment(&pod.sandbox, |pods, i| pods[i].netns.take());
        ns.unwrap_or_else(|| panic!("the namespace of pod {} is gone already", pod.sandbox.name))
            .delete();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let pods = std::mem::take(self.pods.get_mut().unwrap_or_else(PoisonError::into_inner));
        for a in pods.into_iter().rev() {
            // DEL first, as a runtime tears a sandbox down; then `a` drops with its namespace.
            let _ = self.try_run(CniCommand::Del, &a.sandbox, a.result.as_ref());
        }
    }
}
