//! The project's own binaries as processes, for end-to-end tests: the KV
//! server (`volkv`), the daemon (`volumed`) and the CLI (`volctl`).
//!
//! They are found beside the test binary (`target/<profile>/`), so they must
//! be built first: `cargo build -p volumed -p volctl -p consul-kv-server --bins`
//! (`scripts/test-all` does).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>/<name>`, next to the directory of the test binary.
/// `<scratch>/kek`, the KEK file for volumed's envelope key store, made
/// on first use so that a restarted daemon reads the same one.
pub fn kek_file(scratch: &Path) -> PathBuf {
    let kek = scratch.join("kek");
    if !kek.exists() {
        volume_core::keys::KeyEncryptionKey::generate()
            .expect("KEK")
            .write_new_file(&kek)
            .expect("write the KEK");
    }
    kek
}

pub fn project_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test binary");
    // Test binaries live in target/<profile>/deps, binaries (the
    // benchmarks among them) in target/<profile>.
    let dir = exe.parent().expect("binary in a directory");
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().expect("target/<profile>/deps")
    } else {
        dir
    };
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p volumed -p volctl -p consul-kv-server --bins` first",
        path.display()
    );
    path
}

/// A child process that is killed when dropped, so a failing test never
/// leaves a daemon running.
pub struct Guarded {
    name: String,
    child: Option<Child>,
}

impl Guarded {
    pub fn spawn(name: &str, command: &mut Command) -> Guarded {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {name}: {e}"));
        Guarded {
            name: name.to_owned(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, as a crash would; waits for the process to be gone and
    /// returns how it ended (`None` if it was already reaped).
    pub fn kill_hard(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGTERM and wait up to `grace` for a clean exit; returns whether it
    /// exited successfully in time.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} ignored SIGTERM for {grace:?}; killing it", self.name);
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.kill_hard();
    }
}

/// The bundled KV server on a free loopback port.
pub struct KvServer {
    pub process: Guarded,
    pub url: String,
}

impl KvServer {
    pub fn start(data_dir: &Path) -> KvServer {
        KvServer::start_binary(&project_binary("volkv"), data_dir)
    }

    /// [`KvServer::start`] with the `volkv` binary at `volkv`.
    pub fn start_binary(volkv: &Path, data_dir: &Path) -> KvServer {
        let mut command = Command::new(volkv);
        command
            .args(["--bind", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut process = Guarded::spawn("volkv", &mut command);
        let stdout = process
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .expect("piped stdout");
        let mut stdout = BufReader::new(stdout);
        let mut first_line = String::new();
        stdout
            .read_line(&mut first_line)
            .expect("read volkv's first line");
        // Keep draining, so a later line never meets a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let url = first_line
            .trim()
            .strip_prefix("volkv listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from volkv: {first_line:?}"))
            .to_owned();
        KvServer { process, url }
    }
}

/// Runs `volctl --kv-addr <url> <args>` to completion.
pub fn volctl(kv_url: &str, args: &[&str]) -> Output {
    let output = Command::new(project_binary("volctl"))
        .arg("--kv-addr")
        .arg(kv_url)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run volctl");
    eprintln!(
        "$ volctl {}\n{}{}[exit {}]",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        output.status.code().unwrap_or(-1)
    );
    output
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after
/// `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
