//! The camera package really works: unpacked into a minimal ARM root (Debian's
//! busybox-static for armhf), `install.sh` runs there under qemu-arm, the installed
//! agent (the static armv7 binary, under qemu) tunnels the camera simulator to a relay,
//! a Watcher decodes frames, and `uninstall.sh` leaves nothing behind.
//!
//! `make test` builds the package first (`scripts/firmware.sh`, which also fetches the
//! busybox package). This machine has no binfmt_misc, so every ARM program is started
//! through `qemu-arm-static` explicitly, and install.sh uses only shell builtins and
//! busybox's no-exec applets.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::{
    path::{Path, PathBuf},
    process::Command as StdCommand,
};

use e2e::{
    agent_config_json, ffprobe, free_ports, rtsp_url, CameraSim, Child, RelayProcess, SUB_STREAM,
};

const CAMERA: &str = "dahua-2449s-il";
const PREFIX: &str = "/mnt/mtd/camera_agent";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a command to completion and fails with its output if it fails.
fn run(cmd: &mut StdCommand) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// `sh <script> <args>` inside the ARM root, through qemu.
fn arm_sh(root: &Path, script: &str, args: &[&str]) -> String {
    run(StdCommand::new("chroot")
        .arg(root)
        .args(["/usr/bin/qemu-arm-static", "/bin/sh", script])
        .args(args))
}

/// Every path under `root`, sorted.
fn tree(root: &Path) -> Vec<String> {
    let listing = run(StdCommand::new("find").arg(".").current_dir(root));
    let mut paths: Vec<String> = listing.lines().map(str::to_string).collect();
    paths.sort();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_package_installs_tunnels_video_and_uninstalls_on_an_emulated_camera() {
    let package = repo().join(format!("firmware/dist/{CAMERA}/{CAMERA}_firmware.tar.gz"));
    let busybox = repo().join("firmware/.toolchain/busybox-static_armhf.deb");
    assert!(
        package.is_file() && busybox.is_file(),
        "{} or {} missing: run `make firmware CAMERA={CAMERA}` (make test does)",
        package.display(),
        busybox.display()
    );

    // A minimal camera root: busybox and its applets, device nodes, qemu to run them.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    run(StdCommand::new("dpkg").arg("-x").arg(&busybox).arg(&root));
    for sub in ["usr/bin", "tmp", "dev"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    // The device nodes every camera has (randomness for TLS, QUIC and backoff jitter).
    for (node, minor) in [("null", "3"), ("random", "8"), ("urandom", "9")] {
        let path = root.join("dev").join(node);
        run(StdCommand::new("mknod").arg(&path).args(["c", "1", minor]));
        run(StdCommand::new("chmod").arg("666").arg(&path));
    }
    std::fs::copy(
        "/usr/bin/qemu-arm-static",
        root.join("usr/bin/qemu-arm-static"),
    )
    .unwrap();
    run(StdCommand::new("chroot").arg(&root).args([
        "/usr/bin/qemu-arm-static",
        "/bin/busybox",
        "--install",
        "-s",
        "/bin",
    ]));
    let before = tree(&root);

    // Install from the unpacked package, as over SSH (not started: no init here).
    run(StdCommand::new("tar")
        .arg("xzf")
        .arg(&package)
        .arg("-C")
        .arg(root.join("tmp")));
    let unpacked = format!("/tmp/{CAMERA}_firmware");
    run(StdCommand::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(root.join(&unpacked[1..])));
    let said = arm_sh(&root, &format!("{unpacked}/install.sh"), &["--no-start"]);
    assert!(said.contains(&format!("installing to {PREFIX}")), "{said}");
    let installed = root.join(&PREFIX[1..]);
    assert!(
        installed.join("camera-agent").is_file()
            && root.join("etc/init.d/S99camera-agent").is_file()
    );

    // Point the installed config at a relay and the simulator on this host, keep it
    // across a reinstall (an upgrade keeps config.json).
    let camera = CameraSim::start(&[]).await.unwrap();
    let ports = free_ports(2);
    let relay = RelayProcess::start(ports[0], ports[1], "fw-token")
        .await
        .unwrap();
    let config = agent_config_json("fw-cam", &relay.url(), "fw-token", ports[1], camera.port);
    std::fs::write(installed.join("config.json"), config.to_string()).unwrap();
    let again = arm_sh(&root, &format!("{unpacked}/install.sh"), &["--no-start"]);
    assert!(again.contains("keeping the existing"), "{again}");

    // The installed agent, under qemu, carries a real stream.
    let mut cmd = tokio::process::Command::new("chroot");
    cmd.arg(&root)
        .arg("/usr/bin/qemu-arm-static")
        .arg(format!("{PREFIX}/camera-agent"))
        .args(["--config", &format!("{PREFIX}/config.json")]);
    let mut agent = Child::spawn("arm-agent", cmd).unwrap();
    agent
        .wait_for_line("online: the relay serves this camera")
        .await
        .unwrap();
    let probe = ffprobe(rtsp_url(ports[1], SUB_STREAM), 10).await.unwrap();
    assert_eq!(probe.codec, "h264");
    assert!(probe.frames >= 10, "{probe:?}");
    agent.kill().await.unwrap();

    // Uninstall: the root is as it was before the package came (its unpacked copy aside).
    let said = arm_sh(&root, &format!("{PREFIX}/uninstall.sh"), &[]);
    assert!(said.contains("removed"), "{said}");
    std::fs::remove_dir_all(root.join(&unpacked[1..])).unwrap();
    assert_eq!(tree(&root), before, "uninstall.sh left something behind");
    drop(relay);
}
