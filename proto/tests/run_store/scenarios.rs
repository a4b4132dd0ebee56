//! The scenarios every backend must pass. Each gets its own empty run
//! directory; a failing scenario is reported by name after the others ran.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Barrier;
use std::time::Instant;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::time::Duration;

use swiftbrush_proto::run_store::{
    CheckpointMeta, CheckpointStatus, LeaseHolder, LeaseOptions, Manifest, ResumeFrom, RunLease,
    RunStore, RunStoreError, Verify,
};

use super::backend::{Backend, RunDir};

type Scenario = fn(&RunDir);

const SCENARIOS: &[(&str, Scenario)] = &[
    ("commit_then_resolve", commit_then_resolve),
    ("second_commit_loses_race", second_commit_loses_race),
    (
        "concurrent_commits_one_winner",
        concurrent_commits_one_winner,
    ),
    ("dropped_writer_is_ignored", dropped_writer_is_ignored),
    ("truncated_file_falls_back", truncated_file_falls_back),
    (
        "corrupt_manifests_are_skipped",
        corrupt_manifests_are_skipped,
    ),
    ("same_size_corruption_caught", same_size_corruption_caught),
    (
        "corrupt_checkpoints_are_set_aside",
        corrupt_checkpoints_are_set_aside,
    ),
    ("latest_only_moves_forward", latest_only_moves_forward),
    (
        "stale_generation_cannot_commit",
        stale_generation_cannot_commit,
    ),
    ("retention_keeps_newest", retention_keeps_newest),
    (
        "retention_spares_newest_valid",
        retention_spares_newest_valid,
    ),
    ("run_files_round_trip", run_files_round_trip),
    ("staged_commit_elsewhere", staged_commit_elsewhere),
    ("large_file_in_parts", large_file_in_parts),
    ("lease_refuses_a_second_job", lease_refuses_a_second_job),
    (
        "lease_concurrent_acquire_one_winner",
        lease_concurrent_acquire_one_winner,
    ),
    ("lease_expired_is_taken", lease_expired_is_taken),
    (
        "lease_take_over_stops_the_old_holder",
        lease_take_over_stops_the_old_holder,
    ),
    (
        "lease_taken_over_holder_cannot_come_back",
        lease_taken_over_holder_cannot_come_back,
    ),
    (
        "lease_of_a_dead_process_here_is_free",
        lease_of_a_dead_process_here_is_free,
    ),
];

pub fn run_all(backend: &dyn Backend) {
    let mut failed = Vec::new();
    for (name, scenario) in SCENARIOS {
        let dir = backend.run_dir(name);
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| scenario(&dir)));
        let elapsed_ms = started.elapsed().as_millis();
        match outcome {
            Ok(()) => eprintln!("ok     {}/{name} ({elapsed_ms} ms)", backend.name()),
            Err(_) => {
                eprintln!("FAILED {}/{name} ({elapsed_ms} ms)", backend.name());
                failed.push(*name);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} scenarios failed on {}: {failed:?} (panic messages above)",
        failed.len(),
        SCENARIOS.len(),
        backend.name()
    );
}

// ---- helpers -------------------------------------------------------------

fn meta(generation: u64) -> CheckpointMeta {
    CheckpointMeta {
        epoch: 1,
        generation,
        config_fingerprint: "cfg-abc".to_owned(),
        teacher_fingerprint: "teacher-xyz".to_owned(),
        extra: serde_json::json!({"loss": 0.25}),
    }
}

/// Distinct contents per (step, name), so a mix-up cannot pass.
fn contents(step: u64, name: &str) -> Vec<u8> {
    format!("{name} at step {step}: ").repeat(10).into_bytes()
}

fn commit(store: &RunStore, step: u64, names: &[&str]) -> Manifest {
    commit_gen(store, step, names, 1)
}

fn commit_gen(store: &RunStore, step: u64, names: &[&str], generation: u64) -> Manifest {
    let mut writer = store.begin_checkpoint(step);
    for name in names {
        writer
            .put_file(name, contents(step, name))
            .expect("put_file");
    }
    writer.commit(meta(generation)).expect("commit")
}

fn latest_step(store: &RunStore) -> Option<u64> {
    store.latest_valid().expect("latest_valid").map(|m| m.step)
}

fn raw_put(store: &RunStore, rel: &str, bytes: Vec<u8>) {
    let path = Path::from(rel);
    store
        .block_on(store.object_store().put(&path, PutPayload::from(bytes)))
        .expect("runtime")
        .expect("raw put");
}

fn raw_delete(store: &RunStore, rel: &str) {
    store
        .block_on(store.object_store().delete(&Path::from(rel)))
        .expect("runtime")
        .expect("raw delete");
}

/// Every object under `prefix`, relative to the run directory, sorted.
fn raw_list(store: &RunStore, prefix: &str) -> Vec<String> {
    let prefix = Path::from(prefix);
    let objects: Vec<_> = store
        .block_on(
            store
                .object_store()
                .list(Some(&prefix))
                .try_collect::<Vec<_>>(),
        )
        .expect("runtime")
        .expect("raw list");
    let mut names: Vec<String> = objects
        .into_iter()
        .map(|m| m.location.to_string())
        .collect();
    names.sort();
    names
}

fn statuses(store: &RunStore) -> Vec<(u64, &'static str)> {
    store
        .list_checkpoints()
        .expect("list_checkpoints")
        .into_iter()
        .map(|info| {
            let status = match info.status {
                CheckpointStatus::Uncommitted => "uncommitted",
                CheckpointStatus::Valid(_) => "valid",
                CheckpointStatus::Invalid { .. } => "invalid",
            };
            (info.step, status)
        })
        .collect()
}

// ---- scenarios -----------------------------------------------------------

fn commit_then_resolve(dir: &RunDir) {
    let store = dir.open();
    assert_eq!(latest_step(&store), None);
    assert!(matches!(
        store.resolve(ResumeFrom::Latest),
        Err(RunStoreError::NoCheckpoint { .. })
    ));

    let names = [
        "student.safetensors",
        "ema.safetensors",
        "optim/student.safetensors",
        "state.json",
    ];
    let written = commit(&store, 100, &names);
    assert_eq!(written.step, 100);
    assert_eq!(written.meta, meta(1));
    let expected_digest = hex_sha256(&contents(100, "state.json"));
    let state = written.file("state.json").expect("state.json listed");
    assert_eq!(state.size, contents(100, "state.json").len() as u64);
    assert_eq!(state.sha256, expected_digest);

    // A fresh handle, as a restarted process: everything comes from storage.
    let reopened = dir.open();
    let resolved = reopened
        .resolve(ResumeFrom::Latest)
        .expect("resolve latest");
    assert_eq!(resolved, written);
    assert_eq!(
        reopened
            .resolve(ResumeFrom::Step(100))
            .expect("resolve 100"),
        written
    );
    for name in names {
        assert_eq!(
            reopened.read_file(100, name).expect(name),
            Bytes::from(contents(100, name))
        );
    }
    reopened
        .resolve_with(ResumeFrom::Latest, Verify::Full)
        .expect("full verification of an intact checkpoint");

    let pointer = reopened
        .latest_pointer()
        .expect("read LATEST")
        .expect("LATEST exists");
    assert_eq!((pointer.step, pointer.generation), (100, 1));
    assert_eq!(pointer.manifest, "checkpoints/step-00000100/manifest.json");
    assert_eq!(statuses(&reopened), vec![(100, "valid")]);

    // The manifest is where the layout says, and is JSON a person can read.
    let listed = raw_list(&reopened, "checkpoints/step-00000100");
    assert!(
        listed.contains(&"checkpoints/step-00000100/manifest.json".to_owned()),
        "{listed:?}"
    );
    assert!(
        listed.contains(&written.file_path("optim/student.safetensors")),
        "{listed:?}"
    );

    let missing = reopened.read_file(100, "nope.bin").unwrap_err();
    assert!(
        matches!(missing, RunStoreError::NoSuchFile { .. }),
        "{missing}"
    );
    assert!(
        missing.to_string().contains("student.safetensors"),
        "{missing}"
    );
}

fn second_commit_loses_race(dir: &RunDir) {
    let store = dir.open();
    let mut first = store.begin_checkpoint(7);
    let mut second = dir.open().begin_checkpoint(7);
    first
        .put_file("w.bin", b"first writer".to_vec())
        .expect("put first");
    second
        .put_file("w.bin", b"second writer, longer".to_vec())
        .expect("put second");
    let winner = first.commit(meta(1)).expect("first commit wins");
    let lost = second.commit(meta(1)).unwrap_err();
    assert!(lost.is_lost_race(), "expected a lost race, got {lost}");
    assert!(
        matches!(lost, RunStoreError::AlreadyCommitted { step: 7, .. }),
        "{lost}"
    );

    // The loser wrote after the winner, yet the winner's files are intact:
    // each writer has its own attempt folder.
    assert_eq!(store.resolve(ResumeFrom::Step(7)).expect("resolve"), winner);
    assert_eq!(
        store.read_file(7, "w.bin").expect("read"),
        Bytes::from_static(b"first writer")
    );
    store
        .resolve_with(ResumeFrom::Step(7), Verify::Full)
        .expect("winner verifies");
}

fn concurrent_commits_one_winner(dir: &RunDir) {
    const WRITERS: usize = 4;
    let barrier = Barrier::new(WRITERS);
    let results: Vec<Result<Manifest, RunStoreError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|i| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let store = dir.open();
                    let mut writer = store.begin_checkpoint(3);
                    let put = writer.put_file("w.bin", format!("writer {i}").into_bytes());
                    // Every thread reaches the barrier, even one whose put
                    // failed: a panic here would leave the others waiting.
                    barrier.wait();
                    put?;
                    writer.commit(meta(1))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect()
    });
    let winners: Vec<&Manifest> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one commit wins: {results:?}");
    for result in &results {
        if let Err(e) = result {
            assert!(e.is_lost_race(), "a loser must see a lost race, got {e}");
        }
    }
    let store = dir.open();
    let resolved = store.resolve(ResumeFrom::Step(3)).expect("resolve");
    assert_eq!(&resolved, winners[0]);
    store
        .verify_checkpoint(&resolved)
        .expect("winner's files are its own");
}

fn dropped_writer_is_ignored(dir: &RunDir) {
    let store = dir.open();
    commit(&store, 10, &["a.bin", "b.bin"]);
    {
        // The process "dies" after one of two files: no manifest.
        let mut writer = store.begin_checkpoint(20);
        writer
            .put_file("a.bin", contents(20, "a.bin"))
            .expect("put");
    }
    let reopened = dir.open();
    assert_eq!(
        statuses(&reopened),
        vec![(10, "valid"), (20, "uncommitted")]
    );
    assert_eq!(latest_step(&reopened), Some(10));
    let err = reopened.resolve(ResumeFrom::Step(20)).unwrap_err();
    assert!(
        matches!(err, RunStoreError::NoSuchCheckpoint { step: 20, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("valid steps: 10"), "{err}");
    assert!(reopened.read_file(20, "a.bin").is_err());

    // The step is re-done after the restart and commits normally.
    commit(&reopened, 20, &["a.bin", "b.bin"]);
    assert_eq!(latest_step(&reopened), Some(20));
}

fn truncated_file_falls_back(dir: &RunDir) {
    let store = dir.open();
    commit(&store, 10, &["student.safetensors"]);
    let newest = commit(&store, 20, &["student.safetensors", "ema.safetensors"]);
    let path = newest.file_path("ema.safetensors");
    let mut truncated = contents(20, "ema.safetensors");
    truncated.truncate(truncated.len() / 2);
    raw_put(&store, &path, truncated);

    let reopened = dir.open();
    assert_eq!(
        latest_step(&reopened),
        Some(10),
        "falls back past the truncated checkpoint"
    );
    assert_eq!(statuses(&reopened), vec![(10, "valid"), (20, "invalid")]);
    let err = reopened.resolve(ResumeFrom::Step(20)).unwrap_err();
    assert!(err.to_string().contains("valid steps: 10"), "{err}");
    assert!(reopened.read_file(20, "ema.safetensors").is_err());
    // The intact file of the invalid checkpoint is not served either: the
    // checkpoint as a whole is invalid.
    assert!(reopened.read_file(20, "student.safetensors").is_err());
}

fn corrupt_manifests_are_skipped(dir: &RunDir) {
    let store = dir.open();
    commit(&store, 10, &["a.bin"]);
    let bad_json = commit(&store, 20, &["a.bin"]);
    raw_put(
        &store,
        "checkpoints/step-00000020/manifest.json",
        b"{ not json".to_vec(),
    );
    let missing_file = commit(&store, 30, &["a.bin", "b.bin"]);
    raw_delete(&store, &missing_file.file_path("b.bin"));
    let wrong_step = commit(&store, 40, &["a.bin"]);
    let mut moved = serde_json::to_value(&wrong_step).expect("manifest to JSON");
    moved["step"] = serde_json::json!(41);
    raw_put(
        &store,
        "checkpoints/step-00000040/manifest.json",
        serde_json::to_vec(&moved).expect("JSON"),
    );
    let _ = bad_json;

    assert_eq!(
        statuses(&store),
        vec![
            (10, "valid"),
            (20, "invalid"),
            (30, "invalid"),
            (40, "invalid")
        ]
    );
    assert_eq!(latest_step(&store), Some(10));
    let problems: Vec<String> = store
        .list_checkpoints()
        .expect("list")
        .into_iter()
        .filter_map(|info| match info.status {
            CheckpointStatus::Invalid { problem } => Some(problem),
            _ => None,
        })
        .collect();
    assert!(problems[0].contains("not a valid manifest"), "{problems:?}");
    assert!(problems[1].contains("\"b.bin\" is missing"), "{problems:?}");
    assert!(problems[2].contains("step 41"), "{problems:?}");
}

fn same_size_corruption_caught(dir: &RunDir) {
    let store = dir.open();
    commit(&store, 10, &["a.bin"]);
    let newest = commit(&store, 20, &["a.bin"]);
    let mut flipped = contents(20, "a.bin");
    flipped[0] ^= 0xff;
    raw_put(&store, &newest.file_path("a.bin"), flipped);

    // Sizes still match: the cheap check passes, the full one does not.
    assert_eq!(latest_step(&store), Some(20));
    let verified = store
        .latest_valid_with(Verify::Full)
        .expect("latest_valid_with")
        .expect("an intact checkpoint remains");
    assert_eq!(verified.step, 10);
    let err = store.read_file(20, "a.bin").unwrap_err();
    assert!(
        matches!(err, RunStoreError::InvalidCheckpoint { step: 20, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("sha256"), "{err}");
    assert!(
        store
            .resolve_with(ResumeFrom::Step(20), Verify::Full)
            .is_err()
    );
}

/// latest_verified: a committed checkpoint whose file has a flipped byte
/// or was cut short is moved to corrupt/ (every object kept, none left
/// under checkpoints/), the older good one is returned, retention and
/// resume see only what remains, and the step can be committed again.
fn corrupt_checkpoints_are_set_aside(dir: &RunDir) {
    let store = dir.open();
    commit(&store, 10, &["a.bin"]);
    let flipped = commit(&store, 20, &["a.bin", "b.bin"]);
    let truncated = commit(&store, 30, &["a.bin"]);
    let mut bytes = contents(20, "b.bin");
    bytes[3] ^= 0x01;
    raw_put(&store, &flipped.file_path("b.bin"), bytes);
    let mut short = contents(30, "a.bin");
    short.truncate(5);
    raw_put(&store, &truncated.file_path("a.bin"), short);

    let verified = store.latest_verified().expect("latest_verified");
    assert_eq!(verified.map(|m| m.step), Some(10));
    assert_eq!(store.valid_steps().unwrap(), vec![10]);
    assert!(raw_list(&store, "checkpoints/step-00000020").is_empty());
    assert!(raw_list(&store, "checkpoints/step-00000030").is_empty());
    let aside = raw_list(&store, "corrupt");
    for (step, files) in [(20, 3), (30, 2)] {
        let n = aside
            .iter()
            .filter(|p| p.starts_with(&format!("corrupt/step-{step:08}.")))
            .count();
        assert_eq!(n, files, "step {step}: manifest and files kept: {aside:?}");
    }
    // Nothing left to set aside; the step commits afresh.
    assert_eq!(store.latest_verified().unwrap().map(|m| m.step), Some(10));
    commit_gen(&store, 20, &["a.bin"], 2);
    assert_eq!(latest_step(&store), Some(20));
    assert_eq!(store.read_file(20, "a.bin").unwrap(), contents(20, "a.bin"));
}

fn latest_only_moves_forward(dir: &RunDir) {
    let store = dir.open();
    commit(&store, 30, &["a.bin"]);
    commit(&store, 20, &["a.bin"]);
    let pointer = store.latest_pointer().expect("read").expect("exists");
    assert_eq!(
        pointer.step, 30,
        "an older commit must not move LATEST back"
    );
    assert_eq!(latest_step(&store), Some(30));
    commit(&store, 40, &["a.bin"]);
    assert_eq!(
        store.latest_pointer().expect("read").expect("exists").step,
        40
    );
}

fn stale_generation_cannot_commit(dir: &RunDir) {
    let store = dir.open();
    commit_gen(&store, 10, &["a.bin"], 2);
    let mut stale = store.begin_checkpoint(20);
    stale.put_file("a.bin", contents(20, "a.bin")).expect("put");
    let err = stale.commit(meta(1)).unwrap_err();
    assert!(
        matches!(
            err,
            RunStoreError::StaleGeneration {
                step: 20,
                generation: 1,
                newer_generation: 2,
                newer_step: 10,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(statuses(&store), vec![(10, "valid"), (20, "uncommitted")]);
    // The same or a newer generation commits.
    commit_gen(&store, 20, &["a.bin"], 2);
    assert_eq!(latest_step(&store), Some(20));
}

fn retention_keeps_newest(dir: &RunDir) {
    let store = dir.open();
    for step in [10, 20, 30, 40] {
        commit(&store, step, &["a.bin", "b.bin"]);
    }
    // A dead writer's leftover (older than the newest) and a writer at work
    // (newer than the newest); a corrupt old checkpoint; a race loser's files.
    store
        .begin_checkpoint(25)
        .put_file("a.bin", b"x".to_vec())
        .expect("put");
    store
        .begin_checkpoint(50)
        .put_file("a.bin", b"x".to_vec())
        .expect("put");
    raw_put(
        &store,
        "checkpoints/step-00000015/manifest.json",
        b"garbage".to_vec(),
    );
    let mut loser = store.begin_checkpoint(40);
    loser.put_file("a.bin", b"loser".to_vec()).expect("put");
    let loser_path = format!("checkpoints/step-00000040/{}/a.bin", loser.staged().attempt);
    drop(loser);

    let report = store.apply_retention(2).expect("retention");
    assert_eq!(report.kept, vec![30, 40]);
    assert_eq!(report.deleted_checkpoints, vec![10, 20]);
    assert_eq!(report.deleted_uncommitted, vec![25]);
    assert_eq!(report.deleted_invalid, vec![15]);
    assert_eq!(report.num_orphans_deleted, 1);

    assert_eq!(
        statuses(&store),
        vec![(30, "valid"), (40, "valid"), (50, "uncommitted")]
    );
    let left = raw_list(&store, "checkpoints");
    for gone in [
        "step-00000010",
        "step-00000015",
        "step-00000020",
        "step-00000025",
    ] {
        assert!(
            !left.iter().any(|p| p.contains(gone)),
            "{gone} left objects: {left:?}"
        );
    }
    assert!(!left.contains(&loser_path), "{left:?}");
    assert_eq!(
        store.read_file(40, "b.bin").expect("kept"),
        Bytes::from(contents(40, "b.bin"))
    );

    // A second pass has nothing to do.
    let again = store.apply_retention(2).expect("retention");
    assert_eq!(
        (again.deleted_checkpoints.len(), again.num_orphans_deleted),
        (0, 0)
    );
    assert!(matches!(
        store.apply_retention(0),
        Err(RunStoreError::InvalidRetention)
    ));
}

fn retention_spares_newest_valid(dir: &RunDir) {
    let store = dir.open();
    commit(&store, 10, &["a.bin"]);
    commit(&store, 20, &["a.bin"]);
    let broken = commit(&store, 30, &["a.bin"]);
    raw_delete(&store, &broken.file_path("a.bin"));

    let report = store.apply_retention(1).expect("retention");
    // 20 is the newest valid checkpoint: kept although 30 is newer; 30 is
    // newer than any valid one and stays for inspection.
    assert_eq!(report.kept, vec![20]);
    assert_eq!(report.deleted_checkpoints, vec![10]);
    assert!(report.deleted_invalid.is_empty());
    assert_eq!(statuses(&store), vec![(20, "valid"), (30, "invalid")]);
    assert_eq!(latest_step(&store), Some(20));
}

fn run_files_round_trip(dir: &RunDir) {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct RunInfo {
        job: String,
        world_size: u32,
    }
    let store = dir.open();
    assert_eq!(store.get_json::<RunInfo>("run.json").expect("get"), None);
    let info = RunInfo {
        job: "sd21".to_owned(),
        world_size: 8,
    };
    store.put_json("run.json", &info).expect("put");
    store
        .put_run_file("config.yaml", Bytes::from_static(b"seed: 1\n"))
        .expect("put yaml");
    let reopened = dir.open();
    assert_eq!(
        reopened.get_json::<RunInfo>("run.json").expect("get"),
        Some(info)
    );
    assert_eq!(
        reopened.get_run_file("config.yaml").expect("get yaml"),
        Some(Bytes::from_static(b"seed: 1\n"))
    );
    let wrong_type = reopened.get_json::<Vec<u8>>("run.json").unwrap_err();
    assert!(wrong_type.to_string().contains("run.json"), "{wrong_type}");
    for bad in ["checkpoints/LATEST", "../escape.json", "a b.json"] {
        assert!(
            matches!(
                reopened.put_json(bad, &1),
                Err(RunStoreError::InvalidName { .. })
            ),
            "{bad} must be refused"
        );
    }
    // Run files are not checkpoints.
    assert!(reopened.list_checkpoints().expect("list").is_empty());
}

fn staged_commit_elsewhere(dir: &RunDir) {
    // Rank 0 writes and reports; the coordinator (another process) commits.
    let rank0 = dir.open();
    let mut writer = rank0.begin_checkpoint(5);
    writer
        .put_file("student.safetensors", contents(5, "s"))
        .expect("put");
    let report = serde_json::to_string(&writer.into_staged()).expect("staged to JSON");

    let coordinator = dir.open();
    let staged = serde_json::from_str(&report).expect("staged from JSON");
    let manifest = coordinator.commit_staged(staged, meta(3)).expect("commit");
    assert_eq!(manifest.meta.generation, 3);
    assert_eq!(
        rank0.read_file(5, "student.safetensors").expect("read"),
        Bytes::from(contents(5, "s"))
    );

    // A report naming a file that was never written cannot commit.
    let mut bogus: swiftbrush_proto::run_store::StagedCheckpoint =
        serde_json::from_str(&report).expect("staged from JSON");
    bogus.step = 6;
    let err = coordinator.commit_staged(bogus, meta(3)).unwrap_err();
    assert!(
        matches!(err, RunStoreError::InvalidWrite { step: 6, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("missing"), "{err}");
    assert_eq!(statuses(&coordinator), vec![(5, "valid")]);
}

fn large_file_in_parts(dir: &RunDir) {
    let part = dir.min_part_size.max(1024);
    let store = dir.open().with_upload_part_size(part);
    // Two full parts and a short last one; bytes vary so misordered parts fail.
    let big: Vec<u8> = (0..(2 * part + part / 3))
        .map(|i| (i % 251) as u8)
        .collect();
    let mut writer = store.begin_checkpoint(1);
    let entry = writer
        .put_file("optimizer.safetensors", big.clone())
        .expect("multipart put");
    writer
        .put_file("small.json", b"{}".to_vec())
        .expect("small put");
    writer.commit(meta(1)).expect("commit");
    assert_eq!(entry.size, big.len() as u64);
    assert_eq!(entry.sha256, hex_sha256(&big));
    let read = dir
        .open()
        .read_file(1, "optimizer.safetensors")
        .expect("read");
    assert!(read == big, "multipart file reads back byte for byte");
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

// ---- the run-directory lease ---------------------------------------------

fn lease_options(ttl: Duration, take_over: bool) -> LeaseOptions {
    LeaseOptions {
        ttl,
        take_over,
        command: "scenario".to_owned(),
    }
}

fn acquire(store: &RunStore, take_over: bool) -> Result<RunLease, RunStoreError> {
    store.acquire_lease(&lease_options(Duration::from_secs(30), take_over))
}

/// The holder a refusal or a loss names.
fn named_holder(e: &RunStoreError) -> &LeaseHolder {
    match e {
        RunStoreError::LeaseHeld { holder, .. } | RunStoreError::LeaseLost { holder, .. } => holder,
        other => panic!("expected a lease error, got {other}"),
    }
}

/// Only lease records under lease/, never more than a couple.
fn lease_objects(store: &RunStore) -> Vec<String> {
    let names = raw_list(store, "lease");
    assert!(names.len() <= 2, "old lease records pile up: {names:?}");
    names
}

fn lease_refuses_a_second_job(dir: &RunDir) {
    let first_store = dir.open();
    let mut first = acquire(&first_store, false).expect("the first job gets the lease");
    let second_store = dir.open();
    let refused = acquire(&second_store, false).unwrap_err();
    assert!(
        matches!(refused, RunStoreError::LeaseHeld { .. }),
        "{refused}"
    );
    let holder = named_holder(&refused);
    assert_eq!(holder.holder_id, first.holder().holder_id);
    assert_eq!(holder.pid, std::process::id());
    let message = refused.to_string();
    for part in [
        "in use by another job",
        "scenario on host",
        &format!("pid {}", std::process::id()),
        "since",
        "lease expires at",
        "--take-over",
    ] {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
    // Renewing keeps it; a renewal is seen by others.
    let before = first.holder().expires_at_ms;
    std::thread::sleep(Duration::from_millis(5));
    first_store.renew_lease(&mut first).expect("renew");
    assert!(first.holder().expires_at_ms > before);
    let seen = second_store
        .lease_holder()
        .expect("read")
        .expect("a holder");
    assert_eq!(seen, *first.holder());
    assert!(acquire(&second_store, false).is_err(), "still held");
    lease_objects(&first_store);

    // A clean release lets the next job in at once.
    first_store.release_lease(first).expect("release");
    assert!(second_store.lease_holder().unwrap().unwrap().released);
    let mut second = acquire(&second_store, false).expect("free after a release");
    second_store.renew_lease(&mut second).expect("renew");
    lease_objects(&second_store);
}

fn lease_concurrent_acquire_one_winner(dir: &RunDir) {
    const JOBS: usize = 4;
    let barrier = Barrier::new(JOBS);
    let results: Vec<Result<RunLease, RunStoreError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..JOBS)
            .map(|_| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let store = dir.open();
                    barrier.wait();
                    acquire(&store, false)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("job thread"))
            .collect()
    });
    let winners: Vec<&RunLease> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one job gets the lease: {results:?}"
    );
    for result in &results {
        if let Err(e) = result {
            assert_eq!(named_holder(e).holder_id, winners[0].holder().holder_id);
        }
    }
}

fn lease_expired_is_taken(dir: &RunDir) {
    let old_store = dir.open();
    let mut old = old_store
        .acquire_lease(&lease_options(Duration::from_millis(1), false))
        .expect("acquire");
    // Not renewed in time (a crashed holder elsewhere): expired.
    std::thread::sleep(Duration::from_millis(20));
    let new_store = dir.open();
    let new = acquire(&new_store, false).expect("an expired lease is free");
    // The old holder, still alive after all, finds it gone, and keeps
    // saying so.
    for _ in 0..2 {
        let lost = old_store.renew_lease(&mut old).unwrap_err();
        assert!(lost.is_lease_lost(), "{lost}");
        assert_eq!(named_holder(&lost).holder_id, new.holder().holder_id);
    }
    assert_eq!(
        new_store.lease_holder().unwrap().unwrap().holder_id,
        new.holder().holder_id
    );
}

fn lease_take_over_stops_the_old_holder(dir: &RunDir) {
    let old_store = dir.open();
    let mut old = acquire(&old_store, false).expect("acquire");
    let new_store = dir.open();
    let mut new = acquire(&new_store, true).expect("--take-over takes a live lease");
    let lost = old_store.renew_lease(&mut old).unwrap_err();
    assert!(lost.is_lease_lost(), "{lost}");
    assert_eq!(named_holder(&lost).holder_id, new.holder().holder_id);
    let message = lost.to_string();
    assert!(
        message.contains("taken over by scenario on host")
            && message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    // The loser's release leaves the new holder alone.
    old_store
        .release_lease(old)
        .expect("release of a lost lease");
    new_store
        .renew_lease(&mut new)
        .expect("the new holder renews");
    let third = acquire(&dir.open(), false).unwrap_err();
    assert_eq!(named_holder(&third).holder_id, new.holder().holder_id);
    lease_objects(&new_store);
}

fn lease_taken_over_holder_cannot_come_back(dir: &RunDir) {
    // A holder that sleeps through a whole take-over (the new job starts,
    // runs and releases) must not find the lease free when it wakes.
    let old_store = dir.open();
    let mut old = acquire(&old_store, false).expect("acquire");
    let new_store = dir.open();
    let new = acquire(&new_store, true).expect("take over");
    let new_id = new.holder().holder_id.clone();
    new_store.release_lease(new).expect("release");
    let lost = old_store.renew_lease(&mut old).unwrap_err();
    assert!(lost.is_lease_lost(), "{lost}");
    assert_eq!(named_holder(&lost).holder_id, new_id);
    acquire(&dir.open(), false).expect("released: the next job gets in");
}

fn lease_of_a_dead_process_here_is_free(dir: &RunDir) {
    let store = dir.open();
    let lease = acquire(&store, false).expect("acquire");
    // The same record, but from a process of this machine that has exited
    // (a `train` killed with SIGKILL) and whose lease has not expired.
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("run `true`");
    let dead_pid = child.id();
    child.wait().expect("wait");
    let mut dead = lease.holder().clone();
    dead.pid = dead_pid;
    dead.holder_id = "killed-holder".to_owned();
    let names = raw_list(&store, "lease");
    let newest: u64 = names
        .last()
        .and_then(|n| n.strip_prefix("lease/"))
        .and_then(|n| n.strip_suffix(".json"))
        .and_then(|n| n.parse().ok())
        .expect("a lease record");
    raw_put(
        &store,
        &format!("lease/{:020}.json", newest + 1),
        serde_json::to_vec(&dead).unwrap(),
    );
    if cfg!(target_os = "linux") {
        assert!(dead.is_dead_process_here(), "{dead:?}");
        acquire(&dir.open(), false).expect("a dead holder on this machine holds nothing");
    } else {
        // Without /proc a holder counts as alive until it expires.
        acquire(&dir.open(), false).unwrap_err();
    }
}
