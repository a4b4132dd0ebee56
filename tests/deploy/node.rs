//! deploy/docker/swiftbrush-node, the per-node launcher, around a stand-in
//! for `swiftbrush worker`.

use std::path::Path;
use std::process::Command;

use super::root;

/// A stand-in for `swiftbrush worker` (the script under test is the node
/// launcher): it records its arguments, answers SIGTERM by recording it and
/// exiting 0, and on port 9001 fails with 3 once the worker on 9000 runs.
const STAND_IN: &str = r#"#!/usr/bin/env bash
trap 'echo "term $*" >> "$NODE_LOG"; exit 0' TERM
echo "start $*" >> "$NODE_LOG"
if [[ "$*" == *":9001"* ]]; then
    until grep -q ':9000' "$NODE_LOG"; do sleep 0.01; done
    exit 3
fi
while :; do sleep 0.05; done
"#;

fn node_launcher(dir: &Path, env: &[(&str, &str)]) -> std::process::Child {
    let stand_in = dir.join("swiftbrush");
    std::fs::write(&stand_in, STAND_IN).expect("stand-in");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let mut cmd = Command::new(root().join("deploy/docker/swiftbrush-node"));
    cmd.args(["--coordinator", "http://c:50051"])
        .env("SWIFTBRUSH_BIN", &stand_in)
        .env("NODE_LOG", dir.join("log"))
        .env("SWIFTBRUSH_DEVICE_KIND", "cpu")
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("swiftbrush-node")
}

fn node_log(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn wait_for(child: &mut std::process::Child) -> i32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code().expect("an exit code");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "swiftbrush-node did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn swiftbrush_node_starts_a_worker_per_device_and_forwards_sigterm() {
    let dir = tempfile::tempdir().expect("dir");
    let mut node = node_launcher(
        dir.path(),
        &[
            ("SWIFTBRUSH_NUM_DEVICES", "2"),
            ("SWIFTBRUSH_HEALTH_PORT", "8080"),
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while node_log(dir.path()).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the workers did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let started = node_log(dir.path());
    for port in [8080, 8081] {
        let expected = format!(
            "start worker --device cpu --health-listen 0.0.0.0:{port} --coordinator http://c:50051"
        );
        assert!(started.contains(&expected), "{started:?}");
    }
    let sent = Command::new("kill")
        .args(["-TERM", &node.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    assert_eq!(wait_for(&mut node), 143, "a preempted node says so");
    let log = node_log(dir.path());
    assert_eq!(
        log.iter().filter(|l| l.starts_with("term worker")).count(),
        2,
        "{log:?}"
    );
}

#[test]
fn swiftbrush_node_stops_the_rest_when_a_worker_fails_and_refuses_zero_devices() {
    let dir = tempfile::tempdir().expect("dir");
    let mut node = node_launcher(
        dir.path(),
        &[
            ("SWIFTBRUSH_NUM_DEVICES", "2"),
            ("SWIFTBRUSH_HEALTH_PORT", "9000"),
        ],
    );
    assert_eq!(wait_for(&mut node), 3, "the failing worker's code");
    let log = node_log(dir.path());
    assert!(
        log.iter()
            .any(|l| l.starts_with("term") && l.contains(":9000")),
        "{log:?}"
    );

    let mut none = node_launcher(dir.path(), &[("SWIFTBRUSH_NUM_DEVICES", "0")]);
    assert_eq!(wait_for(&mut none), 2);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut none.stderr.take().expect("stderr"), &mut stderr)
        .expect("read");
    assert!(stderr.contains("no devices to train on"), "{stderr}");
}
