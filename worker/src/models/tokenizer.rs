//! CLIP's BPE tokenizer, as transformers 5 builds it and as diffusers'
//! StableDiffusionPipeline calls it: every prompt becomes exactly
//! `model_max_length` (77) ids, `<|startoftext|>` + at most 75 tokens +
//! `<|endoftext|>`, right-padded with the pad token (SD 1.x: `<|endoftext|>`,
//! SD 2.x: `!` = id 0).
//!
//! The tokenizer folder is read in either layout of the SD repositories:
//! `tokenizer.json` (what transformers 5 writes), or `vocab.json` +
//! `merges.txt` (the original repositories), which is turned into the
//! pipeline of transformers' `CLIPTokenizer`: NFC, whitespace runs to one
//! space, lowercase; CLIP's split regex then byte-level; BPE with `</w>` as
//! end-of-word suffix. Special tokens and `model_max_length` come from
//! `tokenizer_config.json` and `special_tokens_map.json` when present, with
//! transformers' precedence and defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// transformers' `CLIPTokenizer` pre-tokenizer pattern (split on it,
/// keeping the matches).
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Used when tokenizer_config.json has no model_max_length; every SD
/// repository sets 77, the text encoder's number of positions.
const DEFAULT_MAX_LENGTH: usize = 77;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "no tokenizer in {dir}: expected tokenizer.json, or vocab.json and merges.txt \
         (found neither)"
    )]
    NotFound { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("tokenizing {text:?}: {message}")]
    Encode { text: String, message: String },
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

/// One special token as tokenizer_config.json / special_tokens_map.json
/// store it: a plain string, or an AddedToken dict.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Full {
        content: String,
        #[serde(default)]
        single_word: bool,
        #[serde(default)]
        lstrip: bool,
        #[serde(default)]
        rstrip: bool,
        normalized: Option<bool>,
        special: Option<bool>,
    },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            Self::Plain(s) => s,
            Self::Full { content, .. } => content,
        }
    }

    /// The AddedToken transformers registers for a named special token:
    /// special always; a plain string is not normalized; a dict keeps its
    /// flags, with `normalized` defaulting to "not special as written".
    fn to_added_token(&self) -> AddedToken {
        match self {
            Self::Plain(s) => AddedToken::from(s.clone(), true),
            Self::Full {
                content,
                single_word,
                lstrip,
                rstrip,
                normalized,
                special,
            } => {
                let mut t = AddedToken::from(content.clone(), true)
                    .single_word(*single_word)
                    .lstrip(*lstrip)
                    .rstrip(*rstrip);
                t = t.normalized(normalized.unwrap_or(!special.unwrap_or(false)));
                t
            }
        }
    }
}

/// The named special tokens, in transformers' SPECIAL_TOKENS_ATTRIBUTES
/// order (which decides which flags win when two share their content).
#[derive(Debug, Clone)]
struct SpecialTokens {
    bos: TokenSpec,
    eos: TokenSpec,
    unk: TokenSpec,
    pad: TokenSpec,
}

impl Default for SpecialTokens {
    /// transformers' CLIPTokenizer defaults.
    fn default() -> Self {
        Self {
            bos: TokenSpec::Plain("<|startoftext|>".into()),
            eos: TokenSpec::Plain("<|endoftext|>".into()),
            unk: TokenSpec::Plain("<|endoftext|>".into()),
            pad: TokenSpec::Plain("<|endoftext|>".into()),
        }
    }
}

impl SpecialTokens {
    fn in_order(&self) -> [&TokenSpec; 4] {
        [&self.bos, &self.eos, &self.unk, &self.pad]
    }

    /// Overrides from one JSON object (a null or absent key keeps the value).
    fn update(&mut self, obj: &Value, path: &Path) -> Result<(), TokenizerError> {
        let slots: [(&str, &mut TokenSpec); 4] = [
            ("bos_token", &mut self.bos),
            ("eos_token", &mut self.eos),
            ("unk_token", &mut self.unk),
            ("pad_token", &mut self.pad),
        ];
        for (key, slot) in slots {
            match obj.get(key) {
                None | Some(Value::Null) => {}
                Some(v) => {
                    *slot = TokenSpec::deserialize(v).map_err(|e| TokenizerError::Invalid {
                        path: path.to_owned(),
                        message: format!("{key}: {e}"),
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// Prompt ids padded/truncated to the model length, and whether the prompt
/// had to be cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub truncated: bool,
}

/// A batch of prompts: `input_ids` int64 [B, max_length].
#[derive(Debug)]
pub struct EncodedBatch {
    pub input_ids: Tensor,
    pub truncated: Vec<bool>,
}

impl EncodedBatch {
    pub fn num_truncated(&self) -> usize {
        self.truncated.iter().filter(|t| **t).count()
    }
}

/// CLIP's tokenizer with SD's padding and truncation built in.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    pad_id: u32,
    bos_id: u32,
    eos_id: u32,
}

impl ClipTokenizer {
    /// Reads a `tokenizer/` folder (see the module docs).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional_json(&config_path)?;
        let map_path = dir.join("special_tokens_map.json");
        let special_map = read_optional_json(&map_path)?;

        let mut special = SpecialTokens::default();
        let mut decoder_tokens: Vec<(u32, AddedToken)> = Vec::new();
        if let Some(cfg) = &config {
            special.update(cfg, &config_path)?;
        }
        match config.as_ref().and_then(|c| c.get("added_tokens_decoder")) {
            // Saved by transformers >= 4.34: the complete list; transformers
            // then ignores special_tokens_map.json.
            Some(decoder) if !decoder.is_null() => {
                decoder_tokens = parse_added_tokens_decoder(decoder, &config_path)?;
            }
            _ => {
                if let Some(map) = &special_map {
                    special.update(map, &map_path)?;
                }
            }
        }

        let json_path = dir.join("tokenizer.json");
        let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let mut tokenizer = if json_path.is_file() {
            Tokenizer::from_file(&json_path).map_err(|e| invalid(&json_path, e))?
        } else if vocab_path.is_file() && merges_path.is_file() {
            clip_tokenizer_from_vocab(&vocab_path, &merges_path, special.unk.content())?
        } else {
            return Err(TokenizerError::NotFound {
                dir: dir.to_owned(),
            });
        };

        add_special_tokens(&mut tokenizer, decoder_tokens, &special)
            .map_err(|e| invalid(dir, e))?;

        // A special token outside the BPE vocabulary would get an id past the
        // text encoder's embedding table (transformers appends it); refuse.
        let vocab_size = tokenizer.get_vocab_size(false);
        let id_of = |spec: &TokenSpec, key: &str| -> Result<u32, TokenizerError> {
            match tokenizer.token_to_id(spec.content()) {
                Some(id) if (id as usize) < vocab_size => Ok(id),
                _ => Err(TokenizerError::Invalid {
                    path: dir.to_owned(),
                    message: format!(
                        "{key} {:?} is not in the vocabulary ({vocab_size} tokens)",
                        spec.content()
                    ),
                }),
            }
        };
        let bos_id = id_of(&special.bos, "bos_token")?;
        let eos_id = id_of(&special.eos, "eos_token")?;
        let pad_id = id_of(&special.pad, "pad_token")?;
        let max_length = model_max_length(config.as_ref(), &config_path)?;

        // transformers' CLIPTokenizer sets this post-processor whatever the
        // file holds; padding and truncation are what diffusers asks for.
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new(
                (special.eos.content().to_owned(), eos_id),
                (special.bos.content().to_owned(), bos_id),
            )
            .trim_offsets(false)
            .add_prefix_space(false),
        ));
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| invalid(dir, e))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: special.pad.content().to_owned(),
        }));
        Ok(Self {
            tokenizer,
            max_length,
            pad_id,
            bos_id,
            eos_id,
        })
    }

    /// The number of ids every prompt becomes (77 for SD).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> i64 {
        i64::from(self.pad_id)
    }

    pub fn bos_id(&self) -> i64 {
        i64::from(self.bos_id)
    }

    pub fn eos_id(&self) -> i64 {
        i64::from(self.eos_id)
    }

    /// The `max_length` ids of one prompt.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        Ok(self.encode_with_info(text)?.ids)
    }

    /// The ids of one prompt and whether it was truncated.
    pub fn encode_with_info(&self, text: &str) -> Result<Encoded, TokenizerError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| TokenizerError::Encode {
                text: text.to_owned(),
                message: e.to_string(),
            })?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
        if ids.len() != self.max_length {
            return Err(TokenizerError::Encode {
                text: text.to_owned(),
                message: format!("got {} ids, expected {}", ids.len(), self.max_length),
            });
        }
        // With stride 0, whatever truncation cut off lands in `overflowing`.
        let truncated = !encoding.get_overflowing().is_empty();
        Ok(Encoded { ids, truncated })
    }

    /// A batch as an int64 [B, max_length] tensor on `device`.
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        device: Device,
    ) -> Result<EncodedBatch, TokenizerError> {
        let mut flat = Vec::with_capacity(texts.len() * self.max_length);
        let mut truncated = Vec::with_capacity(texts.len());
        for text in texts {
            let e = self.encode_with_info(text.as_ref())?;
            flat.extend_from_slice(&e.ids);
            truncated.push(e.truncated);
        }
        let input_ids = Tensor::f_from_slice(&flat)?
            .f_reshape([texts.len() as i64, self.max_length as i64])?
            .f_to_device(device)?;
        debug_assert_eq!(input_ids.kind(), Kind::Int64);
        Ok(EncodedBatch {
            input_ids,
            truncated,
        })
    }
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Invalid {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn read_optional_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let value: Value = serde_json::from_str(&text).map_err(|e| invalid(path, e))?;
    if !value.is_object() {
        return Err(invalid(path, "expected a JSON object"));
    }
    Ok(Some(value))
}

fn model_max_length(config: Option<&Value>, path: &Path) -> Result<usize, TokenizerError> {
    let Some(v) = config.and_then(|c| c.get("model_max_length")) else {
        return Ok(DEFAULT_MAX_LENGTH);
    };
    match v.as_u64() {
        Some(n) if (2..=1 << 20).contains(&n) => Ok(n as usize),
        _ => Err(invalid(
            path,
            format!("model_max_length must be a small integer >= 2 (CLIP uses 77), got {v}"),
        )),
    }
}

fn parse_added_tokens_decoder(
    decoder: &Value,
    path: &Path,
) -> Result<Vec<(u32, AddedToken)>, TokenizerError> {
    let Some(map) = decoder.as_object() else {
        return Err(invalid(path, "added_tokens_decoder must be an object"));
    };
    let mut out = Vec::with_capacity(map.len());
    for (id, token) in map {
        let id: u32 = id.parse().map_err(|_| {
            invalid(
                path,
                format!("added_tokens_decoder key {id:?} is not an id"),
            )
        })?;
        let spec = TokenSpec::deserialize(token)
            .map_err(|e| invalid(path, format!("added_tokens_decoder[{id}]: {e}")))?;
        let special = match &spec {
            TokenSpec::Full { special, .. } => special.unwrap_or(false),
            TokenSpec::Plain(_) => false,
        };
        let mut t = spec.to_added_token();
        t.special = special;
        out.push((id, t));
    }
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}

/// transformers' CLIPTokenizer pipeline over vocab.json + merges.txt.
fn clip_tokenizer_from_vocab(
    vocab: &Path,
    merges: &Path,
    unk: &str,
) -> Result<Tokenizer, TokenizerError> {
    let utf8 = |p: &Path| {
        p.to_str()
            .map(str::to_owned)
            .ok_or_else(|| invalid(p, "path is not valid UTF-8"))
    };
    let bpe = BPE::from_file(&utf8(vocab)?, &utf8(merges)?)
        .unk_token(unk.to_owned())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_owned())
        .fuse_unk(false)
        .build()
        .map_err(|e| {
            invalid(
                merges,
                format!("cannot build BPE from vocab.json + merges.txt: {e}"),
            )
        })?;
    let mut tokenizer = Tokenizer::new(bpe);
    let whitespace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(|e| invalid(vocab, e))?;
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| invalid(vocab, e))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| invalid(vocab, e))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// Registers the added tokens as transformers' TokenizersBackend does: the
/// `added_tokens_decoder` entries, then each named special token whose
/// content is not yet an added token, skipping exact duplicates; one batch,
/// so for two specials with the same content the later flags win.
fn add_special_tokens(
    tokenizer: &mut Tokenizer,
    decoder_tokens: Vec<(u32, AddedToken)>,
    special: &SpecialTokens,
) -> tokenizers::Result<()> {
    let existing: Vec<String> = tokenizer
        .get_added_tokens_decoder()
        .into_values()
        .map(|t| t.content)
        .collect();
    let mut to_add: Vec<AddedToken> = decoder_tokens
        .into_iter()
        .map(|(_, t)| t)
        .filter(|t| !existing.contains(&t.content))
        .collect();
    let known: Vec<String> = existing
        .iter()
        .cloned()
        .chain(to_add.iter().map(|t| t.content.clone()))
        .collect();
    for spec in special.in_order() {
        let token = spec.to_added_token();
        if !known.iter().any(|c| c == &token.content) && !to_add.contains(&token) {
            to_add.push(token);
        }
    }
    if !to_add.is_empty() {
        tokenizer.add_tokens(to_add)?;
    }
    Ok(())
}
