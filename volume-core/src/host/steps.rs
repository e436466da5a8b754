//! The steps of [`super::VolumeHost`] operations: after each one, progress
//! can be observed (the debug log names it) or, in tests, a fault injected.

use std::fmt;

/// Every step after which progress can be observed or lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    // create
    KeyReady,
    LvCreated,
    CryptFormatted,
    CryptOpened,
    FsMade,
    ProgressReady,
    // expose / unexpose
    NodeRecorded,
    NodeMade,
    NodeRemoved,
    NodeForgotten,
    // extend
    LvExtended,
    CryptResized,
    FsGrown,
    // delete and rollback
    MarkedDeleting,
    CryptClosed,
    HeaderErased,
    LvRemoved,
    KeyDestroyed,
    /// A hydrating volume's network leg disconnected (a delete's first
    /// step for one).
    HydrationDisconnected,
    /// A hydrating volume's copy cancelled (its layer and LVs gone).
    HydrationCancelled,
    // snapshots, restore and fork
    SnapshotTaken,
    SnapshotRemoved,
    KeyCopied,
    HeaderAdopted,
    FsChecked,
    FsAdopted,
}

impl Step {
    /// The steps of a create of an encrypted volume, in order.
    pub const CREATE_ENCRYPTED: [Step; 6] = [
        Step::KeyReady,
        Step::LvCreated,
        Step::CryptFormatted,
        Step::CryptOpened,
        Step::FsMade,
        Step::ProgressReady,
    ];
    /// The steps of a create of a plain volume, in order.
    pub const CREATE_PLAIN: [Step; 3] = [Step::LvCreated, Step::FsMade, Step::ProgressReady];
    /// The steps of a delete of an exposed, encrypted volume, in order.
    pub const DELETE: [Step; 7] = [
        Step::MarkedDeleting,
        Step::NodeRemoved,
        Step::NodeForgotten,
        Step::CryptClosed,
        Step::HeaderErased,
        Step::LvRemoved,
        Step::KeyDestroyed,
    ];
}

impl Step {
    /// The steps of a restore of an encrypted snapshot into a bigger
    /// volume, in order.
    pub const RESTORE_ENCRYPTED: [Step; 10] = [
        Step::KeyCopied,
        Step::LvCreated,
        Step::LvExtended,
        Step::HeaderAdopted,
        Step::CryptOpened,
        Step::CryptResized,
        Step::FsChecked,
        Step::FsAdopted,
        Step::FsGrown,
        Step::ProgressReady,
    ];
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
