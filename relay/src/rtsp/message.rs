//! What the relay does with an RTSP request head on its way to the camera.
//!
//! Media can reach a Watcher only inside the tunnel, that is interleaved in the RTSP
//! TCP connection. A SETUP that asks only for RTP over UDP would be accepted by the
//! camera and then deliver nothing: ffmpeg and GStreamer wait, and hang. So the relay
//! answers such a SETUP itself with `461 Unsupported Transport` — on which both switch
//! to TCP at once — and narrows a SETUP that offers both to its TCP choices.

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
