//! The update routes of the operator API (docs/api.yaml, docs/updates.md).

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{rejection::JsonRejection, Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use common::release::Release;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{releases::UploadError, StartError};
use crate::{api::ApiError, Shared};

/// Header carrying a release's detached signature (the `.sig` file's JSON) with
/// `POST /releases`.
pub(crate) const SIGNATURE_HEADER: &str = "x-release-signature";

/// Largest binary `POST /releases` takes.
pub(crate) const MAX_RELEASE: usize = 64 * 1024 * 1024;

/// `POST /releases`: the binary as the body, its signature in [`SIGNATURE_HEADER`].
pub(crate) async fn upload(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let bad = |why: String| ApiError(StatusCode::BAD_REQUEST, why);
    let signature = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            bad(format!(
                "send the release's signature (the .sig file `certs sign` wrote) in the \
                 {SIGNATURE_HEADER} header: -H \"X-Release-Signature: $(cat camera-agent.sig)\""
            ))
        })?;
    let release: Release = serde_json::from_str(signature).map_err(|e| {
        bad(format!(
            "{SIGNATURE_HEADER} is not a release signature: {e}"
        ))
    })?;
    let stored = shared
        .updates
        .releases
        .upload(release, body.to_vec())
        .map_err(|e| match e {
            UploadError::Invalid(why) => ApiError(StatusCode::UNPROCESSABLE_ENTITY, why),
            UploadError::Conflict(_) => ApiError(StatusCode::CONFLICT, e.to_string()),
            UploadError::Io(_) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        })?;
    tracing::info!(release = %stored.id, size = stored.release.size, key = %stored.release.key, "release uploaded");
    Ok((StatusCode::CREATED, Json(release_view(&stored))).into_response())
}

/// `GET /releases`.
pub(crate) async fn releases(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let list: Vec<Value> = shared
        .updates
        .releases
        .list()
        .iter()
        .map(|r| release_view(r))
        .collect();
    Json(json!({ "releases": list }))
}

fn release_view(stored: &super::releases::Stored) -> Value {
    json!({
        "id": stored.id,
        "version": stored.release.version,
        "target": stored.release.target,
        "size": stored.release.size,
        "sha256": stored.release.sha256,
        "key": stored.release.key,
        "uploaded_unix": stored.uploaded.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    })
}

/// The body of `POST /agents/{id}/update`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateRequest {
    release: String,
    #[serde(default)]
    force: bool,
}

/// `POST /agents/{id}/update`.
pub(crate) async fn update_agent(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<UpdateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "{}; send {{\"release\": \"<id from GET /releases>\", \"force\": false}}",
                e.body_text()
            ),
        )
    })?;
    let path = format!("/agents/{id}/update");
    let body =
        serde_json::to_vec(&json!({ "release": request.release, "force": request.force })).ok();
    if let Some(answer) =
        crate::api::forward_if_elsewhere(&shared, &id, &path, &headers, body).await
    {
        return answer;
    }
    crate::api::known(&shared, &id)?;
    let job = shared
        .updates
        .start(&shared.registry, &id, &request.release, request.force)
        .map_err(start_error)?;
    Ok((StatusCode::ACCEPTED, Json(json!(job))).into_response())
}

/// `GET /agents/{id}/update`.
pub(crate) async fn agent_update(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    crate::api::known(&shared, &id)?;
    shared
        .updates
        .job(&id)
        .map(|job| Json(json!(job)))
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("agent {id:?} has no update on this relay"),
            )
        })
}

/// The body of `POST /updates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RolloutRequest {
    release: String,
    /// Agent ids or patterns with `*`.
    #[serde(default)]
    agents: Vec<String>,
    /// Labels of online agents.
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default = "one")]
    batch: usize,
    #[serde(default)]
    max_failures: usize,
    #[serde(default)]
    force: bool,
}

fn one() -> usize {
    1
}

/// `POST /updates`: a rollout.
pub(crate) async fn start_rollout(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<RolloutRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "{}; send {{\"release\": \"<id>\", \"agents\": [\"cam-*\"] (or \"labels\": \
                 [\"site-a\"]), \"batch\": 10, \"max_failures\": 0}}",
                e.body_text()
            ),
        )
    })?;
    let rollout = shared
        .updates
        .rollout(
            &shared.registry,
            &request.release,
            &super::Pick {
                agents: request.agents,
                labels: request.labels,
            },
            request.batch,
            request.max_failures,
            request.force,
        )
        .map_err(start_error)?;
    Ok((StatusCode::CREATED, Json(json!(rollout))).into_response())
}

/// `GET /updates`.
pub(crate) async fn rollouts(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({ "rollouts": shared.updates.rollouts() }))
}

/// `GET /updates/{id}`.
pub(crate) async fn rollout(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    shared
        .updates
        .rollout_view(id)
        .map(|view| Json(json!(view)))
        .ok_or_else(|| no_rollout(id))
}

/// `DELETE /updates/{id}`: stops the rollout.
pub(crate) async fn stop_rollout(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    shared
        .updates
        .stop_rollout(id)
        .map(|view| Json(json!(view)))
        .ok_or_else(|| no_rollout(id))
}

fn no_rollout(id: u64) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no rollout {id} on this relay"),
    )
}

fn start_error(e: StartError) -> ApiError {
    let status = match e {
        StartError::NoRelease(_) => StatusCode::NOT_FOUND,
        StartError::Conflict(_) => StatusCode::CONFLICT,
        StartError::Invalid(_) => StatusCode::BAD_REQUEST,
    };
    ApiError(status, e.to_string())
}
