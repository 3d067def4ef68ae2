//! Bodies on the wire: taking the chunked transfer coding apart as bytes arrive (requests from
//! clients, responses from the upstream), and putting it together for the client.
//!
//! The decoder is strict where leniency has let requests be smuggled (CRLF only, a size in
//! at most 16 hex digits) and bounded where a peer could make it work for nothing
//! (extensions and trailers have a size limit).
use bytes::{Bytes, BytesMut};

/// Most bytes of chunk extensions per chunk, and of trailer fields in all.
const MAX_EXTENSION: usize = 4096;
const MAX_TRAILERS: usize = 16 << 10;

/// Why a chunked body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("a chunk size is not a hexadecimal number of at most 16 digits")]
    Size,
    #[error("chunk framing is broken (a line must end in CRLF)")]
    Framing,
    #[error("chunk extensions or trailers are too long")]
    TooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex digits of a chunk size.
    Size {
        digits: u8,
        size: u64,
    },
    /// After the size: extensions until CR.
    Extension {
        size: u64,
        seen: usize,
    },
    /// The LF ending the size line.
    SizeLf {
        size: u64,
    },
    /// Chunk data still to come.
    Data {
        left: u64,
    },
    /// The CR, then the LF, after chunk data.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart {
        seen: usize,
    },
    /// Inside a trailer line.
    Trailer {
        seen: usize,
    },
    TrailerLf {
        seen: usize,
        empty: bool,
    },
    Done,
}

/// What the decoder has for the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// Everything in the buffer was framing; read more.
    NeedMore,
    /// The body ended (the last chunk and the trailers are consumed).
    Done,
}

/// Takes a chunked body apart as its bytes arrive.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: State::Size { digits: 0, size: 0 },
        }
    }
}

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes framing from the front of `input` and returns the next piece of data (split
    /// off `input` without copying), or what it needs.
    pub fn decode(&mut self, input: &mut BytesMut) -> Result<Decoded, ChunkError> {
        let mut i = 0;
        let result = loop {
            if let State::Data { left } = self.state {
                let _ = input.split_to(i);
                i = 0;
                if input.is_empty() {
                    break Decoded::NeedMore;
                }
                let take = (left.min(input.len() as u64)) as usize;
                let data = input.split_to(take).freeze();
                self.state = if left == take as u64 {
                    State::DataCr
                } else {
                    State::Data {
                        left: left - take as u64,
                    }
                };
                return Ok(Decoded::Data(data));
            }
            if self.state == State::Done {
                break Decoded::Done;
            }
            let Some(&b) = input.get(i) else {
                break Decoded::NeedMore;
            };
            i += 1;
            self.state = match self.state {
                State::Size { digits, size } => match (b as char).to_digit(16) {
                    Some(d) if digits < 16 => State::Size {
                        digits: digits + 1,
                        size: size << 4 | u64::from(d),
                    },
                    Some(_) => return Err(ChunkError::Size),
                    None if digits == 0 => return Err(ChunkError::Size),
                    None if b == b'\r' => State::SizeLf { size },
                    None if b == b';' || b == b' ' || b == b'\t' => {
                        State::Extension { size, seen: 1 }
                    }
                    None => return Err(ChunkError::Size),
                },
                State::Extension { size, seen } => {
                    if seen > MAX_EXTENSION {
                        return Err(ChunkError::TooLong);
                    }
                    match b {
                        b'\r' => State::SizeLf { size },
                        b'\n' => return Err(ChunkError::Framing),
                        _ => State::Extension {
                            size,
                            seen: seen + 1,
                        },
                    }
                }
                State::SizeLf { size } => match (b, size) {
                    (b'\n', 0) => State::TrailerStart { seen: 0 },
                    (b'\n', left) => State::Data { left },
                    _ => return Err(ChunkError::Framing),
                },
                State::DataCr if b == b'\r' => State::DataLf,
                State::DataLf if b == b'\n' => State::Size { digits: 0, size: 0 },
                State::DataCr | State::DataLf => return Err(ChunkError::Framing),
                State::TrailerStart { seen } => match b {
                    b'\r' => State::TrailerLf { seen, empty: true },
                    b'\n' => return Err(ChunkError::Framing),
                    _ => State::Trailer { seen: seen + 1 },
                },
                State::Trailer { seen } => {
                    if seen > MAX_TRAILERS {
                        return Err(ChunkError::TooLong);
                    }
                    match b {
                        b'\r' => State::TrailerLf { seen, empty: false },
                        b'\n' => return Err(ChunkError::Framing),
                        _ => State::Trailer { seen: seen + 1 },
                    }
                }
                State::TrailerLf { seen, empty } => match (b, empty) {
                    (b'\n', true) => State::Done,
                    (b'\n', false) => State::TrailerStart { seen },
                    _ => return Err(ChunkError::Framing),
                },
                State::Data { .. } | State::Done => unreachable!("handled above"),
            };
        };
        let _ = input.split_to(i);
        Ok(result)
    }
}

/// The chunk-size line of a chunk of `len` bytes.
pub fn chunk_header(len: usize, out: &mut Vec<u8>) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body: the last chunk and no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed `step` bytes at a time: the data, and whether the body ended.
    fn decode_in_steps(wire: &[u8], step: usize) -> Result<(Vec<u8>, bool), ChunkError> {
        let mut d = ChunkedDecoder::default();
        let mut input = BytesMut::new();
        let mut out = Vec::new();
        for piece in wire.chunks(step.max(1)) {
            input.extend_from_slice(piece);
            loop {
                match d.decode(&mut input)? {
                    Decoded::Data(b) => out.extend_from_slice(&b),
                    Decoded::NeedMore => break,
                    Decoded::Done => return Ok((out, true)),
                }
            }
        }
        Ok((out, d.is_done()))
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_pieces_they_arrive_in() {
        let wire =
            b"5\r\nhello\r\n6;name=val\r\n world\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in [1, 2, 3, 7, 64, wire.len()] {
            let (data, done) = decode_in_steps(wire, step).expect("valid");
            assert_eq!(data, b"hello world0123456789", "step {step}");
            assert!(done, "step {step}");
        }
        // What follows the body stays in the buffer (the next request on the connection).
        let mut d = ChunkedDecoder::default();
        let mut input = BytesMut::from(&b"1\r\na\r\n0\r\n\r\nGET / HTTP/1.1\r\n"[..]);
        assert_eq!(
            d.decode(&mut input),
            Ok(Decoded::Data(Bytes::from_static(b"a")))
        );
        assert_eq!(d.decode(&mut input), Ok(Decoded::Done));
        assert_eq!(&input[..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn broken_framing_is_refused() {
        for wire in [
            &b"5\nhello\r\n0\r\n\r\n"[..], // bare LF after the size
            b"5\r\nhelloX\r\n0\r\n\r\n",   // data longer than its size
            b"g\r\n",                      // not hex
            b"\r\n",                       // no size
            b"11111111111111111\r\n",      // 17 digits
            b"0\r\n\n",                    // bare LF ending the body
            b"-1\r\n",
        ] {
            assert!(
                decode_in_steps(wire, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long_ext = format!("1;{}\r\na\r\n", "e".repeat(MAX_EXTENSION + 1));
        assert_eq!(
            decode_in_steps(long_ext.as_bytes(), 4096),
            Err(ChunkError::TooLong)
        );
        // A body that is cut short is not done.
        assert_eq!(
            decode_in_steps(b"5\r\nhel", 1),
            Ok((b"hel".to_vec(), false))
        );
    }

    #[test]
    fn encoding_frames_chunks_in_hex() {
        let mut out = Vec::new();
        chunk_header(255, &mut out);
        chunk_header(0, &mut out);
        chunk_header(0x10_0000, &mut out);
        assert_eq!(out, b"ff\r\n0\r\n100000\r\n");
    }
}
