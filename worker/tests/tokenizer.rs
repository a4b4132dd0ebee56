//! CLIP tokenizer against transformers' ids (golden_tokenizer.py).

mod common;

use std::collections::BTreeMap;

use swiftbrush_worker::models::tokenizer::{ClipTokenizer, TokenizerError};
use tch::{Device, Kind, Tensor};

fn prompts(rel: &str) -> Vec<String> {
    let path = common::fixtures().join(rel);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    let n = t.size()[0];
    (0..n)
        .map(|i| Vec::<i64>::try_from(t.get(i)).unwrap())
        .collect()
}

#[test]
fn ids_and_truncation_match_transformers_for_every_tokenizer() {
    let root = common::fixtures();
    let prompts = prompts("golden/tokenizer/prompts.json");
    assert!(prompts.len() >= 50, "{} prompts", prompts.len());
    let folders: BTreeMap<String, String> = serde_json::from_str(
        &std::fs::read_to_string(root.join("golden/tokenizer/tokenizers.json")).unwrap(),
    )
    .unwrap();
    let golden = common::golden("golden/tokenizer/ids.safetensors");
    assert!(folders.len() >= 6, "{folders:?}");
    for (name, rel) in &folders {
        let tok =
            ClipTokenizer::from_dir(&root.join(rel)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = rows(&golden[name.as_str()]);
        let want_truncated = Vec::<i64>::try_from(&golden[&format!("{name}.truncated")]).unwrap();
        for (i, prompt) in prompts.iter().enumerate() {
            let got = tok.encode_with_info(prompt).unwrap();
            assert_eq!(got.ids, want[i], "{name}: prompt {i} {prompt:?}");
            assert_eq!(
                got.truncated,
                want_truncated[i] == 1,
                "{name}: truncation flag of prompt {i} {prompt:?}"
            );
        }
    }
}

#[test]
fn batch_is_an_int64_tensor_with_truncation_flags() {
    let root = common::fixtures();
    let tok = ClipTokenizer::from_dir(&root.join("golden/tokenizer/full_eot")).unwrap();
    let prompts = prompts("golden/tokenizer/prompts.json");
    let batch = tok.encode_batch(&prompts, Device::Cpu).unwrap();
    assert_eq!(batch.input_ids.size(), [prompts.len() as i64, 77]);
    assert_eq!(batch.input_ids.kind(), Kind::Int64);
    let golden = common::golden("golden/tokenizer/ids.safetensors");
    assert!(batch.input_ids.equal(&golden["full_eot"]));
    let want = Vec::<i64>::try_from(&golden["full_eot.truncated"]).unwrap();
    assert_eq!(
        batch.num_truncated(),
        want.iter().filter(|t| **t == 1).count()
    );
    assert!(batch.num_truncated() >= 4);

    let empty = tok.encode_batch::<&str>(&[], Device::Cpu).unwrap();
    assert_eq!(empty.input_ids.size(), [0, 77]);
}

#[test]
fn special_ids_follow_each_layout() {
    // SD 1.x pads with <|endoftext|>, SD 2.x with "!" (id 0).
    let sd1 = ClipTokenizer::from_dir(&common::pipeline("sd1").join("tokenizer")).unwrap();
    assert_eq!(
        (sd1.bos_id(), sd1.eos_id(), sd1.pad_id()),
        (2512, 2513, 2513)
    );
    let sd2 = ClipTokenizer::from_dir(&common::pipeline("sd2").join("tokenizer")).unwrap();
    assert_eq!((sd2.bos_id(), sd2.eos_id(), sd2.pad_id()), (2512, 2513, 0));
    assert_eq!(sd2.max_length(), 77);

    let ids = sd2.encode("").unwrap();
    assert_eq!(&ids[..3], &[2512, 2513, 0]);
    assert!(ids[2..].iter().all(|&i| i == 0));
}

#[test]
fn a_folder_without_tokenizer_files_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vocab.json"), "{}").unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::NotFound { .. }), "{err:?}");
    let msg = err.to_string();
    for needle in [
        dir.path().to_str().unwrap(),
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
    ] {
        assert!(msg.contains(needle), "{msg}");
    }
}

#[test]
fn a_pad_token_missing_from_the_vocabulary_is_an_error() {
    let src = common::pipeline("sd1").join("tokenizer");
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"model_max_length": 77, "pad_token": {"content": "<pad>", "normalized": false}}"#,
    )
    .unwrap();
    // transformers would append "<pad>" with a new id that the text
    // encoder has no embedding for; refuse instead.
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("pad_token") && err.contains("<pad>"), "{err}");
}
