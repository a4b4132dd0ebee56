"""FID as pytorch-fid computes it: its Inception-v3 (the TensorFlow FID
network's structure) with seeded random weights instead of the downloaded
ones, the 2048-d pool features of fixed pictures, their statistics and the
Frechet distance.

Writes root/fid/:
  inception.safetensors  the network's state dict under the names of
                         pytorch-fid's pt_inception-2015-12-05 weights
                         (Conv2d_1a_3x3.conv.weight, ..., fc.*), what
                         converting that .pth file to safetensors gives
  golden.safetensors     "images_a", "images_b" float32 [6,3,40,40] in [0,1]
                         (on the 8-bit grid, as pictures from PNGs are),
                         "features_a", "features_b" float32 [6,2048],
                         "mu_a", "sigma_a" float64 (np.mean, np.cov of
                         features_a), and a full-rank case for the distance:
                         "mu_x", "sigma_x", "mu_y", "sigma_y" float64 (32-d,
                         from 200 samples each) and "fid_xy" float64 [1]
  stats_a.npz            mu_a and sigma_a as `python -m pytorch_fid
                         --save-stats` writes them (np.savez_compressed)
"""

import os

import numpy as np
import torch
from pytorch_fid import inception as fid_inception
from pytorch_fid.fid_score import calculate_frechet_distance

from common import save_tensors


def network():
    """pytorch-fid's InceptionV3 (pool features) around a seeded random
    FID Inception, and that inner network (whose names the weights use)."""
    fid_inception.load_state_dict_from_url = lambda *a, **k: None
    built = {}

    def fid_inception_v3():
        torch.manual_seed(123)
        net = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        net.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
        net.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
        # Affine terms distinct from their defaults, so a mis-loaded one
        # shows; the running statistics are calibrated below.
        g = torch.Generator().manual_seed(124)
        for name, m in sorted(net.named_modules()):
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.data.copy_(1 + torch.randn(n, generator=g) * 0.1)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
                m.reset_running_stats()
                m.momentum = None  # a cumulative average
        built["net"] = net
        return net

    fid_inception.fid_inception_v3 = fid_inception_v3
    model = fid_inception.InceptionV3([3])
    # Batch-norm statistics from one pass over other pictures, as training
    # would leave them: activations stay of order one through the network
    # (with the default statistics they grow to 1e18).
    model.train()
    with torch.no_grad():
        model(pictures(99))
    return model.eval(), built["net"].eval()


def pictures(seed):
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 3, 40).view(1, 1, 40, 1)
    xs = torch.linspace(0, 3, 40).view(1, 1, 1, 40)
    phase = torch.rand(6, 3, 1, 1, generator=g) * 6
    smooth = 0.5 + 0.4 * torch.sin(xs * (1 + phase) + ys * phase)
    noisy = smooth + 0.05 * torch.randn(6, 3, 40, 40, generator=g)
    return (noisy.clamp(0, 1) * 255).round() / 255


def stats(features):
    act = features.double().numpy()
    return np.mean(act, axis=0), np.cov(act, rowvar=False)


def build(root, pipelines):
    out = os.path.join(root, "fid")
    os.makedirs(out, exist_ok=True)
    model, net = network()
    save_tensors(
        os.path.join(out, "inception.safetensors"),
        {k: v for k, v in net.state_dict().items()},
    )
    tensors = {}
    for side, seed in (("a", 1), ("b", 2)):
        images = pictures(seed)
        with torch.no_grad():
            features = model(images)[0].squeeze(3).squeeze(2)
        tensors[f"images_{side}"] = images.float()
        tensors[f"features_{side}"] = features.float()
    mu_a, sigma_a = stats(tensors["features_a"])
    np.savez_compressed(os.path.join(out, "stats_a.npz"), mu=mu_a, sigma=sigma_a)
    tensors["mu_a"] = torch.from_numpy(mu_a)
    tensors["sigma_a"] = torch.from_numpy(sigma_a)

    g = np.random.default_rng(5)
    x = g.normal(size=(200, 32)) @ g.normal(size=(32, 32))
    y = g.normal(size=(200, 32)) @ g.normal(size=(32, 32)) + 0.3
    mu_x, sigma_x = np.mean(x, axis=0), np.cov(x, rowvar=False)
    mu_y, sigma_y = np.mean(y, axis=0), np.cov(y, rowvar=False)
    fid = calculate_frechet_distance(mu_x, sigma_x, mu_y, sigma_y)
    for name, value in dict(mu_x=mu_x, sigma_x=sigma_x, mu_y=mu_y, sigma_y=sigma_y).items():
        tensors[name] = torch.from_numpy(value)
    tensors["fid_xy"] = torch.tensor([float(fid)], dtype=torch.float64)
    save_tensors(os.path.join(out, "golden.safetensors"), tensors)
