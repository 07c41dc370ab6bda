//! Agent identity and relay trust, in process: a private CA from `certs`, the relay
//! serving `wss://` and QUIC with a CA-signed certificate and accepting agents' client
//! certificates, tokens stored only as argon2 hashes.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::path::PathBuf;

use agent::{AgentConfig, AgentState};
use common::protocol::Rejection;
use e2e::{
    agent_config_json, ffprobe, free_port_run, AgentHandle, AgentProcess, ProcessRig, RelayHandle,
    SUB_STREAM,
};
use relay::RelayConfig;

/// A CA with the relay's certificate (for 127.0.0.1) and agents' certificates, and a
/// second, unrelated CA with a certificate claiming one of the same ids.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = certs::ca_certificate("test CA", certs::Validity::days(certs::CA_DAYS).unwrap())
            .unwrap();
        let (ca_cert, ca_key) = certs::write_pair(dir.path(), "ca", &ca, false).unwrap();
        let ca = certs::Ca::load(&ca_cert, &ca_key).unwrap();
        let relay = certs::relay_certificate(
            &["localhost".into()],
            &["127.0.0.1".parse().unwrap()],
            certs::Validity::days(certs::RELAY_DAYS).unwrap(),
            Some(&ca),
        )
        .unwrap();
        certs::write_pair(dir.path(), "relay", &relay, false).unwrap();
        for id in ["cam-cert", "cam-other"] {
            let pair = certs::agent_certificate(
                id,
                certs::Validity::days(certs::AGENT_DAYS).unwrap(),
                &ca,
            )
            .unwrap();
            certs::write_pair(dir.path(), id, &pair, false).unwrap();
        }
        // Certificates from the right CA that expired yesterday.
        let now = time::OffsetDateTime::now_utc();
        let expired = certs::Validity {
            not_before: now - time::Duration::days(30),
            not_after: now - time::Duration::days(1),
        };
        let old = dir.path().join("expired");
        let pair = certs::agent_certificate("cam-cert", expired, &ca).unwrap();
        certs::write_pair(&old, "cam-cert", &pair, false).unwrap();
        let pair = certs::relay_certificate(
            &["localhost".into()],
            &["127.0.0.1".parse().unwrap()],
            expired,
            Some(&ca),
        )
        .unwrap();
        certs::write_pair(&old, "relay", &pair, false).unwrap();
        let rogue =
            certs::ca_certificate("rogue CA", certs::Validity::days(certs::CA_DAYS).unwrap())
                .unwrap();
        let rogue_dir = dir.path().join("rogue");
        let (rogue_cert, rogue_key) = certs::write_pair(&rogue_dir, "ca", &rogue, false).unwrap();
        let rogue = certs::Ca::load(&rogue_cert, &rogue_key).unwrap();
        let forged = certs::agent_certificate(
            "cam-cert",
            certs::Validity::days(certs::AGENT_DAYS).unwrap(),
            &rogue,
        )
        .unwrap();
        certs::write_pair(&rogue_dir, "cam-cert", &forged, false).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

async fn relay(pki: &Pki, first: u16) -> RelayHandle {
    relay_with(pki, first, "relay").await
}

/// A relay serving the certificate `<stem>.crt` of the PKI's directory.
async fn relay_with(pki: &Pki, first: u16, stem: &str) -> RelayHandle {
    // Two hashes, as while a token is rotated: the old token and the new both work.
    let old = certs::hash_token("t0ken-of-cam-token").unwrap();
    let new = certs::hash_token("rotated-t0ken").unwrap();
    let text = format!(
        r#"
        listen = "127.0.0.1:0"
        camera_ports = "{first}-{last}"

        [tls]
        cert = {cert:?}
        key = {key:?}
        client_ca = {ca:?}

        [[agents]]
        id = "cam-token"
        token_hash = ["{old}", "{new}"]

        [[agents]]
        id = "cam-cert"
        "#,
        last = first + 3,
        cert = pki.path(&format!("{stem}.crt")),
        key = pki.path(&format!("{stem}.key")),
        ca = pki.path("ca.crt"),
    );
    RelayHandle::start(RelayConfig::from_toml(&text, "test relay.toml").unwrap())
        .await
        .unwrap()
}

/// An agent config dialling the relay over wss:// with `security` as its security
/// section.
fn agent(relay: &RelayHandle, id: &str, token: &str, security: serde_json::Value) -> AgentConfig {
    let url = format!("wss://127.0.0.1:{}/tunnel", relay.control.port());
    let mut json = agent_config_json(id, &url, token, 0, 1);
    json["security"] = security;
    AgentConfig::parse(&json.to_string(), "test config").unwrap()
}

/// A security section trusting the test CA and, with `certificate` (a stem in the
/// PKI's directory), presenting that client certificate.
fn files(pki: &Pki, certificate: Option<&str>) -> serde_json::Value {
    let mut security = serde_json::json!({ "ca_file": pki.path("ca.crt") });
    if let Some(stem) = certificate {
        security["client_cert"] = serde_json::json!(pki.path(&format!("{stem}.crt")));
        security["client_key"] = serde_json::json!(pki.path(&format!("{stem}.key")));
    }
    security
}

/// Waits until the agent is retrying for a reason containing `needle`; returns it.
async fn failing(agent: &mut AgentHandle, needle: &str) -> String {
    let state = agent
        .wait_for(
            needle,
            |s| matches!(s, AgentState::Retrying { reason, .. } if reason.contains(needle)),
        )
        .await
        .unwrap();
    eprintln!("agent retrying as it should: {state:?}");
    format!("{state:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_prove_themselves_with_hashed_tokens_or_certificates_over_wss() {
    let pki = Pki::new();
    let relay = relay(&pki, free_port_run(4)).await;

    // A token the relay knows only as an argon2 hash, over wss:// checked against the CA.
    let mut a = AgentHandle::start(agent(
        &relay,
        "cam-token",
        "t0ken-of-cam-token",
        files(&pki, None),
    ));
    a.online().await.unwrap();
    a.stop().await;
    let mut rotated = AgentHandle::start(agent(
        &relay,
        "cam-token",
        "rotated-t0ken",
        files(&pki, None),
    ));
    rotated.online().await.unwrap();
    rotated.stop().await;
    let mut wrong = AgentHandle::start(agent(&relay, "cam-token", "guess", files(&pki, None)));
    assert_eq!(wrong.refused().await.unwrap().1, Rejection::BadToken);
    wrong.stop().await;

    // A certificate-only agent: its client certificate on both links is its credential.
    let mut b = AgentHandle::start(agent(&relay, "cam-cert", "", files(&pki, Some("cam-cert"))));
    b.online().await.unwrap();
    assert!(relay.registry.get("cam-cert").unwrap().certified);
    b.stop().await;

    // Without its certificate the id is refused, whatever token it brings.
    let mut bare = AgentHandle::start(agent(&relay, "cam-cert", "anything", files(&pki, None)));
    assert_eq!(
        bare.refused().await.unwrap().1,
        Rejection::CertificateRequired
    );
    bare.stop().await;

    // Another agent's certificate does not open this id.
    let mut thief = AgentHandle::start(agent(
        &relay,
        "cam-cert",
        "",
        files(&pki, Some("cam-other")),
    ));
    assert_eq!(
        thief.refused().await.unwrap().1,
        Rejection::CertificateMismatch("cam-other".into())
    );
    thief.stop().await;

    // A certificate for the right id from another CA fails the TLS handshake.
    let mut forger = AgentHandle::start(agent(
        &relay,
        "cam-cert",
        "",
        files(&pki, Some("rogue/cam-cert")),
    ));
    let why = failing(&mut forger, "cannot open the control link").await;
    assert!(
        why.contains("did not accept this camera's client certificate"),
        "{why}"
    );
    assert!(relay.registry.get("cam-cert").is_none());
    forger.stop().await;

    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_trusts_only_its_relay() {
    let pki = Pki::new();
    let relay = relay(&pki, free_port_run(4)).await;

    // Checked against another CA, the genuine relay is refused, and the agent says what
    // it checked against.
    let rogue_ca = serde_json::json!({ "ca_file": pki.path("rogue/ca.crt") });
    let mut a = AgentHandle::start(agent(&relay, "cam-token", "t0ken-of-cam-token", rogue_ca));
    let why = failing(&mut a, "cannot open the control link").await;
    assert!(why.contains("rogue/ca.crt"), "{why}");
    a.stop().await;

    // Pinning the relay's certificate by its fingerprint works without any CA file.
    let pin = certs::fingerprint_pem(&pki.path("relay.crt")).unwrap();
    let pinned = serde_json::json!({ "relay_fingerprint": pin });
    let mut b = AgentHandle::start(agent(&relay, "cam-token", "t0ken-of-cam-token", pinned));
    b.online().await.unwrap();
    b.stop().await;

    // A wrong pin is refused.
    let wrong = serde_json::json!({ "relay_fingerprint": "00".repeat(32) });
    let mut c = AgentHandle::start(agent(&relay, "cam-token", "t0ken-of-cam-token", wrong));
    let why = failing(&mut c, "cannot open the control link").await;
    assert!(why.contains("security.relay_fingerprint"), "{why}");
    c.stop().await;

    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificates_are_refused_on_both_sides() {
    let pki = Pki::new();

    // An agent whose certificate expired is turned away by the relay's TLS.
    let relay = relay(&pki, free_port_run(4)).await;
    let mut camera = AgentHandle::start(agent(
        &relay,
        "cam-cert",
        "",
        files(&pki, Some("expired/cam-cert")),
    ));
    let why = failing(&mut camera, "cannot open the control link").await;
    assert!(why.contains("client certificate"), "{why}");
    assert!(relay.registry.get("cam-cert").is_none());
    camera.stop().await;
    relay.stop().await.unwrap();

    // A relay whose certificate expired is not trusted by the agent, which says so.
    let relay = relay_with(&pki, free_port_run(4), "expired/relay").await;
    let mut camera = AgentHandle::start(agent(
        &relay,
        "cam-token",
        "t0ken-of-cam-token",
        files(&pki, None),
    ));
    let why = failing(&mut camera, "cannot open the control link").await;
    assert!(why.contains("expired"), "{why}");
    camera.stop().await;
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    const CAMERA_PASSWORD: &str = "Cam3ra-Pa55word-7731";
    const GUESS: &str = "Wr0ng-T0ken-Guess-5521";
    // Debug logging on both sides (the harness's defaults), a real stream with the
    // camera's Digest password, a wrong camera password, and a wrong token.
    let rig = ProcessRig::start(&["--password", CAMERA_PASSWORD], "cam-secret")
        .await
        .unwrap();
    let agent = AgentProcess::start("agent", &rig.config).await.unwrap();
    let mut wrong = rig.config.clone();
    wrong["agent"]["agent_id"] = "cam-guess".into();
    wrong["agent"]["tunnel_server_token"] = GUESS.into();
    let mut thief = AgentProcess::spawn("thief", &wrong).unwrap();
    thief
        .process
        .wait_for_line("refused the token")
        .await
        .unwrap();
    let url = |password: &str| {
        format!(
            "rtsp://admin:{password}@127.0.0.1:{}{SUB_STREAM}",
            rig.camera_port
        )
    };
    ffprobe(url(CAMERA_PASSWORD), 5).await.unwrap();
    let e = ffprobe(url(GUESS), 1).await.unwrap_err().to_string();
    assert!(e.contains("401"), "{e}");

    for (name, output) in [
        ("relay", rig.relay.process.output()),
        ("agent", agent.process.output()),
        ("thief", thief.process.output()),
    ] {
        assert!(output.len() > 3, "{name} logged nothing: {output:?}");
        for secret in [ProcessRig::TOKEN, GUESS, CAMERA_PASSWORD] {
            let leaks: Vec<&String> = output.iter().filter(|l| l.contains(secret)).collect();
            assert!(leaks.is_empty(), "{name} logged {secret:?}: {leaks:?}");
        }
    }
}
