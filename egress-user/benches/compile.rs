//! Criterion micro-benchmarks of the configuration pipeline, all in user space: load (read and
//! parse the YAML into the model), compile the datapath plan, compile the registry, and diff two
//! plans that differ in one entry (what a reload applies), for 1,000 to 100,000 excluded CIDRs
//! and 10,000 ServiceEntries. `cargo xtask bench` runs them and writes the figures into
//! BENCHMARKS.md; alone: `cargo bench -p egress-user --bench compile`.

use std::{hint::black_box, path::Path};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use egress_tests::configs::{filler_cidrs, service_entries};
use egress_user::{config, plan, registry};

/// An ALLOW_ANY configuration excluding `n` CIDRs; `variant` changes the last one.
fn exclusions(n: u32, variant: u32) -> String {
    let mut cidrs = filler_cidrs(n - 1);
    cidrs.push(format!("127.58.{variant}.0/24"));
    format!(
        "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {{name: bench}}\nspec:\n  \
         interception:\n    includeOutboundIPRanges: [127.0.0.0/8]\n    \
         excludeOutboundIPRanges: \"{}\"\n",
        cidrs.join(",")
    )
}

/// The model of `text`, loaded from a file as the agent loads it.
fn load(dir: &Path, name: &str, text: &str) -> config::MeshConfig {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    config::load(&path)
        .unwrap_or_else(|e| panic!("{name}: {:?}", e.errors))
        .config
}

/// Load, plan and diff `old` (changed into `new`); compile its registry too when it declares
/// ServiceEntries (an exclusion list leaves the registry empty).
fn pipeline(c: &mut Criterion, group: &str, size: u64, old: &str, new: &str, registry: bool) {
    let dir = std::env::temp_dir().join(format!("egress-compile-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, old).unwrap();
    let mesh = load(&dir, "old.yaml", old);
    let changed = load(&dir, "new.yaml", new);
    let (before, after) = (plan::compile(&mesh), plan::compile(&changed));
    assert!(
        !plan::diff(&before, &after).is_empty(),
        "the configurations differ"
    );

    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    g.bench_function(BenchmarkId::new("load", size), |b| {
        b.iter(|| config::load(black_box(&path)).unwrap())
    });
    g.bench_function(BenchmarkId::new("plan", size), |b| {
        b.iter(|| plan::compile(black_box(&mesh)))
    });
    if registry {
        g.bench_function(BenchmarkId::new("registry", size), |b| {
            b.iter(|| registry::Registry::compile(black_box(&mesh)).unwrap())
        });
    }
    g.bench_function(BenchmarkId::new("diff", size), |b| {
        b.iter(|| plan::diff(black_box(&before), black_box(&after)))
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn cidrs(c: &mut Criterion) {
    for n in [1_000, 10_000, 100_000] {
        pipeline(
            c,
            "cidrs",
            u64::from(n),
            &exclusions(n, 0),
            &exclusions(n, 1),
            false,
        );
    }
}

fn entries(c: &mut Criterion) {
    let n = 10_000;
    pipeline(
        c,
        "service-entries",
        n as u64,
        &service_entries(n, 0),
        &service_entries(n, 1),
        true,
    );
}

criterion_group!(benches, cidrs, entries);
criterion_main!(benches);
