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

use crate::config::{Mode, istio, k8s};

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
const PROTOCOLS: [&str; 8] = [
    "HTTP", "HTTPS", "HTTP2", "GRPC", "TLS", "TCP", "MONGO", "UDP",
];
const DNS_CAPTURES: [&str; 2] = ["ALL", "RESOLV_CONF"];
const RESOLUTIONS: [&str; 4] = ["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"];
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
    let Cx { errors, warnings } = cx;
    Parsed {
        config: errors.is_empty().then_some(config),
        errors,
        warnings,
    }
}

/// Parse YAML text as if it were one file named `name` (tests and `validate` on stdin).
#[cfg(test)]
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

/// Istio's per-pod annotation spellings of the interception knobs, accepted as aliases.
const ANNOTATION_ALIASES: [(&str, &str); 4] = [
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
                if let Some(spec) = self.virtual_service(&origin, spec) {
                    config.virtual_services.push(Named {
                        namespace,
                        name,
                        spec,
                    });
                }
            }
            (v, "DestinationRule") if ISTIO_VERSIONS.contains(&v) => {
                if let Some(spec) = self.destination_rule(&origin, spec) {
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
        Some(spec)
    }

    fn duration(&mut self, origin: &Origin, field: &str, value: Option<&String>) {
        if let Some(v) = value.filter(|v| istio::parse_duration(v).is_none()) {
            self.error(
                origin,
                field,
                format!("{v:?} is not a duration such as 3s, 1.5s or 100ms"),
            );
        }
    }

    fn virtual_service(
        &mut self,
        origin: &Origin,
        spec: Value,
    ) -> Option<istio::VirtualServiceSpec> {
        let spec: istio::VirtualServiceSpec = self.typed(origin, "spec", spec)?;
        let before = self.errors.len();
        if spec.hosts.is_empty() {
            self.error(origin, "spec.hosts", "at least one host is required");
        }
        for (i, r) in spec.http.iter().enumerate() {
            let f = format!("spec.http[{i}]");
            self.duration(origin, &format!("{f}.timeout"), r.timeout.as_ref());
            if let Some(retries) = &r.retries {
                if retries.attempts.is_some_and(|a| a < 0) {
                    self.error(
                        origin,
                        &format!("{f}.retries.attempts"),
                        "must not be negative",
                    );
                }
                self.duration(
                    origin,
                    &format!("{f}.retries.perTryTimeout"),
                    retries.per_try_timeout.as_ref(),
                );
            }
            for (j, d) in r.route.iter().enumerate() {
                if let Some(p) = d
                    .destination
                    .port
                    .as_ref()
                    .filter(|p| !(1..=65535).contains(&p.number))
                {
                    self.error(
                        origin,
                        &format!("{f}.route[{j}].destination.port.number"),
                        format!("{} is not a port (1-65535)", p.number),
                    );
                }
            }
        }
        if self.errors.len() > before {
            return None;
        }
        self.vs_not_applied(origin, &spec);
        Some(spec)
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

    fn tls(&mut self, origin: &Origin, field: &str, tls: Option<&istio::ClientTls>) {
        let Some(mode) = tls.and_then(|t| t.mode.as_deref()) else {
            return;
        };
        if !istio::TLS_MODES.contains(&mode) {
            self.error(
                origin,
                &format!("{field}.mode"),
                format!("{mode:?} is not one of {}", istio::TLS_MODES.join(", ")),
            );
        }
    }

    fn destination_rule(
        &mut self,
        origin: &Origin,
        spec: Value,
    ) -> Option<istio::DestinationRuleSpec> {
        let spec: istio::DestinationRuleSpec = self.typed(origin, "spec", spec)?;
        let before = self.errors.len();
        if !valid_host(&spec.host) {
            self.error(
                origin,
                "spec.host",
                format!("{:?} is not a host name", spec.host),
            );
        }
        if let Some(tp) = &spec.traffic_policy {
            self.tls(origin, "spec.trafficPolicy.tls", tp.tls.as_ref());
            for (i, pl) in tp.port_level_settings.iter().enumerate() {
                let f = format!("spec.trafficPolicy.portLevelSettings[{i}]");
                if let Some(p) = pl
                    .port
                    .as_ref()
                    .filter(|p| !(1..=65535).contains(&p.number))
                {
                    self.error(
                        origin,
                        &format!("{f}.port.number"),
                        format!("{} is not a port (1-65535)", p.number),
                    );
                }
                self.tls(origin, &format!("{f}.tls"), pl.tls.as_ref());
            }
        }
        if self.errors.len() > before {
            return None;
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
        if external && spec.external_name.as_deref().is_none_or(|n| !valid_host(n)) {
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

    fn egress_config(&mut self, origin: &Origin, spec: Value, config: &mut MeshConfig) {
        let spec = rename_annotation_aliases(spec);
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
            } else if valid_host(text) {
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
        if spec.hosts.is_empty() {
            self.error(origin, "spec.hosts", "at least one host is required");
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            if !valid_host(h) {
                self.error(
                    origin,
                    &format!("spec.hosts[{i}]"),
                    format!("{h:?} is not a host name"),
                );
            }
        }
        let mut addresses = Vec::new();
        for (i, a) in spec.addresses.iter().enumerate() {
            match parse_net(a) {
                Some(n) => addresses.push(n),
                None => self.error(
                    origin,
                    &format!("spec.addresses[{i}]"),
                    format!("{a:?} is not an IP address or CIDR"),
                ),
            }
        }
        for (i, p) in spec.ports.iter().enumerate() {
            let f = format!("spec.ports[{i}]");
            if !(1..=65535).contains(&p.number) {
                self.error(
                    origin,
                    &format!("{f}.number"),
                    format!("{} is not a port (1-65535)", p.number),
                );
            }
            if let Some(t) = p.target_port.filter(|t| !(1..=65535).contains(t)) {
                self.error(
                    origin,
                    &format!("{f}.targetPort"),
                    format!("{t} is not a port (1-65535)"),
                );
            }
            match &p.protocol {
                Some(proto) if !PROTOCOLS.contains(&proto.to_ascii_uppercase().as_str()) => self
                    .error(
                        origin,
                        &format!("{f}.protocol"),
                        format!("{proto:?} is not one of {}", PROTOCOLS.join(", ")),
                    ),
                _ => {}
            }
        }
        if let Some(r) = spec
            .resolution
            .as_deref()
            .filter(|r| !RESOLUTIONS.contains(r))
        {
            self.error(
                origin,
                "spec.resolution",
                format!("{r:?} is not one of {}", RESOLUTIONS.join(", ")),
            );
        }
        if let Some(l) = spec.location.as_deref().filter(|l| !LOCATIONS.contains(l)) {
            self.error(
                origin,
                "spec.location",
                format!("{l:?} is not one of {}", LOCATIONS.join(", ")),
            );
        }
        for (i, e) in spec.endpoints.iter().enumerate() {
            for (pname, port) in &e.ports {
                if !(1..=65535).contains(port) {
                    self.error(
                        origin,
                        &format!("spec.endpoints[{i}].ports.{pname}"),
                        format!("{port} is not a port (1-65535)"),
                    );
                }
            }
        }
        if self.errors.len() > before {
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

/// Accept `traffic.sidecar.istio.io/...` keys under `spec.interception` as their plain names.
fn rename_annotation_aliases(spec: Value) -> Value {
    let Value::Mapping(mut spec) = spec else {
        return spec;
    };
    if let Some(Value::Mapping(i)) = spec.get_mut("interception") {
        for (alias, name) in ANNOTATION_ALIASES {
            if let Some(v) = i.remove(alias) {
                i.insert(Value::String(name.to_owned()), v);
            }
        }
    }
    Value::Mapping(spec)
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

/// A DNS name, optionally with a leading `*.` wildcard, or a lone `*`.
fn valid_host(h: &str) -> bool {
    let name = h.strip_prefix("*.").unwrap_or(h);
    if h == "*" {
        return true;
    }
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
        })
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
        // httpbin-ext has no addresses: it is matched by Host, nothing to warn about.
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
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
                 \"QUIC\" is not one of HTTP, HTTPS, HTTP2, GRPC, TLS, TCP, MONGO, UDP",
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
    includeOutboundIPRangez: "*"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: [a.example]
  http:
  - match: [{uri: {regex: "/a.*"}}]
    fault: {abort: {httpStatus: 500}}
"#;
        let l = parse_str("m.yaml", text).expect("valid");
        assert_eq!(l.config.interception.exclude_ranges.len(), 2);
        let w: Vec<String> = l.warnings.iter().map(|p| p.to_string()).collect();
        assert!(
            w.iter()
                .any(|w| w.contains("spec.interception.includeOutboundIPRangez: unknown field")),
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
      tls: {mode: SIMPLE, sni: secure.example, caCertificates: /etc/egress/ca.pem}
---
apiVersion: networking.istio.io/v1alpha3
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"#;
        let l = parse_str("m.yaml", text).expect("valid");
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
}
