//! Progress and facts recorded as LV tags, so that they live and die with
//! the LV, change atomically with one `lvchange`, and need no state file.
//!
//! * `vmv1.step=lv|crypt|ready|deleting`: how far a create got, or that a
//!   delete began. Only `ready` volumes may hold data, so only they are
//!   never formatted or discarded.
//! * `vmv1.step=hydrating`: the volume arrives from another host (with
//!   `vmv1.migration=<id>`, [`crate::hydration::migration_tag`]): usable
//!   through its copying layer, its LV not complete until the copy is.
//! * `vmv1.enc=luks2|none`, `vmv1.name=<volume name>`: the spec.
//! * `vmv1.node=<base64url>`: a jail node this volume is exposed at
//!   (recorded before the node is made, removed after it is gone), so that
//!   delete finds every node even after a crash.
//! * `vmv1.key=kept`: set with `deleting` by a rollback whose key existed
//!   before the failed create (another host's, or an earlier call's), so
//!   that finishing the rollback after a crash keeps that key too.
//! * Snapshots (LVs named by a `SnapshotId`): `vmv1.origin=<volume id>`,
//!   the volume it was taken of, and `vmv1.taken=<unix seconds>`.
//! * A volume restored from a snapshot starts at `vmv1.step=restoring` and
//!   carries `vmv1.from=<volume id>` (whose LUKS2 header, key and
//!   filesystem it holds) until its header is adopted under its own id.

use crate::jail_path::JailPath;
use crate::names::{VolumeId, VolumeName, NAME_PREFIX};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// How far a volume got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Progress {
    /// LV made; nothing on it yet.
    LvCreated,
    /// LUKS2 header made; no filesystem yet.
    CryptFormatted,
    /// Filesystem made: the volume is usable and may hold data.
    Ready,
    /// LV made as a copy of a snapshot: it holds data (never formatted),
    /// but its header, filesystem check and growth are not done yet.
    Restoring,
    /// A delete began; only finishing it is allowed.
    Deleting,
    /// Copied from another host in the background: it holds data (never
    /// formatted) and is usable through its copying layer, but its LV is
    /// not complete until the copy is.
    Hydrating,
}

impl Progress {
    fn word(self) -> &'static str {
        match self {
            Progress::LvCreated => "lv",
            Progress::CryptFormatted => "crypt",
            Progress::Ready => "ready",
            Progress::Deleting => "deleting",
            Progress::Restoring => "restoring",
            Progress::Hydrating => "hydrating",
        }
    }

    const ALL: [Progress; 6] = [
        Progress::LvCreated,
        Progress::CryptFormatted,
        Progress::Ready,
        Progress::Deleting,
        Progress::Restoring,
        Progress::Hydrating,
    ];
}

/// Whether a volume is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encryption {
    Luks2,
    None,
}

impl Encryption {
    fn word(self) -> &'static str {
        match self {
            Encryption::Luks2 => "luks2",
            Encryption::None => "none",
        }
    }
}

fn tag(key: &str, value: &str) -> String {
    format!("{NAME_PREFIX}.{key}={value}")
}

fn value_of<'t>(tags: &'t BTreeSet<String>, key: &str) -> impl Iterator<Item = &'t str> {
    let prefix = format!("{NAME_PREFIX}.{key}=");
    tags.iter()
        .filter_map(move |t| t.strip_prefix(prefix.as_str()))
}

pub fn step_tag(progress: Progress) -> String {
    tag("step", progress.word())
}

/// Every step tag except `keep`'s, for removal in the same retag.
pub fn other_step_tags(keep: Progress) -> Vec<String> {
    Progress::ALL
        .iter()
        .filter(|s| **s != keep)
        .map(|s| step_tag(*s))
        .collect()
}

/// Marks a rollback that must keep the volume's key.
pub fn key_kept_tag() -> String {
    tag("key", "kept")
}

pub fn key_kept(tags: &BTreeSet<String>) -> bool {
    tags.contains(&key_kept_tag())
}

pub fn encryption_tag(encryption: Encryption) -> String {
    tag("enc", encryption.word())
}

pub fn name_tag(name: &VolumeName) -> String {
    tag("name", name.as_str())
}

/// On a snapshot: the volume it was taken of.
pub fn origin_tag(volume: &VolumeId) -> String {
    tag("origin", volume.as_str())
}

pub fn origin(tags: &BTreeSet<String>) -> Option<VolumeId> {
    value_of(tags, "origin").find_map(|v| VolumeId::new(v).ok())
}

/// On a snapshot: when it was taken, in seconds since the Unix epoch.
pub fn taken_tag(unix_seconds: u64) -> String {
    tag("taken", &unix_seconds.to_string())
}

pub fn taken(tags: &BTreeSet<String>) -> Option<u64> {
    value_of(tags, "taken").find_map(|v| v.parse().ok())
}

/// On a volume being restored: the volume whose header and filesystem its
/// data still carries.
pub fn restored_from_tag(volume: &VolumeId) -> String {
    tag("from", volume.as_str())
}

pub fn restored_from(tags: &BTreeSet<String>) -> Option<VolumeId> {
    value_of(tags, "from").find_map(|v| VolumeId::new(v).ok())
}

/// LVM tags hold at most 1024 bytes.
const MAX_TAG: usize = 1024;

/// The tag that records an exposure, or `None` if the path is too long to
/// record (refused: an unrecorded node could outlive its volume).
pub fn node_tag(jail: &JailPath) -> Option<String> {
    let mut raw = jail.root().as_os_str().as_bytes().to_vec();
    raw.push(0);
    raw.extend_from_slice(jail.relative().as_os_str().as_bytes());
    let tag = tag("node", &URL_SAFE_NO_PAD.encode(raw));
    (tag.len() <= MAX_TAG).then_some(tag)
}

/// The recorded progress; `None` without a step tag or with conflicting ones.
pub fn step(tags: &BTreeSet<String>) -> Option<Progress> {
    let mut found = value_of(tags, "step")
        .filter_map(|word| Progress::ALL.into_iter().find(|s| s.word() == word));
    let first = found.next()?;
    // Two step tags would mean a broken retag; "deleting" wins, else none.
    match found.next() {
        None => Some(first),
        Some(_) if tags.contains(&step_tag(Progress::Deleting)) => Some(Progress::Deleting),
        Some(_) => None,
    }
}

pub fn encryption(tags: &BTreeSet<String>) -> Option<Encryption> {
    match value_of(tags, "enc").next()? {
        "luks2" => Some(Encryption::Luks2),
        "none" => Some(Encryption::None),
        _ => None,
    }
}

pub fn name(tags: &BTreeSet<String>) -> Option<VolumeName> {
    value_of(tags, "name").find_map(|n| VolumeName::new(n).ok())
}

/// Every recorded exposure, with its tag (for removal).
pub fn nodes(tags: &BTreeSet<String>) -> Vec<(JailPath, String)> {
    value_of(tags, "node")
        .filter_map(|encoded| {
            let raw = URL_SAFE_NO_PAD.decode(encoded).ok()?;
            let split = raw.iter().position(|b| *b == 0)?;
            let root = PathBuf::from(OsStr::from_bytes(&raw[..split]));
            let relative = PathBuf::from(OsStr::from_bytes(&raw[split + 1..]));
            let jail = JailPath::new(root, relative).ok()?;
            Some((jail, tag("node", encoded)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::check_tag;

    #[test]
    fn tags_pass_the_backend_check_and_parse_back() {
        let jail = JailPath::new("/srv/jailer/fc/vm-1/root", "dev/vdb").unwrap();
        let node = node_tag(&jail).unwrap();
        let name = VolumeName::new("data-1").unwrap();
        let mut tags = BTreeSet::new();
        for t in [
            step_tag(Progress::CryptFormatted),
            encryption_tag(Encryption::Luks2),
            name_tag(&name),
            node.clone(),
            key_kept_tag(),
        ] {
            check_tag(&t).unwrap();
            tags.insert(t);
        }
        assert_eq!(step(&tags), Some(Progress::CryptFormatted));
        assert_eq!(encryption(&tags), Some(Encryption::Luks2));
        assert_eq!(self::name(&tags), Some(name));
        assert_eq!(nodes(&tags), vec![(jail, node)]);
        assert!(key_kept(&tags));
    }

    #[test]
    fn snapshot_and_restore_tags_parse_back() {
        let volume = VolumeId::generate();
        let mut tags = BTreeSet::new();
        for t in [
            origin_tag(&volume),
            taken_tag(1_764_000_000),
            restored_from_tag(&volume),
            step_tag(Progress::Restoring),
        ] {
            check_tag(&t).unwrap();
            tags.insert(t);
        }
        assert_eq!(origin(&tags), Some(volume.clone()));
        assert_eq!(taken(&tags), Some(1_764_000_000));
        assert_eq!(restored_from(&tags), Some(volume));
        assert_eq!(step(&tags), Some(Progress::Restoring));
        assert_eq!(origin(&BTreeSet::new()), None);
    }

    #[test]
    fn the_hydrating_step_parses_back_and_is_replaced_by_ready() {
        let tag = step_tag(Progress::Hydrating);
        assert_eq!(tag, "vmv1.step=hydrating");
        check_tag(&tag).unwrap();
        let tags: BTreeSet<String> = [tag.clone()].into();
        assert_eq!(step(&tags), Some(Progress::Hydrating));
        assert!(other_step_tags(Progress::Ready).contains(&tag));
        assert!(!other_step_tags(Progress::Hydrating).contains(&tag));
    }

    #[test]
    fn over_long_jail_paths_are_not_recordable() {
        let long = format!("/{}", "a".repeat(800));
        let jail = JailPath::new(long, "dev/vdb").unwrap();
        assert_eq!(node_tag(&jail), None);
    }

    #[test]
    fn conflicting_step_tags_are_unknown_unless_deleting() {
        let mut tags: BTreeSet<String> =
            [step_tag(Progress::LvCreated), step_tag(Progress::Ready)].into();
        assert_eq!(step(&tags), None);
        tags.insert(step_tag(Progress::Deleting));
        assert_eq!(step(&tags), Some(Progress::Deleting));
        assert_eq!(step(&BTreeSet::new()), None);
    }
}
