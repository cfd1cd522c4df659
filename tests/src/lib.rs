//! Harness for the privileged integration tests: a cgroup per test, the real `egress` agent,
//! real servers on 127.0.0.0/8 and [::1], and the `egress-probe` client run inside the cgroup.
//!
//! Everything a test creates (cgroups, pinned maps, processes) is removed when its guard drops,
//! also when the test fails.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub mod configs;
pub mod container;
pub mod dnsmasq;
pub mod l7;
pub mod node;
pub mod plot;

/// Byte `i` of the payload every test sends.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31).wrapping_add(7) % 251) as u8
}

/// FNV-1a over a byte stream, incrementally.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Feed the first `n` payload bytes to `f`, 64 KiB at a time.
pub fn pattern_chunks<E>(n: u64, mut f: impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut i = 0;
    while i < n {
        buf.clear();
        let end = (i + 64 * 1024).min(n);
        buf.extend((i..end).map(pattern));
        f(&buf)?;
        i = end;
    }
    Ok(())
}

/// Hash of the first `n` payload bytes.
pub fn pattern_hash(n: u64) -> u64 {
    let mut h = Fnv::default();
    let _ = pattern_chunks(n, |c| {
        h.update(c);
        Ok::<(), ()>(())
    });
    h.0
}

/// Whether the privileged tests can run here. When they cannot: with
/// `EGRESS_REQUIRE_PRIVILEGED=1` the test fails saying why; otherwise it is recorded as skipped
/// (in `EGRESS_SKIP_LOG`, for the summary) and printed.
pub fn privileged(test: &str) -> bool {
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_owned())
    } else if cgroup2_root().is_none() {
        Some("no cgroup2 filesystem mounted".to_owned())
    } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        Some("kernel without BTF (/sys/kernel/btf/vmlinux)".to_owned())
    } else {
        None
    };
    match why {
        None => true,
        Some(why) => cannot_run(test, &why),
    }
}

/// Report that `test` cannot run here because of `why`, and return false: with
/// `EGRESS_REQUIRE_PRIVILEGED=1` the test fails saying why; otherwise it is recorded as skipped
/// (in `EGRESS_SKIP_LOG`, for the summary) and printed.
pub fn cannot_run(test: &str, why: &str) -> bool {
    if std::env::var("EGRESS_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("{test}: privileged test cannot run: {why} (EGRESS_REQUIRE_PRIVILEGED=1)");
    }
    eprintln!("{test}: SKIPPED (privileged): {why}");
    if let Ok(log) = std::env::var("EGRESS_SKIP_LOG") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
    false
}

pub fn cgroup2_root() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split(' ').nth(4)?))
    })
}

/// A binary of this workspace's target directory: beside the running executable, or one
/// level up from a test binary in `deps/`.
fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    [dir.join(name), dir.parent().expect("target dir").join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found next to {}: run with `cargo xtask test`",
                exe.display()
            )
        })
}

/// The `egress` binary under test: `EGRESS_BIN` (set by `cargo xtask test`), else the build
/// in this target directory.
pub fn egress_bin() -> PathBuf {
    match std::env::var_os("EGRESS_BIN") {
        Some(p) => PathBuf::from(p),
        None => target_bin("egress"),
    }
}

/// The probe client, built with these tests.
pub fn probe_bin() -> PathBuf {
    target_bin("egress-probe")
}

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn unique(tag: &str) -> String {
    format!(
        "egress-test-{}-{}-{tag}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Run `c`, which must succeed (else panic with its stderr); its standard output.
pub fn checked(c: &mut Command) -> String {
    let o = c
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {c:?}: {e}"));
    assert!(
        o.status.success(),
        "{c:?} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr).trim()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A directory made for one test under the system's temporary directory, removed (with what is
/// in it) on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A cgroup v2 child made for one test; its processes are killed and it is removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Cgroup {
        let path = cgroup2_root().expect("cgroup2").join(unique(tag));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Cgroup { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        kill_all(&self.path);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // An agent started inside leaves its own child cgroup if it was killed.
            if let Ok(dir) = std::fs::read_dir(&self.path) {
                for e in dir.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            if std::fs::remove_dir(&self.path).is_ok() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `GET path` from 127.0.0.1:`port`, one request per connection: (status code, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: egress\r\nconnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {out:?}")))?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_owned()))
}

/// The sum of the samples of `name` in a Prometheus text page whose labels include every
/// pair of `labels`; 0 when there is none.
pub fn metric(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, set) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let has = |(k, v): &(&str, &str)| set.split(',').any(|p| p == format!("{k}=\"{v}\""));
            (n == name && labels.iter().all(has)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// SIGKILL every process in a cgroup and its children: `cgroup.kill` where the kernel has it
/// (5.14), else each pid its `cgroup.procs` files list.
fn kill_all(cgroup: &Path) {
    if std::fs::write(cgroup.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // SAFETY: kill(2) with a pid read from the cgroup; a stale pid is ESRCH.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if let Ok(dir) = std::fs::read_dir(cgroup) {
        for e in dir.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                kill_all(&e.path());
            }
        }
    }
}

/// A TCP port free on both 127.0.0.1 and [::1]: the agent and the stand-ins bind both, and
/// the kernel hands out a port free on one without looking at the other.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        if TcpListener::bind((Ipv6Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and [::1] after 100 tries");
}

/// A port for an agent's DNS server: free for TCP on 127.0.0.1 and [::1] and for UDP on
/// 0.0.0.0, where a dev-mode agent binds it in the machine's own namespace.
pub fn free_dns_port() -> u16 {
    for _ in 0..100 {
        let port = free_port();
        if std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for TCP and UDP after 100 tries");
}

/// A running agent. Stopped with SIGTERM on drop; its pins and the config file go with it.
pub struct Agent {
    child: Child,
    /// How it was started: `start_again` starts it so again.
    argv: Vec<std::ffi::OsString>,
    pub port: u16,
    /// The DNS server's port (`--dns-port`).
    pub dns_port: u16,
    pub admin_port: u16,
    /// Where the Prometheus page is served (`--metrics-port`).
    pub metrics_port: u16,
    /// Where the probes are answered (`--health-port`).
    pub health_port: u16,
    pub pin: PathBuf,
    /// The admin socket: enrolment, `egress workloads`.
    pub admin_socket: PathBuf,
    config: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    /// Access-log records (JSON lines on the agent's standard output).
    /// The access log's lines as written, parsed when asked for: the benchmarks run
    /// thousands of connections a second through the agent, and parsing each record as it
    /// comes would load the machine they measure.
    access: Arc<Mutex<Vec<String>>>,
    /// While set, nobody reads the agent's standard output (a log collector that stalled).
    access_paused: Arc<AtomicBool>,
    /// Told when the agent logs that it is ready; closed if it exits first.
    ready: Mutex<std::sync::mpsc::Receiver<()>>,
}

pub struct AgentOpts<'a> {
    pub config: &'a str,
    pub cgroup: &'a Cgroup,
    /// Start the agent inside the intercepted cgroup (its own connects are then hooked too).
    pub inside: bool,
    pub extra: Vec<String>,
}

/// A node agent (`egress run --node`): where it keeps what must outlive it, so that a second
/// agent can take over from the first.
pub struct NodeOpts<'a> {
    pub config: &'a str,
    /// The enrolment state file.
    pub state_file: &'a Path,
    /// The admin socket.
    pub admin_socket: &'a Path,
    pub extra: Vec<String>,
}

impl Agent {
    pub fn start(o: AgentOpts<'_>) -> Agent {
        Agent::start_resolving(o, None)
    }

    /// Start an agent for a node: attached at the cgroup2 root, deciding for the network
    /// namespaces enrolled with it.
    pub fn start_node(o: NodeOpts<'_>) -> Agent {
        let mut extra = vec![
            "--node".to_owned(),
            "--state-file".to_owned(),
            o.state_file.display().to_string(),
        ];
        extra.extend(o.extra);
        let agent = Agent::launch(o.config, None, false, extra, None, Some(o.admin_socket));
        agent.wait_ready();
        agent
    }

    /// Start an agent whose name lookups see `hosts` as /etc/hosts (and no DNS server but
    /// 127.0.0.1), as a pod's hostAliases would: the agent runs in a mount namespace of its own
    /// with both files bind-mounted. Names are then resolved without leaving the machine.
    pub fn start_resolving(o: AgentOpts<'_>, hosts: Option<&str>) -> Agent {
        let agent = Agent::launch(o.config, Some(o.cgroup), o.inside, o.extra, hosts, None);
        agent.wait_ready();
        agent
    }

    /// Start an agent without waiting for it to be ready (`wait_ready` does).
    pub fn spawn(o: AgentOpts<'_>) -> Agent {
        Agent::launch(o.config, Some(o.cgroup), o.inside, o.extra, None, None)
    }

    /// Wait until the agent logs that it is ready; panics with its log if it exits first or
    /// takes more than 30 s.
    pub fn wait_ready(&self) {
        if self
            .logs()
            .iter()
            .any(|l| l.contains("ready: intercepting"))
        {
            return;
        }
        let ready = self.ready.lock().unwrap();
        if ready.recv_timeout(Duration::from_secs(30)).is_err() {
            panic!("agent did not become ready:\n{}", self.logs().join("\n"));
        }
    }

    /// `GET path` on the agent's probe port: (status code, body).
    pub fn probe_health(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.health_port, path)
    }

    fn launch(
        config_text: &str,
        cgroup: Option<&Cgroup>,
        inside: bool,
        extra: Vec<String>,
        hosts: Option<&str>,
        admin_socket: Option<&Path>,
    ) -> Agent {
        ensure_bpffs();
        let name = unique("agent");
        let config = std::env::temp_dir().join(format!("{name}.yaml"));
        std::fs::write(&config, config_text).unwrap();
        let pin = PathBuf::from("/sys/fs/bpf").join(&name);
        let port = free_port();
        let dns_port = free_dns_port();
        let admin_port = free_port();
        // `--metrics-port` (0: the metrics off) and `--admin-socket` in `extra` replace the
        // harness's own.
        let given = |flag: &str| {
            let i = extra.iter().position(|a| a == flag)?;
            Some(
                extra
                    .get(i + 1)
                    .unwrap_or_else(|| panic!("{flag} without a value")),
            )
        };
        let metrics_port = given("--metrics-port")
            .map_or_else(free_port, |v| v.parse().expect("--metrics-port PORT"));
        let admin_socket = given("--admin-socket").map(Path::new).or(admin_socket);
        let health_port = free_port();
        let admin_socket = admin_socket.map_or_else(
            || std::env::temp_dir().join(format!("{name}.sock")),
            Path::to_path_buf,
        );
        let mut c = match hosts {
            Some(h) => {
                let hosts_file = config.with_extension("hosts");
                let resolv = config.with_extension("resolv");
                std::fs::write(&hosts_file, h).unwrap();
                std::fs::write(
                    &resolv,
                    "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
                )
                .unwrap();
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                    .arg("mount --bind \"$0\" /etc/hosts && mount --bind \"$1\" /etc/resolv.conf && shift && exec \"$@\"")
                    .arg(&hosts_file)
                    .arg(&resolv)
                    .arg(egress_bin());
                c
            }
            None => Command::new(egress_bin()),
        };
        if let (true, Some(cg)) = (inside, cgroup) {
            // `egress exec` puts the agent in the intercepted cgroup before it starts.
            c.arg("exec")
                .arg("--cgroup")
                .arg(&cg.path)
                .arg("--")
                .arg(egress_bin());
        }
        c.arg("run").arg("--config").arg(&config);
        if let Some(cg) = cgroup {
            c.arg("--cgroup").arg(&cg.path);
        }
        c.arg("--pin-path")
            .arg(&pin)
            .arg("--outbound-port")
            .arg(port.to_string())
            .arg("--dns-port")
            .arg(dns_port.to_string())
            .arg("--admin-port")
            .arg(admin_port.to_string())
            .args(
                (!extra.iter().any(|a| a == "--metrics-port"))
                    .then(|| ["--metrics-port".to_owned(), metrics_port.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .arg("--health-port")
            .arg(health_port.to_string())
            .args(
                (given("--admin-socket").is_none())
                    .then(|| ["--admin-socket".as_ref(), admin_socket.as_os_str()])
                    .into_iter()
                    .flatten(),
            )
            .arg("--allocations-file")
            .arg(config.with_extension("addresses"))
            .args(&extra);
        let argv: Vec<std::ffi::OsString> = std::iter::once(c.get_program().to_owned())
            .chain(c.get_args().map(ToOwned::to_owned))
            .collect();
        let access = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let access_paused = Arc::new(AtomicBool::new(false));
        let (child, ready) = Agent::spawn_child(&argv, &log, &access, &access_paused);
        Agent {
            child,
            argv,
            port,
            dns_port,
            admin_port,
            metrics_port,
            health_port,
            pin,
            admin_socket,
            config,
            log,
            access,
            access_paused,
            ready: Mutex::new(ready),
        }
    }

    /// Start `argv`, its log and access log read into `log` and `access`; the receiver is told
    /// when it logs that it is ready.
    fn spawn_child(
        argv: &[std::ffi::OsString],
        log: &Arc<Mutex<Vec<String>>>,
        access: &Arc<Mutex<Vec<String>>>,
        access_paused: &Arc<AtomicBool>,
    ) -> (Child, std::sync::mpsc::Receiver<()>) {
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting egress");
        let stdout = child.stdout.take().unwrap();
        let records = access.clone();
        let paused = access_paused.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                while paused.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => records
                        .lock()
                        .unwrap()
                        .push(line.trim_end_matches('\n').to_owned()),
                }
            }
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        // EGRESS_AGENT_LOG=FILE keeps a copy of every agent's log, for debugging a run.
        let mut mirror = std::env::var_os("EGRESS_AGENT_LOG").and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(f) = mirror.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(f, "{line}");
                }
                if line.contains("ready: intercepting") {
                    let _ = ready_tx.send(());
                }
                sink.lock().unwrap().push(line);
            }
        });
        (child, ready_rx)
    }

    /// Another agent started with the same arguments (configuration, pin path, ports, admin
    /// socket) while this one runs, as a rolling update starts the new version beside the old:
    /// it takes the workloads over. Waits until it is ready.
    pub fn start_beside(&self) -> Agent {
        let access = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let access_paused = Arc::new(AtomicBool::new(false));
        let (child, ready) = Agent::spawn_child(&self.argv, &log, &access, &access_paused);
        let agent = Agent {
            child,
            argv: self.argv.clone(),
            port: self.port,
            dns_port: self.dns_port,
            admin_port: self.admin_port,
            metrics_port: self.metrics_port,
            health_port: self.health_port,
            pin: self.pin.clone(),
            admin_socket: self.admin_socket.clone(),
            config: self.config.clone(),
            log,
            access,
            access_paused,
            ready: Mutex::new(ready),
        };
        agent.wait_ready();
        agent
    }

    /// Whether the agent process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// `kill -9`, as the OOM killer or a crash stops it: nothing of what it pinned is
    /// removed. Waits until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `start_again` with `flag`'s value changed (or the flag added): another agent on the same
    /// node's state.
    pub fn start_again_with(&mut self, flag: &str, value: &str) {
        match self.argv.iter().position(|a| a == flag) {
            Some(i) => self.argv[i + 1] = value.into(),
            None => self.argv.extend([flag.into(), value.into()]),
        }
        self.start_again();
    }

    /// Start the agent again with the same arguments (configuration file, pin path, ports,
    /// admin socket) once it has stopped, and wait until it is ready. Its new log lines
    /// follow the old ones.
    pub fn start_again(&mut self) {
        assert!(
            matches!(self.child.try_wait(), Ok(Some(_))),
            "the agent is still running"
        );
        let (child, ready) =
            Agent::spawn_child(&self.argv, &self.log, &self.access, &self.access_paused);
        self.child = child;
        if ready.recv_timeout(Duration::from_secs(30)).is_err() {
            panic!(
                "agent did not become ready again:\n{}",
                self.logs().join("\n")
            );
        }
        self.ready = Mutex::new(ready);
    }

    /// Replace the configuration file the agent watches, atomically (write, then rename).
    pub fn write_config(&self, text: &str) {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Replace the configuration file in place, as `echo > file` would.
    pub fn overwrite_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Wait for a log line containing `needle` that was not there before `after` lines.
    pub fn wait_log(&self, after: usize, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self.logs().iter().skip(after).find(|l| l.contains(needle)) {
                return l.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "no agent log line with {needle:?}:\n{}",
                    self.logs().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn logs(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Stop (true) or resume (false) reading the agent's standard output, the access log.
    pub fn pause_access_log(&self, paused: bool) {
        self.access_paused.store(paused, Ordering::Relaxed);
    }

    /// The agent's access-log records of connections.
    pub fn conns(&self) -> Vec<ConnLine> {
        self.records("connection")
    }

    /// The agent's access-log records of `kind` (`connection` or `request`).
    pub fn records(&self, kind: &str) -> Vec<ConnLine> {
        let lines = self.access.lock().unwrap().clone();
        lines
            .iter()
            .filter_map(|l| ConnLine::parse(l))
            .filter(|r| r.get("kind") == kind)
            .collect()
    }

    /// How many access-log records of `kind` satisfy `pred`, parsed one at a time: a
    /// benchmark leaves hundreds of thousands.
    pub fn count_records(&self, kind: &str, pred: impl Fn(&ConnLine) -> bool) -> usize {
        let lines = self.access.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| ConnLine::parse(l))
            .filter(|r| r.get("kind") == kind && pred(r))
            .count()
    }

    /// How many lines the access log has so far.
    pub fn access_lines(&self) -> usize {
        self.access.lock().unwrap().len()
    }

    /// Wait until a connection record satisfies `pred`.
    pub fn wait_conn(&self, what: &str, pred: impl Fn(&ConnLine) -> bool) -> ConnLine {
        self.wait_record("connection", what, pred)
    }

    /// Wait until an access-log record of `kind` satisfies `pred`.
    pub fn wait_record(
        &self,
        kind: &str,
        what: &str,
        pred: impl Fn(&ConnLine) -> bool,
    ) -> ConnLine {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = self.records(kind).into_iter().find(|c| pred(c)) {
                return c;
            }
            if Instant::now() > deadline {
                let records = self.access.lock().unwrap().clone();
                panic!(
                    "no access-log record for {what}:\n{}\nlog:\n{}",
                    records.join("\n"),
                    self.logs().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn egress(&self, args: &[&str]) -> Output {
        Command::new(egress_bin())
            .args(args)
            .output()
            .expect("running egress")
    }

    /// `egress explain` against the live maps.
    pub fn explain(&self, dst: &str, extra: &[&str]) -> String {
        let pin = self.pin.to_str().unwrap();
        let mut args = vec!["explain", "--pin-path", pin];
        args.extend_from_slice(extra);
        args.push(dst);
        let o = self.egress(&args);
        assert!(
            o.status.success(),
            "explain {dst}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap().trim().to_owned()
    }

    /// `egress stats`: reason code → count, in all (the per-workload lines after them do not
    /// parse as counters).
    pub fn stats(&self) -> BTreeMap<String, u64> {
        self.stats_with(&[])
    }

    /// The agent's Prometheus page (`GET /metrics` on `--metrics-port`).
    pub fn metrics(&self) -> String {
        let (code, body) = http_get(self.metrics_port, "/metrics").expect("the metrics page");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// `GET /config_dump` on the admin port, parsed.
    pub fn config_dump(&self) -> serde_json::Value {
        let (code, body) = http_get(self.admin_port, "/config_dump").expect("/config_dump");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    /// `egress stats --workload NS/NAME` (a node agent's): reason code → count.
    pub fn workload_stats(&self, workload: &str) -> BTreeMap<String, u64> {
        self.stats_with(&["--workload", workload])
    }

    fn stats_with(&self, extra: &[&str]) -> BTreeMap<String, u64> {
        let mut args = vec![
            "stats",
            "--pin-path",
            self.pin.to_str().unwrap(),
            "--admin-socket",
            self.admin_socket.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = self.egress(&args);
        assert!(
            o.status.success(),
            "stats {extra:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((f.get(1)?.to_string(), f.get(2)?.parse().ok()?))
            })
            .collect()
    }

    /// Original-destination records waiting for the agent (`ORIG_BY_PEER`), read from the
    /// pinned map. (What the kernel keeps per client socket, `SOCKS`, is freed with the socket.)
    pub fn orig_entries(&self) -> usize {
        use aya::maps::{HashMap, Map, MapData};
        use egress_common::{MAP_ORIG_BY_PEER, OrigDst, PeerKey};
        let data = MapData::from_pin(self.pin.join(MAP_ORIG_BY_PEER)).unwrap();
        let peer: HashMap<_, PeerKey, OrigDst> =
            HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
        peer.keys().count()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Stop with SIGTERM and wait; returns the log.
    pub fn stop(mut self) -> Vec<String> {
        self.terminate();
        self.logs()
    }

    /// SIGTERM, and wait until it is gone (killed after 10 s). Nothing is sent to an agent
    /// already reaped (stopped, killed, or handed over and terminated): its pid may be another
    /// process's by now.
    pub fn terminate(&mut self) {
        if self.exited() {
            return;
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.terminate();
        for ext in ["yaml", "hosts", "resolv", "addresses"] {
            let _ = std::fs::remove_file(self.config.with_extension(ext));
        }
        // If the agent died without cleaning up, do it for it.
        if self.pin.exists() {
            let _ = std::fs::remove_dir_all(&self.pin);
        }
        let _ = std::fs::remove_file(&self.admin_socket);
    }
}

/// What `egress run` said when it refused to start.
pub struct Refused {
    /// The configuration file it was given.
    pub file: PathBuf,
    pub stderr: String,
}

/// Run `egress run` with `config` (written to a file of its own) on `cgroup`, expecting it to
/// refuse; asserts that it failed and pinned no map.
pub fn run_refused(config: &str, cgroup: &Cgroup, extra: &[&str]) -> Refused {
    ensure_bpffs();
    let name = unique("refused");
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, config).unwrap();
    let pin = PathBuf::from("/sys/fs/bpf").join(&name);
    let o = Command::new(egress_bin())
        .arg("run")
        .arg("--config")
        .arg(&file)
        .arg("--cgroup")
        .arg(&cgroup.path)
        .arg("--pin-path")
        .arg(&pin)
        .args(extra)
        .output()
        .expect("running egress");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "egress run started: {stderr}");
    assert!(!pin.exists(), "maps were pinned at {}", pin.display());
    Refused { file, stderr }
}

pub(crate) fn ensure_bpffs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.contains(" /sys/fs/bpf ") && l.contains(" - bpf "));
        if !mounted {
            let ok = Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status()
                .unwrap();
            assert!(ok.success(), "mounting bpffs");
        }
    });
}

/// One access-log record of the agent (a JSON line), its values as strings.
#[derive(Clone, Debug)]
pub struct ConnLine {
    pub fields: BTreeMap<String, String>,
}

impl ConnLine {
    fn parse(line: &str) -> Option<ConnLine> {
        let serde_json::Value::Object(map) = serde_json::from_str(line).ok()? else {
            return None;
        };
        let fields = map
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect();
        Some(ConnLine { fields })
    }

    pub fn get(&self, k: &str) -> &str {
        self.fields.get(k).map_or("", String::as_str)
    }
}

/// Run `egress-probe ARGS`, inside `cgroup` (through `egress exec`) when given.
pub fn probe(cgroup: Option<&Cgroup>, args: &[&str]) -> ProbeResult {
    let mut c = match cgroup {
        Some(cg) => {
            let mut c = Command::new(egress_bin());
            c.arg("exec")
                .arg("--cgroup")
                .arg(&cg.path)
                .arg("--")
                .arg(probe_bin());
            c
        }
        None => Command::new(probe_bin()),
    };
    c.args(args).output().expect("running egress-probe").into()
}

#[derive(Debug)]
pub struct ProbeResult {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for ProbeResult {
    fn from(o: Output) -> ProbeResult {
        ProbeResult {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl ProbeResult {
    /// The value of `key=` in the probe's output.
    pub fn get(&self, key: &str) -> Option<String> {
        let pat = format!("{key}=");
        self.stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&pat).map(str::to_owned))
    }

    pub fn local(&self) -> SocketAddr {
        self.get("local")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("probe printed no local address: {self:?}"))
    }
}

/// What a server saw of one connection.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The connecting socket's address.
    pub peer: SocketAddr,
    /// The address it connected to.
    pub local: SocketAddr,
    pub received: u64,
    pub hash: u64,
}

/// A non-blocking listener with a deep accept queue: clients that connect faster than the
/// server accepts must not see SYNs dropped (the default backlog of 128 overflows).
pub(crate) fn bind(addr: SocketAddr) -> TcpListener {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&addr.into())
        .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
    s.listen(4096).unwrap();
    s.set_nonblocking(true).unwrap();
    s.into()
}

/// Echo servers on given addresses, recording each connection once it ends.
pub struct Servers {
    rt: tokio::runtime::Runtime,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Default for Servers {
    fn default() -> Self {
        Self::new()
    }
}

impl Servers {
    pub fn new() -> Servers {
        raise_nofile_limit();
        Servers {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Echo everything back, half-closing after the client does.
    pub fn echo(&self, addr: SocketAddr) -> SocketAddr {
        self.echo_on(bind(addr))
    }

    /// `echo` on a listener bound elsewhere (in another network namespace, say).
    pub fn echo_on(&self, l: TcpListener) -> SocketAddr {
        self.listen(l, false)
    }

    /// Write the address the client reached (our local address), then echo like `echo`.
    pub fn whoami(&self, addr: SocketAddr) -> SocketAddr {
        self.whoami_on(bind(addr))
    }

    /// Write the address the connection came from (`PEER\n`), then wait (at most 5 s) for
    /// the client to close: the client tells by it whether it reached the server itself or
    /// through a proxy's upstream socket.
    pub fn peer(&self, addr: SocketAddr) -> SocketAddr {
        self.serve(bind(addr), |mut s, peer| async move {
            if s.write_all(format!("{peer}\n").as_bytes()).await.is_err() {
                return;
            }
            let mut buf = [0u8; 64];
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        })
    }

    /// `whoami` on a listener bound elsewhere.
    pub fn whoami_on(&self, l: TcpListener) -> SocketAddr {
        self.listen(l, true)
    }

    /// A minimal HTTP/1.1 server: every request gets `200 OK` with the address it was reached
    /// at as the body.
    pub fn http(&self, addr: SocketAddr) -> SocketAddr {
        self.http_on(bind(addr))
    }

    /// `http` on a listener bound elsewhere.
    pub fn http_on(&self, l: TcpListener) -> SocketAddr {
        self.serve(l, |mut s, _| async move {
            let body = s.local_addr().unwrap().to_string();
            if read_head(&mut s, &mut Vec::new()).await.is_none() {
                return;
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        })
    }

    /// An HTTP/1.1 server keeping connections open: every request (a head, no body) gets a
    /// `200 OK` of `size` bytes in all, head included.
    pub fn http_sized(&self, addr: SocketAddr, size: usize) -> SocketAddr {
        self.http_sized_on(bind(addr), size)
    }

    /// `http_sized` on a listener bound elsewhere (in another network namespace, say).
    pub fn http_sized_on(&self, l: TcpListener, size: usize) -> SocketAddr {
        let resp: Arc<[u8]> = http_response(size).into();
        self.serve(l, move |mut s, _| {
            let resp = resp.clone();
            async move {
                let mut pending = Vec::new();
                while read_head(&mut s, &mut pending).await.is_some() {
                    if s.write_all(&resp).await.is_err() {
                        return;
                    }
                }
            }
        })
    }

    /// Read everything, then answer with the byte count (8 bytes, big endian) and close.
    pub fn sink(&self, addr: SocketAddr) -> SocketAddr {
        self.serve(bind(addr), |mut s, _| async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(k) => n += k as u64,
                    Err(_) => return,
                }
            }
            let _ = s.write_all(&n.to_be_bytes()).await;
            let _ = s.shutdown().await;
        })
    }

    fn listen(&self, l: TcpListener, announce: bool) -> SocketAddr {
        let seen = self.seen.clone();
        self.serve(l, move |mut s, peer| {
            let seen = seen.clone();
            async move {
                let local = s.local_addr().unwrap();
                if announce && s.write_all(format!("{local}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut h = Fnv::default();
                let mut n = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            h.update(&buf[..k]);
                            n += k as u64;
                            if s.write_all(&buf[..k]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
                seen.lock().unwrap().push(Seen {
                    peer,
                    local,
                    received: n,
                    hash: h.0,
                });
            }
        })
    }

    /// Accept on `l` forever, one task per connection running `handle`.
    fn serve<F, Fut>(&self, l: TcpListener, handle: F) -> SocketAddr
    where
        F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        // tokio expects a non-blocking socket; one bound by `bind` already is.
        l.set_nonblocking(true)
            .unwrap_or_else(|e| panic!("making {l:?} non-blocking: {e}"));
        let bound = l.local_addr().unwrap();
        self.rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                if let Ok((s, peer)) = l.accept().await {
                    tokio::spawn(handle(s, peer));
                }
            }
        });
        bound
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Wait for the record of the connection from `peer`.
    pub fn wait_from(&self, peer: SocketAddr) -> Seen {
        self.wait(&format!("a connection from {peer}"), |s| s.peer == peer)
    }

    pub fn wait(&self, what: &str, pred: impl Fn(&Seen) -> bool) -> Seen {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.seen().into_iter().find(|s| pred(s)) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("server saw no {what}; saw {:?}", self.seen());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Raise the soft open-file limit to the hard one (servers for a thousand connections need more
/// than a default of 1024); returns the limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// Poll `f` until it returns true or `secs` pass.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An iptables nat chain sending TCP to `dst` (locally generated) to `port`, except sockets
/// marked `skip_mark` (the proxy's own upstream connections). Removed on drop.
pub struct IptablesRedirect {
    chain: String,
    jump: Vec<String>,
}

impl IptablesRedirect {
    pub fn new(dst: &str, port: u16, skip_mark: u32) -> IptablesRedirect {
        Self::with_exemption(
            dst,
            port,
            &["-m", "mark", "--mark", &skip_mark.to_string()],
            &[],
        )
    }

    /// Like `new`, but exempting what `exempt` matches (an iptables match, e.g. an owner uid),
    /// and with a RETURN rule for each of `returns` before the REDIRECT, as Istio's chain has
    /// for excluded ranges. Installed in one iptables-restore transaction, as Istio does.
    pub fn with_exemption(
        dst: &str,
        port: u16,
        exempt: &[&str],
        returns: &[String],
    ) -> IptablesRedirect {
        let chain = format!(
            "EGRESS_T{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut rules = format!(
            "*nat\n:{chain} - [0:0]\n-A {chain} {} -j RETURN\n",
            exempt.join(" ")
        );
        for r in returns {
            rules.push_str(&format!("-A {chain} -d {r} -j RETURN\n"));
        }
        rules.push_str(&format!(
            "-A {chain} -p tcp -j REDIRECT --to-ports {port}\n"
        ));
        rules.push_str(&format!("-I OUTPUT -p tcp -d {dst} -j {chain}\nCOMMIT\n"));
        let mut restore = Command::new("iptables-restore")
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("running iptables-restore");
        {
            use std::io::Write as _;
            restore
                .stdin
                .take()
                .unwrap()
                .write_all(rules.as_bytes())
                .unwrap();
        }
        let guard = IptablesRedirect {
            chain: chain.clone(),
            jump: ["OUTPUT", "-p", "tcp", "-d", dst, "-j", &chain]
                .map(str::to_owned)
                .to_vec(),
        };
        assert!(
            restore.wait().unwrap().success(),
            "iptables-restore of chain {chain}"
        );
        guard
    }
}

impl Drop for IptablesRedirect {
    fn drop(&mut self) {
        let mut del = vec![
            "-w".to_owned(),
            "-t".to_owned(),
            "nat".to_owned(),
            "-D".to_owned(),
        ];
        del.extend(self.jump.iter().cloned());
        let _ = Command::new("iptables").args(&del).status();
        let _ = Command::new("iptables")
            .args(["-w", "-t", "nat", "-F", &self.chain])
            .status();
        let _ = Command::new("iptables")
            .args(["-w", "-t", "nat", "-X", &self.chain])
            .status();
    }
}

/// An HTTP/1.1 request of `size` bytes in all: a GET for `host`, padded with a header.
pub fn http_request(host: &str, size: usize) -> Vec<u8> {
    let head = format!("GET /rr HTTP/1.1\r\nhost: {host}\r\nx-pad: ");
    let pad = size.saturating_sub(head.len() + 4).max(1);
    let mut r = head.into_bytes();
    r.resize(r.len() + pad, b'p');
    r.extend_from_slice(b"\r\n\r\n");
    r
}

/// A `200 OK` of `size` bytes in all, head included.
pub fn http_response(size: usize) -> Vec<u8> {
    let head_len = |body: usize| format!("HTTP/1.1 200 OK\r\ncontent-length: {body}\r\n\r\n").len();
    let mut body = size.saturating_sub(head_len(size));
    // The length's digits count too.
    while body > 0 && head_len(body) + body > size {
        body -= 1;
    }
    let mut r = format!("HTTP/1.1 200 OK\r\ncontent-length: {body}\r\n\r\n").into_bytes();
    r.resize(r.len() + body, b'b');
    r
}

/// The next HTTP head on `s` (through its blank line), taken from the front of `pending`, the
/// bytes read and not yet used; `None` when the connection ends first.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    pending: &mut Vec<u8>,
) -> Option<Vec<u8>> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(pending.drain(..i + 4).collect());
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}
