//! From a step to its key and the layer the store holds for it: the one
//! place that walks a recipe's graph and asks the action cache. `plan`,
//! `build`, `kiln cache pull/push` and gc all go through it.
//!
//! A step's key is a function of its lower layers' digests (see [`crate::key`]),
//! so it is known once every step below it has a layer: [`walk`] visits the
//! steps in graph order and hands each one its lowers when they are known;
//! [`find`] says what the store holds for one step over given lowers.
//!
//! A step that resolves packages (see [`crate::lock`]) and has no pins is
//! the one subtle case: the archive decides what it installs, so its key
//! without pins stands only for "a run of this step", whose action entry
//! records the packages that run installed (`resolved`). Reusing that run
//! takes those packages as the step's pins, and its key is the one they give
//! ([`pinned_key`]). Without such a run the step runs (it is never pulled by
//! its key without pins: builds push the key their pins give).

use std::path::Path;

use crate::digest::Digest;
use crate::dpkg::Deb;
use crate::graph::Graph;
use crate::key::step_key;
use crate::lock;
use crate::recipe::{Recipe, Step};
use crate::step::{StepContext, StepError};
use crate::store::{ActionEntry, Store, StoreError};

/// Why a step's key or cache entry could not be found.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The step's kind could not compute its key (a file it reads, say).
    #[error("step `{id}`: {source}")]
    Key {
        id: String,
        #[source]
        source: StepError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the store holds for a step over given lower layers.
#[derive(Debug, Clone)]
pub enum Found {
    /// The step's layer, under `key`.
    Cached { key: Digest, layer: Digest },
    /// A run of the step without pins (`run`, under `run_key`, its key
    /// without pins): what it installed, `pins`, become the step's pins,
    /// and `key` is the key they give.
    Resolved {
        key: Digest,
        pins: Vec<Deb>,
        run_key: Digest,
        run: ActionEntry,
    },
    /// Nothing: the step runs under `key`. When it `resolves` (it downloads
    /// packages and has no pins) `key` is its key without pins, and no
    /// remote holds it.
    Missing { key: Digest, resolves: bool },
}

impl Found {
    /// The key the step's layer is (or will be) recorded under, as far as it is known.
    pub fn key(&self) -> Digest {
        match self {
            Found::Cached { key, .. }
            | Found::Resolved { key, .. }
            | Found::Missing { key, .. } => *key,
        }
    }

    /// The step's layer, when the store holds it.
    pub fn layer(&self) -> Option<Digest> {
        match self {
            Found::Cached { layer, .. } => Some(*layer),
            Found::Resolved { run, .. } => Some(run.layer),
            Found::Missing { .. } => None,
        }
    }
}

/// The context a step's key is computed in (nothing runs).
pub fn context<'a>(step: &'a Step, ssh_key: Option<&'a Path>) -> StepContext<'a> {
    StepContext::reading(step.origin.dir(), ssh_key)
}

/// The key of `step` over `lowers`, with the pins it has in the lock (if any).
pub fn key(
    step: &Step,
    epoch: i64,
    lowers: &[Digest],
    ctx: &StepContext,
) -> Result<Digest, ResolveError> {
    step_key(step, epoch, lowers, ctx).map_err(|source| ResolveError::Key {
        id: step.id.clone(),
        source,
    })
}

/// The key of `step` over `lowers` were `pins` its pins in the lock.
pub fn pinned_key(
    step: &Step,
    pins: &[Deb],
    epoch: i64,
    lowers: &[Digest],
    ctx: &StepContext,
) -> Result<Digest, ResolveError> {
    let mut locked = step.clone();
    locked.pinned = Some(pins.to_vec());
    key(&locked, epoch, lowers, ctx)
}

/// Whether `step` resolves its packages against the archive when it runs:
/// it downloads packages and the lock pins none for it.
pub fn resolves(step: &Step) -> bool {
    lock::resolves(&step.kind) && step.pinned.is_none()
}

/// What the store holds for `step` over `lowers`. With `reuse_runs` false
/// (`kiln lock --update STEP`), a step that resolves ignores its cached runs
/// and is `Missing`: it runs to resolve against the archive now.
pub fn find(
    store: &Store,
    step: &Step,
    epoch: i64,
    lowers: &[Digest],
    ctx: &StepContext,
    reuse_runs: bool,
) -> Result<Found, ResolveError> {
    let key = key(step, epoch, lowers, ctx)?;
    let held = store
        .action(&key)?
        .filter(|entry| store.has_layer(&entry.layer));
    if !resolves(step) {
        return Ok(match held {
            Some(entry) => Found::Cached {
                key,
                layer: entry.layer,
            },
            None => Found::Missing {
                key,
                resolves: false,
            },
        });
    }
    match held {
        Some(run) if reuse_runs && run.resolved.is_some() => {
            let pins = run.resolved.clone().unwrap_or_default();
            Ok(Found::Resolved {
                key: pinned_key(step, &pins, epoch, lowers, ctx)?,
                pins,
                run_key: key,
                run,
            })
        }
        _ => Ok(Found::Missing {
            key,
            resolves: true,
        }),
    }
}

/// The steps below step `i` (lowest first, as its key takes their layers),
/// each by id with its layer in `layers` (by step index; `None`: unknown).
pub fn below(
    recipe: &Recipe,
    graph: &Graph,
    i: usize,
    layers: &[Option<Digest>],
) -> Vec<(String, Option<Digest>)> {
    graph
        .ancestors(i)
        .iter()
        .map(|&a| (recipe.steps[a].id.clone(), layers[a]))
        .collect()
}

/// One step as [`walk`] visits it.
pub struct Visit<'a> {
    /// The step's index in the recipe.
    pub index: usize,
    pub step: &'a Step,
    /// Its lower layers (lowest first), when every step below it has one.
    pub lowers: Option<Vec<Digest>>,
    /// The steps below it, by id, with their layers where known.
    pub below: Vec<(String, Option<Digest>)>,
    /// The layer of every step visited so far (by index; `None` when unknown).
    pub layers: &'a [Option<Digest>],
    /// The context its key is computed in.
    pub ctx: StepContext<'a>,
}

impl Visit<'_> {
    /// What the store holds for the step once its lowers are known (see
    /// [`find`]; cached runs give their pins).
    pub fn find(&self, store: &Store, epoch: i64) -> Result<Option<Found>, ResolveError> {
        self.lowers
            .as_ref()
            .map(|lowers| find(store, self.step, epoch, lowers, &self.ctx, true))
            .transpose()
    }
}

/// Visits the steps of `recipe` in graph order; `visit` returns the layer the
/// step has (or will have), if known, which gives the steps above it their
/// lowers. Stops at the first error.
pub fn walk<E>(
    recipe: &Recipe,
    graph: &Graph,
    ssh_key: Option<&Path>,
    mut visit: impl FnMut(Visit) -> Result<Option<Digest>, E>,
) -> Result<(), E> {
    let mut layers: Vec<Option<Digest>> = vec![None; recipe.steps.len()];
    for &i in graph.order() {
        let step = &recipe.steps[i];
        let below = below(recipe, graph, i, &layers);
        let lowers = below.iter().map(|(_, layer)| *layer).collect();
        let layer = visit(Visit {
            index: i,
            step,
            lowers,
            below,
            layers: &layers,
            ctx: context(step, ssh_key),
        })?;
        layers[i] = layer;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Layer, LAYER_FORMAT};
    use crate::store::Origin;

    const RECIPE: &str = "
name: resolve
steps:
  base:
    file:
      path: /etc/hostname
      content: kiln
  tools:
    needs: [base]
    apt:
      packages: [jq]
  motd:
    needs: [tools]
    file:
      path: /etc/motd
      content: hi
";

    fn entry(layer: Digest, resolved: Option<Vec<Deb>>) -> ActionEntry {
        ActionEntry {
            layer,
            step: "a step".into(),
            build_ms: 1,
            origin: Origin::Built,
            resolved,
        }
    }

    /// What `walk` and `find` say of each step they reach: its id, layer, key.
    fn walked(recipe: &Recipe, store: &Store) -> Vec<(String, Option<Digest>, Digest)> {
        let graph = Graph::new(recipe).unwrap();
        let mut seen = Vec::new();
        walk(recipe, &graph, None, |v| {
            let Some(found) = v.find(store, 0)? else {
                return Ok::<_, ResolveError>(None);
            };
            seen.push((v.step.id.clone(), found.layer(), found.key()));
            Ok(found.layer())
        })
        .unwrap();
        seen
    }

    #[test]
    fn a_cached_run_without_pins_gives_its_pins_and_their_key() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let recipe = crate::recipe::parse(RECIPE, Path::new("resolve.yaml")).unwrap();
        let (base, tools, motd) = (&recipe.steps[0], &recipe.steps[1], &recipe.steps[2]);
        let layer = store
            .put_layer(&Layer {
                format: LAYER_FORMAT,
                entries: vec![],
            })
            .unwrap();
        let base_key = key(base, 0, &[], &context(base, None)).unwrap();
        store.put_action(&base_key, &entry(layer, None)).unwrap();
        let ctx = context(tools, None);
        let lowers = [layer];
        let run_key = key(tools, 0, &lowers, &ctx).unwrap();

        // The apt step resolves by running; the step above it waits (it has
        // no lowers yet).
        let seen = walked(&recipe, &store);
        assert_eq!(
            seen,
            vec![
                ("base".to_string(), Some(layer), base_key),
                ("tools".to_string(), None, run_key)
            ]
        );

        // A run recorded without what it installed cannot give pins.
        store.put_action(&run_key, &entry(layer, None)).unwrap();
        assert!(matches!(
            find(&store, tools, 0, &lowers, &ctx, true).unwrap(),
            Found::Missing { resolves: true, key } if key == run_key
        ));

        // A run with its packages: reused, under the key its pins give.
        let pins = vec![Deb {
            name: "jq".into(),
            version: "1.7".into(),
            arch: "amd64".into(),
            sha256: "ab".repeat(32),
        }];
        store
            .put_action(&run_key, &entry(layer, Some(pins.clone())))
            .unwrap();
        let pinned = pinned_key(tools, &pins, 0, &lowers, &ctx).unwrap();
        assert_ne!(pinned, run_key);
        match find(&store, tools, 0, &lowers, &ctx, true).unwrap() {
            Found::Resolved {
                key,
                pins: got,
                run_key: got_run,
                run,
            } => {
                assert_eq!((key, got_run, run.layer), (pinned, run_key, layer));
                assert_eq!(got, pins);
            }
            other => panic!("expected the cached run's pins, got {other:?}"),
        }
        // ... unless the step is to resolve against the archive again.
        assert!(matches!(
            find(&store, tools, 0, &lowers, &ctx, false).unwrap(),
            Found::Missing { resolves: true, .. }
        ));

        // The step above now has its lowers, and its key over them.
        let motd_lowers = [layer, layer];
        let motd_key = key(motd, 0, &motd_lowers, &context(motd, None)).unwrap();
        let seen = walked(&recipe, &store);
        assert_eq!(
            seen[1..],
            [
                ("tools".to_string(), Some(layer), pinned),
                ("motd".to_string(), None, motd_key)
            ]
        );
        store.put_action(&motd_key, &entry(layer, None)).unwrap();
        assert!(matches!(
            find(&store, motd, 0, &motd_lowers, &context(motd, None), true).unwrap(),
            Found::Cached { key, layer: l } if key == motd_key && l == layer
        ));
    }
}
