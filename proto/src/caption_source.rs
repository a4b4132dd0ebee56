//! Caption files: `.txt` (one caption a line) and `.jsonl` (one JSON object
//! a line with a caption field). Parsing is from bytes, so the same code
//! serves local files and object-store downloads. Bad lines are skipped and
//! counted, never fatal; a source with no usable caption at all is an error.
//! A caption longer than [`MAX_CAPTION_BYTES`] is cut there and counted: the
//! text encoder reads 77 tokens at most, and one 10 MB line would otherwise
//! outgrow every caption reply of the step that draws it, on every resume.

use serde_json::Value;

/// Longest caption kept, in bytes. CLIP's 77 tokens (75 after the start and
/// end tokens) cover a few hundred bytes of text even for long words or
/// multi-byte scripts; what lies past this is never encoded, so cutting it
/// changes no training input while bounding every caption reply by
/// construction (captions per rank and step x this).
pub const MAX_CAPTION_BYTES: usize = 4096;

/// How a caption file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptionFormat {
    Text,
    Jsonl,
}

impl CaptionFormat {
    /// From the file name (`.txt`, `.jsonl`, `.json`; `.gz` is not read).
    pub fn from_name(name: &str) -> Result<Self, CaptionError> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".txt") {
            Ok(Self::Text)
        } else if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
            Ok(Self::Jsonl)
        } else {
            Err(CaptionError::UnknownFormat {
                name: name.to_owned(),
            })
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptionError {
    #[error("{name}: unknown caption file type; expected .txt (one caption a line) or .jsonl")]
    UnknownFormat { name: String },
    #[error("{name}: no captions ({})", .stats.describe())]
    Empty { name: String, stats: SkipStats },
}

/// Lines that were not captions, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkipStats {
    pub blank: u64,
    pub invalid_utf8: u64,
    pub bad_json: u64,
    /// JSON objects without the caption field (or with a non-string one).
    pub missing_field: u64,
    /// Captions cut to [`MAX_CAPTION_BYTES`] (kept, not skipped).
    pub truncated: u64,
}

impl SkipStats {
    /// Lines skipped (truncated captions are kept, so they are not here).
    pub fn total(&self) -> u64 {
        self.blank + self.invalid_utf8 + self.bad_json + self.missing_field
    }

    /// Whether any line was skipped or cut.
    pub fn any(&self) -> bool {
        self.total() + self.truncated > 0
    }

    pub fn add(&mut self, other: &SkipStats) {
        self.blank += other.blank;
        self.invalid_utf8 += other.invalid_utf8;
        self.bad_json += other.bad_json;
        self.missing_field += other.missing_field;
        self.truncated += other.truncated;
    }

    pub fn describe(&self) -> String {
        let mut text = format!(
            "skipped {} blank, {} invalid UTF-8, {} malformed JSON, {} without a caption field",
            self.blank, self.invalid_utf8, self.bad_json, self.missing_field
        );
        if self.truncated > 0 {
            text += &format!(
                "; cut {} longer than {MAX_CAPTION_BYTES} bytes",
                self.truncated
            );
        }
        text
    }
}

/// The captions of one source, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captions {
    pub captions: Vec<String>,
    pub skipped: SkipStats,
}

/// Parses one file's bytes. `field` names the JSONL field; when `None`,
/// `caption` then `prompt` are tried.
pub fn parse_captions(
    source: &str,
    bytes: &[u8],
    format: CaptionFormat,
    field: Option<&str>,
) -> Result<Captions, CaptionError> {
    let mut out = Captions::default();
    for raw in bytes.split(|&b| b == b'\n') {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let Ok(line) = std::str::from_utf8(raw) else {
            out.skipped.invalid_utf8 += 1;
            continue;
        };
        let line = line.trim();
        if line.is_empty() {
            out.skipped.blank += 1;
            continue;
        }
        let caption = match format {
            CaptionFormat::Text => line.to_owned(),
            CaptionFormat::Jsonl => match jsonl_caption(line, field) {
                Ok(c) => c,
                Err(JsonlSkip::BadJson) => {
                    out.skipped.bad_json += 1;
                    continue;
                }
                Err(JsonlSkip::NoField) => {
                    out.skipped.missing_field += 1;
                    continue;
                }
            },
        };
        out.captions.push(bounded(caption, &mut out.skipped));
    }
    // A trailing newline makes one empty "line" that is not a skip.
    if bytes.ends_with(b"\n") || bytes.is_empty() {
        out.skipped.blank = out.skipped.blank.saturating_sub(1);
    }
    if out.captions.is_empty() {
        return Err(CaptionError::Empty {
            name: source.to_owned(),
            stats: out.skipped,
        });
    }
    Ok(out)
}

/// One caption held whole by a record (a Parquet value, a WebDataset
/// `.txt` member), with the rules of a `.txt` line: invalid UTF-8 and blank
/// text are skipped and counted, surrounding whitespace trimmed, long text
/// cut and counted.
pub fn text_caption(raw: &[u8], stats: &mut SkipStats) -> Option<String> {
    let Ok(text) = std::str::from_utf8(raw) else {
        stats.invalid_utf8 += 1;
        return None;
    };
    let text = text.trim();
    if text.is_empty() {
        stats.blank += 1;
        return None;
    }
    Some(bounded(text.to_owned(), stats))
}

/// One caption held by a JSON document (a WebDataset `.json` member), with
/// the rules of a `.jsonl` line (`field`, else `caption` then `prompt`).
pub fn json_caption(raw: &[u8], field: Option<&str>, stats: &mut SkipStats) -> Option<String> {
    let Ok(text) = std::str::from_utf8(raw) else {
        stats.invalid_utf8 += 1;
        return None;
    };
    match jsonl_caption(text.trim(), field) {
        Ok(caption) => Some(bounded(caption, stats)),
        Err(JsonlSkip::BadJson) => {
            stats.bad_json += 1;
            None
        }
        Err(JsonlSkip::NoField) => {
            stats.missing_field += 1;
            None
        }
    }
}

/// The caption cut to at most [`MAX_CAPTION_BYTES`], at a character
/// boundary, and counted when cut.
fn bounded(mut caption: String, stats: &mut SkipStats) -> String {
    if caption.len() > MAX_CAPTION_BYTES {
        let mut end = MAX_CAPTION_BYTES;
        while !caption.is_char_boundary(end) {
            end -= 1;
        }
        caption.truncate(end);
        caption.truncate(caption.trim_end().len());
        stats.truncated += 1;
    }
    caption
}

enum JsonlSkip {
    BadJson,
    NoField,
}

fn jsonl_caption(line: &str, field: Option<&str>) -> Result<String, JsonlSkip> {
    let value: Value = serde_json::from_str(line).map_err(|_| JsonlSkip::BadJson)?;
    let default_fields = ["caption", "prompt"];
    let custom;
    let fields: &[&str] = match field {
        Some(f) => {
            custom = [f];
            &custom
        }
        None => &default_fields,
    };
    fields
        .iter()
        .find_map(|f| value.get(*f).and_then(Value::as_str))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .ok_or(JsonlSkip::NoField)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_with_blanks_crlf_and_bad_utf8() {
        let bytes = b"a red circle\r\n\n  \nbad \xff\xfe line\na blue square\n";
        let c = parse_captions("c.txt", bytes, CaptionFormat::Text, None).unwrap();
        assert_eq!(c.captions, vec!["a red circle", "a blue square"]);
        assert_eq!(c.skipped.blank, 2);
        assert_eq!(c.skipped.invalid_utf8, 1);
    }

    #[test]
    fn jsonl_fields() {
        let bytes = br#"{"caption": "one"}
{"prompt": "two"}
{"text": "three"}
not json
{"caption": 5}
"#;
        let c = parse_captions("c.jsonl", bytes, CaptionFormat::Jsonl, None).unwrap();
        assert_eq!(c.captions, vec!["one", "two"]);
        assert_eq!(c.skipped.bad_json, 1);
        assert_eq!(c.skipped.missing_field, 2);
        let c = parse_captions("c.jsonl", bytes, CaptionFormat::Jsonl, Some("text")).unwrap();
        assert_eq!(c.captions, vec!["three"]);
    }

    #[test]
    fn empty_or_blank_only_is_an_error_naming_the_source() {
        for bytes in [&b""[..], b"\n\n   \n", b"\xff\n"] {
            let e = parse_captions("prompts.txt", bytes, CaptionFormat::Text, None)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("prompts.txt: no captions"), "{e}");
        }
    }

    #[test]
    fn a_huge_line_is_cut_at_a_character_boundary_and_counted() {
        // Issue 28: one 10 MB line between normal ones.
        let huge = "word ".repeat(2_000_000);
        let bytes = format!("first\n{huge}\nlast\n");
        let c = parse_captions("c.txt", bytes.as_bytes(), CaptionFormat::Text, None).unwrap();
        assert_eq!(c.captions.len(), 3);
        assert_eq!(c.captions[0], "first");
        assert_eq!(c.captions[2], "last");
        assert!(c.captions[1].len() <= MAX_CAPTION_BYTES);
        assert!(c.captions[1].starts_with("word word"));
        assert_eq!(c.skipped.truncated, 1);
        assert_eq!(c.skipped.total(), 0);
        assert!(
            c.skipped
                .describe()
                .contains("cut 1 longer than 4096 bytes")
        );
        // Multi-byte text cut inside a character stays valid UTF-8, and a
        // JSONL caption is bounded the same way.
        let wide = "\u{00e9}".repeat(MAX_CAPTION_BYTES);
        let line = serde_json::json!({ "caption": wide }).to_string();
        let c = parse_captions("c.jsonl", line.as_bytes(), CaptionFormat::Jsonl, None).unwrap();
        assert_eq!(c.captions[0].len(), MAX_CAPTION_BYTES);
        assert_eq!(c.skipped.truncated, 1);
        let exact = "a".repeat(MAX_CAPTION_BYTES);
        let c = parse_captions("c.txt", exact.as_bytes(), CaptionFormat::Text, None).unwrap();
        assert_eq!(
            (c.captions[0].len(), c.skipped.truncated),
            (MAX_CAPTION_BYTES, 0)
        );
    }

    #[test]
    fn format_from_name() {
        assert_eq!(
            CaptionFormat::from_name("a/B.TXT").unwrap(),
            CaptionFormat::Text
        );
        assert_eq!(
            CaptionFormat::from_name("x.jsonl").unwrap(),
            CaptionFormat::Jsonl
        );
        let e = CaptionFormat::from_name("x.csv").unwrap_err().to_string();
        assert!(e.contains("x.csv") && e.contains(".jsonl"), "{e}");
    }
}
