//! Checks tied to one backend or to opening: URL errors, local directory
//! errors, named memory stores, the async API, and the blocking API's
//! refusal to run inside a runtime.

use std::sync::Arc;

use bytes::Bytes;
use swiftbrush_proto::run_store::{
    AsyncRunStore, CheckpointMeta, ResumeFrom, RunStore, RunStoreError, StoreOptions,
};

use super::recording_store::RecordingStore;

#[test]
fn bad_urls_and_schemes_are_named() {
    for (url, needle) in [
        ("ftp://host/run", "unsupported scheme \"ftp\""),
        ("s3:///run", "bucket name is missing"),
        ("gs://bkt/run?x=1", "query strings"),
        ("http://[::1/run", "not a valid URL"),
    ] {
        let err = RunStore::open(url).unwrap_err().to_string();
        assert!(err.contains(needle), "{url}: {err}");
        assert!(
            err.contains(url),
            "{url}: the message must name the URL: {err}"
        );
    }
}

#[test]
fn unwritable_local_dir_is_named() {
    // Tests run as root, so permissions do not stop writes; a path under a
    // regular file cannot be created by anyone.
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"not a directory").expect("write");
    let run_dir = file.join("run");
    let err = RunStore::open(&run_dir.display().to_string()).unwrap_err();
    assert!(matches!(err, RunStoreError::LocalDir { .. }), "{err}");
    assert!(
        err.to_string().contains(&run_dir.display().to_string()),
        "{err}"
    );
    let via_url = RunStore::open(&format!("file://{}", run_dir.display())).unwrap_err();
    assert!(
        matches!(via_url, RunStoreError::LocalDir { .. }),
        "{via_url}"
    );
}

#[test]
fn local_dir_is_created_and_file_url_reaches_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("a/b/run");
    let store = RunStore::open(&run_dir.display().to_string()).expect("open");
    assert!(run_dir.is_dir());
    store
        .put_run_file("config.yaml", Bytes::from_static(b"x: 1\n"))
        .expect("put");
    assert_eq!(
        std::fs::read(run_dir.join("config.yaml")).expect("on disk"),
        b"x: 1\n"
    );
    let via_url = RunStore::open(&format!("file://{}", run_dir.display())).expect("open url");
    assert_eq!(
        via_url.get_run_file("config.yaml").expect("get"),
        Some(Bytes::from_static(b"x: 1\n"))
    );
    // The write probe leaves nothing behind.
    let entries: Vec<_> = std::fs::read_dir(&run_dir).expect("read_dir").collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
}

#[test]
fn deleted_local_checkpoints_leave_no_empty_folders() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = RunStore::open(&tmp.path().display().to_string()).expect("open");
    for step in [1, 2] {
        let mut writer = store.begin_checkpoint(step);
        writer.put_file("a.bin", b"a".to_vec()).expect("put");
        writer.commit(CheckpointMeta::default()).expect("commit");
    }
    store.apply_retention(1).expect("retention");
    assert!(!tmp.path().join("checkpoints/step-00000001").exists());
    assert!(
        tmp.path()
            .join("checkpoints/step-00000002/manifest.json")
            .exists()
    );
}

#[test]
fn memory_urls_share_by_name_only() {
    let a = RunStore::open("memory://shared-by-name/run").expect("open");
    a.put_run_file("x.txt", Bytes::from_static(b"1"))
        .expect("put");
    let b = RunStore::open("memory://shared-by-name/run").expect("open");
    assert_eq!(
        b.get_run_file("x.txt").expect("get"),
        Some(Bytes::from_static(b"1"))
    );
    let other_prefix = RunStore::open("memory://shared-by-name/other").expect("open");
    assert_eq!(other_prefix.get_run_file("x.txt").expect("get"), None);
    let anonymous = RunStore::open("memory://").expect("open");
    anonymous
        .put_run_file("x.txt", Bytes::from_static(b"2"))
        .expect("put");
    assert_eq!(
        RunStore::open("memory://")
            .expect("open")
            .get_run_file("x.txt")
            .expect("get"),
        None
    );
}

#[test]
fn cloud_urls_open_without_touching_the_network() {
    // Building the client must not need credentials or a connection: the
    // coordinator opens the run directory before anything else is set up.
    let options = StoreOptions::new().with("AWS_REGION", "eu-west-1");
    let s3 = RunStore::open_with("s3://bkt/runs/r1", &options).expect("s3");
    assert_eq!(s3.name(), "s3://bkt/runs/r1");
    let gcs = RunStore::open_with("gs://bkt/runs/r1/", &StoreOptions::new()).expect("gcs");
    assert_eq!(gcs.name(), "gs://bkt/runs/r1");
}

#[test]
fn blocking_api_inside_a_runtime_is_an_error_not_a_panic() {
    let store = RunStore::open("memory://").expect("open");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let result = runtime.block_on(async { store.list_checkpoints() });
    assert!(
        matches!(result, Err(RunStoreError::BlockingInAsync)),
        "{result:?}"
    );
    // Dropping the blocking store inside a runtime must not panic either.
    runtime.block_on(async move { drop(store) });
}

#[test]
fn async_api_commits_from_a_runtime() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store = AsyncRunStore::open("memory://").expect("open");
        let mut writer = store.begin_checkpoint(9);
        writer
            .put_file("a.bin", Bytes::from_static(b"abc"))
            .await
            .expect("put");
        let manifest = writer
            .commit(CheckpointMeta::default())
            .await
            .expect("commit");
        let resolved = store.resolve(ResumeFrom::Latest).await.expect("resolve");
        assert_eq!(resolved, manifest);
        assert_eq!(
            store.read_file(9, "a.bin").await.expect("read"),
            Bytes::from_static(b"abc")
        );
    });
}

#[test]
fn retention_deletes_the_manifest_before_the_files() {
    let recording = Arc::new(RecordingStore::default());
    let store = RunStore::from_async(AsyncRunStore::from_object_store(
        recording.clone(),
        "recording",
    ))
    .expect("store");
    for step in [1, 2, 3] {
        let mut writer = store.begin_checkpoint(step);
        for name in ["a.bin", "b.bin", "c.bin"] {
            writer.put_file(name, b"x".to_vec()).expect("put");
        }
        writer.commit(CheckpointMeta::default()).expect("commit");
    }
    let report = store.apply_retention(1).expect("retention");
    assert_eq!(report.deleted_checkpoints, vec![1, 2]);
    let deleted = recording.deleted();
    for step in ["step-00000001", "step-00000002"] {
        let of_step: Vec<&String> = deleted.iter().filter(|p| p.contains(step)).collect();
        assert_eq!(
            of_step.len(),
            4,
            "manifest and three files of {step}: {deleted:?}"
        );
        assert!(
            of_step[0].ends_with("manifest.json"),
            "the manifest of {step} goes first: {deleted:?}"
        );
    }
}
