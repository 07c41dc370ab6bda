//! Reaching another relay of the cluster: an operator's request about a camera that
//! relay holds (a command, a tunnel restart) is forwarded to it, over HTTP to the
//! address it announced (`cluster.advertise`), with the operator's own credentials;
//! Watchers ride the relay-to-relay links of [`link`].

pub(crate) mod link;

use std::time::Duration;

use axum::{
    body::Body,
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::api::ApiError;

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
    let Some(authority) = advertise
        .strip_prefix("http://")
        .map(|rest| rest.split('/').next().unwrap_or_default())
    else {
        return Err(bad_gateway(format!(
            "relay {to:?} holds the camera, but announced {advertise:?}; this relay forwards \
             over http:// only"
        )));
    };
    let exchange = async {
        let tcp = TcpStream::connect(authority)
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP handshake with {authority}: {e}"))?;
        tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::HOST, authority)
            .header(FORWARDED, from);
        if let Some(auth) = headers.get(header::AUTHORIZATION) {
            request = request.header(header::AUTHORIZATION, auth);
        }
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body)),
            None => request.body(Body::empty()),
        }
        .map_err(|e| format!("building the request: {e}"))?;
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{authority} did not answer: {e}"))?;
        let (parts, incoming) = answer.into_parts();
        let bytes = axum::body::to_bytes(Body::new(incoming), 1 << 20)
            .await
            .map_err(|e| format!("reading the answer of {authority}: {e}"))?;
        Ok::<_, String>((parts, bytes))
    };
    let (parts, bytes) = tokio::time::timeout(FORWARD_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {FORWARD_TIMEOUT:?}"))
        .and_then(|answer| answer)
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
