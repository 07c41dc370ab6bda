//! The operator API, on the control listener: JSON in and out, errors as
//! `{"error": "…"}` with a fitting status. Every route here needs the admin token
//! (`Authorization: Bearer …`), or, with none configured, a loopback client.
//! docs/api.yaml describes it (OpenAPI).

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{rejection::JsonRejection, ConnectInfo, Path, Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use common::protocol::{tunnel_close, Command, CommandOutput};
use serde_json::{json, Value};

use crate::{
    events::MediaSummary,
    metrics::{ClusterGauges, LiveAgent},
    peer,
    registry::{AgentSession, CommandError, Presence},
    updates::api as updates,
    Shared,
};

/// An API error: status and words.
#[derive(Debug)]
pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// The operator routes, behind [`require_operator`].
pub(crate) fn router(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/agents", get(agents))
        .route("/agents/{id}", get(agent))
        .route("/agents/{id}/control", post(control))
        .route("/streams", get(streams))
        .route("/traffic", get(traffic))
        .route("/tunnels", get(tunnels))
        .route("/tunnels/{id}", get(tunnel))
        .route("/tunnels/{id}/restart", post(restart_tunnel))
        .route("/relay/drain", get(drain_state).post(drain).delete(undrain))
        .route("/events", get(crate::events::sse::stream))
        .route(
            "/releases",
            get(updates::releases)
                .post(updates::upload)
                .layer(axum::extract::DefaultBodyLimit::max(updates::MAX_RELEASE)),
        )
        .route(
            "/agents/{id}/update",
            get(updates::agent_update).post(updates::update_agent),
        )
        .route(
            "/updates",
            get(updates::rollouts).post(updates::start_rollout),
        )
        .route(
            "/updates/{id}",
            get(updates::rollout).delete(updates::stop_rollout),
        )
        .route_layer(middleware::from_fn_with_state(shared, require_operator))
}

/// Lets a request through with the admin token, or from loopback when none is set.
pub(crate) async fn require_operator(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    match &shared.api.admin_token {
        Some(token) => {
            let presented = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            let ok = presented.is_some_and(|p| {
                common::secret::constant_time_eq(p.as_bytes(), token.expose().as_bytes())
            });
            if !ok {
                return ApiError(
                    StatusCode::UNAUTHORIZED,
                    "operator endpoints need Authorization: Bearer <admin token>".into(),
                )
                .into_response();
            }
        }
        None if peer.ip().is_loopback() => {}
        None => {
            return ApiError(
                StatusCode::FORBIDDEN,
                "no admin token is configured, so operator endpoints answer only to clients \
                 on this host; set admin_token (or --admin-token) to allow others"
                    .into(),
            )
            .into_response()
        }
    }
    next.run(request).await
}

/// `GET /metrics`: the Prometheus text exposition.
pub(crate) async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let online: Vec<LiveAgent> = shared
        .registry
        .sessions()
        .iter()
        .map(|session| LiveAgent {
            id: session.id.clone(),
            heartbeat_age_secs: session.last_heartbeat().map_or_else(
                || {
                    session
                        .registered_at
                        .elapsed()
                        .unwrap_or_default()
                        .as_secs_f64()
                },
                |(at, _)| at.elapsed().as_secs_f64(),
            ),
            quic: session.current_tunnel().map(|conn| conn.stats()),
        })
        .collect();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared
            .registry
            .metrics()
            .render(&online, cluster_gauges(&shared).as_ref()),
    )
}

fn cluster_gauges(shared: &Shared) -> Option<ClusterGauges> {
    let cluster = shared.registry.store().cluster()?;
    Some(ClusterGauges {
        store: cluster.health(),
        cameras: cluster.cameras().len(),
        relays: cluster.relays().len(),
    })
}

/// The camera's record in the cluster when another relay holds it.
fn held_elsewhere(shared: &Shared, id: &str) -> Option<Presence> {
    if shared.registry.get(id).is_some() {
        return None;
    }
    let cluster = shared.registry.store().cluster()?;
    cluster.camera(id).filter(|p| p.relay != cluster.relay_id())
}

/// Sends an operator's POST about a camera another relay holds to that relay; an
/// error if this request was forwarded already (the camera moved meanwhile).
async fn forward_to_holder(
    shared: &Shared,
    holder: &Presence,
    path: &str,
    headers: &HeaderMap,
    body: Option<Vec<u8>>,
) -> Result<Response, ApiError> {
    let Some(cluster) = shared.registry.store().cluster() else {
        return Err(ApiError(StatusCode::CONFLICT, "not in a cluster".into()));
    };
    if let Some(from) = headers.get(peer::FORWARDED) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "agent {:?} is not on this relay ({}) any more, though relay {:?} thought so; try again",
                holder.agent_id,
                cluster.relay_id(),
                from.to_str().unwrap_or("?")
            ),
        ));
    }
    let relays = cluster.relays();
    let Some(record) = relays.get(&holder.relay) else {
        return Err(ApiError(
            StatusCode::BAD_GATEWAY,
            format!(
                "agent {:?} is on relay {:?}, which has not announced where it is reached",
                holder.agent_id, holder.relay
            ),
        ));
    };
    peer::forward(
        cluster.relay_id(),
        &holder.relay,
        &record.advertise,
        path,
        headers,
        body,
    )
    .await
}

/// Forwards an operator's POST about camera `id` to the relay that holds it, if another
/// relay of the cluster does; `None` if this relay is the one to answer.
pub(crate) async fn forward_if_elsewhere(
    shared: &Shared,
    id: &str,
    path: &str,
    headers: &HeaderMap,
    body: Option<Vec<u8>>,
) -> Option<Result<Response, ApiError>> {
    let holder = held_elsewhere(shared, id)?;
    Some(forward_to_holder(shared, &holder, path, headers, body).await)
}

/// `GET /health`, open to all. In a cluster, `degraded` while the store is out of reach
/// (cameras online keep streaming; new ones are refused).
pub(crate) async fn health(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let mut health = json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": shared.registry.uptime().as_secs(),
        "agents_online": shared.registry.sessions().len(),
    });
    if let Some(cluster) = shared.registry.store().cluster() {
        let store = cluster.health();
        if !store.reachable {
            health["status"] = json!("degraded");
        }
        health["cluster"] = json!({
            "relay": cluster.relay_id(),
            "store": store,
            "relays": cluster.relays().keys().collect::<Vec<_>>(),
            "cameras_online": cluster.cameras().len(),
            "draining": cluster.draining(),
        });
    }
    Json(health)
}

/// The relay's balance, or why there is none.
fn balance(shared: &Shared) -> Result<&Arc<crate::balance::Balance>, ApiError> {
    shared.balance.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::CONFLICT,
            "this relay is not in a cluster ([cluster] in relay.toml): its cameras have nowhere \
             to go"
                .into(),
        )
    })
}

async fn drain_state(State(shared): State<Arc<Shared>>) -> ApiResult {
    Ok(Json(json!(balance(&shared)?.state(&shared.registry))))
}

/// Starts draining this relay for maintenance.
async fn drain(State(shared): State<Arc<Shared>>) -> ApiResult {
    let state = balance(&shared)?
        .drain(shared.registry.clone(), &shared.tracker, &shared.shutdown)
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot announce the drain: {e:#}"),
            )
        })?;
    Ok(Json(json!(state)))
}

/// Stops draining.
async fn undrain(State(shared): State<Arc<Shared>>) -> ApiResult {
    let state = balance(&shared)?
        .undrain(&shared.registry)
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot announce the end of the drain: {e:#}"),
            )
        })?;
    Ok(Json(json!(state)))
}

async fn agents(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> ApiResult {
    let host = url_host(&shared, &headers);
    let mut list = Vec::new();
    for id in all_ids(&shared) {
        list.push(agent_view(&shared, &id, &host).await);
    }
    Ok(Json(json!({ "agents": list })))
}

async fn agent(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    known(&shared, &id)?;
    Ok(Json(
        agent_view(&shared, &id, &url_host(&shared, &headers)).await,
    ))
}

/// The host a VMS names in a camera's URL: the address the camera ports listen on, or,
/// when they listen on every address, the name the operator reached the relay by.
fn url_host(shared: &Shared, headers: &HeaderMap) -> String {
    let named = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    host_for_urls(shared.camera_bind, named)
}

fn host_for_urls(bind: std::net::IpAddr, host_header: Option<&str>) -> String {
    if !bind.is_unspecified() {
        return match bind {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
    }
    host_header
        .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
        .map_or_else(|| "127.0.0.1".into(), |a| a.host().to_string())
}

/// Known ids (configured, registered before, anywhere in the cluster) and online ones,
/// sorted.
fn all_ids(shared: &Shared) -> Vec<String> {
    let mut ids = shared.registry.known();
    ids.extend(shared.registry.sessions().iter().map(|s| s.id.clone()));
    if let Some(cluster) = shared.registry.store().cluster() {
        ids.extend(cluster.cameras().into_iter().map(|p| p.agent_id));
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

pub(crate) fn known(shared: &Shared, id: &str) -> Result<(), ApiError> {
    let in_cluster = || {
        shared
            .registry
            .store()
            .cluster()
            .is_some_and(|c| c.camera(id).is_some())
    };
    if shared.registry.get(id).is_some() || shared.registry.knows(id) || in_cluster() {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no agent {id:?} is known to this relay"),
        ))
    }
}

async fn agent_view(shared: &Shared, id: &str, host: &str) -> Value {
    if let Some(held) = held_elsewhere(shared, id) {
        return json!({
            "id": id,
            "online": true,
            "relay": held.relay,
            "agent_version": held.agent_version,
            "remote_addr": held.remote,
            "data_link": held.link,
            "ports": [held.port],
            "registered_secs_ago": now_unix_secs().saturating_sub(held.since),
        });
    }
    let relay = shared
        .registry
        .store()
        .cluster()
        .map(|c| c.relay_id().to_string());
    let Some(session) = shared.registry.get(id) else {
        return json!({
            "id": id,
            "online": false,
            "ports": shared.registry.assigned_port(id).await.into_iter().collect::<Vec<_>>(),
            // Unknown (null) if it has not been online here since the relay started.
            "offline_secs": shared.registry.offline_for(id).map(|d| d.as_secs()),
            "relay_uptime_secs": shared.registry.uptime().as_secs(),
        });
    };
    let heartbeat = session.last_heartbeat();
    json!({
        "relay": relay,
        "id": session.id,
        "online": true,
        "last_heartbeat_secs_ago": heartbeat.map(|(at, _)| at.elapsed().as_secs_f64()),
        "stats": heartbeat.map(|(_, stats)| stats),
        "camera": {
            "model": session.camera.model,
            "stream_paths": session.camera.stream_paths,
            "rtsp_port": session.camera.rtsp_port,
        },
        "agent_version": session.agent_version,
        "remote_addr": session.remote.to_string(),
        "quic_rtt_ms": quic_rtt_ms(&session),
        // Follows the camera's NAT: QUIC migrates when its public UDP port changes.
        "quic_remote_addr": session.current_tunnel().map(|c| c.remote_address().to_string()),
        "data_link": session.current_link().map(|link| link.transport()),
        "ports": [session.port],
        "urls": session
            .camera
            .stream_paths
            .iter()
            .map(|path| format!("rtsp://{host}:{}{path}", session.port))
            .collect::<Vec<_>>(),
        "registered_secs_ago": session.registered_at.elapsed().map_or(0, |d| d.as_secs()),
        "client_certificate": session.certified,
        "target": session.target,
        "labels": session.labels,
        "takes_updates": session.takes_updates,
    })
}

/// The round-trip time of the camera's QUIC connection, if it is up.
fn quic_rtt_ms(session: &AgentSession) -> Option<f64> {
    session
        .current_tunnel()
        .map(|c| c.rtt().as_secs_f64() * 1000.0)
}

/// An online agent by id: 404 if unknown, 409 if known but offline.
fn online(shared: &Shared, id: &str) -> Result<Arc<AgentSession>, ApiError> {
    known(shared, id)?;
    shared.registry.get(id).ok_or_else(|| {
        ApiError(
            StatusCode::CONFLICT,
            format!("agent {id:?} is offline; commands need a connected agent"),
        )
    })
}

async fn control(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let valid: Vec<&str> = Command::ALL.iter().map(|(_, name)| *name).collect();
    let bad = |why: String| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{why}; send {{\"command\": one of {}}}", valid.join(", ")),
        )
    };
    let Json(body) = body.map_err(|e| bad(format!("the body is not JSON ({})", e.body_text())))?;
    let name = body
        .get("command")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no \"command\" string in the body".into()))?;
    let command =
        Command::from_name(name).ok_or_else(|| bad(format!("unknown command {name:?}")))?;
    let path = format!("/agents/{id}/control");
    let forwarded = serde_json::to_vec(&body).ok();
    if let Some(answer) = forward_if_elsewhere(&shared, &id, &path, &headers, forwarded).await {
        return answer;
    }
    let session = online(&shared, &id)?;
    let sent = std::time::Instant::now();
    let answer = session
        .command(command, shared.limits.command_timeout)
        .await;
    let round_trip_ms = sent.elapsed().as_secs_f64() * 1000.0;
    let output = match answer {
        Ok(Ok(output)) => output,
        Ok(Err(why)) => {
            return Err(ApiError(
                StatusCode::BAD_GATEWAY,
                format!("agent {id:?} could not {name}: {why}"),
            ))
        }
        Err(CommandError::TimedOut(wait)) => {
            return Err(ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                format!("agent {id:?} did not answer {name} within {wait:?}"),
            ))
        }
        Err(CommandError::Offline) => {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("agent {id:?} went offline before answering {name}"),
            ))
        }
    };
    let result = match output {
        CommandOutput::Pong {
            unix_millis,
            quic_rtt_micros,
        } => json!({
            "agent_clock_unix_ms": unix_millis,
            "clock_offset_ms": unix_millis as f64 - (now_unix_ms() - round_trip_ms / 2.0),
            "quic_rtt_ms": quic_rtt_micros.map(|us| us as f64 / 1000.0),
        }),
        CommandOutput::Stats(stats) => json!(stats),
        CommandOutput::Reconnecting => json!({ "reconnecting": true }),
        CommandOutput::Reloaded {
            applied,
            need_restart,
        } => json!({ "applied": applied, "need_restart": need_restart }),
        CommandOutput::Restarting(how) => json!({ "restarting": how }),
    };
    Ok(Json(json!({
        "agent": id,
        "command": name,
        "round_trip_ms": round_trip_ms,
        "result": result,
    }))
    .into_response())
}

fn now_unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn now_unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

async fn streams(State(shared): State<Arc<Shared>>) -> ApiResult {
    use std::sync::atomic::Ordering::Relaxed;
    let list: Vec<Value> = shared
        .registry
        .watchers()
        .iter()
        .map(|w| {
            let (method, path) = w.request.get().cloned().unzip();
            json!({
                "id": w.id,
                "camera": w.camera,
                "watcher": w.peer.to_string(),
                "method": method,
                "path": path,
                "bytes_from_watcher": w.bytes.from_tcp.load(Relaxed),
                "bytes_to_watcher": w.bytes.to_tcp.load(Relaxed),
                "age_secs": w.opened.elapsed().as_secs_f64(),
                "media": MediaSummary::of(&w.media.lock().unwrap_or_else(|e| e.into_inner())),
            })
        })
        .collect();
    Ok(Json(json!({ "streams": list })))
}

/// `GET /traffic`: each camera this relay carried lately, with its bytes per second
/// (both directions) over the last minutes and, while online, its data link and RTT.
async fn traffic(State(shared): State<Arc<Shared>>) -> ApiResult {
    let mut list = Vec::new();
    for (id, rates) in shared.traffic.snapshot() {
        let session = shared.registry.get(&id);
        list.push(json!({
            "id": id,
            "online": session.is_some(),
            "data_link": session.as_ref().and_then(|s| s.current_link()).map(|l| l.transport()),
            "quic_rtt_ms": session.as_deref().and_then(quic_rtt_ms),
            "bytes_per_sec": rates,
        }));
    }
    Ok(Json(json!({
        "every_secs": crate::traffic::EVERY.as_secs(),
        "cameras": list,
    })))
}

async fn tunnels(State(shared): State<Arc<Shared>>) -> ApiResult {
    let mut list = Vec::new();
    for id in all_ids(&shared) {
        list.push(tunnel_view(&shared, &id).await);
    }
    Ok(Json(json!({ "tunnels": list })))
}

async fn tunnel(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> ApiResult {
    known(&shared, &id)?;
    Ok(Json(tunnel_view(&shared, &id).await))
}

/// The fields of the older tunnel server's listing.
async fn tunnel_view(shared: &Shared, id: &str) -> Value {
    if let Some(held) = held_elsewhere(shared, id) {
        return json!({
            "id": id,
            "status": if held.link.is_some() { "online" } else { "connecting" },
            "relay": held.relay,
            "local_port": held.port,
            "remote_port": null,
            "bytes_transferred": null,
            "connections": null,
            "uptime_secs": now_unix_secs().saturating_sub(held.since),
        });
    }
    let metrics = shared.registry.metrics().camera(id);
    let transferred = metrics.to_camera.get() + metrics.to_watcher.get();
    let Some(session) = shared.registry.get(id) else {
        return json!({
            "id": id,
            "status": "offline",
            "local_port": shared.registry.assigned_port(id).await,
            "remote_port": null,
            "bytes_transferred": transferred,
            "connections": metrics.sessions_total.get(),
            "uptime_secs": null,
        });
    };
    let status = if session.current_tunnel().is_some() {
        "online"
    } else {
        "connecting"
    };
    json!({
        "id": id,
        "status": status,
        "local_port": session.port,
        "remote_port": session.camera.rtsp_port,
        "bytes_transferred": transferred,
        "connections": metrics.sessions_total.get(),
        "active_connections": metrics.sessions.get(),
        "uptime_secs": session.registered_at.elapsed().map_or(0, |d| d.as_secs()),
    })
}

async fn restart_tunnel(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let path = format!("/tunnels/{id}/restart");
    if let Some(answer) = forward_if_elsewhere(&shared, &id, &path, &headers, None).await {
        return answer;
    }
    let session = online(&shared, &id)?;
    let Some(conn) = session.current_tunnel() else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("agent {id:?} has no tunnel up right now; it is dialing already"),
        ));
    };
    let ended = shared
        .registry
        .watchers()
        .iter()
        .filter(|w| w.camera == id)
        .count();
    tracing::info!(agent = %id, sessions = ended, "tunnel restarted by an operator");
    conn.close(
        quinn::VarInt::from_u32(tunnel_close::RESTARTED),
        b"restarted by an operator",
    );
    Ok(Json(json!({ "agent": id, "closed_sessions": ended })).into_response())
}

#[cfg(test)]
mod tests {
    use super::host_for_urls;

    #[test]
    fn camera_urls_name_the_bind_address_or_the_host_the_operator_used() {
        let loopback = "127.0.0.1".parse().unwrap();
        assert_eq!(
            host_for_urls(loopback, Some("relay.example:8080")),
            "127.0.0.1"
        );
        let v6 = "2001:db8::1".parse().unwrap();
        assert_eq!(host_for_urls(v6, None), "[2001:db8::1]");
        let any = "0.0.0.0".parse().unwrap();
        assert_eq!(
            host_for_urls(any, Some("relay.example:8080")),
            "relay.example"
        );
        assert_eq!(
            host_for_urls(any, Some("[2001:db8::2]:8080")),
            "[2001:db8::2]"
        );
        assert_eq!(host_for_urls(any, Some("not a host")), "127.0.0.1");
        assert_eq!(host_for_urls(any, None), "127.0.0.1");
    }
}
