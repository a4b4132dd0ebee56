//! Caption strings for GetCaptions: the core says which caption ids a rank
//! takes at each step; this looks up the strings and cuts the reply to a
//! byte budget (the client asks again from the next step).

use serde::Serialize;

use super::Coordinator;
use super::error::AppError;
use crate::domain::{CaptionRequest, CoreError};

/// The caption reply stays under this (well below the transport's limit).
pub const MAX_CAPTION_REPLY_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepCaptions {
    pub step: u64,
    pub epoch: u64,
    pub caption_ids: Vec<u64>,
    pub captions: Vec<String>,
}

impl Coordinator {
    /// At least one step, more while they fit the byte budget.
    pub fn captions(&self, req: CaptionRequest) -> Result<Vec<StepCaptions>, AppError> {
        let job = self.read_job().ok_or(CoreError::NoJob)?;
        let slices = self.transition(|s, now| s.captions(req, now))?;
        let mut out = Vec::with_capacity(slices.len());
        let mut bytes = 0usize;
        for slice in slices {
            let captions = slice
                .caption_ids
                .iter()
                .map(|&id| {
                    job.corpus.get(id).map(str::to_owned).ok_or_else(|| {
                        AppError::Internal(format!("caption id {id} is outside the corpus"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            // Strings plus a few bytes of framing per caption.
            let size: usize = captions.iter().map(|c| c.len() + 16).sum();
            if !out.is_empty() && bytes + size > MAX_CAPTION_REPLY_BYTES {
                break;
            }
            bytes += size;
            out.push(StepCaptions {
                step: slice.step,
                epoch: slice.epoch,
                caption_ids: slice.caption_ids,
                captions,
            });
        }
        Ok(out)
    }
}
