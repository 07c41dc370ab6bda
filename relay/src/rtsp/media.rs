//! Media health of one Watcher session, read from the RTP headers of the interleaved
//! packets the relay passes anyway: packets, bytes, sequence gaps (loss), interarrival
//! jitter (RFC 3550, 6.4.1), frame rate, keyframes, and how long the Watcher waited for
//! its first keyframe. Only the first bytes of each packet are looked at.

use std::time::{Duration, Instant};

/// Bytes of each packet the meter needs: the RTP header (12 bytes, plus CSRCs and an
/// extension, rare on cameras) and the first bytes of the payload (NAL unit headers).
pub(crate) const PEEK: usize = 64;

/// The video codecs whose keyframes the meter recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    H264,
    H265,
}

/// What one session's media looked like; see the module docs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MediaStats {
    /// RTP packets of the video stream.
    pub packets: u64,
    /// Their bytes, headers included.
    pub bytes: u64,
    /// Packets missing by sequence number.
    pub lost: u64,
    /// Interarrival jitter, milliseconds (RFC 3550 estimate).
    pub jitter_ms: f64,
    /// Video frames (distinct RTP timestamps).
    pub frames: u64,
    /// Frames per second, from the RTP timestamps of the frames.
    pub fps: Option<f64>,
    /// Bits per second, packets' bytes over the span of their RTP timestamps.
    pub bitrate: Option<f64>,
    /// Keyframes (H.264 IDR, H.265 IRAP).
    pub keyframes: u64,
    /// Mean time between keyframes, from their RTP timestamps.
    pub keyframe_interval: Option<Duration>,
    /// From the Watcher's connect to the first keyframe.
    pub first_keyframe_after: Option<Duration>,
    /// Times the media stopped for longer than the stall limit while playing.
    pub stalls: u64,
}

/// Per-RTP-stream state.
#[derive(Debug)]
struct Stream {
    channel: u8,
    codec: Option<Codec>,
    clock_rate: u32,
    packets: u64,
    bytes: u64,
    lost: u64,
    last_seq: Option<u16>,
    /// (arrival in clock units, RTP timestamp) of the previous packet, for jitter.
    last_transit: Option<i64>,
    jitter: f64,
    first_frame_ts: Option<u32>,
    last_frame_ts: Option<u32>,
    /// Frames seen, unwrapped timestamp span in clock units.
    frames: u64,
    frame_span: u64,
    keyframes: u64,
    first_key_ts: Option<u32>,
    key_span: u64,
    last_key_ts: Option<u32>,
    first_keyframe_at: Option<Instant>,
}

/// Accumulates [`MediaStats`] for one session.
#[derive(Debug)]
pub(crate) struct MediaMeter {
    started: Instant,
    /// Codec and clock rate by RTP payload type, from the SDP.
    payload_types: Vec<(u8, Codec, u32)>,
    streams: Vec<Stream>,
    stalls: u64,
}

impl MediaMeter {
    /// A meter for a session that began (the Watcher connected) at `started`.
    pub(crate) fn new(started: Instant) -> Self {
        MediaMeter {
            started,
            payload_types: Vec::new(),
            streams: Vec::new(),
            stalls: 0,
        }
    }

    /// Counts a stall (the session decides when media has stopped too long).
    pub(crate) fn on_stall(&mut self) {
        self.stalls += 1;
    }

    /// Learns payload types from an SDP body (`a=rtpmap:96 H264/90000`).
    pub(crate) fn on_sdp(&mut self, sdp: &[u8]) {
        let Ok(sdp) = std::str::from_utf8(sdp) else {
            return;
        };
        for line in sdp.lines() {
            let Some(map) = line.trim().strip_prefix("a=rtpmap:") else {
                continue;
            };
            let mut parts = map.split([' ', '/']);
            let (Some(pt), Some(name)) = (parts.next(), parts.next()) else {
                continue;
            };
            let clock = parts.next().and_then(|c| c.parse().ok()).unwrap_or(90_000);
            let codec = match name.to_ascii_uppercase().as_str() {
                "H264" => Codec::H264,
                "H265" | "HEVC" => Codec::H265,
                _ => continue,
            };
            if let Ok(pt) = pt.parse() {
                self.payload_types.push((pt, codec, clock));
            }
        }
    }

    /// Accounts one interleaved packet on `channel`, `len` bytes long, of which `peek`
    /// holds the first [`PEEK`] (or all, if shorter). RTCP and non-RTP are skipped.
    pub(crate) fn on_packet(&mut self, channel: u8, peek: &[u8], len: usize, now: Instant) {
        let Some(rtp) = Rtp::parse(peek) else {
            return;
        };
        let known = self
            .payload_types
            .iter()
            .find(|(pt, _, _)| *pt == rtp.payload_type);
        let index = match self.streams.iter().position(|s| s.channel == channel) {
            Some(index) => index,
            None => {
                self.streams.push(Stream::new(
                    channel,
                    known.map(|k| k.1),
                    known.map_or(90_000, |k| k.2),
                ));
                self.streams.len() - 1
            }
        };
        let started = self.started;
        self.streams[index].on_packet(&rtp, len, now, started);
    }

    /// The stats of the video stream: the one with a known video codec and the most
    /// packets, else the busiest.
    pub(crate) fn summary(&self) -> MediaStats {
        let video = self
            .streams
            .iter()
            .filter(|s| s.codec.is_some())
            .max_by_key(|s| s.packets)
            .or_else(|| self.streams.iter().max_by_key(|s| s.packets));
        let mut stats = video.map(|s| s.stats(self.started)).unwrap_or_default();
        stats.stalls = self.stalls;
        stats
    }
}

impl Stream {
    fn new(channel: u8, codec: Option<Codec>, clock_rate: u32) -> Self {
        Stream {
            channel,
            codec,
            clock_rate: clock_rate.max(1),
            packets: 0,
            bytes: 0,
            lost: 0,
            last_seq: None,
            last_transit: None,
            jitter: 0.0,
            first_frame_ts: None,
            last_frame_ts: None,
            frames: 0,
            frame_span: 0,
            keyframes: 0,
            first_key_ts: None,
            key_span: 0,
            last_key_ts: None,
            first_keyframe_at: None,
        }
    }

    fn on_packet(&mut self, rtp: &Rtp<'_>, len: usize, now: Instant, started: Instant) {
        self.packets += 1;
        self.bytes += len as u64;
        if let Some(last) = self.last_seq {
            // A jump forward is loss; anything else (reordering, a restart) is not counted.
            let gap = rtp.seq.wrapping_sub(last);
            if (2..0x8000).contains(&gap) {
                self.lost += u64::from(gap - 1);
            }
        }
        self.last_seq = Some(rtp.seq);

        // RFC 3550 6.4.1: J += (|D| - J) / 16, D from arrival and RTP timestamp, in clock units.
        let arrival =
            (now.duration_since(started).as_secs_f64() * f64::from(self.clock_rate)) as i64;
        let transit = arrival - i64::from(rtp.timestamp);
        if let Some(last) = self.last_transit {
            // Timestamps wrap at 2^32; a difference that large is a wrap, not jitter.
            let d = ((transit - last) as i32).unsigned_abs() as f64;
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.last_transit = Some(transit);

        if self.last_frame_ts != Some(rtp.timestamp) {
            if let Some(last) = self.last_frame_ts {
                self.frame_span += u64::from(rtp.timestamp.wrapping_sub(last));
            }
            self.first_frame_ts.get_or_insert(rtp.timestamp);
            self.last_frame_ts = Some(rtp.timestamp);
            self.frames += 1;
        }
        if self
            .codec
            .is_some_and(|c| is_keyframe_start(c, rtp.payload))
            && self.last_key_ts != Some(rtp.timestamp)
        {
            if let Some(last) = self.last_key_ts {
                self.key_span += u64::from(rtp.timestamp.wrapping_sub(last));
            }
            self.first_key_ts.get_or_insert(rtp.timestamp);
            self.last_key_ts = Some(rtp.timestamp);
            self.keyframes += 1;
            self.first_keyframe_at.get_or_insert(now);
        }
    }

    fn stats(&self, started: Instant) -> MediaStats {
        let clock = f64::from(self.clock_rate);
        let fps = (self.frames > 1 && self.frame_span > 0)
            .then(|| (self.frames - 1) as f64 / (self.frame_span as f64 / clock));
        // Over the stream's own clock, so a busy network or relay does not skew it.
        let bitrate = (self.frame_span > 0)
            .then(|| self.bytes as f64 * 8.0 / (self.frame_span as f64 / clock));
        let keyframe_interval = (self.keyframes > 1).then(|| {
            Duration::from_secs_f64(self.key_span as f64 / clock / (self.keyframes - 1) as f64)
        });
        MediaStats {
            packets: self.packets,
            bytes: self.bytes,
            lost: self.lost,
            jitter_ms: self.jitter / clock * 1000.0,
            frames: self.frames,
            fps,
            bitrate,
            keyframes: self.keyframes,
            keyframe_interval,
            first_keyframe_after: self.first_keyframe_at.map(|at| at.duration_since(started)),
            stalls: 0,
        }
    }
}

/// The RTP fields the meter reads.
#[derive(Debug)]
struct Rtp<'a> {
    payload_type: u8,
    seq: u16,
    timestamp: u32,
    payload: &'a [u8],
}

impl<'a> Rtp<'a> {
    fn parse(packet: &'a [u8]) -> Option<Self> {
        let header = packet.get(..12)?;
        if header[0] >> 6 != 2 {
            return None;
        }
        // RTCP shares the version bits; its packet types 200..=204 sit where RTP's
        // marker and payload type are.
        if (200..=204).contains(&header[1]) {
            return None;
        }
        let csrcs = usize::from(header[0] & 0x0f) * 4;
        let mut start = 12 + csrcs;
        if header[0] & 0x10 != 0 {
            let ext = packet.get(start + 2..start + 4)?;
            start += 4 + usize::from(u16::from_be_bytes([ext[0], ext[1]])) * 4;
        }
        Some(Rtp {
            payload_type: header[1] & 0x7f,
            seq: u16::from_be_bytes([header[2], header[3]]),
            timestamp: u32::from_be_bytes([header[4], header[5], header[6], header[7]]),
            payload: packet.get(start..).unwrap_or(&[]),
        })
    }
}

/// True if `payload` starts a keyframe: H.264 IDR (type 5), alone, first in a STAP-A or
/// at the start of an FU-A; H.265 IRAP (types 16..=21), alone, first in an AP or at the
/// start of an FU.
fn is_keyframe_start(codec: Codec, payload: &[u8]) -> bool {
    match codec {
        Codec::H264 => match payload.first().map(|b| b & 0x1f) {
            Some(5) => true,
            Some(24) => payload.get(3).is_some_and(|b| b & 0x1f == 5),
            Some(28) => payload
                .get(1)
                .is_some_and(|b| b & 0x80 != 0 && b & 0x1f == 5),
            _ => false,
        },
        Codec::H265 => {
            let irap = |t: u8| (16..=21).contains(&t);
            match payload.first().map(|b| (b >> 1) & 0x3f) {
                Some(t) if irap(t) => true,
                Some(48) => payload.get(4).is_some_and(|b| irap((b >> 1) & 0x3f)),
                Some(49) => payload
                    .get(2)
                    .is_some_and(|b| b & 0x80 != 0 && irap(b & 0x3f)),
                _ => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(pt: u8, seq: u16, ts: u32, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, pt, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p[4..8].copy_from_slice(&ts.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    /// 20 fps H.265 for `secs`, keyframe every 40 frames, 3 packets per frame (an FU),
    /// arriving on time; `drop` loses every packet whose seq is a multiple of it.
    fn feed_h265(meter: &mut MediaMeter, start: Instant, secs: u32, drop: Option<u16>) {
        let mut seq = 60_000u16; // wraps during the run
        for frame in 0..20 * secs {
            let ts = 4_000_000_000u32.wrapping_add(frame * 4500); // 90 kHz / 20 fps, wraps too
            let nal = if frame % 40 == 0 { 19 } else { 1 }; // IDR_W_RADL or TRAIL_R
            for part in 0..3u8 {
                let fu_header = if part == 0 { 0x80 | nal } else { nal };
                let packet = rtp(96, seq, ts, &[49 << 1, 1, fu_header, 0xaa]);
                let arrival = start + Duration::from_millis(u64::from(frame) * 50 + 10);
                if drop.is_none_or(|d| seq % d != 0) {
                    meter.on_packet(0, &packet, 1400, arrival);
                }
                seq = seq.wrapping_add(1);
            }
        }
    }

    #[test]
    fn frame_rate_keyframes_bitrate_and_loss_of_a_steady_stream() {
        let start = Instant::now();
        let mut meter = MediaMeter::new(start);
        meter.on_sdp(b"v=0\r\nm=video 0 RTP/AVP 96\r\na=rtpmap:96 H265/90000\r\n");
        feed_h265(&mut meter, start, 10, None);
        meter.on_packet(1, &[0x80, 200, 0, 6, 0, 0, 0, 1, 0, 0, 0, 0], 28, start); // RTCP SR
        let s = meter.summary();
        assert_eq!((s.packets, s.frames, s.keyframes, s.lost), (600, 200, 5, 0));
        assert!((s.fps.unwrap() - 20.0).abs() < 0.01, "{s:?}");
        assert_eq!(s.keyframe_interval, Some(Duration::from_secs(2)));
        assert_eq!(s.first_keyframe_after, Some(Duration::from_millis(10)));
        // 600 packets of 1400 B over 199 frame intervals of 50 ms.
        let expected = 600.0 * 1400.0 * 8.0 / 9.95;
        assert!((s.bitrate.unwrap() / expected - 1.0).abs() < 0.001, "{s:?}");
        assert!(s.jitter_ms < 0.1, "packets on time: {s:?}");
    }

    #[test]
    fn gaps_count_as_loss_and_late_packets_as_jitter() {
        let start = Instant::now();
        let mut meter = MediaMeter::new(start);
        meter.on_sdp(b"a=rtpmap:96 H265/90000\r\n");
        feed_h265(&mut meter, start, 2, Some(7));
        let s = meter.summary();
        assert_eq!(s.packets + s.lost, 120, "{s:?}");
        assert!(s.lost > 10, "{s:?}");

        let mut meter = MediaMeter::new(start);
        for i in 0..100u32 {
            // Every other packet 20 ms late.
            let late = if i % 2 == 0 { 0 } else { 20 };
            let at = start + Duration::from_millis(u64::from(i) * 50 + late);
            meter.on_packet(0, &rtp(96, i as u16, i * 4500, &[1]), 100, at);
        }
        let jitter = meter.summary().jitter_ms;
        assert!((10.0..=25.0).contains(&jitter), "{jitter}");
    }

    #[test]
    fn h264_keyframes_in_every_packetisation() {
        assert!(is_keyframe_start(Codec::H264, &[0x65, 0]));
        assert!(is_keyframe_start(Codec::H264, &[24, 0, 4, 0x65]));
        assert!(is_keyframe_start(Codec::H264, &[28, 0x85]));
        assert!(
            !is_keyframe_start(Codec::H264, &[28, 0x05]),
            "FU-A continuation"
        );
        assert!(!is_keyframe_start(Codec::H264, &[0x41]));
        assert!(is_keyframe_start(Codec::H265, &[19 << 1, 1]));
        assert!(is_keyframe_start(Codec::H265, &[48 << 1, 1, 0, 4, 20 << 1]));
        assert!(!is_keyframe_start(Codec::H265, &[1 << 1, 1]));
    }

    #[test]
    fn garbage_is_not_media() {
        let mut meter = MediaMeter::new(Instant::now());
        meter.on_sdp(&[0xff, 0xfe]);
        for packet in [&[][..], &[0x80], &[0x40; 12], &[0x90; 13]] {
            meter.on_packet(0, packet, packet.len(), Instant::now());
        }
        assert_eq!(meter.summary(), MediaStats::default());
    }
}
