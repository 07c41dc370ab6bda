//! `certs`: make the tunnel's certificates (a private CA, the relay's, one per agent),
//! inspect them, print fingerprints.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use certs::{Ca, PemPair, Validity};
use clap::{Parser, Subcommand};

/// Certificates for the camera tunnel. Keys are ECDSA P-256, written with mode 0600;
/// nothing is overwritten without --force.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write ca.crt and ca.key: the private CA that signs the relay's and the agents'
    /// certificates. Keep ca.key off the relay host if you can.
    Ca {
        /// The CA's common name.
        #[arg(long, default_value = "camera-tunnel CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = certs::CA_DAYS)]
        days: u32,
        #[command(flatten)]
        out: Out,
    },
    /// Write relay.crt and relay.key for the relay's [tls] section (WSS and QUIC).
    Relay {
        /// DNS name agents dial (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP address agents dial (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Directory holding ca.crt and ca.key; without it the certificate is
        /// self-signed and agents must pin its fingerprint.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = certs::RELAY_DAYS)]
        days: u32,
        #[command(flatten)]
        out: Out,
    },
    /// Write <ID>.crt and <ID>.key: an agent's client certificate, its subject naming
    /// the agent id, signed by the CA.
    Agent {
        /// The agent id (as in the agent's config.json, agent.agent_id).
        #[arg(long)]
        id: String,
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = certs::AGENT_DAYS)]
        days: u32,
        #[command(flatten)]
        out: Out,
    },
    /// Write peer-<ID>.crt and peer-<ID>.key: a cluster relay's certificate for the
    /// relay-to-relay links ([cluster] peer_cert/peer_key), naming its relay id, signed
    /// by the cluster's CA.
    Peer {
        /// The relay id (as in its relay.toml, [cluster] relay_id).
        #[arg(long)]
        id: String,
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = certs::RELAY_DAYS)]
        days: u32,
        #[command(flatten)]
        out: Out,
    },
    /// Print a fresh random token for an agent (its config's agent.tunnel_server_token)
    /// and the argon2 hash the relay's config stores instead ([[agents]] token_hash).
    Token {
        /// The agent id, to print the relay.toml entry ready to paste.
        #[arg(long)]
        id: String,
    },
    /// Write release.key and release.pub: the Ed25519 key pair that signs agent
    /// releases. Cameras trust release.pub (the firmware package carries it); keep
    /// release.key offline, where releases are signed.
    ReleaseKey {
        #[command(flatten)]
        out: Out,
    },
    /// Sign an agent binary for over-the-air updates: writes FILE.sig, the detached
    /// signature over the binary together with its target, version and SHA-256.
    Sign {
        /// The agent binary (camera-agent, as `make firmware` builds it).
        file: PathBuf,
        /// The release private key (release.key).
        #[arg(long)]
        key: PathBuf,
        /// The Rust target the binary is for, e.g. armv7-unknown-linux-gnueabihf
        /// (`camera-agent --version` prints it).
        #[arg(long)]
        target: String,
        /// The agent version inside (`camera-agent --version` prints it).
        #[arg(long)]
        version: String,
        /// Where to write the signature (default: FILE.sig).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing signature.
        #[arg(long)]
        force: bool,
    },
    /// Print a certificate's subject, issuer, SANs, validity and SHA-256 fingerprint.
    Inspect {
        /// The PEM certificate file.
        file: PathBuf,
    },
    /// Print the SHA-256 fingerprint of a PEM certificate (what agents pin).
    Fingerprint {
        /// The PEM certificate file.
        file: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct Out {
    /// Directory to write into.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
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
        Cmd::Ca { name, days, out } => {
            write(
                &out,
                "ca",
                &certs::ca_certificate(&name, Validity::days(days)?)?,
            )?;
        }
        Cmd::Relay {
            dns,
            ip,
            ca,
            days,
            out,
        } => {
            let ca = ca.map(|dir| load_ca(&dir)).transpose()?;
            write(
                &out,
                "relay",
                &certs::relay_certificate(&dns, &ip, Validity::days(days)?, ca.as_ref())?,
            )?;
        }
        Cmd::Agent { id, ca, days, out } => {
            let ca = load_ca(&ca)?;
            write(
                &out,
                &id,
                &certs::agent_certificate(&id, Validity::days(days)?, &ca)?,
            )?;
        }
        Cmd::Peer { id, ca, days, out } => {
            let ca = load_ca(&ca)?;
            write(
                &out,
                &format!("peer-{id}"),
                &certs::peer_certificate(&id, Validity::days(days)?, &ca)?,
            )?;
        }
        Cmd::Token { id } => {
            common::protocol::check_agent_id(&id)
                .map_err(|why| anyhow::anyhow!("agent id {why}"))?;
            let token = certs::new_token();
            let hash = certs::hash_token(&token)?;
            println!("# the camera's config.json, agent section:");
            println!("\"tunnel_server_token\": \"{token}\"");
            println!();
            println!("# the relay's relay.toml (the relay never sees the token itself):");
            println!("[[agents]]\nid = \"{id}\"\ntoken_hash = \"{hash}\"");
        }
        Cmd::ReleaseKey { out } => {
            let (public, private) = certs::write_release_key(&out.out, out.force)?;
            println!(
                "wrote {} (mode 0600: keep it offline) and {} (cameras trust it: \
                 make firmware RELEASE_PUB={})",
                private.display(),
                public.display(),
                public.display()
            );
        }
        Cmd::Sign {
            file,
            key,
            target,
            version,
            out,
            force,
        } => {
            let out = out.unwrap_or_else(|| {
                let mut name = file.clone().into_os_string();
                name.push(".sig");
                PathBuf::from(name)
            });
            let release = certs::sign_release(&file, &key, &target, &version, &out, force)?;
            println!(
                "wrote {}: {} ({} bytes, SHA-256 {}), signed with release key {}",
                out.display(),
                release.describe(),
                release.size,
                release.sha256,
                release.key
            );
        }
        Cmd::Inspect { file } => println!("{}", certs::inspect(&file)?),
        Cmd::Fingerprint { file } => println!("{}", certs::fingerprint_pem(&file)?),
    }
    Ok(())
}

fn load_ca(dir: &Path) -> anyhow::Result<Ca> {
    Ok(Ca::load(&dir.join("ca.crt"), &dir.join("ca.key"))?)
}

fn write(out: &Out, stem: &str, pair: &PemPair) -> anyhow::Result<()> {
    let (cert, key) = certs::write_pair(&out.out, stem, pair, out.force)?;
    println!("wrote {} and {} (mode 0600)", cert.display(), key.display());
    println!("{}", certs::inspect(&cert)?);
    Ok(())
}
