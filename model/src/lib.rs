//! CLIP with PGS masking, written over the ops of `clip-pgs-host`. So far: image preprocessing
//! as open_clip does it. The model, tokenizer, data sources and trainer come next
//! (see ../shared/docs/architecture.md).

pub mod preprocess;
