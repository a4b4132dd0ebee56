//! Judging a shapes32 image against its caption, exactly by the rules of
//! shared/TOYWORLD.md:
//!
//! - background: the palette background nearest to the per-channel median
//!   of the 2-pixel border;
//! - shape pixels: farther than 80 (RGB Euclidean) from that background's
//!   palette color; fewer than 20 means no shape;
//! - color: the palette color nearest to the per-channel median of the
//!   shape pixels;
//! - kind: fill ratio (shape pixels / bounding-box area) below 0.64 is a
//!   triangle, below 0.9 a circle, else a square.
//!
//! A [`ToyReport`] adds up many judgements: the accuracy of each attribute
//! and of all three, and per caption the spread (sample standard deviation)
//! of the shape's centroid and of sqrt(area), averaged over captions. The
//! centroid spread is sqrt((var x + var y) / 2), the per-axis spread, so
//! the training data's is 8 / sqrt(12) = 2.31 px.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::shapes::{Background, CHANNELS, Caption, IMAGE_BYTES, SIZE, ShapeColor, ShapeKind};

pub const BORDER_PX: usize = 2;
pub const SHAPE_DISTANCE: f64 = 80.0;
pub const MIN_SHAPE_PIXELS: usize = 20;
pub const TRIANGLE_BELOW: f64 = 0.64;
pub const CIRCLE_BELOW: f64 = 0.9;

/// What the evaluator sees in one image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Judgement {
    pub background: Background,
    /// None when fewer than 20 pixels differ from the background.
    pub color: Option<ShapeColor>,
    pub kind: Option<ShapeKind>,
    pub num_shape_pixels: usize,
    /// Mean pixel-center coordinates (x + 0.5, y + 0.5) of the shape pixels.
    pub centroid: Option<(f64, f64)>,
    pub fill_ratio: Option<f64>,
}

impl Judgement {
    pub fn matches(&self, caption: &Caption) -> bool {
        self.background == caption.background
            && self.color == Some(caption.color)
            && self.kind == Some(caption.kind)
    }
}

fn dist2(a: [f64; 3], b: [u8; 3]) -> f64 {
    (0..3).map(|i| (a[i] - f64::from(b[i])).powi(2)).sum()
}

fn nearest<T: Copy>(color: [f64; 3], palette: &[T], rgb: impl Fn(T) -> [u8; 3]) -> T {
    let mut best = palette[0];
    for &p in &palette[1..] {
        if dist2(color, rgb(p)) < dist2(color, rgb(best)) {
            best = p;
        }
    }
    best
}

/// numpy's median: the mean of the two middle values for an even count.
fn median(values: &mut [u8]) -> f64 {
    values.sort_unstable();
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        f64::from(values[n / 2])
    } else {
        (f64::from(values[n / 2 - 1]) + f64::from(values[n / 2])) / 2.0
    }
}

fn channel_medians(pixels: &[[u8; 3]]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let mut v: Vec<u8> = pixels.iter().map(|p| p[c]).collect();
        *o = median(&mut v);
    }
    out
}

/// Judges one 32x32 image given as HWC bytes (`IMAGE_BYTES` long).
pub fn judge(image: &[u8]) -> Judgement {
    assert_eq!(
        image.len(),
        IMAGE_BYTES,
        "judge expects one 32x32 RGB image"
    );
    let px = |x: usize, y: usize| -> [u8; 3] {
        let o = (y * SIZE + x) * CHANNELS;
        [image[o], image[o + 1], image[o + 2]]
    };
    let border: Vec<[u8; 3]> = (0..SIZE)
        .flat_map(|y| (0..SIZE).map(move |x| (x, y)))
        .filter(|&(x, y)| {
            x < BORDER_PX || y < BORDER_PX || x >= SIZE - BORDER_PX || y >= SIZE - BORDER_PX
        })
        .map(|(x, y)| px(x, y))
        .collect();
    let background = nearest(channel_medians(&border), &Background::ALL, Background::rgb);
    let bg = background.rgb().map(f64::from);

    let mut shape: Vec<[u8; 3]> = Vec::new();
    let (mut sx, mut sy) = (0.0, 0.0);
    let (mut x0, mut y0, mut x1, mut y1) = (SIZE, SIZE, 0, 0);
    for y in 0..SIZE {
        for x in 0..SIZE {
            let p = px(x, y);
            if dist2(bg, p).sqrt() > SHAPE_DISTANCE {
                shape.push(p);
                sx += x as f64 + 0.5;
                sy += y as f64 + 0.5;
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            }
        }
    }
    let n = shape.len();
    if n < MIN_SHAPE_PIXELS {
        return Judgement {
            background,
            color: None,
            kind: None,
            num_shape_pixels: n,
            centroid: None,
            fill_ratio: None,
        };
    }
    let color = nearest(channel_medians(&shape), &ShapeColor::ALL, ShapeColor::rgb);
    let bbox_area = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64;
    let fill = n as f64 / bbox_area;
    let kind = if fill < TRIANGLE_BELOW {
        ShapeKind::Triangle
    } else if fill < CIRCLE_BELOW {
        ShapeKind::Circle
    } else {
        ShapeKind::Square
    };
    Judgement {
        background,
        color: Some(color),
        kind: Some(kind),
        num_shape_pixels: n,
        centroid: Some((sx / n as f64, sy / n as f64)),
        fill_ratio: Some(fill),
    }
}

/// Per-caption figures of a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaptionStats {
    pub caption: String,
    pub num_images: usize,
    pub all_three: f64,
    /// None with fewer than two images showing a shape.
    pub centroid_spread_px: Option<f64>,
    pub sqrt_area_spread_px: Option<f64>,
}

/// Accuracy and spreads over images judged against their captions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToyReport {
    pub num_images: usize,
    pub background_accuracy: f64,
    pub color_accuracy: f64,
    pub shape_accuracy: f64,
    pub all_three_accuracy: f64,
    /// Share of images where no shape was found.
    pub no_shape_rate: f64,
    /// Mean over captions (those with two or more shapes found).
    pub centroid_spread_px: f64,
    pub sqrt_area_spread_px: f64,
    /// Sampling time per image, when the images were sampled by a model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_per_image: Option<f64>,
    pub per_caption: Vec<CaptionStats>,
}

/// Sample standard deviation (n - 1), None below two values.
fn sample_std(v: &[f64]) -> Option<f64> {
    if v.len() < 2 {
        return None;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    Some((v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt())
}

impl ToyReport {
    /// Judges `images` (HWC bytes, concatenated) against `captions`.
    pub fn from_images(captions: &[Caption], images: &[u8]) -> Self {
        let judged: Vec<Judgement> = images.chunks_exact(IMAGE_BYTES).map(judge).collect();
        Self::from_judgements(captions, &judged)
    }

    pub fn from_judgements(captions: &[Caption], judged: &[Judgement]) -> Self {
        assert_eq!(captions.len(), judged.len(), "one caption per image");
        let n = judged.len().max(1) as f64;
        let rate = |f: &dyn Fn(&Caption, &Judgement) -> bool| {
            captions.iter().zip(judged).filter(|(c, j)| f(c, j)).count() as f64 / n
        };
        let mut groups: BTreeMap<usize, Vec<&Judgement>> = BTreeMap::new();
        for (c, j) in captions.iter().zip(judged) {
            groups.entry(c.id()).or_default().push(j);
        }
        let mut per_caption = Vec::with_capacity(groups.len());
        for (id, js) in &groups {
            let caption = Caption::from_id(*id).map(|c| c.text()).unwrap_or_default();
            let cap = Caption::from_id(*id);
            let ok = js
                .iter()
                .filter(|j| cap.is_some_and(|c| j.matches(&c)))
                .count();
            let xs: Vec<f64> = js.iter().filter_map(|j| j.centroid.map(|c| c.0)).collect();
            let ys: Vec<f64> = js.iter().filter_map(|j| j.centroid.map(|c| c.1)).collect();
            let centroid = match (sample_std(&xs), sample_std(&ys)) {
                (Some(sx), Some(sy)) => Some(((sx * sx + sy * sy) / 2.0).sqrt()),
                _ => None,
            };
            let areas: Vec<f64> = js
                .iter()
                .filter(|j| j.color.is_some())
                .map(|j| (j.num_shape_pixels as f64).sqrt())
                .collect();
            per_caption.push(CaptionStats {
                caption,
                num_images: js.len(),
                all_three: ok as f64 / js.len() as f64,
                centroid_spread_px: centroid,
                sqrt_area_spread_px: sample_std(&areas),
            });
        }
        let mean_of = |f: &dyn Fn(&CaptionStats) -> Option<f64>| {
            let v: Vec<f64> = per_caption.iter().filter_map(f).collect();
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        Self {
            num_images: judged.len(),
            background_accuracy: rate(&|c, j| j.background == c.background),
            color_accuracy: rate(&|c, j| j.color == Some(c.color)),
            shape_accuracy: rate(&|c, j| j.kind == Some(c.kind)),
            all_three_accuracy: rate(&|c, j| j.matches(c)),
            no_shape_rate: rate(&|_, j| j.color.is_none()),
            centroid_spread_px: mean_of(&|s| s.centroid_spread_px),
            sqrt_area_spread_px: mean_of(&|s| s.sqrt_area_spread_px),
            seconds_per_image: None,
            per_caption,
        }
    }

    /// A table for people: the summary, then the worst captions.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let pct = |x: f64| format!("{:6.1}%", 100.0 * x);
        let _ = writeln!(s, "images            {:>7}", self.num_images);
        let _ = writeln!(s, "background        {}", pct(self.background_accuracy));
        let _ = writeln!(s, "color             {}", pct(self.color_accuracy));
        let _ = writeln!(s, "shape             {}", pct(self.shape_accuracy));
        let _ = writeln!(s, "all three         {}", pct(self.all_three_accuracy));
        let _ = writeln!(s, "no shape found    {}", pct(self.no_shape_rate));
        let _ = writeln!(
            s,
            "centroid spread   {:6.2} px (training data: 2.31)",
            self.centroid_spread_px
        );
        let _ = writeln!(s, "sqrt(area) spread {:6.2} px", self.sqrt_area_spread_px);
        if let Some(secs) = self.seconds_per_image {
            let _ = writeln!(s, "seconds per image {:9.5}", secs);
        }
        let mut worst: Vec<&CaptionStats> = self
            .per_caption
            .iter()
            .filter(|c| c.all_three < 1.0)
            .collect();
        worst.sort_by(|a, b| a.all_three.total_cmp(&b.all_three));
        if !worst.is_empty() {
            let _ = writeln!(s, "captions below 100% (worst first):");
            for c in worst.iter().take(10) {
                let _ = writeln!(
                    s,
                    "  {} {:<45} ({} images)",
                    pct(c.all_three),
                    c.caption,
                    c.num_images
                );
            }
        }
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(&self.to_json()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toy::rng::ToyRng;
    use crate::toy::shapes::{ShapeBatch, ShapeParams, draw};

    #[test]
    fn ground_truth_scores_perfectly_with_the_data_spread() {
        let captions: Vec<Caption> = Caption::all()
            .into_iter()
            .flat_map(|c| std::iter::repeat_n(c, 40))
            .collect();
        let batch = ShapeBatch::sample_for(&captions, &mut ToyRng::new(11));
        let r = ToyReport::from_images(&batch.captions, &batch.pixels);
        assert_eq!(r.num_images, 54 * 40);
        for (what, acc) in [
            ("background", r.background_accuracy),
            ("color", r.color_accuracy),
            ("shape", r.shape_accuracy),
            ("all three", r.all_three_accuracy),
        ] {
            assert_eq!(acc, 1.0, "{what}\n{}", r.to_table());
        }
        assert_eq!(r.no_shape_rate, 0.0);
        // 8 / sqrt(12) = 2.31 per axis; pixelisation adds a little.
        assert!(
            (2.05..2.6).contains(&r.centroid_spread_px),
            "{}",
            r.centroid_spread_px
        );
        assert!(
            (1.3..2.4).contains(&r.sqrt_area_spread_px),
            "{}",
            r.sqrt_area_spread_px
        );
        assert!(r.to_table().contains("all three          100.0%"));
        assert_eq!(
            r.to_json()["per_caption"].as_array().map(Vec::len),
            Some(54)
        );
    }

    #[test]
    fn hand_made_failures_are_judged_as_such() {
        let c = Caption {
            color: ShapeColor::Blue,
            kind: ShapeKind::Circle,
            background: Background::Gray,
        };
        let p = ShapeParams {
            cx: 16.0,
            cy: 15.0,
            r: 9.0,
        };
        let good = draw(&c, &p);
        assert!(judge(&good).matches(&c));

        // Wrong color: a magenta circle.
        let wrong_color = draw(
            &Caption {
                color: ShapeColor::Magenta,
                ..c
            },
            &p,
        );
        let j = judge(&wrong_color);
        assert_eq!(j.color, Some(ShapeColor::Magenta));
        assert!(!j.matches(&c));

        // No shape: a plain gray image, and one with a 4x4 blob (16 px).
        let mut plain = [128u8; IMAGE_BYTES];
        let j = judge(&plain);
        assert_eq!(
            (j.background, j.color, j.kind),
            (Background::Gray, None, None)
        );
        for y in 10..14 {
            for x in 10..14 {
                let o = (y * SIZE + x) * 3;
                plain[o..o + 3].copy_from_slice(&[25, 60, 230]);
            }
        }
        assert_eq!(judge(&plain).num_shape_pixels, 16);
        assert_eq!(judge(&plain).color, None);

        // Wrong background: the same circle on white.
        let on_white = draw(
            &Caption {
                background: Background::White,
                ..c
            },
            &p,
        );
        assert_eq!(judge(&on_white).background, Background::White);

        // A tinted, noisy background still judged by its nearest palette
        // color; a shape color between palette entries goes to the nearest.
        let mut tinted = good;
        for (i, v) in tinted.iter_mut().enumerate() {
            if *v == 128 {
                *v = if i % 2 == 0 { 150 } else { 110 };
            }
        }
        assert_eq!(judge(&tinted).background, Background::Gray);

        // Kinds from the fill ratio.
        for kind in ShapeKind::ALL {
            let j = judge(&draw(&Caption { kind, ..c }, &p));
            assert_eq!(j.kind, Some(kind), "{:?}", j.fill_ratio);
        }

        let captions = vec![c; 4];
        let mut images = Vec::new();
        for img in [
            &good[..],
            &wrong_color[..],
            &[128u8; IMAGE_BYTES][..],
            &on_white[..],
        ] {
            images.extend_from_slice(img);
        }
        let r = ToyReport::from_images(&captions, &images);
        assert_eq!(r.all_three_accuracy, 0.25);
        assert_eq!(r.background_accuracy, 0.75);
        assert_eq!(r.color_accuracy, 0.5);
        assert_eq!(r.shape_accuracy, 0.75);
        assert_eq!(r.no_shape_rate, 0.25);
        // Three shapes at the same place: no spread.
        assert_eq!(r.centroid_spread_px, 0.0);
    }
}
