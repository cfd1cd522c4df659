//! Kubernetes resources that give external services local names: `v1` Service (selector-less
//! or ExternalName), `v1` Endpoints and `discovery.k8s.io/v1` EndpointSlice, as written for
//! kubectl.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Deserialize;
use serde_yaml_ng::Value;

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub external_name: Option<String>,
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub ip_families: Vec<String>,
    #[serde(default)]
    pub ip_family_policy: Option<String>,
    #[serde(default)]
    pub session_affinity: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    pub port: u32,
    /// A number or a named port; the endpoints' ports are what connections go to.
    #[serde(default)]
    pub target_port: Option<Value>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// `v1` Endpoints (its data is at the top level, not under `spec`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointsBody {
    #[serde(default)]
    pub subsets: Vec<Subset>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    #[serde(default)]
    pub addresses: Vec<EndpointAddress>,
    #[serde(default)]
    pub not_ready_addresses: Vec<EndpointAddress>,
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointAddress {
    pub ip: String,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub target_ref: Option<Value>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u32,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// `discovery.k8s.io/v1` EndpointSlice (top-level data too).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSliceBody {
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Vec<SliceEndpoint>,
    #[serde(default)]
    pub ports: Vec<SlicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Option<Conditions>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub target_ref: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Conditions {
    #[serde(default)]
    pub ready: Option<bool>,
    #[serde(default)]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// A validated Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub spec: ServiceSpec,
    /// `clusterIP` and `clusterIPs`, parsed, without duplicates; empty for headless.
    pub cluster_ips: Vec<IpAddr>,
}

impl Service {
    /// An ExternalName Service: a name for another, resolved by the agent.
    pub fn external_name(&self) -> bool {
        self.spec.type_.as_deref() == Some("ExternalName") && self.spec.external_name.is_some()
    }

    /// Translated in the kernel: selector-less, not ExternalName, with a cluster IP.
    pub fn translated(&self) -> bool {
        self.spec.selector.is_none()
            && self.spec.type_.as_deref() != Some("ExternalName")
            && !self.cluster_ips.is_empty()
    }
}

/// Ready endpoints of one Service, from an Endpoints subset or an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSet {
    pub namespace: String,
    pub service: String,
    pub addresses: Vec<IpAddr>,
    /// (port name, port).
    pub ports: Vec<(Option<String>, u16)>,
}

impl EndpointSet {
    /// The port of this set that serves the Service port named `name`: the same name, or the
    /// only port when neither side needs a name.
    pub fn port_for(&self, name: Option<&str>, service_ports: usize) -> Option<u16> {
        let by_name = self
            .ports
            .iter()
            .find(|(n, _)| n.as_deref().unwrap_or("") == name.unwrap_or(""));
        match by_name {
            Some((_, p)) => Some(*p),
            None if service_ports == 1 && self.ports.len() == 1 => Some(self.ports[0].1),
            None => None,
        }
    }
}
