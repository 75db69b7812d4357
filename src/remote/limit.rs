//! The bandwidth limiter: one token bucket for uploads and one for downloads, with a base
//! rate and an optional weekly schedule of windows that override it (say 10 MiB/s up on
//! weekdays 08:00 to 18:00, unlimited otherwise). A rate is a number of bytes per second,
//! `unlimited`, or `paused`. The policy can be replaced while running.
//!
//! The limiter is not a wrapper around whole requests: it sits where bytes move. The S3
//! backend's HTTP client ([`Throttled`] bodies) charges every request and response body in
//! slices as they go over the wire, so parts in parallel share the rate, and every retry (the
//! client's own and firn's) pays again. The directory store charges each slice it writes or
//! reads. A slice may drive its bucket into debt; the next slice waits the debt out. Every wait
//! re-reads the policy (and is woken when it changes), so a new limit, a pause or its end takes
//! effect at once.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{Datelike, Timelike};
use serde::{Deserialize, Serialize};

use crate::size::parse_size;

/// A limit on one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Rate {
    #[default]
    Unlimited,
    /// Nothing moves until the policy changes or a window ends.
    Paused,
    /// Bytes per second, at least 1.
    PerSecond(u64),
}

impl TryFrom<String> for Rate {
    type Error = String;
    fn try_from(text: String) -> std::result::Result<Self, String> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("unlimited") {
            return Ok(Rate::Unlimited);
        }
        if t.eq_ignore_ascii_case("paused") {
            return Ok(Rate::Paused);
        }
        let number = t.strip_suffix("/s").unwrap_or(t);
        match parse_size(number) {
            // "0" (or "0.4", which rounds to it) used to mean unlimited: ask which is meant.
            Ok(0) => Err(format!(
                "rate {t:?} is zero: write \"paused\" to stop transfers or \"unlimited\" for no limit"
            )),
            Ok(n) => Ok(Rate::PerSecond(n)),
            Err(e) => Err(format!(
                "{e}: a rate is a size per second (\"10MiB\", \"512KiB/s\"), \"unlimited\" or \"paused\""
            )),
        }
    }
}

impl From<Rate> for String {
    fn from(rate: Rate) -> String {
        rate.to_string()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Rate::Unlimited => write!(f, "unlimited"),
            Rate::Paused => write!(f, "paused"),
            Rate::PerSecond(n) if n % (1 << 20) == 0 => write!(f, "{}MiB/s", n >> 20),
            Rate::PerSecond(n) if n % (1 << 10) == 0 => write!(f, "{}KiB/s", n >> 10),
            // Exact, so the text reads back as the same rate.
            Rate::PerSecond(n) => write!(f, "{n}/s"),
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
        // Compare before multiplying: a large hour would wrap around into the day.
        if h > 24 || m >= 60 || h * 60 + m > 24 * 60 {
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

/// Rates for a span of the day on some days. A window whose end comes before its start
/// runs past midnight: it starts on its days and ends the next morning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "WindowFields")]
pub struct Window {
    pub days: Days,
    pub start: TimeOfDay,
    pub end: TimeOfDay,
    #[serde(default)]
    pub upload: Rate,
    #[serde(default)]
    pub download: Rate,
}

/// A window as written, checked into a `Window`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowFields {
    days: Days,
    start: TimeOfDay,
    end: TimeOfDay,
    #[serde(default)]
    upload: Rate,
    #[serde(default)]
    download: Rate,
}

impl TryFrom<WindowFields> for Window {
    type Error = String;

    fn try_from(w: WindowFields) -> Result<Window, String> {
        if w.start == w.end {
            return Err(format!(
                "a window's start and end must differ (both are {}); one past midnight ends the next day, e.g. start = \"20:00\", end = \"06:00\"",
                String::from(w.start)
            ));
        }
        Ok(Window {
            days: w.days,
            start: w.start,
            end: w.end,
            upload: w.upload,
            download: w.download,
        })
    }
}

impl Window {
    /// Whether the window holds on `weekday` (0 = Monday) at `minute` past midnight.
    fn holds(&self, weekday: u32, minute: u32) -> bool {
        let on = |day: u32| self.days.0 & (1 << day) != 0;
        let (start, end) = (self.start.0, self.end.0);
        if start < end {
            on(weekday) && start <= minute && minute < end
        } else {
            // Past midnight: the evening of one of its days, or the morning after.
            (on(weekday) && start <= minute) || (on((weekday + 6) % 7) && minute < end)
        }
    }
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
            .find(|w| w.holds(weekday, minute))
            .map(|w| pick(w.upload, w.download))
            .unwrap_or_else(|| pick(self.upload, self.download))
    }
}

/// How far ahead of the rate a bucket may run after a quiet spell.
const BURST: Duration = Duration::from_millis(250);
/// The most one charge takes at once; larger bodies are charged (and sent) slice by slice.
pub const SLICE: usize = 64 << 10;
/// A paused or waiting transfer looks at the clock (for schedule windows) at least this often.
const RECHECK: Duration = Duration::from_secs(1);

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
    /// Wakes every waiter when the policy changes.
    changed: tokio::sync::Notify,
    /// The gateway is stopping: nothing waits any more (`close`).
    closed: std::sync::atomic::AtomicBool,
    /// Calls of `acquire` in progress (`settled`).
    waiting: std::sync::atomic::AtomicUsize,
    /// Bytes let through, up and down (`passed`).
    passed: [std::sync::atomic::AtomicU64; 2],
}

/// Counts one call of `acquire` while it lasts, however it ends.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
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
            changed: tokio::sync::Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            passed: Default::default(),
        }
    }

    /// The bytes let through in `direction` so far: as a body is sent, slice by slice.
    pub fn passed(&self, direction: Direction) -> u64 {
        self.passed[direction as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn policy(&self) -> Policy {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = policy;
        self.changed.notify_waiters();
    }

    pub fn rate_now(&self, direction: Direction) -> Rate {
        let now = chrono::Local::now();
        let minute = now.hour() * 60 + now.minute();
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .rate_at(direction, now.weekday().num_days_from_monday(), minute)
    }

    /// Waits until `bytes` more may pass in `direction`, slice by slice, under the rate in
    /// force at each slice. `false` if the limiter was closed instead (the gateway is
    /// stopping): the bytes should not move.
    pub async fn acquire(&self, direction: Direction, bytes: u64) -> bool {
        let _waiting = self.waiting();
        let mut left = bytes;
        while left > 0 {
            let slice = left.min(SLICE as u64);
            if !self.acquire_slice(direction, slice).await {
                return false;
            }
            self.passed[direction as usize].fetch_add(slice, std::sync::atomic::Ordering::Relaxed);
            left -= slice;
        }
        true
    }

    /// Waits while `direction` is paused (or in debt to its rate). `false` if the limiter was
    /// closed instead. A request waits here before it is sent, so that a pause holds no
    /// request open at the store, to time out there with its body half sent.
    pub async fn wait_open(&self, direction: Direction) -> bool {
        let _waiting = self.waiting();
        self.acquire_slice(direction, 0).await
    }

    /// Ends every wait, now and later (`acquire` answers `false`): the gateway is stopping,
    /// and transfers waiting for a paused or slow uplink give up rather than hold it up.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.changed.notify_waiters();
    }

    /// After `close`: waits, `within` at most, until every wait in progress has seen it.
    /// Whether none is left. A wait on a blocking thread (the directory store's) runs on the
    /// timers of the runtime that thread belongs to, and a timer polled once that runtime
    /// shut down panics: the caller stops the runtime only after this.
    pub async fn settled(&self, within: Duration) -> bool {
        let started = Instant::now();
        while self.waiting.load(std::sync::atomic::Ordering::Acquire) > 0 {
            if started.elapsed() >= within {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Counts a wait in progress until the guard goes.
    fn waiting(&self) -> Waiting<'_> {
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Waiting(&self.waiting)
    }

    async fn acquire_slice(&self, direction: Direction, bytes: u64) -> bool {
        let bucket = match direction {
            Direction::Upload => &self.upload,
            Direction::Download => &self.download,
        };
        loop {
            // Register for a policy change before reading the policy, so none is missed
            // (a `Notified` counts only once enabled or polled).
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.closed.load(std::sync::atomic::Ordering::Acquire) {
                return false;
            }
            let wait = match self.rate_now(direction) {
                Rate::Unlimited => {
                    let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
                    b.tokens = 0.0;
                    b.last = Instant::now();
                    return true;
                }
                Rate::Paused => RECHECK,
                Rate::PerSecond(rate) => {
                    let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
                    let now = Instant::now();
                    let rate = rate as f64;
                    let refill = now.duration_since(b.last).as_secs_f64() * rate;
                    b.tokens = (b.tokens + refill).min(rate * BURST.as_secs_f64());
                    b.last = now;
                    if b.tokens >= 0.0 {
                        // Paid from the bucket, perhaps into debt that later slices wait out.
                        b.tokens -= bytes as f64;
                        return true;
                    }
                    Duration::from_secs_f64(-b.tokens / rate).min(RECHECK)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = changed => {}
            }
        }
    }
}

/// An HTTP body (request or response) whose bytes pass the limiter in slices as they are
/// polled: the wire never runs ahead of the rate by more than a slice and the burst.
pub struct Throttled<B> {
    inner: B,
    /// `None`: a body that passes free (listings, protocol messages).
    limiter: Option<Arc<Limiter>>,
    direction: Direction,
    /// Taken from the inner body, not yet charged.
    pending: Bytes,
    /// Charged (or being charged), to go out when `wait` is done.
    ready: Option<Bytes>,
    /// `Mutex` only to make the body `Sync` (HTTP clients ask for it); it is never contended.
    wait: Option<Mutex<Pin<Box<dyn Future<Output = ()> + Send>>>>,
}

impl<B> Throttled<B> {
    pub fn new(inner: B, limiter: Option<Arc<Limiter>>, direction: Direction) -> Self {
        Throttled {
            inner,
            limiter,
            direction,
            pending: Bytes::new(),
            ready: None,
            wait: None,
        }
    }
}

impl<B> http_body::Body for Throttled<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(wait) = &mut this.wait {
                let wait = wait.get_mut().unwrap_or_else(|e| e.into_inner());
                if wait.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.wait = None;
                if let Some(slice) = this.ready.take() {
                    return Poll::Ready(Some(Ok(http_body::Frame::data(slice))));
                }
            }
            if !this.pending.is_empty() {
                let slice = this.pending.split_to(this.pending.len().min(SLICE));
                let Some(limiter) = this.limiter.clone() else {
                    return Poll::Ready(Some(Ok(http_body::Frame::data(slice))));
                };
                let (direction, n) = (this.direction, slice.len() as u64);
                this.ready = Some(slice);
                // Closed (the gateway stopping, its tasks about to be dropped): passes.
                this.wait = Some(Mutex::new(Box::pin(async move {
                    limiter.acquire(direction, n).await;
                })));
                continue;
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.pending = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.ready.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let held = (self.pending.len() + self.ready.as_ref().map_or(0, |r| r.len())) as u64;
        let inner = self.inner.size_hint();
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml_text: &str) -> Policy {
        toml::from_str(toml_text).expect("valid policy")
    }

    fn rate(n: u64) -> Rate {
        Rate::PerSecond(n)
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
        let up = |day, minute| p.rate_at(Direction::Upload, day, minute);
        assert_eq!(
            up(0, 8 * 60),
            rate(10 << 20),
            "Monday 08:00 is in the window"
        );
        assert_eq!(
            up(4, 17 * 60 + 59),
            rate(10 << 20),
            "Friday 17:59 is in the window"
        );
        assert_eq!(up(4, 18 * 60), Rate::Unlimited, "the window ends at 18:00");
        assert_eq!(up(5, 12 * 60), Rate::Unlimited, "Saturday is outside");
        assert_eq!(up(2, 7 * 60 + 59), Rate::Unlimited, "before the window");
        assert_eq!(p.rate_at(Direction::Download, 0, 9 * 60), Rate::Unlimited);
    }

    #[test]
    fn a_window_past_midnight_ends_the_next_morning() {
        let p = policy(
            r#"
            upload = "unlimited"
            [[schedule]]
            days = "fri"
            start = "20:00"
            end = "06:00"
            upload = "paused"
            "#,
        );
        let up = |day, minute| p.rate_at(Direction::Upload, day, minute);
        assert_eq!(up(4, 20 * 60), Rate::Paused, "Friday 20:00");
        assert_eq!(up(4, 23 * 60 + 59), Rate::Paused, "Friday 23:59");
        assert_eq!(up(5, 0), Rate::Paused, "Saturday 00:00");
        assert_eq!(up(5, 5 * 60 + 59), Rate::Paused, "Saturday 05:59");
        assert_eq!(up(5, 6 * 60), Rate::Unlimited, "it ends Saturday 06:00");
        assert_eq!(
            up(4, 5 * 60),
            Rate::Unlimited,
            "Friday morning is Thursday's"
        );
        assert_eq!(
            up(5, 21 * 60),
            Rate::Unlimited,
            "Saturday evening is not a day of it"
        );
        let same = toml::from_str::<Policy>(
            "[[schedule]]\ndays = \"daily\"\nstart = \"19:00\"\nend = \"19:00\"\nupload = \"paused\"",
        )
        .expect_err("an empty window");
        assert!(same.to_string().contains("must differ"), "{same}");
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
        let p = policy("upload = \"paused\"\ndownload = \"1000/s\"");
        assert_eq!(p.upload, Rate::Paused);
        assert_eq!(p.download, rate(1000));
        let again: Policy =
            serde_json::from_str(&serde_json::to_string(&p).expect("json")).expect("round trip");
        assert_eq!(p, again);
    }

    #[test]
    fn zero_rates_and_wrapping_hours_are_refused() {
        for text in ["0", "0.4", "0MiB", "0/s", "0.0001KiB"] {
            let err = Rate::try_from(text.to_string()).expect_err(text);
            assert!(err.contains("paused"), "{text}: {err}");
        }
        for text in ["71582789:00", "4294967295:00", "24:01", "99:00"] {
            assert!(
                TimeOfDay::try_from(text.to_string()).is_err(),
                "{text} accepted"
            );
        }
        assert!(TimeOfDay::try_from("24:00".to_string()).is_ok());
        let err = toml::from_str::<Policy>("upload = \"0\"").expect_err("zero");
        assert!(err.to_string().contains("paused"), "{err}");
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
        // Downloads are not limited by this policy: a gibibyte passes at once (at 4 MiB/s it
        // would take minutes; the bound allows for a loaded machine).
        let started = Instant::now();
        limiter.acquire(Direction::Download, 1 << 30).await;
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_pause_holds_until_the_policy_changes() {
        let limiter = Arc::new(Limiter::new(policy("upload = \"paused\"")));
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                limiter.acquire(Direction::Upload, 1).await;
                Instant::now()
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished(), "a paused upload went through");
        let changed = Instant::now();
        limiter.set_policy(policy("upload = \"unlimited\""));
        let passed = waiter.await.expect("waiter");
        assert!(passed.duration_since(changed) < Duration::from_millis(100));

        // A slow limit that is lifted: the wait ends at once, not when the debt is paid.
        limiter.set_policy(policy("upload = \"1KiB\""));
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.acquire(Direction::Upload, 1 << 20).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished());
        let changed = Instant::now();
        limiter.set_policy(policy("upload = \"unlimited\""));
        waiter.await.expect("waiter");
        assert!(changed.elapsed() < Duration::from_millis(100));
    }
}
