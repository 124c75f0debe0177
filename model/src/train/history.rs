//! Each step's loss and gradient norm, kept on the training device until the trainer logs: a
//! step reads nothing back from the GPU (the update decides on the device whether it applies),
//! and the trainer reads a whole logging interval's values at once.

use clip_pgs_host::{Buffer, Device, Span};

use crate::precision::Precision;
use crate::step::TrainStep;

/// One step's values as the trainer reads them.
#[derive(Clone, Copy, Debug)]
pub struct StepRecord {
    /// The step's number (from 0).
    pub step: usize,
    pub loss: f32,
    pub norm: f32,
}

impl StepRecord {
    /// Whether the update applied (the device's rule: loss and norm finite).
    pub fn applied(&self) -> bool {
        self.loss.is_finite() && self.norm.is_finite()
    }
}

pub struct StepHistory {
    /// (loss, norm) per recorded step, on the device.
    values: Buffer<f32>,
    /// The step numbers recorded since the last `take`.
    steps: Vec<usize>,
}

fn err(e: clip_pgs_host::Error) -> String {
    e.to_string()
}

impl StepHistory {
    /// Room for `capacity` steps between two `take`s.
    pub fn new(device: &Device, capacity: usize) -> Result<StepHistory, String> {
        let values = device.alloc_zeros(2 * capacity.max(1), "the step history").map_err(err)?;
        Ok(StepHistory { values, steps: Vec::with_capacity(capacity.max(1)) })
    }

    pub fn is_full(&self) -> bool {
        2 * self.steps.len() == self.values.len()
    }

    /// Copies the last step's loss and norm, on the device (no host read).
    pub fn record<T: Precision>(&mut self, step: &TrainStep<T>, number: usize) -> Result<(), String> {
        if self.is_full() {
            return Err(format!("the step history holds {} steps: take them first", self.steps.len()));
        }
        let at = 2 * self.steps.len();
        let ([], [loss_slot, norm_slot]) =
            self.values.split([], [Span::new(at, 1), Span::new(at + 1, 1)]).map_err(err)?;
        step.device.copy(loss_slot, step.workspace.loss_view().map_err(err)?).map_err(err)?;
        step.device.copy(norm_slot, step.optimizer.norm_view()).map_err(err)?;
        self.steps.push(number);
        Ok(())
    }

    /// The steps recorded since the last `take`, in order (one host read).
    pub fn take(&mut self) -> Result<Vec<StepRecord>, String> {
        let mut values = vec![0.0f32; 2 * self.steps.len()];
        self.values.read(Span::new(0, values.len()), &mut values).map_err(err)?;
        let records =
            self.steps.iter().zip(values.chunks(2)).map(|(&step, v)| StepRecord { step, loss: v[0], norm: v[1] });
        let records = records.collect();
        self.steps.clear();
        Ok(records)
    }
}
