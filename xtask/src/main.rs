//! `cargo xtask setup | build-ebpf | run | test | kernels | image`.

mod docker;
mod kernels;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.10.4";
/// Installed when `cargo fuzz` is missing; a cargo-fuzz already there is used as it is.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The cargo-fuzz targets in egress-user/fuzz, which `cargo xtask test` runs as tests named
/// `fuzz::<target>`.
const FUZZ_TARGETS: &[&str] = &["client_hello", "http_head", "dns_message", "config"];
/// How long `cargo xtask test` runs each fuzz target unless `EGRESS_FUZZ_SECONDS` says.
const FUZZ_SECONDS: u64 = 30;
/// Debian packages that tests and benchmarks run, each with a file it installs: HAProxy in the
/// agent's place, iptables for REDIRECT, curl as an HTTP and TLS client, the CNI plugins
/// (bridge, host-local) that enroll the node fixture's pods, promtool (Debian's prometheus) to
/// parse the metrics page, for the kernels step qemu and a static busybox (the guests'
/// shell and tools), for the agent's image and the container tests Docker and debootstrap
/// (which makes the base image, since none can be pulled), for the DNS tests dnsmasq (the
/// binary only, no service) as the nameservers, dig as a client, Python for a client of
/// unconnected UDP and musl-gcc to build a client on musl's resolver, and for the DNS
/// benchmark dnsperf as the load generator.
const PACKAGES: &[(&str, &str)] = &[
    ("haproxy", "/usr/sbin/haproxy"),
    ("iptables", "/usr/sbin/iptables"),
    ("curl", "/usr/bin/curl"),
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    ("prometheus", "/usr/bin/promtool"),
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("docker.io", "/usr/sbin/dockerd"),
    ("debootstrap", "/usr/sbin/debootstrap"),
    ("dnsmasq-base", "/usr/sbin/dnsmasq"),
    ("bind9-dnsutils", "/usr/bin/dig"),
    ("python3", "/usr/bin/python3"),
    ("musl-tools", "/usr/bin/musl-gcc"),
    ("golang-go", "/usr/bin/go"),
    ("dnsperf", "/usr/bin/dnsperf"),
];
/// The PyPI package whose Kubernetes API schemas the deploy tests validate the manifests
/// against (offline).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need, when missing: rust-src for the nightly
    /// toolchain, bpf-linker 0.10.4, cargo-fuzz, and (as root, with apt-get) Debian's haproxy,
    /// iptables, curl, containernetworking-plugins, prometheus (promtool), qemu-system-x86,
    /// busybox-static, docker.io, debootstrap, dnsmasq-base, bind9-dnsutils (dig), python3,
    /// musl-tools, golang-go and dnsperf, and (with pip) kubernetes-validate.
    Setup,
    /// Build the kernel programs (nightly, bpfel-unknown-none).
    BuildEbpf,
    /// Build, then run the agent as root with examples/mesh.yaml (extra arguments follow `--`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks, side by side in one run (as root): writes BENCHMARKS.md and its plots.
    Bench {
        /// A short run that checks the machinery, not a measurement.
        #[arg(long)]
        quick: bool,
        /// Only this section (`dns`), its report written to target/bench/SECTION.md (BENCHMARKS.md
        /// is left alone); the criterion micro-benchmarks are skipped.
        #[arg(long)]
        only: Option<String>,
    },
    /// Set up, run the unit tests and the privileged integration tests, then each fuzz target
    /// for EGRESS_FUZZ_SECONDS (default 30, 0 skips them), then a privileged smoke suite in
    /// Debian's 5.10, 6.1 and 6.12 kernels under qemu (EGRESS_KERNELS: a comma list of them,
    /// or none), print a summary.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Build the release binaries and the agent's container image from the Dockerfile,
    /// starting dockerd when none runs and making the debian:bookworm-slim base with
    /// debootstrap when Docker does not have it.
    Image {
        #[arg(long, default_value = docker::TAG)]
        tag: String,
    },
    /// Only the kernels step of `test`: build, then boot the kernels EGRESS_KERNELS names
    /// (default all) and run the smoke suite in each.
    Kernels {
        /// Only run smoke tests whose name contains this.
        filter: Option<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => {
            setup()?;
            let mut c = Command::new("rustup");
            c.args([
                "run",
                "nightly",
                "cargo",
                "build",
                "--release",
                "--target",
                "bpfel-unknown-none",
            ])
            .args(["-Z", "build-std=core", "-p", "egress-ebpf"])
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "-Cdebuginfo=2\x1f-Clink-arg=--btf",
            )
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER");
            status(&mut c)
        }
        Cmd::Run { args } => run(args),
        Cmd::Test { filter } => test(filter),
        Cmd::Kernels { filter } => kernels_only(filter),
        Cmd::Bench { quick, only } => bench(quick, only.as_deref()),
        Cmd::Image { tag } => {
            setup()?;
            docker::image(&root(), &tag)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Where cargo builds: `CARGO_TARGET_DIR` (relative to the workspace) when set, as cargo
/// reads it, else the workspace's `target`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

fn status(c: &mut Command) -> Result<()> {
    let s = c.status().with_context(|| format!("running {c:?}"))?;
    if !s.success() {
        bail!("{c:?} failed: {s}");
    }
    Ok(())
}

/// `cargo ARGS` in the workspace.
fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    status(Command::new("cargo").current_dir(root).args(args))
}

fn output(c: &mut Command) -> Option<String> {
    let o = c.stderr(Stdio::null()).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn setup() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context("the nightly toolchain is not installed (rustup toolchain list)")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for nightly");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !have.contains(BPF_LINKER_VERSION) {
        eprintln!(
            "xtask: installing bpf-linker {BPF_LINKER_VERSION} (found: {:?})",
            have.trim()
        );
        status(Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ]))?;
    }
    // `cargo xtask test` runs the fuzz targets under egress-user/fuzz.
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_none() {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        status(Command::new("cargo").args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
        ]))?;
    }
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(package, _)| *package)
        .collect();
    if !missing.is_empty() {
        if !is_root() || which("apt-get").is_none() {
            eprintln!(
                "xtask: {missing:?} missing and cannot be installed here (needs root and apt-get)"
            );
        } else {
            eprintln!("xtask: installing {missing:?}");
            status(Command::new("apt-get").args(["update", "-qq"]))?;
            status(
                Command::new("apt-get")
                    .args(["install", "-y", "-qq"])
                    .args(&missing)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
        }
    }
    // The deploy tests validate the manifests with it.
    if output(Command::new("python3").args(["-c", "import kubernetes_validate"])).is_none() {
        eprintln!("xtask: installing {KUBERNETES_VALIDATE} with pip");
        status(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            KUBERNETES_VALIDATE,
        ]))?;
    }
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}

fn run(args: Vec<String>) -> Result<()> {
    setup()?;
    let root = root();
    cargo(&root, &["build", "--release", "-p", "egress-user"])?;
    let bin = target_dir(&root).join("release/egress");
    let config = root.join("examples/mesh.yaml");
    let mut c = if is_root() {
        Command::new(&bin)
    } else {
        let mut c = Command::new("sudo");
        c.arg("--preserve-env=RUST_LOG").arg(&bin);
        c
    };
    c.arg("run").arg("--config").arg(config).args(args);
    status(&mut c)
}

fn bench(quick: bool, only: Option<&str>) -> Result<()> {
    setup()?;
    let root = root();
    cargo(
        &root,
        &[
            "build",
            "--release",
            "-p",
            "egress-user",
            "-p",
            "egress-tests",
            "--bins",
        ],
    )?;
    let target = target_dir(&root);
    if let Some(section) = only {
        let mut c = Command::new(target.join("release/egress-bench"));
        c.current_dir(&root)
            .env("EGRESS_BIN", target.join("release/egress"))
            .args(["run", "--only", section, "--out"])
            .arg(target.join(format!("bench/{section}.md")));
        if quick {
            c.arg("--quick");
        }
        return status(&mut c);
    }
    // The configuration pipeline's micro-benchmarks first (criterion, user space only); the
    // report reads their estimates.
    let estimates = target.join("criterion");
    let _ = std::fs::remove_dir_all(&estimates);
    let timing: &[&str] = if quick {
        &["--warm-up-time", "0.2", "--measurement-time", "0.5"]
    } else {
        &["--warm-up-time", "1", "--measurement-time", "3"]
    };
    cargo(
        &root,
        &[
            &["bench", "-p", "egress-user", "--bench", "compile", "--"][..],
            timing,
        ]
        .concat(),
    )?;
    let mut c = Command::new(target.join("release/egress-bench"));
    c.current_dir(&root)
        .env("EGRESS_BIN", target.join("release/egress"))
        .arg("run")
        .arg("--criterion")
        .arg(&estimates);
    if quick {
        c.args(["--quick", "--out"])
            .arg(target.join("quick/BENCHMARKS.md"));
    } else {
        c.args(["--out", "BENCHMARKS.md"]);
    }
    status(&mut c)
}

/// Counts from libtest's `test result:` lines.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut it = part.split_whitespace().rev();
            let (Some(word), Some(n)) = (it.next(), it.next()) else {
                continue;
            };
            let n: u64 = n.parse().unwrap_or(0);
            match word {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

fn test(filter: Option<String>) -> Result<()> {
    let fuzz_seconds = match std::env::var("EGRESS_FUZZ_SECONDS") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("EGRESS_FUZZ_SECONDS={v:?} is not a number of seconds"))?,
        Err(_) => FUZZ_SECONDS,
    };
    let kernels = kernels::selected()?;
    setup()?;
    let root = root();
    // The integration tests drive the real binary.
    cargo(&root, &["build", "-p", "egress-user"])?;
    let target = target_dir(&root);
    let bin = target.join("debug/egress");
    if !is_root() {
        eprintln!(
            "xtask: not root: the privileged integration tests will {}",
            if std::env::var("EGRESS_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
                "fail"
            } else {
                "be skipped"
            }
        );
    }
    // The container tests run the agent from its image: built first, counted as a test.
    let imaged = image_step(&root, filter.as_deref());
    // Privileged tests that cannot run here (and are not required to) record themselves here:
    // libtest counts them as passed, the summary must not.
    let skip_log = target.join("egress-skipped.log");
    std::fs::write(&skip_log, "")?;
    let mut c = Command::new("cargo");
    c.current_dir(&root)
        .args([
            "test",
            "--workspace",
            "--exclude",
            "egress-ebpf",
            "--no-fail-fast",
        ])
        .env("EGRESS_BIN", &bin)
        .env("EGRESS_SKIP_LOG", &skip_log)
        .stdout(Stdio::piped());
    c.arg("--");
    if let Some(f) = &filter {
        c.arg(f);
    }
    let mut child = c.spawn().context("running cargo test")?;
    let mut tally = Tally::default();
    {
        use std::io::BufRead as _;
        let out = child.stdout.take().context("cargo test stdout")?;
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            tally.add(&line);
        }
    }
    let st = child.wait()?;
    let fuzzed = fuzz(&root, filter.as_deref(), fuzz_seconds);
    let booted = kernels::run(&root, &target, filter.as_deref(), &kernels);
    let skips = std::fs::read_to_string(&skip_log).unwrap_or_default();
    let skipped = skips.lines().count() as u64;
    println!();
    let fuzz_skips = fuzzed.skipped.iter().map(String::as_str);
    let kernel_skips = booted.skipped.iter().map(String::as_str);
    let image_skips = imaged.skipped.iter().map(String::as_str);
    for l in skips
        .lines()
        .chain(image_skips)
        .chain(fuzz_skips)
        .chain(kernel_skips)
    {
        println!("skipped: {l}");
    }
    for run in &booted.runs {
        println!("{}", run.report());
    }
    let mut summary = format!(
        "summary: {} passed, {} failed, {} skipped",
        tally.passed.saturating_sub(skipped) + fuzzed.passed + imaged.passed,
        tally.failed + fuzzed.failed + imaged.failed,
        tally.ignored
            + skipped
            + fuzzed.skipped.len() as u64
            + booted.skipped.len() as u64
            + imaged.skipped.len() as u64
    );
    if let Some(k) = booted.summary() {
        summary.push_str(&format!("; kernels: {k}"));
    }
    println!("{summary}");
    if !st.success()
        || tally.failed > 0
        || fuzzed.failed > 0
        || imaged.failed > 0
        || booted.failed()
    {
        bail!("tests failed");
    }
    if tally.passed + fuzzed.passed + imaged.passed + booted.passed() == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn kernels_only(filter: Option<String>) -> Result<()> {
    let kernels = kernels::selected()?;
    setup()?;
    let root = root();
    cargo(&root, &["build", "-p", "egress-user"])?;
    let booted = kernels::run(&root, &target_dir(&root), filter.as_deref(), &kernels);
    println!();
    for l in &booted.skipped {
        println!("skipped: {l}");
    }
    for run in &booted.runs {
        println!("{}", run.report());
    }
    if let Some(k) = booted.summary() {
        println!("summary: kernels: {k}");
    }
    if booted.failed() {
        bail!("tests failed");
    }
    if booted.passed() == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// The image step of `cargo xtask test`, the test `image::build`: the agent's image, which the
/// container tests run, built with `cargo xtask image` before them. It needs root (Docker);
/// without it the step is skipped, or fails under EGRESS_REQUIRE_PRIVILEGED=1. A filter that
/// does not match its name skips it (the container tests then say when the image is missing).
fn image_step(root: &Path, filter: Option<&str>) -> Fuzzed {
    const NAME: &str = "image::build";
    let mut out = Fuzzed::default();
    if filter.is_some_and(|f| !NAME.contains(f)) {
        return out;
    }
    let result = if is_root() {
        docker::image(root, docker::TAG)
    } else if std::env::var("EGRESS_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        Err(anyhow::anyhow!(
            "not running as root (EGRESS_REQUIRE_PRIVILEGED=1)"
        ))
    } else {
        out.skipped.push(format!("{NAME}: not running as root"));
        return out;
    };
    match result {
        Ok(()) => {
            println!("test {NAME} ... ok");
            out.passed += 1;
        }
        Err(e) => {
            println!("test {NAME} ... FAILED: {e:#}");
            out.failed += 1;
        }
    }
    out
}

/// What the fuzz step of `cargo xtask test` found (and the image step did).
#[derive(Default)]
struct Fuzzed {
    passed: u64,
    failed: u64,
    /// One line per target not run.
    skipped: Vec<String>,
}

/// Run each fuzz target (whose test name `fuzz::<target>` contains `filter`) for `seconds`
/// with nightly; a target passes when libFuzzer stops at the time limit without a finding.
fn fuzz(root: &Path, filter: Option<&str>, seconds: u64) -> Fuzzed {
    let mut out = Fuzzed::default();
    let targets: Vec<&str> = FUZZ_TARGETS
        .iter()
        .copied()
        .filter(|t| filter.is_none_or(|f| format!("fuzz::{t}").contains(f)))
        .collect();
    if targets.is_empty() {
        return out;
    }
    if seconds == 0 {
        out.skipped = targets
            .iter()
            .map(|t| format!("fuzz::{t} (EGRESS_FUZZ_SECONDS=0)"))
            .collect();
        return out;
    }
    // From egress-user/, cargo fuzz finds its project in ./fuzz (and prints reproduction
    // commands that work from there). The targets link egress-user for its parsers only: its
    // build script need not build the kernel programs.
    let dir = root.join("egress-user");
    let cargo_fuzz = |args: &[&str]| {
        let mut c = Command::new("rustup");
        c.current_dir(&dir)
            .args(["run", "nightly", "cargo", "fuzz"])
            .args(args)
            .env("AYA_BUILD_SKIP", "1")
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER");
        c
    };
    println!();
    let built = status(&mut cargo_fuzz(&["build"]));
    for t in targets {
        let result = match &built {
            Err(e) => Err(anyhow::anyhow!("building the fuzz targets: {e:#}")),
            Ok(()) => fuzz_run(cargo_fuzz(&["run", t]), &dir.join("fuzz"), t, seconds),
        };
        match result {
            Ok(()) => {
                println!("test fuzz::{t} ... ok");
                out.passed += 1;
            }
            Err(e) => {
                println!("test fuzz::{t} ... FAILED: {e:#}");
                out.failed += 1;
            }
        }
    }
    out
}

/// `cargo fuzz run <target>` (the command `c`) in the fuzz project `fuzz`, for `seconds`.
fn fuzz_run(mut c: Command, fuzz: &Path, target: &str, seconds: u64) -> Result<()> {
    // libFuzzer adds the inputs it finds to the first corpus directory and only reads the
    // others: the committed seeds stay as they are, the finds stay for the next run in the
    // fuzz project's target directory (which git ignores).
    let found = fuzz.join("target/corpus").join(target);
    std::fs::create_dir_all(&found)?;
    c.arg(&found)
        .arg(fuzz.join("corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args(["-rss_limit_mb=2048", "-timeout=10"]);
    status(&mut c)
}
