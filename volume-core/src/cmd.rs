//! The one module that runs external programs.
//!
//! Every program is found once, at start-up, by name in a fixed list of
//! system directories (never `$PATH`: a root daemon must not run whatever an
//! inherited environment points at) and kept as an absolute path. Programs
//! run with a cleared environment (`LC_ALL=C` only, so that output is stable)
//! and stdin from `/dev/null`, so no tool can stop and ask a question. A
//! failure carries the program, its arguments, the exit status, stdout and
//! stderr. No secret is ever passed to a program: keys go through
//! libcryptsetup in process.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Where programs are looked for, in order.
pub const SYSTEM_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// Failure to find, start, or successfully run an external program.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("required programs not found in {searched}: {}", .missing.join(", "))]
    Missing {
        missing: Vec<&'static str>,
        searched: String,
    },
    #[error("program path {path} is not an absolute path to an executable file")]
    NotExecutable { path: PathBuf },
    #[error("could not start {}: {source}", render(.program, .args))]
    Spawn {
        program: PathBuf,
        args: Vec<OsString>,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} failed with {status}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        render(.program, .args)
    )]
    Failed {
        program: PathBuf,
        args: Vec<OsString>,
        status: ExitCode,
        stdout: String,
        stderr: String,
    },
}

/// How a program ended: an exit code or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Code(i32),
    Signal(i32),
}

impl fmt::Display for ExitCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitCode::Code(code) => write!(f, "exit status {code}"),
            ExitCode::Signal(signal) => write!(f, "signal {signal}"),
        }
    }
}

fn render(program: &Path, args: &[OsString]) -> String {
    let mut text = format!("`{}", program.display());
    for arg in args {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text.push('`');
    text
}

/// One external program, by absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    name: &'static str,
    path: PathBuf,
}

impl Program {
    /// Finds `name` in the first of `dirs` that holds an executable file of
    /// that name.
    pub fn find_in(name: &'static str, dirs: &[&Path]) -> Option<Program> {
        dirs.iter()
            .map(|dir| dir.join(name))
            .find(|path| is_executable_file(path))
            .map(|path| Program { name, path })
    }

    /// A program at a given absolute path (for tests and for hosts that keep
    /// their tools elsewhere).
    pub fn at(name: &'static str, path: impl Into<PathBuf>) -> Result<Program, CmdError> {
        let path = path.into();
        if !path.is_absolute() || !is_executable_file(&path) {
            return Err(CmdError::NotExecutable { path });
        }
        Ok(Program { name, path })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs the program to completion. Exit statuses in `accepted` count as
    /// success (most callers pass `&[0]`; `e2fsck` also reports "errors
    /// corrected" as 1).
    pub fn run<I, S>(&self, args: I, accepted: &[i32]) -> Result<Output, CmdError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_with_env(args, &[], accepted)
    }

    /// [`Program::run`] with a few extra environment variables (e.g.
    /// `DM_DISABLE_UDEV=1` for device-mapper tools on hosts without udev).
    pub fn run_with_env<I, S>(
        &self,
        args: I,
        env: &[(&str, &OsStr)],
        accepted: &[i32],
    ) -> Result<Output, CmdError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        tracing::debug!(command = %render(&self.path, &args), "running");
        let output = Command::new(&self.path)
            .args(&args)
            .env_clear()
            .env("LC_ALL", "C")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| CmdError::Spawn {
                program: self.path.clone(),
                args: args.clone(),
                source,
            })?;
        let status = match (output.status.code(), output.status.signal()) {
            (Some(code), _) => ExitCode::Code(code),
            (None, Some(signal)) => ExitCode::Signal(signal),
            (None, None) => ExitCode::Signal(0),
        };
        match status {
            ExitCode::Code(code) if accepted.contains(&code) => Ok(output),
            _ => Err(CmdError::Failed {
                program: self.path.clone(),
                args,
                status,
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            }),
        }
    }
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The programs the volume data path runs. Everything else (LUKS, device
/// nodes, filesystem detection) is done in process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    pub mkfs_ext4: Program,
    pub e2fsck: Program,
    pub resize2fs: Program,
    /// Gives a restored copy's ext4 its own UUID and label.
    pub tune2fs: Program,
}

impl Tools {
    pub const NAMES: [&'static str; 4] = ["mkfs.ext4", "e2fsck", "resize2fs", "tune2fs"];

    /// The start-up check: finds every program in [`SYSTEM_DIRS`] or names
    /// each one that is missing.
    pub fn locate() -> Result<Tools, CmdError> {
        let dirs: Vec<&Path> = SYSTEM_DIRS.iter().map(Path::new).collect();
        Tools::locate_in(&dirs)
    }

    /// [`Tools::locate`] over other directories (tests).
    pub fn locate_in(dirs: &[&Path]) -> Result<Tools, CmdError> {
        let [mkfs, fsck, resize, tune] = locate_all(Tools::NAMES, dirs)?;
        Ok(Tools {
            mkfs_ext4: mkfs,
            e2fsck: fsck,
            resize2fs: resize,
            tune2fs: tune,
        })
    }
}

/// Finds all of `names` in `dirs`, or names every one that is missing.
pub fn locate_all<const N: usize>(
    names: [&'static str; N],
    dirs: &[&Path],
) -> Result<[Program; N], CmdError> {
    let found = names.map(|name| Program::find_in(name, dirs));
    let missing: Vec<&'static str> = names
        .iter()
        .zip(&found)
        .filter(|(_, program)| program.is_none())
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(CmdError::Missing {
            missing,
            searched: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        });
    }
    Ok(found.map(|program| program.expect("checked above")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn locate_names_every_missing_program() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "e2fsck", "exit 0");
        script(dir.path(), "tune2fs", "exit 0");
        // Present but not executable does not count.
        fs::write(dir.path().join("resize2fs"), "").unwrap();
        let err = Tools::locate_in(&[dir.path()]).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, CmdError::Missing { missing, .. } if missing == &["mkfs.ext4", "resize2fs"]),
            "{text}"
        );
        assert!(text.contains("mkfs.ext4, resize2fs"), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
    }

    #[test]
    fn locate_finds_absolute_paths_in_order() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        for name in Tools::NAMES {
            script(second.path(), name, "exit 0");
        }
        let mkfs_first = script(first.path(), "mkfs.ext4", "exit 0");
        let tools = Tools::locate_in(&[first.path(), second.path()]).unwrap();
        assert_eq!(tools.mkfs_ext4.path(), mkfs_first);
        assert_eq!(tools.e2fsck.path(), second.path().join("e2fsck"));
        assert!(tools.resize2fs.path().is_absolute());
    }

    #[test]
    fn failure_carries_status_stdout_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), "tool", "echo out; echo err >&2; exit 3");
        let program = Program::at("tool", &path).unwrap();
        let err = program.run(["-x", "arg"], &[0]).unwrap_err();
        match &err {
            CmdError::Failed {
                status,
                stdout,
                stderr,
                args,
                ..
            } => {
                assert_eq!(*status, ExitCode::Code(3));
                assert_eq!(stdout.trim(), "out");
                assert_eq!(stderr.trim(), "err");
                assert_eq!(args.len(), 2);
            }
            other => panic!("unexpected {other}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("tool -x arg` failed with exit status 3"),
            "{text}"
        );
        // An accepted non-zero status is success.
        assert!(program.run(["-x"], &[0, 3]).is_ok());
    }

    #[test]
    fn programs_run_with_a_clean_environment_and_no_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(
            dir.path(),
            "envdump",
            "env | sort; if read line; then echo got-input; fi",
        );
        let output = Program::at("envdump", &path)
            .unwrap()
            .run(std::iter::empty::<&str>(), &[0])
            .unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(stdout.contains("LC_ALL=C"), "{stdout}");
        let with = Program::at("envdump", &path)
            .unwrap()
            .run_with_env(
                std::iter::empty::<&str>(),
                &[("DM_DISABLE_UDEV", OsStr::new("1"))],
                &[0],
            )
            .unwrap();
        assert!(String::from_utf8(with.stdout)
            .unwrap()
            .contains("DM_DISABLE_UDEV=1"));
        assert!(!stdout.contains("HOME="), "{stdout}");
        assert!(!stdout.contains("got-input"), "{stdout}");
    }

    #[test]
    fn relative_or_missing_paths_are_refused() {
        assert!(matches!(
            Program::at("sh", "sh"),
            Err(CmdError::NotExecutable { .. })
        ));
        assert!(Program::at("x", "/nonexistent/x").is_err());
    }

    #[test]
    fn killed_by_signal_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), "die", "kill -9 $$");
        let err = Program::at("die", &path)
            .unwrap()
            .run(std::iter::empty::<&str>(), &[0])
            .unwrap_err();
        assert!(err.to_string().contains("signal 9"), "{err}");
    }
}
