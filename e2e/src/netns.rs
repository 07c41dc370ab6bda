//! A small internet in network namespaces, so tests see what a real deployment sees:
//! each camera (simulator and agent) on its own private LAN behind one NAT router, and
//! the relay with its Watchers on the public side. The relay's side has no route into
//! the LANs, so nothing can reach a camera around the tunnel (a camera's RTP over UDP,
//! say, goes nowhere, as it would on the internet).
//!
//! ```text
//!  camera 0 ns: 192.168.1.108 ─┐
//!  camera 1 ns: 192.168.2.108 ─┼─ nat ns (MASQUERADE) 203.0.113.1 ── relay ns: 203.0.113.5
//!  …                          ─┘
//! ```
//!
//! Needs root, iproute2 and iptables (`make test` installs them). Every namespace is
//! named after this process, deleted (with whatever still runs in it) on drop, and
//! namespaces left behind by a test process that died are swept at the next start.

use std::{
    ffi::OsStr,
    ops::RangeInclusive,
    process::{Command as StdCommand, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _};
use tokio::process::Command;

/// The relay's public address.
pub const RELAY_IP: &str = "203.0.113.5";
/// The NAT router's public address: what the relay sees every camera come from.
pub const NAT_PUBLIC_IP: &str = "203.0.113.1";

/// Prefix of every namespace a lab makes.
const PREFIX: &str = "ctun";

/// Where a process runs: this host, or inside a network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Place {
    netns: Option<String>,
}

impl Place {
    /// The host's own network (loopback tests).
    pub fn host() -> Self {
        Place::default()
    }

    /// A command for `program` that runs here.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.std_command(program).into()
    }

    fn std_command(&self, program: impl AsRef<OsStr>) -> StdCommand {
        match &self.netns {
            None => StdCommand::new(program),
            Some(ns) => {
                let mut cmd = StdCommand::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
        }
    }
}

/// The namespaces of one test; see the module docs.
#[derive(Debug)]
pub struct Lab {
    name: String,
    cameras: usize,
}

impl Lab {
    /// Builds the relay side, the NAT router and `cameras` camera LANs.
    pub fn new(cameras: usize) -> anyhow::Result<Lab> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        anyhow::ensure!((1..=200).contains(&cameras), "a lab has 1 to 200 cameras");
        sweep_orphans();
        let lab = Lab {
            name: format!(
                "{PREFIX}{}x{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            cameras,
        };
        // Dropped (and cleaned up) if any step fails.
        let (relay, nat) = (lab.ns("relay"), lab.ns("nat"));
        for ns in std::iter::once(relay.clone())
            .chain(std::iter::once(nat.clone()))
            .chain((0..cameras).map(|i| lab.camera_ns(i)))
        {
            ip(&["netns", "add", &ns]).context(
                "cannot create a network namespace; these tests need root and iproute2 \
                 (CI runs as root; `make test` installs iproute2 and iptables)",
            )?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "-n", &relay, "link", "add", "eth0", "type", "veth", "peer", "name", "wan", "netns",
            &nat,
        ])?;
        ip(&[
            "-n",
            &relay,
            "addr",
            "add",
            &format!("{RELAY_IP}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &relay, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &nat,
            "addr",
            "add",
            &format!("{NAT_PUBLIC_IP}/24"),
            "dev",
            "wan",
        ])?;
        ip(&["-n", &nat, "link", "set", "wan", "up"])?;
        for i in 0..cameras {
            let cam = lab.camera_ns(i);
            let lan = format!("lan{i}");
            ip(&[
                "-n", &cam, "link", "add", "eth0", "type", "veth", "peer", "name", &lan, "netns",
                &nat,
            ])?;
            ip(&[
                "-n",
                &cam,
                "addr",
                "add",
                &format!("{}/24", camera_ip(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &cam, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &cam,
                "route",
                "add",
                "default",
                "via",
                &lan_gateway(i),
            ])?;
            ip(&[
                "-n",
                &nat,
                "addr",
                "add",
                &format!("{}/24", lan_gateway(i)),
                "dev",
                &lan,
            ])?;
            ip(&["-n", &nat, "link", "set", &lan, "up"])?;
        }
        let router = lab.nat();
        run(&router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        run(
            &router,
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan",
                "-j",
                "MASQUERADE",
            ],
        )
        .context("cannot set up NAT; is iptables installed? (`make test` installs it)")?;
        Ok(lab)
    }

    /// NAT rebinding: the router forgets its UDP mappings and maps the cameras' next
    /// datagrams from a port range not used before, so every camera's public UDP
    /// source port changes (as a home router's does after a reboot of its NAT table or
    /// a mobile uplink's carrier NAT). TCP mappings are kept. `generation` (1, 2, …)
    /// picks the range; call it with a new one each time. Returns the new range.
    pub fn rebind_udp(&self, generation: u16) -> anyhow::Result<RangeInclusive<u16>> {
        let router = self.nat();
        let range = |generation: u16| {
            let first = 20_000 + 1_000 * (generation % 40);
            first..=first + 999
        };
        let to = |r: &RangeInclusive<u16>| format!("{NAT_PUBLIC_IP}:{}-{}", r.start(), r.end());
        let new = range(generation);
        let rule = |action: &str, to: &str| {
            let mut args = vec!["-t", "nat", action, "POSTROUTING"];
            if action == "-I" {
                args.push("1");
            }
            args.extend(["-o", "wan", "-p", "udp", "-j", "SNAT", "--to-source", to]);
            run(&router, "iptables", &args)
        };
        rule("-I", &to(&new))?;
        if generation > 1 {
            rule("-D", &to(&range(generation - 1)))?;
        }
        // conntrack exits 1 when it deleted nothing; that is fine here.
        let _ = router
            .std_command("conntrack")
            .args(["-D", "-p", "udp"])
            .output()
            .context("cannot run conntrack (`make test` installs it)")?;
        Ok(new)
    }

    /// Blocks (or unblocks) every UDP datagram through the cameras' router, as a
    /// network that allows only TCP does: QUIC cannot reach the relay.
    pub fn block_udp(&self, blocked: bool) -> anyhow::Result<()> {
        let action = if blocked { "-I" } else { "-D" };
        run(
            &self.nat(),
            "iptables",
            &[action, "FORWARD", "-p", "udp", "-j", "DROP"],
        )
    }

    /// Gives camera `i`'s LAN a hosts file (`address names` lines, localhost added), as
    /// the camera's own /etc/hosts or its router's DNS would name the relay: `ip netns
    /// exec` mounts /etc/netns/<namespace>/hosts over /etc/hosts for what runs there.
    /// Removed with the lab.
    pub fn camera_hosts(&self, i: usize, lines: &[&str]) -> anyhow::Result<()> {
        assert!(i < self.cameras, "the lab has {} cameras", self.cameras);
        let dir = netns_etc(&self.camera_ns(i));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {dir}"))?;
        let hosts = format!("127.0.0.1 localhost\n{}\n", lines.join("\n"));
        std::fs::write(format!("{dir}/hosts"), hosts)
            .with_context(|| format!("cannot write {dir}/hosts"))
    }

    /// The relay's side of the internet, where Watchers run too.
    pub fn relay(&self) -> Place {
        Place {
            netns: Some(self.ns("relay")),
        }
    }

    /// Camera `i`'s LAN, where its simulator and its agent run.
    pub fn camera(&self, i: usize) -> Place {
        assert!(i < self.cameras, "the lab has {} cameras", self.cameras);
        Place {
            netns: Some(self.camera_ns(i)),
        }
    }

    /// The NAT router between them.
    pub fn nat(&self) -> Place {
        Place {
            netns: Some(self.ns("nat")),
        }
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.name)
    }

    fn camera_ns(&self, i: usize) -> String {
        self.ns(&format!("cam{i}"))
    }

    fn all(&self) -> Vec<String> {
        let mut all = vec![self.ns("relay"), self.ns("nat")];
        all.extend((0..self.cameras).map(|i| self.camera_ns(i)));
        all
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.all() {
            remove(&ns);
        }
    }
}

/// Camera `i`'s LAN address.
pub fn camera_ip(i: usize) -> String {
    format!("192.168.{}.108", i + 1)
}

/// Camera `i`'s router: the NAT namespace's address on that LAN.
pub fn lan_gateway(i: usize) -> String {
    format!("192.168.{}.1", i + 1)
}

/// Where `ip netns exec` finds the files it mounts over /etc for `ns`.
fn netns_etc(ns: &str) -> String {
    format!("/etc/netns/{ns}")
}

/// Kills what runs in `ns` and deletes it with its /etc files; quiet, for cleanup.
fn remove(ns: &str) {
    let _ = std::fs::remove_dir_all(netns_etc(ns));
    if let Ok(out) = StdCommand::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = StdCommand::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = StdCommand::new("ip")
        .args(["netns", "delete", ns])
        .stderr(Stdio::null())
        .status();
}

/// Deletes the namespaces of labs whose test process is gone.
fn sweep_orphans() {
    let Ok(out) = StdCommand::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('x').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove(name);
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(&Place::host(), "ip", args)
}

/// Runs a setup command at `place` and fails with what it printed.
pub fn run(place: &Place, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = place
        .std_command(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
