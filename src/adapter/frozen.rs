//! [`Frozen`]: a layer without adapter, `Y = X W0ᵀ`, so that a network can mix adapted and
//! frozen layers behind one [`Adapter`] interface.

use nalgebra::DMatrix;

use super::ParamSpec;
use super::{
    check_batch, check_out, check_weight, finite_output, param_spec, Adapter, Energy, Factors,
    GeneratorConfig, HostAdapter,
};
use crate::grad::ops::{matmul, Op};
use crate::linalg::{check_finite, Real};
use crate::{ElraError, Result};

/// A frozen d×k weight with no trainable parameter: `W_new = W0`.
#[derive(Debug, Clone, PartialEq)]
pub struct Frozen<T: Real> {
    w0: DMatrix<T>,
    step: usize,
}

impl<T: Real> Frozen<T> {
    /// The frozen layer of `w0` (d×k, d, k ≥ 1, finite).
    pub fn new(w0: DMatrix<T>) -> Result<Self> {
        let (d, k) = w0.shape();
        if d == 0 || k == 0 {
            return Err(ElraError::invalid(
                "w0",
                format!("zero dimension ({d}×{k})"),
            ));
        }
        check_weight("w0", &w0, d, k)?;
        Ok(Frozen { w0, step: 0 })
    }
}

impl<T: Real> Adapter for Frozen<T> {
    type Scalar = T;
    type Matrix = DMatrix<T>;

    fn name(&self) -> &'static str {
        "frozen"
    }
    fn dims(&self) -> (usize, usize) {
        self.w0.shape()
    }
    fn w0(&self) -> &DMatrix<T> {
        &self.w0
    }
    fn set_w0(&mut self, w0: &DMatrix<T>) -> Result<()> {
        let (d, k) = self.w0.shape();
        check_weight("w0", w0, d, k)?;
        self.w0.copy_from(w0);
        Ok(())
    }
    fn generator(&self) -> Option<&GeneratorConfig> {
        None
    }
    fn params(&self) -> Vec<ParamSpec> {
        Vec::new()
    }
    fn param(&self, index: usize) -> Result<DMatrix<T>> {
        Err(param_spec(&[], index).unwrap_err())
    }
    fn set_param(&mut self, index: usize, _: &DMatrix<T>) -> Result<()> {
        Err(param_spec(&[], index).unwrap_err())
    }
    fn step(&self) -> usize {
        self.step
    }
    fn set_step(&mut self, step: usize) -> Result<()> {
        self.step = step;
        Ok(())
    }
    /// `Y = X W0ᵀ`; there is no increment for `dropout` to act on.
    fn forward(
        &mut self,
        x: &DMatrix<T>,
        _: Option<&DMatrix<T>>,
        y: &mut DMatrix<T>,
    ) -> Result<()> {
        let (d, k) = self.w0.shape();
        check_batch(x, k)?;
        check_out("y", y, x.nrows(), d)?;
        *y = finite_output("y", matmul(x, Op::N, &self.w0, Op::T))?;
        Ok(())
    }
    /// `∂X = ∂Y W0`.
    fn backward(&mut self, x: &DMatrix<T>, dy: &DMatrix<T>, dx: &mut DMatrix<T>) -> Result<()> {
        let (d, k) = self.w0.shape();
        check_out("dy", dy, x.nrows(), d)?;
        check_out("dx", dx, x.nrows(), k)?;
        check_finite("dy", dy)?;
        *dx = finite_output("dx", matmul(dy, Op::N, &self.w0, Op::N))?;
        Ok(())
    }
    fn recompute(&mut self, _: &DMatrix<T>) -> Result<()> {
        Ok(())
    }
    fn grad(&self, index: usize) -> Result<DMatrix<T>> {
        Err(param_spec(&[], index).unwrap_err())
    }
    fn merge(&mut self, out: &mut DMatrix<T>) -> Result<()> {
        let (d, k) = self.w0.shape();
        check_out("out", out, d, k)?;
        out.copy_from(&self.w0);
        Ok(())
    }
    fn unmerge(&mut self, w_new: &DMatrix<T>, out: &mut DMatrix<T>) -> Result<()> {
        let (d, k) = self.w0.shape();
        check_weight("w_new", w_new, d, k)?;
        check_out("out", out, d, k)?;
        out.copy_from(w_new);
        Ok(())
    }
    fn energy(&mut self) -> Result<Option<Energy>> {
        Ok(None)
    }
    fn generator_factors(&self) -> Result<Vec<Factors<T>>> {
        Ok(Vec::new())
    }
}

impl<T: Real> HostAdapter<T> for Frozen<T> {
    fn apply(&self, x: &DMatrix<T>) -> Result<DMatrix<T>> {
        check_batch(x, self.w0.ncols())?;
        finite_output("y", matmul(x, Op::N, &self.w0, Op::T))
    }

    fn clone_box(&self) -> Box<dyn HostAdapter<T>> {
        Box::new(self.clone())
    }
}
