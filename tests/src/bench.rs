//! What the benchmarks print: medians and every run.

use std::time::Duration;

/// The middle value (the upper one of an even count).
pub fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// Every run in seconds, with `decimals` places, comma-separated.
pub fn seconds_each(values: &[Duration], decimals: usize) -> String {
    values
        .iter()
        .map(|d| format!("{:.decimals$}", d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `--volumes N --batch B` of the benchmarks that create in batches.
pub struct BatchArgs {
    pub volumes: usize,
    pub batch: usize,
}

impl BatchArgs {
    /// Parsed from this process's arguments, starting from the defaults.
    pub fn parse(volumes: usize, batch: usize) -> BatchArgs {
        let mut args = BatchArgs { volumes, batch };
        let mut words = std::env::args().skip(1);
        while let Some(word) = words.next() {
            let value = words
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{word} needs a number"));
            match word.as_str() {
                "--volumes" => args.volumes = value,
                "--batch" => args.batch = value,
                other => panic!("unknown argument {other} (--volumes N, --batch B)"),
            }
        }
        assert!(args.batch > 0, "--batch must be at least 1");
        args
    }
}
