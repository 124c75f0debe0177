//! `clip-pgs bench step --device emu`: one training step on the emulator with its traffic
//! counters, per kernel.

use std::error::Error;

use clip_pgs_host::Device;

use super::step::StepBench;

pub fn run(args: &StepBench, device: Device) -> Result<(), Box<dyn Error>> {
    let _ = (args, device);
    Err("not yet".into())
}
