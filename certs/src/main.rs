//! `certs`: create the relay's QUIC certificate and print fingerprints.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// Certificates for the camera tunnel.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write relay.crt and relay.key for the relay's `[tls] quic_cert` / `quic_key`, so
    /// its certificate (and the pin agents learn) stays the same across restarts.
    Relay {
        /// DNS name of the relay (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP address of the relay (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Directory to write into.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Print the SHA-256 fingerprint of a PEM certificate.
    Fingerprint {
        /// The certificate file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("certs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Relay {
            dns,
            ip,
            out,
            force,
        } => {
            let dns = if dns.is_empty() && ip.is_empty() {
                vec!["camera-relay".to_string()]
            } else {
                dns
            };
            let pair = certs::relay_certificate(&dns, &ip)?;
            let (cert, key) = certs::write_pair(&out, "relay", &pair, force)?;
            println!("wrote {} and {} (mode 0600)", cert.display(), key.display());
            println!("sha256 {}", certs::fingerprint_pem(&cert)?);
        }
        Cmd::Fingerprint { file } => println!("{}", certs::fingerprint_pem(&file)?),
    }
    Ok(())
}
