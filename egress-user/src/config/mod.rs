pub mod alloc;
pub mod istio;
pub mod k8s;
pub mod load;
pub mod rules;

use serde::Deserialize;

pub use load::{
    AutoAllocate, Interception, Invalid, Loaded, MeshConfig, ServiceEntry, ServiceEntrySpec,
    ServicePort, is_yaml, load, parse_str,
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

/// `rawSockets`: whether enrolled workloads may create the sockets no hook decides (raw,
/// ICMP, SCTP). Without it: refused under `REGISTRY_ONLY` (they would carry traffic past the
/// registry), allowed under `ALLOW_ANY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum RawSockets {
    #[serde(rename = "refuse")]
    Refuse,
    #[serde(rename = "allow")]
    Allow,
}

impl RawSockets {
    /// `Config::raw_sockets` for `spec.rawSockets` (absent: by the workload's mode).
    pub const fn code(v: Option<RawSockets>) -> u8 {
        match v {
            None => egress_common::RAW_SOCKETS_BY_MODE,
            Some(RawSockets::Refuse) => egress_common::RAW_SOCKETS_REFUSE,
            Some(RawSockets::Allow) => egress_common::RAW_SOCKETS_ALLOW,
        }
    }

    pub const fn name(v: Option<RawSockets>) -> &'static str {
        match v {
            None => "by mode",
            Some(RawSockets::Refuse) => "refuse",
            Some(RawSockets::Allow) => "allow",
        }
    }
}

/// `spec.dns.capture`: which of a workload's DNS queries the agent's DNS server takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DnsCapture {
    /// Every query (UDP and TCP to port 53), whatever the nameserver, as Istio's
    /// `--capture-all-dns`.
    #[default]
    All,
    /// Queries to the nameservers the workload was enrolled with (its resolv.conf) only, as
    /// Istio's sidecar without `--capture-all-dns`; a workload whose nameservers are not known
    /// is captured whole.
    ResolvConf,
}

impl DnsCapture {
    pub const fn name(self) -> &'static str {
        match self {
            DnsCapture::All => "ALL",
            DnsCapture::ResolvConf => "RESOLV_CONF",
        }
    }

    /// `Config::dns_capture`.
    pub const fn kernel(self) -> u8 {
        match self {
            DnsCapture::All => egress_common::DNS_CAPTURE_ALL,
            DnsCapture::ResolvConf => egress_common::DNS_CAPTURE_RESOLV_CONF,
        }
    }
}

impl FailureMode {
    pub const fn name(self) -> &'static str {
        match self {
            FailureMode::Closed => "closed",
            FailureMode::Open => "open",
        }
    }
}
