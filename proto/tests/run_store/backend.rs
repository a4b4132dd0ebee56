//! The backends the suite runs on. Each hands out a fresh, empty run
//! directory per scenario, as the URL a user would type plus the settings a
//! user would put in the environment; opening it again reaches the same data
//! (a restarted process).

use std::sync::atomic::{AtomicUsize, Ordering};

use swiftbrush_proto::run_store::{RunStore, StoreOptions};
use tempfile::TempDir;

use super::moto::{BUCKET, MotoServer};

pub trait Backend {
    fn name(&self) -> &str;
    fn run_dir(&self, scenario: &str) -> RunDir;
}

#[derive(Debug, Clone)]
pub struct RunDir {
    pub url: String,
    pub options: StoreOptions,
    /// Smallest part size the backend accepts (S3: 5 MiB).
    pub min_part_size: usize,
}

impl RunDir {
    /// A new handle on the run directory, as a new process would open it.
    pub fn open(&self) -> RunStore {
        RunStore::open_with(&self.url, &self.options)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.url))
    }
}

pub struct MemoryBackend {
    id: usize,
}

impl MemoryBackend {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl Backend for MemoryBackend {
    fn name(&self) -> &str {
        "memory"
    }

    fn run_dir(&self, scenario: &str) -> RunDir {
        RunDir {
            // Named memory stores are shared within the process, so opening
            // the URL again sees the same data.
            url: format!("memory://suite{}-{scenario}/runs/r1", self.id),
            options: StoreOptions::new(),
            min_part_size: 1,
        }
    }
}

pub struct LocalBackend {
    root: TempDir,
}

impl LocalBackend {
    pub fn new() -> Self {
        Self {
            root: TempDir::new().expect("cannot create a temporary directory"),
        }
    }
}

impl Backend for LocalBackend {
    fn name(&self) -> &str {
        "local"
    }

    fn run_dir(&self, scenario: &str) -> RunDir {
        let path = self.root.path().join(scenario).join("run");
        RunDir {
            url: path.display().to_string(),
            options: StoreOptions::new(),
            min_part_size: 1,
        }
    }
}

pub struct S3Backend {
    options: StoreOptions,
}

impl S3Backend {
    pub fn new(server: &MotoServer) -> Self {
        // Exactly what a user sets for an S3-compatible server; passed
        // explicitly because tests share one process environment.
        let options = StoreOptions::new()
            .with("AWS_ENDPOINT_URL", server.endpoint())
            .with("AWS_ALLOW_HTTP", "true")
            .with("AWS_ACCESS_KEY_ID", "testing")
            .with("AWS_SECRET_ACCESS_KEY", "testing")
            .with("AWS_REGION", "us-east-1");
        Self { options }
    }
}

impl Backend for S3Backend {
    fn name(&self) -> &str {
        "s3"
    }

    fn run_dir(&self, scenario: &str) -> RunDir {
        RunDir {
            url: format!("s3://{BUCKET}/{scenario}/run"),
            options: self.options.clone(),
            min_part_size: 5 * 1024 * 1024,
        }
    }
}
