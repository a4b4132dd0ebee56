//! `swiftbrush eval ...`: judging a teacher's or a student's pictures
//! (CLIP score, FID).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use super::sample::DrawArgs;

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// CLIP score: draw each prompt (as `sample` does, same noise for the
    /// same --seed) and score the picture against its prompt with a CLIP
    /// model (a Hugging Face CLIP folder, e.g. OpenCLIP ViT-g/14 as the
    /// paper); the mean cosine similarity, the paper's scale.
    ClipScore {
        /// The CLIP folder: config.json, model.safetensors,
        /// preprocessor_config.json and the tokenizer files.
        #[arg(long, value_name = "DIR")]
        clip: PathBuf,
        #[command(flatten)]
        draw: DrawArgs,
        /// Also write one JSON line per prompt (index, prompt, score).
        #[arg(long, value_name = "FILE.jsonl")]
        scores_out: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// FID: draw each prompt (as `sample` does), embed every picture with
    /// pytorch-fid's Inception and compare the features' statistics with a
    /// reference's (pytorch-fid's `--save-stats` .npz of real images, or a
    /// file this command saved for another model).
    Fid {
        /// The FID Inception's weights as safetensors: pytorch-fid's
        /// pt_inception-2015-12-05-6726825d.pth converted (see README).
        #[arg(long, value_name = "FILE.safetensors")]
        inception: PathBuf,
        /// Statistics to compare with: .npz (mu, sigma) or .safetensors.
        #[arg(long, value_name = "FILE")]
        reference_stats: Option<PathBuf>,
        /// Write these pictures' statistics (mu, sigma) as .safetensors.
        #[arg(long, value_name = "FILE.safetensors")]
        save_stats: Option<PathBuf>,
        #[command(flatten)]
        draw: DrawArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: EvalCommand) -> anyhow::Result<()> {
    match command {
        EvalCommand::ClipScore {
            clip,
            draw,
            scores_out,
            json,
        } => {
            let request = draw.request(None, None)?;
            if let Some(path) = &scores_out {
                // Fail before hours of drawing, not after.
                std::fs::write(path, b"")
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            let report = swiftbrush_worker::eval::clip_score(&request, &clip)
                .context("cannot compute the CLIP score")?;
            if let Some(path) = &scores_out {
                let lines: String = request
                    .prompts
                    .iter()
                    .zip(&report.scores)
                    .enumerate()
                    .map(|(index, (prompt, score))| {
                        serde_json::json!({"index": index, "prompt": prompt, "score": score})
                            .to_string()
                            + "\n"
                    })
                    .collect();
                std::fs::write(path, lines)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        EvalCommand::Fid {
            inception,
            reference_stats,
            save_stats,
            draw,
            json,
        } => {
            let request = draw.request(None, None)?;
            if let Some(path) = &save_stats {
                // Fail before the drawing, not after.
                std::fs::write(path, b"")
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            let fid = swiftbrush_worker::eval::FidRequest {
                inception,
                reference: reference_stats,
                save_stats,
            };
            let report =
                swiftbrush_worker::eval::fid(&request, &fid).context("cannot compute the FID")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
    }
}
