//! Byte sizes as people write them in config files and on the command line: `512`, `4KiB`,
//! `10MiB`, `1.5GiB`, `2TB`. Binary units are powers of 1024, decimal ones of 1000.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size {input:?}: expected a number with an optional unit such as 512, 64KiB, 10MiB or 2GiB"
)]
pub struct SizeError {
    pub input: String,
}

pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let error = || SizeError {
        input: input.to_string(),
    };
    let text = input.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(error()),
    };
    if number.is_empty() {
        return Err(error());
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(multiplier).ok_or_else(error);
    }
    let fractional: f64 = number.parse().map_err(|_| error())?;
    let bytes = fractional * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(error());
    }
    Ok(bytes.round() as u64)
}

/// Formats a byte count with the largest binary unit that keeps it readable.
pub struct Human(pub u64);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit < UNITS.len() - 1 {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("10 MiB"), Ok(10 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2TB"), Ok(2_000_000_000_000));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
    }

    #[test]
    fn bad_sizes_are_refused() {
        for bad in [
            "",
            "MiB",
            "ten",
            "10 parsecs",
            "-1",
            "99999999999999TiB",
            "1.2.3",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sizes_print() {
        assert_eq!(Human(10).to_string(), "10 B");
        assert_eq!(Human(3 << 29).to_string(), "1.5 GiB");
    }
}

/// A byte size in a config file: a number of bytes or a string such as "10GiB".
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "SizeText", into = "String")]
pub struct ByteSize(pub u64);

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum SizeText {
    Number(u64),
    Text(String),
}

impl TryFrom<SizeText> for ByteSize {
    type Error = SizeError;
    fn try_from(value: SizeText) -> Result<Self, SizeError> {
        match value {
            SizeText::Number(n) => Ok(ByteSize(n)),
            SizeText::Text(t) => parse_size(&t).map(ByteSize),
        }
    }
}

impl From<ByteSize> for String {
    fn from(size: ByteSize) -> String {
        size.0.to_string()
    }
}
