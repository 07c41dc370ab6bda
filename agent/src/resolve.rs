//! Finding the relay's address on a camera.
//!
//! The firmware build is a static glibc binary. Its `getaddrinfo` still reads
//! `/etc/hosts` and `/etc/resolv.conf`, because glibc 2.36 builds its `files` and `dns`
//! lookups into `libc.a`; NSS modules that the camera's `nsswitch.conf` names beyond
//! those are skipped (the link-time warning about `getaddrinfo` is about them). So the
//! system resolver is asked first, always.
//!
//! Some cameras have no `/etc/resolv.conf` (the DNS setting left empty, or a DHCP
//! client that writes it elsewhere); glibc then asks 127.0.0.1, where nothing answers.
//! When the system resolver fails, the agent asks the nameservers of
//! `network.fallback_nameservers` itself: one UDP query for A records (then AAAA), the
//! way a stub resolver does, with the answer checked against the question.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tokio::net::UdpSocket;

/// Where the system resolver finds its nameservers.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Time one fallback nameserver has to answer one query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest DNS answer read over UDP (EDNS is not offered, so 512 would do).
const MAX_ANSWER: usize = 1232;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// The addresses of `host` (a name or an IP address) with `port`: the system resolver
/// first, then `fallback` nameservers in order. The error says what was tried and what
/// to change.
pub(crate) async fn resolve(
    host: &str,
    port: u16,
    fallback: &[SocketAddr],
) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let system = match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if !addrs.is_empty() {
                return Ok(addrs);
            }
            "no addresses".to_string()
        }
        Err(e) => e.to_string(),
    };
    let no_resolv_conf = !Path::new(RESOLV_CONF).exists();
    if fallback.is_empty() {
        return Err(if no_resolv_conf {
            format!(
                "cannot resolve {host} ({system}): this camera has no {RESOLV_CONF}, so it \
                 has no nameserver to ask. Set network.fallback_nameservers in the agent's \
                 config (e.g. [\"192.168.1.1\"]), add the relay to /etc/hosts, or give the \
                 relay's IP address in agent.tunnel_server_url"
            )
        } else {
            format!(
                "cannot resolve {host} ({system}); check the nameserver in {RESOLV_CONF}, or \
                 set network.fallback_nameservers in the agent's config"
            )
        });
    };
    // Said once per run at info level: on such a camera every dial comes this way.
    static SAID: AtomicBool = AtomicBool::new(false);
    let why = if no_resolv_conf {
        format!("this camera has no {RESOLV_CONF}")
    } else {
        format!("the system resolver failed: {system}")
    };
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::info!(
            "resolving {host} through network.fallback_nameservers ({}): {why}",
            list(fallback)
        );
    } else {
        tracing::debug!(%host, "resolving through the fallback nameservers: {why}");
    }
    let mut failures = Vec::new();
    for &server in fallback {
        match ask(server, host).await {
            Ok(ips) => {
                return Ok(ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect())
            }
            Err(e) => failures.push(format!("{server}: {e}")),
        }
    }
    Err(format!(
        "cannot resolve {host}: {why}, and the fallback nameservers gave no address ({})",
        failures.join("; ")
    ))
}

fn list(servers: &[SocketAddr]) -> String {
    servers
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Asks `server` for the A records of `host`, then for AAAA if there are none.
async fn ask(server: SocketAddr, host: &str) -> Result<Vec<IpAddr>, String> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
    socket.connect(server).await.map_err(|e| e.to_string())?;
    for qtype in [TYPE_A, TYPE_AAAA] {
        let ips = exchange(&socket, host, qtype).await?;
        if !ips.is_empty() {
            return Ok(ips);
        }
    }
    Err("no A or AAAA records".into())
}

/// One query and its answer; replies that are not to this query are skipped.
async fn exchange(socket: &UdpSocket, host: &str, qtype: u16) -> Result<Vec<IpAddr>, String> {
    let id: u16 = rand::random();
    let query = encode_query(id, host, qtype)?;
    socket.send(&query).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0; MAX_ANSWER];
    let wait = async {
        loop {
            let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
            match decode_answer(&query, &buf[..n]) {
                Err(Answer::NotOurs) => continue,
                Err(Answer::Refused(why)) => return Err(why),
                Ok(ips) => return Ok(ips),
            }
        }
    };
    tokio::time::timeout(QUERY_TIMEOUT, wait)
        .await
        .map_err(|_| format!("no answer within {QUERY_TIMEOUT:?}"))?
}

/// A recursive query (RD set) for `host`'s records of `qtype`.
fn encode_query(id: u16, host: &str, qtype: u16) -> Result<Vec<u8>, String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{host:?} is not a host name"));
    }
    let mut query = Vec::with_capacity(18 + name.len());
    query.extend_from_slice(&id.to_be_bytes());
    query.extend_from_slice(&[0x01, 0x00]); // standard query, recursion desired
    query.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{host:?} is not a host name"));
        }
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.push(0);
    query.extend_from_slice(&qtype.to_be_bytes());
    query.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(query)
}

/// Why a datagram gave no addresses.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Not an answer to our query (other id, other question, or not DNS): ignored.
    NotOurs,
    /// The nameserver answered with an error, or the answer is malformed.
    Refused(String),
}

/// The A or AAAA records (of the question's type) in `answer`, an answer to `query`.
fn decode_answer(query: &[u8], answer: &[u8]) -> Result<Vec<IpAddr>, Answer> {
    let question = &query[12..];
    // Same id, a response (QR), one question, and the same question (names compared
    // case-insensitively, as some servers randomise case).
    if answer.len() < 12 + question.len()
        || answer[..2] != query[..2]
        || answer[2] & 0x80 == 0
        || answer[4..6] != [0, 1]
        || !answer[12..12 + question.len()].eq_ignore_ascii_case(question)
    {
        return Err(Answer::NotOurs);
    }
    match answer[3] & 0x0f {
        0 => {}
        3 => return Err(Answer::Refused("no such name (NXDOMAIN)".into())),
        2 => return Err(Answer::Refused("server failure (SERVFAIL)".into())),
        5 => return Err(Answer::Refused("query refused (REFUSED)".into())),
        code => return Err(Answer::Refused(format!("error code {code}"))),
    }
    if answer[2] & 0x02 != 0 {
        return Err(Answer::Refused(
            "answer truncated (too many records for UDP)".into(),
        ));
    }
    let qtype = u16::from_be_bytes([question[question.len() - 4], question[question.len() - 3]]);
    let records = u16::from_be_bytes([answer[6], answer[7]]);
    let malformed = || Answer::Refused("malformed answer".into());
    let mut at = 12 + question.len();
    let mut ips = Vec::new();
    for _ in 0..records {
        at = skip_name(answer, at).ok_or_else(malformed)?;
        let fixed = answer.get(at..at + 10).ok_or_else(malformed)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        let len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let data = answer.get(at + 10..at + 10 + len).ok_or_else(malformed)?;
        at += 10 + len;
        // CNAME records of the chain are skipped; their targets' records follow.
        if class != CLASS_IN || rtype != qtype {
            continue;
        }
        match (rtype, <[u8; 4]>::try_from(data), <[u8; 16]>::try_from(data)) {
            (TYPE_A, Ok(v4), _) => ips.push(IpAddr::from(v4)),
            (TYPE_AAAA, _, Ok(v6)) => ips.push(IpAddr::from(v6)),
            _ => return Err(malformed()),
        }
    }
    Ok(ips)
}

/// The offset just past the (possibly compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        match len >> 6 {
            0 if len == 0 => return Some(at + 1),
            0 => at += 1 + usize::from(len),
            // A compression pointer ends the name here.
            3 => return msg.get(at + 1).map(|_| at + 2),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer to `query` with `records` (type, data), the name written as a
    /// compression pointer to the question.
    fn answer(query: &[u8], rcode: u8, records: &[(u16, &[u8])]) -> Vec<u8> {
        let mut msg = query.to_vec();
        msg[2] = 0x81;
        msg[3] = 0x80 | rcode;
        msg[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        for (rtype, data) in records {
            msg.extend_from_slice(&[0xc0, 12]);
            msg.extend_from_slice(&rtype.to_be_bytes());
            msg.extend_from_slice(&CLASS_IN.to_be_bytes());
            msg.extend_from_slice(&300u32.to_be_bytes());
            msg.extend_from_slice(&(data.len() as u16).to_be_bytes());
            msg.extend_from_slice(data);
        }
        msg
    }

    #[test]
    fn a_query_is_what_a_stub_resolver_sends() {
        let query = encode_query(0x1234, "relay.example.com.", TYPE_A).unwrap();
        assert_eq!(
            query,
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\
              \x05relay\x07example\x03com\x00\x00\x01\x00\x01"
        );
        for bad in ["", "a..b", &"x".repeat(64), &"a.".repeat(130)] {
            assert!(encode_query(1, bad, TYPE_A).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn addresses_are_read_past_a_cname_chain() {
        let query = encode_query(7, "relay.example.com", TYPE_A).unwrap();
        let cname = b"\x03cdn\xc0\x12";
        let msg = answer(
            &query,
            0,
            &[
                (5, cname),
                (TYPE_A, &[203, 0, 113, 5]),
                (TYPE_A, &[203, 0, 113, 6]),
            ],
        );
        assert_eq!(
            decode_answer(&query, &msg).unwrap(),
            [
                "203.0.113.5".parse::<IpAddr>().unwrap(),
                "203.0.113.6".parse().unwrap()
            ]
        );
        let query6 = encode_query(8, "relay.example.com", TYPE_AAAA).unwrap();
        let v6: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let msg = answer(&query6, 0, &[(TYPE_AAAA, &v6.octets())]);
        assert_eq!(decode_answer(&query6, &msg).unwrap(), [IpAddr::from(v6)]);
    }

    #[test]
    fn answers_to_other_queries_are_ignored_and_errors_are_named() {
        let query = encode_query(7, "relay.example.com", TYPE_A).unwrap();
        let mut other_id = answer(&query, 0, &[(TYPE_A, &[1, 2, 3, 4])]);
        other_id[1] ^= 1;
        assert_eq!(decode_answer(&query, &other_id), Err(Answer::NotOurs));
        let other_name = answer(
            &encode_query(7, "relay.example.org", TYPE_A).unwrap(),
            0,
            &[(TYPE_A, &[1, 2, 3, 4])],
        );
        assert_eq!(decode_answer(&query, &other_name), Err(Answer::NotOurs));
        assert_eq!(decode_answer(&query, &query), Err(Answer::NotOurs)); // not a response
        let mut shouted = answer(&query, 0, &[(TYPE_A, &[1, 2, 3, 4])]);
        shouted[13..18].make_ascii_uppercase();
        assert!(decode_answer(&query, &shouted).is_ok());

        let nx = answer(&query, 3, &[]);
        assert_eq!(
            decode_answer(&query, &nx),
            Err(Answer::Refused("no such name (NXDOMAIN)".into()))
        );
        let short_a = answer(&query, 0, &[(TYPE_A, &[1, 2, 3])]);
        assert_eq!(
            decode_answer(&query, &short_a),
            Err(Answer::Refused("malformed answer".into()))
        );
    }

    #[test]
    fn garbage_never_panics() {
        let query = encode_query(7, "relay.example.com", TYPE_A).unwrap();
        let good = answer(
            &query,
            0,
            &[(5, b"\x03cdn\xc0\x12"), (TYPE_A, &[1, 2, 3, 4])],
        );
        // Every truncation, and every single-byte corruption past the question.
        for n in 0..good.len() {
            let _ = decode_answer(&query, &good[..n]);
        }
        for at in query.len()..good.len() {
            for byte in [0x00, 0x3f, 0x40, 0xc0, 0xff] {
                let mut bad = good.clone();
                bad[at] = byte;
                let _ = decode_answer(&query, &bad);
            }
        }
        let mut many = answer(&query, 0, &[]);
        many[6..8].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            decode_answer(&query, &many),
            Err(Answer::Refused("malformed answer".into()))
        );
    }

    #[tokio::test]
    async fn a_nameserver_is_asked_and_stray_datagrams_are_skipped() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let serve = tokio::spawn(async move {
            let mut buf = [0; 512];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            // A stray datagram first, as an off-path sender might send.
            server.send_to(b"not dns", from).await.unwrap();
            let reply = answer(&buf[..n], 0, &[(TYPE_A, &[192, 0, 2, 7])]);
            server.send_to(&reply, from).await.unwrap();
        });
        let ips = ask(addr, "relay.camera.test").await.unwrap();
        assert_eq!(ips, ["192.0.2.7".parse::<IpAddr>().unwrap()]);
        serve.await.unwrap();
        assert_eq!(
            resolve("198.51.100.1", 443, &[]).await.unwrap(),
            ["198.51.100.1:443".parse::<SocketAddr>().unwrap()]
        );
    }
}
