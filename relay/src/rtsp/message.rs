//! What the relay changes in RTSP heads and bodies (docs/rtsp.md says why).
//!
//! Requests, on their way to the camera:
//! Media can reach a Watcher only inside the tunnel, that is interleaved in the RTSP
//! TCP connection. A SETUP that asks only for RTP over UDP would be accepted by the
//! camera and then deliver nothing: ffmpeg and GStreamer wait, and hang. So the relay
//! answers such a SETUP itself with `461 Unsupported Transport` — on which both switch
//! to TCP at once — and narrows a SETUP that offers both to its TCP choices.
//!
//! Responses, on their way to the Watcher: cameras name themselves by their LAN
//! address (`Content-Base: rtsp://192.168.1.108:554/…`, SDP `a=control:rtsp://…`,
//! `Location` on a redirect). A client that follows such a URL leaves the tunnel, so
//! those URLs are rewritten to name the address the Watcher used.
//!
//! On a camera's own port request URIs are never rewritten: Digest authentication
//! hashes the URI the client sent. On the shared port (`/<agent-id>/…` picks the
//! camera) the prefix has to go before the camera sees the path, and comes back on
//! every URL the camera returns; the `Authorization` header is left alone, so a camera
//! that hashes the header's `uri` (gst-rtsp-server, live555) still accepts it.

/// Largest SDP body the relay holds back to rewrite; a larger one passes unchanged.
pub(crate) const MAX_SDP: usize = 64 * 1024;

/// Response headers that are a URL naming the camera.
const URL_HEADERS: [&str; 3] = ["content-base", "content-location", "location"];

/// The relay's decision about one request head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Send it to the camera as it is.
    Forward,
    /// Send this head instead (the Transport header narrowed to TCP, the shared port's
    /// prefix taken off the URI).
    Rewrite(Vec<u8>),
    /// Do not send it; answer the Watcher with this response.
    Answer(Vec<u8>),
}

/// Decides what to do with a request head (the scanner guarantees start line, headers
/// and blank line; anything it cannot read is forwarded untouched). On the shared port
/// (`prefix` is `/<agent-id>`) every request must be under the prefix, so a URL the
/// relay failed to rename can never reach the camera by accident.
pub(crate) fn on_request(head: &[u8], prefix: &str) -> Decision {
    if prefix.is_empty() || request_uri(head) == Some("*") {
        return check_transport(head);
    }
    match strip_prefix(head, prefix) {
        None => Decision::Answer(response(head, 404, &format!("Not Under {prefix}"))),
        Some(stripped) => match check_transport(&stripped) {
            Decision::Forward => Decision::Rewrite(stripped),
            decided => decided,
        },
    }
}

/// A SETUP asking for UDP only is answered 461; one offering TCP too is narrowed to it.
fn check_transport(head: &[u8]) -> Decision {
    let Ok(text) = std::str::from_utf8(head) else {
        return Decision::Forward;
    };
    if !text.starts_with("SETUP ") {
        return Decision::Forward;
    }
    let mut lines: Vec<&str> = text.trim_end_matches("\r\n").split("\r\n").collect();
    let Some(at) = lines
        .iter()
        .position(|l| header_name(l).eq_ignore_ascii_case("transport"))
    else {
        return Decision::Forward;
    };
    let value = header_value(lines[at]);
    let specs: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let tcp: Vec<&str> = specs.iter().copied().filter(|s| is_tcp(s)).collect();
    if tcp.len() == specs.len() {
        return Decision::Forward;
    }
    if tcp.is_empty() {
        return Decision::Answer(response(head, 461, "Unsupported Transport"));
    }
    let narrowed = format!("Transport: {}", tcp.join(","));
    lines[at] = &narrowed;
    let mut rewritten = lines.join("\r\n");
    rewritten.push_str("\r\n\r\n");
    Decision::Rewrite(rewritten.into_bytes())
}

/// The relay's own response to the request `head`: status line, its `CSeq`, no body.
pub(crate) fn response(head: &[u8], code: u16, reason: &str) -> Vec<u8> {
    response_with(head, code, reason, &[])
}

/// [`response`] with `headers` added.
pub(crate) fn response_with(
    head: &[u8],
    code: u16,
    reason: &str,
    headers: &[(&str, &str)],
) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let cseq = text
        .split("\r\n")
        .skip(1)
        .find(|l| header_name(l).eq_ignore_ascii_case("cseq"))
        .map(header_value)
        .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or("0");
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    format!(
        "RTSP/1.0 {code} {reason}\r\nCSeq: {cseq}\r\nServer: camera-relay\r\n{extra}Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// The method of a request head.
pub(crate) fn method_of(head: &[u8]) -> Option<&str> {
    let line = head.split(|&b| b == b'\r').next()?;
    std::str::from_utf8(line).ok()?.split(' ').next()
}

/// A request head's URI with its host and port replaced by `authority`: where a
/// Watcher is sent when another relay serves its camera. The path, query and any
/// credentials stay as they were.
pub(crate) fn redirected_uri(head: &[u8], authority: &str) -> Option<String> {
    let uri = request_uri(head)?;
    let end = path_start(uri)?;
    let host_start = uri[..end].rfind('@').map_or("rtsp://".len(), |at| at + 1);
    Some(format!("{}{authority}{}", &uri[..host_start], &uri[end..]))
}

/// The request URI of a request head.
fn request_uri(head: &[u8]) -> Option<&str> {
    let line = head.split(|&b| b == b'\r').next()?;
    std::str::from_utf8(line).ok()?.split(' ').nth(1)
}

/// The method and path (with query; no scheme, host or credentials) of a request
/// head's start line, for listings.
pub(crate) fn request_line(head: &[u8]) -> Option<(String, String)> {
    let line = head.split(|&b| b == b'\r').next()?;
    let method = std::str::from_utf8(line).ok()?.split(' ').next()?;
    let uri = request_uri(head)?;
    let path = match path_start(uri) {
        Some(at) => &uri[at..],
        None => uri,
    };
    let path = if path.is_empty() { "/" } else { path };
    Some((method.to_string(), path.to_string()))
}

/// The path of an absolute `rtsp://` URI, with its query: where the authority ends.
fn path_start(uri: &str) -> Option<usize> {
    let rest = uri.strip_prefix("rtsp://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some("rtsp://".len() + end)
}

/// The first path segment of a request's absolute URI: on the shared port, the id of
/// the camera the Watcher wants. `None` for `*` or a URI without a path.
pub(crate) fn camera_of(head: &[u8]) -> Option<&str> {
    let uri = request_uri(head)?;
    let path = uri[path_start(uri)?..].strip_prefix('/')?;
    let segment = path.split(['/', '?', '#']).next()?;
    (!segment.is_empty()).then_some(segment)
}

/// The request head with `prefix` (`/<agent-id>`) taken off the front of its URI's
/// path, as the camera knows it; `None` if the URI does not start with it.
pub(crate) fn strip_prefix(head: &[u8], prefix: &str) -> Option<Vec<u8>> {
    let uri = request_uri(head)?;
    let at = path_start(uri)?;
    let rest = uri[at..].strip_prefix(prefix)?;
    if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
        return None;
    }
    let path = if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    };
    let uri_at = head.iter().position(|&b| b == b' ')? + 1;
    let mut out = Vec::with_capacity(head.len());
    out.extend_from_slice(&head[..uri_at]);
    out.extend_from_slice(&uri.as_bytes()[..at]);
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(&head[uri_at + uri.len()..]);
    Some(out)
}

/// The authority (`host:port`) a request's absolute `rtsp://` URI names, without any
/// user info: the address the Watcher used to reach the camera.
pub(crate) fn request_authority(head: &[u8]) -> Option<String> {
    let uri = request_uri(head)?;
    let authority = &uri["rtsp://".len()..path_start(uri)?];
    let authority = authority.rsplit('@').next()?;
    (!authority.is_empty()).then(|| authority.to_string())
}

/// True for a response whose body is an SDP small enough to hold back and rewrite.
pub(crate) fn has_sdp_body(head: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(head) else {
        return false;
    };
    let mut sdp = false;
    let mut length = 0;
    for line in text.split("\r\n").skip(1) {
        match header_name(line).to_ascii_lowercase().as_str() {
            "content-type" => sdp = header_value(line).eq_ignore_ascii_case("application/sdp"),
            "content-length" => length = header_value(line).parse().unwrap_or(0),
            _ => {}
        }
    }
    sdp && (1..=MAX_SDP).contains(&length)
}

/// Where the Watcher reached the camera: every URL the camera returns is renamed to it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WatcherView<'a> {
    /// The `host:port` the Watcher dialled.
    pub(crate) authority: &'a str,
    /// `/<agent-id>` on the shared port, empty on the camera's own port.
    pub(crate) prefix: &'a str,
}

/// A response head (and, for an SDP response, its body) with every camera URL renamed
/// to the Watcher's `view`, and `Content-Length` fixed to the new body.
pub(crate) fn rewrite_response(
    head: &[u8],
    body: &[u8],
    view: WatcherView<'_>,
) -> (Vec<u8>, Vec<u8>) {
    let (Ok(head_text), Ok(body_text)) = (std::str::from_utf8(head), std::str::from_utf8(body))
    else {
        return (head.to_vec(), body.to_vec());
    };
    let body: String = body_text
        .split_inclusive('\n')
        .map(|line| match line.strip_prefix("a=control:") {
            Some(url) => format!("a=control:{}", rename(url, view)),
            None => line.to_string(),
        })
        .collect();
    let mut lines: Vec<String> = head_text
        .trim_end_matches("\r\n")
        .split("\r\n")
        .map(|line| {
            let name = header_name(line).to_ascii_lowercase();
            if URL_HEADERS.contains(&name.as_str()) {
                format!(
                    "{}: {}",
                    header_name(line),
                    rename(header_value(line), view)
                )
            } else if name == "rtp-info" {
                // `url=rtsp://…;seq=…;rtptime=…` per stream, comma separated.
                let renamed: Vec<String> = header_value(line)
                    .split(',')
                    .map(|stream| {
                        stream
                            .split(';')
                            .map(|param| match param.trim_start().strip_prefix("url=") {
                                Some(url) => format!("url={}", rename(url, view)),
                                None => param.to_string(),
                            })
                            .collect::<Vec<_>>()
                            .join(";")
                    })
                    .collect();
                format!("{}: {}", header_name(line), renamed.join(","))
            } else if name == "content-length" && !body.is_empty() {
                format!("{}: {}", header_name(line), body.len())
            } else {
                line.to_string()
            }
        })
        .collect();
    lines.push(String::new());
    lines.push(String::new());
    (lines.join("\r\n").into_bytes(), body.into_bytes())
}

/// An absolute `rtsp://` URL as the Watcher must see it: its authority replaced and
/// the view's prefix put in front of its path. Relative URLs resolve against a renamed
/// base, so they stay as they are.
fn rename(url: &str, view: WatcherView<'_>) -> String {
    match url.strip_prefix("rtsp://") {
        Some(rest) => {
            let end = rest.find(['/', '?', '#', '\r', '\n']).unwrap_or(rest.len());
            format!("rtsp://{}{}{}", view.authority, view.prefix, &rest[end..])
        }
        None => url.to_string(),
    }
}

fn header_name(line: &str) -> &str {
    line.split_once(':').map_or("", |(name, _)| name.trim())
}

fn header_value(line: &str) -> &str {
    line.split_once(':').map_or("", |(_, value)| value.trim())
}

/// `RTP/AVP/TCP;…` (or AVPF, SAVP…): interleaved in the RTSP connection. `RTP/AVP` alone
/// means UDP.
fn is_tcp(spec: &str) -> bool {
    let protocol = spec.split(';').next().unwrap_or("").trim();
    protocol.to_ascii_uppercase().ends_with("/TCP")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(transport: &str) -> Vec<u8> {
        format!("SETUP rtsp://h/cam/realmonitor/trackID=0 RTSP/1.0\r\nCSeq: 3\r\nTransport: {transport}\r\nUser-Agent: t\r\n\r\n")
            .into_bytes()
    }

    fn view<'a>(authority: &'a str, prefix: &'a str) -> WatcherView<'a> {
        WatcherView { authority, prefix }
    }

    #[test]
    fn a_redirect_keeps_path_query_and_credentials() {
        let head = b"DESCRIBE rtsp://admin:pw@relay-a:8553/cam-1/cam/realmonitor?channel=1&subtype=0 RTSP/1.0\r\nCSeq: 2\r\n\r\n";
        assert_eq!(method_of(head), Some("DESCRIBE"));
        assert_eq!(
            redirected_uri(head, "relay-b.example:8553").as_deref(),
            Some("rtsp://admin:pw@relay-b.example:8553/cam-1/cam/realmonitor?channel=1&subtype=0")
        );
        let plain = b"DESCRIBE rtsp://10.0.0.1:8553/cam-1 RTSP/1.0\r\nCSeq: 2\r\n\r\n";
        assert_eq!(
            redirected_uri(plain, "[2001:db8::2]:8553").as_deref(),
            Some("rtsp://[2001:db8::2]:8553/cam-1")
        );
        assert_eq!(redirected_uri(b"OPTIONS * RTSP/1.0\r\n\r\n", "x:1"), None);
        let answer = response_with(
            head,
            302,
            "Moved Temporarily",
            &[("Location", "rtsp://b/x")],
        );
        assert_eq!(
            String::from_utf8(answer).unwrap(),
            "RTSP/1.0 302 Moved Temporarily\r\nCSeq: 2\r\nServer: camera-relay\r\nLocation: rtsp://b/x\r\nContent-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn udp_only_setups_are_answered_461_with_their_cseq() {
        for transport in [
            "RTP/AVP/UDP;unicast;client_port=5000-5001",
            "RTP/AVP;unicast;client_port=5000-5001",
            "RTP/AVP;multicast;port=5000-5001",
            "RTP/AVP;unicast;client_port=5000-5001,RTP/AVP;multicast",
        ] {
            let Decision::Answer(response) = on_request(&setup(transport), "") else {
                panic!("{transport}: not answered");
            };
            let response = String::from_utf8(response).unwrap();
            assert!(
                response.starts_with("RTSP/1.0 461 Unsupported Transport\r\n"),
                "{response}"
            );
            assert!(
                response.contains("\r\nCSeq: 3\r\n") && response.ends_with("\r\n\r\n"),
                "{response}"
            );
        }
    }

    #[test]
    fn listings_get_method_and_path_without_credentials() {
        let head = b"DESCRIBE rtsp://admin:pw@relay:8554/cam/realmonitor?channel=1 RTSP/1.0\r\nCSeq: 1\r\n\r\n";
        assert_eq!(
            request_line(head),
            Some(("DESCRIBE".into(), "/cam/realmonitor?channel=1".into()))
        );
        assert_eq!(
            request_line(b"OPTIONS * RTSP/1.0\r\nCSeq: 1\r\n\r\n"),
            Some(("OPTIONS".into(), "*".into()))
        );
    }

    #[test]
    fn the_watchers_address_comes_from_absolute_request_uris() {
        let head = |line: &str| format!("{line}\r\nCSeq: 1\r\n\r\n").into_bytes();
        assert_eq!(
            request_authority(&head(
                "DESCRIBE rtsp://127.0.0.1:8554/cam/realmonitor?channel=1&subtype=0 RTSP/1.0"
            )),
            Some("127.0.0.1:8554".into())
        );
        assert_eq!(
            request_authority(&head("OPTIONS rtsp://admin:pw@relay:8554 RTSP/1.0")),
            Some("relay:8554".into())
        );
        assert_eq!(request_authority(&head("OPTIONS * RTSP/1.0")), None);
    }

    #[test]
    fn camera_urls_in_headers_and_sdp_are_renamed_and_lengths_fixed() {
        let sdp = "v=0\r\no=- 1 1 IN IP4 192.168.1.108\r\ns=Media\r\na=control:*\r\n\
                   m=video 0 RTP/AVP 96\r\na=control:rtsp://192.168.1.108:554/cam/realmonitor/trackID=0\r\n";
        let head = format!(
            "RTSP/1.0 200 OK\r\nCSeq: 3\r\nContent-Base: rtsp://192.168.1.108:554/cam/realmonitor/\r\n\
             Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n",
            sdp.len()
        );
        assert!(has_sdp_body(head.as_bytes()));
        let (new_head, new_body) =
            rewrite_response(head.as_bytes(), sdp.as_bytes(), view("127.0.0.1:8554", ""));
        let (new_head, new_body) = (
            String::from_utf8(new_head).unwrap(),
            String::from_utf8(new_body).unwrap(),
        );
        assert!(
            new_head.contains("\r\nContent-Base: rtsp://127.0.0.1:8554/cam/realmonitor/\r\n"),
            "{new_head}"
        );
        assert!(
            new_body.contains("a=control:rtsp://127.0.0.1:8554/cam/realmonitor/trackID=0\r\n"),
            "{new_body}"
        );
        assert!(
            new_body.contains("a=control:*\r\n") && new_body.contains("IN IP4 192.168.1.108"),
            "only URLs change"
        );
        assert!(
            new_head.contains(&format!("Content-Length: {}\r\n", new_body.len())),
            "{new_head}"
        );
        assert!(new_head.ends_with("\r\n\r\n"));

        let redirect = b"RTSP/1.0 302 Moved\r\nCSeq: 4\r\nLocation: rtsp://10.0.0.7/other\r\n\r\n";
        assert!(!has_sdp_body(redirect));
        let (new_head, _) = rewrite_response(redirect, b"", view("relay:8554", ""));
        assert_eq!(
            new_head,
            b"RTSP/1.0 302 Moved\r\nCSeq: 4\r\nLocation: rtsp://relay:8554/other\r\n\r\n"
        );
    }

    #[test]
    fn mixed_offers_are_narrowed_to_tcp_and_tcp_passes_untouched() {
        let head =
            setup("RTP/AVP;unicast;client_port=5000-5001, RTP/AVP/TCP;unicast;interleaved=0-1");
        let Decision::Rewrite(new) = on_request(&head, "") else {
            panic!("not narrowed")
        };
        let new = String::from_utf8(new).unwrap();
        assert!(
            new.contains("\r\nTransport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n"),
            "{new}"
        );
        assert!(new.starts_with("SETUP rtsp://h/cam/realmonitor/trackID=0 RTSP/1.0\r\nCSeq: 3\r\n"));
        assert!(new.ends_with("User-Agent: t\r\n\r\n"));

        assert_eq!(
            on_request(&setup("RTP/AVP/TCP;unicast;interleaved=0-1"), ""),
            Decision::Forward
        );
        assert_eq!(
            on_request(b"DESCRIBE rtsp://h/x RTSP/1.0\r\nCSeq: 2\r\n\r\n", ""),
            Decision::Forward
        );
        assert_eq!(
            on_request(b"SETUP rtsp://h/x RTSP/1.0\r\nCSeq: 2\r\n\r\n", ""),
            Decision::Forward
        );
    }

    #[test]
    fn the_shared_port_reads_the_camera_from_the_first_path_segment() {
        let head = |uri: &str| format!("DESCRIBE {uri} RTSP/1.0\r\nCSeq: 2\r\n\r\n").into_bytes();
        let cases = [
            (
                "rtsp://127.0.0.1:8553/cam-1/cam/realmonitor?channel=1&subtype=0",
                Some("cam-1"),
            ),
            ("rtsp://u:p@relay:8553/cam-2", Some("cam-2")),
            ("rtsp://relay:8553/cam-3?x=1", Some("cam-3")),
            ("rtsp://relay:8553/", None),
            ("rtsp://relay:8553", None),
            ("*", None),
        ];
        for (uri, camera) in cases {
            assert_eq!(camera_of(&head(uri)), camera, "{uri}");
        }
    }

    #[test]
    fn the_prefix_goes_before_the_camera_and_comes_back_on_its_urls() {
        let head = b"DESCRIBE rtsp://127.0.0.1:8553/cam-1/cam/realmonitor?channel=1&subtype=0 RTSP/1.0\r\n\
                     CSeq: 2\r\nAuthorization: Digest uri=\"rtsp://127.0.0.1:8553/cam-1/cam/realmonitor?channel=1&subtype=0\"\r\n\r\n";
        let stripped = String::from_utf8(strip_prefix(head, "/cam-1").unwrap()).unwrap();
        assert!(
            stripped.starts_with(
                "DESCRIBE rtsp://127.0.0.1:8553/cam/realmonitor?channel=1&subtype=0 RTSP/1.0\r\nCSeq: 2\r\n"
            ),
            "{stripped}"
        );
        assert!(
            stripped.contains("uri=\"rtsp://127.0.0.1:8553/cam-1/cam/"),
            "Authorization is left for the camera to check: {stripped}"
        );
        let bare = b"OPTIONS rtsp://relay:8553/cam-1 RTSP/1.0\r\nCSeq: 1\r\n\r\n";
        assert_eq!(
            strip_prefix(bare, "/cam-1").unwrap(),
            b"OPTIONS rtsp://relay:8553/ RTSP/1.0\r\nCSeq: 1\r\n\r\n"
        );
        let other = b"OPTIONS rtsp://relay:8553/cam-10/x RTSP/1.0\r\nCSeq: 1\r\n\r\n";
        assert_eq!(
            strip_prefix(other, "/cam-1"),
            None,
            "a longer id is another camera"
        );
        assert_eq!(
            strip_prefix(b"OPTIONS * RTSP/1.0\r\nCSeq: 1\r\n\r\n", "/cam-1"),
            None
        );

        let sdp = "v=0\r\na=control:rtsp://192.168.1.108:554/cam/realmonitor/trackID=0\r\na=control:trackID=1\r\n";
        let response = format!(
            "RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Base: rtsp://192.168.1.108:554/cam/realmonitor/\r\n\
             Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n",
            sdp.len()
        );
        let (head, body) = rewrite_response(
            response.as_bytes(),
            sdp.as_bytes(),
            view("127.0.0.1:8553", "/cam-1"),
        );
        let (head, body) = (
            String::from_utf8(head).unwrap(),
            String::from_utf8(body).unwrap(),
        );
        assert!(
            head.contains("Content-Base: rtsp://127.0.0.1:8553/cam-1/cam/realmonitor/\r\n"),
            "{head}"
        );
        assert!(
            body.contains("a=control:rtsp://127.0.0.1:8553/cam-1/cam/realmonitor/trackID=0\r\n")
                && body.contains("a=control:trackID=1\r\n"),
            "{body}"
        );
    }

    #[test]
    fn on_the_shared_port_every_request_must_be_under_the_cameras_prefix() {
        let request = |uri: &str, transport: &str| {
            format!("SETUP {uri} RTSP/1.0\r\nCSeq: 4\r\nTransport: {transport}\r\n\r\n")
                .into_bytes()
        };
        let tcp = "RTP/AVP/TCP;unicast;interleaved=0-1";
        let Decision::Rewrite(head) = on_request(
            &request("rtsp://r:8553/cam-1/cam/x/trackID=0", tcp),
            "/cam-1",
        ) else {
            panic!("not stripped");
        };
        assert!(head.starts_with(b"SETUP rtsp://r:8553/cam/x/trackID=0 RTSP/1.0\r\n"));
        // Narrowing and 461 work on the stripped head as on a camera's own port.
        let mixed = format!("RTP/AVP;unicast;client_port=1-2,{tcp}");
        let Decision::Rewrite(head) =
            on_request(&request("rtsp://r:8553/cam-1/cam/x", &mixed), "/cam-1")
        else {
            panic!("not narrowed");
        };
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.starts_with("SETUP rtsp://r:8553/cam/x RTSP/1.0")
                && head.contains(&format!("Transport: {tcp}\r\n")),
            "{head}"
        );
        assert!(matches!(
            on_request(&request("rtsp://r:8553/cam-1/cam/x", "RTP/AVP;unicast;client_port=1-2"), "/cam-1"),
            Decision::Answer(a) if a.starts_with(b"RTSP/1.0 461 ")
        ));
        // A URL the relay did not rename (or another camera's) never reaches the camera.
        let Decision::Answer(answer) = on_request(&request("rtsp://r:8553/cam/x", tcp), "/cam-1")
        else {
            panic!("forwarded a request outside the prefix");
        };
        assert!(answer.starts_with(b"RTSP/1.0 404 Not Under /cam-1\r\nCSeq: 4\r\n"));
        assert_eq!(
            on_request(b"OPTIONS * RTSP/1.0\r\nCSeq: 1\r\n\r\n", "/cam-1"),
            Decision::Forward
        );
    }

    #[test]
    fn rtp_info_urls_are_renamed_too() {
        let play = b"RTSP/1.0 200 OK\r\nCSeq: 5\r\nRTP-Info: url=rtsp://192.168.1.108:554/cam/trackID=0;seq=1;rtptime=2,url=rtsp://192.168.1.108:554/cam/trackID=1;seq=3\r\n\r\n";
        let (head, _) = rewrite_response(play, b"", view("127.0.0.1:8553", "/cam-1"));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "RTSP/1.0 200 OK\r\nCSeq: 5\r\nRTP-Info: url=rtsp://127.0.0.1:8553/cam-1/cam/trackID=0;seq=1;rtptime=2,url=rtsp://127.0.0.1:8553/cam-1/cam/trackID=1;seq=3\r\n\r\n"
        );
    }

    #[test]
    fn relay_answers_carry_the_cseq_and_nothing_else_of_the_request() {
        let answer = response(
            b"DESCRIBE rtsp://r/x RTSP/1.0\r\nCSeq: 7\r\n\r\n",
            404,
            "Unknown Camera x",
        );
        assert_eq!(
            answer,
            b"RTSP/1.0 404 Unknown Camera x\r\nCSeq: 7\r\nServer: camera-relay\r\nContent-Length: 0\r\n\r\n"
        );
        let odd = response(
            b"DESCRIBE rtsp://r/x RTSP/1.0\r\nCSeq: 7\r\nX: 1\r\n\r\n",
            503,
            "Camera Offline",
        );
        assert!(String::from_utf8(odd).unwrap().contains("\r\nCSeq: 7\r\n"));
        let forged = response(
            b"DESCRIBE rtsp://r/x RTSP/1.0\r\nCSeq: 7\rX-Injected: 1\r\n\r\n",
            404,
            "Unknown Camera",
        );
        assert!(String::from_utf8(forged)
            .unwrap()
            .contains("\r\nCSeq: 0\r\n"));
    }
}
