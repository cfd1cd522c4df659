//! Builds the kernel programs (`egress-ebpf`, nightly, bpfel-unknown-none) into OUT_DIR.
//! With `AYA_BUILD_SKIP=1` (lint-only runs) an empty placeholder object is written instead.
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        std::fs::write(out.join("egress-kern"), [])?;
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    // The kernel programs compile the shared crate too.
    println!("cargo:rerun-if-changed=../egress-common/src");
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../egress-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?
        .to_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "egress-ebpf",
            root_dir: &root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
