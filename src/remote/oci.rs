//! An OCI registry as a remote, `oci://HOST[:PORT]/REPOSITORY`, spoken to
//! with the distribution API that every registry implements (the CNCF
//! distribution registry, Harbor, GHCR, ECR, GitLab, …) through the
//! `oci-client` crate, on a small current-thread tokio runtime of its own.
//!
//! Layout: one image manifest per step key, tagged `kiln-<64 hex of the key>`:
//! ```text
//! image manifest        application/vnd.oci.image.manifest.v1+json
//!   artifactType        application/vnd.kiln.step.v2
//!   config              application/vnd.kiln.action.v1+json  the signed entry (RemoteAction JSON)
//!   layers[0]           application/vnd.kiln.layer.v1+json   the layer manifest
//!   layers[1..=p]       application/vnd.kiln.pack.v1         the packs, in order: the small file
//!                                                            blobs end to end, sorted by blake3
//!   layers[p+1..]       application/vnd.kiln.blob.v1         each other file blob, sorted by blake3
//!   annotations         dev.kiln.key, dev.kiln.step
//! every descriptor: annotations {"dev.kiln.blake3": "<64 hex>"} (a pack's: of the whole pack)
//! ```
//! Which blobs are packed, in which pack and in what order follows from the
//! signed layer alone ([`pack`]): a reader checks that the manifest's packs
//! have the sizes the layer gives their blobs, cuts each pack back into
//! blobs as it downloads it (keeping only those the local store lacks), and
//! [`super::Remotes::fetch`] checks every blob it keeps against its blake3
//! name, as it checks everything downloaded. A step of a few dozen files
//! is two or three requests to pull, not one per file. The empty blob is in
//! no pack and no layer: oci-client cannot upload zero bytes, and a reader
//! needs no download to know it. Registries name blobs by sha256; kiln's
//! blake3 names ride along in the annotations. At most [`pack::MAX_SINGLES`]
//! blobs are left on their own (more are all packed), so a manifest stays
//! well within the layers registries take (ECR: 4,200).
//!
//! The layout of kiln before packs (`application/vnd.kiln.step.v1`: a
//! layer per file blob, an image index for a step of more than 4,000) is
//! not read: to this kiln it is a miss, and the step is built and pushed
//! anew over the same tag.
//!
//! Pushing sends the packs and blobs the registry lacks (a HEAD first; a
//! pack and a blob are read twice, never held in memory: once for their
//! sha256, once as the upload streams), the layer manifest, the entry, and
//! the manifest last. A step whose tag already names
//! this very entry (the same config digest: signatures are deterministic) is
//! not pushed again. Two machines pushing one step at once both succeed:
//! blobs are content-addressed, and whichever manifest lands last is valid.
//! (A registry can stumble while two clients write the same blob: calls it
//! answers with 5xx or 429 are tried up to 3 times, and a manifest refused
//! for a blob the registry does not see is sent again, blobs first.)
//!
//! Transport: TLS, except plain HTTP to a loopback registry (`localhost`,
//! 127.0.0.0/8, `[::1]`). `oci+http://HOST/REPO` asks for plain HTTP anywhere
//! (a registry without TLS on a network you trust); `oci+https://` asks for
//! TLS even on loopback (a tunnel to a real registry). Time-outs: connecting
//! 3 s, no data for 10 s, a whole request 30 s plus 1 s per MiB. A registry
//! that is down, slow or erring is a miss, never a failed build.
//!
//! Credentials, the first found: `KILN_REGISTRY_TOKEN` (a bearer token) or
//! `KILN_REGISTRY_USERNAME` with `KILN_REGISTRY_PASSWORD`, given only to the
//! registry `KILN_REGISTRY_HOST` names (`host[:port]`, required with them: a
//! `kiln.toml` pointing a build at another registry never receives them);
//! then docker's `config.json` (`$DOCKER_CONFIG/config.json`,
//! else `~/.docker/config.json`, as `docker login` writes it): the `auths` entry
//! for the registry's host, its `auth` (base64 `user:password`) or
//! `registrytoken`; else anonymous. oci-client does the registry's token dance
//! (a `WWW-Authenticate: Bearer` challenge) with them. Credential helpers
//! (`credsStore`, `credHelpers`) are not run.

mod pack;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    OciDescriptor, OciImageManifest, OciManifest, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde::Deserialize;
use sha2::Digest as _;

use super::{
    time_limit, BlobSink, Entry, Failure, Pushed, Remote, MAX_ACTION_BYTES, MAX_LAYER_BYTES,
    REQUEST_TIMEOUT,
};
use crate::blob_stream::IncomingBlob;
use crate::digest::Digest;
use crate::io_at::{io_at, IoAt};
use crate::layer::Layer;
use crate::store::Store;
use pack::{Packer, Plan, Splitter};

/// The config blob: the signed entry.
pub const ACTION_TYPE: &str = "application/vnd.kiln.action.v1+json";
/// The layer manifest.
pub const LAYER_TYPE: &str = "application/vnd.kiln.layer.v1+json";
/// A file's contents.
pub const BLOB_TYPE: &str = "application/vnd.kiln.blob.v1";
/// Small files' contents, end to end ([`pack`]).
pub const PACK_TYPE: &str = "application/vnd.kiln.pack.v1";
/// The manifest's artifact type.
pub const ARTIFACT_TYPE: &str = "application/vnd.kiln.step.v2";
/// The annotation that carries a descriptor's blake3 digest.
pub const BLAKE3_ANNOTATION: &str = "dev.kiln.blake3";
const KEY_ANNOTATION: &str = "dev.kiln.key";
const STEP_ANNOTATION: &str = "dev.kiln.step";
/// How often a call is tried when the registry says it failed or is busy,
/// and a manifest sent when the registry says it lacks a blob just pushed.
const TRIES: u32 = 3;
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// Blobs downloaded or uploaded at once.
const CONCURRENCY: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `url` names an OCI registry.
pub fn is_oci_url(url: &str) -> bool {
    ["oci://", "oci+http://", "oci+https://"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
}

/// Where a registry remote is: parsed from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Location {
    /// `HOST[:PORT]`, as the registry's API is addressed.
    registry: String,
    repository: String,
    plain_http: bool,
}

impl Location {
    fn parse(url: &str) -> Result<Location, String> {
        let bad = |why: &str| format!("remote `{url}`: {why}; write oci://HOST[:PORT]/REPOSITORY");
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        if rest.contains(['?', '#']) {
            return Err(bad(
                "no query or fragment is allowed (for plain HTTP, write oci+http://)",
            ));
        }
        let (authority, repository) = rest.split_once('/').ok_or_else(|| bad("no repository"))?;
        if authority.contains('@') {
            return Err(format!(
                "remote `{url}`: credentials do not go in the URL; set KILN_REGISTRY_USERNAME and \
                 KILN_REGISTRY_PASSWORD, or `docker login` to the registry"
            ));
        }
        let host = host_of(authority).ok_or_else(|| bad("not a host[:port]"))?;
        let repository = repository.trim_end_matches('/');
        let component = regex::Regex::new(
            r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$",
        )
        .expect("the repository pattern compiles");
        if !component.is_match(repository) {
            return Err(bad(&format!(
                "`{repository}` is not a repository name (lowercase letters, digits, `.`, `_`, `-`, \
                 `/` between components; no tag)"
            )));
        }
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        let plain_http = match scheme {
            "oci" => loopback,
            "oci+http" => true,
            "oci+https" => false,
            _ => return Err(bad("unknown scheme")),
        };
        Ok(Location {
            registry: authority.to_ascii_lowercase(),
            repository: repository.to_string(),
            plain_http,
        })
    }
}

/// The host of `HOST[:PORT]` or `[IPV6][:PORT]`, if well formed.
fn host_of(authority: &str) -> Option<&str> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if let Some(port) = port {
        port.parse::<u16>().ok()?;
    }
    let valid = !host.is_empty()
        && (authority.starts_with('[')
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'));
    valid.then_some(host)
}

/// Docker's `config.json`, the part kiln reads.
#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Debug, Default, Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    registrytoken: Option<String>,
}

/// The names Docker Hub goes by.
const DOCKER_HUB: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// The host part of a `config.json` key (`https://host:port/v1/` or `host:port`).
fn auth_key_host(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    key.split('/').next().unwrap_or(key).to_ascii_lowercase()
}

/// Finds the credentials for `registry`: `env` reads an environment
/// variable, `config` is the text of docker's `config.json` if there is one.
fn credentials(
    registry: &str,
    env: impl Fn(&str) -> Option<String>,
    config: Option<(PathBuf, String)>,
) -> Result<RegistryAuth, String> {
    let token = env("KILN_REGISTRY_TOKEN").filter(|t| !t.is_empty());
    let basic = match (env("KILN_REGISTRY_USERNAME"), env("KILN_REGISTRY_PASSWORD")) {
        (Some(user), Some(password)) => Some(RegistryAuth::Basic(user, password)),
        (None, None) => None,
        _ => {
            return Err(
                "set both KILN_REGISTRY_USERNAME and KILN_REGISTRY_PASSWORD, or neither".into(),
            )
        }
    };
    let from_env = token.map(RegistryAuth::Bearer).or(basic);
    if let Some(auth) = from_env {
        let Some(owner) = env("KILN_REGISTRY_HOST").filter(|h| !h.trim().is_empty()) else {
            return Err(
                "KILN_REGISTRY_TOKEN or KILN_REGISTRY_USERNAME is set, but KILN_REGISTRY_HOST \
                 does not say which registry they belong to; set it to that registry's host[:port]"
                    .into(),
            );
        };
        if auth_key_host(owner.trim()) == registry.to_ascii_lowercase() {
            return Ok(auth);
        }
    }
    let Some((path, text)) = config else {
        return Ok(RegistryAuth::Anonymous);
    };
    let parsed: DockerConfig =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let wanted = registry.to_ascii_lowercase();
    let same = |host: &str| {
        host == wanted || (DOCKER_HUB.contains(&host) && DOCKER_HUB.contains(&wanted.as_str()))
    };
    let Some(entry) = parsed
        .auths
        .iter()
        .find(|(key, _)| same(&auth_key_host(key)))
        .map(|(_, entry)| entry)
    else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok());
        let (user, password) = decoded
            .as_deref()
            .and_then(|d| d.split_once(':'))
            .ok_or_else(|| {
                format!(
                    "{}: auths.{registry}.auth is not base64 of `user:password`",
                    path.display()
                )
            })?;
        return Ok(RegistryAuth::Basic(user.to_string(), password.to_string()));
    }
    if let Some(token) = entry.registrytoken.clone().filter(|t| !t.is_empty()) {
        return Ok(RegistryAuth::Bearer(token));
    }
    if let (Some(user), Some(password)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(user.clone(), password.clone()));
    }
    Ok(RegistryAuth::Anonymous)
}

/// Docker's `config.json` and its text, if there is one.
fn docker_config() -> Result<Option<(PathBuf, String)>, IoAt> {
    let dir = match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".docker"),
            None => return Ok(None),
        },
    };
    let path = dir.join("config.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some((path, text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at(&path)(e)),
    }
}

/// How a registry call went wrong.
enum CallError {
    /// 404, or the registry's "unknown" codes: the thing is not there.
    NotFound,
    /// What arrived does not match its sha256.
    Digest,
    /// A manifest names a blob the registry says it lacks.
    BlobUnknown(String),
    /// The registry failed or is busy (5xx, 429): worth another try.
    Busy(String),
    Other(String),
}

impl From<OciDistributionError> for CallError {
    fn from(e: OciDistributionError) -> CallError {
        let message = with_causes(&e);
        match &e {
            OciDistributionError::ServerError { code: 400, .. }
                if message.contains("BLOB_UNKNOWN") =>
            {
                CallError::BlobUnknown(message)
            }
            OciDistributionError::RegistryError { envelope, .. }
                if envelope
                    .errors
                    .iter()
                    .any(|e| e.code == OciErrorCode::ManifestBlobUnknown) =>
            {
                CallError::BlobUnknown(message)
            }
            OciDistributionError::ImageManifestNotFoundError(_) => CallError::NotFound,
            OciDistributionError::ServerError { code: 404, .. } => CallError::NotFound,
            OciDistributionError::RegistryError { envelope, .. }
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        OciErrorCode::BlobUnknown
                            | OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                    )
                }) =>
            {
                CallError::NotFound
            }
            OciDistributionError::ServerError { code, .. } if *code >= 500 || *code == 429 => {
                CallError::Busy(message)
            }
            OciDistributionError::RequestError(e)
                if e.status()
                    .is_some_and(|s| s.is_server_error() || s.as_u16() == 429) =>
            {
                CallError::Busy(message)
            }
            OciDistributionError::RegistryError { envelope, .. }
                if envelope
                    .errors
                    .iter()
                    .any(|e| e.code == OciErrorCode::Toomanyrequests) =>
            {
                CallError::Busy(message)
            }
            OciDistributionError::DigestError(_) => CallError::Digest,
            _ => CallError::Other(message),
        }
    }
}

impl CallError {
    fn into_message(self) -> String {
        match self {
            CallError::NotFound => "not found".into(),
            CallError::Digest => "content does not match its digest".into(),
            CallError::BlobUnknown(message)
            | CallError::Busy(message)
            | CallError::Other(message) => message,
        }
    }
}

/// An error with its causes (`error sending request: connection refused`).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    message
}

/// Where a download goes: memory for entries and manifests
/// ([`CappedBuffer`]), a file of the local store for blobs ([`ToFile`]).
/// Either refuses bytes past the size the download may have.
trait Download: Write {
    /// Empties it, for a download tried again.
    fn restart(&mut self) -> std::io::Result<()>;
    /// Why it refused a write, when it did: too many bytes, or the local
    /// disk. Either is this entry's problem, not the registry failing.
    fn refused(&self) -> Option<String>;
}

/// A [`Download`] as the `AsyncWrite` oci-client writes to. The writes are
/// done in place: they go to memory or the page cache.
struct InPlace<'a, D>(&'a mut D);

impl<D: Download> tokio::io::AsyncWrite for InPlace<'_, D> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(self.get_mut().0.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.get_mut().0.flush())
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A download buffer that refuses to grow past `max` bytes.
struct CappedBuffer {
    bytes: Vec<u8>,
    max: u64,
    overflowed: bool,
}

impl CappedBuffer {
    fn new(max: u64) -> CappedBuffer {
        CappedBuffer {
            bytes: Vec::new(),
            max,
            overflowed: false,
        }
    }
}

impl Download for CappedBuffer {
    fn restart(&mut self) -> std::io::Result<()> {
        self.bytes.clear();
        self.overflowed = false;
        Ok(())
    }

    fn refused(&self) -> Option<String> {
        self.overflowed
            .then(|| format!("larger than the {} bytes it may have (tampered)", self.max))
    }
}

impl Write for CappedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() as u64 + buf.len() as u64 > self.max {
            self.overflowed = true;
            return Err(std::io::Error::other(format!(
                "the registry sent more than the {} bytes the object may have",
                self.max
            )));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A blob downloaded straight into a file in the local store's `tmp/`.
struct ToFile {
    blob: IncomingBlob,
    /// Why a write was refused.
    refused: Option<String>,
}

impl Download for ToFile {
    fn restart(&mut self) -> std::io::Result<()> {
        self.refused = None;
        self.blob.restart()
    }

    fn refused(&self) -> Option<String> {
        self.refused.clone()
    }
}

impl Write for ToFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.blob.write(buf);
        if let Err(e) = &written {
            self.refused = Some(match self.blob.overflowed() {
                true => format!("{e} (tampered)"),
                false => format!("cannot store the download: {e}"),
            });
        }
        written
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.blob.flush()
    }
}

/// What `reader` reads, as the chunks an upload sends, read as they are needed.
fn chunks_of(
    reader: impl Read + Send + 'static,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, OciDistributionError>> + Send + 'static {
    stream::try_unfold(reader, |mut reader| async move {
        let mut chunk = Vec::with_capacity(CHUNK);
        (&mut reader)
            .take(CHUNK as u64)
            .read_to_end(&mut chunk)
            .map_err(|e| OciDistributionError::GenericError(Some(e.to_string())))?;
        if chunk.is_empty() {
            return Ok(None);
        }
        Ok(Some((bytes::Bytes::from(chunk), reader)))
    })
}

/// The most bytes an upload sends at once.
const CHUNK: usize = 256 << 10;

/// What an upload sends: bytes at hand (entries, layer manifests), a blob
/// of the local store, or a pack of its blobs, streamed from their files.
enum Upload<'a> {
    Bytes(&'a [u8]),
    Stored(&'a Store, Digest),
    Pack(&'a Store, &'a [pack::Blob]),
}

impl Upload<'_> {
    /// A reader of what it sends (checking a stored blob as it reads it).
    fn reader(&self) -> std::io::Result<Box<dyn Read + Send + 'static>> {
        Ok(match self {
            Upload::Bytes(bytes) => Box::new(std::io::Cursor::new(bytes.to_vec())),
            Upload::Stored(store, blob) => Box::new(
                store
                    .open_blob(blob)
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
            ),
            Upload::Pack(store, pack) => Box::new(Packer::new(store, pack)),
        })
    }
}

/// Runs a registry call, each try within `limit`; tries again after a
/// moment when the registry says it failed or is busy (5xx, 429), as the
/// distribution registry can while another client writes the same blob.
async fn call<T>(
    limit: Duration,
    mut request: impl AsyncFnMut() -> Result<T, OciDistributionError>,
) -> Result<T, CallError> {
    let mut tries = 1;
    loop {
        let result = match tokio::time::timeout(limit, request()).await {
            Ok(result) => result.map_err(CallError::from),
            Err(_) => Err(CallError::Other(format!(
                "no answer within {} s",
                limit.as_secs()
            ))),
        };
        match result {
            Err(CallError::Busy(_)) if tries < TRIES => {
                tokio::time::sleep(RETRY_PAUSE * tries).await;
                tries += 1;
            }
            result => return result,
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// The sha256, blake3 and length of what `reader` reads to its end.
fn digests_of(mut reader: impl Read) -> std::io::Result<(String, Digest, u64)> {
    let (mut sha256, mut blake3) = (sha2::Sha256::new(), blake3::Hasher::new());
    let mut buffer = vec![0u8; CHUNK];
    let mut size = 0;
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        sha256.update(&buffer[..n]);
        blake3.update(&buffer[..n]);
        size += n as u64;
    }
    let sha256 = format!("sha256:{}", hex::encode(sha256.finalize()));
    Ok((sha256, Digest::from_hash(blake3.finalize()), size))
}

/// A registry repository as a remote.
pub struct OciRemote {
    url: String,
    location: Location,
    /// For blobs and manifest pushes.
    client: Client,
    /// For manifest pulls (see `authenticate`).
    manifests: Client,
    auth: RegistryAuth,
    /// Whether the clients know how to authenticate (see `authenticate`).
    ready: tokio::sync::OnceCell<Result<(), String>>,
    /// `None` only while being dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

/// A client for the registry at `location`.
fn new_client(location: &Location) -> Result<Client, OciDistributionError> {
    // The one TLS implementation kiln is built with (ring); an error only
    // says another part of the process installed one first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::try_from(ClientConfig {
        protocol: if location.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        use_monolithic_push: true,
        platform_resolver: None,
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        user_agent: concat!("kiln/", env!("CARGO_PKG_VERSION")),
        ..ClientConfig::default()
    })
}

/// Why an OCI registry remote cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OciOpenError {
    /// The URL is not `oci://HOST[:PORT]/REPOSITORY`; the message names it.
    #[error("{0}")]
    Url(String),
    /// Docker's `config.json` is there but cannot be read.
    #[error(transparent)]
    DockerConfig(#[from] IoAt),
    /// The environment or `config.json` gives no usable credentials.
    #[error("remote `{url}`: {reason}")]
    Credentials { url: String, reason: String },
    #[error("remote `{url}`: HTTP client: {source}")]
    Client {
        url: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("remote `{url}`: async runtime: {source}")]
    Runtime {
        url: String,
        #[source]
        source: std::io::Error,
    },
}

impl OciRemote {
    /// Opens `oci://HOST[:PORT]/REPOSITORY` (or `oci+http://`, `oci+https://`)
    /// with the credentials the environment gives. Contacts nothing yet.
    pub fn open(url: &str) -> Result<OciRemote, OciOpenError> {
        let location = Location::parse(url).map_err(OciOpenError::Url)?;
        let auth = credentials(
            &location.registry,
            |name| std::env::var(name).ok(),
            docker_config()?,
        )
        .map_err(|reason| OciOpenError::Credentials {
            url: url.to_string(),
            reason,
        })?;
        let client = || {
            new_client(&location).map_err(|source| OciOpenError::Client {
                url: url.to_string(),
                source,
            })
        };
        let (client, manifests) = (client()?, client()?);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| OciOpenError::Runtime {
                url: url.to_string(),
                source,
            })?;
        Ok(OciRemote {
            url: url.trim_end_matches('/').to_string(),
            location,
            client,
            manifests,
            auth,
            ready: tokio::sync::OnceCell::new(),
            runtime: Some(runtime),
        })
    }

    /// Runs a registry call to its end on this remote's runtime (several
    /// threads may at once).
    fn block_on<F: Future>(&self, call: F) -> F::Output {
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the remote")
            .block_on(call)
    }

    fn tagged(&self, tag: String) -> Reference {
        let location = &self.location;
        Reference::with_tag(location.registry.clone(), location.repository.clone(), tag)
    }

    /// The tag of a step key's manifest.
    fn tag(&self, key: &Digest) -> Reference {
        self.tagged(format!("kiln-{}", key.to_hex()))
    }

    /// Any reference in the repository (blob calls use only the repository).
    fn repository(&self) -> Reference {
        self.tagged("kiln".into())
    }

    /// Gives the clients the credentials, once. oci-client asks a registry
    /// whether it wants a token before every request of a client that holds
    /// credentials but got no token, so `client` (every blob call) gets none
    /// when the registry is open to anonymous users (a LAN or test one): half
    /// the requests. `manifests` (which oci-client always gives them to) asks.
    /// A registry that does not answer that first question is not asked again
    /// (so steps asking at once do not each wait for its time-out).
    async fn authenticate(&self) -> Result<(), String> {
        self.ready
            .get_or_init(|| async {
                let repository = self.repository();
                let token = call(REQUEST_TIMEOUT, || {
                    self.manifests
                        .auth(&repository, &self.auth, RegistryOperation::Pull)
                })
                .await
                .map_err(CallError::into_message)?;
                if token.is_some() || !matches!(self.auth, RegistryAuth::Anonymous) {
                    self.client
                        .store_auth_if_needed(repository.resolve_registry(), &self.auth)
                        .await;
                }
                Ok(())
            })
            .await
            .clone()
    }

    /// Reads a manifest or index; `None` if there is none.
    async fn manifest(&self, reference: &Reference) -> Result<Option<OciManifest>, Failure> {
        let raw = call(REQUEST_TIMEOUT, || {
            self.manifests.pull_manifest_raw(
                reference,
                &self.auth,
                &[OCI_IMAGE_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE],
            )
        })
        .await;
        let bytes = match raw {
            Ok((bytes, _digest)) => bytes,
            Err(CallError::NotFound) => return Ok(None),
            Err(CallError::Digest) => {
                return Err(Failure::Rejected(
                    "the entry's manifest does not match its digest (tampered)".into(),
                ))
            }
            Err(e) => return Err(Failure::Unreachable(e.into_message())),
        };
        let not_kiln = |why: String| {
            Failure::Rejected(format!(
                "`{}` is not a kiln entry ({why})",
                reference.tag().or(reference.digest()).unwrap_or_default()
            ))
        };
        let manifest: OciManifest =
            serde_json::from_slice(&bytes).map_err(|e| not_kiln(e.to_string()))?;
        let media_type = match &manifest {
            OciManifest::Image(m) => m.media_type.as_deref(),
            OciManifest::ImageIndex(i) => i.media_type.as_deref(),
        };
        if let Some(t) = media_type {
            if t != OCI_IMAGE_MEDIA_TYPE && t != OCI_IMAGE_INDEX_MEDIA_TYPE {
                return Err(not_kiln(format!("a {t}")));
            }
        }
        if let OciManifest::Image(m) = &manifest {
            if m.config.media_type != ACTION_TYPE {
                return Err(not_kiln(format!("its config is a {}", m.config.media_type)));
            }
        }
        Ok(Some(manifest))
    }

    /// Downloads a blob of at most `max` bytes into `out` (its descriptor
    /// may not declare more, and no more is taken whatever the registry
    /// sends); `false` if the registry lacks it. Bytes that do not match
    /// their sha256 are kept all the same: the caller checks every object
    /// against kiln's own (blake3) digest, and says so.
    async fn pull(
        &self,
        descriptor: &OciDescriptor,
        max: u64,
        out: &mut impl Download,
    ) -> Result<bool, Failure> {
        let declared = u64::try_from(descriptor.size).unwrap_or(u64::MAX);
        if declared > max {
            return Err(Failure::Rejected(format!(
                "the registry declares {declared} bytes for a blob of at most {max}"
            )));
        }
        // Only the digest: `urls` in a manifest nobody signed are not followed.
        let clean = OciDescriptor {
            media_type: descriptor.media_type.clone(),
            digest: descriptor.digest.clone(),
            size: descriptor.size,
            ..OciDescriptor::default()
        };
        let (repository, clean) = (&self.repository(), &clean);
        let pulled = call(time_limit(declared), async || {
            out.restart()
                .map_err(|e| OciDistributionError::GenericError(Some(e.to_string())))?;
            match self
                .client
                .pull_blob(repository, clean, InPlace(&mut *out))
                .await
            {
                Ok(()) | Err(OciDistributionError::DigestError(_)) => Ok(()),
                Err(e) => Err(e),
            }
        });
        match pulled.await {
            Ok(()) => Ok(true),
            Err(_) if out.refused().is_some() => Err(Failure::Rejected(format!(
                "blob {}: {}",
                descriptor.digest,
                out.refused().unwrap_or_default()
            ))),
            Err(CallError::NotFound) => Ok(false),
            Err(e) => Err(Failure::Unreachable(e.into_message())),
        }
    }

    /// Downloads an entry or a manifest of at most `max` bytes into memory.
    async fn pull_bytes(
        &self,
        descriptor: &OciDescriptor,
        max: u64,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let mut buffer = CappedBuffer::new(max);
        let found = self.pull(descriptor, max, &mut buffer).await?;
        Ok(found.then_some(buffer.bytes))
    }

    /// Uploads a blob unless the registry has it; returns its descriptor.
    /// A stored blob or a pack is read twice, never held in memory: once for
    /// its digests (checking each stored blob's blake3 on the way), then as
    /// the upload streams.
    async fn upload(
        &self,
        media_type: &str,
        source: Upload<'_>,
    ) -> Result<OciDescriptor, CallError> {
        let other = |e: &dyn std::fmt::Display| CallError::Other(e.to_string());
        let reader = source.reader().map_err(|e| other(&e))?;
        let (digest, blake3, size) = tokio::task::spawn_blocking(move || digests_of(reader))
            .await
            .map_err(|e| other(&e))?
            .map_err(|e| other(&e))?;
        let repository = self.repository();
        let exists = call(REQUEST_TIMEOUT, || {
            self.client.blob_exists(&repository, &digest)
        })
        .await?;
        if !exists {
            let (repository, digest) = (&repository, &digest);
            call(time_limit(size), async || {
                let reader = source
                    .reader()
                    .map_err(|e| OciDistributionError::GenericError(Some(e.to_string())))?;
                self.client
                    .push_blob_stream(repository, chunks_of(reader), digest, Some(size))
                    .await
            })
            .await?;
        }
        Ok(OciDescriptor {
            media_type: media_type.to_string(),
            digest,
            size: size as i64,
            annotations: Some(BTreeMap::from([(
                BLAKE3_ANNOTATION.to_string(),
                blake3.to_hex(),
            )])),
            ..OciDescriptor::default()
        })
    }

    /// Puts a manifest under `tag`.
    async fn put_manifest(&self, tag: &Reference, manifest: &OciManifest) -> Result<(), CallError> {
        let body = serde_json::to_vec(manifest).map_err(|e| CallError::Other(e.to_string()))?;
        let content_type = http::HeaderValue::from_str(manifest.content_type())
            .map_err(|e| CallError::Other(e.to_string()))?;
        let body = bytes::Bytes::from(body);
        call(REQUEST_TIMEOUT, || {
            self.client
                .push_manifest_raw(tag, body.clone(), content_type.clone())
        })
        .await?;
        Ok(())
    }

    /// Downloads a pack, cutting it into the blobs `wanted` names and
    /// handing each to `each`; returns those it handed (none if the
    /// registry lacks the pack). The pack must be the size its blobs have
    /// in the signed layer, and no byte more is read.
    async fn pull_pack(
        &self,
        descriptor: &OciDescriptor,
        pack: &[pack::Blob],
        wanted: &HashSet<Digest>,
        store: &Store,
        each: &mut BlobSink<'_>,
    ) -> Result<HashSet<Digest>, Failure> {
        let size = pack::size(pack);
        if u64::try_from(descriptor.size) != Ok(size) {
            return Err(Failure::Rejected(format!(
                "pack {} is declared {} bytes, its blobs have {size} in the signed layer (tampered)",
                descriptor.digest, descriptor.size
            )));
        }
        let mut splitter = Splitter::new(pack, wanted, store, each);
        if !self.pull(descriptor, size, &mut splitter).await? {
            return Ok(HashSet::new());
        }
        splitter
            .finish()
            .map_err(|why| Failure::Rejected(format!("pack {}: {why}", descriptor.digest)))
    }

    async fn find(&self, key: &Digest) -> Result<Option<OciEntry<'_>>, Failure> {
        self.authenticate().await.map_err(Failure::Unreachable)?;
        let Some(top) = self.manifest(&self.tag(key)).await? else {
            return Ok(None);
        };
        // An image index, or another artifact type: kiln's layout before
        // packs (or not kiln's), a miss.
        let OciManifest::Image(manifest) = top else {
            return Ok(None);
        };
        if manifest.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
            return Ok(None);
        }
        let action = self
            .pull_bytes(&manifest.config, MAX_ACTION_BYTES)
            .await?
            .ok_or_else(|| Failure::Rejected("the entry's config blob is missing".into()))?;
        let mut by_blake3 = HashMap::new();
        let mut packs = Vec::new();
        for layer in manifest.layers {
            if layer.media_type == PACK_TYPE {
                packs.push(layer);
                continue;
            }
            let name = layer
                .annotations
                .as_ref()
                .and_then(|a| a.get(BLAKE3_ANNOTATION))
                .and_then(|hex| hex.parse::<Digest>().ok());
            if let Some(name) = name {
                by_blake3.insert(name, layer);
            }
        }
        Ok(Some(OciEntry {
            remote: self,
            action,
            by_blake3,
            packs,
        }))
    }

    async fn push_step(&self, key: &Digest, result: &Pushed<'_>) -> Result<(), String> {
        self.authenticate().await?;
        let tag = self.tag(key);
        let config_digest = sha256(result.action_json);
        // Already there: nothing to do.
        let present = match self.manifest(&tag).await {
            Ok(Some(OciManifest::Image(m))) => {
                m.config.digest == config_digest
                    && m.artifact_type.as_deref() == Some(ARTIFACT_TYPE)
            }
            Ok(Some(OciManifest::ImageIndex(_)) | None) | Err(Failure::Rejected(_)) => false,
            Err(Failure::Unreachable(e)) => return Err(e),
        };
        if present {
            return Ok(());
        }
        // A registry may not see a blob it just stored, or one another
        // pusher is storing at the same moment (the distribution registry
        // rewrites its links in place): then the manifest is refused, and
        // sending the blobs it lacks again and the manifest again succeeds.
        let mut tries = 1;
        loop {
            match self.push_objects(key, result).await {
                Err(CallError::BlobUnknown(_)) if tries < TRIES => {
                    tokio::time::sleep(RETRY_PAUSE * tries).await;
                    tries += 1;
                }
                result => return result.map_err(CallError::into_message),
            }
        }
    }

    /// Sends the packs and blobs the registry lacks, the entry, then the
    /// manifest.
    async fn push_objects(&self, key: &Digest, result: &Pushed<'_>) -> Result<(), CallError> {
        let layer: Layer = serde_json::from_slice(result.layer_json)
            .map_err(|e| CallError::Other(format!("the layer manifest: {e}")))?;
        let plan = Plan::of(&super::file_blobs(&layer));
        let store = result.store;
        let uploads = std::iter::once((LAYER_TYPE, Upload::Bytes(result.layer_json)))
            .chain(
                plan.packs
                    .iter()
                    .map(|p| (PACK_TYPE, Upload::Pack(store, p))),
            )
            .chain(
                plan.singles
                    .iter()
                    .map(|(blob, _)| (BLOB_TYPE, Upload::Stored(store, *blob))),
            );
        let layers: Vec<OciDescriptor> =
            stream::iter(uploads.map(|(media_type, source)| self.upload(media_type, source)))
                .buffered(CONCURRENCY)
                .try_collect()
                .await?;
        let config = self
            .upload(ACTION_TYPE, Upload::Bytes(result.action_json))
            .await?;
        let manifest = OciManifest::Image(OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
            config,
            layers,
            subject: None,
            artifact_type: Some(ARTIFACT_TYPE.to_string()),
            annotations: Some(BTreeMap::from([
                (KEY_ANNOTATION.to_string(), key.to_hex()),
                (STEP_ANNOTATION.to_string(), result.action.step.clone()),
            ])),
        });
        self.put_manifest(&self.tag(key), &manifest).await
    }
}

impl Drop for OciRemote {
    fn drop(&mut self) {
        // Without waiting for a name lookup still stuck in a blocking thread.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A step's manifest, read: the entry, and where each object it names is.
struct OciEntry<'a> {
    remote: &'a OciRemote,
    action: Vec<u8>,
    /// The layer manifest and the blobs on their own.
    by_blake3: HashMap<Digest, OciDescriptor>,
    /// The packs, in order.
    packs: Vec<OciDescriptor>,
}

impl Entry for OciEntry<'_> {
    fn action(&self) -> &[u8] {
        &self.action
    }

    fn layer(&self, digest: &Digest) -> Result<Option<Vec<u8>>, Failure> {
        let Some(descriptor) = self.by_blake3.get(digest) else {
            return Ok(None);
        };
        self.remote
            .block_on(self.remote.pull_bytes(descriptor, MAX_LAYER_BYTES))
    }

    fn blobs(
        &self,
        layer: &[(Digest, u64)],
        wanted: &[(Digest, u64)],
        store: &Store,
        each: &mut BlobSink<'_>,
    ) -> Result<(), Failure> {
        let plan = Plan::of(layer);
        if plan.packs.len() != self.packs.len() {
            return Err(Failure::Rejected(format!(
                "the entry has {} packs where its signed layer makes {} (tampered)",
                self.packs.len(),
                plan.packs.len()
            )));
        }
        let wanted_names: HashSet<Digest> = wanted.iter().map(|(blob, _)| *blob).collect();
        self.remote.block_on(async {
            // The packs holding a wanted blob, one after the other.
            let mut handed = HashSet::new();
            for (pack, descriptor) in plan.packs.iter().zip(&self.packs) {
                if pack.iter().any(|(blob, _)| wanted_names.contains(blob)) {
                    let pulled = self
                        .remote
                        .pull_pack(descriptor, pack, &wanted_names, store, each)
                        .await?;
                    handed.extend(pulled);
                }
            }
            // Then the rest, several at once: blobs on their own, the empty
            // one, and any the packs did not give.
            let empty = Digest::of(b"");
            let rest = wanted.iter().filter(|(blob, _)| !handed.contains(blob));
            let mut downloads = stream::iter(rest.map(|(blob, size)| async move {
                let mut out = ToFile {
                    blob: super::incoming(store, *size)?,
                    refused: None,
                };
                let found = match self.by_blake3.get(blob) {
                    Some(descriptor) => self.remote.pull(descriptor, *size, &mut out).await?,
                    None => *blob == empty,
                };
                Ok::<_, Failure>((blob, found.then_some(out.blob)))
            }))
            .buffered(CONCURRENCY);
            while let Some(next) = downloads.next().await {
                let (blob, bytes) = next?;
                each(blob, bytes)?;
            }
            Ok(())
        })
    }
}

/// A pack downloaded straight into the blobs it holds.
impl Download for Splitter<'_, '_> {
    fn restart(&mut self) -> std::io::Result<()> {
        Splitter::restart(self);
        Ok(())
    }

    fn refused(&self) -> Option<String> {
        Splitter::refused(self)
    }
}

impl Remote for OciRemote {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn lookup(&self, key: &Digest) -> Result<Option<Box<dyn Entry + '_>>, Failure> {
        let found = self.block_on(self.find(key))?;
        Ok(found.map(|entry| Box::new(entry) as Box<dyn Entry>))
    }

    fn push(&self, key: &Digest, result: &Pushed<'_>) -> Result<(), String> {
        self.block_on(self.push_step(key, result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_registry_and_a_repository() {
        let parse = |url| Location::parse(url);
        let at = |registry: &str, repository: &str, plain_http| Location {
            registry: registry.into(),
            repository: repository.into(),
            plain_http,
        };
        for (url, expected) in [
            ("oci://ghcr.io/acme/kiln", at("ghcr.io", "acme/kiln", false)),
            (
                "oci://registry.example:5000/a/b-c/d_e.f/",
                at("registry.example:5000", "a/b-c/d_e.f", false),
            ),
            (
                "oci://127.0.0.1:5000/kiln/cache",
                at("127.0.0.1:5000", "kiln/cache", true),
            ),
            ("oci://127.8.9.1/kiln", at("127.8.9.1", "kiln", true)),
            ("oci://LocalHost:80/kiln", at("localhost:80", "kiln", true)),
            ("oci://[::1]:5000/kiln", at("[::1]:5000", "kiln", true)),
            (
                "oci+http://10.0.0.2:5000/kiln",
                at("10.0.0.2:5000", "kiln", true),
            ),
            (
                "oci+https://localhost:5443/kiln",
                at("localhost:5443", "kiln", false),
            ),
        ] {
            assert_eq!(parse(url), Ok(expected), "{url}");
        }
        for (url, complaint) in [
            ("oci://registry.example", "no repository"),
            ("oci://registry.example/", "not a repository name"),
            ("oci://registry.example/Kiln", "not a repository name"),
            (
                "oci://registry.example/kiln:latest",
                "not a repository name",
            ),
            ("oci://registry.example:http/kiln", "not a host"),
            ("oci://:5000/kiln", "not a host"),
            ("oci://[::1/kiln", "not a host"),
            (
                "oci://user:pw@registry.example/kiln",
                "credentials do not go",
            ),
            ("oci://localhost/kiln?insecure=1", "oci+http://"),
            ("oci+ftp://localhost/kiln", "unknown scheme"),
        ] {
            let e = parse(url).unwrap_err();
            assert!(e.contains(complaint), "{url}: {e}");
        }
        assert!(is_oci_url("oci+http://x/y") && !is_oci_url("file:///x"));
    }

    #[test]
    fn credentials_come_from_the_environment_then_docker_config() {
        let no_env = |_: &str| None;
        let config = |text: &str| Some((PathBuf::from("config.json"), text.to_string()));
        let basic = |u: &str, p: &str| format!("{:?}", RegistryAuth::Basic(u.into(), p.into()));
        let show = |auth: Result<RegistryAuth, String>| format!("{:?}", auth.unwrap());
        assert_eq!(show(credentials("r.example", no_env, None)), "Anonymous");
        let env = |name: &str| match name {
            "KILN_REGISTRY_USERNAME" => Some("ci".to_string()),
            "KILN_REGISTRY_PASSWORD" => Some("secret".to_string()),
            "KILN_REGISTRY_HOST" => Some("R.example".to_string()),
            _ => None,
        };
        assert_eq!(
            show(credentials("r.example", env, None)),
            basic("ci", "secret")
        );
        // Credentials from the environment go to their own registry only.
        assert_eq!(show(credentials("evil.example", env, None)), "Anonymous");
        let unnamed = |name: &str| match name {
            "KILN_REGISTRY_USERNAME" => Some("ci".to_string()),
            "KILN_REGISTRY_PASSWORD" => Some("secret".to_string()),
            _ => None,
        };
        assert!(credentials("r.example", unnamed, None)
            .unwrap_err()
            .contains("KILN_REGISTRY_HOST"));
        let token = |name: &str| match name {
            "KILN_REGISTRY_TOKEN" => Some("tok".to_string()),
            "KILN_REGISTRY_HOST" => Some("r.example".to_string()),
            _ => None,
        };
        assert!(matches!(
            credentials("r.example", token, None),
            Ok(RegistryAuth::Bearer(t)) if t == "tok"
        ));
        let half = |name: &str| (name == "KILN_REGISTRY_USERNAME").then(|| "ci".to_string());
        assert!(credentials("r.example", half, None)
            .unwrap_err()
            .contains("both"));

        // base64("user:pa:ss")
        let docker = config(
            r#"{"auths": {"https://r.example:5000/v1/": {"auth": "dXNlcjpwYTpzcw=="},
                          "other.example": {"registrytoken": "t0k"},
                          "https://index.docker.io/v1/": {"username": "hub", "password": "pw"},
                          "helper.example": {}},
                "credsStore": "desktop"}"#,
        );
        assert_eq!(
            show(credentials("r.example:5000", no_env, docker.clone())),
            basic("user", "pa:ss")
        );
        assert!(matches!(
            credentials("other.example", no_env, docker.clone()),
            Ok(RegistryAuth::Bearer(t)) if t == "t0k"
        ));
        assert_eq!(
            show(credentials("docker.io", no_env, docker.clone())),
            basic("hub", "pw")
        );
        for anonymous in ["helper.example", "r.example", "unknown.example"] {
            assert_eq!(
                show(credentials(anonymous, no_env, docker.clone())),
                "Anonymous"
            );
        }
        let env_5000 = |name: &str| match name {
            "KILN_REGISTRY_HOST" => Some("r.example:5000".to_string()),
            other => env(other),
        };
        assert_eq!(
            show(credentials("r.example:5000", env_5000, docker.clone())),
            basic("ci", "secret"),
            "the environment wins for its own registry"
        );
        assert_eq!(
            show(credentials("r.example:5000", env, docker)),
            basic("user", "pa:ss"),
            "and only there"
        );
        assert!(credentials("r.example", no_env, config("{"))
            .unwrap_err()
            .contains("config.json"));
        assert!(credentials(
            "r.example",
            no_env,
            config(r#"{"auths": {"r.example": {"auth": "bm9jb2xvbg=="}}}"#)
        )
        .unwrap_err()
        .contains("user:password"));
    }

    #[test]
    fn time_limits_grow_with_size() {
        assert_eq!(time_limit(0), REQUEST_TIMEOUT);
        assert_eq!(
            time_limit(100 << 20),
            REQUEST_TIMEOUT + Duration::from_secs(100)
        );
    }
}
