//! The agent's view of the mesh registry for redirected streams: which ServiceEntry a
//! destination, HTTP Host or TLS SNI belongs to, with which protocol, where the connection then
//! goes (resolution), and what VirtualServices (timeouts, retries, routes) and
//! DestinationRules (TLS origination) say about it. Built from a `MeshConfig` on every load
//! and swapped whole, so a connection always sees one consistent generation.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use ipnet::IpNet;

use crate::{
    config::{
        MeshConfig, Mode, ServiceEntry,
        istio::{self, ClientTls, HttpRoute},
    },
    plan::Policies,
    sniff::host_matches,
};

/// How the agent mediates a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// HTTP, HTTP2, GRPC, GRPC-Web, HTTP_PROXY: requests are parsed and matched by Host.
    Http,
    /// HTTPS, TLS: matched by the ClientHello's SNI, never decrypted.
    Tls,
    /// TCP, MONGO, Redis, MySQL (and ports without a protocol): matched by address.
    Tcp,
}

impl Proto {
    /// A ServiceEntry port's protocol, or Istio's inference from the port name (`http-web`).
    fn of(protocol: Option<&str>, name: Option<&str>) -> Proto {
        let p = match protocol {
            Some(p) => p.to_ascii_uppercase(),
            None => {
                let n = name.unwrap_or("");
                n.split('-').next().unwrap_or("").to_ascii_uppercase()
            }
        };
        match p.as_str() {
            "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" | "HTTP_PROXY" => Proto::Http,
            "HTTPS" | "TLS" => Proto::Tls,
            _ => Proto::Tcp,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolution {
    /// To the address the client dialled.
    None,
    /// To the entry's endpoints.
    Static,
    /// To the host name (or the endpoints' names), resolved by the agent.
    Dns,
}

#[derive(Debug)]
pub struct Port {
    pub number: u16,
    pub name: String,
    pub proto: Proto,
    target: Option<u16>,
}

#[derive(Debug)]
struct EntryEndpoint {
    address: String,
    ports: Vec<(String, u16)>,
}

/// One ServiceEntry.
#[derive(Debug)]
pub struct Entry {
    /// `ServiceEntry namespace/name`, as access logs name it.
    pub id: String,
    hosts: Vec<String>,
    addresses: Vec<IpNet>,
    /// Addresses allocated to it (`config::alloc`): connections to them are its own.
    allocated: Vec<IpAddr>,
    ports: Vec<Port>,
    resolution: Resolution,
    endpoints: Vec<EntryEndpoint>,
    /// The views (`plan::views`) that see this entry, sorted.
    views: Vec<u16>,
}

/// Where a matched connection or request goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Addr(SocketAddr),
    /// A name for the agent to resolve, and the port.
    Name(String, u16),
}

impl Entry {
    fn seen_by(&self, view: u16) -> bool {
        self.views.binary_search(&view).is_ok()
    }

    /// The host this entry is known by for `host` (a Host or SNI it matched): the pattern that
    /// matched it, else the entry's first host. Istio's `destination_service`.
    pub fn service(&self, host: Option<&str>) -> &str {
        host.and_then(|h| self.hosts.iter().find(|p| host_matches(p, h)))
            .or_else(|| self.hosts.first())
            .map_or("", String::as_str)
    }

    fn port(&self, number: u16) -> Option<&Port> {
        self.ports.iter().find(|p| p.number == number)
    }

    /// The upstream for a connection to `port` of this entry, for `host` (what the client asked
    /// for: Host or SNI, or the entry's first host) that the client dialled at `dialled`.
    pub fn target(&self, port: &Port, host: Option<&str>, dialled: SocketAddr) -> Option<Target> {
        let to_port = port.target.unwrap_or(port.number);
        let endpoint_port = |e: &EntryEndpoint| {
            e.ports
                .iter()
                .find(|(n, _)| *n == port.name)
                .map_or(to_port, |(_, p)| *p)
        };
        let pick = || {
            let e = &self.endpoints[fastrand_index(self.endpoints.len())];
            (e.address.clone(), endpoint_port(e))
        };
        match self.resolution {
            Resolution::None => Some(Target::Addr(SocketAddr::new(dialled.ip(), to_port))),
            // Endpoints: addresses, or names to resolve.
            Resolution::Static | Resolution::Dns if !self.endpoints.is_empty() => {
                let (a, p) = pick();
                Some(match a.parse::<IpAddr>() {
                    Ok(ip) => Target::Addr(SocketAddr::new(ip, p)),
                    Err(_) => Target::Name(a, p),
                })
            }
            Resolution::Static => None,
            Resolution::Dns => {
                let name = match host {
                    Some(h) if self.hosts.iter().any(|p| host_matches(p, h)) => h,
                    _ => self.hosts.iter().find(|h| !h.contains('*'))?,
                };
                Some(Target::Name(name.to_owned(), to_port))
            }
        }
    }
}

/// A small, good-enough random index (endpoint choice needs no cryptographic quality).
fn fastrand_index(n: usize) -> usize {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(n);
    (h.finish() as usize) % n.max(1)
}

/// A ServiceEntry and the port of it that matched.
#[derive(Clone, Copy, Debug)]
pub struct Match<'a> {
    pub entry: &'a Entry,
    pub port: &'a Port,
}

/// What a VirtualService route says about one request.
#[derive(Clone, Debug, Default)]
pub struct Route {
    /// `VirtualService namespace/name`, when one applied.
    pub id: Option<String>,
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    /// A destination other than the requested host: host and port.
    pub destination: Option<(String, Option<u16>)>,
}

/// Istio's retry policy for a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on_connect_failure: bool,
    /// Retry on a reset or a connection closed before a response.
    pub on_reset: bool,
    /// 5xx: every 5xx; gateway-error: 502, 503, 504; plus listed codes.
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub on_codes: Vec<u16>,
}

impl Default for RetryPolicy {
    /// Istio's default for HTTP routes without `retries`: 2 retries on connect-failure,
    /// refused-stream, unavailable, cancelled and retriable-status-codes (503).
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            on_connect_failure: true,
            on_reset: false,
            on_5xx: false,
            on_gateway_error: false,
            on_codes: vec![503],
        }
    }
}

impl RetryPolicy {
    fn from_istio(r: &istio::Retries) -> RetryPolicy {
        // As Istio: retries without `attempts` are none.
        let attempts = r.attempts.unwrap_or(0).max(0) as u32;
        let mut p = RetryPolicy {
            attempts,
            per_try_timeout: r.per_try_timeout.as_deref().and_then(istio::parse_duration),
            on_connect_failure: false,
            on_reset: false,
            on_5xx: false,
            on_gateway_error: false,
            on_codes: Vec::new(),
        };
        let on = r.retry_on.as_deref().unwrap_or(
            // Istio's default retryOn.
            "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        );
        for cond in on.split(',').map(str::trim) {
            match cond {
                "connect-failure" => p.on_connect_failure = true,
                "reset" | "refused-stream" => p.on_reset = true,
                "5xx" => p.on_5xx = true,
                "gateway-error" => p.on_gateway_error = true,
                "retriable-status-codes" => p.on_codes.push(503),
                c => {
                    if let Ok(code) = c.parse::<u16>() {
                        p.on_codes.push(code);
                    }
                }
            }
        }
        p
    }

    /// Whether a response with `status` is retried.
    pub fn retries_status(&self, status: u16) -> bool {
        (self.on_5xx && status >= 500)
            || (self.on_gateway_error && matches!(status, 502..=504))
            || self.on_codes.contains(&status)
    }
}

/// TLS towards the upstream, from a DestinationRule with `tls.mode: SIMPLE`.
#[derive(Clone)]
pub struct Origination {
    /// `DestinationRule namespace/name`.
    pub id: String,
    pub sni: Option<String>,
    pub config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Origination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Origination({}, sni {:?})", self.id, self.sni)
    }
}

#[derive(Debug)]
struct VsRoute {
    id: String,
    hosts: Vec<String>,
    http: Vec<HttpRoute>,
}

#[derive(Debug)]
struct DrRule {
    host: String,
    /// `None`: every port.
    port: Option<u16>,
    origination: Origination,
}

/// The registry in force.
#[derive(Debug)]
pub struct Registry {
    /// Each namespace's view and mode.
    pub policies: Policies,
    entries: Vec<Entry>,
    routes: Vec<VsRoute>,
    rules: Vec<DrRule>,
    /// The endpoints of the Kubernetes Services translated in the kernel, by address: the
    /// Service's name as `NAME.NAMESPACE.svc.cluster.local`.
    service_endpoints: HashMap<IpAddr, String>,
}

/// The registry shared by connection tasks and the reloader.
pub type Shared = Arc<RwLock<Arc<Registry>>>;

pub fn load(shared: &Shared) -> Arc<Registry> {
    shared
        .read()
        .map_or_else(|p| p.into_inner().clone(), |r| r.clone())
}

pub fn store(shared: &Shared, r: Registry) {
    let mut g = shared.write().unwrap_or_else(|p| p.into_inner());
    *g = Arc::new(r);
}

impl Registry {
    /// Build from a configuration. Fails when a DestinationRule's CA file cannot be used.
    pub fn compile(c: &MeshConfig) -> Result<Registry> {
        let (views, view_of) = crate::plan::views(c);
        let mut entries: Vec<Entry> = c.service_entries.iter().map(entry).collect();
        for (view, seen) in views.iter().enumerate() {
            for i in seen {
                entries[*i].views.push(view as u16);
            }
        }
        // ExternalName Services: names every namespace sees (as Kubernetes Services are).
        let all_views: Vec<u16> = (0..views.len().max(1) as u16).collect();
        entries.extend(
            c.services
                .iter()
                .filter_map(|svc| external_name_entry(svc, &all_views)),
        );
        let routes = c
            .virtual_services
            .iter()
            .filter(|vs| !vs.spec.http.is_empty())
            .map(|vs| VsRoute {
                id: format!("VirtualService {}/{}", vs.namespace, vs.name),
                hosts: vs.spec.hosts.clone(),
                http: vs.spec.http.clone(),
            })
            .collect();
        let mut rules = Vec::new();
        for dr in &c.destination_rules {
            let id = format!("DestinationRule {}/{}", dr.namespace, dr.name);
            let Some(tp) = &dr.spec.traffic_policy else {
                continue;
            };
            let mut add = |port: Option<u16>, tls: &ClientTls, field: &str| -> Result<()> {
                if tls.mode.as_deref() != Some("SIMPLE") {
                    return Ok(());
                }
                let config = client_config(tls).with_context(|| format!("{id}: {field}"))?;
                rules.push(DrRule {
                    host: dr.spec.host.clone(),
                    port,
                    origination: Origination {
                        id: id.clone(),
                        sni: tls.sni.clone(),
                        config,
                    },
                });
                Ok(())
            };
            for (i, pl) in tp.port_level_settings.iter().enumerate() {
                if let (Some(p), Some(tls)) = (&pl.port, &pl.tls) {
                    let field = format!("spec.trafficPolicy.portLevelSettings[{i}].tls");
                    add(u16::try_from(p.number).ok(), tls, &field)?;
                }
            }
            if let Some(tls) = &tp.tls {
                add(None, tls, "spec.trafficPolicy.tls")?;
            }
        }
        let mut service_endpoints = HashMap::new();
        for svc in c.services.iter().filter(|s| s.translated()) {
            let name = format!("{}.{}.svc.cluster.local", svc.name, svc.namespace);
            let sets = c
                .endpoints
                .iter()
                .filter(|e| e.namespace == svc.namespace && e.service == svc.name);
            for a in sets.flat_map(|e| &e.addresses) {
                service_endpoints.entry(*a).or_insert_with(|| name.clone());
            }
        }
        Ok(Registry {
            policies: crate::plan::policies(c, &view_of),
            entries,
            routes,
            rules,
            service_endpoints,
        })
    }

    /// The Kubernetes Service an endpoint address belongs to (the kernel sends a connect to a
    /// cluster IP to one of its endpoints).
    pub fn kubernetes_service(&self, endpoint: IpAddr) -> Option<&str> {
        self.service_endpoints.get(&endpoint).map(String::as_str)
    }

    /// The registry as the workloads of a namespace see it.
    pub fn view(&self, namespace: &str) -> View<'_> {
        let p = self.policies.of(namespace);
        View {
            reg: self,
            view: p.view,
            mode: if p.mode == egress_common::MODE_REGISTRY_ONLY {
                Mode::RegistryOnly
            } else {
                Mode::AllowAny
            },
        }
    }

    /// The VirtualService route for a request.
    pub fn route(&self, host: &str, method: &str, path: &str) -> Route {
        for vs in &self.routes {
            if !vs.hosts.iter().any(|h| host_matches(h, host)) {
                continue;
            }
            let Some(r) = vs.http.iter().find(|r| route_matches(r, method, path)) else {
                continue;
            };
            let destination = r.route.first().map(|d| {
                (
                    d.destination.host.clone(),
                    d.destination
                        .port
                        .as_ref()
                        .and_then(|p| u16::try_from(p.number).ok()),
                )
            });
            return Route {
                id: Some(vs.id.clone()),
                timeout: r
                    .timeout
                    .as_deref()
                    .and_then(istio::parse_duration)
                    .filter(|d| !d.is_zero()),
                retry: r
                    .retries
                    .as_ref()
                    .map_or_else(RetryPolicy::default, RetryPolicy::from_istio),
                destination: destination.filter(|(h, _)| !h.eq_ignore_ascii_case(host)),
            };
        }
        Route::default()
    }

    /// TLS origination for `host` on the ServiceEntry port `port`: a port-level rule first.
    pub fn origination(&self, host: &str, port: u16) -> Option<&Origination> {
        let matching = |r: &&DrRule| host_matches(&r.host, host);
        self.rules
            .iter()
            .filter(matching)
            .find(|r| r.port == Some(port))
            .or_else(|| {
                self.rules
                    .iter()
                    .filter(matching)
                    .find(|r| r.port.is_none())
            })
            .map(|r| &r.origination)
    }
}

/// The registry as one namespace's workloads see it: the entries exported to them, their mode.
/// VirtualServices and DestinationRules apply to every namespace.
pub struct View<'a> {
    reg: &'a Registry,
    pub view: u16,
    pub mode: Mode,
}

impl<'a> View<'a> {
    pub fn kubernetes_service(&self, endpoint: IpAddr) -> Option<&'a str> {
        self.reg.kubernetes_service(endpoint)
    }

    fn entries(&self) -> impl Iterator<Item = &'a Entry> + use<'a> {
        let view = self.view;
        self.reg.entries.iter().filter(move |e| e.seen_by(view))
    }

    /// The VirtualService route for a request.
    pub fn route(&self, host: &str, method: &str, path: &str) -> Route {
        self.reg.route(host, method, path)
    }

    /// TLS origination for `host` on the ServiceEntry port `port`.
    pub fn origination(&self, host: &str, port: u16) -> Option<&'a Origination> {
        self.reg.origination(host, port)
    }

    /// The entry whose addresses hold `dst` and which declares its port.
    pub fn by_address(&self, dst: SocketAddr) -> Option<Match<'a>> {
        self.entries().find_map(|e| {
            let port = e.port(dst.port())?;
            (e.addresses.iter().any(|n| n.contains(&dst.ip())) || e.allocated.contains(&dst.ip()))
                .then_some(Match { entry: e, port })
        })
    }

    /// The entry (without addresses) that declares `host` on `port`.
    pub fn by_host(&self, host: &str, port: u16) -> Option<Match<'a>> {
        // Exact names win over wildcards, as in Envoy's virtual host selection.
        let mut wildcard = None;
        for e in self.entries().filter(|e| e.addresses.is_empty()) {
            let Some(p) = e.port(port) else { continue };
            for h in &e.hosts {
                if h.eq_ignore_ascii_case(host) {
                    return Some(Match { entry: e, port: p });
                }
                if wildcard.is_none() && host_matches(h, host) {
                    wildcard = Some(Match { entry: e, port: p });
                }
            }
        }
        wildcard
    }

    /// An entry without addresses that declares `port`: for TCP, where there is no name to
    /// match, such an entry admits every address on the port (as Istio's listener does).
    pub fn by_port(&self, port: u16) -> Option<Match<'a>> {
        self.entries()
            .filter(|e| e.addresses.is_empty())
            .find_map(|e| {
                Some(Match {
                    entry: e,
                    port: e.port(port)?,
                })
            })
    }

    /// How a connection to `dst` is mediated: by the entry that holds its address, else by the
    /// protocol entries without addresses declare for its port; `None` when no entry declares
    /// the port.
    pub fn protocol(&self, dst: SocketAddr) -> Option<Proto> {
        if let Some(m) = self.by_address(dst) {
            return Some(m.port.proto);
        }
        self.by_port(dst.port()).map(|m| m.port.proto)
    }

    /// The first entry that declares `host` (any port), for a VirtualService destination.
    pub fn by_name(&self, host: &str, port: u16) -> Option<Match<'a>> {
        self.by_host(host, port).or_else(|| {
            self.entries().find_map(|e| {
                let p = e.port(port).or_else(|| e.ports.first())?;
                e.hosts
                    .iter()
                    .any(|h| host_matches(h, host))
                    .then_some(Match { entry: e, port: p })
            })
        })
    }
}

/// A route's `match` conditions (any of them) on method and URI; no conditions match all.
fn route_matches(r: &HttpRoute, method: &str, path: &str) -> bool {
    use serde_yaml_ng::Value;
    if r.matches.is_empty() {
        return true;
    }
    let string_match = |v: &Value, s: &str| -> bool {
        if let Some(e) = v.get("exact").and_then(Value::as_str) {
            return s == e;
        }
        if let Some(p) = v.get("prefix").and_then(Value::as_str) {
            return s.starts_with(p);
        }
        false
    };
    r.matches.iter().any(|m| {
        let uri_ok = m
            .get("uri")
            .is_none_or(|v| string_match(v, path.split('?').next().unwrap_or(path)));
        let method_ok = m.get("method").is_none_or(|v| string_match(v, method));
        uri_ok && method_ok
    })
}

/// The ports of an entry with addresses whose connections the agent relays, unchanged, to
/// the address and port dialled: TCP (by address) with `resolution: NONE` and no target port.
/// The kernel lets those go straight out (`plan::direct`).
pub fn relayed_ports(se: &ServiceEntry) -> Vec<u16> {
    let e = entry(se);
    if e.addresses.is_empty() || e.resolution != Resolution::None {
        return Vec::new();
    }
    plain_tcp_ports(&e)
}

/// Whether a port's protocol is UDP (which Istio accepts in a ServiceEntry, and no proxy
/// relays).
pub fn is_udp(protocol: Option<&str>) -> bool {
    protocol.is_some_and(|p| p.eq_ignore_ascii_case("UDP"))
}

/// An entry's TCP ports without a target port of their own: what a client dials there is what
/// the agent would connect to. A port declared twice is matched by its first declaration, as
/// `Entry::port` does.
fn plain_tcp_ports(e: &Entry) -> Vec<u16> {
    e.ports
        .iter()
        .filter_map(|p| e.port(p.number))
        .filter(|p| p.proto == Proto::Tcp && p.target.is_none_or(|t| t == p.number))
        .map(|p| p.number)
        .collect()
}

/// The ports of an entry by host whose connections can go straight to the address the client
/// resolved: TCP, no target port, `resolution: DNS` (or `DNS_ROUND_ROBIN`), no `addresses`.
/// The agent would resolve the same host and connect to the same port; when it captures DNS,
/// the addresses each workload is answered for such a host open those ports for it in the
/// kernel (`dns::Learner`).
pub fn learned_ports(se: &ServiceEntry) -> Vec<u16> {
    if !se.addresses.is_empty() || se.spec.hosts.is_empty() {
        return Vec::new();
    }
    let e = entry(se);
    if e.resolution != Resolution::Dns {
        return Vec::new();
    }
    plain_tcp_ports(&e)
}

/// The names a Kubernetes Service answers to in a Host header or SNI: its cluster-domain
/// forms (the bare name depends on the client's namespace, and is not one of them).
pub fn service_names(namespace: &str, name: &str) -> [String; 3] {
    [
        format!("{name}.{namespace}.svc.cluster.local"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}"),
    ]
}

/// An ExternalName Service as the registry sees it (as Istio registers one): its names on its
/// ports, the protocol by port name or `appProtocol`, resolved to its external name by the
/// agent, with the client's Host kept.
fn external_name_entry(svc: &crate::config::k8s::Service, views: &[u16]) -> Option<Entry> {
    let target = svc.spec.external_name.as_ref()?;
    if svc.spec.type_.as_deref() != Some("ExternalName") {
        return None;
    }
    Some(Entry {
        id: format!("Service {}/{}", svc.namespace, svc.name),
        hosts: service_names(&svc.namespace, &svc.name).into(),
        addresses: Vec::new(),
        allocated: Vec::new(),
        ports: svc
            .spec
            .ports
            .iter()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                Some(Port {
                    number: u16::try_from(p.port).ok()?,
                    name: p.name.clone().unwrap_or_default(),
                    proto: Proto::of(p.app_protocol.as_deref(), p.name.as_deref()),
                    target: None,
                })
            })
            .collect(),
        resolution: Resolution::Dns,
        views: views.to_vec(),
        endpoints: vec![EntryEndpoint {
            address: target.clone(),
            ports: Vec::new(),
        }],
    })
}

fn entry(se: &ServiceEntry) -> Entry {
    let s = &se.spec;
    let resolution = match s.resolution.as_deref() {
        Some("STATIC") => Resolution::Static,
        Some("DNS" | "DNS_ROUND_ROBIN") => Resolution::Dns,
        _ => Resolution::None,
    };
    Entry {
        id: format!("ServiceEntry {}/{}", se.namespace, se.name),
        hosts: s.hosts.clone(),
        addresses: se.addresses.clone(),
        allocated: se.allocated.clone(),
        // UDP ports are the kernel's alone (`plan::compile`, keys of `VIEW_UDP`): the agent
        // relays TCP.
        ports: s
            .ports
            .iter()
            .filter(|p| !is_udp(p.protocol.as_deref()))
            .filter_map(|p| {
                Some(Port {
                    number: u16::try_from(p.number).ok()?,
                    name: p.name.clone().unwrap_or_default(),
                    proto: Proto::of(p.protocol.as_deref(), p.name.as_deref()),
                    target: p.target_port.and_then(|t| u16::try_from(t).ok()),
                })
            })
            .collect(),
        resolution,
        views: Vec::new(),
        endpoints: s
            .endpoints
            .iter()
            .filter_map(|e| {
                Some(EntryEndpoint {
                    address: e.address.clone()?,
                    ports: e
                        .ports
                        .iter()
                        .filter_map(|(n, p)| Some((n.clone(), u16::try_from(*p).ok()?)))
                        .collect(),
                })
            })
            .collect(),
    }
}

/// A rustls client configuration for a DestinationRule's `tls` (mode SIMPLE): the CA file if
/// given, else the system's roots; `insecureSkipVerify` is refused rather than honoured.
fn client_config(tls: &ClientTls) -> Result<Arc<rustls::ClientConfig>> {
    let roots = match &tls.ca_certificates {
        Some(path) => crate::config::istio::ca_roots(path).context("caCertificates")?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
            roots
        }
    };
    if tls.insecure_skip_verify == Some(true) {
        bail!("insecureSkipVerify is not supported: give caCertificates instead");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;

    const MESH: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin-ext}
spec:
  hosts: [httpbin.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wiki}
spec:
  hosts: ["*.wikipedia.org"]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tcp}
spec:
  hosts: [tcp.example]
  addresses: [127.40.0.0/24]
  ports: [{number: 443, name: tcp, protocol: TCP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static}
spec:
  hosts: [static.example]
  ports: [{number: 80, name: http-web, targetPort: 8080}]
  resolution: STATIC
  endpoints: [{address: 127.41.0.1}, {address: 127.41.0.2, ports: {http-web: 9090}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin}
spec:
  hosts: [httpbin.org]
  http:
  - match: [{uri: {prefix: /delay}}]
    timeout: 3s
    route: [{destination: {host: httpbin.org}}]
  - retries: {attempts: 3, perTryTimeout: 1s, retryOn: "connect-failure,5xx"}
    route: [{destination: {host: httpbin.org}}]
"#;

    fn reg() -> Registry {
        Registry::compile(&parse_str("m.yaml", MESH).expect("valid").config).expect("compiles")
    }

    #[test]
    fn entries_by_address_host_and_port() {
        let reg = reg();
        let r = reg.view("default");
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(r.protocol(a("127.40.0.9:443")), Some(Proto::Tcp));
        assert_eq!(r.protocol(a("127.1.0.9:443")), Some(Proto::Tls));
        assert_eq!(r.protocol(a("127.1.0.9:80")), Some(Proto::Http));
        assert_eq!(r.protocol(a("127.1.0.9:81")), None);
        assert_eq!(
            r.by_address(a("127.40.0.9:443")).unwrap().entry.id,
            "ServiceEntry default/tcp"
        );
        assert_eq!(
            r.by_host("EN.wikipedia.org", 443).unwrap().entry.id,
            "ServiceEntry default/wiki"
        );
        assert!(r.by_host("wikipedia.org", 443).is_none());
        assert!(r.by_host("httpbin.org", 443).is_none());
        let m = r.by_host("httpbin.org", 80).unwrap();
        assert_eq!(
            m.entry
                .target(m.port, Some("httpbin.org"), a("127.1.0.9:80")),
            Some(Target::Name("httpbin.org".into(), 80))
        );
        let m = r.by_host("x.wikipedia.org", 443).unwrap();
        assert_eq!(
            m.entry
                .target(m.port, Some("x.wikipedia.org"), a("127.1.0.9:443")),
            Some(Target::Addr(a("127.1.0.9:443")))
        );
        let m = r.by_host("static.example", 80).unwrap();
        assert_eq!(m.port.proto, Proto::Http, "inferred from the port name");
        for _ in 0..20 {
            let t = m.entry.target(m.port, None, a("127.1.0.9:80")).unwrap();
            assert!(
                [
                    Target::Addr(a("127.41.0.1:8080")),
                    Target::Addr(a("127.41.0.2:9090"))
                ]
                .contains(&t),
                "{t:?}"
            );
        }
    }

    #[test]
    fn an_external_name_service_is_a_name_every_namespace_sees_resolved_to_its_target() {
        let text = format!(
            "{MESH}---\napiVersion: v1\nkind: Service\nmetadata: {{name: my-httpbin, namespace: default}}\n\
             spec: {{type: ExternalName, externalName: httpbin.org, ports: [{{name: http, port: 80}}]}}\n"
        );
        let reg = Registry::compile(&parse_str("m.yaml", &text).unwrap().config).unwrap();
        let dialled: SocketAddr = "198.18.0.9:80".parse().unwrap();
        for ns in ["default", "other"] {
            let v = reg.view(ns);
            for host in service_names("default", "my-httpbin") {
                let m = v
                    .by_host(&host, 80)
                    .unwrap_or_else(|| panic!("{host} from {ns}"));
                assert_eq!(m.entry.id, "Service default/my-httpbin");
                assert_eq!(m.port.proto, Proto::Http);
                assert_eq!(
                    m.entry.target(m.port, Some(&host), dialled),
                    Some(Target::Name("httpbin.org".into(), 80))
                );
            }
            assert!(
                v.by_host("my-httpbin.default.svc.cluster.local", 81)
                    .is_none()
            );
        }
    }

    #[test]
    fn virtual_service_routes() {
        let r = reg();
        let delay = r.route("httpbin.org", "GET", "/delay/5");
        assert_eq!(delay.timeout, Some(Duration::from_secs(3)));
        assert_eq!(delay.retry, RetryPolicy::default());
        let other = r.route("httpbin.org", "GET", "/status/503");
        assert_eq!(other.timeout, None);
        assert_eq!(other.retry.attempts, 3);
        assert_eq!(other.retry.per_try_timeout, Some(Duration::from_secs(1)));
        assert!(other.retry.on_connect_failure && other.retry.retries_status(500));
        assert!(!other.retry.retries_status(404));
        let none = r.route("other.example", "GET", "/");
        assert!(none.id.is_none() && none.retry.retries_status(503));
    }

    #[test]
    fn each_namespace_sees_the_entries_exported_to_it_and_its_sidecars_mode() {
        let text = r#"
apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: d}
spec: {outboundTrafficPolicy: {mode: ALLOW_ANY}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: b-only, namespace: team-b}
spec:
  hosts: [b.example]
  exportTo: ["."]
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shared, namespace: default}
spec:
  hosts: [shared.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: team-a}
spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
"#;
        let reg = Registry::compile(&parse_str("m.yaml", text).unwrap().config).unwrap();
        let (a, b, other) = (reg.view("team-a"), reg.view("team-b"), reg.view("x"));
        assert_eq!(a.mode, Mode::RegistryOnly);
        assert_eq!(b.mode, Mode::AllowAny);
        assert_eq!(other.mode, Mode::AllowAny);
        assert!(a.by_host("b.example", 80).is_none());
        assert!(other.by_host("b.example", 80).is_none());
        assert_eq!(
            b.by_host("b.example", 80).unwrap().entry.id,
            "ServiceEntry team-b/b-only"
        );
        for v in [&a, &b, &other] {
            assert!(v.by_host("shared.example", 80).is_some());
        }
    }

    #[test]
    fn a_ca_file_gone_when_the_registry_is_built_is_an_error_naming_it() {
        let ca = egress_tests::l7::TestCa::new("registry");
        let path = ca.path().to_owned();
        let text = format!(
            "{MESH}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: o}}\nspec:\n  host: httpbin.org\n  trafficPolicy:\n    \
             tls: {{mode: SIMPLE, caCertificates: {}}}\n",
            path.display()
        );
        let config = parse_str("m.yaml", &text).expect("valid").config;
        drop(ca);
        let e = Registry::compile(&config).unwrap_err();
        let m = format!("{e:#}");
        assert!(
            m.starts_with(&format!(
                "DestinationRule default/o: spec.trafficPolicy.tls: caCertificates: reading {}",
                path.display()
            )),
            "{m}"
        );
    }
}
