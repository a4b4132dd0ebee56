//! `swiftbrush plan`'s resident counts are exact: the elements it counts
//! from the config.json files alone equal the tensors in the fixtures'
//! weight files, for every fixture pipeline and for DMD2's fake score.

mod common;

use std::path::Path;

use swiftbrush_proto::JobConfig;
use swiftbrush_worker::pipeline::DiffusersFolder;
use swiftbrush_worker::plan::resident;

/// Elements of every tensor in a safetensors file, by reading its header.
fn numel(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.tensors()
        .iter()
        // transformers' buffer, not a parameter (the loader drops it).
        .filter(|(name, _)| !name.ends_with("position_ids"))
        .map(|(_, info)| info.shape.iter().product::<usize>() as u64)
        .sum()
}

fn config(teacher: &Path, fake_score: &str) -> JobConfig {
    let yaml = format!(
        "name: t\nmodel:\n  teacher: {}\n  resolution: 16\nmethod:\n  lora:\n    rank: 4\n    alpha: 8\n  fake_score:\n    kind: {fake_score}\n\
         train:\n  global_batch: 2\n  sample_every_steps: 1\n  sample_prompts: [a]\n",
        teacher.display()
    );
    JobConfig::from_yaml_str(&yaml, "test").unwrap()
}

#[test]
fn counts_from_configs_equal_the_fixture_weight_files() {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/toy-teacher");
    for (kind, dir) in ["sd1", "sd2", "sd2v"]
        .map(|k| (k, common::pipeline(k)))
        .into_iter()
        .chain([("toy", toy)])
    {
        let folder = DiffusersFolder::open(&dir).unwrap();
        let c = resident::count(&config(&dir, "lora"), &folder).unwrap();
        let unet = numel(&dir.join("unet/diffusion_pytorch_model.safetensors"));
        let text = numel(&dir.join("text_encoder/model.safetensors"));
        assert_eq!(c.unet, unet, "{kind}: UNet");
        assert_eq!(c.text_encoder, text, "{kind}: text encoder");
        let vae = dir.join("vae/diffusion_pytorch_model.safetensors");
        assert_eq!(c.vae, vae.exists().then(|| numel(&vae)), "{kind}: VAE");
        assert!(c.lora > 0, "{kind}: adapters");
    }
}

#[test]
fn resident_parts_take_their_dtypes_and_the_fake_score_form() {
    let dir = common::pipeline("sd1");
    let folder = DiffusersFolder::open(&dir).unwrap();
    let mut cfg = config(&dir, "unet");
    cfg.precision.teacher_dtype = swiftbrush_proto::config::Dtype::Bf16;
    let c = resident::count(&cfg, &folder).unwrap();
    let parts = resident::parts(&cfg, &c, 1);
    let bytes = |name: &str| parts.iter().find(|p| p.name == name).unwrap().bytes;
    assert_eq!(bytes("teacher UNet"), 2 * c.unet);
    assert_eq!(bytes("student"), 4 * c.unet);
    // DMD2: a full float32 copy with its gradients and both moments.
    assert_eq!(bytes("fake score UNet (DMD2) Adam exp_avg_sq"), 4 * c.unet);
    let total: u64 = parts.iter().map(|p| p.bytes).sum();
    let vae = 4 * c.vae.unwrap();
    // teacher 2 + student, grads, m, v, EMA 4 each + copy, grads, m, v 4 each.
    assert_eq!(total, (2 + 20 + 16) * c.unet + 4 * c.text_encoder + vae);
    // precision.text_encoder_dtype: the encoder in its own dtype.
    assert_eq!(bytes("text encoder"), 4 * c.text_encoder);
    cfg.precision.text_encoder_dtype = swiftbrush_proto::config::Dtype::Fp16;
    let parts = resident::parts(&cfg, &c, 1);
    let half = parts.iter().find(|p| p.name == "text encoder").unwrap();
    assert_eq!(half.bytes, 2 * c.text_encoder);
}

/// SDXL: the resident text encoder is both encoders (the second with its
/// projection), as their weight files hold.
#[test]
fn sdxl_counts_both_text_encoders() {
    let dir = common::pipeline("sdxl");
    let folder = DiffusersFolder::open(&dir).unwrap();
    let c = resident::count(&config(&dir, "lora"), &folder).unwrap();
    let text = numel(&dir.join("text_encoder/model.safetensors"))
        + numel(&dir.join("text_encoder_2/model.safetensors"));
    assert_eq!(c.text_encoder, text);
    assert_eq!(
        c.unet,
        numel(&dir.join("unet/diffusion_pytorch_model.safetensors"))
    );
}

/// `world.shard_state`: the student's and DMD2's moments and the EMA count
/// a rank's slice, ceil(n / W) elements; the gradients stay whole (the
/// backward fills them), the LoRA adapters' state stays replicated. The
/// checkpoint's gather holds one bounded piece on the device.
#[test]
fn sharded_state_counts_a_ranks_slice() {
    use swiftbrush_proto::config::ShardState;
    let dir = common::pipeline("sd1");
    let folder = DiffusersFolder::open(&dir).unwrap();
    for (fake, fake_moments) in [("unet", true), ("lora", false)] {
        let mut cfg = config(&dir, fake);
        let c = resident::count(&cfg, &folder).unwrap();
        let total = |cfg: &JobConfig, w: u32| -> u64 {
            resident::parts(cfg, &c, w).iter().map(|p| p.bytes).sum()
        };
        let replicated = total(&cfg, 3);
        for state in [ShardState::Optimizer, ShardState::OptimizerAndGradients] {
            cfg.world.shard_state = state;
            let slice = c.unet.div_ceil(3);
            // Student: m, v and EMA; DMD2's copy: m and v.
            let shed = 3 * 4 * (c.unet - slice)
                + if fake_moments {
                    2 * 4 * (c.unet - slice)
                } else {
                    0
                };
            assert_eq!(replicated - total(&cfg, 3), shed, "{fake}, {state:?}");
            assert_eq!(
                total(&cfg, 1),
                replicated,
                "{fake}, {state:?}: a world of one"
            );
            let parts = resident::parts(&cfg, &c, 3);
            let p = parts
                .iter()
                .find(|p| p.name == "student EMA (this rank's slice)")
                .unwrap();
            assert_eq!(p.elements, slice);
            assert!(
                parts
                    .iter()
                    .any(|p| p.name == "student gradients" && p.elements == c.unet)
            );
            // The checkpoint's gather: the tiny UNet is one piece (every
            // rank's slice, padded to the longest), rank 0's host the
            // gathered moments and EMA; a large UNet's piece is the cap.
            let g = resident::gather_transient(&cfg, &c, 3).unwrap();
            assert_eq!(g.device_piece, 3 * slice * 4, "{fake}, {state:?}");
            let state_bytes = (3 + if fake_moments { 2 } else { 0 }) * 4 * c.unet;
            assert_eq!(g.host, state_bytes + g.device_piece);
            let large = resident::Counts {
                unet: 1 << 30,
                ..c.clone()
            };
            let cap = swiftbrush_worker::shard::gather::PIECE_BYTES as u64;
            let piece = resident::gather_transient(&cfg, &large, 3)
                .unwrap()
                .device_piece;
            assert!(piece <= cap && piece > cap - 12, "{piece}");
        }
        assert!(resident::gather_transient(&config(&dir, fake), &c, 3).is_none());
    }
}
