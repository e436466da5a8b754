//! qemu-nbd on both ends: the server that exports the source's snapshot,
//! and the client that connects the destination's kernel nbd device to it.
//! Both authenticate with TLS-PSK under the migration's secret; the client
//! reconnects by itself when the server goes away and holds the I/O
//! meanwhile. The argument lists are pure (tested here); the processes are
//! run through [`crate::cmd`].

use crate::names::MigrationId;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

use crate::keys::MigrationSecret;

/// How long the client holds I/O for a server that went away, retrying,
/// before failing it. A week: a source that is down gets restarted or the
/// migration cancelled long before, and a failed read of a block not yet
/// copied would reach the guest as an I/O error.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// qemu's id of the TLS credentials object on both ends.
const TLS_OBJECT: &str = "vmv1tls";

/// The files of one end of one migration, in a 0700 directory under the
/// daemon's run directory (a tmpfs: nothing outlives a reboot but the LVs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndFiles {
    pub dir: PathBuf,
}

impl EndFiles {
    pub fn new(run_dir: &Path, migration: &MigrationId, end: &str) -> EndFiles {
        EndFiles {
            dir: run_dir.join(migration.as_str()).join(end),
        }
    }
    /// qemu reads `keys.psk` from this directory.
    pub fn psk_dir(&self) -> PathBuf {
        self.dir.join("psk")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("qemu-nbd.pid")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("qemu-nbd.log")
    }
    /// The client's own unix socket between qemu-nbd and the kernel.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("qemu-nbd.sock")
    }
    /// The nbd device the client connected (`/dev/nbdN`).
    pub fn device_file(&self) -> PathBuf {
        self.dir.join("nbd-device")
    }
}

/// Makes the end's directories (0700) and writes the pre-shared key as
/// qemu reads it (`<identity>:<hex key>`, mode 0600); the key never
/// appears on a command line. Whether the directory was made by this call.
pub fn write_psk(
    files: &EndFiles,
    migration: &MigrationId,
    secret: &MigrationSecret,
) -> io::Result<bool> {
    let made = !files.dir.exists();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(files.psk_dir())?;
    let mut line = Zeroizing::new(String::with_capacity(128));
    line.push_str(migration.export_name());
    line.push(':');
    for byte in secret.expose_secret() {
        line.push_str(&format!("{byte:02x}"));
    }
    line.push('\n');
    let path = files.psk_dir().join("keys.psk");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(line.as_bytes())?;
    // Without it, qemu's TLS server generates 2048-bit DH parameters at
    // start: about 10 s of the emulated CPU per export. The RFC 7919 group
    // is public and fixed, as TLS 1.3 uses it.
    fs::write(files.psk_dir().join("dh-params.pem"), FFDHE2048_PEM)?;
    Ok(made)
}

/// RFC 7919's `ffdhe2048` group as PKCS#3 PEM (`openssl genpkey
/// -genparam -algorithm DH -pkeyopt group:ffdhe2048`).
const FFDHE2048_PEM: &str = "-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";

/// Overwrites the key file, then removes the end's directory.
pub fn remove_files(files: &EndFiles) -> io::Result<()> {
    let key = files.psk_dir().join("keys.psk");
    if let Ok(meta) = fs::metadata(&key) {
        let zeros = vec![0u8; meta.len() as usize];
        let _ = fs::write(&key, zeros);
    }
    match fs::remove_dir_all(&files.dir) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    // The migration's directory, once both ends (on one machine) are gone.
    if let Some(parent) = files.dir.parent() {
        let _ = fs::remove_dir(parent);
    }
    Ok(())
}

/// A comma ends a qemu option value; paths with one are refused.
fn option_path(path: &Path) -> Result<String, String> {
    let text = path
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))?;
    if text.contains(',') {
        return Err(format!(
            "{text} contains a comma, which qemu options cannot hold"
        ));
    }
    Ok(text.to_owned())
}

/// `qemu-nbd --fork ...`: serve `device` read-write (the destination writes
/// to both legs) to TLS-PSK clients of this migration only.
pub fn server_args(
    files: &EndFiles,
    migration: &MigrationId,
    listen: SocketAddr,
    device: &Path,
) -> Result<Vec<OsString>, String> {
    let psk = option_path(&files.psk_dir())?;
    let mut args: Vec<OsString> = [
        "--fork",
        "--persistent",
        // The client's reconnect may arrive before the server has noticed
        // that the old connection is dead.
        "--shared=4",
        "--format=raw",
        "--cache=none",
        "--discard=unmap",
    ]
    .map(OsString::from)
    .into();
    args.push(format!("--pid-file={}", files.pid_file().display()).into());
    args.push(format!("--bind={}", listen.ip()).into());
    args.push(format!("--port={}", listen.port()).into());
    args.push(format!("--export-name={}", migration.export_name()).into());
    args.push("--object".into());
    args.push(format!("tls-creds-psk,id={TLS_OBJECT},endpoint=server,dir={psk}").into());
    args.push(format!("--tls-creds={TLS_OBJECT}").into());
    args.push(device.as_os_str().to_owned());
    Ok(args)
}

/// `qemu-nbd --connect=/dev/nbdN ...`: the kernel's nbd device, fed by a
/// qemu-nbd that speaks TLS-PSK to the source and reconnects on its own.
pub fn client_args(
    files: &EndFiles,
    migration: &MigrationId,
    source: SocketAddr,
    nbd: &Path,
) -> Result<Vec<OsString>, String> {
    let psk = option_path(&files.psk_dir())?;
    let export = migration.export_name();
    let mut args: Vec<OsString> = vec![
        format!("--connect={}", option_path(nbd)?).into(),
        format!("--socket={}", files.socket().display()).into(),
        format!("--pid-file={}", files.pid_file().display()).into(),
        "--object".into(),
        format!("tls-creds-psk,id={TLS_OBJECT},endpoint=client,dir={psk},username={export}").into(),
        "--image-opts".into(),
    ];
    args.push(
        format!(
            "driver=nbd,server.type=inet,server.host={},server.port={},export={export},\
             tls-creds={TLS_OBJECT},reconnect-delay={}",
            source.ip(),
            source.port(),
            RECONNECT_DELAY.as_secs()
        )
        .into(),
    );
    Ok(args)
}

/// The pid in `pid_file` if that process is a live (not zombie) qemu-nbd.
pub fn running_pid(pid_file: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `<pid> (<comm>) <state> ...`; comm may hold spaces, so split at the
    // last parenthesis.
    let (head, tail) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1;
    let state = tail.split_whitespace().next()?;
    (comm == "qemu-nbd" && state != "Z" && state != "X").then_some(pid)
}

/// Ends qemu-nbd `pid` (SIGTERM, then SIGKILL after `grace`) and waits
/// until it is gone.
pub fn stop(pid_file: &Path, grace: Duration) -> Result<(), String> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let Some(pid) = running_pid(pid_file) else {
        return Ok(());
    };
    let send = |signal| match kill(Pid::from_raw(pid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(errno) => Err(format!("kill {signal} {pid}: {errno}")),
    };
    send(Signal::SIGTERM)?;
    let started = Instant::now();
    let mut signalled_kill = false;
    while running_pid(pid_file) == Some(pid) {
        if !signalled_kill && started.elapsed() > grace {
            send(Signal::SIGKILL)?;
            signalled_kill = true;
        }
        if started.elapsed() > grace * 3 {
            return Err(format!("qemu-nbd {pid} is still running after SIGKILL"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The first nbd device no client holds (`/sys/block/nbdN/pid` is there
/// only while one is connected).
pub fn free_device() -> Option<PathBuf> {
    (0..1024)
        .map(|n| format!("nbd{n}"))
        .take_while(|name| Path::new("/sys/block").join(name).exists())
        .find(|name| !Path::new("/sys/block").join(name).join("pid").exists())
        .map(|name| Path::new("/dev").join(name))
}

/// Whether the source's export accepts a TCP connection within `timeout`:
/// with a copy that stopped moving, what tells "source unreachable" from
/// a slow source.
pub fn source_reachable(source: SocketAddr, timeout: Duration) -> bool {
    std::net::TcpStream::connect_timeout(&source, timeout).is_ok()
}

/// The size the kernel sees for a connected nbd device, in bytes.
pub fn device_size(nbd: &Path) -> Option<u64> {
    let name = nbd.file_name()?.to_str()?;
    let sectors: u64 = fs::read_to_string(format!("/sys/block/{name}/size"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(sectors * crate::units::SECTOR_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn server_and_client_agree_on_export_identity_and_credentials() {
        let id = MigrationId::new("mig_abcdefghijklmnop").unwrap();
        let files = EndFiles::new(Path::new("/run/volumed/migrations"), &id, "export");
        let server = strings(
            server_args(
                &files,
                &id,
                "127.0.0.1:10809".parse().unwrap(),
                Path::new("/dev/vg/vmv1-mig_abcdefghijklmnop"),
            )
            .unwrap(),
        );
        assert!(server.contains(&"--export-name=mig_abcdefghijklmnop".to_owned()));
        assert!(server.contains(&"--bind=127.0.0.1".to_owned()));
        assert!(server.contains(&"--port=10809".to_owned()));
        assert!(server.contains(&format!(
            "tls-creds-psk,id=vmv1tls,endpoint=server,dir=/run/volumed/migrations/{id}/export/psk"
        )));
        assert_eq!(server.last().unwrap(), "/dev/vg/vmv1-mig_abcdefghijklmnop");
        assert!(!server.iter().any(|a| a == "--read-only"));

        let files = EndFiles::new(Path::new("/run/volumed/migrations"), &id, "hydrate");
        let client = strings(
            client_args(
                &files,
                &id,
                "[::1]:7000".parse().unwrap(),
                Path::new("/dev/nbd3"),
            )
            .unwrap(),
        );
        assert_eq!(client[0], "--connect=/dev/nbd3");
        assert!(client
            .iter()
            .any(|a| a.ends_with("username=mig_abcdefghijklmnop")));
        let image = client.last().unwrap();
        assert!(
            image.contains("server.host=::1,server.port=7000,"),
            "{image}"
        );
        assert!(
            image.contains("export=mig_abcdefghijklmnop,tls-creds=vmv1tls,"),
            "{image}"
        );
        assert!(
            image.ends_with(&format!("reconnect-delay={}", 7 * 24 * 3600)),
            "{image}"
        );
    }

    #[test]
    fn a_path_qemu_cannot_take_is_refused() {
        let id = MigrationId::generate();
        let files = EndFiles::new(Path::new("/run/a,b"), &id, "export");
        let error = server_args(
            &files,
            &id,
            "127.0.0.1:1".parse().unwrap(),
            Path::new("/dev/x"),
        )
        .unwrap_err();
        assert!(error.contains("/run/a,b"), "{error}");
    }

    #[test]
    fn the_key_file_is_private_and_in_qemus_format() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let id = MigrationId::new("mig_abcdefghijklmnop").unwrap();
        let files = EndFiles::new(dir.path(), &id, "export");
        let secret = MigrationSecret::from_bytes(&[0xab; 32]).unwrap();
        assert!(write_psk(&files, &id, &secret).unwrap());
        assert!(
            !write_psk(&files, &id, &secret).unwrap(),
            "second write finds the dir"
        );
        let key = files.psk_dir().join("keys.psk");
        assert_eq!(
            fs::read_to_string(&key).unwrap(),
            format!("mig_abcdefghijklmnop:{}\n", "ab".repeat(32))
        );
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let psk_mode = fs::metadata(files.psk_dir()).unwrap().permissions().mode();
        assert_eq!(psk_mode & 0o777, 0o700);
        // Fixed DH parameters beside it, so qemu generates none.
        let dh = fs::read_to_string(files.psk_dir().join("dh-params.pem")).unwrap();
        assert!(dh.starts_with("-----BEGIN DH PARAMETERS-----\n"), "{dh}");
        remove_files(&files).unwrap();
        assert!(!files.dir.exists());
        remove_files(&files).unwrap();
    }

    #[test]
    fn a_pid_file_naming_another_program_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        fs::write(&pid_file, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(
            running_pid(&pid_file),
            None,
            "the test runner is not qemu-nbd"
        );
        fs::write(&pid_file, "garbage").unwrap();
        assert_eq!(running_pid(&pid_file), None);
        assert_eq!(running_pid(&dir.path().join("missing")), None);
        stop(&pid_file, Duration::from_millis(10)).unwrap();
    }
}
