//! Assembly: merging the steps' layers into the image's tree.
//!
//! Layers are applied in graph order: a later entry replaces an earlier one, a
//! whiteout deletes a path and everything below it, an opaque directory hides
//! what earlier layers put below it. Two steps that the graph leaves unordered
//! must not write the same path differently (the result would depend on an
//! arbitrary order): that is an error naming both steps and the paths.
//!
//! Two exceptions make independent steps practical:
//! * directories that differ only in mtime are the same directory (the later
//!   mtime is kept);
//! * the account databases (`/etc/passwd`, `group`, `shadow`, `gshadow`,
//!   `subuid`, `subgid`) are merged line by line, keyed by name: each step's
//!   additions, changes and removals relative to what it started from are
//!   applied, so a `user` step and an `apt` step that adds system users can run
//!   in parallel. Only two steps changing the *same* account differently conflict.
//!
//! The image is written from the layers' own trees stacked in an overlayfs;
//! [`fixups`] says what to put over them so that they show the merge.

use std::collections::{BTreeMap, BTreeSet};

use crate::digest::Digest;
use crate::graph::Graph;
use crate::layer::{Entry, Kind, Layer, LAYER_FORMAT};
use crate::recipe::Recipe;
use crate::store::Blobs;

/// Files merged line by line, keyed by their first `:`-separated field.
const ACCOUNT_DATABASES: &[&str] = &[
    "etc/passwd",
    "etc/group",
    "etc/shadow",
    "etc/gshadow",
    "etc/subuid",
    "etc/subgid",
];

/// Unordered steps that wrote the same paths differently, or a blob that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConflictError(pub String);

/// Who last wrote a path, and what.
struct Written {
    entry: Option<Entry>,
    step: usize,
}

/// Merges `layers[i]` (the layer of step `i`) in graph order.
pub fn merge(
    recipe: &Recipe,
    graph: &Graph,
    layers: &[Layer],
    blobs: &dyn Blobs,
) -> Result<Layer, ConflictError> {
    let mut tree: BTreeMap<String, Written> = BTreeMap::new();
    // Files that hardlinks point at, as their own layer had them.
    let mut link_sources: BTreeMap<String, Entry> = BTreeMap::new();
    let mut conflicts: BTreeMap<(usize, usize), BTreeSet<String>> = BTreeMap::new();

    for &step in graph.order() {
        let layer = &layers[step];
        let files: BTreeMap<&str, &Entry> =
            layer.entries.iter().map(|e| (e.path.as_str(), e)).collect();
        for entry in &layer.entries {
            let mut merged_entry = entry.clone();
            if let Some(prev) = tree.get(&entry.path) {
                if !graph.is_ancestor(prev.step, step) {
                    match reconcile(
                        prev.entry.as_ref(),
                        entry,
                        || base_entry(graph, layers, step, &entry.path),
                        blobs,
                    )? {
                        Some(e) => merged_entry = e,
                        None => {
                            conflicts
                                .entry((prev.step, step))
                                .or_default()
                                .insert(entry.path.clone());
                        }
                    }
                }
            }
            if !matches!(entry.kind, Kind::Dir { opaque: false }) {
                remove_below(&mut tree, &entry.path);
            }
            let merged = match &merged_entry.kind {
                Kind::Whiteout => None,
                Kind::Dir { opaque: true } => Some(Entry {
                    kind: Kind::Dir { opaque: false },
                    ..merged_entry
                }),
                Kind::Hardlink { target } => {
                    if let Some(source) = files.get(target.as_str()) {
                        link_sources.insert(entry.path.clone(), (*source).clone());
                    }
                    Some(merged_entry)
                }
                _ => Some(merged_entry),
            };
            tree.insert(
                entry.path.clone(),
                Written {
                    entry: merged,
                    step,
                },
            );
        }
    }

    if !conflicts.is_empty() {
        let mut message = String::new();
        for ((a, b), paths) in &conflicts {
            let shown: Vec<String> = paths.iter().take(5).map(|p| format!("/{p}")).collect();
            let more = if paths.len() > 5 {
                format!(" (and {} more)", paths.len() - 5)
            } else {
                String::new()
            };
            let (a, b) = (&recipe.steps[*a].id, &recipe.steps[*b].id);
            message.push_str(&format!(
                "steps `{a}` and `{b}` both change {}{more} differently, and neither needs the other; \
                 add `needs: [{a}]` to `{b}` (or the reverse) so their order is defined\n",
                shown.join(", ")
            ));
        }
        return Err(ConflictError(message.trim_end().to_string()));
    }

    let mut entries: Vec<Entry> = Vec::with_capacity(tree.len());
    for (path, written) in &tree {
        let Some(entry) = &written.entry else {
            continue;
        };
        let entry = match &entry.kind {
            // A link whose target a later step replaced or removed keeps its own copy.
            Kind::Hardlink { target } => {
                let intact =
                    tree.get(target).and_then(|w| w.entry.as_ref()) == link_sources.get(path);
                match link_sources.get(path) {
                    Some(source) if !intact => Entry {
                        path: path.clone(),
                        ..source.clone()
                    },
                    _ => entry.clone(),
                }
            }
            _ => entry.clone(),
        };
        entries.push(entry);
    }
    Ok(Layer {
        format: LAYER_FORMAT,
        entries,
    })
}

/// The entry unordered writers agree on, or `None` if they conflict.
fn reconcile(
    prev: Option<&Entry>,
    next: &Entry,
    base: impl FnOnce() -> Option<Entry>,
    blobs: &dyn Blobs,
) -> Result<Option<Entry>, ConflictError> {
    let Some(prev) = prev else {
        // Deleted earlier; deleting again agrees, anything else conflicts.
        return Ok(matches!(next.kind, Kind::Whiteout).then(|| next.clone()));
    };
    if prev == next {
        return Ok(Some(next.clone()));
    }
    if let (Kind::Dir { opaque: false }, Kind::Dir { opaque: false }) = (&prev.kind, &next.kind) {
        let same = Entry {
            mtime: next.mtime,
            ..prev.clone()
        } == *next;
        return Ok(same.then(|| Entry {
            mtime: prev.mtime.max(next.mtime),
            ..next.clone()
        }));
    }
    if !ACCOUNT_DATABASES.contains(&next.path.as_str()) {
        return Ok(None);
    }
    let (
        Kind::File {
            blob: prev_blob, ..
        },
        Kind::File {
            blob: next_blob, ..
        },
    ) = (&prev.kind, &next.kind)
    else {
        return Ok(None);
    };
    let read = |d: &Digest| blobs.read(d).map_err(ConflictError);
    let base_text = match base() {
        Some(Entry {
            kind: Kind::File { blob, .. },
            ..
        }) => read(&blob)?,
        _ => Vec::new(),
    };
    let merged = merge_lines(&read(prev_blob)?, &read(next_blob)?, &base_text);
    let Some(merged) = merged else {
        return Ok(None);
    };
    let blob = blobs.write(&merged).map_err(ConflictError)?;
    Ok(Some(Entry {
        kind: Kind::File {
            blob,
            size: merged.len() as u64,
        },
        ..next.clone()
    }))
}

/// What `path` was in the lower layers `step` ran on (its last writer among them).
fn base_entry(graph: &Graph, layers: &[Layer], step: usize, path: &str) -> Option<Entry> {
    graph.ancestors(step).iter().rev().find_map(|&a| {
        let entries = &layers[a].entries;
        entries
            .binary_search_by(|e| e.path.as_str().cmp(path))
            .ok()
            .map(|i| entries[i].clone())
    })
}

/// Applies `next`'s changes relative to `base` onto `current`, line by line,
/// keyed by the text before the first `:`. `None` when both changed one key differently.
fn merge_lines(current: &[u8], next: &[u8], base: &[u8]) -> Option<Vec<u8>> {
    fn lines(text: &[u8]) -> Vec<(&[u8], &[u8])> {
        text.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| (l.split(|&b| b == b':').next().unwrap_or(l), l))
            .collect()
    }
    let base: BTreeMap<&[u8], &[u8]> = lines(base).into_iter().collect();
    let next_lines = lines(next);
    let next_keys: BTreeSet<&[u8]> = next_lines.iter().map(|(k, _)| *k).collect();
    let mut out: Vec<(&[u8], &[u8])> = lines(current);
    for (key, line) in &next_lines {
        if base.get(key) == Some(line) {
            continue; // unchanged by `next`
        }
        match out.iter_mut().find(|(k, _)| k == key) {
            Some((_, cur)) if *cur == *line => {}
            Some((_, cur)) if base.get(key) == Some(cur) => *cur = line,
            Some(_) => return None,
            None => out.push((key, line)),
        }
    }
    // Keys `next` removed.
    out.retain(|(k, l)| next_keys.contains(k) || base.get(k) != Some(l));
    let mut text = Vec::new();
    for (_, l) in out {
        text.extend_from_slice(l);
        text.push(b'\n');
    }
    Some(text)
}

/// What to stack on the layers' own trees so that an overlayfs of them
/// shows exactly `merged`, and the image can be written from the trees in
/// place instead of from a copy of the merged tree.
///
/// Stacked in graph order (each step's tree above those of the steps before
/// it), the trees show what [`merge`] gives except where it reconciled
/// unordered steps (a directory's later mtime, account databases merged line
/// by line) or gave a hard link whose target a later step replaced its own
/// copy. The result holds those entries, every name of a file whose names
/// the trees would not show as one file, whiteouts for paths the trees show
/// and `merged` lacks, and the parent directories of all of them (as
/// `merged` has them, since the topmost directory's metadata is what an
/// overlayfs shows). `None` when such a parent is not a directory of
/// `merged`.
pub fn fixups(merged: &Layer, graph: &Graph, layers: &[Layer]) -> Option<Layer> {
    // What the stacked trees show at each path, and from which step's tree.
    let mut shown: BTreeMap<String, (usize, &Entry)> = BTreeMap::new();
    for &step in graph.order() {
        for entry in &layers[step].entries {
            if !matches!(entry.kind, Kind::Dir { opaque: false }) {
                remove_below(&mut shown, &entry.path);
            }
            if entry.kind == Kind::Whiteout {
                shown.remove(&entry.path);
            } else {
                shown.insert(entry.path.clone(), (step, entry));
            }
        }
    }
    let wanted: BTreeMap<&str, &Entry> = merged
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e))
        .collect();
    // An opaque directory shows as a plain one (merge drops the mark).
    let shows = |entry: &Entry| {
        shown.get(&entry.path).is_some_and(|(_, s)| {
            *s == entry
                || s.kind == Kind::Dir { opaque: true }
                    && Entry {
                        kind: Kind::Dir { opaque: false },
                        ..(*s).clone()
                    } == *entry
        })
    };
    let mut on_top: BTreeSet<&str> = merged
        .entries
        .iter()
        .filter(|e| !shows(e))
        .map(|e| e.path.as_str())
        .collect();
    // A file's names show as one file only when one tree shows them all.
    let mut names: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for entry in &merged.entries {
        if let Kind::Hardlink { target } = &entry.kind {
            names.entry(target.as_str()).or_default().push(&entry.path);
        }
    }
    let tree_of = |path: &str| shown.get(path).map(|(step, _)| *step);
    for (target, links) in &names {
        let apart = links.iter().any(|l| tree_of(l) != tree_of(target));
        if apart || on_top.contains(target) || links.iter().any(|l| on_top.contains(l)) {
            on_top.insert(target);
            on_top.extend(links);
        }
    }
    // Paths shown that `merged` lacks; a whiteout hides what is below it.
    let unwanted = |p: &str| shown.contains_key(p) && !wanted.contains_key(p);
    let gone: Vec<&str> = shown
        .keys()
        .map(String::as_str)
        .filter(|p| unwanted(p) && !parents(p).any(unwanted))
        .collect();
    let mut fixups: BTreeMap<&str, Entry> = BTreeMap::new();
    for path in on_top.iter().chain(&gone) {
        for parent in parents(path) {
            match wanted.get(parent) {
                Some(dir) if matches!(dir.kind, Kind::Dir { .. }) => {
                    fixups.insert(parent, (*dir).clone());
                }
                _ => return None,
            }
        }
    }
    for path in on_top {
        fixups.insert(path, wanted[path].clone());
    }
    for path in gone {
        let whiteout = Entry {
            path: path.to_string(),
            kind: Kind::Whiteout,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: BTreeMap::new(),
        };
        fixups.insert(path, whiteout);
    }
    Some(Layer {
        format: LAYER_FORMAT,
        entries: fixups.into_values().collect(),
    })
}

/// The directories `path` is in, nearest first (not the root).
fn parents(path: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(path.rsplit_once('/').map(|(up, _)| up), |p| {
        p.rsplit_once('/').map(|(up, _)| up)
    })
}

/// Removes every path strictly below `dir`.
pub(crate) fn remove_below<V>(tree: &mut BTreeMap<String, V>, dir: &str) {
    let prefix = format!("{dir}/");
    let doomed: Vec<String> = tree
        .range(prefix.clone()..)
        .take_while(|(p, _)| p.starts_with(&prefix))
        .map(|(p, _)| p.clone())
        .collect();
    for p in doomed {
        tree.remove(&p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::recipe::parse;
    use std::path::Path;

    const RECIPE: &str = "\
name: t
steps:
  base:
    debootstrap: {suite: trixie}
  a:
    needs: [base]
    run: x
  b:
    needs: [base]
    run: x
  c:
    needs: [a, b]
    run: x
";

    #[derive(Default)]
    struct MemBlobs(std::cell::RefCell<BTreeMap<Digest, Vec<u8>>>);

    impl Blobs for MemBlobs {
        fn read(&self, digest: &Digest) -> Result<Vec<u8>, String> {
            self.0
                .borrow()
                .get(digest)
                .cloned()
                .ok_or_else(|| "missing".into())
        }
        fn write(&self, bytes: &[u8]) -> Result<Digest, String> {
            let d = Digest::of(bytes);
            self.0.borrow_mut().insert(d, bytes.to_vec());
            Ok(d)
        }
    }

    fn file(path: &str, content: &str) -> Entry {
        Entry::plain(
            path,
            Kind::File {
                blob: Digest::of(content.as_bytes()),
                size: content.len() as u64,
            },
        )
    }

    fn dir(path: &str) -> Entry {
        Entry {
            mode: 0o755,
            ..Entry::plain(path, Kind::Dir { opaque: false })
        }
    }

    fn layer(mut entries: Vec<Entry>) -> Layer {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Layer {
            format: LAYER_FORMAT,
            entries,
        }
    }

    fn run(layers: Vec<Layer>) -> Result<Vec<String>, ConflictError> {
        let r = parse(RECIPE, Path::new("r.yaml")).unwrap();
        let g = Graph::new(&r).unwrap();
        let merged = merge(&r, &g, &layers, &MemBlobs::default())?;
        Ok(merged.entries.iter().map(|e| e.path.clone()).collect())
    }

    #[test]
    fn later_wins_and_whiteouts_delete_subtrees() {
        let base = layer(vec![
            dir("etc"),
            file("etc/a", "1"),
            dir("opt"),
            file("opt/x", "x"),
            dir("srv"),
            file("srv/old", "o"),
        ]);
        let a = layer(vec![
            dir("etc"),
            file("etc/a", "2"),
            Entry::plain("opt", Kind::Whiteout),
        ]);
        let b = layer(vec![dir("etc"), file("etc/b", "b")]);
        let c = layer(vec![
            Entry {
                mode: 0o755,
                ..Entry::plain("srv", Kind::Dir { opaque: true })
            },
            file("srv/new", "n"),
        ]);
        assert_eq!(
            run(vec![base, a, b, c]).unwrap(),
            ["etc", "etc/a", "etc/b", "srv", "srv/new"]
        );
    }

    #[test]
    fn unordered_steps_writing_one_path_differently_conflict() {
        let base = layer(vec![dir("etc")]);
        let a = layer(vec![dir("etc"), file("etc/x", "from a")]);
        let b = layer(vec![dir("etc"), file("etc/x", "from b")]);
        let e = run(vec![base, a, b, layer(vec![])]).unwrap_err();
        assert!(e.0.contains("steps `a` and `b` both change /etc/x"), "{e}");
        assert!(e.0.contains("add `needs: [a]` to `b`"), "{e}");
        // The same content from both is fine, and so is an ordered override.
        let same = run(vec![
            layer(vec![dir("etc")]),
            layer(vec![file("etc/x", "s")]),
            layer(vec![file("etc/x", "s")]),
            layer(vec![file("etc/x", "c")]),
        ]);
        assert!(same.is_ok());
    }

    #[test]
    fn hardlinks_survive_or_become_copies() {
        let base = layer(vec![
            dir("bin"),
            file("bin/a", "x"),
            Entry::plain(
                "bin/b",
                Kind::Hardlink {
                    target: "bin/a".into(),
                },
            ),
        ]);
        let a = layer(vec![dir("bin"), file("bin/a", "replaced")]);
        let r = parse(RECIPE, Path::new("r.yaml")).unwrap();
        let g = Graph::new(&r).unwrap();
        let merged = merge(
            &r,
            &g,
            &[base, a, layer(vec![]), layer(vec![])],
            &MemBlobs::default(),
        )
        .unwrap();
        let b = merged.entries.iter().find(|e| e.path == "bin/b").unwrap();
        assert_eq!(b.kind, file("bin/b", "x").kind);
    }

    #[test]
    fn directories_differing_only_in_mtime_agree() {
        let base = layer(vec![dir("etc")]);
        let a = layer(vec![
            Entry {
                mtime: 5,
                ..dir("etc")
            },
            file("etc/a", "a"),
        ]);
        let b = layer(vec![
            Entry {
                mtime: 9,
                ..dir("etc")
            },
            file("etc/b", "b"),
        ]);
        assert_eq!(
            run(vec![base, a, b, layer(vec![])]).unwrap(),
            ["etc", "etc/a", "etc/b"]
        );
        let c = layer(vec![Entry {
            mode: 0o700,
            ..dir("etc")
        }]);
        assert!(run(vec![
            layer(vec![dir("etc")]),
            layer(vec![dir("etc")]),
            c,
            layer(vec![])
        ])
        .is_err());
    }

    #[test]
    fn account_databases_merge_line_by_line() {
        let blobs = MemBlobs::default();
        let put = |text: &str| {
            let d = blobs.write(text.as_bytes()).unwrap();
            Entry {
                path: "etc/passwd".into(),
                ..Entry::plain(
                    "etc/passwd",
                    Kind::File {
                        blob: d,
                        size: text.len() as u64,
                    },
                )
            }
        };
        let base = layer(vec![dir("etc"), put("root:x:0:0\nbin:x:2:2\n")]);
        // `a` adds a system user, `b` adds a login user and changes bin; they are unordered.
        let a = layer(vec![
            dir("etc"),
            put("root:x:0:0\nbin:x:2:2\nsshd:x:100:65534\n"),
        ]);
        let b = layer(vec![
            dir("etc"),
            put("root:x:0:0\nbin:x:2:2:changed\nagent:x:1000:1000\n"),
        ]);
        let r = parse(RECIPE, Path::new("r.yaml")).unwrap();
        let g = Graph::new(&r).unwrap();
        let merged = merge(&r, &g, &[base.clone(), a.clone(), b, layer(vec![])], &blobs).unwrap();
        let passwd = merged
            .entries
            .iter()
            .find(|e| e.path == "etc/passwd")
            .unwrap();
        let Kind::File { blob, .. } = &passwd.kind else {
            panic!("not a file")
        };
        assert_eq!(
            String::from_utf8(blobs.read(blob).unwrap()).unwrap(),
            "root:x:0:0\nbin:x:2:2:changed\nsshd:x:100:65534\nagent:x:1000:1000\n"
        );
        // Both changing the same account differently is a conflict.
        let c = layer(vec![
            dir("etc"),
            put("root:x:0:0\nbin:x:2:2\nsshd:x:101:65534\n"),
        ]);
        let e = merge(&r, &g, &[base, a, c, layer(vec![])], &blobs).unwrap_err();
        assert!(e.0.contains("/etc/passwd"), "{e}");
    }

    /// Paths of the fix-ups for `layers` (base, a, b, c), which must merge.
    fn fixed(layers: &[Layer]) -> Vec<(String, Kind)> {
        let r = parse(RECIPE, Path::new("r.yaml")).unwrap();
        let g = Graph::new(&r).unwrap();
        let merged = merge(&r, &g, layers, &MemBlobs::default()).unwrap();
        let fixups = fixups(&merged, &g, layers).expect("parents are directories");
        fixups
            .entries
            .into_iter()
            .map(|e| (e.path, e.kind))
            .collect()
    }

    #[test]
    fn stacked_trees_need_no_fixups_where_merge_only_stacks() {
        let base = layer(vec![
            dir("etc"),
            file("etc/a", "1"),
            dir("opt"),
            file("opt/x", "x"),
        ]);
        let a = layer(vec![dir("etc"), file("etc/a", "2")]);
        let b = layer(vec![Entry {
            mode: 0o700,
            ..Entry::plain("opt", Kind::Dir { opaque: true })
        }]);
        let c = layer(vec![dir("etc"), Entry::plain("etc/a", Kind::Whiteout)]);
        assert_eq!(fixed(&[base, a, b, c]), []);
    }

    #[test]
    fn fixups_hold_what_merge_reconciled_and_split_hard_links_with_parents() {
        let base = layer(vec![dir("etc"), dir("srv")]);
        // Unordered `a` and `b` give etc different mtimes: merge keeps the later.
        let a = layer(vec![
            Entry {
                mtime: 9,
                ..dir("etc")
            },
            file("etc/a", "a"),
        ]);
        let b = layer(vec![
            Entry {
                mtime: 5,
                ..dir("etc")
            },
            file("etc/b", "b"),
            dir("srv"),
            file("srv/f", "f"),
            Entry::plain(
                "srv/g",
                Kind::Hardlink {
                    target: "srv/f".into(),
                },
            ),
        ]);
        // `c` writes srv/f the same as `b` did: the names stay one file in
        // the merged tree, but two trees would show them.
        let c = layer(vec![dir("srv"), file("srv/f", "f")]);
        let fixed = fixed(&[base, a, b, c]);
        let paths: Vec<&str> = fixed.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["etc", "srv", "srv/f", "srv/g"]);
    }
}
