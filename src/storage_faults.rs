//! Test hook: a switchboard that makes the journal's storage fail writes,
//! syncs, resizes or opens on demand (ENOSPC, EIO, EACCES, ...) and heal
//! later, so the journal's fault handling can be shown deterministically.
//! It sits under both of the journal's stores: the event log's files (see
//! `journal::log`, which asks `check_write` / `check_open` before each
//! operation) and the redb state file (a `StorageBackend`). Production never
//! builds one: `JournalSettings::faults` is `None` unless a test sets it.

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// `ENOSPC` on Linux.
pub const ENOSPC: i32 = 28;
/// `EIO` on Linux.
pub const EIO: i32 = 5;
/// `EACCES` on Linux.
pub const EACCES: i32 = 13;

/// A switchboard shared by the test and every backend the journal opens.
#[doc(hidden)]
#[derive(Clone, Default)]
pub struct StorageFaults {
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    /// errno that `write`, `set_len` and `sync_data` fail with, if any.
    writes: Mutex<Option<i32>>,
    /// errno that opening the file fails with, if any.
    opens: Mutex<Option<i32>>,
    injected: AtomicU64,
    opened: AtomicU64,
}

impl fmt::Debug for StorageFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageFaults")
            .field("writes", &*self.state.writes.lock())
            .field("opens", &*self.state.opens.lock())
            .finish()
    }
}

impl StorageFaults {
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on every write, resize and sync fails with `errno`.
    pub fn fail_writes(&self, errno: i32) {
        *self.state.writes.lock() = Some(errno);
    }

    /// From now on opening the journal file fails with `errno`.
    pub fn fail_opens(&self, errno: i32) {
        *self.state.opens.lock() = Some(errno);
    }

    /// Writes and opens work again.
    pub fn heal(&self) {
        *self.state.writes.lock() = None;
        *self.state.opens.lock() = None;
    }

    /// How many operations failed because of an injected fault.
    pub fn injected(&self) -> u64 {
        self.state.injected.load(Ordering::Relaxed)
    }

    /// How many times the journal opened its file through this hook.
    pub fn opened(&self) -> u64 {
        self.state.opened.load(Ordering::Relaxed)
    }

    /// Opens (or creates) `path` as a backend that obeys this switchboard.
    pub(crate) fn open(&self, path: &Path) -> io::Result<FaultyBackend> {
        self.check_open()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let inner = FileBackend::new(file).map_err(io::Error::other)?;
        Ok(FaultyBackend {
            inner,
            faults: self.clone(),
        })
    }

    /// Whether a write, resize or sync may go ahead now.
    pub(crate) fn check_write(&self) -> io::Result<()> {
        self.check()
    }

    /// Whether a file may be opened or created now.
    pub(crate) fn check_open(&self) -> io::Result<()> {
        if let Some(errno) = *self.state.opens.lock() {
            self.state.injected.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.state.opened.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn check(&self) -> io::Result<()> {
        match *self.state.writes.lock() {
            Some(errno) => {
                self.state.injected.fetch_add(1, Ordering::Relaxed);
                Err(io::Error::from_raw_os_error(errno))
            }
            None => Ok(()),
        }
    }
}

/// `FileBackend`, except where the switchboard says otherwise.
#[derive(Debug)]
pub(crate) struct FaultyBackend {
    inner: FileBackend,
    faults: StorageFaults,
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.faults.check()?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.faults.check()?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.faults.check()?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
