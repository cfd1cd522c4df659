//! The configuration loader (`config::parse_str`) on any bytes taken as YAML, and what the agent
//! does with a configuration that loads.
//!
//! Besides never panicking:
//! - an `Err` has at least one error, an `Ok` none, and every problem names the file it was
//!   given;
//! - loading is a function of the text: the same text loads to the same configuration, errors
//!   and warnings;
//! - a configuration that loads gets its addresses allocated, compiles to a plan, builds a
//!   registry (or says why not), and the plan is reached from the empty one by its diff.

#![no_main]

use egress_user::{
    config::{self, alloc::Allocator},
    plan::{self, Plan},
    registry::Registry,
};
use libfuzzer_sys::fuzz_target;

const FILE: &str = "fuzz.yaml";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let loaded = config::parse_str(FILE, &text);
    let again = config::parse_str(FILE, &text);
    let (problems, config) = match (&loaded, &again) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.config, b.config, "the same text loaded twice");
            assert_eq!(a.warnings, b.warnings, "the same text warned twice");
            (&a.warnings, Some(&a.config))
        }
        (Err(a), Err(b)) => {
            assert!(!a.errors.is_empty(), "rejected without an error");
            assert_eq!(a.errors, b.errors, "the same text rejected twice");
            assert_eq!(a.warnings, b.warnings, "the same text warned twice");
            (&a.errors, None)
        }
        _ => panic!("the same text loaded once and was rejected once"),
    };
    for p in problems {
        assert_eq!(p.origin.file.to_str(), Some(FILE), "{p}");
    }
    if let Err(e) = &loaded {
        for p in &e.warnings {
            assert_eq!(p.origin.file.to_str(), Some(FILE), "{p}");
        }
    }
    let Some(config) = config else { return };
    let mut mesh = config.clone();
    if Allocator::load(None).assign(&mut mesh).is_err() {
        return;
    }
    let plan = plan::compile(&mesh);
    let mut reached = Plan::default();
    for op in plan::diff(&Plan::default(), &plan) {
        reached.apply(&op);
    }
    assert_eq!(reached, plan, "the diff from the empty plan");
    let _ = Registry::compile(&mesh);
});
