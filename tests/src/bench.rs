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
