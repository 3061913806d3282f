//! Stream close codes: what the publisher sends (a WebSocket close frame, or
//! an SSE `close` event carrying the same number) and what the JS client
//! acts on. Defined once here; `publisher/static/streampipe.js` keeps its
//! own copy of the sets, checked against these by a publisher unit test.

/// Normal closure (the client closed, or the server answered its close).
pub const NORMAL: u16 = 1000;
/// The publisher is shutting down: reconnect (another pod) with `since`.
pub const GOING_AWAY: u16 = 1001;
/// The client broke the WebSocket protocol (unmasked or reserved frames,
/// a bad opcode, a continuation without a start).
pub const PROTOCOL_ERROR: u16 = 1002;
/// A text frame that is not valid UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// A client frame larger than the publisher accepts.
pub const TOO_BIG: u16 = 1009;
/// The publisher could not serve the stream (a backend is unreachable):
/// reconnect with backoff.
pub const UNAVAILABLE: u16 = 1011;
/// A well-formed frame the protocol does not define (bad JSON, binary).
pub const MALFORMED_FRAME: u16 = 4400;
/// The token expired mid-stream and no `refresh` frame replaced it in
/// time: get a new token and reconnect with `since`.
pub const TOKEN_EXPIRED: u16 = 4401;
/// No valid token: none in the subprotocol nor as the first frame within
/// the auth timeout, or one that is expired, badly signed, for another
/// audience or subject. Get a new token, then reconnect.
pub const UNAUTHORIZED: u16 = 4407;
/// The page's Origin is not allowed to open streams.
pub const ORIGIN_NOT_ALLOWED: u16 = 4403;
/// The channel does not exist (any more): create a new one.
pub const UNKNOWN_CHANNEL: u16 = 4404;
/// The client fell hopelessly behind: reconnect with `since`.
pub const TOO_SLOW: u16 = 4408;
/// No pong (or any frame) for the idle timeout: reconnect with `since`.
pub const HEARTBEAT_TIMEOUT: u16 = 4409;
/// The client already holds its most open streams on this pod: reconnect
/// with backoff (after closing another tab's stream).
pub const TOO_MANY_STREAMS: u16 = 4429;
/// The channel was closed through the API: stop.
pub const CHANNEL_CLOSED: u16 = 4410;
/// The stream reached its maximum lifetime (SSE): reconnect at once with
/// `since`. Bounds how long one connection pins a pod, so load rebalances
/// after a scale-out and a leaked stream does not live forever.
pub const LIFETIME_REACHED: u16 = 4411;
/// Events of a history market could not be queued in order for this
/// client (it fell behind, or the pod had to conflate them): reconnect at
/// once with `since`; the missed events are replayed from the history.
pub const HISTORY_GAP: u16 = 4412;

/// Codes after which a client stops for good without an error.
pub const STOP: [u16; 2] = [NORMAL, CHANNEL_CLOSED];
/// Codes after which a client stops with a fatal error (its own bug or a
/// refused origin: retrying cannot help). `1003` and `1008` are the RFC's
/// codes for unacceptable data and policy violations.
pub const FATAL: [u16; 7] = [
    PROTOCOL_ERROR,
    1003,
    INVALID_PAYLOAD,
    1008,
    TOO_BIG,
    MALFORMED_FRAME,
    ORIGIN_NOT_ALLOWED,
];
