//! Submitting a job: parse and validate the config, point its run directory
//! at the coordinator's store, read the captions, find the newest committed
//! checkpoint (the job resumes there, with generations numbered past it),
//! then hand the core a `JobSpec`.

use bytes::Bytes;
use serde::Serialize;
use swiftbrush_proto::JobConfig;

use super::corpus::{CaptionCorpus, CaptionFields};
use super::error::AppError;
use super::{Coordinator, JobData};
use crate::domain::{CoreError, JobSpec};

/// What a worker learns about the job when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobInfo {
    pub name: String,
    /// The resolved config, with checkpoint.run_dir set to the
    /// coordinator's run directory.
    pub config_yaml: String,
    pub config_fingerprint: String,
    pub run_dir: String,
    /// Captions in the job's sources.
    pub num_captions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Submitted {
    pub name: String,
    pub config_fingerprint: String,
    pub num_captions: u64,
    pub resume_step: u64,
    pub generation: u64,
}

impl Coordinator {
    pub async fn submit_yaml(&self, yaml: &str) -> Result<Submitted, AppError> {
        let config = JobConfig::from_yaml_str(yaml, "the submitted config")?;
        self.submit_config(config).await
    }

    pub async fn submit_config(&self, mut config: JobConfig) -> Result<Submitted, AppError> {
        config.validate()?;
        // A coordinator that lost its run directory starts nothing there.
        if let Some(lost) = self.lease_lost_error() {
            return Err(lost.into());
        }
        // Refuse early, before reading captions, if a job is running.
        self.inspect(|s| match s.job() {
            Some(job) if !job.phase.is_terminal() => Err(CoreError::JobExists {
                name: job.spec.name.clone(),
                phase: job.phase,
            }),
            _ => Ok(()),
        })?;
        let store = self.store().clone();
        config.checkpoint.run_dir = store.name().to_owned();
        let fields = CaptionFields {
            jsonl_field: config.data.jsonl_field.clone(),
            text_column: config.data.text_column.clone(),
        };
        let corpus = CaptionCorpus::load(&config.data.captions, &fields).await?;
        if corpus.skipped.any() {
            tracing::warn!(
                "caption lines skipped or cut: {}",
                corpus.skipped.describe()
            );
        }
        // The newest checkpoint that verifies: a corrupt newer one is set
        // aside (run_store's latest_verified) instead of failing every
        // world that restores it.
        let newest = store.latest_verified().await?;
        let (committed_step, last_generation) = newest
            .as_ref()
            .map_or((0, 0), |m| (m.step, m.meta.generation));
        // LATEST may name a newer generation than the newest valid
        // checkpoint; the store refuses commits from below it.
        let pointer_generation = store.latest_pointer().await?.map_or(0, |p| p.generation);
        let last_generation = last_generation.max(pointer_generation);
        let mut spec =
            JobSpec::from_config(&config, corpus.len(), committed_step, last_generation)?;
        // Workers must bring the teacher the run was trained from.
        spec.teacher_fingerprint = newest
            .map(|m| m.meta.teacher_fingerprint)
            .filter(|f| !f.is_empty());
        let info = JobInfo {
            name: config.name.clone(),
            config_yaml: config.to_yaml(),
            config_fingerprint: spec.config_fingerprint.clone(),
            run_dir: store.name().to_owned(),
            num_captions: corpus.len(),
        };
        let num_captions = corpus.len();
        let generation = {
            // Held across the transition so that a racing submit cannot
            // replace the data of the job that won.
            let mut job = self
                .inner
                .job
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let generation = self.transition(|s, now| s.submit(spec, now))?;
            *job = Some(JobData {
                info: info.clone(),
                corpus,
            });
            generation
        };
        if let Err(e) = store
            .put_run_file("config.yaml", Bytes::from(info.config_yaml.clone()))
            .await
        {
            tracing::warn!(error = %e, "could not write config.yaml to the run directory");
        }
        tracing::info!(job = %info.name, generation, committed_step, num_captions, "job submitted");
        Ok(Submitted {
            name: info.name,
            config_fingerprint: info.config_fingerprint,
            num_captions,
            resume_step: committed_step,
            generation,
        })
    }
}
