//! The shell's timers on tokio's paused clock: the ticker turns a silent
//! worker Suspect, then Dead, and a long-poll gives up after its wait, all
//! without sleeping for real.

mod common;

use std::sync::Arc;
use std::time::Duration;

use swiftbrush_coordinator::app::{Coordinator, TokioClock};
use swiftbrush_coordinator::domain::{
    Capabilities, CoreOptions, Health, RegisterInput, RendezvousOutcome,
};
use swiftbrush_proto::run_store::AsyncRunStore;

async fn coordinator_with_job(min: u32) -> (Coordinator, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let captions = dir.path().join("c.txt");
    std::fs::write(&captions, "one\ntwo\nthree\nfour\n").expect("captions");
    let yaml = common::config_yaml(&captions.display().to_string(), min, 2, 4, 10);
    let config = swiftbrush_proto::JobConfig::from_yaml_str(&yaml, "test").expect("config");
    let store = AsyncRunStore::open(&common::memory_url()).expect("store");
    let app = Coordinator::new(CoreOptions::default(), store, Arc::new(TokioClock::new()));
    app.submit_config(config).await.expect("submit");
    (app, dir)
}

fn register(app: &Coordinator, host: &str) -> swiftbrush_coordinator::domain::WorkerId {
    let input = RegisterInput {
        host: host.to_owned(),
        device: "cpu".to_owned(),
        capabilities: Capabilities::default(),
    };
    app.register(input).expect("register").0.worker
}

#[tokio::test(start_paused = true)]
async fn the_ticker_declares_a_silent_worker_suspect_then_dead() {
    let (app, _dir) = coordinator_with_job(1).await;
    let w = register(&app, "host-a");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let ticker = tokio::spawn(app.clone().run_ticker(Duration::from_millis(250), async {
        let _ = stopped.await;
    }));
    let health = |app: &Coordinator| app.inspect(|s| s.worker(w).map(|w| w.health));
    tokio::time::sleep(Duration::from_millis(2_900)).await;
    assert_eq!(health(&app), Some(Health::Alive));
    // Three missed 1 s beats: suspect.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(health(&app), Some(Health::Suspect));
    // Past the 10 s heartbeat timeout: dead.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(health(&app), Some(Health::Dead));
    let _ = stop.send(());
    ticker.await.expect("ticker stops");
}

#[tokio::test(start_paused = true)]
async fn a_long_poll_waits_its_time_and_keeps_the_worker_ready() {
    let (app, _dir) = coordinator_with_job(2).await;
    let w = register(&app, "host-a");
    let started = tokio::time::Instant::now();
    let outcome = app
        .rendezvous(w, 0, "t", Duration::from_secs(20))
        .await
        .expect("rendezvous");
    assert!(
        matches!(outcome, RendezvousOutcome::Waiting(ref info) if info.num_ready == 1),
        "{outcome:?}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(20));
    // It re-asked every second, so it is still a fresh candidate.
    let now = app.now();
    assert_eq!(app.inspect(|s| s.ready_workers(now)), vec![w]);
    // A second worker completes the world while the first waits.
    let waiting = tokio::spawn({
        let app = app.clone();
        async move { app.rendezvous(w, 0, "t", Duration::from_secs(20)).await }
    });
    let v = register(&app, "host-b");
    let second = app
        .rendezvous(v, 0, "t", Duration::ZERO)
        .await
        .expect("rendezvous");
    assert!(matches!(second, RendezvousOutcome::Assigned(_)));
    let first = waiting.await.expect("task").expect("rendezvous");
    assert!(matches!(first, RendezvousOutcome::Assigned(a) if a.world_size == 2));
}
