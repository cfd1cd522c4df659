//! `egress cni install | uninstall`: put `egress-cni` into the node's CNI configuration (and
//! keep it there), or take it out. The work is `workloads::cniconf`'s.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Subcommand;

use crate::workloads::{api::DEFAULT_ADMIN_SOCKET, cniconf};

#[derive(Subcommand)]
pub enum Cmd {
    /// Copy the `egress-cni` plugin into the CNI bin directory and chain it into the node's
    /// primary network configuration (the first *.conflist, *.conf or *.json by name; a .conf
    /// becomes a .conflist), keeping every other field and plugin. Safe to run again.
    Install {
        #[arg(long)]
        cni_bin_dir: PathBuf,
        #[arg(long)]
        cni_conf_dir: PathBuf,
        /// The plugin binary [default: `egress-cni` beside this executable].
        #[arg(long)]
        plugin: Option<PathBuf>,
        /// The agent's admin socket, which the plugin enrols pods through.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// Then keep it chained until SIGTERM: when the pod network rewrites its file without
        /// the entry, or a new file becomes the primary one, chain it again.
        #[arg(long)]
        watch: bool,
    },
    /// Remove `egress-cni` from every network configuration in the directory and its binary.
    Uninstall {
        #[arg(long)]
        cni_bin_dir: PathBuf,
        #[arg(long)]
        cni_conf_dir: PathBuf,
    },
}

pub fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Install {
            cni_bin_dir,
            cni_conf_dir,
            plugin,
            admin_socket,
            watch,
        } => {
            let plugin = match plugin {
                Some(p) => p,
                None => std::env::current_exe()
                    .context("finding this executable")?
                    .with_file_name(cniconf::PLUGIN),
            };
            if watch {
                // The pod network may not have written its configuration yet: the watch waits.
                let dst = cniconf::install_plugin(&plugin, &cni_bin_dir)?;
                log::info!("installed {}", dst.display());
                cniconf::watch(&cni_conf_dir, &admin_socket)
            } else {
                cniconf::install(&plugin, &cni_bin_dir, &cni_conf_dir, &admin_socket)
            }
        }
        Cmd::Uninstall {
            cni_bin_dir,
            cni_conf_dir,
        } => cniconf::uninstall(&cni_bin_dir, &cni_conf_dir),
    }
}
