//! transformers' `CLIPImageProcessor` (its PIL backend, what CLIP score
//! tools run): resize the shortest side to `size.shortest_edge` (bicubic,
//! antialiased, on 8-bit pixels as PIL works), centre-crop to `crop_size`,
//! rescale to [0, 1], normalise by the CLIP mean and std. Read from a CLIP
//! folder's preprocessor_config.json.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::models::ModelError;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipImageProcessor {
    pub do_resize: bool,
    pub size: ShortestEdge,
    /// PIL's resampling filter; 3 (bicubic) is the only one implemented.
    pub resample: i64,
    pub do_center_crop: bool,
    pub crop_size: CropSize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct ShortestEdge {
    pub shortest_edge: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct CropSize {
    pub height: i64,
    pub width: i64,
}

/// PIL's BICUBIC.
const BICUBIC: i64 = 3;

impl Default for ClipImageProcessor {
    /// transformers' defaults (OpenAI CLIP at 224 px).
    fn default() -> Self {
        Self {
            do_resize: true,
            size: ShortestEdge { shortest_edge: 224 },
            resample: BICUBIC,
            do_center_crop: true,
            crop_size: CropSize {
                height: 224,
                width: 224,
            },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
        }
    }
}

impl ClipImageProcessor {
    /// Reads `preprocessor_config.json`; a missing file means the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let me: Self = crate::models::read_json_config(path)?;
        let invalid = |message: String| ModelError::Config {
            path: path.to_owned(),
            message,
        };
        if me.do_resize && me.resample != BICUBIC {
            return Err(invalid(format!(
                "resample = {} is not supported (3, bicubic, is what CLIP uses)",
                me.resample
            )));
        }
        if me.size.shortest_edge <= 0 || me.crop_size.height <= 0 || me.crop_size.width <= 0 {
            return Err(invalid("size and crop_size must be positive".to_owned()));
        }
        if me.image_std.iter().any(|s| *s <= 0.0) {
            return Err(invalid("image_std must be positive".to_owned()));
        }
        Ok(me)
    }

    /// Pictures [B,3,H,W] in [0,1] (as `sample` writes them) -> pixel
    /// values [B,3,h,w] for the vision tower. The pictures are first
    /// quantised to 8 bits as their PNG is, so a picture scores the same
    /// as its file.
    pub fn pixel_values(&self, images: &Tensor) -> Result<Tensor, tch::TchError> {
        tch::no_grad(|| {
            let size = images.size();
            if size.len() != 4 || size[1] != 3 {
                return Err(tch::TchError::Shape(format!(
                    "expected pictures [B,3,H,W], got {size:?}"
                )));
            }
            let mut x = images
                .f_to_kind(Kind::Float)?
                .f_clamp(0.0, 1.0)?
                .f_mul_scalar(255.0)?
                .f_round()?;
            if self.do_resize {
                let (h, w) = (size[2], size[3]);
                let (nh, nw) = shortest_edge_size(h, w, self.size.shortest_edge);
                // PIL's bicubic (a = -0.5, its support widened when
                // shrinking) is libtorch's antialiased bicubic. PIL resizes
                // the width first, then the height, with 8-bit pixels in
                // between and after: so do the same.
                for size in [[h, nw], [nh, nw]] {
                    if size != [x.size()[2], x.size()[3]] {
                        x = x
                            .f_internal_upsample_bicubic2d_aa(size, false, None, None)?
                            .f_round()?
                            .f_clamp(0.0, 255.0)?;
                    }
                }
            }
            if self.do_center_crop {
                let (h, w) = (x.size()[2], x.size()[3]);
                let (ch, cw) = (self.crop_size.height, self.crop_size.width);
                if ch > h || cw > w {
                    return Err(tch::TchError::Shape(format!(
                        "cannot centre-crop {h}x{w} pixels to {ch}x{cw}"
                    )));
                }
                x = x
                    .f_narrow(2, (h - ch) / 2, ch)?
                    .f_narrow(3, (w - cw) / 2, cw)?;
            }
            if self.do_rescale {
                x = x.f_mul_scalar(self.rescale_factor)?;
            }
            if self.do_normalize {
                let stat = |v: [f64; 3]| {
                    Tensor::from_slice(&v.map(|s| s as f32))
                        .view([1, 3, 1, 1])
                        .to_device(x.device())
                };
                x = x
                    .f_sub(&stat(self.image_mean))?
                    .f_div(&stat(self.image_std))?;
            }
            Ok(x)
        })
    }
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`:
/// the shorter side becomes `edge`, the longer is scaled and truncated.
fn shortest_edge_size(h: i64, w: i64, edge: i64) -> (i64, i64) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (edge as f64 * long as f64 / short as f64) as i64;
    if w <= h {
        (new_long, edge)
    } else {
        (edge, new_long)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shorter_side_becomes_the_edge() {
        assert_eq!(shortest_edge_size(512, 512, 224), (224, 224));
        assert_eq!(shortest_edge_size(48, 64, 30), (30, 40));
        assert_eq!(shortest_edge_size(64, 48, 30), (40, 30));
        // Truncated, as int() does: 224 * 683 / 512 = 298.8.
        assert_eq!(shortest_edge_size(512, 683, 224), (224, 298));
    }
}
