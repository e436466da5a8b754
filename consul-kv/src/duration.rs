//! Go `time.Duration` text, as Consul reads `?wait=` (`10s`, `5m`, `1h30m`,
//! `100ms`, `1.5s`).

use std::time::Duration;

/// Why a duration text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Go duration {text:?}")]
pub struct DurationParseError {
    text: String,
}

/// A parsed Go duration; Go allows negative ones, which callers clamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration {
    pub negative: bool,
    pub magnitude: Duration,
}

const UNITS: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Parses Go's duration syntax: an optional sign, then one or more
/// `<decimal><unit>` groups; a bare `0` is allowed.
pub fn parse_go_duration(text: &str) -> Result<GoDuration, DurationParseError> {
    let err = || DurationParseError {
        text: text.to_owned(),
    };
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(GoDuration {
            negative,
            magnitude: Duration::ZERO,
        });
    }
    if rest.is_empty() {
        return Err(err());
    }
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        let (number, after) = rest.split_at(number_len);
        let (whole, fraction) = match number.split_once('.') {
            Some((w, f)) => (w, f),
            None => (number, ""),
        };
        if (whole.is_empty() && fraction.is_empty())
            || !fraction.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(err());
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, scale)| *scale)
            .ok_or_else(err)?;
        let whole_value: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| err())?
        };
        let mut nanos = whole_value.checked_mul(scale).ok_or_else(err)?;
        // Fractions below a nanosecond are dropped, as Go does.
        let mut place = scale;
        for digit in fraction.bytes() {
            place /= 10;
            if place == 0 {
                break;
            }
            nanos += u128::from(digit - b'0') * place;
        }
        total_nanos = total_nanos.checked_add(nanos).ok_or_else(err)?;
        rest = next;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| err())?;
    let subsec = (total_nanos % 1_000_000_000) as u32;
    Ok(GoDuration {
        negative,
        magnitude: Duration::new(secs, subsec),
    })
}

/// Formats a duration so that Go (and so Consul) parses it back exactly.
pub fn format_go_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if u128::from(duration.subsec_nanos() % 1_000_000) == 0 {
        format!("{millis}ms")
    } else {
        format!("{}ns", duration.as_nanos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Duration {
        let parsed = parse_go_duration(text).unwrap();
        assert!(!parsed.negative);
        parsed.magnitude
    }

    #[test]
    fn parses_go_forms() {
        assert_eq!(parse("10s"), Duration::from_secs(10));
        assert_eq!(parse("5m"), Duration::from_secs(300));
        assert_eq!(parse("100ms"), Duration::from_millis(100));
        assert_eq!(parse("1h30m"), Duration::from_secs(5400));
        assert_eq!(parse("1.5s"), Duration::from_millis(1500));
        assert_eq!(parse(".5s"), Duration::from_millis(500));
        assert_eq!(parse("250us"), Duration::from_micros(250));
        assert_eq!(parse("250µs"), Duration::from_micros(250));
        assert_eq!(parse("7ns"), Duration::from_nanos(7));
        assert_eq!(parse("0"), Duration::ZERO);
        assert!(parse_go_duration("-3s").unwrap().negative);
    }

    #[test]
    fn refuses_malformed() {
        for bad in ["", "10", "s", "5x", "1.2.3s", "-", "ms10", "5 s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::from_millis(100),
            Duration::from_secs(300),
            Duration::from_nanos(1_500),
        ] {
            assert_eq!(parse(&format_go_duration(d)), d);
        }
    }

    proptest::proptest! {
        // `?wait=` is untrusted input: no text may panic the parser.
        #[test]
        fn never_panics(text in "[-+0-9.a-zµμ]{0,12}") {
            let _ = parse_go_duration(&text);
        }

        #[test]
        fn formatted_durations_parse_back(nanos in 0u64..(20 * 60 * 1_000_000_000)) {
            let duration = Duration::from_nanos(nanos);
            proptest::prop_assert_eq!(parse(&format_go_duration(duration)), duration);
        }
    }
}
