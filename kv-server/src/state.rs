//! The KV table, its tombstones, and transaction evaluation with Consul's
//! semantics (`agent/consul/state/kvs.go`, `state/txn.go`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use consul_kv::types::{base64_value, KvPair, TxnOp, TxnOpError, TxnResult};

/// A stored value and its indexes (the key is the map key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredEntry {
    #[serde(with = "base64_value", default)]
    pub value: Vec<u8>,
    pub flags: u64,
    pub lock_index: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

impl StoredEntry {
    /// What Consul's `DirEntry.Equal` compares: everything but the indexes.
    fn same_content(&self, other: &StoredEntry) -> bool {
        self.value == other.value
            && self.flags == other.flags
            && self.lock_index == other.lock_index
    }

    fn to_pair(&self, key: &str, with_value: bool) -> KvPair {
        KvPair {
            lock_index: self.lock_index,
            key: key.to_owned(),
            flags: self.flags,
            value: if with_value {
                self.value.clone()
            } else {
                Vec::new()
            },
            session: None,
            create_index: self.create_index,
            modify_index: self.modify_index,
        }
    }
}

/// One committed change; a batch of these shares one index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Mutation {
    Put { key: String, entry: StoredEntry },
    Delete { key: String },
}

/// Tombstones kept by default; past it the oldest half is reaped.
pub const DEFAULT_MAX_TOMBSTONES: usize = 1024;

/// The whole KV state at one index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KvState {
    pub entries: BTreeMap<String, StoredEntry>,
    /// Index of the delete that removed each key, so that prefix answers
    /// never lose the index of a delete. A tombstone is dropped when its key
    /// is written again (the new entry's index is higher), or reaped when
    /// there are more than `tombstone_limit`.
    pub tombstones: BTreeMap<String, u64>,
    /// Highest index of any reaped tombstone. Every prefix answer is at
    /// least this, so reaping never makes an answer's index go backwards
    /// (a watcher may wake once for nothing instead). Persisted.
    pub reaped_floor: u64,
    /// Index of the last committed change (the table's index).
    pub last_index: u64,
    /// Most tombstones kept (configuration, not persisted).
    pub tombstone_limit: usize,
}

impl Default for KvState {
    fn default() -> Self {
        KvState {
            entries: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            reaped_floor: 0,
            last_index: 0,
            tombstone_limit: DEFAULT_MAX_TOMBSTONES,
        }
    }
}

/// Consul never answers index 0: a client would not block on it.
fn at_least_one(index: u64) -> u64 {
    index.max(1)
}

fn with_prefix<'a, V>(
    map: &'a BTreeMap<String, V>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a V)> + 'a {
    map.range::<str, _>((
        std::ops::Bound::Included(prefix),
        std::ops::Bound::Unbounded,
    ))
    .take_while(move |(key, _)| key.starts_with(prefix))
}

impl KvState {
    /// Highest index among entries and tombstones under `prefix`, else the
    /// table's index; never below the reaped floor.
    fn prefix_index(&self, prefix: &str) -> u64 {
        let entries = with_prefix(&self.entries, prefix).map(|(_, e)| e.modify_index);
        let tombstones = with_prefix(&self.tombstones, prefix).map(|(_, index)| *index);
        let found = entries.chain(tombstones).max().unwrap_or(0);
        let index = if found == 0 { self.last_index } else { found };
        at_least_one(index.max(self.reaped_floor))
    }

    /// A single key and the answer's index: the key's `ModifyIndex`, else
    /// its tombstone's index, else the table's index.
    pub fn get(&self, key: &str) -> (Option<KvPair>, u64) {
        match self.entries.get(key) {
            Some(entry) => (
                Some(entry.to_pair(key, true)),
                at_least_one(entry.modify_index),
            ),
            None => {
                let index = self.tombstones.get(key).copied().unwrap_or(self.last_index);
                (None, at_least_one(index))
            }
        }
    }

    /// Every entry whose key starts with `prefix` (plain string prefix).
    pub fn list(&self, prefix: &str) -> (Vec<KvPair>, u64) {
        let pairs = with_prefix(&self.entries, prefix)
            .map(|(key, entry)| entry.to_pair(key, true))
            .collect();
        (pairs, self.prefix_index(prefix))
    }

    /// Key names under `prefix`, cut after the first `separator` that
    /// follows the prefix (deduplicated), as Consul's `?keys&separator=`.
    pub fn keys(&self, prefix: &str, separator: &str) -> (Vec<String>, u64) {
        let mut keys: Vec<String> = Vec::new();
        for (key, _) in with_prefix(&self.entries, prefix) {
            let name = if separator.is_empty() {
                key.as_str()
            } else {
                match key[prefix.len()..].find(separator) {
                    Some(at) => &key[..prefix.len() + at + separator.len()],
                    None => key.as_str(),
                }
            };
            // Keys come sorted, so duplicates from one folder are adjacent.
            if keys.last().map(String::as_str) != Some(name) {
                keys.push(name.to_owned());
            }
        }
        (keys, self.prefix_index(prefix))
    }

    /// Applies a committed batch.
    pub fn apply(&mut self, index: u64, mutations: &[Mutation]) {
        for mutation in mutations {
            match mutation {
                Mutation::Put { key, entry } => {
                    self.tombstones.remove(key);
                    self.entries.insert(key.clone(), entry.clone());
                }
                Mutation::Delete { key } => {
                    if self.entries.remove(key).is_some() {
                        self.tombstones.insert(key.clone(), index);
                    }
                }
            }
        }
        self.last_index = self.last_index.max(index);
        self.reap_tombstones();
    }

    /// Past the limit, drops the oldest tombstones down to half of it (so
    /// reaping is rare) and raises the floor to the newest one dropped.
    pub fn reap_tombstones(&mut self) {
        if self.tombstones.len() <= self.tombstone_limit {
            return;
        }
        let keep = self.tombstone_limit / 2;
        let mut by_age: Vec<(u64, String)> = std::mem::take(&mut self.tombstones)
            .into_iter()
            .map(|(key, index)| (index, key))
            .collect();
        by_age.sort_unstable();
        // At least one: there are more than the limit, and keep is below it.
        let reaped = by_age.len() - keep;
        self.reaped_floor = self.reaped_floor.max(by_age[reaped - 1].0);
        self.tombstones = by_age
            .into_iter()
            .skip(reaped)
            .map(|(index, key)| (key, index))
            .collect();
        tracing::debug!(reaped, floor = self.reaped_floor, "reaped kv tombstones");
    }
}

/// A transaction operation as the server received it: either one it can
/// run, or the reason it cannot (reported as that operation's error).
pub(crate) type ReceivedOp = Result<TxnOp, String>;

/// What evaluating a transaction produced.
#[derive(Debug, Default)]
pub(crate) struct Evaluation {
    pub results: Vec<TxnResult>,
    pub errors: Vec<TxnOpError>,
    pub mutations: Vec<Mutation>,
}

/// The state as seen inside one transaction: earlier operations' writes
/// (`Some`) and deletes (`None`) over the committed table.
struct TxnView<'a> {
    base: &'a KvState,
    overlay: BTreeMap<String, Option<StoredEntry>>,
}

impl TxnView<'_> {
    fn get(&self, key: &str) -> Option<&StoredEntry> {
        match self.overlay.get(key) {
            Some(staged) => staged.as_ref(),
            None => self.base.entries.get(key),
        }
    }

    fn list(&self, prefix: &str) -> Vec<(String, StoredEntry)> {
        let mut merged: BTreeMap<String, Option<StoredEntry>> =
            with_prefix(&self.base.entries, prefix)
                .map(|(k, e)| (k.clone(), Some(e.clone())))
                .collect();
        for (key, staged) in with_prefix(&self.overlay, prefix) {
            merged.insert(key.clone(), staged.clone());
        }
        merged
            .into_iter()
            .filter_map(|(k, e)| e.map(|e| (k, e)))
            .collect()
    }

    fn set(&mut self, index: u64, key: &str, value: &[u8], flags: u64) -> StoredEntry {
        let existing = self.get(key).cloned();
        let mut entry = StoredEntry {
            value: value.to_vec(),
            flags,
            lock_index: 0,
            create_index: existing.as_ref().map_or(index, |e| e.create_index),
            modify_index: index,
        };
        if let Some(existing) = existing {
            if existing.same_content(&entry) {
                // An identical write changes nothing and wakes nobody.
                entry.modify_index = existing.modify_index;
                return entry;
            }
        }
        self.overlay.insert(key.to_owned(), Some(entry.clone()));
        entry
    }

    fn delete(&mut self, key: &str) {
        if self.get(key).is_some() {
            self.overlay.insert(key.to_owned(), None);
        }
    }

    fn delete_tree(&mut self, prefix: &str) {
        for (key, _) in self.list(prefix) {
            self.overlay.insert(key, None);
        }
    }

    /// The net changes against the committed table.
    fn into_mutations(self) -> Vec<Mutation> {
        let base = self.base;
        self.overlay
            .into_iter()
            .filter_map(|(key, staged)| match staged {
                Some(entry) => Some(Mutation::Put { key, entry }),
                None if base.entries.contains_key(&key) => Some(Mutation::Delete { key }),
                None => None,
            })
            .collect()
    }
}

/// Go's `%q` for the ASCII keys Consul sees in practice.
fn quoted(text: &str) -> String {
    format!("{text:?}")
}

/// Runs `ops` against `state` as one transaction at `index`, in order,
/// later operations seeing earlier ones. Every failing operation is
/// reported; the caller must write nothing when any failed.
pub(crate) fn evaluate(state: &KvState, index: u64, ops: &[ReceivedOp]) -> Evaluation {
    let mut view = TxnView {
        base: state,
        overlay: BTreeMap::new(),
    };
    let mut out = Evaluation::default();
    for (op_index, op) in ops.iter().enumerate() {
        match run_op(&mut view, index, op) {
            Ok(results) => out.results.extend(results),
            Err(what) => out.errors.push(TxnOpError { op_index, what }),
        }
    }
    if out.errors.is_empty() {
        out.mutations = view.into_mutations();
    } else {
        out.results.clear();
    }
    out
}

fn run_op(view: &mut TxnView<'_>, index: u64, op: &ReceivedOp) -> Result<Vec<TxnResult>, String> {
    let op = op.as_ref().map_err(Clone::clone)?;
    let key = op.key();
    if key.is_empty() && !matches!(op, TxnOp::DeleteTree { .. }) {
        return Err("Must provide key".to_owned());
    }
    let without_value = |entry: &StoredEntry| TxnResult {
        kv: entry.to_pair(key, false),
    };
    let result = match op {
        TxnOp::Set { value, flags, .. } => {
            Some(without_value(&view.set(index, key, value, *flags)))
        }
        TxnOp::Cas {
            value,
            flags,
            index: expected,
            ..
        } => {
            let current = view.get(key).map(|e| e.modify_index);
            let allowed = match (current, *expected) {
                (None, 0) => true,
                (Some(current), expected) => expected != 0 && current == expected,
                (None, _) => false,
            };
            if !allowed {
                return Err(format!("failed to set key {}, index is stale", quoted(key)));
            }
            Some(without_value(&view.set(index, key, value, *flags)))
        }
        TxnOp::Get { .. } => match view.get(key) {
            Some(entry) => Some(TxnResult {
                kv: entry.to_pair(key, true),
            }),
            None => return Err(format!("key {} doesn't exist", quoted(key))),
        },
        TxnOp::GetOrEmpty { .. } => Some(TxnResult {
            kv: match view.get(key) {
                Some(entry) => entry.to_pair(key, true),
                None => KvPair {
                    key: key.to_owned(),
                    ..KvPair::default()
                },
            },
        }),
        TxnOp::GetTree { prefix } => {
            return Ok(view
                .list(prefix)
                .iter()
                .map(|(k, e)| TxnResult {
                    kv: e.to_pair(k, true),
                })
                .collect());
        }
        TxnOp::CheckIndex {
            index: expected, ..
        } => match view.get(key) {
            None => {
                return Err(format!(
                    "failed to check index, key {} doesn't exist",
                    quoted(key)
                ))
            }
            Some(entry) if entry.modify_index != *expected => {
                return Err(format!(
                    "failed index check for key {}, current modify index {} != {}",
                    quoted(key),
                    entry.modify_index,
                    expected
                ))
            }
            Some(entry) => Some(without_value(entry)),
        },
        TxnOp::CheckNotExists { .. } => {
            if view.get(key).is_some() {
                return Err(format!("key {} exists", quoted(key)));
            }
            None
        }
        TxnOp::Delete { .. } => {
            view.delete(key);
            None
        }
        TxnOp::DeleteTree { prefix } => {
            view.delete_tree(prefix);
            None
        }
        TxnOp::DeleteCas {
            index: expected, ..
        } => {
            match view.get(key) {
                // Deleting a missing key succeeds, as in Consul.
                None => {}
                Some(entry) if entry.modify_index == *expected => view.delete(key),
                Some(_) => {
                    return Err(format!(
                        "failed to delete key {}, index is stale",
                        quoted(key)
                    ))
                }
            }
            None
        }
    };
    Ok(result.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(key: &str, value: &str) -> ReceivedOp {
        Ok(TxnOp::Set {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            flags: 0,
        })
    }

    fn commit(state: &mut KvState, ops: &[ReceivedOp]) -> Evaluation {
        let index = state.last_index.max(1) + 1;
        let eval = evaluate(state, index, ops);
        if eval.errors.is_empty() && !eval.mutations.is_empty() {
            state.apply(index, &eval.mutations);
        }
        eval
    }

    #[test]
    fn identical_set_changes_nothing() {
        let mut state = KvState::default();
        commit(&mut state, &[set("a", "1")]);
        let eval = commit(&mut state, &[set("a", "1")]);
        assert!(eval.mutations.is_empty());
        assert_eq!(eval.results[0].kv.modify_index, 2);
        assert_eq!(state.last_index, 2);
    }

    #[test]
    fn later_ops_see_earlier_ones() {
        let mut state = KvState::default();
        let eval = commit(
            &mut state,
            &[
                set("a", "1"),
                Ok(TxnOp::Get { key: "a".into() }),
                Ok(TxnOp::Delete { key: "a".into() }),
                Ok(TxnOp::CheckNotExists { key: "a".into() }),
            ],
        );
        assert!(eval.errors.is_empty(), "{:?}", eval.errors);
        assert_eq!(eval.results[1].kv.value, b"1");
        // Created and deleted in one transaction: no net change.
        assert!(eval.mutations.is_empty());
    }

    #[test]
    fn every_failure_is_listed_and_nothing_is_written() {
        let mut state = KvState::default();
        commit(&mut state, &[set("a", "1")]);
        let eval = commit(
            &mut state,
            &[
                set("b", "2"),
                Ok(TxnOp::CheckIndex {
                    key: "a".into(),
                    index: 99,
                }),
                Ok(TxnOp::Get { key: "zz".into() }),
            ],
        );
        let failing: Vec<usize> = eval.errors.iter().map(|e| e.op_index).collect();
        assert_eq!(failing, vec![1, 2]);
        assert!(eval.mutations.is_empty() && eval.results.is_empty());
        assert!(!state.entries.contains_key("b"));
        assert_eq!(
            eval.errors[0].what,
            "failed index check for key \"a\", current modify index 2 != 99"
        );
    }

    #[test]
    fn prefix_index_counts_tombstones() {
        let mut state = KvState::default();
        commit(&mut state, &[set("vol/1", "x"), set("vol/10", "y")]);
        commit(&mut state, &[set("other", "z")]);
        assert_eq!(state.list("vol/").1, 2);
        commit(
            &mut state,
            &[Ok(TxnOp::Delete {
                key: "vol/10".into(),
            })],
        );
        assert_eq!(state.list("vol/").1, 4);
        assert_eq!(state.get("vol/10").1, 4);
        // Nothing ever matched: the table's index.
        assert_eq!(state.list("nothing/").1, 4);
    }

    #[test]
    fn keys_with_separator() {
        let mut state = KvState::default();
        commit(
            &mut state,
            &[
                set("v/a/1", ""),
                set("v/a/2", ""),
                set("v/b", ""),
                set("w", ""),
            ],
        );
        assert_eq!(state.keys("v/", "/").0, vec!["v/a/", "v/b"]);
        assert_eq!(state.keys("v/", "").0, vec!["v/a/1", "v/a/2", "v/b"]);
    }

    #[test]
    fn five_thousand_deletes_leave_bounded_tombstones_and_indexes_never_go_back() {
        let mut state = KvState::default();
        commit(&mut state, &[set("keep/a", "x"), set("keep/b", "y")]);
        // An early delete under a prefix that keeps entries: reaping its
        // tombstone must not take the prefix's index back to keep/a's.
        commit(
            &mut state,
            &[Ok(TxnOp::Delete {
                key: "keep/b".into(),
            })],
        );
        let answers = |state: &KvState| {
            [
                state.list("vol/").1,
                state.list("vol/1").1,
                state.list("keep/").1,
                state.get("vol/0").1,
                state.keys("", "/").1,
            ]
        };
        let mut before = answers(&state);
        for i in 0..5000 {
            let key = format!("vol/{i}");
            commit(&mut state, &[set(&key, "v")]);
            commit(&mut state, &[Ok(TxnOp::Delete { key })]);
            let now = answers(&state);
            for (was, is) in before.iter().zip(&now) {
                assert!(
                    is >= was,
                    "an index went backwards after delete {i}: {before:?} -> {now:?}"
                );
            }
            // Every delete still wakes a watcher of its prefix.
            assert_eq!(state.list("vol/").1, state.last_index);
            before = now;
        }
        assert!(
            state.tombstones.len() <= DEFAULT_MAX_TOMBSTONES,
            "{} tombstones kept",
            state.tombstones.len()
        );
        assert!(state.reaped_floor > 0);
    }

    #[test]
    fn empty_state_answers_index_one() {
        let state = KvState::default();
        assert_eq!(state.get("x").1, 1);
        assert_eq!(state.list("").1, 1);
    }
}
