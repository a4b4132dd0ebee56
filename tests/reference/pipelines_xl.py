"""A tiny random Stable Diffusion XL pipeline in diffusers layout, saved with
save_pretrained (root/pipelines/sdxl). It mirrors what the real
stabilityai/stable-diffusion-xl-base-1.0 folder has:

- unet: DownBlock2D first, then cross-attention blocks; per-block
  transformer_layers_per_block (the mid block takes the last); linear
  projections; attention_head_dim read as a number of heads;
  addition_embed_type "text_time" with its own addition_time_embed_dim and
  projection_class_embeddings_input_dim = 6 x addition_time_embed_dim +
  text_encoder_2's projection_dim; upcast_attention null as in SDXL's file.
- text_encoder: CLIPTextModel (quick_gelu), tokenizer pads with
  <|endoftext|>; text_encoder_2: CLIPTextModelWithProjection (gelu,
  projection_dim != hidden_size, eos_token_id 2 as the real config: the
  pooled row is the argmax of the ids), tokenizer_2 pads with "!".
- vae: scaling_factor 0.13025, force_upcast true.
- scheduler: EulerDiscreteScheduler with SDXL's values.
- model_index.json: force_zeros_for_empty_prompt true.

Seeds differ from pipelines.py's, which it leaves untouched."""

import os

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from common import perturb, write_clip_tokenizer_files

NUM_MERGES = 2000
TIME_DIM = 8
PROJECTION_DIM = 24
HIDDEN = (32, 48)


def unet():
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=HIDDEN[0] + HIDDEN[1],
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        upcast_attention=None,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + PROJECTION_DIM,
    )


def text_config(hidden, vocab_size, act, **kw):
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4 - 3,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        hidden_act=act,
        **kw,
    )


def vae():
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=16,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def scheduler():
    # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )


def build(root):
    """Writes root/pipelines/sdxl/ and returns its path."""
    out = os.path.join(root, "pipelines", "sdxl")
    torch.manual_seed(2000)
    tok_dirs = [os.path.join(root, "tokenizers", n) for n in ("sdxl_1", "sdxl_2")]
    vocab_size = write_clip_tokenizer_files(tok_dirs[0], NUM_MERGES)
    write_clip_tokenizer_files(tok_dirs[1], NUM_MERGES, pad_token="!")
    tokenizers = [CLIPTokenizer.from_pretrained(d) for d in tok_dirs]
    parts = {
        "unet": unet(),
        "text_encoder": CLIPTextModel(
            text_config(
                HIDDEN[0], vocab_size, "quick_gelu",
                bos_token_id=vocab_size - 2, eos_token_id=2, pad_token_id=1,
            )
        ),
        "text_encoder_2": CLIPTextModelWithProjection(
            text_config(
                HIDDEN[1], vocab_size, "gelu", projection_dim=PROJECTION_DIM,
                bos_token_id=0, eos_token_id=2, pad_token_id=1,
            )
        ),
        "vae": vae(),
    }
    for j, (name, module) in enumerate(sorted(parts.items())):
        perturb(module, seed=200 + j)
        module.eval()
    pipe = StableDiffusionXLPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=parts["unet"],
        scheduler=scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # The real repository ships vocab.json + merges.txt for both tokenizers.
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        tdir = os.path.join(out, name)
        for f in os.listdir(tdir):
            os.remove(os.path.join(tdir, f))
        write_clip_tokenizer_files(tdir, NUM_MERGES, pad_token=pad)
    return out


def load(path, scheduler_class=None):
    """The fixture back from disk, fp32 on CPU; optionally with another
    scheduler built from the folder's scheduler config."""
    pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=torch.float32, add_watermarker=False)
    if scheduler_class is not None:
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe
