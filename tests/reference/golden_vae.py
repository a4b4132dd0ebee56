"""Golden tensors for the Rust AutoencoderKL (worker/tests/vae.rs).

For each tiny pipeline: diffusers' decode of seeded latents (no scaling, the
caller divides by scaling_factor) and the encoder's posterior mean and
clamped logvar for a seeded image. For the real SD VAE config kept in
worker/src/models/configs: key names and shapes built on the meta device."""

import os

import torch
from diffusers import AutoencoderKL

import pipelines as pl
from common import save_tensors
from golden_unet import CONFIGS, write_meta_keys


@torch.no_grad()
def build(root, pipelines):
    for i, kind in enumerate(pl.PIPELINES):
        vae = pl.load(pipelines[kind]).vae.eval()
        g = torch.Generator().manual_seed(8000 + i)
        latents = torch.randn(2, 4, 8, 8, generator=g)
        image = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
        posterior = vae.encode(image).latent_dist
        save_tensors(
            os.path.join(root, "golden", "vae", f"{kind}.safetensors"),
            {
                "latents": latents,
                "decoded": vae.decode(latents).sample,
                "image": image,
                "mean": posterior.mean,
                "logvar": posterior.logvar,
            },
        )
    write_meta_keys(
        AutoencoderKL,
        os.path.join(CONFIGS, "sd_vae.json"),
        os.path.join(root, "golden", "vae", "sd_vae_keys.json"),
    )
