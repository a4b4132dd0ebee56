//! Text conditions: the frozen CLIP text encoder's last hidden state for a
//! batch of captions, and the empty prompt's (the null condition, computed
//! once: it is not zeros).

use tch::{Device, Tensor, nn};

use crate::models::ModelError;
use crate::models::clip::{CLIPTextModel, load_text_encoder};
use crate::models::tokenizer::{ClipTokenizer, TokenizerError};
use crate::pipeline::DiffusersFolder;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error(transparent)]
    Folder(#[from] crate::pipeline::FolderError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

pub struct TextConditioner {
    tokenizer: ClipTokenizer,
    _vs: nn::VarStore,
    encoder: CLIPTextModel,
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
        let (vs, encoder, _) = load_text_encoder(&folder.component("text_encoder")?.dir, device)?;
        let mut me = Self {
            tokenizer,
            _vs: vs,
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
        let cond = tch::no_grad(|| self.encoder.forward(&batch.input_ids));
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
