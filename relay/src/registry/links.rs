//! The links that carry a camera's streams: its QUIC tunnel, or its TCP fallback while
//! UDP does not reach the relay.

use std::io;

use common::{
    mux::Opener,
    stream::{RecvHalf, SendHalf},
};

/// The links of one agent that can carry its camera's streams.
#[derive(Debug, Default)]
pub(super) struct Links {
    /// The QUIC tunnel.
    pub(super) quic: Option<quinn::Connection>,
    /// The TCP fallback, used while there is no tunnel.
    pub(super) fallback: Option<Opener>,
}

impl Links {
    pub(super) fn preferred(&self) -> Option<Link> {
        match (&self.quic, &self.fallback) {
            (Some(conn), _) => Some(Link::Quic(conn.clone())),
            (None, Some(opener)) => Some(Link::Fallback(opener.clone())),
            (None, None) => None,
        }
    }
}

/// A link that carries a camera's streams.
#[derive(Debug, Clone)]
pub enum Link {
    /// The agent's QUIC tunnel.
    Quic(quinn::Connection),
    /// The agent's TCP fallback, when UDP is blocked.
    Fallback(Opener),
}

impl Link {
    /// Opens a stream to the agent.
    pub async fn open(&self) -> io::Result<(SendHalf, RecvHalf)> {
        match self {
            Link::Quic(conn) => {
                let (send, recv) = conn.open_bi().await?;
                Ok((SendHalf::Quic(send), RecvHalf::Quic(recv)))
            }
            Link::Fallback(opener) => opener.open().await,
        }
    }

    /// `quic` or `tcp`, for metrics and the API.
    pub fn transport(&self) -> &'static str {
        match self {
            Link::Quic(_) => "quic",
            Link::Fallback(_) => "tcp",
        }
    }
}
