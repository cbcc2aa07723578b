//! Step keys: what a step's output is a function of.
//!
//! `StepKey = blake3(encode("kiln step key", KEY_FORMAT, kind, kind parameters
//! incl. the bytes of files it reads, the lock's pins for it if any, epoch,
//! lower layer digests in order))`.
//! The step's id is not part of it (renaming a step rebuilds nothing), nor is
//! anything about the machine or the time. Because lower layers enter by their
//! *content* digest, a dependency that re-runs and produces the same layer
//! leaves its dependents cached (early cutoff).

use crate::digest::{Digest, KeyEncoder};
use crate::recipe::Step;
use crate::step::{StepContext, StepError, StepKind};

/// Version of the key encoding, of capture normalization and of the tools
/// kiln builds with; bump it when one changes so old cache entries are not
/// reused (5: bases are built with mmdebstrap, no longer debootstrap).
pub const KEY_FORMAT: u64 = 5;

/// The key of `step` built over `lowers` (lowest first) with mtimes clamped to `epoch`.
pub fn step_key(
    step: &Step,
    epoch: i64,
    lowers: &[Digest],
    ctx: &StepContext,
) -> Result<Digest, StepError> {
    let mut enc = KeyEncoder::new("kiln step key");
    enc.u64(KEY_FORMAT);
    step.kind.encode(&mut enc, ctx)?;
    // The lock's pins; a step without them keeps the key it had before locks.
    if let Some(pinned) = &step.pinned {
        enc.str("locked").u64(pinned.len() as u64);
        for deb in pinned {
            enc.str(&deb.name)
                .str(&deb.version)
                .str(&deb.arch)
                .str(&deb.sha256);
        }
    }
    Ok(finish_over(enc, epoch, lowers))
}

/// Ends a key: the epoch and the lower layers' digests, in order.
fn finish_over(mut enc: KeyEncoder, epoch: i64, lowers: &[Digest]) -> Digest {
    enc.u64(epoch as u64).u64(lowers.len() as u64);
    for lower in lowers {
        enc.digest(lower);
    }
    enc.finish()
}

/// The family of an `apt` step over `lowers`: its key without the package
/// list. Runs of one family differ only in their packages, so one can be the
/// base of a delta run of another (see `delta`). `None` for other kinds.
pub fn family_key(step: &Step, epoch: i64, lowers: &[Digest]) -> Option<Digest> {
    let StepKind::Apt(apt) = &step.kind else {
        return None;
    };
    let mut enc = KeyEncoder::new("kiln apt family");
    enc.u64(KEY_FORMAT);
    apt.encode_family(&mut enc);
    Some(finish_over(enc, epoch, lowers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::parse;
    use std::path::Path;

    const RECIPE: &str = "\
name: golden
steps:
  base:
    debootstrap: {suite: trixie, architecture: amd64}
  tools:
    needs: [base]
    apt: {packages: [less, curl]}
  motd:
    needs: [base]
    file: {path: /etc/motd, content: \"hello\\n\", mode: \"0644\"}
  stamp:
    needs: [tools]
    run: echo hi > /etc/stamp
  agent:
    needs: [base]
    user: {name: agent, uid: 1000, groups: [sudo], sudo: nopasswd, linger: true, keys_from: [cmdline, mmds]}
  tool:
    needs: [base]
    fetch: {url: \"https://example.org/t.tar.gz\", sha256: \"0000000000000000000000000000000000000000000000000000000000000000\", dest: /opt/t, strip: 1, owner: agent, symlinks: {/usr/local/bin/t: /opt/t/t}}
  units:
    needs: [agent]
    systemd:
      units: [{name: x.service, content: \"[Service]\\nExecStart=/bin/true\\n[Install]\\nWantedBy=multi-user.target\\n\", enable: true}]
      user: agent
      user_units: [{name: y.service, content: \"[Service]\\nExecStart=/bin/true\\n\"}]
      enable: [ssh.service]
";

    fn keys(text: &str) -> Vec<String> {
        let r = parse(text, Path::new("golden.yaml")).unwrap();
        let ctx = StepContext::reading(Path::new("."), None);
        let lower = Digest::of(b"a lower layer");
        r.steps
            .iter()
            .map(|s| step_key(s, 1_704_067_200, &[lower], &ctx).unwrap().to_hex())
            .collect()
    }

    /// Pins the keys, one step of each kind: if this fails, the encoding
    /// changed and KEY_FORMAT must be bumped.
    #[test]
    fn golden_keys() {
        let k = keys(RECIPE);
        let expected = [
            "ca2eac6541277038b6a664fdfef3a68810bef86b5c2bfc9ca47571bf7a901661",
            "233542b25849f1b425e1b0f597aa17dac6d6a1c6140b657f9643633476305411",
            "070f6b17eab5c46733e5acd5783784e46c44d43f9a53243f22922ea351cf8b6f",
            "71e74f35794fab66920d421da1bd5b84b2a01fcc273dcf20422e335077dc084a",
            "ec79f9d954f850fda24b1823e35b92be7238f2fcc20dd291631c78768cdeb761",
            "8e14d62bb38ad420b5b2c2292848ae0385eadcf60cbd96727a85d4846c352d68",
            "5ff2af186e215524f10cee7e97d0b1d2e7c1503c1311f8fe70ca997655e55250",
        ];
        assert_eq!(k, expected);
    }

    #[test]
    fn keys_ignore_ids_order_and_package_order_but_not_parameters() {
        let base = keys(RECIPE);
        let renamed = keys(
            &RECIPE
                .replace("tools", "utilities")
                .replace("stamp:", "mark:"),
        );
        assert_eq!(base, renamed);
        let reordered = keys(&RECIPE.replace("[less, curl]", "[curl, less]"));
        assert_eq!(base, reordered);
        let edited = keys(&RECIPE.replace("hello", "hello!"));
        assert_eq!(base[..2], edited[..2]);
        assert_ne!(base[2], edited[2]);
    }

    #[test]
    fn apt_family_ignores_the_packages_only() {
        let r = parse(RECIPE, Path::new("g.yaml")).unwrap();
        let more = parse(
            &RECIPE.replace("[less, curl]", "[less, curl, jq]"),
            Path::new("g.yaml"),
        )
        .unwrap();
        let recommends = parse(
            &RECIPE.replace("[less, curl]}", "[less, curl], install_recommends: true}"),
            Path::new("g.yaml"),
        )
        .unwrap();
        let lower = [Digest::of(b"x")];
        let family = |r: &crate::recipe::Recipe, lowers: &[Digest]| {
            family_key(&r.steps[1], 0, lowers).unwrap()
        };
        assert_eq!(family(&r, &lower), family(&more, &lower));
        assert_ne!(family(&r, &lower), family(&recommends, &lower));
        assert_ne!(family(&r, &lower), family(&r, &[Digest::of(b"y")]));
        assert_eq!(family_key(&r.steps[0], 0, &lower), None);
        assert_eq!(
            family(&r, &lower).to_hex(),
            "47ede249de950875d2d9a7d02382c5f16e2ac0c0c8ac496d06add3632dbfb500"
        );
    }

    #[test]
    fn lowers_and_epoch_change_the_key() {
        let r = parse(RECIPE, Path::new("g.yaml")).unwrap();
        let ctx = StepContext::reading(Path::new("."), None);
        let s = &r.steps[1];
        let a = step_key(s, 0, &[Digest::of(b"x")], &ctx).unwrap();
        assert_ne!(a, step_key(s, 0, &[Digest::of(b"y")], &ctx).unwrap());
        assert_ne!(a, step_key(s, 1, &[Digest::of(b"x")], &ctx).unwrap());
        assert_ne!(
            a,
            step_key(s, 0, &[Digest::of(b"x"), Digest::of(b"x")], &ctx).unwrap()
        );
    }

    #[test]
    fn the_lock_pins_change_the_key_and_no_pins_keep_it() {
        let r = parse(RECIPE, Path::new("g.yaml")).unwrap();
        let ctx = StepContext::reading(Path::new("."), None);
        let lower = [Digest::of(b"x")];
        let mut s = r.steps[1].clone();
        let unpinned = step_key(&s, 0, &lower, &ctx).unwrap();
        let jq = |version: &str, sha: char| crate::dpkg::Deb {
            name: "jq".into(),
            version: version.into(),
            arch: "amd64".into(),
            sha256: sha.to_string().repeat(64),
        };
        s.pinned = Some(vec![jq("1.7", 'a')]);
        let pinned = step_key(&s, 0, &lower, &ctx).unwrap();
        assert_ne!(pinned, unpinned);
        s.pinned = Some(vec![jq("1.8", 'a')]);
        assert_ne!(step_key(&s, 0, &lower, &ctx).unwrap(), pinned);
        s.pinned = Some(vec![jq("1.7", 'b')]);
        assert_ne!(step_key(&s, 0, &lower, &ctx).unwrap(), pinned);
        s.pinned = Some(vec![jq("1.7", 'a')]);
        assert_eq!(step_key(&s, 0, &lower, &ctx).unwrap(), pinned);
    }
}
