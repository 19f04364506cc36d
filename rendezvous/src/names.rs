//! Name → key bindings kept across restarts, in an embedded database (redb) in the state
//! directory. Only what must survive is stored: each name, its key, and when its peer was
//! last seen (Unix seconds), so that a restarted server still knows who owns what and
//! still expires names that stay offline too long. Everything live (who is online, where)
//! is rebuilt when peers register again.
//!
//! The registry decides; this only records. The shell hands it [`Change`]s and it writes
//! them in batches, one transaction each, off the async threads.

use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::JoinHandle;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use wire::signal::PublicKey;

/// name → 32-byte key followed by last-seen Unix seconds (8 bytes, big-endian).
const NAMES: TableDefinition<&str, &[u8]> = TableDefinition::new("names");

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[error("name store: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// One binding as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The name.
    pub name: String,
    /// Its owner.
    pub key: PublicKey,
    /// When its peer was last seen, Unix seconds.
    pub last_seen: u64,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A binding made, or its peer seen (written whole).
    Put(Binding),
    /// A name forgotten or released.
    Delete(String),
}

/// The database.
#[derive(Debug)]
pub struct NameStore {
    db: Database,
}

impl NameStore {
    /// Opens (or makes) the database at `path`.
    pub fn open(path: &Path) -> Result<NameStore, StoreError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError(
                "in use by another process: is another rendezvous running with this state \
                 directory? give each its own --state"
                    .into(),
            ),
            e => err(e),
        })?;
        // Make the table exist, so that a fresh store reads as empty.
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(NAMES).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(NameStore { db })
    }

    /// Every binding stored. Unreadable rows are skipped (and counted in the result).
    pub fn load(&self) -> Result<(Vec<Binding>, usize), StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(NAMES).map_err(err)?;
        let mut out = Vec::new();
        let mut bad = 0;
        for row in table.iter().map_err(err)? {
            let (name, value) = row.map_err(err)?;
            let v = value.value();
            if v.len() != 40 {
                bad += 1;
                continue;
            }
            let mut key = [0u8; 32];
            key.copy_from_slice(&v[..32]);
            let mut seen = [0u8; 8];
            seen.copy_from_slice(&v[32..]);
            out.push(Binding {
                name: name.value().to_owned(),
                key: PublicKey(key),
                last_seen: u64::from_be_bytes(seen),
            });
        }
        Ok((out, bad))
    }

    /// Applies `changes` in one transaction (durable when it returns).
    pub fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut table = txn.open_table(NAMES).map_err(err)?;
            for c in changes {
                match c {
                    Change::Put(b) => {
                        let mut v = [0u8; 40];
                        v[..32].copy_from_slice(&b.key.0);
                        v[32..].copy_from_slice(&b.last_seen.to_be_bytes());
                        table.insert(b.name.as_str(), &v[..]).map_err(err)?;
                    }
                    Change::Delete(name) => {
                        table.remove(name.as_str()).map_err(err)?;
                    }
                }
            }
        }
        txn.commit().map_err(err)
    }
}

/// Writes changes on a thread of its own, a batch per transaction, so that a slow disk
/// never holds up signaling. Changes recorded before [`Writer::close`] are all written.
#[derive(Debug)]
pub struct Writer {
    tx: Mutex<Option<mpsc::Sender<Change>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    /// Starts writing into `store`.
    pub fn start(store: NameStore) -> Writer {
        let (tx, rx) = mpsc::channel::<Change>();
        let thread = std::thread::Builder::new()
            .name("names".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < 10_000 {
                        match rx.try_recv() {
                            Ok(c) => batch.push(c),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = store.apply(&batch) {
                        tracing::error!(error = %e, changes = batch.len(), "could not save name bindings");
                    }
                }
            })
            .ok();
        Writer {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(thread),
        }
    }

    /// Queues `change`.
    pub fn record(&self, change: Change) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(change);
        }
    }

    /// Writes what is queued and stops (blocking: call it off the async threads).
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_survive_reopening() {
        let dir = std::env::temp_dir().join(format!(
            "chuantou-names-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("names.redb");
        let b = |name: &str, k: u8, t: u64| Binding {
            name: name.into(),
            key: PublicKey([k; 32]),
            last_seen: t,
        };
        {
            let store = NameStore::open(&path).unwrap();
            assert_eq!(store.load().unwrap(), (vec![], 0));
            store
                .apply(&[
                    Change::Put(b("pc-home", 1, 100)),
                    Change::Put(b("laptop", 2, 200)),
                    Change::Put(b("pc-home", 1, 300)),
                ])
                .unwrap();
            store.apply(&[Change::Delete("laptop".into())]).unwrap();
        }
        let store = NameStore::open(&path).unwrap();
        assert_eq!(store.load().unwrap(), (vec![b("pc-home", 1, 300)], 0));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
