//! `egress-bench`: the side-by-side benchmarks behind `cargo xtask bench`.
//!
//! egress-bench run [--quick] [--out BENCHMARKS.md] [--only dns]
//!     every contender, alternating round by round so the machine's drift cancels out, and the
//!     report with ratios to the direct connection. Needs root; all traffic stays on loopback,
//!     or between the network namespaces of the nodes it builds (tests/src/node.rs). `--only`
//!     runs one section (of those that set up all they need: `dns`) and writes its report.
//! egress-bench serve echo|sink|http ADDR            a server of the run's kind, until killed
//! egress-bench client connect ADDR COUNT            connect + close, one after another
//! egress-bench client rr ADDR COUNT SIZE THREADS    connect, an HTTP request of SIZE bytes, its
//!                                                   response (SIZE from the server), close
//! egress-bench client stream ADDR BYTES             one connection, BYTES out, count back
//! egress-bench client hold ADDR COUNT               COUNT idle connections until stdin closes
//! egress-bench client gap ADDR EVERY_US MAX_SECS     a connect attempt every EVERY_US µs to a
//!                                                   `peer` stand-in until stdin closes, then
//!                                                   each attempt's times and how it ended
//! egress-bench client resolve NAME PORT COUNT MAX_SECS   NAME through glibc's getaddrinfo,
//!                                                   at once a connection to its address, a
//!                                                   message to an echo stand-in and back

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use egress_tests::{
    Agent, AgentOpts, Cgroup, IptablesRedirect, NodeOpts, Servers, TempDir,
    configs::{filler_cidrs, service_entries},
    dnsmasq::Dnsmasq,
    egress_bin, eventually, free_port,
    node::{EXT_V4, Netns, Node, Pod},
    raise_nofile_limit,
};
use serde_json::json;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    raise_nofile_limit();
    match a.as_slice() {
        ["client", rest @ ..] => client(rest),
        ["run", rest @ ..] => run(rest),
        ["serve", kind, dst] => {
            let servers = Servers::new();
            match *kind {
                "echo" => servers.echo(addr(dst)),
                "sink" => servers.sink(addr(dst)),
                "http" => servers.http_sized(addr(dst), RR_SIZE),
                _ => panic!("serve echo|sink|http ADDR"),
            };
            loop {
                std::thread::park();
            }
        }
        _ => {
            eprintln!(
                "usage: egress-bench run [--quick] [--out FILE] [--criterion DIR] [--only dns] | client connect|rr|stream|hold ..."
            );
            ExitCode::from(64)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients: each prints one line of key=value.

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| panic!("{s}: not IP:PORT"))
}

fn num(s: &str) -> u64 {
    s.parse().unwrap_or_else(|_| panic!("{s}: not a number"))
}

/// Latency percentiles 1..=99 and 99.9 of `ns`, in microseconds.
fn percentiles(mut ns: Vec<u64>) -> Vec<f64> {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)] as f64 / 1000.0;
    let mut p: Vec<f64> = (1..=99).map(|i| at(f64::from(i) / 100.0)).collect();
    p.push(at(0.999));
    p
}

fn report(ops: usize, secs: f64, lat: Vec<u64>, extra: &str) {
    let p = percentiles(lat);
    let all: Vec<String> = p.iter().map(|v| format!("{v:.1}")).collect();
    println!(
        "ops={ops} secs={secs:.3} rate={:.1} p50_us={:.1} p99_us={:.1} pcts={} {extra}",
        ops as f64 / secs,
        p[49],
        p[98],
        all.join(",")
    );
}

/// Close with a reset: thousands of connections a second to one address would otherwise pile
/// up in TIME_WAIT, and port reuse against them stalls a SYN now and then for a second,
/// which is not what these benchmarks measure.
fn close_now(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
}

/// Read one HTTP/1.1 response with a `content-length` (a proxy may rewrite its head).
fn read_response(s: &mut TcpStream, buf: &mut [u8]) {
    let mut got = 0;
    loop {
        let n = s.read(&mut buf[got..]).expect("response");
        assert!(n > 0, "the response ended early");
        got += n;
        let Some(end) = buf[..got].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a content-length");
        while got < end + 4 + len {
            let n = s.read(&mut buf[got..]).expect("response body");
            assert!(n > 0, "the response body ended early");
            got += n;
        }
        return;
    }
}

/// How long a client may run, whatever it was asked for: every load loop stops in time even
/// when a path stalls (the run then fails, saying which client).
const CLIENT_LIMIT: Duration = Duration::from_secs(300);

fn client(a: &[&str]) -> ExitCode {
    std::thread::spawn(|| {
        std::thread::sleep(CLIENT_LIMIT);
        eprintln!("client still running after {CLIENT_LIMIT:?}: stopped");
        std::process::exit(3);
    });
    match a {
        ["connect", dst, count] => {
            let (dst, n) = (addr(dst), num(count) as usize);
            let mut lat = Vec::with_capacity(n);
            let start = Instant::now();
            for _ in 0..n {
                let t = Instant::now();
                close_now(TcpStream::connect(dst).expect("connect"));
                lat.push(t.elapsed().as_nanos() as u64);
            }
            report(n, start.elapsed().as_secs_f64(), lat, "");
        }
        ["rr", dst, count, size, threads] => {
            let (dst, n, size, threads) = (
                addr(dst),
                num(count) as usize,
                num(size) as usize,
                num(threads) as usize,
            );
            let start = Instant::now();
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    std::thread::spawn(move || {
                        let req = egress_tests::http_request("rr.bench", size);
                        let mut buf = vec![0u8; 2 * size + 4096];
                        let mut lat = Vec::with_capacity(n / threads);
                        for _ in 0..n / threads {
                            let t = Instant::now();
                            let mut s = TcpStream::connect(dst).expect("connect");
                            s.set_nodelay(true).unwrap();
                            s.write_all(&req).expect("request");
                            read_response(&mut s, &mut buf);
                            close_now(s);
                            lat.push(t.elapsed().as_nanos() as u64);
                        }
                        lat
                    })
                })
                .collect();
            let lat: Vec<u64> = workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect();
            report(lat.len(), start.elapsed().as_secs_f64(), lat, "");
        }
        ["stream", dst, bytes] => {
            let (dst, total) = (addr(dst), num(bytes));
            let chunk = vec![1u8; 1 << 20];
            let start = Instant::now();
            let mut s = TcpStream::connect(dst).expect("connect");
            let mut sent = 0u64;
            while sent < total {
                let k = (total - sent).min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..k]).expect("send");
                sent += k as u64;
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut count = [0u8; 8];
            s.read_exact(&mut count).expect("count");
            let secs = start.elapsed().as_secs_f64();
            assert_eq!(u64::from_be_bytes(count), total, "the sink got every byte");
            println!(
                "bytes={total} secs={secs:.3} gbps={:.3}",
                total as f64 / secs / 1e9
            );
        }
        ["hold", dst, count] => {
            let (dst, n) = (addr(dst), num(count) as usize);
            let conns: Vec<TcpStream> = (0..n)
                .map(|_| TcpStream::connect(dst).expect("connect"))
                .collect();
            println!("held={}", conns.len());
            std::io::stdout().flush().unwrap();
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        }
        ["gap", dst, every, secs] => {
            let limit = Duration::from_secs(num(secs));
            assert!(limit < CLIENT_LIMIT, "at most {CLIENT_LIMIT:?}");
            gap_client(addr(dst), Duration::from_micros(num(every).max(1)), limit);
        }
        ["resolve", name, port, count, secs] => {
            let limit = Duration::from_secs(num(secs));
            assert!(limit < CLIENT_LIMIT, "at most {CLIENT_LIMIT:?}");
            let port = u16::try_from(num(port)).expect("a port");
            resolve_client(name, port, num(count) as usize, limit);
        }
        _ => {
            eprintln!("unknown client arguments {a:?}");
            return ExitCode::from(64);
        }
    }
    ExitCode::SUCCESS
}

/// What `client resolve` sends and reads back: a small request, as a client's first.
const ECHO_MESSAGE: usize = 64;

/// `name`'s first IPv4 address from glibc's `getaddrinfo` (`AF_INET`, `SOCK_STREAM`: one A
/// query, on a UDP socket glibc connects to the nameserver of /etc/resolv.conf).
fn getaddrinfo_v4(name: &std::ffi::CStr) -> Ipv4Addr {
    // SAFETY: an all-zero addrinfo is a valid hints value (no flags, no pointers).
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_INET;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: a NUL-terminated name, valid hints and out-pointer; the list is freed below.
    let rc = unsafe { libc::getaddrinfo(name.as_ptr(), std::ptr::null(), &hints, &mut res) };
    assert!(
        rc == 0 && !res.is_null(),
        "getaddrinfo {name:?}: {}",
        // SAFETY: gai_strerror returns a static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(libc::gai_strerror(rc)) }.to_string_lossy()
    );
    // SAFETY: an AF_INET result's ai_addr is a sockaddr_in; `res` is freed once, after it.
    unsafe {
        let sin = &*((*res).ai_addr as *const libc::sockaddr_in);
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        libc::freeaddrinfo(res);
        ip
    }
}

/// `client resolve`: `count` times (stopping after `limit`), `name` through glibc, then at
/// once a connection to the address it gave on `port`, `ECHO_MESSAGE` bytes out and their
/// echo back, closed with a reset. Prints the address, and the percentiles of the resolve,
/// of connect + echo and of the whole, each timed on the monotonic clock.
fn resolve_client(name: &str, port: u16, count: usize, limit: Duration) {
    let host = std::ffi::CString::new(name).expect("a name without NUL");
    let (msg, mut back) = ([b'q'; ECHO_MESSAGE], [0u8; ECHO_MESSAGE]);
    let mut times: [Vec<u64>; 3] = std::array::from_fn(|_| Vec::with_capacity(count));
    let mut to = None;
    let start = Instant::now();
    while times[0].len() < count && start.elapsed() < limit {
        let t0 = Instant::now();
        let ip = getaddrinfo_v4(&host);
        let t1 = Instant::now();
        let dst = SocketAddr::from((ip, port));
        let mut s = TcpStream::connect_timeout(&dst, ATTEMPT_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to {dst}, {name}'s address: {e}"));
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(ATTEMPT_TIMEOUT)).unwrap();
        s.write_all(&msg).expect("the message");
        s.read_exact(&mut back).expect("its echo");
        let t2 = Instant::now();
        close_now(s);
        assert!(to.is_none_or(|a| a == ip), "{name} was {to:?}, then {ip}");
        to = Some(ip);
        for (v, d) in times.iter_mut().zip([t1 - t0, t2 - t1, t2 - t0]) {
            v.push(d.as_nanos() as u64);
        }
    }
    let ops = times[0].len();
    assert!(ops > 0, "no iteration within {limit:?}");
    let secs = start.elapsed().as_secs_f64();
    let [resolve, connect, total] = times.map(percentiles);
    println!(
        "ops={ops} secs={secs:.3} addr={} resolve_p50_us={:.1} resolve_p99_us={:.1} \
         connect_p50_us={:.1} connect_p99_us={:.1} total_p50_us={:.1} total_p99_us={:.1}",
        to.unwrap(),
        resolve[49],
        resolve[98],
        connect[49],
        connect[98],
        total[49],
        total[98],
    );
}

/// Nanoseconds on CLOCK_MONOTONIC, which every process of the machine shares: a client's
/// attempts and the run's kill and restart of an agent are put on one time line.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How long one attempt of `client gap` (or an iteration of `client resolve`) may wait to
/// connect, and then for its answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// One connect to a `peer` stand-in (which writes the address the connection came from) and
/// how it ended: `agent` (the stand-in saw another socket than ours: a proxy's upstream
/// socket), `straight` (it saw ours: unmediated), `refused` (ECONNREFUSED), `reset`, `closed`
/// (connected, then closed without an answer), `timeout`, `error`.
fn attempt(dst: SocketAddr) -> &'static str {
    use std::io::ErrorKind::{ConnectionRefused, ConnectionReset, TimedOut, WouldBlock};
    let mut s = match TcpStream::connect_timeout(&dst, ATTEMPT_TIMEOUT) {
        Ok(s) => s,
        Err(e) if e.kind() == ConnectionRefused => return "refused",
        Err(e) if matches!(e.kind(), TimedOut | WouldBlock) => return "timeout",
        Err(_) => return "error",
    };
    let local = s.local_addr().ok();
    let _ = s.set_read_timeout(Some(ATTEMPT_TIMEOUT));
    let mut buf = [0u8; 128];
    let mut got = 0;
    let what = loop {
        match s.read(&mut buf[got..]) {
            Ok(0) => break None,
            Ok(n) => {
                got += n;
                if buf[..got].contains(&b'\n') || got == buf.len() {
                    break None;
                }
            }
            Err(e) if e.kind() == ConnectionReset => break Some("reset"),
            Err(e) if matches!(e.kind(), TimedOut | WouldBlock) => break Some("timeout"),
            Err(_) => break Some("error"),
        }
    };
    close_now(s);
    if let Some(w) = what {
        return w;
    }
    let seen = std::str::from_utf8(&buf[..got])
        .ok()
        .and_then(|t| t.trim().parse::<SocketAddr>().ok());
    match seen {
        Some(p) if Some(p) == local => "straight",
        Some(_) => "agent",
        None if got == 0 => "closed",
        None => "error",
    }
}

/// `client gap`: a connect attempt every `every` (one after another: a slow one delays the
/// next), until standard input closes or `limit` has passed. Prints `up` once an attempt has
/// gone through a proxy, and at the end one line per attempt: `a START_NS END_NS OUTCOME`.
fn gap_client(dst: SocketAddr, every: Duration, limit: Duration) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static STOP: AtomicBool = AtomicBool::new(false);
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        STOP.store(true, Ordering::Relaxed);
    });
    let most = (limit.as_nanos() / every.as_nanos()) as usize + 1;
    let mut done: Vec<(u64, u64, &str)> = Vec::with_capacity(most.min(1 << 20));
    let start = Instant::now();
    let mut up = false;
    while !STOP.load(Ordering::Relaxed) && start.elapsed() < limit && done.len() < most {
        let t0 = mono_ns();
        let what = attempt(dst);
        done.push((t0, mono_ns(), what));
        if !up && what == "agent" {
            println!("up");
            std::io::stdout().flush().unwrap();
            up = true;
        }
        let next = every * done.len() as u32;
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (t0, t1, what) in &done {
        writeln!(out, "a {t0} {t1} {what}").unwrap();
    }
    writeln!(out, "attempts={}", done.len()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The run.

/// `key=value` words of a client's output line.
fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Where a client runs.
#[derive(Clone, Copy)]
enum At<'a> {
    /// In the benchmark's own cgroup and network namespace, which nothing intercepts.
    Here,
    /// Inside an intercepted cgroup (through `egress exec`).
    Cgroup(&'a Cgroup),
    /// In a pod's network namespace (the benchmark's own cgroup).
    Netns(&'a Netns),
    /// In a pod's network namespace and a mount namespace of its own, where this file is
    /// bind-mounted over /etc/resolv.conf (as a container runtime gives a pod its own).
    Resolving(&'a Netns, &'a std::path::Path),
}

impl<'a> From<Option<&'a Cgroup>> for At<'a> {
    fn from(cgroup: Option<&'a Cgroup>) -> At<'a> {
        cgroup.map_or(At::Here, At::Cgroup)
    }
}

/// Run a client where `at` says; its result line.
fn run_client<'a>(at: impl Into<At<'a>>, args: &[String]) -> BTreeMap<String, String> {
    let me = std::env::current_exe().unwrap();
    let mut c = match at.into() {
        At::Cgroup(cg) => {
            let mut c = Command::new(egress_bin());
            c.args(["exec", "--cgroup", cg.path.to_str().unwrap(), "--"])
                .arg(&me);
            c
        }
        At::Netns(ns) => ns.command(&me),
        At::Resolving(ns, resolv) => {
            let mut c = ns.command("unshare");
            c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                .arg("mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"")
                .arg(resolv)
                .arg(&me);
            c
        }
        At::Here => Command::new(&me),
    };
    let o = c
        .arg("client")
        .args(args)
        .output()
        .expect("running a client");
    assert!(
        o.status.success(),
        "client {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    fields(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap_or(""),
    )
}

/// Median, min and max of a sample.
#[derive(Clone, Copy, Default)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(|a, b| a.total_cmp(b));
    Spread {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = |v: f64| {
            if v >= 100.0 {
                format!("{v:.0}")
            } else if v >= 10.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.3}")
            }
        };
        write!(f, "{} ({}–{})", p(self.median), p(self.min), p(self.max))
    }
}

/// One contender's measurements over the rounds: metric → values.
#[derive(Default)]
struct Samples {
    metrics: BTreeMap<&'static str, Vec<f64>>,
    /// Latency percentiles 1..=99 and 99.9 of the last short-connection run.
    pcts: Vec<f64>,
}

impl Samples {
    fn push(&mut self, metric: &'static str, v: f64) {
        self.metrics.entry(metric).or_default().push(v);
    }
    fn get(&self, metric: &str) -> Spread {
        spread(
            self.metrics
                .get(metric)
                .cloned()
                .unwrap_or_else(|| vec![f64::NAN]),
        )
    }
}

/// Short connections (`client rr`: 1 KiB each way, 4 threads, `ops` in all) from each of
/// `runs` to its destination, alternating run by run for `rounds` rounds: each one's samples
/// (p50, p99, rate and, when `agent` is given, that process's CPU µs per connection).
fn rr_rounds(
    rounds: usize,
    ops: u64,
    runs: &[(At<'_>, SocketAddr)],
    agent: Option<u32>,
) -> Vec<Samples> {
    rr_rounds_each(rounds, ops, runs, &vec![agent; runs.len()])
}

/// `rr_rounds` with the CPU time per connection of `agents[k]` (if any) for run `k`.
fn rr_rounds_each(
    rounds: usize,
    ops: u64,
    runs: &[(At<'_>, SocketAddr)],
    agents: &[Option<u32>],
) -> Vec<Samples> {
    let mut samples: Vec<Samples> = runs.iter().map(|_| Samples::default()).collect();
    for _ in 0..rounds {
        for (k, (at, dst)) in runs.iter().enumerate() {
            let agent = agents[k];
            let cpu0 = agent.map(cpu_seconds);
            let r = run_client(
                *at,
                &[
                    "rr".into(),
                    dst.to_string(),
                    ops.to_string(),
                    RR_SIZE.to_string(),
                    "4".into(),
                ],
            );
            let done: f64 = r["ops"].parse().unwrap();
            if let (Some(pid), Some(c0)) = (agent, cpu0) {
                samples[k].push("agent_cpu_us", (cpu_seconds(pid) - c0) * 1e6 / done);
            }
            samples[k].push("p50", r["p50_us"].parse().unwrap());
            samples[k].push("p99", r["p99_us"].parse().unwrap());
            samples[k].push("rate", r["rate"].parse().unwrap());
            samples[k].pcts = r["pcts"].split(',').map(|v| v.parse().unwrap()).collect();
        }
    }
    samples
}

struct Settings {
    rounds: usize,
    connects: u64,
    rr_ops: u64,
    stream_bytes: u64,
    cidrs: Vec<u32>,
    idle: usize,
    /// Pods enrolled at once for the node agent's footprint.
    pods: usize,
    /// DNS queries per dnsperf run as fast as the path answers, and paced (section 9).
    dns_flat: u64,
    dns_paced: u64,
    /// Resolve-then-connect iterations per client run (section 9).
    dns_connects: u64,
}

/// Request and response size of the short connections.
const RR_SIZE: usize = 1024;

/// The contender whose destination is a TCP ServiceEntry by address: hooks attached, the
/// kernel decides, no proxy.
const TCP_ENTRY: &str = "egress, TCP ServiceEntry";
/// The contender whose destination is an HTTP ServiceEntry: through the agent, which keeps
/// upstream connections for the next request.
const HTTP_ENTRY: &str = "egress, HTTP ServiceEntry";
/// HAProxy as an HTTP proxy that keeps server connections (`http-reuse always`).
const HAPROXY_HTTP: &str = "iptables REDIRECT → HAProxy, mode http";

/// Owner of HAProxy's sockets, so that iptables can exempt its upstream connections.
const HAPROXY_UID: u32 = 4343;
/// The benchmark agent's configuration: `cidrs` exclusions (the last one the bypass
/// destination's), 127.59/16 and 127.62/16 redirected to the agent, 127.61/16 a TCP
/// ServiceEntry on `ports.tcp`, which the kernel lets go straight out, and `rr.bench` an HTTP
/// ServiceEntry on `ports.http`.
fn agent_config(cidrs: u32, ports: Ports) -> String {
    let mut exclude = filler_cidrs(cidrs.saturating_sub(1));
    exclude.push("127.58.0.0/24".to_owned());
    format!(
        "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {{name: bench}}\nspec:\n  \
         interception:\n    includeOutboundIPRanges: [127.58.0.0/16, 127.59.0.0/16, 127.61.0.0/16, 127.62.0.0/16]\n    \
         excludeOutboundIPRanges: \"{}\"\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {{name: bench-tcp}}\nspec:\n  hosts: [tcp.bench]\n  addresses: [127.61.0.0/16]\n  \
         resolution: NONE\n  ports: [{{number: {}, name: tcp, protocol: TCP}}, {{number: {}, name: sink, protocol: TCP}}]\n\
         ---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: bench-http}}\n\
         spec:\n  hosts: [rr.bench]\n  resolution: NONE\n  ports: [{{number: {}, name: http, protocol: HTTP}}]\n",
        exclude.join(","),
        ports.tcp[0],
        ports.tcp[1],
        ports.http,
    )
}

/// The benchmark's server ports: short connections and streams (declared TCP for the TCP
/// ServiceEntry contender), and short connections to the HTTP ServiceEntry.
#[derive(Clone, Copy)]
struct Ports {
    tcp: [u16; 2],
    http: u16,
}

fn run(a: &[&str]) -> ExitCode {
    assert!(
        egress_tests::privileged("egress-bench"),
        "egress-bench run needs root, cgroup v2 and BTF"
    );
    let quick = a.contains(&"--quick");
    let out = a
        .iter()
        .position(|x| *x == "--out")
        .and_then(|i| a.get(i + 1))
        .map_or_else(|| "BENCHMARKS.md".to_owned(), |s| (*s).to_owned());
    // Where `cargo bench -p egress-user --bench compile` left its estimates, if it ran.
    let criterion = a
        .iter()
        .position(|x| *x == "--criterion")
        .and_then(|i| a.get(i + 1));
    // One section alone, its report without the others'.
    let only = a
        .iter()
        .position(|x| *x == "--only")
        .map(|i| *a.get(i + 1).expect("--only SECTION"));
    if let Some(section) = only {
        assert!(
            ONLY.contains(&section),
            "--only {section}: the sections that run alone are {ONLY:?}"
        );
    }
    let s = if quick {
        Settings {
            rounds: 2,
            connects: 300,
            rr_ops: 400,
            stream_bytes: 64 << 20,
            cidrs: vec![10, 1000],
            idle: 500,
            pods: 10,
            dns_flat: 10_000,
            dns_paced: 2_000,
            dns_connects: 300,
        }
    } else {
        Settings {
            rounds: 5,
            connects: 3000,
            rr_ops: 4000,
            stream_bytes: 1 << 30,
            cidrs: vec![10, 1000, 100_000],
            idle: 10_000,
            pods: 100,
            dns_flat: 50_000,
            dns_paced: 10_000,
            dns_connects: 2000,
        }
    };

    if let Some(dir) = std::path::Path::new(&out)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).expect("creating the report directory");
    }
    let command = format!(
        "`cargo xtask bench{}{}`",
        if quick { " --quick" } else { "" },
        only.map_or_else(String::new, |o| format!(" --only {o}"))
    );
    if only == Some("dns") {
        let report = format!(
            "# Benchmarks: one section\n\nMeasured alone by {command} (as root); machine: {}.\n\n{}",
            machine(),
            dns_section(&s, &format!("in a run of its own, {command}"))
        );
        std::fs::write(&out, report).expect("writing the report");
        println!("wrote {out}");
        return ExitCode::SUCCESS;
    }
    let servers = Servers::new();
    let port = free_port();
    let sink_port = free_port();
    let http_port = free_port();
    let ports = Ports {
        tcp: [port, sink_port],
        http: http_port,
    };
    let ep = |a: &str| -> SocketAddr { format!("{a}:{port}").parse().unwrap() };
    let hp = |a: &str| -> SocketAddr { format!("{a}:{http_port}").parse().unwrap() };
    let sp = |a: &str| -> SocketAddr { format!("{a}:{sink_port}").parse().unwrap() };
    // One destination per contender, so that each path's rules apply to it alone.
    let direct = servers.http_sized(ep("127.57.0.1"), RR_SIZE);
    let egress_bypass = servers.http_sized(ep("127.58.0.1"), RR_SIZE);
    let ipt_exclude = servers.http_sized(ep("127.55.0.1"), RR_SIZE);
    let egress_redirect = servers.http_sized(ep("127.59.0.1"), RR_SIZE);
    let ipt_egress = servers.http_sized(ep("127.54.0.1"), RR_SIZE);
    let ipt_haproxy = servers.http_sized(ep("127.60.0.1"), RR_SIZE);
    let egress_tcp_entry = servers.http_sized(ep("127.61.0.1"), RR_SIZE);
    let egress_http_entry = servers.http_sized(hp("127.62.0.1"), RR_SIZE);
    let ipt_haproxy_http = servers.http_sized(hp("127.63.0.1"), RR_SIZE);
    let sink_direct = servers.sink(sp("127.57.0.1"));
    let sink_egress = servers.sink(sp("127.59.0.1"));
    let sink_haproxy = servers.sink(sp("127.60.0.1"));
    let sink_tcp_entry = servers.sink(sp("127.61.0.1"));

    let cg = Cgroup::new("bench");
    let agent = Agent::start(AgentOpts {
        config: &agent_config(s.cidrs[0], ports),
        cgroup: &cg,
        inside: false,
        extra: vec![],
    });
    let (haproxy_port, haproxy_http_port) = (free_port(), free_port());
    let haproxy = start_haproxy(haproxy_port, haproxy_http_port);
    let owner = ["-m", "owner", "--uid-owner", &HAPROXY_UID.to_string()];
    let _to_haproxy = IptablesRedirect::with_exemption("127.60.0.0/16", haproxy_port, &owner, &[]);
    let _to_haproxy_http =
        IptablesRedirect::with_exemption("127.63.0.0/16", haproxy_http_port, &owner, &[]);
    // The iptables contender gets its own agent (same binary, attached to an empty cgroup): if
    // both interceptions aimed at one listener, conntrack would see the REDIRECTed
    // connections' reply tuples clash with hook-redirected ones reusing a client port, and
    // remap those connections' source ports, hiding them from the agent's lookup.
    let cg_ipt = Cgroup::new("bench-iptables");
    let agent_ipt = Agent::start(AgentOpts {
        config: &agent_config(10, ports),
        cgroup: &cg_ipt,
        inside: false,
        extra: vec![],
    });
    let _to_agent = IptablesRedirect::new("127.54.0.0/16", agent_ipt.port, 1337);

    let mut md = String::new();
    let mut plots = Plots::default();
    let mut goals = Goals::default();

    // 1. Bypass cost against the number of excluded CIDRs.
    let mut bypass_rows = Vec::new();
    let mut hook_rows = Vec::new();
    let mut restore_times = Vec::new();
    for (i, &n) in s.cidrs.iter().enumerate() {
        if i > 0 {
            let before = agent.logs().len();
            agent.write_config(&agent_config(n, ports));
            agent.wait_log(before, "applied configuration generation");
        }
        let mut returns = filler_cidrs(n.saturating_sub(1));
        returns.push("127.55.0.0/24".to_owned());
        let t = Instant::now();
        let chain = IptablesRedirect::with_exemption(
            "127.55.0.0/16",
            9,
            &["-m", "mark", "--mark", "1337"],
            &returns,
        );
        restore_times.push((n, t.elapsed()));
        let contenders: [(&str, Option<&Cgroup>, SocketAddr); 3] = [
            ("direct", None, direct),
            ("egress bypass", Some(&cg), egress_bypass),
            ("iptables exclude chain", None, ipt_exclude),
        ];
        let mut samples: Vec<Samples> = (0..3).map(|_| Samples::default()).collect();
        for _ in 0..s.rounds {
            for (k, (_, cgroup, dst)) in contenders.iter().enumerate() {
                let r = run_client(
                    *cgroup,
                    &["connect".into(), dst.to_string(), s.connects.to_string()],
                );
                samples[k].push("p50", r["p50_us"].parse().unwrap());
                samples[k].push("p99", r["p99_us"].parse().unwrap());
                samples[k].push("rate", r["rate"].parse().unwrap());
            }
        }
        drop(chain);
        // Time inside the hooks, in one more run outside the rounds: the statistics add their
        // own cost to every program call.
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .expect("enabling BPF run-time statistics");
        let before = hook_time();
        run_client(
            Some(&cg),
            &[
                "connect".into(),
                egress_bypass.to_string(),
                s.connects.to_string(),
            ],
        );
        let spent = hook_time_since(&before);
        drop(stats);
        hook_rows.push((n, spent));
        for (k, (name, _, _)) in contenders.iter().enumerate() {
            plots
                .bypass
                .entry(name)
                .or_default()
                .push((f64::from(n), samples[k].get("p50").median));
        }
        bypass_rows.push((n, contenders.map(|c| c.0), samples));
    }
    writeln!(
        md,
        "## 1. Bypass: connect + close of an excluded destination\n"
    )
    .unwrap();
    writeln!(md, "{} sequential connects per run, {} rounds; medians with (min–max) over rounds; ratio of medians to direct.\n", s.connects, s.rounds).unwrap();
    writeln!(
        md,
        "| excluded CIDRs | contender | p50 µs | p99 µs | connects/s | p50 vs direct |"
    )
    .unwrap();
    writeln!(md, "|---:|---|---:|---:|---:|---:|").unwrap();
    for (n, names, samples) in &bypass_rows {
        let base = samples[0].get("p50").median;
        for (k, name) in names.iter().enumerate() {
            let p50 = samples[k].get("p50");
            writeln!(
                md,
                "| {n} | {name} | {p50} | {} | {} | {:.2}× |",
                samples[k].get("p99"),
                samples[k].get("rate"),
                p50.median / base
            )
            .unwrap();
        }
    }
    writeln!(md).unwrap();
    if let (Some((n_lo, _, lo)), Some((n_hi, _, hi))) = (bypass_rows.first(), bypass_rows.last()) {
        let p50 = |v: &Vec<Samples>, k: usize| v[k].get("p50").median;
        goals.add(
            format!("bypass p50 with {n_hi} CIDRs ≤ 1.05× direct"),
            p50(hi, 1) / p50(hi, 0),
            |r| r <= 1.05,
        );
        goals.add(
            format!("bypass flat from {n_lo} to {n_hi} CIDRs (p50 ratio to direct, {n_hi} ÷ {n_lo}) ≤ 1.05"),
            (p50(hi, 1) / p50(hi, 0)) / (p50(lo, 1) / p50(lo, 0)),
            |r| r <= 1.05,
        );
        goals.add(
            format!("bypass p50 with {n_hi} CIDRs below the iptables chain's (egress ÷ iptables)"),
            p50(hi, 1) / p50(hi, 2),
            |r| r < 1.0,
        );
    }
    writeln!(
        md,
        "Time inside the hooks per bypassed connect + close (`BPF_ENABLE_STATS`: one more run of {} \
         connects per CIDR count, outside the rounds above, since the statistics add their own \
         cost to every call): the connect hook decides (map and LPM lookups), sock_ops is called \
         for every TCP socket of the cgroup and finds no record on a bypassed one.\n",
        s.connects
    )
    .unwrap();
    writeln!(
        md,
        "| excluded CIDRs | connect hook ns | sock_ops ns (callbacks) | hooks ns | of direct's p50 |"
    )
    .unwrap();
    writeln!(md, "|---:|---:|---:|---:|---:|").unwrap();
    for ((n, spent), (_, _, samples)) in hook_rows.iter().zip(&bypass_rows) {
        let per = |prog: &str| {
            let (calls, ns) = spent.get(prog).copied().unwrap_or_default();
            (
                calls as f64 / s.connects as f64,
                ns as f64 / s.connects as f64,
            )
        };
        let (connect, ops) = (per("egress_connect4"), per("egress_sockops"));
        let total = connect.1 + ops.1;
        writeln!(
            md,
            "| {n} | {:.0} | {:.0} ({:.1}) | {total:.0} | {:.1}% |",
            connect.1,
            ops.1,
            ops.0,
            total / 10.0 / samples[0].get("p50").median
        )
        .unwrap();
    }
    writeln!(md).unwrap();
    for (n, t) in &restore_times {
        writeln!(
            md,
            "- iptables-restore of a chain with {n} RETURN rules: {:.2} s",
            t.as_secs_f64()
        )
        .unwrap();
    }
    writeln!(md).unwrap();

    // 2. Short redirected connections.
    let rr: [(&str, Option<&Cgroup>, SocketAddr); 7] = [
        ("direct", None, direct),
        ("egress redirect", Some(&cg), egress_redirect),
        ("iptables REDIRECT → egress agent", None, ipt_egress),
        ("iptables REDIRECT → HAProxy", None, ipt_haproxy),
        (TCP_ENTRY, Some(&cg), egress_tcp_entry),
        (HTTP_ENTRY, Some(&cg), egress_http_entry),
        (HAPROXY_HTTP, None, ipt_haproxy_http),
    ];
    let rr_samples = rr_rounds(
        s.rounds,
        s.rr_ops,
        &rr.map(|(_, cgroup, dst)| (cgroup.into(), dst)),
        None,
    );
    for ((name, _, _), samples) in rr.iter().zip(&rr_samples) {
        plots.rr.insert(name, samples.pcts.clone());
    }
    writeln!(
        md,
        "## 2. Short connections: connect, 1 KiB request, 1 KiB response, close\n"
    )
    .unwrap();
    writeln!(
        md,
        "{} connections per run over 4 client threads, {} rounds. Each carries one HTTP/1.1 GET of {RR_SIZE} \
         bytes and its response of {RR_SIZE} bytes from the server, which keeps connections open (the client \
         closes); the raw contenders relay the bytes, the HTTP ones parse them.\n",
        s.rr_ops, s.rounds
    )
    .unwrap();
    writeln!(md, "| contender | connections/s | p50 µs | p99 µs | rate vs direct | p99 vs direct | rate vs HAProxy |").unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|").unwrap();
    let (base_rate, base_p99, hap_rate) = (
        rr_samples[0].get("rate").median,
        rr_samples[0].get("p99").median,
        rr_samples[3].get("rate").median,
    );
    for (k, (name, _, _)) in rr.iter().enumerate() {
        let (rate, p99) = (rr_samples[k].get("rate"), rr_samples[k].get("p99"));
        writeln!(
            md,
            "| {name} | {rate} | {} | {p99} | {:.2}× | {:.2}× | {:.2}× |",
            rr_samples[k].get("p50"),
            rate.median / base_rate,
            p99.median / base_p99,
            rate.median / hap_rate
        )
        .unwrap();
    }
    writeln!(md).unwrap();
    for (what, how, k) in [
        ("redirected short connections", "", 1),
        (
            "TCP ServiceEntry short connections",
            " (decided in the kernel, no proxy)",
            4,
        ),
        (
            "HTTP ServiceEntry short connections",
            " (through the agent, upstream connections kept)",
            5,
        ),
    ] {
        goals.add(
            format!("{what}/s{how} ≥ 1.5× iptables → HAProxy"),
            rr_samples[k].get("rate").median / hap_rate,
            |r| r >= 1.5,
        );
        goals.add(
            format!("{what} p99 ≤ 1.5× direct"),
            rr_samples[k].get("p99").median / base_p99,
            |r| r <= 1.5,
        );
    }
    writeln!(
        md,
        "- {HTTP_ENTRY} against HAProxy as an HTTP proxy ({HAPROXY_HTTP}): {:.2}× its connections/s, \
         {:.2}× its p99.\n",
        rr_samples[5].get("rate").median / rr_samples[6].get("rate").median,
        rr_samples[5].get("p99").median / rr_samples[6].get("p99").median,
    )
    .unwrap();

    // 3. Stream throughput, with the proxies' CPU time per GB.
    let streams: [(&str, Option<&Cgroup>, SocketAddr, Option<u32>); 4] = [
        ("direct", None, sink_direct, None),
        ("egress redirect", Some(&cg), sink_egress, Some(agent.pid())),
        (
            "iptables REDIRECT → HAProxy",
            None,
            sink_haproxy,
            Some(haproxy.id()),
        ),
        (TCP_ENTRY, Some(&cg), sink_tcp_entry, Some(agent.pid())),
    ];
    let mut st_samples: Vec<Samples> = (0..streams.len()).map(|_| Samples::default()).collect();
    for _ in 0..s.rounds.min(3) {
        for (k, (_, cgroup, dst, proxy)) in streams.iter().enumerate() {
            let cpu0 = proxy.map(cpu_seconds);
            let r = run_client(
                *cgroup,
                &["stream".into(), dst.to_string(), s.stream_bytes.to_string()],
            );
            st_samples[k].push("gbps", r["gbps"].parse().unwrap());
            if let (Some(p), Some(c0)) = (proxy, cpu0) {
                st_samples[k].push(
                    "cpu",
                    (cpu_seconds(*p) - c0) / (s.stream_bytes as f64 / 1e9),
                );
            }
        }
    }
    writeln!(
        md,
        "## 3. Stream throughput: {} MiB over one connection\n",
        s.stream_bytes >> 20
    )
    .unwrap();
    writeln!(
        md,
        "| contender | GB/s | vs direct | proxy CPU-seconds per GB |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|").unwrap();
    let base = st_samples[0].get("gbps").median;
    for (k, (name, _, _, proxy)) in streams.iter().enumerate() {
        let g = st_samples[k].get("gbps");
        let cpu = if proxy.is_some() {
            st_samples[k].get("cpu").to_string()
        } else {
            "–".to_owned()
        };
        writeln!(md, "| {name} | {g} | {:.2}× | {cpu} |", g.median / base).unwrap();
    }
    writeln!(md).unwrap();
    goals.add(
        "stream throughput through the agent ≥ 0.8× direct".into(),
        st_samples[1].get("gbps").median / base,
        |r| r >= 0.8,
    );

    // 4. Agent footprint. Idle means after the agent's periodic housekeeping (every 5 s), which
    // returns what the allocator kept from the rounds above.
    std::thread::sleep(Duration::from_secs(6));
    let idle_rss = rss_mb(agent.pid());
    let hold_n = s
        .idle
        .min(((nofile_hard() as usize).saturating_sub(200)) / 2);
    let mut hold = Command::new(egress_bin())
        .args(["exec", "--cgroup", cg.path.to_str().unwrap(), "--"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "client",
            "hold",
            &egress_redirect.to_string(),
            &hold_n.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(hold.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), format!("held={hold_n}"));
    // Every connection decided (the sniff of a silent client ends after 100 ms) and relayed.
    std::thread::sleep(Duration::from_secs(2));
    let held_rss = rss_mb(agent.pid());
    drop(hold.stdin.take());
    let _ = hold.wait();
    writeln!(md, "## 4. Agent footprint\n").unwrap();
    writeln!(md, "| state | agent RSS MB |").unwrap();
    writeln!(md, "|---|---:|").unwrap();
    writeln!(md, "| idle (6 s after the rounds above) | {idle_rss:.1} |").unwrap();
    writeln!(md, "| {hold_n} idle proxied connections | {held_rss:.1} |").unwrap();
    if hold_n < s.idle {
        writeln!(md, "\n{} connections were asked for; the open-file hard limit here ({}) allows {hold_n} (two descriptors each in the agent).", s.idle, nofile_hard()).unwrap();
    }
    writeln!(md).unwrap();
    goals.add_value(
        format!("agent RSS with {hold_n} idle proxied connections ≤ 64 MB"),
        held_rss,
        "MB",
        |v| v <= 64.0,
    );
    drop(_to_agent);
    drop(agent_ipt);
    drop(agent);
    stop(haproxy);

    // 5. Configuration apply.
    writeln!(md, "## 5. Configuration apply\n").unwrap();
    writeln!(md, "| configuration | time |").unwrap();
    writeln!(md, "|---|---:|").unwrap();
    for &n in &s.cidrs {
        let a = Agent::start(AgentOpts {
            config: &agent_config(n, ports),
            cgroup: &cg,
            inside: false,
            extra: vec![],
        });
        let l = a.wait_log(0, "programmed the maps in");
        let programmed = l.rsplit("in ").next().unwrap_or("?").to_owned();
        writeln!(md, "| program {n} CIDRs into empty maps | {programmed} |").unwrap();
        if Some(&n) == s.cidrs.last() {
            goals.add_value(
                format!("{n} CIDRs applied ≤ 0.5 s"),
                seconds(&programmed),
                "s",
                |v| v <= 0.5,
            );
        }
        let before = a.logs().len();
        let mut changed = agent_config(n, ports);
        changed = changed.replace("127.58.0.0/24", "127.58.0.0/25");
        a.write_config(&changed);
        let l = a.wait_log(before, "applied configuration generation");
        writeln!(
            md,
            "| reload {n} CIDRs, one changed | {} |",
            reload_times(&l)
        )
        .unwrap();
        if Some(&n) == s.cidrs.last() {
            let applied = l
                .split("changes applied in ")
                .nth(1)
                .and_then(|r| r.split(';').next())
                .unwrap_or("?");
            goals.add_value(
                format!("a one-entry change to {n} CIDRs applied ≤ 10 ms"),
                seconds(applied) * 1000.0,
                "ms",
                |v| v <= 10.0,
            );
        }
    }
    let entries = if quick { 1_000 } else { 10_000 };
    let a = Agent::start(AgentOpts {
        config: &service_entries(entries, 0),
        cgroup: &cg,
        inside: false,
        extra: vec![],
    });
    let before = a.logs().len();
    a.write_config(&service_entries(entries, 1));
    let l = a.wait_log(before, "applied configuration generation");
    writeln!(
        md,
        "| reload {entries} ServiceEntries, one changed | {} |",
        reload_times(&l)
    )
    .unwrap();
    drop(a);
    writeln!(md).unwrap();

    md += &node_section(&s, &mut plots);
    let restarts = restarts_section(&s, ports, &mut goals);
    let dns = dns_section(&s, &format!("in the run of the sections above, {command}"));

    if let Some(dir) = &criterion {
        md += &pipeline_section(std::path::Path::new(dir));
    }
    md += &restarts;
    md += &dns;

    let report = header(&s, quick) + &goals.render() + MISSES + &md + &plots.write(&out);
    std::fs::write(&out, report).expect("writing the report");
    println!("wrote {out}");
    ExitCode::SUCCESS
}

/// Section 6's stand-ins' ports, the same on loopback and in the nodes' ext namespaces.
#[derive(Clone, Copy)]
struct NodePorts {
    /// Redirected: no ServiceEntry declares it.
    redirect: u16,
    /// A TCP ServiceEntry by address: the kernel lets it straight out.
    direct: u16,
    /// Excluded.
    bypass: u16,
}

/// The Kubernetes namespace of section 6's pods.
const POD_NS: &str = "bench";
/// The node agent's own namespace's identity (intercepted by cgroup).
const OWN_WORKLOAD: &str = "bench/node-agent";
/// Section 6's intercepted contenders: the row's name, the kernel's verdict and the reason it
/// counts.
const NODE_PATHS: [(&str, &str, &str); 3] = [
    ("through the agent (redirect)", "redirect", "included-cidr"),
    ("direct (TCP ServiceEntry)", "direct", "tcp-entry"),
    ("bypass (excluded port)", "bypass", "excluded-port"),
];
/// The node agent's periodic housekeeping (every 5 s) returns what the allocator kept: its
/// footprint is read once that has run.
const HOUSEKEEPING: Duration = Duration::from_secs(6);
/// The longest a loop of section 6 that is not a client (enrolling pods, entering a
/// namespace) runs; what it did by then is reported.
const LOOP_LIMIT: Duration = Duration::from_secs(120);

/// The node agent's configuration: 127.65/16 (its own namespace, by cgroup) and the ext
/// namespace's address (from pods) redirected, except port `bypass`; 127.66/16 and the ext
/// address on port `direct` a TCP ServiceEntry by address.
fn node_config(p: NodePorts) -> String {
    format!(
        "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {{name: bench-node}}\nspec:\n  \
         outboundTrafficPolicy: {{mode: ALLOW_ANY}}\n  interception:\n    \
         includeOutboundIPRanges: [127.65.0.0/16, 127.66.0.0/16, {EXT_V4}/32]\n    \
         excludeOutboundPorts: [{}]\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {{name: bench-direct}}\nspec:\n  hosts: [direct.bench]\n  \
         addresses: [127.66.0.0/16, {EXT_V4}]\n  resolution: NONE\n  \
         ports: [{{number: {}, name: tcp, protocol: TCP}}]\n",
        p.bypass, p.direct
    )
}

/// Section 6: node mode. One node agent (`egress run --node`) serves the pods of a node built
/// as a runtime builds one (tests/src/node.rs: bridge and host-local, then egress-cni) and, by
/// cgroup, its own namespace. Section 2's short connections from a pod and from the agent's
/// namespace, each next to its own baseline; then the agent's footprint per enrolled pod.
fn node_section(s: &Settings, plots: &mut Plots) -> String {
    let held: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    let port = |i: usize| held[i].local_addr().unwrap().port();
    let ports = NodePorts {
        redirect: port(0),
        direct: port(1),
        bypass: port(2),
    };
    drop(held);
    // Dropped in reverse: the servers (whose listeners hold the ext namespaces), both nodes
    // (their pods get DEL while the agent still runs), the agent, its cgroup and directory.
    let dir = TempDir::new("bench-node");
    let admin = dir.path().join("admin.sock");
    let cg = Cgroup::new("bench-node");
    let agent = Agent::start_node(NodeOpts {
        config: &node_config(ports),
        state_file: &dir.path().join("workloads.json"),
        admin_socket: &admin,
        extra: vec![
            "--cgroup".into(),
            cg.path.display().to_string(),
            "--workload".into(),
            OWN_WORKLOAD.into(),
        ],
    });
    let pid = agent.pid();
    let node = Node::builder("bench")
        .cni_dir(egress_bin().parent().expect("the binaries' directory"))
        .chain(json!({"type": "egress-cni", "adminSocket": admin}))
        .build();
    let plain = Node::new("bench-plain");
    let servers = Servers::new();
    let on = |ip: [u8; 4], port| servers.http_sized(SocketAddr::from((ip, port)), RR_SIZE);
    let in_ext = |n: &Node, port| {
        servers.http_sized_on(n.ext().listen(SocketAddr::from((EXT_V4, port))), RR_SIZE)
    };
    // Baseline, redirect, direct, bypass.
    let pod_dst = [
        in_ext(&plain, ports.redirect),
        in_ext(&node, ports.redirect),
        in_ext(&node, ports.direct),
        in_ext(&node, ports.bypass),
    ];
    let own_dst = [
        on([127, 64, 0, 1], ports.redirect),
        on([127, 65, 0, 1], ports.redirect),
        on([127, 66, 0, 1], ports.direct),
        on([127, 65, 0, 1], ports.bypass),
    ];
    let outsider = plain.add_pod(POD_NS, "outsider");
    let pod = node.add_pod(POD_NS, "client");

    let mut runs = pod_runs(&outsider, &pod, &pod_dst);
    runs.extend(own_dst.iter().enumerate().map(|(i, d)| {
        let at = if i == 0 { At::Here } else { At::Cgroup(&cg) };
        (at, *d)
    }));
    let samples = rr_rounds(s.rounds, s.rr_ops, &runs, Some(pid));
    drop(runs);
    let (pod_rows, own_rows) = samples.split_at(4);
    // The paths are what the rows say they are: the kernel counted every connection.
    let label = format!("{POD_NS}/{}", pod.sandbox.name);
    let want = s.rounds as u64 * s.rr_ops;
    let counted = [&label, OWN_WORKLOAD].map(|w| {
        let stats = agent.workload_stats(w);
        NODE_PATHS.map(|(_, _, reason)| {
            let n = stats.get(reason).copied().unwrap_or(0);
            assert!(
                n >= want,
                "{w}: {n} connections counted {reason}, {want} made"
            );
            n
        })
    });
    let setns = setns_cost(&pod.sandbox.netns, s.rounds, s.connects * 10);

    let mut md = String::from("## 6. Node mode: from a pod and from the agent's own namespace\n\n");
    writeln!(
        md,
        "One node agent (`egress run --node`, and `--cgroup` to intercept a cgroup of its own \
         namespace) serves the pods of a node built for the run from network namespaces as a \
         container runtime builds one: Debian's bridge with host-local, then `egress-cni`, which \
         enrols each pod (tests/src/node.rs). Section 2's short connections ({} per run over 4 \
         threads, {RR_SIZE} bytes each way), {} rounds, the eight contenders alternating run by \
         run:\n\n\
         - **from a pod**, to stand-ins in the node's ext namespace ({EXT_V4}): **through the \
         agent** (a port no ServiceEntry declares, redirected under `ALLOW_ANY`: the agent \
         accepts on its listener inside the pod's namespace and connects upstream from that \
         namespace), **direct** (a TCP ServiceEntry by address, `resolution: NONE`: decided in \
         the kernel, no agent hop), **bypass** (an excluded port); the **baseline** is a pod of a \
         second node whose chain has no egress-cni, to the same kind of stand-in in its own ext \
         namespace: the same path, not enrolled (the hooks leave it alone, `not-enrolled`).\n\
         - **from the agent's own namespace**, intercepted by cgroup, to stand-ins on loopback: \
         the same three, and the **baseline** outside the cgroup.\n\n\
         A pod's connection crosses a veth, the node's bridge and IP forwarding to another veth \
         before it reaches the stand-in, where the agent's namespace has loopback: pod rows \
         compare to the pod baseline, rows from the agent's namespace to the loopback baseline. \
         The node agent's hooks are attached at the root of the cgroup hierarchy, so both \
         baselines pass them (and are left alone). **agent CPU** is the time the agent's threads \
         ran during a run, per connection.\n",
        s.rr_ops, s.rounds
    )
    .unwrap();
    node_table(
        &mut md,
        &[("pod", pod_rows), ("agent's namespace", own_rows)],
    );
    let base = |m: &str| pod_rows[0].get(m).median / own_rows[0].get(m).median;
    writeln!(
        md,
        "- The pod path itself (the pod baseline against the loopback baseline): {:.2}× the \
         connections/s, {:.2}× the p50, {:.2}× the p99.",
        base("rate"),
        base("p50"),
        base("p99")
    )
    .unwrap();
    let said = |c: &[u64; 3]| {
        NODE_PATHS
            .iter()
            .zip(c)
            .map(|((_, verdict, reason), n)| format!("{n} {verdict} ({reason})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(
        md,
        "- Verdicts the kernel counted in these rounds ({want} connections per contender): from \
         the pod, {}; from the agent's namespace, {}.",
        said(&counted[0]),
        said(&counted[1])
    )
    .unwrap();
    writeln!(
        md,
        "- Entering a pod's network namespace and coming back (two setns(2) calls), as the \
         agent does around each socket it opens for a pod (its two listeners at enrolment, the \
         upstream socket of each redirected connection): {setns} µs a round trip ({} per round, \
         {} rounds, on one thread), against the agent's {:.1} µs of CPU per connection through \
         it from the pod and {:.1} µs from its own namespace.\n",
        s.connects * 10,
        s.rounds,
        pod_rows[1].get("agent_cpu_us").median,
        own_rows[1].get("agent_cpu_us").median,
    )
    .unwrap();
    for (side, rows) in [("pod", pod_rows), ("agent's namespace", own_rows)] {
        for (k, (what, _, _)) in NODE_PATHS.iter().enumerate() {
            let ratio = rows[k + 1].pcts.iter().zip(&rows[0].pcts);
            plots.node.push((
                format!("{side}: {what}"),
                ratio.map(|(a, b)| a / b).collect(),
            ));
        }
    }

    // The footprint: no pod, then `s.pods` pods enrolled, then released.
    node.remove_pod(&pod);
    std::thread::sleep(HOUSEKEEPING);
    let zero = footprint(pid);
    let (mut idle, mut add_ms) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for i in 0..s.pods {
        if started.elapsed() > LOOP_LIMIT {
            break;
        }
        let t = Instant::now();
        idle.push(node.add_pod(POD_NS, &format!("idle-{i}")));
        add_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let n = idle.len();
    std::thread::sleep(HOUSEKEEPING);
    let full = footprint(pid);
    let crowded = rr_rounds(
        s.rounds,
        s.rr_ops,
        &pod_runs(&outsider, &idle[0], &pod_dst),
        Some(pid),
    );
    let mut del_ms = Vec::new();
    for p in &idle {
        let t = Instant::now();
        node.remove_pod(p);
        del_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let settled = eventually(10, || footprint(pid).fds == zero.fds);
    std::thread::sleep(HOUSEKEEPING);
    let after = footprint(pid);

    writeln!(md, "### The agent's footprint per enrolled pod\n").unwrap();
    writeln!(
        md,
        "{n} pods enrolled one after another through the node's chain, as a runtime enrols them \
         (CNI ADD: bridge with host-local, then egress-cni), none carrying traffic, then \
         released (CNI DEL, then the namespace deleted). RSS is the agent's VmRSS, descriptors \
         its /proc/PID/fd, each read {HOUSEKEEPING:?} after the change, once the agent's \
         housekeeping has run.{}\n",
        if n < s.pods {
            format!(
                " ({} were asked for; enrolling stopped after {LOOP_LIMIT:?}.)",
                s.pods
            )
        } else {
            String::new()
        }
    )
    .unwrap();
    writeln!(
        md,
        "| agent | RSS | open descriptors | sockets | network namespaces | others |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|---:|").unwrap();
    let row = |md: &mut String, what: &str, rss: String, f: [f64; 3]| {
        let fmt = |v: f64| {
            if v.fract() == 0.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        };
        writeln!(
            md,
            "| {what} | {rss} | {} | {} | {} | {} |",
            fmt(f[0]),
            fmt(f[1]),
            fmt(f[2]),
            fmt(f[0] - f[1] - f[2])
        )
        .unwrap();
    };
    for (what, f) in [
        ("no pod enrolled (after the rounds above)", &zero),
        (&*format!("{n} pods enrolled"), &full),
    ] {
        row(&mut md, what, format!("{:.1} MB", f.rss_mb), f.counts());
    }
    let (f, z) = (full.counts(), zero.counts());
    let per = [0, 1, 2].map(|i| (f[i] - z[i]) / n as f64);
    row(
        &mut md,
        &format!("per pod (difference ÷ {n})"),
        format!("{:.0} KB", (full.rss_mb - zero.rss_mb) * 1024.0 / n as f64),
        per,
    );
    row(
        &mut md,
        &format!("after releasing the {n} (and the rounds with them, below)"),
        format!("{:.1} MB", after.rss_mb),
        after.counts(),
    );
    writeln!(md).unwrap();
    writeln!(
        md,
        "- Descriptors after the release: {} ({} open, {} with no pod).",
        if settled {
            "back to where they were with no pod"
        } else {
            "**not** back to where they were with no pod within 10 s"
        },
        after.counts()[0],
        zero.counts()[0]
    )
    .unwrap();
    writeln!(
        md,
        "- CNI ADD of one pod through the whole chain: {}; DEL (then `ip netns del`): {}.",
        first_and_last(&add_ms),
        first_and_last(&del_ms)
    )
    .unwrap();
    writeln!(
        md,
        "- With the {n} pods enrolled, the same short connections from one of them, in rounds of \
         their own (the rows above had one pod enrolled):\n"
    )
    .unwrap();
    node_table(&mut md, &[(&format!("pod, {n} enrolled"), &crowded)]);
    let redirect = |rows: &[Samples], m: &str| rows[1].get(m).median / rows[0].get(m).median;
    writeln!(
        md,
        "- Through the agent with {n} pods enrolled against one: p50 {:.2}× its baseline against \
         {:.2}×, p99 {:.2}× against {:.2}×, agent CPU {:.1} against {:.1} µs per connection.\n",
        redirect(&crowded, "p50"),
        redirect(pod_rows, "p50"),
        redirect(&crowded, "p99"),
        redirect(pod_rows, "p99"),
        crowded[1].get("agent_cpu_us").median,
        pod_rows[1].get("agent_cpu_us").median
    )
    .unwrap();
    md
}

/// Section 6's runs from pods: the baseline from `outsider` (not enrolled), the intercepted
/// paths from `client`, to `dst` (baseline, redirect, direct, bypass).
fn pod_runs<'a>(
    outsider: &'a Pod,
    client: &'a Pod,
    dst: &[SocketAddr; 4],
) -> Vec<(At<'a>, SocketAddr)> {
    dst.iter()
        .enumerate()
        .map(|(i, d)| {
            let from = if i == 0 { outsider } else { client };
            (At::Netns(&from.sandbox.netns), *d)
        })
        .collect()
}

/// Section 6's table: for each side, its baseline's row (the first), then each path's, with
/// ratios to that baseline.
fn node_table(md: &mut String, sides: &[(&str, &[Samples])]) {
    writeln!(
        md,
        "| from | contender | connections/s | p50 µs | p99 µs | rate vs baseline | p50 vs baseline \
         | p99 vs baseline | agent CPU µs per connection |"
    )
    .unwrap();
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    for (side, rows) in sides {
        let names = std::iter::once(if side.starts_with("pod") {
            "baseline: a pod that is not enrolled"
        } else {
            "baseline: outside the intercepted cgroup"
        })
        .chain(NODE_PATHS.iter().map(|(what, _, _)| *what));
        for (r, name) in rows.iter().zip(names) {
            let vs = |m: &str| r.get(m).median / rows[0].get(m).median;
            writeln!(
                md,
                "| {side} | {name} | {} | {} | {} | {:.2}× | {:.2}× | {:.2}× | {} |",
                r.get("rate"),
                r.get("p50"),
                r.get("p99"),
                vs("rate"),
                vs("p50"),
                vs("p99"),
                r.get("agent_cpu_us")
            )
            .unwrap();
        }
    }
    writeln!(md).unwrap();
}

/// "median X ms (first ten Y ms, last ten Z ms)" of durations in milliseconds, in order.
fn first_and_last(ms: &[f64]) -> String {
    let median = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            spread(v.to_vec()).median
        }
    };
    let ten = ms.len().min(10);
    format!(
        "median {:.0} ms (the first ten {:.0} ms, the last ten {:.0} ms)",
        median(ms),
        median(&ms[..ten]),
        median(&ms[ms.len() - ten..])
    )
}

/// A process's resident memory and open descriptors by kind: what /proc/PID/fd links to
/// before its colon (`socket`, `net` for a network namespace, `anon_inode`, `pipe`), `net` for
/// a namespace opened by its `ip netns` path, `file` for another path.
#[derive(PartialEq)]
struct Footprint {
    rss_mb: f64,
    fds: BTreeMap<String, usize>,
}

impl Footprint {
    /// Descriptors: all, sockets, network namespaces.
    fn counts(&self) -> [f64; 3] {
        let of = |k: &str| self.fds.get(k).copied().unwrap_or(0) as f64;
        [
            self.fds.values().sum::<usize>() as f64,
            of("socket"),
            of("net"),
        ]
    }
}

fn footprint(pid: u32) -> Footprint {
    let mut fds = BTreeMap::new();
    let links = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok());
    for target in links {
        let t = target.to_string_lossy();
        let kind = match t.split_once(':') {
            // A namespace opened by its `ip netns` path links to that path.
            _ if t.starts_with("/run/netns/") => "net",
            Some((k, _)) if !t.starts_with('/') => k,
            _ => "file",
        };
        *fds.entry(kind.to_owned()).or_default() += 1;
    }
    Footprint {
        rss_mb: rss_mb(pid),
        fds,
    }
}

/// Microseconds per round trip into `ns` and back, two setns(2) calls, as the agent makes
/// around each socket it opens for a pod: `count` round trips per round, for `rounds` rounds
/// (each bounded by `LOOP_LIMIT`), on a thread of its own.
fn setns_cost(ns: &Netns, rounds: usize, count: u64) -> Spread {
    let pod = std::fs::File::open(ns.path()).expect("the pod's network namespace");
    std::thread::scope(|t| {
        t.spawn(|| {
            let home = std::fs::File::open("/proc/thread-self/ns/net")
                .expect("this thread's network namespace");
            let enter = |f: &std::fs::File| {
                // SAFETY: setns(2) on an open namespace file; it moves this thread only.
                let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            };
            let lap = || {
                let start = Instant::now();
                let mut done = 0u64;
                while done < count && start.elapsed() < LOOP_LIMIT {
                    enter(&pod);
                    enter(&home);
                    done += 1;
                }
                start.elapsed().as_secs_f64() * 1e6 / done.max(1) as f64
            };
            spread((0..rounds).map(|_| lap()).collect())
        })
        .join()
        .expect("the setns loop")
    })
}

/// The issue's goals, each as a figure from this run.
#[derive(Default)]
struct Goals(Vec<(String, String, bool)>);

impl Goals {
    /// A ratio goal.
    fn add(&mut self, what: String, ratio: f64, met: impl Fn(f64) -> bool) {
        self.0.push((what, format!("{ratio:.2}×"), met(ratio)));
    }

    /// A goal on an absolute value.
    fn add_value(&mut self, what: String, v: f64, unit: &str, met: impl Fn(f64) -> bool) {
        self.0.push((what, format!("{v:.2} {unit}"), met(v)));
    }

    /// A goal shown as `shown`.
    fn add_shown(&mut self, what: String, shown: String, met: bool) {
        self.0.push((what, shown, met));
    }

    fn render(&self) -> String {
        let mut md = String::from("## Goals\n\n| goal | this run | met |\n|---|---:|:---:|\n");
        for (what, got, met) in &self.0 {
            writeln!(
                md,
                "| {what} | {got} | {} |",
                if *met { "yes" } else { "**no**" }
            )
            .unwrap();
        }
        md.push('\n');
        md
    }
}

/// Why the goals this report does not meet are not met, and what was tried.
const MISSES: &str = include_str!("../../benchmarks/misses.md");

/// Seconds in a duration as Rust's `Debug` prints it (`57.7ms`, `467.4µs`, `1.2s`).
fn seconds(d: &str) -> f64 {
    let d = d.trim();
    let (num, scale) = if let Some(v) = d.strip_suffix("ns") {
        (v, 1e-9)
    } else if let Some(v) = d.strip_suffix("µs") {
        (v, 1e-6)
    } else if let Some(v) = d.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = d.strip_suffix('s') {
        (v, 1.0)
    } else {
        (d, f64::NAN)
    };
    num.parse::<f64>().map_or(f64::NAN, |v| v * scale)
}

/// "parsed in X, N changes applied in Y" from a reload log line.
fn reload_times(line: &str) -> String {
    let inner = line
        .split_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .map_or("?", |(i, _)| i);
    inner.to_owned()
}

fn start_haproxy(port: u16, http_port: u16) -> std::process::Child {
    let cfg = std::env::temp_dir().join(format!("egress-bench-haproxy-{}.cfg", std::process::id()));
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn {}\n  uid {HAPROXY_UID}\n  gid {HAPROXY_UID}\n  nbthread 2\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\nbackend be\n  server s 0.0.0.0:0\n\
             frontend fe_http\n  mode http\n  bind 127.0.0.1:{http_port}\n  default_backend be_http\n\
             backend be_http\n  mode http\n  http-reuse always\n  server s 0.0.0.0:0\n",
            // Two descriptors a connection, within the open-file limit.
            (nofile_hard().saturating_sub(200) / 2).min(40_000)
        ),
    )
    .unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting haproxy");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(port) || !listening(http_port) {
        assert!(
            Instant::now() < deadline,
            "haproxy did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn stop(mut c: std::process::Child) {
    let _ = c.kill();
    let _ = c.wait();
}

fn listening(port: u16) -> bool {
    let hex = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&hex) && f[3] == "0A"
        })
}

/// CPU time of a process's threads, in seconds, to the nanosecond (their schedstat; the
/// clock ticks of /proc/PID/stat are 10 ms, a few µs per connection in a short run). Threads
/// that ended are not counted: the agent and HAProxy keep theirs.
fn cpu_seconds(pid: u32) -> f64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten();
    let ns: f64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum();
    ns / 1e9
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn nofile_hard() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_max
}

/// Section 6: the criterion micro-benchmarks of the configuration pipeline
/// (`egress-user/benches/compile.rs`), read from criterion's `estimates.json` under `dir`.
fn pipeline_section(dir: &std::path::Path) -> String {
    let estimate = |group: &str, step: &str, size: u32| -> String {
        let path = dir
            .join(group)
            .join(step)
            .join(size.to_string())
            .join("new/estimates.json");
        let median = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|v| v["median"].clone());
        let ns = |v: &serde_json::Value| Duration::from_nanos(v.as_f64().unwrap_or(0.0) as u64);
        match median {
            Some(m) if m["point_estimate"].is_f64() => format!(
                "{:.1?} ({:.1?}–{:.1?})",
                ns(&m["point_estimate"]),
                ns(&m["confidence_interval"]["lower_bound"]),
                ns(&m["confidence_interval"]["upper_bound"])
            ),
            _ => "–".to_owned(),
        }
    };
    let mut md = String::from(
        "## 7. Configuration pipeline (criterion)\n\n\
         Micro-benchmarks in user space (`cargo bench -p egress-user --bench compile`), medians with \
         their 95% confidence interval: **load** reads and parses the YAML into the model, **plan** \
         compiles the contents of the datapath's maps, **registry** what the agent matches streams \
         against (empty for an exclusion list), **diff** the map operations between two plans that \
         differ in one entry, which is what a reload writes. The decision itself runs in the kernel, \
         against the maps: its time per call is measured where it runs (section 1, time inside the \
         hooks).\n\n\
         | configuration | load | plan | registry | diff, one entry changed |\n|---|---:|---:|---:|---:|\n",
    );
    for (group, size, what) in [
        ("cidrs", 1_000, "1000 excluded CIDRs"),
        ("cidrs", 10_000, "10000 excluded CIDRs"),
        ("cidrs", 100_000, "100000 excluded CIDRs"),
        ("service-entries", 10_000, "10000 TCP ServiceEntries"),
    ] {
        writeln!(
            md,
            "| {what} | {} | {} | {} | {} |",
            estimate(group, "load", size),
            estimate(group, "plan", size),
            estimate(group, "registry", size),
            estimate(group, "diff", size)
        )
        .unwrap();
    }
    md.push('\n');
    md
}

/// Calls and nanoseconds spent per loaded program named `egress_*` (both agents' programs:
/// the iptables contender's, attached to an empty cgroup, do not run in the bypass rounds).
fn hook_time() -> BTreeMap<String, (u64, u64)> {
    let mut m = BTreeMap::new();
    for p in aya::programs::loaded_programs().flatten() {
        if let Some(name) = p.name_as_str().filter(|n| n.starts_with("egress_")) {
            let e: &mut (u64, u64) = m.entry(name.to_owned()).or_default();
            e.0 += p.run_count();
            e.1 += p.run_time().as_nanos() as u64;
        }
    }
    m
}

/// What `hook_time` counted since `before`.
fn hook_time_since(before: &BTreeMap<String, (u64, u64)>) -> BTreeMap<String, (u64, u64)> {
    hook_time()
        .into_iter()
        .map(|(name, (calls, ns))| {
            let (c0, n0) = before.get(&name).copied().unwrap_or_default();
            (name, (calls.saturating_sub(c0), ns.saturating_sub(n0)))
        })
        .collect()
}

/// Cores, CPU model, memory and kernel.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cores} cores, {cpu}; {}; Linux {}",
        mem.split_whitespace().collect::<Vec<_>>().join(" "),
        kernel.trim()
    )
}

fn header(s: &Settings, quick: bool) -> String {
    format!(
        "# Benchmarks\n\nRegenerated by `cargo xtask bench`{} (as root). Every figure is measured in one run, contenders \
         alternating round by round ({} rounds) so that the machine's drift cancels out; all traffic is on loopback \
         (127.0.0.0/8) or, in sections 6 and 9, between the network namespaces of nodes built for the run (198.18.0.0/15). \
         Figures are medians with the (min–max) over rounds; ratios compare medians.\n\n\
         - machine: {}\n- contenders: **direct** (no hook, no proxy); **egress bypass** \
         (hooks attached, destination excluded); **egress redirect** (hooks, through the agent); **iptables REDIRECT → egress \
         agent** (the same agent behind classic interception, finding the destination through conntrack); **iptables REDIRECT \
         → HAProxy** (Debian's HAProxy, `server s 0.0.0.0:0`); **iptables exclude chain** (Istio's RETURN rule per excluded \
         range, the destination matching the last one); **egress, TCP ServiceEntry** (hooks attached, the destination a \
         TCP ServiceEntry by address: the kernel allows it straight out and accounts for it, no proxy; the access record \
         comes from the kernel); **egress, HTTP ServiceEntry** (hooks, through the agent as an HTTP proxy matching the \
         Host, upstream connections kept for the next request); **iptables REDIRECT → HAProxy, mode http** (HAProxy as \
         an HTTP proxy, `http-reuse always`)\n\n",
        if quick { " --quick" } else { "" },
        s.rounds,
        machine()
    )
}

/// Data for the two plots.
#[derive(Default)]
struct Plots {
    /// contender → (excluded CIDRs, p50 µs)
    bypass: BTreeMap<&'static str, Vec<(f64, f64)>>,
    /// contender → latency percentiles 1..=99, 99.9 (last round)
    rr: BTreeMap<&'static str, Vec<f64>>,
    /// node mode: side and path → each latency percentile over its side's baseline's
    node: Vec<(String, Vec<f64>)>,
}

impl Plots {
    /// Write the SVGs next to `out`; the markdown that shows them.
    fn write(&self, out: &str) -> String {
        let dir = std::path::Path::new(out)
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_default()
            .join("tests/benchmarks");
        std::fs::create_dir_all(&dir).expect("creating the plot directory");
        let bypass = dir.join("bypass.svg");
        let rr = dir.join("short-connections.svg");
        let node = dir.join("node-mode.svg");
        egress_tests::plot::lines(
            &bypass,
            "Bypass: connect + close p50 vs excluded CIDRs",
            "excluded CIDRs (log)",
            "p50 µs",
            true,
            &self
                .bypass
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect::<Vec<_>>(),
        );
        let pct = |v: &Vec<f64>| -> Vec<(f64, f64)> {
            v.iter()
                .enumerate()
                .map(|(i, y)| (if i < 99 { (i + 1) as f64 } else { 99.9 }, *y))
                .collect()
        };
        egress_tests::plot::lines(
            &rr,
            "Short connections: latency by percentile",
            "percentile",
            "µs",
            false,
            &self
                .rr
                .iter()
                .map(|(k, v)| (*k, pct(v)))
                .collect::<Vec<_>>(),
        );
        egress_tests::plot::lines(
            &node,
            "Node mode: latency by percentile over the same side's baseline",
            "percentile",
            "× baseline",
            false,
            &self
                .node
                .iter()
                .map(|(k, v)| (k.as_str(), pct(v)))
                .collect::<Vec<_>>(),
        );
        "## Plots\n\n![bypass latency vs number of CIDRs](tests/benchmarks/bypass.svg)\n\n\
         ![short-connection latency distribution](tests/benchmarks/short-connections.svg)\n\n\
         ![node mode: short-connection latency from a pod and from the agent's namespace, over \
         each side's baseline](tests/benchmarks/node-mode.svg)\n"
            .to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Section 8: restarts and metrics.

/// The restart rounds' stand-in: in 127.67/16, which their agents redirect.
const RESTART_DST: [u8; 4] = [127, 67, 0, 1];
/// How often `client gap` tries to connect.
const GAP_EVERY: Duration = Duration::from_millis(1);
/// The longest a `client gap` runs (a round takes a few seconds).
const GAP_LIMIT_SECS: u64 = 60;
/// Steady traffic through the agent before it is killed or replaced, and after.
const STEADY: Duration = Duration::from_millis(300);
/// How long a restart round goes on after the new agent is ready: its first relayed
/// connection falls within it.
const AFTER_READY: Duration = Duration::from_secs(1);

/// The restart rounds' configuration: 127.67/16 redirected (on a port no ServiceEntry
/// declares: relayed as TCP), and what a redirect does while no agent listens.
fn restart_config(failure_mode: &str) -> String {
    format!(
        "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {{name: bench-restart}}\nspec:\n  \
         failureMode: {failure_mode}\n  interception:\n    includeOutboundIPRanges: [127.67.0.0/16]\n"
    )
}

/// A `client gap` running inside an intercepted cgroup.
struct GapClient {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

/// One attempt of a `client gap`: when it started and ended (CLOCK_MONOTONIC ns), how it
/// ended.
struct Attempt {
    start: u64,
    end: u64,
    what: String,
}

impl GapClient {
    /// Start it in `cg` against `dst`; returns once a connection has gone through the agent.
    fn start(cg: &Cgroup, dst: SocketAddr) -> GapClient {
        let mut child = Command::new(egress_bin())
            .args(["exec", "--cgroup", cg.path.to_str().unwrap(), "--"])
            .arg(std::env::current_exe().unwrap())
            .args([
                "client",
                "gap",
                &dst.to_string(),
                &GAP_EVERY.as_micros().to_string(),
                &GAP_LIMIT_SECS.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting client gap");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        if line.trim() != "up" {
            let _ = child.kill();
            let _ = child.wait();
            panic!("client gap never got through the agent to {dst}: {line:?}");
        }
        GapClient { child, out }
    }

    /// Stop it (its standard input closes); its attempts.
    fn finish(mut self) -> Vec<Attempt> {
        drop(self.child.stdin.take());
        let mut text = String::new();
        self.out
            .read_to_string(&mut text)
            .expect("client gap's attempts");
        let status = self.child.wait().expect("client gap");
        assert!(status.success(), "client gap: {status}");
        text.lines()
            .filter_map(|l| {
                let mut w = l.strip_prefix("a ")?.split_whitespace();
                Some(Attempt {
                    start: w.next()?.parse().ok()?,
                    end: w.next()?.parse().ok()?,
                    what: w.next()?.to_owned(),
                })
            })
            .collect()
    }
}

fn ms_between(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1e6
}

/// How the attempts ended: outcome → count.
fn outcomes<'a>(attempts: impl Iterator<Item = &'a Attempt>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in attempts {
        *m.entry(a.what.clone()).or_default() += 1;
    }
    m
}

/// What one kill-and-restart round measured.
struct Restart {
    /// From `kill -9` to the answer of the first connection the new agent relayed, ms.
    gap_ms: f64,
    /// From starting the new agent (once the old one is reaped) to its ready line, ms.
    startup_ms: f64,
    /// From the kill to the old agent reaped (when the new one is started), ms.
    reap_ms: f64,
    /// From the new agent's ready line (as the run read it) to the answer of its first
    /// relayed connection, ms (negative when that came first).
    after_ready_ms: f64,
    /// How the attempts between the kill and the first relayed one ended (that one not
    /// counted).
    gap: BTreeMap<String, usize>,
    /// Attempts that reached the stand-in unmediated, over the whole round.
    straight: usize,
    /// What the kernel counted under `reason` during the round.
    kernel: u64,
}

/// `kill -9` the agent while `client gap` connects through it from `cg`, and start it again at
/// once with the same arguments, as a supervisor would.
fn restart_round(agent: &mut Agent, cg: &Cgroup, dst: SocketAddr, reason: &str) -> Restart {
    let counted = |a: &Agent| a.stats().get(reason).copied().unwrap_or(0);
    let before = counted(agent);
    let client = GapClient::start(cg, dst);
    std::thread::sleep(STEADY);
    let killed = mono_ns();
    agent.kill();
    let started = mono_ns();
    agent.start_again();
    let ready = mono_ns();
    std::thread::sleep(AFTER_READY);
    let attempts = client.finish();
    let kernel = counted(agent).saturating_sub(before);
    let first = attempts
        .iter()
        .find(|a| a.start >= started && a.what == "agent");
    let gap = outcomes(
        attempts
            .iter()
            .filter(|a| a.end > killed && first.is_none_or(|f| a.start < f.start)),
    );
    Restart {
        gap_ms: first.map_or(f64::NAN, |f| ms_between(killed, f.end)),
        startup_ms: ms_between(started, ready),
        reap_ms: ms_between(killed, started),
        after_ready_ms: first.map_or(f64::NAN, |f| ms_between(ready, f.end)),
        gap,
        straight: attempts.iter().filter(|a| a.what == "straight").count(),
        kernel,
    }
}

/// What one handover round measured.
struct Handover {
    /// How the attempts from starting the new agent until the old one exited ended.
    during: BTreeMap<String, usize>,
    /// From starting the new agent to the old one's "handed over" line, ms.
    handed_ms: f64,
    /// From starting the new agent to its ready line, ms.
    ready_ms: f64,
    /// From SIGTERM to the old agent's exit (it drains first), ms.
    stop_ms: f64,
    /// Whether the old agent cut connections when it stopped.
    cut: bool,
}

/// A second agent started beside `current` with the same arguments, then `current` stopped
/// (SIGTERM), as a rolling update does, while `client gap` connects from `cg`. The new agent
/// becomes `current`; the old one joins `retired` (its guard would remove the pins and files
/// both share, so it is dropped after the last one).
fn handover_round(
    current: &mut Agent,
    retired: &mut Vec<Agent>,
    cg: &Cgroup,
    dst: SocketAddr,
) -> Handover {
    let client = GapClient::start(cg, dst);
    std::thread::sleep(STEADY);
    let from = current.logs().len();
    let started = mono_ns();
    let old: &Agent = current;
    let (new, ready, handed) = std::thread::scope(|t| {
        let beside = t.spawn(|| {
            let a = old.start_beside();
            (a, mono_ns())
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut handed = None;
        while handed.is_none() && Instant::now() < deadline {
            let logs = old.logs();
            if logs
                .iter()
                .skip(from)
                .any(|l| l.contains("handed over to a new agent"))
            {
                handed = Some(mono_ns());
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let (a, ready) = beside.join().expect("the new agent");
        (a, ready, handed)
    });
    let stopping = mono_ns();
    current.terminate();
    let stopped = mono_ns();
    std::thread::sleep(STEADY);
    let attempts = client.finish();
    let during = outcomes(
        attempts
            .iter()
            .filter(|a| a.end > started && a.start < stopped),
    );
    let cut = current.logs().iter().any(|l| l.contains("they are cut"));
    retired.push(std::mem::replace(current, new));
    Handover {
        during,
        handed_ms: handed.map_or(f64::NAN, |h| ms_between(started, h)),
        ready_ms: ms_between(started, ready),
        stop_ms: ms_between(stopping, stopped),
        cut,
    }
}

/// A directory of the run's own on a tmpfs (/dev/shm), removed on drop.
struct ShmDir(std::path::PathBuf);

impl ShmDir {
    fn new() -> ShmDir {
        let dir = std::path::PathBuf::from(format!("/dev/shm/egress-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory in /dev/shm");
        ShmDir(dir)
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// "median (min–max)" of counts.
fn count_spread(v: impl IntoIterator<Item = usize>) -> String {
    let s = spread(v.into_iter().map(|n| n as f64).collect());
    if s.min == s.max {
        format!("{:.0}", s.median)
    } else {
        format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max)
    }
}

/// Milliseconds "median (min–max)".
fn ms_spread(v: impl IntoIterator<Item = f64>) -> String {
    let s = spread(v.into_iter().collect());
    format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max)
}

/// Section 8: the agent killed and started again, and replaced by a new one beside it, while
/// a client connects through it every millisecond; then what recording metrics costs the
/// short connections of section 2.
fn restarts_section(s: &Settings, ports: Ports, goals: &mut Goals) -> String {
    let servers = Servers::new();
    let stand_in = servers.peer(SocketAddr::from((RESTART_DST, ports.tcp[0])));
    let modes = [
        ("closed", "agent-down", Cgroup::new("bench-closed")),
        ("open", "agent-down-open", Cgroup::new("bench-open")),
    ];
    // The admin sockets (and the handover sockets beside them) on a tmpfs, as /var/run is
    // on a node. On ext4 a file made after one is removed gets the removed one's inode number,
    // and an agent that has handed over tells its own socket files from its successor's by
    // inode number: stopping, it removes the successor's handover socket, and the next
    // handover finds nobody to take over from.
    let sockets = ShmDir::new();
    // Dropped after the agents that replaced them.
    let mut retired = Vec::new();
    let mut agents: Vec<Agent> = modes
        .iter()
        .map(|(mode, _, cg)| {
            let admin = sockets.0.join(format!("{mode}.sock"));
            Agent::start(AgentOpts {
                config: &restart_config(mode),
                cgroup: cg,
                inside: false,
                extra: vec!["--admin-socket".into(), admin.display().to_string()],
            })
        })
        .collect();
    let mut restarts: [Vec<Restart>; 2] = Default::default();
    for _ in 0..s.rounds {
        for (k, (_, reason, cg)) in modes.iter().enumerate() {
            restarts[k].push(restart_round(&mut agents[k], cg, stand_in, reason));
        }
    }
    let mut handovers = Vec::new();
    for _ in 0..s.rounds {
        handovers.push(handover_round(
            &mut agents[0],
            &mut retired,
            &modes[0].2,
            stand_in,
        ));
    }
    drop(agents);
    drop(retired);

    let mut md = String::from("## 8. Restarts and metrics\n\n");
    writeln!(
        md,
        "### The agent killed and started again\n\n\
         An agent intercepts a cgroup (as section 2's **egress redirect**: 127.67.0.0/16 \
         redirected, a port no ServiceEntry declares) and a client in the cgroup tries a \
         connection every {GAP_EVERY:?} to a stand-in on loopback, which answers with the \
         address the connection came from: the agent's upstream socket (**relayed**) or the \
         client's own (**straight out**, unmediated). After {STEADY:?} of that, `kill -9` the \
         agent and, once it is reaped, start it again at once with the same arguments, as a \
         supervisor or the kubelet would: it takes the maps pinned in its `--pin-path` over and \
         binds its listener again. **gap** is from the kill to the answer of the first \
         connection the new agent relayed (the attempts are {GAP_EVERY:?} apart, so the gap is \
         known to about that); **start-up** from starting the new process to its `ready` log \
         line as read by the run. The connects in the gap are those that ended after the kill, \
         up to the first relayed one; **cut by the kill** were accepted by the old agent (or \
         queued on its listener) when it died. {} rounds, the two modes alternating; every \
         figure is a median with the (min–max) over rounds.\n",
        s.rounds
    )
    .unwrap();
    writeln!(
        md,
        "| failureMode | gap ms | start-up to ready ms | connects in the gap | refused | straight out | cut by the kill | other | kernel counted (reason) |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    for (k, (mode, reason, _)) in modes.iter().enumerate() {
        let rs = &restarts[k];
        let of = |r: &Restart, w: &[&str]| {
            w.iter()
                .map(|w| r.gap.get(*w).copied().unwrap_or(0))
                .sum::<usize>()
        };
        let known = ["refused", "straight", "reset", "closed"];
        writeln!(
            md,
            "| {mode} | {} | {} | {} | {} | {} | {} | {} | {} ({reason}) |",
            ms_spread(rs.iter().map(|r| r.gap_ms)),
            ms_spread(rs.iter().map(|r| r.startup_ms)),
            count_spread(rs.iter().map(|r| r.gap.values().sum())),
            count_spread(rs.iter().map(|r| of(r, &["refused"]))),
            count_spread(rs.iter().map(|r| of(r, &["straight"]))),
            count_spread(rs.iter().map(|r| of(r, &["reset", "closed"]))),
            count_spread(
                rs.iter()
                    .map(|r| r.gap.values().sum::<usize>() - of(r, &known))
            ),
            count_spread(rs.iter().map(|r| r.kernel as usize)),
        )
        .unwrap();
    }
    writeln!(md).unwrap();
    let escaped: usize = restarts[0].iter().map(|r| r.straight).sum();
    let never: usize = restarts
        .iter()
        .flatten()
        .filter(|r| r.gap_ms.is_nan())
        .count();
    let all = || restarts.iter().flatten();
    // Over the rounds that saw a relayed connection.
    let ms1 = |v: Vec<f64>| {
        let v: Vec<f64> = v.into_iter().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return "–".to_owned();
        }
        let s = spread(v);
        format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max)
    };
    writeln!(
        md,
        "- The gap is the new agent's start-up: from the kill to the old agent reaped (when the \
         new one starts) {} ms, from the new agent's ready line (as the run read it, through a \
         pipe) to the answer of its first relayed connection {} ms (negative: the answer came \
         first); both modes' rounds together.",
        ms1(all().map(|r| r.reap_ms).collect()),
        ms1(all().map(|r| r.after_ready_ms).collect()),
    )
    .unwrap();
    writeln!(
        md,
        "- Under failureMode closed, connects that reached the stand-in unmediated in all {} \
         rounds (not only in the gap): {escaped}. The kernel counts a would-be redirect with \
         no listener behind it as `agent-down` (closed: refused) or `agent-down-open` (open: \
         sent straight out).{}\n",
        s.rounds,
        if never > 0 {
            format!(
                " **{never} rounds saw no connection relayed by the new agent within \
                 {AFTER_READY:?} of its ready line** (their gap is left out)."
            )
        } else {
            String::new()
        }
    )
    .unwrap();
    let gaps: Vec<f64> = restarts[0]
        .iter()
        .map(|r| r.gap_ms)
        .filter(|g| !g.is_nan())
        .collect();
    let closed_gap = if gaps.is_empty() {
        f64::NAN
    } else {
        spread(gaps).median
    };
    goals.add_value(
        "restart gap (kill -9 to the first connection the restarted agent relays, failureMode closed) ≤ 1 s"
            .into(),
        closed_gap / 1000.0,
        "s",
        |v| v <= 1.0,
    );
    goals.add_shown(
        "connects unmediated while the agent is down under failureMode closed: 0".into(),
        escaped.to_string(),
        escaped == 0,
    );

    writeln!(
        md,
        "### A new agent beside the running one\n\n\
         The same client against the failureMode closed agent; a second agent is started with \
         the same arguments while the first runs (as a rolling update starts the new version), \
         takes its workload and listener over through `<admin-socket>.handover`, and the first \
         stops accepting; then the first gets SIGTERM and drains. The connects counted are \
         those from starting the new agent until the old one exited. {} rounds, each replacing \
         the agent the round before started.\n",
        s.rounds
    )
    .unwrap();
    writeln!(
        md,
        "| connects during the switch | relayed | failed | new agent started → the old one logs the handover ms | → the new one ready ms | old agent's stop (SIGTERM → exit) ms |"
    )
    .unwrap();
    writeln!(md, "|---:|---:|---:|---:|---:|---:|").unwrap();
    let relayed = |h: &Handover| h.during.get("agent").copied().unwrap_or(0);
    let total = |h: &Handover| h.during.values().sum::<usize>();
    writeln!(
        md,
        "| {} | {} | {} | {} | {} | {} |",
        count_spread(handovers.iter().map(total)),
        count_spread(handovers.iter().map(relayed)),
        count_spread(handovers.iter().map(|h| total(h) - relayed(h))),
        ms_spread(handovers.iter().map(|h| h.handed_ms)),
        ms_spread(handovers.iter().map(|h| h.ready_ms)),
        ms_spread(handovers.iter().map(|h| h.stop_ms)),
    )
    .unwrap();
    let failed: usize = handovers.iter().map(|h| total(h) - relayed(h)).sum();
    let how = outcomes_sum(handovers.iter().map(|h| &h.during));
    writeln!(
        md,
        "\n- In all {} handovers: {failed} connects failed or went out unmediated ({}); the old \
         agent cut connections when it stopped in {} of them.\n",
        s.rounds,
        how,
        handovers.iter().filter(|h| h.cut).count()
    )
    .unwrap();
    goals.add_shown(
        "connects failed while a new agent takes over from the running one: 0".into(),
        failed.to_string(),
        failed == 0,
    );

    md += &metrics_rounds(s, ports, &servers, goals);
    md
}

/// "N outcome, ..." over several rounds' outcome counts.
fn outcomes_sum<'a>(rounds: impl Iterator<Item = &'a BTreeMap<String, usize>>) -> String {
    let mut all: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rounds {
        for (k, v) in r {
            *all.entry(k.as_str()).or_default() += v;
        }
    }
    all.iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What recording metrics costs: section 2's short connections through an agent with the
/// metrics on (its page scraped every second) and through one with `--metrics-port 0`,
/// alternating run by run.
fn metrics_rounds(s: &Settings, ports: Ports, servers: &Servers, goals: &mut Goals) -> String {
    let raw = servers.http_sized(SocketAddr::from(([127, 59, 0, 2], ports.tcp[0])), RR_SIZE);
    let http = servers.http_sized(SocketAddr::from(([127, 62, 0, 2], ports.http)), RR_SIZE);
    let (cg_on, cg_off) = (Cgroup::new("bench-metrics"), Cgroup::new("bench-nometrics"));
    let config = agent_config(10, ports);
    let on = Agent::start(AgentOpts {
        config: &config,
        cgroup: &cg_on,
        inside: false,
        extra: vec![],
    });
    let off = Agent::start(AgentOpts {
        config: &config,
        cgroup: &cg_off,
        inside: false,
        extra: vec!["--metrics-port".into(), "0".into()],
    });
    let runs = [
        (At::Cgroup(&cg_off), raw),
        (At::Cgroup(&cg_on), raw),
        (At::Cgroup(&cg_off), http),
        (At::Cgroup(&cg_on), http),
    ];
    let pids = [off.pid(), on.pid(), off.pid(), on.pid()].map(Some);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (samples, (scrapes, page)) = std::thread::scope(|t| {
        let scraper = t.spawn(|| {
            let (mut n, mut page) = (0usize, 0usize);
            let start = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && start.elapsed() < CLIENT_LIMIT
            {
                if let Ok((200, body)) = egress_tests::http_get(on.metrics_port, "/metrics") {
                    n += 1;
                    page = body.len();
                }
                let next = Duration::from_secs(n as u64 + 1);
                while start.elapsed() < next && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            (n, page)
        });
        let samples = rr_rounds_each(s.rounds, s.rr_ops, &runs, &pids);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (samples, scraper.join().expect("the scraper"))
    });
    let last = on.metrics();
    let counted = egress_tests::metric(&last, "istio_tcp_connections_closed_total", &[]);
    let requests = egress_tests::metric(&last, "istio_requests_total", &[]);
    drop(on);
    drop(off);

    let mut md = String::from("### What metrics cost\n\n");
    writeln!(
        md,
        "Section 2's short connections ({} per run over 4 threads, {RR_SIZE} bytes each way) \
         through two agents, each intercepting a cgroup of its own: one with the metrics on (the \
         default; its page is scraped once a second during the rounds, as Prometheus would, \
         {scrapes} scrapes of {} KB) and one with `--metrics-port 0`, which turns their \
         recording off. Both paths through the agent: relayed TCP (section 2's **egress \
         redirect**) and HTTP by Host (**egress, HTTP ServiceEntry**). {} rounds, the four runs \
         alternating. **on ÷ off** compares medians; **off's spread** is the metrics-off \
         rounds' (min–max) over their median, the run-to-run noise the ratio is read against.\n",
        s.rr_ops,
        page / 1024,
        s.rounds
    )
    .unwrap();
    writeln!(
        md,
        "| path | metrics | connections/s | p50 µs | p99 µs | agent CPU µs per connection | on ÷ off, connections/s | p50 | p99 | CPU | off's spread, connections/s |"
    )
    .unwrap();
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    for (path, k) in [("relayed TCP", 0), ("HTTP ServiceEntry", 2)] {
        let (off, on) = (&samples[k], &samples[k + 1]);
        let vs = |m: &str| on.get(m).median / off.get(m).median;
        let rate = off.get("rate");
        for (what, x) in [("off (`--metrics-port 0`)", off), ("on, scraped", on)] {
            let ratios = if std::ptr::eq(x, on) {
                format!(
                    "{:.2}× | {:.2}× | {:.2}× | {:.2}× | {:.2}–{:.2}×",
                    vs("rate"),
                    vs("p50"),
                    vs("p99"),
                    vs("agent_cpu_us"),
                    rate.min / rate.median,
                    rate.max / rate.median
                )
            } else {
                "– | – | – | – | –".to_owned()
            };
            writeln!(
                md,
                "| {path} | {what} | {} | {} | {} | {} | {ratios} |",
                x.get("rate"),
                x.get("p50"),
                x.get("p99"),
                x.get("agent_cpu_us"),
            )
            .unwrap();
        }
        let within = (rate.min..=rate.max).contains(&on.get("rate").median);
        goals.add_shown(
            format!(
                "{path} short connections/s with metrics on within the metrics-off rounds' (min–max)"
            ),
            format!(
                "{:.2}× ({:.2}–{:.2}×)",
                vs("rate"),
                rate.min / rate.median,
                rate.max / rate.median
            ),
            within,
        );
    }
    writeln!(
        md,
        "\n- The agent with the metrics on counted {counted:.0} TCP connections closed and \
         {requests:.0} HTTP requests on its page at the end ({} connections were made through \
         it per path).\n",
        s.rounds as u64 * s.rr_ops
    )
    .unwrap();
    md
}

// ---------------------------------------------------------------------------------------------
// Section 9: DNS.

/// The sections `--only` runs alone (those that set up all they need themselves).
const ONLY: &[&str] = &["dns"];
/// Names in each of dnsperf's query files.
const DNS_NAMES: u8 = 4;
/// dnsperf's timeout for a query's answer (`-t`): a lost query holds the run's end this long.
const DNS_TIMEOUT_SECS: u64 = 2;
/// The longest a dnsperf run may take (`-l`); `timeout` stops it 30 s after that.
const DNS_LIMIT_SECS: u64 = 30;
/// Queries dnsperf may have outstanding (`-q`, its default).
const DNS_OUTSTANDING: u32 = 100;
/// The paced runs' rate (`-Q`): a few hundred µs apart, so that queries seldom wait for each
/// other. (`-q 1` does not give one query at a time: dnsperf's sender then waits tens of
/// milliseconds between queries.)
const DNS_PACE: u32 = 2000;

/// `kind`'s names for dnsperf, `name<i>.<kind>.bench`, with their addresses from
/// 198.19.0.`first` on (answers only: nothing connects to them).
fn dns_names(kind: &str, first: u8) -> Vec<(String, Ipv4Addr)> {
    (0..DNS_NAMES)
        .map(|i| {
            (
                format!("name{i}.{kind}.bench"),
                Ipv4Addr::new(198, 19, 0, first + i),
            )
        })
        .collect()
}

/// The Kubernetes namespace whose pods run under REGISTRY_ONLY and see `LEARN_HOST`'s entry.
const LEARN_NS: &str = "bench-learn";
/// A TCP ServiceEntry's host, resolved by DNS: the nameservers answer it with `EXT_V4`,
/// where an echo stand-in listens on `LEARN_PORT`.
const LEARN_HOST: &str = "db.learn.bench";
const LEARN_PORT: u16 = 5432;
/// At most this long for one resolve-then-connect client run.
const LEARN_LIMIT_SECS: u64 = 60;
/// The agent's `--dns-grace`: longer than the section runs, so that what a pod learnt never
/// runs out in the middle of it (dnsmasq answers with TTL 0).
const LEARN_GRACE: &str = "30m";

/// The DNS section's node agent: ALLOW_ANY, and one ServiceEntry with an address per
/// `registry` name, in the pods' namespace, whose names the agent answers itself. In
/// `LEARN_NS` alone, REGISTRY_ONLY (its Sidecar) and `LEARN_HOST` as a TCP ServiceEntry by
/// host (exported there only): what its pods are answered for it, they may connect to.
fn dns_config(registry: &[(String, Ipv4Addr)]) -> String {
    let mut c = format!(
        "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {{name: bench-dns}}\nspec:\n  \
         outboundTrafficPolicy: {{mode: ALLOW_ANY}}\n  interception: {{includeOutboundIPRanges: \"*\"}}\n  \
         autoAllocate: {{ipv4Range: 198.18.200.0/24, ipv6Range: \"2001:db8:240::/48\"}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: Sidecar\n\
         metadata: {{name: default, namespace: {LEARN_NS}}}\n\
         spec: {{outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {{name: db, namespace: {LEARN_NS}}}\nspec:\n  hosts: [{LEARN_HOST}]\n  \
         ports: [{{number: {LEARN_PORT}, name: tcp, protocol: TCP}}]\n  resolution: DNS\n  \
         exportTo: [\".\"]\n",
    );
    for (i, (host, addr)) in registry.iter().enumerate() {
        write!(
            c,
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: dns-{i}, namespace: {POD_NS}}}\nspec:\n  hosts: [{host}]\n  \
             addresses: [{addr}]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  \
             resolution: NONE\n"
        )
        .unwrap();
    }
    c
}

/// Debian's dnsmasq in a node's ext namespace on `EXT_V4`:53, serving `names` as host
/// records (no query log: it would slow the baseline); stopped on drop.
fn dnsmasq(node: &Node, dir: &std::path::Path, names: &[(String, Ipv4Addr)]) -> Dnsmasq {
    let log = dir.join(format!("{}-dnsmasq.log", node.ext().name()));
    let records: Vec<String> = names
        .iter()
        .map(|(name, addr)| format!("--host-record={name},{addr}"))
        .collect();
    Dnsmasq::start(node.ext(), &[EXT_V4], log, &records)
}

/// One dnsperf run's figures.
struct DnsRun {
    completed: f64,
    lost: f64,
    qps: f64,
    p50: f64,
    p99: f64,
}

/// dnsperf in `ns`, to `EXT_V4`:53: the queries of `file` (`DNS_NAMES` of them) `queries`
/// in all (at most `DNS_LIMIT_SECS`), up to `DNS_OUTSTANDING` at a time, at most `pace` a
/// second when given, each query's time printed (`-v`). Every answer must be NOERROR.
fn dnsperf(ns: &Netns, file: &std::path::Path, queries: u64, pace: Option<u32>) -> DnsRun {
    let o = ns
        .command("timeout")
        .arg("--kill-after=5")
        .arg((DNS_LIMIT_SECS + 30).to_string())
        .arg("dnsperf")
        .args(["-s", &EXT_V4.to_string(), "-p", "53", "-v"])
        .arg("-d")
        .arg(file)
        .args([
            "-n",
            &(queries / u64::from(DNS_NAMES)).max(1).to_string(),
            "-l",
            &DNS_LIMIT_SECS.to_string(),
            "-q",
            &DNS_OUTSTANDING.to_string(),
            "-t",
            &DNS_TIMEOUT_SECS.to_string(),
        ])
        .args(pace.map(|q| format!("-Q{q}")))
        .stdin(Stdio::null())
        .output()
        .expect("running dnsperf (Debian's dnsperf: cargo xtask setup)");
    let out = String::from_utf8_lossy(&o.stdout);
    let summary = || {
        out.lines()
            .filter(|l| !l.starts_with("> "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        o.status.success(),
        "dnsperf in {} failed ({}): {}\n{}",
        ns.name(),
        o.status,
        summary(),
        String::from_utf8_lossy(&o.stderr)
    );
    // `> RCODE NAME TYPE SECONDS`, one line per answer.
    let mut lat = Vec::new();
    let mut other = 0usize;
    for l in out.lines().filter_map(|l| l.strip_prefix("> ")) {
        if let [code, _, _, secs] = l.split_whitespace().collect::<Vec<_>>()[..]
            && let Ok(secs) = secs.parse::<f64>()
        {
            lat.push((secs * 1e9) as u64);
            if code != "NOERROR" {
                other += 1;
            }
        }
    }
    assert!(
        other == 0 && !lat.is_empty(),
        "dnsperf in {}: {other} answers not NOERROR, {} in all: {}",
        ns.name(),
        lat.len(),
        summary()
    );
    let stat = |key: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("dnsperf printed no {key:?}: {}", summary()))
    };
    let p = percentiles(lat);
    DnsRun {
        completed: stat("Queries completed:"),
        lost: stat("Queries lost:"),
        qps: stat("Queries per second:"),
        p50: p[49],
        p99: p[98],
    }
}

/// The UDP drop counters in `ns` (its /proc/net/snmp, read from inside).
fn udp_drops(ns: &Netns) -> String {
    let o = ns.command("cat").arg("/proc/net/snmp").output();
    let text = o
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return "?".to_owned();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(n, _)| ["NoPorts", "InErrors", "RcvbufErrors", "MemErrors"].contains(n))
        .map(|(n, v)| format!("{n} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The machine's load averages (1, 5, 15 minutes), as /proc/loadavg has them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Resolve-then-connect iterations each path runs before the rounds, to see that it works.
const LEARN_WARMUP: u64 = 10;

/// Section 9's resolve-then-connect contenders, in the order `ResolveConnect::rounds` takes
/// their pods.
const CONNECTERS: [&str; 3] = [
    "baseline: a pod that is not enrolled, its own dnsmasq, the connect direct",
    "learned: REGISTRY_ONLY, TCP ServiceEntry by host; resolve forwarded by the agent (and \
     learnt), the connect direct (`dns-learned`)",
    "through the agent: ALLOW_ANY, the name not declared; resolve forwarded, the connect \
     relayed by the agent",
];

/// Section 9's resolve-then-connect figures: per contender, its samples over the rounds; and
/// what the kernel counted, in words.
struct ResolveConnect {
    samples: Vec<Samples>,
    counted: String,
}

impl ResolveConnect {
    /// `LEARN_HOST` through glibc, then a connection to its address and an echo, from each
    /// of `pods` (`CONNECTERS`), alternating run by run for `s.rounds` rounds: each node of
    /// `nodes` gets an echo stand-in on `EXT_V4`:`LEARN_PORT` in its ext namespace, each pod
    /// /etc/resolv.conf naming `EXT_V4` (its node's dnsmasq). Checks that the kernel let the
    /// learner's connects go direct as `dns-learned`, and no one else's.
    fn rounds(
        s: &Settings,
        agent: &Agent,
        dir: &std::path::Path,
        nodes: [&Node; 2],
        pods: [&Pod; 3],
    ) -> ResolveConnect {
        let servers = Servers::new();
        for n in nodes {
            servers.echo_on(n.ext().listen(SocketAddr::from((EXT_V4, LEARN_PORT))));
        }
        let resolv = dir.join("resolv.conf");
        std::fs::write(
            &resolv,
            format!("nameserver {EXT_V4}\noptions timeout:2 attempts:1\n"),
        )
        .expect("writing resolv.conf");
        let run = |pod: &Pod, count: u64| {
            let r = run_client(
                At::Resolving(&pod.sandbox.netns, &resolv),
                &[
                    "resolve".into(),
                    LEARN_HOST.into(),
                    LEARN_PORT.to_string(),
                    count.to_string(),
                    LEARN_LIMIT_SECS.to_string(),
                ],
            );
            assert_eq!(
                r["addr"],
                EXT_V4.to_string(),
                "{LEARN_HOST} resolved: {r:?}"
            );
            r
        };
        for pod in pods {
            run(pod, LEARN_WARMUP);
        }
        let mut samples: Vec<Samples> = pods.iter().map(|_| Samples::default()).collect();
        let mut iterations = vec![LEARN_WARMUP; pods.len()];
        for _ in 0..s.rounds {
            for (k, pod) in pods.iter().enumerate() {
                let cpu0 = cpu_seconds(agent.pid());
                let r = run(pod, s.dns_connects);
                let ops: u64 = r["ops"].parse().unwrap();
                iterations[k] += ops;
                let x = &mut samples[k];
                x.push(
                    "agent_cpu_us",
                    (cpu_seconds(agent.pid()) - cpu0) * 1e6 / ops as f64,
                );
                for m in ["resolve_p50", "connect_p50", "total_p50", "total_p99"] {
                    x.push(m, r[&format!("{m}_us")].parse().unwrap());
                }
            }
        }
        // The baseline pod is not enrolled: the agent keeps no counters for it, but the
        // node's total of `dns-learned` is every enrolled pod's.
        let of = |pod: &Pod, reason: &str| {
            let label = format!("{}/{}", pod.sandbox.namespace, pod.sandbox.name);
            agent
                .workload_stats(&label)
                .get(reason)
                .copied()
                .unwrap_or(0)
        };
        let (learnt, learnt_dns) = (of(pods[1], "dns-learned"), of(pods[1], "dns"));
        let (relayed_learnt, relayed) = (of(pods[2], "dns-learned"), of(pods[2], "included-cidr"));
        let all = agent.stats().get("dns-learned").copied().unwrap_or(0);
        assert!(
            learnt >= iterations[1]
                && relayed_learnt == 0
                && all == learnt
                && relayed >= iterations[2],
            "dns-learned: {learnt} for the learner ({} connects), {relayed_learnt} for the \
             relayed pod, {all} on the node; included-cidr for the relayed pod: {relayed} ({} \
             connects)",
            iterations[1],
            iterations[2]
        );
        let counted = format!(
            "The kernel counted {learnt} of the learned pod's connects `dns-learned` ({} were \
             made, {LEARN_WARMUP} of them before the rounds, and its {learnt_dns} queries \
             `dns`); {relayed} of the relayed pod's `included-cidr`, redirected to the agent \
             ({} made), and {relayed_learnt} `dns-learned`; {all} `dns-learned` on the node in \
             all, so none of the baseline pod's {} connects (not enrolled: the agent keeps no \
             counters of its own for it).",
            iterations[1], iterations[2], iterations[0],
        );
        ResolveConnect { samples, counted }
    }
}

impl ResolveConnect {
    /// The subsection of section 9: how it is measured, the table, what it says.
    fn report(&self, md: &mut String, s: &Settings) {
        writeln!(
            md,
            "### Resolve, then connect: an address learnt from the answer\n\n\
             The common client path: a program in the pod resolves `{LEARN_HOST}` through \
             glibc (`getaddrinfo`, `AF_INET`: one A query from a UDP socket glibc connects to \
             the nameserver of the pod's /etc/resolv.conf, {EXT_V4}, which its node's dnsmasq \
             answers with {EXT_V4}) and at once connects over TCP to the address it got, port \
             {LEARN_PORT}, sends {ECHO_MESSAGE} bytes and reads their echo from a stand-in in the \
             node's ext namespace, then closes with a reset (`egress-bench client resolve`). \
             Timed in the client on the monotonic clock, per iteration: **resolve** \
             (`getaddrinfo`), **connect + echo** (connect to the first byte back) and the \
             **total**. {} iterations per run (and at most {LEARN_LIMIT_SECS} s), {} rounds, \
             the three contenders alternating; each figure is the median over the rounds of a \
             run's median (or p99), with (min–max) over the rounds, and the ratios are to the \
             baseline of the same run. Every pod runs under the same agent and configuration \
             as above (dnsmasq's TTL is 0, `--dns-grace` {LEARN_GRACE}: what the learner learnt never \
             runs out mid-run, and every answer writes it again):\n\n\
             - **baseline**: the pod of the second node (no egress-cni) asks its own dnsmasq and \
             connects directly, decided `not-enrolled`.\n\
             - **learned**: an enrolled pod in `{LEARN_NS}`, whose Sidecar says REGISTRY_ONLY and \
             which sees a TCP ServiceEntry by host for `{LEARN_HOST}` (port {LEARN_PORT}, \
             `resolution: DNS`, no addresses). The agent forwards the query to dnsmasq and, \
             before relaying the answer, writes (pod, {EXT_V4}, {LEARN_PORT}) into `LEARNED`; \
             the connect goes straight out in the kernel (`dns-learned`). Without the answer \
             it would be refused (`registry-denied`).\n\
             - **through the agent**: an enrolled pod in `{POD_NS}` (ALLOW_ANY, the entry not \
             exported there): the query forwarded the same way, the connect redirected to the \
             agent (`included-cidr`), which relays it to {EXT_V4}:{LEARN_PORT} as plain TCP.\n",
            s.dns_connects, s.rounds
        )
        .unwrap();
        writeln!(
            md,
            "| contender | resolve p50 µs | connect + echo p50 µs | total p50 µs | total p99 µs \
             | resolve vs baseline | connect + echo vs baseline | total vs baseline | total \
             p99 vs baseline | agent CPU µs per iteration |"
        )
        .unwrap();
        writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|").unwrap();
        let (x, base) = (&self.samples, &self.samples[0]);
        let vs = |k: usize, m: &str| x[k].get(m).median / base.get(m).median;
        for (k, name) in CONNECTERS.iter().enumerate() {
            writeln!(
                md,
                "| {name} | {} | {} | {} | {} | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {} |",
                x[k].get("resolve_p50"),
                x[k].get("connect_p50"),
                x[k].get("total_p50"),
                x[k].get("total_p99"),
                vs(k, "resolve_p50"),
                vs(k, "connect_p50"),
                vs(k, "total_p50"),
                vs(k, "total_p99"),
                x[k].get("agent_cpu_us"),
            )
            .unwrap();
        }
        writeln!(md).unwrap();
        let med = |k: usize, m: &str| x[k].get(m).median;
        let plus = |k: usize, m: &str| med(k, m) - med(0, m);
        let b = base.get("total_p50");
        writeln!(
            md,
            "- At the median, the learned path takes {:+.0} µs in all over the baseline \
             ({:.2}×; the baseline's rounds spread {:.2}–{:.2}×): {:+.0} µs to resolve (the \
             forward through the agent) and {:+.0} µs to connect and get the echo. Through the \
             agent it takes {:+.0} µs ({:.2}×): {:+.0} µs to resolve and {:+.0} µs to connect \
             and get the echo: the connect sent straight out by the kernel takes {:.0} µs less \
             than the relayed one.\n\
             - {}\n",
            plus(1, "total_p50"),
            vs(1, "total_p50"),
            b.min / b.median,
            b.max / b.median,
            plus(1, "resolve_p50"),
            plus(1, "connect_p50"),
            plus(2, "total_p50"),
            vs(2, "total_p50"),
            plus(2, "resolve_p50"),
            plus(2, "connect_p50"),
            med(2, "connect_p50") - med(1, "connect_p50"),
            self.counted,
        )
        .unwrap();
    }
}

/// Section 9: a pod's DNS queries. A node agent and a pod enrolled through egress-cni (as in
/// section 6), dnsmasq as the nameserver in the node's ext namespace; dnsperf from the pod,
/// for names dnsmasq serves (forwarded by the agent) and names of ServiceEntries (answered
/// by the agent), against dnsmasq asked from a pod of a second node that is not enrolled; then
/// glibc's resolve followed by a connect to the address (`ResolveConnect`). `run` says which
/// run measured it.
fn dns_section(s: &Settings, run: &str) -> String {
    let load_before = loadavg();
    let upstream_names = dns_names("upstream", 80);
    let registry_names = dns_names("registry", 90);
    // Dropped in reverse, also on a panic: the nameservers, both nodes (their pods get DEL
    // while the agent still runs, then their namespaces go), the agent, the directory.
    let dir = TempDir::new("bench-dns");
    let write_queries = |kind: &str, names: &[(String, Ipv4Addr)]| {
        let path = dir.path().join(format!("{kind}.queries"));
        let text: String = names.iter().map(|(n, _)| format!("{n} A\n")).collect();
        std::fs::write(&path, text).expect("writing a query file");
        path
    };
    let upstream_file = write_queries("upstream", &upstream_names);
    let registry_file = write_queries("registry", &registry_names);
    let admin = dir.path().join("admin.sock");
    let agent = Agent::start_node(NodeOpts {
        config: &dns_config(&registry_names),
        state_file: &dir.path().join("workloads.json"),
        admin_socket: &admin,
        extra: vec!["--dns-grace".into(), LEARN_GRACE.into()],
    });
    let node = Node::builder("bench-dns")
        .cni_dir(egress_bin().parent().expect("the binaries' directory"))
        .chain(json!({"type": "egress-cni", "adminSocket": admin}))
        .build();
    let plain = Node::new("bench-dns-plain");
    let outsider = plain.add_pod(POD_NS, "dns-outsider");
    let pod = node.add_pod(POD_NS, "dns-client");
    // For resolve-then-connect: a pod that sees `LEARN_HOST`'s entry, and one that does not.
    let learner = node.add_pod(LEARN_NS, "dns-learner");
    let relayed = node.add_pod(POD_NS, "dns-relayed");
    let served: Vec<(String, Ipv4Addr)> = upstream_names
        .iter()
        .cloned()
        .chain([(LEARN_HOST.to_owned(), EXT_V4)])
        .collect();
    let ns_plain = dnsmasq(&plain, dir.path(), &served);
    let ns_node = dnsmasq(&node, dir.path(), &served);

    let contenders: [(&str, &Netns, &std::path::Path, &Dnsmasq); 3] = [
        (
            "baseline: dnsmasq asked directly (a pod that is not enrolled)",
            &outsider.sandbox.netns,
            &upstream_file,
            &ns_plain,
        ),
        (
            "forwarded through the agent (the same names)",
            &pod.sandbox.netns,
            &upstream_file,
            &ns_node,
        ),
        (
            "registry name answered by the agent (ServiceEntry with an address)",
            &pod.sandbox.netns,
            &registry_file,
            &ns_node,
        ),
    ];
    // As fast as the path answers, then paced.
    let loads = [(None, s.dns_flat), (Some(DNS_PACE), s.dns_paced)];
    // Every path answers before the rounds (and the agent's sockets are up).
    for (_, ns, file, _) in &contenders {
        dnsperf(ns, file, u64::from(DNS_NAMES), Some(DNS_PACE));
    }
    let mut samples: Vec<Vec<Samples>> = loads
        .iter()
        .map(|_| (0..contenders.len()).map(|_| Samples::default()).collect())
        .collect();
    let (mut sent, mut lost) = (0.0, 0.0);
    for _ in 0..s.rounds {
        for (l, (pace, queries)) in loads.iter().enumerate() {
            for (k, (_, ns, file, dnsmasq)) in contenders.iter().enumerate() {
                let (agent0, dnsmasq0) = (cpu_seconds(agent.pid()), cpu_seconds(dnsmasq.pid()));
                let r = dnsperf(ns, file, *queries, *pace);
                let per = |t0: f64, pid: u32| (cpu_seconds(pid) - t0) * 1e6 / r.completed;
                let x = &mut samples[l][k];
                x.push("agent_cpu_us", per(agent0, agent.pid()));
                x.push("dnsmasq_cpu_us", per(dnsmasq0, dnsmasq.pid()));
                x.push("rate", r.qps);
                x.push("p50", r.p50);
                x.push("p99", r.p99);
                if k > 0 {
                    sent += r.completed + r.lost;
                }
                lost += r.lost;
            }
        }
    }
    let connects = ResolveConnect::rounds(
        s,
        &agent,
        dir.path(),
        [&plain, &node],
        [&outsider, &learner, &relayed],
    );
    let load_after = loadavg();
    // Where a lost query went: the UDP drops counted in each pod's namespace (the agent's DNS
    // socket, dnsperf's and the forwarding sockets of the enrolled pod are all there).
    let (drops_pod, drops_outsider) = (
        udp_drops(&pod.sandbox.netns),
        udp_drops(&outsider.sandbox.netns),
    );
    // What the kernel and the agent counted: every query from the enrolled pod redirected
    // (reason `dns`), forwarded names answered by the nameserver, registry names by the agent.
    let label = format!("{POD_NS}/{}", pod.sandbox.name);
    let redirected = agent
        .workload_stats(&label)
        .get("dns")
        .copied()
        .unwrap_or(0);
    // The access log is written from a queue: let it drain.
    let mut lines = agent.access_lines();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = agent.access_lines();
        if now == lines {
            break;
        }
        lines = now;
    }
    let by = |kind: &str, who: &str| {
        agent.count_records("dns", |r| {
            r.get("query_name").ends_with(&format!(".{kind}.bench.")) && r.get("answered_by") == who
        })
    };
    let (fwd_ns, fwd_agent) = (by("upstream", "nameserver"), by("upstream", "agent"));
    let (reg_agent, reg_ns) = (by("registry", "agent"), by("registry", "nameserver"));
    assert!(
        fwd_agent == 0 && reg_ns == 0,
        "forwarded names answered by the agent: {fwd_agent}; registry names answered by the \
         nameserver: {reg_ns}"
    );

    let mut md =
        String::from("## 9. DNS: a pod's queries, forwarded and answered by the agent\n\n");
    writeln!(
        md,
        "Measured {run}; the machine's load average (1, 5, 15 min) was {load_before} \
         before the section and {load_after} after it ({} cores; the benchmark's own processes \
         count in it).\n\n\
         A node as in section 6: one node agent, a pod enrolled through the node's chain \
         (bridge with host-local, then egress-cni), Debian's dnsmasq as the nameserver in the \
         node's ext namespace ({EXT_V4}:53) serving {DNS_NAMES} names as host records. Debian's \
         dnsperf in the pod sends A queries for {DNS_NAMES} names in turn to {EXT_V4}:53 from \
         **one unconnected UDP socket** (`sendto` to the nameserver, `recvfrom` without asking \
         where the answer came from): the kernel's `sendmsg4` hook rewrites every datagram's \
         destination to the agent's DNS socket in the pod's namespace, and `recvmsg4` (which \
         restores the nameserver as the source for a client that asks) does not run. A \
         connected socket, as glibc's resolver uses, takes the `connect4` hook once instead \
         (the resolve-then-connect rows below go that way). Three contenders:\n\n\
         - **baseline**: a pod of a second node whose chain has no egress-cni asks its own \
         dnsmasq (the same names, in that node's ext namespace) directly: the same path, not \
         intercepted (`not-enrolled`).\n\
         - **forwarded**: the same names from the enrolled pod. The agent finds no registry \
         name, forwards the query to {EXT_V4}:53 from a UDP socket it makes in the pod's \
         namespace, waits for the answer and sends it back to the client.\n\
         - **registry**: {DNS_NAMES} names of ServiceEntries with an address (`resolution: \
         NONE`, one name each) from the enrolled pod: the agent answers, dnsmasq is not asked.\n\n\
         Each contender runs two ways: **flat out**, up to {DNS_OUTSTANDING} queries \
         outstanding (dnsperf's default `-q`), sent as fast as the path answers: queries/s is \
         its throughput, and the latency includes the wait in the queues; and **paced** at \
         {DNS_PACE} queries/s (`-Q`): queries {:.0} µs apart, seldom waiting for each other, \
         so the latency is a query's own (and queries/s the pace kept). {} queries per run \
         flat out and {} paced (`-n`, and at most {DNS_LIMIT_SECS} s: `-l`), {} rounds, the \
         six runs alternating; the latencies are \
         dnsperf's own time for each query (`-v`, to the microsecond). **agent CPU** and \
         **dnsmasq CPU** are the time their threads ran during a run, per query answered. The \
         agent writes one access record (kind `dns`) per query it serves, part of its cost \
         here.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        1e6 / f64::from(DNS_PACE),
        s.dns_flat,
        s.dns_paced,
        s.rounds
    )
    .unwrap();
    writeln!(
        md,
        "| load | contender | queries/s | p50 µs | p99 µs | rate vs baseline | p50 vs \
         baseline | p99 vs baseline | agent CPU µs per query | dnsmasq CPU µs per query |"
    )
    .unwrap();
    writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    let load_name = |pace: &Option<u32>| {
        pace.map_or_else(|| "flat out".to_owned(), |q| format!("paced, {q}/s"))
    };
    for (l, (pace, _)) in loads.iter().enumerate() {
        let load = load_name(pace);
        let rows = &samples[l];
        for (k, (name, _, _, _)) in contenders.iter().enumerate() {
            let r = &rows[k];
            let vs = |m: &str| r.get(m).median / rows[0].get(m).median;
            writeln!(
                md,
                "| {load} | {name} | {} | {} | {} | {:.2}× | {:.2}× | {:.2}× | {} | {} |",
                r.get("rate"),
                r.get("p50"),
                r.get("p99"),
                vs("rate"),
                vs("p50"),
                vs("p99"),
                r.get("agent_cpu_us"),
                r.get("dnsmasq_cpu_us"),
            )
            .unwrap();
        }
    }
    writeln!(md).unwrap();
    let med = |l: usize, k: usize, m: &str| samples[l][k].get(m).median;
    // The baseline's own rounds: (min–max) over its median, the noise a ratio is read against.
    let noise = |l: usize, m: &str| {
        let b = samples[l][0].get(m);
        format!("{:.2}–{:.2}×", b.min / b.median, b.max / b.median)
    };
    writeln!(
        md,
        "- Flat out, the agent forwards {:.0} queries/s, {:.2}× dnsmasq's {:.0} asked directly \
         (whose rounds spread {}), and answers registry names at {:.0} queries/s ({:.2}×). \
         The agent's CPU per query: {:.1} µs forwarded, {:.1} µs answered (dnsmasq's: {:.1} µs \
         per query it answers). The flat-out latencies are mostly the queues': {} outstanding \
         over the rate.",
        med(0, 1, "rate"),
        med(0, 1, "rate") / med(0, 0, "rate"),
        med(0, 0, "rate"),
        noise(0, "rate"),
        med(0, 2, "rate"),
        med(0, 2, "rate") / med(0, 0, "rate"),
        med(0, 1, "agent_cpu_us"),
        med(0, 2, "agent_cpu_us"),
        med(0, 0, "dnsmasq_cpu_us"),
        DNS_OUTSTANDING,
    )
    .unwrap();
    writeln!(
        md,
        "- Paced at {DNS_PACE} queries/s, a forwarded query takes {:+.0} µs at the median over \
         dnsmasq asked directly ({:.2}×, p99 {:.2}×; the baseline's rounds spread {} at the \
         median, {} at p99), a registry name answered by the agent {:+.0} µs ({:.2}×, p99 \
         {:.2}×).",
        med(1, 1, "p50") - med(1, 0, "p50"),
        med(1, 1, "p50") / med(1, 0, "p50"),
        med(1, 1, "p99") / med(1, 0, "p99"),
        noise(1, "p50"),
        noise(1, "p99"),
        med(1, 2, "p50") - med(1, 0, "p50"),
        med(1, 2, "p50") / med(1, 0, "p50"),
        med(1, 2, "p99") / med(1, 0, "p99"),
    )
    .unwrap();
    writeln!(
        md,
        "- Lost (unanswered within {DNS_TIMEOUT_SECS} s) in all rounds: {lost:.0} queries. \
         The kernel counted {redirected} queries from the enrolled pod redirected to the agent \
         (reason `dns`; {sent:.0} were sent in the rounds, and {} before them); the agent's \
         access log has {fwd_ns} forwarded queries answered by the nameserver and {reg_agent} \
         registry names answered by the agent, and none the other way round. UDP datagrams \
         the kernel dropped (its `Udp:` counters, /proc/net/snmp) in the enrolled pod's \
         namespace: {drops_pod}; in the baseline pod's: {drops_outsider}.\n",
        2 * DNS_NAMES
    )
    .unwrap();
    connects.report(&mut md, s);
    md
}
