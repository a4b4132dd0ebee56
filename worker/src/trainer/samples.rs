//! sample: the loop's last named step. Every `train.sample_every_steps`
//! steps rank 0 draws `train.sample_prompts` with the student's EMA weights
//! in one step and writes RUN/samples/step-XXXXXXXX.png (one image per
//! prompt, a grid), so progress shows while the run goes on. The picture is
//! the one `swiftbrush sample --student RUN/checkpoints/step-N --prompts P
//! --seed S` draws at that step (S = train.seed, the noise drawn once);
//! drawing it changes nothing in the run: the EMA weights are swapped into
//! the student and back, bit for bit (without an EMA, `ema.enabled: false`,
//! the student's own weights are the EMA weights).

use bytes::Bytes;
use swiftbrush_proto::JobConfig;
use swiftbrush_proto::run_store::RunStore;
use tch::{Device, Kind, Tensor};

use super::TrainError;
use super::text::TextConditioner;
use crate::diffusion::{NoiseSchedule, OneStepDraw, StudentChain, one_step_x0};
use crate::ema::Ema;
use crate::image_io::{grid_columns, png_bytes};
use crate::pipeline::DiffusersFolder;
use crate::pipeline::components::{Vae, decode_images};
use crate::vsd::{ScorePair, Student, StudentNet, with_generator};

/// Prompts a student pass takes at once: bounds the memory of a long list.
const CHUNK: usize = 8;

pub(super) struct TrainingSamples {
    every: u64,
    /// The prompts' encodings [N,77,D], computed once.
    cond: Tensor,
    /// The fixed noise [N,C,h,w] on the training device.
    z: Tensor,
    /// A few-step student's re-noising draws (K - 1 of z's shape, drawn
    /// after it as `sample` draws them); none for one step.
    noises: Vec<Tensor>,
    /// None for a pixel-space teacher (the latents are the images).
    vae: Option<Vae>,
}

impl TrainingSamples {
    /// None when the config asks for no samples. The VAE is loaded here
    /// (float32) on every rank, because whichever rank is 0 in a later
    /// world draws them, and a broken one fails at the start, not hours in.
    pub(super) fn load(
        cfg: &JobConfig,
        folder: &DiffusersFolder,
        text: &TextConditioner,
        [c, h, w]: [i64; 3],
        device: Device,
    ) -> Result<Option<Self>, TrainError> {
        let steps = cfg.method.student_steps().len();
        let t = &cfg.train;
        if t.sample_every_steps == 0 || t.sample_prompts.is_empty() {
            return Ok(None);
        }
        let vae = if folder.has("vae") {
            let vae = Vae::load(&folder.component("vae")?, device, Kind::Float).map_err(|e| {
                TrainError::Invalid(format!(
                    "train.sample_every_steps needs the teacher's VAE: {}: {e}",
                    folder.root().join("vae").display()
                ))
            })?;
            Some(vae)
        } else {
            None
        };
        let cond = text.encode(&t.sample_prompts)?.cond;
        let n = t.sample_prompts.len() as i64;
        // `sample --seed` draws the same numbers (a CPU generator seeded by
        // the seed), under the draw lock that the training draws take too.
        let (z, noises) =
            with_generator(|| crate::diffusion::draw_chain_noise(t.seed, &[n, c, h, w], steps))
                .map_err(|e| TrainError::Invalid(e.to_string()))?;
        let z = z.to_device(device);
        let noises = noises.into_iter().map(|e| e.to_device(device)).collect();
        Ok(Some(Self {
            every: t.sample_every_steps,
            cond,
            z,
            noises,
            vae,
        }))
    }

    /// Whether the run draws its pictures after training step `done`.
    pub(super) fn due(&self, done: u64, max_steps: u64) -> bool {
        super::checkpoint::every_and_last(done, self.every, max_steps)
    }

    /// Draws the pictures with the EMA weights (swapped into `student` for
    /// the passes and back) and writes them as samples/step-XXXXXXXX.png.
    /// Returns the file's name in the run directory and the PNG.
    pub(super) fn write(
        &self,
        step: u64,
        student: &Student,
        scores: &ScorePair,
        ema: Option<&mut Ema>,
        draw: &StudentDraw,
        store: &RunStore,
    ) -> Result<(String, Vec<u8>), TrainError> {
        let images = match ema {
            Some(ema) => {
                let variables = student.variables();
                ema.swap_with(&variables);
                let images = self.draw(student.net(scores), draw);
                ema.swap_with(&variables);
                images
            }
            None => self.draw(student.net(scores), draw),
        }?;
        let n = images.size()[0] as usize;
        let png = png_bytes(&images, grid_columns(n))
            .map_err(|e| TrainError::Invalid(format!("samples of step {step}: {e}")))?;
        let name = format!("samples/step-{step:08}.png");
        store.put_run_file(&name, Bytes::from(png.clone()))?;
        Ok((name, png))
    }

    fn draw(&self, student: StudentNet<'_>, draw: &StudentDraw) -> Result<Tensor, TrainError> {
        tch::no_grad(|| {
            let n = self.z.size()[0];
            let mut images = Vec::new();
            for start in (0..n).step_by(CHUNK) {
                let len = (n - start).min(CHUNK as i64);
                let z = self.z.narrow(0, start, len);
                let cond = self.cond.narrow(0, start, len);
                let x0 = match draw {
                    StudentDraw::OneStep(draw) => one_step_x0(&student, &z, &cond, draw)?,
                    StudentDraw::Chain(chain, schedule) => {
                        let noises: Vec<Tensor> = self
                            .noises
                            .iter()
                            .map(|e| e.narrow(0, start, len))
                            .collect();
                        chain
                            .draw(&student, &z, &cond, &noises, chain.len(), schedule)
                            .map_err(|e| TrainError::Invalid(e.to_string()))?
                    }
                };
                images.push(decode_images(self.vae.as_ref(), &x0)?.f_to_device(Device::Cpu)?);
            }
            Ok(Tensor::f_cat(&images, 0)?)
        })
    }
}

/// How the student draws its pictures: one step, or a few-step student's
/// whole chain.
pub(super) enum StudentDraw<'a> {
    OneStep(OneStepDraw),
    Chain(&'a StudentChain, &'a NoiseSchedule),
}
