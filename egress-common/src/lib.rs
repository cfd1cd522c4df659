//! Types shared by the egress kernel programs and the agent, and the one decision function.
//!
//! Everything here is `no_std` and panic-free so that the kernel programs can call it. Map keys
//! and values are `#[repr(C)]` with explicit padding, so no key ever carries uninitialised bytes.
#![no_std]

pub mod decide;
pub mod maps;

pub use decide::{Decision, Query, Reason, Tables, Verdict, decide, with_learned, without_agent};
pub use maps::*;
