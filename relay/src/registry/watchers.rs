//! The Watcher connections open now, for `/streams`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Instant,
};

use common::splice::ByteCounters;

use crate::rtsp::MediaStats;

use super::lock;

/// Watcher connections open now, by connection id.
#[derive(Debug, Default)]
pub(super) struct Watchers {
    open: Mutex<BTreeMap<u64, Arc<WatcherSession>>>,
}

impl Watchers {
    /// Records an open Watcher connection until the guard is dropped.
    pub(super) fn open(
        &self,
        id: u64,
        camera: &str,
        peer: SocketAddr,
        opened: Instant,
    ) -> WatcherGuard<'_> {
        let session = Arc::new(WatcherSession {
            id,
            camera: camera.to_string(),
            peer,
            opened,
            request: OnceLock::new(),
            bytes: ByteCounters::default(),
            media: Mutex::default(),
        });
        lock(&self.open).insert(id, session.clone());
        WatcherGuard {
            table: self,
            session,
        }
    }

    /// The Watcher connections open now, oldest first.
    pub(super) fn list(&self) -> Vec<Arc<WatcherSession>> {
        lock(&self.open).values().cloned().collect()
    }
}

/// One Watcher connection, while it is open.
#[derive(Debug)]
pub struct WatcherSession {
    /// Relay-wide connection id.
    pub id: u64,
    /// The camera's agent id.
    pub camera: String,
    /// The Watcher's address.
    pub peer: SocketAddr,
    /// When it connected.
    pub opened: Instant,
    /// Method and path of its first RTSP request line, once seen.
    pub request: OnceLock<(String, String)>,
    /// Its bytes (`from_tcp`: Watcher → camera).
    pub bytes: ByteCounters,
    /// Its media as of the proxy's last report (about every second while it flows).
    pub media: Mutex<MediaStats>,
}

/// Removes its [`WatcherSession`] from the table when dropped.
#[derive(Debug)]
pub struct WatcherGuard<'a> {
    table: &'a Watchers,
    /// The session.
    pub session: Arc<WatcherSession>,
}

impl Drop for WatcherGuard<'_> {
    fn drop(&mut self) {
        lock(&self.table.open).remove(&self.session.id);
    }
}
