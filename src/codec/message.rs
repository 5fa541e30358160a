//! The `Error` frame: a fatal error with a message, either way; the session ends.

use super::{Header, MAX_ERROR_BYTES};

/// Appends an `Error` frame with `message` (truncated to [`MAX_ERROR_BYTES`] on a char
/// boundary).
pub fn encode_error(message: &str, out: &mut Vec<u8>) {
    let mut end = message.len().min(MAX_ERROR_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Header::error(end as u32).encode_into(out);
    out.extend_from_slice(&message.as_bytes()[..end]);
}

/// Decodes an `Error` body (lossy: a hostile peer's bytes are shown, never trusted).
pub fn decode_error(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

#[cfg(test)]
mod tests {
    use super::super::{Kind, HEADER_BYTES};
    use super::*;

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        // "a" then two-byte chars: byte MAX_ERROR_BYTES falls inside a char.
        let message = format!("a{}", "é".repeat(MAX_ERROR_BYTES));
        let mut out = Vec::new();
        encode_error(&message, &mut out);
        let h = Header::decode(out[..HEADER_BYTES].try_into().unwrap()).unwrap();
        assert_eq!(h.kind, Kind::Error);
        assert_eq!(h.body_len as usize, MAX_ERROR_BYTES - 1);
        let got = decode_error(&out[HEADER_BYTES..]);
        assert_eq!(got, format!("a{}", "é".repeat(MAX_ERROR_BYTES / 2 - 1)));
    }
}
