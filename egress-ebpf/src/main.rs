//! Kernel side of egress: the connect-time decision and original-destination bookkeeping.
//!
//! - `egress_connect4` / `egress_connect6` (`cgroup/connect4`, `cgroup/connect6`) decide every TCP
//!   connect() of the intercepted cgroup with `egress_common::decide` and redirect, bypass or
//!   deny it. A redirect records the original destination under the socket cookie.
//! - `egress_sockops` (`sock_ops`) re-keys that record by the client's local address once the
//!   connection to the agent is established, and drops it when the socket closes.
//! - `egress_getsockopt` (`cgroup/getsockopt`) answers `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`
//!   for accepted redirected sockets, so that a transparent proxy can stand where the agent is.
//!
//! No logging on these paths: the per-reason counters say what happened.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod kern;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
