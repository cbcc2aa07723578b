//! Pinning the times of every inode in a finished ext4 image.
//!
//! `mkfs.ext4 -d` copies each file's atime and ctime from the source tree,
//! where nobody can set a ctime; kiln wants both equal to the file's
//! (normalized) mtime. [`pin_times`] walks the inode tables directly: for
//! every inode in use — the root directory and everything from the first
//! non-reserved inode on — it sets atime and ctime (and their extra
//! nanosecond/epoch words) to the mtime, and recomputes the inode checksum
//! when the filesystem has `metadata_csum`. [`clear_write_count`] zeroes
//! the lifetime write count mke2fs leaves in every superblock copy: it
//! counts the bytes mke2fs happened to write (its cache flushes vary with
//! how the source tree reads), not anything in the image. Nothing else in the
//! image moves.
//!
//! On-disk layout (all little-endian), from the ext4 disk format: the
//! superblock at byte 1024; the group descriptors in the block after
//! `s_first_data_block`; per group, an inode bitmap and an inode table of
//! `s_inodes_per_group` inodes of `s_inode_size` bytes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const EXT4_MAGIC: u16 = 0xEF53;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const BG_INODE_UNINIT: u16 = 0x1;
// Superblock field offsets.
const S_KBYTES_WRITTEN: usize = 0x178;
const S_CHECKSUM: usize = 0x3FC;
const ROOT_INODE: u32 = 2;

// Inode field offsets.
const I_ATIME: usize = 0x08;
const I_CTIME: usize = 0x0C;
const I_MTIME: usize = 0x10;
const I_LINKS_COUNT: usize = 0x1A;
const I_GENERATION: usize = 0x64;
const I_CHECKSUM_LO: usize = 0x7C;
const I_EXTRA_ISIZE: usize = 0x80;
const I_CHECKSUM_HI: usize = 0x82;
const I_CTIME_EXTRA: usize = 0x84;
const I_MTIME_EXTRA: usize = 0x88;
const I_ATIME_EXTRA: usize = 0x8C;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("not an image kiln can read: {what}"),
    )
}

/// ext4's crc32c: no final inversion, seeded by the caller.
fn ext4_crc(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// What [`pin_times`] needs from the superblock.
struct Geometry {
    block_size: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    /// Whether only some groups keep a superblock copy (`sparse_super`).
    sparse_super: bool,
    groups: u64,
    inodes_per_group: u32,
    inode_size: usize,
    first_ino: u32,
    desc_size: usize,
    descriptors_at: u64,
    /// The checksum seed, with `metadata_csum`.
    csum_seed: Option<u32>,
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
    let desc_size = if incompat & INCOMPAT_64BIT != 0 {
        usize::from(u16_at(sb, 0xFE))
    } else {
        32
    };
    let csum_seed = (ro_compat & RO_COMPAT_METADATA_CSUM != 0).then(|| {
        if incompat & INCOMPAT_CSUM_SEED != 0 {
            u32_at(sb, 0x270)
        } else {
            ext4_crc(!0, &sb[0x68..0x78])
        }
    });
    let inode_size = usize::from(u16_at(sb, 0x58));
    if inode_size < 128 || desc_size < 32 {
        return Err(bad("inode or descriptor size"));
    }
    Ok(Geometry {
        block_size,
        first_data_block,
        blocks_per_group,
        sparse_super: ro_compat & RO_COMPAT_SPARSE_SUPER != 0,
        groups: (blocks - first_data_block).div_ceil(blocks_per_group),
        inodes_per_group: u32_at(sb, 0x28),
        inode_size,
        first_ino: u32_at(sb, 0x54),
        desc_size,
        descriptors_at: (first_data_block + 1) * block_size,
        csum_seed,
    })
}

/// Sets atime and ctime of every inode in use to its mtime, and the root
/// directory's three times to `root_time`; returns how many inodes changed.
pub fn pin_times(image: &Path, root_time: i64) -> io::Result<usize> {
    let file = File::options().read(true).write(true).open(image)?;
    let mut sb = vec![0u8; 1024];
    file.read_exact_at(&mut sb, 1024)?;
    let g = geometry(&sb)?;
    let mut descriptors = vec![0u8; g.groups as usize * g.desc_size];
    file.read_exact_at(&mut descriptors, g.descriptors_at)?;
    let mut pinned = 0;
    for group in 0..g.groups as usize {
        let d = &descriptors[group * g.desc_size..(group + 1) * g.desc_size];
        if u16_at(d, 0x12) & BG_INODE_UNINIT != 0 {
            continue;
        }
        let wide = g.desc_size >= 64;
        let high = |at: usize| {
            if wide {
                u64::from(u32_at(d, at)) << 32
            } else {
                0
            }
        };
        let table = u64::from(u32_at(d, 0x08)) | high(0x28);
        let unused = u32::from(u16_at(d, 0x1C))
            | if wide {
                u32::from(u16_at(d, 0x32)) << 16
            } else {
                0
            };
        let used = g.inodes_per_group.saturating_sub(unused) as usize;
        let mut inodes = vec![0u8; used * g.inode_size];
        file.read_exact_at(&mut inodes, table * g.block_size)?;
        let mut changed = false;
        for (i, inode) in inodes.chunks_exact_mut(g.inode_size).enumerate() {
            let number = (group as u32) * g.inodes_per_group + i as u32 + 1;
            if number != ROOT_INODE && number < g.first_ino || u16_at(inode, I_LINKS_COUNT) == 0 {
                continue;
            }
            if number == ROOT_INODE {
                put_u32(inode, I_MTIME, root_time as u32);
            }
            if pin_inode(inode, number, &g) {
                changed = true;
                pinned += 1;
            }
        }
        if changed {
            file.write_all_at(&inodes, table * g.block_size)?;
        }
    }
    Ok(pinned)
}

/// Sets the lifetime write count (`s_kbytes_written`) of every superblock
/// copy to zero, with its checksum; returns how many copies there are.
pub fn clear_write_count(image: &Path) -> io::Result<usize> {
    let file = File::options().read(true).write(true).open(image)?;
    let mut sb = vec![0u8; 1024];
    file.read_exact_at(&mut sb, 1024)?;
    let g = geometry(&sb)?;
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
        if g.csum_seed.is_some() && ext4_crc(!0, &sb[..S_CHECKSUM]) != u32_at(&sb, S_CHECKSUM) {
            return Err(bad(&format!("superblock checksum in group {group}")));
        }
        sb[S_KBYTES_WRITTEN..S_KBYTES_WRITTEN + 8].fill(0);
        if g.csum_seed.is_some() {
            let crc = ext4_crc(!0, &sb[..S_CHECKSUM]);
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

/// Pins one inode's times; whether anything changed.
fn pin_inode(inode: &mut [u8], number: u32, g: &Geometry) -> bool {
    let before = inode.to_vec();
    let mtime = u32_at(inode, I_MTIME);
    put_u32(inode, I_ATIME, mtime);
    put_u32(inode, I_CTIME, mtime);
    let extra = if g.inode_size > 128 {
        usize::from(u16_at(inode, I_EXTRA_ISIZE))
    } else {
        0
    };
    let has = |field: usize| 128 + extra >= field + 4;
    if has(I_MTIME_EXTRA) && has(I_ATIME_EXTRA) && has(I_CTIME_EXTRA) {
        let mtime_extra = u32_at(inode, I_MTIME_EXTRA);
        put_u32(inode, I_ATIME_EXTRA, mtime_extra);
        put_u32(inode, I_CTIME_EXTRA, mtime_extra);
    }
    if inode == &before[..] {
        return false;
    }
    if let Some(seed) = g.csum_seed {
        let with_hi = 128 + extra >= I_CHECKSUM_HI + 2;
        put_u16(inode, I_CHECKSUM_LO, 0);
        if with_hi {
            put_u16(inode, I_CHECKSUM_HI, 0);
        }
        let mut crc = ext4_crc(seed, &number.to_le_bytes());
        crc = ext4_crc(crc, &u32_at(inode, I_GENERATION).to_le_bytes());
        crc = ext4_crc(crc, inode);
        put_u16(inode, I_CHECKSUM_LO, crc as u16);
        if with_hi {
            put_u16(inode, I_CHECKSUM_HI, (crc >> 16) as u16);
        }
    }
    true
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
        assert_eq!(clear_write_count(&image).unwrap(), 3);
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
        let err = clear_write_count(&image).unwrap_err();
        assert!(err.to_string().contains("group 1"), "{err}");
    }
}
