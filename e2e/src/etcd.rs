//! A real etcd cluster on loopback for the relay-cluster tests: Debian's `etcd`, each
//! member on ports chosen at run time with its data in the test's own temporary
//! directory, every member killed when the cluster is dropped.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use crate::{free_port_run, Child, Place};

/// etcd clusters running at once in one test binary: each is three processes that
/// must hold elections in time, beside the relays and agents of their tests.
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Members' election settings, loose enough for a loaded 2-core machine.
const HEARTBEAT_MS: &str = "100";
const ELECTION_MS: &str = "1000";

/// A running etcd cluster.
#[derive(Debug)]
pub struct EtcdCluster {
    /// Members, `None` while stopped.
    members: Vec<Option<Child>>,
    clients: Vec<u16>,
    peers: Vec<u16>,
    /// Clients reach the members over TLS with a client certificate.
    tls: Option<EtcdTls>,
    /// `root:password` once authentication is on.
    root: Option<String>,
    /// This cluster's turn among the binary's clusters.
    _slot: tokio::sync::SemaphorePermit<'static>,
    dir: tempfile::TempDir,
    /// The network its members (and etcdctl) run in.
    place: Place,
}

/// Files of an etcd that serves clients over TLS and asks for their certificates, all
/// issued by the project's own `certs` tool (its CA, a server and a client certificate).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The CA of the members' and the clients' certificates.
    pub ca: PathBuf,
    /// A client certificate and key (for relays and etcdctl).
    pub client: (PathBuf, PathBuf),
    server: (PathBuf, PathBuf),
}

impl EtcdTls {
    /// Issues the files into `dir` with the `certs` binary.
    async fn issue(dir: &Path) -> anyhow::Result<Self> {
        let dir_arg = dir.to_str().context("temporary directory")?;
        for args in [
            vec!["ca", "--out", dir_arg],
            vec![
                "relay",
                "--ip",
                "127.0.0.1",
                "--ca",
                dir_arg,
                "--out",
                dir_arg,
            ],
            vec![
                "agent",
                "--id",
                "etcd-client",
                "--ca",
                dir_arg,
                "--out",
                dir_arg,
            ],
        ] {
            crate::certs(&args).await?;
        }
        Ok(EtcdTls {
            ca: dir.join("ca.crt"),
            client: (dir.join("etcd-client.crt"), dir.join("etcd-client.key")),
            server: (dir.join("relay.crt"), dir.join("relay.key")),
        })
    }
}

impl EtcdCluster {
    /// Starts `n` members and waits until each serves clients.
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        Self::start_with(n, false, Place::host()).await
    }

    /// Starts `n` members in `place` (a network namespace), for relays there.
    pub async fn start_in(place: &Place, n: usize) -> anyhow::Result<Self> {
        Self::start_with(n, false, place.clone()).await
    }

    /// Starts `n` members that serve clients over TLS only and ask for their
    /// certificates ([`EtcdCluster::tls`]).
    pub async fn start_tls(n: usize) -> anyhow::Result<Self> {
        Self::start_with(n, true, Place::host()).await
    }

    async fn start_with(n: usize, tls: bool, place: Place) -> anyhow::Result<Self> {
        // A port picked free may be taken before etcd binds it (by another test); a
        // member that cannot bind exits, and the cluster never gets healthy. Then the
        // whole cluster starts again on other ports.
        const TRIES: usize = 3;
        let mut failure = None;
        for _ in 0..TRIES {
            match Self::try_start(n, tls, place.clone()).await {
                Ok(cluster) => return Ok(cluster),
                Err(e) => failure = Some(e),
            }
        }
        Err(failure
            .unwrap_or_else(|| anyhow::anyhow!("no try"))
            .context(format!("no healthy etcd cluster in {TRIES} tries")))
    }

    async fn try_start(n: usize, tls: bool, place: Place) -> anyhow::Result<Self> {
        let slot = SLOTS.acquire().await?;
        // Below the ephemeral range, where no outgoing connection of this machine (a
        // relay's to etcd, say) takes one meanwhile.
        let base = free_port_run(u16::try_from(2 * n)?);
        let ports: Vec<u16> = (base..).take(2 * n).collect();
        let (clients, peers) = ports.split_at(n);
        let dir = tempfile::tempdir()?;
        let tls = match tls {
            true => Some(EtcdTls::issue(dir.path()).await?),
            false => None,
        };
        let mut cluster = EtcdCluster {
            members: (0..n).map(|_| None).collect(),
            clients: clients.to_vec(),
            peers: peers.to_vec(),
            tls,
            root: None,
            _slot: slot,
            dir,
            place,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        for i in 0..n {
            cluster.ready(i).await?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let initial: Vec<String> = self
            .peers
            .iter()
            .enumerate()
            .map(|(j, port)| format!("m{j}=http://127.0.0.1:{port}"))
            .collect();
        let client = self.endpoint(i);
        let peer = format!("http://127.0.0.1:{}", self.peers[i]);
        let mut cmd = self.place.command("etcd");
        cmd.args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("m{i}")))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new", "--initial-cluster-token"])
            .arg(self.dir.path().file_name().unwrap_or_default())
            .args([
                "--heartbeat-interval",
                HEARTBEAT_MS,
                "--election-timeout",
                ELECTION_MS,
            ])
            .args(["--logger", "zap", "--log-level", "warn"]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server.0)
                .arg("--key-file")
                .arg(&tls.server.1)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        // Quiet unless something goes wrong; readiness is asked with etcdctl.
        self.members[i] = Some(Child::spawn(&format!("etcd-m{i}"), cmd)?);
        Ok(())
    }

    /// Waits until member `i` answers a health check (which needs a leader); an error
    /// at once if a member exited (it could not bind its ports, say).
    async fn ready(&mut self, i: usize) -> anyhow::Result<()> {
        let endpoint = self.endpoint(i);
        let deadline = tokio::time::Instant::now() + crate::READY_TIMEOUT;
        loop {
            if let Some(j) = (0..self.members.len())
                .find(|&j| self.members[j].as_mut().is_some_and(Child::has_exited))
            {
                let said = self.members[j]
                    .as_ref()
                    .map(Child::output)
                    .unwrap_or_default();
                anyhow::bail!("etcd member m{j} exited: {}", said.join("\n"));
            }
            let health = self.etcdctl_at(&endpoint, &["endpoint", "health"]).await;
            match health {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e.context(format!("etcd member m{i} never became healthy")))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.clients[i])
    }

    /// The TLS files, when the members serve clients over TLS.
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.clients.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Kills member `i` with SIGKILL.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut member) = self.members[i].take() {
            member.kill().await?;
        }
        Ok(())
    }

    /// Starts member `i` again on its data (after [`EtcdCluster::kill`]) and waits
    /// until it is healthy.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn(i)?;
        self.ready(i).await
    }

    /// Kills every member: the store is gone.
    pub async fn kill_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.members.len() {
            self.kill(i).await?;
        }
        Ok(())
    }

    /// Starts every stopped member again and waits until all are healthy (a member
    /// alone has no quorum, so all start before any is waited for).
    pub async fn restart_all(&mut self) -> anyhow::Result<()> {
        let stopped: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].is_none())
            .collect();
        for &i in &stopped {
            self.spawn(i)?;
        }
        for &i in &stopped {
            self.ready(i).await?;
        }
        Ok(())
    }

    /// Keys and values under `prefix`, in key order, as `etcdctl get --prefix` prints.
    pub async fn get_prefix(&self, prefix: &str) -> anyhow::Result<Vec<(String, String)>> {
        let endpoints = self.endpoints().join(",");
        let text = self
            .etcdctl_at(&endpoints, &["get", "--prefix", prefix])
            .await?;
        let lines: Vec<&str> = text.lines().collect();
        Ok(lines
            .chunks(2)
            .filter_map(|pair| match pair {
                [key, value] => Some((key.to_string(), value.to_string())),
                _ => None,
            })
            .collect())
    }

    /// Turns etcd's authentication on with a `root` user and `user` (password
    /// `password`), who may read and write `prefix` only.
    pub async fn enable_auth(
        &mut self,
        user: &str,
        password: &str,
        prefix: &str,
    ) -> anyhow::Result<()> {
        let endpoints = self.endpoints().join(",");
        let root_password = format!("{password}-root");
        for args in [
            vec![
                "user",
                "add",
                "root",
                "--interactive=false",
                "--new-user-password",
                &root_password,
            ],
            vec![
                "user",
                "add",
                user,
                "--interactive=false",
                "--new-user-password",
                password,
            ],
            vec!["role", "add", "relays"],
            vec![
                "role",
                "grant-permission",
                "relays",
                "--prefix=true",
                "readwrite",
                prefix,
            ],
            vec!["user", "grant-role", user, "relays"],
            vec!["auth", "enable"],
        ] {
            self.etcdctl_at(&endpoints, &args).await?;
        }
        self.root = Some(format!("root:{root_password}"));
        Ok(())
    }

    /// The store's revision now: it counts every write ever made.
    pub async fn revision(&self) -> anyhow::Result<i64> {
        let text = self
            .etcdctl_at(
                &self.endpoints().join(","),
                &["endpoint", "status", "-w", "json"],
            )
            .await?;
        let status: serde_json::Value = serde_json::from_str(&text)?;
        status
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|member| member["Status"]["header"]["revision"].as_i64())
            .max()
            .context("no revision in etcdctl's status")
    }

    /// Writes `key` = `value` as an operator (or another program) would.
    pub async fn put(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let endpoints = self.endpoints().join(",");
        self.etcdctl_at(&endpoints, &["put", key, value])
            .await
            .map(drop)
    }

    async fn etcdctl_at(&self, endpoints: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.place.command("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .args(["--command-timeout=3s", "--dial-timeout=2s"]);
        if let Some(root) = &self.root {
            cmd.arg(format!("--user={root}"));
        }
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.client.0)
                .arg("--key")
                .arg(&tls.client.1);
        }
        let output = cmd
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .context("cannot run etcdctl")?;
        anyhow::ensure!(
            output.status.success(),
            "etcdctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8(output.stdout)?)
    }
}
