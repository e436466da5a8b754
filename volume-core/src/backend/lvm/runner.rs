//! Runs LVM commands in process through liblvm2cmd, on one dedicated thread.
//!
//! liblvm2cmd keeps process-global state (its log callback, device cache,
//! locks), so the process has at most one handle, used from one thread: the
//! worker. Every [`LvmRunner`] in the process shares that worker; it calls
//! `lvm2_exit` when the last runner is dropped, and renews its handle every
//! `RENEW_AFTER` commands, because each command keeps memory until then.
//!
//! Output comes back through the log callback, one line per call: the JSON
//! report at level 4 (`LVM2_LOG_PRINT`) from libdm's report writer, warnings
//! and other prints also at level 4 but from elsewhere, errors at level 3 or
//! below, and verbose/debug chatter (which we drop) above 4.
//!
//! The umask. LVM calls `umask(global/umask)` (077) whenever it processes
//! its configuration: in `lvm2_init`, for a command with `--config`, and
//! when `lvm.conf` changed. The umask is process-wide, so the runner never
//! sets LVM's umask around commands (another thread's `mkdir` would get
//! 0700). It only puts the process's own umask back when LVM changed it,
//! which is at start-up and on a configuration reload. What LVM relied on
//! 077 for (its archive, backup and lock files) is covered by making their
//! directories ourselves, mode 0700 set explicitly, before `lvm2_init`.

use crate::backend::BackendError;
use crate::names::NameError;
use nix::sys::stat::{umask, Mode};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

/// `lvm_split` (tools/lvmcmdline.c) stops at 64 words and then fails.
const MAX_WORDS: usize = 63;
/// Error lines kept per command; a failing report over many LVs can print
/// one line per LV.
const MAX_ERROR_LINES: usize = 64;
/// The stack the `lvm` command's own main thread gets; LVM reserves 64 KiB
/// of it (`activation/reserved_stack`) before a suspend. Only the pages
/// touched are resident (LVM locks none of them, see `MEMLOCK_SETTINGS`).
const WORKER_STACK: usize = 8 << 20;
/// Commands one liblvm2cmd handle runs before the worker renews it
/// (`lvm2_exit`, then `lvm2_init`): each `lvm2_run` keeps about 300–500
/// bytes that only `lvm2_exit` frees, so a handle kept for a daemon's life
/// grows without bound. Renewing every 1,000 commands bounds that at about
/// half a megabyte; what an exit and init themselves keep (a few KB) is
/// about a hundredth of it per command.
const RENEW_AFTER: u32 = 1000;
/// glibc's own `M_MMAP_MAX` (malloc.c's `DEFAULT_MMAP_MAX`), which
/// `lvm2_init` sets to 0; see [`map_large_allocations_again`].
const GLIBC_MMAP_MAX: c_int = 65536;

/// One command line for `lvm2_run`, checked so that LVM's word splitter
/// reads back exactly the words we gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    text: String,
}

/// Builds a [`CommandLine`]; [`CommandLineBuilder::build`] checks every word.
#[derive(Debug, Clone)]
pub struct CommandLineBuilder {
    words: Vec<String>,
    /// Indices of `--config` values, whose LVM syntax quotes strings.
    config_values: Vec<usize>,
}

impl CommandLine {
    pub fn command(command: &str) -> CommandLineBuilder {
        CommandLineBuilder {
            words: vec![command.to_owned()],
            config_values: Vec::new(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for CommandLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl CommandLineBuilder {
    pub fn arg(mut self, word: impl Into<String>) -> CommandLineBuilder {
        self.words.push(word.into());
        self
    }

    pub fn args<I, S>(mut self, words: I) -> CommandLineBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.words.extend(words.into_iter().map(Into::into));
        self
    }

    /// `--config <settings>`: LVM configuration syntax, whose strings are
    /// quoted. `lvm_split` treats a quote specially only at the start of a
    /// word, so quotes inside `settings` reach LVM as written; whitespace
    /// and a leading quote are still refused.
    pub fn config(mut self, settings: impl Into<String>) -> CommandLineBuilder {
        self.words.push("--config".to_owned());
        self.config_values.push(self.words.len());
        self.words.push(settings.into());
        self
    }

    /// `lvm_split` splits on whitespace, takes a word that *starts* with a
    /// quote up to the matching quote, and ends the line at a word starting
    /// with `#`. Our words never need whitespace or quotes, so those are
    /// refused rather than escaped; a word starting with `#` (a legal LVM
    /// tag) is quoted.
    pub fn build(self) -> Result<CommandLine, BackendError> {
        if self.words.len() > MAX_WORDS {
            return Err(refuse(
                &self.words.join(" "),
                format!("more than {MAX_WORDS} words; LVM cannot parse it"),
            ));
        }
        let mut text = String::new();
        for (index, word) in self.words.iter().enumerate() {
            if word.is_empty() {
                return Err(refuse(word, "empty word"));
            }
            let config = self.config_values.contains(&index);
            let quote = |c: char| c == '\'' || c == '"';
            if config && word.starts_with(quote) {
                return Err(refuse(
                    word,
                    "starts with a quote, which LVM's command-line splitter would misread",
                ));
            }
            if let Some(bad) = word
                .chars()
                .find(|c| c.is_whitespace() || c.is_control() || (!config && quote(*c)))
            {
                return Err(refuse(
                    word,
                    format!("contains {bad:?}, which LVM's command-line splitter would misread"),
                ));
            }
            if !text.is_empty() {
                text.push(' ');
            }
            if word.starts_with('#') {
                text.push('\'');
                text.push_str(word);
                text.push('\'');
            } else {
                text.push_str(word);
            }
        }
        Ok(CommandLine { text })
    }
}

fn refuse(word: &str, reason: impl Into<String>) -> BackendError {
    BackendError::Name(NameError {
        kind: "LVM argument",
        value: word.to_owned(),
        reason: reason.into(),
    })
}

/// What a successful command printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LvmOutput {
    /// The report, one line per line LVM printed (JSON for our reports).
    pub report: String,
    /// Other level-4 lines: warnings and plain prints such as `version`.
    pub messages: Vec<String>,
    /// Error lines; LVM can print some even when a command succeeds.
    pub errors: Vec<String>,
}

#[derive(Debug, Default)]
struct Captured {
    report: Vec<String>,
    messages: Vec<String>,
    errors: Vec<String>,
    errors_dropped: usize,
}

thread_local! {
    /// Filled by [`capture_log`] on the worker thread during one `lvm2_run`.
    static CAPTURED: RefCell<Captured> = RefCell::new(Captured::default());
}

/// LVM's log callback. It runs on the worker thread inside `lvm2_run`, so it
/// only appends to that thread's buffer and must never unwind into C.
extern "C" fn capture_log(
    level: c_int,
    file: *const c_char,
    _line: c_int,
    _dm_errno: c_int,
    message: *const c_char,
) {
    if level > lvm2_sys::LVM2_LOG_PRINT as c_int || message.is_null() {
        return;
    }
    // SAFETY: LVM passes a NUL-terminated message that lives for this call.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    // The callback gets the level without LVM's stdout/stderr flag, so
    // warnings and report lines share level 4; the source file tells them
    // apart: reports are written by libdm's report module.
    let from_report_writer = !file.is_null() && {
        // SAFETY: `file` is `__FILE__` of the logging call, a static
        // NUL-terminated string.
        let file = unsafe { CStr::from_ptr(file) };
        file.to_bytes().ends_with(b"libdm-report.c")
    };
    let _ = CAPTURED.try_with(|captured| {
        let Ok(mut captured) = captured.try_borrow_mut() else {
            return;
        };
        if level == lvm2_sys::LVM2_LOG_PRINT as c_int {
            if from_report_writer {
                captured.report.push(text);
            } else {
                captured.messages.push(text);
            }
        } else if captured.errors.len() < MAX_ERROR_LINES {
            captured.errors.push(text);
        } else {
            captured.errors_dropped += 1;
        }
    });
}

struct Request {
    line: CommandLine,
    reply: SyncSender<(i32, Captured)>,
}

/// The worker thread and the way to it.
struct Worker {
    requests: Option<Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop; it then calls lvm2_exit.
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the LVM worker thread panicked");
            }
        }
    }
}

/// The process's worker while any runner holds it.
static SHARED_WORKER: Mutex<Weak<Worker>> = Mutex::new(Weak::new());
/// Held by a worker thread from before `lvm2_init` to after `lvm2_exit`, so
/// that a new worker never overlaps one that is still shutting down.
static LIBRARY: Mutex<()> = Mutex::new(());

/// A handle to the in-process LVM worker; cheap to clone.
#[derive(Clone)]
pub struct LvmRunner {
    worker: Arc<Worker>,
}

impl fmt::Debug for LvmRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LvmRunner")
    }
}

impl LvmRunner {
    /// Joins the process's LVM worker, starting it (and `lvm2_init`) if no
    /// other runner is alive.
    pub fn start() -> Result<LvmRunner, BackendError> {
        let mut shared = SHARED_WORKER
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(worker) = shared.upgrade() {
            return Ok(LvmRunner { worker });
        }
        let worker = Arc::new(spawn_worker(RENEW_AFTER)?);
        *shared = Arc::downgrade(&worker);
        Ok(LvmRunner { worker })
    }

    /// Runs one command and waits for it. A status other than
    /// `LVM2_COMMAND_SUCCEEDED` is [`BackendError::Lvm`] with LVM's error
    /// lines.
    pub fn run(&self, line: &CommandLine) -> Result<LvmOutput, BackendError> {
        self.run_tolerating(line, |_| false)
    }

    /// [`Self::run`], but a failed status whose every error line is
    /// `tolerated` (and there is at least one) counts as success: a report
    /// of named LVs fails for a name that does not exist, yet still reports
    /// the others.
    pub fn run_tolerating(
        &self,
        line: &CommandLine,
        tolerated: impl Fn(&str) -> bool,
    ) -> Result<LvmOutput, BackendError> {
        let requests = self
            .worker
            .requests
            .as_ref()
            .ok_or(BackendError::WorkerGone)?;
        let (reply, answer) = mpsc::sync_channel(1);
        requests
            .send(Request {
                line: line.clone(),
                reply,
            })
            .map_err(|_| BackendError::WorkerGone)?;
        let (status, captured) = answer.recv().map_err(|_| BackendError::WorkerGone)?;
        let Captured {
            report,
            messages,
            mut errors,
            errors_dropped,
        } = captured;
        if errors_dropped > 0 {
            errors.push(format!("... and {errors_dropped} more error lines"));
        }
        for message in &messages {
            // Over-commit is the point of a thin pool here, and admission
            // control guards it, so LVM's warning about it on every create
            // or extend is not news.
            if message.contains("exceeds the size of thin pool") {
                tracing::debug!(command = %line, "{}", message.trim());
            } else if message.trim_start().starts_with("WARNING") {
                tracing::warn!(command = %line, "{}", message.trim());
            } else {
                tracing::debug!(command = %line, "{}", message.trim());
            }
        }
        let only_tolerated = !errors.is_empty() && errors.iter().all(|e| tolerated(e.trim()));
        if status != lvm2_sys::LVM2_COMMAND_SUCCEEDED as i32 && !only_tolerated {
            // Without an error line, LVM's other output is the best
            // explanation there is.
            let errors = if errors.is_empty() { messages } else { errors };
            return Err(BackendError::Lvm {
                command: line.to_string(),
                status,
                errors,
            });
        }
        for error in &errors {
            tracing::debug!(command = %line, "error line from a successful command: {error}");
        }
        let mut report = report.join("\n");
        if !report.is_empty() {
            report.push('\n');
        }
        Ok(LvmOutput {
            report,
            messages,
            errors,
        })
    }
}

fn spawn_worker(renew_after: u32) -> Result<Worker, BackendError> {
    let (requests, incoming) = mpsc::channel::<Request>();
    let (started, start_result) = mpsc::sync_channel::<Result<(), Vec<String>>>(1);
    let thread = std::thread::Builder::new()
        .name("lvm".into())
        .stack_size(WORKER_STACK)
        .spawn(move || worker_main(incoming, started, renew_after))
        .map_err(BackendError::WorkerSpawn)?;
    match start_result.recv() {
        Ok(Ok(())) => Ok(Worker {
            requests: Some(requests),
            thread: Some(thread),
        }),
        Ok(Err(errors)) => {
            let _ = thread.join();
            Err(BackendError::Lvm {
                command: "lvm2_init".into(),
                status: 0,
                errors,
            })
        }
        Err(_) => {
            let _ = thread.join();
            Err(BackendError::WorkerGone)
        }
    }
}

/// Owns the liblvm2cmd handle for its whole life.
struct Handle(*mut c_void);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from lvm2_init on this thread, is non-null,
        // and is not used after this.
        unsafe { lvm2_sys::lvm2_exit(self.0) };
    }
}

fn worker_main(
    incoming: Receiver<Request>,
    started: SyncSender<Result<(), Vec<String>>>,
    renew_after: u32,
) {
    let _library = LIBRARY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // See the module docs: LVM's files go into directories only root can
    // enter, and the process umask is only ever put back, never swapped.
    prepare_lvm_dirs();
    let mut handle = match open_handle() {
        Ok(handle) => Some(handle),
        Err(errors) => {
            let _ = started.send(Err(errors));
            return;
        }
    };
    if started.send(Ok(())).is_err() {
        return;
    }

    let mut commands_on_handle = 0u32;
    for request in incoming {
        let Ok(text) = CString::new(request.line.as_str()) else {
            // CommandLineBuilder refuses control characters, NUL included.
            let _ = request.reply.send((
                lvm2_sys::LVM2_INVALID_PARAMETERS as i32,
                Captured {
                    errors: vec!["command line contains NUL".into()],
                    ..Captured::default()
                },
            ));
            continue;
        };
        // A renewal that failed is tried again for each command until one
        // succeeds; until then each command fails with lvm2_init's errors.
        let live = match handle.take() {
            Some(live) => live,
            None => match open_handle() {
                Ok(renewed) => renewed,
                Err(mut errors) => {
                    errors.insert(0, "lvm2_init failed when the LVM handle was renewed".into());
                    let _ = request.reply.send((
                        lvm2_sys::LVM2_PROCESSING_FAILED as i32,
                        Captured {
                            errors,
                            ..Captured::default()
                        },
                    ));
                    continue;
                }
            },
        };
        let live = handle.insert(live);
        take_captured();
        let began = Instant::now();
        let process_umask = current_umask();
        // SAFETY: `live` is the live handle from lvm2_init on this thread,
        // `text` is NUL-terminated and outlives the call, and LIBRARY is held.
        let status = unsafe { lvm2_sys::lvm2_run(live.0, text.as_ptr()) };
        restore_umask(process_umask);
        tracing::debug!(
            command = %request.line,
            status,
            elapsed_ms = began.elapsed().as_millis() as u64,
            "lvm command"
        );
        // The caller may have gone away; the command ran either way.
        let _ = request.reply.send((status, take_captured()));
        give_back_free_heap();

        commands_on_handle += 1;
        if commands_on_handle >= renew_after {
            commands_on_handle = 0;
            // After the reply, so no caller waits for it.
            drop(handle.take());
            handle = open_handle()
                .map_err(|errors| {
                    tracing::error!(?errors, "lvm2_init failed when the LVM handle was renewed; trying again at the next command");
                })
                .ok();
        }
    }
    drop(handle);
    take_captured();
}

/// Gives the heap's free pages back after a command, once its caller has
/// the reply. Each LVM command makes and frees a few thousand small
/// allocations (its metadata pools, report rows, device cache: 882,149
/// over a burst of 100 creates, heaptrack); freed between longer-lived
/// ones, they leave whole free pages inside the heap that glibc's
/// top-of-heap trim cannot reach, and a burst kept megabytes of them
/// resident between the daemon's periodic trims (README, "Performance":
/// volumed's memory).
fn give_back_free_heap() {
    // SAFETY: malloc_trim takes the allocator's own locks and only
    // releases the pages of free chunks; no LVM call is running.
    unsafe { libc::malloc_trim(0) };
}

/// `lvm2_init` with our log callback, the process umask put back and
/// malloc's mappings turned on again. The caller holds LIBRARY.
fn open_handle() -> Result<Handle, Vec<String>> {
    // SAFETY: the caller holds LIBRARY, so no other thread is inside
    // liblvm2cmd; `capture_log` has the callback's exact C signature and
    // lives for the whole program.
    unsafe { lvm2_sys::lvm2_log_fn(Some(capture_log)) };
    let process_umask = current_umask();
    take_captured();
    // SAFETY: LIBRARY is held (see above); lvm2_init has no preconditions.
    let raw = unsafe { lvm2_sys::lvm2_init() };
    restore_umask(process_umask);
    map_large_allocations_again();
    let init_output = take_captured();
    if raw.is_null() {
        return Err(init_output.errors);
    }
    Ok(Handle(raw))
}

/// `lvm2_init` calls `mallopt(M_MMAP_MAX, 0)` (create_toolcontext), so
/// that nothing LVM allocates while it holds memory locked around a
/// suspend is a fresh, unlocked mapping. That is process-wide: afterwards
/// every large allocation of every thread came from the heap, LVM's 8 MiB
/// block cache (made and freed by each command) included, and the heap
/// stayed at 18 MiB under a burst of creates with other threads' buffers
/// on top of it. LVM's reason does not hold here: the backend tells LVM
/// not to lock the heap either (`MEMLOCK_SETTINGS`), because nothing in
/// this process pages in from the volume group it suspends.
fn map_large_allocations_again() {
    // SAFETY: mallopt only changes an allocator parameter; this runs on
    // the worker thread while it holds LIBRARY, outside any LVM call.
    if unsafe { libc::mallopt(libc::M_MMAP_MAX, GLIBC_MMAP_MAX) } != 1 {
        tracing::warn!("could not let malloc map large allocations again after lvm2_init");
    }
}

/// The process umask, read without changing it (`/proc/self/status`,
/// Linux 4.7 and later); `None` where it cannot be read.
fn current_umask() -> Option<Mode> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix("Umask:"))?;
    u32::from_str_radix(value.trim(), 8)
        .ok()
        .map(Mode::from_bits_truncate)
}

/// Puts the process umask back to `wanted` if LVM changed it (only on a
/// configuration (re)load, so this is rare and never around every command).
fn restore_umask(wanted: Option<Mode>) {
    let Some(wanted) = wanted else { return };
    if current_umask() != Some(wanted) {
        let lvm = umask(wanted);
        tracing::debug!(
            lvm = format!("{:04o}", lvm.bits()),
            process = format!("{:04o}", wanted.bits()),
            "LVM set the process umask; put it back"
        );
    }
}

/// LVM's own state directories (Debian's defaults; `LVM_SYSTEM_DIR` moves
/// the first two, as it does for LVM).
fn lvm_dirs() -> [PathBuf; 3] {
    let system = std::env::var_os("LVM_SYSTEM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/lvm"));
    [
        system.join("archive"),
        system.join("backup"),
        PathBuf::from("/run/lock/lvm"),
    ]
}

/// Makes LVM's archive, backup and lock directories if missing, with mode
/// 0700 set explicitly (not through the umask), so the metadata copies and
/// lock files LVM writes inside are root's alone whatever the umask. An
/// existing directory is left as the administrator made it; one that
/// cannot be made is left to LVM, which reports it.
fn prepare_lvm_dirs() {
    for dir in lvm_dirs() {
        if let Err(error) = make_private_dir(&dir) {
            tracing::debug!(dir = %dir.display(), %error, "could not prepare an LVM directory");
        }
    }
}

fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn take_captured() -> Captured {
    CAPTURED.with(|captured| std::mem::take(&mut *captured.borrow_mut()))
}

/// Serialises tests that read process-wide state LVM changes while it runs.
#[cfg(test)]
pub(crate) static REAL_LVM_TESTS: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_keep_their_inner_quotes() {
        let line = CommandLine::command("lvs")
            .config(r#"devices{global_filter=["r|x|"]}"#)
            .build()
            .unwrap();
        assert_eq!(
            line.as_str(),
            r#"lvs --config devices{global_filter=["r|x|"]}"#
        );
        for bad in [r#""devices{}""#, "a b"] {
            assert!(
                CommandLine::command("lvs").config(bad).build().is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn words_that_lvm_would_misread_are_refused() {
        for bad in ["a b", "a\tb", "'x", "x\"", "", "a\nb", "a\0b"] {
            let err = CommandLine::command("lvs").arg(bad).build().unwrap_err();
            assert!(
                matches!(&err, BackendError::Name(e) if e.kind == "LVM argument"),
                "{bad:?}: {err}"
            );
        }
        let many = CommandLine::command("lvchange").args(std::iter::repeat_n("x", 63));
        assert!(many.build().is_err());
    }

    #[test]
    fn a_word_starting_with_hash_is_quoted() {
        let line = CommandLine::command("lvchange")
            .args(["--addtag", "#ops", "vg/lv"])
            .build()
            .unwrap();
        assert_eq!(line.as_str(), "lvchange --addtag '#ops' vg/lv");
    }

    /// Runs liblvm2cmd for real: reports work without device-mapper, so
    /// this holds on any host with liblvm2cmd.
    #[test]
    fn real_lvm_reports_and_errors_come_back() {
        let _serial = REAL_LVM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let runner = LvmRunner::start().unwrap();

        let line = CommandLine::command("vgs")
            .args(["--reportformat", "json", "--units", "b", "--nosuffix"])
            .args(["-o", super::super::report::VG_FIELDS])
            .build()
            .unwrap();
        let output = runner.run(&line).unwrap();
        assert!(
            super::super::report::parse_vg_report(&output.report).is_ok(),
            "{output:?}"
        );

        let line = CommandLine::command("lvs")
            .arg("vmv1-no-such-vg-for-tests")
            .build()
            .unwrap();
        match runner.run(&line).unwrap_err() {
            BackendError::Lvm {
                command,
                status,
                errors,
            } => {
                assert_eq!(command, "lvs vmv1-no-such-vg-for-tests");
                assert_eq!(status, lvm2_sys::LVM2_PROCESSING_FAILED as i32);
                assert!(
                    errors
                        .iter()
                        .any(|e| e.contains("\"vmv1-no-such-vg-for-tests\" not found")),
                    "{errors:?}"
                );
            }
            other => panic!("unexpected {other}"),
        }

        let line = CommandLine::command("vgs")
            .args(["-o", "no_such_field"])
            .build()
            .unwrap();
        let err = runner.run(&line).unwrap_err().to_string();
        assert!(err.contains("Unrecognised field: no_such_field"), "{err}");
    }

    /// glibc marks a chunk it mapped on its own with bit 1 of the size
    /// word just before the pointer (`IS_MMAPPED` in malloc.c's chunk
    /// layout); such a chunk goes back to the kernel on free.
    fn is_mapped_on_its_own(pointer: *mut c_void) -> bool {
        // SAFETY: `pointer` is a live allocation from glibc malloc, whose
        // chunk header (the size word) sits in the 8 bytes before it.
        let size_word = unsafe { *(pointer as *const usize).sub(1) };
        size_word & 0b10 != 0
    }

    /// `lvm2_init` turns glibc's mapping of large allocations off for the
    /// whole process (`mallopt(M_MMAP_MAX, 0)` in create_toolcontext), so
    /// every large buffer after it, LVM's own 8 MiB block cache per
    /// command included, came from the heap and kept it large.
    #[test]
    fn large_allocations_are_still_mapped_after_lvm_starts() {
        let _serial = REAL_LVM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        // A fixed threshold, as volumed sets: glibc's own moves up after a
        // large free, which another test could cause.
        // SAFETY: mallopt only changes allocator parameters.
        let threshold_set = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10) };
        assert_eq!(threshold_set, 1);
        let runner = LvmRunner::start().unwrap();
        runner
            .run(&CommandLine::command("version").build().unwrap())
            .unwrap();

        // SAFETY: a plain allocation, checked for null and freed below.
        let pointer = unsafe { libc::malloc(4 << 20) };
        assert!(!pointer.is_null());
        let mapped = is_mapped_on_its_own(pointer);
        // SAFETY: `pointer` came from malloc above and is freed once.
        unsafe { libc::free(pointer) };
        assert!(
            mapped,
            "a 4 MiB allocation came from the heap after lvm2_init"
        );
    }

    fn heap_in_use() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        unsafe { libc::mallinfo2() }.uordblks
    }

    /// liblvm2cmd keeps a few hundred bytes per `lvm2_run` until
    /// `lvm2_exit`; a worker that renews its handle keeps the heap flat.
    #[test]
    fn a_worker_that_renews_its_handle_does_not_grow_with_the_commands_it_ran() {
        let _serial = REAL_LVM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let runner = LvmRunner {
            worker: Arc::new(spawn_worker(40).unwrap()),
        };
        let vgs = CommandLine::command("vgs")
            .config(super::super::MEMLOCK_SETTINGS)
            .args(["-o", "vg_name"])
            .build()
            .unwrap();
        for _ in 0..40 {
            runner.run(&vgs).unwrap();
        }
        let before = heap_in_use();
        for _ in 0..800 {
            runner.run(&vgs).unwrap();
        }
        let grown = heap_in_use().saturating_sub(before);
        // Without renewal: 800 commands keep 200–400 KB.
        assert!(
            grown < 120_000,
            "the heap grew {grown} bytes over 800 commands"
        );
    }

    #[test]
    fn runners_share_one_worker_and_restart_after_the_last_goes() {
        let _serial = REAL_LVM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let first = LvmRunner::start().unwrap();
        let second = LvmRunner::start().unwrap();
        assert!(Arc::ptr_eq(&first.worker, &second.worker));
        let version = CommandLine::command("version").build().unwrap();
        let threads: Vec<_> = [first, second]
            .into_iter()
            .map(|runner| {
                let version = version.clone();
                std::thread::spawn(move || {
                    let output = runner.run(&version).unwrap();
                    assert!(
                        output.messages.iter().any(|m| m.contains("LVM version")),
                        "{output:?}"
                    );
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        // Both runners are gone (tests holding one hold REAL_LVM_TESTS), so
        // the worker has run lvm2_exit; a new one must init afresh.
        assert!(SHARED_WORKER.lock().unwrap().upgrade().is_none());
        let again = LvmRunner::start().unwrap();
        assert!(again.run(&version).is_ok());
    }

    /// Reproduced: the runner swapped the process umask to LVM's 077
    /// around every command, so a directory another thread made meanwhile
    /// with mode 0755 came out 0700.
    #[test]
    fn a_directory_made_while_lvm_runs_gets_its_mode() {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let _serial = REAL_LVM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let runner = LvmRunner::start().unwrap();
        let original = umask(Mode::from_bits_truncate(0o022));
        let dir = tempfile::tempdir().unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let maker = {
            let (done, root) = (done.clone(), dir.path().to_owned());
            std::thread::spawn(move || {
                let mut wrong = Vec::new();
                let mut made = 0;
                while !done.load(std::sync::atomic::Ordering::SeqCst) || made < 50 {
                    let path = root.join(format!("jail-{made}"));
                    std::fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&path)
                        .unwrap();
                    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
                    if mode != 0o755 {
                        wrong.push(mode);
                    }
                    made += 1;
                }
                (made, wrong)
            })
        };
        let line = CommandLine::command("vgs")
            .args(["-o", "vg_name"])
            .build()
            .unwrap();
        for _ in 0..30 {
            runner.run(&line).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let (made, wrong) = maker.join().unwrap();
        let _ = umask(original);
        assert!(
            wrong.is_empty(),
            "{} of {made} directories got mode {:o}",
            wrong.len(),
            wrong.first().copied().unwrap_or(0)
        );
    }

    #[test]
    fn the_process_umask_survives_lvm() {
        let _serial = REAL_LVM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let runner = LvmRunner::start().unwrap();
        let original = umask(Mode::from_bits_truncate(0o027));
        // --config makes LVM reload its configuration, umask included.
        let line = CommandLine::command("vgs")
            .args(["--config", "global/umask=0077", "-o", "vg_name"])
            .build()
            .unwrap();
        let result = runner.run(&line);
        let after = umask(original);
        result.unwrap();
        assert_eq!(after.bits() & 0o777, 0o027, "LVM's umask leaked out");
    }
}
