"""Golden tensors for the teacher under CPU autocast (worker/tests/autocast.rs).

1. The tiny UNets' outputs for seeded inputs in float32 and under
   torch.autocast("cpu", dtype=bfloat16 / float16): the Rust UNet under the
   precision guard (csrc/autocast.cpp) must match the autocast outputs far
   more closely than they differ from float32.
2. One SwiftBrush iteration on sd1 as golden_vsd.py computes it, except that
   the three teacher passes (frozen, LoRA, LoRA with gradients) run under
   bf16 autocast with their outputs cast to float32 before any schedule,
   guidance or loss arithmetic; the student pass stays float32.
"""

import copy
import os

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import pipelines as pl
from common import save_tensors
from golden_vsd import A, ALPHA, GUIDANCE, PROMPTS, RANK, TARGETS, encode, to_eps

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_pass(unet, x, t, c, dtype):
    """A teacher forward under CPU autocast; float32 out."""
    with torch.autocast("cpu", dtype=dtype):
        out = unet(x, t, c).sample
    return out.float()


@torch.no_grad()
def unet_outputs(root, pipelines):
    for i, kind in enumerate(("sd1", "sd2v")):
        unet = pl.load(pipelines[kind]).unet.eval()
        g = torch.Generator().manual_seed(9100 + i)
        dim = unet.config.cross_attention_dim
        sample = torch.randn(2, 4, 8, 8, generator=g)
        timesteps = torch.tensor([999, 37], dtype=torch.int64)
        context = torch.randn(2, 77, dim, generator=g)
        out = {
            "sample": sample,
            "timesteps": timesteps,
            "encoder_hidden_states": context,
            "out_fp32": unet(sample, timesteps, context).sample,
        }
        for name, dtype in AUTOCAST.items():
            out[f"out_{name}"] = teacher_pass(unet, sample, timesteps, context, dtype)
        save_tensors(os.path.join(root, "golden", "autocast", f"unet_{kind}.safetensors"), out)


def guided(unet, x, t, cond, uncond, ptype, abar_t, dtype):
    b = x.shape[0]
    xx = torch.cat([x, x])
    out = teacher_pass(unet, xx, torch.cat([t, t]), torch.cat([uncond.expand(b, -1, -1), cond]), dtype)
    out = to_eps(out, xx, torch.cat([abar_t, abar_t]), ptype)
    u, c = out.chunk(2)
    return u + GUIDANCE * (c - u)


def vsd_step(pipe, seed, dtype):
    """golden_vsd.run with the teacher passes under autocast."""
    # peft initialises lora_A from the global generator: seed it, so this
    # golden does not depend on what ran before it.
    torch.manual_seed(seed)
    ptype = pipe.scheduler.config.prediction_type
    abar = pipe.scheduler.alphas_cumprod.to(torch.float32)
    teacher = pipe.unet
    student = copy.deepcopy(teacher)
    teacher.requires_grad_(False)
    teacher.add_adapter(
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=True)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(teacher.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora_params = {n: p for n, p in teacher.named_parameters() if p.requires_grad}
    adapters = {k: v.detach().clone() for k, v in get_peft_model_state_dict(teacher).items()}

    cond = encode(pipe, PROMPTS)
    uncond = encode(pipe, [""])
    b = len(PROMPTS)
    shape = (b, 4, 8, 8)
    z = torch.randn(shape, generator=g)
    t = torch.tensor([137, 901])
    eps = torch.randn(shape, generator=g)
    t2 = torch.tensor([3, 640])
    eps2 = torch.randn(shape, generator=g)

    s_out = student(z, torch.full((b,), 999), cond).sample
    eps_s = to_eps(s_out, z, torch.tensor(A).view(1, 1, 1, 1), ptype)
    x0 = (z - (1 - A) ** 0.5 * eps_s) / A**0.5
    abar_t = abar[t].view(-1, 1, 1, 1)
    x_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps
    with torch.no_grad():
        xd = x_t.detach()
        teacher.disable_adapters()
        e_t = guided(teacher, xd, t, cond, uncond, ptype, abar_t, dtype)
        teacher.enable_adapters()
        e_l = guided(teacher, xd, t, cond, uncond, ptype, abar_t, dtype)
    grad = torch.nan_to_num((1 - abar_t) * (e_t - e_l))
    loss_vsd = 0.5 * torch.nn.functional.mse_loss(
        x0.float(), (x0 - grad).detach().float(), reduction="mean"
    )
    loss_vsd.backward()
    x0d = x0.detach()
    abar_t2 = abar[t2].view(-1, 1, 1, 1)
    x2 = abar_t2.sqrt() * x0d + (1 - abar_t2).sqrt() * eps2
    pred = to_eps(teacher_pass(teacher, x2, t2, cond, dtype), x2, abar_t2, ptype)
    loss_lora = torch.mean((abar_t2.sqrt() * (pred - eps2)) ** 2)
    loss_lora.backward()

    out = {
        "z": z,
        "t": t,
        "eps": eps,
        "t_lora": t2,
        "eps_lora": eps2,
        "cond": cond,
        "uncond": uncond,
        "loss_vsd": loss_vsd.detach().reshape(1),
        "loss_lora": loss_lora.detach().reshape(1),
    }
    for k, v in adapters.items():
        out[f"adapter.{k}"] = v
    for n, p in student.named_parameters():
        out[f"student_grad.{n}"] = p.grad
    for n, p in lora_params.items():
        out[f"lora_grad.{n.replace('.default', '')}"] = p.grad
    return out


def build(root, pipelines):
    unet_outputs(root, pipelines)
    # The Rust test computes the float32 baseline itself on these inputs.
    out = vsd_step(pl.load(pipelines["sd1"]), 21, torch.bfloat16)
    save_tensors(os.path.join(root, "golden", "autocast", "vsd_sd1_bf16.safetensors"), out)
