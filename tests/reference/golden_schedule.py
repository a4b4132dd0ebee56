"""diffusers' DDPM schedule and DDIM sampler on seeded tensors.

Writes root/golden/schedule/:
  schedule.safetensors
    "{sched}.betas", "{sched}.alphas_cumprod"       float32 [1000], sched in
                                                    SCHEDULES
    "timesteps.{spacing}.{offset}.{n}"              int64 [n], DDIMScheduler's
                                                    set_timesteps
    "add_noise.x0", ".eps", ".t", ".{sched}"        per-sample t (add_noise)
    "velocity.{sched}"                              get_velocity(x0, eps, t)
    "convert.{pred}.{x_t,model_output,t,x0,eps}"    a model output turned into
                                                    x0 and eps, per-sample t,
                                                    checked against DDIM's step
    "step.sample", "step.model_output"              inputs of every step case
    "step.{i}.prev_sample", "step.{i}.pred_original_sample"
  steps.json      [{config, num_inference_steps, timestep}] for step.{i}
  timesteps.json  {"spacings", "offsets", "steps"} covered by timesteps.*
"""

import json
import os

import torch
from diffusers import DDIMScheduler

from common import save_tensors

SCHEDULES = {
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "linear": dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
}
SPACINGS = ("leading", "trailing", "linspace")
OFFSETS = (0, 1)
STEPS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 24, 25, 30, 32, 40, 48, 50, 64, 75, 80, 100, 125, 150, 200, 250,
         333, 500, 999, 1000)

SD = dict(SCHEDULES["scaled_linear"], clip_sample=False, set_alpha_to_one=False, steps_offset=1)
STEP_CASES = [
    # (config overrides on SD's, num_inference_steps, index into timesteps)
    (dict(), 25, 0),
    (dict(), 25, 3),
    (dict(), 25, -1),  # previous timestep < 0: final_alpha_cumprod = abar_0
    (dict(set_alpha_to_one=True), 25, -1),
    (dict(prediction_type="v_prediction"), 25, 5),
    (dict(prediction_type="v_prediction", timestep_spacing="trailing"), 4, 0),
    (dict(prediction_type="v_prediction", timestep_spacing="trailing"), 4, -1),
    (dict(prediction_type="sample", timestep_spacing="linspace"), 50, 7),
    (dict(timestep_spacing="linspace"), 50, -1),
    (dict(clip_sample=True), 25, 2),
    (dict(clip_sample=True, clip_sample_range=0.5, prediction_type="v_prediction"), 10, 4),
    (dict(SCHEDULES["linear"]), 50, 10),
    (dict(SCHEDULES["linear"], steps_offset=0, set_alpha_to_one=True), 50, -1),
]


def randn(g, *shape):
    return torch.randn(shape, generator=g, dtype=torch.float32)


def build(root, pipelines):
    out = os.path.join(root, "golden", "schedule")
    os.makedirs(out, exist_ok=True)
    t = {}
    g = torch.Generator().manual_seed(2024)

    for name, cfg in SCHEDULES.items():
        s = DDIMScheduler(**cfg)
        t[f"{name}.betas"] = s.betas
        t[f"{name}.alphas_cumprod"] = s.alphas_cumprod

    for spacing in SPACINGS:
        for offset in OFFSETS:
            s = DDIMScheduler(**dict(SD, timestep_spacing=spacing, steps_offset=offset))
            for n in STEPS:
                s.set_timesteps(n)
                t[f"timesteps.{spacing}.{offset}.{n}"] = s.timesteps.to(torch.int64)

    x0, eps = randn(g, 4, 4, 8, 8), randn(g, 4, 4, 8, 8)
    steps_t = torch.tensor([0, 20, 500, 999], dtype=torch.int64)
    t["add_noise.x0"], t["add_noise.eps"], t["add_noise.t"] = x0, eps, steps_t
    for name, cfg in SCHEDULES.items():
        s = DDIMScheduler(**cfg)
        t[f"add_noise.{name}"] = s.add_noise(x0, eps, steps_t)
        t[f"velocity.{name}"] = s.get_velocity(x0, eps, steps_t)

    # Conversions with a timestep per sample, in the formulas of DDIM's step,
    # each sample checked against step() at its own timestep.
    for pred in ("epsilon", "v_prediction", "sample"):
        s = DDIMScheduler(**SD, prediction_type=pred)
        s.set_timesteps(1000)
        x_t, model_output = randn(g, 4, 4, 8, 8), randn(g, 4, 4, 8, 8)
        steps_t = torch.tensor([999, 980, 20, 1], dtype=torch.int64)
        a = s.alphas_cumprod[steps_t].view(-1, 1, 1, 1)
        b = 1 - a
        if pred == "epsilon":
            x0_hat = (x_t - b**0.5 * model_output) / a**0.5
            eps_hat = model_output
        elif pred == "v_prediction":
            x0_hat = a**0.5 * x_t - b**0.5 * model_output
            eps_hat = a**0.5 * model_output + b**0.5 * x_t
        else:
            x0_hat = model_output
            eps_hat = (x_t - a**0.5 * x0_hat) / b**0.5
        for i, ti in enumerate(steps_t.tolist()):
            ref = s.step(model_output[i : i + 1], ti, x_t[i : i + 1]).pred_original_sample
            assert torch.allclose(ref, x0_hat[i : i + 1], atol=1e-6, rtol=0), pred
        for k, v in dict(x_t=x_t, model_output=model_output, t=steps_t, x0=x0_hat, eps=eps_hat).items():
            t[f"convert.{pred}.{k}"] = v

    sample, model_output = randn(g, 2, 4, 8, 8), randn(g, 2, 4, 8, 8) * 1.5
    t["step.sample"], t["step.model_output"] = sample, model_output
    cases = []
    for i, (overrides, n, index) in enumerate(STEP_CASES):
        cfg = dict(SD, **overrides)
        s = DDIMScheduler(**cfg)
        s.set_timesteps(n)
        timestep = int(s.timesteps[index])
        res = s.step(model_output, timestep, sample)
        t[f"step.{i}.prev_sample"] = res.prev_sample
        t[f"step.{i}.pred_original_sample"] = res.pred_original_sample
        cases.append({"config": dict(s.config), "num_inference_steps": n, "timestep": timestep})

    # Some entries alias each other (eps is the model output itself).
    save_tensors(os.path.join(out, "schedule.safetensors"), {k: v.clone() for k, v in t.items()})
    with open(os.path.join(out, "steps.json"), "w") as f:
        json.dump(cases, f, indent=1, default=str)
    with open(os.path.join(out, "timesteps.json"), "w") as f:
        json.dump({"spacings": SPACINGS, "offsets": OFFSETS, "steps": STEPS}, f)
