//! What the directory-remote and registry tests (tests/remote.rs,
//! tests/oci.rs) share: a recipe of file steps, builds that push to or pull
//! from a remote, and reading a build's step outcomes.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::{build_command, run, Ran};

/// A recipe of file steps only: no base, no network, builds in a second.
/// `empty` (an empty file, so an empty blob) does not wait for the others.
pub fn file_recipe(dir: &Path, marker: &str) -> PathBuf {
    let recipe = dir.join("files.yaml");
    std::fs::write(
        &recipe,
        format!(
            "name: files\noutput: {{size: 32MiB}}\nsteps:\n  etc:\n    file: {{path: /etc/marker, content: \"{marker}\\n\"}}\n  \
             bin:\n    needs: [etc]\n    file: {{path: /usr/local/bin/tool, content: \"#!/bin/sh\\necho {marker}\\n\", mode: \"0755\"}}\n  \
             empty:\n    file: {{path: /etc/empty, content: \"\"}}\n"
        ),
    )
    .unwrap();
    recipe
}

/// `kiln build RECIPE --cache CACHE -o OUT --json EXTRA…`, run.
pub fn build(recipe: &Path, cache: &Path, out: &Path, extra: &[&OsStr]) -> Ran {
    let mut cmd = build_command(recipe, cache, out);
    cmd.args(extra);
    run(cmd)
}

/// A build pushing to `remote`, signed with `key`.
pub fn push_build(
    recipe: &Path,
    cache: &Path,
    out: &Path,
    remote: &(impl AsRef<OsStr> + ?Sized),
    key: &Path,
) -> Ran {
    build(
        recipe,
        cache,
        out,
        &[
            "--remote".as_ref(),
            remote.as_ref(),
            "--signing-key".as_ref(),
            key.as_os_str(),
        ],
    )
}

/// A build on a second machine: pulls from `remote`, trusts `public`,
/// pushes nothing.
pub fn pull_build(
    recipe: &Path,
    cache: &Path,
    out: &Path,
    remote: &(impl AsRef<OsStr> + ?Sized),
    public: &Path,
) -> Ran {
    build(
        recipe,
        cache,
        out,
        &[
            "--remote".as_ref(),
            remote.as_ref(),
            "--trusted-key".as_ref(),
            public.as_os_str(),
            "--no-push".as_ref(),
        ],
    )
}

/// Each step's outcome (`built`, `pulled`, `cached`), in the report's order.
pub fn outcomes(ran: &Ran) -> Vec<String> {
    step_field(ran, "outcome")
}

/// Each step's key, in the report's order.
pub fn step_keys(ran: &Ran) -> Vec<String> {
    step_field(ran, "key")
}

fn step_field(ran: &Ran, field: &str) -> Vec<String> {
    ran.json()["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[field].as_str().unwrap().to_string())
        .collect()
}

/// Every file below `dir` (none when it does not exist).
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| !e.file_type().is_dir())
        .map(|e| e.into_path())
        .collect()
}
