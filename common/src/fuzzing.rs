//! Entry points shared by the fuzz targets (`fuzz/`, `make fuzz`) and the test that
//! replays their saved corpus in `make test`: whatever the bytes, decoding returns (an
//! error at worst) and never panics, and whatever decodes re-encodes to a message that
//! decodes to the same bytes again.

use serde::{de::DeserializeOwned, Serialize};

use crate::protocol::{
    decode_control, decode_frame_prefix, peek_register_version, AgentMessage, DataHello,
    HelloReply, RelayMessage, StreamOpen, StreamStatus,
};

/// A control-link message, as either side receives it.
pub fn control(data: &[u8]) {
    let _ = peek_register_version(data);
    if let Ok(msg) = decode_control::<AgentMessage>(data) {
        stable(&msg, |bytes| decode_control::<AgentMessage>(bytes).ok());
    }
    if let Ok(msg) = decode_control::<RelayMessage>(data) {
        stable(&msg, |bytes| decode_control::<RelayMessage>(bytes).ok());
    }
}

/// The front of a QUIC stream: the frames of the stream header and the data hello.
pub fn stream_header(data: &[u8]) {
    header::<StreamOpen>(data);
    header::<StreamStatus>(data);
    header::<DataHello>(data);
    header::<HelloReply>(data);
}

fn header<T: Serialize + DeserializeOwned>(data: &[u8]) {
    if let Ok(Some((msg, used))) = decode_frame_prefix::<T>(data) {
        assert!(used <= data.len(), "a frame cannot use more than was given");
        stable(&msg, |bytes| postcard::from_bytes::<T>(bytes).ok());
    }
}

/// Re-encodes `msg`, decodes that and encodes again: both encodings must be equal
/// (comparing bytes, so a NaN in a float compares equal to itself).
fn stable<T: Serialize>(msg: &T, decode: impl Fn(&[u8]) -> Option<T>) {
    let Ok(first) = postcard::to_stdvec(msg) else {
        return;
    };
    let again = decode(&first).expect("a re-encoded message decodes");
    let second = postcard::to_stdvec(&again).expect("a decoded message encodes");
    assert_eq!(first, second, "encoding is not stable");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saved_corpus_replays_without_a_panic() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let mut replayed = 0;
        for (target, entry) in [
            ("control", control as fn(&[u8])),
            ("stream_header", stream_header),
        ] {
            let dir = root.join(target);
            let files =
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            for file in files {
                let path = file.unwrap().path();
                entry(&std::fs::read(&path).unwrap());
                replayed += 1;
            }
        }
        assert!(
            replayed >= 10,
            "only {replayed} corpus files found under {}",
            root.display()
        );
    }
}
