//! Keeping the datapath in step with the configuration and the enrolled workloads. The control
//! thread owns the maps: on a file change (debounced), SIGHUP or an admin request it loads and
//! compiles the configuration, then applies the difference to the live maps entry by entry
//! (`plan::diff`), pointing each workload at its namespace's new policy on the way. A
//! configuration that does not load, does not fit or fails half-way leaves the one in force in
//! place. Enrolments, releases and the sweep of namespaces that are gone are served here too,
//! so that they never interleave with a reload.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, RecvTimeoutError, Sender},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use egress_common::{
    MAP_ALLOW_V4, MAP_ALLOW_V6, MAP_DIRECT_V4, MAP_DIRECT_V6, MAP_EXCLUDE_V4, MAP_EXCLUDE_V6,
    MAP_INCLUDE_V4, MAP_INCLUDE_V6,
};
use log::{debug, error, info, warn};

use crate::{
    config::{self, MeshConfig, alloc::Allocator},
    datapath::{Capacity, Maps},
    plan::{Op, Plan, compile, diff},
    registry::{self, Registry},
    workloads::{
        Workloads,
        api::{EnrollRequest, Selector},
        handover::Handed,
    },
};
use std::os::fd::OwnedFd;

/// A reply to an admin request.
type Reply<T> = tokio::sync::oneshot::Sender<T>;

/// Quiet time after the last file event before reloading: editors write in several steps.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// The outcome of a reload request: a summary, or every error.
pub type Outcome = Result<String, String>;

pub enum Msg {
    /// Something changed where the configuration lives.
    Changed,
    /// Reload now; the outcome goes to `reply` when given.
    Reload {
        why: &'static str,
        reply: Option<Reply<Outcome>>,
    },
    /// Enrol a network namespace (node mode).
    Enroll(EnrollRequest, Reply<Outcome>),
    /// Release a workload.
    Unenroll(Selector, Reply<Outcome>),
    /// Whether a workload is enrolled.
    Check(Selector, Reply<bool>),
    /// The enrolled workloads, rendered.
    List(Reply<String>),
    /// `GET /config_dump`: the configuration in force, the workloads, the maps' fill.
    Dump(Reply<serde_json::Value>),
    /// `NAMESPACE/NAME` → (namespace cookie, counter slot).
    Lookup(String, Reply<Option<(u64, u32)>>),
    /// Release workloads whose namespace is gone.
    Sweep,
    /// A new agent asks for the workloads: from now on, enrolments are refused.
    HandOver(std::sync::mpsc::Sender<Vec<(Handed, Vec<OwnedFd>)>>),
    /// The new agent serves them (`true`): this one leaves the maps and the state file to it;
    /// or it went away first (`false`): this one carries on.
    HandedOver(bool),
}

/// What an enrolment gets while the agent hands its workloads to a new one (HTTP 503: the
/// CNI plugin says try again, and the next attempt reaches the new agent).
pub const HANDING_OVER: &str = "the agent is handing its workloads over to a new one: try again";

/// Told each configuration the reloader puts in force.
pub type AppliedHook = Box<dyn Fn(&MeshConfig) + Send>;

/// Where the agent is in a handover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handover {
    No,
    Handing,
    Done,
}

/// What `egress status` reports.
#[derive(Clone, Debug)]
pub struct Status {
    pub config: Option<PathBuf>,
    pub generation: u64,
    pub summary: String,
    pub last_error: Option<String>,
    /// Configurations rejected since the agent started.
    pub failures: u64,
    /// (map, entries, capacity) of the maps the configuration fills.
    pub maps: Vec<(&'static str, u64, u64)>,
    /// When the control thread last handled a message (liveness).
    pub handled: Instant,
}

impl Status {
    pub fn render(&self) -> String {
        let config = self.config.as_ref().map_or_else(
            || "(built-in default)".to_owned(),
            |p| p.display().to_string(),
        );
        let mut s = format!(
            "config: {config}\ngeneration: {}\nin force: {}\n",
            self.generation, self.summary
        );
        if let Some(e) = &self.last_error {
            s.push_str(&format!("last rejected configuration:\n{e}\n"));
        }
        s
    }
}

/// Refuse a plan that would not fit the maps, before anything is applied.
pub fn check_capacity(plan: &Plan, cap: &Capacity) -> Result<()> {
    for (what, n) in [
        ("IPv4 include", plan.include_v4.len()),
        ("IPv4 exclude", plan.exclude_v4.len()),
        ("IPv6 include", plan.include_v6.len()),
        ("IPv6 exclude", plan.exclude_v6.len()),
    ] {
        if n > cap.cidrs as usize {
            bail!(
                "{n} {what} CIDRs do not fit in maps of {} (raise --max-cidrs)",
                cap.cidrs
            );
        }
    }
    // The id and Service maps are sized for twice these, for the same reason as the tries.
    let ids = egress_common::DEFAULT_MAX_IDS as usize / 2;
    for (what, n) in [
        ("excludeUids", plan.exclude_uids.len()),
        ("excludeGids", plan.exclude_gids.len()),
    ] {
        if n > ids {
            bail!("{n} {what} entries do not fit: at most {ids}");
        }
    }
    let services = egress_common::DEFAULT_MAX_SERVICES as usize / 2;
    if plan.services.len() > services {
        bail!(
            "{} Kubernetes Service ports do not fit: at most {services}",
            plan.services.len()
        );
    }
    let endpoints: usize = plan.services.values().map(Vec::len).sum();
    let slots = egress_common::DEFAULT_MAX_BACKENDS as usize / 2;
    if endpoints > slots {
        bail!("{endpoints} Kubernetes Service endpoints do not fit: at most {slots}");
    }
    for (what, n) in [("IPv4", plan.allow_v4.len()), ("IPv6", plan.allow_v6.len())] {
        if n > cap.allowed as usize {
            bail!(
                "{n} {what} ServiceEntry (address, port) pairs do not fit in a map of {} \
                 (raise --max-service-entry-addresses)",
                cap.allowed
            );
        }
    }
    Ok(())
}

/// One line describing a plan, for logs and status.
pub fn summary(p: &Plan) -> String {
    format!(
        "mode={} views={} namespaces={} include_v4={} include_v6={} exclude_v4={} exclude_v6={} \
         ports={} excluded_uids={} excluded_gids={} allowed_v4={} allowed_v6={}",
        crate::plan::mode_name(p.policies.default.mode),
        p.policies.views(),
        p.policies.namespaces.len(),
        p.include_v4.len(),
        p.include_v6.len(),
        p.exclude_v4.len(),
        p.exclude_v6.len(),
        p.ports.len(),
        p.exclude_uids.len(),
        p.exclude_gids.len(),
        p.allow_v4.len(),
        p.allow_v6.len(),
    )
}

/// How full the maps the configuration fills are: (map, entries, capacity).
fn fill(p: &Plan, cap: &Capacity) -> Vec<(&'static str, u64, u64)> {
    let (cidrs, allowed) = (u64::from(cap.cidrs), u64::from(cap.allowed));
    vec![
        (MAP_INCLUDE_V4, p.include_v4.len() as u64, cidrs),
        (MAP_INCLUDE_V6, p.include_v6.len() as u64, cidrs),
        (MAP_EXCLUDE_V4, p.exclude_v4.len() as u64, cidrs),
        (MAP_EXCLUDE_V6, p.exclude_v6.len() as u64, cidrs),
        (MAP_ALLOW_V4, p.allow_v4.len() as u64, allowed),
        (MAP_ALLOW_V6, p.allow_v6.len() as u64, allowed),
        (MAP_DIRECT_V4, p.direct_v4.len() as u64, allowed),
        (MAP_DIRECT_V6, p.direct_v6.len() as u64, allowed),
    ]
}

/// Owns the maps and the plan they hold; runs on its own thread.
pub struct Reloader {
    path: Option<PathBuf>,
    maps: Maps,
    /// The configuration in force and the plan the maps hold.
    mesh: MeshConfig,
    applied: Plan,
    /// The addresses allocated to its ServiceEntries.
    alloc: Allocator,
    cap: Capacity,
    status: Arc<Mutex<Status>>,
    /// What the stream mediation uses; replaced whole after the maps.
    registry: registry::Shared,
    workloads: Workloads,
    /// Node mode: namespaces may be enrolled.
    node: bool,
    handover: Handover,
    /// Told each configuration put in force, after the registry (what DNS answers from it).
    applied_hook: Option<AppliedHook>,
}

impl Reloader {
    /// `applied` is what `maps` already hold: generation 1.
    pub fn new(
        path: Option<PathBuf>,
        maps: Maps,
        (mesh, applied, alloc): (MeshConfig, Plan, Allocator),
        cap: Capacity,
        registry: registry::Shared,
        (workloads, node): (Workloads, bool),
    ) -> Self {
        let status = Status {
            config: path.clone(),
            generation: 1,
            summary: summary(&applied),
            last_error: None,
            failures: 0,
            maps: fill(&applied, &cap),
            handled: Instant::now(),
        };
        info!("configuration generation 1 in force: {}", status.summary);
        Reloader {
            path,
            maps,
            mesh,
            applied,
            alloc,
            cap,
            status: Arc::new(Mutex::new(status)),
            registry,
            workloads,
            node,
            handover: Handover::No,
            applied_hook: None,
        }
    }

    /// Call `hook` with each configuration put in force from now on.
    pub fn on_applied(&mut self, hook: AppliedHook) {
        self.applied_hook = Some(hook);
    }

    pub fn status(&self) -> Arc<Mutex<Status>> {
        self.status.clone()
    }

    /// Serve requests until every sender is gone.
    pub fn run(mut self, rx: Receiver<Msg>) {
        let mut pending: Option<Instant> = None;
        loop {
            let msg = match pending {
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            if let Ok(mut s) = self.status.lock() {
                s.handled = Instant::now();
            }
            match msg {
                Ok(Msg::Enroll(_, reply) | Msg::Unenroll(_, reply))
                    if self.handover != Handover::No =>
                {
                    let _ = reply.send(Err(HANDING_OVER.to_owned()));
                }
                // The maps and the state file are the new agent's now.
                Ok(Msg::Reload { reply, .. }) if self.handover == Handover::Done => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(
                            "handed over to a new agent: it applies the configuration".to_owned(),
                        ));
                    }
                }
                Ok(Msg::Changed | Msg::Sweep) if self.handover == Handover::Done => {}
                Ok(Msg::HandOver(reply)) => {
                    self.handover = Handover::Handing;
                    let _ = reply.send(self.workloads.handed());
                }
                Ok(Msg::HandedOver(taken)) => {
                    self.handover = if taken { Handover::Done } else { Handover::No };
                }
                Ok(Msg::Changed) => pending = Some(Instant::now() + DEBOUNCE),
                Ok(Msg::Reload { why, reply }) => {
                    pending = None;
                    let outcome = self.reload(why);
                    crate::datapath::sys::release_free_memory();
                    if let Some(reply) = reply {
                        let _ = reply.send(outcome);
                    }
                }
                Ok(Msg::Enroll(req, reply)) => {
                    let out = if self.node {
                        self.workloads
                            .enroll(&mut self.maps, &self.applied.policies, req)
                            .map_err(|e| format!("{e:#}"))
                    } else {
                        Err(
                            "the agent intercepts one cgroup of its own namespace: enrolling \
                             network namespaces needs `egress run --node`"
                                .to_owned(),
                        )
                    };
                    let _ = reply.send(out);
                }
                Ok(Msg::Unenroll(sel, reply)) => {
                    let out = self
                        .workloads
                        .unenroll(&mut self.maps, &sel)
                        .map_err(|e| format!("{e:#}"));
                    let _ = reply.send(out);
                }
                Ok(Msg::Check(sel, reply)) => {
                    let _ = reply.send(self.workloads.is_enrolled(&sel));
                }
                Ok(Msg::List(reply)) => {
                    let _ = reply.send(self.workloads.render(&self.maps));
                }
                Ok(Msg::Dump(reply)) => {
                    let _ = reply.send(self.dump());
                }
                Ok(Msg::Lookup(label, reply)) => {
                    let _ = reply.send(self.workloads.lookup(&label));
                }
                Ok(Msg::Sweep) => self.workloads.sweep(&mut self.maps),
                Err(RecvTimeoutError::Timeout) if self.handover == Handover::Done => {
                    pending = None;
                }
                Err(RecvTimeoutError::Timeout) => {
                    pending = None;
                    let _ = self.reload("file change");
                    crate::datapath::sys::release_free_memory();
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// The configuration in force (its resources by kind and name), the workloads, and how
    /// full the maps are.
    fn dump(&self) -> serde_json::Value {
        let m = &self.mesh;
        let named = |kind: &str, ns: &str, name: &str| format!("{kind} {ns}/{name}");
        let resources: Vec<String> = m
            .service_entries
            .iter()
            .map(|e| named("ServiceEntry", &e.namespace, &e.name))
            .chain(
                m.virtual_services
                    .iter()
                    .map(|r| named("VirtualService", &r.namespace, &r.name)),
            )
            .chain(
                m.destination_rules
                    .iter()
                    .map(|r| named("DestinationRule", &r.namespace, &r.name)),
            )
            .chain(
                m.sidecars
                    .iter()
                    .map(|r| named("Sidecar", &r.namespace, &r.name)),
            )
            .chain(
                m.services
                    .iter()
                    .map(|r| named("Service", &r.namespace, &r.name)),
            )
            .collect();
        let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let maps: Vec<serde_json::Value> = s
            .maps
            .iter()
            .map(|(map, entries, capacity)| {
                serde_json::json!({"map": map, "entries": entries, "capacity": capacity})
            })
            .collect();
        serde_json::json!({
            "config": s.config.as_ref().map(|p| p.display().to_string()),
            "generation": s.generation,
            "mode": crate::plan::mode_name(self.applied.policies.default.mode),
            "failure_mode": self.mesh.failure_mode.name(),
            "raw_sockets": crate::config::RawSockets::name(self.mesh.raw_sockets),
            "dns": {
                "capture": self.mesh.dns_capture.name(),
                "learn_from": self.mesh.dns_learn_from.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            },
            "allocated": self
                .mesh
                .service_entries
                .iter()
                .filter(|se| !se.allocated.is_empty())
                .map(|se| (format!("ServiceEntry {}/{}", se.namespace, se.name), &se.allocated))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "views": self.applied.policies.views(),
            "resources": resources,
            "maps": maps,
            "last_rejected": s.last_error,
            "reload_failures": s.failures,
            "workloads": self.workloads.dump(),
        })
    }

    /// One step of a diff: map entries, or pointing the workloads at new policies.
    fn apply(&mut self, op: &Op) -> Result<()> {
        match op {
            Op::Policies(p) => self.workloads.repoint(&mut self.maps, p),
            op => self.maps.apply(op),
        }
    }

    fn reject(&self, message: String) -> Outcome {
        let generation = self.status.lock().map_or(0, |s| s.generation);
        error!("configuration rejected, generation {generation} stays in force:\n{message}");
        if let Ok(mut s) = self.status.lock() {
            s.last_error = Some(message.clone());
            s.failures += 1;
        }
        Err(message)
    }

    fn reload(&mut self, why: &str) -> Outcome {
        let loading = Instant::now();
        let Some(path) = self.path.clone() else {
            return Ok("no --config: the built-in default stays in force".to_owned());
        };
        let mesh = match config::load(&path) {
            Ok(l) => {
                for w in &l.warnings {
                    warn!("{w}");
                }
                l.config
            }
            Err(e) => {
                for w in &e.warnings {
                    warn!("{w}");
                }
                return self.reject(e.to_string());
            }
        };
        let mut mesh = mesh;
        let mut alloc = self.alloc.clone();
        if let Err(e) = alloc.assign(&mut mesh) {
            return self.reject(format!("{}: {e:#}", path.display()));
        }
        let plan = compile(&mesh);
        if let Err(e) = check_capacity(&plan, &self.cap) {
            return self.reject(format!("{}: {e}", path.display()));
        }
        let reg = match Registry::compile(&mesh) {
            Ok(r) => r,
            Err(e) => return self.reject(format!("{}: {e:#}", path.display())),
        };
        let ops = diff(&self.applied, &plan);
        let loaded = loading.elapsed();
        if ops.is_empty() && mesh == self.mesh {
            debug!("reload ({why}): configuration unchanged");
            if let Ok(mut s) = self.status.lock() {
                s.last_error = None;
            }
            return Ok("unchanged".to_owned());
        }
        let start = Instant::now();
        for (i, op) in ops.iter().enumerate() {
            if let Err(e) = self.apply(op) {
                // Put the maps back as they were; the configuration in force stays.
                let mut live = self.applied.clone();
                for done in &ops[..i] {
                    live.apply(done);
                }
                for undo in diff(&live, &self.applied) {
                    if let Err(e) = self.apply(&undo) {
                        error!("restoring the previous configuration: {e:#}");
                    }
                }
                return self.reject(format!("{}: {e:#}", path.display()));
            }
        }
        if (mesh.failure_mode, mesh.raw_sockets) != (self.mesh.failure_mode, self.mesh.raw_sockets)
            && let Err(e) = self.maps.set_mesh_settings(&mesh)
        {
            error!(
                "writing failureMode {} and rawSockets {}: {e:#}",
                mesh.failure_mode.name(),
                crate::config::RawSockets::name(mesh.raw_sockets)
            );
        }
        if mesh.dns_capture != self.mesh.dns_capture
            && let Err(e) = self.maps.set_dns_capture(mesh.dns_capture)
        {
            error!("writing dns.capture {}: {e:#}", mesh.dns_capture.name());
        }
        self.applied = plan;
        self.mesh = mesh;
        self.alloc = alloc;
        if let Err(e) = self.alloc.save() {
            warn!("keeping the address allocations: {e:#}");
        }
        registry::store(&self.registry, reg);
        if let Some(hook) = &self.applied_hook {
            hook(&self.mesh);
        }
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.generation += 1;
        s.summary = summary(&self.applied);
        s.maps = fill(&self.applied, &self.cap);
        s.last_error = None;
        let line = format!(
            "applied configuration generation {} (loaded and compared in {loaded:.1?}; {} changes applied in {:.1?}; {why}): {}",
            s.generation,
            ops.len(),
            start.elapsed(),
            s.summary
        );
        info!("{line}");
        Ok(line)
    }
}

/// Watch where the configuration lives (the directory, or a file's directory: editors and
/// ConfigMap volumes replace files by renaming) and report changes that concern it.
pub fn watch(path: &Path, tx: Sender<Msg>) -> Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher as _};
    let (dir, file) = if path.is_dir() {
        (path.to_path_buf(), None)
    } else {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (dir, path.file_name().map(|f| f.to_owned()))
    };
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else {
            return;
        };
        if !ev.kind.is_access() && ev.paths.iter().any(|p| concerns(p, file.as_deref())) {
            let _ = tx.send(Msg::Changed);
        }
    })?;
    w.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(w)
}

/// Whether a change to `p` can change the configuration: the file itself (or, for a
/// directory, a YAML file in it), or a Kubernetes ConfigMap volume's `..data` swap. Other files
/// beside it, the agent's own log for one, must not cause reloads.
fn concerns(p: &Path, file: Option<&std::ffi::OsStr>) -> bool {
    let Some(name) = p.file_name() else {
        return false;
    };
    if name.to_string_lossy().starts_with("..") {
        return true;
    }
    match file {
        Some(f) => name == f,
        None => config::is_yaml(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_to_the_configuration_cause_reloads() {
        let f = Some(std::ffi::OsStr::new("mesh.yaml"));
        assert!(concerns(Path::new("/etc/egress/mesh.yaml"), f));
        assert!(!concerns(Path::new("/etc/egress/agent.log"), f));
        assert!(!concerns(Path::new("/etc/egress/other.yaml"), f));
        assert!(concerns(Path::new("/etc/egress/..data"), f));
        assert!(concerns(Path::new("/etc/egress/a.yml"), None));
        assert!(!concerns(Path::new("/etc/egress/.a.yaml.swp"), None));
    }
}
