//! The Inception-v3 of FID (pytorch-fid's `InceptionV3` with
//! `use_fid_inception=True`: torchvision's Inception3 with the TensorFlow
//! FID network's blocks), up to its 2048-d average-pooled features. Weights
//! load strictly by the names of pytorch-fid's pt_inception-2015-12-05 file
//! (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ...)
//! once converted to safetensors; its classifier (`fc.*`) and batch-norm
//! step counters are not used and are skipped.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

use crate::models::clip::param;
use crate::models::{ModelError, weights};

/// torchvision's `BasicConv2d`: convolution without bias, batch norm
/// (eps 0.001, running statistics), ReLU.
#[derive(Debug)]
struct BasicConv2d {
    weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    stride: [i64; 2],
    padding: [i64; 2],
}

impl BasicConv2d {
    fn new(
        vs: nn::Path,
        (cin, cout): (i64, i64),
        kernel: [i64; 2],
        stride: i64,
        padding: [i64; 2],
    ) -> Result<Self, tch::TchError> {
        let bn = &vs / "bn";
        Ok(Self {
            weight: param(
                &(&vs / "conv"),
                "weight",
                &[cout, cin, kernel[0], kernel[1]],
            )?,
            bn_weight: param(&bn, "weight", &[cout])?,
            bn_bias: param(&bn, "bias", &[cout])?,
            running_mean: param(&bn, "running_mean", &[cout])?,
            running_var: param(&bn, "running_var", &[cout])?,
            stride: [stride, stride],
            padding,
        })
    }

    /// A square kernel `k` with padding `p`.
    fn square(
        vs: nn::Path,
        io: (i64, i64),
        k: i64,
        stride: i64,
        p: i64,
    ) -> Result<Self, tch::TchError> {
        Self::new(vs, io, [k, k], stride, [p, p])
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, tch::TchError> {
        let y = xs.f_conv2d(
            &self.weight,
            None::<Tensor>,
            self.stride,
            self.padding,
            [1, 1],
            1,
        )?;
        Tensor::f_batch_norm(
            &y,
            Some(&self.bn_weight),
            Some(&self.bn_bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            false,
            0.0,
            1e-3,
            false,
        )?
        .f_relu()
    }
}

fn avg_pool_3x3(xs: &Tensor) -> Result<Tensor, tch::TchError> {
    // count_include_pad=False: the FID network's pooling.
    xs.f_avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None)
}

fn max_pool(xs: &Tensor, stride: i64, padding: i64) -> Result<Tensor, tch::TchError> {
    xs.f_max_pool2d([3, 3], [stride, stride], [padding, padding], [1, 1], false)
}

/// `FIDInceptionA` (Mixed_5b..5d).
#[derive(Debug)]
struct InceptionA {
    branch1x1: BasicConv2d,
    branch5x5: [BasicConv2d; 2],
    branch3x3dbl: [BasicConv2d; 3],
    branch_pool: BasicConv2d,
}

impl InceptionA {
    fn new(vs: nn::Path, cin: i64, pool_features: i64) -> Result<Self, tch::TchError> {
        Ok(Self {
            branch1x1: BasicConv2d::square(&vs / "branch1x1", (cin, 64), 1, 1, 0)?,
            branch5x5: [
                BasicConv2d::square(&vs / "branch5x5_1", (cin, 48), 1, 1, 0)?,
                BasicConv2d::square(&vs / "branch5x5_2", (48, 64), 5, 1, 2)?,
            ],
            branch3x3dbl: [
                BasicConv2d::square(&vs / "branch3x3dbl_1", (cin, 64), 1, 1, 0)?,
                BasicConv2d::square(&vs / "branch3x3dbl_2", (64, 96), 3, 1, 1)?,
                BasicConv2d::square(&vs / "branch3x3dbl_3", (96, 96), 3, 1, 1)?,
            ],
            branch_pool: BasicConv2d::square(&vs / "branch_pool", (cin, pool_features), 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        Tensor::f_cat(
            &[
                self.branch1x1.forward(x)?,
                chain(&self.branch5x5, x)?,
                chain(&self.branch3x3dbl, x)?,
                self.branch_pool.forward(&avg_pool_3x3(x)?)?,
            ],
            1,
        )
    }
}

/// torchvision's `InceptionB` (Mixed_6a).
#[derive(Debug)]
struct InceptionB {
    branch3x3: BasicConv2d,
    branch3x3dbl: [BasicConv2d; 3],
}

impl InceptionB {
    fn new(vs: nn::Path, cin: i64) -> Result<Self, tch::TchError> {
        Ok(Self {
            branch3x3: BasicConv2d::square(&vs / "branch3x3", (cin, 384), 3, 2, 0)?,
            branch3x3dbl: [
                BasicConv2d::square(&vs / "branch3x3dbl_1", (cin, 64), 1, 1, 0)?,
                BasicConv2d::square(&vs / "branch3x3dbl_2", (64, 96), 3, 1, 1)?,
                BasicConv2d::square(&vs / "branch3x3dbl_3", (96, 96), 3, 2, 0)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        Tensor::f_cat(
            &[
                self.branch3x3.forward(x)?,
                chain(&self.branch3x3dbl, x)?,
                max_pool(x, 2, 0)?,
            ],
            1,
        )
    }
}

/// A 1x7 convolution (padding 0, 3) or a 7x1 one.
fn conv_1x7(vs: nn::Path, io: (i64, i64)) -> Result<BasicConv2d, tch::TchError> {
    BasicConv2d::new(vs, io, [1, 7], 1, [0, 3])
}

fn conv_7x1(vs: nn::Path, io: (i64, i64)) -> Result<BasicConv2d, tch::TchError> {
    BasicConv2d::new(vs, io, [7, 1], 1, [3, 0])
}

/// `FIDInceptionC` (Mixed_6b..6e).
#[derive(Debug)]
struct InceptionC {
    branch1x1: BasicConv2d,
    branch7x7: [BasicConv2d; 3],
    branch7x7dbl: [BasicConv2d; 5],
    branch_pool: BasicConv2d,
}

impl InceptionC {
    fn new(vs: nn::Path, cin: i64, c7: i64) -> Result<Self, tch::TchError> {
        Ok(Self {
            branch1x1: BasicConv2d::square(&vs / "branch1x1", (cin, 192), 1, 1, 0)?,
            branch7x7: [
                BasicConv2d::square(&vs / "branch7x7_1", (cin, c7), 1, 1, 0)?,
                conv_1x7(&vs / "branch7x7_2", (c7, c7))?,
                conv_7x1(&vs / "branch7x7_3", (c7, 192))?,
            ],
            branch7x7dbl: [
                BasicConv2d::square(&vs / "branch7x7dbl_1", (cin, c7), 1, 1, 0)?,
                conv_7x1(&vs / "branch7x7dbl_2", (c7, c7))?,
                conv_1x7(&vs / "branch7x7dbl_3", (c7, c7))?,
                conv_7x1(&vs / "branch7x7dbl_4", (c7, c7))?,
                conv_1x7(&vs / "branch7x7dbl_5", (c7, 192))?,
            ],
            branch_pool: BasicConv2d::square(&vs / "branch_pool", (cin, 192), 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        Tensor::f_cat(
            &[
                self.branch1x1.forward(x)?,
                chain(&self.branch7x7, x)?,
                chain(&self.branch7x7dbl, x)?,
                self.branch_pool.forward(&avg_pool_3x3(x)?)?,
            ],
            1,
        )
    }
}

/// torchvision's `InceptionD` (Mixed_7a).
#[derive(Debug)]
struct InceptionD {
    branch3x3: [BasicConv2d; 2],
    branch7x7x3: [BasicConv2d; 4],
}

impl InceptionD {
    fn new(vs: nn::Path, cin: i64) -> Result<Self, tch::TchError> {
        Ok(Self {
            branch3x3: [
                BasicConv2d::square(&vs / "branch3x3_1", (cin, 192), 1, 1, 0)?,
                BasicConv2d::square(&vs / "branch3x3_2", (192, 320), 3, 2, 0)?,
            ],
            branch7x7x3: [
                BasicConv2d::square(&vs / "branch7x7x3_1", (cin, 192), 1, 1, 0)?,
                conv_1x7(&vs / "branch7x7x3_2", (192, 192))?,
                conv_7x1(&vs / "branch7x7x3_3", (192, 192))?,
                BasicConv2d::square(&vs / "branch7x7x3_4", (192, 192), 3, 2, 0)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        Tensor::f_cat(
            &[
                chain(&self.branch3x3, x)?,
                chain(&self.branch7x7x3, x)?,
                max_pool(x, 2, 0)?,
            ],
            1,
        )
    }
}

/// `FIDInceptionE_1` (Mixed_7b, average pooling) and `FIDInceptionE_2`
/// (Mixed_7c, max pooling).
#[derive(Debug)]
struct InceptionE {
    branch1x1: BasicConv2d,
    branch3x3_1: BasicConv2d,
    branch3x3_2: [BasicConv2d; 2],
    branch3x3dbl: [BasicConv2d; 2],
    branch3x3dbl_3: [BasicConv2d; 2],
    branch_pool: BasicConv2d,
    max_pooling: bool,
}

impl InceptionE {
    fn new(vs: nn::Path, cin: i64, max_pooling: bool) -> Result<Self, tch::TchError> {
        let split = |a: &str, b: &str| -> Result<[BasicConv2d; 2], tch::TchError> {
            Ok([
                BasicConv2d::new(&vs / a, (384, 384), [1, 3], 1, [0, 1])?,
                BasicConv2d::new(&vs / b, (384, 384), [3, 1], 1, [1, 0])?,
            ])
        };
        Ok(Self {
            branch1x1: BasicConv2d::square(&vs / "branch1x1", (cin, 320), 1, 1, 0)?,
            branch3x3_1: BasicConv2d::square(&vs / "branch3x3_1", (cin, 384), 1, 1, 0)?,
            branch3x3_2: split("branch3x3_2a", "branch3x3_2b")?,
            branch3x3dbl: [
                BasicConv2d::square(&vs / "branch3x3dbl_1", (cin, 448), 1, 1, 0)?,
                BasicConv2d::square(&vs / "branch3x3dbl_2", (448, 384), 3, 1, 1)?,
            ],
            branch3x3dbl_3: split("branch3x3dbl_3a", "branch3x3dbl_3b")?,
            branch_pool: BasicConv2d::square(&vs / "branch_pool", (cin, 192), 1, 1, 0)?,
            max_pooling,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        let both = |convs: &[BasicConv2d; 2], y: &Tensor| -> Result<Tensor, tch::TchError> {
            Tensor::f_cat(&[convs[0].forward(y)?, convs[1].forward(y)?], 1)
        };
        let b3 = self.branch3x3_1.forward(x)?;
        let b3dbl = chain(&self.branch3x3dbl, x)?;
        let pooled = if self.max_pooling {
            max_pool(x, 1, 1)?
        } else {
            avg_pool_3x3(x)?
        };
        Tensor::f_cat(
            &[
                self.branch1x1.forward(x)?,
                both(&self.branch3x3_2, &b3)?,
                both(&self.branch3x3dbl_3, &b3dbl)?,
                self.branch_pool.forward(&pooled)?,
            ],
            1,
        )
    }
}

fn chain(convs: &[BasicConv2d], x: &Tensor) -> Result<Tensor, tch::TchError> {
    let mut y = x.shallow_clone();
    for c in convs {
        y = c.forward(&y)?;
    }
    Ok(y)
}

/// pytorch-fid's `InceptionV3([3])`: pictures in [0, 1] resized to 299x299
/// (bilinear), scaled to [-1, 1], through the FID network to its
/// average-pooled 2048 features.
#[derive(Debug)]
pub struct FidInceptionV3 {
    stem: Vec<BasicConv2d>,
    stem2: Vec<BasicConv2d>,
    mixed_5: Vec<InceptionA>,
    mixed_6a: InceptionB,
    mixed_6: Vec<InceptionC>,
    mixed_7a: InceptionD,
    mixed_7: Vec<InceptionE>,
}

/// Tensors of the weight file that the features do not use.
fn unused(name: &str) -> bool {
    name.starts_with("fc.") || name.ends_with(".num_batches_tracked")
}

/// The dimension of the features.
pub const FID_FEATURES: i64 = 2048;

impl FidInceptionV3 {
    fn new(vs: nn::Path) -> Result<Self, tch::TchError> {
        let sq = |name: &str, io, k, s, p| BasicConv2d::square(&vs / name, io, k, s, p);
        Ok(Self {
            stem: vec![
                sq("Conv2d_1a_3x3", (3, 32), 3, 2, 0)?,
                sq("Conv2d_2a_3x3", (32, 32), 3, 1, 0)?,
                sq("Conv2d_2b_3x3", (32, 64), 3, 1, 1)?,
            ],
            stem2: vec![
                sq("Conv2d_3b_1x1", (64, 80), 1, 1, 0)?,
                sq("Conv2d_4a_3x3", (80, 192), 3, 1, 0)?,
            ],
            mixed_5: vec![
                InceptionA::new(&vs / "Mixed_5b", 192, 32)?,
                InceptionA::new(&vs / "Mixed_5c", 256, 64)?,
                InceptionA::new(&vs / "Mixed_5d", 288, 64)?,
            ],
            mixed_6a: InceptionB::new(&vs / "Mixed_6a", 288)?,
            mixed_6: vec![
                InceptionC::new(&vs / "Mixed_6b", 768, 128)?,
                InceptionC::new(&vs / "Mixed_6c", 768, 160)?,
                InceptionC::new(&vs / "Mixed_6d", 768, 160)?,
                InceptionC::new(&vs / "Mixed_6e", 768, 192)?,
            ],
            mixed_7a: InceptionD::new(&vs / "Mixed_7a", 768)?,
            mixed_7: vec![
                InceptionE::new(&vs / "Mixed_7b", 1280, false)?,
                InceptionE::new(&vs / "Mixed_7c", 2048, true)?,
            ],
        })
    }

    /// Loads the weights (one safetensors file) strictly, frozen, in
    /// float32 on `device`.
    pub fn load(path: &Path, device: Device) -> Result<(nn::VarStore, Self), ModelError> {
        let mut vs = nn::VarStore::new(device);
        let model = Self::new(vs.root())?;
        let tensors: HashMap<String, Tensor> = weights::read_safetensors(path)?
            .into_iter()
            .filter(|(name, _)| !unused(name))
            .map(|(name, t)| (name, t.to_kind(Kind::Float)))
            .collect();
        weights::load_tensors_strict(&mut vs, tensors, &[path.to_owned()])?;
        vs.freeze();
        Ok((vs, model))
    }

    /// The pool features [B, 2048] of pictures [B,3,H,W] in [0, 1].
    pub fn features(&self, images: &Tensor) -> Result<Tensor, tch::TchError> {
        tch::no_grad(|| {
            let size = images.size();
            if size.len() != 4 || size[1] != 3 {
                return Err(tch::TchError::Shape(format!(
                    "expected pictures [B,3,H,W], got {size:?}"
                )));
            }
            let x = images
                .f_to_kind(Kind::Float)?
                .f_upsample_bilinear2d([299, 299], false, None, None)?
                .f_mul_scalar(2.0)?
                .f_sub_scalar(1.0)?;
            let mut x = chain(&self.stem, &x)?;
            x = max_pool(&x, 2, 0)?;
            x = chain(&self.stem2, &x)?;
            x = max_pool(&x, 2, 0)?;
            for block in &self.mixed_5 {
                x = block.forward(&x)?;
            }
            x = self.mixed_6a.forward(&x)?;
            for block in &self.mixed_6 {
                x = block.forward(&x)?;
            }
            x = self.mixed_7a.forward(&x)?;
            for block in &self.mixed_7 {
                x = block.forward(&x)?;
            }
            x.f_mean_dim([2i64, 3].as_slice(), false, Kind::Float)
        })
    }
}
