//! Docker as the container tests use it: the agent started from its image (`egress:dev`, made
//! by `cargo xtask image`) as deploy/egress.yaml runs it, workloads as ordinary containers on a
//! network of their own in 198.18.0.0/15, enrolled through the agent's container.
//!
//! Everything a test creates (containers, networks, pins, the agent's cgroup) is removed when
//! its guard drops, also when the test fails.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{ProbeResult, TempDir, cannot_run, cgroup2_root, free_port, http_get, probe_bin};

/// The agent's image, as `cargo xtask image` tags it and deploy/egress.yaml names it.
pub const IMAGE: &str = "egress:dev";
/// The workloads' image: the agent image's base, which has the glibc the test binaries need.
pub const BASE: &str = "debian:bookworm-slim";
/// The capabilities deploy/egress.yaml gives the agent's container (the deploy tests check
/// that they are the manifest's).
pub const CAPABILITIES: &[&str] = &["SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE", "SYS_RESOURCE"];
/// Where Docker keeps its containers' network namespaces (`SandboxKey`).
const DOCKER_NETNS: &str = "/var/run/docker/netns";
/// The /24 subnets the tests' networks are taken from: dockerd's address pool as `cargo xtask`
/// starts it, in 198.18.0.0/15 and away from the node fixture's 198.18.0.0/24.
const SUBNETS: std::ops::Range<u8> = 248..255;

/// `docker ARGS`: its output, whatever the outcome.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running docker {args:?}: {e}"))
}

/// `docker ARGS`, which must succeed: its standard output, trimmed.
pub fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(
        o.status.success(),
        "docker {args:?} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr).trim()
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Whether the container tests can run here (root, cgroup2, a Docker daemon that answers, both
/// images); like `privileged`, a test that cannot run fails under EGRESS_REQUIRE_PRIVILEGED=1.
pub fn usable(test: &str) -> bool {
    if !crate::privileged(test) {
        return false;
    }
    let why = if !Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        Some("no Docker daemon answers: `cargo xtask image` starts one".to_owned())
    } else {
        [IMAGE, BASE]
            .into_iter()
            .find(|i| !docker(&["image", "inspect", i]).status.success())
            .map(|i| format!("Docker has no image {i}: `cargo xtask image` builds it"))
    };
    match why {
        None => true,
        Some(why) => cannot_run(test, &why),
    }
}

/// A name for something a test makes, unique on the machine.
fn name(tag: &str) -> String {
    crate::unique(tag)
}

/// A Docker network of the test's own, a /24 in 198.18.0.0/15; removed on drop (after the
/// containers on it, which are dropped first).
pub struct Network {
    pub name: String,
    /// The bridge's address on the host, where the stand-ins listen.
    pub gateway: Ipv4Addr,
}

impl Network {
    pub fn new(tag: &str) -> Network {
        let name = name(tag);
        // Subnets already taken by another test's network are refused: try the next.
        for third in SUBNETS {
            let subnet = format!("198.18.{third}.0/24");
            let gateway = Ipv4Addr::new(198, 18, third, 1);
            let gw = gateway.to_string();
            let o = docker(&[
                "network",
                "create",
                "--subnet",
                &subnet,
                "--gateway",
                &gw,
                &name,
            ]);
            if o.status.success() {
                return Network { name, gateway };
            }
        }
        panic!("no free /24 for a Docker network in 198.18.{SUBNETS:?}.0");
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.name]);
    }
}

/// A workload: a container running nothing but a long sleep, with `egress-probe` bind-mounted,
/// on the test's network. Removed on drop.
pub struct Workload {
    pub name: String,
    /// Its address on the network.
    pub ip: IpAddr,
    /// Its network namespace as the agent's container sees it.
    pub netns: PathBuf,
}

impl Workload {
    pub fn start(net: &Network, tag: &str) -> Workload {
        let name = name(tag);
        let probe = format!("{}:/usr/local/bin/egress-probe:ro", probe_bin().display());
        docker_ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            &net.name,
            "-v",
            &probe,
            BASE,
            "sleep",
            "900",
        ]);
        let ip = docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &name,
        ]);
        let key = docker_ok(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", &name]);
        let netns = Path::new(DOCKER_NETNS).join(Path::new(&key).file_name().expect("a key"));
        Workload {
            ip: ip
                .parse()
                .unwrap_or_else(|_| panic!("{name}: address {ip:?}")),
            netns,
            name,
        }
    }

    /// `egress-probe ARGS` inside the workload.
    pub fn probe(&self, args: &[&str]) -> ProbeResult {
        let mut a = vec!["exec", self.name.as_str(), "egress-probe"];
        a.extend_from_slice(args);
        docker(&a).into()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

/// The agent's container, started as deploy/egress.yaml runs it: host network and PID
/// namespace, the DaemonSet's capabilities and nothing else, AppArmor unconfined and the
/// runtime's default seccomp profile, its host paths (bpffs, the cgroup hierarchy, the
/// runtime's network namespaces, its own /var/run/egress) and the configuration's directory
/// read-only at /etc/egress, with free ports and pins of its own.
///
/// Two differences from the DaemonSet, both this machine's: capabilities missing from its
/// bounding set (CAP_SYS_RESOURCE here) cannot be given, and `nsenter --cgroup=/proc/1/ns/cgroup`
/// is left out (the machine refuses everyone, root on the host included, access to pid 1's
/// namespaces); Docker on this cgroup v1 host puts the container in the host's cgroup
/// namespace, which is what nsenter gives the agent on a node.
pub struct AgentContainer {
    pub name: String,
    pub health_port: u16,
    pub admin_port: u16,
    pub pin: PathBuf,
    /// Mounted at /var/run/egress: the admin socket and the state file.
    pub run: TempDir,
    /// Mounted at /etc/egress: `mesh.yaml`.
    pub config: TempDir,
}

impl AgentContainer {
    /// Start it with `mesh` as its configuration and wait until it is ready.
    pub fn start(mesh: &str) -> AgentContainer {
        crate::ensure_bpffs();
        ensure_netns_propagation();
        let name = name("agent");
        let run = TempDir::new("agent-run");
        let config = TempDir::new("agent-config");
        std::fs::write(config.path().join("mesh.yaml"), mesh).unwrap();
        let pin = PathBuf::from("/sys/fs/bpf").join(&name);
        let (outbound, admin_port, metrics, health_port) =
            (free_port(), free_port(), free_port(), free_port());
        let cgroup = cgroup2_root().expect("cgroup2");
        let mounts = [
            "/sys/fs/bpf:/sys/fs/bpf".to_owned(),
            format!("{0}:{0}", cgroup.display()),
            format!("{DOCKER_NETNS}:{DOCKER_NETNS}:rslave"),
            format!("{}:/var/run/egress", run.path().display()),
            format!("{}:/etc/egress:ro", config.path().display()),
        ];
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "--pid",
            "host",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "apparmor=unconfined",
        ]
        .map(str::to_owned)
        .to_vec();
        let bounding = bounding_set();
        for cap in CAPABILITIES {
            if bounding.contains(cap) {
                args.extend(["--cap-add".to_owned(), (*cap).to_owned()]);
            }
        }
        for m in &mounts {
            args.extend(["-v".to_owned(), m.clone()]);
        }
        args.push(IMAGE.to_owned());
        args.extend(
            [
                "egress",
                "run",
                "--node",
                "--config",
                "/etc/egress/mesh.yaml",
                "--admin-socket",
                "/var/run/egress/admin.sock",
                "--state-file",
                "/var/run/egress/workloads.json",
            ]
            .map(str::to_owned),
        );
        args.extend([
            "--pin-path".to_owned(),
            pin.display().to_string(),
            "--outbound-port".to_owned(),
            outbound.to_string(),
            "--admin-port".to_owned(),
            admin_port.to_string(),
            "--metrics-port".to_owned(),
            metrics.to_string(),
            "--health-port".to_owned(),
            health_port.to_string(),
        ]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = AgentContainer {
            name: name.clone(),
            health_port,
            admin_port,
            pin,
            run,
            config,
        };
        docker_ok(&a);
        agent.wait_ready();
        agent
    }

    /// Wait until `/healthz/ready` answers 200 (at most 30 s); panics with the agent's log when
    /// the container stops or the time is up.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(self.health_port, "/healthz/ready") {
                return;
            }
            let running = docker_ok(&["inspect", "-f", "{{.State.Running}}", &self.name]);
            if running != "true" || Instant::now() > deadline {
                panic!(
                    "the agent's container did not become ready (running: {running}):\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's log (standard error).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&docker(&["logs", &self.name]).stderr).into_owned()
    }

    /// The agent's access log (standard output), one JSON line per record.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        let o = docker(&["logs", &self.name]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Wait (at most 20 s) for an access-log record that satisfies `pred`.
    pub fn wait_record(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = self.access_log().into_iter().find(|r| pred(r)) {
                return r;
            }
            if Instant::now() > deadline {
                panic!(
                    "no access-log record for {what}: {:?}\nlog:\n{}",
                    self.access_log(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `egress ARGS` inside the agent's container, which must succeed: its standard output.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut a = vec!["exec", self.name.as_str(), "egress"];
        a.extend_from_slice(args);
        docker_ok(&a)
    }

    /// Enrol a workload through the agent's container, as `egress-cni` would.
    pub fn enroll(&self, w: &Workload, label: &str) -> String {
        self.exec(&[
            "enroll",
            &w.netns.display().to_string(),
            "--workload",
            label,
        ])
    }

    /// Replace the configuration atomically, as the kubelet updates a ConfigMap volume.
    pub fn write_config(&self, mesh: &str) {
        let tmp = self.config.path().join(".mesh.yaml.tmp");
        std::fs::write(&tmp, mesh).unwrap();
        std::fs::rename(&tmp, self.config.path().join("mesh.yaml")).unwrap();
    }

    /// SIGKILL, as an OOM kill or a crash would stop it.
    pub fn kill(&self) {
        docker_ok(&["kill", &self.name]);
    }

    /// Start the stopped container again (same arguments, mounts and ports) and wait until it
    /// is ready.
    pub fn restart(&self) {
        docker_ok(&["start", &self.name]);
        self.wait_ready();
    }

    fn id(&self) -> Option<String> {
        let o = docker(&["inspect", "-f", "{{.Id}}", &self.name]);
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    }
}

impl Drop for AgentContainer {
    fn drop(&mut self) {
        let id = self.id();
        let _ = docker(&["rm", "-f", &self.name]);
        // Pinned programs and maps outlive the container by design.
        let _ = std::fs::remove_dir_all(&self.pin);
        // The agent's own child of the container's cgroup, left when it was killed.
        if let (Some(id), Some(root)) = (id, cgroup2_root()) {
            let dir = root.join("docker").join(id);
            let _ = std::fs::remove_dir(dir.join("egress-agent"));
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// The capabilities this process may hand on (its bounding set), by Docker's names.
fn bounding_set() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let bits = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let known = [
        ("NET_ADMIN", 12),
        ("SYS_PTRACE", 19),
        ("SYS_ADMIN", 21),
        ("SYS_RESOURCE", 24),
    ];
    known
        .into_iter()
        .filter(|(_, bit)| bits & (1 << bit) != 0)
        .map(|(name, _)| name)
        .collect()
}

/// Make Docker's network-namespace directory a shared mount, as `ip netns` makes
/// /var/run/netns: a namespace Docker mounts there after the agent's container started then
/// appears in it too (its `rslave` mount), as the runtime's do on a node (HostToContainer). Done
/// once per machine (until reboot); the namespaces already there are kept (`--rbind`).
fn ensure_netns_propagation() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let shared = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.get(4)
                    .is_some_and(|m| *m == DOCKER_NETNS || *m == "/run/docker/netns")
                    && l.contains(" shared:")
            });
        if shared {
            return;
        }
        std::fs::create_dir_all(DOCKER_NETNS).unwrap();
        crate::checked(Command::new("mount").args(["--rbind", DOCKER_NETNS, DOCKER_NETNS]));
        crate::checked(Command::new("mount").args(["--make-rshared", DOCKER_NETNS]));
    });
}
