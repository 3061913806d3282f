//! Property tests of the pub/sub connection's RESP reader (issue #9 item
//! 7): whatever the socket delivers and however it is cut into reads, the
//! reader yields exactly the frames that were sent, never consumes a frame
//! it has not completed, never panics, and refuses what it cannot bound.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use streampipe_publisher::resp::{parse, Frame, RespError, MAX_DEPTH, MAX_LINE};

/// The RESP2 encoding of `f` (the reference the parser must invert).
fn encode(f: &Frame, out: &mut Vec<u8>) {
    match f {
        Frame::Simple(s) => {
            out.push(b'+');
            out.extend_from_slice(s);
            out.extend_from_slice(b"\r\n");
        }
        Frame::Error(s) => {
            out.push(b'-');
            out.extend_from_slice(s);
            out.extend_from_slice(b"\r\n");
        }
        Frame::Integer(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
        Frame::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
        Frame::Bulk(Some(b)) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Frame::Array(None) => out.extend_from_slice(b"*-1\r\n"),
        Frame::Array(Some(items)) => {
            out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
            for i in items {
                encode(i, out);
            }
        }
    }
}

/// A status or error line: any bytes but CR and LF.
fn line_bytes() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(
        any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
        0..24,
    )
    .prop_map(Bytes::from)
}

/// Frames as Redis sends them, nested within [`MAX_DEPTH`]; bulk strings
/// hold any bytes, CRLF included.
fn frame() -> impl Strategy<Value = Frame> {
    let leaf = prop_oneof![
        line_bytes().prop_map(Frame::Simple),
        line_bytes().prop_map(Frame::Error),
        any::<i64>().prop_map(Frame::Integer),
        Just(Frame::Bulk(None)),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| Frame::Bulk(Some(b.into()))),
        Just(Frame::Array(None)),
    ];
    leaf.prop_recursive(MAX_DEPTH as u32, 32, 5, |inner| {
        proptest::collection::vec(inner, 0..5).prop_map(|v| Frame::Array(Some(v)))
    })
}

/// Feeds `bytes` to the parser in reads that end at `cuts`, the way the
/// connection's reader does, and returns every frame parsed.
fn parse_in_reads(bytes: &[u8], cuts: &[usize]) -> Result<Vec<Frame>, RespError> {
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    ends.push(bytes.len());
    ends.sort_unstable();
    let (mut buf, mut fed, mut frames) = (BytesMut::new(), 0, Vec::new());
    for end in ends {
        buf.extend_from_slice(&bytes[fed..end]);
        fed = end;
        loop {
            let before = buf.len();
            match parse(&mut buf)? {
                Some(f) => frames.push(f),
                None => {
                    assert_eq!(buf.len(), before, "an incomplete frame is never consumed");
                    break;
                }
            }
        }
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    Ok(frames)
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Any sequence of frames, cut into reads anywhere, parses back to
    /// itself.
    #[test]
    fn frames_survive_any_read_boundaries(
        frames in proptest::collection::vec(frame(), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut bytes = Vec::new();
        for f in &frames {
            encode(f, &mut bytes);
        }
        prop_assert_eq!(parse_in_reads(&bytes, &cuts).unwrap(), frames);
    }

    /// Arbitrary bytes: the reader never panics and always either parses,
    /// waits for more, or refuses.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..128),
        cuts in proptest::collection::vec(any::<usize>(), 0..4),
    ) {
        let mut b = BytesMut::new();
        let mut fed = 0;
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        ends.push(bytes.len());
        ends.sort_unstable();
        for end in ends {
            b.extend_from_slice(&bytes[fed..end]);
            fed = end;
            while let Ok(Some(_)) = parse(&mut b) {}
        }
    }

    /// A damaged encoding never panics and never yields a frame the
    /// encoder could not have written (every parsed frame re-encodes to the
    /// exact bytes it was parsed from).
    #[test]
    fn damaged_input_is_refused_or_exact(
        frame in frame(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = Vec::new();
        encode(&frame, &mut bytes);
        for (at, byte) in edits {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
        let mut b = BytesMut::from(&bytes[..]);
        let mut consumed = 0;
        while let Ok(Some(f)) = parse(&mut b) {
            let mut again = Vec::new();
            encode(&f, &mut again);
            prop_assert_eq!(&again[..], &bytes[consumed..consumed + again.len()]);
            consumed += again.len();
        }
    }
}

#[test]
fn a_line_that_never_ends_is_refused() {
    let mut b = BytesMut::from(&b"+"[..]);
    b.extend_from_slice(&vec![b'x'; MAX_LINE - 1]);
    assert_eq!(parse(&mut b), Ok(None), "still within a line's bound");
    b.extend_from_slice(&[b'x'; 8]);
    assert!(matches!(parse(&mut b), Err(RespError::Malformed(_))));
    // Also inside an array, after complete elements.
    let mut a = BytesMut::from(&b"*2\r\n:1\r\n$"[..]);
    a.extend_from_slice(&vec![b'9'; MAX_LINE + 2]);
    assert!(matches!(parse(&mut a), Err(RespError::Malformed(_))));
}

#[test]
fn a_bulk_string_must_end_with_crlf() {
    let mut b = BytesMut::from(&b"$2\r\nokXY:1\r\n"[..]);
    assert!(matches!(parse(&mut b), Err(RespError::Malformed(_))));
    let mut ok = BytesMut::from(&b"$2\r\nok\r\n"[..]);
    assert_eq!(
        parse(&mut ok),
        Ok(Some(Frame::Bulk(Some(Bytes::from_static(b"ok")))))
    );
}

#[test]
fn lengths_below_minus_one_are_refused() {
    assert!(matches!(
        parse(&mut BytesMut::from(&b"$-2\r\n"[..])),
        Err(RespError::Malformed(_))
    ));
    assert!(matches!(
        parse(&mut BytesMut::from(&b"*-7\r\n"[..])),
        Err(RespError::Malformed(_))
    ));
}
