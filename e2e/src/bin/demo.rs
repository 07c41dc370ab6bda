//! `make demo`: a simulated camera behind the real `camera-agent`, the real `relay`,
//! and ffprobe pulling both streams through the tunnel, as a VMS would.
//!
//! Prints what was decoded and the URL a VMS would use. On a terminal it then keeps
//! everything running until Ctrl-C, so the stream can be opened in VLC or ffplay;
//! otherwise (or with `--once`) it stops when done. Every process it started is stopped.

use std::{io::IsTerminal, net::TcpListener, time::Instant};

use anyhow::Context as _;
use e2e::{
    agent_config_json, ffprobe, free_ports, rtsp_url, AgentProcess, CameraSim, Child, Place,
    RelayProcess, MAIN_STREAM, SUB_STREAM,
};

const TOKEN: &str = "demo-token";
const AGENT_ID: &str = "dahua-2449s-il-demo";

/// `preferred` if it is free on 127.0.0.1, else any free port.
fn port_or_free(preferred: u16) -> u16 {
    match TcpListener::bind(("127.0.0.1", preferred)) {
        Ok(_) => preferred,
        Err(_) => free_ports(1)[0],
    }
}

#[tokio::main]
async fn main() {
    e2e::set_echo(false);
    let once = std::env::args().any(|a| a == "--once") || !std::io::stdin().is_terminal();
    let mut started = Vec::new();
    let result = run(once, &mut started).await;
    if let Err(e) = &result {
        eprintln!("\ndemo failed: {e:#}\n");
        for (name, process) in &started {
            eprintln!("--- last lines of {name} ---");
            let output = process.output();
            for line in output.iter().rev().take(15).rev() {
                eprintln!("{line}");
            }
        }
    }
    println!("stopping camera, relay and agent");
    drop(started); // kill_on_drop
    std::process::exit(i32::from(result.is_err()));
}

async fn run(once: bool, started: &mut Vec<(&'static str, Child)>) -> anyhow::Result<()> {
    let t0 = Instant::now();
    println!("1/4 starting the camera simulator (gst-rtsp-server: H.265 main stream, H.264 sub stream, Digest auth)");
    let camera = CameraSim::start(&["--main-size", "1280x720"]).await?;
    println!(
        "    camera RTSP server on 127.0.0.1:{} (on a real camera: port 554)",
        camera.port
    );
    started.push(("camera", camera.process));

    let relay_port = port_or_free(8080);
    let camera_port = port_or_free(8554);
    let shared_port = port_or_free(8553);
    println!("2/4 starting the relay: relay --port {relay_port} --tunnel-port {camera_port} --shared-port {shared_port} --token ****");
    let relay = RelayProcess::start_in(
        &Place::host(),
        "127.0.0.1",
        relay_port,
        camera_port,
        TOKEN,
        &["--shared-port", &shared_port.to_string()],
    )
    .await?;
    let relay_url = relay.url();
    started.push(("relay", relay.process));

    println!("3/4 starting camera-agent with the seed-style config.json");
    let config = agent_config_json(AGENT_ID, &relay_url, TOKEN, camera_port, camera.port);
    let agent = AgentProcess::start("agent", &config).await?;
    println!(
        "    agent online after {:.1} s; config: {}",
        t0.elapsed().as_secs_f64(),
        agent.dir.path().join("config.json").display()
    );
    started.push(("agent", agent.process));

    println!(
        "4/4 pulling both streams through the tunnel with ffprobe (RTSP over TCP, decoding frames)"
    );
    let main_url = rtsp_url(camera_port, MAIN_STREAM);
    let sub_url = rtsp_url(camera_port, SUB_STREAM);
    let shared_url = rtsp_url(shared_port, &format!("/{AGENT_ID}{MAIN_STREAM}"));
    let t = Instant::now();
    let (main, sub, shared) = tokio::join!(
        ffprobe(&main_url, 40),
        ffprobe(&sub_url, 40),
        ffprobe(&shared_url, 10)
    );
    let (main, sub) = (main.context("main stream")?, sub.context("sub stream")?);
    let shared = shared.context("main stream on the shared port")?;
    let secs = t.elapsed().as_secs_f64();
    println!();
    println!("    stream       codec  size        frames decoded");
    println!(
        "    main (0)     {:<6} {:>4}x{:<6} {}",
        main.codec, main.width, main.height, main.frames
    );
    println!(
        "    sub  (1)     {:<6} {:>4}x{:<6} {}",
        sub.codec, sub.width, sub.height, sub.frames
    );
    println!(
        "    main, shared {:<6} {:>4}x{:<6} {}",
        shared.codec, shared.width, shared.height, shared.frames
    );
    println!("    ({secs:.1} s for all, at the camera's 20 fps)");
    println!();
    println!("A VMS (Flussonic Watcher, VLC, ffmpeg…) pulls the camera from the relay host at:");
    println!("    {main_url}");
    println!("    {sub_url}");
    println!("or, on the port shared by all cameras:");
    println!("    {shared_url}");
    println!("Per-camera media health for Prometheus: http://127.0.0.1:{relay_port}/metrics");
    println!(
        "The operator's console: http://127.0.0.1:{relay_port}/ui/ (no admin token is set: sign in with the field empty, from this host)"
    );

    if once {
        return Ok(());
    }
    println!();
    println!("Running. Try:  ffplay '{main_url}'");
    println!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
