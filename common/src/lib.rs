//! Pieces shared by the camera agent and the relay: the wire protocol, TLS and QUIC
//! configuration, the TCP⇄QUIC splice, the TCP fallback's multiplexer, secrets and
//! backoff.
//!
//! # Glossary
//! - **Agent**: `camera-agent`, running inside the camera; dials out to the relay.
//! - **Relay**: the public process; makes each camera look like a local RTSP server.
//! - **Control link**: the agent's WebSocket to the relay (register, heartbeat, commands).
//! - **Tunnel**: the agent's QUIC connection to the relay, carrying the data streams.
//! - **Stream**: one QUIC bidirectional stream, carrying one Watcher TCP connection.
//! - **Fallback link**: a second WebSocket carrying the streams (yamux) when UDP is
//!   blocked and the tunnel cannot come up.
//! - **Watcher**: the video management system (or ffmpeg, VLC…) pulling RTSP from the relay.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod fuzzing;
pub mod mux;
mod one_or_many;
pub mod process;
pub mod protocol;
pub mod release;
pub mod secret;
pub mod splice;
pub mod stream;
pub mod tls;

pub use one_or_many::OneOrMany;
pub use secret::Secret;
