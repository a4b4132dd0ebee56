//! CLIP score: the cosine similarity of each picture's CLIP image embedding
//! with its prompt's text embedding, averaged over the prompts (the scale of
//! the paper's table, 0.29-0.33 for SD 2.1-class models with OpenCLIP
//! ViT-g/14; torchmetrics' `CLIPScore` is 100 x max(cos, 0)). The CLIP
//! model is a Hugging Face CLIP folder the user supplies; pictures are drawn
//! by `sample`'s machinery a batch at a time and never all held at once.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor, nn};

use super::EvalError;
use super::clip_image::ClipImageProcessor;
use super::clip_model::CLIPModel;
use crate::models::ModelError;
use crate::models::tokenizer::ClipTokenizer;
use crate::sample::{SampleError, SampleRequest, draw_in_batches};

/// A loaded CLIP model with its tokenizer and image processor.
pub struct ClipScorer {
    _vs: nn::VarStore,
    model: CLIPModel,
    tokenizer: ClipTokenizer,
    processor: ClipImageProcessor,
    device: Device,
}

impl ClipScorer {
    /// A Hugging Face CLIP folder: config.json, model.safetensors (or its
    /// shards), preprocessor_config.json (transformers' defaults without
    /// one) and the tokenizer files (tokenizer.json, or vocab.json +
    /// merges.txt), at the top or in `tokenizer/`.
    pub fn load(dir: &Path, device: Device) -> Result<Self, EvalError> {
        let clip_err = |cause| EvalError::Clip {
            dir: dir.to_owned(),
            cause,
        };
        if !dir.is_dir() {
            return Err(clip_err(ModelError::Io {
                path: dir.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
            }));
        }
        let (vs, model) = CLIPModel::load(dir, device).map_err(clip_err)?;
        let processor = ClipImageProcessor::from_file(&dir.join("preprocessor_config.json"))
            .map_err(clip_err)?;
        let tokenizer_dir = if dir.join("tokenizer").is_dir() {
            dir.join("tokenizer")
        } else {
            dir.to_owned()
        };
        let tokenizer =
            ClipTokenizer::from_dir(&tokenizer_dir).map_err(|cause| EvalError::Tokenizer {
                dir: dir.to_owned(),
                cause,
            })?;
        Ok(Self {
            _vs: vs,
            model,
            tokenizer,
            processor,
            device,
        })
    }

    /// Projected image embeddings [B, P] of pictures [B,3,H,W] in [0,1].
    pub fn image_embeds(&self, images: &Tensor) -> Result<Tensor, EvalError> {
        let pixels = self
            .processor
            .pixel_values(&images.f_to_device(self.device)?)?;
        Ok(self.model.image_embeds(&pixels)?)
    }

    /// Projected text embeddings [B, P] of prompts (truncated at 77 tokens).
    pub fn text_embeds<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor, EvalError> {
        let ids = self
            .tokenizer
            .encode_batch(prompts, self.device)
            .map_err(|cause| EvalError::Tokenizer {
                dir: PathBuf::from("(tokenizer)"),
                cause,
            })?
            .input_ids;
        Ok(self.model.text_embeds(&ids)?)
    }

    /// Each picture's cosine similarity with its prompt, [B] float32.
    pub fn scores<S: AsRef<str>>(
        &self,
        images: &Tensor,
        prompts: &[S],
    ) -> Result<Tensor, EvalError> {
        let image = self.image_embeds(images)?;
        let text = self.text_embeds(prompts)?;
        Ok(Tensor::f_cosine_similarity(&image, &text, 1, 1e-8)?
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?)
    }
}

/// What `swiftbrush eval clip-score` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ClipScoreReport {
    /// What drew the pictures, as `sample` names it.
    pub model: String,
    pub clip: String,
    pub num_images: usize,
    /// Mean cosine similarity (the paper's scale).
    pub clip_score: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// Every picture's score, in prompt order.
    pub scores: Vec<f64>,
    pub device: String,
    /// Drawing and scoring, per picture.
    pub seconds_per_image: f64,
}

impl ClipScoreReport {
    pub fn table(&self) -> String {
        format!(
            "model             {}\nCLIP              {}\nimages            {}\nCLIP score        {:.4} (mean cosine; std {:.4}, min {:.4}, max {:.4})\ndevice            {}\nseconds per image {:.4}\n",
            self.model,
            self.clip,
            self.num_images,
            self.clip_score,
            self.std,
            self.min,
            self.max,
            self.device,
            self.seconds_per_image,
        )
    }
}

/// Draws `req`'s prompts (teacher or student, as `sample` would) and
/// scores every picture with the CLIP model at `clip`. The CLIP folder is
/// loaded first: a broken one fails before any picture is drawn.
pub fn clip_score(req: &SampleRequest, clip: &Path) -> Result<ClipScoreReport, EvalError> {
    let device = crate::torch::device::parse_device(&req.device).map_err(SampleError::from)?;
    let scorer = ClipScorer::load(clip, device)?;
    let started = Instant::now();
    let mut scores = Vec::with_capacity(req.prompts.len());
    let drawn = draw_in_batches(req, |_, prompts, images| {
        let batch = scorer.scores(images, prompts)?;
        scores.extend(Vec::<f32>::try_from(&batch)?.into_iter().map(f64::from));
        Ok::<(), EvalError>(())
    })?;
    let n = scores.len().max(1) as f64;
    let mean = scores.iter().sum::<f64>() / n;
    let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n;
    Ok(ClipScoreReport {
        model: req.model.describe(),
        clip: clip.display().to_string(),
        num_images: scores.len(),
        clip_score: mean,
        std: var.sqrt(),
        min: scores.iter().copied().fold(f64::INFINITY, f64::min),
        max: scores.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        scores,
        device: drawn.device,
        seconds_per_image: started.elapsed().as_secs_f64() / n,
    })
}
