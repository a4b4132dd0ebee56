//! Caption sources beside .txt/.jsonl: Parquet files written by pyarrow and
//! WebDataset shards written by Python's tarfile
//! (tests/captions/make_caption_files.py), read by the coordinator's corpus
//! from local paths and from moto's S3 server, including a corrupt row group
//! and a truncated shard.

#[path = "../../proto/tests/run_store/moto.rs"]
mod moto;

use std::path::{Path, PathBuf};
use std::process::Command;

use object_store::{ObjectStoreExt, PutPayload};
use swiftbrush_coordinator::app::{CaptionCorpus, CaptionFields};
use swiftbrush_proto::caption_source::MAX_CAPTION_BYTES;
use swiftbrush_proto::run_store::{AsyncRunStore, StoreOptions};

/// The files, written by the pinned generator into a fresh folder.
fn caption_files() -> tempfile::TempDir {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = repo.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make venv` at the repository root",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(&python)
        .arg(repo.join("tests/captions/make_caption_files.py"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "make_caption_files.py failed (is pyarrow installed? `make venv` installs \
         tests/captions/requirements.txt)"
    );
    dir
}

fn source(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn load(
    sources: &[String],
    fields: &CaptionFields,
    options: &StoreOptions,
) -> Result<CaptionCorpus, String> {
    runtime()
        .block_on(CaptionCorpus::load_with(sources, fields, options))
        .map_err(|e| e.to_string())
}

fn captions(corpus: &CaptionCorpus) -> Vec<String> {
    (0..corpus.len())
        .map(|i| corpus.get(i).unwrap().to_owned())
        .collect()
}

/// What every source must read as, wherever it is stored; `at` names a
/// file in that store.
fn check_all(at: &dyn Fn(&str) -> String, options: &StoreOptions) {
    let none = CaptionFields::default();
    // Parquet: 10 rows in 3 row groups; a null, a blank, one cut.
    let c = load(&[at("captions.parquet")], &none, options).unwrap();
    let got = captions(&c);
    assert_eq!(
        got.iter()
            .map(|c| c.as_str())
            .filter(|c| c.len() < 100)
            .collect::<Vec<_>>(),
        [
            "a red circle",
            "a blue square",
            "a green triangle",
            "a yellow star",
            "two cats",
            "a dog on a beach",
            "an empty room"
        ]
    );
    assert_eq!(got.len(), 8);
    assert!(
        got[3].starts_with("word word") && got[3].len() <= MAX_CAPTION_BYTES,
        "{}",
        got[3].len()
    );
    assert_eq!(
        (
            c.skipped.missing_field,
            c.skipped.blank,
            c.skipped.truncated,
            c.skipped.total()
        ),
        (1, 1, 1, 2)
    );
    // zstd; `prompt` before `text` by default, `text` when named.
    let c = load(&[at("prompts.parquet")], &none, options).unwrap();
    assert_eq!(captions(&c), ["prompt one", "prompt two"]);
    let text = CaptionFields {
        text_column: Some("text".into()),
        ..CaptionFields::default()
    };
    let c = load(&[at("prompts.parquet")], &text, options).unwrap();
    assert_eq!(captions(&c), ["text one", "text two"]);
    // A binary column with invalid UTF-8 (skipped and counted).
    let c = load(&[at("binary.parquet")], &none, options).unwrap();
    assert_eq!(captions(&c), ["valid bytes", "more"]);
    assert_eq!(c.skipped.invalid_utf8, 1);
    // No caption column: the error names the columns found.
    let e = load(&[at("no_text.parquet")], &none, options).unwrap_err();
    assert!(
        e.contains("no_text.parquet") && e.contains("caption, prompt, text"),
        "{e}"
    );
    assert!(e.contains("the file's columns are: url, width"), "{e}");
    let e = load(
        &[at("prompts.parquet")],
        &CaptionFields {
            text_column: Some("title".into()),
            ..CaptionFields::default()
        },
        options,
    )
    .unwrap_err();
    assert!(
        e.contains("data.text_column") && e.contains("text, prompt"),
        "{e}"
    );
    let e = load(&[at("numbers.parquet")], &none, options).unwrap_err();
    assert!(
        e.contains("column `caption` holds INT64, not strings"),
        "{e}"
    );
    // A damaged row group is an error naming it, not a panic or a silent drop.
    let e = load(&[at("corrupt.parquet")], &none, options).unwrap_err();
    assert!(
        e.contains("corrupt.parquet") && e.contains("row group 1 of 3"),
        "{e}"
    );
    // Not Parquet at all.
    let e = load(&[at("renamed.parquet")], &none, options).unwrap_err();
    assert!(e.contains("not a readable Parquet file"), "{e}");

    // WebDataset: 10 samples, 5 with a usable caption.
    let c = load(&[at("shard-000000.tar")], &none, options).unwrap();
    assert_eq!(
        captions(&c),
        [
            "a photo of a cat",
            "a photo of a dog",
            "a bird in a tree",
            "a red car",
            "a house by a lake"
        ]
    );
    let s = &c.skipped;
    assert_eq!(
        (s.missing_field, s.blank, s.bad_json, s.invalid_utf8),
        (2, 1, 1, 1)
    );
    // `data.jsonl_field` applies to the .json members.
    let e = load(
        &[at("shard-000000.tar")],
        &CaptionFields {
            jsonl_field: Some("alt".into()),
            ..CaptionFields::default()
        },
        options,
    )
    .unwrap();
    assert_eq!(
        captions(&e),
        [
            "a photo of a cat",
            "alt text of a dog",
            "a bird in a tree",
            "a house by a lake"
        ]
    );
    let e = load(&[at("truncated.tar")], &none, options).unwrap_err();
    assert!(
        e.contains("truncated.tar") && e.contains("shard/000009.jpg") && e.contains("truncated"),
        "{e}"
    );

    // Sources concatenate in order, whatever their kind.
    let c = load(
        &[
            at("prompts.parquet"),
            at("shard-000000.tar"),
            at("binary.parquet"),
        ],
        &none,
        options,
    )
    .unwrap();
    let got = captions(&c);
    assert_eq!(got.len(), 2 + 5 + 2);
    assert_eq!(
        (got[1].as_str(), got[2].as_str(), got[8].as_str()),
        ("prompt two", "a photo of a cat", "more")
    );
}

#[test]
fn parquet_and_webdataset_from_local_files() {
    let dir = caption_files();
    std::fs::copy(
        dir.path().join("shard-000000.tar"),
        dir.path().join("renamed.parquet"),
    )
    .unwrap();
    check_all(&|name| source(dir.path(), name), &StoreOptions::new());
    // file:// URLs too, and an unknown type names the ones read.
    let url = format!("file://{}", source(dir.path(), "prompts.parquet"));
    let c = load(&[url], &CaptionFields::default(), &StoreOptions::new()).unwrap();
    assert_eq!(c.len(), 2);
    let e = load(
        &[source(dir.path(), "c.csv")],
        &CaptionFields::default(),
        &StoreOptions::new(),
    )
    .unwrap_err();
    assert!(
        e.contains("c.csv") && e.contains(".parquet") && e.contains(".tar"),
        "{e}"
    );
}

#[test]
fn parquet_and_webdataset_from_s3() {
    let dir = caption_files();
    let server = moto::MotoServer::start();
    let options = StoreOptions::new()
        .with("AWS_ENDPOINT_URL", server.endpoint())
        .with("AWS_ALLOW_HTTP", "true")
        .with("AWS_ACCESS_KEY_ID", "testing")
        .with("AWS_SECRET_ACCESS_KEY", "testing")
        .with("AWS_REGION", "us-east-1");
    let folder = format!("s3://{}/datasets/laion", moto::BUCKET);
    runtime().block_on(async {
        let store = AsyncRunStore::open_with(&folder, &options).unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            let bytes = std::fs::read(&path).unwrap();
            store
                .object_store()
                .put(&name.as_str().into(), PutPayload::from(bytes))
                .await
                .unwrap();
        }
        let tar = std::fs::read(dir.path().join("shard-000000.tar")).unwrap();
        store
            .object_store()
            .put(&"renamed.parquet".into(), PutPayload::from(tar))
            .await
            .unwrap();
    });
    check_all(&|name| format!("{folder}/{name}"), &options);
    let e = load(
        &[format!("{folder}/absent.parquet")],
        &CaptionFields::default(),
        &options,
    )
    .unwrap_err();
    assert!(e.contains("absent.parquet"), "{e}");
}

/// A submitted job reads its Parquet column from `data.text_column` and
/// its WebDataset .json field from `data.jsonl_field`.
#[test]
fn a_submitted_job_takes_its_columns_from_the_config() {
    use std::sync::Arc;
    use swiftbrush_coordinator::app::{Coordinator, TokioClock};
    use swiftbrush_coordinator::domain::CoreOptions;

    let dir = caption_files();
    let submit = |data: &str| {
        runtime().block_on(async {
            let store =
                AsyncRunStore::open(&source(dir.path(), &format!("run-{}", data.len()))).unwrap();
            let app = Coordinator::new(CoreOptions::default(), store, Arc::new(TokioClock::new()));
            let yaml = format!("name: sources\nmodel: {{teacher: /models/sd}}\ndata: {data}\n");
            app.submit_yaml(&yaml)
                .await
                .map(|s| s.num_captions)
                .map_err(|e| e.to_string())
        })
    };
    let prompts = source(dir.path(), "prompts.parquet");
    let shard = source(dir.path(), "shard-000000.tar");
    assert_eq!(
        submit(&format!("{{captions: [{prompts}, {shard}]}}")),
        Ok(2 + 5)
    );
    // `text` exists in prompts.parquet; `alt` in one .json of the shard.
    assert_eq!(
        submit(&format!(
            "{{captions: [{prompts}, {shard}], text_column: text, jsonl_field: alt}}"
        )),
        Ok(2 + 4)
    );
    let e = submit(&format!("{{captions: [{prompts}], text_column: title}}")).unwrap_err();
    assert!(
        e.contains("data.text_column") && e.contains("prompts.parquet"),
        "{e}"
    );
}
