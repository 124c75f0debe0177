//! CLIP with PGS masking, written over the device ops of `clip-pgs-host`: the model state
//! (`params`), the model (`clip`), one training step (`step`), the optimizer, checkpoints, data,
//! preprocessing and the tokenizer as open_clip has them, and the trainer (`train`).

pub mod bench;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod data;
pub mod distributed;
pub mod golden;
pub mod init;
pub mod optimizer;
pub mod output;
pub mod params;
pub mod precision;
pub mod preprocess;
pub mod step;
pub mod tokenizer;
pub mod train;
