//! Which blocks of a file the image gives it: those holding anything but
//! zeros, as `mkfs.ext4 -d` does, so a file takes the same blocks whether
//! its source has holes (an unpacked layer) or zeros written out (a step's
//! own output).
//!
//! Finding them means reading the whole file ([`written_blocks`]). Most
//! files hold no block of zeros inside their data, and for those the data
//! ranges the file system reports (`SEEK_DATA`) already say it
//! ([`data_blocks`]). [`files_to_read`] lists a tree's files for which they
//! do not, once per tree (the store keeps the list beside the tree), so
//! that the image writer reads only those for zeros.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::io_at::{io_at, IoAt};

/// Runs of blocks (first block, blocks) in file order.
pub type Runs = Vec<(u64, u64)>;

/// The files of a tree (paths relative to it) that must be read to find
/// their blocks of zeros, as found for `block`-byte blocks; every other
/// file's blocks are its data ranges. For an image of another block size,
/// every file is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToRead {
    pub block: u64,
    pub files: HashSet<String>,
}

/// The runs of blocks (`block` bytes each) of `file`, `size` bytes long,
/// that hold anything but zeros; `scratch` is a buffer of whole blocks.
pub fn written_blocks(
    file: &File,
    size: u64,
    block: u64,
    scratch: &mut [u8],
) -> std::io::Result<Runs> {
    written_in(
        file,
        &crate::measure::data_ranges(file, size),
        block,
        scratch,
    )
}

/// The [`written_blocks`] of `file` inside its data `ranges`.
fn written_in(
    file: &File,
    ranges: &[(u64, u64)],
    block: u64,
    scratch: &mut [u8],
) -> std::io::Result<Runs> {
    let mut runs: Runs = Vec::new();
    for &(start, end) in ranges {
        let mut at = start / block * block;
        while at < end {
            let n = (end - at).min(scratch.len() as u64) as usize;
            let bytes = &mut scratch[..n];
            file.read_exact_at(bytes, at)?;
            for (i, chunk) in bytes.chunks(block as usize).enumerate() {
                if !is_zero(chunk) {
                    add_block(&mut runs, at / block + i as u64);
                }
            }
            at += n as u64;
        }
    }
    Ok(runs)
}

/// The runs of blocks that `file`'s data ranges touch: its
/// [`written_blocks`] unless a block of zeros lies inside them.
pub fn data_blocks(file: &File, size: u64, block: u64) -> Runs {
    touched(&crate::measure::data_ranges(file, size), block)
}

/// The runs of blocks that the data `ranges` touch.
fn touched(ranges: &[(u64, u64)], block: u64) -> Runs {
    let mut runs: Runs = Vec::new();
    for &(start, end) in ranges {
        for number in start / block..end.div_ceil(block) {
            add_block(&mut runs, number);
        }
    }
    runs
}

/// Adds block `number` (not before the last one) to `runs`.
fn add_block(runs: &mut Runs, number: u64) {
    match runs.last_mut() {
        // Two data ranges finer than a block may share one.
        Some((first, blocks)) if number < *first + *blocks => {}
        Some((first, blocks)) if *first + *blocks == number => *blocks += 1,
        _ => runs.push((number, 1)),
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// The regular files under `tree` (paths relative to it, sorted) whose
/// [`data_blocks`] are not their [`written_blocks`]: the ones the image
/// writer must read to find their blocks. Reads every file, on every core.
pub fn files_to_read(tree: &Path, block: u64) -> Result<Vec<String>, IoAt> {
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(tree) {
        let entry = entry.map_err(|e| {
            let at = e.path().unwrap_or(tree).to_path_buf();
            io_at(&at)(e.into())
        })?;
        if entry.file_type().is_file() {
            files.push(entry.into_path());
        }
    }
    let mut to_read = files
        .par_iter()
        .map_init(
            || vec![0u8; 1 << 20],
            |scratch, path| -> Result<Option<String>, IoAt> {
                let file = File::open(path).map_err(io_at(path))?;
                let size = file.metadata().map_err(io_at(path))?.len();
                let ranges = crate::measure::data_ranges(&file, size);
                let written = written_in(&file, &ranges, block, scratch).map_err(io_at(path))?;
                if written == touched(&ranges, block) {
                    return Ok(None);
                }
                let relative = path.strip_prefix(tree).expect("walkdir stays in its root");
                Ok(Some(relative.to_string_lossy().into_owned()))
            },
        )
        .filter_map(Result::transpose)
        .collect::<Result<Vec<String>, IoAt>>()?;
    to_read.sort();
    Ok(to_read)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 4096;

    fn write(path: &Path, pieces: &[(u64, &[u8])], size: u64) {
        let file = File::create(path).unwrap();
        for (at, bytes) in pieces {
            file.write_all_at(bytes, *at).unwrap();
        }
        file.set_len(size).unwrap();
    }

    #[test]
    fn only_files_with_zeros_inside_their_data_are_to_be_read() {
        let tree = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let root = tree.path();
        std::fs::create_dir(root.join("dir")).unwrap();
        // Data, a hole, data: the file system reports exactly its blocks.
        write(
            &root.join("sparse"),
            &[(0, b"a"), (5 * BLOCK, b"b")],
            6 * BLOCK,
        );
        // Zeros written out between two blocks of data, and a file of zeros.
        let mut zeros_between = vec![7u8; 3 * BLOCK as usize];
        zeros_between[BLOCK as usize..2 * BLOCK as usize].fill(0);
        write(
            &root.join("dir/zeros-between"),
            &[(0, &zeros_between)],
            3 * BLOCK,
        );
        write(&root.join("all-zeros"), &[(0, &[0u8; 8192])], 8192);
        write(&root.join("empty"), &[], 0);
        // A last block of zeros that does not fill its block.
        let mut tail = vec![1u8; BLOCK as usize + 10];
        tail[BLOCK as usize..].fill(0);
        write(&root.join("zero-tail"), &[(0, &tail)], BLOCK + 10);

        assert_eq!(
            files_to_read(root, BLOCK).unwrap(),
            ["all-zeros", "dir/zeros-between", "zero-tail"]
        );
        let file = File::open(root.join("dir/zeros-between")).unwrap();
        let mut scratch = vec![0u8; 1 << 20];
        assert_eq!(
            written_blocks(&file, 3 * BLOCK, BLOCK, &mut scratch).unwrap(),
            [(0, 1), (2, 1)]
        );
        assert_eq!(data_blocks(&file, 3 * BLOCK, BLOCK), [(0, 3)]);
        let sparse = File::open(root.join("sparse")).unwrap();
        assert_eq!(data_blocks(&sparse, 6 * BLOCK, BLOCK), [(0, 1), (5, 1)]);
    }
}
