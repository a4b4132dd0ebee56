//! How many CPU threads a `swiftbrush worker` process gives libtorch.
//!
//! libtorch sizes its intra-op (OpenMP) and inter-op pools to every core of
//! the host. Several worker processes on one host then run several times
//! more threads than there are cores; OpenMP's threads spin while they
//! wait, so they starve each other and the ring all-reduce between them:
//! two CPU workers on a 2-core box trained 30x slower than with one thread
//! each (issue 29). torchrun answers with OMP_NUM_THREADS=1 for each
//! process unless the user set it; a worker here takes its share of the
//! host instead: the cores it may run on divided by the workers on this
//! host, at least 1. In order, the first that is set decides:
//!
//! 1. `--threads N`;
//! 2. `MKL_NUM_THREADS`, then `OMP_NUM_THREADS` (libtorch's own order):
//!    the user's choice stands;
//! 3. cores / local workers, with the local workers from `--local-workers
//!    N`, `SWIFTBRUSH_LOCAL_WORKERS`, `LOCAL_WORLD_SIZE` (torchrun), or
//!    Slurm's `SLURM_STEP_TASKS_PER_NODE` at this node's `SLURM_NODEID`
//!    (inside `srun`); with none of them the worker assumes it is alone.
//!
//! "Cores" are what the process may run on (its CPU affinity and cgroup
//! quota: [`std::thread::available_parallelism`]). A launcher that already
//! binds each worker to its own cores should pass `--threads`.
//!
//! [`plan`] decides without side effects; [`apply`] sets libtorch's pools
//! before the worker's first tensor. `swiftbrush train --workers N` (every
//! worker in one process) shares one pool instead
//! (`distributed::share_cpu_threads`), and a single-process `train` keeps
//! libtorch's default: CPU results depend on the thread count.

use std::fmt;

use serde::Serialize;

/// `--local-workers`' variable.
pub const LOCAL_WORKERS_VAR: &str = "SWIFTBRUSH_LOCAL_WORKERS";
/// The thread variables libtorch reads, the first one set wins.
pub const THREAD_VARS: [&str; 2] = ["MKL_NUM_THREADS", "OMP_NUM_THREADS"];

/// Where the thread count came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum ThreadSource {
    /// `--threads N`.
    Flag,
    /// `variable=value` in the environment.
    Environment { variable: String, value: String },
    /// cores / local workers; `local_workers_from` names the flag or the
    /// variable that gave the count ("default" when none did).
    Share {
        cores: u32,
        local_workers: u32,
        local_workers_from: String,
    },
}

/// The threads a worker process gives libtorch, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ThreadPlan {
    pub intra_op: u32,
    pub inter_op: u32,
    pub source: ThreadSource,
}

impl fmt::Display for ThreadPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} intra-op, {} inter-op ({})",
            self.intra_op, self.inter_op, self.source
        )
    }
}

impl fmt::Display for ThreadSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThreadSource::Flag => write!(f, "--threads"),
            ThreadSource::Environment { variable, value } => write!(f, "{variable}={value}"),
            ThreadSource::Share {
                cores,
                local_workers,
                local_workers_from,
            } => {
                let plural = |n: u32| if n == 1 { "" } else { "s" };
                write!(
                    f,
                    "{cores} core{} / {local_workers} local worker{}",
                    plural(*cores),
                    plural(*local_workers)
                )?;
                if local_workers_from == "default" {
                    write!(
                        f,
                        "; --local-workers N or {LOCAL_WORKERS_VAR} when N workers share this host"
                    )
                } else {
                    write!(f, ", {local_workers_from}")
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThreadError {
    #[error("--{flag} must be at least 1")]
    Zero { flag: &'static str },
    #[error("{variable}={value:?} is not a count of workers (a whole number >= 1)")]
    BadVariable {
        variable: &'static str,
        value: String,
    },
}

/// What the command line asked for (`swiftbrush worker` and `doctor`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadRequest {
    /// `--threads N`.
    pub threads: Option<u32>,
    /// `--local-workers N`.
    pub local_workers: Option<u32>,
}

impl ThreadPlan {
    /// The cores to share among this host's workers of each world, when
    /// nothing said how many workers share the host (the share then
    /// assumed it alone): the coordinator's assignment tells.
    pub fn shares_with_world(&self) -> Option<u32> {
        match &self.source {
            ThreadSource::Share {
                cores,
                local_workers_from,
                ..
            } if local_workers_from == "default" => Some(*cores),
            _ => None,
        }
    }
}

/// Intra-op threads for one of `workers` workers on a host of `cores`.
pub fn world_share(cores: u32, workers: u32) -> u32 {
    (cores / workers.max(1)).max(1)
}

/// Decides the threads from the cores this process may run on, the
/// request and the environment (`env`: a variable's value, if set); see
/// the module's text for the order.
pub fn plan(
    cores: u32,
    request: ThreadRequest,
    env: impl Fn(&str) -> Option<String>,
) -> Result<ThreadPlan, ThreadError> {
    let fixed = |n: u32, source: ThreadSource| ThreadPlan {
        intra_op: n,
        inter_op: n,
        source,
    };
    if let Some(n) = request.threads {
        if n == 0 {
            return Err(ThreadError::Zero { flag: "threads" });
        }
        return Ok(fixed(n, ThreadSource::Flag));
    }
    if request.local_workers == Some(0) {
        return Err(ThreadError::Zero {
            flag: "local-workers",
        });
    }
    for variable in THREAD_VARS {
        // Like libtorch: a value it cannot read is ignored.
        if let Some(value) = env(variable)
            && let Some(n) = leading_count(&value)
        {
            return Ok(fixed(
                n,
                ThreadSource::Environment {
                    variable: variable.to_owned(),
                    value,
                },
            ));
        }
    }
    let (local_workers, from) = local_workers(request.local_workers, &env)?;
    let cores = cores.max(1);
    Ok(fixed(
        (cores / local_workers).max(1),
        ThreadSource::Share {
            cores,
            local_workers,
            local_workers_from: from,
        },
    ))
}

/// The workers on this host and what said so.
fn local_workers(
    flag: Option<u32>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(u32, String), ThreadError> {
    if let Some(n) = flag {
        return Ok((n, "--local-workers".to_owned()));
    }
    for variable in [LOCAL_WORKERS_VAR, "LOCAL_WORLD_SIZE"] {
        if let Some(value) = env(variable) {
            return match value.trim().parse::<u32>() {
                Ok(n) if n >= 1 => Ok((n, variable.to_owned())),
                _ => Err(ThreadError::BadVariable { variable, value }),
            };
        }
    }
    if let (Some(list), Some(node)) = (env("SLURM_STEP_TASKS_PER_NODE"), env("SLURM_NODEID"))
        && let Some(n) = node
            .trim()
            .parse()
            .ok()
            .and_then(|node| slurm_tasks_on_node(&list, node))
    {
        return Ok((n, "SLURM_STEP_TASKS_PER_NODE".to_owned()));
    }
    Ok((1, "default".to_owned()))
}

/// The tasks on node `node` (0-based) of Slurm's compressed list, e.g.
/// "2(x3),1" is 2, 2, 2, 1; None if it does not read.
pub fn slurm_tasks_on_node(list: &str, node: usize) -> Option<u32> {
    let mut seen = 0usize;
    for part in list.trim().split(',') {
        let (count, repeat) = match part.split_once("(x") {
            Some((count, rest)) => (count, rest.strip_suffix(')')?.parse::<usize>().ok()?),
            None => (part, 1),
        };
        let count = count.parse::<u32>().ok().filter(|&n| n >= 1)?;
        seen += repeat;
        if node < seen {
            return Some(count);
        }
    }
    None
}

/// A thread variable's count as libtorch reads it (std::stoi: the leading
/// digits, so "4,2" is 4); None for what it would ignore.
fn leading_count(value: &str) -> Option<u32> {
    let digits: String = value
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok().filter(|&n| n >= 1)
}

/// The cores this process may run on (affinity, cgroup quota).
pub fn available_cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}

/// [`plan`] for this process: its cores and its environment.
pub fn plan_here(request: ThreadRequest) -> Result<ThreadPlan, ThreadError> {
    plan(available_cores(), request, |v| std::env::var(v).ok())
}

/// What libtorch's pools hold after [`apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub intra_op: i32,
    pub inter_op: i32,
    /// Why libtorch kept its inter-op pool (it can be sized once, before
    /// any inter-op work), if it did.
    pub inter_op_refused: Option<String>,
}

/// Sizes libtorch's pools to `plan`; call it before the process's first
/// tensor operation. Returns what the pools hold now.
pub fn apply(plan: &ThreadPlan) -> Applied {
    let as_int = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    tch::set_num_threads(as_int(plan.intra_op));
    // tch's wrapper panics when libtorch refuses (a second call, or after
    // inter-op work began): ask libtorch directly and keep its answer.
    // SAFETY: plain calls into libtorch's C API; the error string it
    // returns is strdup'ed and freed here.
    let inter_op_refused = unsafe {
        torch_sys::at_set_num_interop_threads(as_int(plan.inter_op));
        let err = torch_sys::get_and_reset_last_err();
        if err.is_null() {
            None
        } else {
            let text = std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned();
            libc::free(err.cast());
            Some(text.lines().next().unwrap_or_default().to_owned())
        }
    };
    Applied {
        intra_op: tch::get_num_threads(),
        inter_op: tch::get_num_interop_threads(),
        inter_op_refused,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn workers_not_told_their_number_share_with_their_world() {
        assert_eq!(world_share(2, 2), 1);
        assert_eq!(world_share(16, 8), 2);
        assert_eq!(world_share(2, 3), 1, "at least one");
        assert_eq!(world_share(8, 1), 8);
        let alone = plan(8, ThreadRequest::default(), |_| None).unwrap();
        assert_eq!(alone.shares_with_world(), Some(8));
        let told = ThreadRequest {
            local_workers: Some(2),
            ..Default::default()
        };
        assert_eq!(plan(8, told, |_| None).unwrap().shares_with_world(), None);
        let env = |v: &str| (v == "OMP_NUM_THREADS").then(|| "3".to_owned());
        assert_eq!(
            plan(8, ThreadRequest::default(), env)
                .unwrap()
                .shares_with_world(),
            None
        );
    }

    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn req(threads: Option<u32>, local_workers: Option<u32>) -> ThreadRequest {
        ThreadRequest {
            threads,
            local_workers,
        }
    }

    #[test]
    fn a_worker_takes_its_share_of_the_cores() {
        let p = plan(2, req(None, Some(2)), env(&[])).unwrap();
        assert_eq!((p.intra_op, p.inter_op), (1, 1));
        assert_eq!(
            p.to_string(),
            "1 intra-op, 1 inter-op (2 cores / 2 local workers, --local-workers)"
        );
        let p = plan(
            96,
            req(None, None),
            env(&[("SWIFTBRUSH_LOCAL_WORKERS", "8")]),
        )
        .unwrap();
        assert_eq!(p.intra_op, 12);
        // Never below one thread.
        assert_eq!(plan(3, req(None, Some(8)), env(&[])).unwrap().intra_op, 1);
        // Alone: every core, and the line says how to share.
        let p = plan(16, req(None, None), env(&[])).unwrap();
        assert_eq!(p.intra_op, 16);
        assert!(p.to_string().contains("16 cores / 1 local worker;"), "{p}");
    }

    #[test]
    fn launchers_say_how_many_workers_share_the_host() {
        let p = plan(8, req(None, None), env(&[("LOCAL_WORLD_SIZE", "4")])).unwrap();
        assert_eq!(p.intra_op, 2);
        assert!(p.to_string().ends_with("LOCAL_WORLD_SIZE)"), "{p}");
        // srun: this node's tasks of the step.
        let slurm = [
            ("SLURM_STEP_TASKS_PER_NODE", "8(x2),4"),
            ("SLURM_NODEID", "2"),
        ];
        assert_eq!(plan(32, req(None, None), env(&slurm)).unwrap().intra_op, 8);
        // Ours over torchrun's over Slurm's; the flag over all.
        let all = [
            ("SWIFTBRUSH_LOCAL_WORKERS", "2"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("SLURM_STEP_TASKS_PER_NODE", "8"),
            ("SLURM_NODEID", "0"),
        ];
        assert_eq!(plan(8, req(None, None), env(&all)).unwrap().intra_op, 4);
        assert_eq!(plan(8, req(None, Some(8)), env(&all)).unwrap().intra_op, 1);
        // A Slurm list that does not read is no answer.
        let odd = [("SLURM_STEP_TASKS_PER_NODE", "what"), ("SLURM_NODEID", "0")];
        assert_eq!(plan(8, req(None, None), env(&odd)).unwrap().intra_op, 8);
    }

    #[test]
    fn the_user_s_threads_win() {
        let omp = [("OMP_NUM_THREADS", "4")];
        let p = plan(2, req(None, Some(2)), env(&omp)).unwrap();
        assert_eq!((p.intra_op, p.inter_op), (4, 4));
        assert_eq!(p.to_string(), "4 intra-op, 4 inter-op (OMP_NUM_THREADS=4)");
        // libtorch reads MKL_NUM_THREADS over OMP_NUM_THREADS.
        let both = [("OMP_NUM_THREADS", "4"), ("MKL_NUM_THREADS", "3")];
        assert_eq!(plan(2, req(None, None), env(&both)).unwrap().intra_op, 3);
        // OpenMP's nested list: its first level, as libtorch reads it.
        let list = [("OMP_NUM_THREADS", "2,1")];
        assert_eq!(plan(8, req(None, None), env(&list)).unwrap().intra_op, 2);
        // What libtorch ignores is ignored.
        for bad in ["", "0", "many"] {
            let p = plan(8, req(None, Some(2)), env(&[("OMP_NUM_THREADS", bad)])).unwrap();
            assert_eq!(p.intra_op, 4, "OMP_NUM_THREADS={bad:?}");
        }
        // --threads over everything.
        let p = plan(2, req(Some(3), Some(2)), env(&both)).unwrap();
        assert_eq!(
            (p.intra_op, p.inter_op, &p.source),
            (3, 3, &ThreadSource::Flag)
        );
        assert_eq!(p.to_string(), "3 intra-op, 3 inter-op (--threads)");
    }

    #[test]
    fn bad_counts_are_refused_with_their_name() {
        assert_eq!(
            plan(2, req(Some(0), None), env(&[]))
                .unwrap_err()
                .to_string(),
            "--threads must be at least 1"
        );
        assert!(plan(2, req(None, Some(0)), env(&[])).is_err());
        for bad in ["0", "two", "-1", ""] {
            let e = plan(
                2,
                req(None, None),
                env(&[("SWIFTBRUSH_LOCAL_WORKERS", bad)]),
            )
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("SWIFTBRUSH_LOCAL_WORKERS="), "{e}");
        }
    }

    #[test]
    fn slurm_lists_read_node_by_node() {
        assert_eq!(slurm_tasks_on_node("8", 0), Some(8));
        assert_eq!(slurm_tasks_on_node("2(x3),1", 2), Some(2));
        assert_eq!(slurm_tasks_on_node("2(x3),1", 3), Some(1));
        assert_eq!(slurm_tasks_on_node("2(x3),1", 4), None);
        assert_eq!(slurm_tasks_on_node("2(x", 0), None);
        assert_eq!(slurm_tasks_on_node("0", 0), None);
    }
}
