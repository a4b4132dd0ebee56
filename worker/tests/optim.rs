//! Adam, gradient clipping and the EMA follow torch.optim.Adam,
//! clip_grad_norm_ and diffusers' EMAModel step for step
//! (tests/reference/golden_optim.py).

mod common;

use std::collections::HashMap;

use swiftbrush_worker::ema::Ema;
use swiftbrush_worker::optim::{Adam, AdamConfig, clip_grad_norm};
use tch::{Kind, Tensor};

#[test]
fn adam_clip_and_ema_match_torch_and_diffusers() {
    let g = common::golden("golden/optim/adam_ema.safetensors");
    let names = ["a.bias", "a.weight", "b.weight"];
    let params: HashMap<String, Tensor> = names
        .iter()
        .map(|n| {
            let p = g[&format!("init.{n}")].copy().set_requires_grad(true);
            (n.to_string(), p)
        })
        .collect();
    let cfg = AdamConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut opt = Adam::new(
        params.iter().map(|(k, v)| (k.clone(), v.shallow_clone())),
        cfg,
    );
    let mut ema = Ema::new(
        params.iter().map(|(k, v)| (k.clone(), v.shallow_clone())),
        0.9999,
    );
    for i in 0..3 {
        for n in names {
            // Put the golden gradient in place through autograd.
            let p = &params[n];
            let mut grad = p.grad();
            if grad.defined() {
                tch::no_grad(|| grad.copy_(&g[&format!("grad{i}.{n}")]));
            } else {
                (p * &g[&format!("grad{i}.{n}")])
                    .sum(Kind::Float)
                    .backward();
            }
        }
        let norm = clip_grad_norm(opt.params(), 1.0);
        let want = g[&format!("norm{i}")].double_value(&[0]);
        assert!(
            (norm - want).abs() <= 1e-5 * want,
            "step {i}: norm {norm} vs {want}"
        );
        opt.step();
        opt.zero_grad();
        ema.update(&params);
        for n in names {
            common::assert_close(
                &format!("param{i}.{n}"),
                &params[n].detach(),
                &g[&format!("param{i}.{n}")],
                1e-6,
            );
        }
        for (n, t) in ema.tensors() {
            common::assert_close(&format!("ema{i}.{n}"), &t, &g[&format!("ema{i}.{n}")], 1e-6);
        }
    }
}

/// Issue 30, item 3: the multi-tensor optimizer runs over chunks of the
/// parameter list; on a model whose list spans several chunks, the chunked
/// Adam (with weight decay), clip and EMA are the same bit for bit as one
/// whole-list call.
#[test]
fn chunked_optimizer_matches_unchunked_bitwise() {
    use swiftbrush_worker::torch::foreach;
    let shapes: [&[i64]; 7] = [
        &[64, 32],
        &[32],
        &[16, 16, 3, 3],
        &[16],
        &[300],
        &[8, 40],
        &[1],
    ];
    let run = |chunk_bytes: usize| -> Vec<(String, Tensor)> {
        tch::manual_seed(7);
        let params: HashMap<String, Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let p = Tensor::randn(*s, (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
                (format!("p{i}"), p)
            })
            .collect();
        let mut opt = Adam::new(
            params.iter().map(|(k, v)| (k.clone(), v.shallow_clone())),
            AdamConfig {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            },
        );
        opt.set_chunk_bytes(chunk_bytes);
        let mut ema = Ema::new(
            params.iter().map(|(k, v)| (k.clone(), v.shallow_clone())),
            0.9999,
        );
        ema.set_chunk_bytes(chunk_bytes);
        for _ in 0..3 {
            let loss = params
                .values()
                .map(|p| (p * p).sin().sum(Kind::Float))
                .fold(
                    Tensor::zeros([], (Kind::Float, tch::Device::Cpu)),
                    |a, b| a + b,
                );
            loss.backward();
            clip_grad_norm(opt.params(), 0.5);
            opt.step();
            opt.zero_grad();
            ema.update(&params);
        }
        let mut out: Vec<(String, Tensor)> = opt.state_tensors();
        out.extend(ema.tensors());
        let mut ps: Vec<_> = params.into_iter().map(|(k, v)| (k, v.detach())).collect();
        ps.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(ps);
        out
    };
    let bytes: Vec<usize> = shapes
        .iter()
        .map(|s| 4 * s.iter().product::<i64>() as usize)
        .collect();
    let small = 4 << 10;
    assert!(foreach::chunks(&bytes, small).len() >= 3);
    let (chunked, whole) = (run(small), run(usize::MAX));
    assert_eq!(chunked.len(), whole.len());
    for ((ka, a), (kb, b)) in chunked.iter().zip(&whole) {
        assert_eq!(ka, kb);
        assert!(a.equal(b), "{ka} differs between chunked and whole-list");
    }
}
