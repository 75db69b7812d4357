//! The bandwidth limiter: one token bucket for uploads and one for downloads, with a base
//! rate and an optional weekly schedule of windows that override it (say 10 MiB/s up on
//! weekdays 08:00 to 18:00, unlimited otherwise). The policy can be replaced while running.
//!
//! A transfer takes its tokens up front and may drive the bucket into debt; the next caller
//! waits the debt out. Over many transfers the rate holds; a single large transfer waits
//! first and then goes at link speed.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{Datelike, Timelike};
use serde::{Deserialize, Serialize};

use super::{Meta, Object, ObjectInfo, Remote, Result};
use crate::size::{Human, parse_size};

/// Bytes per second; zero means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate(pub u64);

impl TryFrom<String> for Rate {
    type Error = String;
    fn try_from(text: String) -> std::result::Result<Self, String> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("unlimited") {
            return Ok(Rate(0));
        }
        let t = t.strip_suffix("/s").unwrap_or(t);
        parse_size(t).map(Rate).map_err(|e| e.to_string())
    }
}

impl From<Rate> for String {
    fn from(rate: Rate) -> String {
        rate.to_string()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => write!(f, "unlimited"),
            n if n % (1 << 20) == 0 => write!(f, "{}MiB/s", n >> 20),
            n if n % (1 << 10) == 0 => write!(f, "{}KiB/s", n >> 10),
            n => write!(f, "{}/s", Human(n)),
        }
    }
}

/// Days of the week as a bit set, Monday = bit 0. Written `mon-fri`, `sat,sun`, `daily`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Days(u8);

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl TryFrom<String> for Days {
    type Error = String;
    fn try_from(text: String) -> std::result::Result<Self, String> {
        let day = |name: &str| {
            DAY_NAMES
                .iter()
                .position(|d| name.trim().eq_ignore_ascii_case(d))
                .ok_or_else(|| format!("unknown day {name:?} in {text:?} (use mon..sun, e.g. \"mon-fri\" or \"sat,sun\")"))
        };
        if text.trim().eq_ignore_ascii_case("daily") {
            return Ok(Days(0x7f));
        }
        let mut bits = 0u8;
        for part in text.split(',') {
            match part.split_once('-') {
                Some((from, to)) => {
                    let (from, to) = (day(from)?, day(to)?);
                    let mut d = from;
                    loop {
                        bits |= 1 << d;
                        if d == to {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
                None => bits |= 1 << day(part)?,
            }
        }
        Ok(Days(bits))
    }
}

impl From<Days> for String {
    fn from(days: Days) -> String {
        if days.0 == 0x7f {
            return "daily".to_string();
        }
        let names: Vec<&str> = (0..7)
            .filter(|d| days.0 & (1 << d) != 0)
            .map(|d| DAY_NAMES[d])
            .collect();
        names.join(",")
    }
}

/// A time of day, `HH:MM`, kept as minutes since midnight. `24:00` ends a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TimeOfDay(u32);

impl TryFrom<String> for TimeOfDay {
    type Error = String;
    fn try_from(text: String) -> std::result::Result<Self, String> {
        let bad = || format!("invalid time {text:?}: expected HH:MM, 00:00 to 24:00");
        let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
        let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if m >= 60 || h * 60 + m > 24 * 60 {
            return Err(bad());
        }
        Ok(TimeOfDay(h * 60 + m))
    }
}

impl From<TimeOfDay> for String {
    fn from(t: TimeOfDay) -> String {
        format!("{:02}:{:02}", t.0 / 60, t.0 % 60)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub days: Days,
    pub start: TimeOfDay,
    pub end: TimeOfDay,
    #[serde(default)]
    pub upload: Rate,
    #[serde(default)]
    pub download: Rate,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Outside every window.
    #[serde(default)]
    pub upload: Rate,
    #[serde(default)]
    pub download: Rate,
    /// The first window that contains the current local time wins.
    #[serde(default)]
    pub schedule: Vec<Window>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Upload,
    Download,
}

impl Policy {
    /// The rate in force on `weekday` (0 = Monday) at `minute` past midnight.
    pub fn rate_at(&self, direction: Direction, weekday: u32, minute: u32) -> Rate {
        let pick = |upload: Rate, download: Rate| match direction {
            Direction::Upload => upload,
            Direction::Download => download,
        };
        self.schedule
            .iter()
            .find(|w| w.days.0 & (1 << weekday) != 0 && w.start.0 <= minute && minute < w.end.0)
            .map(|w| pick(w.upload, w.download))
            .unwrap_or_else(|| pick(self.upload, self.download))
    }
}

/// How far ahead of the rate a bucket may run after a quiet spell.
const BURST: Duration = Duration::from_millis(250);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct Limiter {
    policy: RwLock<Policy>,
    upload: Mutex<Bucket>,
    download: Mutex<Bucket>,
}

impl Limiter {
    pub fn new(policy: Policy) -> Self {
        let bucket = || {
            Mutex::new(Bucket {
                tokens: 0.0,
                last: Instant::now(),
            })
        };
        Limiter {
            policy: RwLock::new(policy),
            upload: bucket(),
            download: bucket(),
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    pub fn rate_now(&self, direction: Direction) -> Rate {
        let now = chrono::Local::now();
        let minute = now.hour() * 60 + now.minute();
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .rate_at(direction, now.weekday().num_days_from_monday(), minute)
    }

    /// Waits until `bytes` more may pass in `direction` under the rate in force.
    pub async fn acquire(&self, direction: Direction, bytes: u64) {
        let rate = self.rate_now(direction).0;
        if rate == 0 || bytes == 0 {
            return;
        }
        let bucket = match direction {
            Direction::Upload => &self.upload,
            Direction::Download => &self.download,
        };
        let wait = {
            let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let rate = rate as f64;
            let refill = now.duration_since(b.last).as_secs_f64() * rate;
            b.tokens = (b.tokens + refill).min(rate * BURST.as_secs_f64());
            b.last = now;
            b.tokens -= bytes as f64;
            if b.tokens < 0.0 {
                Duration::from_secs_f64(-b.tokens / rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[derive(Debug)]
pub struct Limited {
    inner: Arc<dyn Remote>,
    limiter: Arc<Limiter>,
}

impl Limited {
    pub fn new(inner: Arc<dyn Remote>, limiter: Arc<Limiter>) -> Self {
        Limited { inner, limiter }
    }
}

#[async_trait]
impl Remote for Limited {
    async fn put(&self, key: &str, body: Bytes, meta: Meta) -> Result<()> {
        self.limiter
            .acquire(Direction::Upload, body.len() as u64)
            .await;
        self.inner.put(key, body, meta).await
    }

    async fn get(&self, key: &str) -> Result<Object> {
        let object = self.inner.get(key).await?;
        self.limiter
            .acquire(Direction::Download, object.body.len() as u64)
            .await;
        Ok(object)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let body = self.inner.get_range(key, range).await?;
        self.limiter
            .acquire(Direction::Download, body.len() as u64)
            .await;
        Ok(body)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml_text: &str) -> Policy {
        toml::from_str(toml_text).expect("valid policy")
    }

    #[test]
    fn schedule_windows_override_the_base_rate() {
        let p = policy(
            r#"
            upload = "unlimited"
            [[schedule]]
            days = "mon-fri"
            start = "08:00"
            end = "18:00"
            upload = "10MiB"
            "#,
        );
        let up = |day, minute| p.rate_at(Direction::Upload, day, minute).0;
        assert_eq!(up(0, 8 * 60), 10 << 20, "Monday 08:00 is in the window");
        assert_eq!(
            up(4, 17 * 60 + 59),
            10 << 20,
            "Friday 17:59 is in the window"
        );
        assert_eq!(up(4, 18 * 60), 0, "the window ends at 18:00");
        assert_eq!(up(5, 12 * 60), 0, "Saturday is outside");
        assert_eq!(up(2, 7 * 60 + 59), 0, "before the window");
        assert_eq!(p.rate_at(Direction::Download, 0, 9 * 60).0, 0);
    }

    #[test]
    fn day_ranges_wrap_and_round_trip() {
        let days = Days::try_from("fri-mon".to_string()).expect("valid");
        assert_eq!(String::from(days), "mon,fri,sat,sun");
        assert!(Days::try_from("funday".to_string()).is_err());
        assert!(TimeOfDay::try_from("25:00".to_string()).is_err());
        assert!(TimeOfDay::try_from("12:60".to_string()).is_err());
        let p = policy("upload = \"20MiB/s\"\ndownload = \"512KiB\"");
        let again: Policy =
            serde_json::from_str(&serde_json::to_string(&p).expect("json")).expect("round trip");
        assert_eq!(p, again);
    }

    #[tokio::test]
    async fn the_limiter_holds_its_rate() {
        let limiter = Limiter::new(policy("upload = \"4MiB\""));
        let started = Instant::now();
        // 2 MiB at 4 MiB/s, in 64 pieces: about half a second (less the burst allowance).
        for _ in 0..64 {
            limiter.acquire(Direction::Upload, 32 << 10).await;
        }
        let took = started.elapsed().as_secs_f64();
        assert!(
            (0.4..0.8).contains(&took),
            "took {took:.3}s, expected about 0.5s"
        );
        // Downloads are not limited by this policy.
        let started = Instant::now();
        limiter.acquire(Direction::Download, 1 << 30).await;
        assert!(started.elapsed() < Duration::from_millis(50));
    }
}
