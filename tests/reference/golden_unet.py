"""Golden tensors for the Rust UNet2DConditionModel (worker/tests/unet.rs).

For each tiny pipeline: diffusers' UNet output for seeded inputs, with a
different timestep per sample, with one 0-d timestep for the whole batch, and
on a latent whose size is not a multiple of the total upsampling factor
(diffusers then passes explicit upsample sizes). For the real SD 1.5 and
SD 2.1-base configs kept in worker/src/models/configs: the state-dict key
names and shapes of diffusers' model built on the meta device (no weights),
so the Rust test can compare names, shapes and counts without downloading
anything."""

import json
import os

import torch
from diffusers import UNet2DConditionModel

import pipelines as pl
from common import save_tensors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "worker", "src", "models", "configs")
REAL_CONFIGS = {"sd15": "sd15_unet.json", "sd21_base": "sd21_base_unet.json"}


def write_meta_keys(cls, config_path, out_path):
    """Writes the model's config text, parameter count and sorted
    state-dict keys with shapes, built on the meta device."""
    with open(config_path) as f:
        text = f.read()
    with torch.device("meta"):
        model = cls.from_config(json.loads(text))
    tensors = {k: list(v.shape) for k, v in sorted(model.state_dict().items())}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(
            {
                "config_text": text,
                "num_params": sum(p.numel() for p in model.parameters()),
                "tensors": tensors,
            },
            f,
            indent=1,
        )


@torch.no_grad()
def build(root, pipelines):
    for i, kind in enumerate(pl.PIPELINES):
        unet = pl.load(pipelines[kind]).unet.eval()
        g = torch.Generator().manual_seed(7000 + i)
        dim = unet.config.cross_attention_dim
        sample = torch.randn(2, 4, 8, 8, generator=g)
        timesteps = torch.tensor([999, 37], dtype=torch.int64)
        context = torch.randn(2, 77, dim, generator=g)
        odd_sample = torch.randn(2, 4, 6, 10, generator=g)
        odd_timesteps = torch.tensor([500.0, 3.0])
        save_tensors(
            os.path.join(root, "golden", "unet", f"{kind}.safetensors"),
            {
                "sample": sample,
                "timesteps": timesteps,
                "encoder_hidden_states": context,
                "out": unet(sample, timesteps, context).sample,
                "scalar_timestep": torch.tensor(250, dtype=torch.int64),
                "out_scalar_timestep": unet(sample, torch.tensor(250), context).sample,
                "odd_sample": odd_sample,
                "odd_timesteps": odd_timesteps,
                "out_odd": unet(odd_sample, odd_timesteps, context).sample,
            },
        )
    for name, file in REAL_CONFIGS.items():
        write_meta_keys(
            UNet2DConditionModel,
            os.path.join(CONFIGS, file),
            os.path.join(root, "golden", "unet", f"{name}_keys.json"),
        )
