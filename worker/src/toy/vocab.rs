//! The toy CLIP BPE tokenizer, written without Python or downloads: CLIP's
//! 512 byte-level base tokens (in OpenAI's order, so they keep CLIP's ids),
//! then just enough merges that every word of the 54 captions becomes one
//! `word</w>` token, then `<|startoftext|>` and `<|endoftext|>`. The folder
//! has the layout of the SD repositories' `tokenizer/` (vocab.json,
//! merges.txt, tokenizer_config.json, special_tokens_map.json), which both
//! our `ClipTokenizer` and transformers' `CLIPTokenizer` read.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::shapes::Caption;

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";

/// The vocabulary and merge list of the toy tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToyVocab {
    /// Tokens in id order.
    pub tokens: Vec<String>,
    pub merges: Vec<(String, String)>,
}

/// GPT-2/CLIP's reversible byte -> printable character table, in the order
/// OpenAI's `bytes_to_unicode` returns it (printable bytes first).
pub fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut out: Vec<(u8, char)> = printable
        .iter()
        .map(|&b| (b as u8, char::from_u32(b).unwrap_or('?')))
        .collect();
    let mut n = 0;
    for b in 0..=255u32 {
        if !printable.contains(&b) {
            out.push((b as u8, char::from_u32(256 + n).unwrap_or('?')));
            n += 1;
        }
    }
    out
}

/// Every distinct word of the 54 captions, sorted.
pub fn caption_words() -> Vec<String> {
    let mut words: Vec<String> = Caption::all()
        .iter()
        .flat_map(|c| {
            c.text()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    words.sort();
    words.dedup();
    words
}

/// What BPE makes of one (lowercase ASCII) word with these merges: the
/// lowest-ranked adjacent pair is merged everywhere, until none applies.
pub fn bpe(word: &str, ranks: &HashMap<(String, String), usize>) -> Vec<String> {
    let chars: Vec<char> = word.chars().collect();
    let mut symbols: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    if let Some(last) = symbols.last_mut() {
        last.push_str(END_OF_WORD);
    }
    loop {
        let best = symbols
            .windows(2)
            .filter_map(|w| ranks.get(&(w[0].clone(), w[1].clone())).map(|r| (*r, w)))
            .min_by_key(|(r, _)| *r)
            .map(|(_, w)| (w[0].clone(), w[1].clone()));
        let Some((a, b)) = best else {
            return symbols;
        };
        let mut merged = Vec::with_capacity(symbols.len());
        let mut i = 0;
        while i < symbols.len() {
            if i + 1 < symbols.len() && symbols[i] == a && symbols[i + 1] == b {
                merged.push(format!("{a}{b}"));
                i += 2;
            } else {
                merged.push(symbols[i].clone());
                i += 1;
            }
        }
        symbols = merged;
    }
}

impl ToyVocab {
    /// The vocabulary covering `words` (lowercase ASCII letters).
    pub fn for_words(words: &[String]) -> Self {
        let base: Vec<String> = bytes_to_unicode()
            .into_iter()
            .map(|(_, c)| c.to_string())
            .collect();
        let mut tokens = base.clone();
        tokens.extend(base.iter().map(|t| format!("{t}{END_OF_WORD}")));
        let mut merges: Vec<(String, String)> = Vec::new();
        let mut ranks: HashMap<(String, String), usize> = HashMap::new();
        for word in words {
            // Join the current pieces left to right; each new merge ranks
            // after all others, so words finished earlier stay one token.
            loop {
                let pieces = bpe(word, &ranks);
                if pieces.len() < 2 {
                    break;
                }
                let pair = (pieces[0].clone(), pieces[1].clone());
                ranks.insert(pair.clone(), merges.len());
                tokens.push(format!("{}{}", pair.0, pair.1));
                merges.push(pair);
            }
        }
        tokens.push(BOS.to_owned());
        tokens.push(EOS.to_owned());
        Self { tokens, merges }
    }

    /// The toy world's tokenizer: every word of the 54 captions.
    pub fn toy() -> Self {
        Self::for_words(&caption_words())
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn id(&self, token: &str) -> Option<usize> {
        self.tokens.iter().position(|t| t == token)
    }

    /// The ids ClipTokenizer must produce for `text` (lowercase words from
    /// this vocabulary): bos, one token per word, eos, eos-padded to
    /// `max_length`. None when a word is not a single token.
    pub fn expected_ids(&self, text: &str, max_length: usize) -> Option<Vec<i64>> {
        let (bos, eos) = (self.id(BOS)? as i64, self.id(EOS)? as i64);
        let mut ids = vec![bos];
        for word in text.split_whitespace() {
            ids.push(self.id(&format!("{word}{END_OF_WORD}"))? as i64);
        }
        ids.push(eos);
        (ids.len() <= max_length).then(|| {
            ids.resize(max_length, eos);
            ids
        })
    }

    /// Writes vocab.json, merges.txt, tokenizer_config.json and
    /// special_tokens_map.json into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let vocab: BTreeMap<&str, usize> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        write_json(&dir.join("vocab.json"), &serde_json::to_value(vocab)?)?;
        let mut merges = String::from("#version: 0.2\n");
        for (a, b) in &self.merges {
            merges.push_str(&format!("{a} {b}\n"));
        }
        std::fs::write(dir.join("merges.txt"), merges)?;
        let special = serde_json::json!({
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": EOS,
            "unk_token": EOS,
        });
        write_json(&dir.join("special_tokens_map.json"), &special)?;
        let mut config = special;
        if let Some(obj) = config.as_object_mut() {
            obj.insert("add_prefix_space".into(), false.into());
            obj.insert("do_lower_case".into(), true.into());
            obj.insert("errors".into(), "replace".into());
            obj.insert("model_max_length".into(), 77.into());
            obj.insert("tokenizer_class".into(), "CLIPTokenizer".into());
        }
        write_json(&dir.join("tokenizer_config.json"), &config)
    }
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::tokenizer::ClipTokenizer;

    #[test]
    fn clip_base_tokens_keep_their_ids() {
        let v = ToyVocab::toy();
        // CLIP: "!" is 0, "a" is 64, "a</w>" is 256 + 64 = 320.
        assert_eq!(v.id("!"), Some(0));
        assert_eq!(v.id("a"), Some(64));
        assert_eq!(v.id("a</w>"), Some(320));
        assert_eq!(v.id(BOS), Some(v.len() - 2));
        assert_eq!(v.id(EOS), Some(v.len() - 1));
    }

    #[test]
    fn every_caption_word_is_one_token() {
        let v = ToyVocab::toy();
        let ranks: HashMap<(String, String), usize> = v
            .merges
            .iter()
            .enumerate()
            .map(|(i, m)| (m.clone(), i))
            .collect();
        let words = caption_words();
        assert_eq!(words.len(), 15, "{words:?}");
        for w in &words {
            assert_eq!(bpe(w, &ranks), vec![format!("{w}</w>")]);
        }
    }

    #[test]
    fn clip_tokenizer_reads_the_folder_and_encodes_each_caption() {
        let dir = tempfile::tempdir().unwrap();
        let v = ToyVocab::toy();
        v.write(dir.path()).unwrap();
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.max_length(), 77);
        let mut texts: Vec<String> = Caption::all().iter().map(Caption::text).collect();
        texts.push(String::new());
        for text in &texts {
            let want = v.expected_ids(text, 77).unwrap();
            assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        }
        assert_eq!(tok.encode("").unwrap()[..2], [tok.bos_id(), tok.eos_id()]);
    }
}
