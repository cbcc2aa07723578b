//! Content digests and the canonical encoder every key is built with.
//!
//! A [`Digest`] is a blake3 hash, shown and stored as 64 lowercase hex digits.
//! [`KeyEncoder`] writes values in a length-prefixed, typed, versionless byte
//! stream (the caller writes its own format version first), so two different
//! inputs can never encode to the same bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A blake3 digest of some content.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Hashes a byte slice.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Wraps a finished blake3 hash.
    pub fn from_hash(hash: blake3::Hash) -> Digest {
        Digest(*hash.as_bytes())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, for humans.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

/// The error for text that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a blake3 digest (64 hex digits)")]
pub struct BadDigest(String);

impl FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Digest, BadDigest> {
        let mut out = [0u8; 32];
        if s.len() != 64 || hex::decode_to_slice(s, &mut out).is_err() {
            return Err(BadDigest(s.to_string()));
        }
        Ok(Digest(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Canonical, length-prefixed encoding fed straight into blake3.
///
/// Every value carries a one-byte type tag and, for variable-size values, a
/// little-endian u64 length, so the encoding is unambiguous.
pub struct KeyEncoder {
    hasher: blake3::Hasher,
}

impl KeyEncoder {
    /// Starts an encoding under a domain name (e.g. `"kiln step key"`).
    pub fn new(domain: &str) -> KeyEncoder {
        let mut enc = KeyEncoder {
            hasher: blake3::Hasher::new(),
        };
        enc.str(domain);
        enc
    }

    /// Encodes a byte string.
    pub fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.hasher.update(b"b");
        self.hasher.update(&(value.len() as u64).to_le_bytes());
        self.hasher.update(value);
        self
    }

    /// Encodes the `len` bytes `reader` gives, as [`KeyEncoder::bytes`]
    /// does, without holding them; an error if it gives another number.
    pub fn reader(
        &mut self,
        len: u64,
        mut reader: impl std::io::Read,
    ) -> std::io::Result<&mut Self> {
        self.hasher.update(b"b");
        self.hasher.update(&len.to_le_bytes());
        let read = std::io::copy(&mut reader, &mut self.hasher)?;
        if read != len {
            return Err(std::io::Error::other(format!(
                "{read} bytes where {len} were expected (did it change while being read?)"
            )));
        }
        Ok(self)
    }

    /// Encodes a text string.
    pub fn str(&mut self, value: &str) -> &mut Self {
        self.hasher.update(b"s");
        self.hasher.update(&(value.len() as u64).to_le_bytes());
        self.hasher.update(value.as_bytes());
        self
    }

    /// Encodes an unsigned integer.
    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.hasher.update(b"u");
        self.hasher.update(&value.to_le_bytes());
        self
    }

    /// Encodes a boolean.
    pub fn bool(&mut self, value: bool) -> &mut Self {
        self.hasher.update(if value { b"T" } else { b"F" });
        self
    }

    /// Encodes a digest.
    pub fn digest(&mut self, value: &Digest) -> &mut Self {
        self.hasher.update(b"d");
        self.hasher.update(value.as_bytes());
        self
    }

    /// Encodes an optional text string.
    pub fn opt_str(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            None => self.hasher.update(b"N"),
            Some(v) => {
                self.hasher.update(b"S");
                return self.str(v);
            }
        };
        self
    }

    /// Encodes a list of text strings, with its length first.
    pub fn strs<S: AsRef<str>>(&mut self, values: &[S]) -> &mut Self {
        self.hasher.update(b"l");
        self.hasher.update(&(values.len() as u64).to_le_bytes());
        for v in values {
            self.str(v.as_ref());
        }
        self
    }

    /// The digest of everything encoded so far.
    pub fn finish(&self) -> Digest {
        Digest::from_hash(self.hasher.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_value_encodes_as_its_bytes() {
        let mut a = KeyEncoder::new("t");
        a.bytes(b"some contents");
        let mut b = KeyEncoder::new("t");
        b.reader(13, &b"some contents"[..]).unwrap();
        assert_eq!(a.finish(), b.finish());
        // A source that gives another length than it said is an error.
        assert!(KeyEncoder::new("t")
            .reader(14, &b"some contents"[..])
            .is_err());
    }

    #[test]
    fn hex_round_trip() {
        let d = Digest::of(b"kiln");
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert!("xyz".parse::<Digest>().is_err());
        assert!("ab".repeat(31).parse::<Digest>().is_err());
    }

    #[test]
    fn encoding_is_unambiguous() {
        let a = KeyEncoder::new("t").str("ab").str("c").finish();
        let b = KeyEncoder::new("t").str("a").str("bc").finish();
        assert_ne!(a, b);
        let c = KeyEncoder::new("t")
            .strs(&["a"])
            .strs(&[] as &[&str])
            .finish();
        let d = KeyEncoder::new("t")
            .strs(&[] as &[&str])
            .strs(&["a"])
            .finish();
        assert_ne!(c, d);
        let e = KeyEncoder::new("t").opt_str(None).finish();
        let f = KeyEncoder::new("t").opt_str(Some("")).finish();
        assert_ne!(e, f);
    }

    #[test]
    fn golden_digest() {
        // Pins the encoding: changing it must change the format version.
        let d = KeyEncoder::new("kiln test")
            .str("x")
            .u64(7)
            .bool(true)
            .finish();
        assert_eq!(
            d.to_hex(),
            "30c93338994ffaf2769769473148e377817e03a23dd8d31fe850ecb4570ec0ca"
        );
        // The same bytes written out: tag, little-endian length, value.
        let mut wire = Vec::new();
        for (tag, value) in [(b's', &b"kiln test"[..]), (b's', b"x")] {
            wire.push(tag);
            wire.extend((value.len() as u64).to_le_bytes());
            wire.extend(value);
        }
        wire.push(b'u');
        wire.extend(7u64.to_le_bytes());
        wire.push(b'T');
        assert_eq!(d, Digest::of(&wire));
        assert_eq!(
            Digest::of(b"").to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }
}
