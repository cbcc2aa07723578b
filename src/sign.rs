//! Signatures on shared action-cache entries.
//!
//! A blob or a layer manifest proves itself (it is named by its digest), but
//! an action entry — "step key K built layer L" — cannot: anyone could claim
//! any layer for a key. Entries pushed to a remote therefore carry ed25519
//! signatures over `"kiln action v2" ‖ K ‖ L ‖ T`, where T is when the entry
//! was signed (seconds since 1970, so a build can refuse entries older than
//! it accepts: a remote cannot roll a step back to an old signed layer
//! unnoticed), and a build trusts an entry only when a signature from one of
//! its trusted keys verifies.
//!
//! Signatures are made once, by the machine that built the step; an entry
//! pulled from a remote keeps its signatures (see [`Signed`]) and is passed
//! on with them, never signed again by the machine that merely has it.
//!
//! Files: `NAME.key` holds `kiln-ed25519-secret:<hex>` (mode 0600, never
//! shared); `NAME.pub` holds the public key, `kiln-ed25519:<hex>`, the form
//! `trusted_keys` takes.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::io_at::{io_at, IoAt};

const SECRET_PREFIX: &str = "kiln-ed25519-secret:";
const PUBLIC_PREFIX: &str = "kiln-ed25519:";

/// A key that signs entries.
pub struct SigningKey(ed25519_dalek::SigningKey);

/// A key whose signatures a build trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

/// One signature on an action entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// `kiln-ed25519:<hex>` of the signer.
    pub key: String,
    /// 64 bytes, hex.
    pub signature: String,
}

/// An entry's creation time and signatures, as the signer made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// When it was signed, seconds since 1970.
    pub created: u64,
    pub signatures: Vec<Signature>,
}

/// Seconds since 1970, now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How far an entry can be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Signed by this trusted key.
    Trusted(String),
    Unsigned,
    /// Signed, but by no key this build trusts.
    UnknownSigner,
    /// A trusted key's signature that does not verify (tampered entry).
    BadSignature,
}

fn message(key: &Digest, layer: &Digest, created: u64) -> Vec<u8> {
    let mut m = b"kiln action v2".to_vec();
    m.extend_from_slice(key.as_bytes());
    m.extend_from_slice(layer.as_bytes());
    m.extend_from_slice(&created.to_be_bytes());
    m
}

/// Why a key could not be made, read, written or parsed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no randomness to make a key from: {0}")]
    NoRandomness(String),
    #[error(transparent)]
    Io(#[from] IoAt),
    #[error(
        "{}: a signing key readable or writable by others (mode {mode:04o}) is not used; \
         run `chmod 600 {}` if no one else has copied it, or generate a new one",
        path.display(),
        path.display()
    )]
    Shared { path: PathBuf, mode: u32 },
    #[error("{}: not a kiln signing key (made by `kiln key generate`)", path.display())]
    NotASigningKey { path: PathBuf },
    #[error("{}: damaged signing key", path.display())]
    Damaged { path: PathBuf },
    #[error("`{0}` is not a kiln public key (`{PUBLIC_PREFIX}<64 hex digits>`)", PUBLIC_PREFIX = PUBLIC_PREFIX)]
    NotAPublicKey(String),
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<SigningKey, KeyError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| KeyError::NoRandomness(e.to_string()))?;
        Ok(SigningKey(ed25519_dalek::SigningKey::from_bytes(&secret)))
    }

    /// Reads a `NAME.key` file, which no one but its owner may read or write.
    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(io_at(path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Shared {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(io_at(path))?;
        let hex_text =
            text.trim()
                .strip_prefix(SECRET_PREFIX)
                .ok_or_else(|| KeyError::NotASigningKey {
                    path: path.to_path_buf(),
                })?;
        let mut secret = [0u8; 32];
        hex::decode_to_slice(hex_text, &mut secret).map_err(|_| KeyError::Damaged {
            path: path.to_path_buf(),
        })?;
        Ok(SigningKey(ed25519_dalek::SigningKey::from_bytes(&secret)))
    }

    /// Writes `PREFIX.key` (0600) and `PREFIX.pub`; refuses to overwrite.
    pub fn save(&self, prefix: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let secret = prefix.with_extension("key");
        let public = prefix.with_extension("pub");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret)
            .map_err(io_at(&secret))?;
        writeln!(file, "{SECRET_PREFIX}{}", hex::encode(self.0.to_bytes()))
            .map_err(io_at(&secret))?;
        std::fs::write(&public, format!("{}\n", self.public())).map_err(io_at(&public))?;
        Ok(())
    }

    /// The public half, as `kiln-ed25519:<hex>`.
    pub fn public(&self) -> String {
        format!(
            "{PUBLIC_PREFIX}{}",
            hex::encode(self.0.verifying_key().to_bytes())
        )
    }

    /// Signs "step key `key` built layer `layer`".
    pub fn sign(&self, key: &Digest, layer: &Digest, created: u64) -> Signature {
        Signature {
            key: self.public(),
            signature: hex::encode(self.0.sign(&message(key, layer, created)).to_bytes()),
        }
    }
}

impl PublicKey {
    /// Parses `kiln-ed25519:<hex>` (or the contents of a `.pub` file).
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let bad = || KeyError::NotAPublicKey(text.trim().to_string());
        let hex_text = text.trim().strip_prefix(PUBLIC_PREFIX).ok_or_else(bad)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_text, &mut bytes).map_err(|_| bad())?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| bad())
    }

    fn text(&self) -> String {
        format!("{PUBLIC_PREFIX}{}", hex::encode(self.0.to_bytes()))
    }
}

/// Judges an entry's signatures against the trusted keys.
pub fn trust(
    trusted: &[PublicKey],
    key: &Digest,
    layer: &Digest,
    created: u64,
    signatures: &[Signature],
) -> Trust {
    if signatures.is_empty() {
        return Trust::Unsigned;
    }
    let mut bad = false;
    for sig in signatures {
        let Some(public) = trusted.iter().find(|t| t.text() == sig.key) else {
            continue;
        };
        let mut bytes = [0u8; 64];
        let verified = hex::decode_to_slice(&sig.signature, &mut bytes).is_ok()
            && public
                .0
                .verify(
                    &message(key, layer, created),
                    &ed25519_dalek::Signature::from_bytes(&bytes),
                )
                .is_ok();
        if verified {
            return Trust::Trusted(sig.key.clone());
        }
        bad = true;
    }
    if bad {
        Trust::BadSignature
    } else {
        Trust::UnknownSigner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_trusted_keys_and_what_was_signed() {
        let ours = SigningKey::generate().unwrap();
        let theirs = SigningKey::generate().unwrap();
        let trusted = [PublicKey::parse(&ours.public()).unwrap()];
        let (k, l, t) = (Digest::of(b"key"), Digest::of(b"layer"), 1_800_000_000);
        let sig = ours.sign(&k, &l, t);
        let one = std::slice::from_ref(&sig);
        assert_eq!(
            trust(&trusted, &k, &l, t, one),
            Trust::Trusted(ours.public())
        );
        assert_eq!(
            trust(&trusted, &k, &Digest::of(b"other"), t, one),
            Trust::BadSignature
        );
        // An entry made to look newer (or older) than when it was signed.
        assert_eq!(
            trust(&trusted, &k, &l, t + 86_400, one),
            Trust::BadSignature
        );
        assert_eq!(
            trust(&trusted, &k, &l, t, &[theirs.sign(&k, &l, t)]),
            Trust::UnknownSigner
        );
        assert_eq!(trust(&trusted, &k, &l, t, &[]), Trust::Unsigned);
    }

    #[test]
    fn keys_round_trip_through_files() {
        let tmp = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        key.save(&tmp.path().join("ci")).unwrap();
        let loaded = SigningKey::load(&tmp.path().join("ci.key")).unwrap();
        assert_eq!(loaded.public(), key.public());
        let public = std::fs::read_to_string(tmp.path().join("ci.pub")).unwrap();
        assert!(PublicKey::parse(&public).is_ok());
        assert!(
            key.save(&tmp.path().join("ci")).is_err(),
            "never overwrites a key"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join("ci.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(PublicKey::parse("ed25519:abc").is_err());
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        SigningKey::generate()
            .unwrap()
            .save(&tmp.path().join("ci"))
            .unwrap();
        let path = tmp.path().join("ci.key");
        for mode in [0o644, 0o640, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = SigningKey::load(&path).err().expect("loaded a shared key");
            assert!(
                matches!(err, KeyError::Shared { mode: m, .. } if m == mode),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&format!("mode {mode:04o}")) && text.contains("chmod 600"),
                "{text}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(SigningKey::load(&path).is_ok());
    }
}
