//! Crash test for the local log: a writer process is killed with SIGKILL at random points, over
//! and over, on one log file, and after every kill the log must hold every record the writer
//! had synced, correct, in order, with nothing after them but whole, correct records.
//!
//! The writer is this test binary itself, re-run with `FIRN_LOG_CRASH_CHILD` set so that only
//! `crash_child_writer` runs and acts as the writer. Without the variable that test returns at
//! once.
//!
//! A SIGKILL loses the process, not the page cache, so this checks framing, recovery and
//! continued writes after recovery; it cannot show that fsync reached the disk (tests/powerloss.rs
//! does, on a file system that loses unsynced pages). Set `FIRN_LOG_CRASH_SEED` to replay a run.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use firn::local::log::Log;

const CHILD_ENV: &str = "FIRN_LOG_CRASH_CHILD";
const SEED_ENV: &str = "FIRN_LOG_CRASH_SEED";
const CHILD_TEST: &str = "crash_child_writer";
const SYNCED_MARKER: &str = "FIRN_SYNCED ";
const ITERATIONS: usize = 40;
/// Caps the log's growth if the parent is slow to kill: the writer stops appending here.
const MAX_RECORDS_PER_RUN: u64 = 3000;

/// splitmix64: a tiny, well-mixed generator, so a run can be replayed from its seed.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = mix(self.0);
        self.0 % bound
    }
}

/// Record `seq`'s content: its number's bytes repeated to a length derived from the number, so
/// the parent can check any record it finds without a copy of what was written. Now and then a
/// record is larger than the writer's buffer, so it reaches the file in pieces.
fn expected_payload(seq: u64) -> Vec<u8> {
    let h = mix(seq);
    let len = if h % 16 == 0 {
        8 * 1024 + (h >> 8) % (8 * 1024)
    } else {
        (h >> 8) % 1000
    } as usize;
    let mut payload = seq.to_le_bytes().repeat(len / 8 + 1);
    payload.truncate(len);
    payload
}

/// The writer, when run as the child; otherwise nothing.
#[test]
fn crash_child_writer() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let (mut log, recovery) = Log::open(&path).unwrap();
    let mut seq = recovery.records;
    let stop_at = seq + MAX_RECORDS_PER_RUN;
    let mut out = std::io::stdout().lock();
    // The test harness may have left "test crash_child_writer ... " without a newline.
    writeln!(out).unwrap();
    let started = Instant::now();
    while seq < stop_at {
        let h = mix(seq ^ 0xabcd);
        // Most batches are quick, so most kills land in a sync. A slow batch (a writer waiting
        // on its input) stays a while with a record half written, where the buffer last
        // spilled into the file, so kills also land on torn records.
        let (batch, pause) = if h % 4 == 0 {
            (10 + h % 30, Duration::from_micros(300))
        } else {
            (1 + h % 8, Duration::ZERO)
        };
        for _ in 0..batch {
            assert_eq!(log.append(&expected_payload(seq)).unwrap(), seq);
            seq += 1;
            thread::sleep(pause);
        }
        log.sync().unwrap();
        // Only now, after the sync returned, may the parent count on these records.
        writeln!(out, "{SYNCED_MARKER}{seq}").unwrap();
        out.flush().unwrap();
    }
    // Wait to be killed. The time limit matters only if the parent has gone away.
    while started.elapsed() < Duration::from_secs(30) {
        thread::sleep(Duration::from_millis(10));
    }
}

#[derive(Default)]
struct Report {
    kills_during_startup: usize,
    kills_while_writing: usize,
    tails_dropped: usize,
    bytes_dropped: u64,
    records_checked: u64,
}

#[test]
fn log_survives_sigkill_at_random_points() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let seed = match std::env::var(SEED_ENV) {
        Ok(seed) => seed.parse().unwrap(),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    println!("{SEED_ENV}={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.log");
    let test_start = Instant::now();
    let mut report = Report::default();
    let mut records_before = 0;

    for iteration in 0..ITERATIONS {
        let synced = run_and_kill(&path, &mut rng, &mut report);

        let (mut log, recovery) = Log::open(&path).unwrap();
        if recovery.bytes_dropped > 0 {
            report.tails_dropped += 1;
            report.bytes_dropped += recovery.bytes_dropped;
        }
        let context = format!("iteration {iteration}, seed {seed}, {recovery:?}");
        assert!(
            recovery.records >= synced,
            "{context}: writer reported {synced} records synced"
        );
        // A kill loses no page cache, so what the last check saw must still be there.
        assert!(
            recovery.records >= records_before,
            "{context}: records went missing"
        );
        let mut count = 0;
        for record in log.iter().unwrap() {
            let record = record.unwrap();
            assert_eq!(record.seq, count, "{context}: gap or reordering");
            assert!(
                record.payload == expected_payload(count),
                "{context}: record {count} holds the wrong bytes"
            );
            count += 1;
        }
        assert_eq!(count, recovery.records, "{context}");
        report.records_checked += count;
        records_before = count;
        // The next writer must be able to lock the file.
        drop(log);
    }

    println!(
        "log crash test: {ITERATIONS} kills ({} during start-up, {} while writing), {} torn tails \
         dropped ({} bytes), {} records checked, {} records in the final log, {:.1?}",
        report.kills_during_startup,
        report.kills_while_writing,
        report.tails_dropped,
        report.bytes_dropped,
        report.records_checked,
        records_before,
        test_start.elapsed()
    );
}

/// Starts a writer on `path`, kills it with SIGKILL at a random point, and returns the highest
/// synced count it reported.
fn run_and_kill(path: &Path, rng: &mut Rng, report: &mut Report) -> u64 {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();

    let stdout = child.stdout.take().unwrap();
    let (reports, reported) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut highest = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(count) = line.trim().strip_prefix(SYNCED_MARKER) {
                highest = count.parse().unwrap();
                // The parent may have stopped listening; the count is still returned below.
                let _ = reports.send(highest);
            }
        }
        highest
    });

    if rng.below(4) == 0 {
        // Anywhere from before the log is opened to the first few syncs.
        report.kills_during_startup += 1;
        thread::sleep(Duration::from_micros(rng.below(20_000)));
    } else {
        // After a random number of syncs, then a little later still, to land mid-append or
        // mid-sync rather than just after a report.
        report.kills_while_writing += 1;
        let target_syncs = 1 + rng.below(60);
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut syncs = 0;
        while syncs < target_syncs {
            let left = deadline.saturating_duration_since(Instant::now());
            match reported.recv_timeout(left) {
                Ok(_) => syncs += 1,
                Err(_) => break,
            }
        }
        thread::sleep(Duration::from_micros(rng.below(10_000)));
    }

    child.kill().unwrap();
    let status = child.wait().unwrap();
    let synced = reader.join().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the writer ended by itself ({status}) instead of being killed; see its output above"
    );
    synced
}
