"""Writes a diffusers pipeline folder with RANDOM weights in the layout of
Stable Diffusion 2.1-base, for speed work without downloading a checkpoint:
the step's cost depends on shapes, not on what the weights learned.

Scales:
  full      SD 2.1-base's shapes: UNet 865,910,724 parameters (its config.json
            verbatim), OpenCLIP-ViT-H text encoder (23 layers, 1024 wide), SD's
            VAE, the full 49,408-token CLIP vocabulary. Latents 64x64 at 512 px.
  sd-small  SD 2.1-base's block layout (4 blocks, the same block types, heads
            of 64 channels, linear projection, 4 latent channels) at a fifth
            of the width, a small text encoder: CPU speed work at 32x32
            latents (model.resolution 256).
  tiny      the same layout again, narrow and one layer per block: a dry run
            in seconds on a CPU at 8x8 latents (model.resolution 64; the
            fixtures' resolution 16 would give 2x2 latents that the UNet's
            three downsamplings reduce to 1x1, where GroupNorm degenerates).

Usage:
  python bench/make_sd21_shaped_teacher.py --out /tmp/sd21-shaped --scale full \
      [--dtype fp32|bf16|fp16] [--device cuda:0] [--seed 0] [--count-only]

Every config stays within what worker/src/models/ accepts (SD 1.x/2.x block
types, attention_head_dim as the per-block head count, no num_attention_heads,
4-block VAEs so that latents are resolution / 8 as with SD's).
"""

import argparse
import os
import shutil
import sys
import tempfile

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The CLIP BPE files, written without a download (from open-clip-torch's
# merges file, as the test fixtures do).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
from common import write_clip_tokenizer_files  # noqa: E402

DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# Per scale: UNet width, heads per block (diffusers reads attention_head_dim
# as the head count; SD 2.x has 64-channel heads: 320/64 = 5 ...), layers per
# block, latent side; text encoder; VAE width; BPE merges kept (None: all).
SCALES = {
    "full": dict(
        unet=((320, 640, 1280, 1280), (5, 10, 20, 20), 2, 64),
        text=dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16,
                  intermediate_size=4096, projection_dim=512),
        vae=((128, 256, 512, 512), 2, 512),
        merges=None,
    ),
    "sd-small": dict(
        unet=((64, 128, 256, 256), (1, 2, 4, 4), 2, 32),
        text=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=1024, projection_dim=256),
        vae=((32, 64, 128, 128), 1, 256),
        merges=2000,
    ),
    "tiny": dict(
        unet=((32, 64, 64, 64), (1, 2, 2, 2), 1, 8),
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=256, projection_dim=64),
        vae=((32, 32, 32, 32), 1, 64),
        merges=2000,
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def unet(s):
    channels, heads, layers, sample = s["unet"]
    return UNet2DConditionModel(
        sample_size=sample,
        in_channels=4,
        out_channels=4,
        layers_per_block=layers,
        block_out_channels=channels,
        down_block_types=DOWN,
        up_block_types=UP,
        cross_attention_dim=s["text"]["hidden_size"],  # 1024 for SD 2.x: the text width
        attention_head_dim=heads,
        norm_num_groups=32,
        use_linear_projection=True,
        upcast_attention=False,  # 2.1-base: false (2.1 at 768 px: true)
    )


def text_encoder(s, vocab_size):
    # bos/eos are the last two ids of the CLIP vocabulary; the pad token is
    # "!" (id 0), as in SD 2.x's tokenizer.
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            max_position_embeddings=77,
            hidden_act="gelu",  # OpenCLIP's; SD 1.x's ViT-L uses quick_gelu
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=0,
            **s["text"],
        )
    )


def vae(s):
    channels, layers, sample = s["vae"]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample,
        scaling_factor=0.18215,
    )


def scheduler():
    # stabilityai/stable-diffusion-2-1-base's scheduler_config.json.
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


def count(module):
    return sum(p.numel() for p in module.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    ap.add_argument("--device", default="cpu", help="where to build (initialising 865M parameters is faster on cuda)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count-only", action="store_true",
                    help="build on the meta device and print the parameter counts; writes nothing")
    args = ap.parse_args()
    s = SCALES[args.scale]

    with tempfile.TemporaryDirectory() as tmp:
        # Tokenizer: the full scale has CLIP's whole vocabulary (49,408 = the
        # ViT-H text encoder's vocab_size); the small ones keep the first 2000
        # merges and set the text encoder's vocab_size to the tokenizer's.
        vocab_size = write_clip_tokenizer_files(tmp, s["merges"], pad_token="!")
        device = torch.device("meta" if args.count_only else args.device)
        torch.manual_seed(args.seed)
        with device:
            parts = {"unet": unet(s), "text_encoder": text_encoder(s, vocab_size), "vae": vae(s)}
        for name, module in parts.items():
            print(f"{name:13} {count(module):>13,} parameters")
        if args.count_only:
            return
        for module in parts.values():
            module.eval()
            if device.type != "cpu" or args.dtype != "fp32":
                module.to("cpu", DTYPES[args.dtype])
        pipe = StableDiffusionPipeline(
            tokenizer=CLIPTokenizer.from_pretrained(tmp),
            scheduler=scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **parts,
        )
        pipe.save_pretrained(args.out, safe_serialization=True)
        # The real SD repositories ship vocab.json + merges.txt (transformers 5
        # writes tokenizer.json only): keep that layout.
        tok_dir = os.path.join(args.out, "tokenizer")
        shutil.rmtree(tok_dir)
        write_clip_tokenizer_files(tok_dir, s["merges"], pad_token="!")
    print(f"wrote {args.out} ({args.scale}, {args.dtype}, tokenizer {vocab_size} tokens)")


if __name__ == "__main__":
    main()
