//! `swiftbrush bench coordinator`: what N workers heartbeating at 1 Hz cost
//! a coordinator. The coordinator is a child process (`swiftbrush
//! coordinator` on loopback, an in-memory run directory), so its CPU time
//! and memory are its own; this process plays the workers with real gRPC
//! clients (Register once, then Heartbeat every second each, spread over
//! the second) over a few shared HTTP/2 connections, and asks JobStatus
//! ten times a second. Reported: heartbeat latency p50/p99/max, the
//! coordinator's CPU seconds per heartbeat and cores used, its peak
//! memory, and JobStatus latency with N workers. The clients share the
//! machine: on a small one they, not the coordinator, may be the limit
//! (the report says how many heartbeats were due and how many were sent).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use swiftbrush_proto::rpc::{self, CoordinatorConnection};
use swiftbrush_worker::bench::peak_rss_mib;
use tokio::sync::Mutex;

#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorBenchArgs {
    /// Simulated workers.
    #[arg(long, default_value_t = 1000)]
    workers: usize,
    /// Measured seconds (after every worker registered).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// HTTP/2 connections the workers share (one per worker would need
    /// thousands of sockets; a real cluster has one per worker process).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
pub struct CoordinatorBenchReport {
    pub workers: usize,
    pub seconds: f64,
    pub heartbeats_due: u64,
    pub heartbeats_sent: u64,
    pub heartbeat_errors: u64,
    pub heartbeat_p50_ms: f64,
    pub heartbeat_p99_ms: f64,
    pub heartbeat_max_ms: f64,
    /// The coordinator process's CPU time (user + system) over the window.
    pub coordinator_cpu_s: f64,
    pub coordinator_cpu_us_per_heartbeat: f64,
    pub coordinator_cores: f64,
    /// Its peak resident memory (VmHWM).
    pub coordinator_peak_mib: f64,
    pub job_status_calls: u64,
    pub job_status_p50_ms: f64,
    pub job_status_p99_ms: f64,
}

impl CoordinatorBenchReport {
    fn table(&self) -> String {
        format!(
            "workers                {}\nmeasured               {:.1} s\nheartbeats             {} sent of {} due ({} errors)\nheartbeat latency      p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\ncoordinator CPU        {:.2} s: {:.1} us a heartbeat, {:.2} cores\ncoordinator memory     {:.0} MiB peak\nJobStatus latency      p50 {:.2} ms, p99 {:.2} ms ({} calls)\n",
            self.workers,
            self.seconds,
            self.heartbeats_sent,
            self.heartbeats_due,
            self.heartbeat_errors,
            self.heartbeat_p50_ms,
            self.heartbeat_p99_ms,
            self.heartbeat_max_ms,
            self.coordinator_cpu_s,
            self.coordinator_cpu_us_per_heartbeat,
            self.coordinator_cores,
            self.coordinator_peak_mib,
            self.job_status_p50_ms,
            self.job_status_p99_ms,
            self.job_status_calls,
        )
    }
}

/// Kills the coordinator when the bench ends, however it ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: CoordinatorBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers > 0, "--workers must be at least 1");
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let token = "bench-coordinator-token-0123456789abcdef";
    let child = Command::new(std::env::current_exe()?)
        .args(["coordinator", "--store", "memory://bench-coordinator"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--max-workers", &(args.workers + 1).to_string()])
        .env(rpc::TOKEN_ENV, token)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the coordinator")?;
    let guard = ChildGuard(child);
    let pid = guard.0.id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(drive(&args, port, token, pid))?;
    drop(guard);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

async fn connect(address: &str, token: &str) -> anyhow::Result<CoordinatorConnection> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match rpc::connect(address, token, None).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e).context("the coordinator"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn drive(
    args: &CoordinatorBenchArgs,
    port: u16,
    token: &str,
    pid: u32,
) -> anyhow::Result<CoordinatorBenchReport> {
    let address = format!("http://127.0.0.1:{port}");
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        conns.push(connect(&address, token).await?);
    }
    // Register every worker first (not measured).
    let mut ids = Vec::with_capacity(args.workers);
    for chunk in (0..args.workers).collect::<Vec<_>>().chunks(256) {
        let calls = chunk.iter().map(|&i| {
            let mut c = conns[i % conns.len()].clone();
            async move {
                c.register(rpc::RegisterRequest {
                    host: format!("bench-host-{i}"),
                    device: "cuda:0".to_owned(),
                    capabilities: Some(rpc::Capabilities {
                        backends: vec!["nccl".to_owned()],
                        device_memory_bytes: 0,
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                    }),
                })
                .await
                .map(|r| r.into_inner().worker_id)
            }
        });
        for r in futures::future::join_all(calls).await {
            ids.push(r.context("Register")?);
        }
    }

    let window = Duration::from_secs_f64(args.seconds);
    let cpu0 = process_cpu_s(pid)?;
    let started = Instant::now();
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, &worker_id) in ids.iter().enumerate() {
        let mut c = conns[i % conns.len()].clone();
        let latencies = latencies.clone();
        let errors = errors.clone();
        // Spread over the second, as real workers' clocks are.
        let phase = Duration::from_secs_f64(i as f64 / args.workers as f64);
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut next = started + phase;
            while next < started + window {
                tokio::time::sleep_until(next.into()).await;
                let t0 = Instant::now();
                let r = c
                    .heartbeat(rpc::HeartbeatRequest {
                        worker_id,
                        generation: 0,
                        step: 0,
                        phase: rpc::Phase::Idle as i32,
                        metrics: None,
                    })
                    .await;
                match r {
                    Ok(_) => mine.push(t0.elapsed().as_secs_f64() * 1e3),
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                next += Duration::from_secs(1);
            }
            latencies.lock().await.extend(mine);
        }));
    }
    let mut status_conn = conns[0].clone();
    let status_task = tokio::spawn(async move {
        let mut lat = Vec::new();
        while started.elapsed() < window {
            let t0 = Instant::now();
            if status_conn
                .job_status(rpc::JobStatusRequest {})
                .await
                .is_ok()
            {
                lat.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        lat
    });
    for t in tasks {
        t.await?;
    }
    let status = status_task.await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = process_cpu_s(pid)? - cpu0;
    let mut hb = std::mem::take(&mut *latencies.lock().await);
    hb.sort_by(f64::total_cmp);
    let mut st = status;
    st.sort_by(f64::total_cmp);
    let sent = hb.len() as u64;
    let due = (0..args.workers)
        .map(|i| {
            let phase = i as f64 / args.workers as f64;
            (args.seconds - phase).max(0.0).ceil() as u64
        })
        .sum();
    Ok(CoordinatorBenchReport {
        workers: args.workers,
        seconds: elapsed,
        heartbeats_due: due,
        heartbeats_sent: sent,
        heartbeat_errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        heartbeat_p50_ms: quantile(&hb, 0.5),
        heartbeat_p99_ms: quantile(&hb, 0.99),
        heartbeat_max_ms: hb.last().copied().unwrap_or(f64::NAN),
        coordinator_cpu_s: cpu,
        coordinator_cpu_us_per_heartbeat: cpu * 1e6 / (sent.max(1) as f64),
        coordinator_cores: cpu / elapsed,
        coordinator_peak_mib: peak_rss_mib(Some(pid)).unwrap_or(f64::NAN),
        job_status_calls: st.len() as u64,
        job_status_p50_ms: quantile(&st, 0.5),
        job_status_p99_ms: quantile(&st, 0.99),
    })
}

/// The `q` quantile of sorted `v` (nearest rank); NaN for none.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// User + system CPU seconds of process `pid` (/proc/PID/stat, fields 14
/// and 15, in clock ticks).
fn process_cpu_s(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; fields after it follow ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // rest starts at field 3 (state): utime is field 14, stime 15.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11) + ticks(12)) / hz.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn this_process_has_spent_cpu_time() {
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {}
        assert!(process_cpu_s(std::process::id()).unwrap() > 0.0);
        assert!(peak_rss_mib(Some(std::process::id())).unwrap() > 1.0);
    }
}
