//! The training precision (`--dtype f32|bf16`): the activations' element type T of the GPU path.
//! f32: the model reads its f32 master weights directly. bf16: it reads a bf16 copy of them, which
//! AdamW rewrites in the same pass as the update (and a cast makes at the start); gradients,
//! AdamW's moments, LayerNorm's statistics and the loss stay f32 either way. The CPU device is
//! the f32 reference: bf16 runs on cuda and emu.

use std::fmt;
use std::str::FromStr;

use clip_pgs_host::ops::cast::cast;
use clip_pgs_host::ops::dtype::{Activation, Float};
use clip_pgs_host::{Buffer, Device, View, ViewMut, bf16};
use serde::{Deserialize, Serialize};

/// The activations' element type, as a flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
}

impl FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Dtype::F32),
            "bf16" => Ok(Dtype::Bf16),
            _ => Err(format!("unknown dtype '{s}': expected f32 or bf16")),
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        })
    }
}

/// An activation type the model trains in: where its weights come from.
pub trait Precision: Activation {
    const DTYPE: Dtype;
    /// `clip-pgs parity`'s bounds in this precision, max-norm-relative: (features, logits, loss
    /// and the AdamW losses; every gradient).
    const PARITY_BOUNDS: (f32, f32);
    /// The weights the ops read: the f32 master weights, or their copy in this type.
    fn weights<'a>(master: &'a Buffer<f32>, copy: Option<&'a Buffer<Self>>) -> &'a Buffer<Self>;
    /// The copy as the bf16 buffer AdamW writes (None for f32: no copy).
    fn as_bf16(copy: &mut Buffer<Self>) -> Option<&mut Buffer<bf16>>;
    /// Host f32 values in this type: f32 as they are; bf16 rounded into the start of `staging`.
    fn stage<'a>(values: &'a [f32], staging: &'a mut [Self]) -> &'a [Self];
    /// dst ← src in f32, on the device (f32: a copy).
    fn widen(device: &Device, dst: ViewMut<f32>, src: View<Self>) -> clip_pgs_host::Result<()>;
    /// dst ← src in this type, on the device (f32: a copy; bf16 rounds).
    fn narrow(device: &Device, dst: ViewMut<Self>, src: View<f32>) -> clip_pgs_host::Result<()>;
}

impl Precision for f32 {
    const DTYPE: Dtype = Dtype::F32;
    const PARITY_BOUNDS: (f32, f32) = (1e-4, 1e-3);
    fn weights<'a>(master: &'a Buffer<f32>, _: Option<&'a Buffer<f32>>) -> &'a Buffer<f32> {
        master
    }
    fn as_bf16(_: &mut Buffer<f32>) -> Option<&mut Buffer<bf16>> {
        None
    }
    fn stage<'a>(values: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        values
    }
    fn widen(device: &Device, dst: ViewMut<f32>, src: View<f32>) -> clip_pgs_host::Result<()> {
        device.copy(dst, src)
    }
    fn narrow(device: &Device, dst: ViewMut<f32>, src: View<f32>) -> clip_pgs_host::Result<()> {
        device.copy(dst, src)
    }
}

impl Precision for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    /// The bf16 bounds: 3e-2 on features, logits and loss, 5e-2 on gradients.
    const PARITY_BOUNDS: (f32, f32) = (3e-2, 5e-2);
    fn weights<'a>(_: &'a Buffer<f32>, copy: Option<&'a Buffer<bf16>>) -> &'a Buffer<bf16> {
        copy.expect("a bf16 model keeps a bf16 copy of its weights")
    }
    fn as_bf16(copy: &mut Buffer<bf16>) -> Option<&mut Buffer<bf16>> {
        Some(copy)
    }
    fn stage<'a>(values: &'a [f32], staging: &'a mut [bf16]) -> &'a [bf16] {
        let staging = &mut staging[..values.len()];
        staging.iter_mut().zip(values).for_each(|(s, &v)| *s = Float::from_f32(v));
        staging
    }
    fn widen(device: &Device, dst: ViewMut<f32>, src: View<bf16>) -> clip_pgs_host::Result<()> {
        cast(device, dst, src)
    }
    fn narrow(device: &Device, dst: ViewMut<bf16>, src: View<f32>) -> clip_pgs_host::Result<()> {
        cast(device, dst, src)
    }
}
