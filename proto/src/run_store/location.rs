//! Turning the user's run-directory string into an object store rooted at
//! the run directory: local paths, file://, s3://, gs:// and memory://.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use url::Url;

use super::error::{Result, RunStoreError};

/// Where a run directory lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunLocation {
    /// An absolute local directory (relative input is made absolute).
    Local(PathBuf),
    /// `memory://NAME/prefix`: stores with the same non-empty NAME are shared
    /// within the process (so a test can "restart" by opening the URL again);
    /// `memory://` alone is a fresh private store.
    Memory {
        name: String,
        prefix: String,
    },
    S3 {
        bucket: String,
        prefix: String,
    },
    Gcs {
        bucket: String,
        prefix: String,
    },
}

impl RunLocation {
    /// Parses a local path (anything without `://`) or a URL.
    pub fn parse(input: &str) -> Result<Self> {
        let invalid = |reason: &str| RunStoreError::InvalidUrl {
            url: input.to_owned(),
            reason: reason.to_owned(),
        };
        if input.trim().is_empty() {
            return Err(invalid("the run directory is empty"));
        }
        if !input.contains("://") {
            let path = std::path::absolute(input).map_err(|source| RunStoreError::LocalDir {
                path: PathBuf::from(input),
                source,
            })?;
            return Ok(Self::Local(path));
        }
        let url = Url::parse(input).map_err(|e| invalid(&e.to_string()))?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("query strings and fragments are not supported"));
        }
        let bucket = || match url.host_str() {
            Some(host) if !host.is_empty() => Ok(host.to_owned()),
            _ => Err(invalid(
                "the bucket name is missing (expected SCHEME://BUCKET/PREFIX)",
            )),
        };
        let prefix = || -> Result<String> {
            let path = Path::from_url_path(url.path()).map_err(|e| invalid(&e.to_string()))?;
            Ok(path.as_ref().to_owned())
        };
        match url.scheme() {
            "file" => {
                if url
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(invalid("file:// URLs must not name a host"));
                }
                let path = url
                    .to_file_path()
                    .map_err(|()| invalid("not an absolute local path"))?;
                Ok(Self::Local(path))
            }
            "memory" => Ok(Self::Memory {
                name: url.host_str().unwrap_or_default().to_owned(),
                prefix: prefix()?,
            }),
            "s3" | "s3a" => Ok(Self::S3 {
                bucket: bucket()?,
                prefix: prefix()?,
            }),
            "gs" => Ok(Self::Gcs {
                bucket: bucket()?,
                prefix: prefix()?,
            }),
            other => Err(RunStoreError::UnsupportedScheme {
                url: input.to_owned(),
                scheme: other.to_owned(),
            }),
        }
    }

    /// How messages name this run directory.
    pub fn display(&self) -> String {
        let joined = |scheme: &str, host: &str, prefix: &str| {
            if prefix.is_empty() {
                format!("{scheme}://{host}")
            } else {
                format!("{scheme}://{host}/{prefix}")
            }
        };
        match self {
            Self::Local(path) => path.display().to_string(),
            Self::Memory { name, prefix } => joined("memory", name, prefix),
            Self::S3 { bucket, prefix } => joined("s3", bucket, prefix),
            Self::Gcs { bucket, prefix } => joined("gs", bucket, prefix),
        }
    }
}

/// Settings for cloud stores, spelled like the environment variables that
/// carry them (`AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`,
/// `GOOGLE_SERVICE_ACCOUNT`, ...). Later entries win. Keys `object_store`
/// does not know are ignored, as its own `from_env` does.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    entries: Vec<(String, String)>,
}

impl StoreOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// The `AWS_*` and `GOOGLE_*` variables of this process.
    pub fn from_env() -> Self {
        Self::from_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// The `AWS_*` and `GOOGLE_*` entries of `vars` (testable `from_env`).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let entries = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("AWS_") || k.starts_with("GOOGLE_"))
            .collect();
        Self { entries }
    }

    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.entries.push((key.into(), value.into()));
        self
    }

    fn matching<'a, K: std::str::FromStr>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (K, &'a str)> + 'a {
        self.entries.iter().filter_map(move |(k, v)| {
            if !k.to_ascii_uppercase().starts_with(prefix) {
                return None;
            }
            Some((k.to_ascii_lowercase().parse().ok()?, v.as_str()))
        })
    }
}

/// Builds the store for `location`, rooted at the run directory.
pub(crate) fn open_store(
    location: &RunLocation,
    options: &StoreOptions,
) -> Result<Arc<dyn ObjectStore>> {
    let configure = |source| RunStoreError::Configure {
        url: location.display(),
        source: Box::new(source),
    };
    let (store, prefix): (Arc<dyn ObjectStore>, &str) = match location {
        RunLocation::Local(path) => (Arc::new(open_local(path)?), ""),
        RunLocation::Memory { name, prefix } => (memory_store(name), prefix),
        RunLocation::S3 { bucket, prefix } => {
            let mut builder = AmazonS3Builder::new();
            for (key, value) in options.matching::<AmazonS3ConfigKey>("AWS_") {
                builder = builder.with_config(key, value);
            }
            let store = builder
                .with_bucket_name(bucket)
                .build()
                .map_err(configure)?;
            (Arc::new(store), prefix)
        }
        RunLocation::Gcs { bucket, prefix } => {
            let mut builder = GoogleCloudStorageBuilder::new();
            for (key, value) in options.matching::<GoogleConfigKey>("GOOGLE_") {
                builder = builder.with_config(key, value);
            }
            let store = builder
                .with_bucket_name(bucket)
                .build()
                .map_err(configure)?;
            (Arc::new(store), prefix)
        }
    };
    if prefix.is_empty() {
        Ok(store)
    } else {
        Ok(Arc::new(PrefixStore::new(store, prefix)))
    }
}

/// Creates the directory and proves it is writable now, so a typo or a
/// read-only mount fails at start-up rather than at the first checkpoint.
fn open_local(path: &std::path::Path) -> Result<LocalFileSystem> {
    let io_error = |source| RunStoreError::LocalDir {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(io_error)?;
    // Unique per opener: threads of one process may open the same directory
    // at once, and a shared probe name made one's remove fail the other.
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = path.join(format!(".write-probe-{}-{n}", std::process::id()));
    std::fs::write(&probe, b"").map_err(io_error)?;
    std::fs::remove_file(&probe).map_err(io_error)?;
    let store =
        LocalFileSystem::new_with_prefix(path).map_err(|source| RunStoreError::Configure {
            url: path.display().to_string(),
            source: Box::new(source),
        })?;
    // fsync: the commit protocol relies on the files being durable before
    // the manifest that vouches for them. Cleanup: deleted checkpoints leave
    // no empty folders behind.
    Ok(store.with_fsync(true).with_automatic_cleanup(true))
}

fn memory_store(name: &str) -> Arc<dyn ObjectStore> {
    static NAMED: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    if name.is_empty() {
        return Arc::new(InMemory::new());
    }
    // A poisoned lock only means another thread panicked while inserting; the
    // map itself is still consistent.
    let mut named = NAMED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    named
        .entry(name.to_owned())
        .or_insert_with(|| Arc::new(InMemory::new()))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_form() {
        assert_eq!(
            RunLocation::parse("/tmp/run").unwrap(),
            RunLocation::Local("/tmp/run".into())
        );
        assert_eq!(
            RunLocation::parse("file:///tmp/run%20a").unwrap(),
            RunLocation::Local("/tmp/run a".into())
        );
        assert_eq!(
            RunLocation::parse("s3://bkt/a/b/").unwrap(),
            RunLocation::S3 {
                bucket: "bkt".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            RunLocation::parse("gs://bkt").unwrap(),
            RunLocation::Gcs {
                bucket: "bkt".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            RunLocation::parse("memory://").unwrap(),
            RunLocation::Memory {
                name: String::new(),
                prefix: String::new()
            }
        );
        let relative = RunLocation::parse("runs/x").unwrap();
        let RunLocation::Local(path) = relative else {
            panic!("{relative:?}")
        };
        assert!(path.is_absolute() && path.ends_with("runs/x"), "{path:?}");
    }

    #[test]
    fn bad_urls_name_the_url() {
        for (input, needle) in [
            ("", "empty"),
            ("s3:///prefix", "bucket"),
            ("s3://bkt/p?versionId=1", "query"),
            ("file://host/x", "host"),
            ("s3://bkt/a//b", "s3://bkt/a//b"),
        ] {
            let err = RunLocation::parse(input).unwrap_err().to_string();
            assert!(err.contains(needle), "{input:?}: {err}");
            assert!(err.contains(&format!("{input:?}")), "{input:?}: {err}");
        }
        let err = RunLocation::parse("ftp://h/x").unwrap_err();
        assert!(
            matches!(err, RunStoreError::UnsupportedScheme { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("\"ftp://h/x\""), "{err}");
        assert!(err.to_string().contains("\"ftp\""), "{err}");
    }

    #[test]
    fn options_keep_only_cloud_variables_and_later_entries_win() {
        let options = StoreOptions::from_vars([
            ("HOME".to_owned(), "/root".to_owned()),
            ("AWS_ENDPOINT_URL".to_owned(), "http://a".to_owned()),
            ("GOOGLE_BUCKET".to_owned(), "b".to_owned()),
        ])
        .with("AWS_ENDPOINT_URL", "http://b");
        let aws: Vec<(AmazonS3ConfigKey, &str)> = options.matching("AWS_").collect();
        assert_eq!(
            aws,
            vec![
                (AmazonS3ConfigKey::Endpoint, "http://a"),
                (AmazonS3ConfigKey::Endpoint, "http://b")
            ]
        );
        assert_eq!(options.matching::<GoogleConfigKey>("GOOGLE_").count(), 1);
    }

    #[test]
    fn named_memory_stores_are_shared_and_anonymous_ones_are_not() {
        let a = memory_store("location-test");
        let b = memory_store("location-test");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&memory_store(""), &memory_store("")));
    }
}
