//! Webhooks: each event a webhook wants is POSTed to it as JSON, signed with
//! HMAC-SHA256 (`X-Camera-Relay-Signature: sha256=<hex>` over the body, keyed with
//! the webhook's secret).
//!
//! Each webhook has a bounded queue split into lanes by camera: a lane delivers one
//! event at a time, so one camera's events arrive in order, while other lanes go on
//! when one camera's event is being retried. An event that fails (no connection, a
//! timeout, 408, 429, 5xx) is retried with backoff until it is delivered; a 4xx
//! answer means the receiver will never take it, and it is dropped. Offering an event
//! never waits: a full lane drops it, counted in
//! `camera_relay_webhook_events_total{result="dropped"}` and logged.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::body::Bytes;
use common::backoff::Backoff;
use prometheus::{IntCounter, IntGauge};
use ring::hmac;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Event, TypeFilter};
use crate::{config::WebhookConfig, metrics::Metrics, outbound::Target};

/// Header with the body's HMAC-SHA256.
pub const SIGNATURE_HEADER: &str = "x-camera-relay-signature";
/// Header with the event's type.
pub const EVENT_HEADER: &str = "x-camera-relay-event";
/// Header with the event's id.
pub const ID_HEADER: &str = "x-camera-relay-event-id";

/// Lanes per webhook: events of this many cameras can be in flight at once.
const LANES: usize = 4;
/// First wait after a failed attempt; it doubles up to `retry_max_secs`.
const RETRY_BASE: Duration = Duration::from_millis(500);
/// At most one "queue full" warning per webhook this often.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// A webhook's queue, which [`super::Events::emit`] offers every event.
#[derive(Debug)]
pub(crate) struct Queue {
    name: String,
    types: TypeFilter,
    lanes: Vec<mpsc::Sender<Arc<Event>>>,
    waiting: IntGauge,
    dropped: IntCounter,
    /// Drops since the last warning, and when that was.
    drops: DropLog,
}

#[derive(Debug, Default)]
struct DropLog {
    unlogged: AtomicU64,
    last: std::sync::Mutex<Option<Instant>>,
}

impl Queue {
    /// Queues `event` if the webhook wants it; never waits.
    pub(crate) fn offer(&self, event: &Arc<Event>) {
        if !self.types.passes(event.kind) {
            return;
        }
        let lane = &self.lanes[lane_of(&event.camera, self.lanes.len())];
        match lane.try_send(event.clone()) {
            Ok(()) => self.waiting.inc(),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.inc();
                let unlogged = self.drops.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
                let mut last = self.drops.last.lock().unwrap_or_else(|e| e.into_inner());
                if last.is_none_or(|at| at.elapsed() >= DROP_LOG_EVERY) {
                    *last = Some(Instant::now());
                    self.drops.unlogged.fetch_sub(unlogged, Ordering::Relaxed);
                    tracing::warn!(
                        webhook = %self.name,
                        dropped = unlogged,
                        "webhook queue full: events dropped (its receiver is down or slower than \
                         events come; webhooks.queue sets the room)"
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// The lane of `camera`'s events (FNV-1a: stable, spread).
fn lane_of(camera: &str, lanes: usize) -> usize {
    let hash = camera.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % lanes as u64) as usize
}

/// Starts delivering to the webhook of `config` until `shutdown`.
pub(crate) fn start(
    config: &WebhookConfig,
    metrics: &Metrics,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Queue {
    let per_lane = config.queue.div_ceil(LANES).max(1);
    let count = |result: &str| {
        metrics
            .webhook_events_total
            .with_label_values(&[&config.name, result])
    };
    let waiting = metrics.webhook_queue.with_label_values(&[&config.name]);
    let delivery = Arc::new(Delivery {
        name: config.name.clone(),
        target: config.target.clone(),
        key: hmac::Key::new(hmac::HMAC_SHA256, config.secret.expose().as_bytes()),
        timeout: config.timeout,
        retry_max: config.retry_max,
        delivered: count("delivered"),
        retried: count("retried"),
        rejected: count("rejected"),
    });
    let lanes = (0..LANES)
        .map(|_| {
            let (tx, rx) = mpsc::channel(per_lane);
            tracker.spawn(lane(
                rx,
                delivery.clone(),
                waiting.clone(),
                shutdown.clone(),
            ));
            tx
        })
        .collect();
    Queue {
        name: config.name.clone(),
        types: config.types.clone(),
        lanes,
        waiting,
        dropped: count("dropped"),
        drops: DropLog::default(),
    }
}

/// How to deliver to one webhook.
#[derive(Debug)]
struct Delivery {
    name: String,
    target: Target,
    key: hmac::Key,
    timeout: Duration,
    retry_max: Duration,
    delivered: IntCounter,
    retried: IntCounter,
    rejected: IntCounter,
}

/// One lane: its events, one at a time.
async fn lane(
    mut events: mpsc::Receiver<Arc<Event>>,
    delivery: Arc<Delivery>,
    waiting: IntGauge,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = delivery.deliver(&event) => {}
        }
        waiting.dec();
    }
}

/// What one attempt came to.
enum Attempt {
    Delivered,
    /// The receiver refused it for good.
    Rejected(String),
    /// Worth another try.
    Failed(String),
}

impl Delivery {
    /// Delivers `event`, retrying until it is delivered or refused for good.
    async fn deliver(&self, event: &Event) {
        let mut backoff = Backoff::new(RETRY_BASE, self.retry_max);
        let mut failures = 0u32;
        loop {
            match self.attempt(event).await {
                Attempt::Delivered => {
                    self.delivered.inc();
                    if failures > 0 {
                        tracing::info!(webhook = %self.name, "webhook receives events again, after {failures} failed attempts");
                    }
                    return;
                }
                Attempt::Rejected(why) => {
                    self.rejected.inc();
                    tracing::warn!(webhook = %self.name, id = event.id, kind = event.kind, "webhook refused the event, which is dropped: {why}");
                    return;
                }
                Attempt::Failed(why) => {
                    self.retried.inc();
                    failures += 1;
                    let wait = backoff.next_delay();
                    // The first failure and then every tenth: a receiver that is down for
                    // an hour logs a few lines, not thousands.
                    if failures == 1 || failures % 10 == 0 {
                        tracing::warn!(webhook = %self.name, id = event.id, attempts = failures, "webhook delivery failed: {why}; retrying in {wait:.1?}");
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn attempt(&self, event: &Event) -> Attempt {
        let body = Bytes::copy_from_slice(event.json.as_bytes());
        let signature = format!("sha256={}", sign(&self.key, &body));
        let headers = |request: axum::http::request::Builder| {
            request
                .header(SIGNATURE_HEADER, &signature)
                .header(EVENT_HEADER, event.kind)
                .header(ID_HEADER, event.id)
                .header(
                    axum::http::header::USER_AGENT,
                    concat!("camera-relay/", env!("CARGO_PKG_VERSION")),
                )
        };
        match self
            .target
            .post(headers, Some(("application/json", body)), self.timeout)
            .await
        {
            Ok((answer, _)) if answer.status.is_success() => Attempt::Delivered,
            Ok((answer, _)) => {
                let status = answer.status;
                let again =
                    status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429;
                let why = format!("{} answered {status}", self.target.origin());
                if again {
                    Attempt::Failed(why)
                } else {
                    Attempt::Rejected(why)
                }
            }
            Err(why) => Attempt::Failed(why),
        }
    }
}

/// Lower-case hex of `body`'s HMAC-SHA256 under `key`.
pub(crate) fn sign(key: &hmac::Key, body: &[u8]) -> String {
    hmac::sign(key, body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_in_hex() {
        // RFC 4231, test case 2.
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        assert_eq!(
            sign(&key, b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_camera_always_takes_the_same_lane() {
        assert_eq!(lane_of("cam-1", LANES), lane_of("cam-1", LANES));
        let used: std::collections::HashSet<usize> = (0..64)
            .map(|i| lane_of(&format!("cam-{i}"), LANES))
            .collect();
        assert_eq!(used.len(), LANES);
    }
}
