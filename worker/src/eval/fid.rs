//! FID: the Frechet distance between Gaussians fitted to the FID
//! Inception's pool features of a model's pictures and of reference
//! statistics, as pytorch-fid computes it (mean, covariance with n - 1,
//! ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))). Reference statistics
//! are pytorch-fid's `--save-stats` .npz files (`mu`, `sigma`), or the
//! .safetensors this command writes with `--save-stats`; pictures are
//! drawn and embedded a batch at a time, their statistics accumulated.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor, nn};

use super::EvalError;
use super::inception::{FID_FEATURES, FidInceptionV3};
use crate::sample::{SampleError, SampleRequest, draw_in_batches};

/// Feature statistics accumulated in float64: the count, the sum and the
/// sum of outer products (enough for the mean and the covariance).
pub struct FeatureStats {
    n: i64,
    sum: Tensor,
    outer: Tensor,
}

impl FeatureStats {
    pub fn new(dim: i64) -> Self {
        let opts = (Kind::Double, Device::Cpu);
        Self {
            n: 0,
            sum: Tensor::zeros([dim], opts),
            outer: Tensor::zeros([dim, dim], opts),
        }
    }

    /// Adds a batch of features [B, dim].
    pub fn add(&mut self, features: &Tensor) -> Result<(), tch::TchError> {
        let f = features.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?;
        self.n += f.size()[0];
        self.sum = self
            .sum
            .f_add(&f.f_sum_dim_intlist(0, false, Kind::Double)?)?;
        self.outer = self.outer.f_add(&f.f_transpose(0, 1)?.f_mm(&f)?)?;
        Ok(())
    }

    pub fn count(&self) -> i64 {
        self.n
    }

    /// The mean [dim] and the covariance [dim, dim] (normalised by n - 1,
    /// as `np.cov`).
    pub fn mean_and_cov(&self) -> Result<(Tensor, Tensor), tch::TchError> {
        let n = self.n as f64;
        let mu = self.sum.f_div_scalar(n)?;
        let centred = self
            .outer
            .f_sub(&mu.f_outer(&mu)?.f_mul_scalar(n)?)?
            .f_div_scalar((n - 1.0).max(1.0))?;
        Ok((mu, centred))
    }
}

/// sqrt of a symmetric positive semi-definite matrix, by its eigenvectors
/// (negative eigenvalues from rounding count as zero).
fn sqrt_psd(m: &Tensor) -> Result<Tensor, tch::TchError> {
    let sym = m.f_add(&m.f_transpose(0, 1)?)?.f_div_scalar(2.0)?;
    let (values, vectors) = sym.f_linalg_eigh("L")?;
    let root = values.f_clamp_min(0.0)?.f_sqrt()?;
    vectors
        .f_mul(&root.f_unsqueeze(0)?)?
        .f_mm(&vectors.f_transpose(0, 1)?)
}

/// The Frechet distance of N(mu1, s1) and N(mu2, s2), in float64. The
/// trace of sqrt(s1 s2) is that of sqrt(sqrt(s1) s2 sqrt(s1)), a symmetric
/// matrix, so no complex square root is needed (scipy's `sqrtm`, which
/// pytorch-fid uses, gives the same up to rounding).
pub fn frechet_distance(
    mu1: &Tensor,
    s1: &Tensor,
    mu2: &Tensor,
    s2: &Tensor,
) -> Result<f64, tch::TchError> {
    let d = |t: &Tensor| t.f_to_kind(Kind::Double);
    let (mu1, s1, mu2, s2) = (d(mu1)?, d(s1)?, d(mu2)?, d(s2)?);
    let diff = mu1.f_sub(&mu2)?;
    let a = sqrt_psd(&s1)?;
    let inner = a.f_mm(&s2)?.f_mm(&a)?;
    let sym = inner.f_add(&inner.f_transpose(0, 1)?)?.f_div_scalar(2.0)?;
    let tr_covmean = sym
        .f_linalg_eigvalsh("L")?
        .f_clamp_min(0.0)?
        .f_sqrt()?
        .f_sum(Kind::Double)?
        .double_value(&[]);
    let trace = |t: &Tensor| -> Result<f64, tch::TchError> { Ok(t.f_trace()?.double_value(&[])) };
    Ok(diff.f_dot(&diff)?.double_value(&[]) + trace(&s1)? + trace(&s2)? - 2.0 * tr_covmean)
}

/// Statistics from a file: pytorch-fid's .npz or this tool's .safetensors,
/// each with `mu` [D] and `sigma` [D, D].
pub fn read_stats(path: &Path) -> Result<(Tensor, Tensor), EvalError> {
    let bad = |reason: String| EvalError::Stats {
        path: path.to_owned(),
        reason,
    };
    let named = match path.extension().and_then(|e| e.to_str()) {
        Some("npz") => Tensor::read_npz(path),
        Some("safetensors") => Tensor::read_safetensors(path),
        _ => {
            return Err(bad(
                "expected a .npz (pytorch-fid --save-stats) or .safetensors file".into(),
            ));
        }
    }
    .map_err(|e| bad(e.to_string()))?;
    let get = |key: &str| {
        named
            .iter()
            .find(|(n, _)| n == key)
            .map(|(_, t)| t.to_kind(Kind::Double))
            .ok_or_else(|| bad(format!("no `{key}` array (found: {})", names(&named))))
    };
    let (mu, sigma) = (get("mu")?, get("sigma")?);
    let d = mu.size();
    if d.len() != 1 || sigma.size() != [d[0], d[0]] {
        return Err(bad(format!(
            "`mu` {:?} and `sigma` {:?} are not [D] and [D, D]",
            d,
            sigma.size()
        )));
    }
    Ok((mu, sigma))
}

fn names(named: &[(String, Tensor)]) -> String {
    named
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes `mu` and `sigma` as safetensors (float64).
pub fn write_stats(path: &Path, mu: &Tensor, sigma: &Tensor) -> Result<(), EvalError> {
    Tensor::write_safetensors(
        &[("mu", mu.shallow_clone()), ("sigma", sigma.shallow_clone())],
        path,
    )
    .map_err(|e| EvalError::Stats {
        path: path.to_owned(),
        reason: format!("cannot write: {e}"),
    })
}

/// The FID Inception, loaded from its weights file.
pub struct FidNetwork {
    _vs: nn::VarStore,
    model: FidInceptionV3,
    device: Device,
}

impl FidNetwork {
    pub fn load(path: &Path, device: Device) -> Result<Self, EvalError> {
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            return Err(EvalError::InceptionFormat {
                path: path.to_owned(),
                reason: "the FID Inception's weights must be a .safetensors file; convert \
                         pytorch-fid's .pth once: python -c \"import torch; from \
                         safetensors.torch import save_file; save_file(torch.load('IN.pth'), \
                         'OUT.safetensors')\""
                    .to_owned(),
            });
        }
        let (vs, model) =
            FidInceptionV3::load(path, device).map_err(|cause| EvalError::Inception {
                path: path.to_owned(),
                cause,
            })?;
        Ok(Self {
            _vs: vs,
            model,
            device,
        })
    }

    /// Pool features [B, 2048] of pictures [B,3,H,W] in [0, 1].
    pub fn features(&self, images: &Tensor) -> Result<Tensor, EvalError> {
        Ok(self.model.features(&images.f_to_device(self.device)?)?)
    }
}

/// What `swiftbrush eval fid` measured.
#[derive(Debug, Clone, Serialize)]
pub struct FidReport {
    pub model: String,
    pub num_images: i64,
    /// None when only statistics were asked for (`--save-stats`).
    pub fid: Option<f64>,
    pub reference: Option<String>,
    pub saved_stats: Option<String>,
    pub device: String,
    pub seconds_per_image: f64,
}

impl FidReport {
    pub fn table(&self) -> String {
        let mut s = format!(
            "model             {}\nimages            {}\n",
            self.model, self.num_images
        );
        if let (Some(fid), Some(r)) = (self.fid, &self.reference) {
            s += &format!("FID               {fid:.4} (against {r})\n");
        }
        if let Some(p) = &self.saved_stats {
            s += &format!("statistics        {p}\n");
        }
        s += &format!(
            "device            {}\nseconds per image {:.4}\n",
            self.device, self.seconds_per_image
        );
        s
    }
}

/// What `eval fid` compares against and writes.
#[derive(Debug, Clone)]
pub struct FidRequest {
    pub inception: PathBuf,
    pub reference: Option<PathBuf>,
    pub save_stats: Option<PathBuf>,
}

/// Draws `req`'s prompts as `sample` would, embeds every picture with the
/// FID Inception and compares their statistics with the reference's (and/or
/// saves them). The network and the reference are read first: a broken one
/// fails before any picture is drawn.
pub fn fid(req: &SampleRequest, fid: &FidRequest) -> Result<FidReport, EvalError> {
    if fid.reference.is_none() && fid.save_stats.is_none() {
        return Err(EvalError::Sample(SampleError::Input(
            "give --reference-stats FILE (to compare with) and/or --save-stats FILE".into(),
        )));
    }
    if req.prompts.len() < 2 {
        return Err(EvalError::Sample(SampleError::Input(format!(
            "FID needs at least 2 pictures (a covariance), got {} prompt(s); \
             tens of thousands make it comparable to published numbers",
            req.prompts.len()
        ))));
    }
    let device = crate::torch::device::parse_device(&req.device).map_err(SampleError::from)?;
    let network = FidNetwork::load(&fid.inception, device)?;
    let reference = fid.reference.as_deref().map(read_stats).transpose()?;
    if let Some((mu, _)) = &reference
        && mu.size() != [FID_FEATURES]
    {
        return Err(EvalError::Stats {
            path: fid.reference.clone().unwrap_or_default(),
            reason: format!(
                "holds {:?}-d statistics; the FID Inception's pool features are {FID_FEATURES}-d",
                mu.size()
            ),
        });
    }
    let started = Instant::now();
    let mut stats = FeatureStats::new(FID_FEATURES);
    let drawn = draw_in_batches(req, |_, _, images| {
        stats.add(&network.features(images)?)?;
        Ok::<(), EvalError>(())
    })?;
    let (mu, sigma) = stats.mean_and_cov()?;
    if let Some(path) = &fid.save_stats {
        write_stats(path, &mu, &sigma)?;
    }
    let distance = match &reference {
        Some((mu_r, sigma_r)) => Some(frechet_distance(&mu, &sigma, mu_r, sigma_r)?),
        None => None,
    };
    Ok(FidReport {
        model: req.model.describe(),
        num_images: stats.count(),
        fid: distance,
        reference: fid.reference.as_ref().map(|p| p.display().to_string()),
        saved_stats: fid.save_stats.as_ref().map(|p| p.display().to_string()),
        device: drawn.device,
        seconds_per_image: started.elapsed().as_secs_f64() / stats.count().max(1) as f64,
    })
}
