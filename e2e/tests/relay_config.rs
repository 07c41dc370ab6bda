//! The relay's full configuration form (TOML): per-agent tokens, pinned ports, port
//! assignments remembered across restarts, the `/agent/{id}` URL, a fixed certificate.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use common::protocol::{hex, Rejection, RelayMessage, PROTOCOL_VERSION};
use e2e::{agent_config, free_port_run, AgentHandle, ControlClient, RelayHandle};
use relay::RelayConfig;
use std::path::Path;

fn config(
    first: u16,
    state_dir: &std::path::Path,
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> RelayConfig {
    let mut text = format!(
        r#"
        listen = "127.0.0.1:0"
        camera_ports = "{first}-{last}"
        state_dir = {state_dir:?}

        [[agents]]
        id = "pinned"
        token = "pinned-token"
        port = {pinned}

        [[agents]]
        id = "roaming"
        token = "roaming-token"

        [[agents]]
        id = "probe"
        token = "probe-token"
        port = {probe}
        "#,
        last = first + 3,
        pinned = first + 3,
        probe = first + 2,
        state_dir = state_dir.display().to_string(),
    );
    if let Some((cert, key)) = tls {
        text.push_str(&format!(
            // The control link stays plain here (as behind a TLS-terminating proxy); wss://
            // and client certificates are tested in security.rs.
            "[tls]\nquic_cert = {:?}\nquic_key = {:?}\nplain_control = true\n",
            cert.display().to_string(),
            key.display().to_string()
        ));
    }
    RelayConfig::from_toml(&text, "test relay.toml").unwrap()
}

/// The certificate fingerprint the relay tells a registering agent to pin.
async fn pin_handed_out(relay: &RelayHandle) -> String {
    let mut client = ControlClient::connect(&relay.url()).await.unwrap();
    client
        .register("probe", "probe-token", PROTOCOL_VERSION, 0, 30)
        .await
        .unwrap();
    match client.next().await.unwrap() {
        Some(RelayMessage::Registered(registered)) => hex(&registered.cert_sha256),
        other => panic!("expected Registered, got {other:?}"),
    }
}

/// Starts a relay with a certificate made by `certs` and checks that agents are told
/// to pin exactly that certificate.
async fn start_with_certificate(first: u16, state: &Path, cert: &Path, key: &Path) -> RelayHandle {
    let relay = RelayHandle::start(config(first, state, Some((cert, key))))
        .await
        .unwrap();
    let pin = certs::fingerprint_pem(cert).unwrap();
    assert_eq!(
        pin_handed_out(&relay).await,
        pin,
        "agents are told the configured certificate"
    );
    relay
}

#[tokio::test]
async fn per_agent_tokens_pinned_ports_and_unknown_ids() {
    let first = free_port_run(4);
    let state = tempfile::tempdir().unwrap();
    let relay = RelayHandle::start(config(first, state.path(), None))
        .await
        .unwrap();

    // The pinned agent gets its port whatever it asks for, also through /agent/{id}.
    let url = format!("ws://{}/agent/pinned", relay.control);
    let mut pinned = AgentHandle::start(agent_config("pinned", &url, "pinned-token", first, 1));
    assert_eq!(pinned.online().await.unwrap(), first + 3);

    // Another agent's token does not open this one's account.
    let mut thief = AgentHandle::start(agent_config(
        "roaming",
        &relay.url(),
        "pinned-token",
        first,
        1,
    ));
    assert_eq!(thief.refused().await.unwrap().1, Rejection::BadToken);
    thief.stop().await;

    // Ids the config does not list are turned away by name.
    let mut stranger = AgentHandle::start(agent_config(
        "stranger",
        &relay.url(),
        "pinned-token",
        first,
        1,
    ));
    let (reason, rejection) = stranger.refused().await.unwrap();
    assert_eq!(rejection, Rejection::UnknownAgent("stranger".into()));
    assert!(reason.contains("\"stranger\" is not allowed"), "{reason}");
    stranger.stop().await;

    // A URL naming another id than the registration is refused.
    let url = format!("ws://{}/agent/someone-else", relay.control);
    let mut liar = AgentHandle::start(agent_config("roaming", &url, "roaming-token", first, 1));
    assert!(matches!(
        liar.refused().await.unwrap().1,
        Rejection::Invalid(_)
    ));
    liar.stop().await;

    pinned.stop().await;
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_restarted_relay_gives_each_camera_its_old_port_and_keeps_a_fixed_certificate() {
    let first = free_port_run(4);
    let state = tempfile::tempdir().unwrap();
    let pair = certs::relay_certificate(
        &["camera-relay".into()],
        &[],
        certs::Validity::days(certs::RELAY_DAYS).unwrap(),
        None,
    )
    .unwrap();
    let (cert, key) = certs::write_pair(state.path(), "relay", &pair, false).unwrap();

    // Asking for port 0 lets the relay choose; it remembers the choice on disk.
    let relay = start_with_certificate(first, state.path(), &cert, &key).await;
    let mut agent =
        AgentHandle::start(agent_config("roaming", &relay.url(), "roaming-token", 0, 1));
    let port = agent.online().await.unwrap();
    assert_eq!(port, first, "first free port of the range");
    agent.stop().await;
    relay.stop().await.unwrap();
    let saved = std::fs::read_to_string(state.path().join("ports.json")).unwrap();
    assert!(
        saved.contains("\"roaming\": ") && saved.contains(&port.to_string()),
        "{saved}"
    );

    // Another camera may not take that port while it is remembered for "roaming".
    let relay = start_with_certificate(first, state.path(), &cert, &key).await;
    let mut other = AgentHandle::start(agent_config("pinned", &relay.url(), "pinned-token", 0, 1));
    assert_eq!(
        other.online().await.unwrap(),
        first + 3,
        "pinned, not the remembered port"
    );
    let mut agent =
        AgentHandle::start(agent_config("roaming", &relay.url(), "roaming-token", 0, 1));
    assert_eq!(
        agent.online().await.unwrap(),
        port,
        "same port after the restart"
    );
    agent.stop().await;
    other.stop().await;
    relay.stop().await.unwrap();
}
