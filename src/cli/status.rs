//! `swiftbrush status`: the coordinator's JobStatus as a readable table
//! (job, world, progress, each worker, quarantined hosts) or as JSON.

use std::fmt::Write as _;

use serde_json::{Value, json};
use swiftbrush_proto::rpc::{self, JobStatusReply, WorkerStatus};

use super::remote::{self, RemoteArgs};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// Print the status as one JSON object instead of a table.
    #[arg(long, conflicts_with = "phase")]
    json: bool,
    /// Print only the job's phase (pending, forming, running, reforming,
    /// completed, failed, cancelled): for scripts.
    #[arg(long)]
    phase: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let status = remote::runtime()?.block_on(async {
        let mut client = args.remote.connect().await?;
        client
            .job_status(rpc::JobStatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| args.remote.refused("JobStatus", &s))
    })?;
    if args.phase {
        println!("{}", remote::job_phase_name(status.phase));
    } else if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&status))?);
    } else {
        print!("{}", table(&status, &args.remote.address()));
    }
    Ok(())
}

fn health_name(health: i32) -> String {
    rpc::Health::try_from(health).map_or_else(
        |_| format!("unknown({health})"),
        |h| remote::short_name(h.as_str_name(), "HEALTH_"),
    )
}

fn worker_phase_name(phase: i32) -> String {
    rpc::Phase::try_from(phase).map_or_else(
        |_| format!("unknown({phase})"),
        |p| remote::short_name(p.as_str_name(), "PHASE_"),
    )
}

/// A worker as the coordinator names it in reasons and logs (`w` and the
/// id in hex), so the table and the reasons agree.
fn worker_name(id: u64) -> String {
    format!("w{id:x}")
}

/// The phase as shown: a worker that is gone shows the last one it
/// reported, marked as such.
fn phase_text(w: &WorkerStatus) -> String {
    let phase = worker_phase_name(w.phase);
    let gone = [rpc::Health::Dead as i32, rpc::Health::Left as i32].contains(&w.health);
    if gone {
        format!("{phase} (last)")
    } else {
        phase
    }
}

/// The rank as shown: `-` outside the current world.
fn rank_text(rank: i32) -> String {
    if rank < 0 {
        "-".to_owned()
    } else {
        rank.to_string()
    }
}

fn to_json(s: &JobStatusReply) -> Value {
    let workers: Vec<Value> = s
        .workers
        .iter()
        .map(|w| {
            let metrics = w.metrics.unwrap_or_default();
            json!({
                "worker_id": w.worker_id,
                "worker": worker_name(w.worker_id),
                "host": w.host,
                "device": w.device,
                "health": health_name(w.health),
                "rank": (w.rank >= 0).then_some(w.rank),
                "generation": w.generation,
                "step": w.step,
                "heartbeat_age_ms": w.heartbeat_age_ms,
                "phase": worker_phase_name(w.phase),
                "metrics": {
                    "loss_vsd": metrics.loss_vsd,
                    "loss_fake_score": metrics.loss_fake_score,
                    // The old name, kept for one release.
                    "loss_lora": metrics.loss_fake_score,
                    "step_time_ms": metrics.step_time_ms,
                    "allreduce_ms": metrics.allreduce_ms,
                    "samples_per_s": metrics.samples_per_s,
                    "checkpoint_stall_ms": metrics.checkpoint_stall_ms,
                },
                "death_reason": (!w.death_reason.is_empty()).then_some(&w.death_reason),
            })
        })
        .collect();
    json!({
        "name": s.name,
        "phase": remote::job_phase_name(s.phase),
        "reason": s.reason,
        "generation": s.generation,
        "world_size": s.world_size,
        "committed_step": s.committed_step,
        "max_steps": s.max_steps,
        "samples_committed": s.samples_committed,
        "restarts": s.restarts,
        "max_restarts": s.max_restarts,
        "step_rate": s.step_rate,
        "stopping_at_step": (s.stopping_at_step > 0).then_some(s.stopping_at_step),
        "workers": workers,
        "quarantined_hosts": s.quarantined_hosts,
    })
}

fn table(s: &JobStatusReply, address: &str) -> String {
    let mut out = String::new();
    let name = if s.name.is_empty() {
        "(none submitted)"
    } else {
        &s.name
    };
    let percent = if s.max_steps > 0 {
        100.0 * s.committed_step as f64 / s.max_steps as f64
    } else {
        0.0
    };
    let _ = writeln!(out, "coordinator  {address}");
    let _ = writeln!(out, "job          {name}");
    let reason = if s.reason.is_empty() {
        "no job submitted"
    } else {
        &s.reason
    };
    let _ = writeln!(
        out,
        "phase        {} ({reason})",
        remote::job_phase_name(s.phase)
    );
    if s.stopping_at_step > 0 {
        let _ = writeln!(
            out,
            "stopping     after the final checkpoint at step {}",
            s.stopping_at_step
        );
    }
    let _ = writeln!(
        out,
        "generation   {}   world size {}   restarts {}/{}",
        s.generation, s.world_size, s.restarts, s.max_restarts
    );
    let _ = writeln!(
        out,
        "committed    step {}/{} ({percent:.1}%), {} samples",
        s.committed_step, s.max_steps, s.samples_committed
    );
    let _ = writeln!(out, "step rate    {:.3} steps/s", s.step_rate);
    let _ = writeln!(out);
    if s.workers.is_empty() {
        let _ = writeln!(out, "workers      none");
    } else {
        let rows: Vec<Vec<String>> = std::iter::once(header())
            .chain(s.workers.iter().map(worker_row))
            .collect();
        out.push_str(&align(&rows));
    }
    let quarantined = if s.quarantined_hosts.is_empty() {
        "none".to_owned()
    } else {
        s.quarantined_hosts.join(", ")
    };
    let _ = writeln!(out, "\nquarantined  {quarantined}");
    out
}

fn header() -> Vec<String> {
    [
        "WORKER",
        "HOST",
        "DEVICE",
        "HEALTH",
        "RANK",
        "GEN",
        "STEP",
        "PHASE",
        "HEARTBEAT",
        "LOSS_VSD",
        "LOSS_FAKE_SCORE",
        "STEP_MS",
        "ALLREDUCE_MS",
        "SAMPLES/S",
        "CKPT_STALL_MS",
        "NOTE",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn worker_row(w: &WorkerStatus) -> Vec<String> {
    let m = w.metrics.unwrap_or_default();
    vec![
        worker_name(w.worker_id),
        w.host.clone(),
        w.device.clone(),
        health_name(w.health),
        rank_text(w.rank),
        w.generation.to_string(),
        w.step.to_string(),
        phase_text(w),
        format!("{:.1}s ago", w.heartbeat_age_ms as f64 / 1000.0),
        format!("{:.4}", m.loss_vsd),
        format!("{:.4}", m.loss_fake_score),
        format!("{:.1}", m.step_time_ms),
        format!("{:.1}", m.allreduce_ms),
        format!("{:.2}", m.samples_per_s),
        format!("{:.1}", m.checkpoint_stall_ms),
        w.death_reason.clone(),
    ]
}

/// Left-aligned columns two spaces apart, trailing blanks trimmed.
fn align(rows: &[Vec<String>]) -> String {
    let num_columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..num_columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JobStatusReply {
        JobStatusReply {
            phase: rpc::JobPhase::Running as i32,
            name: "sd21".into(),
            reason: "world formed".into(),
            generation: 3,
            world_size: 2,
            committed_step: 50,
            max_steps: 200,
            samples_committed: 800,
            restarts: 1,
            max_restarts: 5,
            step_rate: 1.25,
            stopping_at_step: 0,
            quarantined_hosts: vec!["bad-node".into()],
            workers: vec![
                WorkerStatus {
                    worker_id: 7,
                    host: "node-a".into(),
                    device: "cuda:0".into(),
                    health: rpc::Health::Alive as i32,
                    rank: 0,
                    generation: 3,
                    step: 61,
                    heartbeat_age_ms: 400,
                    phase: rpc::Phase::Training as i32,
                    metrics: Some(rpc::StepMetrics {
                        loss_vsd: 0.5,
                        step_time_ms: 812.0,
                        ..Default::default()
                    }),
                    death_reason: String::new(),
                },
                WorkerStatus {
                    worker_id: 8,
                    host: "node-b".into(),
                    device: "cuda:0".into(),
                    health: rpc::Health::Dead as i32,
                    rank: -1,
                    death_reason: "left: preempted".into(),
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn the_table_shows_job_world_workers_and_quarantine() {
        let text = table(&sample(), "http://c:50051");
        assert!(
            text.contains("phase        running (world formed)"),
            "{text}"
        );
        assert!(text.contains("step 50/200 (25.0%), 800 samples"), "{text}");
        assert!(text.contains("restarts 1/5"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("WORKER")).unwrap();
        let a: Vec<&str> = lines[header + 1].split_whitespace().collect();
        assert_eq!(
            &a[..8],
            [
                "w7", "node-a", "cuda:0", "alive", "0", "3", "61", "training"
            ]
        );
        assert!(lines[header + 1].contains("0.4s ago"));
        let b = lines[header + 2];
        assert!(
            b.contains("dead") && b.contains(" - ") && b.ends_with("left: preempted"),
            "{b}"
        );
        // A gone worker's phase is its last one, said so.
        assert!(b.contains("unspecified (last)"), "{b}");
        assert!(text.contains("quarantined  bad-node"), "{text}");
        // The columns line up: every row's HOST column starts where the header's does.
        let host_at = lines[header].find("HOST").unwrap();
        assert_eq!(lines[header + 1].find("node-a"), Some(host_at));
    }

    #[test]
    fn json_names_phases_and_leaves_out_missing_ranks() {
        let value = to_json(&sample());
        assert_eq!(value["phase"], "running");
        assert_eq!(value["workers"][0]["rank"], 0);
        assert_eq!(value["workers"][0]["phase"], "training");
        assert_eq!(value["workers"][0]["metrics"]["step_time_ms"], 812.0);
        assert!(value["workers"][1]["rank"].is_null());
        assert_eq!(value["workers"][1]["death_reason"], "left: preempted");
        assert_eq!(value["quarantined_hosts"][0], "bad-node");
    }
}
