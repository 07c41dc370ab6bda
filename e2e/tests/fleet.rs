//! A fleet returning after its relay crashed: 500 cameras (real agents, many in this
//! process) against the real relay binary with a state directory.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::time::Duration;

use agent::config::AgentConfig;
use e2e::{bin, free_port_run, free_ports, metric, Child, Fleet};

const CAMERAS: usize = 500;
const TOKEN: &str = "fleet-token";
/// The agents' `network.reconnect_interval`: the cap of their backoff.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(5);
/// The relay's `limits.registrations_per_sec`: low enough that the fleet queues.
const RATE: usize = 50;

async fn start_relay(config: &std::path::Path) -> Child {
    let mut relay = tokio::process::Command::new(bin("relay").unwrap());
    relay
        .arg("--config")
        .arg(config)
        .env("RELAY_LOG", "warn,relay=info");
    let mut relay = Child::spawn("relay", relay).unwrap();
    relay.wait_for_line("relay ready").await.unwrap();
    relay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_returns_after_a_relay_crash_at_the_admitted_pace_each_camera_to_its_port() {
    e2e::set_echo(false);
    let dir = tempfile::tempdir().unwrap();
    let control = free_ports(1)[0];
    let first = free_port_run(CAMERAS as u16);
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{control}\"\n\
             camera_ports = \"{first}-{}\"\n\
             shared_token = \"{TOKEN}\"\n\
             state_dir = \"{}\"\n\
             [limits]\nregistrations_per_sec = {RATE}\n",
            first as usize + CAMERAS - 1,
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut relay = start_relay(&config).await;

    let configs = (0..CAMERAS)
        .map(|i| {
            let json = serde_json::json!({
                "agent": {
                    "agent_id": format!("cam-{i}"),
                    "tunnel_server_url": format!("ws://127.0.0.1:{control}/tunnel"),
                    "tunnel_server_token": TOKEN,
                },
                "tunnel": { "tunnel_port": 0 },
                "network": {
                    "reconnect_interval": RECONNECT_INTERVAL.as_secs(),
                    "heartbeat_interval": 10,
                },
            });
            AgentConfig::parse(&json.to_string(), "fleet test").unwrap()
        })
        .collect();
    let fleet = Fleet::start(configs);
    let deadline = RECONNECT_INTERVAL + Duration::from_secs((CAMERAS / RATE) as u64 + 60);
    fleet
        .online_times(tokio::time::Instant::now(), deadline)
        .await
        .unwrap();
    let ports = fleet.ports();

    // The crash: no goodbye, every control link and QUIC connection just gone.
    relay.kill().await.unwrap();
    fleet.all_offline(Duration::from_secs(60)).await.unwrap();
    let relay = start_relay(&config).await;
    let back = tokio::time::Instant::now();
    let mut times = fleet.online_times(back, deadline).await.unwrap();

    assert_eq!(fleet.ports(), ports, "a camera came back on another port");
    let exposition = e2e::http(
        &e2e::Place::host(),
        "GET",
        &format!("http://127.0.0.1:{control}/metrics"),
        None,
        None,
    )
    .await
    .unwrap()
    .body;
    let retried = metric(
        &exposition,
        "camera_relay_registrations_total{result=\"retry_later\"}",
    )
    .unwrap_or(0.0);
    let accepted = metric(
        &exposition,
        "camera_relay_registrations_total{result=\"accepted\"}",
    )
    .unwrap();
    assert_eq!(accepted, CAMERAS as f64, "each camera registered once");
    assert!(
        retried > 0.0,
        "the fleet never queued; raise CAMERAS or lower RATE"
    );

    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64();
    eprintln!(
        "{CAMERAS} cameras back after the relay restart: p50 {:.1} s, p90 {:.1} s, max {:.1} s; \
         {retried} registrations told to retry later",
        at(0.5),
        at(0.9),
        at(1.0)
    );
    // The bound the settings promise: the backoff's cap, then the admission queue;
    // plus room for a loaded machine.
    let bound = RECONNECT_INTERVAL + Duration::from_secs((CAMERAS / RATE) as u64 + 20);
    assert!(
        times[CAMERAS - 1] <= bound,
        "last camera back after {:?}",
        times[CAMERAS - 1]
    );
    fleet.stop().await;
    drop(relay);
}
