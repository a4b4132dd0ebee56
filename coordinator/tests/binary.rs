//! The swiftbrush-coordinator binary as an operator runs it: it takes the
//! token from a file (or the environment, never an argument), serves, and
//! stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_swiftbrush-coordinator");

fn http_get(addr: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

#[test]
fn serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("dir");
    let token = dir.path().join("token");
    std::fs::write(&token, "binary-test-token-0123456789\n").expect("token");
    let captions = dir.path().join("captions.txt");
    std::fs::write(&captions, "a\nb\nc\nd\n").expect("captions");
    let config = dir.path().join("job.yaml");
    std::fs::write(
        &config,
        format!(
            "name: bin\nmodel: {{teacher: /t}}\ndata: {{captions: [{}]}}\ntrain: {{global_batch: 2, max_steps: 4}}\n",
            captions.display()
        ),
    )
    .expect("config");
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--log-json",
            "--store",
        ])
        .arg(dir.path().join("run"))
        .arg("--config")
        .arg(&config)
        .arg("--token-file")
        .arg(&token)
        .env_remove("SWIFTBRUSH_TOKEN")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    let stderr = child.stderr.take().expect("stderr");
    let (lines, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let listening = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a log line");
        if line.contains("coordinator listening") {
            break serde_json::from_str::<serde_json::Value>(&line).expect("JSON log");
        }
    };
    let http = listening["fields"]["http"]
        .as_str()
        .expect("http address")
        .to_owned();
    assert!(
        listening["fields"]["grpc"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
    );
    assert!(http_get(&http, "/healthz").ends_with("ok\n"));
    assert!(http_get(&http, "/readyz").contains("ready: pending"));

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    // The config was written to the run directory for people and tools.
    assert!(dir.path().join("run/config.yaml").exists());
}

#[test]
fn refuses_to_start_without_a_token() {
    let dir = tempfile::tempdir().expect("dir");
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--store"])
        .arg(dir.path())
        .env_remove("SWIFTBRUSH_TOKEN")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SWIFTBRUSH_TOKEN"), "{stderr}");
}
