//! What every op checks before it runs: sizes (errors name the op, the tensor and the shape),
//! that every tensor lives on the device the op runs on, that the op exists there, and that the
//! CPU device, the f32 reference, gets f32 tensors.

use super::dtype::Float;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::view::{Place, View, ViewMut};

/// One op call's checks.
pub(crate) struct OpCheck<'d> {
    pub op: &'static str,
    pub device: &'d Device,
}

impl<'d> OpCheck<'d> {
    pub fn new(op: &'static str, device: &'d Device) -> Self {
        OpCheck { op, device }
    }

    /// `tensor` holds `got` values where `shape` needs `want`.
    pub fn size(&self, tensor: &str, got: usize, want: usize, shape: impl FnOnce() -> String) -> Result<()> {
        if got == want {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!("{}: {tensor} has {got} values, {} needs {want}", self.op, shape())))
    }

    /// Any other argument error, named.
    pub fn invalid(&self, what: impl std::fmt::Display) -> Error {
        Error::InvalidArgument(format!("{}: {what}", self.op))
    }

    /// Errors unless `tensor` is on the device the op runs on.
    fn place(&self, tensor: &str, place: Place) -> Result<()> {
        let device = self.device.place();
        if place != device {
            return Err(Error::WrongDevice(format!(
                "{}: {tensor} is on the {} device, the op runs on {}",
                self.op,
                place.name(),
                device.name()
            )));
        }
        Ok(())
    }

    /// The host memory of a tensor on the CPU device; on another device the op has no kernel yet.
    fn cpu_place(&self, tensor: &str, place: Place) -> Result<()> {
        self.place(tensor, place)?;
        let device = self.device.place();
        if device != Place::Cpu {
            return Err(Error::Unsupported(format!(
                "{} is not implemented on the {} device yet (the model's GPU kernels come with the GPU \
                 training step); use --device cpu",
                self.op,
                device.name()
            )));
        }
        Ok(())
    }

    /// A read-only tensor for a kernel launch, checked to be on the op's device.
    pub fn gpu<'a, T>(&self, tensor: &str, v: View<'a, T>) -> Result<View<'a, T>> {
        self.place(tensor, v.place())?;
        Ok(v)
    }

    /// A written tensor for a kernel launch, checked to be on the op's device.
    pub fn gpu_mut<'a, T>(&self, tensor: &str, v: ViewMut<'a, T>) -> Result<ViewMut<'a, T>> {
        self.place(tensor, v.place())?;
        Ok(v)
    }

    /// The host slice of a read-only tensor, on the CPU device.
    pub fn cpu<'a, T>(&self, tensor: &str, v: View<'a, T>) -> Result<&'a [T]> {
        self.cpu_place(tensor, v.place())?;
        match v {
            View::Cpu(s) => Ok(s),
            _ => unreachable!("place checked"),
        }
    }

    /// The host slice of a written tensor, on the CPU device.
    pub fn cpu_mut<'a, T>(&self, tensor: &str, v: ViewMut<'a, T>) -> Result<&'a mut [T]> {
        self.cpu_place(tensor, v.place())?;
        match v {
            ViewMut::Cpu(s) => Ok(s),
            _ => unreachable!("place checked"),
        }
    }

    /// The host values of a read-only tensor of f32 or bf16 on the CPU device, as f32: bf16 is
    /// refused (the CPU reference computes in f32).
    pub fn cpu_f32<'a, T: Float>(&self, tensor: &str, v: View<'a, T>) -> Result<&'a [f32]> {
        let values = self.cpu(tensor, v)?;
        T::as_f32(values).ok_or_else(|| self.not_f32::<T>(tensor))
    }

    /// The host values of a written tensor of f32 or bf16 on the CPU device, as f32.
    pub fn cpu_f32_mut<'a, T: Float>(&self, tensor: &str, v: ViewMut<'a, T>) -> Result<&'a mut [f32]> {
        let values = self.cpu_mut(tensor, v)?;
        T::as_f32_mut(values).ok_or_else(|| self.not_f32::<T>(tensor))
    }

    fn not_f32<T: Float>(&self, tensor: &str) -> Error {
        Error::Unsupported(format!(
            "{}: {tensor} is {}, and the cpu device computes in f32 (bf16 runs on cuda and emu)",
            self.op,
            T::NAME
        ))
    }
}
