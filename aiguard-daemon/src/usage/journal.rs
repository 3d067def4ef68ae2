//! Journal segments: preallocated files mapped shared into memory, to which each settled
//! request's record is copied.
//!
//! A store into a shared file mapping is in the page cache the moment it is made, so a record
//! survives a SIGKILL of the daemon exactly as one `write(2)` would, without the system call
//! on every request. The blocks are reserved with `posix_fallocate` when a segment is created:
//! a full disk is then an error at rotation, never a SIGBUS on a later store into a hole.
//! Like the `write(2)` journal it replaces, a segment is not fsynced: a power cut can lose the
//! records of the last flush interval.
use std::{
    fs::{self, OpenOptions},
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use memmap2::MmapMut;

/// Bytes per segment: about 30,000 records. A flush (every second by default) starts a new
/// segment anyway; a segment fills first only above that many requests per flush interval.
pub const SEGMENT_BYTES: usize = 4 << 20;

/// The file of generation `generation` in `dir`.
pub fn path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation:020}.log"))
}

/// One journal segment, open for appending.
pub struct Segment {
    pub generation: u64,
    pub path: PathBuf,
    map: MmapMut,
    len: usize,
}

impl Segment {
    /// Creates (or, after a crash that left it empty, recreates) the segment of `generation`.
    pub fn create(dir: &Path, generation: u64) -> io::Result<Self> {
        let path = path(dir, generation);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        // SAFETY: plain FFI on an open descriptor; the return value is the error number.
        let rc =
            unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, SEGMENT_BYTES as libc::off_t) };
        if rc != 0 {
            let _ = fs::remove_file(&path);
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: the file is this process's own (a fresh generation in the daemon's state
        // directory, which nothing else writes or truncates); its length is fixed above.
        let map = unsafe { MmapMut::map_mut(&file)? };
        Ok(Self {
            generation,
            path,
            map,
            len: 0,
        })
    }

    /// Copies `bytes` in after the last record; false when they do not fit (the caller
    /// starts the next segment).
    pub fn append(&mut self, bytes: &[u8]) -> bool {
        let end = self.len + bytes.len();
        if end > self.map.len() {
            return false;
        }
        self.map[self.len..end].copy_from_slice(bytes);
        self.len = end;
        true
    }
}

/// The records of a segment file: its bytes up to the first NUL (the unwritten rest of a
/// preallocated segment; a record never contains one, JSON escapes control characters).
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = fs::read(path)?;
    if let Some(end) = bytes.iter().position(|b| *b == 0) {
        bytes.truncate(end);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_read_back_up_to_the_unwritten_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Segment::create(dir.path(), 7).expect("segment");
        assert!(s.append(b"{\"a\":1}\n"));
        assert!(s.append(b"{\"b\":2}\n"));
        assert_eq!(
            fs::metadata(&s.path).expect("meta").len(),
            SEGMENT_BYTES as u64
        );
        // Read while still mapped: what a restart after a SIGKILL sees.
        assert_eq!(read(&s.path).expect("read"), b"{\"a\":1}\n{\"b\":2}\n");
        assert!(!s.append(&vec![b'x'; SEGMENT_BYTES]));
    }
}
