//! Uniform draws in (0, 1) from the Philox stream (seed, a, b): draw i is
//! `Philox::new(seed, a, b).uniform(i)` on both devices, bit for bit.

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use clip_pgs_kernels::philox::Philox;
use clip_pgs_kernels::random::{THREADS, philox_uniform};

use crate::buffer::Buffer;
use crate::device::Device;
use crate::error::{Error, Result};

/// `n` uniforms of the stream (seed, a, b), on `device`.
pub fn uniform(device: &Device, n: usize, seed: u64, a: u32, b: u32) -> Result<Buffer<f32>> {
    if n == 0 || n > u32::MAX as usize {
        return Err(Error::InvalidArgument(format!("{n} draws asked for; 1 to 2³² − 1 are possible")));
    }
    let rng = Philox::new(seed, a, b);
    match device {
        Device::Cpu => Ok(Buffer::Cpu((0..n as u32).into_par_iter().map(|i| rng.uniform(i)).collect())),
        Device::Cuda(_) | Device::Emu(_) => {
            let mut out = device.alloc_zeros::<f32>(n, "random draws")?;
            let cfg = LaunchConfig {
                grid_dim: ((n as u32).div_ceil(THREADS), 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `out` holds n floats.
            unsafe { device.launch(&philox_uniform, cfg, (&mut out, n as u32, seed, a, b)) }?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_draws_are_the_philox_stream() {
        let draws = uniform(&Device::Cpu, 10, 5, 1, 2).unwrap().to_vec().unwrap();
        let rng = Philox::new(5, 1, 2);
        assert_eq!(draws, (0..10).map(|i| rng.uniform(i)).collect::<Vec<_>>());
        assert!(uniform(&Device::Cpu, 0, 5, 1, 2).is_err());
    }
}
