//! `bench`: run the comparison (`bench run`), or one of its parts: the target server
//! that stands in for the camera, the measuring client that stands in for the Watcher,
//! the peers' installation.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use bench::{paths::PathKind, peers::Tools, report, run, traffic};
use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Our camera tunnel against direct TCP and other tunnels"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Every scenario through every path; writes results.md, results.json and SVG charts.
    Run {
        /// Where the results go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Paths to compare (default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        paths: Vec<PathKind>,
        /// More samples, more data, more streams (tens of minutes).
        #[arg(long)]
        long: bool,
        /// Which scenarios: all, loopback, scale, impaired, cluster.
        #[arg(long, value_enum, default_value = "all")]
        part: run::Part,
        /// Do not install missing peers; report them as not measured.
        #[arg(long)]
        offline: bool,
    },
    /// Several cameras' sessions through an impaired, rebinding camera link for a long
    /// time; fails on any byte lost, a reconnect, or what leaks (memory, file
    /// descriptors, CLOSE_WAIT). Writes soak.md and soak.json.
    Soak {
        /// How long the sessions run.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// How many cameras.
        #[arg(long, default_value_t = 4)]
        cameras: usize,
        /// Where the report goes.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Installs the peers into the cache (once).
    Peers,
    /// The target server (the camera's stand-in); prints `READY <address>`.
    Target {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Delays and drops the packets of an NFQUEUE (run in the NAT router's namespace).
    Impair {
        #[arg(long, default_value_t = 0)]
        queue: u16,
        /// Delay each way, milliseconds.
        #[arg(long)]
        delay_ms: u64,
        /// Fraction of packets dropped, e.g. 0.02.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
    },
    /// Many idle cameras (real agents) in this one process; prints `READY <seconds>`
    /// once all are online, then keeps them until killed.
    Fleet {
        /// The relays' control URLs (repeat, or separate with commas).
        #[arg(long, value_delimiter = ',', required = true)]
        relay: Vec<String>,
        /// The cameras' RTSP server (a `bench target`).
        #[arg(long)]
        target: Option<SocketAddr>,
        /// The shared registration token.
        #[arg(long)]
        token: String,
        /// The relay certificate's SHA-256 fingerprint.
        #[arg(long)]
        fingerprint: String,
        /// How many cameras.
        #[arg(long)]
        count: usize,
        /// Seconds to wait for all of them to come online.
        #[arg(long, default_value_t = 120)]
        deadline_secs: u64,
    },
    /// The floor path's relay side (quinn, no tunnel): a QUIC endpoint and a TCP port
    /// per camera; prints `READY quic=… sha256=… entries=…`.
    FloorRelay {
        /// QUIC address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        quic: SocketAddr,
        /// Address of the Watchers' TCP ports.
        #[arg(long, default_value = "127.0.0.1")]
        tcp_ip: std::net::IpAddr,
        /// How many cameras.
        #[arg(long, default_value_t = 1)]
        cameras: usize,
    },
    /// The floor path's camera side: dials the relay side, carries its streams to the
    /// target; prints `READY` once connected.
    FloorCamera {
        /// The relay side's QUIC address.
        #[arg(long)]
        relay: SocketAddr,
        /// Its certificate's SHA-256.
        #[arg(long)]
        sha256: String,
        /// Which camera (its TCP port on the relay side).
        #[arg(long, default_value_t = 0)]
        index: u32,
        /// The target to connect streams to.
        #[arg(long)]
        target: SocketAddr,
    },
    /// One measurement from the Watcher's side; prints `RESULT <json>`.
    Client {
        #[command(subcommand)]
        measure: Measure,
    },
}

#[derive(Subcommand, Debug)]
enum Measure {
    /// Round trips of small messages on one session.
    Latency {
        addr: SocketAddr,
        #[arg(long, default_value_t = 5000)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Connect → first byte from the target, sessions one after another.
    Setup {
        addr: SocketAddr,
        #[arg(long, default_value_t = 200)]
        count: u64,
    },
    /// Bytes through one session, camera→Watcher unless --up.
    Throughput {
        addr: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        up: bool,
    },
    /// Paced camera-like streams, one per address, all at once.
    Streams {
        addrs: Vec<SocketAddr>,
        #[arg(long)]
        bits_per_sec: u64,
        #[arg(long)]
        seconds: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    // The floor path runs as a tunnel at its cheapest would: one thread per process.
    let runtime = match command {
        Cmd::FloorRelay { .. } | Cmd::FloorCamera { .. } => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()?;
    runtime.block_on(run_command(command))
}

async fn run_command(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::Run {
            out,
            paths,
            long,
            part,
            offline,
        } => {
            let paths = if paths.is_empty() {
                PathKind::ALL.to_vec()
            } else {
                paths
            };
            let tools = Tools::install(offline).await;
            let plan = if long {
                run::Plan::long(part, paths)
            } else {
                run::Plan::quick(part, paths)
            };
            e2e::set_echo(false);
            let scenarios = run::run(&plan, &tools).await?;
            report::write(&out, &report::Machine::here(), &scenarios)?;
            print!("{}", report::markdown(&report::Machine::here(), &scenarios));
            eprintln!("bench: results in {}", out.display());
        }
        Cmd::Soak {
            minutes,
            cameras,
            out,
        } => {
            let duration = Duration::from_secs_f64(minutes * 60.0);
            let plan = bench::soak::Plan {
                cameras,
                ..bench::soak::Plan::new(duration)
            };
            e2e::set_echo(false);
            let report = bench::soak::run(&plan, &std::env::current_exe()?).await?;
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("soak.md"), report.markdown())?;
            std::fs::write(
                out.join("soak.json"),
                serde_json::to_string_pretty(&report)?,
            )?;
            print!("{}", report.markdown());
            let failures = report.failures();
            anyhow::ensure!(
                failures.is_empty(),
                "the soak failed: {}",
                failures.join("; ")
            );
        }
        Cmd::Peers => {
            let tools = Tools::install(false).await;
            for peer in bench::peers::PEERS {
                match tools.path(peer.binary) {
                    Ok(path) => println!("{}: {}", peer.binary, path.display()),
                    Err(e) => println!("{e}"),
                }
            }
        }
        Cmd::Target { listen } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            println!("READY {}", listener.local_addr()?);
            traffic::serve(listener).await?;
        }
        Cmd::Impair {
            queue,
            delay_ms,
            loss,
        } => bench::impair::run(queue, Duration::from_millis(delay_ms), loss)?,
        Cmd::Fleet {
            relay,
            target,
            token,
            fingerprint,
            count,
            deadline_secs,
        } => {
            bench::fleet::run(bench::fleet::FleetConfig {
                relay_urls: relay,
                target,
                token,
                fingerprint,
                count,
                deadline: Duration::from_secs(deadline_secs),
            })
            .await?
        }
        Cmd::FloorRelay {
            quic,
            tcp_ip,
            cameras,
        } => bench::floor::relay_side(quic, tcp_ip, cameras).await?,
        Cmd::FloorCamera {
            relay,
            sha256,
            index,
            target,
        } => bench::floor::camera_side(relay, &sha256, index, target).await?,
        Cmd::Client { measure } => match measure {
            Measure::Latency { addr, count, size } => {
                result(&traffic::latency(addr, size, count, 500).await?)
            }
            Measure::Setup { addr, count } => result(&traffic::setup(addr, count).await?),
            Measure::Throughput { addr, bytes, up } => {
                result(&traffic::throughput(addr, bytes, up).await?)
            }
            Measure::Streams {
                addrs,
                bits_per_sec,
                seconds,
            } => {
                result(&traffic::streams(&addrs, bits_per_sec, Duration::from_secs(seconds)).await?)
            }
        },
    }
    Ok(())
}

fn result(value: &impl Serialize) {
    println!(
        "RESULT {}",
        serde_json::to_string(value).unwrap_or_default()
    );
}
