//! This process's memory as `swiftbrush plan`'s probe reads it: glibc's
//! count of the bytes malloc has handed out and not taken back (what
//! autograd keeps alive), and the kernel's resident set and its high-water
//! mark (what `bench vsd-step` reports as peak host memory, VmHWM), which
//! the probe resets before each pass (`/proc/self/clear_refs` "5").
//! Linux with glibc only; elsewhere the probe is unavailable.

use std::io::Write;

/// Bytes in use from glibc's malloc: small blocks in the arenas
/// (`uordblks`) plus the blocks mapped on their own (`hblkhd`).
pub fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

/// Returns free heap pages to the system (glibc keeps up to the trim
/// threshold, 1 GiB in this binary, host_memory.rs), so that what a pass
/// then touches shows in the resident set.
pub fn trim() {
    // SAFETY: malloc_trim takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resets the resident set's high-water mark (VmHWM) to the current
/// resident set.
pub fn reset_peak() -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")?
        .write_all(b"5")
}

/// (VmRSS, VmHWM) of this process in bytes.
pub fn resident() -> std::io::Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> std::io::Result<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| std::io::Error::other(format!("/proc/self/status has no {name}")))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// What one measured stretch of work cost: its peak above where it
/// started, and the heap bytes it left alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    pub peak: u64,
    pub kept: u64,
}

/// Runs `work` from a trimmed heap with the high-water mark reset, and
/// returns its result with its [`Cost`].
pub fn measure<T>(work: impl FnOnce() -> T) -> std::io::Result<(T, Cost)> {
    trim();
    let heap0 = heap_in_use();
    reset_peak()?;
    let (rss0, _) = resident()?;
    let out = work();
    let (_, hwm) = resident()?;
    let kept = heap_in_use().saturating_sub(heap0);
    Ok((
        out,
        Cost {
            peak: hwm.saturating_sub(rss0),
            kept,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_buffer_shows_as_kept_and_a_dropped_one_as_peak() {
        let mib = 64usize << 20;
        // Written, so its pages are resident.
        let (kept, cost) = measure(|| vec![1u8; mib]).unwrap();
        assert!(cost.kept >= mib as u64, "{cost:?}");
        assert!(cost.peak >= mib as u64 * 9 / 10, "{cost:?}");
        drop(kept);
        let ((), cost) = measure(|| {
            let v = vec![1u8; mib];
            std::hint::black_box(&v);
        })
        .unwrap();
        assert!(cost.kept < (1 << 20), "{cost:?}");
        assert!(cost.peak >= mib as u64 * 9 / 10, "{cost:?}");
    }
}
