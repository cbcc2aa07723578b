//! Editors and shells: `kiln schema` prints the recipe JSON Schema that every
//! recipe in the repository names in its first line and validates against
//! (checked with python3-jsonschema, a validator kiln did not write), and
//! `kiln completions` prints scripts the shells accept. Needs no root.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{kiln_run, repo, run};

/// Every recipe in the repository: recipes/, examples/ and the test recipes.
fn recipes() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in ["recipes", "examples", "tests/recipes"] {
        for entry in walkdir::WalkDir::new(repo(dir)).sort_by_file_name() {
            let path = entry.unwrap().into_path();
            // examples/ci holds a CI workflow, not a recipe.
            if path.extension().is_some_and(|e| e == "yaml")
                && !path.starts_with(repo("examples/ci"))
            {
                found.push(path);
            }
        }
    }
    assert!(found.len() >= 10, "found only {found:?}");
    found
}

/// Validates each YAML document (path, text) against the schema with
/// python3-jsonschema; returns the error of each, `None` if it is valid.
fn validate(schema: &str, documents: &[(String, String)]) -> Vec<Option<String>> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("schema.json"), schema).unwrap();
    std::fs::write(
        dir.path().join("documents.json"),
        serde_json::to_vec(documents).unwrap(),
    )
    .unwrap();
    let script = r#"
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
validator = jsonschema.Draft202012Validator(schema)
out = []
for name, text in json.load(open(sys.argv[2])):
    errors = sorted(validator.iter_errors(yaml.safe_load(text)), key=lambda e: list(e.path))
    out.append("; ".join(f"{list(e.path)}: {e.message}" for e in errors) or None)
print(json.dumps(out))
"#;
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(script)
        .arg(dir.path().join("schema.json"))
        .arg(dir.path().join("documents.json"));
    let ran = run(cmd);
    assert!(
        ran.success(),
        "python3 with python3-yaml and python3-jsonschema is needed (tests/run installs them):\n{ran}"
    );
    serde_json::from_str(&ran.stdout()).unwrap()
}

#[test]
fn every_recipe_names_the_schema_and_validates_against_it() {
    let schema = kiln_run(["schema"]).expect_success();
    assert_eq!(
        schema,
        std::fs::read_to_string(repo("docs/recipe.schema.json")).unwrap()
    );
    let mut documents = Vec::new();
    for recipe in recipes() {
        let text = std::fs::read_to_string(&recipe).unwrap();
        let first = text.lines().next().unwrap_or("");
        let named = first
            .strip_prefix("# yaml-language-server: $schema=")
            .unwrap_or_else(|| {
                panic!(
                    "{}: the first line must be `# yaml-language-server: $schema=…`",
                    recipe.display()
                )
            });
        let target = recipe.parent().unwrap().join(named);
        assert_eq!(
            std::fs::canonicalize(&target).ok(),
            std::fs::canonicalize(repo("docs/recipe.schema.json")).ok(),
            "{}: the schema comment points at {}",
            recipe.display(),
            target.display()
        );
        documents.push((recipe.display().to_string(), text));
    }
    let results = validate(&schema, &documents);
    let invalid: Vec<String> = documents
        .iter()
        .zip(&results)
        .filter_map(|((name, _), error)| error.as_ref().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(invalid.is_empty(), "{}", invalid.join("\n"));
}

#[test]
fn the_schema_refuses_what_kiln_refuses() {
    let schema = kiln_run(["schema"]).expect_success();
    let sha = "0".repeat(64);
    let bad = [
        "name: x\nsteps:\n  a:\n    apt: {packages: [jq], recommends: true}\n",
        "name: x\nsteps:\n  a:\n    file: {path: /etc/x}\n",
        "name: x\nsteps:\n  a:\n    file: {path: /etc/x, content: a}\n    run: {script: 'true'}\n",
        &format!("name: x\nsteps:\n  a:\n    fetch: {{npm: a@1.0.0, url: 'https://e/x.tgz', sha256: '{sha}', dest: /x}}\n"),
        "name: x\nsteps:\n  a:\n    needs: base\n    run: {script: 'true'}\n",
        "name: x\noutput: {size: 2GiB, colour: red}\nsteps: {}\n",
        "name: x\nsteps:\n  a: {}\n",
        "name: x\nsteps: {}\nboot: {checks: [{name: n, command: 'true', retry: 3}]}\n",
        "name: x\nsteps: {}\nboot: {user: Agent}\n",
    ];
    let documents: Vec<(String, String)> = bad
        .iter()
        .enumerate()
        .map(|(i, text)| (format!("bad {i}"), text.to_string()))
        .collect();
    for ((name, text), error) in documents.iter().zip(validate(&schema, &documents)) {
        assert!(error.is_some(), "{name} passed the schema:\n{text}");
        // kiln refuses it too.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, text).unwrap();
        let ran = kiln_run(["plan".as_ref(), path.as_os_str()]);
        assert!(!ran.success(), "kiln accepted {name}:\n{text}");
    }
}

#[test]
fn completion_scripts_are_accepted_by_their_shells() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = kiln_run(["completions", shell]).expect_success();
        for subcommand in [
            "build", "plan", "verify", "boot", "cache", "schema", "lock", "diff",
        ] {
            assert!(
                script.contains(subcommand),
                "{shell}: no `{subcommand}` in\n{script}"
            );
        }
    }
    // zsh and fish parse theirs.
    for (shell, check) in [("zsh", "-n"), ("fish", "--no-execute")] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(format!("kiln.{shell}"));
        std::fs::write(&file, kiln_run(["completions", shell]).expect_success()).unwrap();
        let mut cmd = Command::new(shell);
        cmd.arg(check).arg(&file);
        run(cmd).expect_success();
    }
    // bash loads it and then completes `kiln`.
    let script = kiln_run(["completions", "bash"]).expect_success();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kiln.bash");
    std::fs::write(&file, script).unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!(
            "source {} && complete -p kiln && COMP_WORDS=(kiln ca) COMP_CWORD=1 && _kiln kiln ca kiln && echo \"${{COMPREPLY[@]}}\"",
            file.display()
        ));
    let ran = run(cmd);
    let out = ran.expect_success();
    assert!(out.contains("-F _kiln kiln"), "{ran}");
    assert!(out.lines().last().unwrap_or("").contains("cache"), "{ran}");
}
