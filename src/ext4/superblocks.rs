//! The two superblock fields in which an image would record how it was
//! written rather than what it holds, set the same in every copy.
//!
//! [`pin_superblocks`] zeroes the lifetime write count mke2fs leaves in
//! every superblock copy (it counts the bytes mke2fs happened to write: its
//! cache flushes vary with how the source reads), and sets the last write
//! time, which libext2fs stamps with the clock when it closes the image, to
//! the image's epoch. Nothing else in the image moves.
//!
//! On-disk layout (all little-endian), from the ext4 disk format: the
//! superblock at byte 1024 and, under `sparse_super`, copies at the start
//! of groups 1 and the powers of 3, 5 and 7.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{put_u32, u16_at, u32_at};

const EXT4_MAGIC: u16 = 0xEF53;
const INCOMPAT_64BIT: u32 = 0x80;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
// Superblock field offsets.
const S_WTIME: usize = 0x30;
const S_WTIME_HI: usize = 0x274;
const S_KBYTES_WRITTEN: usize = 0x178;
const S_CHECKSUM: usize = 0x3FC;

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("not an image kiln can read: {what}"),
    )
}

/// A superblock's checksum (ext4's crc32c, no final inversion).
fn checksum(sb: &[u8]) -> u32 {
    !crc32c::crc32c_append(0, &sb[..S_CHECKSUM])
}

/// How the filesystem is laid out: its block size, and where its groups
/// and the superblock copies are.
pub struct Geometry {
    pub block_size: u64,
    first_data_block: u64,
    /// Blocks in each group but the last.
    pub blocks_per_group: u64,
    /// Whether only some groups keep a superblock copy (`sparse_super`).
    sparse_super: bool,
    pub groups: u64,
    /// Whether superblocks carry a checksum (`metadata_csum`).
    checksums: bool,
}

fn geometry(sb: &[u8]) -> io::Result<Geometry> {
    if u16_at(sb, 0x38) != EXT4_MAGIC {
        return Err(bad("no ext4 superblock"));
    }
    let block_size = 1024u64 << u32_at(sb, 0x18);
    let incompat = u32_at(sb, 0x60);
    let ro_compat = u32_at(sb, 0x64);
    let blocks = u64::from(u32_at(sb, 0x04))
        | if incompat & INCOMPAT_64BIT != 0 {
            u64::from(u32_at(sb, 0x150)) << 32
        } else {
            0
        };
    let first_data_block = u64::from(u32_at(sb, 0x14));
    let blocks_per_group = u64::from(u32_at(sb, 0x20));
    if blocks_per_group == 0 {
        return Err(bad("zero blocks per group"));
    }
    Ok(Geometry {
        block_size,
        first_data_block,
        blocks_per_group,
        sparse_super: ro_compat & RO_COMPAT_SPARSE_SUPER != 0,
        groups: (blocks - first_data_block).div_ceil(blocks_per_group),
        checksums: ro_compat & RO_COMPAT_METADATA_CSUM != 0,
    })
}

/// The layout of the filesystem in `image`, from its primary superblock.
pub fn read_geometry(image: &File) -> io::Result<Geometry> {
    let mut sb = vec![0u8; 1024];
    image.read_exact_at(&mut sb, 1024)?;
    geometry(&sb)
}

/// Sets the lifetime write count (`s_kbytes_written`) of every superblock
/// copy to zero and its last write time (`s_wtime`) to `wtime`, with its
/// checksum; returns how many copies there are.
pub fn pin_superblocks(image: &Path, wtime: i64) -> io::Result<usize> {
    let file = File::options().read(true).write(true).open(image)?;
    let g = read_geometry(&file)?;
    let mut sb = vec![0u8; 1024];
    let mut copies = 0;
    for group in (0..g.groups).filter(|&n| !g.sparse_super || keeps_super_copy(n)) {
        let at = match group {
            0 => 1024,
            n => (g.first_data_block + n * g.blocks_per_group) * g.block_size,
        };
        file.read_exact_at(&mut sb, at)?;
        if u16_at(&sb, 0x38) != EXT4_MAGIC {
            return Err(bad(&format!("no superblock copy in group {group}")));
        }
        if g.checksums && checksum(&sb) != u32_at(&sb, S_CHECKSUM) {
            return Err(bad(&format!("superblock checksum in group {group}")));
        }
        sb[S_KBYTES_WRITTEN..S_KBYTES_WRITTEN + 8].fill(0);
        put_u32(&mut sb, S_WTIME, wtime as u32);
        sb[S_WTIME_HI] = (wtime >> 32) as u8;
        if g.checksums {
            let crc = checksum(&sb);
            put_u32(&mut sb, S_CHECKSUM, crc);
        }
        file.write_all_at(&sb, at)?;
        copies += 1;
    }
    Ok(copies)
}

/// Whether group `n` keeps a superblock copy under `sparse_super`: groups
/// 0 and 1 and the powers of 3, 5 and 7.
fn keeps_super_copy(n: u64) -> bool {
    let power_of = |base: u64| {
        let mut p = base;
        while p < n {
            p *= base;
        }
        p == n
    };
    n <= 1 || power_of(3) || power_of(5) || power_of(7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn superblock_copies_sit_in_groups_0_1_and_powers_of_3_5_7() {
        let kept: Vec<u64> = (0..130).filter(|&n| keeps_super_copy(n)).collect();
        assert_eq!(kept, [0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125]);
    }

    fn dumpe2fs(image: &Path, superblock: Option<u64>) -> String {
        let mut cmd = Command::new("dumpe2fs");
        cmd.arg("-h");
        if let Some(block) = superblock {
            cmd.args(["-o", &format!("superblock={block}"), "-o", "blocksize=1024"]);
        }
        let out = cmd.arg(image).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Needs e2fsprogs: every copy loses its write count, and stays valid.
    #[test]
    fn the_write_count_is_cleared_in_every_superblock_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("data"), vec![7u8; 1 << 20]).unwrap();
        let image = tmp.path().join("x.ext4");
        // 1 KiB blocks, 8192 per group: 4 groups, copies in groups 0, 1, 3.
        let made = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-b",
                "1024",
                "-O",
                "metadata_csum,sparse_super",
                "-d",
            ])
            .arg(&tree)
            .arg(&image)
            .arg("32M")
            .status()
            .unwrap();
        assert!(made.success());
        let copies = [None, Some(8193), Some(3 * 8192 + 1)];
        for copy in copies {
            assert!(
                dumpe2fs(&image, copy).contains("Lifetime writes:"),
                "{copy:?}"
            );
        }
        assert_eq!(pin_superblocks(&image, 0).unwrap(), 3);
        for copy in copies {
            let header = dumpe2fs(&image, copy);
            assert!(!header.contains("Lifetime writes:"), "{copy:?}:\n{header}");
        }
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        // A copy with a wrong checksum is refused, not rewritten.
        let file = File::options().write(true).open(&image).unwrap();
        file.write_all_at(&[0xff], 8193 * 1024 + 0x100).unwrap();
        let err = pin_superblocks(&image, 0).unwrap_err();
        assert!(err.to_string().contains("group 1"), "{err}");
    }
}
