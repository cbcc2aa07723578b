//! The contract every remote backend keeps (directory, OCI registry,
//! memory), as `kiln::remote::Remotes` relies on it: one suite, run by
//! tests/remote.rs against the directory and memory backends and by
//! tests/oci.rs against a registry.

use std::path::Path;

use kiln::digest::Digest;
use kiln::layer::{Entry, Kind, Layer, LAYER_FORMAT};
use kiln::remote::{Failure, Pushed, Remote, RemoteAction};
use kiln::store::Store;

/// A step result to push: a store holding its blobs (one empty, one small,
/// one of 1.2 MiB: a registry packs the small one, not the big one), its
/// layer, and its entry as JSON.
struct Result {
    store: Store,
    action: RemoteAction,
    action_json: Vec<u8>,
    layer_json: Vec<u8>,
    blobs: Vec<(Digest, u64)>,
}

fn step_result(dir: &Path, marker: &str) -> Result {
    let store = Store::open(dir).unwrap();
    let big: Vec<u8> = (0..1200 << 10).map(|i: u32| (i % 251) as u8).collect();
    let contents: [(&str, Vec<u8>); 3] = [
        ("etc/marker", format!("{marker}\n").into_bytes()),
        ("usr/lib/big", big),
        ("etc/empty", Vec::new()),
    ];
    let mut entries = Vec::new();
    let mut blobs = Vec::new();
    for (path, bytes) in &contents {
        let blob = store.put_blob_bytes(bytes).unwrap();
        blobs.push((blob, bytes.len() as u64));
        entries.push(Entry {
            path: path.to_string(),
            kind: Kind::File {
                blob,
                size: bytes.len() as u64,
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Default::default(),
        });
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    blobs.sort();
    let layer = Layer {
        format: LAYER_FORMAT,
        entries,
    };
    let digest = store.put_layer(&layer).unwrap();
    let action = RemoteAction {
        layer: digest,
        step: marker.to_string(),
        created: Some(1),
        signatures: Vec::new(),
    };
    Result {
        action_json: serde_json::to_vec(&action).unwrap(),
        layer_json: layer.to_canonical_json(),
        action,
        blobs,
        store,
    }
}

fn push(remote: &dyn Remote, key: &Digest, result: &Result) {
    let blobs: Vec<Digest> = result.blobs.iter().map(|(b, _)| *b).collect();
    let pushed = Pushed {
        action: &result.action,
        action_json: &result.action_json,
        layer_json: &result.layer_json,
        blobs: &blobs,
        store: &result.store,
    };
    remote
        .push(key, &pushed)
        .unwrap_or_else(|e| panic!("{}: push failed: {e}", remote.describe()));
}

/// Downloads the `wanted` blobs of a layer naming `layer` into `store`; the
/// digest of each (or `None`), sorted.
fn download(
    remote: &dyn Remote,
    key: &Digest,
    layer: &[(Digest, u64)],
    wanted: &[(Digest, u64)],
    store: &Store,
) -> std::result::Result<Vec<(Digest, Option<Digest>)>, Failure> {
    let entry = remote.lookup(key)?.expect("the entry is there");
    let mut got = Vec::new();
    entry.blobs(layer, wanted, store, &mut |name, blob| {
        got.push((*name, blob.map(|b| b.digest())));
        Ok(())
    })?;
    got.sort();
    Ok(got)
}

/// Runs the suite against `remote`, with scratch space in `dir`.
pub fn check(remote: &dyn Remote, dir: &Path) {
    let name = remote.describe();
    let (key, other_key) = (Digest::of(b"contract key"), Digest::of(b"other key"));
    let result = step_result(&dir.join("pusher"), "one");

    // Nothing there yet: a miss, not an error.
    assert!(remote.lookup(&key).unwrap().is_none(), "{name}");

    // What is pushed is found: the entry as pushed, its layer, its blobs.
    push(remote, &key, &result);
    let entry = remote.lookup(&key).unwrap().expect("pushed entry");
    assert_eq!(entry.action(), &result.action_json[..], "{name}");
    assert_eq!(
        entry.layer(&result.action.layer).unwrap().as_deref(),
        Some(&result.layer_json[..]),
        "{name}"
    );
    assert_eq!(
        entry.layer(&Digest::of(b"no such layer")).unwrap(),
        None,
        "{name}"
    );
    let puller = Store::open(&dir.join("puller")).unwrap();
    let mut asked = result.blobs.clone();
    let missing = Digest::of(b"no such blob");
    asked.push((missing, 3));
    let got = download(remote, &key, &result.blobs, &asked, &puller).unwrap();
    let mut want: Vec<(Digest, Option<Digest>)> = result
        .blobs
        .iter()
        .map(|(b, _)| (*b, Some(*b)))
        .chain([(missing, None)])
        .collect();
    want.sort();
    assert_eq!(
        got, want,
        "{name}: each blob once, intact, a missing one as None"
    );
    // Only the blobs asked for.
    let (small, small_size) = *result.blobs.iter().find(|(_, s)| *s < 100).unwrap();
    let got = download(remote, &key, &result.blobs, &[(small, small_size)], &puller).unwrap();
    assert_eq!(got, [(small, Some(small))], "{name}");

    // Never more than the signed size: a blob (small or big) that a layer
    // gives one byte less is refused, not read whole.
    for (blob, size) in result.blobs.iter().filter(|(_, s)| *s > 0) {
        let layer: Vec<(Digest, u64)> = result
            .blobs
            .iter()
            .map(|(b, s)| if b == blob { (*b, s - 1) } else { (*b, *s) })
            .collect();
        match download(remote, &key, &layer, &[(*blob, size - 1)], &puller) {
            Err(Failure::Rejected(_)) => {}
            other => panic!("{name}: a blob larger than its size gave {other:?}"),
        }
    }

    // Pushing again, and pushing another step that shares blobs, is harmless.
    push(remote, &key, &result);
    let other = step_result(&dir.join("other-pusher"), "two");
    push(remote, &other_key, &other);
    for (k, r) in [(&key, &result), (&other_key, &other)] {
        let entry = remote.lookup(k).unwrap().expect("entry");
        assert_eq!(entry.action(), &r.action_json[..], "{name}");
        let got = download(remote, k, &r.blobs, &r.blobs, &puller).unwrap();
        assert!(got.iter().all(|(b, d)| Some(*b) == *d), "{name}: {got:?}");
    }

    // Several pushers of one step at once leave one whole entry.
    let racing = Digest::of(b"racing key");
    std::thread::scope(|scope| {
        for i in 0..4 {
            let dir = dir.join(format!("racer-{i}"));
            scope.spawn(move || push(remote, &racing, &step_result(&dir, "race")));
        }
    });
    let entry = remote.lookup(&racing).unwrap().expect("raced entry");
    let action: RemoteAction = serde_json::from_slice(entry.action()).unwrap();
    assert_eq!(action.step, "race", "{name}");
    assert!(entry.layer(&action.layer).unwrap().is_some(), "{name}");
}
