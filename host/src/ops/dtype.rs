//! The element types of the GPU path's tensors, and which kernel each op launches for them.
//!
//! - [`Float`]: f32 or bf16 storage, computed in f32 (`to_f32` exact, `from_f32` rounds to
//!   nearest even, the kernels' rounding), with cuBLASLt's name for it. The CPU device is the f32
//!   reference: its ops take f32 only (`OpCheck::cpu_f32` refuses bf16 with a clear error).
//! - [`Activation`]: the activations' type T of a training step (`--dtype f32|bf16`): the entry
//!   point of every model kernel for T, chosen at compile time. Activations, features, their
//!   gradients and the weights the ops read are T; the parameter gradients the ops accumulate
//!   into, LayerNorm's statistics, the loss and its workspace are f32 whatever T is.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

use clip_pgs_kernels as kernels;
use clip_pgs_kernels::element::{Bf16, Element, Pack};
use clip_pgs_kernels::hw::{Global, GlobalMut, Kernel};

use super::edge_map::ImageElement;
use crate::cublaslt::DataType;
use crate::launch::KernelElement;
use crate::view::{View, ViewMut};

/// A stored element type computed in f32: f32 or bf16.
pub trait Float: KernelElement + DeviceRepr + ValidAsZeroBits + Default + PartialEq + std::fmt::Debug {
    /// "f32" or "bf16", for messages.
    const NAME: &'static str;
    /// Its cuBLASLt data type.
    const DATA_TYPE: DataType;
    /// Elements per 16-byte vector of the kernels (`Element::Vector`): what a thread of a
    /// vectorized kernel takes per step.
    const LANES: usize;
    /// Exact.
    fn to_f32(self) -> f32;
    /// The nearest value, ties to even (exact for f32).
    fn from_f32(x: f32) -> Self;
    /// The values as f32 when they are f32 (the CPU reference's input), None for bf16.
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
    /// `as_f32` of values to write.
    fn as_f32_mut(values: &mut [Self]) -> Option<&mut [f32]>;
    /// The view as bf16 when it is bf16 (the flash attention kernels' type), None for f32.
    fn bf16_view(v: View<'_, Self>) -> Option<View<'_, half::bf16>>;
    /// `bf16_view` of a view to write.
    fn bf16_view_mut(v: ViewMut<'_, Self>) -> Option<ViewMut<'_, half::bf16>>;
}

impl Float for f32 {
    const NAME: &'static str = "f32";
    const DATA_TYPE: DataType = DataType::F32;
    const LANES: usize = <<f32 as Element>::Vector as Pack>::LANES;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn as_f32(values: &[f32]) -> Option<&[f32]> {
        Some(values)
    }
    fn as_f32_mut(values: &mut [f32]) -> Option<&mut [f32]> {
        Some(values)
    }
    fn bf16_view(_: View<'_, f32>) -> Option<View<'_, half::bf16>> {
        None
    }
    fn bf16_view_mut(_: ViewMut<'_, f32>) -> Option<ViewMut<'_, half::bf16>> {
        None
    }
}

impl Float for half::bf16 {
    const NAME: &'static str = "bf16";
    const DATA_TYPE: DataType = DataType::Bf16;
    const LANES: usize = <<Bf16 as Element>::Vector as Pack>::LANES;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    /// The kernels' rounding (`Bf16::from_f32`), so host and device round alike.
    fn from_f32(x: f32) -> Self {
        half::bf16::from_bits(Bf16::from_f32(x).0)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    fn bf16_view(v: View<'_, Self>) -> Option<View<'_, half::bf16>> {
        Some(v)
    }
    fn bf16_view_mut(v: ViewMut<'_, Self>) -> Option<ViewMut<'_, half::bf16>> {
        Some(v)
    }
}

// The model kernels' parameter tuples, E the element type the kernel sees.
type Add<E> = Kernel<(GlobalMut<E>, Global<E>, Global<E>, u32, u32)>;
type AddAssign<E> = Kernel<(GlobalMut<E>, Global<E>, u32, u32)>;
type Fill<E> = Kernel<(GlobalMut<E>, u32, f32)>;
type Clamp<E> = Kernel<(GlobalMut<E>, u32, f32, f32)>;
type Gelu<E> = Kernel<(GlobalMut<E>, Global<E>, u32)>;
type GeluBackward<E> = Kernel<(GlobalMut<E>, Global<E>, Global<E>, u32)>;
type LayerNorm<E> = Kernel<(GlobalMut<E>, GlobalMut<f32>, GlobalMut<f32>, Global<E>, Global<E>, Global<E>, u32, u32)>;
type AddLayerNorm<E> = Kernel<(
    GlobalMut<E>,
    GlobalMut<E>,
    GlobalMut<f32>,
    GlobalMut<f32>,
    Global<E>,
    Global<E>,
    Global<E>,
    Global<E>,
    u32,
    u32,
)>;
type LayerNormBackward<E> =
    Kernel<(GlobalMut<E>, Global<E>, Global<E>, Global<f32>, Global<f32>, Global<E>, u32, u32, u32)>;
type LayerNormParamGrads<E> =
    Kernel<(GlobalMut<f32>, GlobalMut<f32>, Global<E>, Global<E>, Global<f32>, Global<f32>, u32, u32)>;
type Softmax<E> = Kernel<(GlobalMut<E>, Global<u32>, u32, u32, u32, u32, f32)>;
type SoftmaxBackward<E> = Kernel<(GlobalMut<E>, Global<E>, u32, u32, f32)>;
type L2Normalize<E> = Kernel<(GlobalMut<f32>, GlobalMut<f32>, Global<E>, u32, u32)>;
type L2NormalizeBackward<E> = Kernel<(GlobalMut<E>, Global<f32>, Global<f32>, Global<f32>, u32, u32)>;
type EmbeddingForward<E> = Kernel<(GlobalMut<E>, Global<u32>, Global<E>, Global<E>, u32, u32, u32, u32)>;
type EmbeddingBackwardPos<E> = Kernel<(GlobalMut<f32>, Global<E>, u32, u32)>;
type EmbeddingBackwardTable<E> = Kernel<(GlobalMut<f32>, Global<E>, Global<u32>, u32, u32, u32)>;
type Patchify<E> = Kernel<(GlobalMut<E>, Global<E>, u32, u32, u32)>;
type Rows<E> = Kernel<(GlobalMut<E>, Global<E>, Global<u32>, u32, u32, u32)>;
type GatherBackward<E> =
    Kernel<(GlobalMut<E>, GlobalMut<f32>, GlobalMut<f32>, Global<E>, Global<u32>, Global<u32>, u32, u32, u32, u32)>;

/// Declares `Activation` with one constant per kernel and implements it for f32 and bf16 from
/// the pair of entry points of each kernel: the list below is the whole mapping.
macro_rules! activation {
    ($($(#[$doc:meta])* $name:ident: $ty:ident = $module:ident::{$f32:ident, $bf16:ident},)*) => {
        /// The activations' element type of the GPU path (f32 or bf16), with the entry point of
        /// each model kernel for it. The PGS kernels read the patch embedding in it too
        /// ([`ImageElement`]).
        pub trait Activation: ImageElement {
            $($(#[$doc])* const $name: $ty<Self::Kernel>;)*
        }

        impl Activation for f32 {
            $(const $name: $ty<Self::Kernel> = kernels::$module::$f32;)*
        }

        impl Activation for half::bf16 {
            $(const $name: $ty<Self::Kernel> = kernels::$module::$bf16;)*
        }
    };
}

activation! {
    ADD: Add = elementwise::{add_f32, add_bf16},
    ADD_ASSIGN: AddAssign = elementwise::{add_assign_f32, add_assign_bf16},
    FILL: Fill = elementwise::{fill_f32, fill_bf16},
    CLAMP: Clamp = elementwise::{clamp_f32, clamp_bf16},
    GELU: Gelu = gelu::{gelu_f32, gelu_bf16},
    GELU_BACKWARD: GeluBackward = gelu::{gelu_backward_f32, gelu_backward_bf16},
    LAYERNORM_FORWARD: LayerNorm = layernorm::{layernorm_forward_f32, layernorm_forward_bf16},
    ADD_LAYERNORM_FORWARD: AddLayerNorm = layernorm::{add_layernorm_forward_f32, add_layernorm_forward_bf16},
    LAYERNORM_BACKWARD: LayerNormBackward = layernorm::{layernorm_backward_f32, layernorm_backward_bf16},
    LAYERNORM_PARAM_GRADS: LayerNormParamGrads = layernorm::{layernorm_param_grads_f32, layernorm_param_grads_bf16},
    ATTENTION_SOFTMAX: Softmax = attention::{attention_softmax_f32, attention_softmax_bf16},
    ATTENTION_SOFTMAX_BACKWARD: SoftmaxBackward =
        attention::{attention_softmax_backward_f32, attention_softmax_backward_bf16},
    L2_NORMALIZE: L2Normalize = clip_loss::{l2_normalize_f32, l2_normalize_bf16},
    L2_NORMALIZE_BACKWARD: L2NormalizeBackward = clip_loss::{l2_normalize_backward_f32, l2_normalize_backward_bf16},
    EMBEDDING_FORWARD: EmbeddingForward = embedding::{embedding_forward_f32, embedding_forward_bf16},
    EMBEDDING_BACKWARD_POS: EmbeddingBackwardPos = embedding::{embedding_backward_pos_f32, embedding_backward_pos_bf16},
    EMBEDDING_BACKWARD_TABLE: EmbeddingBackwardTable =
        embedding::{embedding_backward_table_f32, embedding_backward_table_bf16},
    PATCHIFY: Patchify = patchify::{patchify_f32, patchify_bf16},
    GATHER_ROWS: Rows = rows::{gather_rows_f32, gather_rows_bf16},
    SCATTER_ROWS: Rows = rows::{scatter_rows_f32, scatter_rows_bf16},
    GATHER_BACKWARD: GatherBackward = gather::{pgs_gather_backward_f32, pgs_gather_backward_bf16},
}
