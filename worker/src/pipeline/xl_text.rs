//! SDXL's text side (shared/SPEC.md, "SDXL (diffusers layout)"), as
//! StableDiffusionXLPipeline.encode_prompt computes it: `tokenizer` with
//! `text_encoder` (CLIPTextModel) and `tokenizer_2` with `text_encoder_2`
//! (CLIPTextModelWithProjection), both penultimate hidden states
//! concatenated on the feature axis, the second encoder's projected pooled
//! output, and the null condition as zeros where model_index.json sets
//! `force_zeros_for_empty_prompt` (else the encoding of ""). The sampler
//! (`stable_diffusion_xl.rs`) and the trainer's text conditions share it.

use tch::{Device, Kind, Tensor};

use super::components::{TextEncoder, TextEncoderWithProjection};
use super::folder::DiffusersFolder;
use super::stable_diffusion::{PipelineError, load_err};
use crate::models::tokenizer::ClipTokenizer;

/// SDXL's condition for a batch: the text hidden states [B, 77, D1 + D2]
/// and the pooled embedding [B, P].
#[derive(Debug)]
pub struct XlCondition {
    pub hidden: Tensor,
    pub pooled: Tensor,
}

impl XlCondition {
    pub fn cat(a: &Self, b: &Self) -> Result<Self, tch::TchError> {
        Ok(Self {
            hidden: Tensor::f_cat(&[&a.hidden, &b.hidden], 0)?,
            pooled: Tensor::f_cat(&[&a.pooled, &b.pooled], 0)?,
        })
    }
}

/// Both tokenizers and text encoders of an SDXL folder, frozen.
pub struct XlTextEncoders {
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder: TextEncoder,
    pub text_encoder_2: TextEncoderWithProjection,
    /// model_index.json's `force_zeros_for_empty_prompt` (diffusers'
    /// default, true, where absent).
    pub force_zeros_for_empty_prompt: bool,
    device: Device,
    kind: Kind,
}

impl XlTextEncoders {
    /// Both encoders in `kind` on `device`.
    pub fn load(
        folder: &DiffusersFolder,
        device: Device,
        kind: Kind,
    ) -> Result<Self, PipelineError> {
        let tokenizer = ClipTokenizer::from_dir(&folder.component("tokenizer")?.dir)
            .map_err(load_err("tokenizer"))?;
        let tokenizer_2 = ClipTokenizer::from_dir(&folder.component("tokenizer_2")?.dir)
            .map_err(load_err("tokenizer_2"))?;
        let text_encoder = TextEncoder::load(&folder.component("text_encoder")?, device, kind)
            .map_err(load_err("text_encoder"))?;
        let text_encoder_2 =
            TextEncoderWithProjection::load(&folder.component("text_encoder_2")?, device, kind)
                .map_err(load_err("text_encoder_2"))?;
        let me = Self {
            tokenizer,
            tokenizer_2,
            text_encoder,
            text_encoder_2,
            force_zeros_for_empty_prompt: folder
                .flag("force_zeros_for_empty_prompt")
                .unwrap_or(true),
            device,
            kind,
        };
        let problems = me.problems();
        if problems.is_empty() {
            Ok(me)
        } else {
            Err(PipelineError::Mismatch {
                dir: folder.root().to_owned(),
                message: problems.join("; "),
            })
        }
    }

    /// The width of the concatenated hidden states.
    pub fn hidden_size(&self) -> i64 {
        self.text_encoder.config.hidden_size + self.text_encoder_2.model.config.hidden_size
    }

    /// The width of the pooled embedding.
    pub fn pooled_dim(&self) -> i64 {
        self.text_encoder_2.model.projection.projection_dim
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, tok, positions) in [
            (
                "tokenizer",
                &self.tokenizer,
                self.text_encoder.config.max_position_embeddings,
            ),
            (
                "tokenizer_2",
                &self.tokenizer_2,
                self.text_encoder_2.model.config.max_position_embeddings,
            ),
        ] {
            if tok.max_length() as i64 > positions {
                problems.push(format!(
                    "{name}'s model_max_length is {} but its text encoder has {positions} positions",
                    tok.max_length()
                ));
            }
        }
        if self.tokenizer.max_length() != self.tokenizer_2.max_length() {
            problems.push(format!(
                "tokenizer and tokenizer_2 pad to {} and {} tokens; their states are concatenated",
                self.tokenizer.max_length(),
                self.tokenizer_2.max_length()
            ));
        }
        problems
    }

    /// `prompt_embeds` and `pooled_prompt_embeds` for `prompts`, without
    /// gradients, and how many prompts either tokenizer cut.
    pub fn encode<S: AsRef<str>>(
        &self,
        prompts: &[S],
    ) -> Result<(XlCondition, usize), PipelineError> {
        let batch_1 = self.tokenizer.encode_batch(prompts, self.device)?;
        let batch_2 = self.tokenizer_2.encode_batch(prompts, self.device)?;
        let truncated = batch_1.num_truncated().max(batch_2.num_truncated());
        let cond = tch::no_grad(|| -> Result<XlCondition, tch::TchError> {
            let h1 = self.text_encoder.model.f_penultimate(&batch_1.input_ids)?;
            let out = self.text_encoder_2.model.f_forward(&batch_2.input_ids)?;
            Ok(XlCondition {
                hidden: Tensor::f_cat(&[&h1, &out.penultimate], -1)?,
                pooled: out.text_embeds,
            })
        })?;
        Ok((cond, truncated))
    }

    /// The null condition shaped like `cond`: zeros where
    /// `force_zeros_for_empty_prompt`, else the encoding of "".
    pub fn null_condition(&self, cond: &XlCondition) -> Result<XlCondition, PipelineError> {
        if self.force_zeros_for_empty_prompt {
            return Ok(XlCondition {
                hidden: cond.hidden.f_zeros_like()?,
                pooled: cond.pooled.f_zeros_like()?,
            });
        }
        let b = cond.hidden.size()[0];
        let (e, _) = self.encode(&[""])?;
        Ok(XlCondition {
            hidden: e.hidden.f_expand([b, -1, -1], false)?,
            pooled: e.pooled.f_expand([b, -1], false)?,
        })
    }

    /// diffusers' `_get_add_time_ids` for `batch` images of height x width
    /// pixels, no crop: [h, w, 0, 0, h, w] per row, in the encoders' dtype.
    pub fn add_time_ids(
        &self,
        batch: i64,
        height: i64,
        width: i64,
    ) -> Result<Tensor, tch::TchError> {
        let ids = [height, width, 0, 0, height, width].map(|v| v as f32);
        Tensor::f_from_slice(&ids)?
            .f_reshape([1, 6])?
            .f_to_kind(self.kind)?
            .f_to_device(self.device)?
            .f_repeat([batch, 1])
    }
}
