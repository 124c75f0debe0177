//! Ops, one file each: arguments checked, CPU reference, CUDA launcher, and the dispatch that
//! runs whichever device the buffers live on.

pub mod adamw;
pub mod attention;
pub mod clip_loss;
pub mod edge_map;
pub mod gelu;
pub mod layernorm;
pub mod linear;
pub mod matmul;
pub mod pgs;
pub mod random;
#[cfg(test)]
mod testing;
