//! Durability: an append-only log of committed batches (each fsynced before
//! the write is acknowledged) plus a snapshot written by rename, which lets
//! the log be truncated.
//!
//! Files in the data directory:
//! - `kv.snapshot`: one frame holding the whole state at some index;
//! - `kv.log`: frames of batches with higher indexes;
//! - `LOCK`: held with `flock` so two servers never share a directory.
//!
//! A frame is `[payload length: u32 LE][crc32 of payload: u32 LE][payload]`,
//! the payload JSON. Only the log's last frame can be torn by a crash (it
//! was never acknowledged); replay drops it. A bad frame anywhere else is
//! damage, and opening fails rather than silently losing writes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::state::{KvState, Mutation, StoredEntry};

const LOG_FILE: &str = "kv.log";
const SNAPSHOT_FILE: &str = "kv.snapshot";
const SNAPSHOT_TEMP_FILE: &str = "kv.snapshot.tmp";
const LOCK_FILE: &str = "LOCK";
const FRAME_HEADER_LEN: usize = 8;

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("data directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("data directory {path} is in use by another server")]
    Locked { path: PathBuf },
    #[error("{path} is damaged at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A batch that could not be made durable.
#[derive(Debug)]
pub(crate) struct AppendFailure {
    pub error: io::Error,
    /// False when the partial frame could not be cut off either.
    pub log_intact: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct CommitRecord {
    index: u64,
    mutations: Vec<Mutation>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotRecord {
    index: u64,
    entries: Vec<(String, StoredEntry)>,
    tombstones: Vec<(String, u64)>,
}

/// The open log of a data directory.
pub(crate) struct Persistence {
    dir: PathBuf,
    log: File,
    log_len: u64,
    compact_after_bytes: u64,
    _lock: Flock<File>,
}

impl std::fmt::Debug for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persistence")
            .field("dir", &self.dir)
            .field("log_len", &self.log_len)
            .finish_non_exhaustive()
    }
}

fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a frame is below 4 GiB: values are capped");
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

enum FrameRead<'a> {
    Complete {
        payload: &'a [u8],
        end: usize,
    },
    /// Fewer bytes than the header announces, or a checksum mismatch.
    Bad(&'static str),
    End,
}

fn read_frame(data: &[u8], at: usize) -> FrameRead<'_> {
    let rest = &data[at..];
    if rest.is_empty() {
        return FrameRead::End;
    }
    if rest.len() < FRAME_HEADER_LEN {
        return FrameRead::Bad("truncated frame header");
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if len == 0 {
        // Never written: zeros left by a crash that extended the file.
        return FrameRead::Bad("empty frame");
    }
    let Some(payload) = rest.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
        return FrameRead::Bad("truncated frame");
    };
    if crc32fast::hash(payload) != crc {
        return FrameRead::Bad("checksum mismatch");
    }
    FrameRead::Complete {
        payload,
        end: at + FRAME_HEADER_LEN + len,
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Persistence {
    /// Opens (creating if needed) `dir`, and rebuilds the state from the
    /// snapshot and the log.
    pub fn open(dir: &Path, compact_after_bytes: u64) -> Result<(Self, KvState), PersistError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            PersistError::Locked {
                path: dir.to_owned(),
            }
        })?;

        let mut state = load_snapshot(&dir.join(SNAPSHOT_FILE))?;
        let log_path = dir.join(LOG_FILE);
        let mut log = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(io_error(&log_path))?;
        let log_len = replay_log(&log_path, &mut log, &mut state)?;
        // The log file's existence must survive a crash too.
        sync_dir(dir).map_err(io_error(dir))?;
        Ok((
            Persistence {
                dir: dir.to_owned(),
                log,
                log_len,
                compact_after_bytes,
                _lock: lock,
            },
            state,
        ))
    }

    /// Makes one committed batch durable. On failure the log is cut back to
    /// its previous length so that later appends stay readable.
    pub fn append(&mut self, index: u64, mutations: &[Mutation]) -> Result<(), AppendFailure> {
        let payload = serde_json::to_vec(&CommitRecord {
            index,
            mutations: mutations.to_vec(),
        })
        .map_err(|e| AppendFailure {
            error: io::Error::other(e),
            log_intact: true,
        })?;
        let frame = encode_frame(&payload);
        let written = self
            .log
            .write_all(&frame)
            .and_then(|()| self.log.sync_data());
        if let Err(error) = written {
            let repaired = self
                .log
                .set_len(self.log_len)
                .and_then(|()| self.log.sync_data());
            return Err(AppendFailure {
                error,
                log_intact: repaired.is_ok(),
            });
        }
        self.log_len += frame.len() as u64;
        Ok(())
    }

    /// Replaces the log by a snapshot once the log has grown past the
    /// threshold.
    pub fn maybe_compact(&mut self, state: &KvState) -> io::Result<()> {
        if self.log_len < self.compact_after_bytes {
            return Ok(());
        }
        let record = SnapshotRecord {
            index: state.last_index,
            entries: state
                .entries
                .iter()
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect(),
            tombstones: state
                .tombstones
                .iter()
                .map(|(k, i)| (k.clone(), *i))
                .collect(),
        };
        let payload = serde_json::to_vec(&record).map_err(io::Error::other)?;
        let temp_path = self.dir.join(SNAPSHOT_TEMP_FILE);
        let mut temp = File::create(&temp_path)?;
        temp.write_all(&encode_frame(&payload))?;
        temp.sync_all()?;
        drop(temp);
        fs::rename(&temp_path, self.dir.join(SNAPSHOT_FILE))?;
        sync_dir(&self.dir)?;
        // Records up to the snapshot's index are skipped on replay, so a
        // crash before this truncation loses nothing.
        self.log.set_len(0)?;
        self.log_len = 0;
        self.log.sync_all()?;
        tracing::debug!(index = state.last_index, "kv log compacted into a snapshot");
        Ok(())
    }
}

fn load_snapshot(path: &Path) -> Result<KvState, PersistError> {
    let data = match fs::read(path) {
        Ok(data) => data,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(KvState::default()),
        Err(e) => return Err(io_error(path)(e)),
    };
    let corrupt = |reason: String| PersistError::Corrupt {
        path: path.to_owned(),
        offset: 0,
        reason,
    };
    let payload = match read_frame(&data, 0) {
        FrameRead::Complete { payload, end } if end == data.len() => payload,
        FrameRead::Complete { .. } => return Err(corrupt("trailing bytes".into())),
        FrameRead::Bad(reason) => return Err(corrupt(reason.into())),
        FrameRead::End => return Err(corrupt("empty snapshot".into())),
    };
    let record: SnapshotRecord =
        serde_json::from_slice(payload).map_err(|e| corrupt(e.to_string()))?;
    Ok(KvState {
        entries: record.entries.into_iter().collect(),
        tombstones: record.tombstones.into_iter().collect(),
        last_index: record.index,
    })
}

/// Applies the log's records above the snapshot's index; returns the length
/// of the valid log (a torn last frame is cut off).
fn replay_log(path: &Path, log: &mut File, state: &mut KvState) -> Result<u64, PersistError> {
    let mut data = Vec::new();
    log.seek(SeekFrom::Start(0)).map_err(io_error(path))?;
    log.read_to_end(&mut data).map_err(io_error(path))?;
    let mut at = 0usize;
    loop {
        match read_frame(&data, at) {
            FrameRead::End => break,
            FrameRead::Complete { payload, end } => {
                let record: CommitRecord =
                    serde_json::from_slice(payload).map_err(|e| PersistError::Corrupt {
                        path: path.to_owned(),
                        offset: at as u64,
                        reason: e.to_string(),
                    })?;
                if record.index > state.last_index {
                    state.apply(record.index, &record.mutations);
                }
                at = end;
            }
            FrameRead::Bad(reason) => {
                if !is_torn_tail(&data, at) {
                    return Err(PersistError::Corrupt {
                        path: path.to_owned(),
                        offset: at as u64,
                        reason: reason.into(),
                    });
                }
                tracing::warn!(
                    dropped_bytes = data.len() - at,
                    "dropping the torn, unacknowledged last record of the kv log"
                );
                log.set_len(at as u64).map_err(io_error(path))?;
                log.sync_all().map_err(io_error(path))?;
                break;
            }
        }
    }
    Ok(at as u64)
}

/// A bad frame is a torn write only if nothing follows where it claims to
/// end, or all that follows is zeros (a crash can only cut the last,
/// unacknowledged append).
fn is_torn_tail(data: &[u8], at: usize) -> bool {
    let rest = &data[at..];
    if rest.len() < FRAME_HEADER_LEN || rest.iter().all(|b| *b == 0) {
        return true;
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    rest.len() <= FRAME_HEADER_LEN + len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::evaluate;
    use consul_kv::types::TxnOp;

    fn write(p: &mut Persistence, state: &mut KvState, key: &str, value: &str) {
        let index = state.last_index.max(1) + 1;
        let eval = evaluate(
            state,
            index,
            &[Ok(TxnOp::Set {
                key: key.into(),
                value: value.as_bytes().to_vec(),
                flags: 0,
            })],
        );
        p.append(index, &eval.mutations).unwrap();
        state.apply(index, &eval.mutations);
        p.maybe_compact(state).unwrap();
    }

    #[test]
    fn replays_log_and_drops_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let expected = {
            let (mut p, mut state) = Persistence::open(dir.path(), u64::MAX).unwrap();
            write(&mut p, &mut state, "a", "1");
            write(&mut p, &mut state, "b", "2");
            state
        };
        // A crash in the middle of a third append.
        let mut log = OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG_FILE))
            .unwrap();
        log.write_all(&encode_frame(b"{\"index\":3,\"mutations\":[]}")[..10])
            .unwrap();
        drop(log);
        let (_p, state) = Persistence::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(state, expected);
    }

    #[test]
    fn damage_before_the_tail_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut p, mut state) = Persistence::open(dir.path(), u64::MAX).unwrap();
            write(&mut p, &mut state, "a", "1");
            write(&mut p, &mut state, "b", "2");
        }
        let path = dir.path().join(LOG_FILE);
        let mut data = fs::read(&path).unwrap();
        data[FRAME_HEADER_LEN + 2] ^= 0xff;
        fs::write(&path, data).unwrap();
        assert!(matches!(
            Persistence::open(dir.path(), u64::MAX),
            Err(PersistError::Corrupt { .. })
        ));
    }

    #[test]
    fn compaction_keeps_state_and_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let expected = {
            let (mut p, mut state) = Persistence::open(dir.path(), 1).unwrap();
            write(&mut p, &mut state, "a", "1");
            write(&mut p, &mut state, "b", "2");
            let index = state.last_index.max(1) + 1;
            let eval = evaluate(&state, index, &[Ok(TxnOp::Delete { key: "a".into() })]);
            p.append(index, &eval.mutations).unwrap();
            state.apply(index, &eval.mutations);
            p.maybe_compact(&state).unwrap();
            assert_eq!(p.log_len, 0);
            state
        };
        let (_p, state) = Persistence::open(dir.path(), 1).unwrap();
        assert_eq!(state, expected);
        assert_eq!(state.tombstones.get("a"), Some(&4));
    }

    #[test]
    fn second_server_on_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Persistence::open(dir.path(), u64::MAX).unwrap();
        assert!(matches!(
            Persistence::open(dir.path(), u64::MAX),
            Err(PersistError::Locked { .. })
        ));
    }
}
