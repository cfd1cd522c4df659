//! The kernels step of `cargo xtask test`: boot Debian's kernels under qemu (software
//! emulation) and run a privileged smoke suite inside each, so that what the agent needs of
//! the kernel is checked on the kernels people run, not only on the build machine's.
//!
//! Per kernel, under `target/kernels/<suite>/`: a private apt configuration fetches the
//! suite's `linux-image-*.deb` once (a rerun reuses it without apt, and works offline),
//! `dpkg-deb -x` unpacks it into `root/`, and an initramfs is written with busybox, the agent,
//! the smoke test binaries, the tools the tests run, and the kernel modules the node fixture
//! needs. qemu boots it with `/init` running the tests; the serial console is saved to
//! `console.log`, echoed with the kernel's name in front, and the `test NAME ... ok` lines are
//! counted.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{status, which};

/// A Debian kernel: `linux-image-amd64` of a suite.
pub struct Kernel {
    /// What the summary and `EGRESS_KERNELS` call it.
    pub name: &'static str,
    pub suite: &'static str,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "5.10",
        suite: "bullseye",
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
    },
    Kernel {
        name: "6.12",
        suite: "bookworm-backports",
    },
];

/// The smoke suite: tests of egress-tests, by test binary, run by exact name inside each
/// kernel. A listed test that reports no result there counts as failed, so a renamed test
/// cannot drop out unnoticed.
pub const SMOKE: &[(&str, &[&str])] = &[
    (
        "datapath",
        &[
            "redirect_delivers_exact_bytes_and_reports_the_original_destination",
            "registry_only_denies_at_connect_what_no_service_entry_allows",
            "tcp_entries_go_straight_out_and_the_kernel_accounts_for_each_connection",
            "ipv6_and_v4_mapped_destinations_follow_the_rules_of_their_address",
            "getsockopt_original_dst_serves_a_transparent_proxy",
        ],
    ),
    (
        "services",
        &["a_cluster_ip_lands_on_its_endpoints_and_getpeername_shows_the_cluster_ip"],
    ),
    (
        "node_mode",
        &["a_namespace_that_existed_before_the_agent_is_enrolled_by_hand"],
    ),
    (
        "restart",
        &[
            "a_killed_agent_leaves_the_policy_in_force_and_refuses_redirects_until_the_next_takes_over",
        ],
    ),
];

/// Where the kernels come from when the machine's apt sources name no Debian mirror.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Kernel modules the node fixture needs (veth pairs, the CNI bridge), loaded with their
/// dependencies.
const MODULES: &[&str] = &["veth", "bridge"];
/// A kernel gets this long to boot and shut down, plus `TEST_SECS` per test, before qemu is
/// killed and the kernel fails.
const BOOT_SECS: u64 = 120;
const TEST_SECS: u64 = 120;
/// Printed by the guest's /init after the last test.
const DONE: &str = "egress-kernels: done";
/// Where the guest's files go: `target_bin()` of the tests finds the binaries next to `/t`,
/// one level up from the test binaries in `/t/deps`.
const GUEST_BIN: &str = "t";

/// The kernels `EGRESS_KERNELS` selects (a comma list of names, `none`, or all when unset).
pub fn selected() -> Result<Vec<&'static Kernel>> {
    let Ok(v) = std::env::var("EGRESS_KERNELS") else {
        return Ok(KERNELS.iter().collect());
    };
    let v = v.trim();
    if v == "none" {
        return Ok(Vec::new());
    }
    if v.is_empty() || v == "all" {
        return Ok(KERNELS.iter().collect());
    }
    let names: Vec<&str> = v.split(',').map(str::trim).collect();
    let known: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
    if let Some(bad) = names.iter().find(|n| !known.contains(n)) {
        bail!("EGRESS_KERNELS={v:?}: no kernel {bad:?} (known: {known:?}, or none)");
    }
    Ok(KERNELS.iter().filter(|k| names.contains(&k.name)).collect())
}

/// What the kernels step did.
#[derive(Default)]
pub struct Report {
    pub runs: Vec<Run>,
    /// One line per kernel not booted.
    pub skipped: Vec<String>,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.runs.iter().any(|r| !r.ok())
    }

    pub fn passed(&self) -> u64 {
        self.runs.iter().map(|r| r.passed).sum()
    }

    /// `5.10 8/8, 6.1 8/8` for the summary line, `None` when no kernel ran.
    pub fn summary(&self) -> Option<String> {
        (!self.runs.is_empty()).then(|| {
            self.runs
                .iter()
                .map(|r| format!("{} {}/{}", r.kernel.name, r.passed, r.tests))
                .collect::<Vec<_>>()
                .join(", ")
        })
    }
}

/// One kernel's run of the smoke suite.
pub struct Run {
    pub kernel: &'static Kernel,
    /// `uname -r` of the kernel package, once it was fetched.
    release: Option<String>,
    /// The Debian version of the package.
    version: Option<String>,
    tests: u64,
    pub passed: u64,
    failed: u64,
    ignored: u64,
    /// Why the run as a whole failed (fetching, booting, the guest stopping early).
    error: Option<String>,
    /// Selected tests that reported nothing.
    missing: Vec<String>,
    /// Failed tests and the start of what they panicked with.
    failures: Vec<(String, String)>,
    elapsed: Duration,
}

impl Run {
    fn ok(&self) -> bool {
        self.error.is_none() && self.failed == 0 && self.missing.is_empty()
    }

    /// `kernel 5.10 (bullseye, 5.10.0-32-amd64 5.10.223-1): 7 passed, 0 failed in 95 s`, then
    /// a line for each test that failed, with the start of its panic message.
    pub fn report(&self) -> String {
        let k = self.kernel;
        let mut what = k.suite.to_owned();
        if let Some(r) = &self.release {
            what.push_str(&format!(", {r}"));
        }
        if let Some(v) = &self.version {
            what.push_str(&format!(" {v}"));
        }
        // What did not pass failed: also the tests of a kernel that was not fetched or booted.
        let mut line = format!(
            "kernel {} ({what}): {} passed, {} failed",
            k.name,
            self.passed,
            self.tests - self.passed - self.ignored
        );
        if self.ignored > 0 {
            line.push_str(&format!(", {} ignored", self.ignored));
        }
        line.push_str(&format!(" in {} s", self.elapsed.as_secs()));
        if !self.missing.is_empty() {
            line.push_str(&format!("; did not run: {}", self.missing.join(", ")));
        }
        if let Some(e) = &self.error {
            line.push_str(&format!("; {e}"));
        }
        for (name, why) in &self.failures {
            line.push_str(&format!("\n  [{}] {name} FAILED: {why}", k.name));
        }
        line
    }
}

/// Boot each of `kernels` with the smoke tests whose name contains `filter`.
pub fn run(
    root: &Path,
    target: &Path,
    filter: Option<&str>,
    kernels: &[&'static Kernel],
) -> Report {
    let mut report = Report::default();
    let tests: Vec<(&str, Vec<&str>)> = SMOKE
        .iter()
        .map(|(bin, names)| {
            let names = names
                .iter()
                .copied()
                .filter(|n| filter.is_none_or(|f| n.contains(f)))
                .collect();
            (*bin, names)
        })
        .filter(|(_, names): &(&str, Vec<&str>)| !names.is_empty())
        .collect();
    if tests.is_empty() {
        println!("\nkernels: no smoke test matches the filter, no kernel booted");
        return report;
    }
    let count: usize = tests.iter().map(|(_, n)| n.len()).sum();
    let selected = std::env::var("EGRESS_KERNELS").unwrap_or_default();
    report.skipped = KERNELS
        .iter()
        .filter(|k| !kernels.iter().any(|s| s.name == k.name))
        .map(|k| format!("kernel {} (EGRESS_KERNELS={selected})", k.name))
        .collect();
    if kernels.is_empty() {
        return report;
    }
    let dir = target.join("kernels");
    println!();
    let guest = guest_files(root, target, &dir, &tests);
    for k in kernels {
        let start = Instant::now();
        let mut run = Run {
            kernel: k,
            release: None,
            version: None,
            tests: count as u64,
            passed: 0,
            failed: 0,
            ignored: 0,
            error: None,
            missing: Vec::new(),
            failures: Vec::new(),
            elapsed: Duration::ZERO,
        };
        let result = match &guest {
            Ok(files) => boot(&dir, k, files, &tests, &mut run),
            Err(e) => Err(anyhow!("preparing the guest: {e:#}")),
        };
        if let Err(e) = result {
            run.error = Some(format!("{e:#}"));
        }
        run.elapsed = start.elapsed();
        println!("{}", run.report());
        report.runs.push(run);
    }
    report
}

/// Fetch and unpack `k`, write its initramfs (`files` with its modules and /init), boot it,
/// and count what its console reports into `run`.
fn boot(
    dir: &Path,
    k: &Kernel,
    files: &Cpio,
    tests: &[(&str, Vec<&str>)],
    run: &mut Run,
) -> Result<()> {
    let dir = dir.join(k.suite);
    std::fs::create_dir_all(&dir)?;
    let deb = fetch(&dir, k.suite).with_context(|| format!("fetching the {} kernel", k.suite))?;
    let pkg = Package::of(&deb)?;
    run.release = Some(pkg.release.clone());
    run.version = Some(pkg.version.clone());
    let root = unpack(&dir, &deb, &pkg.release)?;
    let modules = modules(&root.join("lib/modules").join(&pkg.release), MODULES)?;
    let mut cpio = files.clone();
    let mut names = Vec::new();
    for (name, bytes) in modules {
        cpio.data(&format!("lib/modules/{name}.ko"), bytes, 0o644);
        names.push(name);
    }
    cpio.data("init", init(&names, tests, files).into_bytes(), 0o755);
    let initramfs = dir.join("initramfs.cpio");
    cpio.write(&initramfs)?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{}", pkg.release));
    let count: u64 = tests.iter().map(|(_, n)| n.len() as u64).sum();
    let timeout = Duration::from_secs(BOOT_SECS + TEST_SECS * count);
    let console = qemu(
        k.name,
        &vmlinuz,
        &initramfs,
        &dir.join("console.log"),
        timeout,
    )?;
    let results = results(&console.lines);
    let mut why = failures(&console.lines);
    for name in tests.iter().flat_map(|(_, n)| n) {
        match results.get(*name) {
            Some(Outcome::Ok) => run.passed += 1,
            Some(Outcome::Failed) => {
                run.failed += 1;
                let msg = why.remove(*name).unwrap_or_default();
                run.failures.push(((*name).to_owned(), msg));
            }
            Some(Outcome::Ignored) => run.ignored += 1,
            None => run.missing.push((*name).to_owned()),
        }
    }
    if console.timed_out {
        bail!(
            "qemu killed after {} s (timeout), see {}",
            timeout.as_secs(),
            dir.join("console.log").display()
        );
    }
    if !console.lines.iter().any(|l| l == DONE) {
        bail!(
            "the guest stopped before the end of the suite (qemu: {}{}), see {}",
            console.status,
            console.stderr,
            dir.join("console.log").display()
        );
    }
    Ok(())
}

/// A kernel package, from its file name `linux-image-<release>_<version>_<arch>.deb`.
struct Package {
    /// The kernel's `uname -r`.
    release: String,
    version: String,
}

impl Package {
    fn of(deb: &Path) -> Result<Package> {
        let name = deb.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let mut parts = name.trim_end_matches(".deb").split('_');
        let (Some(pkg), Some(version)) = (parts.next(), parts.next()) else {
            bail!("{}: not a package file name", deb.display());
        };
        let release = pkg
            .strip_prefix("linux-image-")
            .with_context(|| format!("{}: not a linux-image package", deb.display()))?;
        Ok(Package {
            release: release.to_owned(),
            // apt-get download escapes an epoch's colon.
            version: version.replace("%3a", ":"),
        })
    }
}

/// The suite's `linux-image-*.deb` in `dir`: the one there already, else downloaded with a
/// private apt configuration.
fn fetch(dir: &Path, suite: &str) -> Result<PathBuf> {
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-image-") && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    if let Some(deb) = debs.pop() {
        return Ok(deb);
    }
    if which("apt-get").is_none() {
        bail!("apt-get not found: the kernels come from Debian's archive");
    }
    let apt = Apt::new(&dir.join("apt"), suite)?;
    println!("kernels: apt-get update for {suite} ({})", apt.mirror);
    status(apt.command("apt-get").args(["-q", "update"]))?;
    let show = apt
        .command("apt-cache")
        .args(["show", "linux-image-amd64"])
        .output()
        .context("running apt-cache")?;
    let show = String::from_utf8_lossy(&show.stdout);
    let package = show
        .lines()
        .find_map(|l| l.strip_prefix("Depends:"))
        .and_then(|deps| {
            deps.split([',', '|'])
                .map(|d| d.split_whitespace().next().unwrap_or(""))
                .find(|d| d.starts_with("linux-image-"))
        })
        .with_context(|| format!("no linux-image-amd64 in {suite} (apt-cache show: {show:?})"))?
        .to_owned();
    // Into a directory of its own first: a download cut short leaves no .deb to reuse.
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)?;
    status(
        apt.command("apt-get")
            .current_dir(&download)
            .args(["-q", "download", &package]),
    )?;
    let deb = std::fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let kept = dir.join(deb.file_name().expect("file name"));
    std::fs::rename(&deb, &kept)?;
    // The package lists (tens of MB) served only to find it.
    let _ = std::fs::remove_dir_all(&download);
    let _ = std::fs::remove_dir_all(dir.join("apt"));
    Ok(kept)
}

/// An apt configuration of its own for one suite: its sources, lists and cache under `dir`,
/// nothing of the machine's sources, preferences or hooks.
struct Apt {
    conf: PathBuf,
    mirror: String,
}

impl Apt {
    fn new(dir: &Path, suite: &str) -> Result<Apt> {
        let empty = dir.join("empty");
        for d in [
            &empty,
            &dir.join("lists/partial"),
            &dir.join("cache/archives/partial"),
        ] {
            std::fs::create_dir_all(d)?;
        }
        let mirror = mirror();
        let sources = dir.join("sources.list");
        std::fs::write(
            &sources,
            format!("deb [signed-by={KEYRING}] {mirror} {suite} main\n"),
        )?;
        // Given as APT_CONFIG, read before the machine's apt.conf.d (which `-o` options on the
        // command line come too late to skip): none of its hooks (DEP-11 metadata, PackageKit)
        // runs. What it says about reaching the archive (proxies, Release date checks) is kept.
        let mut conf = reach_settings();
        let d = |p: &Path| format!("{:?}", p.display().to_string());
        conf.push_str(&format!(
            "Dir::Etc::Main \"/dev/null\";\n\
             Dir::Etc::Parts {};\n\
             Dir::Etc::SourceList {};\n\
             Dir::Etc::SourceParts {};\n\
             Dir::Etc::Preferences \"/dev/null\";\n\
             Dir::Etc::PreferencesParts {};\n\
             Dir::State::Lists {};\n\
             Dir::Cache {};\n\
             Dir::Cache::pkgcache \"\";\n\
             Dir::Cache::srcpkgcache \"\";\n\
             APT::Sandbox::User \"root\";\n\
             Acquire::Languages \"none\";\n",
            d(&empty),
            d(&sources),
            d(&empty),
            d(&empty),
            d(&dir.join("lists")),
            d(&dir.join("cache")),
        ));
        let path = dir.join("apt.conf");
        std::fs::write(&path, conf)?;
        Ok(Apt { conf: path, mirror })
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("APT_CONFIG", &self.conf);
        c
    }
}

/// The machine's apt settings on how to reach the archive: proxies, retries, Release date
/// checks (a mirror that serves a snapshot needs these off).
fn reach_settings() -> String {
    let dump = crate::output(Command::new("apt-config").arg("dump")).unwrap_or_default();
    dump.lines()
        .filter(|l| {
            let key = l
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            key.starts_with("acquire::")
                && (key.contains("proxy")
                    || key == "acquire::check-valid-until"
                    || key == "acquire::check-date"
                    || key == "acquire::retries")
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Debian's release names and aliases: a source that names one of them is a Debian mirror
/// (`nodistro` of a third-party repository, or `bookworm-security`, is not).
const DEBIAN_RELEASES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
];

/// The Debian mirror to fetch kernels (and the image's base) from: `EGRESS_DEBIAN_MIRROR` when set (for a suite the
/// machine's mirror no longer carries, such as bullseye once it moves to archive.debian.org),
/// else the URI of the first source the machine's apt uses whose suites name a Debian release,
/// in `/etc/apt/sources.list.d/*.sources` or `/etc/apt/sources.list`; else deb.debian.org.
pub fn mirror() -> String {
    if let Ok(m) = std::env::var("EGRESS_DEBIAN_MIRROR")
        && !m.trim().is_empty()
    {
        return m.trim().trim_end_matches('/').to_owned();
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sources"))
        .collect();
    files.sort();
    files
        .iter()
        .find_map(|f| mirror_in_deb822(&std::fs::read_to_string(f).unwrap_or_default()))
        .or_else(|| {
            mirror_in_list(&std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default())
        })
        .unwrap_or_else(|| DEFAULT_MIRROR.to_owned())
}

fn is_debian_release(suite: &str) -> bool {
    DEBIAN_RELEASES.contains(&suite)
}

/// The first enabled `deb` stanza of a deb822 `.sources` file whose suites name a release.
fn mirror_in_deb822(text: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
            })
        };
        let deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let enabled = field("Enabled").is_none_or(|e| e != "no");
        let named = field("Suites").is_some_and(|s| s.split_whitespace().any(is_debian_release));
        let uri = field("URIs")?.split_whitespace().next()?;
        (deb && enabled && named).then(|| uri.trim_end_matches('/').to_owned())
    })
}

/// The first `deb URI SUITE` line of a one-line-style sources.list whose suite is a release.
fn mirror_in_list(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        if words.next() != Some("deb") {
            return None;
        }
        let mut words = words.skip_while(|w| w.starts_with('['));
        let (uri, suite) = (words.next()?, words.next()?);
        is_debian_release(suite).then(|| uri.trim_end_matches('/').to_owned())
    })
}

/// The package unpacked under `dir/root` (unpacked again unless it holds `release`).
fn unpack(dir: &Path, deb: &Path, release: &str) -> Result<PathBuf> {
    let root = dir.join("root");
    if root
        .join("boot")
        .join(format!("vmlinuz-{release}"))
        .exists()
    {
        return Ok(root);
    }
    let tmp = dir.join("root.tmp");
    for d in [&root, &tmp] {
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
    }
    status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    std::fs::rename(&tmp, &root)?;
    Ok(root)
}

/// Kernel modules `wanted` and what they depend on, dependencies first, from the tree
/// `lib/modules/<release>`, decompressed: (name, contents). The package has no modules.dep:
/// each module's `depends=` (in its .modinfo section) says.
fn modules(tree: &Path, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![tree.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().and_then(|n| n.to_str())
                && let Some(i) = name.find(".ko")
            {
                files.insert(name[..i].replace('-', "_"), p);
            }
        }
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for m in wanted {
        load(m, &files, &mut seen, &mut out)?;
    }
    Ok(out)
}

fn load(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    seen: &mut BTreeSet<String>,
    out: &mut Vec<(String, Vec<u8>)>,
) -> Result<()> {
    let name = name.replace('-', "_");
    if !seen.insert(name.clone()) {
        return Ok(());
    }
    let path = files
        .get(&name)
        .with_context(|| format!("kernel module {name} is not in the package"))?;
    let bytes = decompress(path)?;
    for dep in depends(&bytes) {
        load(&dep, files, seen, out)?;
    }
    out.push((name, bytes));
    Ok(())
}

/// A module file's contents: `.ko` as it is, `.ko.xz` (and the like) through its tool.
fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = match name.rsplit_once(".ko") {
        Some((_, "")) => return std::fs::read(path).with_context(|| format!("reading {name}")),
        Some((_, ".xz")) => "xz",
        Some((_, ".zst")) => "zstd",
        Some((_, ".gz")) => "gzip",
        _ => bail!("{name}: not a kernel module this knows how to read"),
    };
    let o = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {tool} -dc {name}"))?;
    if !o.status.success() {
        bail!("{tool} -dc {name} failed: {}", o.status);
    }
    Ok(o.stdout)
}

/// The modules a module depends on: its modinfo string `depends=a,b` (NUL-terminated).
fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let at = ko
        .windows(key.len())
        .enumerate()
        .find(|(i, w)| *w == key && (*i == 0 || ko[i - 1] == 0))
        .map(|(i, _)| i + key.len());
    let Some(at) = at else {
        return Vec::new();
    };
    let end = ko[at..]
        .iter()
        .position(|b| *b == 0)
        .map_or(ko.len(), |n| at + n);
    String::from_utf8_lossy(&ko[at..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The guest's files common to every kernel: busybox, the agent and the smoke test binaries
/// (stripped of debug information), the tools the tests run, their shared libraries, /etc.
fn guest_files(
    root: &Path,
    target: &Path,
    dir: &Path,
    tests: &[(&str, Vec<&str>)],
) -> Result<Cpio> {
    let mut cpio = Cpio::default();
    for d in [
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "root",
        "etc",
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "opt/busybox/bin",
    ] {
        cpio.dir(d);
    }
    cpio.symlink("var/run", "/run");
    cpio.char_dev("dev/console", 5, 1);
    cpio.char_dev("dev/null", 1, 3);
    let etc: &[(&str, &str)] = &[
        ("passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("group", "root:x:0:\n"),
        (
            "hosts",
            "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
        ),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files\n",
        ),
        ("hostname", "egress-guest\n"),
    ];
    for (name, text) in etc {
        cpio.data(&format!("etc/{name}"), text.as_bytes().to_vec(), 0o644);
    }
    let mut host = Vec::new();
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox not found (Debian's busybox-static: cargo xtask setup)");
    }
    host.push((busybox.to_path_buf(), "bin/busybox".to_owned()));
    // The tests run these by name (`timeout --kill-after`, which busybox lacks), and the CNI
    // plugins from where the node fixture looks.
    for tool in ["ip", "timeout", "curl"] {
        let p = which(tool).with_context(|| format!("{tool} not found on this machine"))?;
        let inside = p.to_string_lossy().trim_start_matches('/').to_owned();
        host.push((p, inside));
    }
    for plugin in ["bridge", "host-local"] {
        let p = Path::new("/usr/lib/cni").join(plugin);
        if !p.exists() {
            bail!(
                "{} not found (Debian's containernetworking-plugins: cargo xtask setup)",
                p.display()
            );
        }
        host.push((p, format!("usr/lib/cni/{plugin}")));
    }
    // The workspace's binaries, without their debug information (egress is 130 MB with it).
    let bins = test_binaries(root)?;
    let stage = dir.join("guest");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(stage.join("deps"))?;
    let debug = target.join("debug");
    let mut ours: Vec<(PathBuf, String)> = ["egress", "egress-probe", "egress-cni"]
        .iter()
        .map(|b| (debug.join(b), (*b).to_owned()))
        .collect();
    for (name, _) in tests {
        let exe = bins
            .get(*name)
            .with_context(|| format!("cargo built no test binary {name} for egress-tests"))?;
        ours.push((exe.clone(), format!("deps/{name}")));
    }
    for (src, name) in ours {
        let stripped = stage.join(&name);
        status(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&stripped)
                .arg(&src),
        )?;
        host.push((stripped, format!("{GUEST_BIN}/{name}")));
    }
    let mut libs = BTreeSet::new();
    for (src, inside) in &host {
        cpio.file(inside, src, 0o755);
        libs.extend(shared_libraries(src)?);
    }
    for lib in libs {
        let inside = lib.to_string_lossy().trim_start_matches('/').to_owned();
        cpio.file(&inside, &lib, 0o755);
    }
    Ok(cpio)
}

/// The test binaries of egress-tests (by target name) as `cargo xtask test` built them: the
/// same workspace-wide build, so nothing is built again.
fn test_binaries(root: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let o = Command::new("cargo")
        .current_dir(root)
        .args([
            "test",
            "--workspace",
            "--exclude",
            "egress-ebpf",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !o.status.success() {
        bail!("cargo test --no-run failed: {}", o.status);
    }
    let manifest = root.join("tests/Cargo.toml");
    let mut out = BTreeMap::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(name), Some(path)) = (
            msg["executable"].as_str(),
            msg["target"]["name"].as_str(),
            msg["manifest_path"].as_str(),
        ) else {
            continue;
        };
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if is_test && Path::new(path) == manifest {
            out.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    Ok(out)
}

/// The shared libraries and loader `ldd` names for `exe` (none for a static one).
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let o = Command::new("ldd")
        .arg(exe)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        // "not a dynamic executable"
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for l in text.lines() {
        if l.contains("not found") {
            bail!("{}: {}", exe.display(), l.trim());
        }
        let path = match l.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => l.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            out.push(PathBuf::from(p));
        }
    }
    Ok(out)
}

/// The guest's /init: mounts, modules (in order), then each test binary with its tests by
/// exact name, markers around them, and power off.
fn init(modules: &[String], tests: &[(&str, Vec<&str>)], files: &Cpio) -> String {
    let lib_dirs: BTreeSet<&str> = files
        .entries
        .keys()
        .filter(|p| p.contains(".so"))
        .filter_map(|p| p.rsplit_once('/').map(|(d, _)| d))
        .collect();
    let lib_path: Vec<String> = lib_dirs.iter().map(|d| format!("/{d}")).collect();
    let mut s = format!(
        r#"#!/bin/busybox sh
# Written by `cargo xtask test` (xtask/src/kernels.rs).
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /opt/busybox/bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/opt/busybox/bin
export LD_LIBRARY_PATH={lib_path}
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/netns
hostname egress-guest
echo "egress-kernels: kernel $(uname -r)"
for m in {modules}; do
    insmod /lib/modules/$m.ko || echo "egress-kernels: insmod $m failed"
done
ip link set lo up
export HOME=/root TMPDIR=/tmp EGRESS_REQUIRE_PRIVILEGED=1 EGRESS_BIN=/{GUEST_BIN}/egress RUST_BACKTRACE=1
cd /tmp
failed=0
run() {{
    bin=$1
    shift
    echo "egress-kernels: run $bin"
    /{GUEST_BIN}/deps/$bin --exact --test-threads=1 --color never "$@"
    rc=$?
    echo "egress-kernels: $bin exited $rc"
    [ $rc = 0 ] || failed=1
}}
"#,
        lib_path = lib_path.join(":"),
        modules = modules.join(" "),
    );
    for (bin, names) in tests {
        s.push_str(&format!("run {bin} {}\n", names.join(" ")));
    }
    s.push_str(&format!(
        "if [ $failed = 1 ]; then\n    echo \"egress-kernels: kernel log (last 40 lines)\"\n    \
         dmesg | tail -n 40\nfi\necho \"{DONE}\"\npoweroff -f\n"
    ));
    s
}

/// What a kernel's serial console showed.
struct Console {
    lines: Vec<String>,
    timed_out: bool,
    /// qemu's exit status and what it wrote on standard error.
    status: String,
    stderr: String,
}

/// Boot `vmlinuz` with `initrd` under software emulation; its console goes to `log` and,
/// prefixed with `[name]`, to standard output. qemu is killed after `timeout`.
fn qemu(
    name: &str,
    vmlinuz: &Path,
    initrd: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<Console> {
    let qemu = which("qemu-system-x86_64")
        .context("qemu-system-x86_64 not found (Debian's qemu-system-x86: cargo xtask setup)")?;
    let mut child = Command::new(qemu)
        .args(["-accel", "tcg", "-m", "2048", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-net", "none"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let mut log = std::io::BufWriter::new(
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?,
    );
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(stdout);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let _ = tx.send(printable(&String::from_utf8_lossy(&buf)));
            buf.clear();
        }
    });
    let mut stderr = child.stderr.take().expect("piped stderr");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let mut console = Console {
        lines: Vec::new(),
        timed_out: false,
        status: String::new(),
        stderr: String::new(),
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                println!("[{name}] {line}");
                console.lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                console.timed_out = true;
                println!(
                    "[{name}] timeout after {} s: killing qemu",
                    timeout.as_secs()
                );
                let _ = child.kill();
                break;
            }
        }
    }
    log.flush()?;
    console.status = child.wait()?.to_string();
    let stderr = errors.join().unwrap_or_default();
    if !stderr.trim().is_empty() {
        console.stderr = format!("; {}", stderr.trim());
    }
    Ok(console)
}

/// A console line without its line end and without terminal control sequences (the
/// firmware clears the screen, which a terminal showing the log would do too).
fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters, then a final byte in @..~; else ESC and one character.
                if chars.next_if_eq(&'[').is_some() {
                    while chars.next().is_some_and(|c| !('@'..='~').contains(&c)) {}
                } else {
                    chars.next();
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Ok,
    Failed,
    Ignored,
}

/// libtest's `test NAME ... ok|FAILED|ignored` lines, by name. The result may come on a later
/// line when something else wrote to the console after the name.
fn results(lines: &[String]) -> BTreeMap<String, Outcome> {
    let outcome = |s: &str| match s.split_whitespace().next() {
        Some("ok") => Some(Outcome::Ok),
        Some("FAILED") => Some(Outcome::Failed),
        Some(w) if w.starts_with("ignored") => Some(Outcome::Ignored),
        _ => None,
    };
    let mut out = BTreeMap::new();
    let mut pending: Option<String> = None;
    for l in lines {
        if let Some((name, rest)) = l.strip_prefix("test ").and_then(|r| r.split_once(" ... ")) {
            match outcome(rest) {
                Some(o) => {
                    out.insert(name.to_owned(), o);
                    pending = None;
                }
                None => pending = Some(name.to_owned()),
            }
        } else if let Some(o) = outcome(l.trim())
            && let Some(name) = pending.take()
        {
            out.insert(name, o);
        }
    }
    out
}

/// What each failed test panicked with: libtest's `---- NAME stdout ----` sections, from the
/// `panicked at` line to the backtrace, joined into one line and cut at 400 characters.
fn failures(lines: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    // The test, its message so far, and whether the message started.
    let mut cur: Option<(String, Vec<&str>, bool)> = None;
    let mut flush = |cur: &mut Option<(String, Vec<&str>, bool)>| {
        if let Some((name, msg, _)) = cur.take() {
            let mut msg = msg.join(" ");
            if let Some((i, _)) = msg.char_indices().nth(400) {
                msg.truncate(i);
                msg.push_str("...");
            }
            out.insert(name, msg);
        }
    };
    for l in lines {
        if let Some(name) = l
            .strip_prefix("---- ")
            .and_then(|r| r.strip_suffix(" stdout ----"))
        {
            flush(&mut cur);
            cur = Some((name.to_owned(), Vec::new(), false));
            continue;
        }
        let Some((_, msg, started)) = cur.as_mut() else {
            continue;
        };
        if !*started {
            *started = l.starts_with("thread '") && l.contains("panicked at");
        } else if l.trim().is_empty()
            || l.starts_with("stack backtrace:")
            || l.starts_with("note: ")
            || l == "failures:"
        {
            flush(&mut cur);
        } else {
            msg.push(l.trim());
        }
    }
    flush(&mut cur);
    out
}

/// An initramfs: a newc cpio archive (uncompressed) of directories, files, symlinks and
/// device nodes, written in path order so that every directory comes before what is in it.
#[derive(Clone, Default)]
struct Cpio {
    entries: BTreeMap<String, Entry>,
}

#[derive(Clone)]
enum Entry {
    Dir,
    File { src: PathBuf, mode: u32 },
    Data { bytes: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev(u32, u32),
}

impl Cpio {
    fn dir(&mut self, path: &str) {
        self.parents(path);
        self.entries.entry(path.to_owned()).or_insert(Entry::Dir);
    }

    fn parents(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
    }

    fn add(&mut self, path: &str, e: Entry) {
        self.parents(path);
        self.entries.insert(path.to_owned(), e);
    }

    /// The host file `src` (its contents, symlinks followed) at `path`.
    fn file(&mut self, path: &str, src: &Path, mode: u32) {
        self.add(
            path,
            Entry::File {
                src: src.to_path_buf(),
                mode,
            },
        );
    }

    fn data(&mut self, path: &str, bytes: Vec<u8>, mode: u32) {
        self.add(path, Entry::Data { bytes, mode });
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.add(path, Entry::Symlink(target.to_owned()));
    }

    fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.add(path, Entry::CharDev(major, minor));
    }

    fn write(&self, out: &Path) -> Result<()> {
        let tmp = out.with_extension("tmp");
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        for (ino, (path, e)) in self.entries.iter().enumerate() {
            let read;
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match e {
                Entry::Dir => (0o040_755, &[], (0, 0)),
                Entry::File { src, mode } => {
                    read =
                        std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
                    (0o100_000 | mode, &read, (0, 0))
                }
                Entry::Data { bytes, mode } => (0o100_000 | mode, bytes, (0, 0)),
                Entry::Symlink(target) => (0o120_777, target.as_bytes(), (0, 0)),
                Entry::CharDev(major, minor) => (0o020_600, &[], (*major, *minor)),
            };
            let nlink = if matches!(e, Entry::Dir) { 2 } else { 1 };
            header(&mut w, ino as u32 + 1, mode, nlink, data.len(), rdev, path)?;
            w.write_all(data)?;
            pad(&mut w, data.len())?;
        }
        header(&mut w, 0, 0, 1, 0, (0, 0), "TRAILER!!!")?;
        w.flush()?;
        drop(w);
        std::fs::rename(&tmp, out)?;
        Ok(())
    }
}

/// A newc header and the name after it, padded to four bytes.
fn header(
    w: &mut impl std::io::Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: usize,
    (rdev_major, rdev_minor): (u32, u32),
    name: &str,
) -> Result<()> {
    let size = u32::try_from(size).context("a file of 4 GiB or more in the initramfs")?;
    let namesize = name.len() as u32 + 1;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let fields = [
        ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev_major, rdev_minor, namesize, 0,
    ];
    write!(w, "070701")?;
    for f in fields {
        write!(w, "{f:08x}")?;
    }
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w, 110 + namesize as usize)
}

fn pad(w: &mut impl std::io::Write, len: usize) -> Result<()> {
    w.write_all(&[0; 3][..(4 - len % 4) % 4])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_is_the_source_that_names_a_debian_release() {
        let third_party = "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n";
        assert_eq!(mirror_in_deb822(third_party), None);
        let debian = "Types: deb\n# a comment\nURIs: http://deb.debian.org/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_in_deb822(debian).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let disabled = "Types: deb\nURIs: http://a.example/debian\nSuites: stable\nEnabled: no\n";
        assert_eq!(mirror_in_deb822(disabled), None);
        let list = "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\ndeb [arch=amd64] http://mirror.example/debian bullseye main\n";
        assert_eq!(
            mirror_in_list(list).as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn depends_reads_the_modinfo_string() {
        let ko = b"\x7fELF....\0license=GPL\0depends=stp,llc\0retpoline=Y\0";
        assert_eq!(depends(ko), ["stp", "llc"]);
        assert!(depends(b"\0depends=\0name=veth\0").is_empty());
        assert!(depends(b"\0name=x\0").is_empty());
    }

    #[test]
    fn results_take_the_outcome_from_a_later_line_too() {
        let lines: Vec<String> = [
            "running 3 tests",
            "test a ... ok",
            "test b ... some child wrote here",
            "FAILED",
            "test c ... ignored, needs root",
            "test result: FAILED. 1 passed; 1 failed; 1 ignored",
        ]
        .map(str::to_owned)
        .to_vec();
        let r = results(&lines);
        assert_eq!(r["a"], Outcome::Ok);
        assert_eq!(r["b"], Outcome::Failed);
        assert_eq!(r["c"], Outcome::Ignored);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn failures_keep_the_panic_message() {
        let lines: Vec<String> = [
            "failures:",
            "",
            "---- a stdout ----",
            "some output",
            "thread 'a' (131) panicked at tests/src/lib.rs:426:13:",
            "agent did not become ready:",
            "egress: needs Linux 5.14 or later",
            "stack backtrace:",
            "   0: x",
            "---- b stdout ----",
            "thread 'b' (132) panicked at tests/tests/x.rs:1:1:",
            "assertion failed",
            "",
            "failures:",
        ]
        .map(str::to_owned)
        .to_vec();
        let f = failures(&lines);
        assert_eq!(
            f["a"],
            "agent did not become ready: egress: needs Linux 5.14 or later"
        );
        assert_eq!(f["b"], "assertion failed");
    }

    #[test]
    fn console_lines_lose_control_sequences() {
        assert_eq!(
            printable("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16)\r\n"),
            "SeaBIOS (version 1.16)"
        );
        assert_eq!(printable("test a ... ok\n"), "test a ... ok");
    }

    #[test]
    fn package_names_give_release_and_version() {
        let p = Package::of(Path::new(
            "/x/linux-image-6.12.95+deb12-amd64_6.12.95-1~bpo12+1_amd64.deb",
        ))
        .unwrap();
        assert_eq!(
            (p.release.as_str(), p.version.as_str()),
            ("6.12.95+deb12-amd64", "6.12.95-1~bpo12+1")
        );
    }

    #[test]
    fn cpio_puts_directories_first_and_pads_to_four_bytes() {
        let mut c = Cpio::default();
        c.data("a/b/c", b"hello".to_vec(), 0o644);
        c.symlink("a-link", "/a");
        let paths: Vec<&str> = c.entries.keys().map(String::as_str).collect();
        assert_eq!(paths, ["a", "a-link", "a/b", "a/b/c"]);
        let out = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        c.write(&out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        assert!(bytes.windows(5).any(|w| w == b"hello"));
        assert!(
            bytes
                .windows(b"TRAILER!!!\0".len())
                .any(|w| w == b"TRAILER!!!\0")
        );
    }
}
