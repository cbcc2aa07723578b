//! The CI example (`examples/ci/`) stays in step with kiln: it is valid YAML,
//! each kiln command it runs parses with the flags kiln has today, and each
//! `KILN_*` setting it gives is one kiln reads. Needs no root.

mod common;

use common::{kiln_run, repo};

fn workflow() -> serde_yaml::Value {
    let text = std::fs::read_to_string(repo("examples/ci/github-actions.yml")).unwrap();
    serde_yaml::from_str(&text).expect("the CI example is valid YAML")
}

/// Every `run:` script of every job.
fn scripts(workflow: &serde_yaml::Value) -> Vec<String> {
    let mut found = Vec::new();
    for (_, job) in workflow["jobs"].as_mapping().expect("jobs") {
        for step in job["steps"].as_sequence().expect("steps") {
            if let Some(script) = step["run"].as_str() {
                found.push(script.to_string());
            }
        }
    }
    found
}

#[test]
fn the_ci_example_runs_kiln_commands_that_exist() {
    let workflow = workflow();
    let mut commands = Vec::new();
    for script in scripts(&workflow) {
        for line in script.lines() {
            let Some((_, args)) = line.split_once("/kiln/bin/kiln\" ") else {
                continue;
            };
            let args: Vec<&str> = args
                .split_whitespace()
                .take_while(|a| !a.starts_with('>'))
                .collect();
            // clap refuses an unknown subcommand or flag before it gets to `--help`.
            let ran = kiln_run(args.iter().copied().chain(["--help"]));
            assert!(
                ran.success(),
                "`kiln {}` does not parse:\n{ran}",
                args.join(" ")
            );
            commands.push(args.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        }
    }
    // It builds under sudo keeping the job's KILN_* settings, then verifies
    // the image it built against the same recipe.
    let build = commands
        .iter()
        .find(|c| c[0] == "build")
        .expect("the example runs no kiln build");
    let verify = commands
        .iter()
        .find(|c| c[0] == "verify")
        .expect("the example runs no kiln verify");
    let recipe = &build[1];
    assert!(
        verify.contains(recipe) && verify.iter().any(|a| a.starts_with("images/")),
        "verify does not check the image built from {recipe}: {verify:?}"
    );
    assert!(
        scripts(&workflow)
            .iter()
            .any(|s| s.contains("sudo --preserve-env") && s.contains("kiln\" build")),
        "the build does not keep the job's settings under sudo"
    );
}

#[test]
fn the_ci_example_uploads_the_images() {
    let workflow = workflow();
    let uploads: Vec<&serde_yaml::Value> = workflow["jobs"]
        .as_mapping()
        .expect("jobs")
        .values()
        .flat_map(|job| job["steps"].as_sequence().expect("steps"))
        .filter(|step| {
            step["uses"]
                .as_str()
                .is_some_and(|u| u.starts_with("actions/upload-artifact@"))
        })
        .collect();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    let path = uploads[0]["with"]["path"].as_str().unwrap_or("");
    assert!(
        path.lines().any(|l| l.trim() == "images/"),
        "the upload does not take images/: {path:?}"
    );
}

#[test]
fn the_ci_example_sets_only_settings_kiln_reads() {
    let text = std::fs::read_to_string(repo("examples/ci/github-actions.yml")).unwrap();
    let mut source = String::new();
    for entry in walkdir::WalkDir::new(repo("src")) {
        let path = entry.unwrap().into_path();
        if path.extension().is_some_and(|e| e == "rs") {
            source.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    let names: std::collections::BTreeSet<&str> = text
        .match_indices("KILN_")
        .map(|(at, _)| {
            let rest = &text[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit()))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    for name in [
        "KILN_REMOTES",
        "KILN_SIGNING_KEY",
        "KILN_TRUSTED_KEYS",
        "KILN_PUSH",
    ] {
        assert!(names.contains(name), "the example does not set {name}");
    }
    // Repository variables of the example itself, not kiln settings.
    let own = ["KILN_REGISTRY", "KILN_REPOSITORY"];
    for name in names.iter().filter(|n| !own.contains(n)) {
        assert!(
            source.contains(&format!("\"{name}\"")),
            "the example sets {name}, which kiln does not read"
        );
    }
}
