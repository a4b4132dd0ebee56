//! The shapes32 generator, exactly as shared/TOYWORLD.md defines it: 32x32
//! RGB images of one hard-edged shape on a plain background, and the 54
//! captions `a {color} {shape} on a {background} background`.
//!
//! Center and size are continuous draws (TOYWORLD says "uniform"):
//! cx, cy ~ U[12, 20) and r ~ U[7, 11) px, so every caption is a continuous
//! distribution of images and the centroid spread is 8 / sqrt(12) = 2.31 px
//! per axis.

use tch::{Device, Kind, Tensor};

use super::rng::ToyRng;

/// Image side in pixels.
pub const SIZE: usize = 32;
/// Channels (RGB).
pub const CHANNELS: usize = 3;
/// Bytes of one image, HWC.
pub const IMAGE_BYTES: usize = SIZE * SIZE * CHANNELS;

pub const CENTER_RANGE: (f64, f64) = (12.0, 20.0);
pub const SIZE_RANGE: (f64, f64) = (7.0, 11.0);

/// Shape colors, in caption order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeColor {
    Red,
    Green,
    Blue,
    Yellow,
    Magenta,
    Cyan,
}

impl ShapeColor {
    pub const ALL: [Self; 6] = [
        Self::Red,
        Self::Green,
        Self::Blue,
        Self::Yellow,
        Self::Magenta,
        Self::Cyan,
    ];

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Self::Red => [230, 25, 25],
            Self::Green => [25, 180, 25],
            Self::Blue => [25, 60, 230],
            Self::Yellow => [240, 220, 20],
            Self::Magenta => [220, 30, 220],
            Self::Cyan => [20, 210, 220],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Red => "red",
            Self::Green => "green",
            Self::Blue => "blue",
            Self::Yellow => "yellow",
            Self::Magenta => "magenta",
            Self::Cyan => "cyan",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
}

impl ShapeKind {
    pub const ALL: [Self; 3] = [Self::Circle, Self::Square, Self::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Self::Circle => "circle",
            Self::Square => "square",
            Self::Triangle => "triangle",
        }
    }

    /// Whether the pixel whose center is (px, py) is covered by this shape
    /// centered at (cx, cy) with size r.
    pub fn covers(self, px: f64, py: f64, cx: f64, cy: f64, r: f64) -> bool {
        let (dx, dy) = (px - cx, py - cy);
        match self {
            Self::Circle => dx * dx + dy * dy <= r * r,
            Self::Square => dx.abs() <= 0.9 * r && dy.abs() <= 0.9 * r,
            // Apex up: the half-width grows from 0 at y = cy - r to r at y = cy + r.
            Self::Triangle => {
                py >= cy - r && py <= cy + r && dx.abs() <= r * (py - (cy - r)) / (2.0 * r)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Background {
    White,
    Black,
    Gray,
}

impl Background {
    pub const ALL: [Self; 3] = [Self::White, Self::Black, Self::Gray];

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Self::White => [245, 245, 245],
            Self::Black => [15, 15, 15],
            Self::Gray => [128, 128, 128],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::White => "white",
            Self::Black => "black",
            Self::Gray => "gray",
        }
    }
}

/// One of the 54 captions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Caption {
    pub color: ShapeColor,
    pub kind: ShapeKind,
    pub background: Background,
}

pub const NUM_CAPTIONS: usize = 54;

impl Caption {
    /// All 54 captions; a caption's id is its index here (color major, then
    /// shape, then background).
    pub fn all() -> Vec<Caption> {
        let mut out = Vec::with_capacity(NUM_CAPTIONS);
        for color in ShapeColor::ALL {
            for kind in ShapeKind::ALL {
                for background in Background::ALL {
                    out.push(Caption {
                        color,
                        kind,
                        background,
                    });
                }
            }
        }
        out
    }

    /// The caption with this id, if it is below [`NUM_CAPTIONS`].
    pub fn from_id(id: usize) -> Option<Caption> {
        (id < NUM_CAPTIONS).then(|| {
            let (color, rest) = (id / 9, id % 9);
            Caption {
                color: ShapeColor::ALL[color],
                kind: ShapeKind::ALL[rest / 3],
                background: Background::ALL[rest % 3],
            }
        })
    }

    pub fn id(&self) -> usize {
        fn pos<T: PartialEq>(all: &[T], x: &T) -> usize {
            all.iter().position(|v| v == x).unwrap_or(0)
        }
        pos(&ShapeColor::ALL, &self.color) * 9
            + pos(&ShapeKind::ALL, &self.kind) * 3
            + pos(&Background::ALL, &self.background)
    }

    pub fn text(&self) -> String {
        format!(
            "a {} {} on a {} background",
            self.color.name(),
            self.kind.name(),
            self.background.name()
        )
    }
}

/// Where and how large one drawn shape is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShapeParams {
    pub cx: f64,
    pub cy: f64,
    pub r: f64,
}

impl ShapeParams {
    pub fn sample(rng: &mut ToyRng) -> Self {
        let (c0, c1) = CENTER_RANGE;
        let (r0, r1) = SIZE_RANGE;
        Self {
            cx: rng.uniform_in(c0, c1),
            cy: rng.uniform_in(c0, c1),
            r: rng.uniform_in(r0, r1),
        }
    }
}

/// Draws one image, HWC bytes.
pub fn draw(caption: &Caption, params: &ShapeParams) -> [u8; IMAGE_BYTES] {
    let (bg, fg) = (caption.background.rgb(), caption.color.rgb());
    let mut img = [0u8; IMAGE_BYTES];
    for y in 0..SIZE {
        for x in 0..SIZE {
            let covered = caption.kind.covers(
                x as f64 + 0.5,
                y as f64 + 0.5,
                params.cx,
                params.cy,
                params.r,
            );
            let o = (y * SIZE + x) * CHANNELS;
            img[o..o + CHANNELS].copy_from_slice(if covered { &fg } else { &bg });
        }
    }
    img
}

/// A batch of drawn images with what they show.
#[derive(Debug, Clone)]
pub struct ShapeBatch {
    pub captions: Vec<Caption>,
    pub params: Vec<ShapeParams>,
    /// B images, HWC bytes each, concatenated.
    pub pixels: Vec<u8>,
}

impl ShapeBatch {
    /// `n` images of uniformly drawn captions.
    pub fn sample(n: usize, rng: &mut ToyRng) -> Self {
        let captions: Vec<Caption> = (0..n)
            .map(|_| Caption::from_id(rng.below(NUM_CAPTIONS as u64) as usize))
            .map(|c| c.unwrap_or_else(|| unreachable!("below() keeps ids in range")))
            .collect();
        Self::sample_for(&captions, rng)
    }

    /// One image of each given caption.
    pub fn sample_for(captions: &[Caption], rng: &mut ToyRng) -> Self {
        let mut pixels = Vec::with_capacity(captions.len() * IMAGE_BYTES);
        let mut params = Vec::with_capacity(captions.len());
        for c in captions {
            let p = ShapeParams::sample(rng);
            pixels.extend_from_slice(&draw(c, &p));
            params.push(p);
        }
        Self {
            captions: captions.to_vec(),
            params,
            pixels,
        }
    }

    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    /// Image `i` as HWC bytes.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// The images as float [B, 3, 32, 32] in [-1, 1] on `device`, the
    /// models' pixel space (x / 127.5 - 1).
    pub fn to_tensor(&self, device: Device) -> Tensor {
        pixels_to_tensor(&self.pixels, self.len(), device)
    }
}

/// HWC bytes of `n` images -> float [n, 3, 32, 32] in [-1, 1].
pub fn pixels_to_tensor(pixels: &[u8], n: usize, device: Device) -> Tensor {
    let side = SIZE as i64;
    Tensor::from_slice(pixels)
        .view([n as i64, side, side, CHANNELS as i64])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        .to_device(device)
        / 127.5
        - 1.0
}

/// Float images [B, 3, 32, 32] in [-1, 1] (any device) -> HWC bytes,
/// rounding (x + 1) * 127.5 and clamping to [0, 255].
pub fn tensor_to_pixels(images: &Tensor) -> Result<Vec<u8>, tch::TchError> {
    let size = images.size();
    if !matches!(size.as_slice(), [_, 3, h, w] if *h == SIZE as i64 && *w == SIZE as i64) {
        return Err(tch::TchError::Shape(format!(
            "expected shapes32 images [B, 3, {SIZE}, {SIZE}], got {size:?}"
        )));
    }
    let bytes = ((images.f_to_kind(Kind::Float)? + 1.0) * 127.5)
        .f_round()?
        .f_clamp(0.0, 255.0)?
        .f_to_kind(Kind::Uint8)?
        .f_permute([0, 2, 3, 1])?
        .f_contiguous()?
        .f_to_device(Device::Cpu)?
        .f_reshape([-1])?;
    Vec::<u8>::try_from(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifty_four_captions_with_ids() {
        let all = Caption::all();
        assert_eq!(all.len(), NUM_CAPTIONS);
        for (i, c) in all.iter().enumerate() {
            assert_eq!(c.id(), i);
            assert_eq!(Caption::from_id(i), Some(*c));
        }
        assert_eq!(Caption::from_id(NUM_CAPTIONS), None);
        assert_eq!(all[0].text(), "a red circle on a white background");
        assert_eq!(all[53].text(), "a cyan triangle on a gray background");
        let texts: std::collections::HashSet<String> = all.iter().map(Caption::text).collect();
        assert_eq!(texts.len(), NUM_CAPTIONS);
    }

    #[test]
    fn draws_the_exact_rules() {
        let c = Caption {
            color: ShapeColor::Red,
            kind: ShapeKind::Square,
            background: Background::Black,
        };
        // Square of half-side 0.9 * 10 = 9 around (16, 16): pixel centers
        // 7.5 ..= 24.5 are covered, i.e. pixels 7..=24 (18 px per side).
        let p = ShapeParams {
            cx: 16.0,
            cy: 16.0,
            r: 10.0,
        };
        let img = draw(&c, &p);
        let red = img.chunks(3).filter(|px| *px == [230, 25, 25]).count();
        assert_eq!(red, 18 * 18);
        assert_eq!(&img[0..3], &[15, 15, 15]);
        assert_eq!(
            &img[(7 * SIZE + 7) * 3..(7 * SIZE + 7) * 3 + 3],
            &[230, 25, 25]
        );
        assert_eq!(
            &img[(6 * SIZE + 7) * 3..(6 * SIZE + 7) * 3 + 3],
            &[15, 15, 15]
        );

        // Triangle apex up: the top row is narrow, the bottom row wide.
        let tri = Caption {
            kind: ShapeKind::Triangle,
            ..c
        };
        let img = draw(&tri, &p);
        let row = |y: usize| (0..SIZE).filter(|x| img[(y * SIZE + x) * 3] == 230).count();
        assert!(
            row(7) < row(15) && row(15) < row(25),
            "{} {} {}",
            row(7),
            row(15),
            row(25)
        );
        assert_eq!(row(5), 0);
    }

    #[test]
    fn batches_are_seeded_and_tensors_round_trip() {
        let a = ShapeBatch::sample(6, &mut ToyRng::new(3));
        let b = ShapeBatch::sample(6, &mut ToyRng::new(3));
        assert_eq!(a.pixels, b.pixels);
        assert_eq!(a.captions, b.captions);
        let c = ShapeBatch::sample(6, &mut ToyRng::new(4));
        assert_ne!(a.pixels, c.pixels);
        for p in &a.params {
            assert!((12.0..20.0).contains(&p.cx) && (12.0..20.0).contains(&p.cy));
            assert!((7.0..11.0).contains(&p.r));
        }
        let t = a.to_tensor(Device::Cpu);
        assert_eq!(t.size(), [6, 3, 32, 32]);
        assert!(t.min().double_value(&[]) >= -1.0 && t.max().double_value(&[]) <= 1.0);
        assert_eq!(tensor_to_pixels(&t).unwrap(), a.pixels);
    }
}
