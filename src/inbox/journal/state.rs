//! The journal's small durable state, in a redb file (`journal.redb`): dead
//! letters, sweeps (see `sweeps`) and their counters. None of it is on the
//! per-event path: dead letters are rare, sweeps save a few times a pass.
//!
//! Earlier versions kept the events and the dedupe ids here too; `legacy`
//! reads what such a file still holds, so an upgrade moves it into the log
//! and the dedupe runs instead of losing it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::Fault;
use crate::domain::DeadLetter;
use crate::storage_faults::StorageFaults;

/// dead-letter id -> JSON `DeadLetter`.
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// counters: "next_dead".
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Earlier versions' events (seq -> JSON record) and dedupe ids.
const LEGACY_EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const LEGACY_IDS: TableDefinition<&str, u64> = TableDefinition::new("ids");

/// redb's page cache; the state is small, and the default (1 GiB) would
/// count against the process's memory for nothing.
const CACHE_BYTES: usize = 4 << 20;

/// What an earlier version's file still held.
#[derive(Debug, Default)]
pub struct Legacy {
    /// Unsettled events as that version stored them (JSON records).
    pub events: Vec<Vec<u8>>,
    /// Dedupe ids and when they were accepted (unix seconds).
    pub ids: Vec<(String, u64)>,
}

/// The open state file; reopened after a failed write.
pub struct State {
    pub path: PathBuf,
    faults: Option<StorageFaults>,
    db: RwLock<Option<Arc<Database>>>,
}

fn open_db(path: &Path, faults: Option<&StorageFaults>) -> Result<Database, redb::Error> {
    let mut builder = Database::builder();
    builder.set_cache_size(CACHE_BYTES);
    // A file damaged outside redb is reported as corrupt instead of trusted
    // (a plain open may panic on it); it is small, so the check is cheap.
    builder.set_check_integrity_on_open(true);
    let db = match faults {
        Some(f) => builder.create_with_backend(f.open(path)?)?,
        None => builder.create(path)?,
    };
    let txn = db.begin_write()?;
    {
        txn.open_table(DEAD)?;
        txn.open_table(META)?;
    }
    txn.commit()?;
    Ok(db)
}

fn next_counter(meta: &mut redb::Table<&str, u64>, key: &str) -> Result<u64, redb::Error> {
    let n = meta.get(key)?.map(|v| v.value()).unwrap_or(1);
    meta.insert(key, n + 1)?;
    Ok(n)
}

impl State {
    pub fn open(path: PathBuf, faults: Option<StorageFaults>) -> Result<State, redb::Error> {
        let db = open_db(&path, faults.as_ref())?;
        Ok(State {
            path,
            faults,
            db: RwLock::new(Some(Arc::new(db))),
        })
    }

    /// The open database, if it is open.
    pub fn db(&self) -> Option<Arc<Database>> {
        self.db.read().clone()
    }

    /// The open database, reopening it first if a failure closed it.
    fn db_or_reopen(&self) -> Result<Arc<Database>, Fault> {
        if let Some(db) = self.db() {
            return Ok(db);
        }
        let db = Arc::new(open_db(&self.path, self.faults.as_ref())?);
        *self.db.write() = Some(db.clone());
        Ok(db)
    }

    /// After a failed write redb refuses every later one until the file is
    /// closed and reopened: closes it (once its readers are done) so the
    /// next use reopens it, and redb repairs it on the way.
    pub fn close(&self) {
        let Some(mut db) = self.db.write().take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Arc::try_unwrap(db) {
                Ok(d) => {
                    if let Err(e) = d.close() {
                        tracing::debug!(error = %e, "closing the failed journal state file");
                    }
                    return;
                }
                Err(shared) if Instant::now() < deadline => {
                    db = shared;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
    }

    /// Stores dead letters durably, giving each without one an id (one that
    /// has an id keeps it, so a retry after a failure that reached the disk
    /// anyway does not store it twice).
    pub fn commit_dead(&self, dls: &mut [DeadLetter]) -> Result<(), Fault> {
        let db = self.db_or_reopen()?;
        let result = (|| -> Result<(), Fault> {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                let mut dead = txn.open_table(DEAD)?;
                let mut meta = txn.open_table(META)?;
                for dl in dls.iter_mut() {
                    if dl.id == 0 {
                        dl.id = next_counter(&mut meta, "next_dead")?;
                    } else {
                        let next = meta.get("next_dead")?.map(|v| v.value()).unwrap_or(1);
                        if next <= dl.id {
                            meta.insert("next_dead", dl.id + 1)?;
                        }
                    }
                    let bytes = serde_json::to_vec(&*dl).expect("dead letters serialize");
                    dead.insert(dl.id, bytes.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })();
        drop(db);
        if result.is_err() {
            self.close();
        }
        result
    }

    /// Dead letters (all, or those ids) to put back to work.
    pub fn read_dead(&self, ids: Option<&[u64]>) -> Result<Vec<DeadLetter>, Fault> {
        let db = self.db_or_reopen()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(DEAD)?;
        let mut out = Vec::new();
        let mut take = |v: &[u8]| {
            if let Ok(dl) = serde_json::from_slice::<DeadLetter>(v) {
                out.push(dl);
            }
        };
        match ids {
            Some(ids) => {
                for id in ids {
                    if let Some(v) = table.get(*id)? {
                        take(v.value());
                    }
                }
            }
            None => {
                for entry in table.iter()? {
                    take(entry?.1.value());
                }
            }
        }
        Ok(out)
    }

    /// Forgets dead letters (once they are back at work).
    pub fn remove_dead(&self, ids: &[u64]) -> Result<(), Fault> {
        let db = self.db_or_reopen()?;
        let result = (|| -> Result<(), Fault> {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                let mut dead = txn.open_table(DEAD)?;
                for id in ids {
                    dead.remove(*id)?;
                }
            }
            txn.commit()?;
            Ok(())
        })();
        drop(db);
        if result.is_err() {
            self.close();
        }
        result
    }

    /// What an earlier version left in the file.
    pub fn legacy(&self) -> Result<Legacy, redb::Error> {
        let Some(db) = self.db() else {
            return Ok(Legacy::default());
        };
        let txn = db.begin_read()?;
        let mut out = Legacy::default();
        match txn.open_table(LEGACY_EVENTS) {
            Ok(t) => {
                for e in t.iter()? {
                    out.events.push(e?.1.value().to_vec());
                }
            }
            Err(TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        match txn.open_table(LEGACY_IDS) {
            Ok(t) => {
                for e in t.iter()? {
                    let (k, v) = e?;
                    out.ids.push((k.value().to_owned(), v.value()));
                }
            }
            Err(TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(out)
    }

    /// Drops the earlier version's tables (their content moved).
    pub fn drop_legacy(&self) -> Result<(), redb::Error> {
        let Some(db) = self.db() else {
            return Ok(());
        };
        let txn = db.begin_write()?;
        txn.delete_table(LEGACY_EVENTS)?;
        txn.delete_table(LEGACY_IDS)?;
        txn.commit()?;
        Ok(())
    }

    /// Dead letters in id order, at most `limit`.
    pub fn list_dead(db: &Database, limit: usize) -> Result<Vec<DeadLetter>, redb::Error> {
        let txn = db.begin_read()?;
        let table = txn.open_table(DEAD)?;
        let mut out = Vec::new();
        for entry in table.iter()?.take(limit) {
            let (_, v) = entry?;
            if let Ok(dl) = serde_json::from_slice(v.value()) {
                out.push(dl);
            }
        }
        Ok(out)
    }

    /// Closes the file for good (shutdown).
    pub fn shutdown(&self) {
        self.close();
    }

    #[cfg(test)]
    pub fn write_legacy(path: &Path, events: &[(u64, Vec<u8>)], ids: &[(&str, u64)]) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut e = txn.open_table(LEGACY_EVENTS).unwrap();
            for (k, v) in events {
                e.insert(*k, v.as_slice()).unwrap();
            }
            let mut i = txn.open_table(LEGACY_IDS).unwrap();
            for (k, v) in ids {
                i.insert(*k, *v).unwrap();
            }
        }
        txn.commit().unwrap();
    }
}
