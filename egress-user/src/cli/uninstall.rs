//! `egress uninstall`: remove what agents leave on a node on purpose when they stop (the
//! pinned links that keep the programs attached, the maps they decide from, the enrolment
//! state, the CNI plugin's entry), once no agent runs.

use std::{path::Path, time::Duration};

use anyhow::{Result, bail};

use crate::{
    datapath::{self, sys},
    workloads::{self, api, cniconf, handover, netns},
};

/// What to remove.
pub struct Uninstall<'a> {
    pub pin_path: &'a Path,
    pub state_file: &'a Path,
    pub allocations_file: &'a Path,
    pub admin_socket: &'a Path,
    /// The CNI configuration and binary directories, when the plugin was installed.
    pub cni: Option<(&'a Path, &'a Path)>,
}

pub fn uninstall(u: &Uninstall<'_>) -> Result<()> {
    if api::list(u.admin_socket).is_ok() {
        bail!(
            "an agent answers on {}: stop it first (a stopped agent leaves the programs \
             attached and the policy in force; uninstall then removes them)",
            u.admin_socket.display()
        );
    }
    let links = datapath::pinned_links(u.pin_path);
    let removed = datapath::unpin(u.pin_path);
    for p in &removed {
        println!("removed {}", p.display());
    }
    // The programs detach when the last holder of a link lets go: the pins just went, so
    // only a process that still holds one keeps it.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut held: Vec<u32> = links.iter().map(|(_, id)| *id).collect();
    while !held.is_empty() && std::time::Instant::now() < deadline {
        held.retain(|id| sys::link_exists(*id));
        std::thread::sleep(Duration::from_millis(20));
    }
    if !held.is_empty() {
        bail!(
            "links {held:?} are still attached: a process other than an agent holds them \
             (see `bpftool link`)"
        );
    }
    println!("detached {} programs", links.len());
    if let Some((conf_dir, bin_dir)) = u.cni {
        for p in cniconf::unchain(conf_dir)? {
            println!("removed {} from {}", cniconf::PLUGIN, p.display());
        }
        if cniconf::remove_plugin(bin_dir)? {
            println!("removed {}", bin_dir.join(cniconf::PLUGIN).display());
        }
    }
    // The route that makes the IPv6 DNS stub range local: in the pods the state file lists,
    // and here (the agent's own namespace, when it served DNS to its cgroup).
    for w in workloads::remove_stub_routes(u.state_file) {
        println!("removed the DNS stub route of {w}");
    }
    if netns::stub_route(netns::Route::Remove).is_ok_and(|r| r) {
        println!("removed the DNS stub route of this network namespace");
    }
    let handover = handover::socket_path(u.admin_socket);
    for f in [u.state_file, u.allocations_file, u.admin_socket, &handover] {
        if std::fs::remove_file(f).is_ok() {
            println!("removed {}", f.display());
        }
    }
    // The cgroup `egress run` makes when it is given none: empty once nothing runs in it.
    if let Ok(root) = sys::cgroup2_root() {
        let c = root.join(super::DEFAULT_CGROUP);
        if c.exists() {
            match std::fs::remove_dir(&c) {
                Ok(()) => println!("removed cgroup {}", c.display()),
                Err(e) => eprintln!(
                    "egress: kept cgroup {}: {e} (processes still run in it)",
                    c.display()
                ),
            }
        }
    }
    if removed.is_empty() {
        println!("nothing was pinned in {}", u.pin_path.display());
    }
    Ok(())
}
