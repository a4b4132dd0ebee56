//! `swiftbrush config check` and the binary's start-up, driven as a user
//! would: the built binary, a clean environment, files on disk.

use std::path::Path;
use std::process::{Command, Output};

fn swiftbrush() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_swiftbrush"));
    // No LD_LIBRARY_PATH, no cargo variables: libtorch must be found by rpath.
    cmd.env_clear();
    cmd
}

fn run(args: &[&str]) -> Output {
    swiftbrush().args(args).output().expect("spawn swiftbrush")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn help_runs_without_any_environment() {
    let out = run(&["--help"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("config"), "{text}");
}

/// `doctor --json` of `cmd`, which must succeed.
fn doctor_json(mut cmd: Command) -> serde_json::Value {
    let out = cmd
        .args(["doctor", "--json"])
        .output()
        .expect("spawn swiftbrush");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("doctor --json prints JSON")
}

fn canonical(p: impl AsRef<Path>) -> std::path::PathBuf {
    p.as_ref().canonicalize().unwrap()
}

#[test]
fn doctor_says_what_it_loaded_and_from_where() {
    let report = doctor_json(swiftbrush());
    let libtorch = &report["libtorch"];
    assert_eq!(libtorch["source"], "loaded", "{report:#}");
    let dir = Path::new(libtorch["dir"].as_str().unwrap());
    // The pinned wheel (requirements-torch.txt), found by rpath.
    assert_eq!(
        canonical(dir),
        canonical(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/libtorch/lib"))
    );
    assert!(
        libtorch["version"].as_str().unwrap().starts_with("2.11.0"),
        "{report:#}"
    );
    // The pinned wheel is the CUDA build: its backend loads even with no
    // driver, and its libnccl comes from beside it.
    let backend = &report["cuda_backend"];
    assert_eq!(backend["status"], "loaded", "{report:#}");
    assert_eq!(
        Path::new(backend["path"].as_str().unwrap()),
        dir.join("libtorch_cuda.so")
    );
    assert_eq!(report["nccl"]["status"], "loaded", "{report:#}");
    // fp32 is IEEE fp32 on CUDA unless asked (libtorch's own default lets
    // cuDNN convolutions use TF32).
    assert_eq!(
        (&report["tf32_matmul"], &report["tf32_conv"]),
        (&false.into(), &false.into())
    );
    // cuDNN's benchmark mode stays libtorch's default (off) outside training.
    assert_eq!(report["cudnn_benchmark"], false, "{report:#}");
    let mut tf32 = swiftbrush();
    tf32.env("SWIFTBRUSH_TF32", "1");
    let allowed = doctor_json(tf32);
    assert_eq!(
        (&allowed["tf32_matmul"], &allowed["tf32_conv"]),
        (&true.into(), &true.into())
    );
    // The binary tunes malloc for CPU tensors (host_memory.rs) unless the
    // environment already does, and then leaves the user's choice alone.
    // (The test's environment sets none of glibc's variables.)
    assert_eq!(report["host_malloc"]["status"], "tuned", "{report:#}");
    let mut own = swiftbrush();
    own.env("MALLOC_ARENA_MAX", "2");
    assert_eq!(
        doctor_json(own)["host_malloc"],
        serde_json::json!({"status": "from_environment", "variable": "MALLOC_ARENA_MAX"})
    );
    let text = String::from_utf8_lossy(&run(&["doctor"]).stdout).into_owned();
    for key in [
        "libtorch ",
        "CUDA backend ",
        "libnccl ",
        "GPUs ",
        "CPU threads ",
        "host memory ",
    ] {
        assert!(text.contains(key), "{key:?} missing in\n{text}");
    }
    // No GPU here (CI): a plain line that says so and why.
    if report["gpus"]["status"] == "missing" {
        let line = text.lines().find(|l| l.starts_with("GPUs")).unwrap();
        assert!(line.contains("none: libcuda.so.1 not found"), "{line}");
    }
}

/// A copy of the binary whose baked-in libtorch directory (rpath, and the
/// build-time fallback) names a directory that does not exist: the binary
/// as it arrives on another machine.
fn copy_without_rpath(dir: &Path, built_dir: &str) -> std::path::PathBuf {
    let mut bytes = std::fs::read(env!("CARGO_BIN_EXE_swiftbrush")).unwrap();
    let from = built_dir.as_bytes();
    let gone = format!("/no-such-libtorch-{}", "x".repeat(from.len()));
    let to = &gone.as_bytes()[..from.len()];
    let mut replaced = 0;
    let mut i = 0;
    while let Some(at) = bytes[i..].windows(from.len()).position(|w| w == from) {
        bytes[i + at..i + at + from.len()].copy_from_slice(to);
        replaced += 1;
        i += at + from.len();
    }
    assert!(replaced > 0, "{built_dir} is not in the binary");
    let path = dir.join("swiftbrush");
    std::fs::write(&path, bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn without_its_rpath_directory_the_binary_takes_libtorch_from_ld_library_path() {
    let report = doctor_json(swiftbrush());
    let built = report["libtorch"]["dir"].as_str().unwrap().to_owned();
    let tmp = tempfile::tempdir().unwrap();
    let bin = copy_without_rpath(tmp.path(), &built);

    // Nothing given: the loader cannot find libtorch, and says so.
    let mut bare = Command::new(&bin);
    bare.env_clear();
    let out = bare.arg("doctor").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("libtorch") || err.contains("libc10"), "{err}");

    // Another site-packages holding the same wheel (links to it), given by
    // LD_LIBRARY_PATH: libtorch, its CUDA backend and libnccl all come from
    // there.
    let wheel = canonical(&built);
    let torch = wheel.parent().unwrap();
    let site = tmp.path().join("site-packages");
    std::fs::create_dir(&site).unwrap();
    std::os::unix::fs::symlink(torch, site.join("torch")).unwrap();
    let nvidia = torch.parent().unwrap().join("nvidia");
    std::os::unix::fs::symlink(&nvidia, site.join("nvidia")).unwrap();
    let lib = site.join("torch/lib");
    let mut cmd = Command::new(&bin);
    cmd.env_clear().env("LD_LIBRARY_PATH", &lib);
    let moved = doctor_json(cmd);
    assert_eq!(moved["libtorch"]["source"], "loaded", "{moved:#}");
    assert_eq!(Path::new(moved["libtorch"]["dir"].as_str().unwrap()), lib);
    assert_eq!(moved["libtorch"]["version"], report["libtorch"]["version"]);
    assert_eq!(
        Path::new(moved["cuda_backend"]["path"].as_str().unwrap()),
        lib.join("libtorch_cuda.so"),
        "{moved:#}"
    );
    let nccl = moved["nccl"]["path"].as_str().unwrap();
    assert!(nccl.starts_with(site.to_str().unwrap()), "{moved:#}");
}

#[test]
fn check_prints_the_resolved_config() {
    let preset = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/sd21-base.yaml");
    let out = run(&["config", "check", preset, "--teacher", "/models/sd21"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("teacher: /models/sd21"), "{text}");
    assert!(text.contains("guidance_scale: 4.5"), "{text}");
    // Defaults the preset leaves out are written too.
    assert!(text.contains("heartbeat_timeout_ms: 10000"), "{text}");
}

/// Issue 29: a valid config that names a teacher folder or caption file
/// this machine does not have is still valid (it may be meant for another
/// machine), but `config check` says so.
#[test]
fn check_warns_of_a_missing_teacher_and_caption_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "c.yaml",
        "model:\n  teacher: /models/nowhere\ndata:\n  captions: [/data/none.txt, s3://b/c.txt]\n",
    );
    let out = swiftbrush()
        .args(["config", "check", &f])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("model.teacher: /models/nowhere is not a folder on this machine"),
        "{err}"
    );
    assert!(
        err.contains("data.captions: /data/none.txt does not exist on this machine"),
        "{err}"
    );
    assert!(!err.contains("s3://b/c.txt"), "URLs are not checked: {err}");
}

#[test]
fn bad_config_exits_nonzero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "model:\n  teacher: /t\nmethod:\n  gudance_scale: 2\n",
            "did you mean `guidance_scale`?",
        ),
        (
            "model:\n  teacher: /t\ntrain:\n  global_batch: seven\n",
            "train.global_batch: invalid type",
        ),
        (
            "model:\n  teacher: /t\nmethod:\n  lora:\n    rank: 0\n",
            "method.lora.rank = 0",
        ),
        ("model:\n  resolution: 512\n", "model.teacher is missing"),
    ];
    for (i, (yaml, want)) in cases.iter().enumerate() {
        let f = write(dir.path(), &format!("c{i}.yaml"), yaml);
        let out = run(&["config", "check", &f]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{yaml}: {err}");
        assert!(err.contains(want), "{yaml}: want {want:?} in {err}");
        assert!(out.stdout.is_empty(), "nothing printed on error");
    }
}

#[test]
fn missing_file_is_named() {
    let out = run(&["config", "check", "/nonexistent/job.yaml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("/nonexistent/job.yaml"), "{err}");
}

#[test]
fn json_logs_are_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "ok.yaml", "model:\n  teacher: /t\n");
    let out = swiftbrush()
        .args(["--log-format", "json", "config", "check", &f])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("config is valid"))
        .expect(&err);
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    assert!(line.contains("\"level\":\"INFO\""), "{line}");
    assert!(line.contains("\"fingerprint\":\""), "{line}");

    // RUST_LOG controls the level.
    let quiet = swiftbrush()
        .args(["--log-format", "json", "config", "check", &f])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("config is valid"));
}

/// `swiftbrush worker` as a user starts it, against a coordinator that is
/// not there: it sizes libtorch's threads first thing and says so on its
/// start line, then fails to connect. Its stderr.
fn worker_start_line(env: &[(&str, &str)], args: &[&str]) -> String {
    let out = swiftbrush()
        .env("SWIFTBRUSH_TOKEN", "threads-test-token-0123456789")
        .envs(env.iter().copied())
        .args([
            "worker",
            "--coordinator",
            "http://127.0.0.1:9",
            "--device",
            "cpu",
        ])
        .args(["--connect-timeout-ms", "0"])
        .args(args)
        .output()
        .expect("spawn swiftbrush worker");
    assert!(!out.status.success(), "no coordinator, yet it succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    stderr
        .lines()
        .find(|l| l.contains("threads: "))
        .unwrap_or_else(|| panic!("no threads line in\n{stderr}"))
        .to_owned()
}

fn cores() -> u32 {
    std::thread::available_parallelism().unwrap().get() as u32
}

/// Issue 29: worker processes side by side each took every core for
/// libtorch (and OpenMP's spinning threads), 30x slower than one thread
/// each. A worker takes its share: cores / the workers on this host, from
/// --local-workers, SWIFTBRUSH_LOCAL_WORKERS or a launcher's variables;
/// --threads and the user's OMP_NUM_THREADS / MKL_NUM_THREADS win.
#[test]
fn a_worker_takes_its_share_of_the_host_s_cores() {
    let share = |n: u32| (cores() / n).max(1);
    let s = share(2);
    let line = worker_start_line(&[], &["--local-workers", "2"]);
    assert!(
        line.contains(&format!(
            "threads: {s} intra-op, {s} inter-op ({} cores / 2 local workers, --local-workers)",
            cores()
        )),
        "{line}"
    );
    for (var, n) in [("SWIFTBRUSH_LOCAL_WORKERS", 2), ("LOCAL_WORLD_SIZE", 3)] {
        let value = n.to_string();
        let line = worker_start_line(&[(var, &value)], &[]);
        let s = share(n);
        assert!(
            line.contains(&format!("threads: {s} intra-op, {s} inter-op (")),
            "{line}"
        );
        assert!(
            line.contains(&format!("{n} local workers, {var})")),
            "{line}"
        );
    }
    // srun's tasks on this node.
    let line = worker_start_line(
        &[
            ("SLURM_STEP_TASKS_PER_NODE", "2(x2)"),
            ("SLURM_NODEID", "1"),
        ],
        &[],
    );
    assert!(
        line.contains("2 local workers, SLURM_STEP_TASKS_PER_NODE)"),
        "{line}"
    );
    // The user's choice stands.
    let line = worker_start_line(&[("OMP_NUM_THREADS", "3")], &["--local-workers", "2"]);
    assert!(
        line.contains("threads: 3 intra-op, 3 inter-op (OMP_NUM_THREADS=3)"),
        "{line}"
    );
    let line = worker_start_line(&[("OMP_NUM_THREADS", "3")], &["--threads", "5"]);
    assert!(
        line.contains("threads: 5 intra-op, 5 inter-op (--threads)"),
        "{line}"
    );
    // Bad counts are refused before anything starts, with their name.
    for (env, args, says) in [
        (vec![], vec!["--threads", "0"], "--threads"),
        (vec![], vec!["--local-workers", "0"], "--local-workers"),
        (
            vec![("SWIFTBRUSH_LOCAL_WORKERS", "two")],
            vec![],
            "SWIFTBRUSH_LOCAL_WORKERS=\"two\" is not a count",
        ),
    ] {
        let out = swiftbrush()
            .env("SWIFTBRUSH_TOKEN", "threads-test-token-0123456789")
            .envs(env)
            .args(["worker", "--coordinator", "http://127.0.0.1:9"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(if says.starts_with("--") { 2 } else { 1 }),
            "{stderr}"
        );
        assert!(stderr.contains(says), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// doctor says what a worker started here would take, and why.
#[test]
fn doctor_says_what_threads_a_worker_would_take() {
    let mut shared = swiftbrush();
    shared.env("SWIFTBRUSH_LOCAL_WORKERS", "2");
    let report = doctor_json(shared);
    let threads = &report["worker_threads"];
    let s = (cores() / 2).max(1);
    assert_eq!(threads["status"], "planned", "{report:#}");
    assert_eq!(
        (&threads["intra_op"], &threads["inter_op"]),
        (&s.into(), &s.into())
    );
    assert_eq!(
        threads["source"],
        serde_json::json!({"from": "share", "cores": cores(), "local_workers": 2,
            "local_workers_from": "SWIFTBRUSH_LOCAL_WORKERS"})
    );
    let out = swiftbrush()
        .env("OMP_NUM_THREADS", "1")
        .args(["doctor", "--local-workers", "2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("worker threads"))
        .unwrap_or_else(|| panic!("no worker threads line in\n{text}"));
    assert!(
        line.ends_with("1 intra-op, 1 inter-op (OMP_NUM_THREADS=1)"),
        "{line}"
    );
    let bad = doctor_json({
        let mut c = swiftbrush();
        c.env("LOCAL_WORLD_SIZE", "0");
        c
    });
    assert_eq!(bad["worker_threads"]["status"], "invalid", "{bad:#}");
}
