"""Three tiny random Stable Diffusion pipelines in diffusers layout, saved with
save_pretrained. They cover what real SD checkpoints differ in:

- sd1:  conv proj_in/proj_out, quick_gelu text encoder, attention_head_dim as
        an int, tokenizer as vocab.json + merges.txt (the real SD repos' layout),
        pad token <|endoftext|>, DDIM with epsilon prediction.
- sd2:  linear projection, gelu text encoder, attention_head_dim as a per-block
        list (diffusers reads it as the number of heads), upcast_attention,
        tokenizer.json only (what transformers 5 writes), pad token "!".
- sd2v: sd2's architecture with v-prediction.

Weights are diffusers' random init plus seeded noise (common.perturb), so
every tensor, biases and norms included, carries a value a loader must get
right."""

import os

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from common import perturb, write_clip_tokenizer_files

NUM_MERGES = 2000  # tiny vocab: 512 byte tokens + 2000 merges + 2 specials

PIPELINES = ("sd1", "sd2", "sd2v")


def unet(kind):
    if kind == "sd1":
        return UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=16,
            use_linear_projection=False,
        )
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        upcast_attention=True,
    )


def text_encoder(kind, vocab_size):
    hidden = 32 if kind == "sd1" else 48
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4 - 3,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        hidden_act="quick_gelu" if kind == "sd1" else "gelu",
        projection_dim=hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1 if kind == "sd1" else 0,
    )
    return CLIPTextModel(cfg)


def vae(kind):
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1 if kind == "sd1" else 2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=16,
        scaling_factor=0.18215,
    )


def scheduler(kind):
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if kind == "sd2v" else "epsilon",
    )


def build(root):
    """Writes root/pipelines/{sd1,sd2,sd2v}/ and returns their paths."""
    paths = {}
    for i, kind in enumerate(PIPELINES):
        out = os.path.join(root, "pipelines", kind)
        torch.manual_seed(1000 + i)
        tok_dir = os.path.join(root, "tokenizers", kind)
        vocab_size = write_clip_tokenizer_files(
            tok_dir, NUM_MERGES, pad_token="<|endoftext|>" if kind == "sd1" else "!"
        )
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        parts = {
            "unet": unet(kind),
            "text_encoder": text_encoder(kind, vocab_size),
            "vae": vae(kind),
        }
        for j, (name, module) in enumerate(sorted(parts.items())):
            perturb(module, seed=10 * i + j)
            module.eval()
        pipe = StableDiffusionPipeline(
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            tokenizer=tokenizer,
            unet=parts["unet"],
            scheduler=scheduler(kind),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(out, safe_serialization=True)
        if kind == "sd1":
            # The real SD 1.x/2.x repositories ship vocab.json + merges.txt;
            # transformers 5 writes tokenizer.json only. Keep the former here.
            tdir = os.path.join(out, "tokenizer")
            for f in os.listdir(tdir):
                os.remove(os.path.join(tdir, f))
            write_clip_tokenizer_files(tdir, NUM_MERGES)
        paths[kind] = out
    return paths


def load(path):
    """Loads a fixture pipeline back from disk, fp32 on CPU: the goldens are
    computed from exactly what the Rust side reads."""
    pipe = StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
