//! RTSP awareness on the Watcher side: each Watcher connection is scanned for RTSP
//! message boundaries in both directions, so the relay can answer what the tunnel
//! cannot carry (RTP over UDP) instead of letting clients hang. Media bytes pass
//! through as they arrive; a connection that is not RTSP passes through untouched.

mod message;
mod scanner;
mod session;

pub(crate) use session::proxy;
