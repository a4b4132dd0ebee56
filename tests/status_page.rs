//! The coordinator's status page (`/`) in a real headless browser: Chromium
//! from Debian's packages (`scripts/fetch-chromium`, run by `make test`)
//! loads the page of a running 2-worker CPU job, runs its script against
//! `/status`, `/history` and `/samples/latest`, and the DOM it dumps shows
//! both workers alive with ranks, the loss curves and the samples picture;
//! after one worker is killed, the page marks it dead. Fails when no
//! Chromium can be found; `make test` leaves it out, saying why, only where
//! scripts/fetch-chromium recorded that none can be fetched.

mod cluster;
mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster::{BIN, CoordinatorProcess, JobDir, TOKEN, poll, status_json, swiftbrush};

const DEADLINE: Duration = Duration::from_secs(240);

/// The Chromium to drive: $SWIFTBRUSH_CHROMIUM, else what
/// scripts/fetch-chromium unpacked under target/, else one on PATH; or why
/// there is none.
fn chromium() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("SWIFTBRUSH_CHROMIUM") {
        return Ok(PathBuf::from(path));
    }
    let fetched = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/chromium");
    if fetched.join("chromium").exists() {
        return Ok(fetched.join("chromium"));
    }
    for name in ["chromium-headless-shell", "chromium", "chromium-browser"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .ok()
            .filter(|o| o.status.success());
        if let Some(out) = found {
            return Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
    }
    let why = std::fs::read_to_string(fetched.join("UNAVAILABLE"))
        .unwrap_or_else(|_| "scripts/fetch-chromium has not run (`make test` runs it)".to_owned());
    Err(format!("no Chromium: {}", why.trim()))
}

/// The page's DOM after its script ran for a few (virtual) seconds.
fn render(browser: &PathBuf, url: &str, profile: &std::path::Path) -> String {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            // Several refreshes of the page's one-second timer.
            "--virtual-time-budget=4000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `<tr>` the page drew for `host`, as dumped.
fn worker_row<'a>(dom: &'a str, host: &str) -> Option<&'a str> {
    let at = dom.find(&format!("data-host=\"{host}\""))?;
    let start = dom[..at].rfind("<tr")?;
    let end = at + dom[at..].find("</tr>")?;
    Some(&dom[start..end])
}

fn spawn_worker(dir: &std::path::Path, url: &str, host: &str) -> Child {
    Command::new(BIN)
        .env_clear()
        .env("SWIFTBRUSH_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .env("OMP_NUM_THREADS", "1")
        .current_dir(dir)
        .args([
            "worker",
            "--coordinator",
            url,
            "--device",
            "cpu",
            "--host",
            host,
        ])
        .stdout(std::fs::File::create(dir.join(format!("{host}.out"))).unwrap())
        .stderr(std::fs::File::create(dir.join(format!("{host}.log"))).unwrap())
        .spawn()
        .expect("spawn swiftbrush worker")
}

/// The whole response to GET `path` (a picture is no text).
fn get_bytes(addr: &str, path: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    response
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn worker_health(status: &serde_json::Value, host: &str) -> Option<String> {
    status["workers"]
        .as_array()?
        .iter()
        .filter(|w| w["host"] == host)
        .map(|w| w["health"].as_str().unwrap_or_default().to_owned())
        .next_back()
}

#[test]
fn the_status_page_shows_a_two_worker_job_and_a_killed_worker_dead() {
    // No browser is a failure, never a pass: where scripts/fetch-chromium
    // cannot work, `make test` leaves this test out and prints why.
    let browser = chromium().unwrap_or_else(|why| {
        panic!("{why}; run `make chromium` or set SWIFTBRUSH_CHROMIUM to a Chromium binary")
    });
    let job = JobDir::new();
    let d = job.path();
    let yaml = format!(
        "name: page-test
model: {{teacher: {teacher}, resolution: 16}}
method: {{lora: {{rank: 4, alpha: 8}}}}
data: {{captions: [{captions}]}}
train: {{global_batch: 2, max_steps: 100000, seed: 0, device: cpu, sample_every_steps: 2,
        sample_prompts: [a red circle]}}
world: {{min_size: 1, max_size: 2, heartbeat_interval_ms: 250, heartbeat_timeout_ms: 3000}}
checkpoint: {{every_steps: 1000}}
precision: {{teacher_dtype: fp32, autocast: none}}
",
        teacher = common::pipeline("sd1").display(),
        captions = d.join("captions.txt").display(),
    );
    let config = d.join("page.yaml");
    std::fs::write(&config, yaml).unwrap();
    let coordinator = CoordinatorProcess::start(&job, &[]);
    let launched = swiftbrush(
        &[
            "launch",
            "--coordinator",
            &coordinator.grpc,
            "--config",
            &config.display().to_string(),
        ],
        &[("SWIFTBRUSH_TOKEN", TOKEN)],
    );
    assert!(launched.status.success(), "{}", cluster::stderr(&launched));
    let a = Killed(spawn_worker(d, &coordinator.grpc, "host-a"));
    let mut b = Killed(spawn_worker(d, &coordinator.grpc, "host-b"));
    let logs = || {
        ["host-a", "host-b"]
            .iter()
            .map(|h| std::fs::read_to_string(d.join(format!("{h}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n-----\n")
    };
    // Both training in one world, past a sample step.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = status_json(&coordinator.http);
        let training = s["world_size"] == 2
            && s["phase"] == "running"
            && s["workers"].as_array().is_some_and(|ws| {
                ws.iter()
                    .filter(|w| w["health"] == "alive" && w["step"].as_u64() >= Some(3))
                    .count()
                    == 2
            });
        if training && cluster::http_get(&coordinator.http, "/samples/latest").1 != "null" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never trained with 2 workers: {s:#}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Self-contained: nothing for the browser to fetch from elsewhere (the
    // SVG namespace is a name, not a fetch).
    let (code, html) = cluster::http_get(&coordinator.http, "/");
    assert_eq!(code, 200);
    for outside in [
        "src=\"http",
        "href=\"http",
        "src=\"//",
        "url(",
        "@import",
        "fetch(\"http",
    ] {
        assert!(!html.contains(outside), "the page loads {outside}...");
    }

    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", coordinator.http);
    let dom = render(&browser, &url, profile.path());
    assert!(dom.contains("<h1 id=\"job\">page-test</h1>"), "{dom}");
    assert!(dom.contains(">running</span>"), "the phase: {dom}");
    let status = status_json(&coordinator.http);
    let mut ranks = Vec::new();
    for host in ["host-a", "host-b"] {
        let row = worker_row(&dom, host).unwrap_or_else(|| panic!("no row for {host}: {dom}"));
        assert!(row.contains("data-health=\"alive\""), "{row}");
        // Named as the coordinator names it: all 64 bits of the id.
        let id = status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["host"] == host)
            .and_then(|w| w["worker"].as_u64())
            .unwrap();
        assert!(
            row.contains(&format!("data-worker=\"w{id:x}\"")),
            "w{id:x}: {row}"
        );
        let rank = row
            .split("data-rank=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap();
        ranks.push(rank.to_owned());
    }
    ranks.sort();
    assert_eq!(ranks, ["0", "1"], "{dom}");
    // The loss curves (one line per worker in each chart) and the picture.
    let vsd = dom
        .split("id=\"chart-vsd\"")
        .nth(1)
        .unwrap()
        .split("</svg>")
        .next()
        .unwrap();
    assert_eq!(vsd.matches("<polyline").count(), 2, "{vsd}");
    assert!(
        dom.contains("src=\"samples/latest.png?samples%2Fstep-"),
        "{dom}"
    );
    let png = get_bytes(&coordinator.http, "/samples/latest.png");
    let body = png.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        png.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&png[..body])
    );
    assert!(png[body..].starts_with(b"\x89PNG"), "a PNG");

    // Kill host-b; once the coordinator declares it dead, so does the page.
    b.0.kill().unwrap();
    b.0.wait().unwrap();
    poll("host-b declared dead", DEADLINE, || {
        let s = status_json(&coordinator.http);
        (worker_health(&s, "host-b").as_deref() == Some("dead")).then_some(())
    });
    let dom = render(&browser, &url, profile.path());
    let row = worker_row(&dom, "host-b").unwrap_or_else(|| panic!("no row for host-b: {dom}"));
    assert!(row.contains("data-health=\"dead\""), "{row}");
    assert!(
        row.contains("silent for"),
        "the death reason is shown: {row}"
    );
    let row = worker_row(&dom, "host-a").unwrap();
    assert!(row.contains("data-health=\"alive\""), "{row}");
    drop(a);
}
