//! `swiftbrush cancel`: ends the coordinator's job. By default rank 0 first
//! writes a final checkpoint one step past the newest reported step, so
//! nothing trained is lost; `--now` ends it at once.

use std::time::Duration;

use anyhow::bail;
use swiftbrush_proto::rpc::{self, CancelJobRequest, JobPhase, JobStatusReply};
use tonic::Code;

use super::remote::{self, RemoteArgs};

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// Why; the workers log it and `swiftbrush status` shows it.
    #[arg(long, default_value = "cancelled by the operator")]
    reason: String,
    /// End at once: no final checkpoint (steps since the newest checkpoint
    /// are lost). For a job whose workers are hung.
    #[arg(long)]
    now: bool,
    /// Wait until the job has ended (after the final checkpoint commits).
    #[arg(long)]
    wait: bool,
    /// With --wait: ask for the job's status this often.
    #[arg(long, default_value_t = 500, requires = "wait")]
    poll_ms: u64,
}

pub fn run(args: CancelArgs) -> anyhow::Result<()> {
    remote::runtime()?.block_on(async {
        let mut client = args.remote.connect().await?;
        let before = status(&args, &mut client).await?;
        let reply = client
            .cancel_job(CancelJobRequest {
                reason: args.reason.clone(),
                final_checkpoint: !args.now,
            })
            .await
            .map_err(|s| match s.code() {
                Code::FailedPrecondition => anyhow::anyhow!(
                    "nothing to cancel at {}: {}",
                    args.remote.address(),
                    s.message()
                ),
                _ => args.remote.refused("CancelJob", &s),
            })?
            .into_inner();
        match reply.final_checkpoint_step {
            0 => println!(
                "cancelled job {} at once; its newest checkpoint is at step {}; \
                 workers stop at their next heartbeat",
                before.name, before.committed_step
            ),
            // The step is one past the newest the heartbeats reported; the
            // workers are often past it when the order reaches them, and
            // rank 0 then writes it at its next step boundary. Said so, and
            // with --wait the step it was written at.
            step => println!(
                "cancelling job {}: rank 0 writes a final checkpoint at its first step \
                 boundary from step {step} on (the workers may already be past it), then \
                 the job ends and the workers stop; {}",
                before.name,
                if args.wait {
                    "waiting for it"
                } else {
                    "`status` (or `cancel --wait`) names the step it was written at"
                }
            ),
        }
        if !args.wait {
            return Ok(());
        }
        loop {
            let now = status(&args, &mut client).await?;
            match JobPhase::try_from(now.phase) {
                Ok(JobPhase::Cancelled | JobPhase::Completed) => {
                    println!(
                        "job {} {}: {}; newest checkpoint at step {}",
                        now.name,
                        remote::job_phase_name(now.phase),
                        now.reason,
                        now.committed_step
                    );
                    return Ok(());
                }
                Ok(JobPhase::Failed) => bail!("job {} failed: {}", now.name, now.reason),
                _ => tokio::time::sleep(Duration::from_millis(args.poll_ms.max(10))).await,
            }
        }
    })
}

async fn status(
    args: &CancelArgs,
    client: &mut rpc::CoordinatorConnection,
) -> anyhow::Result<JobStatusReply> {
    Ok(client
        .job_status(rpc::JobStatusRequest {})
        .await
        .map_err(|s| args.remote.refused("JobStatus", &s))?
        .into_inner())
}
