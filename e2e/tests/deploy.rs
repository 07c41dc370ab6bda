//! The deployment files stay true to the relay: Prometheus' own checker accepts the
//! scrape config and alert rules, and every relay metric they or the Grafana dashboard
//! use is one the relay exports (docs/metrics.md lists them all).

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::{path::Path, process::Command};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian package prometheus; make test installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `camera_relay_…` names in `text`, without histogram suffixes.
fn relay_metrics(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("camera_relay_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name)
            .to_string();
        names.push(base);
    }
    names
}

#[test]
fn prometheus_files_pass_promtool_and_use_only_exported_metrics() {
    let rules = root().join("deploy/prometheus/camera-relay-alerts.yml");
    promtool(&["check", "rules", rules.to_str().unwrap()]);

    // The config names a token file and the rules beside it; check it in a copy that
    // points at files that exist.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    std::fs::copy(&rules, dir.path().join("camera-relay-alerts.yml")).unwrap();
    let config = std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml"))
        .unwrap()
        .replace(
            "/etc/prometheus/camera-relay-admin-token",
            token.to_str().unwrap(),
        );
    let copy = dir.path().join("prometheus.yml");
    std::fs::write(&copy, config).unwrap();
    promtool(&["check", "config", copy.to_str().unwrap()]);

    let documented = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    let dashboard =
        std::fs::read_to_string(root().join("deploy/grafana/camera-relay.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let used: Vec<String> = relay_metrics(&dashboard)
        .into_iter()
        .chain(relay_metrics(&std::fs::read_to_string(&rules).unwrap()))
        .collect();
    assert!(used.len() > 10, "{used:?}");
    for name in used {
        assert!(
            documented.contains(&format!("`{name}")),
            "{name} is not a relay metric (docs/metrics.md)"
        );
    }
}
