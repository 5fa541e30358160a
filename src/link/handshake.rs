//! The challenge-response that opens every authenticated connection (see [`super::auth`] for the
//! exchange): [`accept`] on the source, [`connect`] on the destination. Both sides' steps are here,
//! one after the other, so they cannot drift apart.

use super::auth::{random, AuthError, Key, NONCE_BYTES};
use super::framed::{FramedStream, LinkError};
use super::seal::Channel;
use crate::codec::{CodecError, Frame, Kind};

/// The source's side of the challenge-response: challenge, check the destination's proof, prove
/// our own. On success `link`'s frames are sealed and checked from now on. A peer that does not
/// answer with a valid proof gets nothing else.
pub fn accept(link: &mut FramedStream, key: &Key) -> Result<(), LinkError> {
    let nonce_s: [u8; NONCE_BYTES] = random()?;
    send(link, &Frame::Challenge(nonce_s.to_vec()))?;
    let answer = match expect(link, Kind::Auth, 2 * NONCE_BYTES) {
        Err(LinkError::Protocol(CodecError::Unexpected { got, .. })) => {
            return Err(unexpected(
                got,
                "Auth (this source requires a key: start the destination with --key-file)",
            ))
        }
        r => r?,
    };
    let nonce_d: [u8; NONCE_BYTES] = answer[..NONCE_BYTES].try_into().expect("32 bytes");
    Key::check(&key.dest_proof(&nonce_s, &nonce_d), &answer[NONCE_BYTES..])?;
    send(
        link,
        &Frame::Auth(key.source_proof(&nonce_s, &nonce_d).to_vec()),
    )?;
    let (s2d, d2s) = key.frame_keys(&nonce_s, &nonce_d);
    link.authenticated(Channel { tx: s2d, rx: d2s });
    Ok(())
}

/// The destination's side: answer the source's challenge with our proof, check its proof. On
/// success `link`'s frames are sealed and checked from now on. A source that sends no
/// challenge within the link's read timeout runs without a key.
pub fn connect(link: &mut FramedStream, key: &Key) -> Result<(), LinkError> {
    let challenge = match expect(link, Kind::Challenge, NONCE_BYTES) {
        Err(e) if e.is_timeout() => return Err(AuthError::NoChallenge.into()),
        Err(LinkError::Protocol(CodecError::Unexpected { got, .. })) => {
            return Err(unexpected(
                got,
                "Challenge (we hold a key: the source must run with the same --key-file)",
            ))
        }
        r => r?,
    };
    let nonce_s: [u8; NONCE_BYTES] = challenge[..].try_into().expect("32 bytes");
    let nonce_d: [u8; NONCE_BYTES] = random()?;
    let mut answer = nonce_d.to_vec();
    answer.extend_from_slice(&key.dest_proof(&nonce_s, &nonce_d));
    send(link, &Frame::Auth(answer))?;
    let proof = expect(link, Kind::Auth, 32)?;
    Key::check(&key.source_proof(&nonce_s, &nonce_d), &proof)?;
    let (s2d, d2s) = key.frame_keys(&nonce_s, &nonce_d);
    link.authenticated(Channel { tx: d2s, rx: s2d });
    Ok(())
}

fn unexpected(got: Kind, expected: &'static str) -> LinkError {
    LinkError::Protocol(CodecError::Unexpected { got, expected })
}

fn send(link: &mut FramedStream, frame: &Frame) -> Result<(), LinkError> {
    let mut out = Vec::with_capacity(128);
    frame.encode_into(&mut out);
    link.write_frames(&mut out).map(|_| ())
}

/// Reads one frame of `kind` with a body of `len` bytes. A peer that hangs up instead has proved
/// nothing; it is reported as a broken connection (a peer that refuses a proof says so in an
/// `Error` frame), so a destination tries again.
fn expect(link: &mut FramedStream, kind: Kind, len: usize) -> Result<Vec<u8>, LinkError> {
    match link.read_frame()? {
        Some(h) if h.kind == kind && link.body().len() == len => Ok(link.body().to_vec()),
        Some(h) if h.kind == kind => Err(AuthError::BadProof.into()),
        Some(h) => Err(unexpected(h.kind, "an authentication frame")),
        None => Err(LinkError::Io {
            what: "the peer hung up during the challenge-response",
            source: std::io::ErrorKind::UnexpectedEof.into(),
        }),
    }
}
