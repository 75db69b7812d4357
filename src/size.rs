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

/// Local space in a config file: a byte size as [`ByteSize`] takes, or a share of the file
/// system it lives on, `"25%"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "SizeText")]
pub enum Space {
    Bytes(u64),
    /// Percent of the file system's size, 0 to 100.
    Percent(u8),
}

impl Space {
    /// The bytes this stands for on a file system of `total` bytes.
    pub fn bytes_of(self, total: u64) -> u64 {
        match self {
            Space::Bytes(bytes) => bytes,
            Space::Percent(percent) => (u128::from(total) * u128::from(percent) / 100) as u64,
        }
    }
}

impl TryFrom<SizeText> for Space {
    type Error = SizeError;
    fn try_from(value: SizeText) -> Result<Self, SizeError> {
        if let SizeText::Text(text) = &value
            && let Some(number) = text.trim().strip_suffix('%')
        {
            return match number.trim().parse::<u8>() {
                Ok(percent) if percent <= 100 => Ok(Space::Percent(percent)),
                _ => Err(SizeError {
                    input: text.clone(),
                }),
            };
        }
        ByteSize::try_from(value).map(|size| Space::Bytes(size.0))
    }
}

#[cfg(test)]
mod space_tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Holder {
        space: Space,
    }

    fn parse(text: &str) -> Result<Space, String> {
        toml::from_str::<Holder>(&format!("space = {text}"))
            .map(|h| h.space)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn spaces_are_sizes_or_shares() {
        assert_eq!(parse("\"4GiB\""), Ok(Space::Bytes(4 << 30)));
        assert_eq!(parse("1024"), Ok(Space::Bytes(1024)));
        assert_eq!(parse("\"25%\""), Ok(Space::Percent(25)));
        assert_eq!(Space::Percent(25).bytes_of(1000), 250);
        assert_eq!(Space::Bytes(7).bytes_of(1000), 7);
        assert_eq!(Space::Percent(100).bytes_of(u64::MAX), u64::MAX);
        for bad in ["\"101%\"", "\"-5%\"", "\"%\"", "\"2.5%\"", "\"lots\""] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
    }
}
