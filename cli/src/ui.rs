//! Where a command writes: results to `out`, progress and warnings to `err`,
//! and, on a terminal, questions to the operator.

use std::io::{self, Write};
use std::time::Duration;

/// Asks the operator a yes/no question; `Ok(true)` means yes.
pub type Confirm<'a> = dyn FnMut(&str) -> io::Result<bool> + Send + 'a;

pub struct Ui<'a> {
    out: &'a mut (dyn Write + Send),
    err: &'a mut (dyn Write + Send),
    /// Progress redraws one line when `err` is a terminal, else prints
    /// a plain line per change.
    err_is_terminal: bool,
    /// Present only when someone can answer (stdin and stderr are terminals).
    confirm: Option<&'a mut Confirm<'a>>,
    /// A redrawn progress line is on screen and must be ended before other output.
    progress_drawn: bool,
}

impl<'a> Ui<'a> {
    /// Plain output with no terminal: what scripts and tests get.
    pub fn new(out: &'a mut (dyn Write + Send), err: &'a mut (dyn Write + Send)) -> Self {
        Ui {
            out,
            err,
            err_is_terminal: false,
            confirm: None,
            progress_drawn: false,
        }
    }

    pub fn with_terminal_progress(mut self, err_is_terminal: bool) -> Self {
        self.err_is_terminal = err_is_terminal;
        self
    }

    pub fn with_confirm(mut self, confirm: &'a mut Confirm<'a>) -> Self {
        self.confirm = Some(confirm);
        self
    }

    pub fn out(&mut self) -> &mut (dyn Write + Send) {
        &mut *self.out
    }

    pub fn err_is_terminal(&self) -> bool {
        self.err_is_terminal
    }

    /// A warning line on stderr (never fails the command).
    pub fn warn(&mut self, message: &str) {
        self.end_progress();
        let _ = writeln!(self.err, "volctl: warning: {message}");
    }

    /// A line on stderr between progress reports (a step reached).
    pub fn note(&mut self, line: &str) {
        self.end_progress();
        let _ = writeln!(self.err, "{line}");
    }

    /// `None` when nobody can answer.
    pub fn confirm(&mut self, question: &str) -> Option<io::Result<bool>> {
        self.end_progress();
        self.confirm.as_mut().map(|confirm| confirm(question))
    }

    /// One progress report: redraws the line on a terminal, else prints it.
    pub fn progress(&mut self, subject: &str, state: &str, elapsed: Duration) {
        let line = format!("{subject}: {state} ({}s)", elapsed.as_secs());
        // Progress is best effort: a closed stderr must not fail the command.
        let _ = if self.err_is_terminal {
            self.progress_drawn = true;
            write!(self.err, "\r\x1b[2K{line}").and_then(|()| self.err.flush())
        } else {
            writeln!(self.err, "{line}")
        };
    }

    /// Ends a redrawn progress line so the next output starts on its own.
    pub fn end_progress(&mut self) {
        if std::mem::take(&mut self.progress_drawn) {
            let _ = writeln!(self.err);
        }
    }
}
