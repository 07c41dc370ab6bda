//! `GET /events`: the event stream as server-sent events. Each event is one SSE
//! message whose `id` is the event's id and whose `data` is its JSON. A client that
//! reconnects with `Last-Event-ID` (browsers' `EventSource` does by itself), or asks
//! with `?after=<id>`, first gets what it missed from the history; if some of that is
//! no longer kept it is told so (`{"type": "events.lost", …}`) before the rest. Without
//! either it gets events from now on. `?types=camera.online,watcher.*` and
//! `?camera=<id>` filter.

use std::{collections::VecDeque, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::sse::{Event as SseEvent, KeepAlive, Sse},
};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::{Event, Events, Gap, TypeFilter};
use crate::{api::ApiError, Shared};

/// A comment this often keeps proxies from closing a quiet stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The query of `GET /events`.
#[derive(Debug, Deserialize)]
pub(crate) struct Filter {
    /// Comma-separated types or `prefix.*` patterns.
    types: Option<String>,
    /// Only this camera's events.
    camera: Option<String>,
    /// Resume after this id (as `Last-Event-ID`).
    after: Option<u64>,
}

pub(crate) async fn stream(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(filter): Query<Filter>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let bad = |why: String| ApiError(StatusCode::BAD_REQUEST, why);
    let types = filter
        .types
        .as_deref()
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect()
        })
        .map(TypeFilter::new)
        .transpose()
        .map_err(|why| bad(format!("types: {why}")))?
        .unwrap_or_default();
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| bad("Last-Event-ID must be the id of an event (a number)".into()))
        })
        .transpose()?;
    let after = last_event_id.or(filter.after);
    let events = shared.registry.events().clone();
    let (past, live, gap) = events.subscribe(after);
    let follow = Follow {
        // Without a place to resume from, the stream starts now.
        pending: if after.is_some() {
            past.into()
        } else {
            VecDeque::new()
        },
        gap,
        live,
        seen: after.unwrap_or(0),
        types,
        camera: filter.camera,
        events,
        shutdown: shared.shutdown.clone(),
    };
    let stream = futures_util::stream::unfold(follow, |mut follow| async move {
        let next = follow.next().await?;
        Some((Ok(next), follow))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// One client's place in the event stream.
struct Follow {
    /// Events to send before waiting for more.
    pending: VecDeque<Arc<Event>>,
    /// Events lost before `pending`, to tell first.
    gap: Option<Gap>,
    live: broadcast::Receiver<Arc<Event>>,
    /// The last id taken (sent or filtered out).
    seen: u64,
    types: TypeFilter,
    camera: Option<String>,
    events: Arc<Events>,
    /// The relay's: the stream ends with it, so shutdown does not wait for clients.
    shutdown: CancellationToken,
}

impl Follow {
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(gap) = self.gap.take() {
                let lost = json!({
                    "type": "events.lost",
                    "after": gap.after,
                    "resumes_at": gap.resumes_at,
                });
                return Some(SseEvent::default().data(lost.to_string()));
            }
            while let Some(event) = self.pending.pop_front() {
                if event.id <= self.seen {
                    // Read again after a lag.
                    continue;
                }
                self.seen = event.id;
                if self.wants(&event) {
                    return Some(
                        SseEvent::default()
                            .id(event.id.to_string())
                            .data(&event.json),
                    );
                }
            }
            let received = tokio::select! {
                () = self.shutdown.cancelled() => return None,
                received = self.live.recv() => received,
            };
            match received {
                Ok(event) => self.pending.push_back(event),
                Err(RecvError::Lagged(_)) => {
                    // Fell behind the live buffer: read on from the history.
                    let (past, gap) = self.events.since(self.seen);
                    self.pending = past.into();
                    self.gap = gap;
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }

    fn wants(&self, event: &Event) -> bool {
        self.types.passes(event.kind) && self.camera.as_ref().is_none_or(|c| *c == event.camera)
    }
}
