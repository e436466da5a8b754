//! Human output: aligned tables, decimal sizes, ages.

use std::io::{self, Write};
use volume_model::units::Bytes;

/// Decimal units, the ones `--size` is given in, with one decimal.
pub fn size(bytes: Bytes) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1_000_000_000_000, "TB"),
        (1_000_000_000, "GB"),
        (1_000_000, "MB"),
        (1_000, "kB"),
    ];
    for (unit, name) in UNITS {
        if bytes.0 >= unit {
            let tenths = (u128::from(bytes.0) * 10 + u128::from(unit) / 2) / u128::from(unit);
            return if tenths % 10 == 0 {
                format!("{} {name}", tenths / 10)
            } else {
                format!("{}.{} {name}", tenths / 10, tenths % 10)
            };
        }
    }
    format!("{} B", bytes.0)
}

/// `42s`, `5m`, `3h`, `2d`: coarse, for heartbeat ages.
pub fn age(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Columns padded to their widest cell; numbers are right-aligned.
pub struct Table {
    header: Vec<&'static str>,
    right_aligned: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A header starting with `>` is right-aligned (the `>` is not shown).
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.iter().map(|h| h.trim_start_matches('>')).collect(),
            right_aligned: header.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let pad = widths[i] - cell.chars().count();
                if i > 0 {
                    line.push_str("  ");
                }
                if self.right_aligned[i] {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    if i + 1 < row.len() {
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                }
            }
            writeln!(out, "{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_decimal_like_the_flag() {
        assert_eq!(size(Bytes(25_000_000_000)), "25 GB");
        assert_eq!(size(Bytes(1_250_000_000)), "1.3 GB");
        assert_eq!(size(Bytes(64 << 20)), "67.1 MB");
        assert_eq!(size(Bytes(999)), "999 B");
        assert_eq!(size(Bytes(3_000_000_000_000)), "3 TB");
    }

    #[test]
    fn ages_are_coarse() {
        assert_eq!(age(4_900), "4s");
        assert_eq!(age(600_000), "10m");
        assert_eq!(age(3 * 86_400_000), "3d");
    }

    #[test]
    fn tables_align() {
        let mut table = Table::new(&["ID", ">SIZE", "STATE"]);
        table.row(vec!["a".into(), "25 GB".into(), "ready".into()]);
        table.row(vec!["bbbb".into(), "1 GB".into(), "creating".into()]);
        let mut out = Vec::new();
        table.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID     SIZE  STATE\na     25 GB  ready\nbbbb   1 GB  creating\n"
        );
    }
}
