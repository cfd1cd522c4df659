//! `cargo xtask setup | build-ebpf | run | test`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.10.4";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need, when missing: rust-src for the nightly
    /// toolchain, bpf-linker 0.10.4, and (as root, with apt-get) Debian's haproxy and iptables.
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
    },
    /// Set up, run the unit tests and the privileged integration tests, print a summary.
    Test {
        /// Only run tests whose name contains this.
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
        Cmd::Bench { quick } => bench(quick),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
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
    // Tests and benchmarks run Debian's HAProxy in the agent's place and the agent behind
    // iptables REDIRECT.
    let missing: Vec<&str> = ["haproxy", "iptables"]
        .into_iter()
        .filter(|p| which(p).is_none())
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
    let bin = root.join("target/release/egress");
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

fn bench(quick: bool) -> Result<()> {
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
    let mut c = Command::new(root.join("target/release/egress-bench"));
    c.current_dir(&root)
        .env("EGRESS_BIN", root.join("target/release/egress"))
        .arg("run");
    if quick {
        c.args(["--quick", "--out", "target/quick/BENCHMARKS.md"]);
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
    setup()?;
    let root = root();
    // The integration tests drive the real binary.
    cargo(&root, &["build", "-p", "egress-user"])?;
    let bin = root.join("target/debug/egress");
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
    // Privileged tests that cannot run here (and are not required to) record themselves here:
    // libtest counts them as passed, the summary must not.
    let skip_log = root.join("target/egress-skipped.log");
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
    let skips = std::fs::read_to_string(&skip_log).unwrap_or_default();
    let skipped = skips.lines().count() as u64;
    println!();
    for l in skips.lines() {
        println!("skipped: {l}");
    }
    println!(
        "summary: {} passed, {} failed, {} skipped",
        tally.passed.saturating_sub(skipped),
        tally.failed,
        tally.ignored + skipped
    );
    if !st.success() || tally.failed > 0 {
        bail!("tests failed");
    }
    if tally.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}
