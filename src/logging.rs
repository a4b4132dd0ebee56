//! Log output: human-readable by default, JSON lines with `--log-format json`
//! (for log collectors); the level comes from RUST_LOG (default: the
//! command's, `info` for most).

use swiftbrush_proto::config::LogFormat;
use tracing_subscriber::EnvFilter;

pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
