//! Durations as people write them: `90s`, `15m`, `24h`, `90d`, `1h30m`, `500ms`.
//!
//! Written by hand rather than with a crate: the accepted grammar is a handful
//! of units, and the formatter must print the exact unit back (`90d`, not
//! `2months 29days 13h`).

use std::time::Duration;

use crate::error::{Error, Result};

/// Largest duration accepted anywhere (100 years), so arithmetic never overflows.
pub const MAX: Duration = Duration::from_secs(100 * 366 * 86_400);

/// Parses a duration string, naming `field` in the error.
///
/// ```
/// use keysmith::duration::parse;
/// assert_eq!(parse("ttl", "1h30m").unwrap().as_secs(), 5400);
/// assert!(parse("ttl", "").is_err());
/// assert!(parse("ttl", "10").is_err());
/// ```
pub fn parse(field: &str, input: &str) -> Result<Duration> {
    let bad = || {
        Error::invalid_input(
            field,
            format!("`{input}` is not a duration such as 500ms, 90s, 15m, 24h or 90d"),
        )
    };
    let s = input.trim();
    if s.is_empty() || s.len() > 64 {
        return Err(bad());
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return Err(bad());
        }
        let value: u128 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u128 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += value * unit_ms;
    }
    let duration = Duration::from_millis(u64::try_from(total).map_err(|_| bad())?);
    if duration > MAX {
        return Err(Error::invalid_input(
            field,
            format!("`{input}` is longer than 100 years"),
        ));
    }
    Ok(duration)
}

/// Formats a duration in the largest unit that divides it exactly.
///
/// ```
/// use std::time::Duration;
/// use keysmith::duration::format;
/// assert_eq!(format(Duration::from_secs(90 * 86_400)), "90d");
/// assert_eq!(format(Duration::from_secs(5400)), "90m");
/// assert_eq!(format(Duration::ZERO), "0s");
/// ```
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// Serde helpers: a duration as a human string (`"24h"`).
pub mod serde_human {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes as `"24h"`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    /// Deserializes from `"24h"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        super::parse("duration", &s).map_err(serde::de::Error::custom)
    }

    /// The same for `Option<Duration>`.
    pub mod option {
        use super::*;

        /// Serializes as `"24h"` or null.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_str(&crate::duration::format(*d)),
                None => s.serialize_none(),
            }
        }

        /// Deserializes from `"24h"` or null.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let s = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
            s.map(|s| crate::duration::parse("duration", &s).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

/// Serde helper: a duration as whole milliseconds, for records.
pub mod serde_millis {
    use std::time::Duration;

    use serde::Serializer;

    /// Serializes as a number of milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let table = [
            ("500ms", 500),
            ("90s", 90_000),
            ("15m", 900_000),
            ("24h", 86_400_000),
            ("90d", 7_776_000_000),
            ("1h30m", 5_400_000),
            ("0s", 0),
            (" 2h ", 7_200_000),
        ];
        for (input, ms) in table {
            assert_eq!(
                parse("f", input).unwrap(),
                Duration::from_millis(ms),
                "{input}"
            );
        }
        for bad in [
            "",
            "h",
            "10",
            "1x",
            "-5s",
            "1.5h",
            "1 h",
            "5S",
            "99999999999999d",
            "40000d",
        ] {
            let err = parse("grace_period", bad).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidInput { field, .. } if field == "grace_period"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn format_round_trips() {
        for ms in [
            1u64,
            999,
            1000,
            60_000,
            61_000,
            3_600_000,
            86_400_000,
            7_776_000_000,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse("f", &format(d)).unwrap(), d);
        }
    }
}
