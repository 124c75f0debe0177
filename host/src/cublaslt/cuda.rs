//! cuBLASLt on the `cuda` device through cudarc's raw layer (its safe wrapper lacks the
//! training epilogues): one handle and one workspace per GPU (32 MiB on Hopper and newer, 4 MiB
//! before, NVIDIA's recommendation), and per distinct matmul (ops, layouts with their element
//! types, epilogue) a plan — the matmul descriptor, the three layouts and the heuristic's
//! algorithm — made once and reused, so a training step makes no descriptor and runs no heuristic
//! after its first.
//! Pointers (A, B, D, bias, aux) are per call: the epilogue's are set on the cached descriptor.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result::{self, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream};

use super::{DataType, Epilogue, Layout, Matmul, Op};
use crate::error::{CudaContextExt, Error, Result};
use crate::ops::dtype::Float;
use crate::view::{Place, View, ViewMut};

/// What a plan depends on (the layouts carry the element types).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    op_a: Op,
    op_b: Op,
    a: Layout,
    b: Layout,
    d: Layout,
    epilogue: u32,
    /// The epilogue reads or writes a bias vector.
    bias: bool,
    aux_ld: usize,
}

/// cuBLASLt's name of an element type.
fn cuda_type(t: DataType) -> sys::cudaDataType_t {
    match t {
        DataType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DataType::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
    }
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

pub struct CublasLt {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<Key, Plan>>,
}

// SAFETY: the handle and the plans' descriptors are used under the `plans` lock, on one stream.
unsafe impl Send for CublasLt {}
// SAFETY: as above.
unsafe impl Sync for CublasLt {}

fn blas(during: &str) -> impl FnOnce(CublasError) -> Error + '_ {
    move |e| Error::InvalidArgument(format!("cuBLASLt failed while {during}: {e}"))
}

impl CublasLt {
    pub fn new(stream: Arc<CudaStream>, compute_capability: (i32, i32)) -> Result<CublasLt> {
        // SAFETY: only tries to dlopen libcublasLt; cudarc would panic at the first call without it.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::CudaUnavailable("the cuBLASLt library (libcublasLt.so) was not found".into()));
        }
        let handle = result::create_handle().map_err(blas("creating a handle"))?;
        let bytes = if compute_capability.0 >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = stream.alloc_zeros::<u8>(bytes).during("allocating the cuBLASLt workspace")?;
        Ok(CublasLt { handle, stream, workspace, plans: Mutex::new(HashMap::new()) })
    }

    pub(super) fn matmul<AB: Float, D: Float>(
        &self,
        mm: &Matmul,
        a: View<AB>,
        b: View<AB>,
        d: ViewMut<D>,
        epilogue: Epilogue<D>,
    ) -> Result<()> {
        let (epilogue_id, aux_ld) = match &epilogue {
            Epilogue::Default => (sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT, 0),
            Epilogue::Bias(_) => (sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS, 0),
            Epilogue::GeluAuxBias { ld, .. } => (sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_AUX_BIAS, *ld),
            Epilogue::DGelu { ld, .. } => (sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DGELU, *ld),
            Epilogue::BGradB(_) => (sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB, 0),
        };
        let bias = matches!(epilogue, Epilogue::Bias(_) | Epilogue::GeluAuxBias { .. } | Epilogue::BGradB(_));
        let (op_a, op_b, epilogue_id) = (mm.op_a, mm.op_b, epilogue_id as u32);
        let key = Key { op_a, op_b, a: mm.a, b: mm.b, d: mm.d, epilogue: epilogue_id, bias, aux_ld };
        let (a, b, d) = (
            address(a.place(), a.cuda_address())?,
            address(b.place(), b.cuda_address())?,
            address(d.place(), d.cuda_address())?,
        );
        let (bias, aux) = match epilogue {
            Epilogue::Default => (None, None),
            Epilogue::Bias(bias) => (Some(address(bias.place(), bias.cuda_address())?), None),
            Epilogue::GeluAuxBias { bias, aux, .. } => {
                (Some(address(bias.place(), bias.cuda_address())?), Some(address(aux.place(), aux.cuda_address())?))
            }
            Epilogue::DGelu { aux, .. } => (None, Some(address(aux.place(), aux.cuda_address())?)),
            Epilogue::BGradB(bias) => (Some(address(bias.place(), bias.cuda_address())?), None),
        };
        let mut plans = self.plans.lock().expect("cuBLASLt plan lock");
        let plan = match plans.get(&key) {
            Some(plan) => plan,
            None => {
                let plan = self.plan(&key)?;
                plans.entry(key).or_insert(plan)
            }
        };
        // SAFETY: the descriptor is alive (owned by the plan); the attributes' sizes are theirs.
        unsafe {
            if let Some(bias) = bias {
                set_desc(plan.desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
            }
            if let Some(aux) = aux {
                set_desc(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                    &aux,
                )?;
            }
        }
        let (alpha, beta) = (mm.alpha, mm.beta);
        let [la, lb, ld] = plan.layouts;
        let workspace = address_of(&self.workspace);
        // SAFETY: the views hold their layouts' spans in their element types (checked by
        // `super::matmul`); C = D in place with D's layout, as cuBLASLt allows; α and β are f32
        // host scalars (the scale type; the default pointer mode).
        unsafe {
            result::matmul(
                self.handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                a as *const c_void,
                la,
                b as *const c_void,
                lb,
                d as *const c_void,
                ld,
                d as *mut c_void,
                ld,
                &plan.algo,
                workspace as *mut c_void,
                self.workspace.len(),
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(blas("running a matmul"))
    }

    /// The descriptor, layouts and heuristic's best algorithm for `key` (f32 compute and scale;
    /// each layout in its element type; the epilogue's vectors in D's).
    fn plan(&self, key: &Key) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as Attr;
        let scale_type = sys::cudaDataType_t::CUDA_R_32F;
        let desc = result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, scale_type)
            .map_err(blas("creating a matmul descriptor"))?;
        let layout = |l: Layout| -> Result<sys::cublasLtMatrixLayout_t> {
            let handle = result::create_matrix_layout(cuda_type(l.dtype), l.rows as u64, l.cols as u64, l.ld as i64)
                .map_err(blas("creating a matrix layout"))?;
            if l.batch > 1 {
                use sys::cublasLtMatrixLayoutAttribute_t as L;
                let (count, stride) = (l.batch as i32, l.stride as i64);
                // SAFETY: a live layout; the values have the attributes' types.
                unsafe {
                    result::set_matrix_layout_attribute(
                        handle,
                        L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&count as *const i32).cast(),
                        4,
                    )
                    .and_then(|()| {
                        result::set_matrix_layout_attribute(
                            handle,
                            L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                            (&stride as *const i64).cast(),
                            8,
                        )
                    })
                    .map_err(blas("setting a layout's batch"))?;
                }
            }
            Ok(handle)
        };
        let op = |op: Op| -> u32 {
            match op {
                Op::N => 0,
                Op::T => 1,
            }
        };
        let aux_ld = key.aux_ld as i64;
        // The defaults (D's type), set explicitly: an int32_t cudaDataType each.
        let vector_type = cuda_type(key.d.dtype) as i32;
        // SAFETY: a live descriptor; every value has its attribute's type and size.
        unsafe {
            set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSA, &op(key.op_a))?;
            set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSB, &op(key.op_b))?;
            set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, &key.epilogue)?;
            if key.bias {
                set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &vector_type)?;
            }
            if key.aux_ld > 0 {
                set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld)?;
                set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, &vector_type)?;
            }
        }
        let layouts = [layout(key.a)?, layout(key.b)?, layout(key.d)?];
        let pref = result::create_matmul_pref().map_err(blas("creating a matmul preference"))?;
        let bytes = self.workspace.len() as u64;
        // SAFETY: live descriptors of this handle; the preference's value is a u64.
        let heuristic = unsafe {
            result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&bytes as *const u64).cast(),
                8,
            )
            .and_then(|()| {
                result::get_matmul_algo_heuristic(
                    self.handle,
                    desc,
                    layouts[0],
                    layouts[1],
                    layouts[2],
                    layouts[2],
                    pref,
                )
            })
        };
        // SAFETY: the preference is not used again.
        let _ = unsafe { result::destroy_matmul_pref(pref) };
        let heuristic = heuristic.map_err(blas("finding an algorithm (no cuBLASLt kernel supports this matmul)"))?;
        Ok(Plan { desc, layouts, algo: heuristic.algo })
    }
}

impl Drop for CublasLt {
    fn drop(&mut self) {
        let plans = self.plans.get_mut().map(std::mem::take).unwrap_or_default();
        // SAFETY: nothing uses the descriptors or the handle after this; failures cannot be acted on.
        unsafe {
            for plan in plans.into_values() {
                let _ = result::destroy_matmul_desc(plan.desc);
                for layout in plan.layouts {
                    let _ = result::destroy_matrix_layout(layout);
                }
            }
            let _ = result::destroy_handle(self.handle);
        }
    }
}

/// # Safety
/// `desc` is live and T is the attribute's type.
unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { result::set_matmul_desc_attribute(desc, attr, (value as *const T).cast(), std::mem::size_of::<T>()) }
        .map_err(blas("setting a matmul attribute"))
}

/// A device view's address, or an error naming the device it is on.
fn address(place: Place, address: Option<u64>) -> Result<u64> {
    match address {
        Some(address) => Ok(address),
        None => Err(Error::WrongDevice(format!("cuBLASLt on cuda: an operand is on the {} device", place.name()))),
    }
}

fn address_of(buffer: &CudaSlice<u8>) -> u64 {
    use cudarc::driver::DevicePtr;
    let (ptr, _sync) = buffer.device_ptr(buffer.stream());
    ptr
}
