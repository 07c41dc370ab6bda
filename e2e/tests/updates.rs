//! Over-the-air updates on emulated ARM cameras: the real camera package installed in
//! a busybox root, booted with its init script (the supervisor starts and restarts the
//! agent, under qemu, in namespaces of its own: `e2e::arm`), the real relay, releases
//! signed by `certs`. A camera updates from one build to the next while a Watcher
//! decodes, through a power cut in the middle of the download; a release signed by a
//! key the camera does not trust, one for another processor, and one labelled for
//! another are refused and change nothing; a new agent that cannot start is rolled
//! back even when the power fails right after the swap; a rollout stops at its failure
//! threshold.
//!
//! `make test` builds the packages first: this camera's, the same build stamped with
//! the next version (`firmware/dist/dahua-2449s-il-<next>/`), and the aarch64 one.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use e2e::{
    agent_config_json,
    arm::{self, ArmCamera},
    ffprobe, free_port_run, http, metric,
    netns::Place,
    rtsp_url, CameraSim, RelayProcess, SUB_STREAM,
};
use serde_json::{json, Value};
use tokio::{process::Command, sync::Mutex};

const CAMERA: &str = "dahua-2449s-il";
const PREFIX: &str = "mnt/mtd/camera_agent";
const TARGET: &str = "armv7-unknown-linux-gnueabihf";
const TOKEN: &str = "ota-token";
const ADMIN: &str = "ota-admin";
/// Slow enough (250 kB/s) that a download of the 3 MB agent takes seconds: a power cut
/// can land in its middle.
const RATE_KBPS: u32 = 2000;

/// One emulated camera at a time: each is a qemu process, and a loaded 2-core machine
/// runs one test binary's tests in parallel.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// The relay, the camera simulator, the release keys.
struct Rig {
    relay: RelayProcess,
    sim: CameraSim,
    first_camera_port: u16,
    dir: tempfile::TempDir,
}

impl Rig {
    async fn start(cameras: u16) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        e2e::certs(&["release-key", "--out", &path(&dir.path().join("keys"))])
            .await
            .unwrap();
        e2e::certs(&["release-key", "--out", &path(&dir.path().join("stranger"))])
            .await
            .unwrap();
        let ports = free_port_run(cameras + 1);
        let first = ports + 1;
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            format!(
                r#"
listen = "127.0.0.1:{ports}"
camera_ports = "{first}-{last}"
shared_token = "{TOKEN}"
admin_token = "{ADMIN}"
state_dir = "{state}"

[updates]
max_rate_kbps = {RATE_KBPS}
camera_timeout_secs = 120
"#,
                last = first + cameras - 1,
                state = path(&dir.path().join("state")),
            ),
        )
        .unwrap();
        let relay = RelayProcess::start_from_file_in(&Place::host(), &config, "127.0.0.1", ports)
            .await
            .unwrap();
        Rig {
            relay,
            sim: CameraSim::start(&[]).await.unwrap(),
            first_camera_port: first,
            dir,
        }
    }

    /// Installs the package for camera `id` (its relay port `port`, its `labels`) into
    /// a fresh root, with the test's release key as a package built with RELEASE_PUB
    /// carries it.
    fn install(&self, id: &str, port: u16, labels: &[&str]) -> PathBuf {
        let root = arm::camera_root(&self.dir.path().join(id)).unwrap();
        let unpacked = arm::unpack_package(CAMERA, CAMERA, &root.join("tmp")).unwrap();
        std::fs::copy(
            self.dir.path().join("keys/release.pub"),
            unpacked.join("release.pub"),
        )
        .unwrap();
        let said = arm::arm_sh(
            &root,
            &format!("/tmp/{CAMERA}_firmware/install.sh"),
            &["--no-start"],
        )
        .unwrap();
        assert!(said.contains("installing to"), "{said}");
        let mut config = agent_config_json(id, &self.relay.url(), TOKEN, port, self.sim.port);
        config["agent"]["labels"] = json!(labels);
        std::fs::write(root.join(PREFIX).join("config.json"), config.to_string()).unwrap();
        root
    }

    /// Signs `binary` as `version` for `target` with key set `keys` and uploads it;
    /// the release id.
    async fn release(&self, binary: &Path, version: &str, target: &str, keys: &str) -> String {
        let sig = self.dir.path().join(format!("{version}-{target}.sig"));
        e2e::certs(&[
            "sign",
            &path(binary),
            "--key",
            &path(&self.dir.path().join(keys).join("release.key")),
            "--target",
            target,
            "--version",
            version,
            "--out",
            &path(&sig),
        ])
        .await
        .unwrap();
        let signature: Value = serde_json::from_slice(&std::fs::read(&sig).unwrap()).unwrap();
        let output = Command::new("curl")
            .args(["--silent", "--show-error", "--oauth2-bearer", ADMIN])
            .args(["-H", &format!("X-Release-Signature: {signature}")])
            .arg("--data-binary")
            .arg(format!("@{}", path(binary)))
            .arg(self.url("/releases"))
            .output()
            .await
            .unwrap();
        let answer: Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("upload: {}", String::from_utf8_lossy(&output.stdout)));
        assert_eq!(answer["id"], format!("{version}-{target}"), "{answer}");
        answer["id"].as_str().unwrap().to_string()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.relay.port)
    }

    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        let reply = http(
            &Place::host(),
            method,
            &self.url(path),
            Some(ADMIN),
            body.as_deref(),
        )
        .await
        .unwrap();
        (reply.status, reply.json().unwrap_or(Value::Null))
    }

    /// Polls `GET path` until `done` holds (3 minutes at most: qemu is slow).
    async fn wait(&self, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        loop {
            let (_, json) = self.api("GET", path, None).await;
            if done(&json) {
                return json;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last {path}: {json}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn online_as(&self, id: &str, version: &str) {
        self.wait(
            &format!("/agents/{id}"),
            &format!("{id} online as {version}"),
            |a| a["online"] == true && a["agent_version"] == version,
        )
        .await;
    }

    async fn update_state(&self, id: &str, state: &str) -> Value {
        self.wait(
            &format!("/agents/{id}/update"),
            &format!("update {state}"),
            |j| j["state"] == state,
        )
        .await
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The version a package says it is (its VERSION file's first word).
fn package_version(dist: &str) -> String {
    let file = arm::repo().join(format!("firmware/dist/{dist}/{CAMERA}_firmware/VERSION"));
    let text = std::fs::read_to_string(&file).unwrap();
    text.split_whitespace().next().unwrap().to_string()
}

/// The stamped build of the next version, as `make test` builds it.
fn next_build() -> (PathBuf, String) {
    let dist = std::fs::read_dir(arm::repo().join("firmware/dist"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with(&format!("{CAMERA}-")))
        .expect("the next build (make test builds firmware/dist/dahua-2449s-il-<next>/)");
    let binary = arm::repo().join(format!(
        "firmware/dist/{dist}/{CAMERA}_firmware/camera-agent"
    ));
    (binary, package_version(&dist))
}

/// What an update must not touch, to compare before and after.
fn camera_files(root: &Path) -> (Vec<u8>, Vec<String>) {
    let dir = root.join(PREFIX);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "supervise.pid")
        .collect();
    names.sort();
    (std::fs::read(dir.join("camera-agent")).unwrap(), names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_updates_to_the_next_build_through_a_power_cut_and_refuses_bad_releases() {
    let _one = ONE_AT_A_TIME.lock().await;
    let rig = Rig::start(1).await;
    let port = rig.first_camera_port;
    let current = package_version(CAMERA);
    let (next_binary, next) = next_build();
    let root = rig.install("ota-cam", port, &[]);
    let camera = ArmCamera::boot(&root).await.unwrap();
    rig.online_as("ota-cam", &current).await;
    let before = camera_files(&root);

    // Signed by a key the camera was not installed with.
    let stranger = rig
        .release(&next_binary, "0.99.1", TARGET, "stranger")
        .await;
    let (status, _) = rig
        .api(
            "POST",
            "/agents/ota-cam/update",
            Some(json!({ "release": stranger })),
        )
        .await;
    assert_eq!(status, 202);
    let refused = rig.update_state("ota-cam", "refused").await;
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("does not trust"),
        "{refused}"
    );
    assert_eq!(
        camera_files(&root),
        before,
        "a refused update changed the camera"
    );

    // For another processor: the relay knows the camera's target and says so.
    let aarch64 =
        arm::repo().join("firmware/dist/generic-aarch64/generic-aarch64_firmware/camera-agent");
    let other_cpu = rig
        .release(&aarch64, "0.99.2", "aarch64-unknown-linux-gnu", "keys")
        .await;
    let (status, answer) = rig
        .api(
            "POST",
            "/agents/ota-cam/update",
            Some(json!({ "release": other_cpu })),
        )
        .await;
    assert_eq!(status, 409, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("aarch64") && error.contains(TARGET),
        "{error}"
    );

    // The same binary signed as if it were for this camera: the camera looks inside.
    let mislabelled = rig.release(&aarch64, "0.99.3", TARGET, "keys").await;
    rig.api(
        "POST",
        "/agents/ota-cam/update",
        Some(json!({ "release": mislabelled })),
    )
    .await;
    let failed = rig.update_state("ota-cam", "failed").await;
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .contains("another processor"),
        "{failed}"
    );
    assert_eq!(
        camera_files(&root),
        before,
        "a failed update changed the camera"
    );

    // The next build, while a Watcher decodes; the power fails in the middle of the
    // download.
    let release = rig.release(&next_binary, &next, TARGET, "keys").await;
    let mut ffmpeg = e2e::ffmpeg_playing(&rtsp_url(port, SUB_STREAM), 60).unwrap();
    ffmpeg.wait_for_line("frame=").await.unwrap();
    let frames_at_start = e2e::frames_decoded(&ffmpeg);
    rig.api(
        "POST",
        "/agents/ota-cam/update",
        Some(json!({ "release": release })),
    )
    .await;
    let size = std::fs::metadata(&next_binary).unwrap().len();
    rig.wait("/agents/ota-cam/update", "a third of the download", |j| {
        j["bytes"].as_u64().is_some_and(|b| b > size / 3)
    })
    .await;
    assert!(
        e2e::frames_decoded(&ffmpeg) > frames_at_start,
        "the Watcher decoded on while the camera downloaded"
    );
    camera.power_off().await.unwrap();
    ffmpeg.kill().await.unwrap();
    let (binary, files) = camera_files(&root);
    assert_eq!(
        binary, before.0,
        "the running agent is untouched until the download is whole"
    );
    assert!(
        files.contains(&"camera-agent.part".to_string()),
        "{files:?}"
    );
    assert!(!files.contains(&"update.trial".to_string()), "{files:?}");
    let part = std::fs::metadata(root.join(PREFIX).join("camera-agent.part"))
        .unwrap()
        .len();
    assert!(part > 0 && part < size, "{part} of {size}");

    // Power back: the download resumes where it stopped, the new agent comes online.
    let camera = ArmCamera::boot(&root).await.unwrap();
    rig.update_state("ota-cam", "updated").await;
    rig.online_as("ota-cam", &next).await;
    let resumed_from = rig
        .relay
        .process
        .output()
        .iter()
        .filter_map(|l| {
            let at = l.find("Downloading { have: ")?;
            l[at + 20..].split(' ').next()?.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0);
    assert!(
        resumed_from > 0,
        "the download after the power cut started over"
    );

    // The stream comes back by itself, at the same URL.
    let probe = ffprobe(rtsp_url(port, SUB_STREAM), 10).await.unwrap();
    assert!(probe.frames >= 10);
    let (binary, files) = camera_files(&root);
    assert_eq!(binary, std::fs::read(&next_binary).unwrap());
    for leftover in [
        "camera-agent.old",
        "camera-agent.part",
        "update.trial",
        "update.boots",
    ] {
        assert!(
            !files.contains(&leftover.to_string()),
            "{leftover} left: {files:?}"
        );
    }
    let scrape = http(
        &Place::host(),
        "GET",
        &rig.url("/metrics"),
        Some(ADMIN),
        None,
    )
    .await
    .unwrap()
    .body;
    assert_eq!(
        metric(&scrape, r#"camera_relay_updates_total{result="updated"}"#),
        Some(1.0)
    );
    camera.power_off().await.unwrap();
}

/// A "new agent" that cannot start: busybox, which says `camera-agent: applet not
/// found` and exits.
fn crashing_binary(root: &Path) -> PathBuf {
    root.join("bin/busybox")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_that_cannot_start_is_rolled_back_even_through_a_power_cut() {
    let _one = ONE_AT_A_TIME.lock().await;
    let rig = Rig::start(1).await;
    let current = package_version(CAMERA);
    let root = rig.install("crash-cam", rig.first_camera_port, &[]);
    let camera = ArmCamera::boot(&root).await.unwrap();
    rig.online_as("crash-cam", &current).await;
    let before = camera_files(&root);
    let release = rig
        .release(&crashing_binary(&root), "0.99.9", TARGET, "keys")
        .await;
    rig.api(
        "POST",
        "/agents/crash-cam/update",
        Some(json!({ "release": release })),
    )
    .await;

    // The worst moment for the power to fail: the new binary is in place, not yet
    // proven.
    rig.update_state("crash-cam", "installing").await;
    camera.power_off().await.unwrap();
    let (binary, files) = camera_files(&root);
    assert_eq!(binary, std::fs::read(crashing_binary(&root)).unwrap());
    assert!(
        files.contains(&"camera-agent.old".to_string())
            && files.contains(&"update.trial".to_string()),
        "{files:?}"
    );

    // Power back: the supervisor starts the new agent, which fails, three times; then
    // the previous agent is back, online, and says why.
    let camera = ArmCamera::boot(&root).await.unwrap();
    let rolled_back = rig.update_state("crash-cam", "rolled_back").await;
    assert!(
        rolled_back["detail"]
            .as_str()
            .unwrap()
            .contains("stopped 3 times"),
        "{rolled_back}"
    );
    rig.online_as("crash-cam", &current).await;
    assert_eq!(
        camera_files(&root),
        before,
        "the camera is as it was before the update"
    );
    let probe = ffprobe(rtsp_url(rig.first_camera_port, SUB_STREAM), 5)
        .await
        .unwrap();
    assert!(probe.frames >= 5);
    camera.power_off().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_stops_at_its_failure_threshold() {
    let _one = ONE_AT_A_TIME.lock().await;
    let rig = Rig::start(3).await;
    let current = package_version(CAMERA);
    let mut cameras = Vec::new();
    for (i, id) in ["fleet-a", "fleet-b", "fleet-c"].iter().enumerate() {
        let root = rig.install(id, rig.first_camera_port + i as u16, &["site-a"]);
        cameras.push((id.to_string(), ArmCamera::boot(&root).await.unwrap(), root));
    }
    for (id, _, _) in &cameras {
        rig.online_as(id, &current).await;
        let (_, agent) = rig.api("GET", &format!("/agents/{id}"), None).await;
        assert_eq!(agent["labels"], json!(["site-a"]), "{agent}");
        assert_eq!(agent["target"], TARGET, "{agent}");
    }
    let release = rig
        .release(&crashing_binary(&cameras[0].2), "0.99.9", TARGET, "keys")
        .await;
    let (status, rollout) = rig
        .api(
            "POST",
            "/updates",
            Some(
                json!({ "release": release, "labels": ["site-a"], "batch": 1, "max_failures": 0 }),
            ),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    assert_eq!(rollout["total"], 3);
    let id = rollout["id"].as_u64().unwrap();
    let stopped = rig
        .wait(&format!("/updates/{id}"), "the rollout to stop", |r| {
            r["state"] == "stopped"
        })
        .await;
    assert_eq!(stopped["counts"]["rolled_back"], 1, "{stopped}");
    assert_eq!(stopped["counts"]["pending"], 2, "{stopped}");
    assert!(
        stopped["stopped"]
            .as_str()
            .unwrap()
            .contains("max_failures"),
        "{stopped}"
    );
    // The first camera is back on its version; the others were never touched.
    for (id, _, root) in &cameras {
        rig.online_as(id, &current).await;
        let (_, files) = camera_files(root);
        assert!(
            !files
                .iter()
                .any(|f| f.starts_with("update.") || f.contains(".part")),
            "{id}: {files:?}"
        );
    }
    for (_, camera, _) in cameras {
        camera.power_off().await.unwrap();
    }
}
