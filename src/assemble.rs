//! Assembly: merging the steps' layers into the image's tree.
//!
//! Layers are applied in graph order: a later entry replaces an earlier one, a
//! whiteout deletes a path and everything below it, an opaque directory hides
//! what earlier layers put below it. Two steps that the graph leaves unordered
//! must not write the same path differently (the result would depend on an
//! arbitrary order): that is an error naming both steps and the paths.

use std::collections::{BTreeMap, BTreeSet};

use crate::graph::Graph;
use crate::layer::{Entry, Kind, Layer, LAYER_FORMAT};
use crate::recipe::Recipe;

/// Unordered steps that wrote the same paths differently.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConflictError(pub String);

/// Who last wrote a path, and what.
struct Written {
    entry: Option<Entry>,
    step: usize,
}

/// Merges `layers[i]` (the layer of step `i`) in graph order.
pub fn merge(recipe: &Recipe, graph: &Graph, layers: &[Layer]) -> Result<Layer, ConflictError> {
    let mut tree: BTreeMap<String, Written> = BTreeMap::new();
    // Files that hardlinks point at, as their own layer had them.
    let mut link_sources: BTreeMap<String, Entry> = BTreeMap::new();
    let mut conflicts: BTreeMap<(usize, usize), BTreeSet<String>> = BTreeMap::new();

    for &step in graph.order() {
        let layer = &layers[step];
        let files: BTreeMap<&str, &Entry> =
            layer.entries.iter().map(|e| (e.path.as_str(), e)).collect();
        for entry in &layer.entries {
            if let Some(prev) = tree.get(&entry.path) {
                let same = match (&prev.entry, &entry.kind) {
                    (None, Kind::Whiteout) => true,
                    (Some(p), _) => p == entry,
                    _ => false,
                };
                if !same && !graph.is_ancestor(prev.step, step) {
                    conflicts
                        .entry((prev.step, step))
                        .or_default()
                        .insert(entry.path.clone());
                }
            }
            let replaces_dir = !matches!(entry.kind, Kind::Dir { opaque: false });
            if replaces_dir {
                remove_below(&mut tree, &entry.path);
            }
            let merged = match &entry.kind {
                Kind::Whiteout => None,
                Kind::Dir { opaque: true } => Some(Entry {
                    kind: Kind::Dir { opaque: false },
                    ..entry.clone()
                }),
                Kind::Hardlink { target } => {
                    if let Some(source) = files.get(target.as_str()) {
                        link_sources.insert(entry.path.clone(), (*source).clone());
                    }
                    Some(entry.clone())
                }
                _ => Some(entry.clone()),
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

/// Removes every path strictly below `dir`.
fn remove_below(tree: &mut BTreeMap<String, Written>, dir: &str) {
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

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Default::default(),
        }
    }

    fn file(path: &str, content: &str) -> Entry {
        entry(
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
            ..entry(path, Kind::Dir { opaque: false })
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
        let merged = merge(&r, &g, &layers)?;
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
            entry("opt", Kind::Whiteout),
        ]);
        let b = layer(vec![dir("etc"), file("etc/b", "b")]);
        let c = layer(vec![
            Entry {
                mode: 0o755,
                ..entry("srv", Kind::Dir { opaque: true })
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
            entry(
                "bin/b",
                Kind::Hardlink {
                    target: "bin/a".into(),
                },
            ),
        ]);
        let a = layer(vec![dir("bin"), file("bin/a", "replaced")]);
        let r = parse(RECIPE, Path::new("r.yaml")).unwrap();
        let g = Graph::new(&r).unwrap();
        let merged = merge(&r, &g, &[base, a, layer(vec![]), layer(vec![])]).unwrap();
        let b = merged.entries.iter().find(|e| e.path == "bin/b").unwrap();
        assert_eq!(b.kind, file("bin/b", "x").kind);
    }
}
