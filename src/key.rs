//! Step keys: what a step's output is a function of.
//!
//! `StepKey = blake3(encode("kiln step key", KEY_FORMAT, kind, kind parameters
//! incl. the bytes of files it reads, epoch, lower layer digests in order))`.
//! The step's id is not part of it (renaming a step rebuilds nothing), nor is
//! anything about the machine or the time. Because lower layers enter by their
//! *content* digest, a dependency that re-runs and produces the same layer
//! leaves its dependents cached (early cutoff).

use crate::digest::{Digest, KeyEncoder};
use crate::recipe::Step;
use crate::step::{StepContext, StepError};

/// Version of the key encoding and of capture normalization; bump it when
/// either changes so old cache entries are not reused.
pub const KEY_FORMAT: u64 = 2;

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
    enc.u64(epoch as u64).u64(lowers.len() as u64);
    for lower in lowers {
        enc.digest(lower);
    }
    Ok(enc.finish())
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
";

    fn keys(text: &str) -> Vec<String> {
        let r = parse(text, Path::new("golden.yaml")).unwrap();
        let ctx = StepContext {
            recipe_dir: Path::new("."),
            scratch: None,
            ssh_key: None,
        };
        let lower = Digest::of(b"a lower layer");
        r.steps
            .iter()
            .map(|s| step_key(s, 1_704_067_200, &[lower], &ctx).unwrap().to_hex())
            .collect()
    }

    /// Pins the keys: if this fails, the encoding changed and KEY_FORMAT must be bumped.
    #[test]
    fn golden_keys() {
        let k = keys(RECIPE);
        let expected = [
            "f98e874eaf8ef724e4beaf18deea7decf4c363b2696b40ef74cb6748c53807e7",
            "a010387b3d889c7a9998d318adb0bf6562f52afad22a955afe1c0afae7ac8118",
            "09ef26adf25a68f3eecaef23accf54c4c3ed72d0cbcdd5a27ba0b65fe964fa71",
            "4b1efc144adfb95d8deaae3aef43db1507c84005d5b5afaaf96492f4a632fe38",
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
    fn lowers_and_epoch_change_the_key() {
        let r = parse(RECIPE, Path::new("g.yaml")).unwrap();
        let ctx = StepContext {
            recipe_dir: Path::new("."),
            scratch: None,
            ssh_key: None,
        };
        let s = &r.steps[1];
        let a = step_key(s, 0, &[Digest::of(b"x")], &ctx).unwrap();
        assert_ne!(a, step_key(s, 0, &[Digest::of(b"y")], &ctx).unwrap());
        assert_ne!(a, step_key(s, 1, &[Digest::of(b"x")], &ctx).unwrap());
        assert_ne!(
            a,
            step_key(s, 0, &[Digest::of(b"x"), Digest::of(b"x")], &ctx).unwrap()
        );
    }
}
