//! `bytes`: byte-exact traffic for tests that run in network namespaces, where the test
//! process cannot open sockets itself.
//!
//! - `bytes echo --listen ADDR`: echoes every connection until the client's FIN, then
//!   sends its own; prints `READY <address>`.
//! - `bytes send --to ADDR --bytes N --seconds S`: sends N seeded pseudo-random bytes
//!   evenly over S seconds, half-closes, reads the echo to the end and compares it
//!   byte by byte; prints `RESULT sent=N received=M first_difference=K|none`.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context as _};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The seeded byte stream (xorshift64*), the same however it is cut into reads.
struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    fn new() -> Self {
        Pattern {
            state: 0x5eed,
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for byte in buf {
            if self.used == 8 {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
                self.used = 0;
            }
            *byte = self.word[self.used];
            self.used += 1;
        }
    }
}

const CHUNK: usize = 16 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| -> anyhow::Result<&str> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
            .with_context(|| format!("missing {name}"))
    };
    match args.first().map(String::as_str) {
        Some("echo") => echo(flag("--listen")?.parse()?).await,
        Some("send") => {
            send(
                flag("--to")?.parse()?,
                flag("--bytes")?.parse()?,
                Duration::from_secs_f64(flag("--seconds")?.parse()?),
            )
            .await
        }
        _ => bail!("usage: bytes echo --listen ADDR | bytes send --to ADDR --bytes N --seconds S"),
    }
}

async fn echo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("READY {}", listener.local_addr()?);
    loop {
        let (mut tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut rd, mut wr) = tcp.split();
            if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                let _ = wr.shutdown().await;
            }
        });
    }
}

async fn send(to: SocketAddr, bytes: u64, over: Duration) -> anyhow::Result<()> {
    let mut tcp = TcpStream::connect(to).await?;
    let (mut rd, mut wr) = tcp.split();
    let start = tokio::time::Instant::now();
    let sending = async {
        let mut pattern = Pattern::new();
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(CHUNK as u64) as usize;
            pattern.fill(&mut buf[..n]);
            wr.write_all(&buf[..n]).await?;
            sent += n as u64;
            // Evenly over the time asked for.
            let due = over.mul_f64(sent as f64 / bytes as f64);
            tokio::time::sleep_until(start + due).await;
        }
        wr.shutdown().await?;
        anyhow::Ok(sent)
    };
    let receiving = async {
        let mut pattern = Pattern::new();
        let (mut got, mut want) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        let (mut received, mut first_difference) = (0u64, None);
        loop {
            let n = rd.read(&mut got).await?;
            if n == 0 {
                break;
            }
            pattern.fill(&mut want[..n]);
            if first_difference.is_none() {
                if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
                    first_difference = Some(received + i as u64);
                }
            }
            received += n as u64;
        }
        anyhow::Ok((received, first_difference))
    };
    let (sent, (received, first_difference)) = tokio::try_join!(sending, receiving)?;
    let first_difference = first_difference.map_or("none".to_string(), |i| i.to_string());
    println!("RESULT sent={sent} received={received} first_difference={first_difference}");
    Ok(())
}
