//! Property tests, bounded so they run in seconds in CI:
//! - kiln's layer merge agrees with the kernel's overlayfs on random stacks
//!   of layers (files, directories, whiteouts, opaque directories; a later
//!   layer wins), each layer unpacked as kiln unpacks it and the stack
//!   mounted read-only (needs root);
//! - the recipe parser never panics, whatever the bytes, and every error it
//!   gives names the recipe file.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;

use kiln::graph::Graph;
use kiln::layer::{Entry, Kind, Layer, LAYER_FORMAT};
use kiln::store::Store;

/// One change a layer makes at a path.
#[derive(Debug, Clone)]
enum Change {
    File(String, u8),
    Dir(String, bool),
    Whiteout(String),
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..=3)
        .prop_map(|p| p.join("/"))
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (path(), 0u8..3).prop_map(|(p, c)| Change::File(p, c)),
        (path(), any::<bool>()).prop_map(|(p, o)| Change::Dir(p, o)),
        path().prop_map(Change::Whiteout),
    ]
}

fn entry(path: &str, kind: Kind) -> Entry {
    Entry {
        path: path.into(),
        mode: if matches!(kind, Kind::Dir { .. }) {
            0o755
        } else {
            0o644
        },
        kind,
        uid: 0,
        gid: 0,
        mtime: 0,
        xattrs: Default::default(),
    }
}

/// The layer an overlayfs upper dir would hold after `changes`: every
/// entry's parents are directories of the layer, and an entry replaces
/// whatever was at its path (and below it).
fn layer_of(changes: &[Change], store: &Store) -> Layer {
    let mut tree: BTreeMap<String, Kind> = BTreeMap::new();
    for change in changes {
        let (path, kind) = match change {
            Change::File(p, c) => {
                let bytes = vec![b'0' + c; 1 + *c as usize];
                let blob = store.put_blob_bytes(&bytes).unwrap();
                (
                    p,
                    Kind::File {
                        blob,
                        size: bytes.len() as u64,
                    },
                )
            }
            Change::Dir(p, opaque) => (p, Kind::Dir { opaque: *opaque }),
            Change::Whiteout(p) => (p, Kind::Whiteout),
        };
        let below = format!("{path}/");
        tree.retain(|p, _| !p.starts_with(&below));
        for (i, _) in path.match_indices('/') {
            let parent = &path[..i];
            if !matches!(tree.get(parent), Some(Kind::Dir { .. })) {
                let inside = format!("{parent}/");
                tree.retain(|p, _| !p.starts_with(&inside));
                tree.insert(parent.to_string(), Kind::Dir { opaque: false });
            }
        }
        match tree.get(path.as_str()) {
            // A directory made again keeps what is in it.
            Some(Kind::Dir { opaque }) if matches!(kind, Kind::Dir { opaque: false }) => {
                let opaque = *opaque;
                tree.insert(path.clone(), Kind::Dir { opaque });
            }
            _ => {
                tree.insert(path.clone(), kind);
            }
        }
    }
    Layer {
        format: LAYER_FORMAT,
        entries: tree.into_iter().map(|(p, k)| entry(&p, k)).collect(),
    }
}

/// What a directory tree shows: each path with its kind and contents.
fn view(root: &Path) -> BTreeMap<String, String> {
    let mut seen = BTreeMap::new();
    for item in walkdir::WalkDir::new(root).min_depth(1) {
        let item = item.unwrap();
        let rel = item
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let what = match std::fs::symlink_metadata(item.path()) {
            Ok(m) if m.is_dir() => "dir".to_string(),
            Ok(m) if m.is_file() => {
                format!(
                    "file {}",
                    String::from_utf8_lossy(&std::fs::read(item.path()).unwrap())
                )
            }
            Ok(m) => format!("{:?}", m.file_type()),
            // overlayfs passes a directory that only one layer has straight
            // through, so its readdir lists a whiteout that lookup then hides
            // (kiln's captures never have one there: a whiteout only stands
            // over something a lower layer has). It is not a file either way.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => format!("unreadable: {e}"),
        };
        seen.insert(rel, what);
    }
    seen
}

/// What kiln's merge gives for `layers` stacked in order.
fn merged(layers: &[Layer], store: &Store) -> BTreeMap<String, String> {
    let mut recipe = String::from("name: p\nsteps:\n");
    for i in 0..layers.len() {
        recipe.push_str(&format!("  s{i}:\n"));
        if i > 0 {
            recipe.push_str(&format!("    needs: [s{}]\n", i - 1));
        }
        recipe.push_str(&format!("    file: {{path: /s{i}, content: x}}\n"));
    }
    let recipe = kiln::recipe::parse(&recipe, Path::new("p.yaml")).unwrap();
    let graph = Graph::new(&recipe).unwrap();
    let merged = kiln::assemble::merge(&recipe, &graph, layers, store).unwrap();
    merged
        .entries
        .iter()
        .map(|e| {
            let what = match &e.kind {
                Kind::Dir { .. } => "dir".to_string(),
                Kind::File { blob, .. } => {
                    format!(
                        "file {}",
                        String::from_utf8_lossy(&store.read_blob(blob).unwrap())
                    )
                }
                other => format!("{other:?}"),
            };
            (e.path.clone(), what)
        })
        .collect()
}

/// What the kernel's overlayfs shows for `layers` (the last on top).
fn overlay(layers: &[Layer], store: &Store, dir: &Path) -> BTreeMap<String, String> {
    let mut lowers = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let tree = dir.join(format!("l{i}"));
        kiln::capture::materialize(layer, store, &tree).unwrap();
        lowers.push(tree.to_str().unwrap().to_string());
    }
    lowers.reverse();
    let mount = dir.join("merged");
    std::fs::create_dir(&mount).unwrap();
    // One lower dir alone is not enough for a read-only overlay: add an empty one.
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    lowers.push(empty.to_str().unwrap().to_string());
    nix::mount::mount(
        Some("overlay"),
        &mount,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(
            format!(
                "lowerdir={},redirect_dir=off,metacopy=off",
                lowers.join(":")
            )
            .as_str(),
        ),
    )
    .unwrap();
    let seen = view(&mount);
    nix::mount::umount(&mount).unwrap();
    seen
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[cfg_attr(not(feature = "root-tests"), ignore = "needs root: run tests/run")]
    #[test]
    fn merging_layers_agrees_with_overlayfs(
        stack in prop::collection::vec(prop::collection::vec(change(), 1..6), 1..5)
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("cache")).unwrap();
        let layers: Vec<Layer> = stack.iter().map(|c| layer_of(c, &store)).collect();
        let kernel = overlay(&layers, &store, tmp.path());
        let kiln = merged(&layers, &store);
        prop_assert_eq!(kiln, kernel, "layers: {:#?}", layers);
    }

    #[test]
    fn the_recipe_parser_never_panics(text in ".{0,400}") {
        if let Err(e) = kiln::recipe::parse(&text, Path::new("r.yaml")) {
            prop_assert!(e.to_string().starts_with("r.yaml"), "{}", e);
        }
    }

    #[test]
    fn damaged_recipes_get_located_errors(cut in 0usize..600, junk in "[\\[\\]{}:\"'&*!|>, -]{1,3}") {
        let recipe = include_str!("../examples/minimal.yaml");
        let at = cut.min(recipe.len());
        let at = (0..=at).rev().find(|i| recipe.is_char_boundary(*i)).unwrap();
        let text = format!("{}{}{}", &recipe[..at], junk, &recipe[at..]);
        if let Err(e) = kiln::recipe::parse(&text, Path::new("r.yaml")) {
            prop_assert!(e.to_string().starts_with("r.yaml"), "{}", e);
        }
    }
}
