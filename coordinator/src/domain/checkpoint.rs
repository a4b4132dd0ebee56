//! Checkpoint commits, in two halves around the storage write: `begin_commit`
//! checks that rank 0 of the current generation reports a step newer than
//! the last commit and hands out the manifest's metadata; `finish_commit`
//! records how the write ended. Only one commit is in flight at a time, and
//! no world forms during one, so a new world's resume step is always the
//! newest committed checkpoint.

use serde_json::json;
use swiftbrush_proto::run_store::CheckpointMeta;

use super::effect::Effect;
use super::error::CoreError;
use super::job::PendingCommit;
use super::replies::{CommitResult, CommitTicket};
use super::state::CoordinatorState;
use super::types::{JobPhase, Millis, WorkerId};

/// Rank 0's ReportCheckpoint call, validated by the service.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointReport {
    pub worker: WorkerId,
    pub generation: u64,
    pub step: u64,
    pub teacher_fingerprint: String,
    pub upload_seconds: f64,
}

impl CoordinatorState {
    pub fn begin_commit(
        &mut self,
        report: CheckpointReport,
        now: Millis,
    ) -> Result<CommitTicket, CoreError> {
        let rank = self.member_rank(report.worker, report.generation)?;
        if rank != 0 {
            return Err(CoreError::NotRankZero {
                worker: report.worker,
                rank,
            });
        }
        let job = self.active_job()?;
        if let Some(pending) = job.commit_in_flight {
            return Err(CoreError::CommitInFlight { step: pending.step });
        }
        if report.step <= job.committed_step {
            return Err(CoreError::AlreadyCommitted {
                step: report.step,
                committed: job.committed_step,
            });
        }
        let resume_step = job.world.as_ref().map_or(0, |w| w.resume_step);
        if report.step > job.spec.max_steps {
            return Err(CoreError::StepOutOfRange {
                step: report.step,
                first: resume_step + 1,
                end: job.spec.max_steps + 1,
                why: "a checkpoint lies between the world's resume step and train.max_steps",
            });
        }
        let world_size = job.world.as_ref().map_or(0, |w| w.size());
        let meta = CheckpointMeta {
            epoch: job.plan.position(report.step).epoch,
            generation: report.generation,
            config_fingerprint: job.spec.config_fingerprint.clone(),
            teacher_fingerprint: report.teacher_fingerprint,
            extra: json!({
                "world_size": world_size,
                "global_batch": job.spec.global_batch,
                "samples": report.step.saturating_mul(job.spec.global_batch),
            }),
        };
        let ticket = CommitTicket {
            step: report.step,
            generation: report.generation,
            meta,
            upload_seconds: report.upload_seconds,
        };
        if let Some(job) = self.job.as_mut() {
            job.commit_in_flight = Some(PendingCommit {
                step: report.step,
                generation: report.generation,
            });
        }
        self.live_worker_mut(report.worker)?.touch(now);
        Ok(ticket)
    }

    /// Records how the storage write of `ticket` ended. A committed step
    /// counts even if its world broke meanwhile: the checkpoint exists.
    pub fn finish_commit(&mut self, ticket: &CommitTicket, result: CommitResult, now: Millis) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        if job.commit_in_flight.is_some_and(|c| c.step == ticket.step) {
            job.commit_in_flight = None;
        }
        if result == CommitResult::Committed {
            job.committed_step = job.committed_step.max(ticket.step);
            job.checkpoints_committed += 1;
            job.last_upload_seconds = ticket.upload_seconds;
            job.upload_seconds_total += ticket.upload_seconds;
            let keep_last = job.spec.keep_last;
            let (committed, max_steps) = (job.committed_step, job.spec.max_steps);
            let grow = !job.phase.is_terminal()
                && job.resize_at.is_some_and(|s| committed >= s)
                && job
                    .world
                    .as_ref()
                    .is_some_and(|w| w.generation == ticket.generation);
            let terminal = job.phase.is_terminal();
            let stopped = job
                .stop_at
                .as_ref()
                .filter(|stop| committed >= stop.step)
                .map(|stop| stop.reason.clone());
            self.effects.push(Effect::CheckpointCommitted {
                step: ticket.step,
                generation: ticket.generation,
            });
            self.effects.push(Effect::ApplyRetention { keep_last });
            if !terminal && committed >= max_steps {
                self.end_job(
                    JobPhase::Completed,
                    format!("the checkpoint of step {committed} (train.max_steps) is committed"),
                );
            } else if let Some(reason) = stopped.filter(|_| !terminal) {
                self.end_job(
                    JobPhase::Cancelled,
                    format!("{reason} (after the final checkpoint at step {committed})"),
                );
            } else if grow {
                self.break_world(
                    format!("growing the world at the committed step {committed}"),
                    false,
                    now,
                );
            }
        }
        self.try_form(now);
    }
}
