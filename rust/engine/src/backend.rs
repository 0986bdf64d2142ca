//! Storage access of the object store, behind one small trait so that an
//! object-store backend (S3-compatible) can be added without touching
//! chunking or codecs. [`LocalFs`] is the local-filesystem backend.

use crate::error::{Error, Result};
use crate::fault;
use crate::object_id::ObjectId;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use rayon::prelude::*;

/// Where chunk objects live. Objects are immutable and named by content, so
/// concurrent writers of the same object are harmless.
pub trait Backend: Send + Sync {
    /// The stored size of the object, or `None` when it is absent.
    fn stored_size(&self, id: &ObjectId) -> Result<Option<u64>>;
    /// Stores the object whose bytes are `parts` concatenated, atomically: a
    /// reader sees the whole object or none of it.
    fn put(&self, id: &ObjectId, parts: &[&[u8]]) -> Result<()>;
    /// Reads up to `buf.len()` bytes from `offset`; returns (bytes read, object size).
    fn read_at(&self, id: &ObjectId, offset: u64, buf: &mut [u8]) -> Result<(usize, u64)>;
    /// Removes the object; returns the bytes freed (0 when it was absent).
    fn delete(&self, id: &ObjectId) -> Result<u64>;
    /// Every object in the store with its stored size.
    fn list(&self) -> Result<Vec<(ObjectId, u64)>>;
    /// Makes every `put` so far durable (directory entries included).
    fn flush(&self) -> Result<()>;
    /// Bytes free for new objects, when the backend can tell.
    fn free_space(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// The whole object mapped read-only into memory, when the backend can
    /// (readers then decode straight from the page cache instead of copying
    /// the object into a buffer first); `None` to use [`Backend::read_at`].
    fn map(&self, _id: &ObjectId) -> Result<Option<Mapped>> {
        Ok(None)
    }
}

/// A read-only private mapping of a whole object file; unmapped on drop.
///
/// Objects are immutable (written under a temp name, renamed into place,
/// never modified; `gc` unlinks them, which leaves a mapping intact), so the
/// mapped bytes cannot change under a reader unless someone truncates a
/// chunk file behind the store's back: that would fault the process
/// (SIGBUS) instead of raising an error, which is why only whole files of the
/// size just checked are mapped and `CKPT_NO_MMAP=1` turns mapping off.
pub struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; sharing `&[u8]`
// views of it across threads is as safe as sharing any immutable slice.
unsafe impl Send for Mapped {}
unsafe impl Sync for Mapped {}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes until drop.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; unmapped once.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// Whether [`LocalFs`] maps objects for reading (`CKPT_NO_MMAP=1` turns it off).
fn mapping_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED
        .get_or_init(|| std::env::var_os("CKPT_NO_MMAP").is_none_or(|v| v.is_empty() || v == "0"))
}

/// Objects smaller than this are read with `pread` (a mapping costs more).
const MAP_MIN: u64 = 256 << 10;

/// Objects as files `objects/ab/cdef…` under a store root; temp files in `tmp/`.
pub struct LocalFs {
    root: PathBuf,
    durable: bool,
    /// Object directories whose entries changed since the last flush.
    touched: Mutex<HashSet<String>>,
    /// Directories checked to be real directories (not symlinks).
    checked: Mutex<HashSet<String>>,
    new_dirs: AtomicU64,
    /// Whether `delete` ran since the last flush (names its fault points).
    deleted: AtomicBool,
    /// Durable puts: the thread that fsyncs and renames their temp files
    /// while the workers go on (started by the first durable put).
    syncer: Mutex<Option<Syncer>>,
}

/// A chunk file written (and closed) in `tmp/`, waiting for its fsync and
/// rename. Dropping it unsynced (the writer's abort, a panic) removes the
/// temp file.
struct Written {
    tmp: PathBuf,
    path: PathBuf,
    prefix: String,
}

impl Drop for Written {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Chunk files that may wait for their fsync at once (memory is bounded; a
/// worker that finds the queue full waits). Queued files hold no descriptor.
const SYNC_QUEUE: usize = 64;

/// One thread per durable writer that fsyncs each chunk file and renames
/// it into `objects/` as soon as the file is written, so that the journal
/// commits of a save overlap the compression of its later chunks instead
/// of queueing up after the last one. It takes whatever has queued up as
/// one batch: each file is fsynced and renamed, then each object directory
/// of the batch is fsynced once.
struct Syncer {
    tx: mpsc::SyncSender<Written>,
    /// Set when the writer is dropped without a flush: the queued files
    /// are removed rather than renamed.
    abort: Arc<AtomicBool>,
    handle: thread::JoinHandle<Vec<Result<()>>>,
}

impl Syncer {
    fn start(objects: PathBuf) -> Result<Syncer> {
        let (tx, rx) = mpsc::sync_channel::<Written>(SYNC_QUEUE);
        let abort = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&abort);
        let tmp_dir = objects.with_file_name("tmp");
        let handle = thread::Builder::new()
            .name("ckpt-fsync".into())
            .spawn(move || {
                let mut done = Vec::new();
                while let Ok(first) = rx.recv() {
                    let batch: Vec<Written> = std::iter::once(first).chain(rx.try_iter()).collect();
                    if stop.load(Ordering::Relaxed) {
                        continue; // dropping the batch removes its files
                    }
                    let renamed: Vec<Result<String>> =
                        batch.into_iter().map(sync_and_rename).collect();
                    let mut dirs: Vec<&String> = renamed.iter().flatten().collect();
                    dirs.sort();
                    dirs.dedup();
                    let synced = dirs
                        .into_iter()
                        .try_for_each(|prefix| fsync_dir(&objects.join(prefix)));
                    done.extend(renamed.into_iter().map(|r| r.map(drop)));
                    if let Err(e) = synced {
                        done.push(Err(e));
                    }
                }
                done
            })
            .map_err(|e| Error::io("start the fsync thread for", tmp_dir, e))?;
        Ok(Syncer { tx, abort, handle })
    }

    /// Waits for every queued file: one outcome per file (and one per
    /// failed directory fsync).
    fn finish(self) -> Vec<Result<()>> {
        drop(self.tx);
        self.handle.join().unwrap_or_else(|_| {
            vec![Err(Error::Invalid(
                "the fsync thread panicked; no chunk of this save is known to be durable".into(),
            ))]
        })
    }
}

/// fsync of a written chunk file, then its rename into place (its object
/// directory is fsynced with the rest of the batch); the temp file is
/// removed when either fails.
fn sync_and_rename(mut w: Written) -> Result<String> {
    let synced = fault::point("chunk.before_fsync")
        .and_then(|()| File::open(&w.tmp))
        .and_then(|f| f.sync_all())
        .and_then(|()| fault::point("chunk.after_fsync"))
        .map_err(|e| Error::io("fsync", &w.tmp, e))
        .and_then(|()| fs::rename(&w.tmp, &w.path).map_err(|e| Error::io("rename", &w.path, e)));
    if synced.is_ok() {
        w.tmp = PathBuf::new(); // renamed: nothing left to remove
    }
    synced?;
    fault::point("chunk.after_rename").map_err(|e| Error::io("rename", &w.path, e))?;
    Ok(std::mem::take(&mut w.prefix))
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl LocalFs {
    /// A backend over the store at `root` (which must hold `objects/` and `tmp/`).
    /// With `durable == false` no fsync is issued (scratch stores).
    pub fn new(root: impl Into<PathBuf>, durable: bool) -> Self {
        LocalFs {
            root: root.into(),
            durable,
            touched: Mutex::new(HashSet::new()),
            checked: Mutex::new(HashSet::new()),
            new_dirs: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
            syncer: Mutex::new(None),
        }
    }

    /// Hands a written chunk file to the fsync thread (started on first use).
    fn queue_sync(&self, w: Written) -> Result<()> {
        let tx = {
            let mut syncer = self.syncer.lock().expect("lock");
            if syncer.is_none() {
                *syncer = Some(Syncer::start(self.objects())?);
            }
            syncer.as_ref().expect("started").tx.clone()
        };
        // A refused file is dropped with the error, which removes it.
        tx.send(w).map_err(|_| {
            Error::Invalid("the fsync thread stopped; this save cannot be made durable".into())
        })
    }

    fn objects(&self) -> PathBuf {
        self.root.join("objects")
    }

    fn path_of(&self, id: &ObjectId) -> (String, PathBuf) {
        let hex = id.hex();
        let prefix = hex[..2].to_string();
        let path = self.objects().join(&prefix).join(&hex[2..]);
        (prefix, path)
    }

    /// Whether the directory `objects/<prefix>` of object `id` is a real
    /// directory (never a symlink, which is refused as tampering); creates it
    /// when absent and `create` is set. Returns false when it is absent (and
    /// not created).
    fn real_dir(&self, id: &ObjectId, prefix: &str, create: bool) -> Result<bool> {
        if self.checked.lock().expect("lock").contains(prefix) {
            return Ok(true);
        }
        let dir = self.objects().join(prefix);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::Format {
                    object: id.hex(),
                    detail: format!(
                        "{} is not a directory (a symlink or file where the store expects a directory); the store is damaged or tampered with",
                        dir.display()
                    ),
                })
            }
            Err(e) if e.kind() == ErrorKind::NotFound && !create => return Ok(false),
            Err(e) if e.kind() == ErrorKind::NotFound => match fs::create_dir(&dir) {
                Ok(()) => {
                    self.new_dirs.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("create directory", &dir, e)),
            },
            Err(e) => return Err(Error::io("stat", &dir, e)),
        }
        self.checked
            .lock()
            .expect("lock")
            .insert(prefix.to_string());
        Ok(true)
    }

    fn open_object(&self, id: &ObjectId) -> Result<File> {
        let (prefix, path) = self.path_of(id);
        if !self.real_dir(id, &prefix, false)? {
            return Err(Error::Missing { object: id.hex() });
        }
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::Missing { object: id.hex() },
                _ if e.raw_os_error() == Some(libc::ELOOP) => Error::Format {
                    object: id.hex(),
                    detail: format!("{} is a symlink; refusing to follow it", path.display()),
                },
                _ => Error::io("open", &path, e),
            })
    }
}

/// Asks the kernel to start writing the file's dirty pages back (Linux), without waiting.
fn start_writeback(f: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an fd we own; failure only loses the head start.
        unsafe {
            libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = f;
}

impl Drop for LocalFs {
    /// Puts that never reached `flush` (an error elsewhere) leave no temp
    /// files, and no thread outlives the writer: files still queued are
    /// removed (those already renamed are complete objects that no version
    /// lists, which gc collects).
    fn drop(&mut self) {
        if let Some(syncer) = self.syncer.get_mut().expect("lock").take() {
            syncer.abort.store(true, Ordering::Relaxed);
            let _ = syncer.finish();
        }
    }
}

fn fsync_dir(path: &Path) -> Result<()> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io("open directory", path, e))?;
    dir.sync_all()
        .map_err(|e| Error::io("fsync directory", path, e))
}

static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes a small file atomically: `tmp/<name>.<pid>.<n>.tmp` (created with
/// O_EXCL and O_NOFOLLOW), fsync, rename onto `<root>/<dir>/<name>`, fsync
/// `<root>/<dir>`. With `durable == false` nothing is fsynced. `dir` is ""
/// (the store root) or one directory name; `name` a plain file name. A
/// manifest (`dir == "versions"`) is committed when the rename is done; the
/// fault points around it are the `manifest.*` ones, `file.*` for the rest.
pub fn commit_file(root: &Path, dir: &str, name: &str, data: &[u8], durable: bool) -> Result<()> {
    let plain =
        |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0');
    if !plain(name) || !(dir.is_empty() || plain(dir)) {
        return Err(Error::Invalid(format!(
            "{dir:?}/{name:?} is not a store file name"
        )));
    }
    let manifest = dir == "versions";
    let [tmp_written, after_fsync, after_rename] = if manifest {
        [
            "manifest.tmp_written",
            "manifest.after_fsync",
            "manifest.after_rename",
        ]
    } else {
        ["file.tmp_written", "file.after_fsync", "file.after_rename"]
    };
    let folder = if dir.is_empty() {
        root.to_path_buf()
    } else {
        root.join(dir)
    };
    let last = folder.join(name);
    let n = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = root
        .join("tmp")
        .join(format!("{name}.{}.{n}.tmp", std::process::id()));
    let written = (|| {
        let mut f = create_tmp(&tmp)?;
        f.write_all(data)
            .and_then(|()| fault::point(tmp_written))
            .map_err(|e| Error::io("write", &tmp, e))?;
        if durable {
            f.sync_all()
                .and_then(|()| fault::point(after_fsync))
                .map_err(|e| Error::io("fsync", &tmp, e))?;
        }
        if manifest {
            // A committed version is never replaced, even by a writer that
            // ignored the lock: the commit fails instead.
            rename_noreplace(&tmp, &last).map_err(|e| Error::io("rename", &last, e))
        } else {
            fs::rename(&tmp, &last).map_err(|e| Error::io("rename", &last, e))
        }
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
        return written;
    }
    let synced = fault::point(after_rename)
        .map_err(|e| Error::io("fsync directory", &folder, e))
        .and_then(|()| if durable { fsync_dir(&folder) } else { Ok(()) });
    if let Err(e) = synced {
        if manifest {
            // Not durable, so not committed: take the version back rather
            // than leave one that a power loss may still remove.
            let _ = fs::remove_file(&last);
        }
        return Err(e);
    }
    if manifest {
        // A kill point only: after it nothing can fail.
        let _ = fault::point("manifest.after_dir_fsync");
    }
    Ok(())
}

/// Creates a writer's temp file: new (never an existing file), never
/// through a symlink, mode 0644.
fn create_tmp(tmp: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)
        .map_err(|e| Error::io("create", tmp, e))
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`):
/// `renameat2(RENAME_NOREPLACE)` on Linux, else (or where the file system
/// lacks it) a hard link, which fails on an existing name, then an unlink.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
        let (a, b) = (c(from)?, c(to)?);
        // SAFETY: two NUL-terminated paths that outlive the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    fs::hard_link(from, to)?;
    let _ = fs::remove_file(from);
    Ok(())
}

/// Bytes available to an unprivileged writer on the file system of `path`.
fn statvfs_free(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("{} holds a NUL byte", path.display())))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid C string and `st` a writable statvfs the call fills.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::io("statvfs", path, std::io::Error::last_os_error()));
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u64 here, u32 on some 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl Backend for LocalFs {
    fn stored_size(&self, id: &ObjectId) -> Result<Option<u64>> {
        let (prefix, path) = self.path_of(id);
        if !self.real_dir(id, &prefix, false)? {
            return Ok(None);
        }
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            // A planted symlink is not an object: a save renames a real one over it.
            Ok(m) if m.file_type().is_symlink() => Ok(None),
            Ok(_) => Err(Error::Format {
                object: id.hex(),
                detail: format!("{} is not a regular file", path.display()),
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", &path, e)),
        }
    }

    fn put(&self, id: &ObjectId, parts: &[&[u8]]) -> Result<()> {
        let (prefix, path) = self.path_of(id);
        self.real_dir(id, &prefix, true)?;
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp =
            self.root
                .join("tmp")
                .join(format!("{}.{}.{n}.chunk", id.hex(), std::process::id()));
        let write = || -> Result<bool> {
            let mut f = create_tmp(&tmp)?;
            for part in parts {
                f.write_all(part).map_err(|e| Error::io("write", &tmp, e))?;
            }
            fault::point("chunk.tmp_written").map_err(|e| Error::io("write", &tmp, e))?;
            if self.durable {
                // Start writeback now; the fsync thread waits for it and
                // renames, while the other chunks are being compressed.
                start_writeback(&f);
                drop(f);
                self.queue_sync(Written {
                    tmp: tmp.clone(),
                    path: path.clone(),
                    prefix: prefix.clone(),
                })?;
                Ok(false)
            } else {
                fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &path, e))?;
                Ok(true)
            }
        };
        match write() {
            Ok(true) => {
                self.touched.lock().expect("lock").insert(prefix);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn read_at(&self, id: &ObjectId, offset: u64, buf: &mut [u8]) -> Result<(usize, u64)> {
        let f = self.open_object(id)?;
        let (_, path) = self.path_of(id);
        let size = f.metadata().map_err(|e| Error::io("stat", &path, e))?.len();
        let mut done = 0usize;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", &path, e)),
            }
        }
        Ok((done, size))
    }

    fn map(&self, id: &ObjectId) -> Result<Option<Mapped>> {
        if !mapping_enabled() {
            return Ok(None);
        }
        let f = self.open_object(id)?;
        let (_, path) = self.path_of(id);
        let meta = f.metadata().map_err(|e| Error::io("stat", &path, e))?;
        let len = meta.len();
        if !meta.is_file() || !(MAP_MIN..=usize::MAX as u64).contains(&len) {
            return Ok(None);
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh private read-only mapping of the whole regular file
        // (its size just read); the fd may close afterwards (the mapping
        // keeps its own reference). MAP_POPULATE maps every page now, in one
        // call, instead of faulting them in one by one while decoding.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_POPULATE,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Ok(None); // fall back to reads (e.g. a filesystem without mmap)
        }
        Ok(Some(Mapped {
            ptr,
            len: len as usize,
        }))
    }

    fn delete(&self, id: &ObjectId) -> Result<u64> {
        let (prefix, path) = self.path_of(id);
        // Never through a symlinked objects/ab (it could point outside the store).
        if !self.real_dir(id, &prefix, false)? {
            return Ok(0);
        }
        let size = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => m.len(),
            Ok(m) if m.file_type().is_symlink() => 0, // unlinking a link never follows it
            Ok(_) => return Ok(0),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io("stat", &path, e)),
        };
        fault::point("gc.before_delete").map_err(|e| Error::io("delete", &path, e))?;
        self.deleted.store(true, Ordering::Relaxed);
        match fs::remove_file(&path) {
            Ok(()) => {
                self.touched.lock().expect("lock").insert(prefix);
                Ok(size)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            Err(e) => Err(Error::io("delete", &path, e)),
        }
    }

    fn list(&self) -> Result<Vec<(ObjectId, u64)>> {
        let objects = self.objects();
        let mut out = Vec::new();
        let dirs = fs::read_dir(&objects).map_err(|e| Error::io("list", &objects, e))?;
        for dir in dirs {
            let dir = dir.map_err(|e| Error::io("list", &objects, e))?;
            let prefix = dir.file_name().to_string_lossy().into_owned();
            if prefix.len() != 2 || !dir.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let entries = fs::read_dir(dir.path()).map_err(|e| Error::io("list", dir.path(), e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io("list", dir.path(), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let Ok(id) = ObjectId::parse(&format!("{prefix}{name}")) else {
                    continue;
                };
                let meta = entry
                    .metadata()
                    .map_err(|e| Error::io("stat", entry.path(), e))?;
                if meta.is_file() {
                    out.push((id, meta.len()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn flush(&self) -> Result<()> {
        if !self.durable {
            self.touched.lock().expect("lock").clear();
            self.deleted.store(false, Ordering::Relaxed);
            return Ok(());
        }
        let syncer = self.syncer.lock().expect("lock").take();
        let done: Vec<Result<()>> = syncer.map(Syncer::finish).unwrap_or_default();
        // The fsync thread synced the directories of the chunks it renamed;
        // `objects/` still needs one fsync for directories created meanwhile.
        let renamed = done.iter().any(|r| r.is_ok());
        if let Some(Err(e)) = done.into_iter().find(|r| r.is_err()) {
            return Err(e);
        }
        let dirs: Vec<String> = self.touched.lock().expect("lock").drain().collect();
        let (before, after) = if self.deleted.swap(false, Ordering::Relaxed) {
            ("gc.before_dir_fsync", None)
        } else {
            ("objects.before_dir_fsync", Some("objects.after_dir_fsync"))
        };
        if !dirs.is_empty() || renamed {
            fault::point(before).map_err(|e| Error::io("fsync directory", self.objects(), e))?;
        }
        dirs.par_iter()
            .try_for_each(|prefix| fsync_dir(&self.objects().join(prefix)))?;
        // Also when this writer created no directory: a crashed writer may
        // have created one without making its entry durable, and a failed
        // save of this process may have renamed chunks (whole, unreferenced)
        // into new directories that this save now finds and references.
        self.new_dirs.store(0, Ordering::Relaxed);
        fsync_dir(&self.objects())?;
        if !dirs.is_empty() || renamed {
            if let Some(after) = after {
                let _ = fault::point(after); // a kill point only
            }
        }
        Ok(())
    }

    fn free_space(&self) -> Result<Option<u64>> {
        if let Some(free) = fault::free_space_override() {
            return Ok(Some(free));
        }
        statvfs_free(&self.objects()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_committed_manifest_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["versions", "tmp"] {
            fs::create_dir(dir.path().join(d)).unwrap();
        }
        commit_file(dir.path(), "versions", "000000000001.json", b"first", true).unwrap();
        let err =
            commit_file(dir.path(), "versions", "000000000001.json", b"second", true).unwrap_err();
        match err {
            Error::Io { source, .. } => assert_eq!(source.kind(), ErrorKind::AlreadyExists),
            e => panic!("unexpected {e:?}"),
        }
        let path = dir.path().join("versions").join("000000000001.json");
        assert_eq!(fs::read(path).unwrap(), b"first");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // other store files are replaced as before (e.g. last-id)
        commit_file(dir.path(), "", "last-id", b"1\n", true).unwrap();
        commit_file(dir.path(), "", "last-id", b"2\n", true).unwrap();
        assert_eq!(fs::read(dir.path().join("last-id")).unwrap(), b"2\n");
    }

    fn durable_store() -> (tempfile::TempDir, LocalFs) {
        let dir = tempfile::tempdir().unwrap();
        for d in ["objects", "tmp"] {
            fs::create_dir(dir.path().join(d)).unwrap();
        }
        let fs = LocalFs::new(dir.path(), true);
        (dir, fs)
    }

    fn object(n: u8) -> (ObjectId, Vec<u8>) {
        let bytes = vec![n; 1000 + n as usize];
        (ObjectId(*blake3::hash(&bytes).as_bytes()), bytes)
    }

    #[test]
    fn durable_puts_are_renamed_by_the_fsync_thread_and_complete_at_flush() {
        let (dir, fs) = durable_store();
        let objs: Vec<_> = (0..100).map(object).collect(); // more than the queue holds
        for (id, bytes) in &objs {
            fs.put(id, &[&bytes[..10], &bytes[10..]]).unwrap();
        }
        fs.flush().unwrap();
        for (id, bytes) in &objs {
            assert_eq!(fs.stored_size(id).unwrap(), Some(bytes.len() as u64));
            let mut back = vec![0u8; bytes.len()];
            assert_eq!(fs.read_at(id, 0, &mut back).unwrap().0, bytes.len());
            assert_eq!(&back, bytes);
        }
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // a second save on the same writer starts a new thread
        let (id, bytes) = object(200);
        fs.put(&id, &[&bytes]).unwrap();
        fs.flush().unwrap();
        assert_eq!(fs.stored_size(&id).unwrap(), Some(bytes.len() as u64));
    }

    #[test]
    fn a_writer_dropped_before_flush_leaves_no_temp_files_and_no_partial_objects() {
        let (dir, fs) = durable_store();
        let objs: Vec<_> = (0..50).map(object).collect();
        for (id, bytes) in &objs {
            fs.put(id, &[bytes]).unwrap();
        }
        drop(fs); // as after an error in another chunk: no flush
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let fs = LocalFs::new(dir.path(), false);
        for (id, bytes) in &objs {
            // renamed ones are whole (unreferenced: gc collects them)
            if let Some(size) = fs.stored_size(id).unwrap() {
                assert_eq!(size, bytes.len() as u64);
            }
        }
    }
}
