"""The peer of `swiftbrush bench vsd-step`: one SwiftBrush training iteration
(shared/SPEC.md steps 1-7) written plainly on the authors' stack, PyTorch +
diffusers + peft, timed exactly as worker/src/bench.rs times the Rust step
(one untimed warm-up step, N timed steps, median and mean, images/s = batch /
median, peak memory).

The formulas are those of tests/reference/golden_vsd.py (the pinned
reference the Rust step is checked against), copied rather than imported so
that this script runs from the repository alone with no fixtures built.

Usage:
  python bench/reference_vsd_step.py --teacher DIR --config configs/sd21-base.yaml \
      --device cuda:0 --steps 10 [--batch B] [--micro-batch M] [--json] [--check]
"""

import argparse
import copy
import json
import math
import os
import re
import statistics
import sys
import time

import diffusers
import peft
import torch
import yaml
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel, cast_training_params
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTokenizer

# Defaults of proto/src/config.rs (the Rust config's serde defaults), for
# the keys this script reads; a config file overrides them key by key. Not
# read: method.max_timestep_final (annealing changes no step's cost), the
# world, checkpoint, logging and data sections (bench.rs replaces the data).
DEFAULTS = {
    "model": {"teacher": None, "resolution": 512},
    "method": {
        "student_timestep": 999,
        "student_alpha_bar": 0.0047,
        "student_alpha_bar_from_schedule": False,
        "min_timestep": 20,
        "max_timestep": 980,
        "guidance_scale": 4.5,
        "guidance_scale_range": None,
        "vsd_weighting": "paper",
        "null_condition_prob": 0.1,
        "student": {"lr": 1e-6},
        "fake_score": {"kind": "lora", "optimizer": {"lr": 1e-3}, "updates_per_step": 1},
        "lora": {"rank": 64, "alpha": 108.0, "target_modules": ["to_q", "to_v"]},
        "ema": {"enabled": True, "max_decay": 0.9999},
    },
    "train": {"global_batch": 16, "seed": 0, "micro_batch": None, "gradient_checkpointing": False},
    "precision": {"teacher_dtype": "bf16", "autocast": "bf16", "student_autocast": False},
}
OPTIMIZER_DEFAULTS = {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The captions worker/src/bench.rs feeds, cycled to the batch.
CAPTIONS = [
    "a photo of an astronaut riding a horse on mars",
    "a red circle on a white background",
    "an oil painting of a lighthouse at dusk, dramatic light",
    "a bowl of fruit on a wooden table",
]


def merged(defaults, override):
    out = dict(defaults)
    for k, v in (override or {}).items():
        out[k] = merged(defaults[k], v) if isinstance(defaults.get(k), dict) and isinstance(v, dict) else v
    return out


def load_config(path):
    with open(path) as f:
        cfg = merged(DEFAULTS, yaml.safe_load(f))
    for opt in (cfg["method"]["student"], cfg["method"]["fake_score"]["optimizer"]):
        for k, v in OPTIMIZER_DEFAULTS.items():
            opt.setdefault(k, v)
    return cfg


def to_eps(pred, x, abar, prediction_type):
    """A model output as epsilon (v-prediction teachers, SPEC)."""
    if prediction_type == "v_prediction":
        return abar.sqrt() * pred + (1 - abar).sqrt() * x
    return pred


class Step:
    """The networks, optimizers and constants of one training iteration."""

    def __init__(self, args, cfg):
        m, p = cfg["method"], cfg["precision"]
        self.m, self.device = m, torch.device(args.device)
        dev = self.device
        self.teacher_dtype = DTYPES[p["teacher_dtype"]]
        self.autocast = None if p["autocast"] == "none" else DTYPES[p["autocast"]]
        # Autocast covers the student too, as an accelerate script's does
        # (the authors' run), unless --student-fp32 keeps it in fp32 (the
        # Rust step with precision.student_autocast: false).
        self.student_autocast = self.autocast is not None and not args.student_fp32
        # fp16 with the student under autocast: torch.amp.GradScaler with
        # its defaults, one per optimizer (as the Rust step's scalers);
        # disabled scalers pass everything through unchanged.
        scaled = self.student_autocast and self.autocast == torch.float16
        self.scaler_s = torch.amp.GradScaler(dev.type, enabled=scaled)
        self.scaler_f = torch.amp.GradScaler(dev.type, enabled=scaled)

        sched = DDPMScheduler.from_pretrained(args.teacher, subfolder="scheduler")
        self.ptype = sched.config.prediction_type
        self.abar = sched.alphas_cumprod.to(dev, torch.float32)  # SPEC: schedule in float32
        self.tokenizer = CLIPTokenizer.from_pretrained(args.teacher, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(args.teacher, subfolder="text_encoder")
        self.text_encoder.to(dev, self.teacher_dtype).requires_grad_(False).eval()

        teacher = UNet2DConditionModel.from_pretrained(args.teacher, subfolder="unet").to(dev)
        # The student and DMD2's fake copy are float32 copies, made before the
        # teacher takes its storage dtype (as worker/src/trainer/load.rs does).
        self.student = copy.deepcopy(teacher).requires_grad_(True).train()
        self.kind = m["fake_score"]["kind"]
        teacher.requires_grad_(False).eval()
        if self.teacher_dtype != torch.float32:
            teacher.to(dtype=self.teacher_dtype)
        self.teacher = teacher
        if self.kind == "lora":
            lora = m["lora"]
            # peft's default init: A Kaiming-uniform, B zeros (SPEC); the
            # adapters live on the teacher object, switched off = teacher.
            teacher.add_adapter(
                LoraConfig(
                    r=lora["rank"],
                    lora_alpha=lora["alpha"],
                    target_modules=lora["target_modules"],
                    init_lora_weights=True,
                )
            )
            # peft makes them in the base layer's dtype; train them in float32
            # as diffusers' LoRA scripts do (and the Rust adapters are).
            cast_training_params(teacher, dtype=torch.float32)
            self.fake = teacher
            fake_params = [q for q in teacher.parameters() if q.requires_grad]
        else:  # DMD2's full trainable copy of the teacher, float32
            self.fake = copy.deepcopy(self.student).requires_grad_(True).train()
            fake_params = list(self.fake.parameters())
        self.fake_params = fake_params
        # --gradient-checkpointing (or train.gradient_checkpointing): the
        # authors' flag, diffusers' block-level recomputation of the
        # networks that train.
        self.checkpointing = args.gradient_checkpointing or cfg["train"]["gradient_checkpointing"]
        if self.checkpointing:
            self.student.enable_gradient_checkpointing()
            self.fake.enable_gradient_checkpointing()

        def adam(params, o):
            return torch.optim.Adam(
                params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"]
            )

        self.opt_s = adam(self.student.parameters(), m["student"])
        self.opt_f = adam(fake_params, m["fake_score"]["optimizer"])
        self.ema = None
        if m["ema"]["enabled"]:
            # diffusers' EMAModel: decay_k = min((1 + k) / (10 + k), max_decay).
            self.ema = EMAModel(self.student.parameters(), decay=m["ema"]["max_decay"], foreach=True)
            self.ema.to(dev)

        t_s = m["student_timestep"]
        self.t_student = t_s
        self.A = float(self.abar[t_s]) if m["student_alpha_bar_from_schedule"] else m["student_alpha_bar"]
        self.uncond = self.encode([""])  # the null condition: the empty prompt's encoding
        self.shape = latent_shape(args.teacher, cfg["model"]["resolution"], teacher.config.in_channels)

    def amp(self, enabled=True):
        on = enabled and self.autocast is not None
        return torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=on)

    @torch.no_grad()
    def encode(self, prompts):
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].float()

    def score(self, unet, x, t, c, abar):
        """One teacher/fake pass as float32 epsilon (autocast inside)."""
        dtype = next(unet.parameters()).dtype if self.autocast is None else x.dtype
        with self.amp():
            out = unet(x.to(dtype), t, c.to(dtype)).sample
        return to_eps(out.float(), x, abar, self.ptype)

    def guided(self, unet, x, t, cond, abar, scale):
        b = x.shape[0]
        xx, tt, aa = torch.cat([x, x]), torch.cat([t, t]), torch.cat([abar, abar])
        u, c = self.score(unet, xx, tt, torch.cat([self.uncond.expand(b, -1, -1), cond]), aa).chunk(2)
        return u + scale * (c - u)

    def fake_loss(self, x0, cond, share, null):
        """SPEC step 6 on a detached draw; backward of its share; the loss."""
        b, dev = x0.shape[0], self.device
        t2 = torch.randint(0, len(self.abar), (b,), device=dev)
        eps2 = torch.randn_like(x0)
        a2 = self.abar[t2].view(-1, 1, 1, 1)
        x2 = a2.sqrt() * x0 + (1 - a2).sqrt() * eps2
        if self.kind == "lora":
            c2 = self.uncond.expand(b, -1, -1) if null else cond
            loss = torch.mean((a2.sqrt() * (self.score(self.fake, x2, t2, c2, a2) - eps2)) ** 2)
        else:  # DMD2: unweighted eps-MSE, no text dropout
            loss = torch.mean((self.score(self.fake, x2, t2, cond, a2) - eps2) ** 2)
        self.scaler_f.scale(loss * share).backward()
        return loss.item()

    def run(self, captions, micro):
        m, dev = self.m, self.device
        cond_all = self.encode(captions)
        b_all = len(captions)
        scale = m["guidance_scale"]
        if m["guidance_scale_range"]:
            lo, hi = m["guidance_scale_range"]
            scale = lo + (hi - lo) * torch.rand(()).item()
        # One null-condition draw per iteration (and per extra update).
        null = torch.rand(()).item() < m["null_condition_prob"]
        loss_vsd = loss_fake = 0.0
        x0s = []
        for start in range(0, b_all, micro):
            cond = cond_all[start : start + micro]
            b = cond.shape[0]
            share = b / b_all  # gradient accumulation: each chunk's share
            shape = (b, *self.shape)
            # 1. Student draw at t = 999 with the constant alpha-bar A.
            z = torch.randn(shape, device=dev)
            with self.amp(self.student_autocast):
                s_out = self.student(z, torch.full((b,), self.t_student, device=dev), cond).sample
            A = torch.tensor(self.A, device=dev)
            x0 = (z - (1 - A).sqrt() * to_eps(s_out.float(), z, A, self.ptype)) / A.sqrt()
            # 2. Noise it; x_t keeps its link to the student.
            t = torch.randint(m["min_timestep"], m["max_timestep"] + 1, (b,), device=dev)
            eps = torch.randn_like(x0)
            abar_t = self.abar[t].view(-1, 1, 1, 1)
            x_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps
            # 3. Both scores with guidance, no grad (adapters off = teacher).
            with torch.no_grad():
                xd = x_t.detach()
                if self.kind == "lora":
                    self.teacher.disable_adapters()
                    e_t = self.guided(self.teacher, xd, t, cond, abar_t, scale)
                    self.teacher.enable_adapters()
                    e_l = self.guided(self.fake, xd, t, cond, abar_t, scale)
                else:  # DMD2 scores its fake on the caption alone
                    e_t = self.guided(self.teacher, xd, t, cond, abar_t, scale)
                    e_l = self.score(self.fake, xd, t, cond, abar_t)
            x0d = x0.detach()
            # 4. The VSD gradient.
            if m["vsd_weighting"] == "dmd":
                pred_real = (xd - (1 - abar_t).sqrt() * e_t) / abar_t.sqrt()
                pred_fake = (xd - (1 - abar_t).sqrt() * e_l) / abar_t.sqrt()
                p_real, p_fake = x0d - pred_real, x0d - pred_fake
                g = (p_real - p_fake) / torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True)
            else:
                g = (1 - abar_t) * (e_t - e_l)
            g = torch.nan_to_num(g)
            # 5. The surrogate whose gradient wrt x0_hat is g / numel.
            loss = 0.5 * torch.nn.functional.mse_loss(x0.float(), (x0 - g).detach().float())
            self.scaler_s.scale(loss * share).backward()
            loss_vsd += share * loss.item()
            # 6. The fake score's denoising loss on the detached draw.
            loss_fake += self.fake_loss(x0d, cond, share, null)
            x0s.append(x0d)
        # 5. Student: clip, Adam, zero.
        self.scaler_s.unscale_(self.opt_s)
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), m["student"]["grad_clip"])
        self.scaler_s.step(self.opt_s)
        self.scaler_s.update()
        self.opt_s.zero_grad(set_to_none=True)
        # 6. Fake score: clip, Adam, zero; DMD2's extra updates reuse the draws.
        clip_f = m["fake_score"]["optimizer"]["grad_clip"]
        for k in range(m["fake_score"]["updates_per_step"]):
            if k > 0:
                null = torch.rand(()).item() < m["null_condition_prob"]
                for i, start in enumerate(range(0, b_all, micro)):
                    cond = cond_all[start : start + micro]
                    self.fake_loss(x0s[i], cond, cond.shape[0] / b_all, null)
            self.scaler_f.unscale_(self.opt_f)
            torch.nn.utils.clip_grad_norm_(self.fake_params, clip_f)
            self.scaler_f.step(self.opt_f)
            self.scaler_f.update()
            self.opt_f.zero_grad(set_to_none=True)
        # 7. EMA of the student.
        if self.ema is not None:
            self.ema.step(self.student.parameters())
        return loss_vsd, loss_fake


# The ops whose time is the networks' layers as libtorch kernels, which
# swiftbrush calls with the same shapes in the same libtorch: oneDNN/cuDNN
# convolutions, MKL/cuBLAS matrix products, fused attention, the norms and
# the activations, forward and backward. The rest is the residual adds,
# the step's formulas, copies, concatenations and dispatch.
KERNEL_OPS = re.compile(
    r"^aten::(convolution_backward|mkldnn_convolution|cudnn_convolution\w*|_?convolution|mm|addmm|bmm|baddbmm"
    r"|_scaled_dot_product\w+|native_group_norm\w*|native_layer_norm\w*|silu\w*|gelu\w*)$"
)


def profile_step(step, captions, micro):
    """One more step under torch.profiler: prints the busiest ops (self
    time) to stderr; returns the share of the step's self time in
    KERNEL_OPS."""
    from torch.profiler import ProfilerActivity, profile

    cuda = step.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step.run(captions, micro)
    events = prof.key_averages()

    def self_time(e):
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    total = sum(self_time(e) for e in events)
    kernel = sum(self_time(e) for e in events if KERNEL_OPS.match(e.key))
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=20), file=sys.stderr)
    share = kernel / total if total else None
    print(f"kernel share of the step (convolutions, matrix products, attention, norms, activations): "
          f"{share:.3f}", file=sys.stderr)
    return share


def latent_shape(teacher, resolution, channels):
    """[C, h, w]: resolution / the VAE's scale factor (2^(blocks-1), 8 for
    SD's), or the pixels themselves for a pixel-space teacher (no vae/)."""
    vae_cfg = os.path.join(teacher, "vae", "config.json")
    scale = 1
    if os.path.isfile(vae_cfg):
        with open(vae_cfg) as f:
            scale = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    if resolution % scale:
        raise SystemExit(f"model.resolution = {resolution} is not a multiple of the VAE's scale {scale}")
    return (channels, resolution // scale, resolution // scale)


def peak_host_mib():
    """VmHWM from /proc/self/status, MiB (what bench.rs reports)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def snapshot(params):
    return [q.detach().float().clone() for q in params]


def changed(before, params):
    return max((a - q.detach().float()).abs().max().item() for a, q in zip(before, params))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="diffusers pipeline folder (default: the config's model.teacher)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10, help="timed steps, after 1 untimed warm-up")
    ap.add_argument("--batch", type=int, help="overrides train.global_batch")
    ap.add_argument("--micro-batch", type=int, help="overrides train.micro_batch")
    ap.add_argument("--student-fp32", action="store_true",
                    help="keep the student pass out of autocast (the Rust step with "
                    "precision.student_autocast: false, its default)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="diffusers' enable_gradient_checkpointing on the student and the fake score "
                    "(as the authors' --gradient_checkpointing; also train.gradient_checkpointing)")
    ap.add_argument("--count-flops", action="store_true",
                    help="count one more (untimed) step's FLOPs with torch's FlopCounterMode: "
                    "matrix products and convolutions, forward and backward (the MFU's numerator)")
    ap.add_argument("--channels-last", action="store_true",
                    help="the UNets' weights in channels-last memory format "
                    "(model.to(memory_format=torch.channels_last), as diffusers' speed-up docs suggest): "
                    "whether swiftbrush should build it (issue 18)")
    ap.add_argument("--profile", action="store_true",
                    help="run one more (untimed) step under torch.profiler: print its busiest ops to "
                    "stderr and report the share of the step spent in the layer kernels (convolutions, "
                    "matrix products, attention, norms, activations: the ones swiftbrush calls with the "
                    "same shapes in the same libtorch)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true",
                    help="assert finite losses and that the student and fake-score weights changed")
    args = ap.parse_args()
    cfg = load_config(args.config)
    args.teacher = args.teacher or cfg["model"]["teacher"]
    if not args.teacher:
        raise SystemExit("no teacher: pass --teacher DIR or set model.teacher")
    batch = args.batch or cfg["train"]["global_batch"]
    micro = args.micro_batch or cfg["train"]["micro_batch"] or batch
    torch.manual_seed(cfg["train"]["seed"])
    cuda = args.device.startswith("cuda")

    step = Step(args, cfg)
    if args.channels_last:
        for unet in {id(m): m for m in (step.student, step.teacher, step.fake)}.values():
            unet.to(memory_format=torch.channels_last)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    if args.check:
        before = (snapshot(step.student.parameters()), snapshot(step.fake_params))
    losses = [step.run(captions, micro)]  # warm-up, untimed
    times = []
    in_use = []  # device memory in use per the driver, after each step
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step.run(captions, micro))
        if cuda:
            torch.cuda.synchronize(args.device)
        times.append(time.perf_counter() - t0)
        if cuda:
            free, total = torch.cuda.mem_get_info(args.device)
            in_use.append((total - free) / 2**20)
    median = sorted(times)[len(times) // 2] if times else float("nan")  # bench.rs's median
    flops = None
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step.run(captions, micro)
        flops = counter.get_total_flops()
    kernel_share = None
    if args.profile:
        kernel_share = profile_step(step, captions, micro)
    report = {
        "impl": "pytorch+diffusers+peft" + (" (channels-last)" if args.channels_last else ""),
        "device": args.device,
        "precision": f"teacher {cfg['precision']['teacher_dtype']} (autocast {cfg['precision']['autocast']}), "
        f"student fp32{' (autocast)' if step.student_autocast else ''}"
        f"{', fp16 loss scaling' if step.scaler_s.is_enabled() else ''}, schedule and losses fp32",
        "gradient_checkpointing": bool(step.checkpointing),
        "images_per_step": batch,
        "steps": args.steps,
        "median_step_s": median,
        "mean_step_s": statistics.fmean(times) if times else float("nan"),
        "images_per_s": batch / median,
        "peak_host_mib": peak_host_mib(),
        # As bench.rs measures it: in use per the driver, sampled after each
        # timed step (the caching allocator's reserve and the context count).
        "peak_gpu_mib": max(in_use) if in_use else None,
        "peak_gpu_allocated_mib": torch.cuda.max_memory_allocated(args.device) / 2**20 if cuda else None,
        "flops_per_step": flops,
        "kernel_share": kernel_share,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
    }
    if args.check:
        ds, df = changed(before[0], step.student.parameters()), changed(before[1], step.fake_params)
        finite = all(math.isfinite(v) for pair in losses for v in pair)
        print(f"check: losses (vsd, fake) per step {[(f'{a:.4g}', f'{b:.4g}') for a, b in losses]}; "
              f"max |change| student {ds:.3g}, fake score {df:.3g}", file=sys.stderr)
        # At step 0 the adapters' B is zero, so e_T == e_L and the student's
        # first gradient is zero: it moves from the second step on.
        assert finite, "non-finite loss"
        assert df > 0, "the fake score did not change (or is not finite)"
        assert args.steps == 0 or ds > 0, "the student did not change (or is not finite)"
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:18}{v:.4f}" if isinstance(v, float) else f"{k:18}{v}")


if __name__ == "__main__":
    main()
