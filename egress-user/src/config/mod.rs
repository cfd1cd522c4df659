pub mod alloc;
pub mod istio;
pub mod k8s;
pub mod load;

use serde::Deserialize;

#[cfg(test)]
pub use load::parse_str;
pub use load::{
    AutoAllocate, Interception, Invalid, Loaded, MeshConfig, ServiceEntry, ServiceEntrySpec,
    ServicePort, is_yaml, load,
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

/// `failureMode`: what a connect that would be redirected does while no agent listens (it is
/// down, or restarting), decided in the kernel from the maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum FailureMode {
    /// It fails at once with ECONNREFUSED: nothing unmediated leaves.
    #[default]
    #[serde(rename = "closed")]
    Closed,
    /// It goes straight to its destination, counted `agent-down-open`.
    #[serde(rename = "open")]
    Open,
}

impl FailureMode {
    pub const fn name(self) -> &'static str {
        match self {
            FailureMode::Closed => "closed",
            FailureMode::Open => "open",
        }
    }
}
