//! The job-config schema: presets resolve, and each class of bad input is an
//! error that names the key path.

use swiftbrush_proto::config::{Dtype, FakeScore, ScorePasses, VsdWeighting};
use swiftbrush_proto::{ConfigError, JobConfig};

fn parse(yaml: &str) -> Result<JobConfig, ConfigError> {
    let c = JobConfig::from_yaml_str(yaml, "test.yaml")?;
    c.validate()?;
    Ok(c)
}

fn err(yaml: &str) -> String {
    match parse(yaml) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

const TEACHER: &str = "model:\n  teacher: /models/sd\n";

#[test]
fn defaults_are_the_papers() {
    let c = parse(TEACHER).unwrap();
    let m = &c.method;
    assert_eq!(m.student_timestep, 999);
    assert_eq!(m.student_alpha_bar, 0.0047);
    assert_eq!((m.min_timestep, m.max_timestep), (20, 980));
    assert_eq!(m.guidance_scale, 4.5);
    assert_eq!(m.null_condition_prob, 0.1);
    assert_eq!(m.student.lr, 1e-6);
    assert_eq!(m.student.betas, [0.9, 0.999]);
    assert_eq!(m.student.eps, 1e-8);
    assert_eq!(m.student.weight_decay, 0.0);
    assert_eq!(m.student.grad_clip, 1.0);
    assert_eq!(m.lora.rank, 64);
    assert_eq!(m.lora.alpha, 108.0);
    assert_eq!(m.lora.scale(), 1.6875);
    assert_eq!(m.lora.target_modules, vec!["to_q", "to_v"]);
    assert_eq!(m.fake_score.kind, FakeScore::Lora);
    assert_eq!(m.fake_score.optimizer.lr, 1e-3);
    assert_eq!(m.fake_score.updates_per_step, 1);
    assert_eq!(m.ema.max_decay, 0.9999);
    assert_eq!(c.model.resolution, 512);
    assert_eq!(c.train.global_batch, 16);
}

#[test]
fn presets_parse_and_validate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let mut c = JobConfig::from_yaml_file(&path).unwrap();
            c.model.teacher.get_or_insert_with(|| "/models/sd".into());
            c.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // The resolved form parses back to the same config.
            let again = JobConfig::from_yaml_str(&c.to_yaml(), "resolved").unwrap();
            assert_eq!(again, c, "{}", path.display());
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    names.sort();
    for want in ["sd15.yaml", "sd21-base.yaml", "sdxl-base.yaml", "tiny.yaml"] {
        assert!(names.iter().any(|n| n == want), "missing preset {want}");
    }
}

#[test]
fn unknown_key_names_path_and_suggests() {
    let e = err(&format!("{TEACHER}method:\n  gudance_scale: 3\n"));
    assert!(e.contains("method.gudance_scale: unknown key"), "{e}");
    assert!(e.contains("did you mean `guidance_scale`?"), "{e}");
    assert!(e.contains("line 4"), "{e}");

    let e = err("modle:\n  teacher: /t\n");
    assert!(e.contains("modle: unknown key"), "{e}");
    assert!(e.contains("did you mean `model`?"), "{e}");

    let e = err(&format!("{TEACHER}method:\n  lora:\n    rnak: 4\n"));
    assert!(e.contains("method.lora.rnak: unknown key"), "{e}");
    assert!(e.contains("did you mean `rank`?"), "{e}");
}

#[test]
fn wrong_type_names_path_and_expected_type() {
    let e = err(&format!("{TEACHER}method:\n  guidance_scale: high\n"));
    assert!(
        e.contains("method.guidance_scale: invalid type: string \"high\""),
        "{e}"
    );
    assert!(e.contains("expected f64"), "{e}");
    let e = err(&format!("{TEACHER}precision:\n  teacher_dtype: fp8\n"));
    assert!(e.contains("precision.teacher_dtype"), "{e}");
    assert!(e.contains("fp32") && e.contains("bf16"), "{e}");
}

#[test]
fn out_of_range_learning_rates() {
    let e = err(&format!("{TEACHER}method:\n  student:\n    lr: 0\n"));
    assert!(
        e.contains("method.student.lr = 0 is not allowed; expected 0 < lr <= 1"),
        "{e}"
    );
    let e = err(&format!(
        "{TEACHER}method:\n  fake_score:\n    optimizer:\n      lr: 5\n"
    ));
    assert!(
        e.contains("method.fake_score.optimizer.lr = 5 is not allowed"),
        "{e}"
    );
    let e = err(&format!("{TEACHER}method:\n  student:\n    lr: -1.0e-6\n"));
    assert!(e.contains("method.student.lr = -0.000001"), "{e}");
}

#[test]
fn student_and_vae_dtypes_other_than_fp32_are_refused_not_ignored() {
    let e = err(&format!("{TEACHER}precision:\n  student_dtype: bf16\n"));
    assert!(
        e.contains("precision.student_dtype = bf16 is not allowed; expected fp32"),
        "{e}"
    );
    let e = err(&format!("{TEACHER}precision:\n  vae_dtype: fp16\n"));
    assert!(
        e.contains("precision.vae_dtype = fp16 is not allowed; expected fp32"),
        "{e}"
    );
    assert!(e.contains("swiftbrush sample --dtype"), "{e}");
}

#[test]
fn student_autocast_needs_an_autocast_dtype_and_changes_training() {
    let c = parse(TEACHER).unwrap();
    assert!(!c.precision.student_autocast, "off by default");
    let e = err(&format!(
        "{TEACHER}precision:\n  autocast: none\n  student_autocast: true\n"
    ));
    assert!(
        e.contains("precision.student_autocast") && e.contains("precision.autocast: none"),
        "{e}"
    );
    for dtype in ["bf16", "fp16"] {
        let on = parse(&format!(
            "{TEACHER}precision:\n  teacher_dtype: fp32\n  autocast: {dtype}\n  \
             student_autocast: true\n"
        ))
        .unwrap();
        assert!(on.precision.student_autocast);
    }
    // It changes what a step computes: a resume names it, and the
    // fingerprint differs.
    let on = parse(&format!("{TEACHER}precision:\n  student_autocast: true\n")).unwrap();
    assert_ne!(on.fingerprint(), c.fingerprint());
    let changes: Vec<String> = on
        .training_changes_from(&c)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(changes, vec!["precision.student_autocast: false -> true"]);
}

#[test]
fn guidance_below_one() {
    let e = err(&format!("{TEACHER}method:\n  guidance_scale: 0.5\n"));
    assert!(
        e.contains("method.guidance_scale = 0.5 is not allowed; expected >= 1"),
        "{e}"
    );
}

#[test]
fn lora_rank_zero_and_bad_target() {
    let e = err(&format!("{TEACHER}method:\n  lora:\n    rank: 0\n"));
    assert!(e.contains("method.lora.rank = 0 is not allowed"), "{e}");
    let e = err(&format!(
        "{TEACHER}method:\n  lora:\n    target_modules: [to_q, to_x]\n"
    ));
    assert!(
        e.contains("method.lora.target_modules[1] = \"to_x\""),
        "{e}"
    );
    assert!(e.contains("to_out.0"), "{e}");
}

#[test]
fn global_batch_must_divide_by_world_size() {
    let e = err(&format!(
        "{TEACHER}train:\n  global_batch: 6\nworld:\n  min_size: 1\n  max_size: 4\n"
    ));
    assert!(e.contains("train.global_batch = 6 is not allowed"), "{e}");
    assert!(e.contains("not divisible by world.max_size = 4"), "{e}");
    let e = err(&format!("{TEACHER}world:\n  min_size: 3\n  max_size: 2\n"));
    assert!(e.contains("world.max_size = 2"), "{e}");
}

#[test]
fn missing_teacher() {
    let e = err("name: x\n");
    assert!(e.contains("missing field `model`"), "{e}");
    let e = err("model:\n  resolution: 512\n");
    assert!(e.contains("model.teacher is missing"), "{e}");
    assert!(e.contains("--teacher"), "{e}");
}

#[test]
fn all_problems_are_reported_together() {
    let e = err(&format!(
        "{TEACHER}method:\n  guidance_scale: 0\n  lora:\n    rank: 0\n  min_timestep: 990\n"
    ));
    for key in [
        "method.guidance_scale",
        "method.lora.rank",
        "method.min_timestep",
    ] {
        assert!(e.contains(key), "{key} not in {e}");
    }
}

#[test]
fn fingerprint_changes_with_any_value() {
    let a = parse(TEACHER).unwrap();
    let mut b = a.clone();
    assert_eq!(a.fingerprint(), b.fingerprint());
    b.method.guidance_scale = 5.0;
    assert_ne!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.fingerprint().len(), 64);
}

#[test]
fn vsd_weighting_parses_and_a_bad_one_names_the_choices() {
    let c = JobConfig::from_yaml_str(
        &format!("{TEACHER}method:\n  vsd_weighting: dmd\n"),
        "t.yaml",
    )
    .unwrap();
    assert_eq!(c.method.vsd_weighting, VsdWeighting::Dmd);
    let plain = JobConfig::from_yaml_str(TEACHER, "t.yaml").unwrap();
    assert_eq!(plain.method.vsd_weighting, VsdWeighting::Paper);
    let e = err(&format!("{TEACHER}method:\n  vsd_weighting: sds\n"));
    assert!(e.contains("method.vsd_weighting"), "{e}");
    assert!(e.contains("paper") && e.contains("dmd"), "{e}");
}

#[test]
fn fake_score_parses_and_a_bad_one_names_the_choices() {
    let c = parse(&format!(
        "{TEACHER}method:\n  fake_score:\n    kind: unet\n    updates_per_step: 2\n    optimizer:\n      lr: 2.0e-3\n"
    ))
    .unwrap();
    assert_eq!(c.method.fake_score.kind, FakeScore::Unet);
    assert_eq!(c.method.fake_score.updates_per_step, 2);
    assert_eq!(c.method.fake_score.optimizer.lr, 2e-3);
    assert_eq!(
        parse(TEACHER).unwrap().method.fake_score.kind,
        FakeScore::Lora
    );
    let e = err(&format!(
        "{TEACHER}method:\n  fake_score:\n    kind: full\n"
    ));
    assert!(e.contains("method.fake_score.kind"), "{e}");
    assert!(e.contains("lora") && e.contains("unet"), "{e}");
    let e = err(&format!(
        "{TEACHER}method:\n  fake_score:\n    updates_per_step: 0\n"
    ));
    assert!(
        e.contains("method.fake_score.updates_per_step = 0 is not allowed"),
        "{e}"
    );
}

/// Configs written before the fake score got its own section are refused
/// with the key each setting moved to, not a bare "unknown key".
#[test]
fn moved_fake_score_keys_are_refused_naming_the_new_ones() {
    for (method, says) in [
        (
            "  fake_score: unet\n",
            "write `fake_score:` with `kind: unet` under it",
        ),
        (
            "  lora:\n    rank: 4\n    optimizer:\n      lr: 1.0e-3\n",
            "method.lora.optimizer has moved to method.fake_score.optimizer",
        ),
        (
            "  lora:\n    updates_per_step: 2\n",
            "method.lora.updates_per_step has moved to method.fake_score.updates_per_step",
        ),
    ] {
        let e = err(&format!("{TEACHER}method:\n{method}"));
        assert!(e.contains(says), "{method}: {e}");
    }
}

#[test]
fn guidance_scale_range_parses_and_a_reversed_one_is_refused() {
    let c = parse(&format!(
        "{TEACHER}method:\n  guidance_scale_range: [2.0, 6.0]\n"
    ))
    .unwrap();
    assert_eq!(c.method.guidance_scale_range, Some([2.0, 6.0]));
    assert_eq!(parse(TEACHER).unwrap().method.guidance_scale_range, None);
    let e = err(&format!(
        "{TEACHER}method:\n  guidance_scale_range: [6.0, 2.0]\n"
    ));
    assert!(
        e.contains("method.guidance_scale_range = [6, 2] is not allowed"),
        "{e}"
    );
    let e = err(&format!(
        "{TEACHER}method:\n  guidance_scale_range: [0.5, 2.0]\n"
    ));
    assert!(e.contains("1 <= lo <= hi"), "{e}");
}

#[test]
fn max_timestep_final_must_lie_between_the_timestep_bounds() {
    let c = parse(&format!("{TEACHER}method:\n  max_timestep_final: 500\n")).unwrap();
    assert_eq!(c.method.max_timestep_final, Some(500));
    for bad in [10, 990] {
        let e = err(&format!("{TEACHER}method:\n  max_timestep_final: {bad}\n"));
        assert!(
            e.contains(&format!("method.max_timestep_final = {bad} is not allowed")),
            "{e}"
        );
        assert!(e.contains("method.min_timestep (20)"), "{e}");
    }
}

#[test]
fn the_sample_step_needs_prompts() {
    let c = parse(&format!(
        "{TEACHER}train:\n  sample_every_steps: 100\n  sample_prompts: [\"a cat\"]\n"
    ))
    .unwrap();
    assert_eq!(c.train.sample_every_steps, 100);
    assert_eq!(c.train.sample_prompts, vec!["a cat"]);
    let e = err(&format!("{TEACHER}train:\n  sample_every_steps: 100\n"));
    assert!(
        e.contains("train.sample_prompts = [] is not allowed"),
        "{e}"
    );
    assert!(e.contains("train.sample_every_steps = 100"), "{e}");
    let many = vec!["\"x\""; 65].join(", ");
    let e = err(&format!("{TEACHER}train:\n  sample_prompts: [{many}]\n"));
    assert!(e.contains("at most 64 prompts"), "{e}");
}

#[test]
fn micro_batch_is_a_positive_count_or_null() {
    let c = parse(TEACHER).unwrap();
    assert_eq!(c.train.micro_batch, None);
    let c = parse(&format!("{TEACHER}train:\n  micro_batch: 4\n")).unwrap();
    assert_eq!(c.train.micro_batch, Some(4));
    let e = err(&format!("{TEACHER}train:\n  micro_batch: 0\n"));
    assert!(e.contains("train.micro_batch = 0 is not allowed"), "{e}");
    // It changes no result, so a resumed run does not see a new config.
    let whole = parse(TEACHER).unwrap();
    assert_eq!(c.fingerprint(), whole.fingerprint());
    let other = parse(&format!("{TEACHER}train:\n  global_batch: 32\n")).unwrap();
    assert_ne!(other.fingerprint(), whole.fingerprint());
}

/// `train.gradient_checkpointing` and its chunk size: off by default,
/// chunks of 4 rows, a chunk of 0 rows refused by name; neither changes
/// the fingerprint or counts as a training change (memory and speed
/// only).
#[test]
fn gradient_checkpointing_and_its_rows_parse_and_validate() {
    let c = parse(TEACHER).unwrap();
    assert!(!c.train.gradient_checkpointing);
    assert_eq!(c.train.recompute_rows, 4);
    let on = parse(&format!(
        "{TEACHER}train:\n  gradient_checkpointing: true\n  recompute_rows: 2\n"
    ))
    .unwrap();
    assert!(on.train.gradient_checkpointing);
    assert_eq!(on.train.recompute_rows, 2);
    let e = err(&format!(
        "{TEACHER}train:\n  gradient_checkpointing: true\n  recompute_rows: 0\n"
    ));
    assert!(e.contains("train.recompute_rows = 0 is not allowed"), "{e}");
    assert!(e.contains("an integer >= 1"), "{e}");
    // Without recomputation the chunk size is inert (a toggle leaves it).
    let inert = parse(&format!("{TEACHER}train:\n  recompute_rows: 2\n")).unwrap();
    assert_eq!(inert.fingerprint(), c.fingerprint());
    let e = err(&format!("{TEACHER}train:\n  recompute_rows: -1\n"));
    assert!(e.contains("train.recompute_rows"), "{e}");
    let e = err(&format!("{TEACHER}train:\n  gradient_checkpointing: 2\n"));
    assert!(e.contains("train.gradient_checkpointing"), "{e}");
    assert_eq!(on.fingerprint(), c.fingerprint());
    assert_eq!(on.training_changes_from(&c), vec![]);
}

#[test]
fn score_passes_parse_and_a_bad_one_names_the_choices() {
    let c = parse(TEACHER).unwrap();
    assert_eq!(c.train.score_passes, ScorePasses::Auto);
    // auto: one pass on CUDA, two on the CPU.
    assert!(c.train.score_passes.one_pass(true));
    assert!(!c.train.score_passes.one_pass(false));
    let one = parse(&format!("{TEACHER}train:\n  score_passes: one\n")).unwrap();
    assert_eq!(one.train.score_passes, ScorePasses::One);
    assert!(one.train.score_passes.one_pass(false));
    let two = parse(&format!("{TEACHER}train:\n  score_passes: two\n")).unwrap();
    assert!(!two.train.score_passes.one_pass(true));
    let e = err(&format!("{TEACHER}train:\n  score_passes: three\n"));
    assert!(e.contains("train.score_passes"), "{e}");
    assert!(
        e.contains("auto") && e.contains("one") && e.contains("two"),
        "{e}"
    );
    // Speed and memory only: a resumed run does not see a new config.
    assert_eq!(one.fingerprint(), c.fingerprint());
}

#[test]
fn a_rank_takes_at_most_1024_captions_a_step() {
    // One step's captions for one rank must fit one GetCaptions reply
    // (issue 28: replies bounded by construction).
    let e = err(&format!(
        "{TEACHER}train:\n  global_batch: 2048\nworld:\n  min_size: 1\n  max_size: 2\n"
    ));
    assert!(
        e.contains("train.global_batch = 2048 is not allowed"),
        "{e}"
    );
    assert!(e.contains("at most 1024 captions per rank and step"), "{e}");
    parse(&format!(
        "{TEACHER}train:\n  global_batch: 2048\nworld:\n  min_size: 2\n  max_size: 2\n"
    ))
    .unwrap();
}

#[test]
fn every_unknown_key_and_bad_value_is_reported_at_once() {
    // Issue 29: spelling-type errors used to stop at the first.
    let e = err(&format!(
        "{TEACHER}method:\n  gudance_scale: 3\n  fake_score:\n    kind: lorra\n\
         train:\n  max_stepz: 4\nprecision:\n  teacher_dtype: fp8\n"
    ));
    assert!(e.contains("4 problems"), "{e}");
    for needle in [
        "method.gudance_scale: unknown key (line",
        "did you mean `guidance_scale`?",
        "method.fake_score.kind: unknown variant `lorra`",
        "train.max_stepz: unknown key",
        "did you mean `max_steps`?",
        "precision.teacher_dtype: unknown variant `fp8`",
    ] {
        assert!(e.contains(needle), "{needle} missing from\n{e}");
    }
    // One problem reads as before, on one line.
    let e = err(&format!("{TEACHER}train:\n  max_stepz: 4\n"));
    assert!(!e.contains("problems"), "{e}");
}

#[test]
fn tf32_and_cudnn_benchmark_default_off_and_only_tf32_changes_training() {
    let c = parse(TEACHER).unwrap();
    assert!(!c.precision.tf32 && !c.precision.cudnn_benchmark);
    let on = parse(&format!(
        "{TEACHER}precision:\n  tf32: true\n  cudnn_benchmark: true\n"
    ))
    .unwrap();
    assert!(on.precision.tf32 && on.precision.cudnn_benchmark);
    let e = err(&format!("{TEACHER}precision:\n  tf32: fast\n"));
    assert!(e.contains("precision.tf32"), "{e}");
    let e = err(&format!("{TEACHER}precision:\n  cudnn_benchmarks: true\n"));
    assert!(e.contains("precision.cudnn_benchmark"), "{e}");

    // TF32 changes the arithmetic of fp32 products on CUDA: a training
    // change, and part of the fingerprint.
    let tf32 = parse(&format!("{TEACHER}precision:\n  tf32: true\n")).unwrap();
    let changes: Vec<String> = tf32
        .training_changes_from(&c)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(changes, vec!["precision.tf32: false -> true"]);
    assert_ne!(tf32.fingerprint(), c.fingerprint());
    // cuDNN's benchmark mode only chooses among algorithms for the same
    // convolutions (a speed choice, like train.micro_batch): no change.
    let bench = parse(&format!("{TEACHER}precision:\n  cudnn_benchmark: true\n")).unwrap();
    assert_eq!(bench.training_changes_from(&c), vec![]);
    assert_eq!(bench.fingerprint(), c.fingerprint());
}

#[test]
fn data_text_column_is_left_out_when_unset_and_counts_when_set() {
    // Unset, the serialized config (and so every existing run's
    // fingerprint) holds no trace of the key.
    let a = parse(TEACHER).unwrap();
    assert!(!serde_json::to_string(&a).unwrap().contains("text_column"));
    let b = parse(&format!("{TEACHER}data:\n  text_column: caption_en\n")).unwrap();
    assert_eq!(b.data.text_column.as_deref(), Some("caption_en"));
    assert_ne!(a.fingerprint(), b.fingerprint());
    let changes: Vec<String> = b
        .training_changes_from(&a)
        .iter()
        .map(|c| c.key.clone())
        .collect();
    assert_eq!(changes, ["data.text_column"]);
    let e = err(&format!("{TEACHER}data:\n  text_column: \"  \"\n"));
    assert!(e.contains("data.text_column"), "{e}");
}

#[test]
fn student_timesteps_descend_from_the_student_timestep_and_change_training() {
    let plain = parse(TEACHER).unwrap();
    assert_eq!(plain.method.student_timesteps, None);
    assert_eq!(plain.method.student_steps(), vec![999]);
    let four = parse(&format!(
        "{TEACHER}method:\n  student_timesteps: [999, 749, 499, 249]\n"
    ))
    .unwrap();
    assert_eq!(four.method.student_steps(), vec![999, 749, 499, 249]);
    let changes = four.training_changes_from(&plain);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].key, "method.student_timesteps");
    assert_ne!(four.fingerprint(), plain.fingerprint());
    for bad in ["[]", "[999, 999]", "[999, 1200]", "[249, 999]"] {
        let e = err(&format!("{TEACHER}method:\n  student_timesteps: {bad}\n"));
        assert!(e.contains("method.student_timesteps"), "{bad}: {e}");
        assert!(e.contains("descending"), "{bad}: {e}");
    }
    let e = err(&format!(
        "{TEACHER}method:\n  student_timesteps: [900, 500]\n"
    ));
    assert!(
        e.contains("starting at method.student_timestep (999)"),
        "{e}"
    );
    // Gradient checkpointing recomputes a few-step student's pass too
    // (worker/src/vsd/recompute.rs): the combination is accepted.
    let checkpointed = parse(&format!(
        "{TEACHER}method:\n  student_timesteps: [999, 499]\ntrain:\n  gradient_checkpointing: true\n"
    ))
    .unwrap();
    assert!(checkpointed.train.gradient_checkpointing);
    assert_eq!(checkpointed.method.student_steps(), vec![999, 499]);
}

#[test]
fn student_init_is_absent_unless_set_and_a_change_when_set() {
    let plain = parse("name: a\nmodel:\n  teacher: /t\n").unwrap();
    let json = serde_json::to_string(&plain).unwrap();
    assert!(
        !json.contains("student_init"),
        "unset, it leaves the serialized config (and so every old fingerprint) as it was"
    );
    let init = parse("name: a\nmodel:\n  teacher: /t\n  student_init: /u\n").unwrap();
    assert_eq!(init.model.student_init.as_deref(), Some("/u"));
    assert_ne!(plain.fingerprint(), init.fingerprint());
    let changes = init.training_changes_from(&plain);
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].key, "model.student_init");
}

/// `world.shard_state`: `none` by default and then not written (configs
/// serialize as before), the stages parse, a bad value names the choices;
/// memory only: no fingerprint change, no training change.
#[test]
fn shard_state_parses_and_is_memory_only() {
    use swiftbrush_proto::config::ShardState;
    let c = parse(TEACHER).unwrap();
    assert_eq!(c.world.shard_state, ShardState::None);
    assert!(!c.to_yaml().contains("shard_state"), "{}", c.to_yaml());
    for (yaml, want) in [
        ("optimizer", ShardState::Optimizer),
        ("optimizer_and_gradients", ShardState::OptimizerAndGradients),
        ("none", ShardState::None),
    ] {
        let s = parse(&format!("{TEACHER}world:\n  shard_state: {yaml}\n")).unwrap();
        assert_eq!(s.world.shard_state, want);
        assert_eq!(s.fingerprint(), c.fingerprint(), "{yaml}");
        assert_eq!(s.training_changes_from(&c), vec![], "{yaml}");
        let back = JobConfig::from_yaml_str(&s.to_yaml(), "round trip").unwrap();
        assert_eq!(back.world.shard_state, want);
    }
    let e = err(&format!("{TEACHER}world:\n  shard_state: zero3\n"));
    assert!(e.contains("world.shard_state"), "{e}");
    assert!(e.contains("optimizer_and_gradients"), "{e}");
}

/// A full student's `method.student` serializes as the optimizer it was
/// before `kind` existed, so the fingerprints of existing runs stay put;
/// `kind: lora` parses with its own adapters and is a training change.
#[test]
fn a_full_student_serializes_as_before_and_a_lora_student_parses() {
    let full = parse(TEACHER).unwrap();
    assert_eq!(
        serde_json::to_value(&full.method.student).unwrap(),
        serde_json::to_value(full.method.student.optimizer()).unwrap(),
        "method.student of a full student must serialize as the optimizer alone"
    );
    assert_eq!(full.method.student.lora_adapters(), None);

    let lora = parse(&format!(
        "{TEACHER}method:\n  student:\n    lr: 0.0001\n    kind: lora\n    lora:\n      rank: 16\n      \
         alpha: 16\n      target_modules: [to_q, conv1]\n"
    ))
    .unwrap();
    let adapters = lora.method.student.lora_adapters().unwrap();
    assert_eq!((adapters.rank, adapters.target_modules.len()), (16, 2));
    assert_eq!(lora.method.student.lr, 1e-4);
    let again = JobConfig::from_yaml_str(&lora.to_yaml(), "resolved").unwrap();
    assert_eq!(again, lora, "the resolved LoRA student parses back");
    // Unset adapters: method.lora's defaults.
    let plain = parse(&format!(
        "{TEACHER}method:\n  student:\n    lr: 0.0001\n    kind: lora\n"
    ))
    .unwrap();
    assert_eq!(plain.method.student.lora_adapters().unwrap().rank, 64);

    let changes: Vec<String> = lora
        .training_changes_from(&full)
        .iter()
        .map(|c| c.key.clone())
        .collect();
    assert!(
        changes.contains(&"method.student.kind".to_owned()),
        "{changes:?}"
    );
    assert!(
        changes.contains(&"method.student.lora".to_owned())
            || changes
                .iter()
                .any(|k| k.starts_with("method.student.lora.")),
        "{changes:?}"
    );
    assert_ne!(lora.fingerprint(), full.fingerprint());
}

#[test]
fn a_lora_student_refuses_what_it_cannot_have_naming_the_keys() {
    let e = err(&format!(
        "{TEACHER}method:\n  student:\n    lr: 0.0001\n    lora:\n      rank: 4\n"
    ));
    assert!(e.contains("method.student.lora"), "{e}");
    let e = err(
        "model:\n  teacher: /models/sd\n  student_init: /models/other\nmethod:\n  student:\n    \
         lr: 0.0001\n    kind: lora\n    lora:\n      rank: 0\n      target_modules: [to_x]\n\
         world:\n  shard_state: optimizer\n",
    );
    for key in [
        "model.student_init",
        "world.shard_state",
        "method.student.lora.rank",
        "method.student.lora.target_modules[0]",
    ] {
        assert!(e.contains(key), "{key} not named in: {e}");
    }
    let e = err(&format!(
        "{TEACHER}method:\n  student:\n    lr: 0.0001\n    kind: half\n"
    ));
    assert!(e.contains("method.student.kind"), "{e}");
}

#[test]
fn text_encoder_dtype_is_fp32_unwritten_by_default_and_a_change_when_set() {
    let plain = parse(TEACHER).unwrap();
    assert_eq!(plain.precision.text_encoder_dtype, Dtype::Fp32);
    let json = serde_json::to_string(&plain).unwrap();
    assert!(
        !json.contains("text_encoder_dtype"),
        "fp32, it leaves the serialized config (and so every old fingerprint) as it was"
    );
    let fp32 = parse(&format!(
        "{TEACHER}precision:\n  text_encoder_dtype: fp32\n"
    ))
    .unwrap();
    assert_eq!(fp32.fingerprint(), plain.fingerprint());
    let bf16 = parse(&format!(
        "{TEACHER}precision:\n  text_encoder_dtype: bf16\n"
    ))
    .unwrap();
    assert_eq!(bf16.precision.text_encoder_dtype, Dtype::Bf16);
    assert_ne!(bf16.fingerprint(), plain.fingerprint());
    let changes: Vec<String> = bf16
        .training_changes_from(&plain)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(changes, ["precision.text_encoder_dtype: unset -> \"bf16\""]);
    let e = err(&format!(
        "{TEACHER}precision:\n  text_encoder_dtype: int8\n"
    ));
    assert!(e.contains("precision.text_encoder_dtype"), "{e}");
}
