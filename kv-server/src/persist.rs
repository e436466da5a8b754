//! Durability: an append-only log of committed batches (each fsynced before
//! the write is acknowledged) plus a snapshot written by rename, which lets
//! the log be truncated.
//!
//! Files in the data directory:
//! - `kv.snapshot`: one frame holding the whole state at some index;
//! - `kv.log`: frames of batches with higher indexes;
//! - `LOCK`: held with `flock` so two servers never share a directory.
//!
//! Both data files start with an 8-byte magic naming their format
//! (`VKVLOG2\n`, `VKVSNP2\n`). A frame is
//! `[payload length: u32 LE][crc32 of payload: u32 LE][crc32 of the first 8
//! header bytes: u32 LE][payload]`, the payload JSON: the checksums cover the
//! header and the payload, so a damaged length is detected, never taken for
//! a short write.
//!
//! Appends are sequential and each is fsynced before it is acknowledged, so
//! only the log's last frame can be torn by a crash, and it was never
//! acknowledged: replay drops it. Torn means the file ends inside the frame
//! (a header cut short, a payload cut short or ending at the end of the
//! file with a bad checksum, or a header followed only by the zeros a file
//! system leaves in an extended file). Any other bad frame is damage:
//! opening fails with the file and offset, and nothing is truncated.
//!
//! The directory is made 0700 and every file in it 0600.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::state::{KvState, Mutation, StoredEntry};

const LOG_FILE: &str = "kv.log";
const SNAPSHOT_FILE: &str = "kv.snapshot";
const SNAPSHOT_TEMP_FILE: &str = "kv.snapshot.tmp";
const LOCK_FILE: &str = "LOCK";
const LOG_MAGIC: &[u8; 8] = b"VKVLOG2\n";
const SNAPSHOT_MAGIC: &[u8; 8] = b"VKVSNP2\n";
const FRAME_HEADER_LEN: usize = 12;
/// Where the first frame of either file starts.
const FIRST_FRAME_AT: usize = LOG_MAGIC.len();
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

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
    #[error("{path} is damaged at byte {offset}: {reason}; nothing was changed, and the server will not start until it is repaired or restored")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{path} is not in this server's format ({expected:?}): it was written by an older volkv, which this pre-release version does not read; move the data directory away and start with an empty one")]
    UnknownFormat {
        path: PathBuf,
        expected: &'static str,
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
    /// See `KvState::reaped_floor`.
    #[serde(default)]
    reaped_floor: u64,
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
    let header_crc = crc32fast::hash(&frame[..8]);
    frame.extend_from_slice(&header_crc.to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

enum FrameRead<'a> {
    Complete {
        payload: &'a [u8],
        end: usize,
    },
    /// The file ends inside this frame: the unacknowledged last append.
    Torn(&'static str),
    /// A bad frame that a crash cannot explain.
    Damaged(&'static str),
    End,
}

fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().expect("4 bytes"))
}

fn read_frame(data: &[u8], at: usize) -> FrameRead<'_> {
    let rest = &data[at..];
    if rest.is_empty() {
        return FrameRead::End;
    }
    if rest.len() < FRAME_HEADER_LEN {
        return FrameRead::Torn("frame header cut short by the end of the file");
    }
    if crc32fast::hash(&rest[..8]) != le_u32(&rest[8..12]) {
        // A header written in part, the rest of the file zeros that the
        // file system left when the size grew first: a torn append.
        if rest[FRAME_HEADER_LEN..].iter().all(|b| *b == 0) {
            return FrameRead::Torn("frame header written in part");
        }
        return FrameRead::Damaged("frame header checksum mismatch");
    }
    let len = le_u32(&rest[0..4]) as usize;
    if len == 0 {
        return FrameRead::Damaged("empty frame");
    }
    let end = at + FRAME_HEADER_LEN + len;
    let Some(payload) = data.get(at + FRAME_HEADER_LEN..end) else {
        return FrameRead::Torn("frame cut short by the end of the file");
    };
    if crc32fast::hash(payload) != le_u32(&rest[4..8]) {
        if end == data.len() {
            return FrameRead::Torn("last frame's payload written in part");
        }
        return FrameRead::Damaged("payload checksum mismatch");
    }
    FrameRead::Complete { payload, end }
}

/// Creates or opens a file of the data directory, always mode 0600.
fn open_private(path: &Path, options: &mut OpenOptions) -> Result<File, PersistError> {
    let file = options.mode(FILE_MODE).open(path).map_err(io_error(path))?;
    // A file made by an older version, or by hand, may be wider.
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
        .map_err(io_error(path))?;
    Ok(file)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Persistence {
    /// Opens (creating if needed) `dir`, and rebuilds the state from the
    /// snapshot and the log.
    pub fn open(dir: &Path, compact_after_bytes: u64) -> Result<(Self, KvState), PersistError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(io_error(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(io_error(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = open_private(
            &lock_path,
            OpenOptions::new().create(true).truncate(false).write(true),
        )?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            PersistError::Locked {
                path: dir.to_owned(),
            }
        })?;

        let mut state = load_snapshot(&dir.join(SNAPSHOT_FILE))?;
        let log_path = dir.join(LOG_FILE);
        let mut log = open_private(
            &log_path,
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .append(true),
        )?;
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
            reaped_floor: state.reaped_floor,
        };
        let payload = serde_json::to_vec(&record).map_err(io::Error::other)?;
        let temp_path = self.dir.join(SNAPSHOT_TEMP_FILE);
        let mut temp = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(FILE_MODE)
            .open(&temp_path)?;
        temp.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
        let mut contents = SNAPSHOT_MAGIC.to_vec();
        contents.extend_from_slice(&encode_frame(&payload));
        temp.write_all(&contents)?;
        temp.sync_all()?;
        drop(temp);
        fs::rename(&temp_path, self.dir.join(SNAPSHOT_FILE))?;
        sync_dir(&self.dir)?;
        // Records up to the snapshot's index are skipped on replay, so a
        // crash before this truncation loses nothing.
        self.log.set_len(FIRST_FRAME_AT as u64)?;
        self.log_len = FIRST_FRAME_AT as u64;
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
    if !data.starts_with(SNAPSHOT_MAGIC) {
        return Err(PersistError::UnknownFormat {
            path: path.to_owned(),
            expected: "VKVSNP2",
        });
    }
    // A snapshot is complete before its rename: no frame of it may be torn.
    let payload = match read_frame(&data, FIRST_FRAME_AT) {
        FrameRead::Complete { payload, end } if end == data.len() => payload,
        FrameRead::Complete { .. } => return Err(corrupt("trailing bytes".into())),
        FrameRead::Torn(reason) | FrameRead::Damaged(reason) => return Err(corrupt(reason.into())),
        FrameRead::End => return Err(corrupt("empty snapshot".into())),
    };
    let record: SnapshotRecord =
        serde_json::from_slice(payload).map_err(|e| corrupt(e.to_string()))?;
    Ok(KvState {
        entries: record.entries.into_iter().collect(),
        tombstones: record.tombstones.into_iter().collect(),
        reaped_floor: record.reaped_floor,
        last_index: record.index,
        ..KvState::default()
    })
}

/// Applies the log's records above the snapshot's index; returns the length
/// of the valid log (a torn last frame is cut off; a new or empty log gets
/// its magic).
fn replay_log(path: &Path, log: &mut File, state: &mut KvState) -> Result<u64, PersistError> {
    let mut data = Vec::new();
    log.seek(SeekFrom::Start(0)).map_err(io_error(path))?;
    log.read_to_end(&mut data).map_err(io_error(path))?;
    if data.len() < LOG_MAGIC.len() && LOG_MAGIC.starts_with(&data) {
        // New, or a crash while its magic was written: nothing was ever
        // acknowledged from it.
        log.set_len(0).map_err(io_error(path))?;
        log.write_all(LOG_MAGIC).map_err(io_error(path))?;
        log.sync_all().map_err(io_error(path))?;
        return Ok(LOG_MAGIC.len() as u64);
    }
    if !data.starts_with(LOG_MAGIC) {
        return Err(PersistError::UnknownFormat {
            path: path.to_owned(),
            expected: "VKVLOG2",
        });
    }
    let mut at = FIRST_FRAME_AT;
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
            FrameRead::Damaged(reason) => {
                return Err(PersistError::Corrupt {
                    path: path.to_owned(),
                    offset: at as u64,
                    reason: reason.into(),
                });
            }
            FrameRead::Torn(reason) => {
                tracing::warn!(
                    offset = at,
                    dropped_bytes = data.len() - at,
                    reason,
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
        data[FIRST_FRAME_AT + FRAME_HEADER_LEN + 2] ^= 0xff;
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
            assert_eq!(p.log_len, FIRST_FRAME_AT as u64);
            state
        };
        let (_p, state) = Persistence::open(dir.path(), 1).unwrap();
        assert_eq!(state, expected);
        assert_eq!(state.tombstones.get("a"), Some(&4));
    }

    fn three_writes(dir: &Path) {
        let (mut p, mut state) = Persistence::open(dir, u64::MAX).unwrap();
        write(&mut p, &mut state, "a", "1");
        write(&mut p, &mut state, "b", "2");
        write(&mut p, &mut state, "c", "3");
    }

    #[test]
    fn a_damaged_length_before_the_tail_stops_startup_and_truncates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        three_writes(dir.path());
        let path = dir.path().join(LOG_FILE);
        let mut data = fs::read(&path).unwrap();
        // The first frame now claims to run past the end of the file, like
        // a torn tail would.
        data[FIRST_FRAME_AT..FIRST_FRAME_AT + 4].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
        fs::write(&path, &data).unwrap();
        let error = Persistence::open(dir.path(), u64::MAX).unwrap_err();
        match &error {
            PersistError::Corrupt {
                path: at, offset, ..
            } => {
                assert_eq!(at, &path);
                assert_eq!(*offset, FIRST_FRAME_AT as u64);
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let message = error.to_string();
        assert!(
            message.contains("kv.log") && message.contains(&format!("byte {FIRST_FRAME_AT}")),
            "{message}"
        );
        assert_eq!(fs::read(&path).unwrap(), data, "nothing was truncated");
    }

    #[test]
    fn a_damaged_payload_in_the_middle_stops_startup_and_truncates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        three_writes(dir.path());
        let path = dir.path().join(LOG_FILE);
        let mut data = fs::read(&path).unwrap();
        let len = data.len();
        // A byte in the middle of the second frame's payload.
        data[len / 2] ^= 0x55;
        fs::write(&path, &data).unwrap();
        assert!(matches!(
            Persistence::open(dir.path(), u64::MAX),
            Err(PersistError::Corrupt { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), data);
    }

    #[test]
    fn a_torn_header_followed_by_zeros_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        three_writes(dir.path());
        let path = dir.path().join(LOG_FILE);
        let intact = fs::read(&path).unwrap();
        let mut torn = intact.clone();
        // Half a header, then what the file system filled with zeros.
        torn.extend_from_slice(&[7, 0, 0]);
        torn.extend_from_slice(&[0; 40]);
        fs::write(&path, &torn).unwrap();
        let (_p, state) = Persistence::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(state.entries.len(), 3);
        assert_eq!(fs::read(&path).unwrap(), intact);
    }

    #[test]
    fn the_data_dir_and_its_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("kv");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        {
            let (mut p, mut state) = Persistence::open(&dir, 1).unwrap();
            write(&mut p, &mut state, "a", "1");
        }
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for name in [LOG_FILE, SNAPSHOT_FILE, LOCK_FILE] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
    }

    #[test]
    fn a_log_of_the_older_format_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        // Format 1: [len][crc of payload][payload], no magic.
        let payload = br#"{"index":2,"mutations":[]}"#;
        let mut old = (payload.len() as u32).to_le_bytes().to_vec();
        old.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        old.extend_from_slice(payload);
        fs::write(dir.path().join(LOG_FILE), &old).unwrap();
        let error = Persistence::open(dir.path(), u64::MAX).unwrap_err();
        assert!(
            matches!(error, PersistError::UnknownFormat { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("older volkv"), "{error}");
        assert_eq!(fs::read(dir.path().join(LOG_FILE)).unwrap(), old);
    }

    #[test]
    fn the_reaped_floor_survives_compaction_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let (mut p, mut state) = Persistence::open(dir.path(), 1).unwrap();
            state.tombstone_limit = 4;
            for i in 0..20 {
                let key = format!("vol/{i}");
                write(&mut p, &mut state, &key, "v");
                let index = state.last_index + 1;
                let eval = evaluate(&state, index, &[Ok(TxnOp::Delete { key })]);
                p.append(index, &eval.mutations).unwrap();
                state.apply(index, &eval.mutations);
                p.maybe_compact(&state).unwrap();
            }
            assert!(state.tombstones.len() <= 4 && state.reaped_floor > 0);
            write(&mut p, &mut state, "keep/a", "x");
            state
        };
        let (_p, after) = Persistence::open(dir.path(), 1).unwrap();
        assert_eq!(after.reaped_floor, before.reaped_floor);
        assert_eq!(after.list("vol/").1, before.list("vol/").1);
        assert_eq!(after.list("keep/").1, before.list("keep/").1);
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
