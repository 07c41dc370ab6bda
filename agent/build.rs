//! Records what the agent is built for: its target triple (which releases it takes,
//! docs/updates.md) and its version, the crate's unless the build is stamped with
//! another (`CAMERA_AGENT_VERSION`, as `make firmware VERSION=…` sets it).

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    let version = std::env::var("CAMERA_AGENT_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| std::env::var("CARGO_PKG_VERSION").unwrap_or_default());
    println!("cargo:rustc-env=CAMERA_AGENT_TARGET={target}");
    println!("cargo:rustc-env=CAMERA_AGENT_BUILD_VERSION={version}");
    println!("cargo:rustc-env=CAMERA_AGENT_VERSION_LINE={version} ({target})");
    println!("cargo:rerun-if-env-changed=CAMERA_AGENT_VERSION");
    println!("cargo:rerun-if-changed=build.rs");
}
