//! Chunked framing (RFC 9112 §7.1), followed byte by byte to find where a body ends
//! while the bytes pass through unchanged (the direct codec), or to take the payload
//! out of it (the general path's plain-`http` upstream exchange).

/// Chunk extensions of one chunk, and trailers of one response, in bytes: the
/// response is cut off above.
pub const CHUNK_EXTENSION_BYTES_MAX: usize = 4 * 1024;
pub const TRAILER_BYTES_MAX: usize = 16 * 1024;

/// Follows a chunked body's framing (RFC 9112 §7.1) to find where it ends; the bytes
/// themselves pass through unchanged.
#[derive(Default)]
pub(in crate::proxy) struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
    /// Bytes of the current extension or of all trailers, for their limits.
    extra: usize,
    /// Payload bytes seen.
    pub(in crate::proxy) data: u64,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
}

/// What [`Chunked::decode`] found at the start of some bytes.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::proxy) enum Decoded {
    /// `skip` bytes of framing, then `len` bytes of payload.
    Data { skip: usize, len: usize },
    /// The bytes were all framing; the body goes on in the next ones.
    More,
    /// `skip` bytes of framing ended the last chunk: the trailer section (at least its
    /// closing blank line) follows.
    Trailers { skip: usize },
}

impl Chunked {
    /// Reads `bytes`; `Some(n)` when the body ends after the first `n` of them.
    pub(in crate::proxy) fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, ()> {
        let mut index = 0;
        while index < bytes.len() {
            if self.state == ChunkState::Data {
                index += self.payload(bytes.len() - index);
                continue;
            }
            if self.framing(bytes[index])? {
                return Ok(Some(index + 1));
            }
            index += 1;
        }
        Ok(None)
    }

    /// Reads `bytes` up to the first payload bytes, or up to the trailer section: a
    /// decoder, for a codec that takes the payload out of its framing. The trailer
    /// section is left to the caller (it parses it as header fields).
    pub(in crate::proxy) fn decode(&mut self, bytes: &[u8]) -> Result<Decoded, ()> {
        let mut index = 0;
        loop {
            match self.state {
                ChunkState::TrailerStart => return Ok(Decoded::Trailers { skip: index }),
                _ if index == bytes.len() => return Ok(Decoded::More),
                ChunkState::Data => return Ok(Decoded::Data { skip: index, len: self.payload(bytes.len() - index) }),
                _ => {
                    self.framing(bytes[index])?;
                    index += 1;
                }
            }
        }
    }

    /// Takes up to `available` payload bytes of the current chunk: how many.
    fn payload(&mut self, available: usize) -> usize {
        let take = self.size.min(available as u64);
        self.size -= take;
        self.data += take;
        if self.size == 0 {
            self.state = ChunkState::DataCr;
        }
        take as usize
    }

    /// Reads one byte of framing (any state but `Data`); `true` when it ended the body.
    fn framing(&mut self, byte: u8) -> Result<bool, ()> {
        match self.state {
            ChunkState::Size => {
                if let Some(digit) = (byte as char).to_digit(16) {
                    if self.digits == 15 {
                        return Err(());
                    }
                    self.size = self.size * 16 + u64::from(digit);
                    self.digits += 1;
                } else if self.digits == 0 {
                    return Err(());
                } else if byte == b'\r' {
                    self.state = ChunkState::SizeLf;
                } else if byte == b';' || byte == b' ' || byte == b'\t' {
                    self.state = ChunkState::Extension;
                    self.extra = 0;
                } else {
                    return Err(());
                }
            }
            ChunkState::Extension => {
                self.extra += 1;
                if byte == b'\r' {
                    self.state = ChunkState::SizeLf;
                } else if byte == b'\n' || self.extra > CHUNK_EXTENSION_BYTES_MAX {
                    return Err(());
                }
            }
            ChunkState::SizeLf => {
                if byte != b'\n' {
                    return Err(());
                }
                self.state = if self.size == 0 { ChunkState::TrailerStart } else { ChunkState::Data };
                self.extra = 0;
            }
            // Payload is taken by `payload`, never a byte at a time.
            ChunkState::Data => return Err(()),
            ChunkState::DataCr if byte == b'\r' => self.state = ChunkState::DataLf,
            ChunkState::DataLf if byte == b'\n' => {
                self.state = ChunkState::Size;
                self.digits = 0;
            }
            ChunkState::DataCr | ChunkState::DataLf => return Err(()),
            ChunkState::TrailerStart | ChunkState::Trailer => {
                self.extra += 1;
                if self.extra > TRAILER_BYTES_MAX {
                    return Err(());
                }
                self.state = match (self.state, byte) {
                    (ChunkState::TrailerStart, b'\r') => ChunkState::EndLf,
                    (_, b'\r') => ChunkState::TrailerLf,
                    (_, b'\n') => return Err(()),
                    _ => ChunkState::Trailer,
                };
            }
            ChunkState::TrailerLf if byte == b'\n' => self.state = ChunkState::TrailerStart,
            ChunkState::TrailerLf => return Err(()),
            ChunkState::EndLf if byte == b'\n' => return Ok(true),
            ChunkState::EndLf => return Err(()),
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(pieces: &[&[u8]]) -> Result<Option<usize>, ()> {
        let mut chunked = Chunked::default();
        let mut offset = 0;
        for piece in pieces {
            if let Some(end) = chunked.feed(piece)? {
                return Ok(Some(offset + end));
            }
            offset += piece.len();
        }
        Ok(None)
    }

    #[test]
    fn chunked_framing_finds_the_end_however_the_bytes_are_cut() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        assert_eq!(ends(&[body]), Ok(Some(end)));
        for cut in 1..body.len() {
            assert_eq!(ends(&[&body[..cut], &body[cut..]]), Ok(Some(end)), "cut at {cut}");
        }
        let mut chunked = Chunked::default();
        assert_eq!(chunked.feed(&body[..end]), Ok(Some(end)));
        assert_eq!(chunked.data, 11);
        assert_eq!(ends(&[b"0\r\n\r\n"]), Ok(Some(5)));
        assert_eq!(ends(&[b"a\r\n0123456789"]), Ok(None));
    }

    #[test]
    fn malformed_chunked_framing_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"1234567890abcdef0\r\n",
            b"0\r\nbad\nx\r\n\r\n",
            b"0\r\n\rX",
        ] {
            assert_eq!(ends(&[bad]), Err(()), "{:?}", String::from_utf8_lossy(bad));
        }
        let long_extension = [&b"1;"[..], &vec![b'a'; CHUNK_EXTENSION_BYTES_MAX + 1]].concat();
        assert_eq!(ends(&[&long_extension]), Err(()));
    }

    /// Decodes `pieces` as a reader would get them: the payload, and the bytes from
    /// where the trailer section starts.
    fn decoded(pieces: &[&[u8]]) -> Result<(Vec<u8>, Option<Vec<u8>>), ()> {
        let mut chunked = Chunked::default();
        let mut payload = Vec::new();
        let mut pending = Vec::new();
        for (index, piece) in pieces.iter().enumerate() {
            pending.extend_from_slice(piece);
            loop {
                match chunked.decode(&pending)? {
                    Decoded::Data { skip, len } => {
                        payload.extend_from_slice(&pending[skip..skip + len]);
                        pending.drain(..skip + len);
                    }
                    Decoded::More => {
                        pending.clear();
                        break;
                    }
                    Decoded::Trailers { skip } => {
                        let rest = [&pending[skip..], &pieces[index + 1..].concat()].concat();
                        return Ok((payload, Some(rest)));
                    }
                }
            }
        }
        Ok((payload, None))
    }

    #[test]
    fn chunked_decoding_takes_the_payload_out_however_the_bytes_are_cut() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
        let trailers = b"x-trailer: 1\r\n\r\n".to_vec();
        assert_eq!(decoded(&[body]), Ok((b"hello world".to_vec(), Some(trailers.clone()))));
        for cut in 1..body.len() {
            let cut_in_two = decoded(&[&body[..cut], &body[cut..]]);
            assert_eq!(cut_in_two, Ok((b"hello world".to_vec(), Some(trailers.clone()))), "cut at {cut}");
        }
        assert_eq!(decoded(&[b"0\r\n\r\n"]), Ok((Vec::new(), Some(b"\r\n".to_vec()))));
        assert_eq!(decoded(&[b"a\r\n01234"]), Ok((b"01234".to_vec(), None)));
        for bad in [&b"x\r\n"[..], b"5\nhello\r\n", b"5\r\nhelloX\r\n", b"1234567890abcdef0\r\n"] {
            assert_eq!(decoded(&[bad]), Err(()), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
