//! The command line on recipes, without building anything: bad recipes are
//! refused with a located, actionable error before any side effect, and
//! `plan` / `graph` describe examples/minimal.yaml. Fast; needs no root.

mod common;

use common::{kiln_run, repo};

/// One bad recipe and what its error must say.
struct Case {
    name: &'static str,
    yaml: &'static str,
    /// Lines the error may point at (1-based). One line, except where two
    /// places are equally right (e.g. a step's id line or its body).
    lines: &'static [usize],
    /// Each must appear in the message: what is wrong, and what to do.
    says: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "yaml-syntax",
        // The flow map opened on line 4 is never closed; the parser notices on line 5.
        yaml: "name: t
steps:
  base:
    debootstrap: {suite: trixie
  motd:
    file: {path: /etc/motd, content: hi}
",
        lines: &[4, 5],
        says: &["expected ',' or '}'"],
    },
    Case {
        name: "unknown-field-top-level",
        yaml: "name: t
outptu:
  size: 64MiB
steps:
  base:
    debootstrap: {suite: trixie}
",
        lines: &[2],
        says: &["unknown field `outptu`", "did you mean `output`?"],
    },
    Case {
        name: "unknown-field-in-step",
        yaml: "name: t
steps:
  base:
    debootstrap:
      suite: trixie
  tools:
    needs: [base]
    apt:
      pakages: [less]
",
        lines: &[9],
        says: &["unknown field `pakages`", "did you mean `packages`?"],
    },
    Case {
        name: "unknown-kind-first-key",
        yaml: "name: t
steps:
  base:
    debootstrap:
      suite: trixie
  tools:
    aptt:
      packages: [less]
    needs: [base]
",
        lines: &[7],
        says: &["unknown step kind `aptt`", "did you mean `apt`?"],
    },
    Case {
        // `needs` first, as examples/minimal.yaml writes every step.
        name: "unknown-kind-after-needs",
        yaml: "name: t
steps:
  base:
    debootstrap:
      suite: trixie
  tools:
    needs: [base]
    aptt:
      packages: [less]
",
        lines: &[8],
        says: &["unknown step kind `aptt`", "did you mean `apt`?"],
    },
    Case {
        name: "duplicate-step-id",
        yaml: "name: t
steps:
  base:
    debootstrap:
      suite: trixie
  motd:
    file: {path: /etc/motd, content: one}
  motd:
    file: {path: /etc/issue, content: two}
",
        lines: &[8],
        says: &["step id `motd` is used twice", "give each step its own id"],
    },
    Case {
        name: "needs-unknown-step",
        yaml: "name: t
steps:
  base:
    debootstrap:
      suite: trixie
  stamp:
    needs: [bsae]
    run: date > /etc/stamp
",
        lines: &[6, 7],
        says: &[
            "needs `bsae`",
            "not a step in this recipe",
            "did you mean `base`?",
        ],
    },
    Case {
        name: "cycle",
        yaml: "name: t
steps:
  base:
    debootstrap:
      suite: trixie
  a:
    needs: [base, b]
    run: touch /a
  b:
    needs: [a]
    run: touch /b
",
        lines: &[6],
        says: &["cycle", "a -> b -> a", "remove one of these `needs`"],
    },
    Case {
        name: "relative-path",
        yaml: "name: t
steps:
  motd:
    file:
      path: etc/motd
      content: hi
",
        lines: &[5],
        says: &["path `etc/motd` is relative", "`/etc/motd`"],
    },
    Case {
        // `path` is not the first key here: the error must still point at it.
        name: "dotdot-path",
        yaml: "name: t
steps:
  motd:
    file:
      content: hi
      path: /etc/../../motd
",
        lines: &[6],
        says: &["`..`", "write the path without `..`"],
    },
    Case {
        name: "bad-mode",
        yaml: "name: t
steps:
  motd:
    file:
      path: /etc/motd
      content: hi
      mode: \"0999\"
",
        lines: &[7],
        says: &["mode `0999` is not an octal file mode", "\"0644\""],
    },
    Case {
        name: "bad-owner",
        yaml: "name: t
steps:
  motd:
    file:
      path: /etc/motd
      content: hi
      mode: \"0644\"
      owner: \"Bad Owner\"
",
        lines: &[8],
        says: &["owner `Bad Owner`", "`user[:group]`", "`agent:agent`"],
    },
    Case {
        name: "bad-size",
        yaml: "name: t
output:
  rootfs: t.ext4
  size: 2 GB
steps:
  motd:
    file: {path: /etc/motd, content: hi}
",
        lines: &[4],
        says: &["size `2 GB` is not a size", "`2GiB`"],
    },
    Case {
        name: "missing-kind",
        yaml: "name: t
steps:
  base:
    debootstrap:
      suite: trixie
  tools:
    needs: [base]
  motd:
    needs: [base]
    file: {path: /etc/motd, content: hi}
",
        lines: &[6, 7],
        says: &[
            "step `tools` has no kind",
            "add one of: debootstrap, apt, file, run",
        ],
    },
    Case {
        name: "boot-check-bad-pattern",
        yaml: "name: t
steps:
  motd:
    file: {path: /etc/motd, content: hi}
boot:
  checks:
    - name: node
      command: node --version
      matches: '^v22.('
",
        lines: &[5, 6, 7],
        says: &["`matches` is not a regular expression"],
    },
];

/// Splits `error: FILE:LINE:COL: message` into (line, column, message).
fn located<'a>(stderr: &'a str, file: &str) -> Option<(usize, usize, &'a str)> {
    let rest = stderr.strip_prefix("error: ")?.strip_prefix(file)?;
    let mut parts = rest.strip_prefix(':')?.splitn(3, ':');
    let line = parts.next()?.parse().ok()?;
    let column = parts.next()?.parse().ok()?;
    let message = parts.next()?.strip_prefix(' ')?;
    Some((line, column, message))
}

/// Every class of bad recipe: exit code != 0, `error: FILE:LINE:COL:` at the
/// right line, a hint, and no cache directory or output created (as root,
/// `build` parses before it touches anything).
#[test]
fn bad_recipes_are_located_actionable_and_touch_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for case in CASES {
        let recipe = tmp.path().join(format!("{}.yaml", case.name));
        std::fs::write(&recipe, case.yaml).unwrap();
        let cache = tmp.path().join(format!("{}-cache", case.name));
        let out = tmp.path().join(format!("{}-out", case.name));
        let ran = kiln_run([
            "build".as_ref(),
            recipe.as_os_str(),
            "--cache".as_ref(),
            cache.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
        ]);
        let stderr = ran.stderr();
        let mut problems = Vec::new();
        if ran.success() {
            problems.push("exited 0".to_string());
        }
        match located(&stderr, &recipe.display().to_string()) {
            None => problems.push("stderr does not start with `error: FILE:LINE:COL: `".into()),
            Some((line, column, message)) => {
                if !case.lines.contains(&line) {
                    problems.push(format!("points at line {line}, expected {:?}", case.lines));
                }
                if column == 0 {
                    problems.push("column is 0".into());
                }
                for needle in case.says {
                    if !message.contains(needle) {
                        problems.push(format!("message lacks {needle:?}"));
                    }
                }
            }
        }
        if cache.exists() {
            problems.push(format!("created the cache dir {}", cache.display()));
        }
        if out.exists() {
            problems.push(format!("created the output dir {}", out.display()));
        }
        if !problems.is_empty() {
            let numbered: String = case
                .yaml
                .lines()
                .enumerate()
                .map(|(i, l)| format!("{:>3} | {l}\n", i + 1))
                .collect();
            failures.push(format!(
                "[{}] {}\n{numbered}{ran}",
                case.name,
                problems.join("; ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad recipes were not reported properly:\n\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n\n")
    );
}

#[test]
fn plan_on_an_empty_cache_builds_the_base_and_waits_for_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let recipe = repo("examples/minimal.yaml");
    let ran = kiln_run([
        "plan".as_ref(),
        recipe.as_os_str(),
        "--cache".as_ref(),
        cache.as_os_str(),
        "--json".as_ref(),
    ]);
    let plan = ran.json();
    let steps = plan
        .as_array()
        .unwrap_or_else(|| panic!("not a list:\n{ran}"));
    let ids: Vec<&str> = steps.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["base", "tools", "motd", "stamp"], "{ran}");

    let base = &steps[0];
    assert_eq!(base["status"], "build", "{ran}");
    assert_eq!(base["kind"], "debootstrap", "{ran}");
    let key = base["key"]
        .as_str()
        .unwrap_or_else(|| panic!("no key:\n{ran}"));
    assert!(
        key.len() == 64 && key.chars().all(|c| c.is_ascii_hexdigit()),
        "base key {key:?} is not a blake3 hex digest"
    );
    for step in &steps[1..] {
        assert_eq!(step["status"], "pending", "{}: {ran}", step["id"]);
        assert!(step["key"].is_null(), "{}: {ran}", step["id"]);
        let waits: Vec<&str> = step["waits_on"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap())
            .collect();
        let needs: Vec<&str> = step["needs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap())
            .collect();
        assert_eq!(
            waits, needs,
            "waits for its unbuilt needs: {}: {ran}",
            step["id"]
        );
    }
    assert_eq!(steps[3]["needs"], serde_json::json!(["tools", "motd"]));
    assert!(!cache.exists(), "plan created the cache dir");

    // The table form says the same.
    let ran = kiln_run([
        "plan".as_ref(),
        recipe.as_os_str(),
        "--cache".as_ref(),
        cache.as_os_str(),
    ]);
    let text = ran.expect_success();
    assert!(
        text.contains("4 steps: 0 cached, 1 to build, 3 pending"),
        "{ran}"
    );
}

#[test]
fn graph_prints_the_dependency_edges_in_dot() {
    let ran = kiln_run(["graph".as_ref(), repo("examples/minimal.yaml").as_os_str()]);
    let dot = ran.expect_success();
    assert!(dot.starts_with("digraph \"minimal\" {"), "{ran}");
    for edge in [
        "\"base\" -> \"tools\"",
        "\"base\" -> \"motd\"",
        "\"tools\" -> \"stamp\"",
        "\"motd\" -> \"stamp\"",
    ] {
        assert!(dot.contains(edge), "missing {edge}:\n{ran}");
    }
    assert_eq!(dot.matches("->").count(), 4, "{ran}");
    assert!(dot.trim_end().ends_with('}'), "{ran}");
}

/// `kiln boot` takes the login user from the recipe (its `boot: user:`, or
/// its only `user` step) and says how to name one when it cannot.
#[test]
fn boot_needs_a_user_to_log_in_as() {
    let tmp = tempfile::tempdir().unwrap();
    let boot = |recipe: &std::path::Path| {
        let mut cmd = common::kiln();
        cmd.env("TMPDIR", tmp.path())
            .args(["boot", "--recipe"])
            .arg(recipe)
            .arg("-o")
            .arg(tmp.path().join("no-build"));
        common::run(cmd)
    };
    let recipe = tmp.path().join("r.yaml");
    let without_user = "name: r\noutput: {kernel: vmlinux}\nsteps:\n  motd:\n    file: {path: /etc/motd, content: hi}\n";
    std::fs::write(&recipe, without_user).unwrap();
    let ran = boot(&recipe);
    assert!(!ran.success(), "{ran}");
    assert!(ran.stderr().contains("give --user"), "{ran}");
    // With a user, it gets as far as the missing build.
    std::fs::write(&recipe, format!("{without_user}boot: {{user: agent}}\n")).unwrap();
    let ran = boot(&recipe);
    assert!(!ran.success(), "{ran}");
    assert!(ran.stderr().contains("no such file"), "{ran}");
    assert!(!ran.stderr().contains("give --user"), "{ran}");
}

#[test]
fn cache_push_and_pull_without_a_remote_say_how_to_name_one() {
    let tmp = tempfile::tempdir().unwrap();
    for (verb, says) in [
        ("pull", "no remote to pull from"),
        ("push", "no remote to push to"),
    ] {
        let mut cmd = common::kiln();
        cmd.current_dir(tmp.path())
            .env_remove("KILN_REMOTES")
            .args(["cache", verb])
            .arg(repo("examples/minimal.yaml"))
            .arg("--cache")
            .arg(tmp.path().join("cache"));
        let ran = common::run(cmd);
        assert!(!ran.success(), "{ran}");
        assert!(ran.stderr().contains(says), "{ran}");
        assert!(ran.stderr().contains("--remote URL"), "{ran}");
    }
}
