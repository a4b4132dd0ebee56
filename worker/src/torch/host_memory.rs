//! How host (CPU) tensor memory is taken from glibc's malloc.
//!
//! libtorch's CPU allocator calls posix_memalign for every tensor and
//! free when it dies; it caches nothing. glibc serves a request above its
//! mmap threshold (128 KiB at start, raised dynamically toward 32 MiB as
//! such blocks are freed) with a fresh mmap and unmaps it on free, and it
//! hands the top of the heap back to the kernel once 128 KiB of it are
//! free. A training step allocates and frees the same few hundred
//! activation-sized buffers every iteration, so by default it spends the
//! time of a page fault per 4 KiB page of each, every step: on the toy
//! teacher's step about 10 % of the CPU time was in the kernel's page-fault
//! path (perf, this machine).
//!
//! [`tune`] moves the mmap threshold to glibc's maximum and keeps up to
//! [`TRIM_THRESHOLD`] of free heap, so freed buffers are reused without a
//! fault. It is called once at the start of the `swiftbrush` binary, and
//! it leaves malloc alone when the environment already tunes it (any of
//! glibc's `MALLOC_*_` variables or `GLIBC_TUNABLES`): a user who sets
//! them gets exactly what they set. GPU tensors are untouched (CUDA's
//! caching allocator owns them).

use serde::Serialize;

/// glibc's largest mmap threshold on a 64-bit system
/// (DEFAULT_MMAP_THRESHOLD_MAX): requests up to this come from the heap.
pub const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of the heap kept for reuse before it is handed
/// back: a step's working set on the toy teacher is about 0.7 GiB.
pub const TRIM_THRESHOLD: i32 = 1 << 30;

/// The environment variables through which glibc's malloc is tuned from
/// outside; any one of them set means the user's choice stands.
pub const ENV_VARS: [&str; 6] = [
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
];

/// What [`tune`] did, for doctor and the benches' reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum HostMalloc {
    /// The thresholds above were set.
    Tuned {
        mmap_threshold_bytes: i32,
        trim_threshold_bytes: i32,
    },
    /// The environment tunes malloc (the variable named): left alone.
    FromEnvironment { variable: String },
    /// glibc refused a setting (mallopt returned 0): its defaults hold.
    Refused { setting: String },
}

impl std::fmt::Display for HostMalloc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostMalloc::Tuned {
                mmap_threshold_bytes,
                trim_threshold_bytes,
            } => write!(
                f,
                "glibc malloc tuned: mmap threshold {} MiB, trim threshold {} MiB",
                mmap_threshold_bytes >> 20,
                trim_threshold_bytes >> 20
            ),
            HostMalloc::FromEnvironment { variable } => {
                write!(
                    f,
                    "glibc malloc as the environment sets it ({variable} is set)"
                )
            }
            HostMalloc::Refused { setting } => {
                write!(f, "glibc malloc defaults (mallopt refused {setting})")
            }
        }
    }
}

static STATE: std::sync::OnceLock<HostMalloc> = std::sync::OnceLock::new();

/// Tunes malloc once per process (see the module's text) and says what
/// it did; later calls return the first answer.
pub fn tune() -> &'static HostMalloc {
    STATE.get_or_init(|| {
        if let Some(variable) = ENV_VARS.iter().find(|v| std::env::var_os(v).is_some()) {
            return HostMalloc::FromEnvironment {
                variable: (*variable).to_string(),
            };
        }
        // SAFETY: mallopt only changes malloc's parameters; it is safe to
        // call at any time, from any thread.
        let settings = [
            (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
            (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD, "M_TRIM_THRESHOLD"),
        ];
        for (param, value, name) in settings {
            if unsafe { libc::mallopt(param, value) } == 0 {
                return HostMalloc::Refused {
                    setting: format!("{name} = {value}"),
                };
            }
        }
        HostMalloc::Tuned {
            mmap_threshold_bytes: MMAP_THRESHOLD,
            trim_threshold_bytes: TRIM_THRESHOLD,
        }
    })
}

/// What [`tune`] did in this process, if it ran.
pub fn state() -> Option<&'static HostMalloc> {
    STATE.get()
}

/// A [`state`] in words, for the reports.
pub fn describe(state: Option<&HostMalloc>) -> String {
    state.map_or_else(
        || "glibc malloc defaults (not tuned in this process)".to_owned(),
        ToString::to_string,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks glibc serves by mmap, in use now.
    fn mmapped_blocks() -> usize {
        // SAFETY: mallinfo2 only reads malloc's counters.
        unsafe { libc::mallinfo2() }.hblks
    }

    /// The tuning is what makes a buffer of activation size come from the
    /// heap (reused after free, no page faults) instead of a fresh mmap.
    /// nextest runs each test in its own process, so this one's malloc
    /// state is its own.
    #[test]
    fn after_tuning_an_activation_sized_buffer_comes_from_the_heap() {
        let tuned = tune();
        if let HostMalloc::FromEnvironment { variable } = tuned {
            eprintln!("skipped: the environment tunes malloc ({variable})");
            return;
        }
        assert_eq!(
            tuned,
            &HostMalloc::Tuned {
                mmap_threshold_bytes: MMAP_THRESHOLD,
                trim_threshold_bytes: TRIM_THRESHOLD,
            }
        );
        let before = mmapped_blocks();
        let size = 24 << 20;
        // SAFETY: a plain allocation, freed below.
        let p = unsafe { libc::malloc(size) };
        assert!(!p.is_null());
        let during = mmapped_blocks();
        unsafe { libc::free(p) };
        assert_eq!(during, before, "a 24 MiB buffer was served by mmap");
    }
}
