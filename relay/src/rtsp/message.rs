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
//! those URLs are rewritten to name the address the Watcher used. Request URIs are never
//! rewritten: Digest authentication hashes the URI the client sent, and the camera
//! checks it against the one it receives.

/// Largest SDP body the relay holds back to rewrite; a larger one passes unchanged.
pub(crate) const MAX_SDP: usize = 64 * 1024;

/// Response headers whose URLs name the camera.
const URL_HEADERS: [&str; 3] = ["content-base", "content-location", "location"];

/// The relay's decision about one request head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Send it to the camera as it is.
    Forward,
    /// Send this head instead (the Transport header narrowed to TCP).
    Rewrite(Vec<u8>),
    /// Do not send it; answer the Watcher with this response.
    Answer(Vec<u8>),
}

/// Decides what to do with a request head (the scanner guarantees start line, headers
/// and blank line; anything it cannot read is forwarded untouched).
pub(crate) fn on_request(head: &[u8]) -> Decision {
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
        let cseq = lines
            .iter()
            .find(|l| header_name(l).eq_ignore_ascii_case("cseq"))
            .map(|l| header_value(l))
            .unwrap_or("0");
        return Decision::Answer(
            format!(
                "RTSP/1.0 461 Unsupported Transport\r\nCSeq: {cseq}\r\nServer: camera-relay\r\n\
                 Content-Length: 0\r\n\r\n"
            )
            .into_bytes(),
        );
    }
    let narrowed = format!("Transport: {}", tcp.join(","));
    lines[at] = &narrowed;
    let mut rewritten = lines.join("\r\n");
    rewritten.push_str("\r\n\r\n");
    Decision::Rewrite(rewritten.into_bytes())
}

/// The authority (`host:port`) a request's absolute `rtsp://` URI names, without any
/// user info: the address the Watcher used to reach the camera.
pub(crate) fn request_authority(head: &[u8]) -> Option<String> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let uri = line.split(' ').nth(1)?;
    let rest = uri.strip_prefix("rtsp://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
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

/// A response head (and, for an SDP response, its body) with every camera URL made to
/// name `authority`, and `Content-Length` fixed to the new body.
pub(crate) fn rewrite_response(head: &[u8], body: &[u8], authority: &str) -> (Vec<u8>, Vec<u8>) {
    let (Ok(head_text), Ok(body_text)) = (std::str::from_utf8(head), std::str::from_utf8(body))
    else {
        return (head.to_vec(), body.to_vec());
    };
    let body: String = body_text
        .split_inclusive('\n')
        .map(|line| match line.strip_prefix("a=control:") {
            Some(url) => format!("a=control:{}", rename_authority(url, authority)),
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
                    rename_authority(header_value(line), authority)
                )
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

/// `url` with the authority of its `rtsp://` scheme replaced by `authority`.
fn rename_authority(url: &str, authority: &str) -> String {
    match url.strip_prefix("rtsp://") {
        Some(rest) => {
            let end = rest.find(['/', '?', '#', '\r', '\n']).unwrap_or(rest.len());
            format!("rtsp://{authority}{}", &rest[end..])
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

    #[test]
    fn udp_only_setups_are_answered_461_with_their_cseq() {
        for transport in [
            "RTP/AVP/UDP;unicast;client_port=5000-5001",
            "RTP/AVP;unicast;client_port=5000-5001",
            "RTP/AVP;multicast;port=5000-5001",
            "RTP/AVP;unicast;client_port=5000-5001,RTP/AVP;multicast",
        ] {
            let Decision::Answer(response) = on_request(&setup(transport)) else {
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
            rewrite_response(head.as_bytes(), sdp.as_bytes(), "127.0.0.1:8554");
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
        let (new_head, _) = rewrite_response(redirect, b"", "relay:8554");
        assert_eq!(
            new_head,
            b"RTSP/1.0 302 Moved\r\nCSeq: 4\r\nLocation: rtsp://relay:8554/other\r\n\r\n"
        );
    }

    #[test]
    fn mixed_offers_are_narrowed_to_tcp_and_tcp_passes_untouched() {
        let head =
            setup("RTP/AVP;unicast;client_port=5000-5001, RTP/AVP/TCP;unicast;interleaved=0-1");
        let Decision::Rewrite(new) = on_request(&head) else {
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
            on_request(&setup("RTP/AVP/TCP;unicast;interleaved=0-1")),
            Decision::Forward
        );
        assert_eq!(
            on_request(b"DESCRIBE rtsp://h/x RTSP/1.0\r\nCSeq: 2\r\n\r\n"),
            Decision::Forward
        );
        assert_eq!(
            on_request(b"SETUP rtsp://h/x RTSP/1.0\r\nCSeq: 2\r\n\r\n"),
            Decision::Forward
        );
    }
}
