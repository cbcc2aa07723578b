//! `file`: puts one file into the root, from inline `content` or a `source`
//! file next to the recipe, with a mode and an owner (names are looked up in
//! the root's own `/etc/passwd` and `/etc/group`).

use std::io::Read;

use serde::{Deserialize, Serialize};

use super::{Kind, StepContext, StepError};
use crate::checks::{Expect, Homes};
use crate::digest::KeyEncoder;
use crate::fields::{ImagePath, Mode, Owner, RecipeRelPath};
use crate::image::FileType;
use crate::sandbox::Action;

/// The `file:` step fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "FileFields")]
pub struct FileStep {
    pub path: ImagePath,
    #[serde(flatten)]
    pub source: FileSource,
    pub mode: Mode,
    pub owner: Owner,
}

/// Where a file step's bytes come from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileSource {
    Content(String),
    Source(RecipeRelPath),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFields {
    path: ImagePath,
    content: Option<String>,
    source: Option<RecipeRelPath>,
    mode: Option<Mode>,
    owner: Option<Owner>,
}

impl TryFrom<FileFields> for FileStep {
    type Error = String;
    fn try_from(f: FileFields) -> Result<FileStep, String> {
        let source = match (f.content, f.source) {
            (Some(c), None) => FileSource::Content(c),
            (None, Some(s)) => FileSource::Source(s),
            _ => {
                return Err(format!(
                    "file `{}` needs exactly one of `content` or `source`",
                    f.path
                ))
            }
        };
        Ok(FileStep {
            path: f.path,
            source,
            mode: f.mode.unwrap_or(Mode(0o644)),
            owner: f.owner.unwrap_or_else(Owner::root),
        })
    }
}

impl FileStep {
    /// The bytes the file will hold, as a stream (a source file may be
    /// large), and how many there are.
    pub fn contents(&self, ctx: &StepContext) -> Result<(Box<dyn Read + '_>, u64), StepError> {
        match &self.source {
            FileSource::Content(c) => Ok((Box::new(c.as_bytes()), c.len() as u64)),
            FileSource::Source(s) => {
                let path = ctx.recipe_file(s)?;
                let io_err = |source| StepError::Io {
                    path: path.clone(),
                    source,
                };
                let file = std::fs::File::open(&path).map_err(io_err)?;
                let len = file.metadata().map_err(io_err)?.len();
                Ok((Box::new(file), len))
            }
        }
    }
}

impl Kind for FileStep {
    fn encode(&self, enc: &mut KeyEncoder, ctx: &StepContext) -> Result<(), StepError> {
        let (contents, len) = self.contents(ctx)?;
        enc.str(self.path.relative());
        enc.reader(len, contents).map_err(|e| {
            StepError::Other(format!("reading the contents of `{}`: {e}", self.path))
        })?;
        enc.u64(self.mode.0.into()).str(&self.owner.to_string());
        Ok(())
    }

    /// The file, with its contents (by sha256), mode and owner.
    fn expectations(&self, ctx: &StepContext, _: &Homes) -> Result<Vec<Expect>, StepError> {
        use sha2::Digest as _;
        let (mut contents, _) = self.contents(ctx)?;
        let mut hasher = sha2::Sha256::new();
        std::io::copy(&mut contents, &mut hasher).map_err(|e| StepError::Other(e.to_string()))?;
        let digest = hex::encode(hasher.finalize());
        Ok(vec![Expect::path(self.path.to_string(), &|r| {
            r.kind = Some(FileType::Regular);
            r.mode = Some(self.mode.0);
            r.owner = Some(self.owner.clone());
            r.sha256 = Some(digest.clone());
        })])
    }

    fn action(&self, ctx: &StepContext) -> Result<Action, StepError> {
        let scratch = ctx
            .scratch
            .ok_or_else(|| StepError::Other("file step run without a scratch directory".into()))?;
        let staged = scratch.join("file-content");
        let (mut contents, _) = self.contents(ctx)?;
        std::fs::File::create(&staged)
            .and_then(|mut file| std::io::copy(&mut contents, &mut file))
            .map_err(|source| StepError::Io {
                path: staged.clone(),
                source,
            })?;
        Ok(Action::WriteFile {
            path: self.path.relative().to_string(),
            content: staged,
            mode: self.mode.0,
            owner: self.owner.clone(),
        })
    }

    fn runs_in_root(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_source() {
        let f: FileStep = serde_yaml::from_str("path: /etc/motd\ncontent: hi\n").unwrap();
        assert_eq!(f.mode, Mode(0o644));
        assert_eq!(f.owner, Owner::root());
        assert!(serde_yaml::from_str::<FileStep>("path: /etc/motd\n").is_err());
        assert!(serde_yaml::from_str::<FileStep>("path: /x\ncontent: a\nsource: b\n").is_err());
        assert!(serde_yaml::from_str::<FileStep>("path: etc/x\ncontent: a\n").is_err());
    }
}
