//! `swiftbrush launch`: submits a job config to a running coordinator; the
//! workers that are (or will be) connected to it then form a world and
//! train. With --wait it follows the job to its end.

use std::path::PathBuf;
use std::time::Duration;

use swiftbrush_proto::rpc::{self, JobPhase, SubmitJobRequest};
use tonic::Code;

use super::remote::{self, RemoteArgs};

#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// The job config (YAML). Caption files are read by the coordinator and
    /// the teacher by the workers: paths are as those machines see them.
    #[arg(long)]
    config: PathBuf,
    /// The teacher's diffusers folder on the workers (overrides model.teacher).
    #[arg(long)]
    teacher: Option<String>,
    /// Follow the job until it ends; exit 0 only if it completes.
    #[arg(long)]
    wait: bool,
    /// With --wait: ask for the job's status this often.
    #[arg(long, default_value_t = 1_000, requires = "wait")]
    poll_ms: u64,
}

pub fn run(args: LaunchArgs) -> anyhow::Result<()> {
    // Checked here first, so a bad key is named with this file's path.
    let config = super::load_config(&args.config, args.teacher.clone())?;
    let address = args.remote.address();
    remote::runtime()?.block_on(async {
        let mut client = args.remote.connect().await?;
        let submitted = client
            .submit_job(SubmitJobRequest {
                config_yaml: config.to_yaml(),
            })
            .await
            .map_err(|status| submit_refused(&args, &status))?
            .into_inner();
        let max_steps = config.train.max_steps;
        let resume = match submitted.resume_step {
            0 => "starts from scratch".to_owned(),
            step if step >= max_steps => format!(
                "already complete: its run directory holds the checkpoint at step {step} and \
                 train.max_steps is {max_steps} (raise train.max_steps to train further)"
            ),
            step => format!("resumes from the checkpoint at step {step}"),
        };
        println!(
            "submitted job {} to {address}: {} captions, {resume}, generation {}, config {}",
            submitted.name,
            submitted.num_captions,
            submitted.generation,
            short_fingerprint(&submitted.config_fingerprint),
        );
        let token = args.remote.token_flag();
        println!(
            "workers join with: swiftbrush worker --coordinator {address}{token}; \
             watch with: swiftbrush status --coordinator {address}{token}"
        );
        if args.wait {
            wait_for_end(&args, &mut client).await
        } else {
            Ok(())
        }
    })
}

fn submit_refused(args: &LaunchArgs, status: &tonic::Status) -> anyhow::Error {
    let path = args.config.display();
    match status.code() {
        Code::AlreadyExists => anyhow::anyhow!(
            "the coordinator already runs a job ({}); `swiftbrush cancel` ends it",
            status.message()
        ),
        Code::InvalidArgument => {
            anyhow::anyhow!("the coordinator refused {path}: {}", status.message())
        }
        Code::FailedPrecondition => anyhow::anyhow!(
            "the coordinator cannot start {path}: {} (caption paths are read on the \
             coordinator's machine: use absolute paths or object-store URLs)",
            status.message()
        ),
        _ => args.remote.refused("SubmitJob", status),
    }
}

/// Prints each newly committed step and the end; Ok only on completion.
async fn wait_for_end(
    args: &LaunchArgs,
    client: &mut rpc::CoordinatorConnection,
) -> anyhow::Result<()> {
    let mut last_printed = None;
    loop {
        let status = client
            .job_status(rpc::JobStatusRequest {})
            .await
            .map_err(|s| args.remote.refused("JobStatus", &s))?
            .into_inner();
        let phase = remote::job_phase_name(status.phase);
        let line = (status.phase, status.committed_step, status.world_size);
        if last_printed != Some(line) {
            println!(
                "{phase}: committed step {}/{}, world of {}",
                status.committed_step, status.max_steps, status.world_size
            );
            last_printed = Some(line);
        }
        match JobPhase::try_from(status.phase) {
            Ok(JobPhase::Completed) => {
                println!("job {} completed: {}", status.name, status.reason);
                return Ok(());
            }
            Ok(JobPhase::Failed | JobPhase::Cancelled) => {
                anyhow::bail!("job {} {phase}: {}", status.name, status.reason)
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(args.poll_ms.max(10))).await;
    }
}

fn short_fingerprint(fingerprint: &str) -> &str {
    fingerprint.get(..12).unwrap_or(fingerprint)
}
