//! `swiftbrush eval ...`: judging a teacher's or a student's pictures
//! (CLIP score, FID), of one model or of every checkpoint of a run.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde::Serialize;
use swiftbrush_proto::run_store::RunStore;
use swiftbrush_worker::sample::{SampleModel, SampleRequest};

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
        #[arg(long, value_name = "FILE.jsonl", conflicts_with = "all_checkpoints")]
        scores_out: Option<PathBuf>,
        #[command(flatten)]
        output: Output,
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
        #[arg(
            long,
            value_name = "FILE.safetensors",
            conflicts_with = "all_checkpoints"
        )]
        save_stats: Option<PathBuf>,
        #[command(flatten)]
        draw: DrawArgs,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, clap::Args)]
pub struct Output {
    /// With --student RUN: evaluate every valid checkpoint of the run,
    /// oldest first (FID moves during training; pick the best one).
    #[arg(long)]
    all_checkpoints: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One evaluated model: its checkpoint step with --all-checkpoints.
#[derive(Serialize)]
struct Evaluated<R: Serialize> {
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<u64>,
    #[serde(flatten)]
    report: R,
}

pub fn run(command: EvalCommand) -> anyhow::Result<()> {
    match command {
        EvalCommand::ClipScore {
            clip,
            draw,
            scores_out,
            output,
        } => {
            let request = draw.request(None, None)?;
            check_writable(scores_out.as_ref())?;
            let mut done = Vec::new();
            for (step, request) in models(&request, output.all_checkpoints)? {
                let report = swiftbrush_worker::eval::clip_score(&request, &clip)
                    .context("cannot compute the CLIP score")?;
                if let Some(path) = &scores_out {
                    write_scores(path, &request.prompts, &report.scores)?;
                }
                done.push(Evaluated { step, report });
            }
            print_all(&done, output.json, |r| r.table(), |r| r.clip_score)
        }
        EvalCommand::Fid {
            inception,
            reference_stats,
            save_stats,
            draw,
            output,
        } => {
            let request = draw.request(None, None)?;
            check_writable(save_stats.as_ref())?;
            let fid = swiftbrush_worker::eval::FidRequest {
                inception,
                reference: reference_stats,
                save_stats,
            };
            let mut done = Vec::new();
            for (step, request) in models(&request, output.all_checkpoints)? {
                let report = swiftbrush_worker::eval::fid(&request, &fid)
                    .context("cannot compute the FID")?;
                done.push(Evaluated { step, report });
            }
            print_all(
                &done,
                output.json,
                |r| r.table(),
                |r| r.fid.unwrap_or(f64::NAN),
            )
        }
    }
}

/// An output file is created empty up front: an unwritable one fails
/// before hours of drawing, not after.
fn check_writable(path: Option<&PathBuf>) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(path, b"").with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The request itself, or with `all` one request per valid checkpoint of
/// the run `--student` names.
fn models(request: &SampleRequest, all: bool) -> anyhow::Result<Vec<(Option<u64>, SampleRequest)>> {
    if !all {
        return Ok(vec![(None, request.clone())]);
    }
    let SampleModel::Student { path, teacher } = &request.model else {
        anyhow::bail!("--all-checkpoints needs --student RUN (a run directory)");
    };
    let run = path.trim_end_matches('/');
    let local = !run.contains("://") || run.starts_with("file://");
    anyhow::ensure!(
        !local || std::path::Path::new(run.trim_start_matches("file://")).is_dir(),
        "{run}: no such run directory"
    );
    let steps = RunStore::open(run)?.valid_steps()?;
    anyhow::ensure!(
        !steps.is_empty(),
        "{}",
        swiftbrush_worker::export::no_checkpoint(run)
    );
    Ok(steps
        .into_iter()
        .map(|step| {
            let mut r = request.clone();
            r.model = SampleModel::Student {
                path: format!("{run}/checkpoints/step-{step:08}"),
                teacher: teacher.clone(),
            };
            (Some(step), r)
        })
        .collect())
}

fn write_scores(path: &PathBuf, prompts: &[String], scores: &[f64]) -> anyhow::Result<()> {
    let lines: String = prompts
        .iter()
        .zip(scores)
        .enumerate()
        .map(|(index, (prompt, score))| {
            serde_json::json!({"index": index, "prompt": prompt, "score": score}).to_string() + "\n"
        })
        .collect();
    std::fs::write(path, lines).with_context(|| format!("cannot write {}", path.display()))
}

/// One report as a table (or JSON); several as their tables and a summary
/// line per checkpoint (or a JSON array).
fn print_all<R: Serialize>(
    done: &[Evaluated<R>],
    json: bool,
    table: impl Fn(&R) -> String,
    value: impl Fn(&R) -> f64,
) -> anyhow::Result<()> {
    match (done, json) {
        ([one], true) if one.step.is_none() => {
            println!("{}", serde_json::to_string_pretty(&one.report)?)
        }
        (_, true) => println!("{}", serde_json::to_string_pretty(done)?),
        ([one], false) if one.step.is_none() => print!("{}", table(&one.report)),
        (_, false) => {
            for e in done {
                println!("checkpoint step {}", e.step.unwrap_or(0));
                print!("{}", table(&e.report));
            }
            println!("\nstep      value");
            for e in done {
                println!("{:<9} {:.4}", e.step.unwrap_or(0), value(&e.report));
            }
        }
    }
    Ok(())
}
