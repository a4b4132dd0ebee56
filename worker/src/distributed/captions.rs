//! `CoordinatorCaptionFeed`: a rank's captions, streamed from the
//! coordinator (GetCaptions) ahead of the loop. Up to 64 steps come in one
//! call, and the next call starts in the background while the buffer still
//! holds `PREFETCH_BELOW` steps, so the training thread almost never waits.
//! A reply refused because the world's generation is over ends the world,
//! not the run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use swiftbrush_proto::rpc;

use super::link::{Backoff, CoordinatorLink, Reaction, RpcError};
use crate::trainer::caption_feed::{CaptionFeed, FeedError, StepBatch};

/// Steps asked for per call (the protocol's maximum).
const STEPS_PER_CALL: u32 = rpc::MAX_CAPTION_STEPS;
/// Start the next call when fewer steps than this are buffered ahead.
const PREFETCH_BELOW: u64 = 16;
/// How long to keep retrying a coordinator that does not answer before
/// the world counts as gone.
const RETRY_FOR: Duration = Duration::from_secs(30);

type Pending = tokio::task::JoinHandle<Result<Vec<rpc::StepCaptions>, RpcError>>;

pub struct CoordinatorCaptionFeed {
    link: CoordinatorLink,
    worker_id: u64,
    generation: u64,
    rank: u32,
    max_steps: u64,
    num_captions: u64,
    buffer: BTreeMap<u64, rpc::StepCaptions>,
    /// The first step not yet asked for.
    next: u64,
    /// (first step asked, the call).
    pending: Option<(u64, Pending)>,
}

impl CoordinatorCaptionFeed {
    /// A feed for `rank` of `generation`, starting at `first_step` (the
    /// world's resume step); the first call starts at once.
    pub fn new(
        link: CoordinatorLink,
        (worker_id, generation, rank): (u64, u64, u32),
        first_step: u64,
        max_steps: u64,
        num_captions: u64,
    ) -> Self {
        let mut feed = Self {
            link,
            worker_id,
            generation,
            rank,
            max_steps,
            num_captions,
            buffer: BTreeMap::new(),
            next: first_step,
            pending: None,
        };
        feed.prefetch(first_step);
        feed
    }

    /// Starts the next call if the buffer runs low and none is in flight.
    fn prefetch(&mut self, step: u64) {
        if self.pending.is_some() || self.next >= self.max_steps {
            return;
        }
        if self.next > step + PREFETCH_BELOW {
            return;
        }
        let first = self.next;
        let num_steps = (self.max_steps - first).min(u64::from(STEPS_PER_CALL)) as u32;
        let request = rpc::GetCaptionsRequest {
            worker_id: self.worker_id,
            generation: self.generation,
            rank: self.rank,
            first_step: first,
            num_steps,
        };
        let link = self.link.clone();
        let handle = self
            .link
            .runtime()
            .spawn(async move { fetch_with_retry(link, request).await });
        self.pending = Some((first, handle));
    }

    /// Waits for the call in flight and files its steps.
    fn land(&mut self, step: u64) -> Result<(), FeedError> {
        let Some((first, handle)) = self.pending.take() else {
            return Ok(());
        };
        let steps = self.link.join("GetCaptions", handle).map_err(|e| {
            let reason = e.to_string();
            match e.reaction() {
                Reaction::Fatal => FeedError::Coordinator { step, reason },
                _ => FeedError::WorldGone { step, reason },
            }
        })?;
        let Some(last) = steps.last().map(|s| s.step) else {
            return Err(FeedError::Coordinator {
                step,
                reason: format!("the coordinator sent no captions for steps from {first}"),
            });
        };
        for s in steps {
            self.buffer.insert(s.step, s);
        }
        // A reply cut to its size limit holds fewer steps: ask again from
        // the one after its last.
        self.next = last + 1;
        Ok(())
    }
}

impl CaptionFeed for CoordinatorCaptionFeed {
    fn captions(&mut self, step: u64) -> Result<StepBatch, FeedError> {
        loop {
            if let Some(s) = self.buffer.remove(&step) {
                // Steps before this one will never be asked for again.
                self.buffer = self.buffer.split_off(&step);
                self.prefetch(step);
                if s.caption_ids.len() != s.captions.len() {
                    return Err(FeedError::Coordinator {
                        step,
                        reason: format!(
                            "{} caption ids but {} captions",
                            s.caption_ids.len(),
                            s.captions.len()
                        ),
                    });
                }
                return Ok(StepBatch {
                    step,
                    caption_ids: s.caption_ids,
                    captions: s.captions,
                });
            }
            if self.pending.is_some() {
                self.land(step)?;
                continue;
            }
            if self.buffer.keys().next().is_some_and(|&k| k < step) || self.next != step {
                // Asked out of order: start over from this step.
                self.buffer.clear();
                self.next = step;
            }
            if step >= self.max_steps {
                return Err(FeedError::Coordinator {
                    step,
                    reason: format!("past train.max_steps {}", self.max_steps),
                });
            }
            self.prefetch(step);
        }
    }

    fn num_captions(&self) -> u64 {
        self.num_captions
    }
}

/// One GetCaptions call, retried while the coordinator is busy or
/// unreachable (for up to `RETRY_FOR`).
async fn fetch_with_retry(
    link: CoordinatorLink,
    request: rpc::GetCaptionsRequest,
) -> Result<Vec<rpc::StepCaptions>, RpcError> {
    let deadline = Instant::now() + RETRY_FOR;
    let mut backoff = Backoff::new();
    loop {
        let req = request;
        let result = link
            .call_async(
                "GetCaptions",
                super::link::CALL_TIMEOUT,
                |mut c| async move { c.get_captions(req).await },
            )
            .await;
        match result {
            Ok(reply) => return Ok(reply.steps),
            Err(e) if e.reaction() == Reaction::Retry && Instant::now() < deadline => {
                tracing::debug!(error = %e, "caption fetch failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(e),
        }
    }
}
