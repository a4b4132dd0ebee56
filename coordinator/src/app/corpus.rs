//! The caption strings of a job: every caption source read once (local
//! paths, file://, or object-store URLs: s3://, gs://, memory://), parsed
//! with `caption_source`, and kept in memory in source order, so caption id
//! i is the i-th caption of the concatenated sources, as the worker's own
//! reader numbers them.

use std::sync::Arc;

use swiftbrush_proto::run_store::AsyncRunStore;

use swiftbrush_proto::caption_source::{CaptionError, CaptionFormat, SkipStats, parse_captions};

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("no caption sources: set data.captions in the job config")]
    NoSources,
    #[error("cannot read caption source {source_name}: {reason}")]
    Read { source_name: String, reason: String },
    #[error(transparent)]
    Parse(#[from] CaptionError),
}

#[derive(Debug, Clone, Default)]
pub struct CaptionCorpus {
    captions: Arc<Vec<String>>,
    pub skipped: SkipStats,
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

    /// Reads and parses every source, in order.
    pub async fn load(sources: &[String], jsonl_field: Option<&str>) -> Result<Self, CorpusError> {
        if sources.is_empty() {
            return Err(CorpusError::NoSources);
        }
        let mut captions = Vec::new();
        let mut skipped = SkipStats::default();
        for source in sources {
            let format = CaptionFormat::from_name(source)?;
            let bytes = read_source(source).await?;
            let parsed = parse_captions(source, &bytes, format, jsonl_field)?;
            captions.extend(parsed.captions);
            skipped.add(&parsed.skipped);
        }
        Ok(Self {
            captions: Arc::new(captions),
            skipped,
        })
    }
}

async fn read_source(source: &str) -> Result<Vec<u8>, CorpusError> {
    let failed = |reason: String| CorpusError::Read {
        source_name: source.to_owned(),
        reason,
    };
    if !source.contains("://") || source.starts_with("file://") {
        let path = source.strip_prefix("file://").unwrap_or(source);
        return tokio::fs::read(path)
            .await
            .map_err(|e| failed(e.to_string()));
    }
    // An object URL: open its folder as a store and read the object.
    let (folder, name) = source
        .rsplit_once('/')
        .filter(|(folder, name)| !name.is_empty() && folder.contains("://"))
        .ok_or_else(|| failed("expected SCHEME://BUCKET/PATH/NAME".to_owned()))?;
    let store = AsyncRunStore::open(folder).map_err(|e| failed(e.to_string()))?;
    match store.get_run_file(name).await {
        Ok(Some(bytes)) => Ok(bytes.to_vec()),
        Ok(None) => Err(failed("no such object".to_owned())),
        Err(e) => Err(failed(e.to_string())),
    }
}
