//! Finds the message boundaries in one direction of an RTSP/1.0 session without holding
//! back media: message heads are collected whole (they are small, and the relay may
//! answer or rewrite them), while bodies and `$`-framed interleaved data pass through
//! as they arrive.

/// Largest message head the scanner collects; anything longer is not RTSP we know.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// What the scanner found in the bytes it was fed, in order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event<'a> {
    /// A complete message head: start line, headers and the blank line.
    Head(Vec<u8>),
    /// Bytes to pass on untouched: bodies, interleaved frames, or a non-RTSP stream.
    Pass(&'a [u8]),
    /// Bytes collected as a head that turned out not to be RTSP; pass them on untouched.
    NotRtsp(Vec<u8>),
    /// An interleaved frame of `len` payload bytes on `channel` starts; its header bytes
    /// were just passed and its payload follows.
    Frame {
        /// The interleaved channel.
        channel: u8,
        /// Payload length.
        len: usize,
    },
    /// A message (or interleaved frame) ended here: a place where the relay may insert
    /// a message of its own.
    End,
}

#[derive(Debug)]
enum State {
    /// Between messages (or at the very start).
    Boundary,
    /// Inside a message head; the bytes so far.
    Head(Vec<u8>),
    /// Inside an interleaved frame's 4-byte header; the bytes so far.
    FrameHeader(Vec<u8>),
    /// Inside a body or frame payload: this many bytes still to pass.
    Payload(usize),
    /// Not RTSP (or no longer understood): everything passes through.
    Raw,
}

/// The scanner of one direction.
#[derive(Debug)]
pub(crate) struct Scanner {
    state: State,
    /// True until the first byte was seen: a stream that does not start like RTSP is
    /// passed through raw from then on.
    at_start: bool,
    /// Events found but not yet handed out (those that follow a `Pass` or a `Head` at
    /// the same place), oldest first.
    queued: [Option<Event<'static>>; 2],
}

/// The events in one read, in order, found as they are taken (no list is built).
#[derive(Debug)]
#[must_use = "the bytes are scanned only as the events are taken"]
pub(crate) struct Events<'s, 'a> {
    scanner: &'s mut Scanner,
    input: &'a [u8],
}

impl<'a> Iterator for Events<'_, 'a> {
    type Item = Event<'a>;

    fn next(&mut self) -> Option<Event<'a>> {
        self.scanner.next_event(&mut self.input)
    }
}

impl Scanner {
    pub(crate) fn new() -> Self {
        Scanner {
            state: State::Boundary,
            at_start: true,
            queued: [None, None],
        }
    }

    /// True between two messages, where the relay may insert a message of its own.
    pub(crate) fn at_boundary(&self) -> bool {
        matches!(self.state, State::Boundary)
    }

    /// True once the stream was found not to be RTSP.
    #[cfg(test)]
    pub(crate) fn is_raw(&self) -> bool {
        matches!(self.state, State::Raw)
    }

    /// At the end of the stream: the bytes of a head that never completed, which must
    /// still be delivered.
    pub(crate) fn finish(&mut self) -> Option<Vec<u8>> {
        match std::mem::replace(&mut self.state, State::Raw) {
            State::Head(head) if !head.is_empty() => Some(head),
            _ => None,
        }
    }

    /// Feeds the next bytes of the stream: what they contain, in order. Every event
    /// must be taken, or the rest of `input` is not scanned.
    pub(crate) fn feed<'s, 'a>(&'s mut self, input: &'a [u8]) -> Events<'s, 'a> {
        Events {
            scanner: self,
            input,
        }
    }

    /// Queues `event` to be handed out after the one at hand.
    fn then(&mut self, event: Event<'static>) {
        let free = self.queued.iter_mut().find(|slot| slot.is_none());
        *free.expect("at most two events follow one") = Some(event);
    }

    /// The next event in `input`, which loses the bytes the event covers.
    fn next_event<'a>(&mut self, input: &mut &'a [u8]) -> Option<Event<'a>> {
        if let Some(event) = self.queued[0].take() {
            self.queued.swap(0, 1);
            return Some(event);
        }
        while !input.is_empty() {
            match &mut self.state {
                State::Raw => return Some(Event::Pass(std::mem::take(input))),
                State::Boundary => {
                    let first = input[0];
                    let starts_rtsp = first == b'$' || first.is_ascii_uppercase();
                    if !starts_rtsp || (self.at_start && first == b'$') {
                        // Interleaved data cannot open a session; anything else is not ours.
                        self.state = State::Raw;
                    } else if first == b'$' {
                        self.state = State::FrameHeader(Vec::with_capacity(4));
                    } else {
                        self.state = State::Head(Vec::with_capacity(256));
                    }
                    self.at_start = false;
                }
                State::FrameHeader(header) => {
                    let take = (4 - header.len()).min(input.len());
                    header.extend_from_slice(&input[..take]);
                    let (passed, rest) = input.split_at(take);
                    *input = rest;
                    if header.len() < 4 {
                        return Some(Event::Pass(passed));
                    }
                    let (channel, len) = (header[1], u16::from_be_bytes([header[2], header[3]]));
                    let len = usize::from(len);
                    self.then(Event::Frame { channel, len });
                    if len == 0 {
                        self.state = State::Boundary;
                        self.then(Event::End);
                    } else {
                        self.state = State::Payload(len);
                    }
                    return Some(Event::Pass(passed));
                }
                State::Payload(remaining) => {
                    let take = (*remaining).min(input.len());
                    let (passed, rest) = input.split_at(take);
                    *input = rest;
                    *remaining -= take;
                    if *remaining > 0 {
                        return Some(Event::Pass(passed));
                    }
                    self.state = State::Boundary;
                    self.then(Event::End);
                    return Some(Event::Pass(passed));
                }
                State::Head(head) => {
                    // Look for the blank line, starting a little before the new bytes in
                    // case it straddles two reads.
                    let from = head.len().saturating_sub(3);
                    head.extend_from_slice(input);
                    match find(&head[from..], b"\r\n\r\n") {
                        Some(at) => {
                            let end = from + at + 4;
                            let rest_len = head.len() - end;
                            let consumed = input.len() - rest_len;
                            head.truncate(end);
                            let head = std::mem::take(head);
                            *input = &input[consumed..];
                            return match content_length(&head) {
                                Some(0) => {
                                    self.state = State::Boundary;
                                    self.then(Event::End);
                                    Some(Event::Head(head))
                                }
                                Some(len) => {
                                    self.state = State::Payload(len);
                                    Some(Event::Head(head))
                                }
                                None => {
                                    self.state = State::Raw;
                                    Some(Event::NotRtsp(head))
                                }
                            };
                        }
                        None if head.len() > MAX_HEAD
                            || !looks_like_head(head)
                            || first_line(head).is_some_and(|line| !is_start_line(line)) =>
                        {
                            let head = std::mem::take(head);
                            self.state = State::Raw;
                            *input = &[];
                            return Some(Event::NotRtsp(head));
                        }
                        None => *input = &[],
                    }
                }
            }
        }
        None
    }
}

/// The `Content-Length` of a message head (0 when absent), or `None` if the head does
/// not parse as RTSP.
fn content_length(head: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let start = lines.next()?;
    if !(start.starts_with("RTSP/1.0 ") || start.ends_with(" RTSP/1.0")) {
        return None;
    }
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                return value.trim().parse().ok();
            }
        }
    }
    Some(0)
}

/// The first line of `head`, once its CRLF has arrived.
fn first_line(head: &[u8]) -> Option<&[u8]> {
    find(head, b"\r\n").map(|end| &head[..end])
}

/// `METHOD URI RTSP/1.0` or `RTSP/1.0 CODE REASON`.
fn is_start_line(line: &[u8]) -> bool {
    line.starts_with(b"RTSP/1.0 ")
        || (line.ends_with(b" RTSP/1.0")
            && line
                .iter()
                .take_while(|&&b| b != b' ')
                .all(|b| b.is_ascii_uppercase() || *b == b'_' || *b == b'-'))
}

/// A prefix that can still become an RTSP start line: printable ASCII and CRLFs.
fn looks_like_head(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|&b| b == b'\r' || b == b'\n' || b == b'\t' || (0x20..0x7f).contains(&b))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESCRIBE: &[u8] =
        b"DESCRIBE rtsp://h/cam/realmonitor?channel=1&subtype=0 RTSP/1.0\r\nCSeq: 2\r\n\r\n";
    const REPLY: &[u8] = b"RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Length: 5\r\n\r\nv=0\r\n";

    /// Feeds `input` in chunks of `size` and rebuilds heads and passed bytes.
    fn scan(input: &[u8], size: usize) -> (Vec<Vec<u8>>, Vec<u8>, usize, Scanner) {
        let mut s = Scanner::new();
        let (mut heads, mut passed, mut ends) = (Vec::new(), Vec::new(), 0);
        for chunk in input.chunks(size) {
            for event in s.feed(chunk) {
                match event {
                    Event::Head(h) => {
                        passed.extend_from_slice(&h);
                        heads.push(h);
                    }
                    Event::Pass(p) => passed.extend_from_slice(p),
                    Event::NotRtsp(b) => passed.extend_from_slice(&b),
                    Event::End => ends += 1,
                    Event::Frame { .. } => {}
                }
            }
        }
        (heads, passed, ends, s)
    }

    #[test]
    fn heads_bodies_and_interleaved_frames_in_any_split() {
        let mut stream = DESCRIBE.to_vec();
        stream.extend_from_slice(REPLY);
        stream.extend_from_slice(&[b'$', 0, 0, 3, 9, 9, 9, b'$', 1, 0, 0]);
        stream.extend_from_slice(DESCRIBE);
        for size in [1, 2, 3, 7, 64, stream.len()] {
            let (heads, passed, ends, s) = scan(&stream, size);
            assert_eq!(passed, stream, "chunk size {size}");
            assert_eq!(ends, 5, "3 messages and 2 frames, chunk size {size}");
            assert_eq!(heads.len(), 3, "chunk size {size}");
            assert_eq!(heads[0], DESCRIBE);
            assert!(heads[1].ends_with(b"Content-Length: 5\r\n\r\n"));
            assert!(s.at_boundary(), "chunk size {size}");
        }
    }

    #[test]
    fn events_come_in_stream_order() {
        let mut s = Scanner::new();
        let stream = [REPLY, b"$\x01\x00\x02ab$\x00\x00\x00"].concat();
        let events: Vec<_> = s.feed(&stream).collect();
        let head_len = REPLY.len() - 5;
        assert_eq!(
            events,
            [
                Event::Head(REPLY[..head_len].to_vec()),
                Event::Pass(b"v=0\r\n"),
                Event::End,
                Event::Pass(b"$\x01\x00\x02"),
                Event::Frame { channel: 1, len: 2 },
                Event::Pass(b"ab"),
                Event::End,
                Event::Pass(b"$\x00\x00\x00"),
                Event::Frame { channel: 0, len: 0 },
                Event::End,
            ]
        );
    }

    #[test]
    fn boundaries_are_only_between_messages() {
        let mut s = Scanner::new();
        s.feed(&REPLY[..20]).for_each(drop);
        assert!(!s.at_boundary());
        s.feed(&REPLY[20..REPLY.len() - 1]).for_each(drop);
        assert!(!s.at_boundary(), "inside the body");
        s.feed(&REPLY[REPLY.len() - 1..]).for_each(drop);
        assert!(s.at_boundary());
        s.feed(&[b'$', 0, 0, 2, 1]).for_each(drop);
        assert!(!s.at_boundary(), "inside a frame");
        s.feed(&[2]).for_each(drop);
        assert!(s.at_boundary());
    }

    #[test]
    fn streams_that_are_not_rtsp_pass_through_raw() {
        for stream in [
            &b"SSH-2.0-OpenSSH_9.2\r\n"[..],
            b"\x16\x03\x01\x02\x00\x01",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody",
            b"$\x00\x00\x01x",
        ] {
            let (_, passed, _, s) = scan(stream, 3);
            assert_eq!(passed, stream);
            assert!(s.is_raw(), "{stream:?}");
        }
    }

    #[test]
    fn a_line_protocol_is_not_held_waiting_for_a_blank_line() {
        let mut s = Scanner::new();
        let events: Vec<_> = s.feed(b"PING\r\n").collect();
        assert_eq!(events, [Event::NotRtsp(b"PING\r\n".to_vec())]);
        assert!(s.is_raw());
    }

    #[test]
    fn a_partial_head_is_delivered_at_the_end_of_the_stream() {
        let mut s = Scanner::new();
        assert_eq!(s.feed(b"OPTIONS * RTS").next(), None);
        assert_eq!(s.finish(), Some(b"OPTIONS * RTS".to_vec()));
        assert_eq!(Scanner::new().finish(), None);
    }

    #[test]
    fn an_endless_head_gives_up_instead_of_growing() {
        let mut stream = b"OPTIONS * RTSP/1.0\r\nX: ".to_vec();
        stream.resize(MAX_HEAD + 10, b'a');
        let (_, passed, _, s) = scan(&stream, 1000);
        assert_eq!(passed, stream);
        assert!(s.is_raw());
    }
}
