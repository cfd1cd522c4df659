pub mod istio;
pub mod k8s;
pub mod load;

use serde::Deserialize;

#[cfg(test)]
pub use load::parse_str;
pub use load::{
    Interception, Invalid, Loaded, MeshConfig, ServiceEntry, ServiceEntrySpec, ServicePort,
    is_yaml, load,
};

/// `outboundTrafficPolicy.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum Mode {
    #[default]
    #[serde(rename = "ALLOW_ANY")]
    AllowAny,
    #[serde(rename = "REGISTRY_ONLY")]
    RegistryOnly,
}
