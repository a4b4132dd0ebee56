//! deploy/slurm/swiftbrush.sbatch: its directives and its refusals
//! (tests/deploy_e2e.rs runs it under a fake Slurm).

use std::process::Command;

use super::{read, root};

fn sbatch_directives() -> Vec<String> {
    read("deploy/slurm/swiftbrush.sbatch")
        .lines()
        .filter_map(|l| l.strip_prefix("#SBATCH "))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// N of `--signal=[B:]SIG@N`: how long before the end the workers are told.
pub fn slurm_signal_seconds() -> u64 {
    let signal = sbatch_directives()
        .into_iter()
        .find_map(|d| d.strip_prefix("--signal=").map(str::to_owned))
        .expect("an --signal directive");
    let (sig, seconds) = signal.split_once('@').expect("SIG@SECONDS");
    assert!(
        !sig.starts_with("B:"),
        "the signal must reach the workers (job steps), not only the batch shell"
    );
    assert!(
        matches!(sig, "TERM" | "USR1"),
        "{sig}: the workers' checkpoint path listens for TERM"
    );
    seconds.parse().expect("seconds")
}

#[test]
fn the_sbatch_script_requeues_signals_the_workers_and_parses() {
    let directives = sbatch_directives();
    assert!(
        directives.iter().any(|d| d == "--requeue"),
        "{directives:?}"
    );
    assert!(slurm_signal_seconds() >= 60, "time to write a checkpoint");
    let script = read("deploy/slurm/swiftbrush.sbatch");
    let grace_ms: u64 = script
        .split("SWIFTBRUSH_GRACE_MS:-")
        .nth(1)
        .and_then(|s| s.split('}').next())
        .and_then(|s| s.parse().ok())
        .expect("a default SWIFTBRUSH_GRACE_MS");
    assert!(
        grace_ms < slurm_signal_seconds() * 1000,
        "the workers give up before the time limit"
    );
    assert!(script.contains("--grace-ms \"$SWIFTBRUSH_GRACE_MS\""));
    assert!(directives.iter().any(|d| d.starts_with("--gpus-per-node=")));
    let script = read("deploy/slurm/swiftbrush.sbatch");
    for needle in [
        "scontrol show hostnames \"$SLURM_JOB_NODELIST\"",
        "SLURM_GPUS_ON_NODE",
        "SLURM_LOCALID",
        "scontrol requeue \"$SLURM_JOB_ID\"",
        "srun ",
    ] {
        assert!(script.contains(needle), "the script uses {needle}");
    }
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(root().join("deploy/slurm/swiftbrush.sbatch"))
        .output()
        .expect("bash");
    assert!(
        syntax.status.success(),
        "{}",
        String::from_utf8_lossy(&syntax.stderr)
    );
}

#[test]
fn the_sbatch_script_names_what_is_missing() {
    let dir = tempfile::tempdir().expect("dir");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new("bash");
        cmd.arg(root().join("deploy/slurm/swiftbrush.sbatch"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("bash");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&[]).contains("run this with sbatch"));
    let slurm = [("SLURM_JOB_ID", "7"), ("SLURM_JOB_NODELIST", "n1")];
    assert!(run(&slurm).contains("set SWIFTBRUSH_CONFIG"));
    let config = dir.path().join("job.yaml");
    std::fs::write(&config, "name: x\n").expect("config");
    let config = config.display().to_string();
    let with_config = [slurm[0], slurm[1], ("SWIFTBRUSH_CONFIG", config.as_str())];
    assert!(run(&with_config).contains("set SWIFTBRUSH_STORE"));
    let with_store = [
        with_config[0],
        with_config[1],
        with_config[2],
        ("SWIFTBRUSH_STORE", "/runs/x"),
    ];
    let no_token = run(&with_store);
    assert!(no_token.contains("SWIFTBRUSH_TOKEN_FILE"), "{no_token}");
}
