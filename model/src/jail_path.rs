//! The shape of a jail node path, checked before anything touches the
//! filesystem. Pure: the kernel checks symlinks when `volume-core::jail`
//! resolves the path; this module only refuses shapes that could never be
//! safe (relative roots, `.`/`..`, directories).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// What a caller asks to expose: the node `relative` beneath `root`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JailPath {
    root: PathBuf,
    relative: PathBuf,
}

/// A jail path refused for its shape; names the path and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("jail path {path}: {reason}")]
pub struct BadJailPath {
    pub path: PathBuf,
    pub reason: &'static str,
}

impl JailPath {
    /// Checks the shape of both paths: `root` absolute, `relative` relative
    /// and non-empty, neither with `..` or `.`; the kernel checks symlinks
    /// when the path is used.
    pub fn new(
        root: impl Into<PathBuf>,
        relative: impl Into<PathBuf>,
    ) -> Result<JailPath, BadJailPath> {
        let root = root.into();
        let relative = relative.into();
        let bad = |path: &Path, reason: &'static str| BadJailPath {
            path: path.to_owned(),
            reason,
        };
        if !root.is_absolute() {
            return Err(bad(&root, "the jail root must be an absolute path"));
        }
        // Components() hides "." and trailing "/"; look at the raw bytes too.
        let has_dot_parts = |path: &Path| {
            path.as_os_str()
                .as_bytes()
                .split(|b| *b == b'/')
                .any(|part| part == b".." || part == b".")
        };
        if has_dot_parts(&root) {
            return Err(bad(&root, "'.' and '..' are not allowed in a jail path"));
        }
        if relative.as_os_str().is_empty() || relative.is_absolute() {
            return Err(bad(
                &relative,
                "the node path must be relative to the jail root and non-empty",
            ));
        }
        if has_dot_parts(&relative)
            || relative
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(bad(
                &relative,
                "'.' and '..' are not allowed in a jail path",
            ));
        }
        if relative.as_os_str().as_bytes().ends_with(b"/") {
            return Err(bad(
                &relative,
                "the node path must name a file, not a directory",
            ));
        }
        Ok(JailPath { root, relative })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn relative(&self) -> &Path {
        &self.relative
    }

    /// The node's full path on the host (for messages and records).
    pub fn full(&self) -> PathBuf {
        self.root.join(&self.relative)
    }

    /// The node's parent directory (relative to the root, possibly empty)
    /// and its file name.
    pub fn split(&self) -> (&Path, &OsStr) {
        let name = self
            .relative
            .file_name()
            .expect("checked in new: the last component is a normal name");
        let parent = self.relative.parent().unwrap_or(Path::new(""));
        (parent, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_shapes_are_checked() {
        assert!(JailPath::new("/srv/jail", "dev/vdb").is_ok());
        for (root, rel) in [
            ("relative/root", "dev/vdb"),
            ("/srv/jail", "/dev/vdb"),
            ("/srv/jail", ""),
            ("/srv/jail", "../etc/passwd"),
            ("/srv/jail", "dev/../../x"),
            ("/srv/jail", "./dev/vdb"),
            ("/srv/jail", "dev/vdb/"),
            ("/srv/../etc", "dev/vdb"),
            ("/srv/./jail", "dev/vdb"),
        ] {
            assert!(
                matches!(JailPath::new(root, rel), Err(BadJailPath { .. })),
                "{root} {rel} accepted"
            );
        }
    }
}
