//! The caption strings of a job: every caption source read once (local
//! paths, file://, or object-store URLs: s3://, gs://, memory://), parsed,
//! and kept in memory in source order, so caption id i is the i-th caption
//! of the concatenated sources, as the worker's own reader numbers them.
//!
//! `.txt` and `.jsonl` files are read whole and parsed by `caption_source`;
//! `.parquet` files (`parquet.rs`) and WebDataset `.tar` shards
//! (`webdataset.rs`) are read as a stream, a row group or a tar member at a
//! time (`object_read.rs` adapts object stores to those readers), so a
//! corpus of a million captions is held once, as the captions themselves.

mod object_read;
mod parquet;
mod webdataset;

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use swiftbrush_proto::run_store::{AsyncRunStore, StoreOptions};

use swiftbrush_proto::caption_source::{
    CaptionError, CaptionFormat, Captions, SkipStats, parse_captions,
};

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("no caption sources: set data.captions in the job config")]
    NoSources,
    #[error(
        "{0}: unknown caption file type; expected .txt (one caption a line), .jsonl, \
         .parquet or a WebDataset .tar shard"
    )]
    UnknownFormat(String),
    #[error("cannot read caption source {source_name}: {reason}")]
    Read { source_name: String, reason: String },
    #[error(transparent)]
    Parse(#[from] CaptionError),
}

/// Which fields hold the caption (`data.jsonl_field`, `data.text_column`).
#[derive(Debug, Clone, Default)]
pub struct CaptionFields {
    /// A `.jsonl` line's or a WebDataset `.json` member's field.
    pub jsonl_field: Option<String>,
    /// A Parquet file's column.
    pub text_column: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct CaptionCorpus {
    captions: Arc<Vec<String>>,
    pub skipped: SkipStats,
}

/// How one source is read, from its name.
enum SourceKind {
    Lines(CaptionFormat),
    Parquet,
    WebDataset,
}

impl SourceKind {
    fn from_name(name: &str) -> Result<Self, CorpusError> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".parquet") {
            Ok(Self::Parquet)
        } else if lower.ends_with(".tar") {
            Ok(Self::WebDataset)
        } else {
            CaptionFormat::from_name(name)
                .map(Self::Lines)
                .map_err(|_| CorpusError::UnknownFormat(name.to_owned()))
        }
    }
}

impl CaptionCorpus {
    pub fn from_captions(captions: Vec<String>) -> Self {
        Self {
            captions: Arc::new(captions),
            skipped: SkipStats::default(),
        }
    }

    pub fn len(&self) -> u64 {
        self.captions.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    pub fn get(&self, id: u64) -> Option<&str> {
        self.captions
            .get(usize::try_from(id).ok()?)
            .map(String::as_str)
    }

    /// Reads and parses every source, in order; object stores take their
    /// settings from the `AWS_*` / `GOOGLE_*` environment.
    pub async fn load(sources: &[String], fields: &CaptionFields) -> Result<Self, CorpusError> {
        Self::load_with(sources, fields, &StoreOptions::from_env()).await
    }

    /// [`load`](Self::load) with explicit object-store settings for the
    /// streamed sources (`.parquet`, `.tar`).
    pub async fn load_with(
        sources: &[String],
        fields: &CaptionFields,
        options: &StoreOptions,
    ) -> Result<Self, CorpusError> {
        if sources.is_empty() {
            return Err(CorpusError::NoSources);
        }
        let mut captions = Vec::new();
        let mut skipped = SkipStats::default();
        for source in sources {
            let parsed = match SourceKind::from_name(source)? {
                SourceKind::Lines(format) => {
                    let bytes = read_source(source).await?;
                    parse_captions(source, &bytes, format, fields.jsonl_field.as_deref())?
                }
                SourceKind::Parquet => {
                    parquet::load(source, locate(source, options)?, fields.text_column.clone())
                        .await?
                }
                SourceKind::WebDataset => {
                    webdataset::load(source, locate(source, options)?, fields.jsonl_field.clone())
                        .await?
                }
            };
            skipped.add(&parsed.skipped);
            // One large source is moved, not copied into a growing vector.
            if captions.is_empty() {
                captions = parsed.captions;
            } else {
                captions.extend(parsed.captions);
            }
        }
        Ok(Self {
            captions: Arc::new(captions),
            skipped,
        })
    }
}

/// Where a streamed source lives.
pub(super) enum Location {
    Local(std::path::PathBuf),
    Object {
        store: Arc<dyn ObjectStore>,
        path: ObjectPath,
    },
}

fn read_error(source: &str, reason: impl Into<String>) -> CorpusError {
    CorpusError::Read {
        source_name: source.to_owned(),
        reason: reason.into(),
    }
}

fn locate(source: &str, options: &StoreOptions) -> Result<Location, CorpusError> {
    if !source.contains("://") || source.starts_with("file://") {
        let path = source.strip_prefix("file://").unwrap_or(source);
        return Ok(Location::Local(path.into()));
    }
    let (folder, name) = split_object_url(source)?;
    let store =
        AsyncRunStore::open_with(folder, options).map_err(|e| read_error(source, e.to_string()))?;
    Ok(Location::Object {
        store: store.object_store().clone(),
        path: ObjectPath::from(name),
    })
}

fn split_object_url(source: &str) -> Result<(&str, &str), CorpusError> {
    source
        .rsplit_once('/')
        .filter(|(folder, name)| !name.is_empty() && folder.contains("://"))
        .ok_or_else(|| read_error(source, "expected SCHEME://BUCKET/PATH/NAME"))
}

/// Runs a blocking reader off the async threads; a panic inside a format
/// library on malformed input becomes this source's error, not the
/// coordinator's end.
async fn blocking<F>(source: &str, read: F) -> Result<Captions, CorpusError>
where
    F: FnOnce() -> Result<Captions, CorpusError> + Send + 'static,
{
    match tokio::task::spawn_blocking(read).await {
        Ok(result) => result,
        Err(e) => Err(read_error(
            source,
            format!("the reader failed on malformed data ({e})"),
        )),
    }
}

async fn read_source(source: &str) -> Result<Vec<u8>, CorpusError> {
    let failed = |reason: String| read_error(source, reason);
    if !source.contains("://") || source.starts_with("file://") {
        let path = source.strip_prefix("file://").unwrap_or(source);
        return tokio::fs::read(path)
            .await
            .map_err(|e| failed(e.to_string()));
    }
    // An object URL: open its folder as a store and read the object.
    let (folder, name) = split_object_url(source)?;
    let store = AsyncRunStore::open(folder).map_err(|e| failed(e.to_string()))?;
    match store.get_run_file(name).await {
        Ok(Some(bytes)) => Ok(bytes.to_vec()),
        Ok(None) => Err(failed("no such object".to_owned())),
        Err(e) => Err(failed(e.to_string())),
    }
}
