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

struct Backend {
    name: &'static str,
    store: Arc<dyn Remote>,
    _dir: Option<tempfile::TempDir>,
}

fn s3_options() -> Option<S3Options> {
    let var = |name: &str| std::env::var(name).ok();
    let Some(endpoint) = var("FIRN_TEST_S3_ENDPOINT") else {
        assert!(
            var("CI").is_none(),
            "CI must run against Garage: FIRN_TEST_S3_ENDPOINT is not set (run scripts/test)"
        );
        eprintln!("FIRN_TEST_S3_ENDPOINT not set: skipping the S3 backend");
        return None;
    };
    let mut id = [0u8; 6];
    rand::rng().fill_bytes(&mut id);
    Some(S3Options {
        endpoint: Some(endpoint),
        bucket: var("FIRN_TEST_S3_BUCKET").expect("FIRN_TEST_S3_BUCKET"),
        region: var("FIRN_TEST_S3_REGION").unwrap_or_else(|| "garage".to_string()),
        // Each test run writes under its own prefix.
        prefix: format!("test-{}", hex::encode(id)),
        path_style: true,
        access_key_id: var("FIRN_TEST_S3_ACCESS_KEY_ID"),
        secret_access_key: var("FIRN_TEST_S3_SECRET_ACCESS_KEY"),
        checksum: true,
        multipart_threshold: 6 << 20,
        part_size: 5 << 20,
        part_concurrency: 4,
        request_timeout: Duration::from_secs(30),
    })
}

fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut list = vec![Backend {
        name: "dir",
        store: Arc::new(DirStore::open(dir.path().join("bucket")).expect("dir store")),
        _dir: Some(dir),
    }];
    if let Some(options) = s3_options() {
        list.push(Backend {
            name: "s3",
            store: Arc::new(S3Store::new(&options).expect("s3 store")),
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
                outage_secs: 0,
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
        for (key, body) in &objects {
            let object = r
                .get(key)
                .await
                .unwrap_or_else(|e| panic!("{}: get {key}: {e}", b.name));
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
