//! Range and consistency checks of a parsed [`JobConfig`]. Each problem names
//! the key path, the offending value and what is allowed.

use crate::config::{
    Autocast, Dtype, JobConfig, LORA_TARGETS, LoraConfig, OptimizerConfig, StudentKind, check,
};
use crate::config_error::Problem;

pub(crate) fn problems(c: &JobConfig) -> Vec<Problem> {
    let mut p = Vec::new();

    match &c.model.teacher {
        None => p.push(Problem {
            key: "model.teacher".to_owned(),
            value: None,
            allowed: "a diffusers pipeline folder; set it in the config or pass --teacher DIR"
                .to_owned(),
        }),
        Some(t) => check(
            &mut p,
            !t.trim().is_empty(),
            "model.teacher",
            format!("{t:?}"),
            "a non-empty path to a diffusers pipeline folder",
        ),
    }
    let res = c.model.resolution;
    check(
        &mut p,
        res >= 8 && res.is_multiple_of(8),
        "model.resolution",
        res.to_string(),
        "a positive multiple of 8",
    );

    let m = &c.method;
    check(
        &mut p,
        m.student_timestep <= 999,
        "method.student_timestep",
        m.student_timestep.to_string(),
        "0..=999",
    );
    check(
        &mut p,
        m.student_alpha_bar > 0.0 && m.student_alpha_bar < 1.0,
        "method.student_alpha_bar",
        m.student_alpha_bar.to_string(),
        "0 < A < 1",
    );
    if let Some(steps) = &m.student_timesteps {
        let descending = steps.windows(2).all(|w| w[0] > w[1]);
        check(
            &mut p,
            !steps.is_empty() && descending && steps.iter().all(|&t| t <= 999),
            "method.student_timesteps",
            format!("{steps:?}"),
            "a non-empty, strictly descending list of timesteps in 0..=999, e.g. \
             [999, 749, 499, 249]",
        );
        if let Some(&first) = steps.first() {
            check(
                &mut p,
                first == m.student_timestep,
                "method.student_timesteps",
                format!("{steps:?}"),
                &format!(
                    "a list starting at method.student_timestep ({}): the first step is \
                     the one-step student's pass (set both)",
                    m.student_timestep
                ),
            );
        }
    }
    check(
        &mut p,
        m.min_timestep < m.max_timestep,
        "method.min_timestep",
        m.min_timestep.to_string(),
        &format!("less than method.max_timestep ({})", m.max_timestep),
    );
    check(
        &mut p,
        m.max_timestep <= 999,
        "method.max_timestep",
        m.max_timestep.to_string(),
        "0..=999",
    );
    if let Some(last) = m.max_timestep_final {
        check(
            &mut p,
            m.min_timestep < last && last <= m.max_timestep,
            "method.max_timestep_final",
            last.to_string(),
            &format!(
                "above method.min_timestep ({}) and at most method.max_timestep ({})",
                m.min_timestep, m.max_timestep
            ),
        );
    }
    check(
        &mut p,
        m.guidance_scale.is_finite() && m.guidance_scale >= 1.0,
        "method.guidance_scale",
        m.guidance_scale.to_string(),
        ">= 1 (1 means no guidance)",
    );
    if let Some([lo, hi]) = m.guidance_scale_range {
        check(
            &mut p,
            lo.is_finite() && hi.is_finite() && 1.0 <= lo && lo <= hi,
            "method.guidance_scale_range",
            format!("[{lo}, {hi}]"),
            "[lo, hi] with 1 <= lo <= hi",
        );
    }
    check(
        &mut p,
        (0.0..=1.0).contains(&m.null_condition_prob),
        "method.null_condition_prob",
        m.null_condition_prob.to_string(),
        "0..=1",
    );
    optimizer(&mut p, "method.student", &m.student.optimizer());
    lora_student(&mut p, c);
    optimizer(
        &mut p,
        "method.fake_score.optimizer",
        &m.fake_score.optimizer,
    );
    lora_adapters(&mut p, "method.lora", &m.lora);
    check(
        &mut p,
        (1..=64).contains(&m.fake_score.updates_per_step),
        "method.fake_score.updates_per_step",
        m.fake_score.updates_per_step.to_string(),
        "an integer in 1..=64",
    );
    check(
        &mut p,
        (0.0..1.0).contains(&m.ema.max_decay),
        "method.ema.max_decay",
        m.ema.max_decay.to_string(),
        "0 <= decay < 1",
    );

    let t = &c.train;
    check(
        &mut p,
        t.global_batch >= 1,
        "train.global_batch",
        t.global_batch.to_string(),
        "an integer >= 1",
    );
    check(
        &mut p,
        t.max_steps >= 1,
        "train.max_steps",
        t.max_steps.to_string(),
        "an integer >= 1",
    );
    check(
        &mut p,
        is_device(&t.device),
        "train.device",
        format!("{:?}", t.device),
        "auto, cpu or cuda:N",
    );
    if let Some(n) = t.micro_batch {
        check(
            &mut p,
            n >= 1,
            "train.micro_batch",
            n.to_string(),
            "an integer >= 1, or null for the whole per-rank batch at once",
        );
    }
    check(
        &mut p,
        t.recompute_rows >= 1,
        "train.recompute_rows",
        t.recompute_rows.to_string(),
        "an integer >= 1 (rows per recomputed chunk under train.gradient_checkpointing)",
    );
    check(
        &mut p,
        t.sample_every_steps == 0 || !t.sample_prompts.is_empty(),
        "train.sample_prompts",
        "[]".to_owned(),
        &format!(
            "at least one prompt when train.sample_every_steps = {} (or sample_every_steps: 0)",
            t.sample_every_steps
        ),
    );
    const MAX_SAMPLE_PROMPTS: usize = 64;
    check(
        &mut p,
        t.sample_prompts.len() <= MAX_SAMPLE_PROMPTS,
        "train.sample_prompts",
        format!("{} prompts", t.sample_prompts.len()),
        &format!("at most {MAX_SAMPLE_PROMPTS} prompts"),
    );

    let w = &c.world;
    check(
        &mut p,
        w.min_size >= 1,
        "world.min_size",
        w.min_size.to_string(),
        "an integer >= 1",
    );
    check(
        &mut p,
        w.min_size <= w.max_size,
        "world.max_size",
        w.max_size.to_string(),
        &format!(">= world.min_size ({})", w.min_size),
    );
    // Every rank takes an equal slice of the fixed global batch.
    for (key, size) in [
        ("world.min_size", w.min_size),
        ("world.max_size", w.max_size),
    ] {
        if size >= 1 && t.global_batch >= 1 && !t.global_batch.is_multiple_of(size) {
            p.push(Problem {
                key: "train.global_batch".to_owned(),
                value: Some(t.global_batch.to_string()),
                allowed: format!("a multiple of the world size: not divisible by {key} = {size}"),
            });
        }
    }
    if let Some(column) = &c.data.text_column {
        check(
            &mut p,
            !column.trim().is_empty(),
            "data.text_column",
            format!("{column:?}"),
            "the name of a Parquet column holding the captions",
        );
    }
    // One step's captions for one rank must fit one GetCaptions reply.
    if w.min_size >= 1 {
        let per_rank = t.global_batch / w.min_size;
        check(
            &mut p,
            per_rank <= crate::rpc::MAX_CAPTIONS_PER_RANK_STEP,
            "train.global_batch",
            t.global_batch.to_string(),
            &format!(
                "at most {} captions per rank and step (global_batch / world.min_size = {per_rank})",
                crate::rpc::MAX_CAPTIONS_PER_RANK_STEP
            ),
        );
    }
    check(
        &mut p,
        w.heartbeat_interval_ms >= 1,
        "world.heartbeat_interval_ms",
        w.heartbeat_interval_ms.to_string(),
        ">= 1",
    );
    check(
        &mut p,
        w.heartbeat_timeout_ms > w.heartbeat_interval_ms,
        "world.heartbeat_timeout_ms",
        w.heartbeat_timeout_ms.to_string(),
        &format!(
            "greater than world.heartbeat_interval_ms ({})",
            w.heartbeat_interval_ms
        ),
    );

    let k = &c.checkpoint;
    check(
        &mut p,
        !k.run_dir.trim().is_empty(),
        "checkpoint.run_dir",
        format!("{:?}", k.run_dir),
        "a path or object-store URL",
    );
    check(
        &mut p,
        k.every_steps >= 1,
        "checkpoint.every_steps",
        k.every_steps.to_string(),
        "an integer >= 1",
    );
    check(
        &mut p,
        k.keep_last >= 1,
        "checkpoint.keep_last",
        k.keep_last.to_string(),
        "an integer >= 1",
    );
    check(
        &mut p,
        c.logging.every_steps >= 1,
        "logging.every_steps",
        c.logging.every_steps.to_string(),
        "an integer >= 1",
    );
    // Keys kept for the paper script's layout; accepting another value
    // would promise a saving the trainer does not make.
    let pr = &c.precision;
    check(
        &mut p,
        !(pr.student_autocast && pr.autocast == Autocast::None),
        "precision.student_autocast",
        "true with precision.autocast: none".to_owned(),
        "false, or precision.autocast bf16 or fp16 (the student runs under precision.autocast's \
         dtype, and none gives it no dtype to run in)",
    );
    check(
        &mut p,
        pr.student_dtype == Dtype::Fp32,
        "precision.student_dtype",
        pr.student_dtype.name().to_owned(),
        "fp32 (the student, its EMA and both Adam states train in float32; only the teacher \
         passes run in lower precision, see precision.autocast)",
    );
    check(
        &mut p,
        pr.vae_dtype == Dtype::Fp32,
        "precision.vae_dtype",
        pr.vae_dtype.name().to_owned(),
        "fp32 (training never decodes; `swiftbrush sample --dtype` sets the sampling precision)",
    );
    p
}

/// rank, alpha and targets of a set of adapters under `key`.
fn lora_adapters(p: &mut Vec<Problem>, key: &str, l: &LoraConfig) {
    check(
        p,
        l.rank >= 1,
        &format!("{key}.rank"),
        l.rank.to_string(),
        "an integer >= 1",
    );
    check(
        p,
        l.alpha.is_finite() && l.alpha > 0.0,
        &format!("{key}.alpha"),
        l.alpha.to_string(),
        "> 0",
    );
    check(
        p,
        !l.target_modules.is_empty(),
        &format!("{key}.target_modules"),
        "[]".to_owned(),
        &format!("a non-empty list of {}", LORA_TARGETS.join(", ")),
    );
    for (i, t) in l.target_modules.iter().enumerate() {
        check(
            p,
            LORA_TARGETS.contains(&t.as_str()),
            &format!("{key}.target_modules[{i}]"),
            format!("{t:?}"),
            &format!("one of {}", LORA_TARGETS.join(", ")),
        );
    }
}

/// `method.student.kind: lora`: its adapters, and the options a LoRA
/// student does not have.
fn lora_student(p: &mut Vec<Problem>, c: &JobConfig) {
    let s = &c.method.student;
    if s.kind == StudentKind::Full {
        check(
            p,
            s.lora.is_none(),
            "method.student.lora",
            "set with method.student.kind: full".to_owned(),
            "unset, or method.student.kind: lora (a full student has no adapters)",
        );
        return;
    }
    if let Some(l) = &s.lora {
        lora_adapters(p, "method.student.lora", l);
    }
    check(
        p,
        c.model.student_init.is_none(),
        "model.student_init",
        "set with method.student.kind: lora".to_owned(),
        "unset (a LoRA student starts as the teacher: its adapters' B is zero;          model.student_init gives a full student its weights)",
    );
    check(
        p,
        c.world.shard_state.is_none(),
        "world.shard_state",
        format!("{:?}", c.world.shard_state).to_lowercase(),
        "none with method.student.kind: lora (a LoRA student's state is its adapters:          small enough to keep whole on every rank)",
    );
}

fn optimizer(p: &mut Vec<Problem>, key: &str, o: &OptimizerConfig) {
    check(
        p,
        o.lr.is_finite() && o.lr > 0.0 && o.lr <= 1.0,
        &format!("{key}.lr"),
        o.lr.to_string(),
        "0 < lr <= 1",
    );
    for (i, b) in o.betas.iter().enumerate() {
        check(
            p,
            (0.0..1.0).contains(b),
            &format!("{key}.betas[{i}]"),
            b.to_string(),
            "0 <= beta < 1",
        );
    }
    check(
        p,
        o.eps.is_finite() && o.eps > 0.0,
        &format!("{key}.eps"),
        o.eps.to_string(),
        "> 0",
    );
    check(
        p,
        o.weight_decay.is_finite() && o.weight_decay >= 0.0,
        &format!("{key}.weight_decay"),
        o.weight_decay.to_string(),
        ">= 0",
    );
    check(
        p,
        o.grad_clip.is_finite() && o.grad_clip > 0.0,
        &format!("{key}.grad_clip"),
        o.grad_clip.to_string(),
        "> 0",
    );
}

fn is_device(d: &str) -> bool {
    match d {
        "auto" | "cpu" => true,
        _ => d
            .strip_prefix("cuda:")
            .is_some_and(|n| !n.is_empty() && n.parse::<u32>().is_ok()),
    }
}
