//! Istio resources beyond ServiceEntry, modelled as written for kubectl: Sidecar (per-workload
//! outbound policy), VirtualService (timeouts, retries, destinations) and DestinationRule (TLS
//! towards the upstream). They are validated here and applied by the L7 datapath.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::config::Mode;

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub outbound_traffic_policy: Option<SidecarPolicy>,
    #[serde(default)]
    pub egress: Vec<Value>,
    #[serde(default)]
    pub ingress: Vec<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarPolicy {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub egress_proxy: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tls: Vec<Value>,
    #[serde(default)]
    pub tcp: Vec<Value>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(rename = "match", default)]
    pub matches: Vec<Value>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<Retries>,
    #[serde(default)]
    pub rewrite: Option<Value>,
    #[serde(default)]
    pub headers: Option<Value>,
    #[serde(default)]
    pub fault: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct RouteDestination {
    pub destination: Destination,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub headers: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Destination {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct PortSelector {
    pub number: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    #[serde(default)]
    pub attempts: Option<i64>,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub retry_on: Option<String>,
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Value>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default)]
    pub tls: Option<ClientTls>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    #[serde(default)]
    pub connection_pool: Option<Value>,
    #[serde(default)]
    pub load_balancer: Option<Value>,
    #[serde(default)]
    pub outlier_detection: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct PortTrafficPolicy {
    #[serde(default)]
    pub port: Option<PortSelector>,
    #[serde(default)]
    pub tls: Option<ClientTls>,
    #[serde(default, rename = "connectionPool")]
    pub connection_pool: Option<Value>,
    #[serde(default, rename = "loadBalancer")]
    pub load_balancer: Option<Value>,
    #[serde(default, rename = "outlierDetection")]
    pub outlier_detection: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub ca_certificates: Option<String>,
    #[serde(default)]
    pub client_certificate: Option<String>,
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
}

pub const TLS_MODES: [&str; 4] = ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"];

/// A Go/protobuf duration as Istio writes them: `3s`, `1.5s`, `100ms`, `1m30s`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_istio_writes_them() {
        assert_eq!(parse_duration("3s"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("3"), None);
        assert_eq!(parse_duration("3 s"), None);
        assert_eq!(parse_duration("fast"), None);
    }
}
