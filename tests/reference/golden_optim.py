"""Adam with gradient clipping (torch.optim.Adam, clip_grad_norm_) and the
student EMA (diffusers EMAModel) on seeded parameters and gradients: the
Rust optimizer and EMA must follow the same trajectory."""

import os

import torch
from diffusers.training_utils import EMAModel

from common import save_tensors

SHAPES = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 2, 3, 3)}
NUM_STEPS = 3


def build(root, _pipelines):
    g = torch.Generator().manual_seed(7)
    params = {k: torch.nn.Parameter(torch.randn(s, generator=g)) for k, s in SHAPES.items()}
    grads = [{k: torch.randn(s, generator=g) * 2.0 for k, s in SHAPES.items()} for _ in range(NUM_STEPS)]
    out = {f"init.{k}": p.detach().clone() for k, p in params.items()}
    for i, step_grads in enumerate(grads):
        for k, v in step_grads.items():
            out[f"grad{i}.{k}"] = v
    names = sorted(params)
    ordered = [params[k] for k in names]
    opt = torch.optim.Adam(ordered, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ema = EMAModel(ordered, decay=0.9999, update_after_step=0, use_ema_warmup=False)
    for i in range(NUM_STEPS):
        for k in names:
            params[k].grad = grads[i][k].clone()
        norm = torch.nn.utils.clip_grad_norm_(ordered, 1.0)
        out[f"norm{i}"] = norm.reshape(1)
        opt.step()
        opt.zero_grad()
        ema.step(ordered)
        for k in names:
            out[f"param{i}.{k}"] = params[k].detach().clone()
        for k, s in zip(names, ema.shadow_params):
            out[f"ema{i}.{k}"] = s.detach().clone()
    save_tensors(os.path.join(root, "golden", "optim", "adam_ema.safetensors"), out)
