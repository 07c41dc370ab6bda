//! RTSP awareness on the Watcher side: each Watcher connection is scanned for RTSP
//! message boundaries in both directions, so the relay can answer what the tunnel
//! cannot carry (RTP over UDP) instead of letting clients hang, keep clients inside
//! the tunnel when the camera names its LAN address, and measure the media's health.
//! Media bytes pass through as they arrive; a connection that is not RTSP passes
//! through untouched. docs/rtsp.md lists every change.

mod media;
mod message;
mod scanner;
mod session;

pub use media::MediaStats;
pub(crate) use message::{camera_of, method_of, redirected_uri, response, response_with};
pub(crate) use session::{first_request, proxy, Front, Observed, Watcher};
