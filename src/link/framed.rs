//! [`FramedStream`]: the one blocking reader and writer of frames.
//!
//! Every blocking connection of the product (the source's, the destination's handshake,
//! precopy, zero map, verify and recovery, the baseline's) reads and writes frames here. A
//! frame read is `header ‖ body ‖ tag`: the header is decoded (which bounds the body per kind),
//! the caller's admission check runs on the header before a byte of the body is read, and on an
//! authenticated connection the tag is checked (and the body decrypted) before anything is
//! returned. An `Error` frame is
//! returned as [`LinkError::Remote`], so it too is acted on only once its tag holds. A
//! `Heartbeat` frame is checked and skipped ([`super::liveness`]); a reader that waits for a
//! peer while keeping the link alive uses [`FramedStream::next_frame_live`].
//!
//! The engine's io_uring receive path has its own state machine (a frame arrives in pieces
//! there); its sealing uses [`seal_frames`], the same framing as [`FramedStream::write_frames`].

use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::liveness::{wait_readable, Liveness};
use super::seal::{Channel, FrameSeal, TAG_BYTES};
use crate::codec::{self, CodecError, Header, Kind, HEADER_BYTES};

/// Errors of a framed connection.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket failed (a timeout shows as `WouldBlock`/`TimedOut`, a cut mid-frame as
    /// `UnexpectedEof`).
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The peer sent something malformed or unexpected.
    #[error(transparent)]
    Protocol(#[from] CodecError),
    /// A frame failed its tag, or the peer its proof.
    #[error(transparent)]
    Auth(#[from] super::auth::AuthError),
    /// The peer sent an `Error` frame (its tag checked): its message.
    #[error("{0}")]
    Remote(String),
}

impl LinkError {
    /// Whether this is a read that timed out (the peer was silent).
    pub fn is_timeout(&self) -> bool {
        matches!(self, LinkError::Io { source, .. } if matches!(
            source.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ))
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> LinkError {
    move |source| LinkError::Io { what, source }
}

/// What [`FramedStream::poll_frame`] found.
#[derive(Debug)]
pub enum Polled {
    /// A frame (`None`: a clean end of stream between frames).
    Frame(Option<Header>),
    /// No frame yet (a heartbeat may have come or gone).
    Idle,
}

/// Reads ahead of the frames (for connections with many small frames or a long stream); off
/// until [`FramedStream::buffer_reads`].
struct ReadAhead {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// A blocking connection that carries frames, sealed once [`FramedStream::authenticated`].
pub struct FramedStream {
    stream: TcpStream,
    channel: Option<Channel>,
    ahead: Option<ReadAhead>,
    /// The body buffer (grown to the largest body seen, never shrunk: no allocation per frame).
    body: Vec<u8>,
    /// Bytes of `body` the last frame filled.
    body_len: usize,
    /// Scratch of [`write_frames`](Self::write_frames): where each frame ends and its tag.
    tags: Vec<(usize, [u8; TAG_BYTES])>,
    /// When the last whole frame (a heartbeat included) arrived, or the connection opened.
    last_rx: Instant,
    /// When the last frame was written, or the connection opened.
    last_tx: Instant,
}

impl std::fmt::Debug for FramedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramedStream")
            .field("stream", &self.stream)
            .field("authenticated", &self.channel.is_some())
            .finish()
    }
}

impl FramedStream {
    /// A connection whose frames are not (yet) authenticated.
    pub fn new(stream: TcpStream) -> FramedStream {
        FramedStream {
            stream,
            channel: None,
            ahead: None,
            body: Vec::new(),
            body_len: 0,
            tags: Vec::new(),
            last_rx: Instant::now(),
            last_tx: Instant::now(),
        }
    }

    /// A connection whose frames are sealed with `channel` (after the challenge-response).
    pub fn with_channel(stream: TcpStream, channel: Option<Channel>) -> FramedStream {
        FramedStream {
            channel,
            ..FramedStream::new(stream)
        }
    }

    /// From now on every frame is sealed and checked with `channel`.
    pub fn authenticated(&mut self, channel: Channel) {
        assert!(self.channel.is_none(), "a connection authenticates once");
        self.channel = Some(channel);
    }

    /// Whether frames are sealed.
    pub fn is_authenticated(&self) -> bool {
        self.channel.is_some()
    }

    /// The socket (for timeouts and shutdown; reading or writing it directly would break the
    /// framing).
    pub fn socket(&self) -> &TcpStream {
        &self.stream
    }

    /// Reads up to `capacity` bytes ahead from now on.
    pub fn buffer_reads(&mut self, capacity: usize) {
        assert!(self.ahead.is_none(), "read-ahead is turned on once");
        self.ahead = Some(ReadAhead {
            buf: vec![0u8; capacity],
            start: 0,
            end: 0,
        });
    }

    /// Bytes read ahead and not yet consumed.
    pub fn buffered_bytes(&self) -> usize {
        self.ahead.as_ref().map_or(0, |a| a.end - a.start)
    }

    /// The socket and the seal state, for a reader that takes over (the engine's ring). Fails
    /// when bytes were read ahead: they would be lost.
    pub fn into_parts(self) -> Result<(TcpStream, Option<Channel>), LinkError> {
        let ahead = self.buffered_bytes();
        if ahead > 0 {
            return Err(LinkError::Protocol(CodecError::BadBody {
                kind: Kind::Run,
                detail: format!("{ahead} bytes arrived before they were asked for"),
            }));
        }
        Ok((self.stream, self.channel))
    }

    /// Reads the next frame: `None` at a clean end of stream (between frames). Its body is in
    /// [`body`](Self::body) until the next read. An `Error` frame is [`LinkError::Remote`].
    pub fn read_frame(&mut self) -> Result<Option<Header>, LinkError> {
        self.read_frame_if(|_| Ok(()))
    }

    /// [`read_frame`](Self::read_frame), with `admit` run on the header before any byte of the
    /// body is read (an `Error` frame is always admitted). `Heartbeat` frames are skipped
    /// without being shown to `admit`.
    pub fn read_frame_if(
        &mut self,
        mut admit: impl FnMut(&Header) -> Result<(), CodecError>,
    ) -> Result<Option<Header>, LinkError> {
        loop {
            match self.read_one(&mut admit)? {
                Some(h) if h.kind == Kind::Heartbeat => {}
                h => return Ok(h),
            }
        }
    }

    /// The next frame of a peer that may stay quiet for long (a request, a verification's
    /// start), keeping the link alive meanwhile: see [`poll_frame`](Self::poll_frame).
    pub fn next_frame_live(
        &mut self,
        live: &Liveness,
        silence: Option<Duration>,
        mut admit: impl FnMut(&Header) -> Result<(), CodecError>,
    ) -> Result<Option<Header>, LinkError> {
        loop {
            if let Polled::Frame(h) = self.poll_frame(live, silence, &mut admit)? {
                return Ok(h);
            }
        }
    }

    /// Waits at most one heartbeat interval for the next frame. While nothing arrives, a
    /// `Heartbeat` goes out once nothing was sent for `live.heartbeat`, so the peer knows this
    /// side is there; nothing at all from the peer for `silence` (`None`: no limit) is a dead
    /// link (`TimedOut`). Once a frame has begun to arrive, the rest of it is read with the
    /// socket's read timeout. A heartbeat from the peer is [`Polled::Idle`].
    pub fn poll_frame(
        &mut self,
        live: &Liveness,
        silence: Option<Duration>,
        admit: &mut impl FnMut(&Header) -> Result<(), CodecError>,
    ) -> Result<Polled, LinkError> {
        if self.buffered_bytes() == 0 {
            if silence.is_some_and(|s| self.last_rx.elapsed() >= s) {
                return Err(io("the peer has been silent")(
                    std::io::ErrorKind::TimedOut.into(),
                ));
            }
            let beat_in = live.heartbeat.saturating_sub(self.last_tx.elapsed());
            let dead_in = silence.map_or(beat_in, |s| s.saturating_sub(self.last_rx.elapsed()));
            let readable = wait_readable(&self.stream, beat_in.min(dead_in))
                .map_err(io("wait for a frame"))?;
            if !readable {
                self.heartbeat_if_due(live)?;
                return Ok(Polled::Idle);
            }
        }
        match self.read_one(admit)? {
            Some(h) if h.kind == Kind::Heartbeat => Ok(Polled::Idle),
            h => Ok(Polled::Frame(h)),
        }
    }

    /// Whether a frame (or the start of one) can be read without waiting.
    pub fn frame_ready(&self) -> Result<bool, LinkError> {
        Ok(self.buffered_bytes() > 0
            || wait_readable(&self.stream, Duration::ZERO).map_err(io("wait for a frame"))?)
    }

    /// Keeps an idle link alive without waiting: reads the heartbeats that arrived, sends one if
    /// due. Any other frame, the peer's close, or nothing from it for `live.timeout` is an
    /// error: the link is not idle any more, or dead.
    pub fn keep_alive(&mut self, live: &Liveness) -> Result<(), LinkError> {
        while self.frame_ready()? {
            match self.read_one(&mut |_| Ok(()))? {
                Some(h) if h.kind == Kind::Heartbeat => {}
                Some(h) => {
                    return Err(LinkError::Protocol(CodecError::Unexpected {
                        got: h.kind,
                        expected: "Heartbeat (an idle link)",
                    }))
                }
                None => {
                    return Err(io("the peer closed an idle link")(
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ))
                }
            }
        }
        if self.last_rx.elapsed() >= live.timeout {
            return Err(io("the peer has been silent")(
                std::io::ErrorKind::TimedOut.into(),
            ));
        }
        self.heartbeat_if_due(live)
    }

    /// Sends a `Heartbeat` (sealed on an authenticated connection).
    pub fn heartbeat(&mut self) -> Result<(), LinkError> {
        let mut h = [0u8; HEADER_BYTES];
        Header::heartbeat().encode(&mut h);
        self.write_frames(&mut h).map(|_| ())
    }

    /// Whether the peer closed or reset the connection (checked without waiting).
    pub fn peer_hung_up(&self) -> bool {
        super::liveness::peer_hung_up(&self.stream)
    }

    /// Sends a `Heartbeat` if nothing was written for `live.heartbeat`.
    pub fn heartbeat_if_due(&mut self, live: &Liveness) -> Result<(), LinkError> {
        if self.last_tx.elapsed() >= live.heartbeat {
            self.heartbeat()?;
        }
        Ok(())
    }

    /// How long since the last frame arrived (or the connection opened, or
    /// [`heard_now`](Self::heard_now)).
    pub fn silent_for(&self) -> Duration {
        self.last_rx.elapsed()
    }

    /// Counts the peer as heard from now (it had no reason to speak until now).
    pub fn heard_now(&mut self) {
        self.last_rx = Instant::now();
    }

    /// One frame, heartbeats included.
    fn read_one(
        &mut self,
        admit: &mut impl FnMut(&Header) -> Result<(), CodecError>,
    ) -> Result<Option<Header>, LinkError> {
        let mut head = [0u8; HEADER_BYTES];
        if !self.fill(&mut head, true)? {
            return Ok(None);
        }
        // decode() bounded body_len for the kind.
        let h = Header::decode(&head)?;
        // An `Error` is always admitted (it is returned as such), a `Heartbeat` too (every
        // reader skips it: no caller's admission speaks of it).
        if !matches!(h.kind, Kind::Error | Kind::Heartbeat) {
            admit(&h)?;
        }
        let len = h.body_len as usize;
        self.body_len = 0;
        if self.body.len() < len {
            self.body.resize(len, 0);
        }
        let mut body = std::mem::take(&mut self.body);
        let read = self.fill(&mut body[..len], false);
        self.body = body;
        read?;
        if let Some(c) = self.channel.as_mut() {
            let mut tag = [0u8; TAG_BYTES];
            let Self { ahead, stream, .. } = self;
            fill(stream, ahead.as_mut(), &mut tag, false)?;
            c.rx.open(&head, &mut self.body[..len], &tag)
                .map_err(super::auth::AuthError::from)?;
        }
        self.last_rx = Instant::now();
        if h.kind == Kind::Error {
            return Err(LinkError::Remote(codec::decode_error(&self.body[..len])));
        }
        self.body_len = len;
        Ok(Some(h))
    }

    /// The body of the last frame read.
    pub fn body(&self) -> &[u8] {
        &self.body[..self.body_len]
    }

    /// `false` at a clean end of stream before the first byte (only when `eof_ok`).
    fn fill(&mut self, dst: &mut [u8], eof_ok: bool) -> Result<bool, LinkError> {
        let Self { ahead, stream, .. } = self;
        fill(stream, ahead.as_mut(), dst, eof_ok)
    }

    /// Writes whole frames (back to back in `frames`), each sealed on an authenticated
    /// connection (its body encrypted in place: `frames` holds ciphertext afterwards); frames and
    /// tags go out with one writev, no copy of the pages. Returns the bytes written.
    pub fn write_frames(&mut self, frames: &mut [u8]) -> Result<usize, LinkError> {
        self.last_tx = Instant::now();
        let Some(c) = self.channel.as_mut() else {
            self.stream.write_all(frames).map_err(io("write frames"))?;
            return Ok(frames.len());
        };
        self.tags.clear();
        let tags = &mut self.tags;
        seal_each(&mut c.tx, frames, |end, tag| tags.push((end, tag)));
        let mut slices = Vec::with_capacity(2 * self.tags.len());
        let mut start = 0;
        for (end, tag) in &self.tags {
            slices.push(IoSlice::new(&frames[start..*end]));
            slices.push(IoSlice::new(tag));
            start = *end;
        }
        let total = frames.len() + self.tags.len() * TAG_BYTES;
        let mut bufs = &mut slices[..];
        while !bufs.is_empty() {
            match self.stream.write_vectored(bufs) {
                Ok(0) => return Err(io("write frames")(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("write frames")(e)),
            }
        }
        Ok(total)
    }

    /// Sends an `Error` frame (sealed when authenticated) and closes our direction; best
    /// effort: the peer may be gone.
    pub fn send_error(&mut self, message: &str) {
        let mut out = Vec::new();
        codec::encode_error(message, &mut out);
        let _ = self.write_frames(&mut out);
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }
}

/// Where the whole frame that starts at `at` in `frames` ends.
fn frame_end(frames: &[u8], at: usize) -> usize {
    assert!(at + HEADER_BYTES <= frames.len(), "a partial frame to send");
    let body_len = u32::from_le_bytes(frames[at + 8..at + 12].try_into().expect("4 bytes"));
    let end = at + HEADER_BYTES + body_len as usize;
    assert!(end <= frames.len(), "a partial frame to send");
    end
}

/// Calls `f(start, end)` for each whole frame in `frames` (header at `start`, body to `end`).
fn for_each_frame(frames: &[u8], mut f: impl FnMut(usize, usize)) {
    let mut at = 0;
    while at < frames.len() {
        let end = frame_end(frames, at);
        f(at, end);
        at = end;
    }
}

/// Appends whole `frames` to `out`, each sealed by `tx` when given: the framing of
/// [`FramedStream::write_frames`] for a sender that owns its buffer (the engine's ring slots,
/// test peers).
pub fn seal_frames(tx: Option<&mut FrameSeal>, frames: &[u8], out: &mut Vec<u8>) {
    let Some(tx) = tx else {
        out.extend_from_slice(frames);
        return;
    };
    for_each_frame(frames, |start, end| {
        let at = out.len();
        out.extend_from_slice(&frames[start..end]);
        let tag = seal_one(tx, &mut out[at..]);
        out.extend_from_slice(&tag);
    });
}

/// Seals each whole frame of `frames` in order, in place: `f(end, tag)` per frame.
fn seal_each(tx: &mut FrameSeal, frames: &mut [u8], mut f: impl FnMut(usize, [u8; TAG_BYTES])) {
    let mut at = 0;
    while at < frames.len() {
        let end = frame_end(frames, at);
        f(end, seal_one(tx, &mut frames[at..end]));
        at = end;
    }
}

/// Seals one whole frame (`header ‖ body`) in place; its tag.
fn seal_one(tx: &mut FrameSeal, frame: &mut [u8]) -> [u8; TAG_BYTES] {
    let (header, body) = frame.split_at_mut(HEADER_BYTES);
    tx.seal(header, body)
}

/// Fills `dst` from the read-ahead buffer, then the socket. `Ok(false)`: a clean end of stream
/// before the first byte, when `eof_ok`.
fn fill(
    stream: &mut TcpStream,
    ahead: Option<&mut ReadAhead>,
    dst: &mut [u8],
    eof_ok: bool,
) -> Result<bool, LinkError> {
    let what = if eof_ok {
        "read frame"
    } else {
        "read frame body"
    };
    let Some(a) = ahead else {
        return read_exact(stream, dst, eof_ok).map_err(io(what));
    };
    let mut got = 0;
    while got < dst.len() {
        if a.start == a.end {
            let want = dst.len() - got;
            if want >= a.buf.len() {
                // A large body goes straight to its place.
                let ok =
                    read_exact(stream, &mut dst[got..], eof_ok && got == 0).map_err(io(what))?;
                return Ok(ok);
            }
            let n = read_some(stream, &mut a.buf).map_err(io(what))?;
            if n == 0 {
                if eof_ok && got == 0 {
                    return Ok(false);
                }
                return Err(io(what)(std::io::ErrorKind::UnexpectedEof.into()));
            }
            (a.start, a.end) = (0, n);
        }
        let n = (a.end - a.start).min(dst.len() - got);
        dst[got..got + n].copy_from_slice(&a.buf[a.start..a.start + n]);
        a.start += n;
        got += n;
    }
    Ok(true)
}

fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// `read_exact`, except that an end of stream before the first byte is `Ok(false)` when
/// `eof_ok`.
fn read_exact(stream: &mut TcpStream, dst: &mut [u8], eof_ok: bool) -> std::io::Result<bool> {
    let mut got = 0;
    while got < dst.len() {
        match read_some(stream, &mut dst[got..])? {
            0 if got == 0 && eof_ok => return Ok(false),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::auth::Key;
    use std::net::TcpListener;

    /// A connected pair of framed streams over loopback, sealed with the same key when `key`.
    fn pair(key: bool) -> (FramedStream, TcpStream, FramedStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let raw = server.try_clone().unwrap();
        let (mut tx, mut rx) = (FramedStream::new(client), FramedStream::new(server));
        if key {
            let k = Key::from_secret(b"a test key of at least 16 bytes");
            let (s2d, d2s) = k.frame_keys(&[1; 32], &[2; 32]);
            tx.authenticated(Channel {
                tx: s2d.clone(),
                rx: d2s.clone(),
            });
            rx.authenticated(Channel { tx: d2s, rx: s2d });
        }
        tx.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        rx.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (tx, raw, rx)
    }

    fn page_frame(page: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Header::pages(0, 7, 1, 0, page.len() as u64).encode_into(&mut out);
        out.extend_from_slice(page);
        out
    }

    #[test]
    fn a_sealed_page_is_ciphertext_on_the_wire_and_plaintext_once_read() {
        let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let (mut tx, mut raw, _) = pair(true);
        let n = tx.write_frames(&mut page_frame(&page)).unwrap();
        assert_eq!(n, HEADER_BYTES + page.len() + TAG_BYTES);
        let mut wire = vec![0u8; n];
        raw.read_exact(&mut wire).unwrap();
        let body = &wire[HEADER_BYTES..HEADER_BYTES + page.len()];
        assert!(
            body.windows(16).all(|w| !page.windows(16).any(|p| p == w)),
            "no 16 bytes of the page cross the wire in the clear"
        );

        let (mut tx, _, mut rx) = pair(true);
        tx.write_frames(&mut page_frame(&page)).unwrap();
        let h = rx.read_frame().unwrap().expect("a frame");
        assert_eq!((h.kind, h.page), (Kind::Pages, 7));
        assert_eq!(rx.body(), &page[..]);
    }

    #[test]
    fn a_heartbeat_is_skipped_whatever_the_reader_admits() {
        // A reader that admits only `Pages` (the baseline's stream receiver) still gets its
        // page when the peer's heartbeats come first, sealed or not.
        for key in [false, true] {
            let (mut tx, _, mut rx) = pair(key);
            tx.heartbeat().unwrap();
            tx.heartbeat().unwrap();
            tx.write_frames(&mut page_frame(&[9u8; 4096])).unwrap();
            let h = rx
                .read_frame_if(|h| match h.kind {
                    Kind::Pages => Ok(()),
                    got => Err(CodecError::Unexpected {
                        got,
                        expected: "Pages",
                    }),
                })
                .unwrap()
                .expect("a frame");
            assert_eq!(h.kind, Kind::Pages);
            assert_eq!(rx.body(), &[9u8; 4096][..]);
        }
    }

    #[test]
    fn an_unsealed_page_crosses_as_is() {
        let page = vec![0xabu8; 4096];
        let (mut tx, mut raw, _) = pair(false);
        let n = tx.write_frames(&mut page_frame(&page)).unwrap();
        let mut wire = vec![0u8; n];
        raw.read_exact(&mut wire).unwrap();
        assert_eq!(&wire[HEADER_BYTES..], &page[..]);
    }
}
