//! What happens to the fleet, as events: cameras coming and going, ports, data links,
//! Watcher sessions, stalls. Each event gets a monotonic id, goes into a bounded
//! history (so `GET /events` can resume from `Last-Event-ID`, [`sse`]), to live
//! subscribers, and onto each webhook's queue ([`webhook`]). Emitting never waits: a
//! slow subscriber or receiver loses its own events (counted, logged), nothing else.
//! docs/events.md describes every event.

pub(crate) mod sse;
pub mod webhook;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::{metrics::Metrics, MediaStats};

/// Default number of events kept for clients resuming a stream.
pub const DEFAULT_HISTORY: usize = 10_000;

/// Every event type, for configuration checks and docs/events.md.
pub const TYPES: &[&str] = &[
    "camera.online",
    "camera.offline",
    "camera.replaced",
    "camera.port_assigned",
    "camera.link",
    "watcher.started",
    "watcher.ended",
    "watcher.stalled",
    "watcher.resumed",
    "update.progress",
];

/// What happened; the `data` of an event (docs/events.md).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "data")]
pub(crate) enum EventKind {
    /// A camera's agent registered here.
    #[serde(rename = "camera.online")]
    Online {
        port: u16,
        remote: String,
        agent_version: String,
        model: String,
        stream_paths: Vec<String>,
    },
    /// A camera's session here ended.
    #[serde(rename = "camera.offline")]
    Offline {
        /// A stable word: `lost`, `heartbeat_timeout`, `replaced`, `moved`,
        /// `shutdown`, `protocol_error`, `operator`.
        reason: &'static str,
        /// In words.
        detail: String,
        online_secs: u64,
    },
    /// A new connection of the camera's agent took over its session.
    #[serde(rename = "camera.replaced")]
    Replaced {
        old_remote: String,
        new_remote: String,
    },
    /// The camera got a port it did not have before.
    #[serde(rename = "camera.port_assigned")]
    PortAssigned { port: u16, previous: Option<u16> },
    /// What carries the camera's streams changed (`quic`, `tcp`, or none).
    #[serde(rename = "camera.link")]
    Link {
        link: Option<&'static str>,
        previous: Option<&'static str>,
    },
    /// A Watcher connected to the camera.
    #[serde(rename = "watcher.started")]
    WatcherStarted { connection_id: u64, watcher: String },
    /// A Watcher's connection ended.
    #[serde(rename = "watcher.ended")]
    WatcherEnded {
        connection_id: u64,
        watcher: String,
        duration_secs: f64,
        method: Option<String>,
        path: Option<String>,
        bytes_to_watcher: u64,
        bytes_from_watcher: u64,
        media: Option<MediaSummary>,
        error: Option<String>,
    },
    /// The camera's media stopped while a Watcher was playing.
    #[serde(rename = "watcher.stalled")]
    Stalled {
        connection_id: u64,
        silent_secs: f64,
    },
    /// Media came back after a stall.
    #[serde(rename = "watcher.resumed")]
    Resumed { connection_id: u64, gap_secs: f64 },
    /// An over-the-air update of the camera's agent moved on.
    #[serde(rename = "update.progress")]
    UpdateProgress {
        release: String,
        /// `waiting`, `offered`, `downloading`, `installing`, `updated`, `refused`,
        /// `failed`, `rolled_back`, `skipped`.
        state: &'static str,
        detail: Option<String>,
        bytes: u64,
        size: u64,
        rollout: Option<u64>,
    },
}

/// A Watcher connection's place in the events, for the proxy that sees its stalls.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WatcherScope<'a> {
    events: &'a Events,
    camera: &'a str,
    connection_id: u64,
}

impl<'a> WatcherScope<'a> {
    pub(crate) fn new(events: &'a Events, camera: &'a str, connection_id: u64) -> Self {
        WatcherScope {
            events,
            camera,
            connection_id,
        }
    }

    /// The camera's media stopped `silent` ago.
    pub(crate) fn stalled(&self, silent: Duration) {
        let event = EventKind::Stalled {
            connection_id: self.connection_id,
            silent_secs: round_ms(silent),
        };
        self.events.emit(self.camera, event);
    }

    /// Media came back after `gap` without.
    pub(crate) fn resumed(&self, gap: Duration) {
        let event = EventKind::Resumed {
            connection_id: self.connection_id,
            gap_secs: round_ms(gap),
        };
        self.events.emit(self.camera, event);
    }
}

/// Seconds, to the millisecond.
pub(crate) fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// The media of a Watcher session, for `watcher.ended`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MediaSummary {
    packets: u64,
    frames: u64,
    lost: u64,
    fps: Option<f64>,
    bitrate: Option<f64>,
    jitter_ms: f64,
    keyframes: u64,
    first_keyframe_ms: Option<u64>,
    stalls: u64,
}

impl MediaSummary {
    /// The summary of `media`, or `None` if no media passed.
    pub(crate) fn of(media: &MediaStats) -> Option<MediaSummary> {
        (media.packets > 0).then(|| MediaSummary {
            packets: media.packets,
            frames: media.frames,
            lost: media.lost,
            fps: media.fps.map(|f| (f * 100.0).round() / 100.0),
            bitrate: media.bitrate.map(f64::round),
            jitter_ms: (media.jitter_ms * 100.0).round() / 100.0,
            keyframes: media.keyframes,
            first_keyframe_ms: media.first_keyframe_after.map(|d| d.as_millis() as u64),
            stalls: media.stalls,
        })
    }
}

/// One event as sent: its id, type and camera for filtering, and its JSON.
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) id: u64,
    pub(crate) kind: &'static str,
    pub(crate) camera: String,
    pub(crate) json: String,
}

/// The JSON form of an event.
#[derive(Serialize)]
struct Wire<'a> {
    id: u64,
    #[serde(flatten)]
    kind: &'a EventKind,
    time: String,
    relay: Option<&'a str>,
    camera: &'a str,
}

impl EventKind {
    /// The event's type, as in [`TYPES`].
    fn name(&self) -> &'static str {
        match self {
            EventKind::Online { .. } => "camera.online",
            EventKind::Offline { .. } => "camera.offline",
            EventKind::Replaced { .. } => "camera.replaced",
            EventKind::PortAssigned { .. } => "camera.port_assigned",
            EventKind::Link { .. } => "camera.link",
            EventKind::WatcherStarted { .. } => "watcher.started",
            EventKind::WatcherEnded { .. } => "watcher.ended",
            EventKind::Stalled { .. } => "watcher.stalled",
            EventKind::Resumed { .. } => "watcher.resumed",
            EventKind::UpdateProgress { .. } => "update.progress",
        }
    }
}

/// A set of event types: exact names, `prefix.*`, or `*`.
#[derive(Debug, Clone, Default)]
pub struct TypeFilter(Vec<String>);

impl TypeFilter {
    /// The filter of `patterns`; an error names the first that matches no event type.
    pub fn new(patterns: Vec<String>) -> Result<TypeFilter, String> {
        let filter = TypeFilter(patterns);
        for pattern in &filter.0 {
            if !TYPES.iter().any(|t| matches(pattern, t)) {
                return Err(format!(
                    "{pattern:?} is no event type; types: {} (or `camera.*`, `watcher.*`, `update.*`, `*`)",
                    TYPES.join(", ")
                ));
            }
        }
        Ok(filter)
    }

    /// True if `kind` passes; an empty filter passes everything.
    pub(crate) fn passes(&self, kind: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|p| matches(p, kind))
    }
}

fn matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

/// The events of this relay: history, live subscribers, webhooks.
#[derive(Debug)]
pub struct Events {
    relay: Option<String>,
    inner: Mutex<Inner>,
    live: broadcast::Sender<Arc<Event>>,
    hooks: Vec<webhook::Queue>,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
struct Inner {
    next_id: u64,
    capacity: usize,
    history: VecDeque<Arc<Event>>,
}

/// Live events a subscriber has not read yet; more and it lags (and re-reads the
/// history).
const LIVE_BUFFER: usize = 1024;

impl Events {
    /// Events of relay `relay` (its cluster id), keeping `history` of them, counted in
    /// `metrics`, POSTed to `hooks`.
    pub(crate) fn new(
        relay: Option<String>,
        history: usize,
        hooks: Vec<webhook::Queue>,
        metrics: Arc<Metrics>,
    ) -> Events {
        // Ids go on from the clock, so they keep increasing across restarts: a client
        // resuming with an id from before a restart gets told what it missed.
        let start = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Events {
            relay,
            inner: Mutex::new(Inner {
                next_id: start,
                capacity: history.max(1),
                history: VecDeque::new(),
            }),
            live: broadcast::channel(LIVE_BUFFER).0,
            hooks,
            metrics,
        }
    }

    /// Records that `kind` happened to `camera`, now.
    pub(crate) fn emit(&self, camera: &str, kind: EventKind) {
        let name = kind.name();
        self.metrics.events_total.with_label_values(&[name]).inc();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let id = inner.next_id;
        inner.next_id += 1;
        let wire = Wire {
            id,
            kind: &kind,
            time: rfc3339(SystemTime::now()),
            relay: self.relay.as_deref(),
            camera,
        };
        let json = serde_json::to_string(&wire).unwrap_or_else(|e| {
            format!(r#"{{"id":{id},"type":"{name}","error":"cannot serialise: {e}"}}"#)
        });
        let event = Arc::new(Event {
            id,
            kind: name,
            camera: camera.to_string(),
            json,
        });
        if inner.history.len() == inner.capacity {
            inner.history.pop_front();
        }
        inner.history.push_back(event.clone());
        // Under the lock, so that subscribers and queues see ids in order.
        let _ = self.live.send(event.clone());
        for hook in &self.hooks {
            hook.offer(&event);
        }
    }

    /// Live events from now, and the history after `after` (all of it for `None`):
    /// taken together, so that nothing falls between them.
    pub(crate) fn subscribe(
        &self,
        after: Option<u64>,
    ) -> (
        Vec<Arc<Event>>,
        broadcast::Receiver<Arc<Event>>,
        Option<Gap>,
    ) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.live.subscribe();
        let (past, gap) = inner.after(after);
        (past, live, gap)
    }

    /// The history after `after`, for a subscriber that fell behind.
    pub(crate) fn since(&self, after: u64) -> (Vec<Arc<Event>>, Option<Gap>) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .after(Some(after))
    }
}

/// Events a client asked for that are no longer kept.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Gap {
    /// The last id the client had.
    pub(crate) after: u64,
    /// The first id still kept (or to come).
    pub(crate) resumes_at: u64,
}

impl Inner {
    fn after(&self, after: Option<u64>) -> (Vec<Arc<Event>>, Option<Gap>) {
        let Some(after) = after else {
            return (self.history.iter().cloned().collect(), None);
        };
        let first_kept = self.history.front().map_or(self.next_id, |e| e.id);
        let gap = (after + 1 < first_kept && after < self.next_id).then_some(Gap {
            after,
            resumes_at: first_kept,
        });
        let start = self.history.partition_point(|e| e.id <= after);
        (self.history.range(start..).cloned().collect(), gap)
    }
}

/// `2026-11-26T18:15:04.123Z`.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(history: usize) -> Events {
        Events::new(
            Some("relay-a".into()),
            history,
            Vec::new(),
            Arc::new(Metrics::new().unwrap()),
        )
    }

    fn link(n: u16) -> EventKind {
        EventKind::PortAssigned {
            port: n,
            previous: None,
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_716_904_123);
        assert_eq!(rfc3339(at), "2026-11-26T18:15:04.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn events_carry_type_time_camera_relay_and_data() {
        let events = events(10);
        events.emit("cam-1", link(8554));
        let (past, _, _) = events.subscribe(None);
        let json: serde_json::Value = serde_json::from_str(&past[0].json).unwrap();
        assert_eq!(json["type"], "camera.port_assigned");
        assert_eq!(json["camera"], "cam-1");
        assert_eq!(json["relay"], "relay-a");
        assert_eq!(json["data"]["port"], 8554);
        assert_eq!(json["id"].as_u64(), Some(past[0].id));
        assert!(json["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn resuming_gives_what_came_after_and_says_what_was_lost() {
        let events = events(3);
        for port in 1..=5 {
            events.emit("cam", link(port));
        }
        let (all, _, gap) = events.subscribe(None);
        assert!(gap.is_none());
        let ids: Vec<u64> = all.iter().map(|e| e.id).collect();
        assert_eq!(ids.len(), 3);
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
        let (after, _, gap) = events.subscribe(Some(ids[0]));
        assert_eq!(after.len(), 2);
        assert!(gap.is_none());
        // The client had id[0] - 2; id[0] - 1 is gone.
        let (after, _, gap) = events.subscribe(Some(ids[0] - 2));
        assert_eq!(after.len(), 3);
        let gap = gap.unwrap();
        assert_eq!(gap.resumes_at, ids[0]);
        // Up to date: nothing, no gap.
        let (after, _, gap) = events.subscribe(Some(ids[2]));
        assert!(after.is_empty() && gap.is_none());
    }

    #[test]
    fn type_filters_take_names_and_prefixes() {
        let filter = TypeFilter::new(vec!["camera.online".into(), "watcher.*".into()]).unwrap();
        assert!(filter.passes("camera.online"));
        assert!(filter.passes("watcher.ended"));
        assert!(!filter.passes("camera.offline"));
        assert!(TypeFilter::default().passes("camera.link"));
        let err = TypeFilter::new(vec!["camera.onlnie".into()]).unwrap_err();
        assert!(err.contains("camera.online"), "{err}");
    }
}
