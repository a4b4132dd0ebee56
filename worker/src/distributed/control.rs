//! `WorldControl`: the loop's control in a distributed world. At each step
//! boundary it reads the coordinator's standing orders (left by the
//! heartbeat thread) and the preemption flag, and reports progress back;
//! nothing here waits on the network, except `after_last_step`, which
//! waits briefly (and asks for a prompt heartbeat) for the job's end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::signals;
use super::status::WorkerStatus;
use crate::trainer::{Directive, Phase, StepControl, StepReport};

/// How long `after_last_step` waits per call, and how often it asks the
/// heartbeat thread for a beat while it waits.
const END_POLL: Duration = Duration::from_millis(100);

pub struct WorldControl {
    status: Arc<WorkerStatus>,
    generation: u64,
    last_poke: Option<Instant>,
}

impl WorldControl {
    pub fn new(status: Arc<WorkerStatus>, generation: u64) -> Self {
        Self {
            status,
            generation,
            last_poke: None,
        }
    }

    fn directive(&self, step: u64) -> Directive {
        let orders = self.status.orders();
        if let Some(stop) = orders.stop {
            return Directive::Stop(format!("{:?}: {}", stop.phase, stop.reason));
        }
        if orders.unknown {
            return Directive::Abort("the coordinator no longer knows this worker".to_owned());
        }
        if orders.reform_to > self.generation
            || self.status.coordinator_generation() > self.generation
        {
            return Directive::Abort(format!(
                "the coordinator moved to generation {}: {}",
                orders.reform_to.max(self.status.coordinator_generation()),
                orders.reform_reason
            ));
        }
        match orders.checkpoint_at {
            Some((generation, at)) if generation == self.generation && step >= at => {
                Directive::Checkpoint
            }
            _ => Directive::Continue,
        }
    }
}

impl StepControl for WorldControl {
    fn boundary(&mut self, step: u64) -> Directive {
        self.directive(step)
    }

    fn after_last_step(&mut self, step: u64) -> Directive {
        let directive = self.directive(step);
        if directive != Directive::Continue {
            return directive;
        }
        // The job ends when the final checkpoint commits; the heartbeat
        // reply says so. Ask for beats more often than the interval so the
        // end is seen promptly.
        if self.last_poke.is_none_or(|t| t.elapsed() >= END_POLL) {
            self.status.poke();
            self.last_poke = Some(Instant::now());
        }
        self.status.wait_orders(END_POLL);
        self.directive(step)
    }

    fn preempt_requested(&self) -> bool {
        signals::preempt_requested()
    }

    fn phase(&mut self, phase: Phase) {
        self.status.set_phase(phase);
    }

    fn step_done(&mut self, report: &StepReport) {
        self.status.step_done(report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::status::StopOrder;
    use swiftbrush_proto::rpc;

    #[test]
    fn orders_become_directives_for_this_world_only() {
        let status = Arc::new(WorkerStatus::new(1000));
        let mut c = WorldControl::new(status.clone(), 3);
        assert_eq!(c.boundary(5), Directive::Continue);

        // A checkpoint request of an older world is not this world's.
        status.order(|o| o.checkpoint_at = Some((2, 5)));
        assert_eq!(c.boundary(5), Directive::Continue);
        status.order(|o| o.checkpoint_at = Some((3, 6)));
        assert_eq!(c.boundary(5), Directive::Continue);
        assert_eq!(c.boundary(6), Directive::Checkpoint);
        assert_eq!(
            c.boundary(7),
            Directive::Checkpoint,
            "at the first step >= S"
        );

        status.order(|o| {
            o.reform_to = 4;
            o.reform_reason = "worker 9 died".to_owned();
        });
        let Directive::Abort(why) = c.boundary(7) else {
            panic!("expected an abort");
        };
        assert!(
            why.contains("generation 4") && why.contains("worker 9 died"),
            "{why}"
        );

        status.order(|o| {
            o.stop = Some(StopOrder {
                phase: rpc::JobPhase::Cancelled,
                reason: "operator".to_owned(),
            })
        });
        assert!(matches!(c.after_last_step(7), Directive::Stop(_)));
    }
}
