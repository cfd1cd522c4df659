//! Prometheus metrics (`--metrics-port`, default 15020: `/metrics` and `/stats/prometheus`).
//!
//! Istio's standard metrics, with its names and labels so that existing dashboards work, are
//! taken from the access records (`observe`) as they are written: a request record feeds the
//! `istio_request*` family, a stream's record (TCP, TLS, passthrough, a direct connection from
//! the kernel) the `istio_tcp*` family. `destination_service` is the ServiceEntry host that
//! matched, `BlackHoleCluster` for what was denied and `PassthroughCluster` for what no entry
//! declares and `ALLOW_ANY` let through, as Istio labels them. Every label value comes from the
//! configuration, the enrolled workloads or a small fixed set, so the number of series stays
//! bounded whatever the traffic.
//!
//! egress's own come from the agent's state at each scrape (`Collector`): connects per reason
//! from the kernel's counters, enrolled workloads, the configuration generation and reload
//! failures, dropped access-log records, and the configured maps' fill levels.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::telemetry::accesslog::Record;

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's buckets for `istio_request_bytes` and `istio_response_bytes`.
const SIZE_BUCKETS: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

/// What Istio labels a denied destination and one no entry declares.
pub const BLACK_HOLE: &str = "BlackHoleCluster";
pub const PASSTHROUGH: &str = "PassthroughCluster";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    destination_service: String,
    request_protocol: &'static str,
    response_code: u16,
    response_flags: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    destination_service: String,
    request_protocol: &'static str,
    response_flags: &'static str,
}

/// The agent's state as a scrape reads it.
pub trait State: Send + Sync + 'static {
    /// Connects per reason code since the maps were made, from the kernel's counters.
    fn connects(&self) -> Vec<(&'static str, &'static str, u64)>;
    fn workloads(&self) -> u64;
    fn generation(&self) -> u64;
    fn reload_failures(&self) -> u64;
    fn log_dropped(&self) -> u64;
    /// What the workloads learnt from DNS answers (`dns::Learner`).
    fn dns_learned(&self) -> crate::dns::learn::Counts;
    /// (map, entries, capacity) of the maps the configuration fills.
    fn maps(&self) -> Vec<(&'static str, u64, u64)>;
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    response_bytes: Family<RequestLabels, Histogram>,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    /// The agent's state, once it has started: egress's own metrics read it at each scrape.
    state: Arc<OnceLock<Arc<dyn State>>>,
    /// The label sets of each workload's series, so that they go when it is released: pods
    /// come and go on a node, and their series must not pile up.
    series: Mutex<HashMap<String, Series>>,
}

#[derive(Default)]
struct Series {
    requests: HashSet<RequestLabels>,
    streams: HashSet<TcpLabels>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            request_bytes: Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS)),
            response_bytes: Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS)),
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            state: Arc::default(),
            series: Mutex::default(),
        };
        let mut m = m;
        let r = &mut m.registry;
        r.register(
            "istio_requests",
            "Requests mediated by the agent",
            m.requests.clone(),
        );
        r.register(
            "istio_request_duration_milliseconds",
            "Request duration until the end of the response",
            m.duration.clone(),
        );
        r.register(
            "istio_request_bytes",
            "Request body size",
            m.request_bytes.clone(),
        );
        r.register(
            "istio_response_bytes",
            "Response body size",
            m.response_bytes.clone(),
        );
        r.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        r.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        r.register(
            "istio_tcp_sent_bytes",
            "Bytes sent towards the destination over TCP connections",
            m.sent.clone(),
        );
        r.register(
            "istio_tcp_received_bytes",
            "Bytes received from the destination over TCP connections",
            m.received.clone(),
        );
        r.register_collector(Box::new(Own(m.state.clone())));
        m
    }
}

impl Metrics {
    /// Where egress's own metrics come from, from now on.
    pub fn attach(&self, state: Arc<dyn State>) {
        let _ = self.state.set(state);
    }

    /// A stream connected upstream (or, for a direct connection, recorded at its close).
    pub fn opened(&self, r: &Record) {
        let labels = tcp_labels(r);
        self.opened.get_or_create(&labels).inc();
        self.remember(r, |s| s.streams.insert(labels));
    }

    /// Remove the series of a released workload (`NAMESPACE/NAME`).
    pub fn forget(&self, workload: &str) {
        let gone = self.series().remove(workload);
        let Some(gone) = gone else { return };
        for l in &gone.requests {
            self.requests.remove(l);
            self.duration.remove(l);
            self.request_bytes.remove(l);
            self.response_bytes.remove(l);
        }
        for l in &gone.streams {
            self.opened.remove(l);
            self.closed.remove(l);
            self.sent.remove(l);
            self.received.remove(l);
        }
    }

    fn series(&self) -> std::sync::MutexGuard<'_, HashMap<String, Series>> {
        self.series.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Note a label set of the record's workload (records of no workload have none to forget).
    fn remember(&self, r: &Record, add: impl FnOnce(&mut Series) -> bool) {
        if let Some(w) = r.workload.as_deref() {
            let mut series = self.series();
            match series.get_mut(w) {
                Some(s) => {
                    add(s);
                }
                None => {
                    let mut s = Series::default();
                    add(&mut s);
                    series.insert(w.to_owned(), s);
                }
            }
        }
    }

    /// An access record as it is written.
    pub fn observe(&self, r: &Record) {
        match r.kind {
            "request" => {
                let labels = request_labels(r);
                self.requests.get_or_create(&labels).inc();
                self.duration
                    .get_or_create(&labels)
                    .observe(r.duration_ms as f64);
                self.request_bytes
                    .get_or_create(&labels)
                    .observe(r.bytes_up as f64);
                self.response_bytes
                    .get_or_create(&labels)
                    .observe(r.bytes_down as f64);
                self.remember(r, |s| s.requests.insert(labels));
            }
            // An HTTP connection's requests have records of their own.
            "connection" if r.protocol != "http" => {
                let labels = tcp_labels(r);
                if !r.opened_counted {
                    self.opened.get_or_create(&labels).inc();
                }
                self.closed.get_or_create(&labels).inc();
                self.sent.get_or_create(&labels).inc_by(r.bytes_up);
                self.received.get_or_create(&labels).inc_by(r.bytes_down);
                self.remember(r, |s| s.streams.insert(labels));
            }
            _ => {}
        }
    }

    /// The page: Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a metric that cannot be encoded would be a bug.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            log::warn!("encoding the metrics: {e}");
        }
        out
    }
}

fn request_labels(r: &Record) -> RequestLabels {
    let (ns, name) = workload(r);
    RequestLabels {
        reporter: "source",
        source_workload: name.to_owned(),
        source_workload_namespace: ns.to_owned(),
        destination_service: service(r).to_owned(),
        request_protocol: "http",
        response_code: r.status.unwrap_or(0),
        response_flags: flags(r),
    }
}

fn tcp_labels(r: &Record) -> TcpLabels {
    let (ns, name) = workload(r);
    TcpLabels {
        reporter: "source",
        source_workload: name.to_owned(),
        source_workload_namespace: ns.to_owned(),
        destination_service: service(r).to_owned(),
        request_protocol: "tcp",
        response_flags: flags(r),
    }
}

/// (namespace, name) of the record's workload.
fn workload(r: &Record) -> (&str, &str) {
    r.workload
        .as_deref()
        .and_then(|w| w.split_once('/'))
        .unwrap_or(("unknown", "unknown"))
}

fn service(r: &Record) -> &str {
    if r.verdict == "deny" {
        BLACK_HOLE
    } else {
        r.service.as_deref().unwrap_or(PASSTHROUGH)
    }
}

/// Envoy's response flags for what went wrong: `UF` upstream connection failure, `UT` upstream
/// request timeout, `UC` upstream connection termination, `-` otherwise (a denial is Istio's
/// direct 502 response or a refused stream, which it flags `-` too).
fn flags(r: &Record) -> &'static str {
    match r.result {
        "connect-failed" => "UF",
        "timeout" => "UT",
        "reset" | "error" => "UC",
        _ => "-",
    }
}

/// egress's own metrics, read from the agent's state at each scrape.
struct Own(Arc<OnceLock<Arc<dyn State>>>);

impl fmt::Debug for Own {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("egress state")
    }
}

impl Collector for Own {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(s) = self.0.get() else {
            return Ok(());
        };
        let mut m = enc.encode_descriptor(
            "egress_connects",
            "Connects decided by the kernel programs, by reason code",
            None,
            MetricType::Counter,
        )?;
        for (reason, verdict, n) in s.connects() {
            let labels = [("reason", reason), ("verdict", verdict)];
            ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
        }
        for (name, help, value) in [
            (
                "egress_workloads_enrolled",
                "Network namespaces enrolled",
                s.workloads(),
            ),
            (
                "egress_config_generation",
                "Generation of the configuration in force",
                s.generation(),
            ),
        ] {
            let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(m)?;
        }
        for (name, help, value) in [
            (
                "egress_config_reload_failures",
                "Configurations rejected on reload",
                s.reload_failures(),
            ),
            (
                "egress_access_log_dropped",
                "Access-log records dropped because the writer fell behind",
                s.log_dropped(),
            ),
        ] {
            let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(m)?;
        }
        let learned = s.dns_learned();
        let m = enc.encode_descriptor(
            "egress_dns_learned_entries",
            "(workload, address, port) entries learnt from DNS answers in the kernel",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(learned.entries as i64).encode(m)?;
        let m = enc.encode_descriptor(
            "egress_dns_learned_expired",
            "Learnt entries that ran out (TTL and grace)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(learned.expired).encode(m)?;
        let mut m = enc.encode_descriptor(
            "egress_dns_learned_dropped",
            "Learnt addresses dropped for a cap: a host's addresses, an address's hosts",
            None,
            MetricType::Counter,
        )?;
        for (cap, n) in [
            ("per-host", learned.host_cap),
            ("per-address", learned.address_cap),
        ] {
            ConstCounter::new(n).encode(m.encode_family(&[("cap", cap)])?)?;
        }
        let maps = s.maps();
        let mut m = enc.encode_descriptor(
            "egress_map_entries",
            "Entries of each map the configuration fills",
            None,
            MetricType::Gauge,
        )?;
        for (map, entries, _) in &maps {
            ConstGauge::new(*entries as i64).encode(m.encode_family(&[("map", *map)])?)?;
        }
        let mut m = enc.encode_descriptor(
            "egress_map_capacity",
            "Capacity of each map the configuration fills",
            None,
            MetricType::Gauge,
        )?;
        for (map, _, capacity) in &maps {
            ConstGauge::new(*capacity as i64).encode(m.encode_family(&[("map", *map)])?)?;
        }
        Ok(())
    }
}

/// Serve the page on `listener` until the agent stops.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            use crate::telemetry::admin::{read_request, respond};
            let Ok(Some((method, path, _))) = read_request(&mut sock).await else {
                return;
            };
            let _ = match (method.as_str(), path.as_str()) {
                ("GET", "/metrics" | "/stats/prometheus") => {
                    respond(&mut sock, 200, &metrics.render()).await
                }
                ("GET", _) => respond(&mut sock, 404, "/metrics or /stats/prometheus\n").await,
                _ => respond(&mut sock, 405, "GET only\n").await,
            };
        });
    }
}
