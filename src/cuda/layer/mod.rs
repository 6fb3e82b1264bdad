//! The adapters on the GPU, mirroring [`crate::adapter`]: ELRA (general, PSD, Hyb with any α,
//! [`GpuElraLayer`]), double-sided ELRA ([`GpuDoubleSidedLayer`]) and the LoRA baseline
//! ([`GpuLoraLayer`]), with activations and `W0` in f32, f16 or bf16 ([`Activation`]) and
//! parameters, r×r matrices and gradients in f32. Each implements [`Adapter`] over
//! [`DeviceMatrices`] (and [`GpuAdapter`]), owning its device, configuration, step, tape and
//! gradients, as the CPU layers do over host matrices.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | what every layer holds (`Base`: device, `W0`, step, tape key, recompute buffer, reduction scratch) and the [`Adapter`] call protocol they share (`Calls`: checks, tape key, gradients-ready state; the `adapter_calls!` methods of every `impl Adapter`; [`GpuAdapter`] for every layer); the route cost model; buffer helpers |
//! | `generator.rs` | one generator on the device (`Gen`: factors, `C` of eq. 19, Grams, gradients, the row and weight passes of `exp(±AC)`), the batched r×r work of a layer's generators (`Generators`) and the [`Adapter`] methods of the two ELRA layers (`GenCalls`, `generator_calls!`) |
//! | `elra.rs`, `double.rs`, `lora.rs` | the three layers: their buffers, the device work of each call (their `Calls` impls), and the rest of their [`Adapter`] impls |
//!
//! # One step on the device
//! Parameters, tapes and gradients live in device buffers owned by the layer; a step enqueues
//! kernels on the device's stream and copies nothing to the host. Per optimiser step
//! (Algorithm 1 lines 4–5, run by the first forward, merge or unmerge after a change): `Cᵀ = η m (αA + (1−α)Bᵀ)` (eq. 19),
//! `Z = C A` (r×r), the Grams `S = AᵀA`, `K = CCᵀ` (eq. 21) when λ > 0, then one batched launch
//! of the Padé `φ1` kernel for every generator of the layer (both sides of a double-sided layer
//! when their ranks agree). Kernel statuses stay on the device; failed r×r matrices come out as
//! NaN, and `check_status` (which synchronises; also run by [`Adapter::grad`]) names them.
//!
//! # Two exact routes ([`Route`])
//! * **Woodbury** (eq. 5): `u = x W0ᵀ` (cuBLAS), then one fused pass over the rows of `u`:
//!   `v = C u`, `t = M v`, `y = u + A t`. Backward: one fused pass over `∂y` gives
//!   `T̄ = ∂y A`, `V̄ = T̄ M` and `ū = ∂y + V̄ C`; `∂x = ū W0` (cuBLAS); two reductions over
//!   rows give `Ā = ∂yᵀ T` and `C̄ = V̄ᵀ u`; `M̄ = T̄ᵀ V` (N×r data).
//! * **Merged** (eq. 30): `P = C W0` (one pass over `W0`), `Q = A M` (d×r),
//!   `W_eff = W0 + Q P` (one pass), `y = x W_effᵀ` (cuBLAS). Backward never forms the dense
//!   `∂W = ∂yᵀ x`: `∂x = ∂y W_eff` (cuBLAS), `s = ∂y Q` and `v = x Pᵀ` (row passes),
//!   `Q̄ = ∂yᵀ v` and `∂P = sᵀ x` (reductions over rows), `C̄ = ∂P W0ᵀ` (a pass over `W0`),
//!   `Ā = Q̄ Mᵀ`, `M̄ = Aᵀ Q̄`.
//!
//! Both then take `Z̄ = L_φ1(Zᵀ, M̄)` (one batched adjoint launch), `Ā += Cᵀ Z̄`,
//! `C̄ += Z̄ Aᵀ`, the energy gradient (eq. 20–21) and the chain through eq. (19) to `(∂A, ∂B, ∂η)`
//! ([`crate::grad::FactorChain::backward`]). [`route_cost`] estimates both routes from the bytes
//! they move and the launches they make; [`choose_route`] picks the cheaper.
//!
//! # The overflow rule, on request
//! The CPU layers return [`ElraError::Overflow`] when finite inputs give a non-finite output.
//! On the GPU that scan costs one more read of each output and a host wait, so it is opt-in:
//! [`GpuAdapter::set_check_finite`] (default off) makes forward (`y`), backward (`∂x` and every
//! parameter gradient), merge (`w_new`) and unmerge (`w0`) scan their outputs (`cuda/finite.cu`),
//! synchronise and name the first non-finite one. Off, nothing is scanned and the calls stay
//! asynchronous.
//!
//! # Not supported on the GPU (typed errors)
//! The spectral clip τ of App. H (its exact derivative needs an r×r SVD on the device: use
//! `tau = None`, or clip on the host between steps;
//! [`GeneratorSpec::require_no_clip`](crate::adapter::GeneratorSpec::require_no_clip)), dropout
//! masks, and ranks above [`MAX_RANK`](crate::cuda::MAX_RANK).
#![allow(non_snake_case)]

/// The [`Adapter`] methods every GPU layer shares, expanded inside its `impl Adapter`: the shape,
/// `W0` and step of `Base`, and forward, backward, recompute, merge and unmerge through the
/// `Calls` protocol (argument checks and the tape key around the layer's device work). The
/// literals document the four calls whose equations differ by layer.
macro_rules! adapter_calls {
    (forward: $fwd:literal, backward: $bwd:literal, merge: $merge:literal, unmerge: $unmerge:literal $(,)?) => {
        fn dims(&self) -> (usize, usize) {
            self.base.dims()
        }
        fn w0(&self) -> &$crate::cuda::DeviceMatrices<T> {
            &self.base.w0
        }
        /// Copies `w0` (d×k on the layer's device; not scanned for NaN) into the layer's `W0`.
        fn set_w0(&mut self, w0: &$crate::cuda::DeviceMatrices<T>) -> $crate::Result<()> {
            self.base.set_w0(w0)
        }
        fn step(&self) -> usize {
            self.base.step
        }
        #[doc = $fwd]
        fn forward(
            &mut self,
            x: &$crate::cuda::DeviceMatrices<T>,
            dropout: Option<&$crate::cuda::DeviceMatrices<T>>,
            y: &mut $crate::cuda::DeviceMatrices<T>,
        ) -> $crate::Result<()> {
            $crate::cuda::layer::Calls::checked_forward(self, x, dropout, y)
        }
        #[doc = $bwd]
        fn backward(
            &mut self,
            x: &$crate::cuda::DeviceMatrices<T>,
            dy: &$crate::cuda::DeviceMatrices<T>,
            dx: &mut $crate::cuda::DeviceMatrices<T>,
        ) -> $crate::Result<()> {
            $crate::cuda::layer::Calls::checked_backward(self, x, dy, dx)
        }
        fn recompute(&mut self, x: &$crate::cuda::DeviceMatrices<T>) -> $crate::Result<()> {
            $crate::cuda::layer::Calls::checked_recompute(self, x)
        }
        #[doc = $merge]
        fn merge(&mut self, out: &mut $crate::cuda::DeviceMatrices<T>) -> $crate::Result<()> {
            $crate::cuda::layer::Calls::checked_merge(self, out)
        }
        #[doc = $unmerge]
        fn unmerge(
            &mut self,
            w_new: &$crate::cuda::DeviceMatrices<T>,
            out: &mut $crate::cuda::DeviceMatrices<T>,
        ) -> $crate::Result<()> {
            $crate::cuda::layer::Calls::checked_unmerge(self, w_new, out)
        }
    };
}

/// The [`Adapter`] methods of the two ELRA layers, expanded inside their `impl Adapter`: the
/// generator settings, parameters, step, gradients, energy and factors of their `Generators`,
/// through the `GenCalls` methods of `generator.rs`.
macro_rules! generator_calls {
    () => {
        fn generator(&self) -> Option<&$crate::adapter::GeneratorConfig> {
            Some(GenCalls::generator_config(self))
        }
        fn params(&self) -> Vec<$crate::adapter::ParamSpec> {
            self.gens.params()
        }
        /// Downloads parameter `index` (synchronises).
        fn param(&self, index: usize) -> $crate::Result<nalgebra::DMatrix<f32>> {
            self.gen_param(index)
        }
        /// Uploads parameter `index` (ordered on the device's stream); the r×r work is redone.
        fn set_param(
            &mut self,
            index: usize,
            value: &nalgebra::DMatrix<f32>,
        ) -> $crate::Result<()> {
            self.gen_set_param(index, value)
        }
        /// `config.generator.spec_at(step)` without the clip, for every generator of the layer
        /// (eq. 19, eq. 75, App. H).
        fn set_step(&mut self, step: usize) -> $crate::Result<()> {
            self.gen_set_step(step)
        }
        /// Downloads the gradient (synchronises) after checking the r×r statuses of the step.
        fn grad(&self, index: usize) -> $crate::Result<nalgebra::DMatrix<f32>> {
            self.gen_grad(index)
        }
        /// `‖G‖²_F = tr((AᵀA)(CCᵀ))` from r×r Grams (eq. 21), summed over the layer's generators
        /// (double-sided: `‖L‖²_F + ‖R‖²_F`), and `λ‖G‖²_F` (eq. 20); synchronises.
        fn energy(&mut self) -> $crate::Result<Option<$crate::adapter::Energy>> {
            self.gen_energy()
        }
        /// `(A, C)` of every generator of the last forward (double-sided: left, then right;
        /// synchronises).
        fn generator_factors(&self) -> $crate::Result<Vec<$crate::adapter::Factors<f32>>> {
            self.gen_factors()
        }
    };
}

/// The plumbing of a layer type `$layer<T>` (fields `base`, `config`, and `gens` with
/// `generators`): its [`LayerParts`], its `Debug` (dtype, config, step, the `extra` fields, tape)
/// and, with `generators`, its `GenCalls` accessors and the statuses of its r×r launches (its
/// `check_status`).
macro_rules! gpu_layer {
    ($layer:ident, generators $(, extra: $($field:ident),+)?) => {
        gpu_layer!(@parts $layer, [
            fn statuses(&self) -> $crate::Result<()> {
                self.check_status()
            }
        ] $(, extra: $($field),+)?);
        impl<T: Activation> $crate::cuda::layer::generator::GenCalls<T> for $layer<T> {
            fn gens(&self) -> &$crate::cuda::layer::generator::Generators {
                &self.gens
            }
            fn parts_mut(
                &mut self,
            ) -> (
                &$crate::cuda::layer::Base<T>,
                &mut $crate::cuda::layer::generator::Generators,
            ) {
                (&self.base, &mut self.gens)
            }
            fn generator_config(&self) -> &$crate::adapter::GeneratorConfig {
                &self.config.generator
            }
        }
    };
    ($layer:ident) => {
        gpu_layer!(@parts $layer, []);
    };
    (@parts $layer:ident, [$($statuses:tt)*] $(, extra: $($field:ident),+)?) => {
        impl<T: Activation> $crate::cuda::layer::LayerParts<T> for $layer<T> {
            fn base(&self) -> &$crate::cuda::layer::Base<T> {
                &self.base
            }
            fn base_mut(&mut self) -> &mut $crate::cuda::layer::Base<T> {
                &mut self.base
            }
            $($statuses)*
        }
        impl<T: Activation> std::fmt::Debug for $layer<T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($layer))
                    .field("dtype", &T::DTYPE)
                    .field("config", &self.config)
                    .field("step", &self.base.step)
                    $($(.field(stringify!($field), &self.$field))+)?
                    .field("tape", &self.base.train)
                    .finish()
            }
        }
    };
}

mod double;
mod elra;
mod generator;
mod lora;

pub use double::GpuDoubleSidedLayer;
pub use elra::GpuElraLayer;
pub use lora::GpuLoraLayer;

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use nalgebra::DMatrix;

use generator::{check_factor, GenCalls, Generators, RowsTape, RrBatch, SideInit};

use super::skinny::{check_finite, col_reduce_scratch, View};
use super::{gemm, Activation, CudaDevice, DeviceMatrices, Transpose};
use crate::adapter::{Adapter, GeneratorConfig, GeneratorSpec, InputKey, TrainState};
use crate::grad::Route;
use crate::{ElraError, Result};

/// An [`Adapter`] on the GPU: parameters and gradients as host f32 matrices, `W0` and
/// activations as device matrices of `T` (`Box<dyn GpuAdapter<T>>` is what the C ABI holds).
pub trait GpuAdapter<T: Activation>: Adapter<Scalar = f32, Matrix = DeviceMatrices<T>> {
    /// The device the layer lives on (every call is ordered on its stream).
    fn device(&self) -> &Arc<CudaDevice>;

    /// Blocks until all work enqueued on the device's stream has run, then reports deferred
    /// errors: an asynchronous CUDA fault, or a failure of the r×r matrix functions of the last
    /// step (φ1, its adjoint, `φ1(−Z)` of an unmerge; Prop. 1, Al-Mohy & Higham 2009).
    fn synchronize(&self) -> Result<()>;

    /// Turns the overflow rule on or off for the layer's outputs (default off). The CPU layers
    /// always apply it (finite inputs with a non-finite output are [`ElraError::Overflow`]); on
    /// the GPU it is opt-in, because it costs one more read of each output and a host wait.
    /// When on, forward (`y`), backward (`∂x` and every parameter gradient), merge (`w_new`) and
    /// unmerge (`w0`) scan their outputs for NaN/±Inf (`cuda/finite.cu`), synchronise the
    /// device's stream and return [`ElraError::Overflow`] naming the first non-finite output; a
    /// forward or backward that fails the check leaves no tape and no gradients. Inputs are not
    /// scanned, so a non-finite input shows up as a non-finite output.
    fn set_check_finite(&mut self, on: bool);

    /// Whether the layer scans its outputs ([`Self::set_check_finite`]).
    fn checks_finite(&self) -> bool;
}

// ---------------------------------------------------------------------------------------------
// What every layer holds, and the Adapter call protocol they share
// ---------------------------------------------------------------------------------------------

/// What every GPU layer holds besides its parameters and work buffers: the device, the frozen
/// weight `W0` (d×k), the optimiser step, the input key of the last forward and whether a
/// backward ran (no data: the tapes are the layer's own device buffers), the output buffer
/// of [`Adapter::recompute`] and the f32 scratch of the column reductions (and φ1 work).
struct Base<T: Activation> {
    dev: Arc<CudaDevice>,
    w0: DeviceMatrices<T>,
    step: usize,
    train: TrainState<(), ()>,
    y_scratch: Option<DeviceMatrices<T>>,
    /// Grown to [`Calls::scratch_need`] by [`Calls::ensure_scratch`], never shrunk.
    scratch: Option<CudaSlice<f32>>,
    /// Whether the outputs are scanned ([`GpuAdapter::set_check_finite`]).
    check_finite: bool,
    /// One u32 flag per scanned output of a call (grown on demand).
    flags: Option<CudaSlice<u32>>,
}

impl<T: Activation> Base<T> {
    /// Checks `w0` (one d×k matrix on `dev`); step 0, no tape.
    fn new(dev: Arc<CudaDevice>, w0: DeviceMatrices<T>, d: usize, k: usize) -> Result<Self> {
        check_act(&dev, "w0", &w0, Some(d), k)?;
        Ok(Base {
            dev,
            w0,
            step: 0,
            train: TrainState::default(),
            y_scratch: None,
            scratch: None,
            check_finite: false,
            flags: None,
        })
    }

    /// A generator layer's `Base` at `step` and the spec of that step (`spec_at(step)` without
    /// the clip, which the GPU does not have; eq. 19, eq. 75, App. H).
    fn at_step(
        dev: Arc<CudaDevice>,
        w0: DeviceMatrices<T>,
        (d, k): (usize, usize),
        generator: &GeneratorConfig,
        step: usize,
    ) -> Result<(Self, GeneratorSpec)> {
        let spec = generator.spec_at(step).require_no_clip()?;
        let mut base = Base::new(dev, w0, d, k)?;
        base.step = step;
        Ok((base, spec))
    }

    /// `(d, k)` of `W0`.
    fn dims(&self) -> (usize, usize) {
        (self.w0.rows(), self.w0.cols())
    }

    /// Checks an activation or weight argument on the layer's device with `cols` columns (and
    /// `rows` rows when given); returns its rows.
    fn check(
        &self,
        arg: &'static str,
        m: &DeviceMatrices<T>,
        rows: Option<usize>,
        cols: usize,
    ) -> Result<usize> {
        check_act(&self.dev, arg, m, rows, cols)
    }

    /// [`Adapter::set_w0`]: copies `w0` (d×k on the layer's device; not scanned for NaN) into
    /// the layer's `W0` and discards the tape.
    fn set_w0(&mut self, w0: &DeviceMatrices<T>) -> Result<()> {
        let (d, k) = self.dims();
        self.check("w0", w0, Some(d), k)?;
        self.w0.copy_from(&self.dev, w0)?;
        self.train.invalidate();
        Ok(())
    }

    /// The frozen layer `out = x W0ᵀ` (cuBLAS; `x` N×k, `out` N×d): eq. 5's `u` (Woodbury) and
    /// the base of LoRA and of the double-sided layer. Asynchronous.
    fn frozen(&self, x: &DeviceMatrices<T>, out: &mut DeviceMatrices<T>) -> Result<()> {
        gemm(
            &self.dev,
            1.0,
            x,
            Transpose::No,
            &self.w0,
            Transpose::Yes,
            0.0,
            out,
        )
    }

    /// The reverse mode of [`Self::frozen`], `out = ∂u W0` (cuBLAS; `∂u` N×d, `out` N×k).
    /// Asynchronous.
    fn frozen_back(&self, du: &DeviceMatrices<T>, out: &mut DeviceMatrices<T>) -> Result<()> {
        gemm(
            &self.dev,
            1.0,
            du,
            Transpose::No,
            &self.w0,
            Transpose::No,
            0.0,
            out,
        )
    }

    /// Moves to `step` (its settings are the caller's) and discards the tape.
    fn set_step(&mut self, step: usize) {
        self.step = step;
        self.train.invalidate();
    }
}

/// What `gpu_layer!` writes for a layer type: its [`Base`], and the statuses of its r×r launches.
trait LayerParts<T: Activation> {
    fn base(&self) -> &Base<T>;
    fn base_mut(&mut self) -> &mut Base<T>;

    /// Reads the statuses of the layer's r×r launches (synchronises); none by default (LoRA).
    fn statuses(&self) -> Result<()> {
        Ok(())
    }
}

/// The [`Adapter`] call protocol the GPU layers share — argument checks, the tape key of the
/// forward's `x` ([`InputKey`]), the gradients-ready state, the recompute buffer and the reduction
/// scratch — around each layer's device work ([`Self::run_forward`], [`Self::run_backward`],
/// [`Self::run_merge`], [`Self::run_unmerge`]). Every layer that implements it is a
/// [`GpuAdapter`].
trait Calls<T: Activation>: LayerParts<T> {
    /// The f32 scratch entries the layer's column reductions (and φ1 work) need for a batch of
    /// `n` rows (`n = 1` for merge and unmerge).
    fn scratch_need(&self, n: usize) -> usize;

    /// `y = x W_newᵀ` on checked operands (`x` N×k, `y` N×d), keeping the tape in the layer's
    /// buffers. Asynchronous.
    fn run_forward(&mut self, x: &DeviceMatrices<T>, y: &mut DeviceMatrices<T>) -> Result<()>;

    /// The reverse mode of the last forward on checked operands: `∂x` into `dx` and the
    /// parameter gradients into the layer's buffers. Asynchronous.
    fn run_backward(
        &mut self,
        x: &DeviceMatrices<T>,
        dy: &DeviceMatrices<T>,
        dx: &mut DeviceMatrices<T>,
    ) -> Result<()>;

    /// `W_new` into a checked d×k `out`. Asynchronous.
    fn run_merge(&mut self, out: &mut DeviceMatrices<T>) -> Result<()>;

    /// `W0` recovered from a checked d×k `w_new` into a checked d×k `out`.
    fn run_unmerge(&mut self, w_new: &DeviceMatrices<T>, out: &mut DeviceMatrices<T>)
        -> Result<()>;

    /// The parameter gradients of the last backward with their names (`"a gradient"`, …, as the
    /// CPU layers name them), for the overflow rule.
    fn grad_outputs(&self) -> Vec<(String, View<'_, f32>)>;

    /// The overflow rule when it is on ([`GpuAdapter::set_check_finite`]): scans `outputs` and,
    /// with `grads`, [`Self::grad_outputs`] ([`scan_outputs`]; synchronises). Nothing when off.
    fn verify(&mut self, outputs: &[(&str, &DeviceMatrices<T>)], grads: bool) -> Result<()> {
        if !self.base().check_finite {
            return Ok(());
        }
        let mut flags = self.base_mut().flags.take();
        let gs = if grads {
            self.grad_outputs()
        } else {
            Vec::new()
        };
        let r = scan_outputs(&self.base().dev, &mut flags, outputs, &gs);
        drop(gs);
        self.base_mut().flags = flags;
        r
    }

    /// Grows the reduction scratch to [`Self::scratch_need`]`(n)`.
    fn ensure_scratch(&mut self, n: usize) -> Result<()> {
        let need = self.scratch_need(n);
        let b = self.base_mut();
        ensure(&b.dev, &mut b.scratch, need)
    }

    /// [`Adapter::forward`]: checks the shapes (no dropout mask on the GPU), discards the old
    /// tape, runs the forward, keys its tape by `x` and applies the overflow rule to `y` when it
    /// is on (a non-finite `y` discards the tape).
    fn checked_forward(
        &mut self,
        x: &DeviceMatrices<T>,
        dropout: Option<&DeviceMatrices<T>>,
        y: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        no_dropout(dropout)?;
        self.forward_tape(x, y)?;
        let r = self.verify(&[("y", &*y)], false);
        if r.is_err() {
            self.base_mut().train.invalidate();
        }
        r
    }

    /// The forward of [`Self::checked_forward`] without the overflow rule (also the recompute).
    fn forward_tape(&mut self, x: &DeviceMatrices<T>, y: &mut DeviceMatrices<T>) -> Result<()> {
        let b = self.base();
        let (d, k) = b.dims();
        let n = b.check("x", x, None, k)?;
        b.check("y", y, Some(n), d)?;
        self.base_mut().train.invalidate();
        self.run_forward(x, y)?;
        self.base_mut().train.set_tape(key_of(x), ());
        Ok(())
    }

    /// [`Adapter::backward`]: checks the shapes and that the tape is the one of this very `x`
    /// with nothing changed since, runs the reverse mode, applies the overflow rule to `∂x` and
    /// the gradients when it is on, and marks the gradients ready (a failed run or check
    /// discards the tape).
    fn checked_backward(
        &mut self,
        x: &DeviceMatrices<T>,
        dy: &DeviceMatrices<T>,
        dx: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        let b = self.base();
        let (d, k) = b.dims();
        let n = b.check("x", x, None, k)?;
        b.check("dy", dy, Some(n), d)?;
        b.check("dx", dx, Some(n), k)?;
        b.train.tape_for(key_of(x))?;
        let r = self
            .run_backward(x, dy, dx)
            .and_then(|()| self.verify(&[("dx", &*dx)], true));
        let train = &mut self.base_mut().train;
        match r {
            Ok(()) => train.set_grads(()),
            Err(_) => train.invalidate(),
        }
        r
    }

    /// [`Adapter::recompute`]: the forward of `x` into the layer's own N×d buffer (not an output:
    /// not scanned).
    fn checked_recompute(&mut self, x: &DeviceMatrices<T>) -> Result<()> {
        let b = self.base_mut();
        let (d, k) = b.dims();
        let n = b.check("x", x, None, k)?;
        ensure_mat(&b.dev, &mut b.y_scratch, n, d)?;
        let mut y = b.y_scratch.take();
        let r = match y.as_mut() {
            Some(y) => self.forward_tape(x, y),
            None => Err(ElraError::Cuda("recompute buffer".into())),
        };
        self.base_mut().y_scratch = y;
        r
    }

    /// [`Adapter::merge`]: checks that `out` is d×k, then the layer's merge and the overflow rule
    /// on `out` (named `w_new`) when it is on.
    fn checked_merge(&mut self, out: &mut DeviceMatrices<T>) -> Result<()> {
        let (d, k) = self.base().dims();
        self.base().check("out", out, Some(d), k)?;
        self.run_merge(out)?;
        self.verify(&[("w_new", &*out)], false)
    }

    /// [`Adapter::unmerge`]: checks that `w_new` and `out` are d×k, then the layer's unmerge and
    /// the overflow rule on `out` (named `w0`) when it is on.
    fn checked_unmerge(
        &mut self,
        w_new: &DeviceMatrices<T>,
        out: &mut DeviceMatrices<T>,
    ) -> Result<()> {
        let b = self.base();
        let (d, k) = b.dims();
        b.check("w_new", w_new, Some(d), k)?;
        b.check("out", out, Some(d), k)?;
        self.run_unmerge(w_new, out)?;
        self.verify(&[("w0", &*out)], false)
    }
}

/// Every layer with the `Calls` protocol (the three layers of this module) is a [`GpuAdapter`].
impl<T, L> GpuAdapter<T> for L
where
    T: Activation,
    L: Calls<T> + Adapter<Scalar = f32, Matrix = DeviceMatrices<T>>,
{
    fn device(&self) -> &Arc<CudaDevice> {
        &self.base().dev
    }
    fn synchronize(&self) -> Result<()> {
        self.base().dev.synchronize()?;
        self.statuses()
    }
    fn set_check_finite(&mut self, on: bool) {
        self.base_mut().check_finite = on;
    }
    fn checks_finite(&self) -> bool {
        self.base().check_finite
    }
}

/// The overflow rule on a layer's outputs ([`GpuAdapter::set_check_finite`]; the GPU form of the
/// CPU layers' non-finite check): zeroes one u32 flag per output (`flags` grown on demand),
/// scans each output once (`cuda/finite.cu`), reads the flags back (synchronises) and returns
/// [`ElraError::Overflow`] naming the first output, in the order given, that holds NaN or ±Inf.
fn scan_outputs<T: Activation>(
    dev: &CudaDevice,
    flags: &mut Option<CudaSlice<u32>>,
    outputs: &[(&str, &DeviceMatrices<T>)],
    grads: &[(String, View<'_, f32>)],
) -> Result<()> {
    let n = outputs.len() + grads.len();
    if flags.as_ref().is_none_or(|f| f.len() < n) {
        *flags = Some(dev.stream().alloc_zeros::<u32>(n.max(1))?);
    }
    let f = flags
        .as_mut()
        .ok_or_else(|| ElraError::Cuda("overflow flags".into()))?;
    dev.stream().memset_zeros(f)?;
    let f: &CudaSlice<u32> = f;
    for (i, (_, m)) in outputs.iter().enumerate() {
        check_finite(dev, mat(m), View::at(f, i, 1, 1))?;
    }
    for (j, (_, v)) in grads.iter().enumerate() {
        check_finite(dev, *v, View::at(f, outputs.len() + j, 1, 1))?;
    }
    let got = dev.stream().clone_dtoh(f)?;
    dev.synchronize()?;
    let names = outputs
        .iter()
        .map(|o| o.0)
        .chain(grads.iter().map(|g| &*g.0));
    match names.zip(got).find(|&(_, bad)| bad != 0) {
        Some((name, _)) => Err(ElraError::Overflow {
            what: format!(
                "`{name}` holds NaN or ±Inf (the GPU output check; inputs are not scanned)"
            ),
        }),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Cost model
// ---------------------------------------------------------------------------------------------

/// Predicted extra cost of each route over the frozen layer (`y = x W0ᵀ`, `∂x = ∂y W0`) for one
/// forward + backward step ([`route_cost`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouteCost {
    /// Extra bytes moved by the Woodbury route's kernels.
    pub woodbury_bytes: f64,
    /// Extra kernel launches of the Woodbury route.
    pub woodbury_launches: usize,
    /// Extra bytes moved by the merged route's kernels.
    pub merged_bytes: f64,
    /// Extra kernel launches of the merged route.
    pub merged_launches: usize,
}

/// Assumed device bandwidth (bytes/s) and per-launch cost (s) of [`RouteCost::seconds`]
/// (H100-class: copy ≈ 3.0 TB/s, a launch ≈ 4 µs on a busy stream; DESIGN "Performance model").
pub const MODEL_BANDWIDTH: f64 = 3.0e12;
/// See [`MODEL_BANDWIDTH`].
pub const MODEL_LAUNCH_S: f64 = 4.0e-6;

impl RouteCost {
    /// `(woodbury, merged)` predicted extra seconds: bytes / [`MODEL_BANDWIDTH`] + launches ·
    /// [`MODEL_LAUNCH_S`].
    pub fn seconds(&self) -> (f64, f64) {
        let t = |b: f64, l: usize| b / MODEL_BANDWIDTH + l as f64 * MODEL_LAUNCH_S;
        (
            t(self.woodbury_bytes, self.woodbury_launches),
            t(self.merged_bytes, self.merged_launches),
        )
    }
}

/// The extra traffic of the two exact routes (eq. 5 and eq. 30) for `N` rows, `W0` d×k, rank r
/// and activations of `elem_bytes` bytes, counting only the N×d, N×k and d×k passes (the N×r,
/// d×r and r×r data and the r×r launches are the same for both or negligible):
///
/// * Woodbury: forward reads and writes `u` (2Nd); backward reads `∂y` and writes `ū` (2Nd), and
///   reads `∂y` and `u` once more for `Ā`, `C̄` (2Nd): 6Nd elements, 5 launches.
/// * Merged: forward reads `W0` for `P` (dk), reads `W0` and writes `W_eff` (2dk); backward reads
///   `∂y` twice (`s`, `Q̄`: 2Nd), `x` twice (`v`, `∂P`: 2Nk) and `W0` once (`C̄`: dk):
///   4dk + 2N(d+k) elements, 10 launches.
pub fn route_cost(n: usize, d: usize, k: usize, r: usize, elem_bytes: usize) -> RouteCost {
    let (n, d, k, b) = (n as f64, d as f64, k as f64, elem_bytes as f64);
    let _ = r;
    RouteCost {
        woodbury_bytes: 6.0 * n * d * b,
        woodbury_launches: 5,
        merged_bytes: (4.0 * d * k + 2.0 * n * (d + k)) * b,
        merged_launches: 10,
    }
}

/// The cheaper exact route by [`route_cost`] (Woodbury, eq. 5, or merged, eq. 30; ties go to
/// Woodbury, which keeps `W0` untouched).
pub fn choose_route(n: usize, d: usize, k: usize, r: usize, elem_bytes: usize) -> Route {
    let (w, m) = route_cost(n, d, k, r, elem_bytes).seconds();
    if m < w {
        Route::Merged
    } else {
        Route::Woodbury
    }
}

// ---------------------------------------------------------------------------------------------
// Buffers
// ---------------------------------------------------------------------------------------------

/// Uploads a host f32 matrix row-major.
fn upload(dev: &CudaDevice, m: &DMatrix<f32>) -> Result<CudaSlice<f32>> {
    Ok(dev.stream().clone_htod(&row_major(m))?)
}

/// Overwrites the first `rows·cols` entries of `dst` with a host f32 matrix, row-major.
fn upload_into(dev: &CudaDevice, m: &DMatrix<f32>, dst: &mut CudaSlice<f32>) -> Result<()> {
    let host = row_major(m);
    if dst.len() < host.len() {
        return Err(ElraError::Cuda(
            "parameter buffer smaller than its shape".into(),
        ));
    }
    let mut view = dst.slice_mut(0..host.len());
    Ok(dev.stream().memcpy_htod(&host, &mut view)?)
}

/// Downloads the first `rows·cols` entries of `s` as a row-major matrix (synchronises).
fn download(
    dev: &CudaDevice,
    s: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
) -> Result<DMatrix<f32>> {
    let v = dev.stream().clone_dtoh(s)?;
    dev.synchronize()?;
    if v.len() < rows * cols {
        return Err(ElraError::Cuda(
            "parameter buffer smaller than its shape".into(),
        ));
    }
    Ok(DMatrix::from_row_slice(rows, cols, &v[..rows * cols]))
}

fn row_major(m: &DMatrix<f32>) -> Vec<f32> {
    let mut v = Vec::with_capacity(m.len());
    for i in 0..m.nrows() {
        v.extend(m.row(i).iter().copied());
    }
    v
}

fn zeros(dev: &CudaDevice, len: usize) -> Result<CudaSlice<f32>> {
    Ok(dev.stream().alloc_zeros::<f32>(len.max(1))?)
}

/// The scratch that serves every column reduction of `sizes` (`(rows, cols, r)` each, as
/// [`col_reduce_scratch`]) and the other needs in `more`: the largest, at least 1.
fn scratch_for(sizes: &[(usize, usize, usize)], more: &[usize]) -> usize {
    let reductions = sizes.iter().map(|&(n, c, r)| col_reduce_scratch(n, c, r));
    reductions.chain(more.iter().copied()).max().unwrap_or(1)
}

/// Grows `slot` to at least `len` entries (never shrinks, so memory is flat across steps).
fn ensure(dev: &CudaDevice, slot: &mut Option<CudaSlice<f32>>, len: usize) -> Result<()> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = Some(zeros(dev, len)?);
    }
    Ok(())
}

/// Grows an activation buffer to at least `rows × cols` (reallocated when the shape changes).
fn ensure_mat<T: Activation>(
    dev: &CudaDevice,
    slot: &mut Option<DeviceMatrices<T>>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if slot
        .as_ref()
        .is_none_or(|m| (m.rows(), m.cols()) != (rows, cols))
    {
        *slot = Some(DeviceMatrices::zeros(dev, 1, rows, cols)?);
    }
    Ok(())
}

fn got<T>(slot: &Option<T>) -> Result<&T> {
    slot.as_ref()
        .ok_or_else(|| ElraError::invalid("self", "buffer not allocated (call forward first)"))
}

/// Checks a single activation matrix on `dev` with `cols` columns (and `rows` rows when given);
/// returns its rows.
fn check_act<T: Activation>(
    dev: &CudaDevice,
    arg: &'static str,
    m: &DeviceMatrices<T>,
    rows: Option<usize>,
    cols: usize,
) -> Result<usize> {
    m.check_device(dev, arg)?;
    let n = rows.unwrap_or(m.rows());
    m.check_shape(arg, 1, n, cols)?;
    Ok(n)
}

/// The key of a forward's input: device address and shape (nothing is dereferenced).
fn key_of<T: Activation>(x: &DeviceMatrices<T>) -> InputKey {
    InputKey::new(x.device_addr(), x.rows(), x.cols())
}

/// Errors for a dropout mask: the GPU layers have none (App. H dropout runs on the CPU only).
fn no_dropout<T: Activation>(dropout: Option<&DeviceMatrices<T>>) -> Result<()> {
    match dropout {
        Some(_) => Err(ElraError::invalid(
            "dropout",
            "the GPU layers have no dropout masks (pass None)",
        )),
        None => Ok(()),
    }
}

fn mat<T: Activation>(m: &DeviceMatrices<T>) -> View<'_, T> {
    View::mat(m.slice(), m.rows(), m.cols())
}

/// Uploads a host matrix (any precision that widens to f64) as a 1×rows×cols activation buffer,
/// rounding each entry to `T` (round to nearest even).
pub fn upload_matrix<T: Activation>(
    dev: &CudaDevice,
    m: &DMatrix<f64>,
) -> Result<DeviceMatrices<T>> {
    let mut v = Vec::with_capacity(m.len());
    for i in 0..m.nrows() {
        v.extend(m.row(i).iter().map(|&x| T::from_f64(x)));
    }
    DeviceMatrices::from_row_major(dev, 1, m.nrows(), m.ncols(), &v)
}

/// Downloads a 1×rows×cols activation buffer as f64 (exact widening; synchronises).
pub fn download_matrix<T: Activation>(
    dev: &CudaDevice,
    m: &DeviceMatrices<T>,
) -> Result<DMatrix<f64>> {
    let v = m.to_row_major(dev)?;
    Ok(DMatrix::from_row_slice(
        m.rows(),
        m.cols(),
        &v[..m.rows() * m.cols()]
            .iter()
            .map(|x| x.to_f64())
            .collect::<Vec<_>>(),
    ))
}
