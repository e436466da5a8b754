//! volume-core
