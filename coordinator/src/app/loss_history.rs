//! The loss curves of the status page (`/history`): each worker's losses at
//! the steps its heartbeats reported, since this coordinator started. Kept
//! in memory and bounded: past [`MAX_POINTS`] a series drops every other
//! point (the whole run stays drawn, at half the resolution), and only the
//! newest [`MAX_SERIES`] workers are kept.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::domain::{StepMetrics, WorkerId};

pub const MAX_POINTS: usize = 2048;
pub const MAX_SERIES: usize = 64;

/// One reported step: (step, VSD loss, fake-score loss).
pub type LossPoint = (u64, f64, f64);

#[derive(Debug, Clone, Serialize)]
pub struct LossSeries {
    pub worker: WorkerId,
    pub points: Vec<LossPoint>,
}

#[derive(Debug, Default)]
pub struct LossHistory {
    series: BTreeMap<WorkerId, Vec<LossPoint>>,
}

impl LossHistory {
    /// Records a heartbeat's losses once per step (a worker repeats its
    /// newest step's metrics until it finishes the next one). A step below
    /// the newest one means the world went back to an older checkpoint:
    /// the points past it were not kept by the run and are dropped.
    pub fn record(&mut self, worker: WorkerId, step: u64, metrics: &StepMetrics) {
        if step == 0 {
            return;
        }
        let points = self.series.entry(worker).or_default();
        if points.last().is_some_and(|&(last, _, _)| last == step) {
            return;
        }
        while points.last().is_some_and(|&(last, _, _)| last >= step) {
            points.pop();
        }
        points.push((step, metrics.loss_vsd, metrics.loss_fake_score));
        if points.len() > MAX_POINTS {
            let kept: Vec<LossPoint> = points.iter().copied().step_by(2).collect();
            *points = kept;
        }
        while self.series.len() > MAX_SERIES {
            self.series.pop_first();
        }
    }

    pub fn series(&self) -> Vec<LossSeries> {
        self.series
            .iter()
            .map(|(&worker, points)| LossSeries {
                worker,
                points: points.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(loss: f64) -> StepMetrics {
        StepMetrics {
            loss_vsd: loss,
            loss_fake_score: -loss,
            ..StepMetrics::default()
        }
    }

    #[test]
    fn one_point_per_step_bounded_and_decimated() {
        let mut h = LossHistory::default();
        h.record(WorkerId(1), 0, &metrics(9.0));
        h.record(WorkerId(1), 1, &metrics(1.0));
        h.record(WorkerId(1), 1, &metrics(2.0));
        h.record(WorkerId(1), 2, &metrics(3.0));
        assert_eq!(h.series()[0].points, [(1, 1.0, -1.0), (2, 3.0, -3.0)]);
        // Back to step 1's checkpoint: step 2 is trained again.
        h.record(WorkerId(1), 3, &metrics(4.0));
        h.record(WorkerId(1), 2, &metrics(5.0));
        assert_eq!(h.series()[0].points, [(1, 1.0, -1.0), (2, 5.0, -5.0)]);
        for step in 3..=(MAX_POINTS as u64 + 1) {
            h.record(WorkerId(1), step, &metrics(step as f64));
        }
        let points = &h.series()[0].points;
        assert_eq!(points.len(), MAX_POINTS / 2 + 1);
        assert_eq!((points[0].0, points[1].0), (1, 3), "every other point kept");
        for w in 0..(MAX_SERIES as u64 + 3) {
            h.record(WorkerId(100 + w), 1, &metrics(1.0));
        }
        let series = h.series();
        assert_eq!(series.len(), MAX_SERIES);
        assert_eq!(
            series[0].worker,
            WorkerId(103),
            "the oldest workers dropped"
        );
    }
}
