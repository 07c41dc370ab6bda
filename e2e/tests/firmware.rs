//! The camera package really works: unpacked into a minimal ARM root (Debian's
//! busybox-static for armhf), `install.sh` runs there under qemu-arm, the installed
//! agent (the static armv7 binary, under qemu) tunnels the camera simulator to a relay,
//! a Watcher decodes frames, and `uninstall.sh` leaves nothing behind. In the same
//! emulated root the static binary finds the relay by name (hosts file, resolv.conf,
//! fallback nameserver); the aarch64 package carries a stream under qemu-aarch64.
//!
//! `make test` builds both packages first (`scripts/firmware.sh`, which also fetches the
//! busybox package). This machine has no binfmt_misc, so every ARM program is started
//! through `qemu-arm-static` explicitly, and install.sh uses only shell builtins and
//! busybox's no-exec applets.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::{path::Path, process::Command as StdCommand};

use e2e::{
    agent_config_json,
    arm::{self, camera_root},
    ffprobe, free_ports,
    netns::{camera_ip, lan_gateway, RELAY_IP},
    rtsp_url, CameraSim, Child, Lab, RelayProcess, SUB_STREAM,
};

const CAMERA: &str = "dahua-2449s-il";
const PREFIX: &str = "/mnt/mtd/camera_agent";

/// Runs a command to completion and fails with its output if it fails.
fn run(cmd: &mut StdCommand) -> String {
    arm::run(cmd).unwrap()
}

/// `sh <script> <args>` inside the ARM root, through qemu.
fn arm_sh(root: &Path, script: &str, args: &[&str]) -> String {
    arm::arm_sh(root, script, args).unwrap()
}

/// Every path under `root`, sorted.
fn tree(root: &Path) -> Vec<String> {
    let listing = run(StdCommand::new("find").arg(".").current_dir(root));
    let mut paths: Vec<String> = listing.lines().map(str::to_string).collect();
    paths.sort();
    paths
}

/// Waits for `agent` to come online, then a Watcher decodes the sub stream from the
/// relay's `port`; the agent is stopped after.
async fn carries_a_stream(mut agent: Child, port: u16) {
    agent
        .wait_for_line("online: the relay serves this camera")
        .await
        .unwrap();
    let probe = ffprobe(rtsp_url(port, SUB_STREAM), 10).await.unwrap();
    assert_eq!(probe.codec, "h264");
    assert!(probe.frames >= 10, "{probe:?}");
    agent.kill().await.unwrap();
}

/// [`unpack_package`] of this camera into the root's /tmp; returns where, as the
/// camera sees it.
fn unpack_into_root(root: &Path) -> String {
    arm::unpack_package(CAMERA, CAMERA, &root.join("tmp")).unwrap();
    format!("/tmp/{CAMERA}_firmware")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_package_installs_tunnels_video_and_uninstalls_on_an_emulated_camera() {
    let dir = tempfile::tempdir().unwrap();
    let root = camera_root(dir.path()).unwrap();
    let before = tree(&root);

    // Install from the unpacked package, as over SSH (not started: no init here).
    let unpacked = unpack_into_root(&root);
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
    carries_a_stream(Child::spawn("arm-agent", cmd).unwrap(), ports[1]).await;

    // Uninstall: the root is as it was before the package came (its unpacked copy aside).
    let said = arm_sh(&root, &format!("{PREFIX}/uninstall.sh"), &[]);
    assert!(said.contains("removed"), "{said}");
    std::fs::remove_dir_all(root.join(&unpacked[1..])).unwrap();
    assert_eq!(tree(&root), before, "uninstall.sh left something behind");
    drop(relay);
}

/// The static binary finds the relay by name on a camera: from /etc/hosts, from the
/// nameserver in /etc/resolv.conf (here the home router's dnsmasq, with an
/// nsswitch.conf naming a module the static binary skips), and, on a camera with no
/// /etc/resolv.conf, from `network.fallback_nameservers`, with a log line saying so;
/// without a fallback the error says what to set. A root without /dev/urandom gets a
/// clear error and exit status 1, not an abort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_static_agent_finds_the_relay_by_name_on_an_emulated_camera() {
    let dir = tempfile::tempdir().unwrap();
    let root = camera_root(dir.path()).unwrap();
    let agent_bin = format!("{}/camera-agent", unpack_into_root(&root));
    let lab = Lab::new(1).unwrap();
    let relay = RelayProcess::start_in(&lab.relay(), RELAY_IP, 8080, 8554, "fw-token", &[])
        .await
        .unwrap();
    // The home router answers DNS for its LAN, as most do.
    let router = lan_gateway(0);
    let mut dnsmasq = lab.nat().command("/usr/sbin/dnsmasq");
    dnsmasq
        .args(["--keep-in-foreground", "--log-facility=-", "--log-queries"])
        .args(["--conf-file=/dev/null", "--no-resolv", "--no-hosts"])
        .args(["--bind-interfaces", "--user=root"])
        .arg(format!("--listen-address={router}"))
        .arg(format!("--address=/relay.camera.test/{RELAY_IP}"));
    let mut dns = Child::spawn("dnsmasq", dnsmasq).unwrap();
    dns.wait_for_line("started, version").await.unwrap();

    let etc = root.join("etc");
    let start = |url: &str, fallback: &[&str]| {
        let mut config = agent_config_json("fw-dns", url, "fw-token", 8554, 554);
        config["network"]["fallback_nameservers"] = serde_json::json!(fallback);
        std::fs::write(root.join("config.json"), config.to_string()).unwrap();
        let mut cmd = lab.camera(0).command("chroot");
        cmd.arg(&root)
            .args(["/usr/bin/qemu-arm-static", &agent_bin])
            .args(["--config", "/config.json"]);
        Child::spawn("arm-agent", cmd).unwrap()
    };
    const ONLINE: &str = "online: the relay serves this camera";

    // /etc/hosts, and no nameserver at all.
    std::fs::write(
        etc.join("hosts"),
        format!("127.0.0.1 localhost\n{RELAY_IP} relay.lan\n"),
    )
    .unwrap();
    let mut agent = start("ws://relay.lan:8080/tunnel", &[]);
    agent.wait_for_line(ONLINE).await.unwrap();
    agent.kill().await.unwrap();

    // The router's nameserver from /etc/resolv.conf; the mDNS module named in
    // nsswitch.conf is not in the static binary and is skipped.
    std::fs::write(etc.join("resolv.conf"), format!("nameserver {router}\n")).unwrap();
    std::fs::write(
        etc.join("nsswitch.conf"),
        "hosts: files mdns4_minimal [NOTFOUND=return] dns\n",
    )
    .unwrap();
    let mut agent = start("ws://relay.camera.test:8080/tunnel", &[]);
    agent.wait_for_line(ONLINE).await.unwrap();
    agent.kill().await.unwrap();
    dns.wait_for_line(&format!("relay.camera.test from {}", camera_ip(0)))
        .await
        .unwrap();

    // No /etc/resolv.conf: glibc asks 127.0.0.1, where nothing answers.
    std::fs::remove_file(etc.join("resolv.conf")).unwrap();
    let mut agent = start("ws://relay.camera.test:8080/tunnel", &[]);
    let said = agent
        .wait_for_line("cannot resolve relay.camera.test")
        .await
        .unwrap();
    assert!(
        said.contains("no /etc/resolv.conf") && said.contains("network.fallback_nameservers"),
        "{said}"
    );
    agent.kill().await.unwrap();
    assert_eq!(agent.count_lines(ONLINE), 0);
    let mut agent = start("ws://relay.camera.test:8080/tunnel", &[&router]);
    let said = agent
        .wait_for_line("through network.fallback_nameservers")
        .await
        .unwrap();
    assert!(
        said.contains("this camera has no /etc/resolv.conf"),
        "{said}"
    );
    agent.wait_for_line(ONLINE).await.unwrap();
    agent.kill().await.unwrap();

    // No randomness: a clear error and status 1.
    std::fs::remove_file(root.join("dev/urandom")).unwrap();
    let mut agent = start(&relay.url(), &[]);
    assert_eq!(agent.wait().await.unwrap().code(), Some(1));
    assert!(
        agent
            .output()
            .iter()
            .any(|line| line.contains("gives no random numbers") && line.contains("/dev/urandom")),
        "{:?}",
        agent.output()
    );
    drop(relay);
}

/// The aarch64 profile's package (newer cameras): its static binary, under
/// qemu-aarch64, carries a stream the Watcher decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aarch64_package_tunnels_video_under_emulation() {
    const NEWER: &str = "generic-aarch64";
    let dir = tempfile::tempdir().unwrap();
    let unpacked = arm::unpack_package(NEWER, NEWER, dir.path()).unwrap();
    let described = run(StdCommand::new("file").arg(unpacked.join("camera-agent")));
    assert!(
        described.contains("ARM aarch64") && described.contains("statically linked"),
        "{described}"
    );

    let camera = CameraSim::start(&[]).await.unwrap();
    let ports = free_ports(2);
    let relay = RelayProcess::start(ports[0], ports[1], "fw-token")
        .await
        .unwrap();
    let config = agent_config_json("fw-a64", &relay.url(), "fw-token", ports[1], camera.port);
    std::fs::write(unpacked.join("config.json"), config.to_string()).unwrap();
    let mut cmd = tokio::process::Command::new("qemu-aarch64-static");
    cmd.arg(unpacked.join("camera-agent"))
        .arg("--config")
        .arg(unpacked.join("config.json"));
    carries_a_stream(Child::spawn("a64-agent", cmd).unwrap(), ports[1]).await;
}
