//! The relay's own HTTP requests: an operator's call forwarded to another relay of the
//! cluster, an event POSTed to a webhook. One request per connection (neither is
//! frequent enough for pooling to pay), HTTP/1.1, over TLS for `https://` URLs.

use std::{sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    http::{header, request::Builder, Method, Uri},
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{rustls::pki_types::ServerName, TlsConnector};

/// Largest answer body read; the rest is an error.
const MAX_ANSWER: usize = 1 << 20;

/// A URL the relay sends requests to, checked once.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// `host:port`, for connecting and for `Host`.
    authority: String,
    host: String,
    /// Path and query.
    path: String,
    /// TLS for `https://`.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    /// Parses `url` (`http://` or `https://`); `tls` is the client configuration for
    /// `https://` URLs.
    pub(crate) fn parse(
        url: &str,
        tls: impl FnOnce() -> Result<rustls::ClientConfig, String>,
    ) -> Result<Target, String> {
        let https = match url.split_once("://") {
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") => false,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => true,
            _ => return Err(format!("{url:?} must start with http:// or https://")),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{url:?} names no host"))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let tls = if https { Some(Arc::new(tls()?)) } else { None };
        Ok(Target {
            authority,
            host,
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            tls,
        })
    }

    /// `http://host:port` (the URL without its path and query, which may hold secrets).
    pub(crate) fn origin(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }

    /// The same server, another path.
    pub(crate) fn with_path(&self, path: &str) -> Target {
        Target {
            path: path.to_string(),
            ..self.clone()
        }
    }

    /// POSTs `body` with the headers `headers` adds, waiting up to `timeout` for the
    /// whole exchange; the answer's parts and body.
    pub(crate) async fn post(
        &self,
        headers: impl FnOnce(Builder) -> Builder,
        body: Option<(&'static str, Bytes)>,
        timeout: Duration,
    ) -> Result<(axum::http::response::Parts, Bytes), String> {
        let request = headers(
            axum::http::Request::builder()
                .method(Method::POST)
                .uri(&self.path)
                .header(header::HOST, &self.authority),
        );
        let request = match body {
            Some((content_type, body)) => request
                .header(header::CONTENT_TYPE, content_type)
                .body(Body::from(body)),
            None => request.body(Body::empty()),
        }
        .map_err(|e| format!("building the request: {e}"))?;
        tokio::time::timeout(timeout, self.exchange(request))
            .await
            .map_err(|_| format!("no answer from {} within {timeout:?}", self.origin()))?
    }

    async fn exchange(
        &self,
        request: axum::http::Request<Body>,
    ) -> Result<(axum::http::response::Parts, Bytes), String> {
        let authority = &self.authority;
        let tcp = TcpStream::connect(authority)
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => send(tcp, request, authority).await,
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("{:?} is not a TLS server name: {e}", self.host))?;
                let stream = TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {authority}: {e}"))?;
                send(stream, request, authority).await
            }
        }
    }
}

async fn send<S>(
    io: S,
    request: axum::http::Request<Body>,
    authority: &str,
) -> Result<(axum::http::response::Parts, Bytes), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake with {authority}: {e}"))?;
    tokio::spawn(connection);
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{authority} did not answer: {e}"))?;
    let (parts, incoming) = answer.into_parts();
    let bytes = axum::body::to_bytes(Body::new(incoming), MAX_ANSWER)
        .await
        .map_err(|e| format!("reading the answer of {authority}: {e}"))?;
    Ok((parts, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_tls() -> Result<rustls::ClientConfig, String> {
        Err("no TLS here".into())
    }

    #[test]
    fn urls_are_split_into_what_a_request_needs() {
        let t = Target::parse("http://vms.example:8080/hooks/relay?key=x", no_tls).unwrap();
        assert_eq!(t.authority, "vms.example:8080");
        assert_eq!(t.path, "/hooks/relay?key=x");
        assert_eq!(t.origin(), "http://vms.example:8080");
        let t = Target::parse("http://[::1]/", no_tls).unwrap();
        assert_eq!(t.authority, "[::1]:80");
        assert_eq!(t.host, "::1");
        assert!(Target::parse("ftp://x/", no_tls)
            .unwrap_err()
            .contains("http://"));
        assert!(Target::parse("https://x/", no_tls)
            .unwrap_err()
            .contains("no TLS"));
        assert!(Target::parse("vms.example/hooks", no_tls).is_err());
    }
}
