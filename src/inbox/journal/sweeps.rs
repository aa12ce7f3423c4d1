//! Sweeps kept in the journal, so that one survives a restart: each
//! sweep's record (opaque bytes the sweep module writes), its deny list
//! while it runs, and the counter that makes sweep ids unique for the life
//! of the journal. Written in their own transactions, apart from the event
//! writer: a sweep saves a few times per pass, not per event.

use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::{Journal, JournalError};

/// sweep id -> the sweep's record.
const SWEEPS: TableDefinition<u64, &[u8]> = TableDefinition::new("sweeps");
/// sweep id -> its deny list, while the sweep runs.
const SWEEP_DENY: TableDefinition<u64, &[u8]> = TableDefinition::new("sweep_deny");
/// "next_id" -> the next sweep id.
const SWEEP_META: TableDefinition<&str, u64> = TableDefinition::new("sweep_meta");

impl Journal {
    async fn sweep_txn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, JournalError> + Send + 'static,
    ) -> Result<T, JournalError> {
        let db = self.db()?;
        tokio::task::spawn_blocking(move || {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)
                .map_err(|e| JournalError::Storage(e.to_string()))?;
            let out = f(&txn)?;
            txn.commit()?;
            Ok(out)
        })
        .await
        .map_err(|e| JournalError::Storage(e.to_string()))?
    }

    /// Allocates a sweep id and stores the sweep's first record (made by
    /// `record` from the id) and its deny list, durably.
    pub async fn sweep_create(
        &self,
        record: impl FnOnce(u64) -> Vec<u8> + Send + 'static,
        deny: Vec<u8>,
    ) -> Result<u64, JournalError> {
        self.sweep_txn(move |txn| {
            let mut meta = txn.open_table(SWEEP_META)?;
            let id = meta.get("next_id")?.map_or(1, |v| v.value());
            meta.insert("next_id", id + 1)?;
            txn.open_table(SWEEPS)?.insert(id, record(id).as_slice())?;
            txn.open_table(SWEEP_DENY)?.insert(id, deny.as_slice())?;
            Ok(id)
        })
        .await
    }

    /// Replaces a sweep's record; `finished` also drops its deny list.
    pub async fn sweep_save(
        &self,
        id: u64,
        record: Vec<u8>,
        finished: bool,
    ) -> Result<(), JournalError> {
        self.sweep_txn(move |txn| {
            txn.open_table(SWEEPS)?.insert(id, record.as_slice())?;
            if finished {
                txn.open_table(SWEEP_DENY)?.remove(id)?;
            }
            Ok(())
        })
        .await
    }

    /// Forgets sweeps (old finished ones) altogether.
    pub async fn sweep_forget(&self, ids: Vec<u64>) -> Result<(), JournalError> {
        self.sweep_txn(move |txn| {
            let mut sweeps = txn.open_table(SWEEPS)?;
            let mut deny = txn.open_table(SWEEP_DENY)?;
            for id in ids {
                sweeps.remove(id)?;
                deny.remove(id)?;
            }
            Ok(())
        })
        .await
    }

    /// Every stored sweep record, in id order, with the deny list of those
    /// that still have one.
    pub async fn sweeps(&self) -> Result<Vec<(u64, Vec<u8>, Option<Vec<u8>>)>, JournalError> {
        let db = self.db()?;
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read()?;
            let sweeps = match txn.open_table(SWEEPS) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let deny = match txn.open_table(SWEEP_DENY) {
                Ok(t) => Some(t),
                Err(TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for entry in sweeps.iter()? {
                let (k, v) = entry?;
                let id = k.value();
                let list = match &deny {
                    Some(t) => t.get(id)?.map(|d| d.value().to_vec()),
                    None => None,
                };
                out.push((id, v.value().to_vec(), list));
            }
            Ok(out)
        })
        .await
        .map_err(|e| JournalError::Storage(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sweeps_and_their_ids_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            assert!(j.sweeps().await.unwrap().is_empty(), "no table yet");
            let a = j
                .sweep_create(|id| format!("rec-{id}").into_bytes(), b"deny-a".to_vec())
                .await
                .unwrap();
            let b = j
                .sweep_create(|id| format!("rec-{id}").into_bytes(), b"deny-b".to_vec())
                .await
                .unwrap();
            assert_eq!((a, b), (1, 2));
            j.sweep_save(a, b"done-1".to_vec(), true).await.unwrap();
            j.sweep_forget(vec![b]).await.unwrap();
            j.shutdown().await;
        }
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.sweeps().await.unwrap(), [(1, b"done-1".to_vec(), None)]);
        // Forgotten or not, an id is never handed out again.
        let c = j
            .sweep_create(|id| format!("rec-{id}").into_bytes(), Vec::new())
            .await
            .unwrap();
        assert_eq!(c, 3);
        assert_eq!(
            j.sweeps().await.unwrap()[1],
            (3, b"rec-3".to_vec(), Some(Vec::new()))
        );
    }
}
