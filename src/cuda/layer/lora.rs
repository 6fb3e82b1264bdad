//! [`GpuLoraLayer`]: the LoRA baseline on the GPU with PEFT's conventions — the GPU twin of
//! [`crate::adapter::LoraLayer`].

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{
    check_factor, download, ensure, got, mat, scratch_for, upload, upload_into, upload_matrix,
    zeros, Base, Calls,
};
use crate::adapter::{
    kaiming_uniform, param_spec, xavier_uniform, Adapter, Energy, Factors, GeneratorConfig,
    LoraConfig, LoraInit, LoraLayer, ParamSpec,
};
use crate::cuda::skinny::{check_rank, col_reduce, merge_apply, rows_fused, RowPass, View};
use crate::cuda::{Activation, CudaDevice, DeviceMatrices};
use crate::{ElraError, Result};

/// The LoRA baseline on the GPU with PEFT's conventions (Hu et al. 2022; [`crate::grad::lora`]):
/// `y = x W0ᵀ + s (x A'ᵀ) B'ᵀ`, `lora_A = A'` (r×k), `lora_B = B'` (d×r), `s = lora_alpha / r`.
/// Forward: cuBLAS, then one fused row pass adding the branch in place. Backward:
/// `∂x = ∂y W0` (cuBLAS) plus `S A'` with `S = s ∂y B'` (one fused row pass, in place),
/// `∂A' = Sᵀ x` and `∂B' = s ∂yᵀ (x A'ᵀ)` (reductions over rows). It implements [`Adapter`]
/// over [`DeviceMatrices`]; LoRA has no schedule, so the step is only recorded.
pub struct GpuLoraLayer<T: Activation> {
    base: Base<T>,
    config: LoraConfig,
    scaling: f32,
    lora_a: CudaSlice<f32>,
    lora_b: CudaSlice<f32>,
    grad_a: CudaSlice<f32>,
    grad_b: CudaSlice<f32>,
    n: usize,
    p: Option<CudaSlice<f32>>,
    s: Option<CudaSlice<f32>>,
}

gpu_layer!(GpuLoraLayer);

impl<T: Activation> GpuLoraLayer<T> {
    /// A layer on `dev` with frozen `w0` (d×k on the device) and PEFT's initialisation
    /// ([`LoraLayer::new`] in f32): `lora_A` from `config.init` seeded by `config.seed`,
    /// `lora_B = 0`.
    ///
    /// Errors: invalid config, r above [`MAX_RANK`](crate::cuda::MAX_RANK), `w0` not d×k on
    /// `dev`.
    pub fn new(dev: Arc<CudaDevice>, config: LoraConfig, w0: DeviceMatrices<T>) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let lora_a: DMatrix<f32> = match config.init {
            LoraInit::KaimingUniform => kaiming_uniform(&mut rng, config.r, config.k),
            LoraInit::XavierUniform => xavier_uniform(&mut rng, config.r, config.k),
        };
        let lora_b = DMatrix::<f32>::zeros(config.d, config.r);
        Self::from_factors(dev, config, w0, &lora_a, &lora_b)
    }

    /// A layer with given `lora_A` (r×k) and `lora_B` (d×r), scaling `lora_alpha / r`.
    ///
    /// Errors: as [`Self::new`]; factors of the wrong shape or non-finite.
    pub fn from_factors(
        dev: Arc<CudaDevice>,
        config: LoraConfig,
        w0: DeviceMatrices<T>,
        lora_a: &DMatrix<f32>,
        lora_b: &DMatrix<f32>,
    ) -> Result<Self> {
        config.validate()?;
        let (d, k, r) = (config.d, config.k, config.r);
        check_rank(r)?;
        let base = Base::new(dev, w0, d, k)?;
        check_factor("lora_a", lora_a, r, k)?;
        check_factor("lora_b", lora_b, d, r)?;
        let scaling = config.scaling() as f32;
        if !scaling.is_finite() {
            return Err(ElraError::invalid(
                "lora_alpha",
                "the scaling lora_alpha / r must be finite in f32",
            ));
        }
        let dev: &CudaDevice = &base.dev;
        Ok(GpuLoraLayer {
            lora_a: upload(dev, lora_a)?,
            lora_b: upload(dev, lora_b)?,
            grad_a: zeros(dev, r * k)?,
            grad_b: zeros(dev, d * r)?,
            base,
            config,
            scaling,
            n: 0,
            p: None,
            s: None,
        })
    }

    /// The GPU copy of a CPU [`LoraLayer`] (`W0` rounded to `T`, `lora_A`, `lora_B`).
    pub fn from_layer(dev: Arc<CudaDevice>, layer: &LoraLayer<f32>) -> Result<Self> {
        let w0 = upload_matrix::<T>(&dev, &layer.w0().map(f64::from))?;
        let config = layer.config().clone();
        Self::from_factors(dev, config, w0, layer.lora_a(), layer.lora_b())
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Device parameters `(lora_A r×k, lora_B d×r)` for an optimiser on the device; the tape
    /// is discarded.
    pub fn params_mut(&mut self) -> (&mut CudaSlice<f32>, &mut CudaSlice<f32>) {
        self.base.train.invalidate();
        (&mut self.lora_a, &mut self.lora_b)
    }

    /// Device parameters `(lora_A r×k, lora_B d×r)`, for reading.
    pub fn param_slices(&self) -> (&CudaSlice<f32>, &CudaSlice<f32>) {
        (&self.lora_a, &self.lora_b)
    }

    /// Device gradients `(∂lora_A r×k, ∂lora_B d×r)` of the last backward.
    pub fn grad_slices(&self) -> (&CudaSlice<f32>, &CudaSlice<f32>) {
        (&self.grad_a, &self.grad_b)
    }

    /// `W_out = W_in + sign·s B' A'`.
    fn apply(&self, w_in: &DeviceMatrices<T>, out: &DeviceMatrices<T>, sign: f32) -> Result<()> {
        let (d, k, r) = (self.config.d, self.config.k, self.config.r);
        merge_apply(
            &self.base.dev,
            mat(w_in),
            mat(out),
            sign * self.scaling,
            View::mat(&self.lora_b, d, r),
            View::mat(&self.lora_a, r, k),
        )
    }
}

impl<T: Activation> Adapter for GpuLoraLayer<T> {
    type Scalar = f32;
    type Matrix = DeviceMatrices<T>;

    fn name(&self) -> &'static str {
        "lora"
    }
    adapter_calls! {
        forward: "PEFT's `Linear.forward` (`x W0ᵀ + s (x A'ᵀ) B'ᵀ`); asynchronous. No dropout.",
        backward: "Reverse mode on the kept tape ([`crate::grad::lora_backward_parts`]); \
                   asynchronous.",
        merge: "`W_new = W0 + s B' A'` into `out`; asynchronous.",
        unmerge: "`W0 = W_new − s B' A'` into `out`; asynchronous.",
    }
    fn generator(&self) -> Option<&GeneratorConfig> {
        None
    }
    fn params(&self) -> Vec<ParamSpec> {
        let c = &self.config;
        vec![
            ParamSpec::factor("lora_a", c.r, c.k),
            ParamSpec::factor("lora_b", c.d, c.r),
        ]
    }
    /// Downloads `lora_A` (r×k) or `lora_B` (d×r) (synchronises).
    fn param(&self, index: usize) -> Result<DMatrix<f32>> {
        let p = param_spec(&self.params(), index)?;
        let buf = if index == 0 {
            &self.lora_a
        } else {
            &self.lora_b
        };
        download(&self.base.dev, buf, p.rows, p.cols)
    }
    fn set_param(&mut self, index: usize, value: &DMatrix<f32>) -> Result<()> {
        let p = param_spec(&self.params(), index)?;
        check_factor(p.name, value, p.rows, p.cols)?;
        let buf = if index == 0 {
            &mut self.lora_a
        } else {
            &mut self.lora_b
        };
        upload_into(&self.base.dev, value, buf)?;
        self.base.train.invalidate();
        Ok(())
    }
    /// Records the step; the tape is discarded, as for ELRA.
    fn set_step(&mut self, step: usize) -> Result<()> {
        self.base.set_step(step);
        Ok(())
    }
    /// Downloads `∂lora_A` or `∂lora_B` of the last backward (synchronises).
    fn grad(&self, index: usize) -> Result<DMatrix<f32>> {
        self.base.train.grads()?;
        let p = param_spec(&self.params(), index)?;
        let buf = if index == 0 {
            &self.grad_a
        } else {
            &self.grad_b
        };
        download(&self.base.dev, buf, p.rows, p.cols)
    }
    fn energy(&mut self) -> Result<Option<Energy>> {
        Ok(None)
    }
    /// `(B', s A')`: LoRA's update `s B'A'` as a product of two factors (synchronises).
    fn generator_factors(&self) -> Result<Vec<Factors<f32>>> {
        self.base.train.tape()?;
        let (d, k, r) = (self.config.d, self.config.k, self.config.r);
        let la = download(&self.base.dev, &self.lora_a, r, k)?;
        let lb = download(&self.base.dev, &self.lora_b, d, r)?;
        Ok(vec![(lb, la * self.scaling)])
    }
}

impl<T: Activation> Calls<T> for GpuLoraLayer<T> {
    fn grad_outputs(&self) -> Vec<(String, View<'_, f32>)> {
        let (d, k, r) = (self.config.d, self.config.k, self.config.r);
        vec![
            ("lora_a gradient".into(), View::mat(&self.grad_a, r, k)),
            ("lora_b gradient".into(), View::mat(&self.grad_b, d, r)),
        ]
    }
    fn scratch_need(&self, n: usize) -> usize {
        let (d, k, r) = (self.config.d, self.config.k, self.config.r);
        scratch_for(&[(n, d, r), (n, k, r)], &[])
    }

    /// `y = x W0ᵀ + s (x A'ᵀ) B'ᵀ` into `y` (N×d), keeping `P = x A'ᵀ`. Asynchronous.
    fn run_forward(&mut self, x: &DeviceMatrices<T>, y: &mut DeviceMatrices<T>) -> Result<()> {
        let n = x.rows();
        self.ensure_scratch(n)?;
        let (d, k, r) = (self.config.d, self.config.k, self.config.r);
        let dev: &CudaDevice = &self.base.dev;
        ensure(dev, &mut self.p, n * r)?;
        ensure(dev, &mut self.s, n * r)?;
        self.n = n;
        self.base.frozen(x, y)?;
        rows_fused(
            dev,
            &RowPass {
                input: mat(x),
                base: Some(mat(y)),
                out: Some(mat(y)),
                cm: View::mat(&self.lora_a, r, k),
                mm: None,
                m_scale: self.scaling,
                am: Some(View::mat(&self.lora_b, d, r)),
                v_out: Some(View::mat(got(&self.p)?, n, r)),
                t_out: None,
            },
        )
    }

    /// Reverse mode of the last forward ([`crate::grad::lora_backward_parts`]). Asynchronous.
    fn run_backward(
        &mut self,
        x: &DeviceMatrices<T>,
        dy: &DeviceMatrices<T>,
        dx: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        let n = self.n;
        let (d, k, r) = (self.config.d, self.config.k, self.config.r);
        let dev: &CudaDevice = &self.base.dev;
        self.base.frozen_back(dy, dx)?;
        let s = View::mat(got(&self.s)?, n, r);
        rows_fused(
            dev,
            &RowPass {
                input: mat(dy),
                base: Some(mat(dx)),
                out: Some(mat(dx)),
                cm: View::mat(&self.lora_b, d, r).t(),
                mm: None,
                m_scale: self.scaling,
                am: Some(View::mat(&self.lora_a, r, k).t()),
                v_out: None,
                t_out: Some(s),
            },
        )?;
        let scratch = got(&self.base.scratch)?;
        col_reduce(
            dev,
            mat(x),
            s,
            1.0,
            0.0,
            View::mat(&self.grad_a, r, k).t(),
            scratch,
        )?;
        col_reduce(
            dev,
            mat(dy),
            View::mat(got(&self.p)?, n, r),
            self.scaling,
            0.0,
            View::mat(&self.grad_b, d, r),
            scratch,
        )
    }

    fn run_merge(&mut self, out: &mut DeviceMatrices<T>) -> Result<()> {
        self.apply(&self.base.w0, out, 1.0)
    }

    fn run_unmerge(
        &mut self,
        w_new: &DeviceMatrices<T>,
        out: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        self.apply(w_new, out, -1.0)
    }
}
