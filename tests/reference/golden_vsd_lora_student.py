"""One SwiftBrush iteration with a LoRA student (method.student.kind: lora)
on the sd1 fixture: one diffusers UNet carries two named peft adapters, the
student ("student") and the fake score ("fake"); the frozen teacher is the
UNet with its adapters disabled (peft's add_adapter / set_adapter /
disable_adapters). With DMD2's full fake score ("_fullfake") the student's
adapter sits on the teacher and the fake score is its own copy.

Both adapters' B are seeded non-zero (B = 0 would make the student's A
gradient zero and the two scores equal), and saved, so the Rust side loads
the same. Saves both losses, the student adapters' gradients and the fake
score's gradients, as golden_vsd.py does."""

import copy
import os

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from common import save_tensors
from golden_vsd import A, PROMPTS, encode, guided, to_eps
from pipelines import load

STUDENT = dict(r=2, lora_alpha=6.0, target_modules=["to_k", "to_out.0", "conv1", "conv2"])
FAKE = dict(r=4, lora_alpha=8.0, target_modules=["to_q", "to_v"])


def lora_params(unet, name):
    """An adapter's parameters under the names ours use (no adapter name)."""
    return {
        n.replace(f".{name}", ""): p for n, p in unet.named_parameters() if f".{name}." in n
    }


def seed_b(params, g):
    with torch.no_grad():
        for n in sorted(params):
            if "lora_B" in n:
                params[n].copy_(torch.randn(params[n].shape, generator=g) * 0.05)


def run(pipe, null_condition, seed, fake):
    ptype = pipe.scheduler.config.prediction_type
    abar = pipe.scheduler.alphas_cumprod.to(torch.float32)
    unet = pipe.unet
    unet.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    saved = {}
    # DMD2's fake score: a copy of the teacher made before any adapter.
    fake_unet = copy.deepcopy(unet) if fake == "unet" else None
    unet.add_adapter(LoraConfig(init_lora_weights=True, **STUDENT), adapter_name="student")
    student_params = lora_params(unet, "student")
    seed_b(student_params, g)
    saved.update(
        {
            f"student_adapter.{k}": v.detach().clone()
            for k, v in get_peft_model_state_dict(unet, adapter_name="student").items()
        }
    )
    if fake == "unet":
        # Perturbed, every weight trainable.
        fake_unet.requires_grad_(True)
        with torch.no_grad():
            for _, p in sorted(fake_unet.named_parameters()):
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        fake_params = dict(fake_unet.named_parameters())
        saved.update({f"fake.{n}": p.detach().clone() for n, p in fake_params.items()})
        grad_prefix = "fake_grad."
    else:
        unet.add_adapter(LoraConfig(init_lora_weights=True, **FAKE), adapter_name="fake")
        fake_params = lora_params(unet, "fake")
        seed_b(fake_params, g)
        saved.update(
            {
                f"adapter.{k}": v.detach().clone()
                for k, v in get_peft_model_state_dict(unet, adapter_name="fake").items()
            }
        )
        grad_prefix = "lora_grad."

    def select(name):
        """The pass's adapters: None (the teacher) or one named set."""
        if name is None:
            unet.disable_adapters()
        else:
            unet.enable_adapters()
            unet.set_adapter(name)
        # set_adapter freezes the other sets; keep every adapter trainable
        # (an inactive one takes no part in the pass, so gets no gradient).
        for p in list(student_params.values()) + (
            list(fake_params.values()) if fake == "lora" else []
        ):
            p.requires_grad_(True)

    cond = encode(pipe, PROMPTS)
    uncond = encode(pipe, [""])
    b = len(PROMPTS)
    shape = (b, 4, 8, 8)
    z = torch.randn(shape, generator=g)
    t = torch.tensor([137, 901])
    eps = torch.randn(shape, generator=g)
    t2 = torch.tensor([3, 640])
    eps2 = torch.randn(shape, generator=g)

    # 1. the student's draw: the shared UNet with the student's adapters
    select("student")
    s_out = unet(z, torch.full((b,), 999), cond).sample
    eps_s = to_eps(s_out, z, torch.tensor(A).view(1, 1, 1, 1), ptype)
    x0 = (z - (1 - A) ** 0.5 * eps_s) / A**0.5
    abar_t = abar[t].view(-1, 1, 1, 1)
    x_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps
    # 3. the teacher (adapters disabled) and the fake score
    with torch.no_grad():
        select(None)
        e_t = guided(unet, x_t, t, cond, uncond, ptype, abar_t)
        if fake == "unet":
            e_l = to_eps(fake_unet(x_t, t, cond).sample, x_t, abar_t, ptype)
        else:
            select("fake")
            e_l = guided(unet, x_t, t, cond, uncond, ptype, abar_t)
    x0d = x0.detach()
    grad = torch.nan_to_num((1 - abar_t) * (e_t - e_l))
    loss_vsd = 0.5 * torch.nn.functional.mse_loss(x0.float(), (x0 - grad).detach().float())
    loss_vsd.backward()
    # 6. the fake score's denoising loss on the detached draw
    abar_t2 = abar[t2].view(-1, 1, 1, 1)
    x2 = abar_t2.sqrt() * x0d + (1 - abar_t2).sqrt() * eps2
    if fake == "unet":
        pred = to_eps(fake_unet(x2, t2, cond).sample, x2, abar_t2, ptype)
        loss_lora = torch.mean((pred - eps2) ** 2)
    else:
        select("fake")
        c2 = uncond.expand(b, -1, -1) if null_condition else cond
        pred = to_eps(unet(x2, t2, c2).sample, x2, abar_t2, ptype)
        loss_lora = torch.mean((abar_t2.sqrt() * (pred - eps2)) ** 2)
    loss_lora.backward()

    out = {
        "z": z,
        "t": t,
        "eps": eps,
        "t_lora": t2,
        "eps_lora": eps2,
        "null_condition": torch.tensor([int(null_condition)]),
        "cond": cond,
        "uncond": uncond,
        "x0_hat": x0.detach(),
        "loss_vsd": loss_vsd.detach().reshape(1),
        "loss_lora": loss_lora.detach().reshape(1),
    }
    out.update(saved)
    for n, p in student_params.items():
        out[f"student_grad.{n}"] = p.grad
    for n, p in fake_params.items():
        out[f"{grad_prefix}{n}"] = p.grad
    assert all(v is not None for v in out.values()), [k for k, v in out.items() if v is None]
    return {k: v.detach().cpu() for k, v in out.items()}


def build(root, pipelines):
    for suffix, null_condition, seed, fake in [
        ("", True, 31, "lora"),
        ("_fullfake", False, 32, "unet"),
    ]:
        out = run(load(pipelines["sd1"]), null_condition, seed, fake)
        name = f"sd1_lora_student{suffix}.safetensors"
        save_tensors(os.path.join(root, "golden", "vsd", name), out)
