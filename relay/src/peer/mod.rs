//! Reaching another relay of the cluster: an operator's request about a camera that
//! relay holds (a command, a tunnel restart) is forwarded to it, over HTTP to the
//! address it announced (`cluster.advertise`), with the operator's own credentials;
//! Watchers ride the relay-to-relay links of [`link`].

pub(crate) mod link;

use std::time::Duration;

use axum::{
    body::Bytes,
    http::{header, request::Builder, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};

use crate::{api::ApiError, outbound::Target};

/// Header a forwarded request carries (the forwarding relay's id), so that it is never
/// forwarded again.
pub(crate) const FORWARDED: &str = "x-camera-relay-forwarded";

/// Longest a forwarded request may take, answer included (a command waits for the
/// camera's agent, up to `limits.command_timeout_secs`).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// POSTs `path` with `body` (JSON) to the relay at `advertise`, as this relay
/// (`from`), with the operator's `Authorization`; its answer is the answer.
pub(crate) async fn forward(
    from: &str,
    to: &str,
    advertise: &str,
    path: &str,
    headers: &HeaderMap,
    body: Option<Vec<u8>>,
) -> Result<Response, ApiError> {
    let bad_gateway = |why: String| ApiError(StatusCode::BAD_GATEWAY, why);
    let target = Target::parse(advertise, || {
        Err("this relay forwards over http:// only".to_string())
    })
    .map_err(|why| {
        bad_gateway(format!(
            "relay {to:?} holds the camera, but announced {advertise:?}: {why}"
        ))
    })?
    .with_path(path);
    let with_headers = |request: Builder| {
        let request = request.header(FORWARDED, from);
        match headers.get(header::AUTHORIZATION) {
            Some(auth) => request.header(header::AUTHORIZATION, auth),
            None => request,
        }
    };
    let body = body.map(|body| ("application/json", Bytes::from(body)));
    let (parts, bytes) = target
        .post(with_headers, body, FORWARD_TIMEOUT)
        .await
        .map_err(|why| {
            bad_gateway(format!(
                "relay {to:?} holds the camera; forwarding to it failed: {why}"
            ))
        })?;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/json"));
    let mut response = (parts.status, bytes).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response.headers_mut().insert(
        "x-camera-relay",
        HeaderValue::from_str(to).unwrap_or_else(|_| HeaderValue::from_static("?")),
    );
    Ok(response)
}
