//! Ops, one file each: arguments checked, CPU reference, CUDA launcher, and the dispatch that
//! runs whichever device the buffers live on.

pub mod edge_map;
pub mod pgs;
pub mod random;
