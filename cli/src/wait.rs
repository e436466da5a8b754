//! Waiting for a host to act on a request, with blocking queries, progress
//! and a deadline.

use std::time::Duration;

use consul_kv::{BlockingQuery, ConsulKv, KvPair};
use tokio::time::Instant;
use volume_control::layout::{VolumeSpec, VolumeState};
use volume_model::units::Bytes;

use crate::error::{CliError, WaitTimedOut};
use crate::format;
use crate::store::{self, Ctx, StatusEntry};
use crate::ui::Ui;

/// Longest blocking wait per read: short on a terminal, so the elapsed
/// seconds keep counting; longer otherwise, to notice status errors
/// while waiting on another key.
pub(crate) fn tick(ui: &Ui<'_>) -> Duration {
    if ui.err_is_terminal() {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    }
}

/// Least time between two reads, should the server answer at once.
const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// When to give up, and how the timeout is named in the message.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
    pub timeout: Duration,
}

impl Deadline {
    pub fn after(timeout: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + timeout,
            timeout,
        }
    }
}

/// Blocking reads of one key: each returns once the key changed, after
/// `wait`, or `None` at the deadline.
pub(crate) struct KeyWatch {
    key: String,
    index: u64,
    last_request: Option<Instant>,
}

impl KeyWatch {
    pub(crate) fn new(key: String) -> KeyWatch {
        KeyWatch {
            key,
            index: 0,
            last_request: None,
        }
    }

    pub(crate) async fn next(
        &mut self,
        kv: &ConsulKv,
        deadline: Deadline,
        wait: Duration,
    ) -> Result<Option<Option<KvPair>>, CliError> {
        if let Some(last) = self.last_request {
            tokio::time::sleep_until((last + MIN_INTERVAL).min(deadline.at)).await;
        }
        let now = Instant::now();
        if now >= deadline.at {
            return Ok(None);
        }
        let remaining = deadline.at - now;
        self.last_request = Some(now);
        let read = async {
            if self.index == 0 {
                kv.get(&self.key).await
            } else {
                let query = BlockingQuery {
                    index: self.index,
                    wait: wait.min(remaining),
                };
                kv.get_blocking(&self.key, query).await
            }
        };
        let answer = match tokio::time::timeout(remaining, read).await {
            Err(_) => return Ok(None),
            Ok(answer) => answer?,
        };
        // An index that went backwards (a new store) restarts with a
        // plain read; below 1 would not block.
        self.index = if answer.index < self.index {
            0
        } else {
            answer.index.max(1)
        };
        Ok(Some(answer.value))
    }
}

/// Progress of one wait: a redrawn line on a terminal, else a line per
/// change of state.
struct Progress {
    subject: String,
    started: Instant,
    last: Option<String>,
}

impl Progress {
    fn new(spec: &VolumeSpec) -> Progress {
        Progress {
            subject: format!("{} on {}", spec.id, spec.host),
            started: Instant::now(),
            last: None,
        }
    }

    fn report(&mut self, ui: &mut Ui<'_>, state: String) {
        if ui.err_is_terminal() || self.last.as_ref() != Some(&state) {
            ui.progress(&self.subject, &state, self.started.elapsed());
        }
        self.last = Some(state);
    }
}

fn describe(entry: &StatusEntry) -> String {
    format!(
        "{}, {}",
        entry.status.state.as_str(),
        format::size(entry.status.size)
    )
}

/// `saw_status`: whether the host ever reported on the volume; if not,
/// its daemon may not be running.
fn timed_out(
    spec: &VolumeSpec,
    goal: String,
    last_state: Option<String>,
    saw_status: bool,
    deadline: Deadline,
) -> CliError {
    let hint = if saw_status {
        String::new()
    } else {
        format!(" (is volumed running on {}?)", spec.host)
    };
    CliError::TimedOut(Box::new(WaitTimedOut {
        id: spec.id.clone(),
        host: spec.host.clone(),
        goal,
        last_state: last_state.unwrap_or_else(|| "not read yet".to_owned()),
        timeout: deadline.timeout,
        hint: format!(
            "{hint}; the request stays recorded: see `volctl show {}`",
            spec.id
        ),
    }))
}

fn failed(spec: &VolumeSpec, entry: &StatusEntry) -> CliError {
    CliError::VolumeFailed {
        id: spec.id.clone(),
        host: spec.host.clone(),
        message: entry
            .status
            .error
            .clone()
            .unwrap_or_else(|| "its host reported an error without details".to_owned()),
    }
}

/// What counts as done.
#[derive(Debug, Clone, Copy)]
pub enum Ready {
    /// A new volume: ready at all.
    Created,
    /// A grown volume: ready and larger than it was.
    GrownFrom(Bytes),
}

/// Waits for the host to report the volume `ready` (an `error` status
/// written after `after_index`, the index of the request, fails).
pub async fn until_ready(
    ctx: &Ctx,
    spec: &VolumeSpec,
    after_index: u64,
    ready: Ready,
    deadline: Deadline,
    ui: &mut Ui<'_>,
) -> Result<StatusEntry, CliError> {
    let goal = match ready {
        Ready::Created => "ready".to_owned(),
        Ready::GrownFrom(_) => format!("ready at {}", format::size(spec.size)),
    };
    let mut watch = KeyWatch::new(ctx.layout.status(&spec.host, &spec.id));
    let mut progress = Progress::new(spec);
    let wait = tick(ui);
    let mut saw_status = false;
    loop {
        let Some(pair) = watch.next(&ctx.kv, deadline, wait).await? else {
            ui.end_progress();
            return Err(timed_out(spec, goal, progress.last, saw_status, deadline));
        };
        let state = match pair {
            None => "no status yet".to_owned(),
            Some(pair) => {
                saw_status = true;
                let entry = StatusEntry::decode(&pair)?;
                let fresh = entry.index > after_index;
                let done = entry.status.state == VolumeState::Ready
                    && match ready {
                        Ready::Created => true,
                        Ready::GrownFrom(previous) => entry.status.size > previous,
                    };
                if done {
                    progress.report(ui, describe(&entry));
                    ui.end_progress();
                    return Ok(entry);
                }
                if fresh && entry.status.state == VolumeState::Error {
                    ui.end_progress();
                    return Err(failed(spec, &entry));
                }
                describe(&entry)
            }
        };
        progress.report(ui, state);
    }
}

/// Waits until the volume's desired record is gone: its host has removed
/// the volume and released the reservation.
pub async fn until_gone(
    ctx: &Ctx,
    spec: &VolumeSpec,
    after_index: u64,
    deadline: Deadline,
    ui: &mut Ui<'_>,
) -> Result<(), CliError> {
    let mut watch = KeyWatch::new(ctx.layout.desired(&spec.host, &spec.id));
    let mut progress = Progress::new(spec);
    let wait = tick(ui);
    let mut saw_status = false;
    loop {
        let Some(desired) = watch.next(&ctx.kv, deadline, wait).await? else {
            ui.end_progress();
            let goal = "gone".to_owned();
            return Err(timed_out(spec, goal, progress.last, saw_status, deadline));
        };
        if desired.is_none() {
            progress.report(ui, "gone".to_owned());
            ui.end_progress();
            return Ok(());
        }
        let status = store::read_status(ctx, &spec.host, &spec.id).await?;
        saw_status |= status.is_some();
        let state = match status {
            None => "destroy requested, no status".to_owned(),
            Some(entry)
                if entry.index > after_index && entry.status.state == VolumeState::Error =>
            {
                ui.end_progress();
                return Err(failed(spec, &entry));
            }
            Some(entry) => describe(&entry),
        };
        progress.report(ui, state);
    }
}
