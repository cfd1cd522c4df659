//! The user-space half of egress: the agent and its CLI, as a library that the `egress` binary,
//! the benchmarks and the fuzz targets link.

/// The CLI `egress` and its subcommands; `egress run` is the agent.
pub mod cli;
/// Mesh configuration: YAML files and directories → the model, with every problem located.
pub mod config;
/// The kernel side from user space: load, pin, program and attach; reload; cgroup2, bpffs and
/// netns facts.
pub mod datapath;
/// The workloads' DNS queries, captured by the datapath: answered from the registry (pure,
/// fuzzed message handling) or forwarded to the nameserver the client asked.
pub mod dns;
/// The model → what the maps must hold, and the steps from one plan to the next. Pure.
pub mod plan;
/// The outbound listener and how it mediates streams: TCP, TLS by SNI, HTTP/1.1 with hyper.
pub mod proxy;
/// The mesh registry as streams see it, swapped whole on reload.
pub mod registry;
/// Pure first-bytes parsers and host matching, shared by the proxy and the registry; fuzzed.
pub mod sniff;
/// What the agent tells: access log, direct connections' records, the admin endpoint.
pub mod telemetry;
/// Enrolled workloads: network namespaces with an identity, their listeners and policy; the
/// enrolment API and its state file.
pub mod workloads;
