//! The relay's Prometheus metrics, served in the text format at `GET /metrics` on the
//! control listener. Everything per camera carries the label `camera` (the agent id) and
//! survives the camera's reconnects, so `rate()` runs across them. docs/metrics.md lists
//! each series and what to alert on.

use prometheus::{
    exponential_buckets, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::registry::StoreHealth;
use crate::MediaStats;

/// Every series of the relay.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    agents_online: IntGauge,
    watcher_sessions: IntGaugeVec,
    watcher_sessions_total: IntCounterVec,
    watcher_bytes_total: IntCounterVec,
    rtp_packets_total: IntCounterVec,
    rtp_bytes_total: IntCounterVec,
    rtp_lost_total: IntCounterVec,
    video_frames_total: IntCounterVec,
    video_keyframes_total: IntCounterVec,
    media_stalls_total: IntCounterVec,
    rtp_jitter_seconds: GaugeVec,
    first_keyframe_seconds: HistogramVec,
    /// Registrations by result (`accepted`, or the refusal's kind).
    pub registrations_total: IntCounterVec,
    /// Control messages received, by type.
    pub control_messages_total: IntCounterVec,
    /// Watcher connections that never reached the camera, by reason.
    pub stream_open_failures_total: IntCounterVec,
    /// Streams opened to agents, by the link that carries them (`quic`, `tcp`).
    pub streams_opened_total: IntCounterVec,
    /// From a Watcher's connect to the first byte back from the camera.
    pub session_setup_seconds: Histogram,
    /// Watcher connections carried between relays of a cluster, by the other relay and
    /// the direction (`out`: to the relay holding the camera; `in`: from the relay the
    /// Watcher connected to), and by result.
    peer_streams_total: IntCounterVec,
    /// Events emitted, by type (docs/events.md).
    pub events_total: IntCounterVec,
    /// Webhook deliveries by webhook and result: `delivered`, `retried` (an attempt
    /// failed and is repeated), `rejected` (a 4xx: the receiver will not take it),
    /// `dropped` (its queue was full).
    pub webhook_events_total: IntCounterVec,
    /// Events waiting in each webhook's queue.
    pub webhook_queue: IntGaugeVec,
    /// Camera updates that ended, by how (`updated`, `refused`, `failed`,
    /// `rolled_back`, `skipped`).
    pub updates_total: IntCounterVec,
    /// Cameras fetching a release now.
    pub update_transfers: IntGauge,
}

/// What the relay knows of an online agent at scrape time; its series exist only
/// while it is online, so a gone agent leaves no stale value behind.
#[derive(Debug)]
pub struct LiveAgent {
    /// Agent id.
    pub id: String,
    /// Seconds since its last heartbeat (or registration).
    pub heartbeat_age_secs: f64,
    /// Its QUIC connection's path statistics, if the tunnel is up.
    pub quic: Option<quinn::ConnectionStats>,
}

/// One camera's series, resolved once per agent session so the media path only touches
/// atomics.
#[derive(Debug, Clone)]
pub struct CameraMetrics {
    /// Watcher connections open now.
    pub sessions: IntGauge,
    /// Watcher connections ever accepted.
    pub sessions_total: IntCounter,
    /// Bytes from Watchers to the camera.
    pub to_camera: IntCounter,
    /// Bytes from the camera to Watchers.
    pub to_watcher: IntCounter,
    packets: IntCounter,
    rtp_bytes: IntCounter,
    lost: IntCounter,
    frames: IntCounter,
    keyframes: IntCounter,
    stalls: IntCounter,
    jitter: Gauge,
    first_keyframe: Histogram,
    /// The relay-wide session setup histogram.
    pub session_setup: Histogram,
}

impl Metrics {
    /// Creates and registers every series.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("camera_relay".into()), None)?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let camera = &["camera"];
        let counter = |name: &str, help: &str| {
            registered(
                &registry,
                IntCounterVec::new(Opts::new(name, help), camera)?,
            )
        };
        Ok(Metrics {
            agents_online: registered(
                &registry,
                IntGauge::new("agents_online", "Agents registered right now.")?,
            )?,
            watcher_sessions: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new("watcher_sessions", "Watcher connections open now, per camera."),
                    camera,
                )?,
            )?,
            watcher_sessions_total: counter(
                "watcher_sessions_total",
                "Watcher connections accepted, per camera.",
            )?,
            watcher_bytes_total: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "watcher_bytes_total",
                        "Bytes between Watchers and the camera; direction is to_camera or to_watcher.",
                    ),
                    &["camera", "direction"],
                )?,
            )?,
            rtp_packets_total: counter(
                "rtp_packets_total",
                "RTP packets of the video passed to Watchers.",
            )?,
            rtp_bytes_total: counter(
                "rtp_bytes_total",
                "Bytes of those packets, RTP headers included; 8 * rate() is the bitrate.",
            )?,
            rtp_lost_total: counter(
                "rtp_lost_total",
                "RTP packets missing by sequence number (lost before the relay).",
            )?,
            video_frames_total: counter(
                "video_frames_total",
                "Video frames (distinct RTP timestamps); rate() is the frame rate.",
            )?,
            video_keyframes_total: counter(
                "video_keyframes_total",
                "H.264 IDR / H.265 IRAP frames; frames over keyframes is the keyframe interval in frames.",
            )?,
            media_stalls_total: counter(
                "media_stalls_total",
                "Times a playing session got no media for limits.stall_secs.",
            )?,
            rtp_jitter_seconds: registered(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "rtp_jitter_seconds",
                        "RFC 3550 interarrival jitter of the video, as last reported by any of the camera's sessions.",
                    ),
                    camera,
                )?,
            )?,
            first_keyframe_seconds: registered(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "first_keyframe_seconds",
                        "From a Watcher's connect to the first keyframe it was sent: how long until a picture.",
                    )
                    .buckets(exponential_buckets(0.05, 2.0, 10)?),
                    camera,
                )?,
            )?,
            registrations_total: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "registrations_total",
                        "Agent registrations by result: accepted, or the kind of refusal.",
                    ),
                    &["result"],
                )?,
            )?,
            control_messages_total: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "control_messages_total",
                        "Control-link messages received from agents, by type.",
                    ),
                    &["type"],
                )?,
            )?,
            stream_open_failures_total: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "stream_open_failures_total",
                        "Watcher connections that never reached the camera, by reason.",
                    ),
                    &["reason"],
                )?,
            )?,
            streams_opened_total: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "streams_opened_total",
                        "Streams opened to agents for Watcher connections, by the link that \
                         carries them: quic (the tunnel) or tcp (the fallback when UDP is blocked).",
                    ),
                    &["link"],
                )?,
            )?,
            session_setup_seconds: registered(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "session_setup_seconds",
                        "From a Watcher's TCP connect to the first byte back from the camera.",
                    )
                    .buckets(exponential_buckets(0.001, 2.0, 14)?),
                )?,
            )?,
            peer_streams_total: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "peer_streams_total",
                        "Watcher connections carried between relays of the cluster, by the \
                         other relay, direction (out: to the relay holding the camera; in: \
                         from the relay the Watcher connected to) and result (ok, or why not).",
                    ),
                    &["relay", "direction", "result"],
                )?,
            )?,
            events_total: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new("events_total", "Events emitted, by type (docs/events.md)."),
                    &["type"],
                )?,
            )?,
            webhook_events_total: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "webhook_events_total",
                        "Events for webhooks, by webhook and result: delivered, retried (an \
                         attempt failed and is repeated), rejected (answered 4xx), dropped \
                         (the webhook's queue was full).",
                    ),
                    &["webhook", "result"],
                )?,
            )?,
            webhook_queue: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new("webhook_queue", "Events waiting for each webhook."),
                    &["webhook"],
                )?,
            )?,
            updates_total: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "updates_total",
                        "Over-the-air camera updates that ended, by result: updated, refused, \
                         failed, rolled_back, skipped.",
                    ),
                    &["result"],
                )?,
            )?,
            update_transfers: registered(
                &registry,
                IntGauge::new(
                    "update_transfers",
                    "Cameras fetching a release now (at most updates.max_transfers).",
                )?,
            )?,
            registry,
        })
    }

    /// Counts a Watcher connection carried between relays: to (`out`) or from (`in`)
    /// `relay`, and how it went.
    pub(crate) fn peer_stream(&self, relay: &str, direction: &str, result: &str) {
        self.peer_streams_total
            .with_label_values(&[relay, direction, result])
            .inc();
    }

    /// The series of camera `id`.
    pub fn camera(&self, id: &str) -> CameraMetrics {
        let l = &[id];
        CameraMetrics {
            sessions: self.watcher_sessions.with_label_values(l),
            sessions_total: self.watcher_sessions_total.with_label_values(l),
            to_camera: self
                .watcher_bytes_total
                .with_label_values(&[id, "to_camera"]),
            to_watcher: self
                .watcher_bytes_total
                .with_label_values(&[id, "to_watcher"]),
            packets: self.rtp_packets_total.with_label_values(l),
            rtp_bytes: self.rtp_bytes_total.with_label_values(l),
            lost: self.rtp_lost_total.with_label_values(l),
            frames: self.video_frames_total.with_label_values(l),
            keyframes: self.video_keyframes_total.with_label_values(l),
            stalls: self.media_stalls_total.with_label_values(l),
            jitter: self.rtp_jitter_seconds.with_label_values(l),
            first_keyframe: self.first_keyframe_seconds.with_label_values(l),
            session_setup: self.session_setup_seconds.clone(),
        }
    }

    /// The text exposition, with the online agents' live series added.
    pub fn render(&self, online: &[LiveAgent], cluster: Option<&ClusterGauges>) -> String {
        self.agents_online
            .set(i64::try_from(online.len()).unwrap_or(i64::MAX));
        let mut families = self.registry.gather();
        match live_series(online) {
            Ok(live) => families.extend(live.gather()),
            Err(e) => tracing::warn!("building per-agent metrics failed: {e}"),
        }
        if let Some(cluster) = cluster {
            match cluster_series(cluster) {
                Ok(series) => families.extend(series.gather()),
                Err(e) => tracing::warn!("building the cluster's metrics failed: {e}"),
            }
        }
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        // Encoding into a Vec fails only on a malformed metric family, which the typed
        // constructors above cannot make.
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!("encoding metrics failed: {e}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Per-agent series that exist only while the agent is online, built per scrape.
fn live_series(online: &[LiveAgent]) -> Result<Registry, prometheus::Error> {
    let registry = Registry::new_custom(Some("camera_relay".into()), None)?;
    let agent = &["agent"];
    let gauge = |name: &str, help: &str| {
        registered(&registry, GaugeVec::new(Opts::new(name, help), agent)?)
    };
    let age = gauge(
        "heartbeat_age_seconds",
        "Seconds since each online agent's last heartbeat.",
    )?;
    let rtt = gauge(
        "quic_rtt_seconds",
        "Smoothed QUIC round-trip time to each agent.",
    )?;
    let cwnd = gauge(
        "quic_congestion_window_bytes",
        "QUIC congestion window towards each agent.",
    )?;
    let lost = registered(
        &registry,
        IntCounterVec::new(
            Opts::new(
                "quic_lost_packets_total",
                "QUIC packets lost towards each agent on its current connection.",
            ),
            agent,
        )?,
    )?;
    for live in online {
        let l = &[live.id.as_str()];
        age.with_label_values(l).set(live.heartbeat_age_secs);
        if let Some(stats) = &live.quic {
            rtt.with_label_values(l).set(stats.path.rtt.as_secs_f64());
            cwnd.with_label_values(l).set(stats.path.cwnd as f64);
            lost.with_label_values(l).inc_by(stats.path.lost_packets);
        }
    }
    Ok(registry)
}

/// The cluster as this relay sees it, for `/metrics`.
#[derive(Debug, Clone)]
pub struct ClusterGauges {
    /// The fleet store's state.
    pub store: StoreHealth,
    /// Cameras online on any relay of the cluster.
    pub cameras: usize,
    /// Relays of the cluster.
    pub relays: usize,
}

/// The cluster's series, built per scrape.
fn cluster_series(cluster: &ClusterGauges) -> Result<Registry, prometheus::Error> {
    let registry = Registry::new_custom(Some("camera_relay".into()), None)?;
    let gauge = |name: &str, help: &str, value: f64| -> Result<(), prometheus::Error> {
        let gauge = registered(&registry, Gauge::with_opts(Opts::new(name, help))?)?;
        gauge.set(value);
        Ok(())
    };
    let store = &cluster.store;
    gauge(
        "cluster_store_up",
        "1 while the cluster's store (etcd) answers this relay, 0 while it does not.",
        if store.reachable { 1.0 } else { 0.0 },
    )?;
    if let Some(age) = store.lease_age_secs {
        gauge(
            "cluster_lease_age_seconds",
            "Seconds since this relay's etcd lease was last renewed.",
            age,
        )?;
    }
    if let Some(age) = store.watch_age_secs {
        gauge(
            "cluster_watch_age_seconds",
            "Seconds since this relay's watch of the fleet last heard from etcd (it asks every lease TTL).",
            age,
        )?;
    }
    gauge(
        "cluster_cameras",
        "Cameras online on any relay of the cluster, as this relay sees them.",
        cluster.cameras as f64,
    )?;
    gauge(
        "cluster_relays",
        "Relays of the cluster, as this relay sees them.",
        cluster.relays as f64,
    )?;
    Ok(registry)
}

/// `collector`, registered with `registry`.
fn registered<C>(registry: &Registry, collector: C) -> Result<C, prometheus::Error>
where
    C: prometheus::core::Collector + Clone + 'static,
{
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

impl CameraMetrics {
    /// Adds what a session's media did between two reports of it (`before` is the
    /// previous report, default at the session's start).
    pub(crate) fn report(&self, before: &MediaStats, now: &MediaStats) {
        let delta = |a: u64, b: u64| b.saturating_sub(a);
        self.packets.inc_by(delta(before.packets, now.packets));
        self.rtp_bytes.inc_by(delta(before.bytes, now.bytes));
        self.lost.inc_by(delta(before.lost, now.lost));
        self.frames.inc_by(delta(before.frames, now.frames));
        self.keyframes
            .inc_by(delta(before.keyframes, now.keyframes));
        self.stalls.inc_by(delta(before.stalls, now.stalls));
        if now.packets > before.packets {
            self.jitter.set(now.jitter_ms / 1000.0);
        }
        if let (None, Some(after)) = (before.first_keyframe_after, now.first_keyframe_after) {
            self.first_keyframe.observe(after.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn reports_add_up_to_the_session_and_render_per_camera() {
        let metrics = Metrics::new().unwrap();
        let cam = metrics.camera("cam-1");
        let first = MediaStats {
            packets: 10,
            bytes: 10_000,
            frames: 4,
            keyframes: 1,
            jitter_ms: 2.0,
            first_keyframe_after: Some(Duration::from_millis(300)),
            ..MediaStats::default()
        };
        let second = MediaStats {
            packets: 25,
            bytes: 24_000,
            lost: 2,
            frames: 9,
            stalls: 1,
            ..first.clone()
        };
        cam.report(&MediaStats::default(), &first);
        cam.report(&first, &second);
        // A second session of the same camera adds to the same series.
        metrics
            .camera("cam-1")
            .report(&MediaStats::default(), &first);
        cam.to_watcher.inc_by(5);

        let online = [LiveAgent {
            id: "cam-1".into(),
            heartbeat_age_secs: 1.5,
            quic: None,
        }];
        let text = metrics.render(&online, None);
        assert!(
            !text.contains("cluster"),
            "a single relay has no cluster series"
        );
        for line in [
            "camera_relay_agents_online 1",
            "camera_relay_rtp_packets_total{camera=\"cam-1\"} 35",
            "camera_relay_rtp_bytes_total{camera=\"cam-1\"} 34000",
            "camera_relay_rtp_lost_total{camera=\"cam-1\"} 2",
            "camera_relay_video_frames_total{camera=\"cam-1\"} 13",
            "camera_relay_media_stalls_total{camera=\"cam-1\"} 1",
            "camera_relay_rtp_jitter_seconds{camera=\"cam-1\"} 0.002",
            "camera_relay_first_keyframe_seconds_count{camera=\"cam-1\"} 2",
            "camera_relay_watcher_bytes_total{camera=\"cam-1\",direction=\"to_watcher\"} 5",
            "camera_relay_heartbeat_age_seconds{agent=\"cam-1\"} 1.5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }

        let cluster = ClusterGauges {
            store: StoreHealth {
                reachable: false,
                for_secs: 3.0,
                lease_age_secs: Some(2.5),
                watch_age_secs: None,
                problem: Some("down".into()),
            },
            cameras: 7,
            relays: 3,
        };
        let text = metrics.render(&online, Some(&cluster));
        for line in [
            "camera_relay_cluster_store_up 0",
            "camera_relay_cluster_lease_age_seconds 2.5",
            "camera_relay_cluster_cameras 7",
            "camera_relay_cluster_relays 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(
            !text.contains("cluster_watch_age"),
            "no watch answer yet, no series"
        );
    }
}
