//! TensorBoard event files: rank 0's losses and rates, one scalar event per
//! trained step, and the sample step's pictures (the PNG of
//! RUN/samples/step-N.png as an image summary), in RUN/tensorboard/
//! (`tensorboard --logdir RUN`). The
//! format is TensorFlow's record file: per record its length (u64 LE), the
//! masked CRC-32C of the length, the data, the masked CRC-32C of the data;
//! the data an `Event` protocol buffer, encoded here by hand.
//! Object stores cannot append, so the file is held in memory and written
//! whole (replacing the last copy) at most once a minute, at checkpoints
//! and at the end; each world writes its own file, so a resumed run adds
//! one and TensorBoard shows both.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// How often a growing file is written out, at most.
const FLUSH_EVERY: Duration = Duration::from_secs(60);

/// TFRecord's masked CRC: rotated and offset, so that a CRC of data that
/// holds CRCs stays well distributed.
fn masked_crc(data: &[u8]) -> u32 {
    let c = CRC32C.checksum(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn record(out: &mut Vec<u8>, data: &[u8]) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), ... }` header fields.
fn event_head(wall_time: f64, step: u64) -> Vec<u8> {
    let mut e = Vec::new();
    varint(&mut e, (1 << 3) | 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    varint(&mut e, 2 << 3);
    varint(&mut e, step);
    e
}

/// (width, height) from a PNG's IHDR chunk, which always comes first.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&png[16..20]), be(&png[20..24])))
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One event file being written.
pub struct EventFile {
    /// The file's name under the run directory.
    name: String,
    data: Vec<u8>,
    dirty: bool,
    last_flush: Instant,
}

impl EventFile {
    /// A new file, `tensorboard/events.out.tfevents.<seconds>.<host>.<tag>`
    /// (TensorBoard finds files by "tfevents" in their names), starting
    /// with the version record every event file has.
    pub fn new(host: &str, tag: &str) -> Self {
        let wall_time = now();
        let mut version = event_head(wall_time, 0);
        bytes_field(&mut version, 3, b"brain.Event:2");
        let mut data = Vec::new();
        record(&mut data, &version);
        let host: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Self {
            name: format!(
                "tensorboard/events.out.tfevents.{}.{host}.{tag}",
                wall_time as u64
            ),
            data,
            dirty: true,
            last_flush: Instant::now(),
        }
    }

    /// Scalars of one step: `Event { summary = 5 { value = 1 { tag = 1,
    /// simple_value = 2 (float) } ... } }`.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        let mut summary = Vec::new();
        for (tag, value) in values {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            varint(&mut v, (2 << 3) | 5);
            v.extend_from_slice(&(*value as f32).to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        let mut event = event_head(now(), step);
        bytes_field(&mut event, 5, &summary);
        record(&mut self.data, &event);
        self.dirty = true;
    }

    /// A picture of one step: `Event { summary = 5 { value = 1 { tag = 1,
    /// image = 4 { height = 1, width = 2, colorspace = 3 (3: RGB),
    /// encoded_image_string = 4 (the PNG) } } } }`, TensorBoard's
    /// `Summary.Image`.
    pub fn image(&mut self, step: u64, tag: &str, png: &[u8]) {
        let (width, height) = png_size(png).unwrap_or((0, 0));
        let mut image = Vec::new();
        varint(&mut image, 1 << 3);
        varint(&mut image, u64::from(height));
        varint(&mut image, 2 << 3);
        varint(&mut image, u64::from(width));
        varint(&mut image, 3 << 3);
        varint(&mut image, 3);
        bytes_field(&mut image, 4, png);
        let mut v = Vec::new();
        bytes_field(&mut v, 1, tag.as_bytes());
        bytes_field(&mut v, 4, &image);
        let mut summary = Vec::new();
        bytes_field(&mut summary, 1, &v);
        let mut event = event_head(now(), step);
        bytes_field(&mut event, 5, &summary);
        record(&mut self.data, &event);
        self.dirty = true;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The whole file, when it has changed since the last call and `force`
    /// or a minute has passed; the caller writes it.
    pub fn take_due(&mut self, force: bool) -> Option<&[u8]> {
        let due = force || self.last_flush.elapsed() >= FLUSH_EVERY;
        if !(self.dirty && due) {
            return None;
        }
        self.dirty = false;
        self.last_flush = Instant::now();
        Some(&self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnolis() {
        // The standard check value of CRC-32C.
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn varints_are_little_endian_base_128() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
    }

    #[test]
    fn a_file_is_written_when_changed_and_due() {
        let mut f = EventFile::new("host.example", "g0");
        assert!(f.name().starts_with("tensorboard/events.out.tfevents."));
        assert!(f.name().ends_with(".host_example.g0"));
        assert!(f.take_due(false).is_none(), "a minute has not passed");
        let first = f.take_due(true).unwrap().len();
        assert!(f.take_due(true).is_none(), "nothing new");
        f.scalars(1, &[("loss/vsd", 0.5)]);
        assert!(f.take_due(true).unwrap().len() > first);
    }
}
