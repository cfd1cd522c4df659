//! Debian's dnsmasq as a nameserver of the tests' and benchmarks' own: names of its own only
//! (no upstream), in a namespace they made, stopped on drop.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::{Child, Stdio},
};

use crate::{eventually, node::Netns};

pub struct Dnsmasq {
    child: Child,
    log: PathBuf,
}

impl Dnsmasq {
    /// dnsmasq in `netns`, on port 53 of `listen`, its log at `log`, with `options` besides
    /// (the records that give names their addresses, `--log-queries`). Every name is its own:
    /// a type a name lacks gets NOERROR and no answer (REFUSED otherwise, with no upstream,
    /// which musl takes for a failure). Returns once it has started.
    pub fn start<A: Into<IpAddr> + Copy>(
        netns: &Netns,
        listen: &[A],
        log: PathBuf,
        options: &[String],
    ) -> Dnsmasq {
        let child = netns
            .command("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--user=root",
                "--pid-file=",
                "--port=53",
                "--local=/#/",
            ])
            .args(
                listen
                    .iter()
                    .map(|&a| format!("--listen-address={}", a.into())),
            )
            .args(options)
            .arg(format!("--log-facility={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting dnsmasq (Debian's dnsmasq-base: cargo xtask setup)");
        let d = Dnsmasq { child, log };
        assert!(
            eventually(10, || d.log().contains("started")),
            "dnsmasq did not start: {}",
            d.log()
        );
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it logged a query of `qtype` for `name` from `from` (with `--log-queries`).
    pub fn saw(&self, qtype: &str, name: &str, from: IpAddr) -> bool {
        self.log()
            .lines()
            .any(|l| l.contains(&format!("query[{qtype}] {name} from {from}")))
    }

    /// How many queries it logged so far (with `--log-queries`).
    pub fn queries(&self) -> usize {
        self.log().lines().filter(|l| l.contains("query[")).count()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
