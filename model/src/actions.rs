//! Return types that say what an idempotent operation actually did.

use crate::units::Bytes;

/// The outcome of an operation that creates something.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum CreateAction<T> {
    /// It did not exist and was made.
    Created(T),
    /// It already existed exactly as asked; nothing changed.
    Identity(T),
}

impl<T> CreateAction<T> {
    pub fn into_inner(self) -> T {
        match self {
            CreateAction::Created(t) | CreateAction::Identity(t) => t,
        }
    }

    pub fn inner(&self) -> &T {
        match self {
            CreateAction::Created(t) | CreateAction::Identity(t) => t,
        }
    }

    pub fn changed(&self) -> bool {
        matches!(self, CreateAction::Created(_))
    }
}

/// The outcome of an operation that removes something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum DeleteAction {
    Deleted,
    /// It was already gone; nothing changed.
    Identity,
}

impl DeleteAction {
    pub fn changed(&self) -> bool {
        matches!(self, DeleteAction::Deleted)
    }
}

/// The outcome of growing something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum ExtendAction {
    Extended {
        from: Bytes,
        to: Bytes,
    },
    /// It already had the asked size; nothing changed.
    Identity(Bytes),
}

impl ExtendAction {
    pub fn changed(&self) -> bool {
        matches!(self, ExtendAction::Extended { .. })
    }
}
