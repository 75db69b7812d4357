//! The remote layer against real stores: a local directory, and the Garage S3 server that
//! scripts/test starts (its address comes in FIRN_TEST_S3_*; without it the S3 half is
//! skipped, except under CI, where a missing server is a failure).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use firn::remote::dir::DirStore;
use firn::remote::faults::{FaultPlan, FaultSettings};
use firn::remote::limit::{Limiter, Policy};
use firn::remote::metered::RemoteMetrics;
use firn::remote::retry::RetryPolicy;
use firn::remote::s3::{S3Options, S3Store};
use firn::remote::{self, Error, Meta, Remote};
use rand::RngCore;

mod common;

use common::{boto3_keys, s3_options};

struct Backend {
    name: &'static str,
    store: Arc<dyn Remote>,
    /// The S3 backend's key prefix in the bucket.
    prefix: String,
    _dir: Option<tempfile::TempDir>,
}

fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut list = vec![Backend {
        name: "dir",
        store: Arc::new(DirStore::open(dir.path().join("bucket")).expect("dir store")),
        prefix: String::new(),
        _dir: Some(dir),
    }];
    if let Some(options) = s3_options() {
        list.push(Backend {
            name: "s3",
            store: Arc::new(S3Store::new(&options, unlimited()).expect("s3 store")),
            prefix: options.prefix,
            _dir: None,
        });
    }
    list
}

fn stacked(backend: &Arc<dyn Remote>, faults: Option<FaultSettings>) -> remote::Stack {
    let mut registry = prometheus_client::registry::Registry::default();
    remote::stack(
        backend.clone(),
        RetryPolicy {
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
            give_up_after: Duration::from_secs(60),
        },
        Arc::new(Limiter::new(Policy::default())),
        Arc::new(RemoteMetrics::new(&mut registry)),
        faults.map(|f| Arc::new(FaultPlan::new(f))),
    )
}

fn unlimited() -> Arc<Limiter> {
    Arc::new(Limiter::new(Policy::default()))
}

fn random_bytes(n: usize) -> Bytes {
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    Bytes::from(v)
}

#[tokio::test]
async fn round_trips_from_empty_to_multipart() {
    for b in backends() {
        let stack = stacked(&b.store, None);
        let r = &stack.remote;
        // 13 MiB is past the S3 test threshold of 6 MiB: three parts.
        for size in [0usize, 1, 4096, 1 << 20, 13 << 20] {
            let key = format!("round/{size}");
            let body = random_bytes(size);
            let mut meta = Meta::new();
            meta.insert("file-mtime".to_string(), "1700000000000ns".to_string());
            r.put(&key, body.clone(), meta)
                .await
                .unwrap_or_else(|e| panic!("{}: put {size}: {e}", b.name));
            let object = r
                .get(&key)
                .await
                .unwrap_or_else(|e| panic!("{}: get {size}: {e}", b.name));
            assert_eq!(object.body, body, "{}: body of {size} bytes", b.name);
            assert_eq!(
                object.meta.get("file-mtime").map(String::as_str),
                Some("1700000000000ns"),
                "{}",
                b.name
            );
            let info = r.head(&key).await.expect("head").expect("exists");
            assert_eq!(info.size, size as u64, "{}", b.name);
            // A HEAD tells the user metadata too.
            assert_eq!(
                info.meta.get("file-mtime").map(String::as_str),
                Some("1700000000000ns"),
                "{}: head",
                b.name
            );
            if size > 100 {
                let part = r.get_range(&key, 10..100).await.expect("range");
                assert_eq!(part, body.slice(10..100), "{}: range", b.name);
                let tail = r
                    .get_range(&key, size as u64 - 5..size as u64)
                    .await
                    .expect("tail");
                assert_eq!(tail, body.slice(size - 5..), "{}: tail", b.name);
            }
        }
        let listed: Vec<String> = r
            .list("round/")
            .await
            .expect("list")
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(
            listed,
            [
                "round/0",
                "round/1",
                "round/1048576",
                "round/13631488",
                "round/4096"
            ],
            "{}",
            b.name
        );
        assert!(
            r.list("round/4").await.expect("list").len() == 1,
            "{}: prefix inside a segment",
            b.name
        );
        for key in &listed {
            r.delete(key).await.expect("delete");
        }
        r.delete("round/never-existed")
            .await
            .expect("deleting nothing succeeds");
        assert!(
            r.list("round/").await.expect("list").is_empty(),
            "{}",
            b.name
        );
        assert!(r.head("round/0").await.expect("head").is_none());
        assert!(
            matches!(r.get("round/0").await, Err(Error::NotFound { .. })),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn thirty_percent_injected_errors_lose_nothing() {
    for b in backends() {
        let stack = stacked(
            &b.store,
            Some(FaultSettings {
                error_rate: 0.3,
                latency_ms: 0,
                // On top of the errors: torn reads, retried a bounded number of times.
                truncate_rate: 0.15,
                ..FaultSettings::default()
            }),
        );
        let r = &stack.remote;
        let objects: Vec<(String, Bytes)> = (0..60)
            .map(|i| (format!("faulty/{i:03}"), random_bytes(1 + i * 997)))
            .collect();
        futures::future::try_join_all(
            objects
                .iter()
                .map(|(k, v)| r.put(k, v.clone(), Meta::new())),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: put through faults: {e}", b.name));
        // A get that met six torn answers in a row (0.15^6) gives up with `Corrupt`, an
        // error rather than short bytes; it is asked again, as a caller would.
        let mut gave_up = 0;
        for (key, body) in &objects {
            let object = loop {
                match r.get(key).await {
                    Ok(object) => break object,
                    Err(Error::Corrupt { .. }) if gave_up < 2 => gave_up += 1,
                    Err(e) => panic!("{}: get {key}: {e}", b.name),
                }
            };
            assert_eq!(&object.body, body, "{}: {key} intact", b.name);
        }
        let injected = stack.faults.as_ref().expect("faults on").injected();
        assert!(injected > 20, "{}: only {injected} faults injected", b.name);
        // Straight from the backend, past every wrapper: the stored bytes are whole.
        for (key, body) in &objects {
            assert_eq!(&b.store.get(key).await.expect("direct get").body, body);
        }
    }
}

#[tokio::test]
async fn a_corrupted_object_is_an_error_not_data() {
    for b in backends() {
        let stack = stacked(&b.store, None);
        let body = random_bytes(100_000);
        stack
            .remote
            .put("rot/a", body.clone(), Meta::new())
            .await
            .expect("put");
        // Rot the stored bytes behind firn's back, keeping the recorded digest.
        let stored = b.store.get("rot/a").await.expect("raw get");
        let mut rotten = stored.body.to_vec();
        rotten[54_321] ^= 0x01;
        b.store
            .put("rot/a", Bytes::from(rotten), stored.meta)
            .await
            .expect("raw put");
        let started = Instant::now();
        match stack.remote.get("rot/a").await {
            Err(Error::Corrupt { key, .. }) => assert_eq!(key, "rot/a"),
            other => panic!("{}: expected Corrupt, got {other:?}", b.name),
        }
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}

#[tokio::test]
async fn callers_ride_out_an_outage() {
    for b in backends() {
        let stack = stacked(&b.store, Some(FaultSettings::default()));
        let plan = stack.faults.clone().expect("faults on");
        plan.outage(Duration::from_secs(2));
        let started = Instant::now();
        let body = random_bytes(5000);
        stack
            .remote
            .put("outage/a", body.clone(), Meta::new())
            .await
            .expect("put waits the outage out");
        assert!(
            started.elapsed() >= Duration::from_millis(1900),
            "{}: put returned during the outage",
            b.name
        );
        assert_eq!(stack.remote.get("outage/a").await.expect("get").body, body);
        assert!(
            plan.injected() >= 3,
            "{}: the outage was hit {} times",
            b.name,
            plan.injected()
        );
    }
}

#[tokio::test]
async fn a_long_outage_ends_in_a_clear_error() {
    let b = &backends()[0];
    let mut registry = prometheus_client::registry::Registry::default();
    let plan = Arc::new(FaultPlan::new(FaultSettings::default()));
    plan.outage(Duration::from_secs(60));
    let stack = remote::stack(
        b.store.clone(),
        RetryPolicy {
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            give_up_after: Duration::from_millis(500),
        },
        Arc::new(Limiter::new(Policy::default())),
        Arc::new(RemoteMetrics::new(&mut registry)),
        Some(plan),
    );
    let err = stack
        .remote
        .put("x", Bytes::from_static(b"x"), Meta::new())
        .await
        .expect_err("outage");
    assert!(err.to_string().contains("injected outage"), "{err}");
    assert_eq!(stack.metrics.errors_total("put"), 1);
}

/// The nested keys of the one-level listing tests, and what `list_dir` shows of them.
async fn check_one_level_listings(name: &str, r: &dyn Remote, root: &str) {
    for key in ["a/b/c", "a/d", "e"] {
        let key = format!("{root}{key}");
        r.put(&key, Bytes::from(key.clone()), Meta::new())
            .await
            .unwrap_or_else(|e| panic!("{name}: put {key}: {e}"));
    }
    let object = |key: &str| {
        let key = format!("{root}{key}");
        remote::ObjectInfo {
            size: key.len() as u64,
            key,
            meta: Meta::new(),
            etag: None,
        }
    };
    let listing = |dirs: &[&str], objects: &[&str]| remote::Listing {
        dirs: dirs.iter().map(|d| format!("{root}{d}")).collect(),
        objects: objects.iter().map(|o| object(o)).collect(),
    };
    // Every listed object has an ETag; compared apart.
    let list_dir = |prefix: String| async move {
        let mut listing = r
            .list_dir(&prefix)
            .await
            .unwrap_or_else(|e| panic!("{name}: list_dir({prefix:?}): {e}"));
        for object in &mut listing.objects {
            assert!(
                object.etag.take().is_some(),
                "{name}: no ETag for {}",
                object.key
            );
        }
        listing
    };
    assert_eq!(
        list_dir(root.to_string()).await,
        listing(&["a/"], &["e"]),
        "{name}: the top"
    );
    // Replaced by an object of the same size: another ETag.
    let etag = |listing: remote::Listing| listing.objects[0].etag.clone();
    let before = etag(r.list_dir(root).await.expect("list_dir"));
    let key = format!("{root}e");
    r.put(&key, Bytes::from(key.to_uppercase()), Meta::new())
        .await
        .expect("put");
    let after = etag(r.list_dir(root).await.expect("list_dir"));
    assert!(
        before.is_some() && before != after,
        "{name}: {before:?} then {after:?}"
    );
    assert_eq!(
        list_dir(format!("{root}a/")).await,
        listing(&["a/b/"], &["a/d"]),
        "{name}: one level down"
    );
    assert_eq!(
        list_dir(format!("{root}a/b/")).await,
        listing(&[], &["a/b/c"]),
        "{name}: the bottom"
    );
    for missing in ["nothing/", "a/nothing/", "e/"] {
        assert_eq!(
            list_dir(format!("{root}{missing}")).await,
            remote::Listing::default(),
            "{name}: {missing}"
        );
    }
    for bad in ["a", "a//", "../"] {
        let outcome = r.list_dir(&format!("{root}{bad}")).await;
        assert!(
            matches!(outcome, Err(Error::BadKey { .. })),
            "{name}: {bad:?} gave {outcome:?}"
        );
    }
    for key in ["a/b/c", "a/d", "e"] {
        r.delete(&format!("{root}{key}")).await.expect("delete");
    }
    assert_eq!(
        list_dir(format!("{root}a/")).await,
        remote::Listing::default(),
        "{name}: after the deletes"
    );
}

#[tokio::test]
async fn one_level_listings_show_objects_and_directories() {
    for b in backends() {
        let stack = stacked(&b.store, None);
        // From the top of the bucket (the S3 backend's own prefix), and from inside a prefix.
        check_one_level_listings(b.name, &*stack.remote, "").await;
        check_one_level_listings(b.name, &*stack.remote, "ld/deeper/").await;
        // Counted as lists: the three refused prefixes of each round are the only errors.
        assert_eq!(stack.metrics.errors_total("list"), 6, "{}", b.name);
    }
}

/// Every upload carries a checksum the store verifies: CRC64-NVME to a loopback endpoint,
/// one PUT and a multipart upload alike. What the store kept (asked with boto3's checksum
/// mode) equals a CRC64-NVME computed here, from the bytes, by a table of our own.
#[tokio::test]
async fn uploads_carry_a_checksum_the_store_keeps() {
    let Some(options) = s3_options() else { return };
    let store: Arc<dyn Remote> = Arc::new(S3Store::new(&options, unlimited()).expect("s3 store"));
    let small = Bytes::from((0..1000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>());
    // Over the test store's 6 MiB threshold: two parts of 5 MiB and one of 1 MiB.
    let large = Bytes::from(
        (0..(11u32 << 20))
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>(),
    );
    store
        .put("ck/small", small.clone(), Meta::new())
        .await
        .expect("put");
    store
        .put("ck/large", large.clone(), Meta::new())
        .await
        .expect("multipart put");
    let script = r#"
import json, os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["FIRN_TEST_S3_ENDPOINT"],
    region_name=os.environ.get("FIRN_TEST_S3_REGION", "garage"),
    aws_access_key_id=os.environ["FIRN_TEST_S3_ACCESS_KEY_ID"],
    aws_secret_access_key=os.environ["FIRN_TEST_S3_SECRET_ACCESS_KEY"])
out = {}
for key in sys.argv[1:]:
    h = s3.head_object(Bucket=os.environ["FIRN_TEST_S3_BUCKET"], Key=key, ChecksumMode="ENABLED")
    out[key] = [h.get("ChecksumCRC64NVME"), h.get("ChecksumType"), h["ETag"]]
print(json.dumps(out))
"#;
    let keys = [
        format!("{}/ck/small", options.prefix),
        format!("{}/ck/large", options.prefix),
    ];
    let kept: std::collections::HashMap<String, Vec<Option<String>>> =
        serde_json::from_slice(&common::boto3(script, &[&keys[0], &keys[1]])).expect("JSON");
    for (key, body) in keys.iter().zip([&small, &large]) {
        let want = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            crc64nvme(body).to_be_bytes(),
        );
        let got = &kept[key];
        assert_eq!(got[0].as_deref(), Some(&want[..]), "{key}: {got:?}");
        assert_eq!(got[1].as_deref(), Some("FULL_OBJECT"), "{key}: {got:?}");
    }
    // The large one did go up in parts (a multipart ETag ends in -<parts>).
    let etag = kept[&keys[1]][2].clone().unwrap_or_default();
    assert!(etag.trim_matches('"').ends_with("-3"), "{etag}");
}

/// CRC-64/NVME (reflected, polynomial 0xAD93D23594C93659, all ones in and out).
fn crc64nvme(data: &[u8]) -> u64 {
    let table: Vec<u64> = (0..256u64)
        .map(|i| {
            (0..8).fold(i, |c, _| {
                if c & 1 == 1 {
                    (c >> 1) ^ 0x9A6C_9329_AC4B_C9B5
                } else {
                    c >> 1
                }
            })
        })
        .collect();
    let crc = data.iter().fold(u64::MAX, |c, &b| {
        table[((c ^ u64::from(b)) & 0xff) as usize] ^ (c >> 8)
    });
    crc ^ u64::MAX
}

#[test]
fn crc64nvme_gives_the_check_value() {
    assert_eq!(crc64nvme(b"123456789"), 0xAE8B_1486_0A79_9888);
}

/// A ranged read pinned to a version (the ETag a HEAD told) reads that version, and once
/// another is stored under the key it fails with `Changed` at once: not retried, never the
/// other version's bytes.
#[tokio::test]
async fn a_ranged_read_of_a_version_fails_once_another_is_stored() {
    for b in backends() {
        let stack = stacked(&b.store, None);
        let r = &stack.remote;
        let (one, two) = (
            Bytes::from(vec![1u8; 100_000]),
            Bytes::from(vec![2u8; 100_000]),
        );
        r.put("pin/a", one.clone(), Meta::new()).await.expect("put");
        let etag = r.head("pin/a").await.expect("head").expect("there").etag;
        let etag = etag.unwrap_or_else(|| panic!("{}: a HEAD tells no ETag", b.name));
        let read = r
            .get_range_if("pin/a", 10..5000, Some(&etag))
            .await
            .expect("read of the version");
        assert_eq!(read, one.slice(10..5000), "{}", b.name);
        r.put("pin/a", two.clone(), Meta::new()).await.expect("put");
        let started = Instant::now();
        match r.get_range_if("pin/a", 10..5000, Some(&etag)).await {
            Err(Error::Changed { key }) => assert_eq!(key, "pin/a", "{}", b.name),
            other => panic!("{}: the old version read after a put: {other:?}", b.name),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{}: retried a read of a version that is gone",
            b.name
        );
        // Unpinned, and pinned to the new version, it reads the new bytes.
        assert_eq!(
            r.get_range("pin/a", 0..10).await.expect("get"),
            two.slice(0..10)
        );
        let etag = r.head("pin/a").await.expect("head").expect("there").etag;
        let read = r.get_range_if("pin/a", 0..10, etag.as_deref()).await;
        assert_eq!(read.expect("read of the new version"), two.slice(0..10));
    }
}

/// Some S3 tools write an empty object named like a directory (`dir/`) to show a folder.
#[tokio::test]
async fn a_directory_marker_is_no_entry_of_its_own_directory() {
    let Some(options) = s3_options() else { return };
    let store: Arc<dyn Remote> = Arc::new(S3Store::new(&options, unlimited()).expect("s3 store"));
    let stack = stacked(&store, None);
    let r = &stack.remote;
    r.put("marked/x", Bytes::from_static(b"x"), Meta::new())
        .await
        .expect("put");
    let script = r#"
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["FIRN_TEST_S3_ENDPOINT"],
    region_name=os.environ.get("FIRN_TEST_S3_REGION", "garage"),
    aws_access_key_id=os.environ["FIRN_TEST_S3_ACCESS_KEY_ID"],
    aws_secret_access_key=os.environ["FIRN_TEST_S3_SECRET_ACCESS_KEY"])
s3.put_object(Bucket=os.environ["FIRN_TEST_S3_BUCKET"], Key=sys.argv[1], Body=b"")
"#;
    let marker = format!("{}/marked/", options.prefix);
    common::boto3(script, &[&marker]);
    let top = r.list_dir("").await.expect("list_dir top");
    assert_eq!(top.dirs, ["marked/"]);
    assert!(top.objects.is_empty(), "{top:?}");
    let inside = r.list_dir("marked/").await.expect("list_dir marked/");
    assert_eq!(inside.dirs, Vec::<String>::new());
    assert_eq!(
        inside
            .objects
            .iter()
            .map(|o| &o.key[..])
            .collect::<Vec<_>>(),
        ["marked/x"]
    );
    r.delete("marked/x").await.expect("delete");
    r.delete("marked/").await.expect("delete the marker");
    assert_eq!(r.list_dir("").await.expect("list_dir"), Default::default());
}

/// firn writes directory markers itself (a share's empty directories): on both backends a
/// marker holds its metadata, keeps its directory when the last object below it goes, and
/// goes with its delete; S3 tools see it under its exact name.
#[tokio::test]
async fn directory_markers_keep_empty_directories_on_every_backend() {
    for backend in backends() {
        let stack = stacked(&backend.store, None);
        let r = &stack.remote;
        let name = backend.name;
        for dir in ["dirs/empty", "dirs/50% ü ~x"] {
            let marker = format!("{dir}/");
            let meta = Meta::from([("file-permissions".to_string(), "40750".to_string())]);
            r.put(&marker, Bytes::new(), meta)
                .await
                .expect("put marker");
            let head = r
                .head(&marker)
                .await
                .expect("head")
                .expect("marker is there");
            assert_eq!(head.size, 0, "{name}");
            assert_eq!(
                head.meta.get("file-permissions").map(|v| &v[..]),
                Some("40750"),
                "{name}"
            );
            let top = r.list_dir("dirs/").await.expect("list_dir");
            assert_eq!(top.dirs, std::slice::from_ref(&marker), "{name}");
            assert!(top.objects.is_empty(), "{name}: {top:?}");
            assert_eq!(
                r.list_dir(&marker).await.expect("list_dir"),
                Default::default(),
                "{name}"
            );
            // A marker has no content and keeps its directory when what is below goes.
            assert!(
                matches!(
                    r.put(&marker, Bytes::from_static(b"x"), Meta::new()).await,
                    Err(remote::Error::BadKey { .. })
                ),
                "{name}: a marker with a body was accepted"
            );
            assert!(r.get(&marker).await.is_err(), "{name}: a marker was read");
            let below = format!("{marker}x");
            r.put(&below, Bytes::from_static(b"x"), Meta::new())
                .await
                .expect("put below");
            r.delete(&below).await.expect("delete below");
            assert_eq!(
                r.list_dir("dirs/").await.expect("list_dir").dirs,
                std::slice::from_ref(&marker),
                "{name}"
            );
            if name == "s3" {
                let prefix = &backend.prefix;
                assert_eq!(
                    boto3_keys(&format!("{prefix}/dirs/")),
                    [format!("{prefix}/{marker}")]
                );
            }
            r.delete(&marker).await.expect("delete marker");
            assert!(r.head(&marker).await.expect("head").is_none(), "{name}");
            assert_eq!(
                r.list_dir("dirs/").await.expect("list_dir"),
                Default::default(),
                "{name}"
            );
            // Deleting what is not there succeeds, as for objects.
            r.delete(&marker).await.expect("delete again");
        }
        for bad in ["/", "a//", "../", "a/../"] {
            assert!(
                matches!(
                    r.put(bad, Bytes::new(), Meta::new()).await,
                    Err(remote::Error::BadKey { .. })
                ),
                "{name}: {bad:?} accepted"
            );
        }
    }
}

#[tokio::test]
async fn one_level_listings_ride_out_injected_errors() {
    for b in backends() {
        let stack = stacked(
            &b.store,
            Some(FaultSettings {
                error_rate: 0.3,
                ..FaultSettings::default()
            }),
        );
        let plan = stack.faults.clone().expect("faults on");
        for round in 0..5 {
            check_one_level_listings(b.name, &*stack.remote, &format!("ldf/{round}/")).await;
        }
        assert!(
            plan.injected() > 5,
            "{}: only {} faults injected",
            b.name,
            plan.injected()
        );
        // An outage is ridden out too.
        stack
            .remote
            .put("ldf/x", Bytes::from_static(b"x"), Meta::new())
            .await
            .expect("put");
        plan.outage(Duration::from_millis(500));
        let listing = stack.remote.list_dir("ldf/").await.expect("list_dir");
        assert_eq!(listing.dirs, Vec::<String>::new(), "{}", b.name);
        assert_eq!(
            listing
                .objects
                .iter()
                .map(|o| &o.key[..])
                .collect::<Vec<_>>(),
            ["ldf/x"],
            "{}",
            b.name
        );
        stack.remote.delete("ldf/x").await.expect("delete");
    }
}

#[tokio::test]
async fn hostile_keys_are_refused_by_every_backend() {
    for b in backends() {
        for key in ["../escape", "a/../../b", "", "a//b", ".firn-staging/x"] {
            let outcome = b
                .store
                .put(key, Bytes::from_static(b"x"), Meta::new())
                .await;
            if b.name == "s3" && key == ".firn-staging/x" {
                continue; // reserved only in the directory store
            }
            assert!(
                matches!(outcome, Err(Error::BadKey { .. })),
                "{}: {key:?} gave {outcome:?}",
                b.name
            );
        }
    }
}

/// Names that S3 tools are known to mangle: percent-escapes, URL delimiters, spaces, unicode.
const AWKWARD_NAMES: &[&str] = &[
    "50%.csv",
    "a#b.txt",
    "tilde~x",
    "br[a]ck",
    "caret^x",
    "pipe|x",
    "back\\slash",
    "<angle>",
    "quote\"d",
    "with space",
    "plus+sign",
    "amp&q?x=1",
    "%2F-looks-escaped",
    "%25",
    "curly{}`tick",
    "semi;colon:at@dollar$",
    "'apostrophe',comma",
    "ünïcödé/日本語.txt",
    "emoji-😀",
];

/// Every file under `root`, as `/`-separated relative names, sorted.
fn files_in(root: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let entry = entry.expect("entry");
            if entry.file_type().expect("type").is_dir() {
                pending.push(entry.path());
            } else {
                let rel = entry.path();
                let rel = rel.strip_prefix(root).expect("under root");
                found.push(rel.to_str().expect("utf-8").to_string());
            }
        }
    }
    found.sort();
    found
}

#[tokio::test]
async fn object_names_are_kept_verbatim() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = dir.path().join("bucket");
    let mut list = vec![(
        "dir",
        Arc::new(DirStore::open(&bucket).expect("dir store")) as Arc<dyn Remote>,
        String::new(),
    )];
    if let Some(options) = s3_options() {
        let prefix = options.prefix.clone();
        list.push((
            "s3",
            Arc::new(S3Store::new(&options, unlimited()).expect("s3 store")),
            prefix,
        ));
    }
    for (name, store, store_prefix) in list {
        let stack = stacked(&store, None);
        let r = &stack.remote;
        let mut expected: Vec<String> =
            AWKWARD_NAMES.iter().map(|n| format!("names/{n}")).collect();
        expected.sort();
        for key in &expected {
            r.put(key, Bytes::from(key.clone()), Meta::new())
                .await
                .unwrap_or_else(|e| panic!("{name}: put {key:?}: {e}"));
        }
        let listed: Vec<String> = r
            .list("names/")
            .await
            .unwrap_or_else(|e| panic!("{name}: list: {e}"))
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(listed, expected, "{name}: firn's own listing");
        // One level: the same names, the one with a `/` as a directory.
        let level = r
            .list_dir("names/")
            .await
            .unwrap_or_else(|e| panic!("{name}: list_dir: {e}"));
        let (nested, flat): (Vec<&String>, Vec<&String>) = expected
            .iter()
            .partition(|k| k["names/".len()..].contains('/'));
        let dirs: Vec<String> = nested
            .iter()
            .map(|k| {
                format!(
                    "names/{}/",
                    k["names/".len()..].split('/').next().unwrap_or("")
                )
            })
            .collect();
        assert_eq!(level.dirs, dirs, "{name}: one level's directories");
        let objects: Vec<&String> = level.objects.iter().map(|o| &o.key).collect();
        assert_eq!(objects, flat, "{name}: one level's objects");
        for key in &expected {
            let object = r
                .get(key)
                .await
                .unwrap_or_else(|e| panic!("{name}: get {key:?}: {e}"));
            assert_eq!(object.body, key.as_bytes(), "{name}: body of {key:?}");
            assert!(
                r.head(key).await.expect("head").is_some(),
                "{name}: {key:?}"
            );
        }
        // What every other tool sees: the same names, not escaped ones.
        let outside: Vec<String> = if name == "dir" {
            files_in(&bucket.join("names"))
                .into_iter()
                .map(|n| format!("names/{n}"))
                .collect()
        } else {
            boto3_keys(&format!("{store_prefix}/names/"))
                .into_iter()
                .map(|k| k[store_prefix.len() + 1..].to_string())
                .collect()
        };
        assert_eq!(
            outside, expected,
            "{name}: names as another tool lists them"
        );
        for key in &expected {
            r.delete(key).await.expect("delete");
        }
        assert!(r.list("names/").await.expect("list").is_empty(), "{name}");
    }
}

#[test]
fn the_cli_copies_awkward_names_both_ways() {
    let Some(options) = s3_options() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source");
    for name in AWKWARD_NAMES {
        let file = source.join(name);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        std::fs::write(&file, name.as_bytes()).expect("write");
    }
    let config = dir.path().join("firn.toml");
    std::fs::write(
        &config,
        format!(
            "[local]\ndata_dir = \"{}\"\n[remote]\nkind = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nprefix = \"{}\"\n",
            dir.path().join("data").display(),
            options.endpoint.as_deref().expect("endpoint"),
            options.bucket,
            options.region,
            options.access_key_id.as_deref().expect("key id"),
            options.secret_access_key.as_deref().expect("secret"),
            options.prefix,
        ),
    )
    .expect("config");
    let config = config.to_str().expect("utf-8");
    let (ok, out, err) = common::firn(&[
        "remote",
        "--config",
        config,
        "put",
        source.to_str().expect("utf-8"),
        "cli",
    ]);
    assert!(ok, "put: {out}{err}");
    let mut expected: Vec<String> = AWKWARD_NAMES.iter().map(|n| n.to_string()).collect();
    expected.sort();
    let listed: Vec<String> = boto3_keys(&format!("{}/cli/", options.prefix))
        .into_iter()
        .map(|k| k[options.prefix.len() + "/cli/".len()..].to_string())
        .collect();
    assert_eq!(listed, expected, "as boto3 lists them");
    let back = dir.path().join("back");
    let (ok, out, err) = common::firn(&[
        "remote",
        "--config",
        config,
        "get",
        "cli/",
        back.to_str().expect("utf-8"),
    ]);
    assert!(ok, "get: {out}{err}");
    assert_eq!(files_in(&back), expected);
    for name in AWKWARD_NAMES {
        assert_eq!(
            std::fs::read(back.join(name)).expect("read back"),
            name.as_bytes(),
            "{name}"
        );
    }
}

#[tokio::test]
async fn an_object_without_its_digest_is_corrupt() {
    for b in backends() {
        let stack = stacked(&b.store, None);
        // Stored behind firn's back: the bytes are fine, the digest is gone.
        b.store
            .put("nodigest/a", random_bytes(1000), Meta::new())
            .await
            .expect("raw put");
        match stack.remote.get("nodigest/a").await {
            Err(Error::Corrupt { key, reason }) => {
                assert_eq!(key, "nodigest/a");
                assert!(reason.contains("firn-blake3"), "{reason}");
            }
            other => panic!("{}: expected Corrupt, got {other:?}", b.name),
        }
    }
}

/// What goes through `Stack::sealed` (objects that verify themselves) is stored and read
/// back as given, without a digest; `remote` would call it corrupt for lacking one. Its
/// reads are checked for length all the same: a torn response is read again, never
/// returned (a sealed body cut short fails its tag as if another key had sealed it).
#[tokio::test]
async fn the_sealed_stack_stores_no_digest_but_checks_lengths() {
    for b in backends() {
        let stack = stacked(&b.store, None);
        let body = random_bytes(100_000);
        stack
            .sealed
            .put("sealed/a", body.clone(), Meta::new())
            .await
            .expect("sealed put");
        let got = stack.sealed.get("sealed/a").await.expect("sealed get");
        assert_eq!(got.body, body, "{}", b.name);
        assert!(
            !got.meta.contains_key("firn-blake3"),
            "{}: {:?}",
            b.name,
            got.meta
        );
        assert!(
            matches!(
                stack.remote.get("sealed/a").await,
                Err(Error::Corrupt { .. })
            ),
            "{}",
            b.name
        );
        let torn = stacked(
            &b.store,
            Some(FaultSettings {
                truncate_rate: 0.3,
                ..FaultSettings::default()
            }),
        );
        // Six torn answers in a row to a whole get (0.3^6, about one read in 1,400) give up
        // with `Corrupt`: an error the caller sees, never short bytes. A range is read again
        // as long as the retries last.
        let mut gave_up = 0;
        for _ in 0..40 {
            match torn.sealed.get("sealed/a").await {
                Ok(got) => assert_eq!(got.body, body, "{}", b.name),
                Err(Error::Corrupt { .. }) => gave_up += 1,
                Err(e) => panic!("{}: torn get: {e}", b.name),
            }
            match torn.sealed.get_range("sealed/a", 1000..60_000).await {
                Ok(range) => assert_eq!(range, body.slice(1000..60_000), "{}", b.name),
                Err(e) => panic!("{}: torn range: {e}", b.name),
            }
        }
        assert!(
            gave_up <= 2,
            "{}: {gave_up} of 40 whole reads gave up",
            b.name
        );
        assert!(torn.faults.as_ref().expect("faults").injected() > 10);
        stack.sealed.delete("sealed/a").await.expect("delete");
    }
}

#[tokio::test]
async fn ranges_are_exact_or_errors() {
    for b in backends() {
        let stack = stacked(&b.store, None);
        let body = random_bytes(100);
        stack
            .remote
            .put("range/a", body.clone(), Meta::new())
            .await
            .expect("put");
        for r in [&b.store, &stack.remote] {
            assert_eq!(
                r.get_range("range/a", 90..100).await.expect("tail"),
                body.slice(90..)
            );
            assert!(
                r.get_range("range/a", 100..100)
                    .await
                    .expect("empty")
                    .is_empty()
            );
            for bad in [90..101, 100..101, 150..200, 0..1000] {
                match r.get_range("range/a", bad.clone()).await {
                    Err(Error::Permanent { message, .. }) => {
                        assert!(message.contains("100 bytes"), "{message}")
                    }
                    other => panic!("{}: range {bad:?} gave {other:?}", b.name),
                }
            }
        }
        // Torn ranged responses never reach the caller: they are caught and read again, as
        // long as the retries last (a range's length is known, so a short one is a transfer
        // that failed, not a rotten object). More than half torn: a bounded number of tries
        // would give up on about one read in 20.
        let torn = stacked(
            &b.store,
            Some(FaultSettings {
                truncate_rate: 0.6,
                ..FaultSettings::default()
            }),
        );
        for i in 0..200u64 {
            let start = i % 50;
            match torn.remote.get_range("range/a", start..start + 50).await {
                Ok(got) => assert_eq!(
                    got,
                    body.slice(start as usize..start as usize + 50),
                    "{}",
                    b.name
                ),
                Err(e) => panic!("{}: torn range: {e}", b.name),
            }
        }
        assert!(torn.faults.as_ref().expect("faults").injected() > 100);
    }
}

/// A ranged read (what a client waits on) keeps trying at least every second on a link that
/// fails, however long the backoff of other requests has grown: a reader gets many tries
/// within its read timeout, not a few long waits.
#[tokio::test]
async fn ranged_reads_keep_trying_every_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Remote> =
        Arc::new(DirStore::open(dir.path().join("bucket")).expect("dir store"));
    store
        .put("r/a", random_bytes(100), Meta::new())
        .await
        .expect("put");
    let mut registry = prometheus_client::registry::Registry::default();
    let stack = remote::stack(
        store,
        RetryPolicy {
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(10),
            give_up_after: Duration::from_secs(60),
        },
        unlimited(),
        Arc::new(RemoteMetrics::new(&mut registry)),
        Some(Arc::new(FaultPlan::new(FaultSettings {
            error_rate: 1.0,
            ..FaultSettings::default()
        }))),
    );
    let read = stack.sealed.get_range("r/a", 0..50);
    let waited = tokio::time::timeout(Duration::from_secs(8), read).await;
    assert!(waited.is_err(), "every try fails: {waited:?}");
    // Backing off to 1 s: 14 tries by 7.3 s. To 10 s, the 12th try would come at 10.2 s.
    let tries = stack.faults.as_ref().expect("faults").injected();
    assert!(tries >= 13, "{tries} tries in 8 s");
}

#[tokio::test]
async fn a_read_in_parts_never_mixes_two_versions() {
    let Some(options) = s3_options() else { return };
    let store: Arc<dyn Remote> = Arc::new(S3Store::new(&options, unlimited()).expect("s3 store"));
    // 16 MiB: four parts of 5 MiB (the test store's part size), each version one byte value.
    let versions: Vec<Bytes> = (1..=4u8).map(|v| Bytes::from(vec![v; 16 << 20])).collect();
    store
        .put("mix/a", versions[0].clone(), Meta::new())
        .await
        .expect("put");
    let writer = {
        let (store, versions) = (store.clone(), versions.clone());
        tokio::spawn(async move {
            for round in 0..24 {
                let body = versions[round % versions.len()].clone();
                store
                    .put("mix/a", body, Meta::new())
                    .await
                    .expect("overwrite");
            }
        })
    };
    let (mut whole, mut refused) = (0, 0);
    while !writer.is_finished() {
        match store.get("mix/a").await {
            Ok(object) => {
                assert_eq!(object.body.len(), 16 << 20);
                let first = object.body[0];
                assert!(
                    object.body.iter().all(|&b| b == first),
                    "a read mixed two versions of the object"
                );
                whole += 1;
            }
            Err(Error::Transient { message, .. }) => {
                assert!(message.contains("changed"), "{message}");
                refused += 1;
            }
            Err(e) => panic!("get: {e}"),
        }
    }
    writer.await.expect("writer");
    eprintln!("{whole} whole reads, {refused} refused because the object changed");
    assert!(whole + refused > 0, "reads ran during the overwrites");
    // Once the object stops changing, a read is whole and the newest version (on a loaded
    // machine every read during the overwrites may have been refused).
    let last = store.get("mix/a").await.expect("get after the overwrites");
    assert_eq!(last.body, versions[23 % versions.len()]);
}

#[tokio::test]
async fn symlinks_planted_in_the_bucket_are_never_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = dir.path().join("bucket");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::fs::write(outside.join("secret"), b"not for the bucket").expect("write");
    let store: Arc<dyn Remote> = Arc::new(DirStore::open(&bucket).expect("dir store"));
    let stack = stacked(&store, None);
    let r = &stack.remote;
    r.put("real/a", Bytes::from_static(b"a"), Meta::new())
        .await
        .expect("put");
    std::os::unix::fs::symlink(&outside, bucket.join("dirlink")).expect("symlink");
    std::os::unix::fs::symlink(outside.join("secret"), bucket.join("filelink")).expect("symlink");
    std::os::unix::fs::symlink(&outside, bucket.join("real/inner")).expect("symlink");
    for key in ["dirlink/secret", "filelink", "real/inner/secret"] {
        for outcome in [
            store.get(key).await.map(|o| o.body),
            store.get_range(key, 0..4).await,
        ] {
            assert!(outcome.is_err(), "{key}: read through a link: {outcome:?}");
        }
        assert!(
            !matches!(store.head(key).await, Ok(Some(_))),
            "{key}: head saw through a link"
        );
        if key != "filelink" {
            assert!(
                store
                    .put(key, Bytes::from_static(b"overwrite"), Meta::new())
                    .await
                    .is_err(),
                "{key}: put through a link"
            );
        }
        store.delete(key).await.ok();
    }
    // A put onto a link replaces the link itself (the rename never follows it).
    std::os::unix::fs::symlink(outside.join("secret"), bucket.join("filelink")).expect("symlink");
    store
        .put("filelink", Bytes::from_static(b"mine"), Meta::new())
        .await
        .expect("put replaces a link");
    assert!(
        std::fs::symlink_metadata(bucket.join("filelink"))
            .expect("stat")
            .is_file()
    );
    store.delete("filelink").await.expect("delete");
    assert!(
        store
            .put("dirlink/new", Bytes::from_static(b"x"), Meta::new())
            .await
            .is_err()
    );
    // Nothing outside changed, and listings show no link or what is behind one.
    assert_eq!(
        std::fs::read(outside.join("secret")).expect("still there"),
        b"not for the bucket"
    );
    assert_eq!(files_in(&outside), ["secret"]);
    let listed: Vec<String> = store
        .list("")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(listed, ["real/a"]);
    assert!(store.list("dirlink/").await.expect("list").is_empty());
    assert_eq!(r.get("real/a").await.expect("get").body, &b"a"[..]);
}

#[test]
fn opening_removes_only_staging_files_of_dead_writers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = dir.path().join("bucket");
    DirStore::open(&bucket).expect("first open");
    let staging = bucket.join(".firn-staging");
    // A live writer (a child that sleeps) and a dead one (a child that has exited).
    let mut live = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    let mut dead = std::process::Command::new("true").spawn().expect("true");
    let dead_pid = dead.id();
    dead.wait().expect("wait");
    let live_file = staging.join(format!("{}-00000000000000aa-0", live.id()));
    let dead_file = staging.join(format!("{dead_pid}-00000000000000bb-0"));
    // Left by an earlier process that had this one's PID (as PID 1 in a container has).
    let earlier_self = staging.join(format!("{}-00000000000000cc-0", std::process::id()));
    std::fs::write(&live_file, b"in flight").expect("write");
    std::fs::write(&dead_file, b"left by a crash").expect("write");
    std::fs::write(&earlier_self, b"left by a crash").expect("write");
    DirStore::open(&bucket).expect("second open");
    assert!(
        !earlier_self.exists(),
        "an earlier process's staging file was kept"
    );
    let live_survived = live_file.exists();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(live.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill sleep");
    live.wait().expect("wait");
    assert!(live_survived, "a live writer's staging file was deleted");
    assert!(!dead_file.exists(), "a dead writer's staging file was kept");
}

#[test]
fn a_put_fsyncs_every_directory_it_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = dir.path().join("bucket");
    std::fs::create_dir_all(bucket.join("a")).expect("mkdir");
    let source = dir.path().join("object");
    std::fs::write(&source, b"x").expect("write");
    let config = dir.path().join("firn.toml");
    std::fs::write(
        &config,
        format!(
            "[local]\ndata_dir = \"{}\"\n[remote]\nkind = \"local\"\npath = \"{}\"\n",
            dir.path().join("data").display(),
            bucket.display()
        ),
    )
    .expect("config");
    let trace = dir.path().join("trace");
    let status = std::process::Command::new("strace")
        .args(["-f", "-y", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&trace)
        .arg(common::FIRN)
        .args(["remote", "--config"])
        .arg(&config)
        .args(["put"])
        .arg(&source)
        .arg("a/b/c/d/object")
        .status()
        .expect("run strace (package strace)");
    assert!(status.success());
    let trace = std::fs::read_to_string(&trace).expect("trace");
    let synced: Vec<&str> = trace
        .lines()
        .filter_map(|l| l.split_once("sync(")?.1.split_once('<')?.1.split_once('>'))
        .map(|(path, _)| path)
        .collect();
    let bucket = std::fs::canonicalize(&bucket).expect("canonical");
    // a existed; a/b, a/b/c and a/b/c/d were created: their parents, and the object's
    // directory after the rename, must reach the disk.
    for dir in ["a", "a/b", "a/b/c", "a/b/c/d"] {
        let want = bucket.join(dir);
        assert!(
            synced.iter().any(|p| std::path::Path::new(p) == want),
            "{} never fsynced; fsynced: {synced:?}",
            want.display()
        );
    }
    assert!(bucket.join("a/b/c/d/object").is_file());
}

/// A TCP relay in front of the S3 server that records when each byte towards the server
/// arrived: "measured at the store".
struct Relay {
    endpoint: String,
    /// (when, bytes) for every read from the client side.
    sent: Arc<std::sync::Mutex<Vec<(Instant, usize)>>>,
}

async fn relay_to(upstream: &str) -> Relay {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind relay");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = sent.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = async {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = client_read.read(&mut buf).await {
                        if n == 0 || server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        log.lock().expect("log").push((Instant::now(), n));
                    }
                    let _ = server_write.shutdown().await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    let _ = client_write.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    Relay { endpoint, sent }
}

/// Paused uploads hold S3 requests unsent: nothing reaches the store while the pause lasts
/// (no PUT waits there with its body half sent until a timeout ends it), and the put goes
/// through once uploads resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_upload_sends_nothing_until_it_resumes() {
    let Some(mut options) = s3_options() else {
        return;
    };
    let relay = relay_to(options.endpoint.as_deref().expect("endpoint")).await;
    options.endpoint = Some(relay.endpoint.clone());
    let limiter = Arc::new(Limiter::new(
        toml::from_str("upload = \"paused\"").expect("policy"),
    ));
    let store = Arc::new(S3Store::new(&options, limiter.clone()).expect("s3 store"));
    let body = random_bytes(1 << 20);
    let put = tokio::spawn({
        let (store, body) = (store.clone(), body.clone());
        async move { store.put("paused/a", body, Meta::new()).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent: usize = relay.sent.lock().expect("log").iter().map(|(_, n)| n).sum();
    assert_eq!(sent, 0, "bytes reached the store while uploads were paused");
    assert!(!put.is_finished());
    limiter.set_policy(Policy::default());
    tokio::time::timeout(Duration::from_secs(30), put)
        .await
        .expect("the put ends once uploads resume")
        .expect("task")
        .expect("put");
    assert_eq!(store.get("paused/a").await.expect("get").body, body);
    store.delete("paused/a").await.expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_limit_holds_at_the_store_through_errors() {
    let Some(mut options) = s3_options() else {
        return;
    };
    let relay = relay_to(options.endpoint.as_deref().expect("endpoint")).await;
    options.endpoint = Some(relay.endpoint.clone());
    const RATE: u64 = 8 << 20;
    let limiter = Arc::new(Limiter::new(
        toml::from_str(&format!("upload = \"{RATE}/s\"")).expect("policy"),
    ));
    let backend: Arc<dyn Remote> =
        Arc::new(S3Store::new(&options, limiter.clone()).expect("s3 store"));
    let mut registry = prometheus_client::registry::Registry::default();
    let stack = remote::stack(
        backend,
        RetryPolicy {
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            give_up_after: Duration::from_secs(120),
        },
        limiter,
        Arc::new(RemoteMetrics::new(&mut registry)),
        Some(Arc::new(FaultPlan::new(FaultSettings {
            error_rate: 0.3,
            ..FaultSettings::default()
        }))),
    );
    // 34 single-part objects and two of three parts, all in flight at once: 81 MiB. Enough
    // attempts that 30% errors miss them all only once in 370,000 runs (0.7^36).
    let objects: Vec<(String, Bytes)> = (0..36)
        .map(|i| {
            let size = if i < 2 { 15 << 20 } else { 3 << 19 };
            (format!("limited/{i}"), random_bytes(size))
        })
        .collect();
    futures::future::try_join_all(
        objects
            .iter()
            .map(|(key, body)| stack.remote.put(key, body.clone(), Meta::new())),
    )
    .await
    .expect("puts through errors");
    let sent = relay.sent.lock().expect("log").clone();
    let total: usize = sent.iter().map(|(_, n)| n).sum();
    // From the first byte to arrive to the last: the bytes after the first read, over the time.
    let (first, last) = (sent[0].0, sent[sent.len() - 1].0);
    let took = last.duration_since(first).as_secs_f64();
    let rate = (total - sent[0].1) as f64 / took;
    // Any one second holds no more than a second's worth, plus the burst allowance.
    let mut worst = 0usize;
    for (i, (at, _)) in sent.iter().enumerate() {
        let window: usize = sent[i..]
            .iter()
            .take_while(|(t, _)| t.duration_since(*at) < Duration::from_secs(1))
            .map(|(_, n)| n)
            .sum();
        worst = worst.max(window);
    }
    let injected = stack.faults.as_ref().expect("faults").injected();
    eprintln!(
        "{total} bytes at the store in {took:.2}s = {:.3} of the limit; busiest second {:.3}; {injected} faults",
        rate / RATE as f64,
        worst as f64 / RATE as f64
    );
    assert!(injected >= 1, "no fault injected");
    assert!(
        total >= 81 << 20,
        "the store saw {total} bytes, less than the data"
    );
    // Never more than the limit; less only by the retries' waits (see the directory-store
    // twin of this test below).
    let share = rate / RATE as f64;
    assert!(
        (0.85..1.05).contains(&share),
        "{rate:.0} B/s at the store, limit {RATE}"
    );
    // At most a second's worth, the burst allowance (a quarter) and one read (64 KiB): 1.26
    // of the rate; the relay's timestamps get some leeway on top.
    assert!(
        (worst as f64) < RATE as f64 * 1.4,
        "{worst} bytes in one second at the store, limit {RATE}/s"
    );
}

/// Runs `firn` under /usr/bin/time: success, and the peak RSS in MiB.
fn firn_peak_rss(args: &[&str]) -> (bool, String, u64) {
    let report = tempfile::NamedTempFile::new().expect("tempfile");
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o"])
        .arg(report.path())
        .arg(common::FIRN)
        .args(args)
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .expect("run /usr/bin/time (package time)");
    let text = std::fs::read_to_string(report.path()).expect("time report");
    let kib: u64 = text
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {text:?}"));
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), output, kib / 1024)
}

/// `dir/firn.toml` for `firn remote` against the test's S3 server, data in `dir/data`, parts
/// of 16 MiB with 8 in flight.
fn s3_config(dir: &std::path::Path, options: &S3Options) -> std::path::PathBuf {
    let config = dir.join("firn.toml");
    std::fs::write(
        &config,
        format!(
            "[local]\ndata_dir = \"{}\"\n[remote]\nkind = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nprefix = \"{}\"\npart_size = \"16MiB\"\npart_concurrency = 8\n",
            dir.join("data").display(),
            options.endpoint.as_deref().expect("endpoint"),
            options.bucket,
            options.region,
            options.access_key_id.as_deref().expect("key id"),
            options.secret_access_key.as_deref().expect("secret"),
            options.prefix,
        ),
    )
    .expect("config");
    config
}

#[test]
fn large_files_stream_through_bounded_memory() {
    let Some(options) = s3_options() else { return };
    // 1 GiB in the suite (enough: a whole-object buffer alone would pass the bound, and the
    // download takes real disk); FIRN_TEST_LARGE_GIB=20 for the full-size check.
    let gib: u64 = std::env::var("FIRN_TEST_LARGE_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("large.bin");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(&source).expect("create");
        file.set_len(gib << 30).expect("sparse file");
        // Marks at the start, across a part boundary, in the middle and at the very end.
        for at in [0, (16 << 20) - 3, (gib << 30) / 2, (gib << 30) - 4096] {
            file.write_all_at(&random_bytes(4096), at).expect("mark");
        }
    }
    let config = s3_config(dir.path(), &options);
    let config = config.to_str().expect("utf-8");
    // Parts of 16 MiB, 8 in flight, a few read ahead or being written: well under 400 MiB.
    const BOUND_MIB: u64 = 400;
    let (ok, out, put_rss) = firn_peak_rss(&[
        "remote",
        "--config",
        config,
        "put",
        source.to_str().expect("utf-8"),
        "large/file.bin",
    ]);
    assert!(ok, "put: {out}");
    let back = dir.path().join("back.bin");
    let (ok, out, get_rss) = firn_peak_rss(&[
        "remote",
        "--config",
        config,
        "get",
        "large/file.bin",
        back.to_str().expect("utf-8"),
    ]);
    assert!(ok, "get: {out}");
    eprintln!("{gib} GiB: peak RSS {put_rss} MiB to put, {get_rss} MiB to get");
    let same = std::process::Command::new("cmp")
        .arg(&source)
        .arg(&back)
        .status()
        .expect("cmp");
    assert!(same.success(), "the download differs from the file");
    assert!(
        put_rss < BOUND_MIB,
        "put of {gib} GiB peaked at {put_rss} MiB"
    );
    assert!(
        get_rss < BOUND_MIB,
        "get of {gib} GiB peaked at {get_rss} MiB"
    );
}

#[test]
fn many_large_files_share_one_memory_budget() {
    let Some(options) = s3_options() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("many");
    std::fs::create_dir_all(&source).expect("mkdir");
    // Five files of 20 parts each, all allowed in flight by --jobs 16.
    for i in 0..5u64 {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(source.join(format!("f{i}"))).expect("create");
        file.set_len(320 << 20).expect("sparse file");
        file.write_all_at(&random_bytes(4096), i * (50 << 20))
            .expect("mark");
    }
    let config = s3_config(dir.path(), &options);
    let config = config.to_str().expect("utf-8");
    // One large object's worth (8 parts in flight, a few read ahead), not five of them.
    const BOUND_MIB: u64 = 400;
    let (ok, out, put_rss) = firn_peak_rss(&[
        "remote",
        "--config",
        config,
        "put",
        "--jobs",
        "16",
        source.to_str().expect("utf-8"),
        "many",
    ]);
    assert!(ok, "put: {out}");
    let back = dir.path().join("back");
    let (ok, out, get_rss) = firn_peak_rss(&[
        "remote",
        "--config",
        config,
        "get",
        "--jobs",
        "16",
        "many/",
        back.to_str().expect("utf-8"),
    ]);
    assert!(ok, "get: {out}");
    eprintln!("5 x 320 MiB, 16 jobs: peak RSS {put_rss} MiB to put, {get_rss} MiB to get");
    let same = std::process::Command::new("diff")
        .arg("-rq")
        .arg(&source)
        .arg(&back)
        .status()
        .expect("diff");
    assert!(same.success(), "the downloads differ from the files");
    assert!(put_rss < BOUND_MIB, "put peaked at {put_rss} MiB");
    assert!(get_rss < BOUND_MIB, "get peaked at {get_rss} MiB");
}

/// An upload body that records every byte the store reads from it.
#[derive(Debug)]
struct CountedBody {
    body: Bytes,
    read: Arc<std::sync::atomic::AtomicU64>,
}

#[async_trait::async_trait]
impl remote::Body for CountedBody {
    fn len(&self) -> u64 {
        self.body.len() as u64
    }

    async fn read(&self, range: std::ops::Range<u64>) -> remote::Result<Bytes> {
        self.read.fetch_add(
            range.end - range.start,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(self.body.slice(range.start as usize..range.end as usize))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_store_holds_its_limit_through_errors() {
    const RATE: u64 = 4 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let limiter = Arc::new(Limiter::new(
        toml::from_str(&format!("upload = \"{RATE}/s\"")).expect("policy"),
    ));
    let store: Arc<dyn Remote> = Arc::new(
        DirStore::open(dir.path().join("bucket"))
            .expect("dir store")
            .with_limiter(limiter),
    );
    // Retries over injected errors, straight on the store: every body read is a write.
    let plan = Arc::new(FaultPlan::new(FaultSettings {
        error_rate: 0.3,
        ..FaultSettings::default()
    }));
    let faulty: Arc<dyn Remote> = Arc::new(firn::remote::faults::Faulty::new(store, plan.clone()));
    let r = firn::remote::retry::Retrying::new(
        faulty,
        RetryPolicy {
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            give_up_after: Duration::from_secs(60),
        },
    );
    let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    // 48 attempts at least: 30% errors miss them all once in 27 million runs.
    futures::future::try_join_all((0..48).map(|i| {
        let body = Arc::new(CountedBody {
            body: random_bytes(1 << 19),
            read: read.clone(),
        });
        let r = &r;
        async move {
            r.put_body(&format!("dirlimit/{i}"), body, Meta::new())
                .await
        }
    }))
    .await
    .expect("puts through errors");
    let took = started.elapsed().as_secs_f64();
    let written = read.load(std::sync::atomic::Ordering::Relaxed);
    let rate = written as f64 / took;
    eprintln!(
        "{written} bytes written in {took:.2}s = {:.3} of the limit; {} faults",
        rate / RATE as f64,
        plan.injected()
    );
    assert!(plan.injected() >= 1, "no fault injected");
    assert!(written >= 24 << 20);
    // The limit is the promise: never more than it, allowing for the first burst. Less is
    // allowed within reason: a put that fails last waits out its backoff alone, so the tail
    // of the run writes nothing for a while; failed attempts charged twice would show as
    // about 0.7 with this many faults.
    let share = rate / RATE as f64;
    assert!(
        (0.85..1.05).contains(&share),
        "{rate:.0} B/s written, limit {RATE}"
    );
}

/// Whether a store honours create-if-absent is a fact about the store, and firn checks it at
/// start rather than assuming it: the directory store refuses a second create, Garage (2.5)
/// ignores `If-None-Match: *` and overwrites. When Garage starts honouring it, this test fails
/// on purpose: update docs/format.md ("Remote objects") and decision 0005 with it.
#[tokio::test]
async fn probe_create_tells_which_stores_fence() {
    for b in backends() {
        let stack = stacked(&b.store, None);
        let honoured = remote::probe_create(stack.probe.as_ref())
            .await
            .unwrap_or_else(|e| panic!("{}: probe_create: {e}", b.name));
        match b.name {
            "dir" => assert!(honoured, "the directory store overwrote on a create"),
            _ => assert!(
                !honoured,
                "Garage refused the second create: it honours If-None-Match now (it ignored it \
                 up to 2.5)"
            ),
        }
        assert!(
            stack
                .remote
                .list(remote::PROBE_PREFIX)
                .await
                .expect("list")
                .is_empty(),
            "{}: the probe left its object",
            b.name
        );

        // Through the whole stack, as callers use it.
        let r = &stack.remote;
        r.create("cond/commit", Bytes::from_static(b"first"), Meta::new())
            .await
            .unwrap_or_else(|e| panic!("{}: first create: {e}", b.name));
        let second = r
            .create("cond/commit", Bytes::from_static(b"second"), Meta::new())
            .await;
        let body = r.get("cond/commit").await.expect("get, verified").body;
        if honoured {
            assert!(
                matches!(&second, Err(Error::Exists { key }) if key == "cond/commit"),
                "{}: {second:?}",
                b.name
            );
            assert_eq!(body, Bytes::from_static(b"first"), "{}", b.name);
        } else {
            // What a store that ignores the condition does: the second create overwrote.
            second.unwrap_or_else(|e| panic!("{}: second create: {e}", b.name));
            assert_eq!(body, Bytes::from_static(b"second"), "{}", b.name);
        }
        r.delete("cond/commit").await.expect("delete");
    }
}

/// A create whose object was stored but whose answer was lost is retried, and the retry finds
/// the object: `Exists`, for the caller's own object. Callers tell by reading it back.
#[tokio::test]
async fn a_create_whose_answer_was_lost_reads_back_as_its_own() {
    for b in backends() {
        let stack = stacked(
            &b.store,
            Some(FaultSettings {
                error_rate: 0.5,
                ..FaultSettings::default()
            }),
        );
        let r = &stack.remote;
        let outcomes = futures::future::join_all((0..40).map(|i| async move {
            let key = format!("lost/{i:02}");
            let body = Bytes::from(format!("mine {i}"));
            let outcome = r.create(&key, body.clone(), Meta::new()).await;
            (key, body, outcome)
        }))
        .await;
        let mut exists = 0;
        for (key, body, outcome) in outcomes {
            match outcome {
                Ok(()) => {}
                Err(Error::Exists { .. }) => exists += 1,
                Err(e) => panic!("{}: {key}: {e}", b.name),
            }
            assert_eq!(r.get(&key).await.expect("get").body, body, "{}", b.name);
            r.delete(&key).await.expect("delete");
        }
        eprintln!(
            "{}: {exists} of 40 creates reported Exists for their own object",
            b.name
        );
    }
}

#[tokio::test]
async fn a_create_is_one_request_for_small_objects() {
    let Some(options) = s3_options() else { return };
    let store = S3Store::new(&options, unlimited()).expect("s3 store");
    let large = random_bytes(options.multipart_threshold + 1);
    match store.create("cond/large", large, Meta::new()).await {
        Err(Error::Permanent { message, .. }) => {
            assert!(message.contains("multipart threshold"), "{message}")
        }
        other => panic!("a create over the multipart threshold: {other:?}"),
    }
    assert!(store.head("cond/large").await.expect("head").is_none());
}

/// The status document says what the start-time check found: `honoured` for the directory
/// store, `ignored` for Garage.
#[tokio::test]
async fn status_shows_whether_the_store_fences() {
    let mut cases = vec![("dir", String::new(), "honoured")];
    if let Some(options) = s3_options() {
        let remote = format!(
            "[remote]\nkind = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nprefix = \"{}\"\n",
            options.endpoint.as_deref().expect("endpoint"),
            options.bucket,
            options.region,
            options.access_key_id.as_deref().expect("key id"),
            options.secret_access_key.as_deref().expect("secret"),
            options.prefix,
        );
        cases.push(("s3", remote, "ignored"));
    }
    for (name, extra, expected) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = common::free_port();
        let config = common::write_config(dir.path(), port, &extra);
        let config_arg = config.to_str().expect("utf-8");
        let daemon = common::Daemon::start(&config, port, &[]);
        let token = std::fs::read_to_string(dir.path().join("data/api-token")).expect("token");
        let http = reqwest::Client::new();
        let started = Instant::now();
        let found = loop {
            let status: serde_json::Value = http
                .get(daemon.url("/api/v1/status"))
                .bearer_auth(token.trim())
                .send()
                .await
                .expect("status")
                .json()
                .await
                .expect("json");
            let found = status["remote"]["conditional_create"].clone();
            if found != "unknown" || started.elapsed() > Duration::from_secs(30) {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(found, expected, "{name}");
        let (ok, out, err) = common::firn(&["status", "--config", config_arg]);
        assert!(ok, "{name}: firn status: {err}");
        let line = out
            .lines()
            .find(|l| l.starts_with("conditional put"))
            .unwrap_or_else(|| panic!("{name}: no conditional put line in {out}"));
        assert!(line.to_lowercase().contains(expected), "{name}: {line}");
        assert!(daemon.stop().success(), "{name}");
    }
}

/// A stand-in for an S3 store that honours `If-None-Match: *` (AWS S3 does; the test's Garage
/// does not): PUTs only, answering an existing key with 412, and the first `conflicts` creates
/// with 409 ConditionalRequestConflict, as AWS does while conditional writes race.
struct FencingS3 {
    endpoint: String,
    conflicts: Arc<std::sync::atomic::AtomicU32>,
    requests: Arc<std::sync::atomic::AtomicU32>,
}

async fn fencing_s3(conflicts: u32) -> FencingS3 {
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::atomic::Ordering::SeqCst;
    let objects = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        Bytes,
    >::new()));
    let conflicts = Arc::new(std::sync::atomic::AtomicU32::new(conflicts));
    let requests = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let error = |status: StatusCode, code: &str| {
        (
            status,
            format!(
                "<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>{code}</Message></Error>"
            ),
        )
    };
    let (store, left, count) = (objects.clone(), conflicts.clone(), requests.clone());
    let put = move |axum::extract::Path(key): axum::extract::Path<String>,
                    headers: HeaderMap,
                    body: Bytes| async move {
        count.fetch_add(1, SeqCst);
        let create = headers.get("if-none-match").is_some_and(|v| v == "*");
        if create
            && left
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(error(StatusCode::CONFLICT, "ConditionalRequestConflict"));
        }
        let mut objects = store.lock().expect("objects");
        if create && objects.contains_key(&key) {
            return Err(error(StatusCode::PRECONDITION_FAILED, "PreconditionFailed"));
        }
        objects.insert(key, body);
        Ok([("etag", "\"fencing\"")])
    };
    let store = objects.clone();
    let delete = move |axum::extract::Path(key): axum::extract::Path<String>| async move {
        store.lock().expect("objects").remove(&key);
        StatusCode::NO_CONTENT
    };
    let app = axum::Router::new().route("/{*key}", axum::routing::put(put).delete(delete));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    FencingS3 {
        endpoint,
        conflicts,
        requests,
    }
}

fn fencing_options(endpoint: &str) -> S3Options {
    S3Options {
        endpoint: Some(endpoint.to_string()),
        bucket: "fencing".to_string(),
        region: "us-east-1".to_string(),
        prefix: String::new(),
        path_style: true,
        access_key_id: Some("id".to_string()),
        secret_access_key: Some("secret".to_string()),
        checksum: true,
        multipart_threshold: 6 << 20,
        part_size: 5 << 20,
        part_concurrency: 4,
        request_timeout: Duration::from_secs(10),
        server_side_encryption: None,
        sse_kms_key_id: None,
    }
}

/// The S3 backend's side of create-if-absent, against a store that honours it: a 412 is
/// `Exists` (not retried), a 409 ConditionalRequestConflict is retried until the store
/// answers, and `probe_create` says "honoured".
#[tokio::test]
async fn the_s3_backend_reads_a_stores_refusal_as_exists() {
    use std::sync::atomic::Ordering::SeqCst;
    let s3 = fencing_s3(0).await;
    let store: Arc<dyn Remote> =
        Arc::new(S3Store::new(&fencing_options(&s3.endpoint), unlimited()).expect("s3 store"));
    assert!(
        remote::probe_create(store.as_ref()).await.expect("probe"),
        "a store that answers 412 was taken for one that overwrites"
    );
    let stack = stacked(&store, None);
    let r = &stack.remote;
    r.create("cond/a", Bytes::from_static(b"first"), Meta::new())
        .await
        .expect("first create");
    let before = s3.requests.load(SeqCst);
    let second = r
        .create("cond/a", Bytes::from_static(b"second"), Meta::new())
        .await;
    assert!(
        matches!(&second, Err(Error::Exists { key }) if key == "cond/a"),
        "{second:?}"
    );
    assert_eq!(s3.requests.load(SeqCst) - before, 1, "a 412 was retried");

    s3.conflicts.store(2, SeqCst);
    let before = s3.requests.load(SeqCst);
    r.create("cond/b", Bytes::from_static(b"b"), Meta::new())
        .await
        .expect("a create through two 409 conflicts");
    assert_eq!(s3.requests.load(SeqCst) - before, 3);

    // Straight on the backend (no retry wrapper), the conflict is a transient error.
    s3.conflicts.store(1, SeqCst);
    match store
        .create("cond/c", Bytes::from_static(b"c"), Meta::new())
        .await
    {
        Err(e @ Error::Transient { .. }) => {
            assert!(e.to_string().contains("ConditionalRequestConflict"), "{e}")
        }
        other => panic!("a 409 ConditionalRequestConflict: {other:?}"),
    }
}

/// `server_side_encryption` reaches the store on every kind of write (a single PUT, a
/// multipart upload, a directory marker), as moto (which keeps and reports the header as S3
/// does) shows; a value S3 would not take is refused when the store is configured.
#[tokio::test]
async fn server_side_encryption_is_asked_for_on_every_write() {
    let Some(moto) = common::Moto::start() else {
        return;
    };
    let mut options = fencing_options(&moto.endpoint);
    options.bucket = common::MOTO_BUCKET.to_string();
    options.prefix = "sse-test".to_string();
    options.access_key_id = Some("test".to_string());
    options.secret_access_key = Some("test".to_string());
    options.server_side_encryption = Some("AES256".to_string());
    let store = S3Store::new(&options, unlimited()).expect("s3 store");
    store
        .put("sse/small", Bytes::from_static(b"small"), Meta::new())
        .await
        .expect("put");
    store
        .put("sse/large", random_bytes(11 << 20), Meta::new())
        .await
        .expect("multipart put");
    store
        .put("sse/dir/", Bytes::new(), Meta::new())
        .await
        .expect("marker");
    let script = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
    aws_access_key_id="test", aws_secret_access_key="test")
for key in sys.argv[3:]:
    print(key, s3.head_object(Bucket=sys.argv[2], Key=key).get("ServerSideEncryption"))
"#;
    let keys: Vec<String> = ["small", "large", "dir/"]
        .iter()
        .map(|k| format!("{}/sse/{k}", options.prefix))
        .collect();
    let mut args = vec![&moto.endpoint[..], common::MOTO_BUCKET];
    args.extend(keys.iter().map(|k| k.as_str()));
    let expected: String = keys.iter().map(|k| format!("{k} AES256\n")).collect();
    assert_eq!(
        String::from_utf8_lossy(&common::boto3(script, &args)),
        expected
    );

    for (kind, key_id) in [("aes256", None), ("AES256", Some("key-1")), ("sse-c", None)] {
        let mut bad = options.clone();
        bad.server_side_encryption = Some(kind.to_string());
        bad.sse_kms_key_id = key_id.map(str::to_string);
        let e = S3Store::new(&bad, unlimited()).expect_err("a bad encryption setting");
        assert!(
            e.to_string().contains("server_side_encryption")
                || e.to_string().contains("sse_kms_key_id"),
            "{e}"
        );
    }
}

/// A TLS relay in front of the S3 server, with a certificate for 127.0.0.1 made by `openssl`
/// in `dir` from a CA of its own (`dir/ca.pem`). Its address is `https://...`.
fn tls_relay_to(rt: &tokio::runtime::Runtime, upstream: &str, dir: &std::path::Path) -> String {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    // A CA (`dir/ca.pem`, what a client is told to trust) and the relay's certificate from it.
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let req = |subject: &str, key: &std::path::Path, out: &std::path::Path| {
        let mut openssl = std::process::Command::new("openssl");
        openssl
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "2", "-subj", subject])
            .arg("-keyout")
            .arg(key)
            .arg("-out")
            .arg(out);
        openssl
    };
    common::checked(req("/CN=firn test CA", &ca_key, &ca), "openssl req (CA)");
    let mut leaf = req("/CN=firn test store", &key, &cert);
    leaf.arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"]);
    common::checked(leaf, "openssl req (certificate)");
    let certs = CertificateDer::pem_file_iter(&cert)
        .expect("cert.pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate");
    let key = PrivateKeyDer::from_pem_file(&key).expect("key.pem");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let upstream = upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind relay");
    let endpoint = format!("https://{}", listener.local_addr().expect("addr"));
    rt.spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                let Ok(mut client) = acceptor.accept(client).await else {
                    return;
                };
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    endpoint
}

/// An `https` endpoint works, its certificate checked against the system's trusted roots
/// (here one added through `SSL_CERT_FILE`); one no root vouches for is refused, saying so.
#[test]
fn an_https_store_is_reached_only_through_a_trusted_certificate() {
    let Some(mut options) = s3_options() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    options.endpoint = Some(tls_relay_to(
        &rt,
        options.endpoint.as_deref().expect("endpoint"),
        dir.path(),
    ));
    let config = s3_config(dir.path(), &options);
    // A refusal is final quickly rather than retried for the default five minutes.
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str("retry_for_secs = 2\n");
    std::fs::write(&config, text).expect("config");
    let source = dir.path().join("source.bin");
    std::fs::write(&source, random_bytes(3 << 20)).expect("source");
    let run = |trusted: bool, args: &[&str]| {
        let mut command = std::process::Command::new(common::FIRN);
        command
            .args(["remote", "--config", config.to_str().expect("utf-8")])
            .args(args)
            .env_remove("AWS_CA_BUNDLE")
            .env_remove("SSL_CERT_DIR");
        if trusted {
            command.env("SSL_CERT_FILE", dir.path().join("ca.pem"));
        } else {
            command.env("SSL_CERT_FILE", "/dev/null");
        }
        let out = command.output().expect("run firn");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, out) = run(
        false,
        &["put", source.to_str().expect("utf-8"), "tls/refused.bin"],
    );
    assert!(
        !ok,
        "a put through an untrusted certificate succeeded: {out}"
    );
    assert!(
        out.to_lowercase().contains("certificate"),
        "the refusal does not name the certificate: {out}"
    );
    let (ok, out) = run(
        true,
        &["put", source.to_str().expect("utf-8"), "tls/file.bin"],
    );
    assert!(ok, "put over https: {out}");
    let back = dir.path().join("back.bin");
    let (ok, out) = run(
        true,
        &["get", "tls/file.bin", back.to_str().expect("utf-8")],
    );
    assert!(ok, "get over https: {out}");
    assert_eq!(
        std::fs::read(&back).expect("back"),
        std::fs::read(&source).expect("source"),
        "the object came back different"
    );
    let keys = boto3_keys(&format!("{}/tls/", options.prefix));
    assert_eq!(keys, vec![format!("{}/tls/file.bin", options.prefix)]);
}

/// Small ranged reads on a reused connection take about as long as larger ones. Garage
/// leaves Nagle's algorithm on, so it holds a small body until the client acknowledges the
/// answer's head, which a client in the kernel's interactive mode delays by 40 ms or more:
/// every 4 KiB GET then took 44 ms against 2 to 6 ms for 64 KiB ones, whose body fills
/// whole segments (see src/remote/http.rs). Compared with the larger reads of the same run,
/// so that a loaded machine slows both alike.
#[tokio::test]
async fn small_ranged_reads_do_not_wait_for_a_delayed_ack() {
    let Some(options) = s3_options() else { return };
    let store = S3Store::new(&options, unlimited()).expect("s3 store");
    let key = format!("{}/acks/object.bin", options.prefix);
    store
        .put(&key, random_bytes(4 << 20), Meta::new())
        .await
        .expect("put");
    let median = |len: u64| {
        let store = &store;
        let key = &key;
        async move {
            let mut took = Vec::new();
            for i in 0..15u64 {
                let at = i * (256 << 10) + 4096;
                let started = Instant::now();
                let got = store.get_range(key, at..at + len).await.expect("get");
                took.push(started.elapsed());
                assert_eq!(got.len() as u64, len);
            }
            took.sort();
            took[took.len() / 2]
        }
    };
    let small = median(4096).await;
    let large = median(64 << 10).await;
    eprintln!("median GET: 4 KiB {small:?}, 64 KiB {large:?}");
    assert!(
        small < large + Duration::from_millis(25),
        "4 KiB GETs took {small:?} (median), 64 KiB ones {large:?}: small answers wait for a delayed ACK"
    );
}

/// `request_timeout` bounds each wait for the store, not a whole request: a PUT that the
/// bandwidth limit stretches well past it goes through, as long as its bytes keep moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_slower_than_the_request_timeout_goes_through_while_it_moves() {
    let Some(mut options) = s3_options() else {
        return;
    };
    options.request_timeout = Duration::from_secs(2);
    const RATE: u64 = 1 << 20;
    let limiter = Arc::new(Limiter::new(
        toml::from_str(&format!("upload = \"{RATE}/s\"")).expect("policy"),
    ));
    let store = S3Store::new(&options, limiter).expect("s3 store");
    let body = random_bytes(6 << 20);
    let key = "slow/object.bin";
    let started = Instant::now();
    store
        .put(key, body.clone(), Meta::new())
        .await
        .expect("a put slower than the request timeout");
    let took = started.elapsed();
    assert!(
        took > Duration::from_secs(4),
        "the limit did not hold: {took:?}"
    );
    assert_eq!(store.get(key).await.expect("get").body, body);
}

/// A store that accepts connections and then neither reads nor answers: a GET, a small PUT
/// (sent whole into the socket, then no answer) and a large one (stalled mid-body) each fail
/// once `request_timeout` passes without progress, saying so, rather than hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_stops_answering_fails_requests_after_the_timeout() {
    let Some(mut options) = s3_options() else {
        return;
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    options.endpoint = Some(format!("http://{}", listener.local_addr().expect("addr")));
    options.request_timeout = Duration::from_secs(1);
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            keep.lock().expect("held").push(socket);
        }
    });
    let store = S3Store::new(&options, unlimited()).expect("s3 store");
    for (what, size) in [("get", 0), ("small put", 64 << 10), ("large put", 64 << 20)] {
        let started = Instant::now();
        let failed = if size == 0 {
            store.get("hung/object").await.map(|_| ())
        } else {
            store
                .put("hung/object", random_bytes(size), Meta::new())
                .await
        };
        let took = started.elapsed();
        let e = failed.expect_err(what).to_string();
        assert!(e.contains("read timeout"), "{what}: {e}");
        // object_store tries three times, each bounded by the timeout.
        assert!(took < Duration::from_secs(15), "{what} took {took:?}: {e}");
    }
    assert!(!held.lock().expect("held").is_empty());
}

/// A forward proxy on loopback, as an office's would be: CONNECT tunnels (for `https`), and
/// plain-HTTP requests in absolute form, relayed to their host. Returns its address and the
/// head of every request it was sent.
fn forward_proxy(rt: &tokio::runtime::Runtime) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind proxy");
    let address = listener.local_addr().expect("addr").to_string();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    rt.spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                seen.lock().expect("heads").push(text.clone());
                let target = text.split_whitespace().nth(1).unwrap_or("").to_string();
                let tunnel = text.starts_with("CONNECT ");
                let host = if tunnel {
                    target
                } else {
                    target
                        .trim_start_matches("http://")
                        .split('/')
                        .next()
                        .unwrap_or("")
                        .to_string()
                };
                let Ok(mut server) = tokio::net::TcpStream::connect(&host).await else {
                    return;
                };
                if tunnel {
                    let ok = b"HTTP/1.1 200 Connection established\r\n\r\n";
                    if client.write_all(ok).await.is_err() {
                        return;
                    }
                } else if server.write_all(&head).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    (address, heads)
}

/// The proxy the environment names is used, as curl would use it: `HTTPS_PROXY` (with
/// credentials) for an `https` store, through a CONNECT tunnel; `HTTP_PROXY` for a plain-HTTP
/// one, in absolute form; and none for a host in `NO_PROXY`.
#[test]
fn the_store_is_reached_through_the_proxy_the_environment_names() {
    let Some(options) = s3_options() else { return };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy, heads) = forward_proxy(&rt);
    let mut tls = options.clone();
    tls.endpoint = Some(tls_relay_to(
        &rt,
        options.endpoint.as_deref().expect("endpoint"),
        dir.path(),
    ));
    let source = dir.path().join("source.bin");
    std::fs::write(&source, random_bytes(1 << 20)).expect("source");
    let ca = dir.path().join("ca.pem");
    let cases = [
        (
            "https",
            &tls,
            vec![
                ("HTTPS_PROXY", format!("http://firn:secret@{proxy}")),
                ("SSL_CERT_FILE", ca.display().to_string()),
            ],
        ),
        (
            "http",
            &options,
            vec![("HTTP_PROXY", format!("http://{proxy}"))],
        ),
        (
            "no_proxy",
            &options,
            vec![
                ("HTTP_PROXY", "http://127.0.0.1:9".to_string()),
                ("NO_PROXY", "127.0.0.1".to_string()),
            ],
        ),
    ];
    for (name, store, env) in cases {
        let case_dir = dir.path().join(name);
        std::fs::create_dir_all(&case_dir).expect("dir");
        let config = s3_config(&case_dir, store);
        let before = heads.lock().expect("heads").len();
        let mut command = std::process::Command::new(common::FIRN);
        command
            .args(["remote", "--config", config.to_str().expect("utf-8"), "put"])
            .arg(&source)
            .arg(format!("proxied/{name}.bin"));
        for var in [
            "AWS_CA_BUNDLE",
            "SSL_CERT_DIR",
            "HTTPS_PROXY",
            "HTTP_PROXY",
            "ALL_PROXY",
        ] {
            command.env_remove(var).env_remove(var.to_lowercase());
        }
        command.env_remove("NO_PROXY").env_remove("no_proxy");
        command.envs(env);
        let out = command.output().expect("run firn");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen: Vec<String> = heads.lock().expect("heads")[before..].to_vec();
        match name {
            "https" => assert!(
                seen.iter()
                    .any(|h| h.starts_with("CONNECT 127.0.0.1:")
                        && h.contains("Basic ZmlybjpzZWNyZXQ=")),
                "{name}: no CONNECT with the proxy's credentials: {seen:?}"
            ),
            "http" => assert!(
                seen.iter().any(|h| h.starts_with("PUT http://127.0.0.1:")),
                "{name}: no absolute-form PUT: {seen:?}"
            ),
            _ => assert!(seen.is_empty(), "{name}: went through the proxy: {seen:?}"),
        }
    }
    let keys = boto3_keys(&format!("{}/proxied/", options.prefix));
    assert_eq!(keys.len(), 3, "{keys:?}");
}

/// `firn remote get` of a prefix under which another tool planted a key with `..` refuses
/// before it makes any file or directory, inside the destination or out of it.
#[test]
fn a_download_never_makes_anything_for_a_key_that_leads_out() {
    let Some(options) = s3_options() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = s3_config(dir.path(), &options);
    let planted = format!("{}/evil/a/../../../escape.txt", options.prefix);
    common::boto3_put(&planted, b"x", &[]);
    let dest = dir.path().join("down/dest");
    std::fs::create_dir_all(&dest).expect("dest");
    let before: Vec<_> = walk(dir.path());
    let (ok, stderr) = remote_cli(&config, &["get", "evil/", dest.to_str().expect("utf-8")]);
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("leads out of"), "{stderr}");
    assert_eq!(walk(dir.path()), before, "the refused download made files");
}

/// Every path below `dir`, sorted.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(at) = todo.pop() {
        for entry in std::fs::read_dir(&at).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                todo.push(path.clone());
            }
            found.push(path);
        }
    }
    found.sort();
    found
}

/// `firn remote --config <config> <args>`: whether it succeeded, and its stderr.
fn remote_cli(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(common::FIRN)
        .args(["remote", "--config", config.to_str().expect("utf-8")])
        .args(args)
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .expect("run firn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A file written to while `firn remote put` sends it went up as no one version, and its
/// object would never verify: the put fails and leaves no object. Left still, it goes up.
#[test]
fn a_file_written_during_its_put_is_refused_and_leaves_no_object() {
    let Some(options) = s3_options() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = s3_config(dir.path(), &options);
    let source = dir.path().join("busy.bin");
    std::fs::write(&source, vec![7u8; 96 << 20]).expect("source");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (source, done) = (source.clone(), done.clone());
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&source)
                .expect("open");
            let mut n = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                file.write_all_at(&[n as u8], (n * 4096) % (96 << 20))
                    .expect("write");
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let (ok, stderr) = remote_cli(&config, &["put", source.to_str().unwrap(), "busy.bin"]);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("writer");
    assert!(!ok, "a file written during its put was stored");
    assert!(stderr.contains("changed while it was uploaded"), "{stderr}");
    assert!(
        boto3_keys(&format!("{}/busy.bin", options.prefix)).is_empty(),
        "the object stayed"
    );
    let (ok, stderr) = remote_cli(&config, &["put", source.to_str().unwrap(), "busy.bin"]);
    assert!(ok, "{stderr}");
    let back = dir.path().join("back.bin");
    let (ok, stderr) = remote_cli(&config, &["get", "busy.bin", back.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(std::fs::read(&back).expect("back") == std::fs::read(&source).expect("source"));
}

/// A prefix download makes directories of directory markers (`d/`, as shares and S3
/// consoles write them); an interrupted download leaves no temporary file, and an
/// interrupted put no multipart upload.
#[test]
fn downloads_take_markers_as_directories_and_interrupts_leave_nothing() {
    let Some(options) = s3_options() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = s3_config(dir.path(), &options);
    let prefix = &options.prefix;
    common::boto3_put(&format!("{prefix}/m/d/"), b"", &[]);
    common::boto3_put(&format!("{prefix}/m/empty/"), b"", &[]);
    let x = dir.path().join("x");
    std::fs::write(&x, b"x").expect("x");
    let (ok, stderr) = remote_cli(&config, &["put", x.to_str().unwrap(), "m/d/x"]);
    assert!(ok, "{stderr}");
    let dest = dir.path().join("m");
    let (ok, stderr) = remote_cli(&config, &["get", "m/", dest.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read(dest.join("d/x")).expect("d/x"), b"x");
    assert!(dest.join("empty").is_dir());

    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![3u8; 512 << 20]).expect("big");
    // Each interrupted at the first sign of its transfer: a temporary file, a multipart
    // upload.
    let uploads = || {
        let script = r#"
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["FIRN_TEST_S3_ENDPOINT"],
    region_name=os.environ.get("FIRN_TEST_S3_REGION", "garage"),
    aws_access_key_id=os.environ["FIRN_TEST_S3_ACCESS_KEY_ID"],
    aws_secret_access_key=os.environ["FIRN_TEST_S3_SECRET_ACCESS_KEY"])
got = s3.list_multipart_uploads(Bucket=os.environ["FIRN_TEST_S3_BUCKET"], Prefix=sys.argv[1])
print(len(got.get("Uploads", [])))
"#;
        let out = common::boto3(script, &[&format!("{prefix}/big")]);
        String::from_utf8_lossy(&out)
            .trim()
            .parse::<usize>()
            .expect("a count")
    };
    let interrupted = |args: &[&str], started: &dyn Fn() -> bool| {
        let mut child = std::process::Command::new(common::FIRN)
            .args(["remote", "--config", config.to_str().unwrap()])
            .args(args)
            .env_remove("AWS_CA_BUNDLE")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run firn");
        let begun = Instant::now();
        while !started() {
            assert!(
                child.try_wait().expect("wait").is_none(),
                "{args:?} ended before it could be interrupted"
            );
            assert!(
                begun.elapsed() < Duration::from_secs(60),
                "{args:?} never began"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .expect("SIGINT");
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("interrupted"), "{args:?}: {stderr}");
    };
    interrupted(&["put", big.to_str().unwrap(), "big"], &|| uploads() > 0);
    assert_eq!(
        uploads(),
        0,
        "the interrupted put left its multipart upload"
    );
    assert!(boto3_keys(&format!("{prefix}/big")).is_empty());

    let (ok, stderr) = remote_cli(&config, &["put", big.to_str().unwrap(), "big"]);
    assert!(ok, "{stderr}");
    let down = dir.path().join("down");
    std::fs::create_dir_all(&down).expect("down");
    let temporary = || {
        std::fs::read_dir(&down).expect("down").any(|e| {
            e.expect("entry")
                .file_name()
                .to_string_lossy()
                .contains(".firn-")
        })
    };
    interrupted(
        &["get", "big", down.join("big.bin").to_str().unwrap()],
        &temporary,
    );
    assert!(walk(&down).is_empty(), "{:?}", walk(&down));
}

/// A bucket that does not exist is named as such, at once, not taken for a missing object.
#[test]
fn a_put_get_or_rm_in_a_bucket_that_does_not_exist_says_so() {
    let Some(mut options) = s3_options() else {
        return;
    };
    options.bucket = "firn-no-such-bucket".to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = s3_config(dir.path(), &options);
    let file = dir.path().join("x");
    std::fs::write(&file, b"x").expect("x");
    let started = Instant::now();
    let (ok, stderr) = remote_cli(&config, &["put", file.to_str().unwrap(), "x"]);
    assert!(!ok && stderr.contains("bucket does not exist"), "{stderr}");
    // A delete or a get of one key hears a plain 404 (a HEAD's has no body to tell the
    // bucket from the object): not done, not "no such object".
    let dest = dir.path().join("got");
    for args in [&["rm", "x"][..], &["get", "x", dest.to_str().unwrap()]] {
        let (ok, stderr) = remote_cli(&config, args);
        assert!(
            !ok && stderr.contains("bucket does not exist"),
            "{args:?}: {stderr}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "retried for a missing bucket"
    );
}
