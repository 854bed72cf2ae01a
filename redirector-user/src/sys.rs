//! The two system calls aya and the standard library do not wrap: `statfs` (is this
//! directory on bpffs?) and `mount` (mount bpffs). The only `unsafe` of this crate.

use std::{ffi::CString, io, os::unix::ffi::OsStrExt as _, path::Path};

/// `BPF_FS_MAGIC` from `include/uapi/linux/magic.h`.
pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// The filesystem magic number of the filesystem holding `path` (`statfs(2)`'s `f_type`).
pub(crate) fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = c_path(path)?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `buf` points to writable memory of the size
    // of `struct statfs`, which the call fills on success.
    let rc = unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so it initialised the whole structure.
    let stat = unsafe { buf.assume_init() };
    #[expect(
        clippy::unnecessary_cast,
        reason = "f_type is i64 on x86_64 but u32/i32 on other targets"
    )]
    Ok(stat.f_type as i64)
}

/// `mount -t bpf bpf TARGET`.
pub(crate) fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = c_path(target)?;
    let source = c"bpf";
    let fstype = c"bpf";
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
