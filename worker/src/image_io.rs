//! Image batches to and from files: PNGs (one image, or a near-square grid
//! for a batch) quantised exactly as diffusers' `numpy_to_pil` does, and
//! float tensors in safetensors for bit-level comparisons.

use std::path::Path;

use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("expected an image batch [B,3,H,W], got shape {0:?}")]
    Shape(Vec<i64>),
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
}

/// [B,3,H,W] floats in [0,1] -> [B,H,W,3] bytes: round(x * 255), as
/// diffusers does (`(images * 255).round().astype("uint8")`).
pub fn to_u8(images: &Tensor) -> Result<Tensor, ImageError> {
    let size = images.size();
    if size.len() != 4 || size[1] != 3 {
        return Err(ImageError::Shape(size));
    }
    Ok((images.to_kind(Kind::Float).clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
        .to_device(tch::Device::Cpu))
}

/// A near-square grid: ceil(sqrt(n)) columns.
pub fn grid_columns(n: usize) -> usize {
    let mut cols = 1;
    while cols * cols < n {
        cols += 1;
    }
    cols
}

/// Writes one PNG: the single image, or a grid of `cols` columns for a
/// batch (filled row by row).
pub fn save_png(images: &Tensor, path: &Path, cols: usize) -> Result<(), ImageError> {
    let write_err = |reason: String| ImageError::Write {
        path: path.display().to_string(),
        reason,
    };
    grid(images, cols, write_err)?
        .save(path)
        .map_err(|e| write_err(e.to_string()))
}

/// The PNG file `save_png` would write, in memory (for object stores).
pub fn png_bytes(images: &Tensor, cols: usize) -> Result<Vec<u8>, ImageError> {
    let write_err = |reason: String| ImageError::Write {
        path: "(PNG in memory)".to_owned(),
        reason,
    };
    let mut out = std::io::Cursor::new(Vec::new());
    grid(images, cols, write_err)?
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| write_err(e.to_string()))?;
    Ok(out.into_inner())
}

/// The batch as one picture, `cols` images a row.
fn grid(
    images: &Tensor,
    cols: usize,
    write_err: impl Fn(String) -> ImageError,
) -> Result<image::RgbImage, ImageError> {
    let bytes = to_u8(images)?;
    let size = bytes.size();
    let (b, h, w) = (size[0] as usize, size[1] as usize, size[2] as usize);
    let cols = cols.clamp(1, b.max(1));
    let rows = b.div_ceil(cols);
    let data: Vec<u8> =
        Vec::try_from(bytes.reshape([-1])).map_err(|e: tch::TchError| write_err(e.to_string()))?;
    let mut grid = image::RgbImage::new((cols * w) as u32, (rows * h) as u32);
    for i in 0..b {
        let (gx, gy) = ((i % cols) * w, (i / cols) * h);
        for y in 0..h {
            for x in 0..w {
                let o = ((i * h + y) * w + x) * 3;
                let px = image::Rgb([data[o], data[o + 1], data[o + 2]]);
                grid.put_pixel((gx + x) as u32, (gy + y) as u32, px);
            }
        }
    }
    Ok(grid)
}

/// Reads a PNG as [1,3,H,W] floats in [0,1] (for tests and inspection).
pub fn load_png(path: &Path) -> Result<Tensor, ImageError> {
    let img = image::open(path)
        .map_err(|e| ImageError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?
        .to_rgb8();
    let (w, h) = (img.width() as i64, img.height() as i64);
    let t = Tensor::from_slice(img.as_raw()).reshape([1, h, w, 3]);
    Ok(t.permute([0, 3, 1, 2]).to_kind(Kind::Float) / 255.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_round_trips_through_png() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = Tensor::rand([3, 3, 4, 5], (Kind::Float, tch::Device::Cpu));
        let path = dir.path().join("g.png");
        save_png(&imgs, &path, 2).unwrap();
        let back = load_png(&path).unwrap();
        assert_eq!(back.size(), vec![1, 3, 8, 10]);
        let q = |t: &Tensor| (t.clamp(0.0, 1.0) * 255.0).round() / 255.0;
        // Third image sits in the second row, first column.
        let got = back.narrow(2, 4, 4).narrow(3, 0, 5);
        let d = (got - q(&imgs.get(2).unsqueeze(0)))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-6, "{d}");
        let e = save_png(
            &Tensor::zeros([3, 4], (Kind::Float, tch::Device::Cpu)),
            &path,
            1,
        );
        assert!(e.unwrap_err().to_string().contains("[B,3,H,W]"));
    }

    #[test]
    fn grids_are_near_square() {
        let cols: Vec<usize> = [1, 2, 3, 4, 5, 9, 10].map(grid_columns).to_vec();
        assert_eq!(cols, [1, 2, 2, 2, 3, 3, 4]);
    }
}
