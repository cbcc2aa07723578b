//! The part of e2fsprogs' libext2fs kiln calls to fill an image, behind a
//! safe [`Filesystem`] handle.
//!
//! libext2fs is the library mke2fs, e2fsck and debugfs are built on; kiln
//! loads the host's copy (`libext2fs.so.2`, from the same e2fsprogs whose
//! mke2fs formats the image) when it first writes an image, so that it
//! builds and starts on a machine without e2fsprogs and installs it first.
//! Inodes cross the boundary as their on-disk bytes ([`INODE_SIZE`]), read
//! and written whole.

use std::ffi::{c_char, c_int, c_long, c_uint, c_void, CStr, CString};
use std::path::Path;
use std::sync::OnceLock;

use libloading::Library;

/// libext2fs's error code (`errcode_t`).
type Errcode = c_long;
type Ino = u32;
type Fs = *mut c_void;

/// The first of libext2fs's error codes (`EXT2_ET_BASE`).
const EXT2_ET_BASE: Errcode = 2133571328;
/// The magic number at the head of a filesystem handle.
const EXT2_ET_MAGIC_EXT2FS_FILSYS: Errcode = EXT2_ET_BASE + 1;
/// "No free space in the directory": the directory needs another block.
const EXT2_ET_DIR_NO_SPACE: Errcode = EXT2_ET_BASE + 38;
/// No further extent.
const EXT2_ET_EXTENT_NO_NEXT: Errcode = EXT2_ET_BASE + 124;

const EXT2_FLAG_RW: c_int = 0x01;
const EXT2_FLAG_64BITS: c_int = 0x20000;
const EXT2_FLAG_MASTER_SB_ONLY: c_int = 0x200;
const EXT2_BG_BLOCK_UNINIT: u16 = 0x2;
const EXT2_FALLOCATE_FORCE_INIT: c_int = 0x2;
const EXT2_EXTENT_ROOT: c_int = 0x1;
const EXT2_EXTENT_NEXT_LEAF: c_int = 0x7;
const EXT2_EXTENT_FLAGS_LEAF: u32 = 0x1;
const EXT2_EXTENT_FLAGS_SECOND_VISIT: u32 = 0x4;

/// The inode size kiln's images have (the profile's `inode_size`).
pub const INODE_SIZE: usize = 256;

#[repr(C)]
#[derive(Default)]
struct Extent {
    pblk: u64,
    lblk: u64,
    len: u32,
    flags: u32,
}

/// Declares the libext2fs functions kiln calls: the [`Api`] struct of
/// their pointers and its loader.
macro_rules! api {
    ($($name:ident($($arg:ty),*) -> $ret:ty;)*) => {
        /// libext2fs, loaded (see [`api`]).
        struct Api {
            $($name: unsafe extern "C" fn($($arg),*) -> $ret,)*
            unix_io_manager: *mut c_void,
            error_message: unsafe extern "C" fn(Errcode) -> *const c_char,
            initialize_ext2_error_table: unsafe extern "C" fn(),
            _libraries: (Library, Library),
        }

        impl Api {
            /// # Safety
            /// The declared signatures must be libext2fs's.
            unsafe fn load() -> Result<Api, libloading::Error> {
                let ext2fs = Library::new("libext2fs.so.2")?;
                let com_err = Library::new("libcom_err.so.2")?;
                Ok(Api {
                    $($name: *ext2fs.get(concat!(stringify!($name), "\0").as_bytes())?,)*
                    unix_io_manager: **ext2fs.get::<*mut *mut c_void>(b"unix_io_manager\0")?,
                    error_message: *com_err.get(b"error_message\0")?,
                    initialize_ext2_error_table: *ext2fs.get(b"initialize_ext2_error_table\0")?,
                    _libraries: (ext2fs, com_err),
                })
            }
        }
    };
}

api! {
    ext2fs_get_library_version(*mut *const c_char, *mut *const c_char) -> c_int;
    ext2fs_open(*const c_char, c_int, c_int, c_uint, *mut c_void, *mut Fs) -> Errcode;
    ext2fs_read_bitmaps(Fs) -> Errcode;
    ext2fs_close_free(*mut Fs) -> Errcode;
    ext2fs_new_inode(Fs, Ino, c_int, *mut c_void, *mut Ino) -> Errcode;
    ext2fs_inode_alloc_stats2(Fs, Ino, c_int, c_int) -> ();
    ext2fs_read_inode_full(Fs, Ino, *mut u8, c_int) -> Errcode;
    ext2fs_write_inode_full(Fs, Ino, *const u8, c_int) -> Errcode;
    ext2fs_lookup(Fs, Ino, *const c_char, c_int, *mut c_char, *mut Ino) -> Errcode;
    ext2fs_link(Fs, Ino, *const c_char, Ino, c_int) -> Errcode;
    ext2fs_expand_dir(Fs, Ino) -> Errcode;
    ext2fs_mkdir(Fs, Ino, Ino, *const c_char) -> Errcode;
    ext2fs_symlink(Fs, Ino, Ino, *const c_char, *const c_char) -> Errcode;
    ext2fs_extent_open2(Fs, Ino, *mut u8, *mut *mut c_void) -> Errcode;
    ext2fs_extent_get(*mut c_void, c_int, *mut Extent) -> Errcode;
    ext2fs_extent_free(*mut c_void) -> ();
    ext2fs_fallocate(Fs, c_int, Ino, *mut u8, u64, u64, u64) -> Errcode;
    ext2fs_xattrs_open(Fs, Ino, *mut *mut c_void) -> Errcode;
    ext2fs_xattrs_read(*mut c_void) -> Errcode;
    ext2fs_xattr_set(*mut c_void, *const c_char, *const c_void, usize) -> Errcode;
    ext2fs_xattrs_close(*mut *mut c_void) -> Errcode;
    ext2fs_bg_flags_test(Fs, u32, u16) -> c_int;
    ext2fs_bg_flags_clear(Fs, u32, u16) -> ();
    ext2fs_bg_free_blocks_count(Fs, u32) -> u32;
    ext2fs_mark_bb_dirty(Fs) -> ();
}

// SAFETY: the pointers are to code and to libext2fs's constant I/O manager,
// and the libraries stay loaded for the life of the process.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

/// libext2fs, loaded on first use: kiln runs without it until it writes an
/// image (by then the host check has installed e2fsprogs).
fn api() -> Result<&'static Api, Ext2Error> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    let loaded = API.get_or_init(|| {
        // SAFETY: the signatures above are libext2fs 1.4x's; error tables
        // are registered once, before any call.
        unsafe { Api::load().inspect(|api| (api.initialize_ext2_error_table)()) }
            .map_err(|e| e.to_string())
    });
    loaded.as_ref().map_err(|e| Ext2Error {
        doing: "loading libext2fs.so.2".into(),
        message: format!("{e}; install e2fsprogs (`apt-get install e2fsprogs`)"),
        code: 0,
    })
}

/// A libext2fs call that failed: what kiln was doing and libext2fs's words.
#[derive(Debug, thiserror::Error)]
#[error("{doing}: {message} (libext2fs error {code})")]
pub struct Ext2Error {
    pub doing: String,
    pub message: String,
    pub code: i64,
}

impl Api {
    fn check(&self, code: Errcode, doing: impl FnOnce() -> String) -> Result<(), Ext2Error> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: error_message returns a static or thread-local C string
        // for any code.
        let message = unsafe { CStr::from_ptr((self.error_message)(code)) }
            .to_string_lossy()
            .into_owned();
        Err(Ext2Error {
            doing: doing(),
            message,
            code,
        })
    }
}

fn c_name(name: &[u8]) -> Result<CString, Ext2Error> {
    CString::new(name).map_err(|_| Ext2Error {
        doing: format!("naming {}", String::from_utf8_lossy(name)),
        message: "a name with a NUL byte".into(),
        code: 0,
    })
}

/// The libext2fs version kiln runs with (`1.47.0`).
pub fn library_version() -> Result<String, Ext2Error> {
    let api = api()?;
    let mut ver: *const c_char = std::ptr::null();
    let mut date: *const c_char = std::ptr::null();
    // SAFETY: both out-pointers are valid; the strings are static.
    unsafe {
        (api.ext2fs_get_library_version)(&mut ver, &mut date);
        Ok(CStr::from_ptr(ver).to_string_lossy().into_owned())
    }
}

/// A file type for a directory entry (`EXT2_FT_*`) that `link` adds
/// (directories and symbolic links come with `mkdir` and `symlink`).
#[derive(Debug, Clone, Copy)]
pub enum EntryType {
    File = 1,
    CharDevice = 3,
    BlockDevice = 4,
    Fifo = 5,
    Socket = 6,
}

/// An ext4 filesystem opened read-write; closed (flushed) by [`Filesystem::close`].
pub struct Filesystem {
    api: &'static Api,
    fs: Fs,
    /// Block groups, blocks in each (but the last), and bytes in a block.
    groups: u32,
    blocks_per_group: u32,
    block_size: u64,
}

// SAFETY: the handle is used by one thread at a time (it is not Sync).
unsafe impl Send for Filesystem {}

impl Filesystem {
    /// Opens the filesystem in the image at `image` with its bitmaps.
    pub fn open(image: &Path) -> Result<Filesystem, Ext2Error> {
        use std::os::unix::ffi::OsStrExt;
        let api = api()?;
        let geometry = std::fs::File::open(image)
            .and_then(|file| super::superblocks::read_geometry(&file))
            .and_then(|g| {
                let groups = u32::try_from(g.groups)
                    .map_err(|_| std::io::Error::other("too many block groups"))?;
                Ok((groups, g.blocks_per_group as u32, g.block_size))
            })
            .map_err(|e| Ext2Error {
                doing: format!("reading the superblock of {}", image.display()),
                message: e.to_string(),
                code: 0,
            })?;
        let name = c_name(image.as_os_str().as_bytes())?;
        let mut fs: Fs = std::ptr::null_mut();
        // SAFETY: `name` outlives the call, `fs` is a valid out-pointer and
        // `unix_io_manager` is libext2fs's own.
        let code = unsafe {
            (api.ext2fs_open)(
                name.as_ptr(),
                EXT2_FLAG_RW | EXT2_FLAG_64BITS,
                0,
                0,
                api.unix_io_manager,
                &mut fs,
            )
        };
        api.check(code, || format!("opening {}", image.display()))?;
        let (groups, blocks_per_group, block_size) = geometry;
        let opened = Filesystem {
            api,
            fs,
            groups,
            blocks_per_group,
            block_size,
        };
        // SAFETY: `fs` is open.
        let code = unsafe { (api.ext2fs_read_bitmaps)(opened.fs) };
        api.check(code, || "reading the bitmaps".into())?;
        Ok(opened)
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Writes everything back, the superblock and group descriptor
    /// backups too, and closes the filesystem.
    pub fn close(mut self) -> Result<(), Ext2Error> {
        self.init_used_groups();
        self.write_backups()?;
        // SAFETY: `fs` is open; ext2fs_close_free frees it and nulls it.
        let code = unsafe { (self.api.ext2fs_close_free)(&mut self.fs) };
        self.api.check(code, || "closing the filesystem".into())
    }

    /// Has the block bitmap written of each group that holds used blocks but
    /// that mke2fs marked `BLOCK_UNINIT` (bitmap not written): those with
    /// only a superblock and group descriptor copy in them. mke2fs 1.47.0
    /// marks them so and 1.47.2 writes their bitmaps; once kiln's files
    /// reach such a group libext2fs writes it either way, but a group no
    /// file reaches (in a roomy image) made the two versions' images differ.
    /// So no version's choice reaches the image (the last group is never
    /// `BLOCK_UNINIT`).
    fn init_used_groups(&mut self) {
        let mut cleared = false;
        for group in 0..self.groups.saturating_sub(1) {
            // SAFETY: `fs` is open and `group` is one of its groups.
            unsafe {
                if (self.api.ext2fs_bg_flags_test)(self.fs, group, EXT2_BG_BLOCK_UNINIT) != 0
                    && (self.api.ext2fs_bg_free_blocks_count)(self.fs, group)
                        < self.blocks_per_group
                {
                    (self.api.ext2fs_bg_flags_clear)(self.fs, group, EXT2_BG_BLOCK_UNINIT);
                    cleared = true;
                }
            }
        }
        if cleared {
            // SAFETY: `fs` is open.
            unsafe { (self.api.ext2fs_mark_bb_dirty)(self.fs) };
        }
    }

    /// Clears `EXT2_FLAG_MASTER_SB_ONLY`, which `ext2fs_open` always sets,
    /// so that closing rewrites every superblock and group descriptor copy
    /// (as mke2fs does), not only the primary: otherwise the backups keep
    /// the empty filesystem's counts, and `e2fsck -b` would start from
    /// them. libext2fs has no call for this (its own tools set
    /// `fs->flags`); the field is the `int` after `errcode_t magic` and
    /// `io_channel io` at the head of `struct struct_ext2_filsys`, which is
    /// checked by its magic first.
    fn write_backups(&mut self) -> Result<(), Ext2Error> {
        #[repr(C)]
        struct Head {
            magic: Errcode,
            io: *mut c_void,
            flags: c_int,
        }
        let head = self.fs.cast::<Head>();
        // SAFETY: `fs` points at libext2fs's struct_ext2_filsys, which
        // begins with these three fields; the magic is checked before the
        // flags are written.
        unsafe {
            if (*head).magic != EXT2_ET_MAGIC_EXT2FS_FILSYS {
                return Err(Ext2Error {
                    doing: "writing the superblock backups".into(),
                    message: "libext2fs's filesystem handle is not laid out as kiln expects".into(),
                    code: 0,
                });
            }
            (*head).flags &= !EXT2_FLAG_MASTER_SB_ONLY;
        }
        Ok(())
    }

    /// A free inode for a new entry of `mode` in `dir`, marked in use
    /// unless `mkdir`/`symlink` will mark it.
    pub fn new_inode(&mut self, dir: u32, mode: u32, mark: bool) -> Result<u32, Ext2Error> {
        let mut ino = 0;
        // SAFETY: `fs` is open, `ino` a valid out-pointer.
        let code = unsafe {
            (self.api.ext2fs_new_inode)(self.fs, dir, mode as c_int, std::ptr::null_mut(), &mut ino)
        };
        self.api
            .check(code, || format!("finding a free inode in directory {dir}"))?;
        if mark {
            // SAFETY: `fs` is open, `ino` an inode it just handed out.
            unsafe { (self.api.ext2fs_inode_alloc_stats2)(self.fs, ino, 1, 0) };
        }
        Ok(ino)
    }

    pub fn read_inode(&mut self, ino: u32) -> Result<[u8; INODE_SIZE], Ext2Error> {
        let mut inode = [0u8; INODE_SIZE];
        // SAFETY: the buffer holds INODE_SIZE bytes.
        let code = unsafe {
            (self.api.ext2fs_read_inode_full)(self.fs, ino, inode.as_mut_ptr(), INODE_SIZE as c_int)
        };
        self.api.check(code, || format!("reading inode {ino}"))?;
        Ok(inode)
    }

    pub fn write_inode(&mut self, ino: u32, inode: &[u8; INODE_SIZE]) -> Result<(), Ext2Error> {
        // SAFETY: the buffer holds INODE_SIZE bytes.
        let code = unsafe {
            (self.api.ext2fs_write_inode_full)(self.fs, ino, inode.as_ptr(), INODE_SIZE as c_int)
        };
        self.api.check(code, || format!("writing inode {ino}"))
    }

    /// Sets up an empty extent tree in `inode` (not yet written).
    pub fn init_extents(
        &mut self,
        ino: u32,
        inode: &mut [u8; INODE_SIZE],
    ) -> Result<(), Ext2Error> {
        let mut handle = std::ptr::null_mut();
        // SAFETY: `inode` is a whole on-disk inode; the handle is freed.
        let code = unsafe {
            (self.api.ext2fs_extent_open2)(self.fs, ino, inode.as_mut_ptr(), &mut handle)
        };
        self.api
            .check(code, || format!("starting the extent tree of inode {ino}"))?;
        // SAFETY: opened above.
        unsafe { (self.api.ext2fs_extent_free)(handle) };
        Ok(())
    }

    /// Runs `op` (a libext2fs call adding `name` to `dir`), giving the
    /// directory one more block and trying again once when it is full.
    fn in_dir(
        &mut self,
        dir: u32,
        name: &[u8],
        op: impl Fn(&Api, Fs, &CStr) -> Errcode,
    ) -> Result<(), Ext2Error> {
        let c = c_name(name)?;
        let doing = || {
            format!(
                "adding {} to directory {dir}",
                String::from_utf8_lossy(name)
            )
        };
        let mut code = op(self.api, self.fs, &c);
        if code == EXT2_ET_DIR_NO_SPACE {
            // SAFETY: `fs` is open.
            let expanded = unsafe { (self.api.ext2fs_expand_dir)(self.fs, dir) };
            self.api.check(expanded, doing)?;
            code = op(self.api, self.fs, &c);
        }
        self.api.check(code, doing)
    }

    /// The inode `name` in `dir` has.
    pub fn lookup(&mut self, dir: u32, name: &[u8]) -> Result<u32, Ext2Error> {
        let mut ino = 0;
        // SAFETY: `name` is read for `len` bytes; `ino` is a valid out-pointer.
        let code = unsafe {
            (self.api.ext2fs_lookup)(
                self.fs,
                dir,
                name.as_ptr().cast(),
                name.len() as c_int,
                std::ptr::null_mut(),
                &mut ino,
            )
        };
        self.api.check(code, || {
            format!(
                "looking up {} in directory {dir}",
                String::from_utf8_lossy(name)
            )
        })?;
        Ok(ino)
    }

    /// Adds the entry `name` for inode `ino` of type `kind` to `dir`.
    pub fn link(
        &mut self,
        dir: u32,
        name: &[u8],
        ino: u32,
        kind: EntryType,
    ) -> Result<(), Ext2Error> {
        // SAFETY: `fs` is open and `c` a C string for the call.
        self.in_dir(dir, name, |api, fs, c| unsafe {
            (api.ext2fs_link)(fs, dir, c.as_ptr(), ino, kind as c_int)
        })
    }

    /// Makes the directory `name` in `parent` as inode `ino`.
    pub fn mkdir(&mut self, parent: u32, name: &[u8], ino: u32) -> Result<(), Ext2Error> {
        // SAFETY: as for `link`.
        self.in_dir(parent, name, |api, fs, c| unsafe {
            (api.ext2fs_mkdir)(fs, parent, ino, c.as_ptr())
        })
    }

    /// Makes the symbolic link `name` to `target` in `parent` as inode `ino`.
    pub fn symlink(
        &mut self,
        parent: u32,
        name: &[u8],
        ino: u32,
        target: &[u8],
    ) -> Result<(), Ext2Error> {
        let target = c_name(target)?;
        // SAFETY: as for `link`; `target` outlives the calls.
        self.in_dir(parent, name, |api, fs, c| unsafe {
            (api.ext2fs_symlink)(fs, parent, ino, c.as_ptr(), target.as_ptr())
        })
    }

    /// Allocates blocks `start..start + len` of file `ino` as written
    /// extents (the data itself is the caller's to write).
    pub fn allocate(
        &mut self,
        ino: u32,
        inode: &mut [u8; INODE_SIZE],
        start: u64,
        len: u64,
    ) -> Result<(), Ext2Error> {
        // SAFETY: `inode` is the whole on-disk inode of `ino`; a goal of !0
        // lets libext2fs pick one near the inode.
        let code = unsafe {
            (self.api.ext2fs_fallocate)(
                self.fs,
                EXT2_FALLOCATE_FORCE_INIT,
                ino,
                inode.as_mut_ptr(),
                !0,
                start,
                len,
            )
        };
        self.api
            .check(code, || format!("allocating {len} blocks for inode {ino}"))
    }

    /// The extents of inode `ino`: (first logical block, first physical
    /// block, length), in logical order.
    pub fn extents(
        &mut self,
        ino: u32,
        inode: &mut [u8; INODE_SIZE],
    ) -> Result<Vec<(u64, u64, u64)>, Ext2Error> {
        let api = self.api;
        let mut handle = std::ptr::null_mut();
        let doing = || format!("reading the extents of inode {ino}");
        // SAFETY: as for `init_extents`; `extent` is a valid out-pointer.
        let code =
            unsafe { (api.ext2fs_extent_open2)(self.fs, ino, inode.as_mut_ptr(), &mut handle) };
        api.check(code, doing)?;
        let mut found = Vec::new();
        let mut extent = Extent::default();
        // SAFETY: the handle is open until freed below.
        let mut code = unsafe { (api.ext2fs_extent_get)(handle, EXT2_EXTENT_ROOT, &mut extent) };
        while code == 0 {
            if extent.flags & EXT2_EXTENT_FLAGS_LEAF != 0
                && extent.flags & EXT2_EXTENT_FLAGS_SECOND_VISIT == 0
                && extent.len > 0
            {
                found.push((extent.lblk, extent.pblk, u64::from(extent.len)));
            }
            // SAFETY: as above.
            code = unsafe { (api.ext2fs_extent_get)(handle, EXT2_EXTENT_NEXT_LEAF, &mut extent) };
        }
        // SAFETY: opened above, freed once.
        unsafe { (api.ext2fs_extent_free)(handle) };
        if code != EXT2_ET_EXTENT_NO_NEXT {
            api.check(code, doing)?;
        }
        Ok(found)
    }

    /// Sets the extended attributes `attrs` (name, value) on inode `ino`.
    pub fn set_xattrs(&mut self, ino: u32, attrs: &[(CString, Vec<u8>)]) -> Result<(), Ext2Error> {
        let api = self.api;
        let mut handle = std::ptr::null_mut();
        let doing = || format!("setting extended attributes of inode {ino}");
        // SAFETY: the handle is opened, used and closed here; names and
        // values outlive each call.
        unsafe {
            api.check((api.ext2fs_xattrs_open)(self.fs, ino, &mut handle), doing)?;
            let mut code = (api.ext2fs_xattrs_read)(handle);
            for (name, value) in attrs {
                if code != 0 {
                    break;
                }
                code = (api.ext2fs_xattr_set)(
                    handle,
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                );
            }
            let closed = (api.ext2fs_xattrs_close)(&mut handle);
            api.check(code, doing)?;
            api.check(closed, doing)
        }
    }
}

impl Drop for Filesystem {
    fn drop(&mut self) {
        if !self.fs.is_null() {
            // SAFETY: still open (close nulls it); a failed build's image is
            // thrown away, so errors are of no interest here.
            unsafe { (self.api.ext2fs_close_free)(&mut self.fs) };
        }
    }
}
