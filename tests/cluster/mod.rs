//! Shared by the operator and deployment tests: a real `swiftbrush
//! coordinator` process on loopback (its addresses read from its JSON log),
//! the operator commands run as a user runs them, and a plain HTTP GET.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_swiftbrush");
pub const TOKEN: &str = "cluster-test-token-0123456789";

/// A job folder: the token file, a captions file and a job config over it.
pub struct JobDir {
    pub dir: tempfile::TempDir,
}

impl JobDir {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))
                .expect("chmod token");
        }
        let captions: String = (0..8).map(|i| format!("caption number {i}\n")).collect();
        std::fs::write(dir.path().join("captions.txt"), captions).expect("captions");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn token_file(&self) -> PathBuf {
        self.path().join("token")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.path().join("run")
    }

    /// Writes `job.yaml` (or `name`) for `max_steps` steps of a world of
    /// `min..=max` over the captions, with `teacher` as model.teacher.
    pub fn config(&self, name: &str, teacher: &str, min: u32, max: u32, max_steps: u64) -> PathBuf {
        let yaml = format!(
            "name: {name}
model: {{teacher: {teacher}}}
data: {{captions: [{captions}]}}
train: {{global_batch: 2, max_steps: {max_steps}, seed: 1}}
world: {{min_size: {min}, max_size: {max}}}
",
            captions = self.path().join("captions.txt").display()
        );
        let path = self.path().join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).expect("config");
        path
    }
}

/// A `swiftbrush coordinator` process; killed when dropped.
pub struct CoordinatorProcess {
    child: Child,
    pub grpc: String,
    pub http: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl CoordinatorProcess {
    /// Starts one on 127.0.0.1:0 (gRPC and HTTP) over `job`'s run directory.
    pub fn start(job: &JobDir, extra: &[&str]) -> Self {
        let store = job.run_dir().display().to_string();
        let token = job.token_file().display().to_string();
        let args = [
            &[
                "--settle-ms",
                "300",
                "--store",
                &store,
                "--token-file",
                &token,
            ][..],
            extra,
        ]
        .concat();
        Self::start_at("127.0.0.1:0", "127.0.0.1:0", &args)
    }

    /// Starts one serving gRPC on `grpc` and HTTP on `http` (fixed ports:
    /// a restarted coordinator is found where the workers look), with
    /// `args` after those flags.
    pub fn start_at(grpc: &str, http: &str, args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .env_clear()
            .env("RUST_LOG", "info")
            .env("OMP_NUM_THREADS", "1")
            .args(["--log-format", "json", "coordinator"])
            .args(["--listen", grpc, "--http", http])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start swiftbrush coordinator");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log").push(line.clone());
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let listening = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "the coordinator did not report its addresses: {:?}",
                    log.lock().expect("log")
                )
            });
            if line.contains("coordinator listening") {
                break serde_json::from_str::<serde_json::Value>(&line).expect("a JSON log line");
            }
        };
        let field = |name: &str| {
            listening[name]
                .as_str()
                .unwrap_or_else(|| panic!("no {name} in {listening}"))
                .to_owned()
        };
        Self {
            grpc: format!("http://{}", field("grpc")),
            http: field("http"),
            child,
            log,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(exit) = self.child.try_wait().expect("wait") {
                return exit;
            }
            assert!(
                Instant::now() < deadline,
                "the coordinator still runs 20 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: nothing is shut down, flushed or told to anyone.
    pub fn kill(mut self) {
        self.child.kill().expect("kill the coordinator");
        self.child.wait().expect("wait for the coordinator");
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `swiftbrush ARGS` with only the given environment.
pub fn swiftbrush(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("RUST_LOG", "warn")
        .env("OMP_NUM_THREADS", "1")
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run swiftbrush")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The output of a command that must succeed.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

/// The stderr of a command that must fail.
pub fn fails(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "should have failed:\nstdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
    stderr(out)
}

/// A loopback port that was free when asked.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// GET `path` from `addr` (host:port): the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// The coordinator's /status JSON.
pub fn status_json(http: &str) -> serde_json::Value {
    let (code, body) = http_get(http, "/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status JSON")
}

/// Polls `check` every 50 ms until it returns Some, or panics at the deadline.
pub fn poll<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
