//! Text conditions: the frozen CLIP text encoder's last hidden state for a
//! batch of captions, and the empty prompt's (the null condition, computed
//! once: it is not zeros).

use tch::{Device, Kind, Tensor};

use crate::models::tokenizer::{ClipTokenizer, TokenizerError};
use crate::pipeline::DiffusersFolder;
use crate::pipeline::components::{ComponentError, TextEncoder};

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error(transparent)]
    Folder(#[from] crate::pipeline::FolderError),
    #[error(transparent)]
    Component(#[from] ComponentError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("the text encoder failed: {0}")]
    Torch(#[from] tch::TchError),
}

pub struct TextConditioner {
    tokenizer: ClipTokenizer,
    encoder: TextEncoder,
    uncond: Tensor,
    device: Device,
}

/// One batch's conditions and how many captions were cut at 77 tokens.
pub struct EncodedCaptions {
    pub cond: Tensor,
    pub num_truncated: usize,
}

impl TextConditioner {
    pub fn load(folder: &DiffusersFolder, device: Device) -> Result<Self, TextError> {
        let tokenizer = ClipTokenizer::from_dir(&folder.component("tokenizer")?.dir)?;
        let encoder = TextEncoder::load(&folder.component("text_encoder")?, device, Kind::Float)?;
        let mut me = Self {
            tokenizer,
            encoder,
            uncond: Tensor::new(),
            device,
        };
        me.uncond = me.encode(&[""])?.cond;
        Ok(me)
    }

    /// [B,77,D] for the captions, without gradients.
    pub fn encode<S: AsRef<str>>(&self, captions: &[S]) -> Result<EncodedCaptions, TextError> {
        let batch = self.tokenizer.encode_batch(captions, self.device)?;
        let cond = tch::no_grad(|| self.encoder.model.f_forward(&batch.input_ids))?;
        Ok(EncodedCaptions {
            cond,
            num_truncated: batch.num_truncated(),
        })
    }

    /// The empty prompt's encoding [1,77,D].
    pub fn uncond(&self) -> &Tensor {
        &self.uncond
    }
}
