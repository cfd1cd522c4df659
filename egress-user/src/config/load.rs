//! Mesh configuration: the `EgressConfig` document and Istio `ServiceEntry` resources, read from
//! a file or a directory of multi-document YAML, exactly as written for kubectl.
//!
//! Every problem names the file, the document (1-based), the resource and the field path. Fields
//! and kinds that are parsed but not applied yet produce warnings, never silence.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, de::DeserializeOwned};
use serde_yaml_ng::Value;

use crate::config::{Mode, istio, k8s, rules};

/// Where a problem is: file, document and resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based index of the YAML document in the file.
    pub doc: usize,
    /// `Kind namespace/name`, once known.
    pub resource: Option<String>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} doc {}", self.file.display(), self.doc)?;
        if let Some(r) = &self.resource {
            write!(f, " {r}")?;
        }
        Ok(())
    }
}

/// One error or warning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub origin: Origin,
    /// Field path such as `spec.addresses[1]`; empty for the whole document.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(f, "{}: {}: {}", self.origin, self.field, self.message)
        }
    }
}

/// Addresses for ServiceEntry hosts that have none (`spec.autoAllocate`), as Istio's DNS proxy
/// allocates them: what DNS answers for such a host, and what the agent knows it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutoAllocate {
    pub enabled: bool,
    pub v4: ipnet::Ipv4Net,
    pub v6: ipnet::Ipv6Net,
}

impl Default for AutoAllocate {
    /// Istio's ranges: 240.240.0.0/16 and 2001:2::/48.
    fn default() -> Self {
        AutoAllocate {
            enabled: true,
            v4: "240.240.0.0/16".parse().expect("a valid range"),
            v6: "2001:2::/48".parse().expect("a valid range"),
        }
    }
}

/// The interception knobs, with Istio's names and meanings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interception {
    pub include_ranges: Vec<IpNet>,
    pub exclude_ranges: Vec<IpNet>,
    pub include_ports: Vec<u16>,
    pub exclude_ports: Vec<u16>,
    pub exclude_uids: Vec<u32>,
    pub exclude_gids: Vec<u32>,
}

impl Default for Interception {
    /// Istio's default: every destination is captured (`includeOutboundIPRanges: "*"`).
    fn default() -> Self {
        Interception {
            include_ranges: all_ranges(),
            exclude_ranges: Vec::new(),
            include_ports: Vec::new(),
            exclude_ports: Vec::new(),
            exclude_uids: Vec::new(),
            exclude_gids: Vec::new(),
        }
    }
}

fn all_ranges() -> Vec<IpNet> {
    vec![
        "0.0.0.0/0".parse().expect("literal"),
        "::/0".parse().expect("literal"),
    ]
}

/// A ServiceEntry port.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub number: u32,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// A ServiceEntry endpoint (a WorkloadEntry inline).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub service_account: Option<String>,
}

/// `networking.istio.io` ServiceEntry spec, as written for kubectl.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub workload_selector: Option<Value>,
}

/// A validated ServiceEntry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub namespace: String,
    pub name: String,
    pub spec: ServiceEntrySpec,
    /// `spec.addresses`, parsed (a bare IP is a /32 or /128).
    pub addresses: Vec<IpNet>,
    /// Addresses the agent allocated for an entry without `addresses` (`config::alloc`), one
    /// per family: what DNS answers for its hosts, and what the datapath knows it by.
    pub allocated: Vec<std::net::IpAddr>,
}

/// The whole configuration in force.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// The mesh-wide mode (Istio's `meshConfig.outboundTrafficPolicy`).
    pub mode: Mode,
    /// What would-be redirects do while no agent listens (`spec.failureMode`).
    pub failure_mode: super::FailureMode,
    /// Raw, ICMP and SCTP sockets of enrolled workloads (`spec.rawSockets`); `None`: refused
    /// under REGISTRY_ONLY.
    pub raw_sockets: Option<super::RawSockets>,
    /// Addresses for ServiceEntry hosts without any (`spec.autoAllocate`).
    pub auto_allocate: AutoAllocate,
    /// The namespace whose Sidecar sets the default for every other (Istio's
    /// `meshConfig.rootNamespace`); `None`: `istio-system`.
    pub root_namespace: Option<String>,
    pub interception: Interception,
    pub service_entries: Vec<ServiceEntry>,
    /// Kubernetes Services (selector-less ones are translated in the kernel).
    pub services: Vec<k8s::Service>,
    /// Ready endpoints, from Endpoints and EndpointSlices.
    pub endpoints: Vec<k8s::EndpointSet>,
    /// Istio resources the L7 datapath applies: validated, kept.
    pub sidecars: Vec<Named<istio::SidecarSpec>>,
    pub virtual_services: Vec<Named<istio::VirtualServiceSpec>>,
    pub destination_rules: Vec<Named<istio::DestinationRuleSpec>>,
    /// The nameservers whose answers teach workloads the addresses of TCP hosts
    /// (`spec.dns.learnFrom`); empty: every nameserver.
    pub dns_learn_from: Vec<IpNet>,
    /// Which DNS queries are captured (`spec.dns.capture`).
    pub dns_capture: super::DnsCapture,
    /// Set by the agent when it captures DNS (not read from the files): the addresses of TCP
    /// ServiceEntry hosts are then learnt from the answers each workload gets
    /// (`registry::learned_ports`), rather than allocated or let through on their ports.
    pub learn_from_dns: bool,
}

impl MeshConfig {
    /// The namespace whose Sidecar is the default for the others.
    pub fn root_namespace(&self) -> &str {
        self.root_namespace.as_deref().unwrap_or("istio-system")
    }
}

/// A resource's spec with its namespace and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named<T> {
    pub namespace: String,
    pub name: String,
    pub spec: T,
}

/// A configuration that parsed, with its warnings.
#[derive(Debug)]
pub struct Loaded {
    pub config: MeshConfig,
    pub warnings: Vec<Problem>,
}

/// A configuration that did not: every error found, and the warnings.
#[derive(Debug)]
pub struct Invalid {
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({} errors)", self.errors.len())?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Invalid {}

const ISTIO_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];
const EGRESS_VERSION: &str = "egress/v1alpha1";
/// Istio's protocols, as it spells them (any case is accepted).
const PROTOCOLS: [&str; 12] = [
    "HTTP",
    "HTTPS",
    "HTTP2",
    "GRPC",
    "GRPC-Web",
    "HTTP_PROXY",
    "TLS",
    "TCP",
    "MONGO",
    "Redis",
    "MySQL",
    "UDP",
];
const DNS_CAPTURES: [&str; 2] = ["ALL", "RESOLV_CONF"];
const RESOLUTIONS: [&str; 5] = ["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"];
/// The protocols Istio counts as HTTP (its `IsHTTP`).
const HTTP_PROTOCOLS: [&str; 5] = ["HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY"];
const LOCATIONS: [&str; 2] = ["MESH_EXTERNAL", "MESH_INTERNAL"];

/// The YAML files a `--config` path stands for: the file itself, or the `.yaml`/`.yml` files
/// of a directory in name order.
pub fn config_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    use anyhow::Context as _;
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).with_context(|| format!("{}", path.display()))? {
        let p = entry?.path();
        if is_yaml(&p) && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// A `.yaml` or `.yml` file name.
pub fn is_yaml(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

/// Load a file or directory. I/O failures are errors of the file they concern.
pub fn load(path: &Path) -> Result<Loaded, Invalid> {
    let files = config_files(path).map_err(|e| Invalid {
        errors: vec![Problem {
            origin: Origin {
                file: path.to_path_buf(),
                doc: 0,
                resource: None,
            },
            field: String::new(),
            message: format!("cannot read: {e:#}"),
        }],
        warnings: Vec::new(),
    })?;
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match std::fs::read_to_string(&f) {
            Ok(text) => sources.push((f, text)),
            Err(e) => errors.push(Problem {
                origin: Origin {
                    file: f,
                    doc: 0,
                    resource: None,
                },
                field: String::new(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    let mut parsed = parse_sources(&sources);
    errors.append(&mut parsed.errors);
    match parsed.config {
        Some(config) if errors.is_empty() => Ok(Loaded {
            config,
            warnings: parsed.warnings,
        }),
        _ => Err(Invalid {
            errors,
            warnings: parsed.warnings,
        }),
    }
}

struct Parsed {
    config: Option<MeshConfig>,
    errors: Vec<Problem>,
    warnings: Vec<Problem>,
}

/// Parse `(file name, text)` pairs into one configuration.
fn parse_sources(sources: &[(PathBuf, String)]) -> Parsed {
    let mut cx = Cx::default();
    let mut config = MeshConfig::default();
    let mut egress_seen: Option<Origin> = None;
    for (file, text) in sources {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let origin = Origin {
                file: file.clone(),
                doc: i + 1,
                resource: None,
            };
            let value = match Value::deserialize(doc) {
                Ok(v) => v,
                Err(e) => {
                    cx.error(&origin, "", format!("not valid YAML: {e}"));
                    // The YAML stream cannot be resumed after a syntax error.
                    break;
                }
            };
            if value.is_null() {
                continue;
            }
            cx.document(&origin, value, &mut config, &mut egress_seen);
        }
    }
    if let Some(origin) = &egress_seen {
        cx.exclusion_holes(origin, &config);
    }
    let Cx { errors, warnings } = cx;
    Parsed {
        config: errors.is_empty().then_some(config),
        errors,
        warnings,
    }
}

/// Parse YAML text as if it were one file named `name` (tests, and the loader's fuzz target).
pub fn parse_str(name: &str, text: &str) -> Result<Loaded, Invalid> {
    let parsed = parse_sources(&[(PathBuf::from(name), text.to_owned())]);
    match parsed.config {
        Some(config) => Ok(Loaded {
            config,
            warnings: parsed.warnings,
        }),
        None => Err(Invalid {
            errors: parsed.errors,
            warnings: parsed.warnings,
        }),
    }
}

#[derive(Default)]
struct Cx {
    errors: Vec<Problem>,
    warnings: Vec<Problem>,
}

#[derive(Deserialize)]
struct Meta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct EgressConfigSpec {
    #[serde(default)]
    outbound_traffic_policy: Option<PolicySpec>,
    #[serde(default)]
    root_namespace: Option<String>,
    #[serde(default)]
    interception: Option<InterceptionSpec>,
    #[serde(default)]
    failure_mode: Option<super::FailureMode>,
    #[serde(default)]
    raw_sockets: Option<super::RawSockets>,
    #[serde(default)]
    auto_allocate: Option<AutoAllocateSpec>,
    #[serde(default)]
    dns: Option<DnsSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DnsSpec {
    #[serde(default)]
    learn_from: Option<ListOrCsv>,
    #[serde(default)]
    capture: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AutoAllocateSpec {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    ipv4_range: Option<String>,
    #[serde(default)]
    ipv6_range: Option<String>,
}

#[derive(Deserialize)]
struct PolicySpec {
    #[serde(default)]
    mode: Mode,
}

/// A list, or Istio's annotation spelling: one comma-separated string.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum ListOrCsv {
    List(Vec<Value>),
    One(Value),
}

/// A YAML scalar as text; anything else is kept as its YAML for the error message.
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => {
            serde_yaml_ng::to_string(other).map_or_else(|_| "?".to_owned(), |s| s.trim().to_owned())
        }
    }
}

impl ListOrCsv {
    /// The items, each with its field path suffix (`[i]`, or nothing for a single string).
    fn items(&self) -> Vec<(String, String)> {
        match self {
            ListOrCsv::List(v) => v
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("[{i}]"), scalar(s)))
                .collect(),
            ListOrCsv::One(s) => scalar(s)
                .split(',')
                .map(|p| p.trim())
                .filter(|p| !p.is_empty())
                .map(|p| (String::new(), p.to_owned()))
                .collect(),
        }
    }
}

#[derive(Deserialize, Default)]
struct InterceptionSpec {
    #[serde(default, rename = "includeOutboundIPRanges")]
    include_ranges: Option<ListOrCsv>,
    #[serde(default, rename = "excludeOutboundIPRanges")]
    exclude_ranges: Option<ListOrCsv>,
    #[serde(default, rename = "includeOutboundPorts")]
    include_ports: Option<ListOrCsv>,
    #[serde(default, rename = "excludeOutboundPorts")]
    exclude_ports: Option<ListOrCsv>,
    #[serde(default, rename = "excludeUids")]
    exclude_uids: Option<ListOrCsv>,
    #[serde(default, rename = "excludeGids")]
    exclude_gids: Option<ListOrCsv>,
}

/// The interception knobs, as `spec.interception` names them.
const INTERCEPTION_FIELDS: [&str; 6] = [
    "includeOutboundIPRanges",
    "excludeOutboundIPRanges",
    "includeOutboundPorts",
    "excludeOutboundPorts",
    "excludeUids",
    "excludeGids",
];

/// Other spellings of the interception knobs, accepted for them: Istio's per-pod annotations,
/// and the older names of its injection settings (`global.proxy.includeIPRanges`).
const INTERCEPTION_ALIASES: [(&str, &str); 6] = [
    (
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        "includeOutboundIPRanges",
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "excludeOutboundIPRanges",
    ),
    (
        "traffic.sidecar.istio.io/includeOutboundPorts",
        "includeOutboundPorts",
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "excludeOutboundPorts",
    ),
    ("includeIPRanges", "includeOutboundIPRanges"),
    ("excludeIPRanges", "excludeOutboundIPRanges"),
];

impl Cx {
    fn error(&mut self, origin: &Origin, field: &str, message: impl Into<String>) {
        self.errors.push(Problem {
            origin: origin.clone(),
            field: field.to_owned(),
            message: message.into(),
        });
    }

    fn warn(&mut self, origin: &Origin, field: &str, message: impl Into<String>) {
        self.warnings.push(Problem {
            origin: origin.clone(),
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// Deserialize `value` (found at `field`) into `T`, warning about every unknown field.
    fn typed<T: DeserializeOwned>(
        &mut self,
        origin: &Origin,
        field: &str,
        value: Value,
    ) -> Option<T> {
        let mut unknown = Vec::new();
        let mut record = |p: serde_ignored::Path| unknown.push(field_path(&p));
        let de = serde_ignored::Deserializer::new(value, &mut record);
        let result: Result<T, _> = serde_path_to_error::deserialize(de);
        for u in unknown {
            self.warn(origin, &join(field, &u), "unknown field, ignored");
        }
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                let path = e.path().to_string();
                let path = if path == "." { String::new() } else { path };
                self.error(origin, &join(field, &path), e.into_inner().to_string());
                None
            }
        }
    }

    fn document(
        &mut self,
        origin: &Origin,
        value: Value,
        config: &mut MeshConfig,
        egress_seen: &mut Option<Origin>,
    ) {
        let Value::Mapping(mut map) = value else {
            self.error(
                origin,
                "",
                "a document must be a mapping with apiVersion and kind",
            );
            return;
        };
        let api = map.remove("apiVersion");
        let kind = map.remove("kind");
        let (Some(Value::String(api)), Some(Value::String(kind))) = (api, kind) else {
            self.error(origin, "", "missing apiVersion or kind");
            return;
        };
        let meta: Meta = match map.remove("metadata") {
            Some(m) => {
                let m = strip_k8s_metadata(m);
                match self.typed(origin, "metadata", m) {
                    Some(m) => m,
                    None => return,
                }
            }
            None => Meta {
                name: None,
                namespace: None,
                labels: BTreeMap::new(),
            },
        };
        let namespace = meta.namespace.unwrap_or_else(|| "default".to_owned());
        let name = meta.name.unwrap_or_default();
        let origin = Origin {
            resource: Some(format!("{kind} {namespace}/{name}")),
            ..origin.clone()
        };
        if name.is_empty() {
            self.error(&origin, "metadata.name", "missing");
        }
        let status = map.remove("status");
        if status.is_some() {
            self.warn(&origin, "status", "ignored");
        }
        // Endpoints and EndpointSlices keep their data at the top level.
        if let ("v1", "Endpoints") | ("discovery.k8s.io/v1", "EndpointSlice") =
            (api.as_str(), kind.as_str())
        {
            let body = Value::Mapping(map);
            if kind == "Endpoints" {
                let sets = self.endpoints(&origin, &namespace, &name, body);
                config.endpoints.extend(sets);
            } else if let Some(set) = self.endpoint_slice(&origin, &namespace, &meta.labels, body) {
                config.endpoints.push(set);
            }
            return;
        }
        let spec = map.remove("spec").unwrap_or(Value::Null);
        for (k, _) in map {
            let k = k.as_str().unwrap_or("?").to_owned();
            self.warn(&origin, &k, "unknown field, ignored");
        }
        match (api.as_str(), kind.as_str()) {
            (EGRESS_VERSION, "EgressConfig") => {
                if let Some(first) = egress_seen {
                    self.error(
                        &origin,
                        "",
                        format!("a second EgressConfig (the first is at {first})"),
                    );
                    return;
                }
                *egress_seen = Some(origin.clone());
                self.egress_config(&origin, spec, config);
            }
            (v, "ServiceEntry") if ISTIO_VERSIONS.contains(&v) => {
                if let Some(se) = self.service_entry(&origin, namespace, name, spec) {
                    config.service_entries.push(se);
                }
            }
            ("networking.istio.io/v1alpha3", "ExternalService") => {
                let converted = self.external_service(&origin, &namespace, &name, spec);
                if let Some(se) = self.service_entry(&origin, namespace, name, converted) {
                    config.service_entries.push(se);
                }
            }
            (v, "Sidecar") if ISTIO_VERSIONS.contains(&v) => {
                if let Some(spec) = self.sidecar(&origin, spec) {
                    config.sidecars.push(Named {
                        namespace,
                        name,
                        spec,
                    });
                }
            }
            (v, "VirtualService") if ISTIO_VERSIONS.contains(&v) => {
                if let Some(spec) = self.virtual_service(&origin, &namespace, spec) {
                    config.virtual_services.push(Named {
                        namespace,
                        name,
                        spec,
                    });
                }
            }
            (v, "DestinationRule") if ISTIO_VERSIONS.contains(&v) => {
                if let Some(spec) = self.destination_rule(&origin, &namespace, spec) {
                    config.destination_rules.push(Named {
                        namespace,
                        name,
                        spec,
                    });
                }
            }
            ("v1", "Service") => {
                if let Some(svc) = self.k8s_service(&origin, namespace, name, spec) {
                    config.services.push(svc);
                }
            }
            (
                v,
                "ServiceEntry" | "EgressConfig" | "Service" | "Endpoints" | "EndpointSlice"
                | "ExternalService",
            ) => self.error(
                &origin,
                "apiVersion",
                format!("unsupported apiVersion {v:?} for {kind}"),
            ),
            _ => self.warn(
                &origin,
                "",
                format!("{api} {kind} is not applied by this version of egress; ignored"),
            ),
        }
    }

    fn sidecar(&mut self, origin: &Origin, spec: Value) -> Option<istio::SidecarSpec> {
        let spec: istio::SidecarSpec = self.typed(origin, "spec", spec)?;
        if let Some(p) = &spec.outbound_traffic_policy
            && p.egress_proxy.is_some()
        {
            let f = "spec.outboundTrafficPolicy.egressProxy";
            if p.mode != Mode::AllowAny {
                self.error(origin, f, "only with mode ALLOW_ANY");
                return None;
            }
            self.warn(
                origin,
                f,
                "not applied: what no ServiceEntry declares goes to its own destination",
            );
        }
        if spec.outbound_traffic_policy.is_some() && spec.workload_selector.is_some() {
            self.warn(
                origin,
                "spec.workloadSelector",
                "a Sidecar for selected workloads is not applied (egress does not see pod labels): its namespace's policy is in force for them",
            );
        }
        if !spec.egress.is_empty() || !spec.ingress.is_empty() {
            self.warn(
                origin,
                "spec",
                "egress and ingress listeners are not applied",
            );
        }
        if spec.inbound_connection_pool.is_some() {
            self.warn(origin, "spec.inboundConnectionPool", "not applied");
        }
        Some(spec)
    }

    fn duration(&mut self, origin: &Origin, field: &str, value: Option<&String>) {
        if let Some(Err(why)) = value.map(|v| rules::duration(v)) {
            self.error(origin, field, why);
        }
    }

    fn virtual_service(
        &mut self,
        origin: &Origin,
        namespace: &str,
        spec: Value,
    ) -> Option<istio::VirtualServiceSpec> {
        let spec: istio::VirtualServiceSpec = self.typed(origin, "spec", spec)?;
        let before = self.errors.len();
        let delegate = spec.hosts.is_empty();
        if delegate {
            for (what, set) in [
                ("gateways", !spec.gateways.is_empty()),
                ("tls", !spec.tls.is_empty()),
                ("tcp", !spec.tcp.is_empty()),
            ] {
                if set {
                    self.error(
                        origin,
                        &format!("spec.{what}"),
                        "a delegate VirtualService (one without hosts) has none",
                    );
                }
            }
        }
        for (i, g) in spec.gateways.iter().enumerate() {
            if g == "mesh" {
                continue;
            }
            let (result, legacy) = rules::gateway_name(g);
            let f = format!("spec.gateways[{i}]");
            if let Err(why) = result {
                self.error(origin, &f, why);
            }
            if let Some(w) = legacy {
                self.warn(origin, &f, w);
            }
        }
        let mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
        let mut hosts_valid = true;
        for (i, h) in spec.hosts.iter().enumerate() {
            let f = format!("spec.hosts[{i}]");
            if h.parse::<IpAddr>().is_ok() {
                continue;
            }
            if let Err(why) = rules::wildcard_domain(h) {
                self.error(origin, &f, why);
                hosts_valid = false;
            } else if mesh && h == "*" {
                self.error(
                    origin,
                    &f,
                    "\"*\" is not a host of a VirtualService bound to the mesh",
                );
                hosts_valid = false;
            }
        }
        if hosts_valid {
            for (i, a) in spec.hosts.iter().enumerate() {
                if let Some(j) = spec.hosts[..i].iter().position(|b| hosts_overlap(a, b)) {
                    self.error(
                        origin,
                        &format!("spec.hosts[{i}]"),
                        format!(
                            "{a:?} and spec.hosts[{j}] {:?} name the same hosts",
                            spec.hosts[j]
                        ),
                    );
                }
            }
        }
        if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
            self.error(origin, "spec", "http, tcp or tls routes are required");
        }
        for (i, r) in spec.http.iter().enumerate() {
            self.http_route(origin, &format!("spec.http[{i}]"), r, delegate);
            for (j, m) in r.matches.iter().enumerate().filter(|_| mesh) {
                for key in ["headers", "withoutHeaders"] {
                    let claims = m.get(key).and_then(Value::as_mapping).is_some_and(|h| {
                        h.keys()
                            .any(|k| scalar(k).starts_with("@request.auth.claims"))
                    });
                    if claims {
                        self.error(
                            origin,
                            &format!("spec.http[{i}].match[{j}].{key}"),
                            "routing on JWT claims is for gateways: this VirtualService is \
                             bound to the mesh",
                        );
                    }
                }
            }
        }
        for (i, why) in rules::export_to(namespace, &spec.export_to, false) {
            self.error(origin, &format!("spec.exportTo[{i}]"), why);
        }
        if self.errors.len() > before {
            return None;
        }
        if delegate {
            self.warn(
                origin,
                "spec.hosts",
                "none: a delegate VirtualService, which this version of egress does not apply",
            );
            return None;
        }
        if !mesh {
            self.warn(
                origin,
                "spec.gateways",
                "bound to gateways only (\"mesh\" is not listed): not applied to the mesh's \
                 traffic, which egress mediates",
            );
            return None;
        }
        self.vs_not_applied(origin, &spec);
        Some(spec)
    }

    /// An HTTP route as Istio checks it.
    fn http_route(&mut self, origin: &Origin, f: &str, r: &istio::HttpRoute, delegate: bool) {
        let conflict = |a: &str, b: &str| format!("{a} and {b} cannot both be given");
        if r.delegate.is_some() {
            if delegate {
                self.error(
                    origin,
                    &format!("{f}.delegate"),
                    "a delegate's route cannot delegate",
                );
            }
            if r.redirect.is_some() || !r.route.is_empty() {
                self.error(origin, f, conflict("delegate", "route or redirect"));
            }
        } else if r.redirect.is_some() {
            for (what, set) in [
                ("route", !r.route.is_empty()),
                ("fault", r.fault.is_some()),
                ("rewrite", r.rewrite.is_some()),
                ("directResponse", r.direct_response.is_some()),
            ] {
                if set {
                    self.error(origin, f, conflict("redirect", what));
                }
            }
        } else if r.direct_response.is_some() {
            for (what, set) in [
                ("route", !r.route.is_empty()),
                ("fault", r.fault.is_some()),
                ("rewrite", r.rewrite.is_some()),
            ] {
                if set {
                    self.error(origin, f, conflict("directResponse", what));
                }
            }
        } else if r.route.is_empty() {
            self.error(
                origin,
                &format!("{f}.route"),
                "a route, a redirect or a directResponse is required",
            );
        }
        if r.mirror.is_some() && !r.mirrors.is_empty() {
            self.error(origin, f, conflict("mirror", "mirrors"));
        }
        for (j, m) in r.matches.iter().enumerate() {
            self.http_match(origin, &format!("{f}.match[{j}]"), m);
        }
        if let Some(h) = &r.headers {
            self.headers(origin, &format!("{f}.headers"), h);
        }
        self.duration(origin, &format!("{f}.timeout"), r.timeout.as_ref());
        if let Some(retries) = &r.retries {
            self.retries(origin, &format!("{f}.retries"), retries);
        }
        let mut total = 0i64;
        for (j, d) in r.route.iter().enumerate() {
            let g = format!("{f}.route[{j}]");
            self.destination(origin, &format!("{g}.destination"), &d.destination);
            if let Some(h) = &d.headers {
                self.headers(origin, &format!("{g}.headers"), h);
            }
            match d.weight {
                Some(w) if w < 0 => {
                    self.error(origin, &format!("{g}.weight"), "must not be negative")
                }
                Some(w) => total = total.saturating_add(w),
                None => {}
            }
        }
        if r.route.len() > 1 && total == 0 {
            self.error(
                origin,
                &format!("{f}.route"),
                "the destinations' weights add up to 0",
            );
        }
        if let Some(m) = &r.mirror {
            self.destination(origin, &format!("{f}.mirror"), m);
        }
        if let Some(fault) = &r.fault {
            self.fault(origin, &format!("{f}.fault"), fault);
        }
        if let Some(p) = &r.mirror_percent
            && p.as_u64().is_none_or(|p| p > 100)
        {
            self.error(
                origin,
                &format!("{f}.mirrorPercent"),
                format!("{} is not a percentage from 0 to 100", scalar(p)),
            );
        }
        if let Some(p) = &r.mirror_percentage {
            self.percentage(origin, &format!("{f}.mirrorPercentage"), Some(p));
        }
    }

    /// A `Percent` (`{value: 12.5}`), when there is one.
    fn percentage(&mut self, origin: &Origin, f: &str, p: Option<&Value>) {
        let Some(p) = p else { return };
        let value = p.get("value").map_or(Some(0.0), Value::as_f64);
        let checked = value.map_or_else(
            || Err(format!("{} is not a number", scalar(p))),
            rules::percentage,
        );
        if let Err(why) = checked {
            self.error(origin, &format!("{f}.value"), why);
        }
    }

    /// A fault (not applied by egress) as Istio checks it: an abort with a status, a delay
    /// with a duration, percentages.
    fn fault(&mut self, origin: &Origin, f: &str, fault: &Value) {
        let (abort, delay) = (fault.get("abort"), fault.get("delay"));
        if abort.is_none() && delay.is_none() {
            self.error(origin, f, "an abort, a delay or both are required");
        }
        if let Some(a) = abort {
            let g = format!("{f}.abort");
            self.percentage(origin, &format!("{g}.percentage"), a.get("percentage"));
            if let Some(s) = a.get("httpStatus") {
                if !s.as_i64().is_some_and(|s| (200..=599).contains(&s)) {
                    self.error(
                        origin,
                        &format!("{g}.httpStatus"),
                        format!("{} is not an HTTP status (200-599)", scalar(s)),
                    );
                }
            } else if let Some(s) = a.get("grpcStatus") {
                if !rules::GRPC_STATUSES.contains(&scalar(s).as_str()) {
                    self.error(
                        origin,
                        &format!("{g}.grpcStatus"),
                        format!(
                            "{} is not one of {}",
                            scalar(s),
                            rules::GRPC_STATUSES.join(", ")
                        ),
                    );
                }
            } else if a.get("http2Error").is_some() {
                self.error(
                    origin,
                    &format!("{g}.http2Error"),
                    "HTTP/2 abort faults are not supported by Istio",
                );
            } else {
                self.warn(
                    origin,
                    &g,
                    "no httpStatus, grpcStatus or http2Error: this abort does nothing",
                );
            }
        }
        if let Some(d) = delay {
            let g = format!("{f}.delay");
            self.percentage(origin, &format!("{g}.percentage"), d.get("percentage"));
            for key in ["fixedDelay", "exponentialDelay"] {
                if let Some(v) = d.get(key) {
                    let field = format!("{g}.{key}");
                    self.duration(origin, &field, Some(&scalar(v)));
                    if key == "exponentialDelay" {
                        self.error(origin, &field, "not supported by Istio");
                    }
                }
            }
        }
    }

    /// A match condition's header names and port; the rest is judged where it is applied.
    fn http_match(&mut self, origin: &Origin, f: &str, m: &Value) {
        for key in ["headers", "withoutHeaders"] {
            let Some(map) = m.get(key).and_then(Value::as_mapping) else {
                continue;
            };
            for (k, _) in map {
                let k = scalar(k);
                if let Err(why) = rules::header_name(&k) {
                    self.error(origin, &format!("{f}.{key}"), why);
                }
            }
        }
        if let Some(p) = m.get("port")
            && !p.as_u64().is_some_and(|p| (1..=65535).contains(&p))
        {
            self.error(
                origin,
                &format!("{f}.port"),
                format!("{} is not a port (1-65535)", scalar(p)),
            );
        }
    }

    /// Header operations: names Envoy lets be changed, values it can write.
    fn headers(&mut self, origin: &Origin, f: &str, h: &istio::Headers) {
        for (side, ops) in [("request", &h.request), ("response", &h.response)] {
            let Some(ops) = ops else { continue };
            for (op, map) in [("set", &ops.set), ("add", &ops.add)] {
                for (name, value) in map {
                    let field = format!("{f}.{side}.{op}.{name}");
                    let named = if side == "request" {
                        rules::request_header_set(name)
                    } else {
                        rules::header_operation(name)
                    };
                    if let Err(why) = named.and_then(|()| rules::header_value(value)) {
                        self.error(origin, &field, why);
                    }
                }
            }
            for (k, name) in ops.remove.iter().enumerate() {
                if let Err(why) = rules::header_operation(name) {
                    self.error(origin, &format!("{f}.{side}.remove[{k}]"), why);
                }
            }
        }
    }

    /// Retries as Istio bounds them.
    fn retries(&mut self, origin: &Origin, f: &str, r: &istio::Retries) {
        let attempts = r.attempts.unwrap_or(0);
        if attempts < 0 {
            self.error(origin, &format!("{f}.attempts"), "must not be negative");
        }
        if attempts == 0
            && (r.per_try_timeout.is_some()
                || r.retry_on.is_some()
                || r.retry_remote_localities.is_some())
        {
            self.error(
                origin,
                &format!("{f}.attempts"),
                "0 (or missing) disables retries, yet perTryTimeout, retryOn or \
                 retryRemoteLocalities is set",
            );
        }
        self.duration(
            origin,
            &format!("{f}.perTryTimeout"),
            r.per_try_timeout.as_ref(),
        );
        self.duration(origin, &format!("{f}.backoff"), r.backoff.as_ref());
        if let Some(on) = &r.retry_on {
            for token in on.split(',') {
                if let Err(why) = rules::retry_on(token) {
                    self.error(origin, &format!("{f}.retryOn"), why);
                }
            }
        }
    }

    /// A route's destination: a host (not `*`), a subset name, a port.
    fn destination(&mut self, origin: &Origin, f: &str, d: &istio::Destination) {
        if d.host == "*" {
            self.error(origin, &format!("{f}.host"), "\"*\" is not a destination");
        } else if let Err(why) = rules::wildcard_domain(&d.host) {
            self.error(origin, &format!("{f}.host"), why);
        }
        if let Some(s) = d.subset.as_deref().filter(|s| !rules::dns1123_label(s)) {
            self.error(
                origin,
                &format!("{f}.subset"),
                format!("{s:?} is not a subset name"),
            );
        }
        if let Some(p) = d.port.as_ref().filter(|p| !(1..=65535).contains(&p.number)) {
            self.error(
                origin,
                &format!("{f}.port.number"),
                format!("{} is not a port (1-65535)", p.number),
            );
        }
    }

    /// Say which parts of a valid VirtualService the HTTP datapath does not act on.
    fn vs_not_applied(&mut self, origin: &Origin, spec: &istio::VirtualServiceSpec) {
        for (i, r) in spec.http.iter().enumerate() {
            let f = format!("spec.http[{i}]");
            for (j, m) in r.matches.iter().enumerate() {
                let Some(map) = m.as_mapping() else { continue };
                for (k, v) in map {
                    let k = k.as_str().unwrap_or("?");
                    let supported = matches!(k, "uri" | "method" | "name")
                        && (k == "name" || v.get("exact").is_some() || v.get("prefix").is_some());
                    if !supported {
                        self.warn(
                            origin,
                            &format!("{f}.match[{j}].{k}"),
                            "only uri and method with exact or prefix are matched; this \
                             condition never matches",
                        );
                    }
                }
            }
            if r.route.len() > 1 {
                self.warn(
                    origin,
                    &format!("{f}.route"),
                    "only the first destination is used; weights are not applied",
                );
            }
            for (what, set) in [
                ("rewrite", r.rewrite.is_some()),
                ("headers", r.headers.is_some()),
                ("fault", r.fault.is_some()),
                ("redirect", r.redirect.is_some()),
                ("directResponse", r.direct_response.is_some()),
                ("delegate", r.delegate.is_some()),
                ("mirror", r.mirror.is_some()),
                ("mirrors", !r.mirrors.is_empty()),
                ("mirrorPercent", r.mirror_percent.is_some()),
                ("mirrorPercentage", r.mirror_percentage.is_some()),
                ("corsPolicy", r.cors_policy.is_some()),
            ] {
                if set {
                    self.warn(origin, &format!("{f}.{what}"), "not applied");
                }
            }
        }
        if !spec.tls.is_empty() || !spec.tcp.is_empty() {
            self.warn(
                origin,
                "spec",
                "tls and tcp routes are not applied: such streams go to their ServiceEntry",
            );
        }
    }

    /// Client TLS settings: Istio's conflicts, and what egress needs of the SIMPLE TLS it
    /// originates (a CA file it can read; no `insecureSkipVerify`).
    fn tls(&mut self, origin: &Origin, f: &str, tls: &istio::ClientTls) {
        let mode = tls.mode.as_deref().unwrap_or("DISABLE");
        let before = self.errors.len();
        if !istio::TLS_MODES.contains(&mode) {
            self.error(
                origin,
                &format!("{f}.mode"),
                format!("{mode:?} is not one of {}", istio::TLS_MODES.join(", ")),
            );
            return;
        }
        let insecure = tls.insecure_skip_verify == Some(true);
        let field = |name: &str| format!("{f}.{name}");
        if insecure && matches!(mode, "SIMPLE" | "MUTUAL") {
            let mut conflicting = vec![("caCertificates", tls.ca_certificates.is_some())];
            if mode == "SIMPLE" {
                conflicting.push(("credentialName", tls.credential_name.is_some()));
            }
            conflicting.push(("subjectAltNames", !tls.subject_alt_names.is_empty()));
            for (name, set) in conflicting {
                if set {
                    self.error(
                        origin,
                        &field(name),
                        "cannot be given with insecureSkipVerify: true",
                    );
                }
            }
        }
        if matches!(mode, "SIMPLE" | "MUTUAL") && tls.credential_name.is_some() {
            for (name, set) in [
                ("clientCertificate", tls.client_certificate.is_some()),
                ("privateKey", tls.private_key.is_some()),
                ("caCertificates", tls.ca_certificates.is_some()),
                ("caCrl", tls.ca_crl.is_some()),
            ] {
                if set {
                    self.error(origin, &field(name), "cannot be given with credentialName");
                }
            }
        } else if mode == "MUTUAL" {
            for (name, set) in [
                ("clientCertificate", tls.client_certificate.is_some()),
                ("privateKey", tls.private_key.is_some()),
            ] {
                if !set {
                    self.error(origin, &field(name), "missing: MUTUAL TLS needs it");
                }
            }
        }
        if mode != "SIMPLE" || self.errors.len() > before {
            return;
        }
        if insecure {
            self.error(
                origin,
                &field("insecureSkipVerify"),
                "egress does not originate TLS without verifying the server: give \
                 caCertificates instead",
            );
        }
        if let Some(Err(e)) = tls.ca_certificates.as_deref().map(istio::ca_roots) {
            self.error(origin, &field("caCertificates"), format!("{e:#}"));
        }
    }

    /// A traffic policy (the whole rule's, or a subset's): not empty, each port's with a port.
    fn traffic_policy(&mut self, origin: &Origin, f: &str, tp: &istio::TrafficPolicy) {
        if tp.tls.is_none()
            && tp.port_level_settings.is_empty()
            && tp.connection_pool.is_none()
            && tp.load_balancer.is_none()
            && tp.outlier_detection.is_none()
            && tp.tunnel.is_none()
            && tp.proxy_protocol.is_none()
            && tp.retry_budget.is_none()
        {
            self.error(origin, f, "empty: a traffic policy sets at least one field");
        }
        if tp.tunnel.is_some() && tp.proxy_protocol.is_some() {
            self.error(origin, f, "tunnel and proxyProtocol cannot both be given");
        }
        if let Some(tls) = &tp.tls {
            self.tls(origin, &format!("{f}.tls"), tls);
        }
        for (i, pl) in tp.port_level_settings.iter().enumerate() {
            let g = format!("{f}.portLevelSettings[{i}]");
            match &pl.port {
                None => self.error(origin, &format!("{g}.port"), "missing"),
                Some(p) if !(1..=65535).contains(&p.number) => self.error(
                    origin,
                    &format!("{g}.port.number"),
                    format!("{} is not a port (1-65535)", p.number),
                ),
                Some(_) => {}
            }
            if pl.tls.is_none()
                && pl.connection_pool.is_none()
                && pl.load_balancer.is_none()
                && pl.outlier_detection.is_none()
            {
                self.error(
                    origin,
                    &g,
                    "empty: a port's traffic policy sets at least one field",
                );
            }
            if let Some(tls) = &pl.tls {
                self.tls(origin, &format!("{g}.tls"), tls);
            }
        }
    }

    fn destination_rule(
        &mut self,
        origin: &Origin,
        namespace: &str,
        spec: Value,
    ) -> Option<istio::DestinationRuleSpec> {
        let spec: istio::DestinationRuleSpec = self.typed(origin, "spec", spec)?;
        let before = self.errors.len();
        if let Err(why) = rules::wildcard_domain(&spec.host) {
            self.error(origin, "spec.host", why);
        }
        if let Some(tp) = &spec.traffic_policy {
            self.traffic_policy(origin, "spec.trafficPolicy", tp);
        }
        for (i, s) in spec.subsets.iter().enumerate() {
            let f = format!("spec.subsets[{i}]");
            if !rules::dns1123_label(&s.name) {
                self.error(
                    origin,
                    &format!("{f}.name"),
                    format!("{:?} is not a subset name (a DNS-1123 label)", s.name),
                );
            } else if let Some(j) = spec.subsets[..i].iter().position(|t| t.name == s.name) {
                self.error(
                    origin,
                    &format!("{f}.name"),
                    format!("{:?} is spec.subsets[{j}]'s name too", s.name),
                );
            }
            if let Some(tp) = &s.traffic_policy {
                self.traffic_policy(origin, &format!("{f}.trafficPolicy"), tp);
            }
        }
        for (i, why) in rules::export_to(namespace, &spec.export_to, false) {
            self.error(origin, &format!("spec.exportTo[{i}]"), why);
        }
        if spec.workload_selector.is_some() {
            match spec.export_to.as_slice() {
                [] => {}
                [one] if one == "." || one == namespace => {}
                _ => self.error(
                    origin,
                    "spec.exportTo",
                    "a DestinationRule with a workloadSelector is exported to its own \
                     namespace only",
                ),
            }
        }
        if self.errors.len() > before {
            return None;
        }
        if !spec.subsets.is_empty() {
            self.warn(
                origin,
                "spec.subsets",
                "not applied: routes go to the host's entry",
            );
        }
        if spec.workload_selector.is_some() {
            self.warn(
                origin,
                "spec.workloadSelector",
                "not applied (egress does not see pod labels): the rule applies to every workload",
            );
        }
        if let Some(tp) = &spec.traffic_policy {
            let tls = tp
                .tls
                .iter()
                .map(|t| ("spec.trafficPolicy.tls".to_owned(), t))
                .chain(
                    tp.port_level_settings
                        .iter()
                        .enumerate()
                        .filter_map(|(i, p)| {
                            Some((
                                format!("spec.trafficPolicy.portLevelSettings[{i}].tls"),
                                p.tls.as_ref()?,
                            ))
                        }),
                );
            for (field, t) in tls {
                if let Some(m @ ("MUTUAL" | "ISTIO_MUTUAL")) = t.mode.as_deref() {
                    self.warn(
                        origin,
                        &format!("{field}.mode"),
                        format!("{m} is not applied: only SIMPLE TLS origination is"),
                    );
                } else if t.mode.as_deref() == Some("SIMPLE") {
                    if t.credential_name.is_some() {
                        self.warn(
                            origin,
                            &format!("{field}.credentialName"),
                            "not applied (egress reads no Kubernetes secrets): the system's \
                             roots verify the server",
                        );
                    }
                    if !t.subject_alt_names.is_empty() {
                        self.warn(
                            origin,
                            &format!("{field}.subjectAltNames"),
                            "not applied: the server's certificate is verified for the server \
                             name (sni, else the host)",
                        );
                    }
                }
            }
            if tp.connection_pool.is_some()
                || tp.load_balancer.is_some()
                || tp.outlier_detection.is_some()
            {
                self.warn(
                    origin,
                    "spec.trafficPolicy",
                    "connectionPool, loadBalancer and outlierDetection are not applied",
                );
            }
            for (what, set) in [
                ("tunnel", tp.tunnel.is_some()),
                ("proxyProtocol", tp.proxy_protocol.is_some()),
                ("retryBudget", tp.retry_budget.is_some()),
            ] {
                if set {
                    self.warn(origin, &format!("spec.trafficPolicy.{what}"), "not applied");
                }
            }
        }
        Some(spec)
    }

    fn k8s_service(
        &mut self,
        origin: &Origin,
        namespace: String,
        name: String,
        spec: Value,
    ) -> Option<k8s::Service> {
        let spec: k8s::ServiceSpec = self.typed(origin, "spec", spec)?;
        let before = self.errors.len();
        const TYPES: [&str; 4] = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
        if let Some(t) = spec.type_.as_deref().filter(|t| !TYPES.contains(t)) {
            self.error(
                origin,
                "spec.type",
                format!("{t:?} is not one of {}", TYPES.join(", ")),
            );
        }
        let mut cluster_ips = Vec::new();
        let listed = spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_owned(), ip));
        let listed = listed.chain(
            spec.cluster_ips
                .iter()
                .enumerate()
                .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip)),
        );
        for (field, ip) in listed {
            if ip.is_empty() || ip == "None" {
                continue;
            }
            match ip.parse::<IpAddr>() {
                Ok(a) if !cluster_ips.contains(&a) => cluster_ips.push(a),
                Ok(_) => {}
                Err(_) => self.error(origin, &field, format!("{ip:?} is not an IP address")),
            }
        }
        for (i, p) in spec.ports.iter().enumerate() {
            if !(1..=65535).contains(&p.port) {
                self.error(
                    origin,
                    &format!("spec.ports[{i}].port"),
                    format!("{} is not a port (1-65535)", p.port),
                );
            }
            match p.protocol.as_deref() {
                None | Some("TCP") => {}
                Some("UDP" | "SCTP") => self.warn(
                    origin,
                    &format!("spec.ports[{i}].protocol"),
                    "only TCP is translated; this port is not",
                ),
                Some(other) => self.error(
                    origin,
                    &format!("spec.ports[{i}].protocol"),
                    format!("{other:?} is not one of TCP, UDP, SCTP"),
                ),
            }
        }
        let external = spec.type_.as_deref() == Some("ExternalName");
        if external
            && spec
                .external_name
                .as_deref()
                .is_none_or(|n| rules::fqdn(n).is_err())
        {
            self.error(
                origin,
                "spec.externalName",
                "an ExternalName Service needs a host name here",
            );
        }
        if self.errors.len() > before {
            return None;
        }
        if external {
            if spec.ports.is_empty() {
                self.warn(
                    origin,
                    "spec.ports",
                    "no ports: no connection is mediated by this name",
                );
            }
        } else if spec.selector.is_some() {
            self.warn(origin, "spec.selector", "a Service with a selector is served in-cluster by kube-proxy; egress translates only selector-less Services");
        } else if cluster_ips.is_empty() {
            self.warn(origin, "spec.clusterIP", "no cluster IP: egress cannot translate this Service in the kernel (set the address the cluster assigned)");
        }
        Some(k8s::Service {
            namespace,
            name,
            spec,
            cluster_ips,
        })
    }

    fn endpoint_port(&mut self, origin: &Origin, field: &str, port: Option<u32>) -> Option<u16> {
        match port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) {
            Some(p) => Some(p),
            None => {
                self.error(
                    origin,
                    field,
                    format!(
                        "{} is not a port (1-65535)",
                        port.map_or_else(|| "missing".to_owned(), |p| p.to_string())
                    ),
                );
                None
            }
        }
    }

    fn endpoints(
        &mut self,
        origin: &Origin,
        namespace: &str,
        name: &str,
        body: Value,
    ) -> Vec<k8s::EndpointSet> {
        let Some(body) = self.typed::<k8s::EndpointsBody>(origin, "", body) else {
            return Vec::new();
        };
        let mut sets = Vec::new();
        for (i, subset) in body.subsets.iter().enumerate() {
            let mut addresses = Vec::new();
            for (j, a) in subset.addresses.iter().enumerate() {
                match a.ip.parse::<IpAddr>() {
                    Ok(ip) => addresses.push(ip),
                    Err(_) => self.error(
                        origin,
                        &format!("subsets[{i}].addresses[{j}].ip"),
                        format!("{:?} is not an IP address", a.ip),
                    ),
                }
            }
            let mut ports = Vec::new();
            for (j, p) in subset.ports.iter().enumerate() {
                if let Some(port) = self.endpoint_port(
                    origin,
                    &format!("subsets[{i}].ports[{j}].port"),
                    Some(p.port),
                ) {
                    ports.push((p.name.clone(), port));
                }
            }
            sets.push(k8s::EndpointSet {
                namespace: namespace.to_owned(),
                service: name.to_owned(),
                addresses,
                ports,
            });
        }
        sets
    }

    fn endpoint_slice(
        &mut self,
        origin: &Origin,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        body: Value,
    ) -> Option<k8s::EndpointSet> {
        let body: k8s::EndpointSliceBody = self.typed(origin, "", body)?;
        let Some(service) = labels.get("kubernetes.io/service-name") else {
            self.warn(
                origin,
                "metadata.labels",
                "no kubernetes.io/service-name label: these endpoints belong to no Service",
            );
            return None;
        };
        match body.address_type.as_str() {
            "IPv4" | "IPv6" => {}
            "FQDN" => {
                self.warn(origin, "addressType", "FQDN endpoints are not applied yet");
                return None;
            }
            other => {
                self.error(
                    origin,
                    "addressType",
                    format!("{other:?} is not one of IPv4, IPv6, FQDN"),
                );
                return None;
            }
        }
        let mut addresses = Vec::new();
        for (i, e) in body.endpoints.iter().enumerate() {
            // Kubernetes: a missing `ready` condition means ready.
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            for (j, a) in e.addresses.iter().enumerate() {
                match a.parse::<IpAddr>() {
                    Ok(ip) if ready => addresses.push(ip),
                    Ok(_) => {}
                    Err(_) => self.error(
                        origin,
                        &format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a:?} is not an IP address"),
                    ),
                }
            }
        }
        let mut ports = Vec::new();
        for (i, p) in body.ports.iter().enumerate() {
            if let Some(port) = self.endpoint_port(origin, &format!("ports[{i}].port"), p.port) {
                ports.push((p.name.clone(), port));
            }
        }
        Some(k8s::EndpointSet {
            namespace: namespace.to_owned(),
            service: service.clone(),
            addresses,
            ports,
        })
    }

    /// The keys of `spec.interception` and `spec.outboundTrafficPolicy`, whose misspelling
    /// would silently widen (or narrow) what is intercepted: aliases become the names they
    /// stand for; anything else is an error that names the nearest right one.
    fn knob_names(&mut self, origin: &Origin, spec: &mut Value) {
        if let Some(Value::Mapping(i)) = spec.get_mut("interception") {
            let keys: Vec<Value> = i.keys().cloned().collect();
            for key in keys {
                let k = scalar(&key);
                let f = format!("spec.interception.{k}");
                if INTERCEPTION_FIELDS.contains(&k.as_str()) {
                    continue;
                }
                let value = i.remove(&key).unwrap_or(Value::Null);
                if let Some((_, name)) = INTERCEPTION_ALIASES.iter().find(|(a, _)| *a == k) {
                    if i.contains_key(*name) {
                        self.error(origin, &f, format!("{name} is given too: give one of them"));
                    } else {
                        i.insert(Value::from(*name), value);
                    }
                    continue;
                }
                let names: Vec<&str> = INTERCEPTION_FIELDS
                    .iter()
                    .copied()
                    .chain(INTERCEPTION_ALIASES.iter().map(|(a, _)| *a))
                    .collect();
                let hint = match rules::closest(&k, &names) {
                    Some(near) => {
                        let name = INTERCEPTION_ALIASES
                            .iter()
                            .find(|(a, _)| *a == near)
                            .map_or(near, |(_, n)| n);
                        format!("did you mean {name}?")
                    }
                    None => format!("the knobs are {}", INTERCEPTION_FIELDS.join(", ")),
                };
                self.error(origin, &f, format!("unknown field: {hint}"));
            }
        }
        if let Some(Value::Mapping(p)) = spec.get_mut("outboundTrafficPolicy") {
            let keys: Vec<Value> = p
                .keys()
                .filter(|k| k.as_str() != Some("mode"))
                .cloned()
                .collect();
            for key in keys {
                p.remove(&key);
                let k = scalar(&key);
                let hint = if rules::closest(&k, &["mode"]).is_some() {
                    "did you mean mode?"
                } else {
                    "the only field is mode"
                };
                self.error(
                    origin,
                    &format!("spec.outboundTrafficPolicy.{k}"),
                    format!("unknown field: {hint}"),
                );
            }
        }
    }

    /// Exclusions bypass every decision, as Istio's do: where `REGISTRY_ONLY` is in force
    /// (the mesh's mode, or a Sidecar's) each one is a way out the registry never sees. Said
    /// once per knob, naming what it lets through.
    fn exclusion_holes(&mut self, origin: &Origin, config: &MeshConfig) {
        let strict = config.mode == Mode::RegistryOnly
            || config.sidecars.iter().any(|s| {
                s.spec
                    .outbound_traffic_policy
                    .as_ref()
                    .is_some_and(|p| p.mode == Mode::RegistryOnly)
            });
        if !strict {
            return;
        }
        let i = &config.interception;
        let shown = |v: Vec<String>| v.join(", ");
        let holes = [
            (
                "excludeOutboundIPRanges",
                shown(i.exclude_ranges.iter().map(ToString::to_string).collect()),
            ),
            (
                "excludeOutboundPorts",
                shown(i.exclude_ports.iter().map(ToString::to_string).collect()),
            ),
            (
                "excludeUids",
                shown(i.exclude_uids.iter().map(ToString::to_string).collect()),
            ),
            (
                "excludeGids",
                shown(i.exclude_gids.iter().map(ToString::to_string).collect()),
            ),
        ];
        for (knob, list) in holes {
            if !list.is_empty() {
                self.warn(
                    origin,
                    &format!("spec.interception.{knob}"),
                    format!(
                        "{list}: excluded, so not decided: under REGISTRY_ONLY connections and \
                         datagrams there leave without any ServiceEntry allowing them"
                    ),
                );
            }
        }
    }

    fn egress_config(&mut self, origin: &Origin, mut spec: Value, config: &mut MeshConfig) {
        self.knob_names(origin, &mut spec);
        let Some(spec) = self.typed::<EgressConfigSpec>(origin, "spec", spec) else {
            return;
        };
        if let Some(p) = spec.outbound_traffic_policy {
            config.mode = p.mode;
        }
        if let Some(f) = spec.failure_mode {
            config.failure_mode = f;
        }
        if spec.raw_sockets.is_some() {
            config.raw_sockets = spec.raw_sockets;
        }
        if let Some(a) = spec.auto_allocate {
            self.auto_allocate(origin, a, &mut config.auto_allocate);
        }
        if let Some(dns) = spec.dns {
            if let Some(list) = dns.learn_from {
                config.dns_learn_from = self.ranges(origin, "spec.dns.learnFrom", &list, true);
            }
            if let Some(v) = dns.capture {
                match scalar(&v).as_str() {
                    "ALL" => config.dns_capture = super::DnsCapture::All,
                    "RESOLV_CONF" => config.dns_capture = super::DnsCapture::ResolvConf,
                    other => self.error(
                        origin,
                        "spec.dns.capture",
                        format!("{other:?} is not one of {}", DNS_CAPTURES.join(", ")),
                    ),
                }
            }
        }
        if let Some(ns) = spec.root_namespace {
            if ns.is_empty() {
                self.error(origin, "spec.rootNamespace", "must not be empty");
            } else {
                config.root_namespace = Some(ns);
            }
        }
        let Some(i) = spec.interception else {
            return;
        };
        let f = "spec.interception";
        let mut out = Interception::default();
        if let Some(l) = &i.include_ranges {
            out.include_ranges =
                self.ranges(origin, &format!("{f}.includeOutboundIPRanges"), l, true);
        }
        if let Some(l) = &i.exclude_ranges {
            out.exclude_ranges =
                self.ranges(origin, &format!("{f}.excludeOutboundIPRanges"), l, false);
        }
        if let Some(l) = &i.include_ports {
            out.include_ports =
                self.numbers(origin, &format!("{f}.includeOutboundPorts"), l, 1, 65535);
        }
        if let Some(l) = &i.exclude_ports {
            out.exclude_ports =
                self.numbers(origin, &format!("{f}.excludeOutboundPorts"), l, 1, 65535);
        }
        if let Some(l) = &i.exclude_uids {
            out.exclude_uids =
                self.numbers(origin, &format!("{f}.excludeUids"), l, 0, u32::MAX as u64);
        }
        if let Some(l) = &i.exclude_gids {
            out.exclude_gids =
                self.numbers(origin, &format!("{f}.excludeGids"), l, 0, u32::MAX as u64);
        }
        config.interception = out;
    }

    fn ranges(&mut self, origin: &Origin, field: &str, list: &ListOrCsv, star: bool) -> Vec<IpNet> {
        let mut out = Vec::new();
        for (suffix, item) in list.items() {
            if star && item == "*" {
                out.extend(all_ranges());
                continue;
            }
            match parse_net(&item) {
                Some(n) => out.push(n),
                None => self.error(
                    origin,
                    &format!("{field}{suffix}"),
                    format!("{item:?} is not an IP address or CIDR"),
                ),
            }
        }
        out
    }

    fn numbers<T: TryFrom<u64>>(
        &mut self,
        origin: &Origin,
        field: &str,
        list: &ListOrCsv,
        min: u64,
        max: u64,
    ) -> Vec<T> {
        let mut out = Vec::new();
        for (suffix, item) in list.items() {
            match item.parse::<u64>().ok().filter(|n| (min..=max).contains(n)) {
                Some(n) => out.extend(T::try_from(n).ok()),
                None => self.error(
                    origin,
                    &format!("{field}{suffix}"),
                    format!("{item:?} is not a number from {min} to {max}"),
                ),
            }
        }
        out
    }

    fn auto_allocate(&mut self, origin: &Origin, a: AutoAllocateSpec, out: &mut AutoAllocate) {
        let f = "spec.autoAllocate";
        if let Some(e) = a.enabled {
            out.enabled = e;
        }
        // Room for at least a few hosts, past the network and broadcast addresses.
        if let Some(r) = a.ipv4_range {
            match r.parse::<ipnet::Ipv4Net>() {
                Ok(n) if n.prefix_len() <= 28 => out.v4 = n.trunc(),
                _ => self.error(
                    origin,
                    &format!("{f}.ipv4Range"),
                    format!("{r:?} is not an IPv4 CIDR of /28 or wider"),
                ),
            }
        }
        if let Some(r) = a.ipv6_range {
            match r.parse::<ipnet::Ipv6Net>() {
                Ok(n) if n.prefix_len() <= 124 => out.v6 = n.trunc(),
                _ => self.error(
                    origin,
                    &format!("{f}.ipv6Range"),
                    format!("{r:?} is not an IPv6 CIDR of /124 or wider"),
                ),
            }
        }
    }

    /// Istio 0.7's `ExternalService` as the ServiceEntry it became (0.8): `hosts` that are
    /// addresses or CIDRs are its `addresses` (the resource's name is then its host when no
    /// name is left), `discovery` is `resolution`, protocols are upper-cased. The rest is read
    /// as a ServiceEntry's, with its errors.
    fn external_service(
        &mut self,
        origin: &Origin,
        namespace: &str,
        name: &str,
        spec: Value,
    ) -> Value {
        let Value::Mapping(mut m) = spec else {
            return spec;
        };
        self.warn(
            origin,
            "",
            "ExternalService (Istio 0.7) is read as the ServiceEntry it became: write a \
             ServiceEntry",
        );
        let hosts = m.remove("hosts");
        let (mut names, mut addresses) = (Vec::new(), Vec::new());
        for (i, h) in hosts
            .iter()
            .flat_map(|h| h.as_sequence())
            .flatten()
            .enumerate()
        {
            let text = h.as_str().unwrap_or_default();
            if parse_net(text).is_some() {
                addresses.push(h.clone());
            } else if rules::wildcard_domain(text).is_ok() {
                names.push(h.clone());
            } else {
                self.error(
                    origin,
                    &format!("spec.hosts[{i}]"),
                    format!(
                        "{} is neither a host name nor an address or CIDR",
                        scalar(h)
                    ),
                );
            }
        }
        if names.is_empty() && !addresses.is_empty() {
            names.push(Value::from(format!("{name}.{namespace}.external")));
        }
        m.insert("hosts".into(), Value::Sequence(names));
        if !addresses.is_empty() {
            m.insert("addresses".into(), Value::Sequence(addresses));
        }
        if let Some(d) = m.remove("discovery") {
            let r = d
                .as_str()
                .map_or(d.clone(), |s| Value::from(s.to_uppercase()));
            m.insert("resolution".into(), r);
        }
        if let Some(Value::Sequence(ports)) = m.get_mut("ports") {
            for p in ports.iter_mut() {
                if let Some(Value::String(proto)) = p.get_mut("protocol") {
                    *proto = proto.to_uppercase();
                }
            }
        }
        Value::Mapping(m)
    }

    fn service_entry(
        &mut self,
        origin: &Origin,
        namespace: String,
        name: String,
        spec: Value,
    ) -> Option<ServiceEntry> {
        let spec: ServiceEntrySpec = self.typed(origin, "spec", spec)?;
        let before = self.errors.len();
        let resolution = spec.resolution.as_deref().unwrap_or("NONE");
        if spec.hosts.is_empty() {
            self.error(origin, "spec.hosts", "at least one host is required");
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            let f = format!("spec.hosts[{i}]");
            if h == "*" {
                self.error(
                    origin,
                    &f,
                    "\"*\" alone is not a host: it would register every host on the entry's \
                     ports; name the hosts, or \"*.domain\"",
                );
            } else if let Err(e) = rules::wildcard_domain(h) {
                self.error(origin, &f, e);
            } else if resolution != "DYNAMIC_DNS" && rules::partial_wildcard(h) {
                self.error(
                    origin,
                    &f,
                    format!("{h:?} is a partial wildcard: only a whole first label \"*.\" is one"),
                );
            }
        }
        let mut addresses = Vec::new();
        for (i, a) in spec.addresses.iter().enumerate() {
            let f = format!("spec.addresses[{i}]");
            match parse_net(a) {
                Some(n) => addresses.push(n),
                None => self.error(origin, &f, format!("{a:?} is not an IP address or CIDR")),
            }
            if a.contains('/') && !matches!(resolution, "NONE" | "STATIC") {
                self.error(
                    origin,
                    &f,
                    format!("a CIDR needs resolution NONE or STATIC, not {resolution}"),
                );
            }
        }
        self.service_ports(origin, &spec.ports);
        if !RESOLUTIONS.contains(&resolution) {
            self.error(
                origin,
                "spec.resolution",
                format!("{resolution:?} is not one of {}", RESOLUTIONS.join(", ")),
            );
        }
        if let Some(l) = spec.location.as_deref().filter(|l| !LOCATIONS.contains(l)) {
            self.error(
                origin,
                "spec.location",
                format!("{l:?} is not one of {}", LOCATIONS.join(", ")),
            );
        }
        if spec.workload_selector.is_some() && !spec.endpoints.is_empty() {
            self.error(
                origin,
                "spec.workloadSelector",
                "only one of workloadSelector and endpoints may be given",
            );
        }
        let port_names: Vec<&str> = spec
            .ports
            .iter()
            .filter_map(|p| p.name.as_deref())
            .collect();
        match resolution {
            "NONE" if !spec.endpoints.is_empty() => self.error(
                origin,
                "spec.endpoints",
                "resolution NONE takes no endpoints: connections go to the address dialled",
            ),
            "STATIC" => {
                for (i, e) in spec.endpoints.iter().enumerate() {
                    self.static_endpoint(origin, i, e, &port_names);
                }
            }
            "DNS" | "DNS_ROUND_ROBIN" => {
                if spec.endpoints.is_empty()
                    && let Some((i, e)) = spec
                        .hosts
                        .iter()
                        .enumerate()
                        .find_map(|(i, h)| Some((i, rules::fqdn(h).err()?)))
                {
                    self.error(
                        origin,
                        &format!("spec.hosts[{i}]"),
                        format!(
                            "resolution {resolution} without endpoints resolves the hosts, \
                             which must be fully qualified names: {e}"
                        ),
                    );
                }
                if resolution == "DNS_ROUND_ROBIN" && spec.endpoints.len() > 1 {
                    self.error(
                        origin,
                        "spec.endpoints",
                        "resolution DNS_ROUND_ROBIN takes one endpoint at most",
                    );
                }
                for (i, e) in spec.endpoints.iter().enumerate() {
                    let f = format!("spec.endpoints[{i}]");
                    let a = e.address.as_deref().unwrap_or_default();
                    if a.parse::<IpAddr>().is_err()
                        && let Err(why) = rules::fqdn(a)
                    {
                        self.error(
                            origin,
                            &format!("{f}.address"),
                            format!("{a:?} is neither an IP address nor a host name: {why}"),
                        );
                    }
                    self.endpoint_ports(origin, &f, e, &port_names);
                }
            }
            "DYNAMIC_DNS" => self.dynamic_dns(origin, &spec),
            _ => {}
        }
        if resolution != "NONE" && spec.hosts.len() > 1 {
            let tcp = spec.ports.iter().enumerate().find(|(_, p)| {
                let proto = p
                    .protocol
                    .as_deref()
                    .unwrap_or_default()
                    .to_ascii_uppercase();
                !HTTP_PROTOCOLS.contains(&proto.as_str())
                    && !matches!(proto.as_str(), "HTTPS" | "TLS")
            });
            if let Some((i, p)) = tcp {
                self.error(
                    origin,
                    "spec.hosts",
                    format!(
                        "several hosts with resolution {resolution} need HTTP or TLS ports, \
                         which say the host; spec.ports[{i}] is {}",
                        p.protocol.as_deref().unwrap_or("without a protocol")
                    ),
                );
            }
        }
        for (i, why) in rules::export_to(&namespace, &spec.export_to, true) {
            self.error(origin, &format!("spec.exportTo[{i}]"), why);
        }
        if self.errors.len() > before {
            return None;
        }
        if resolution == "DYNAMIC_DNS" {
            self.warn(
                origin,
                "spec.resolution",
                "DYNAMIC_DNS is not applied by this version of egress: this entry is ignored",
            );
            return None;
        }
        self.not_yet_applied(origin, &spec);
        Some(ServiceEntry {
            namespace,
            name,
            spec,
            addresses,
            allocated: Vec::new(),
        })
    }

    /// Ports: numbers and names unique, names DNS-1123 labels, protocols Istio's.
    fn service_ports(&mut self, origin: &Origin, ports: &[ServicePort]) {
        for (i, p) in ports.iter().enumerate() {
            let f = format!("spec.ports[{i}]");
            if !(1..=65535).contains(&p.number) {
                self.error(
                    origin,
                    &format!("{f}.number"),
                    format!("{} is not a port (1-65535)", p.number),
                );
            }
            if let Some(j) = ports[..i].iter().position(|q| q.number == p.number) {
                self.error(
                    origin,
                    &format!("{f}.number"),
                    format!("{} is spec.ports[{j}]'s number too", p.number),
                );
            }
            match p.name.as_deref() {
                None | Some("") => self.error(
                    origin,
                    &format!("{f}.name"),
                    "missing: every port has a name (a DNS-1123 label)",
                ),
                Some(n) if !rules::dns1123_label(n) => self.error(
                    origin,
                    &format!("{f}.name"),
                    format!(
                        "{n:?} is not a port name (a DNS-1123 label: letters, digits, inner dashes)"
                    ),
                ),
                Some(n) => {
                    if let Some(j) = ports[..i].iter().position(|q| q.name.as_deref() == Some(n)) {
                        self.error(
                            origin,
                            &format!("{f}.name"),
                            format!("{n:?} is spec.ports[{j}]'s name too"),
                        );
                    }
                }
            }
            if let Some(t) = p.target_port.filter(|t| !(1..=65535).contains(t)) {
                self.error(
                    origin,
                    &format!("{f}.targetPort"),
                    format!("{t} is not a port (1-65535)"),
                );
            }
            let Some(proto) = &p.protocol else { continue };
            let field = format!("{f}.protocol");
            if !PROTOCOLS.iter().any(|k| k.eq_ignore_ascii_case(proto)) {
                self.error(
                    origin,
                    &field,
                    format!("{proto:?} is not one of {}", PROTOCOLS.join(", ")),
                );
            }
        }
    }

    /// A STATIC entry's endpoint, as Istio checks a WorkloadEntry: an IP address or a Unix
    /// socket, ports among the entry's.
    fn static_endpoint(&mut self, origin: &Origin, i: usize, e: &Endpoint, port_names: &[&str]) {
        let f = format!("spec.endpoints[{i}]");
        match e.address.as_deref().unwrap_or_default() {
            "" if e.network.is_none() => {
                self.error(origin, &format!("{f}.address"), "missing");
            }
            "" => self.warn(
                origin,
                &format!("{f}.address"),
                "missing (the endpoint is reached through its network's gateway, which egress \
                 does not know): this endpoint is not used",
            ),
            a => {
                if let Some(path) = a.strip_prefix("unix://") {
                    if path.is_empty()
                        || !(path.starts_with('@') || path.starts_with('/') && !path.ends_with('/'))
                    {
                        self.error(
                            origin,
                            &format!("{f}.address"),
                            format!("{a:?}: a Unix socket is an absolute path to a file or @name"),
                        );
                    }
                    if !e.ports.is_empty() {
                        self.error(
                            origin,
                            &format!("{f}.ports"),
                            "a Unix socket takes no ports",
                        );
                    }
                    if port_names.len() != 1 {
                        self.error(
                            origin,
                            "spec.ports",
                            format!("{f} is a Unix socket: the entry has exactly one port then"),
                        );
                    }
                    self.warn(
                        origin,
                        &format!("{f}.address"),
                        "Unix socket endpoints are not applied: egress connects over TCP",
                    );
                } else if a.parse::<IpAddr>().is_err() {
                    self.error(
                        origin,
                        &format!("{f}.address"),
                        format!("{a:?} is not an IP address (resolution STATIC)"),
                    );
                }
            }
        }
        self.endpoint_ports(origin, &f, e, port_names);
    }

    /// An endpoint's ports: named after the entry's ports, each a port number.
    fn endpoint_ports(&mut self, origin: &Origin, f: &str, e: &Endpoint, port_names: &[&str]) {
        for (pname, port) in &e.ports {
            let field = format!("{f}.ports.{pname}");
            if !port_names.contains(&pname.as_str()) {
                self.error(
                    origin,
                    &field,
                    format!("no port of the entry is named {pname:?}"),
                );
            }
            if !(1..=65535).contains(port) {
                self.error(origin, &field, format!("{port} is not a port (1-65535)"));
            }
        }
    }

    /// What Istio requires of a DYNAMIC_DNS entry (egress then ignores it, with a warning).
    fn dynamic_dns(&mut self, origin: &Origin, spec: &ServiceEntrySpec) {
        for (i, h) in spec.hosts.iter().enumerate() {
            if !h.starts_with('*') {
                self.error(
                    origin,
                    &format!("spec.hosts[{i}]"),
                    format!("{h:?}: resolution DYNAMIC_DNS takes wildcard hosts only"),
                );
            }
        }
        if !spec.addresses.is_empty() {
            self.error(
                origin,
                "spec.addresses",
                "resolution DYNAMIC_DNS takes no addresses",
            );
        }
        if !spec.endpoints.is_empty() {
            self.error(
                origin,
                "spec.endpoints",
                "resolution DYNAMIC_DNS takes no endpoints",
            );
        }
        for (i, p) in spec.ports.iter().enumerate() {
            let proto = p
                .protocol
                .as_deref()
                .unwrap_or_default()
                .to_ascii_uppercase();
            if !matches!(proto.as_str(), "HTTP" | "TLS" | "GRPC" | "HTTP2") {
                self.error(
                    origin,
                    &format!("spec.ports[{i}].protocol"),
                    "resolution DYNAMIC_DNS takes HTTP, TLS, GRPC and HTTP2 ports only",
                );
            }
        }
    }

    /// Say which parts of a valid ServiceEntry the datapath does not act on yet.
    fn not_yet_applied(&mut self, origin: &Origin, spec: &ServiceEntrySpec) {
        if spec.ports.is_empty() {
            self.warn(
                origin,
                "spec.ports",
                "no ports: under REGISTRY_ONLY the addresses allow no connection",
            );
        }
        let mut later = Vec::new();
        if spec.workload_selector.is_some() {
            later.push("workloadSelector");
        }
        if !spec.subject_alt_names.is_empty() {
            later.push("subjectAltNames");
        }
        let endpoint_fields = [
            (
                "endpoints' labels",
                spec.endpoints.iter().any(|e| !e.labels.is_empty()),
            ),
            (
                "endpoints' network",
                spec.endpoints.iter().any(|e| e.network.is_some()),
            ),
            (
                "endpoints' locality",
                spec.endpoints.iter().any(|e| e.locality.is_some()),
            ),
            (
                "endpoints' weight",
                spec.endpoints.iter().any(|e| e.weight.is_some()),
            ),
            (
                "endpoints' serviceAccount",
                spec.endpoints.iter().any(|e| e.service_account.is_some()),
            ),
        ];
        later.extend(
            endpoint_fields
                .iter()
                .filter(|(_, set)| *set)
                .map(|(name, _)| *name),
        );
        if !later.is_empty() {
            self.warn(
                origin,
                "spec",
                format!("not applied yet: {}", later.join(", ")),
            );
        }
    }
}

/// `a.b[1].c` for a path serde_ignored reports (its own Display marks `Option`s with `?`).
fn field_path(p: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match p {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => join(&field_path(parent), key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// Drop the Kubernetes bookkeeping fields kubectl adds (`labels`, `annotations`, ...): they are
/// not ours to warn about.
fn strip_k8s_metadata(m: Value) -> Value {
    let Value::Mapping(mut map) = m else {
        return m;
    };
    for k in [
        "annotations",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "managedFields",
    ] {
        map.remove(k);
    }
    Value::Mapping(map)
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (_, true) => a.to_owned(),
        (true, false) => b.to_owned(),
        (false, false) if b.starts_with('[') => format!("{a}{b}"),
        _ => format!("{a}.{b}"),
    }
}

/// An IP address (as a host prefix) or a CIDR, host bits cleared.
pub fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Some(n.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

/// Whether two hosts name a host in common (Istio's duplicate hosts of a VirtualService):
/// equal, or one a wildcard whose suffix ends the other.
fn hosts_overlap(a: &str, b: &str) -> bool {
    let covers = |w: &str, h: &str| {
        w.strip_prefix('*')
            .is_some_and(|suffix| h.ends_with(suffix))
    };
    a.eq_ignore_ascii_case(b) || covers(a, b) || covers(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEEDS: &str = r#"
apiVersion: egress/v1alpha1
kind: EgressConfig
metadata:
  name: default
spec:
  outboundTrafficPolicy:
    mode: REGISTRY_ONLY
  interception:
    includeOutboundIPRanges: "*"
    excludeOutboundIPRanges: ["10.0.0.0/8", "fd00::/8"]
    includeOutboundPorts: "8443, 9000"
    excludeOutboundPorts: [22]
    excludeUids: [1337]
    excludeGids: "1338"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin-ext
  namespace: default
spec:
  hosts: [httpbin.org]
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: tcp-ext
spec:
  hosts: [tcp.example]
  addresses: [198.18.0.0/24, 2001:db8::1]
  ports:
  - number: 443
    name: tcp
    protocol: TCP
  resolution: NONE
"#;

    #[test]
    fn parses_egress_config_and_service_entries() {
        let l = parse_str("mesh.yaml", SEEDS).expect("valid");
        let c = &l.config;
        assert_eq!(c.mode, Mode::RegistryOnly);
        let i = &c.interception;
        assert_eq!(i.include_ranges, all_ranges());
        assert_eq!(
            i.exclude_ranges,
            vec![
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "fd00::/8".parse().unwrap()
            ]
        );
        assert_eq!(i.include_ports, vec![8443, 9000]);
        assert_eq!(i.exclude_ports, vec![22]);
        assert_eq!(i.exclude_uids, vec![1337]);
        assert_eq!(i.exclude_gids, vec![1338]);
        assert_eq!(c.service_entries.len(), 2);
        let tcp = &c.service_entries[1];
        assert_eq!(
            (tcp.namespace.as_str(), tcp.name.as_str()),
            ("default", "tcp-ext")
        );
        assert_eq!(
            tcp.addresses,
            vec![
                "198.18.0.0/24".parse::<IpNet>().unwrap(),
                "2001:db8::1/128".parse().unwrap()
            ]
        );
        // httpbin-ext has no addresses: it is matched by Host, nothing to warn about; the
        // exclusions are holes in REGISTRY_ONLY, each knob said once.
        let warned: Vec<String> = l.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(warned.len(), 4, "{warned:?}");
        assert!(
            warned
                .iter()
                .all(|w| w.contains("excluded, so not decided")),
            "{warned:?}"
        );
    }

    #[test]
    fn errors_name_file_document_resource_and_field() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ok}
spec: {hosts: [a.example], addresses: [198.18.0.1], ports: [{number: 80, name: h, protocol: TCP}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wikipedia-ext, namespace: default}
spec:
  hosts: [en.wikipedia.org]
  addresses: [198.18.0.0/24, 91.198.174.0/33]
  ports:
  - {number: 70000, name: x, protocol: TCP}
  - {number: 443, name: y, protocol: QUIC}
"#;
        let e = parse_str("mesh/wikipedia.yaml", text).unwrap_err();
        let msgs: Vec<String> = e.errors.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            msgs,
            vec![
                "mesh/wikipedia.yaml doc 2 ServiceEntry default/wikipedia-ext: spec.addresses[1]: \
                 \"91.198.174.0/33\" is not an IP address or CIDR",
                "mesh/wikipedia.yaml doc 2 ServiceEntry default/wikipedia-ext: spec.ports[0].number: \
                 70000 is not a port (1-65535)",
                "mesh/wikipedia.yaml doc 2 ServiceEntry default/wikipedia-ext: spec.ports[1].protocol: \
                 \"QUIC\" is not one of HTTP, HTTPS, HTTP2, GRPC, GRPC-Web, HTTP_PROXY, TLS, \
                 TCP, MONGO, Redis, MySQL, UDP",
            ]
        );
    }

    #[test]
    fn type_errors_carry_the_field_path() {
        let text = "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\n\
                    spec:\n  outboundTrafficPolicy: {mode: DENY_ALL}\n";
        let e = parse_str("m.yaml", text).unwrap_err();
        let m = e.errors[0].to_string();
        assert!(
            m.starts_with("m.yaml doc 1 EgressConfig default/d: spec.outboundTrafficPolicy.mode: "),
            "{m}"
        );
        assert!(m.contains("DENY_ALL"), "{m}");
    }

    #[test]
    fn an_external_service_of_istio_0_7_is_the_service_entry_it_became() {
        let text = r#"
apiVersion: networking.istio.io/v1alpha3
kind: ExternalService
metadata: {name: wikipedia-ext}
spec:
  hosts:
  - 91.198.174.192/27
  - 2620:0:862:ed1a::1
  ports:
  - number: 443
    protocol: tcp
    name: tcp
  discovery: none
---
apiVersion: networking.istio.io/v1alpha3
kind: ExternalService
metadata: {name: httpbin-ext}
spec:
  hosts: [httpbin.org]
  ports: [{number: 80, name: http, protocol: http}]
  discovery: dns
"#;
        let l = parse_str("m.yaml", text).unwrap();
        let [wiki, httpbin] = &l.config.service_entries[..] else {
            panic!("{:?}", l.config.service_entries);
        };
        assert_eq!(wiki.spec.hosts, ["wikipedia-ext.default.external"]);
        assert_eq!(
            wiki.addresses,
            [
                "91.198.174.192/27".parse::<IpNet>().unwrap(),
                "2620:0:862:ed1a::1/128".parse().unwrap()
            ]
        );
        assert_eq!(wiki.spec.resolution.as_deref(), Some("NONE"));
        assert_eq!(wiki.spec.ports[0].protocol.as_deref(), Some("TCP"));
        assert_eq!(httpbin.spec.hosts, ["httpbin.org"]);
        assert!(httpbin.addresses.is_empty());
        assert_eq!(httpbin.spec.resolution.as_deref(), Some("DNS"));
        assert_eq!(httpbin.spec.ports[0].protocol.as_deref(), Some("HTTP"));
        assert!(
            l.warnings.iter().any(|w| w
                .to_string()
                .contains("ExternalService (Istio 0.7) is read as")),
            "{:?}",
            l.warnings
        );
        // What is neither a name nor an address is named, at its place in hosts.
        let bad = text.replace("91.198.174.192/27", "not a/host");
        let e = parse_str("m.yaml", &bad).unwrap_err();
        let m = e.errors[0].to_string();
        assert!(
            m.starts_with("m.yaml doc 1 ExternalService default/wikipedia-ext: spec.hosts[0]: "),
            "{m}"
        );
    }

    #[test]
    fn failure_mode_is_closed_unless_open_is_said() {
        let head = "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\n";
        let c = parse_str("m.yaml", head).unwrap().config;
        assert_eq!(c.failure_mode, super::super::FailureMode::Closed);
        let c = parse_str("m.yaml", &format!("{head}spec: {{failureMode: open}}\n"))
            .unwrap()
            .config;
        assert_eq!(c.failure_mode, super::super::FailureMode::Open);
        let e = parse_str("m.yaml", &format!("{head}spec: {{failureMode: Open}}\n")).unwrap_err();
        let m = e.errors[0].to_string();
        assert!(
            m.starts_with("m.yaml doc 1 EgressConfig default/d: spec.failureMode: "),
            "{m}"
        );
        assert!(m.contains("`closed`") && m.contains("`open`"), "{m}");
    }

    #[test]
    fn exclusions_are_named_as_holes_where_registry_only_is_in_force() {
        let head = "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\n";
        let spec = "  interception:\n    excludeOutboundIPRanges: [198.51.100.0/24]\n    \
                    excludeOutboundPorts: [22]\n    excludeUids: [1337]\n";
        let holes = |text: &str| -> Vec<String> {
            parse_str("m.yaml", text)
                .unwrap()
                .warnings
                .iter()
                .map(ToString::to_string)
                .filter(|w| w.contains("not decided"))
                .collect()
        };
        assert!(
            holes(&format!("{head}spec:\n{spec}")).is_empty(),
            "ALLOW_ANY"
        );
        let strict = holes(&format!(
            "{head}spec:\n  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}\n{spec}"
        ));
        assert_eq!(strict.len(), 3, "{strict:?}");
        assert!(
            strict[0].starts_with(
                "m.yaml doc 1 EgressConfig default/d: spec.interception.excludeOutboundIPRanges: \
                 198.51.100.0/24: excluded, so not decided"
            ),
            "{strict:?}"
        );
        // A namespace's Sidecar under REGISTRY_ONLY is enough.
        let sidecar = "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\n\
                       metadata: {name: default, namespace: team-a}\n\
                       spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n";
        assert_eq!(holes(&format!("{head}spec:\n{spec}{sidecar}")).len(), 3);
    }

    #[test]
    fn raw_sockets_follow_the_mode_unless_said() {
        use super::super::RawSockets;
        let head = "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\n";
        let c = parse_str("m.yaml", head).unwrap().config;
        assert_eq!(c.raw_sockets, None);
        assert_eq!(
            RawSockets::code(c.raw_sockets),
            egress_common::RAW_SOCKETS_BY_MODE
        );
        for (v, want) in [("allow", RawSockets::Allow), ("refuse", RawSockets::Refuse)] {
            let c = parse_str("m.yaml", &format!("{head}spec: {{rawSockets: {v}}}\n"))
                .unwrap()
                .config;
            assert_eq!(c.raw_sockets, Some(want));
        }
        let e = parse_str("m.yaml", &format!("{head}spec: {{rawSockets: deny}}\n")).unwrap_err();
        let m = e.errors[0].to_string();
        assert!(
            m.starts_with("m.yaml doc 1 EgressConfig default/d: spec.rawSockets: "),
            "{m}"
        );
        assert!(m.contains("`refuse`") && m.contains("`allow`"), "{m}");
    }

    #[test]
    fn dns_capture_is_all_unless_resolv_conf_is_said() {
        let head = "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\n";
        let c = parse_str("m.yaml", head).unwrap().config;
        assert_eq!(c.dns_capture, super::super::DnsCapture::All);
        let c = parse_str(
            "m.yaml",
            &format!("{head}spec: {{dns: {{capture: RESOLV_CONF, learnFrom: [198.18.0.53]}}}}\n"),
        )
        .unwrap()
        .config;
        assert_eq!(c.dns_capture, super::super::DnsCapture::ResolvConf);
        assert_eq!(c.dns_learn_from, vec!["198.18.0.53/32".parse().unwrap()]);
        let c = parse_str(
            "m.yaml",
            &format!("{head}spec: {{dns: {{capture: ALL}}}}\n"),
        )
        .unwrap()
        .config;
        assert_eq!(c.dns_capture, super::super::DnsCapture::All);
        for bad in ["resolv_conf", "NONE", "\"\"", "[ALL]", "1"] {
            let text = format!("---\n{head}spec:\n  dns:\n    capture: {bad}\n");
            let e = parse_str("m.yaml", &text).unwrap_err();
            let m = e.errors[0].to_string();
            assert!(
                m.starts_with("m.yaml doc 1 EgressConfig default/d: spec.dns.capture: "),
                "{bad}: {m}"
            );
            assert!(m.ends_with("one of ALL, RESOLV_CONF"), "{bad}: {m}");
        }
    }

    #[test]
    fn unknown_fields_and_kinds_are_warned_about() {
        let text = r#"
apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: d}
spec:
  interception:
    traffic.sidecar.istio.io/excludeOutboundIPRanges: "10.1.0.0/16,10.2.0.0/16"
  autoAllocate: {enabeld: true}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: [a.example]
  http:
  - match: [{uri: {regex: "/a.*"}}]
    fault: {abort: {httpStatus: 500}}
    route: [{destination: {host: a.example}}]
"#;
        let l = parse_str("m.yaml", text).expect("valid");
        assert_eq!(l.config.interception.exclude_ranges.len(), 2);
        let w: Vec<String> = l.warnings.iter().map(|p| p.to_string()).collect();
        assert!(
            w.iter()
                .any(|w| w.contains("spec.autoAllocate.enabeld: unknown field, ignored")),
            "{w:?}"
        );
        assert!(
            w.iter().any(|w| w.contains("doc 2 VirtualService default/vs: spec.http[0].match[0].uri: only uri and method with exact or prefix are matched")),
            "{w:?}"
        );
        assert!(
            w.iter()
                .any(|w| w
                    .contains("doc 2 VirtualService default/vs: spec.http[0].fault: not applied")),
            "{w:?}"
        );
    }

    #[test]
    fn every_error_is_reported_and_bad_yaml_is_located() {
        let text = "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\nspec:\n  \
                    interception:\n    excludeOutboundPorts: [0, 22, x]\n    excludeUids: [-1]\n";
        let e = parse_str("m.yaml", text).unwrap_err();
        assert_eq!(e.errors.len(), 3, "{:?}", e.errors);
        let e = parse_str("m.yaml", "kind: [unclosed\n").unwrap_err();
        assert!(
            e.errors[0]
                .to_string()
                .starts_with("m.yaml doc 1: not valid YAML"),
            "{:?}",
            e.errors
        );
        let e = parse_str("m.yaml", "a: 1\n").unwrap_err();
        assert!(e.errors[0].message.contains("apiVersion"));
    }

    #[test]
    fn a_second_egress_config_is_an_error() {
        let doc = "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: d}\n";
        let e = parse_str("m.yaml", &format!("{doc}---\n{doc}")).unwrap_err();
        assert!(
            e.errors[0].message.contains("a second EgressConfig"),
            "{:?}",
            e.errors
        );
    }

    #[test]
    fn istio_routing_resources_are_validated_and_kept() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin-ext}
spec:
  hosts: [httpbin.org]
  http:
  - timeout: 3s
    retries: {attempts: 2, perTryTimeout: 1.5s, retryOn: "connect-failure,5xx"}
    route:
    - destination: {host: httpbin.org, port: {number: 80}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: secure}
spec:
  host: secure.example
  trafficPolicy:
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: SIMPLE, sni: secure.example, caCertificates: CA_FILE}
---
apiVersion: networking.istio.io/v1alpha3
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"#;
        let ca = egress_tests::l7::TestCa::new("routing");
        let text = text.replace("CA_FILE", &ca.path().display().to_string());
        let l = parse_str("m.yaml", &text).expect("valid");
        let c = &l.config;
        assert_eq!(
            c.virtual_services[0].spec.http[0].timeout.as_deref(),
            Some("3s")
        );
        let tls = c.destination_rules[0]
            .spec
            .traffic_policy
            .as_ref()
            .unwrap()
            .port_level_settings[0]
            .tls
            .as_ref();
        assert_eq!(tls.and_then(|t| t.sni.as_deref()), Some("secure.example"));
        assert_eq!(c.sidecars[0].namespace, "istio-system");
        assert_eq!(
            c.sidecars[0]
                .spec
                .outbound_traffic_policy
                .as_ref()
                .map(|p| p.mode),
            Some(Mode::RegistryOnly)
        );
        // The mesh-wide setting stays as written; the root namespace's Sidecar is the default
        // for every namespace without one of its own (`plan::Policies`), with no warning.
        assert_eq!(c.mode, Mode::AllowAny);
        assert_eq!(c.root_namespace(), "istio-system");
        assert!(
            !l.warnings
                .iter()
                .any(|w| w.to_string().contains("outboundTrafficPolicy")),
            "{:?}",
            l.warnings
        );
        let p = crate::plan::compile(c);
        assert_eq!(p.policies.default.mode, egress_common::MODE_REGISTRY_ONLY);

        let bad = text
            .replace("timeout: 3s", "timeout: 3 seconds")
            .replace("mode: SIMPLE", "mode: TLS");
        let e = parse_str("m.yaml", &bad).unwrap_err();
        let msgs: Vec<String> = e.errors.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            msgs,
            vec![
                "m.yaml doc 1 VirtualService default/httpbin-ext: spec.http[0].timeout: \"3 seconds\" is not a duration such as 3s, 1.5s or 100ms",
                "m.yaml doc 2 DestinationRule default/secure: spec.trafficPolicy.portLevelSettings[0].tls.mode: \"TLS\" is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL",
            ]
        );
    }

    #[test]
    fn kubernetes_endpoint_errors_are_located() {
        let text = "kind: Endpoints\napiVersion: v1\nmetadata: {name: svc}\nsubsets:\n- addresses: [{ip: 198.18.0.300}]\n  ports: [{port: 0}]\n---\n\
                    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: svc}}\n\
                    addressType: IPv4\nendpoints: [{addresses: [198.18.0.1], conditions: {ready: false}}, {addresses: [198.18.0.2]}]\nports: [{port: 443}]\n";
        let e = parse_str("k.yaml", text).unwrap_err();
        let msgs: Vec<String> = e.errors.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            msgs,
            vec![
                "k.yaml doc 1 Endpoints default/svc: subsets[0].addresses[0].ip: \"198.18.0.300\" is not an IP address",
                "k.yaml doc 1 Endpoints default/svc: subsets[0].ports[0].port: 0 is not a port (1-65535)",
            ]
        );
        // Only the ready endpoint of the slice counts.
        let ok = parse_str("k.yaml", text.split("---\n").nth(1).unwrap()).expect("valid");
        assert_eq!(
            ok.config.endpoints[0].addresses,
            vec!["198.18.0.2".parse::<IpAddr>().unwrap()]
        );
    }

    /// `field: message` of each error and warning of `text`, loaded as one file.
    fn problems(text: &str) -> (Vec<String>, Vec<String>) {
        let show = |ps: &[Problem]| {
            ps.iter()
                .map(|p| format!("{}: {}", p.field, p.message))
                .collect()
        };
        match parse_str("m.yaml", text) {
            Ok(l) => (Vec::new(), show(&l.warnings)),
            Err(e) => (show(&e.errors), show(&e.warnings)),
        }
    }

    /// A ServiceEntry document with this spec (flow or block YAML, indented by two).
    fn se(spec: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se}}\n\
             spec:\n{spec}\n"
        )
    }

    fn vs(spec: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\n\
             spec:\n{spec}\n"
        )
    }

    fn dr(spec: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: dr}}\n\
             spec:\n{spec}\n"
        )
    }

    /// The errors of a ServiceEntry with these hosts, port and resolution.
    fn host_errors(host: &str) -> Vec<String> {
        problems(&se(&format!(
            "  hosts: [\"{host}\"]\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  \
             resolution: NONE"
        )))
        .0
    }

    #[test]
    fn service_entry_hosts_as_istio_checks_them() {
        for good in [
            "a.example",
            "*.example.com",
            "Mixed-Case.example",
            "example.com.",
            "x",
        ] {
            assert_eq!(host_errors(good), Vec::<String>::new(), "{good}");
        }
        // A lone `*` would register every host on the entry's ports: never.
        let e = host_errors("*");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("spec.hosts[0]: \"*\" alone is not a host"),
            "{e:?}"
        );
        for (bad, why) in [
            ("a*.example.com", "label \"a*\""),
            ("*foo.example.com", "partial wildcard"),
            ("a.*.example", "label \"*\""),
            ("a..example", "label \"\""),
            ("under_score.example", "label \"under_score\""),
            ("-a.example", "label \"-a\""),
            ("198.18.0.1", "all digits"),
            ("", "empty"),
        ] {
            let e = host_errors(bad);
            assert!(e.len() == 1 && e[0].contains(why), "{bad}: {e:?}");
        }
        let long = format!("{}.example", "a".repeat(64));
        assert!(host_errors(&long)[0].contains("label"));
    }

    #[test]
    fn service_entry_ports_have_unique_numbers_and_names() {
        let (e, _) = problems(&se("  hosts: [a.example]\n  ports:\n  \
             - {number: 80, name: http, protocol: HTTP}\n  \
             - {number: 80, name: web, protocol: HTTP}\n  \
             - {number: 81, name: http, protocol: HTTP}\n  \
             - {number: 82, protocol: HTTP}\n  \
             - {number: 83, name: Http_1, protocol: HTTP}\n  \
             - {number: 84, name: q, protocol: QUIC}"));
        assert_eq!(
            e,
            vec![
                "spec.ports[1].number: 80 is spec.ports[0]'s number too",
                "spec.ports[2].name: \"http\" is spec.ports[0]'s name too",
                "spec.ports[3].name: missing: every port has a name (a DNS-1123 label)",
                "spec.ports[4].name: \"Http_1\" is not a port name (a DNS-1123 label: letters, \
                 digits, inner dashes)",
                "spec.ports[5].protocol: \"QUIC\" is not one of HTTP, HTTPS, HTTP2, GRPC, \
                 GRPC-Web, HTTP_PROXY, TLS, TCP, MONGO, Redis, MySQL, UDP",
            ]
        );
        // Istio's other protocols load: MySQL is TCP, as in Istio without its MySQL filter.
        let text = se(
            "  hosts: [a.example]\n  addresses: [198.18.0.1]\n  ports:\n  \
             - {number: 3306, name: mysql, protocol: MySQL}\n  \
             - {number: 53, name: dns, protocol: udp}",
        );
        let l = parse_str("m.yaml", &text).expect("valid");
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        let ports: Vec<u32> = l.config.service_entries[0]
            .spec
            .ports
            .iter()
            .map(|p| p.number)
            .collect();
        assert_eq!(ports, [3306, 53]);
    }

    #[test]
    fn service_entry_endpoints_follow_the_resolution() {
        let ports = "  ports: [{number: 80, name: http, protocol: HTTP}]\n";
        let with = |rest: &str| problems(&se(&format!("  hosts: [a.example]\n{ports}{rest}")));
        // NONE (also when not said) goes where the client dialled: no endpoints.
        for r in ["  resolution: NONE\n", ""] {
            let (e, _) = with(&format!("{r}  endpoints: [{{address: 198.18.0.1}}]"));
            assert_eq!(
                e,
                [
                    "spec.endpoints: resolution NONE takes no endpoints: connections go to the \
                  address dialled"
                ]
            );
        }
        // STATIC: addresses, and ports the entry names.
        let (e, _) = with(
            "  resolution: STATIC\n  endpoints:\n  - {address: 198.18.0.1, ports: {http: 8080}}\n  \
             - {address: backend.example}\n  - {address: 198.18.0.2, ports: {web: 8080}}\n  \
             - {ports: {http: 70000}}",
        );
        assert_eq!(
            e,
            vec![
                "spec.endpoints[1].address: \"backend.example\" is not an IP address (resolution \
                 STATIC)",
                "spec.endpoints[2].ports.web: no port of the entry is named \"web\"",
                "spec.endpoints[3].address: missing",
                "spec.endpoints[3].ports.http: 70000 is not a port (1-65535)",
            ]
        );
        // Unix sockets: an absolute path or @name, no ports, one port on the entry; egress
        // does not connect to them.
        let (e, w) = with("  resolution: STATIC\n  endpoints: [{address: \"unix:///run/a.sock\"}]");
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            w,
            [
                "spec.endpoints[0].address: Unix socket endpoints are not applied: egress connects \
              over TCP"
            ]
        );
        let (e, _) = with(
            "  resolution: STATIC\n  endpoints: [{address: \"unix://run/a.sock\", ports: {http: 80}}]",
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("an absolute path") && e[1].contains("takes no ports"));
        // DNS: names or addresses; hosts resolved themselves must be names, not wildcards.
        let (e, _) = with("  resolution: DNS\n  endpoints: [{address: backend.example}]");
        assert!(e.is_empty(), "{e:?}");
        let (e, _) = with("  resolution: DNS\n  endpoints: [{address: \"bad name\"}]");
        assert!(e[0].starts_with("spec.endpoints[0].address: \"bad name\" is neither"));
        let (e, _) = problems(&se(&format!(
            "  hosts: [\"*.a.example\"]\n{ports}  resolution: DNS"
        )));
        assert!(
            e[0].starts_with("spec.hosts[0]: resolution DNS without endpoints resolves the hosts"),
            "{e:?}"
        );
        let (e, _) = with(
            "  resolution: DNS_ROUND_ROBIN\n  endpoints: [{address: a.example}, {address: b.example}]",
        );
        assert_eq!(
            e,
            ["spec.endpoints: resolution DNS_ROUND_ROBIN takes one endpoint at most"]
        );
        // CIDRs need NONE or STATIC.
        let (e, _) = with("  resolution: DNS\n  addresses: [198.18.0.0/24]");
        assert_eq!(
            e,
            ["spec.addresses[0]: a CIDR needs resolution NONE or STATIC, not DNS"]
        );
        // A TCP connection does not say its host: several hosts need NONE, or HTTP/TLS ports.
        let tcp =
            "  hosts: [a.example, b.example]\n  ports: [{number: 5432, name: pg, protocol: TCP}]\n";
        let (e, _) = problems(&se(&format!("{tcp}  resolution: DNS")));
        assert_eq!(
            e,
            [
                "spec.hosts: several hosts with resolution DNS need HTTP or TLS ports, which say the \
              host; spec.ports[0] is TCP"
            ]
        );
        assert!(
            problems(&se(&format!("{tcp}  resolution: NONE")))
                .0
                .is_empty()
        );
        // Endpoints or a workload selector, not both.
        let (e, _) = with(
            "  resolution: STATIC\n  workloadSelector: {labels: {app: a}}\n  endpoints: [{address: 198.18.0.1}]",
        );
        assert_eq!(
            e,
            ["spec.workloadSelector: only one of workloadSelector and endpoints may be given"]
        );
    }

    #[test]
    fn dynamic_dns_is_checked_as_istio_does_then_left_out_with_a_warning() {
        let ok = se(
            "  hosts: [\"*.example.com\"]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  \
                     resolution: DYNAMIC_DNS",
        );
        let l = parse_str("m.yaml", &ok).expect("valid");
        assert!(l.config.service_entries.is_empty());
        assert_eq!(l.warnings.len(), 1);
        assert_eq!(
            l.warnings[0].to_string(),
            "m.yaml doc 1 ServiceEntry default/se: spec.resolution: DYNAMIC_DNS is not applied by \
             this version of egress: this entry is ignored"
        );
        let (e, _) = problems(&se("  hosts: [a.example]\n  addresses: [198.18.0.1]\n  \
             ports: [{number: 5432, name: pg, protocol: TCP}]\n  resolution: DYNAMIC_DNS"));
        assert_eq!(
            e,
            vec![
                "spec.hosts[0]: \"a.example\": resolution DYNAMIC_DNS takes wildcard hosts only",
                "spec.addresses: resolution DYNAMIC_DNS takes no addresses",
                "spec.ports[0].protocol: resolution DYNAMIC_DNS takes HTTP, TLS, GRPC and HTTP2 \
                 ports only",
            ]
        );
    }

    #[test]
    fn export_to_lists_each_namespace_once_and_star_or_tilde_alone() {
        let entry = |list: &str| {
            problems(&se(&format!(
                "  hosts: [a.example]\n  ports: [{{number: 80, name: http}}]\n  exportTo: {list}"
            )))
            .0
        };
        assert!(entry("[\".\", team-a]").is_empty());
        assert!(entry("[\"~\"]").is_empty());
        assert_eq!(
            entry("[default, \".\"]"),
            ["spec.exportTo[1]: \".\" and \"default\" are the same namespace"]
        );
        assert_eq!(
            entry("[team-a, team-a]"),
            ["spec.exportTo[1]: \"team-a\" is listed twice"]
        );
        assert_eq!(
            entry("[\"*\", team-a]"),
            ["spec.exportTo[0]: \"*\" cannot be listed with other namespaces"]
        );
        assert_eq!(
            entry("[Team_A]"),
            ["spec.exportTo[0]: \"Team_A\" is not a namespace, \".\" or \"*\""]
        );
        let (e, _) = problems(&vs("  hosts: [a.example]\n  exportTo: [\"~\"]\n  \
             http: [{route: [{destination: {host: a.example}}]}]"));
        assert_eq!(
            e,
            ["spec.exportTo[0]: \"~\" (no one) is for ServiceEntries only"]
        );
    }

    /// The errors of a VirtualService for a.example with this one HTTP route (flow YAML).
    fn route_errors(route: &str) -> Vec<String> {
        problems(&vs(&format!("  hosts: [a.example]\n  http: [{route}]"))).0
    }

    #[test]
    fn timeouts_and_retries_within_istios_bounds() {
        let dest = "route: [{destination: {host: a.example}}]";
        for ok in [
            "timeout: 1ms",
            "timeout: 1.5s",
            "timeout: 0.3s",
            "timeout: 1m30s",
            "retries: {attempts: 3, perTryTimeout: 2s, retryOn: \"5xx,connect-failure,503\"}",
            "retries: {attempts: 0}",
            "retries: {attempts: 2, retryOn: \"cancelled,unavailable,retriable-4xx\"}",
        ] {
            assert_eq!(
                route_errors(&format!("{{{ok}, {dest}}}")),
                Vec::<String>::new(),
                "{ok}"
            );
        }
        for (bad, want) in [
            (
                "timeout: 500us",
                "spec.http[0].timeout: \"500us\" is shorter than 1ms",
            ),
            (
                "timeout: 0s",
                "spec.http[0].timeout: \"0s\" is shorter than 1ms",
            ),
            (
                "timeout: 1.0005s",
                "spec.http[0].timeout: \"1.0005s\" is finer than a millisecond",
            ),
            ("timeout: -1s", "spec.http[0].timeout: \"-1s\" is negative"),
            (
                "retries: {attempts: -1}",
                "spec.http[0].retries.attempts: must not be negative",
            ),
            (
                "retries: {perTryTimeout: 1s}",
                "spec.http[0].retries.attempts: 0 (or missing) disables retries, yet \
                 perTryTimeout, retryOn or retryRemoteLocalities is set",
            ),
            (
                "retries: {attempts: 2, perTryTimeout: 0.1ms}",
                "spec.http[0].retries.perTryTimeout: \"0.1ms\" is shorter than 1ms",
            ),
            (
                "retries: {attempts: 2, backoff: 1.5ms5us}",
                "spec.http[0].retries.backoff: \"1.5ms5us\" is finer than a millisecond",
            ),
        ] {
            assert_eq!(route_errors(&format!("{{{bad}, {dest}}}")), [want], "{bad}");
        }
        let e = route_errors(&format!(
            "{{retries: {{attempts: 2, retryOn: \"5xx, conect-failure,999,\"}}, {dest}}}"
        ));
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].contains("\" conect-failure\" is not a retryOn policy"),
            "{e:?}"
        );
        assert!(
            e[0].ends_with("(did you mean \"connect-failure\"?)"),
            "{e:?}"
        );
        assert!(e[1].contains("\"999\" is not a retryOn policy"), "{e:?}");
        assert!(e[2].contains("\"\" is not a retryOn policy"), "{e:?}");
        // Written without a space, as Istio reads them: the space is part of the token.
        assert!(
            route_errors(&format!(
                "{{retries: {{attempts: 1, retryOn: \"5xx, 503\"}}, {dest}}}"
            ))[0]
                .contains("\" 503\"")
        );
    }

    #[test]
    fn header_names_and_values_as_envoy_takes_them() {
        let dest = "route: [{destination: {host: a.example}}]";
        let ok = format!(
            "{{match: [{{headers: {{x-user: {{exact: a}}, \":authority\": {{exact: b}}, \
             \":path\": {{exact: c}}}}}}], \
             headers: {{request: {{set: {{x-env: \"%HOSTNAME%\", host: b.example}}, add: \
             {{x-pct: \"100%%\", x-req: \"%REQ(x-a)%\", x-args: \"%FN([\\\"a\\\", \\\"b\\\"])%\"}}, \
             remove: [x-debug]}}, response: {{set: {{x-by: egress}}}}}}, {dest}}}"
        );
        assert_eq!(route_errors(&ok), Vec::<String>::new());
        let bad = format!(
            "{{match: [{{headers: {{\"x user\": {{exact: a}}}}, port: 0}}], \
             headers: {{request: {{set: {{\":path\": /x, x-a: \"50%\", x-b: \"%OPEN\"}}, \
             remove: [\":authority\"]}}, response: {{add: {{Host: x}}}}}}, {dest}}}"
        );
        assert_eq!(
            route_errors(&bad),
            vec![
                "spec.http[0].match[0].headers: \"x user\" is not a header name",
                "spec.http[0].match[0].port: 0 is not a port (1-65535)",
                "spec.http[0].headers.request.set.:path: \":path\": a header cannot start with \":\"",
                "spec.http[0].headers.request.set.x-a: \"50%\": a lone % at the end (%% is a \
                 percent sign)",
                "spec.http[0].headers.request.set.x-b: \"%OPEN\": a %VARIABLE% is not closed",
                "spec.http[0].headers.request.remove[0]: \":authority\": a header cannot start \
                 with \":\"",
                "spec.http[0].headers.response.add.Host: \"Host\": the Host header cannot be set \
                 this way",
            ]
        );
        let ctl = format!("{{headers: {{request: {{set: {{x-a: \"a\\u0001b\"}}}}}}, {dest}}}");
        assert_eq!(
            route_errors(&ctl),
            ["spec.http[0].headers.request.set.x-a: \"a\\u{1}b\" holds a control character"]
        );
    }

    #[test]
    fn routes_destinations_and_hosts_of_a_virtual_service() {
        for (route, want) in [
            (
                "{timeout: 1s}",
                "spec.http[0].route: a route, a redirect or a directResponse is required",
            ),
            (
                "{redirect: {uri: /b}, route: [{destination: {host: a.example}}]}",
                "spec.http[0]: redirect and route cannot both be given",
            ),
            (
                "{directResponse: {status: 503}, fault: {abort: {httpStatus: 500}}}",
                "spec.http[0]: directResponse and fault cannot both be given",
            ),
            (
                "{route: [{destination: {host: \"*\"}}]}",
                "spec.http[0].route[0].destination.host: \"*\" is not a destination",
            ),
            (
                "{route: [{destination: {host: a.example, subset: V_1}}]}",
                "spec.http[0].route[0].destination.subset: \"V_1\" is not a subset name",
            ),
            (
                "{route: [{destination: {host: a.example}, weight: -1}]}",
                "spec.http[0].route[0].weight: must not be negative",
            ),
            (
                "{route: [{destination: {host: a.example}}, {destination: {host: b.example}}]}",
                "spec.http[0].route: the destinations' weights add up to 0",
            ),
        ] {
            assert_eq!(route_errors(route), [want], "{route}");
        }
        let route = "  http: [{route: [{destination: {host: a.example}}]}]";
        let (e, _) = problems(&vs(&format!(
            "  hosts: [\"*.a.example\", b.a.example]\n{route}"
        )));
        assert_eq!(
            e,
            [
                "spec.hosts[1]: \"b.a.example\" and spec.hosts[0] \"*.a.example\" name the same hosts"
            ]
        );
        let (e, _) = problems(&vs(&format!("  hosts: [\"*\"]\n{route}")));
        assert_eq!(
            e,
            ["spec.hosts[0]: \"*\" is not a host of a VirtualService bound to the mesh"]
        );
        let (e, _) = problems(&vs("  hosts: [a.example]"));
        assert_eq!(e, ["spec: http, tcp or tls routes are required"]);
    }

    #[test]
    fn jwt_claims_are_routed_on_at_gateways_only() {
        let spec = |gateways: &str| {
            vs(&format!(
                "  hosts: [a.example]\n  gateways: {gateways}\n  http:\n  - match: \
                 [{{headers: {{\"@request.auth.claims.sub\": {{exact: a}}}}}}]\n    \
                 route: [{{destination: {{host: a.example}}}}]"
            ))
        };
        assert_eq!(
            problems(&spec("[mesh]")).0,
            [
                "spec.http[0].match[0].headers: routing on JWT claims is for gateways: this \
              VirtualService is bound to the mesh"
            ]
        );
        assert!(problems(&spec("[istio-system/gw]")).0.is_empty());
    }

    #[test]
    fn gateways_bound_virtual_services_and_delegates_are_not_applied() {
        let route = "  http: [{route: [{destination: {host: a.example}}]}]";
        let load = |spec: &str| parse_str("m.yaml", &vs(spec));
        // Bound to gateways only: Istio's gateways apply it, not the mesh's sidecars.
        let l = load(&format!(
            "  hosts: [\"*\"]\n  gateways: [istio-system/egress]\n{route}"
        ))
        .expect("valid");
        assert!(l.config.virtual_services.is_empty());
        assert_eq!(
            l.warnings[0].to_string(),
            "m.yaml doc 1 VirtualService default/vs: spec.gateways: bound to gateways only \
             (\"mesh\" is not listed): not applied to the mesh's traffic, which egress mediates"
        );
        let l = load(&format!(
            "  hosts: [a.example]\n  gateways: [mesh, istio-system/egress]\n{route}"
        ))
        .expect("valid");
        assert_eq!(l.config.virtual_services.len(), 1);
        let l = load(&format!(
            "  hosts: [a.example]\n  gateways: [egress-gateway.istio-system]\n{route}"
        ))
        .expect("valid");
        assert!(
            l.warnings[0].to_string().contains(
                "\"egress-gateway.istio-system\" is the legacy form of a gateway name: write \
                 \"istio-system/egress-gateway\""
            ),
            "{:?}",
            l.warnings
        );
        let (e, _) = problems(&vs(&format!(
            "  hosts: [a.example]\n  gateways: [\"/gw\", \"ns/Bad_Name\"]\n{route}"
        )));
        assert_eq!(
            e,
            vec![
                "spec.gateways[0]: \"/gw\": a gateway is namespace/name, both given",
                "spec.gateways[1]: \"ns/Bad_Name\": \"Bad_Name\" is not a gateway name",
            ]
        );
        // A delegate (no hosts) is valid Istio that egress does not apply yet.
        let l = load(route).expect("valid");
        assert!(l.config.virtual_services.is_empty());
        assert!(l.warnings[0].message.contains("a delegate VirtualService"));
        let (e, _) = problems(&vs(&format!("  gateways: [mesh]\n{route}")));
        assert_eq!(
            e,
            ["spec.gateways: a delegate VirtualService (one without hosts) has none"]
        );
    }

    #[test]
    fn destination_rule_tls_settings_that_conflict_or_cannot_be_applied() {
        let tls = |t: &str| {
            problems(&dr(&format!(
                "  host: a.example\n  trafficPolicy: {{tls: {t}}}"
            )))
        };
        let f = "spec.trafficPolicy.tls";
        assert_eq!(
            tls("{mode: SIMPLE, insecureSkipVerify: true, caCertificates: /x.pem}").0,
            [format!(
                "{f}.caCertificates: cannot be given with insecureSkipVerify: true"
            )]
        );
        assert_eq!(
            tls("{mode: SIMPLE, insecureSkipVerify: true}").0,
            [format!(
                "{f}.insecureSkipVerify: egress does not originate TLS without verifying the \
                 server: give caCertificates instead"
            )]
        );
        assert_eq!(
            tls("{mode: MUTUAL}").0,
            [
                format!("{f}.clientCertificate: missing: MUTUAL TLS needs it"),
                format!("{f}.privateKey: missing: MUTUAL TLS needs it"),
            ]
        );
        assert_eq!(
            tls("{mode: SIMPLE, credentialName: secret, caCertificates: /x.pem}").0,
            [format!(
                "{f}.caCertificates: cannot be given with credentialName"
            )]
        );
        let (e, w) = tls("{mode: SIMPLE, credentialName: secret}");
        assert!(e.is_empty(), "{e:?}");
        assert!(
            w[0].starts_with(&format!("{f}.credentialName: not applied")),
            "{w:?}"
        );
        // The CA file is read at load, where its place in the configuration is known.
        let (e, _) = tls("{mode: SIMPLE, caCertificates: /nonexistent/ca.pem}");
        assert_eq!(
            e,
            [format!(
                "{f}.caCertificates: reading /nonexistent/ca.pem: No such file or directory (os \
                 error 2)"
            )]
        );
        let (e, _) = tls("{mode: SIMPLE, caCertificates: /dev/null}");
        assert_eq!(
            e,
            [format!(
                "{f}.caCertificates: /dev/null is not a regular file"
            )]
        );
        // Policies that say nothing, and subsets.
        let (e, _) = problems(&dr("  host: a.example\n  trafficPolicy:\n    \
             portLevelSettings: [{tls: {mode: DISABLE}}, {port: {number: 80}}]\n  \
             subsets: [{name: v1}, {name: v1}, {name: V_2, trafficPolicy: {}}]"));
        assert_eq!(
            e,
            vec![
                "spec.trafficPolicy.portLevelSettings[0].port: missing",
                "spec.trafficPolicy.portLevelSettings[1]: empty: a port's traffic policy sets at \
                 least one field",
                "spec.subsets[1].name: \"v1\" is spec.subsets[0]'s name too",
                "spec.subsets[2].name: \"V_2\" is not a subset name (a DNS-1123 label)",
                "spec.subsets[2].trafficPolicy: empty: a traffic policy sets at least one field",
            ]
        );
        let (e, _) = problems(&dr("  host: \"a*.example\""));
        assert_eq!(
            e,
            ["spec.host: \"a*.example\" is not a host name (label \"a*\")"]
        );
    }

    fn egress(spec: &str) -> String {
        format!(
            "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {{name: d}}\nspec:\n{spec}\n"
        )
    }

    #[test]
    fn a_misspelt_knob_is_an_error_that_names_the_right_one() {
        // Istio's older names of the range knobs are aliases.
        let l = parse_str(
            "m.yaml",
            &egress(
                "  interception: {includeIPRanges: \"10.0.0.0/8\", excludeIPRanges: [10.1.0.0/16]}",
            ),
        )
        .expect("valid");
        let i = &l.config.interception;
        assert_eq!(i.include_ranges, ["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(i.exclude_ranges, ["10.1.0.0/16".parse::<IpNet>().unwrap()]);
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        for (spec, want) in [
            (
                "  interception: {excludeOutboundIPRange: [10.0.0.0/8]}",
                "spec.interception.excludeOutboundIPRange: unknown field: did you mean \
                 excludeOutboundIPRanges?",
            ),
            (
                "  interception: {includeIpRanges: \"*\"}",
                "spec.interception.includeIpRanges: unknown field: did you mean \
                 includeOutboundIPRanges?",
            ),
            (
                "  interception: {excludeInboundPorts: \"15020\"}",
                "spec.interception.excludeInboundPorts: unknown field: did you mean \
                 excludeOutboundPorts?",
            ),
            (
                "  interception: {captureAll: true}",
                "spec.interception.captureAll: unknown field: the knobs are \
                 includeOutboundIPRanges, excludeOutboundIPRanges, includeOutboundPorts, \
                 excludeOutboundPorts, excludeUids, excludeGids",
            ),
            (
                "  interception: {includeIPRanges: \"*\", includeOutboundIPRanges: \"*\"}",
                "spec.interception.includeIPRanges: includeOutboundIPRanges is given too: give \
                 one of them",
            ),
            (
                "  outboundTrafficPolicy: {mdoe: REGISTRY_ONLY}",
                "spec.outboundTrafficPolicy.mdoe: unknown field: did you mean mode?",
            ),
            (
                "  outboundTrafficPolicy: {egressProxy: {host: a.example}}",
                "spec.outboundTrafficPolicy.egressProxy: unknown field: the only field is mode",
            ),
        ] {
            assert_eq!(problems(&egress(spec)).0, [want], "{spec}");
        }
    }

    #[test]
    fn faults_and_mirrors_egress_does_not_apply_are_still_checked_as_istio_does() {
        let dest = "route: [{destination: {host: a.example}}]";
        for ok in [
            "fault: {abort: {httpStatus: 503, percentage: {value: 0.5}}}",
            "fault: {abort: {grpcStatus: UNAVAILABLE}, delay: {fixedDelay: 2s}}",
            "mirror: {host: b.example}, mirrorPercentage: {value: 100}",
        ] {
            assert_eq!(
                route_errors(&format!("{{{ok}, {dest}}}")),
                Vec::<String>::new(),
                "{ok}"
            );
        }
        for (bad, want) in [
            (
                "fault: {}",
                "spec.http[0].fault: an abort, a delay or both are required",
            ),
            (
                "fault: {abort: {httpStatus: 700}}",
                "spec.http[0].fault.abort.httpStatus: 700 is not an HTTP status (200-599)",
            ),
            (
                "fault: {abort: {httpStatus: 503, percentage: {value: 120}}}",
                "spec.http[0].fault.abort.percentage.value: 120 is neither 0 nor from 0.0001 to \
                 100",
            ),
            (
                "fault: {delay: {fixedDelay: 0.5ms}}",
                "spec.http[0].fault.delay.fixedDelay: \"0.5ms\" is shorter than 1ms",
            ),
            (
                "fault: {delay: {exponentialDelay: 1s}}",
                "spec.http[0].fault.delay.exponentialDelay: not supported by Istio",
            ),
            (
                "mirror: {host: b.example}, mirrorPercent: 101",
                "spec.http[0].mirrorPercent: 101 is not a percentage from 0 to 100",
            ),
            (
                "mirror: {host: b.example}, mirrors: [{destination: {host: c.example}}]",
                "spec.http[0]: mirror and mirrors cannot both be given",
            ),
        ] {
            assert_eq!(route_errors(&format!("{{{bad}, {dest}}}")), [want], "{bad}");
        }
        let e = route_errors(&format!(
            "{{fault: {{abort: {{grpcStatus: NOPE}}}}, {dest}}}"
        ));
        assert!(e[0].starts_with("spec.http[0].fault.abort.grpcStatus: NOPE is not one of OK,"));
    }

    #[test]
    fn a_sidecars_egress_proxy_goes_with_allow_any_and_is_not_applied() {
        let sidecar = |mode: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default}}\n\
                 spec:\n  outboundTrafficPolicy:\n    mode: {mode}\n    \
                 egressProxy: {{host: proxy.example, port: {{number: 3128}}}}\n"
            )
        };
        assert_eq!(
            problems(&sidecar("REGISTRY_ONLY")).0,
            ["spec.outboundTrafficPolicy.egressProxy: only with mode ALLOW_ANY"]
        );
        assert_eq!(
            problems(&sidecar("ALLOW_ANY")),
            (
                Vec::new(),
                vec![
                    "spec.outboundTrafficPolicy.egressProxy: not applied: what no ServiceEntry \
                     declares goes to its own destination"
                        .to_owned()
                ]
            )
        );
    }

    #[test]
    fn fields_istio_defines_are_not_applied_never_unknown() {
        let text = vs(
            "  hosts: [a.example]\n  http:\n  - mirror: {host: b.example}\n    \
                       mirrorPercentage: {value: 50}\n    corsPolicy: {allowOrigins: [{exact: x}]}\n    \
                       retries: {attempts: 1, retryIgnorePreviousHosts: true}\n    \
                       route: [{destination: {host: a.example}}]",
        ) + "---\n"
            + &dr(
                "  host: a.example\n  trafficPolicy: {tunnel: {protocol: CONNECT, targetHost: b, targetPort: 80}, retryBudget: {percent: {value: 10}}}\n  \
                   workloadSelector: {matchLabels: {app: a}}",
            );
        let l = parse_str("m.yaml", &text).expect("valid");
        let w: Vec<String> = l
            .warnings
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect();
        assert!(!w.iter().any(|w| w.contains("unknown field")), "{w:?}");
        let (e, entry_warnings) = problems(&se(
            "  hosts: [a.example]\n  ports: [{number: 80, name: http}]\n  \
             resolution: STATIC\n  subjectAltNames: [spiffe://a]\n  \
             endpoints: [{address: 198.18.0.1, weight: 2, locality: us/east}]",
        ));
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            entry_warnings,
            ["spec: not applied yet: subjectAltNames, endpoints' locality, endpoints' weight"]
        );
        for want in [
            "spec.http[0].mirror: not applied",
            "spec.http[0].mirrorPercentage: not applied",
            "spec.http[0].corsPolicy: not applied",
            "spec.trafficPolicy.tunnel: not applied",
            "spec.trafficPolicy.retryBudget: not applied",
        ] {
            assert!(w.iter().any(|w| w == want), "{want}: {w:?}");
        }
    }
}
