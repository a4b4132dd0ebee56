//! moto's S3 server for the tests: started from the project's virtualenv on
//! a free loopback port, with one bucket, and killed when the guard drops
//! (also when the test panics).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "runs";
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct MotoServer {
    child: Child,
    addr: SocketAddr,
}

impl MotoServer {
    pub fn start() -> Self {
        let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv");
        let binary = venv.join("bin/moto_server");
        assert!(
            binary.exists(),
            "moto's S3 server is not installed ({} is missing): run `make venv` at the \
             repository root (it installs tests/reference/requirements.txt, which pins moto[server])",
            binary.display()
        );
        // Ask the kernel for a free port, then hand it to moto; the window
        // between closing and moto binding is tiny and only on loopback.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("no free loopback port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut server = Self { child, addr };
        server.wait_until_serving();
        server.create_bucket();
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn wait_until_serving(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("moto_server exited at start-up with {status}");
            }
            if http(self.addr, "GET / HTTP/1.1").is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on {} within {START_TIMEOUT:?}",
                self.addr
            );
            // Polling an external process that gives no readiness signal.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// moto accepts unsigned bucket creation; this keeps the setup free of
    /// any S3 client other than the one under test.
    fn create_bucket(&self) {
        let response = http(self.addr, &format!("PUT /{BUCKET} HTTP/1.1"))
            .unwrap_or_else(|e| panic!("cannot create bucket {BUCKET}: {e}"));
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "creating bucket {BUCKET} failed: {response}"
        );
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One bodiless request; the whole response as text.
fn http(addr: SocketAddr, request_line: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{request_line}\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}
