//! CLIP with PGS masking, written over the ops of `clip-pgs-host`. So far: image preprocessing
//! and the tokenizer, as open_clip does them. The model, tokenizer, data sources and trainer come next
//! (see ../shared/docs/architecture.md).

pub mod bench;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod data;
pub mod golden;
pub mod init;
pub mod optimizer;
pub mod output;
pub mod params;
pub mod preprocess;
pub mod tokenizer;
pub mod train;
