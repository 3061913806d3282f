//! A minimal RESP2 codec for the pod's pub/sub connections.
//!
//! redis-rs' async pub/sub reads the socket eagerly into an unbounded
//! channel, so a pod that falls behind grows memory without limit and Redis'
//! own output-buffer limit never trips. Subscribed mode needs only a sliver
//! of RESP (commands out; arrays of bulk strings, integers and errors in),
//! so we speak it ourselves over a plain socket and read only as fast as we
//! consume. Pure: no I/O here, only bytes in and frames out.

use bytes::{Buf, Bytes, BytesMut};

/// Largest bulk string accepted: far above any update we publish (the data
/// topic's payloads are bounded well below it), small enough that a corrupt
/// length cannot make us buffer gigabytes.
pub const MAX_BULK: usize = 16 * 1024 * 1024;

/// Most elements of one array: subscribed-mode replies have 3.
pub const MAX_ARRAY: usize = 1024;

/// Longest line (a status, an error, a length) accepted: Redis' replies
/// in subscribed mode are short, and without a bound a peer that never
/// sends CRLF would make us buffer without end.
pub const MAX_LINE: usize = 64 * 1024;

/// Deepest nesting of arrays: subscribed-mode replies are flat, and a bound
/// keeps corrupt input from recursing without end.
pub const MAX_DEPTH: usize = 4;

/// One RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `+OK`.
    Simple(Bytes),
    /// `-ERR ...`.
    Error(Bytes),
    /// `:42`.
    Integer(i64),
    /// `$n` bulk string; `None` for the null bulk.
    Bulk(Option<Bytes>),
    /// `*n` array; `None` for the null array.
    Array(Option<Vec<Frame>>),
}

/// Why bytes from Redis are not RESP we accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RespError {
    /// Unknown type byte or malformed line.
    #[error("malformed RESP: {0}")]
    Malformed(&'static str),
    /// A length above [`MAX_BULK`] or [`MAX_ARRAY`].
    #[error("RESP length {0} over the limit")]
    TooLarge(i64),
}

/// Appends a command (an array of bulk strings) to `out`.
pub fn encode_command<A: AsRef<[u8]>>(out: &mut BytesMut, args: &[A]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Takes one complete frame off the front of `buf`; `Ok(None)` when more
/// bytes are needed (nothing is consumed then).
pub fn parse(buf: &mut BytesMut) -> Result<Option<Frame>, RespError> {
    match scan(&buf[..], 0, 0)? {
        None => Ok(None),
        Some(end) => {
            let mut whole = buf.split_to(end).freeze();
            Ok(Some(build(&mut whole)?))
        }
    }
}

/// Finds the end of the frame starting at `pos` without copying.
fn scan(buf: &[u8], pos: usize, depth: usize) -> Result<Option<usize>, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError::Malformed("arrays nested too deep"));
    }
    let Some((line, next)) = line(buf, pos)? else {
        return Ok(None);
    };
    let Some((&kind, rest)) = line.split_first() else {
        return Err(RespError::Malformed("empty line"));
    };
    match kind {
        b'+' | b'-' | b':' => Ok(Some(next)),
        b'$' => {
            let n = length(rest)?;
            if n < 0 {
                return Ok(Some(next));
            }
            if n as usize > MAX_BULK {
                return Err(RespError::TooLarge(n));
            }
            let end = next + n as usize + 2;
            if buf.len() < end {
                return Ok(None);
            }
            if &buf[end - 2..end] != b"\r\n" {
                return Err(RespError::Malformed("bulk string not followed by CRLF"));
            }
            Ok(Some(end))
        }
        b'*' => {
            let n = length(rest)?;
            if n < 0 {
                return Ok(Some(next));
            }
            if n as usize > MAX_ARRAY {
                return Err(RespError::TooLarge(n));
            }
            let mut at = next;
            for _ in 0..n {
                match scan(buf, at, depth + 1)? {
                    Some(e) => at = e,
                    None => return Ok(None),
                }
            }
            Ok(Some(at))
        }
        _ => Err(RespError::Malformed("unknown type byte")),
    }
}

/// Builds the frame from a buffer known to hold it completely.
fn build(b: &mut Bytes) -> Result<Frame, RespError> {
    let end = b
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or(RespError::Malformed("missing CRLF"))?;
    let line = b.split_to(end);
    b.advance(2);
    let rest = line.slice(1..);
    match line[0] {
        b'+' => Ok(Frame::Simple(rest)),
        b'-' => Ok(Frame::Error(rest)),
        b':' => Ok(Frame::Integer(int(&rest)?)),
        b'$' => {
            let n = length(&rest)?;
            if n < 0 {
                return Ok(Frame::Bulk(None));
            }
            let data = b.split_to(n as usize);
            b.advance(2);
            Ok(Frame::Bulk(Some(data)))
        }
        b'*' => {
            let n = length(&rest)?;
            if n < 0 {
                return Ok(Frame::Array(None));
            }
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                items.push(build(b)?);
            }
            Ok(Frame::Array(Some(items)))
        }
        _ => Err(RespError::Malformed("unknown type byte")),
    }
}

/// The line starting at `pos` (without CRLF) and the position after it;
/// `None` while its CRLF has not arrived, an error once it cannot be a line
/// within [`MAX_LINE`].
fn line(buf: &[u8], pos: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let rest = buf.get(pos..).unwrap_or_default();
    let window = &rest[..rest.len().min(MAX_LINE + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(rel) => Ok(Some((&buf[pos..pos + rel], pos + rel + 2))),
        None if rest.len() >= MAX_LINE + 2 => Err(RespError::Malformed("line too long")),
        None => Ok(None),
    }
}

/// A bulk or array length: `-1` (null) or a count.
fn length(s: &[u8]) -> Result<i64, RespError> {
    match int(s)? {
        n if n < -1 => Err(RespError::Malformed("negative length")),
        n => Ok(n),
    }
}

/// An integer as Redis writes it: an optional `-`, then digits without
/// leading zeros (`0` alone; no `+`, `-0` or `007`), so every accepted
/// frame re-encodes to exactly its bytes (found by the property test).
fn int(s: &[u8]) -> Result<i64, RespError> {
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    let canonical = !digits.is_empty()
        && digits.iter().all(u8::is_ascii_digit)
        && (digits.len() == 1 || digits[0] != b'0')
        && !(digits == b"0" && digits.len() != s.len());
    canonical
        .then(|| std::str::from_utf8(s).ok()?.parse().ok())
        .flatten()
        .ok_or(RespError::Malformed("bad integer"))
}

/// A message or reply a subscribed connection receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// `message` / `smessage`: a publication on `topic`.
    Message {
        /// The topic (pub/sub channel) name.
        topic: Bytes,
        /// The published bytes.
        payload: Bytes,
    },
    /// `subscribe`/`ssubscribe`/`unsubscribe`/`sunsubscribe` confirmations.
    Subscription {
        /// Which of the four.
        kind: Bytes,
        /// The topic.
        topic: Bytes,
    },
    /// The answer to a `PING <token>`: `["pong", token]` in subscribed
    /// mode, the bulk string `token` before the first subscription.
    Pong(Bytes),
    /// An error reply (`-ERR ...`, `-MOVED ...`).
    Error(Bytes),
    /// Anything else (`+OK` to AUTH, ...).
    Other(Frame),
}

impl Push {
    /// Classifies a frame received in subscribed mode.
    pub fn from_frame(f: Frame) -> Push {
        match f {
            Frame::Error(e) => Push::Error(e),
            // The only bulk reply a connection of ours gets outside
            // subscribed mode is its PING's echo.
            Frame::Bulk(Some(token)) => Push::Pong(token),
            Frame::Array(Some(items)) => {
                let mut it = items.into_iter();
                let kind = match it.next() {
                    Some(Frame::Bulk(Some(k))) => k,
                    Some(other) => return Push::Other(other),
                    None => return Push::Other(Frame::Array(Some(Vec::new()))),
                };
                let a = it.next();
                let b = it.next();
                match (&kind[..], a, b) {
                    (
                        b"message" | b"smessage",
                        Some(Frame::Bulk(Some(t))),
                        Some(Frame::Bulk(Some(p))),
                    ) => Push::Message {
                        topic: t,
                        payload: p,
                    },
                    (b"pong", Some(Frame::Bulk(Some(t))), _) => Push::Pong(t),
                    (
                        b"subscribe" | b"ssubscribe" | b"unsubscribe" | b"sunsubscribe",
                        Some(Frame::Bulk(Some(t))),
                        _,
                    ) => Push::Subscription { kind, topic: t },
                    (_, a, b) => {
                        let mut v = vec![Frame::Bulk(Some(kind))];
                        v.extend(a);
                        v.extend(b);
                        Push::Other(Frame::Array(Some(v)))
                    }
                }
            }
            other => Push::Other(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(s: &[u8]) -> BytesMut {
        BytesMut::from(s)
    }

    #[test]
    fn encodes_commands() {
        let mut out = BytesMut::new();
        encode_command(&mut out, &["SUBSCRIBE", "a", ""]);
        assert_eq!(&out[..], b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$0\r\n\r\n");
    }

    #[test]
    fn parses_messages_and_waits_for_more_bytes() {
        let whole = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhe\r\nx\r\n:7\r\n";
        for cut in 0..whole.len() - 4 {
            let mut b = buf(&whole[..cut]);
            assert_eq!(parse(&mut b), Ok(None), "cut at {cut}");
            assert_eq!(b.len(), cut, "nothing consumed");
        }
        let mut b = buf(whole);
        let f = parse(&mut b).unwrap().unwrap();
        assert_eq!(
            Push::from_frame(f),
            Push::Message {
                topic: Bytes::from_static(b"ch"),
                payload: Bytes::from_static(b"he\r\nx"),
            }
        );
        assert_eq!(parse(&mut b), Ok(Some(Frame::Integer(7))));
        assert!(b.is_empty());
    }

    #[test]
    fn classifies_subscribed_mode_replies() {
        let mut unsubscribed = buf(b"$2\r\n42\r\n");
        assert_eq!(
            Push::from_frame(parse(&mut unsubscribed).unwrap().unwrap()),
            Push::Pong(Bytes::from_static(b"42"))
        );
        let mut b = buf(b"*3\r\n$10\r\nssubscribe\r\n$1\r\nt\r\n:1\r\n*2\r\n$4\r\npong\r\n$2\r\n42\r\n-MOVED 1 x\r\n+OK\r\n");
        let f: Vec<Push> =
            std::iter::from_fn(|| parse(&mut b).unwrap().map(Push::from_frame)).collect();
        assert_eq!(
            f,
            vec![
                Push::Subscription {
                    kind: Bytes::from_static(b"ssubscribe"),
                    topic: Bytes::from_static(b"t")
                },
                Push::Pong(Bytes::from_static(b"42")),
                Push::Error(Bytes::from_static(b"MOVED 1 x")),
                Push::Other(Frame::Simple(Bytes::from_static(b"OK"))),
            ]
        );
    }

    #[test]
    fn hostile_lengths_and_bytes_are_errors() {
        assert_eq!(
            parse(&mut buf(b"$999999999999\r\n")),
            Err(RespError::TooLarge(999_999_999_999))
        );
        assert_eq!(
            parse(&mut buf(b"*5000\r\n")),
            Err(RespError::TooLarge(5000))
        );
        assert!(matches!(
            parse(&mut buf(b"?x\r\n")),
            Err(RespError::Malformed(_))
        ));
        assert!(matches!(
            parse(&mut buf(b"$x\r\n")),
            Err(RespError::Malformed(_))
        ));
        let deep = b"*1\r\n".repeat(10);
        assert!(matches!(
            parse(&mut buf(&deep)),
            Err(RespError::Malformed(_))
        ));
        assert_eq!(parse(&mut buf(b"$-1\r\n")), Ok(Some(Frame::Bulk(None))));
        assert_eq!(parse(&mut buf(b"*-1\r\n")), Ok(Some(Frame::Array(None))));
        for bad in [&b"*-0\r\n"[..], b"$+1\r\nx\r\n", b"*01\r\n", b":-0\r\n"] {
            assert!(parse(&mut buf(bad)).is_err(), "{bad:?}");
        }
    }
}
