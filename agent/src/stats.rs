//! The agent's counters, most of them reported with every heartbeat.

use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Instant,
};

use common::{protocol::AgentStats, splice::ByteCounters};

/// Counters shared by the agent's tasks.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    /// Bytes through the data streams; `from_tcp` is what the camera sent.
    pub bytes: ByteCounters,
    /// Sessions with the relay that ended and had to be made again.
    pub reconnections: AtomicU64,
    /// Data planes dialed again within a session (its tunnel was lost, its control link
    /// was not). Not on the wire.
    pub redials: AtomicU64,
    /// Data streams open now.
    pub active_streams: AtomicU32,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            bytes: ByteCounters::default(),
            reconnections: AtomicU64::new(0),
            redials: AtomicU64::new(0),
            active_streams: AtomicU32::new(0),
        }
    }
}

impl Stats {
    /// The counters as sent on the wire.
    pub fn snapshot(&self) -> AgentStats {
        AgentStats {
            bytes_sent: self.bytes.from_tcp.load(Ordering::Relaxed),
            bytes_received: self.bytes.to_tcp.load(Ordering::Relaxed),
            reconnections: self.reconnections.load(Ordering::Relaxed),
            uptime_secs: self.started.elapsed().as_secs(),
            active_sessions: self.active_streams.load(Ordering::Relaxed),
        }
    }
}
