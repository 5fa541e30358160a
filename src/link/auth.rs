//! Authentication of peers and integrity of frames, from a pre-shared key.
//!
//! A page server that places whatever bytes it receives into a VM's memory is a
//! remote-code-execution hole unless its peer is authenticated; a source that serves memory to
//! anyone leaks it. With a key (`--key-file`, the same file on both hosts), every connection
//! starts with a mutual challenge-response and every frame after it is sealed:
//!
//! ```text
//! source                                              destination
//!   Challenge(nonce_s: 32 B)  ───────────────────────►
//!                             ◄─────────────────────── Auth(nonce_d: 32 B, tag_d: 32 B)
//!   verify tag_d = MAC(K, "dest"   ‖ nonce_s ‖ nonce_d)
//!   Auth(tag_s: 32 B)         ───────────────────────►  verify tag_s = MAC(K, "source" ‖ nonce_s ‖ nonce_d)
//!   then every frame: header ‖ AES-128-GCM(K_dir, nonce = seq, aad = header, body) ‖ tag (16 B)
//! ```
//!
//! `K` is derived from the key file with BLAKE3's KDF; the per-direction frame keys `K_dir`
//! from `K` and both nonces, so they are fresh per connection; `seq` counts frames per
//! direction, so a frame cannot be replayed, reordered or moved to another connection. Frames
//! are sealed with AES-128-GCM ([`super::seal`]): headers authenticated, bodies (the pages)
//! encrypted and authenticated. The proofs are BLAKE3 in keyed mode (a PRF); comparisons are
//! constant-time. A peer without the key is refused before any page is served or placed.

use std::path::Path;

use super::seal::{BadTag, FrameSeal, KEY_BYTES};

/// Bytes of a nonce.
pub const NONCE_BYTES: usize = 32;
/// Shortest key file accepted (128 bits).
pub const MIN_KEY_BYTES: usize = 16;

/// Authentication errors, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The key file is too short to be a secret.
    #[error("key file {path} has {len} bytes; use at least {MIN_KEY_BYTES} random bytes (e.g. `head -c 32 /dev/urandom > {path}`)")]
    Short {
        /// The path.
        path: String,
        /// Its length.
        len: usize,
    },
    /// The peer's proof did not match: another key, or no key.
    #[error("the peer failed authentication: it does not hold the same key (check --key-file on both sides)")]
    BadProof,
    /// A frame's tag did not hold: tampered, replayed, reordered, or another key.
    #[error(
        "frame {seq} failed its integrity check (tampered, replayed or from another connection)"
    )]
    BadTag {
        /// The frame's sequence number on this connection.
        seq: u64,
    },
    /// We hold a key but the source did not ask for it.
    #[error("the source sent no authentication challenge: it runs without a key (--insecure), or is not a postcopy source; give both sides the same --key-file")]
    NoChallenge,
    /// The source asks for a key we do not have.
    #[error("the source requires authentication: start the destination with --key-file (the same key file as the source)")]
    KeyRequired,
    /// The key file can be read by other users than its owner.
    #[error("key file {path} can be read by others (mode {mode:04o}): a key others can read authenticates them too; run `chmod 600 {path}`")]
    Exposed {
        /// The path.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// No randomness.
    #[error("cannot read /dev/urandom for a nonce: {0}")]
    Random(std::io::Error),
}

/// Refuses a regular key file that its group or others can read.
fn check_private(path: &Path, shown: &str) -> Result<(), AuthError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| AuthError::Read {
        path: shown.to_string(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_file() && mode & 0o077 != 0 {
        return Err(AuthError::Exposed {
            path: shown.to_string(),
            mode,
        });
    }
    Ok(())
}

/// Why a secret looks guessable, if it does: even drawn at random from the byte values it
/// uses, it would hold fewer than 128 bits (`len × log2(distinct values)`). A hex or base64
/// key of 32 random bytes passes; a repeated word does not.
pub fn weakness(secret: &[u8]) -> Option<String> {
    let mut seen = [false; 256];
    for &b in secret {
        seen[usize::from(b)] = true;
    }
    let distinct = seen.iter().filter(|&&s| s).count();
    let bits = secret.len() as f64 * (distinct as f64).log2();
    (bits < 128.0).then(|| {
        format!(
            "holds at most {bits:.0} bits ({distinct} distinct byte values in {} bytes): it does not look random",
            secret.len()
        )
    })
}

impl From<BadTag> for AuthError {
    fn from(e: BadTag) -> AuthError {
        AuthError::BadTag { seq: e.seq }
    }
}

/// A pre-shared key (its derived form; the file's bytes are not kept).
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// Derives the key from a secret of at least [`MIN_KEY_BYTES`] bytes.
    pub fn from_secret(secret: &[u8]) -> Key {
        assert!(secret.len() >= MIN_KEY_BYTES, "secret too short");
        Key(blake3::derive_key(
            "postcopy 2026-11 pre-shared key v1",
            secret,
        ))
    }

    /// Reads a key file: any bytes, at least [`MIN_KEY_BYTES`] (a trailing newline is kept:
    /// both sides read the same file). `-` reads the key from standard input until its end
    /// (a secret piped from a secret store, or from a parent process: no file at all).
    ///
    /// A regular file that its group or others may read is refused: it would let them in. A
    /// key that looks guessable (few distinct bytes) is accepted with a warning on stderr.
    pub fn from_file(path: &Path) -> Result<Key, AuthError> {
        let p = path.display().to_string();
        let read_err = |source| AuthError::Read {
            path: p.clone(),
            source,
        };
        let secret = if path == Path::new("-") {
            let mut secret = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut secret)
                .map_err(read_err)?;
            secret
        } else {
            check_private(path, &p)?;
            std::fs::read(path).map_err(read_err)?
        };
        if secret.len() < MIN_KEY_BYTES {
            return Err(AuthError::Short {
                path: p,
                len: secret.len(),
            });
        }
        if let Some(why) = weakness(&secret) {
            crate::warn!(
                "",
                "key file {p} {why}; make one with `head -c 32 /dev/urandom > FILE`"
            );
        }
        Ok(Key::from_secret(&secret))
    }

    /// Writes a new random key file (mode 0600).
    pub fn generate_file(path: &Path) -> Result<(), AuthError> {
        use std::os::unix::fs::OpenOptionsExt;
        let secret = random::<32>()?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(&secret)
        };
        write().map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })
    }

    fn mac(
        &self,
        label: &[u8],
        nonce_s: &[u8; NONCE_BYTES],
        nonce_d: &[u8; NONCE_BYTES],
    ) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label);
        h.update(nonce_s);
        h.update(nonce_d);
        h.finalize()
    }

    /// The destination's proof.
    pub fn dest_proof(&self, nonce_s: &[u8; NONCE_BYTES], nonce_d: &[u8; NONCE_BYTES]) -> [u8; 32] {
        *self
            .mac(b"postcopy dest proof", nonce_s, nonce_d)
            .as_bytes()
    }

    /// The source's proof.
    pub fn source_proof(
        &self,
        nonce_s: &[u8; NONCE_BYTES],
        nonce_d: &[u8; NONCE_BYTES],
    ) -> [u8; 32] {
        *self
            .mac(b"postcopy source proof", nonce_s, nonce_d)
            .as_bytes()
    }

    /// Checks a proof in constant time.
    pub fn check(expected: &[u8; 32], got: &[u8]) -> Result<(), AuthError> {
        let got: [u8; 32] = got.try_into().map_err(|_| AuthError::BadProof)?;
        if blake3::Hash::from(*expected) == blake3::Hash::from(got) {
            Ok(())
        } else {
            Err(AuthError::BadProof)
        }
    }

    /// The frame keys of a connection: (source → destination, destination → source).
    pub fn frame_keys(
        &self,
        nonce_s: &[u8; NONCE_BYTES],
        nonce_d: &[u8; NONCE_BYTES],
    ) -> (FrameSeal, FrameSeal) {
        let key = |label: &[u8]| -> [u8; KEY_BYTES] {
            self.mac(label, nonce_s, nonce_d).as_bytes()[..KEY_BYTES]
                .try_into()
                .expect("a BLAKE3 output has 32 bytes")
        };
        let s2d = key(b"postcopy v2 frames source to dest");
        let d2s = key(b"postcopy v2 frames dest to source");
        (FrameSeal::new(&s2d), FrameSeal::new(&d2s))
    }
}

/// A fresh random value from the kernel.
pub fn random<const N: usize>() -> Result<[u8; N], AuthError> {
    use std::io::Read;
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(AuthError::Random)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_hex_and_base64_keys_are_strong_repeated_words_are_weak() {
        assert!(weakness(&random::<32>().unwrap()).is_none());
        let hex: String = random::<32>()
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(weakness(hex.as_bytes()).is_none(), "{hex}");
        assert!(weakness(b"passwordpassword").is_some());
        assert!(weakness(&[7u8; 64]).is_some());
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let path =
            std::env::temp_dir().join(format!("postcopy-auth-test-{}.key", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Key::generate_file(&path).unwrap();
        assert!(Key::from_file(&path).is_ok(), "0600 is accepted");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Key::from_file(&path).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        assert!(err.contains("chmod 600") && err.contains("0644"), "{err}");
    }

    #[test]
    fn proofs_and_tags() {
        let k = Key::from_secret(b"0123456789abcdef0123");
        let other = Key::from_secret(b"0123456789abcdef0124");
        let (ns, nd) = ([1u8; 32], [2u8; 32]);
        assert!(Key::check(&k.dest_proof(&ns, &nd), &k.dest_proof(&ns, &nd)).is_ok());
        assert!(Key::check(&k.dest_proof(&ns, &nd), &other.dest_proof(&ns, &nd)).is_err());
        assert!(Key::check(&k.dest_proof(&ns, &nd), &k.source_proof(&ns, &nd)).is_err());
        let (mut s2d_tx, _) = k.frame_keys(&ns, &nd);
        let (mut s2d_rx, _) = k.frame_keys(&ns, &nd);
        let (mut b0, mut b1) = (*b"body", *b"body");
        let t0 = s2d_tx.seal(b"header", &mut b0);
        let t1 = s2d_tx.seal(b"header", &mut b1);
        assert_ne!(t0, t1, "the sequence number is in the tag");
        assert_ne!(b0, *b"body", "the body is encrypted");
        assert_ne!(b0, b1, "each frame has its own nonce");
        let opens = |rx: &FrameSeal, header: &[u8], body: [u8; 4], tag: &[u8]| {
            let mut body = body;
            rx.clone().open(header, &mut body, tag).map(|()| body)
        };
        assert!(opens(&s2d_rx, b"header", b1, &t1).is_err(), "reordered");
        let mut tampered = b0;
        tampered[0] ^= 1;
        assert!(
            opens(&s2d_rx, b"header", tampered, &t0).is_err(),
            "tampered"
        );
        assert!(
            opens(&s2d_rx, b"headeR", b0, &t0).is_err(),
            "header tampered"
        );
        let mut plain = b0;
        s2d_rx.open(b"header", &mut plain, &t0).unwrap();
        assert_eq!(plain, *b"body");
        let mut plain = b1;
        s2d_rx.open(b"header", &mut plain, &t1).unwrap();
        assert_eq!(plain, *b"body");
        let (other_rx, _) = other.frame_keys(&ns, &nd);
        assert!(opens(&other_rx, b"header", b0, &t0).is_err(), "another key");
    }
}
