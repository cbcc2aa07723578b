//! Remote-cache settings: from the command line, then environment variables,
//! then a `kiln.toml` in the current directory (or `--config FILE`).
//!
//! ```toml
//! [cache]
//! remotes = ["oci://registry.example.com/team/kiln", "file:///mnt/team/kiln-cache"]  # in this order
//! push = true                                  # push what this machine builds
//! signing_key = "/etc/kiln/ci.key"             # from `kiln key generate`
//! trusted_keys = ["kiln-ed25519:…", "keys/laptops.pub"]
//! ```
//!
//! Environment: `KILN_REMOTES` (space-separated), `KILN_PUSH` (`1`/`0`),
//! `KILN_SIGNING_KEY`, `KILN_TRUSTED_KEYS` (space-separated keys or files).
//! A machine's own signing key is always trusted.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::io_at::{io_at, IoAt};
use crate::remote::{self, OpenError, Remotes};
use crate::sign::{KeyError, PublicKey, SigningKey};

/// Why the remote-cache settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The settings file named by `--config` cannot be read.
    #[error(transparent)]
    Read(#[from] IoAt),
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// The signing key, or a trusted key given as text.
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("trusted key {path}: {source}")]
    TrustedKeyRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    TrustedKeyFile {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error(transparent)]
    Remote(#[from] OpenError),
    #[error("KILN_REMOTE_MAX_AGE_DAYS={value}: give a whole number of days")]
    MaxAge {
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
}

/// The settings as given on the command line (empty = not given).
#[derive(Debug, Clone, Default)]
pub struct RemoteFlags {
    pub remotes: Vec<String>,
    pub push: Option<bool>,
    pub signing_key: Option<PathBuf>,
    pub trusted_keys: Vec<String>,
    /// Refuse remote entries signed longer ago than this many days.
    pub max_age_days: Option<u64>,
    pub config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    cache: CacheSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheSection {
    #[serde(default)]
    remotes: Vec<String>,
    push: Option<bool>,
    signing_key: Option<PathBuf>,
    #[serde(default)]
    trusted_keys: Vec<String>,
    max_age_days: Option<u64>,
}

fn env_list(name: &str) -> Vec<String> {
    std::env::var(name)
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Reads a trusted key: the key text itself, or a `.pub` file holding it.
fn trusted_key(text: &str, base: &Path) -> Result<PublicKey, ConfigError> {
    if text.starts_with("kiln-ed25519:") {
        return Ok(PublicKey::parse(text)?);
    }
    let path = base.join(text);
    let contents = match std::fs::read_to_string(&path) {
        Ok(contents) => contents,
        Err(source) => return Err(ConfigError::TrustedKeyRead { path, source }),
    };
    PublicKey::parse(&contents).map_err(|source| ConfigError::TrustedKeyFile { path, source })
}

/// Resolves the remotes, keys and push setting for a build.
pub fn remotes(flags: &RemoteFlags) -> Result<Remotes, ConfigError> {
    let config_path = flags
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("kiln.toml"));
    let file: FileConfig = match std::fs::read_to_string(&config_path) {
        Ok(text) => toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: config_path.clone(),
            source,
        })?,
        Err(_) if flags.config.is_none() => FileConfig::default(),
        Err(e) => return Err(io_at(&config_path)(e).into()),
    };
    let base = config_path.parent().unwrap_or(Path::new("")).to_path_buf();
    let pick = |cli: &Vec<String>, env: &str, file: &Vec<String>| -> Vec<String> {
        if !cli.is_empty() {
            return cli.clone();
        }
        let from_env = env_list(env);
        if !from_env.is_empty() {
            from_env
        } else {
            file.clone()
        }
    };
    let urls = pick(&flags.remotes, "KILN_REMOTES", &file.cache.remotes);
    let push = flags
        .push
        .or_else(|| {
            std::env::var("KILN_PUSH")
                .ok()
                .map(|v| v == "1" || v == "true")
        })
        .or(file.cache.push)
        .unwrap_or(true);
    let signing_path = flags
        .signing_key
        .clone()
        .or_else(|| std::env::var_os("KILN_SIGNING_KEY").map(PathBuf::from))
        .or_else(|| file.cache.signing_key.map(|p| base.join(p)));
    let signing = signing_path.as_deref().map(SigningKey::load).transpose()?;
    let mut trusted = pick(
        &flags.trusted_keys,
        "KILN_TRUSTED_KEYS",
        &file.cache.trusted_keys,
    )
    .iter()
    .map(|t| trusted_key(t, &base))
    .collect::<Result<Vec<_>, _>>()?;
    if let Some(key) = &signing {
        trusted.push(PublicKey::parse(&key.public())?);
    }
    let opened = urls
        .iter()
        .map(|u| remote::open(u))
        .collect::<Result<Vec<_>, _>>()?;
    let max_age_days = match flags.max_age_days {
        Some(days) => Some(days),
        None => match std::env::var("KILN_REMOTE_MAX_AGE_DAYS") {
            Ok(v) => Some(
                v.trim()
                    .parse::<u64>()
                    .map_err(|source| ConfigError::MaxAge { value: v, source })?,
            ),
            Err(_) => file.cache.max_age_days,
        },
    };
    let max_age = max_age_days.map(|d| std::time::Duration::from_secs(d.saturating_mul(86_400)));
    Ok(Remotes::new(opened, trusted, signing, push).with_max_age(max_age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_settings_apply_and_flags_win() {
        let tmp = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        key.save(&tmp.path().join("ci")).unwrap();
        let config = tmp.path().join("kiln.toml");
        std::fs::write(
            &config,
            format!("[cache]\nremotes = [\"{}\"]\nsigning_key = \"ci.key\"\ntrusted_keys = [\"ci.pub\"]\n", tmp.path().join("shared").display()),
        )
        .unwrap();
        let flags = RemoteFlags {
            config: Some(config.clone()),
            ..RemoteFlags::default()
        };
        let r = remotes(&flags).unwrap();
        assert!(format!("{r:?}").contains("shared"));
        let flags = RemoteFlags {
            config: Some(config.clone()),
            remotes: vec!["/elsewhere".into()],
            ..RemoteFlags::default()
        };
        assert!(format!("{:?}", remotes(&flags).unwrap()).contains("elsewhere"));
        std::fs::write(&config, "[cache]\nremote = []\n").unwrap();
        let err = remotes(&RemoteFlags {
            config: Some(config.clone()),
            ..RemoteFlags::default()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(err.to_string().contains("unknown field"), "{err}");
        let missing = tmp.path().join("absent.toml");
        let err = remotes(&RemoteFlags {
            config: Some(missing.clone()),
            ..RemoteFlags::default()
        })
        .unwrap_err();
        assert!(matches!(&err, ConfigError::Read(e) if e.path == missing));
        std::fs::write(&config, "").unwrap();
        let err = remotes(&RemoteFlags {
            config: Some(config),
            trusted_keys: vec!["nowhere.pub".into()],
            ..RemoteFlags::default()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::TrustedKeyRead { .. }));
        assert!(err.to_string().starts_with("trusted key "), "{err}");
    }
}
