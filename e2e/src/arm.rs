//! Emulated ARM cameras: a minimal root (Debian's busybox-static for armhf, the device
//! nodes every camera has, qemu) with the camera package unpacked in it, as
//! `make firmware` builds it.
//!
//! This machine has no binfmt_misc for ARM, so a program in the root is started through
//! `qemu-arm-static` explicitly ([`arm_sh`]). A camera that must run as one, its
//! busybox init script starting the supervisor that starts (and restarts) the agent, is
//! [`ArmCamera::boot`]ed in user, mount and PID namespaces of its own, with qemu
//! registered for ARM binaries in that user namespace's own binfmt_misc (Linux 6.7 and
//! later): nothing changes on the host, and killing it is a power cut.

use std::{
    path::{Path, PathBuf},
    process::Command as StdCommand,
};

use anyhow::{ensure, Context as _};

use crate::Child;

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a command to completion; its output, or an error with it.
pub fn run(cmd: &mut StdCommand) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{cmd:?} failed: {text}");
    Ok(text)
}

/// `sh <script> <args>` inside the ARM root, through qemu.
pub fn arm_sh(root: &Path, script: &str, args: &[&str]) -> anyhow::Result<String> {
    run(StdCommand::new("chroot")
        .arg(root)
        .args(["/usr/bin/qemu-arm-static", "/bin/sh", script])
        .args(args))
}

/// Debian's busybox for armhf, fetched by `make firmware CAMERA=dahua-2449s-il`.
pub fn busybox() -> anyhow::Result<PathBuf> {
    let busybox = repo().join("firmware/.toolchain/busybox-static_armhf.deb");
    ensure!(
        busybox.is_file(),
        "{} missing: run `make firmware CAMERA=dahua-2449s-il` (make test does)",
        busybox.display()
    );
    Ok(busybox)
}

/// A minimal camera root under `dir`: busybox and its applets, the device nodes every
/// camera has (randomness for TLS, QUIC and backoff jitter), qemu to run ARM programs.
pub fn camera_root(dir: &Path) -> anyhow::Result<PathBuf> {
    let busybox = busybox()?;
    let root = dir.join("root");
    std::fs::create_dir_all(&root)?;
    run(StdCommand::new("dpkg").arg("-x").arg(&busybox).arg(&root))?;
    for sub in ["usr/bin", "tmp", "dev", "etc"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    for (node, minor) in [("null", "3"), ("random", "8"), ("urandom", "9")] {
        let path = root.join("dev").join(node);
        run(StdCommand::new("mknod").arg(&path).args(["c", "1", minor]))?;
        run(StdCommand::new("chmod").arg("666").arg(&path))?;
    }
    std::fs::copy(
        "/usr/bin/qemu-arm-static",
        root.join("usr/bin/qemu-arm-static"),
    )?;
    run(StdCommand::new("chroot").arg(&root).args([
        "/usr/bin/qemu-arm-static",
        "/bin/busybox",
        "--install",
        "-s",
        "/bin",
    ]))?;
    Ok(root)
}

/// The package `make firmware` built for `camera` (`firmware/dist/<dist>/`, `dist`
/// being the camera, or `<camera>-<version>` for a stamped build).
pub fn package(camera: &str, dist: &str) -> anyhow::Result<PathBuf> {
    let package = repo().join(format!("firmware/dist/{dist}/{camera}_firmware.tar.gz"));
    ensure!(
        package.is_file(),
        "{} missing: run `make test` (it builds the packages first)",
        package.display()
    );
    Ok(package)
}

/// Unpacks `camera`'s package from `firmware/dist/<dist>/` into `dir`; returns the
/// unpacked directory.
pub fn unpack_package(camera: &str, dist: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    run(StdCommand::new("tar")
        .arg("xzf")
        .arg(package(camera, dist)?)
        .arg("-C")
        .arg(dir))?;
    Ok(dir.join(format!("{camera}_firmware")))
}

/// An ARM root booted as a camera: see the module docs.
#[derive(Debug)]
pub struct ArmCamera {
    /// The root, as the host sees it.
    pub root: PathBuf,
    /// The namespaces' first process; killing it cuts the power.
    power: Child,
}

/// qemu for 32-bit ARM executables, as Debian's qemu-user-static registers it: flags
/// `P` (programs see their own argv[0], which busybox's applets need) and `F` (qemu is
/// opened at registration, so it runs inside the chroot).
const BINFMT_ARM: &str = "/usr/lib/binfmt.d/qemu-arm.conf";

impl ArmCamera {
    /// Powers the camera on: its init script (`/etc/init.d/S99camera-agent start`,
    /// installed by the package) runs, as at boot.
    pub async fn boot(root: &Path) -> anyhow::Result<ArmCamera> {
        let script = format!(
            "set -e\n\
             mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc\n\
             cat {BINFMT_ARM} > /proc/sys/fs/binfmt_misc/register\n\
             chroot {root} /bin/sh /etc/init.d/S99camera-agent start\n\
             echo camera booted\n\
             exec sleep infinity\n",
            root = root.display()
        );
        let mut cmd = tokio::process::Command::new("unshare");
        cmd.args([
            "--user",
            "--map-root-user",
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child=SIGKILL",
            "sh",
            "-c",
            &script,
        ]);
        let mut power = Child::spawn("arm-camera", cmd)?;
        power.wait_for_line("camera booted").await?;
        Ok(ArmCamera {
            root: root.to_path_buf(),
            power,
        })
    }

    /// Cuts the power: every process of the camera dies at once.
    pub async fn power_off(mut self) -> anyhow::Result<()> {
        self.power.kill().await
    }
}
