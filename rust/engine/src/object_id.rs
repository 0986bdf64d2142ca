//! Object names: BLAKE3-256 digests of a chunk's raw bytes, written as 64
//! lowercase hex digits. Only validated ids ever become paths.

use crate::error::{Error, Result};
use std::fmt;

/// A validated object id (BLAKE3-256 digest).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub [u8; 32]);

impl ObjectId {
    /// The id of `data`: BLAKE3-256 of the raw bytes, using rayon for large inputs.
    pub fn of(data: &[u8]) -> Self {
        let mut hasher = blake3::Hasher::new();
        if data.len() >= 1 << 20 {
            hasher.update_rayon(data);
        } else {
            hasher.update(data);
        }
        ObjectId(*hasher.finalize().as_bytes())
    }

    /// Parses 64 lowercase hex digits; anything else is refused.
    pub fn parse(text: &str) -> Result<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return Err(Error::Invalid(format!(
                "object id {text:?} is not 64 lowercase hex digits"
            )));
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0]);
            let lo = hex_value(pair[1]);
            match (hi, lo) {
                (Some(h), Some(l)) => out[i] = (h << 4) | l,
                _ => {
                    return Err(Error::Invalid(format!(
                        "object id {text:?} is not 64 lowercase hex digits"
                    )))
                }
            }
        }
        Ok(ObjectId(out))
    }

    /// The 64-digit lowercase hex form.
    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(DIGITS[(b >> 4) as usize] as char);
            s.push(DIGITS[(b & 15) as usize] as char);
        }
        s
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({})", self.hex())
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_known_digest() {
        let id = ObjectId::of(b"abc");
        assert_eq!(
            id.hex(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        assert_eq!(ObjectId::parse(&id.hex()).unwrap(), id);
    }

    #[test]
    fn large_input_hash_matches_serial() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(ObjectId::of(&data).0, *blake3::hash(&data).as_bytes());
    }

    #[test]
    fn parse_refuses_paths_and_uppercase() {
        for bad in [
            "../etc/passwd",
            "",
            "6437B3AC38465133FFB63B75273A8DB548C558465D79DB03FD359C6CD5BD9D85",
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d8/",
        ] {
            assert!(ObjectId::parse(bad).is_err(), "{bad}");
        }
    }
}
