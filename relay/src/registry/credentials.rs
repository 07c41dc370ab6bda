//! Whether a registering agent is who it says: its token (plain or Argon2 hash), its
//! client certificate, or both, as relay.toml asks.

use common::protocol::{Register, Rejection};

use crate::config::{AgentAuth, Token};

/// Checks what the agent proves itself with: its token, and `certified`, the
/// common name of the client certificate it presented (already verified against
/// the client CA by TLS), if any.
pub(super) async fn check(
    auth: &AgentAuth,
    reg: &Register,
    certified: Option<&str>,
) -> Result<(), Rejection> {
    if let Some(name) = certified {
        if name != reg.agent_id {
            return Err(Rejection::CertificateMismatch(name.to_string()));
        }
    }
    let expected = match auth.agents.get(&reg.agent_id) {
        Some(entry) => entry.token.clone(),
        None if certified.is_some() && auth.any_certified_agent => None,
        None => match &auth.shared_token {
            Some(token) => Some(Token::Plain(token.clone())),
            None => return Err(Rejection::UnknownAgent(reg.agent_id.clone())),
        },
    };
    match expected {
        None if certified.is_none() => return Err(Rejection::CertificateRequired),
        None => {}
        Some(Token::Plain(token)) if !token.matches(&reg.token) => return Err(Rejection::BadToken),
        Some(Token::Plain(_)) => {}
        Some(Token::Hash(hashes)) => {
            let presented = reg.token.clone();
            // Argon2 is slow on purpose; keep it off the runtime's threads.
            let verified = tokio::task::spawn_blocking(move || {
                use argon2::{password_hash::PasswordHash, Argon2, PasswordVerifier};
                hashes.iter().any(|hash| {
                    PasswordHash::new(hash.expose()).is_ok_and(|parsed| {
                        Argon2::default()
                            .verify_password(presented.expose().as_bytes(), &parsed)
                            .is_ok()
                    })
                })
            })
            .await
            .unwrap_or(false);
            if !verified {
                return Err(Rejection::BadToken);
            }
        }
    }
    if auth.require_certificates && certified.is_none() {
        return Err(Rejection::CertificateRequired);
    }
    Ok(())
}
