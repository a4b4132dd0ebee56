//! Text conditions: the frozen CLIP text encoder's last hidden state for a
//! batch of captions, and the empty prompt's (the null condition, computed
//! once: it is not zeros). An SDXL teacher's are its two encoders'
//! (`pipeline/xl_text.rs`), packed with the pooled embedding and the time
//! ids of the training resolution (`pipeline/xl_condition.rs`); its null
//! condition is zeros with the same time ids where the folder says so.

use tch::{Device, Kind, Tensor};

use crate::models::tokenizer::{ClipTokenizer, TokenizerError};
use crate::pipeline::components::{ComponentError, TextEncoder};
use crate::pipeline::xl_text::XlTextEncoders;
use crate::pipeline::{DiffusersFolder, PipelineError, is_sdxl_folder, xl_condition};

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
    /// SDXL's text encoders.
    #[error(transparent)]
    Xl(Box<PipelineError>),
}

impl From<PipelineError> for TextError {
    fn from(e: PipelineError) -> Self {
        Self::Xl(Box::new(e))
    }
}

/// SDXL's encoders and the time ids of the training resolution [1, 6].
struct XlText {
    encoders: XlTextEncoders,
    time_ids: Tensor,
}

impl XlText {
    /// The packed condition, in float32 whatever the encoders' dtype
    /// (`precision.text_encoder_dtype`; a cast to the dtype a tensor has
    /// already is libtorch's no-op, so fp32 encoders give today's tensors).
    fn pack(&self, c: &crate::pipeline::XlCondition) -> Result<Tensor, TextError> {
        let b = c.hidden.size()[0];
        Ok(xl_condition::pack(
            &c.hidden.f_to_kind(Kind::Float)?,
            &c.pooled.f_to_kind(Kind::Float)?,
            &self
                .time_ids
                .f_expand([b, 6], false)?
                .f_to_kind(Kind::Float)?,
        )?)
    }
}

/// The teacher family's encoders. One per trainer: the variants' sizes
/// do not matter.
#[allow(clippy::large_enum_variant)]
enum Encoders {
    Sd {
        tokenizer: ClipTokenizer,
        encoder: TextEncoder,
    },
    Xl(XlText),
}

pub struct TextConditioner {
    encoders: Encoders,
    uncond: Tensor,
    device: Device,
}

/// One batch's conditions and how many captions were cut at 77 tokens.
pub struct EncodedCaptions {
    pub cond: Tensor,
    pub num_truncated: usize,
}

impl TextConditioner {
    /// The folder's encoders in `kind` (`precision.text_encoder_dtype`;
    /// their conditions come out in float32 whatever it is). `image_size`
    /// (pixels, square) sets an SDXL teacher's time ids; SD 1/2 ignore it.
    pub fn load(
        folder: &DiffusersFolder,
        device: Device,
        image_size: i64,
        kind: Kind,
    ) -> Result<Self, TextError> {
        let encoders = if is_sdxl_folder(folder) {
            let encoders = XlTextEncoders::load(folder, device, kind)?;
            let time_ids = encoders.add_time_ids(1, image_size, image_size)?;
            Encoders::Xl(XlText { encoders, time_ids })
        } else {
            let tokenizer = ClipTokenizer::from_dir(&folder.component("tokenizer")?.dir)?;
            let encoder = TextEncoder::load(&folder.component("text_encoder")?, device, kind)?;
            Encoders::Sd { tokenizer, encoder }
        };
        let mut me = Self {
            encoders,
            uncond: Tensor::new(),
            device,
        };
        me.uncond = match &me.encoders {
            Encoders::Xl(xl) => {
                let (one, _) = xl.encoders.encode(&[""])?;
                xl.pack(&xl.encoders.null_condition(&one)?)?
            }
            Encoders::Sd { .. } => me.encode(&[""])?.cond,
        };
        Ok(me)
    }

    /// [B,77,D] for the captions, without gradients.
    pub fn encode<S: AsRef<str>>(&self, captions: &[S]) -> Result<EncodedCaptions, TextError> {
        let (tokenizer, encoder) = match &self.encoders {
            Encoders::Xl(xl) => {
                let (c, num_truncated) = xl.encoders.encode(captions)?;
                return Ok(EncodedCaptions {
                    cond: xl.pack(&c)?,
                    num_truncated,
                });
            }
            Encoders::Sd { tokenizer, encoder } => (tokenizer, encoder),
        };
        let batch = tokenizer.encode_batch(captions, self.device)?;
        // In float32 whatever the encoder's dtype (see `XlText::pack`).
        let cond = tch::no_grad(|| {
            encoder
                .model
                .f_forward(&batch.input_ids)?
                .f_to_kind(Kind::Float)
        })?;
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
