"""One SwiftBrush iteration, SPEC steps 1-6, on the sd1 and sd2v fixtures
with diffusers' UNet and peft's LoRA, from fixed draws (z, t, eps, t', eps',
null flag). Saves both losses, the student's gradient and the adapters'
gradient: the Rust step on the same weights and draws must match.

The adapters' B matrices are set to seeded non-zero values (B = 0 at
initialisation would make e_T == e_L and the VSD gradient zero, which
proves nothing); the adapters are saved so the Rust side loads the same."""

import copy
import os

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from common import save_tensors
from pipelines import load

A = 0.0047  # SPEC: the student's constant alpha-bar
GUIDANCE = 4.5
RANK, ALPHA = 4, 8.0
TARGETS = ["to_q", "to_v"]
# Adapters on the ResNet convolutions too (PEFT's Conv2d LoRA).
CONV_TARGETS = ["to_q", "to_v", "conv1", "conv2", "conv_shortcut"]
PROMPTS = ["a red circle on a white background", "a photo of a cat"]


def encode(pipe, prompts):
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def to_eps(pred, x, abar, prediction_type):
    """A model output as epsilon (v-prediction teachers, SPEC)."""
    if prediction_type == "v_prediction":
        return abar.sqrt() * pred + (1 - abar).sqrt() * x
    return pred


def plain_pass(unet, x, t, c):
    """A teacher forward as stored (float32 here)."""
    return unet(x, t, c).sample


def guided(unet, x, t, cond, uncond, ptype, abar_t, teacher_pass=plain_pass):
    b = x.shape[0]
    xx = torch.cat([x, x])
    out = teacher_pass(unet, xx, torch.cat([t, t]), torch.cat([uncond.expand(b, -1, -1), cond]))
    out = to_eps(out, xx, torch.cat([abar_t, abar_t]), ptype)
    u, c = out.chunk(2)
    return u + GUIDANCE * (c - u)


def run(
    pipe,
    kind,
    null_condition,
    seed,
    targets,
    teacher_pass=plain_pass,
    weighting="paper",
    fake="lora",
    device="cpu",
    student_pass=plain_pass,
    conditions=None,
):
    """The iteration; `teacher_pass` runs the three teacher forwards (frozen,
    LoRA, LoRA with gradients; golden_autocast.py puts them under autocast),
    `student_pass` the student's forward (float32 unless golden_autocast.py
    puts it under autocast too, precision.student_autocast). `weighting` is method.vsd_weighting,
    `fake` method.fake_score: "lora", or "unet" for DMD2's full trainable
    copy of the teacher as the fake score. `device`: where the iteration
    runs (scripts/gpu-check: "cuda"); weights and draws are made on the CPU
    first either way, so they are the same values everywhere.
    `conditions`: (cond, uncond) instead of encoding PROMPTS and "" with the
    pipeline's text encoder (golden_vsd_xl.py passes SDXL's, packed)."""
    ptype = pipe.scheduler.config.prediction_type
    abar = pipe.scheduler.alphas_cumprod.to(torch.float32)
    teacher = pipe.unet
    student = copy.deepcopy(teacher)
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    if fake == "unet":
        # Perturbed so that it differs from the teacher (an unperturbed
        # copy gives a zero VSD gradient, which proves nothing); saved so
        # the Rust side loads the same weights.
        fake_unet = copy.deepcopy(teacher).requires_grad_(True)
        with torch.no_grad():
            for _, p in sorted(fake_unet.named_parameters()):
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        fake_params = dict(fake_unet.named_parameters())
        saved = {f"fake.{n}": p.detach().clone() for n, p in fake_params.items()}
        grad_prefix = "fake_grad."
        real_model, fake_model = teacher, fake_unet
        disable = enable = lambda: None
    else:
        teacher.add_adapter(
            LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=True)
        )
        with torch.no_grad():
            for name, p in sorted(teacher.named_parameters()):
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        # peft names: ...to_q.lora_A.default.weight -> ...to_q.lora_A.weight
        fake_params = {
            n.replace(".default", ""): p for n, p in teacher.named_parameters() if p.requires_grad
        }
        saved = {
            f"adapter.{k}": v.detach().clone()
            for k, v in get_peft_model_state_dict(teacher).items()
        }
        grad_prefix = "lora_grad."
        real_model = fake_model = teacher
        disable, enable = teacher.disable_adapters, teacher.enable_adapters

    if conditions is None:
        cond = encode(pipe, PROMPTS)
        uncond = encode(pipe, [""])
    else:
        cond, uncond = conditions
    b = len(PROMPTS)
    shape = (b, 4, 8, 8)
    z = torch.randn(shape, generator=g)
    t = torch.tensor([137, 901])
    eps = torch.randn(shape, generator=g)
    t2 = torch.tensor([3, 640])
    eps2 = torch.randn(shape, generator=g)
    if device != "cpu":
        for model in {id(m): m for m in (teacher, student, real_model, fake_model)}.values():
            model.to(device)  # moves the parameters in place: fake_params stay valid
        cond, uncond, z, t, eps, t2, eps2 = (
            v.to(device) for v in (cond, uncond, z, t, eps, t2, eps2)
        )
        abar = abar.to(device)

    # 1. student draw
    t_student = torch.full((b,), 999, device=z.device)
    s_out = student_pass(student, z, t_student, cond)
    eps_s = to_eps(s_out, z, torch.tensor(A, device=z.device).view(1, 1, 1, 1), ptype)
    x0 = (z - (1 - A) ** 0.5 * eps_s) / A**0.5
    # 2. noise it
    abar_t = abar[t].view(-1, 1, 1, 1)
    x_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps
    # 3. both teachers with guidance
    with torch.no_grad():
        disable()
        e_t = guided(real_model, x_t, t, cond, uncond, ptype, abar_t, teacher_pass)
        enable()
        if fake == "unet":
            # DMD2 scores its fake on the caption alone (fake guidance 1).
            e_l = to_eps(teacher_pass(fake_model, x_t, t, cond), x_t, abar_t, ptype)
        else:
            e_l = guided(fake_model, x_t, t, cond, uncond, ptype, abar_t, teacher_pass)
    x0d = x0.detach()
    # 4-5. VSD gradient through the surrogate loss
    if weighting == "dmd":
        # DMD2's distribution matching gradient, as its code writes it: in
        # x0 space, normalised by the sample's mean |x0 - x0_real|.
        pred_real = (x_t - (1 - abar_t).sqrt() * e_t) / abar_t.sqrt()
        pred_fake = (x_t - (1 - abar_t).sqrt() * e_l) / abar_t.sqrt()
        p_real = x0d - pred_real
        p_fake = x0d - pred_fake
        grad = (p_real - p_fake) / torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True)
        grad = torch.nan_to_num(grad.detach())
    else:
        grad = torch.nan_to_num((1 - abar_t) * (e_t - e_l))
    loss_vsd = 0.5 * torch.nn.functional.mse_loss(
        x0.float(), (x0 - grad).detach().float(), reduction="mean"
    )
    loss_vsd.backward()
    # 6. LoRA teacher's denoising loss on the detached student draw
    abar_t2 = abar[t2].view(-1, 1, 1, 1)
    x2 = abar_t2.sqrt() * x0d + (1 - abar_t2).sqrt() * eps2
    if fake == "unet":
        # DMD2's fake-score loss: unweighted eps-MSE, no text dropout.
        pred = to_eps(teacher_pass(fake_model, x2, t2, cond), x2, abar_t2, ptype)
        loss_lora = torch.mean((pred - eps2) ** 2)
    else:
        c2 = uncond.expand(b, -1, -1) if null_condition else cond
        pred = to_eps(teacher_pass(fake_model, x2, t2, c2), x2, abar_t2, ptype)
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
    for n, p in student.named_parameters():
        out[f"student_grad.{n}"] = p.grad
    for n, p in fake_params.items():
        out[f"{grad_prefix}{n}"] = p.grad
    return {k: v.detach().cpu() for k, v in out.items()}


def build(root, pipelines):
    cases = [
        ("sd1", False, 21, TARGETS, ""),
        ("sd1", True, 22, TARGETS, ""),
        ("sd2v", False, 23, TARGETS, ""),
        ("sd1", False, 24, CONV_TARGETS, "_conv"),
        ("sd1", False, 25, TARGETS, "_dmd"),
        # The null flag set: DMD2's fake score must ignore it.
        ("sd1", True, 26, TARGETS, "_fullfake"),
    ]
    for kind, null_condition, seed, targets, suffix in cases:
        pipe = load(pipelines[kind])
        weighting = "dmd" if suffix == "_dmd" else "paper"
        fake = "unet" if suffix == "_fullfake" else "lora"
        out = run(pipe, kind, null_condition, seed, targets, weighting=weighting, fake=fake)
        name = f"{kind}{suffix}_null{int(null_condition)}.safetensors"
        save_tensors(os.path.join(root, "golden", "vsd", name), out)
