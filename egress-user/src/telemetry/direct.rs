//! Direct connections: TCP ServiceEntry destinations that the kernel lets go straight out
//! (`Verdict::Direct`) and accounts for itself. Each one's close comes up the `DIRECT_CLOSED`
//! ring; this turns it into the same access-log record a relayed connection gets.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use egress_common::{
    DirectClosed, MAP_DIRECT_CLOSED, MAP_DIRECT_LOST, TCP_CLOSING, TCP_FIN_WAIT2, TCP_LAST_ACK,
    TCP_SYN_SENT,
};
use log::warn;
use tokio::io::unix::AsyncFd;

use crate::{
    datapath::{monotonic_ns, orig_addr_of},
    registry,
    telemetry::accesslog::{self, Conn, Record},
    workloads::{self, Workload},
};

/// The kernel's reports of closed direct connections.
pub struct Closes {
    ring: AsyncFd<RingBuf<MapData>>,
    lost: PerCpuArray<MapData, u64>,
}

impl Closes {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let ring: RingBuf<MapData> = crate::datapath::open(pin_dir, MAP_DIRECT_CLOSED)?;
        // SAFETY: the ring owns the map's descriptor and is dropped with the `AsyncFd`, never
        // closed or replaced while registered.
        let ring = unsafe { AsyncFd::register(ring) }.context("polling the DIRECT_CLOSED ring")?;
        Ok(Closes {
            ring,
            lost: crate::datapath::open(pin_dir, MAP_DIRECT_LOST)?,
        })
    }

    /// Log every close, for as long as the agent runs: when the kernel wakes the agent (a
    /// batch has piled up) and every `DRAIN_EVERY` for the rest. Records are made only when
    /// they are written; the ring is drained either way.
    pub async fn serve(
        mut self,
        log: accesslog::Log,
        registry: registry::Shared,
        cgroups: accesslog::CgroupNames,
        workloads: workloads::Table,
    ) {
        let mut lost_seen = 0;
        let mut tick = tokio::time::interval(DRAIN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ready = self.ring.readable_mut() => match ready {
                    // Cleared before draining: a wakeup for records after this drain is kept.
                    Ok(mut guard) => guard.clear_ready(),
                    Err(e) => {
                        warn!("direct connections: polling the ring failed, no more records: {e}");
                        return;
                    }
                },
                _ = tick.tick() => {}
            }
            let reg = registry::load(&registry);
            let ring = self.ring.get_mut();
            let mut drained = 0;
            while let Some(item) = ring.next() {
                drained += 1;
                if log.format == accesslog::Format::Off {
                    continue;
                }
                let Some(closed) = parse(&item) else {
                    continue;
                };
                let wl = workloads
                    .read()
                    .ok()
                    .and_then(|t| t.get(&closed.open.conn.netns).cloned());
                log.write(&record(&closed, wl, &reg, &cgroups));
            }
            // Closes are lost only when the ring is full: an idle tick has nothing to check.
            if drained == 0 {
                continue;
            }
            let lost: u64 = self
                .lost
                .get(&0, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            if lost > lost_seen {
                warn!(
                    "direct connections: {} closes found the ring full and were not logged \
                     ({lost} since start)",
                    lost - lost_seen
                );
                lost_seen = lost;
            }
        }
    }
}

/// How long a closed direct connection's record may wait in the ring for a batch.
const DRAIN_EVERY: Duration = Duration::from_millis(100);

fn parse(bytes: &[u8]) -> Option<DirectClosed> {
    if bytes.len() < size_of::<DirectClosed>() {
        return None;
    }
    // SAFETY: the kernel wrote a whole `DirectClosed` (plain data, every bit pattern valid);
    // the ring's records are 8-byte aligned but read unaligned anyway.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DirectClosed>()) })
}

/// The access-log record of a closed direct connection. The workload connected itself, so
/// there is no upstream of the agent's; the matching entry is looked up in the registry in
/// force now, as the workload (`None`: released since) sees it.
fn record(
    c: &DirectClosed,
    wl: Option<Arc<Workload>>,
    reg: &registry::Registry,
    cgroups: &accesslog::CgroupNames,
) -> Record {
    let opened = &c.open.conn;
    let peer = orig_addr_of(&c.local.addr, c.local.port);
    let wl = wl.unwrap_or_else(|| Arc::new(Workload::released(opened.netns)));
    let view = reg.view(&wl.namespace);
    let mut conn = Conn::recorded(wl, peer, opened, cgroups.name(opened.cgroup_id, opened.pid));
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(opened.created_ns));
    conn.time = SystemTime::now().checked_sub(age).unwrap_or(conn.time);
    let mut rec = conn.record("connection", "tcp");
    let m = view.by_address(conn.dst);
    rec.matched = m.map(|m| m.entry.id.clone());
    rec.service = m.map(|m| m.entry.service(None).to_owned());
    (rec.bytes_up, rec.bytes_down) = c.payload();
    rec.duration_ms = c.closed_ns.saturating_sub(opened.created_ns) / 1_000_000;
    // Both FINs through: closed. Never connected: refused or timed out. Otherwise a reset
    // (sent or received) ended it.
    rec.result = match c.old_state {
        TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK => "ok",
        TCP_SYN_SENT => "connect-failed",
        _ => "reset",
    };
    *rec
}
