//! Limits on a recipe's YAML, checked before it is parsed into steps.
//!
//! YAML aliases (`*name`) repeat what an anchor (`&name`) holds, so a small
//! file can expand to gigabytes in memory ("billion laughs"). serde_yaml caps
//! the number of alias jumps, not the bytes they produce: a 120 KB recipe
//! whose package list repeats an alias of one long string still took about
//! 500 MB. kiln first walks the document as serde_yaml expands it, counting
//! scalar bytes and nodes without keeping any, and refuses it past a budget.

use std::cell::Cell;
use std::fmt;

use serde::de::{
    DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// The largest recipe file kiln reads.
pub const MAX_TEXT_BYTES: usize = 1 << 20;

/// The most a recipe may expand to through aliases: scalar bytes plus one per node.
pub const MAX_EXPANDED_BYTES: usize = 8 << 20;

/// Why a recipe is too large to parse.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("the recipe is {bytes} bytes; kiln reads recipes of at most {MAX_TEXT_BYTES} bytes")]
    TooLong { bytes: usize },
    /// The walk stopped: kiln's budget or serde_yaml's cap on alias jumps.
    #[error(
        "the recipe expands to more than {MAX_EXPANDED_BYTES} bytes through YAML aliases \
         (`*name`) ({}); write the repeated parts out or use fewer aliases",
        without_location(source)
    )]
    TooExpanded {
        #[source]
        source: serde_yaml::Error,
    },
}

/// A serde_yaml message without its ` at line L column C` tail.
fn without_location(e: &serde_yaml::Error) -> String {
    let message = e.to_string();
    message
        .split(" at line ")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Says why `text` is too large to parse, if it is.
pub fn check(text: &str) -> Result<(), LimitError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(LimitError::TooLong { bytes: text.len() });
    }
    let left = Cell::new(MAX_EXPANDED_BYTES);
    match Budget(&left).deserialize(serde_yaml::Deserializer::from_str(text)) {
        // serde_yaml's own cap on alias jumps stops deep nesting first.
        Err(e) if left.get() == 0 || e.to_string().contains("repetition limit") => {
            Err(LimitError::TooExpanded { source: e })
        }
        // Any other error is the parser's to report, with its location.
        _ => Ok(()),
    }
}

/// Walks any YAML value, spending the budget on every node and scalar byte.
#[derive(Clone, Copy)]
struct Budget<'a>(&'a Cell<usize>);

impl Budget<'_> {
    fn spend<E: serde::de::Error>(self, bytes: usize) -> Result<(), E> {
        match self.0.get().checked_sub(bytes + 1) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => {
                self.0.set(0);
                Err(E::custom("alias expansion limit reached"))
            }
        }
    }
}

impl<'de> DeserializeSeed<'de> for Budget<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Budget<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.spend(8)
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.spend(8)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.spend(8)
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        self.spend(s.len())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.spend(0)?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.spend(0)?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
    /// A tagged value (`!tag value`).
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        let ((), variant) = data.variant_seed(self)?;
        variant.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_recipes_pass() {
        for recipe in ["recipes/agent-ready.yaml", "examples/minimal.yaml"] {
            let text = std::fs::read_to_string(recipe).unwrap();
            assert!(check(&text).is_ok(), "{recipe}");
        }
        // Syntax errors are left to the parser, which locates them.
        assert!(check("steps: [\n").is_ok());
    }

    #[test]
    fn aliases_that_multiply_a_long_string_are_refused() {
        // ~110 KB of text that expands to ~1 GB of package names.
        let long = "a".repeat(100_000);
        let mut text =
            format!("name: t\nanchor: &p {long}\nsteps:\n  a:\n    apt:\n      packages: [");
        text.push_str(&vec!["*p"; 10_000].join(", "));
        text.push_str("]\n");
        assert!(text.len() < MAX_TEXT_BYTES);
        let err = check(&text).unwrap_err();
        assert!(matches!(err, LimitError::TooExpanded { .. }));
        let message = err.to_string();
        assert!(message.contains("through YAML aliases"), "{message}");
        assert!(!message.contains(" at line "), "{message}");
    }

    #[test]
    fn nested_aliases_are_refused() {
        let mut text = String::from("a0: &a0 [xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx]\n");
        for i in 1..12 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = check(&text).unwrap_err();
        assert!(matches!(err, LimitError::TooExpanded { .. }));
        assert!(err.to_string().contains("through YAML aliases"));
    }

    #[test]
    fn oversized_files_are_refused() {
        let text = format!("name: t\n# {}\n", "x".repeat(MAX_TEXT_BYTES));
        let err = check(&text).unwrap_err();
        assert!(matches!(err, LimitError::TooLong { .. }));
        assert!(err.to_string().contains("at most"));
    }
}
