//! Ops, one file each: arguments checked (`check.rs`: errors name the op and the tensor), CPU
//! reference, GPU launch, and the dispatch on the `Device` the op is given. Tensors are views of
//! device buffers (`crate::view`). An op with no GPU kernel yet says so on `cuda` and `emu`.
//! The model's ops take their activations as f32 or bf16 (`dtype.rs`: the type plan and the
//! kernel each type launches); the CPU device computes in f32 and refuses bf16.

pub mod adamw;
pub mod attention;
pub mod cast;
pub(crate) mod check;
pub mod clip_loss;
pub mod dtype;
pub mod edge_map;
pub mod elementwise;
pub mod embedding;
pub mod gelu;
pub mod layernorm;
pub mod linear;
pub mod matmul;
pub mod patchify;
pub mod pgs;
pub mod random;
pub mod rows;
#[cfg(test)]
mod testing;
