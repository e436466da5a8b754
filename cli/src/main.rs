//! volctl: the operator's command-line client (see ARCHITECTURE.md and
//! `volctl --help`, which lists the exit codes).

use std::io::{self, BufRead, IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use volctl::{exit, Cli, Ui};

/// Reads a yes/no answer from the terminal.
fn ask(question: &str) -> io::Result<bool> {
    let mut err = io::stderr();
    write!(err, "{question}")?;
    err.flush()?;
    let mut answer = String::new();
    io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run(&cli)),
        Err(error) => {
            eprintln!("volctl: cannot start: {error}");
            exit::ERROR
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

async fn run(cli: &Cli) -> i32 {
    let interactive = io::stdin().is_terminal() && io::stderr().is_terminal();
    let mut out = io::stdout();
    let mut err = io::stderr();
    let mut confirm = ask;
    let mut ui = Ui::new(&mut out, &mut err).with_terminal_progress(io::stderr().is_terminal());
    if interactive {
        ui = ui.with_confirm(&mut confirm);
    }
    let result = match volctl::client(&cli.global, |name| std::env::var(name).ok()) {
        Ok(kv) => volctl::run(cli, kv, &mut ui).await,
        Err(error) => Err(error),
    };
    ui.end_progress();
    let _ = out.flush();
    match result {
        Ok(()) => exit::OK,
        Err(error) => {
            eprintln!("volctl: {error}");
            for detail in error.details() {
                eprintln!("  {detail}");
            }
            error.exit_code()
        }
    }
}
