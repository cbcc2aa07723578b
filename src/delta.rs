//! Delta `apt` runs: adding packages to an `apt` step installs only the added
//! ones on top of a cached run of the same step, when kiln can show that the
//! result is exactly what a clean run would give.
//!
//! Runs of one *family* (the same step settings over the same lower layers,
//! see `key::family_key`) differ only in their packages. When a step's key
//! misses and the store records a run of its family whose packages are a
//! subset of the step's ([`find_base`]), the step runs over that run's layer
//! as one more lower layer, and three checks decide whether the outcome
//! stands:
//! 1. apt itself: its plan for the whole list over the lower layers alone
//!    (made before the install) must be the cached run's packages plus the
//!    ones the run added, at the same versions, and the run must have removed
//!    or changed none of the packages it started from (`Apt::delta_action`);
//! 2. after, the delta's own changes ([`check`]): nothing the lower layers or
//!    the cached run hold may be deleted, hidden or changed, but for the files whose
//!    content does not depend on the order packages were installed in
//!    ([`ORDER_FREE`]); no account, alternative or stat-override may change
//!    (a package that adds a system user would get another uid than in a
//!    clean run);
//! 3. the step's layer is the cached run's layer with the delta's entries laid
//!    over it ([`squash`]), as a clean run captures the sum of both.
//!
//! When any check fails the step runs clean, as it would have anyway; the
//! build says why. A test builds an edited recipe both ways and compares the
//! images byte for byte.

use std::collections::BTreeMap;

use crate::assemble::remove_below;
use crate::digest::Digest;
use crate::layer::{Entry, Kind, Layer, LAYER_FORMAT};
use crate::store::Store;

/// Files a delta run may change although the lower layers or the cached run
/// hold them: each is the same whatever order packages were installed in.
pub const ORDER_FREE: &[&str] = &[
    // dpkg writes its status sorted by package name.
    "var/lib/dpkg/status",
    // kiln sorts it after every install (see `Apt::install`).
    "var/lib/apt/extended_states",
    // ldconfig's cache of every library on the search path.
    "etc/ld.so.cache",
    // debconf writes its databases sorted by question and template name.
    "var/cache/debconf/config.dat",
    "var/cache/debconf/templates.dat",
];

/// Paths under which a delta run may change nothing at all, not even add:
/// what is there depends on the order packages registered it.
const ORDER_BOUND: &[&str] = &[
    "etc/alternatives",
    "var/lib/dpkg/alternatives",
    "var/lib/dpkg/statoverride",
];

/// A cached run of the step's family that a delta run can build on.
#[derive(Debug, Clone, PartialEq)]
pub struct Base {
    /// Its step key.
    pub key: Digest,
    /// Its layer.
    pub layer: Digest,
    /// How many packages it installed.
    pub packages: usize,
}

/// The cached run of `family` with the most packages, all of them among
/// `packages`, whose layer the store holds. It may have all of them: a step
/// resolving its packages again (no pins in the lock) builds on its last run.
pub fn find_base(store: &Store, family: &Digest, packages: &[String]) -> Option<Base> {
    store
        .family_members(family)
        .into_iter()
        .filter(|(_, had)| had.iter().all(|p| packages.contains(p)))
        .filter_map(|(key, had)| {
            let entry = store.action(&key).ok()??;
            store.has_layer(&entry.layer).then_some(Base {
                key,
                layer: entry.layer,
                packages: had.len(),
            })
        })
        .max_by_key(|b| (b.packages, b.key.to_hex()))
}

/// What the tree looks like with `layers` stacked in order (lowest first):
/// each path's last entry; whiteouts and opaque directories hide what
/// lower layers put there.
pub fn view(layers: &[&Layer]) -> BTreeMap<String, Entry> {
    let mut tree = BTreeMap::new();
    for layer in layers {
        stack_on(&mut tree, layer);
    }
    tree
}

/// Stacks `layer` on the [`view`] `tree`.
pub fn stack_on(tree: &mut BTreeMap<String, Entry>, layer: &Layer) {
    for entry in &layer.entries {
        if !matches!(entry.kind, Kind::Dir { opaque: false }) {
            remove_below(tree, &entry.path);
        }
        match entry.kind {
            Kind::Whiteout => {
                tree.remove(&entry.path);
            }
            _ => {
                tree.insert(entry.path.clone(), entry.clone());
            }
        }
    }
}

/// Why a delta run's layer does not stand for a clean run's; each names the
/// path (relative to the image root) that differs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaRefused {
    #[error("it deletes /{0}")]
    Deletes(String),
    #[error("it replaces /{0}")]
    Replaces(String),
    #[error("it turns /{0} into a directory")]
    TurnsIntoDir(String),
    #[error("it changes /{0} (alternatives and stat-overrides depend on install order)")]
    ChangesOrderBound(String),
    #[error("it changes /{0}, which a clean run may write differently")]
    Changes(String),
}

/// Checks the delta run's layer against what it ran over (`before`: the
/// lower layers and the cached run's layer, see [`view`]). `Err` says why
/// the delta does not stand.
pub fn check(delta: &Layer, before: &BTreeMap<String, Entry>) -> Result<(), DeltaRefused> {
    let hardlinked: std::collections::BTreeSet<&str> = before
        .values()
        .filter_map(|e| match &e.kind {
            Kind::Hardlink { target } => Some(target.as_str()),
            _ => None,
        })
        .collect();
    for entry in &delta.entries {
        let path = entry.path.as_str();
        let old = before.get(path);
        match (&entry.kind, old) {
            (Kind::Whiteout, _) => return Err(DeltaRefused::Deletes(path.into())),
            // overlayfs marks every new directory opaque; over nothing, that hides nothing.
            (Kind::Dir { opaque: true }, Some(_)) => {
                return Err(DeltaRefused::Replaces(path.into()))
            }
            (Kind::Dir { .. }, Some(old)) if !matches!(old.kind, Kind::Dir { .. }) => {
                return Err(DeltaRefused::TurnsIntoDir(path.into()))
            }
            (Kind::Dir { .. }, _) => continue,
            _ => {}
        }
        if ORDER_BOUND
            .iter()
            .any(|b| path == *b || path.starts_with(&format!("{b}/")))
        {
            return Err(DeltaRefused::ChangesOrderBound(path.into()));
        }
        let Some(old) = old else {
            continue;
        };
        if old == entry {
            continue; // copied up by overlayfs, not changed
        }
        let linked = matches!(old.kind, Kind::Hardlink { .. }) || hardlinked.contains(path);
        if !ORDER_FREE.contains(&path) || linked {
            return Err(DeltaRefused::Changes(path.into()));
        }
    }
    Ok(())
}

/// The cached run's layer with the delta's entries laid over it: what a clean
/// run of the whole list captures, given that [`check`] passed.
pub fn squash(base: &Layer, delta: &Layer) -> Layer {
    let mut entries: BTreeMap<&str, &Entry> =
        base.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    for entry in &delta.entries {
        entries.insert(entry.path.as_str(), entry);
    }
    Layer {
        format: LAYER_FORMAT,
        entries: entries.into_values().cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: Kind::File {
                blob: Digest::of(content.as_bytes()),
                size: content.len() as u64,
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 100,
            xattrs: BTreeMap::new(),
        }
    }

    fn with(path: &str, kind: Kind) -> Entry {
        Entry {
            kind,
            ..file(path, "")
        }
    }

    fn dir(path: &str) -> Entry {
        with(path, Kind::Dir { opaque: false })
    }

    fn layer(entries: Vec<Entry>) -> Layer {
        let mut entries = entries;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Layer {
            format: LAYER_FORMAT,
            entries,
        }
    }

    #[test]
    fn the_base_is_the_largest_cached_subset_and_gc_forgets_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("cache")).unwrap();
        let family = Digest::of(b"family");
        let names = |list: &[&str]| list.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let layer = store.put_layer(&layer(vec![dir("usr")])).unwrap();
        let run = |key: &[u8], packages: &[&str], cached: bool| {
            let key = Digest::of(key);
            store
                .put_family_member(&family, &key, &names(packages))
                .unwrap();
            if cached {
                let entry = crate::store::ActionEntry {
                    layer,
                    step: "packages".into(),
                    build_ms: 1,
                    origin: crate::store::Origin::Built,
                    resolved: None,
                };
                store.put_action(&key, &entry).unwrap();
            }
            key
        };
        let small = run(b"small", &["a"], true);
        let large = run(b"large", &["a", "b"], true);
        run(b"gone", &["a", "b", "c"], false);
        run(b"other", &["a", "z"], true);
        let wanted = names(&["a", "b", "c", "d"]);
        let base = find_base(&store, &family, &wanted).unwrap();
        assert_eq!((base.key, base.packages, base.layer), (large, 2, layer));
        // The same list is a base too (a step resolving its pins again);
        // nothing of another list is.
        assert_eq!(
            find_base(&store, &family, &names(&["a", "b"])).unwrap().key,
            large
        );
        assert_eq!(
            find_base(&store, &family, &names(&["a"])).unwrap().key,
            small
        );
        assert_eq!(find_base(&store, &family, &names(&["q"])), None);

        let pruned = store.prune_families(&|key| matches!(store.action(key), Ok(Some(_))));
        assert_eq!(pruned, 1);
        assert_eq!(store.family_members(&family).len(), 3);
    }

    #[test]
    fn view_applies_whiteouts_and_opaque_directories() {
        let lower = layer(vec![
            dir("etc"),
            file("etc/a", "a"),
            dir("usr"),
            file("usr/x", "x"),
            file("usr/y", "y"),
        ]);
        let upper = layer(vec![
            with("etc/a", Kind::Whiteout),
            with("usr", Kind::Dir { opaque: true }),
            file("usr/z", "z"),
        ]);
        let seen: Vec<String> = view(&[&lower, &upper]).into_keys().collect();
        assert_eq!(seen, ["etc", "usr", "usr/z"]);
    }

    #[test]
    fn check_allows_new_files_and_order_free_changes_only() {
        let before = view(&[&layer(vec![
            dir("etc"),
            file("etc/passwd", "root"),
            file("etc/shells", "/bin/sh"),
            file("var/lib/dpkg/status", "old"),
            file("usr/bin/a", "a"),
            with(
                "usr/bin/b",
                Kind::Hardlink {
                    target: "usr/bin/a".into(),
                },
            ),
        ])]);
        use DeltaRefused::*;
        let cases: Vec<(Vec<Entry>, Option<DeltaRefused>)> = vec![
            (vec![file("usr/bin/jq", "jq"), dir("usr/bin")], None),
            (vec![file("var/lib/dpkg/status", "new")], None),
            // Copied up but unchanged.
            (vec![file("etc/shells", "/bin/sh")], None),
            (
                vec![file("etc/shells", "/bin/sh\n/bin/zsh")],
                Some(Changes("etc/shells".into())),
            ),
            (
                vec![file("etc/passwd", "root\nuuidd")],
                Some(Changes("etc/passwd".into())),
            ),
            (
                vec![with("usr/bin/a", Kind::Whiteout)],
                Some(Deletes("usr/bin/a".into())),
            ),
            (
                vec![with("etc", Kind::Dir { opaque: true })],
                Some(Replaces("etc".into())),
            ),
            (
                vec![with("usr/share/doc/jq", Kind::Dir { opaque: true })],
                None,
            ),
            (
                vec![dir("usr/bin/a")],
                Some(TurnsIntoDir("usr/bin/a".into())),
            ),
            (
                vec![file("etc/alternatives/editor", "vim")],
                Some(ChangesOrderBound("etc/alternatives/editor".into())),
            ),
            (
                vec![file("var/lib/dpkg/statoverride", "x")],
                Some(ChangesOrderBound("var/lib/dpkg/statoverride".into())),
            ),
        ];
        for (entries, refused) in cases {
            let result = check(&layer(entries.clone()), &before);
            assert_eq!(result, refused.map_or(Ok(()), Err), "{entries:?}");
        }
        assert_eq!(
            Changes("etc/passwd".into()).to_string(),
            "it changes /etc/passwd, which a clean run may write differently"
        );
    }

    #[test]
    fn squash_lays_the_delta_over_the_base() {
        let base = layer(vec![
            dir("usr"),
            file("usr/a", "a"),
            file("var/status", "1"),
        ]);
        let delta = layer(vec![
            file("usr/b", "b"),
            file("var/status", "2"),
            dir("usr"),
        ]);
        let out = squash(&base, &delta);
        let got: Vec<(&str, &Kind)> = out
            .entries
            .iter()
            .map(|e| (e.path.as_str(), &e.kind))
            .collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[3].0, "var/status");
        assert_eq!(got[3].1, &file("var/status", "2").kind);
        assert_eq!(out.entries[2].path, "usr/b");
    }
}
