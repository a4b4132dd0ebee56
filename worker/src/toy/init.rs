//! Seeded initial weights for the toy networks, drawn from [`ToyRng`]
//! rather than libtorch's global generator, so a seed gives the same
//! teacher in every process and thread.
//!
//! The rules are PyTorch's defaults, recognised from diffusers' and
//! transformers' variable names: a `.weight` of two or more dimensions
//! (linear, convolution) and its sibling `.bias` are uniform in
//! +-1/sqrt(fan_in); a one-dimensional `.weight` (group and layer norms) is
//! one and its `.bias` zero. Embedding tables are named by the caller.

use std::collections::HashMap;

use tch::{Tensor, nn};

use super::rng::ToyRng;

/// How to fill one variable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    Uniform(f64),
    Normal(f64),
    Constant(f64),
}

/// The PyTorch default for `name` in `vars`, or None for a name the rules
/// do not cover (an embedding table, a buffer).
pub fn default_fill(name: &str, vars: &HashMap<String, Tensor>) -> Option<Fill> {
    let fan_in_bound = |w: &Tensor| {
        let size = w.size();
        let fan_in: i64 = size.iter().skip(1).product();
        1.0 / (fan_in.max(1) as f64).sqrt()
    };
    if name.ends_with(".weight") {
        let w = vars.get(name)?;
        return Some(if w.dim() >= 2 {
            Fill::Uniform(fan_in_bound(w))
        } else {
            Fill::Constant(1.0)
        });
    }
    if let Some(stem) = name.strip_suffix(".bias") {
        let w = vars.get(&format!("{stem}.weight"))?;
        return Some(if w.dim() >= 2 {
            Fill::Uniform(fan_in_bound(w))
        } else {
            Fill::Constant(0.0)
        });
    }
    None
}

/// Fills every variable of `vs` in name order from one stream seeded by
/// `seed`; `special` overrides the rule for the names it lists. A name no
/// rule covers is an error naming it.
pub fn init_varstore(
    vs: &nn::VarStore,
    seed: u64,
    special: &HashMap<String, Fill>,
) -> Result<(), String> {
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut rng = ToyRng::new(seed);
    tch::no_grad(|| {
        for name in names {
            let fill = match special.get(name) {
                Some(f) => *f,
                None => default_fill(name, &vars)
                    .ok_or_else(|| format!("no initialisation rule for variable {name}"))?,
            };
            let var = &vars[name];
            let n = var.numel();
            let values: Vec<f32> = match fill {
                Fill::Constant(c) => vec![c as f32; n],
                Fill::Uniform(b) => (0..n).map(|_| rng.uniform_in(-b, b) as f32).collect(),
                Fill::Normal(std) => (0..n).map(|_| (rng.normal() * std) as f32).collect(),
            };
            let src = Tensor::from_slice(&values)
                .view(var.size().as_slice())
                .to_kind(var.kind())
                .to_device(var.device());
            let mut var = var.shallow_clone();
            var.f_copy_(&src).map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn pytorch_default_rules_and_reproducible_values() {
        let build = |seed| {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let root = vs.root();
            let _ = root.sub("lin").zeros("weight", &[4, 9]);
            let _ = root.sub("lin").zeros("bias", &[4]);
            let _ = root.sub("norm").zeros("weight", &[4]);
            let _ = root.sub("norm").zeros("bias", &[4]);
            init_varstore(&vs, seed, &HashMap::new()).unwrap();
            vs
        };
        let (a, b, c) = (build(1), build(1), build(2));
        let va = a.variables();
        for (name, t) in &va {
            assert!(t.equal(&b.variables()[name]), "{name}");
        }
        assert!(!va["lin.weight"].equal(&c.variables()["lin.weight"]));
        let w = &va["lin.weight"];
        assert!(w.abs().max().double_value(&[]) <= 1.0 / 3.0);
        assert!(w.abs().max().double_value(&[]) > 0.2);
        assert_eq!(va["norm.weight"].sum(Kind::Float).double_value(&[]), 4.0);
        assert_eq!(
            va["norm.bias"].abs().sum(Kind::Float).double_value(&[]),
            0.0
        );

        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _ = vs.root().sub("emb").zeros("table", &[3]);
        let e = init_varstore(&vs, 0, &HashMap::new()).unwrap_err();
        assert!(e.contains("emb.table"), "{e}");
    }
}
