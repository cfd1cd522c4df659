//! `cargo xtask image`: the agent's container image, and the Docker daemon it is built with
//! (and the container tests run on).
//!
//! Facts about running Docker here (a machine that is itself a container, with cgroup v1
//! controllers and cgroup2 at /sys/fs/cgroup/unified): Debian's `docker.io` (20.10) runs with
//! its defaults for storage (overlay2) and cgroups (cgroupfs driver, cgroup v1; a container's
//! processes are in cgroup2 at `<cgroup2 mount>/docker/<id>` too, so the agent's programs at
//! the cgroup2 root see them). There is no systemd: dockerd is started by hand, with
//! `--iptables=false --ip6tables=false --ip-forward=false` so that it leaves the host's
//! iptables (FORWARD policy, NAT chains) and forwarding alone, which containers talking to
//! addresses of their own bridge do not need. Its bridge and address pools are in
//! 198.18.0.0/15 (test networks only, never Docker's default 172.17.0.0/16) away from the node
//! fixture's 198.18.0.0/24 and 198.19.0.0/24. No image can be pulled: the base image is made
//! with debootstrap from the Debian mirror apt uses (about 40 s) and `docker import`ed.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, kernels, output, status, target_dir};

/// The base image the Dockerfile names.
const BASE: &str = "debian:bookworm-slim";
const SUITE: &str = "bookworm";
/// The image `cargo xtask image` builds by default, which deploy/egress.yaml and the container
/// tests run.
pub const TAG: &str = "egress:dev";
/// dockerd's bridge (docker0) and the pools its networks are taken from.
const BRIDGE_IP: &str = "198.18.240.1/24";
const ADDRESS_POOL: &str = "base=198.18.248.0/21,size=24";
/// How long dockerd gets to answer after it is started.
const DOCKERD_START: Duration = Duration::from_secs(30);

/// Whether a Docker daemon answers.
fn daemon_answers() -> bool {
    output(Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"])).is_some()
}

/// Start dockerd unless one answers; its log goes to `target/dockerd.log`. It keeps running
/// after xtask exits, for the next run and the tests.
pub fn ensure_daemon(target: &Path) -> Result<()> {
    if daemon_answers() {
        return Ok(());
    }
    let dockerd = crate::which("dockerd")
        .context("dockerd is not installed (`cargo xtask setup` installs Debian's docker.io)")?;
    std::fs::create_dir_all(target)?;
    let log_path = target.join("dockerd.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    eprintln!(
        "xtask: starting dockerd (bridge {BRIDGE_IP}, log {})",
        log_path.display()
    );
    {
        use std::os::unix::process::CommandExt as _;
        Command::new(dockerd)
            .args(["--bip", BRIDGE_IP, "--default-address-pool", ADDRESS_POOL])
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Not in xtask's process group: a Ctrl-C of this run must not stop it.
            .process_group(0)
            .spawn()
            .context("starting dockerd")?;
    }
    let deadline = Instant::now() + DOCKERD_START;
    while !daemon_answers() {
        if Instant::now() > deadline {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            bail!(
                "dockerd did not answer within {DOCKERD_START:?}; the end of {}:\n{}",
                log_path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn has_image(name: &str) -> bool {
    output(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", name])).is_some()
}

/// Make `debian:bookworm-slim` from Debian's packages unless Docker has it: debootstrap (its
/// minimal variant) into `target/image/rootfs-bookworm`, kept for the next time, then
/// `docker import`.
fn ensure_base(dir: &Path) -> Result<()> {
    if has_image(BASE) {
        return Ok(());
    }
    let rootfs = dir.join(format!("rootfs-{SUITE}"));
    let done = dir.join(format!("rootfs-{SUITE}.done"));
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&rootfs);
        let mirror = kernels::mirror();
        eprintln!("xtask: making {BASE} with debootstrap from {mirror}");
        status(
            Command::new("debootstrap")
                .args(["--variant=minbase", SUITE])
                .arg(&rootfs)
                .arg(&mirror),
        )?;
        std::fs::write(&done, &mirror)?;
    }
    eprintln!("xtask: docker import {BASE}");
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let tar_out = tar.stdout.take().context("tar's output")?;
    let import = Command::new("docker")
        .args(["import", "-", BASE])
        .stdin(tar_out)
        .stdout(Stdio::null())
        .status()
        .context("running docker import")?;
    let tarred = tar.wait()?;
    if !tarred.success() || !import.success() {
        bail!(
            "making {BASE} from {}: tar {tarred}, docker import {import}",
            rootfs.display()
        );
    }
    Ok(())
}

/// Build the release binaries and the image `tag` from the workspace's Dockerfile.
pub fn image(root: &Path, tag: &str) -> Result<()> {
    cargo(root, &["build", "--release", "-p", "egress-user", "--bins"])?;
    let target = target_dir(root);
    ensure_daemon(&target)?;
    let dir = target.join("image");
    std::fs::create_dir_all(&dir)?;
    ensure_base(&dir)?;
    let context = dir.join("context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(root.join("Dockerfile"), context.join("Dockerfile"))?;
    for bin in ["egress", "egress-cni"] {
        let from: PathBuf = target.join("release").join(bin);
        std::fs::copy(&from, context.join(bin))
            .with_context(|| format!("staging {}", from.display()))?;
    }
    status(
        Command::new("docker")
            .args(["build", "--quiet", "--tag", tag])
            .arg(&context),
    )?;
    eprintln!("xtask: built image {tag}");
    Ok(())
}
