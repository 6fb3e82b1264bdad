//! Adapters on the CPU: ELRA (single- and double-sided) and the LoRA baseline.
//!
//! * [`generator`]: low-rank generators `G = A·C` (eq. 2, §4.2.1, eq. 19), their norms from
//!   r×r quantities (eq. 21), the spectral clip (App. H) and the Woodbury action of `exp(G)`
//!   (Prop. 1).
//! * [`schedule`]: the α gate of ELRA-Hyb (App. H eq. 75, App. K) and the η multiplier.
//! * [`layer`]: [`ElraLayer`], `W_new = exp(G) W0` (eq. 3) evaluated as in eq. (5) /
//!   Algorithm 1, with exact merge/unmerge and the inference cache of App. H.
//! * [`double`]: the double-sided variant `exp(L) W0 exp(R)` (App. B, eq. 22–26).
//! * [`lora`]: [`LoraLayer`], PEFT-style LoRA `W0 + (α/r)·B'A'` for comparison.
//!
//! All adapters implement [`Adapter`]. Conventions: `W0` is d×k (out×in), a batch `X` is N×k
//! with samples as rows, and the output is `Y = X W_newᵀ` (N×d).

pub mod config;
pub mod double;
pub mod frozen;
pub mod generator;
pub mod layer;
pub mod lora;
pub mod schedule;

pub use config::{GeneratorConfig, GeneratorSpec, DEFAULT_ETA, DEFAULT_LAMBDA, DEFAULT_TAU};
pub use double::{DoubleSidedConfig, DoubleSidedLayer};
pub use frozen::Frozen;
pub use generator::{
    clip_scale, energy_eq21, frobenius_sq_from_grams, generator_factor, spectral_norm_from_grams,
    ExpAction, LowRankGenerator, Variant,
};
pub use layer::{ElraConfig, ElraLayer, ForwardCache, GeneratorEval, InferenceCache};
pub use lora::{LoraConfig, LoraInit, LoraLayer};
pub use schedule::{eta_cosine_multiplier, AlphaSchedule, EtaMultiplier};

use nalgebra::DMatrix;
use rand::Rng;

use crate::linalg::{check_finite, Real};
use crate::{ElraError, Result};

/// One trainable parameter of an adapter, in the order [`Adapter::params`] lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamSpec {
    /// The parameter's name, also the argument named by its errors: `a`, `b`, `eta` (ELRA),
    /// `a_left`, `b_left`, `eta_left`, `a_right`, `b_right`, `eta_right` (double-sided ELRA),
    /// `lora_a`, `lora_b` (LoRA).
    pub name: &'static str,
    /// Rows of the parameter (1 for a step size η).
    pub rows: usize,
    /// Columns of the parameter (1 for a step size η).
    pub cols: usize,
    /// Whether AdamW's weight decay applies (the factors; not the step sizes η).
    pub decay: bool,
    /// Whether the value must stay > 0 (the step sizes η of eq. 2); a trainer may optimise its
    /// logarithm instead.
    pub positive: bool,
}

impl ParamSpec {
    /// A factor matrix (weight decay, any sign).
    pub(crate) fn factor(name: &'static str, rows: usize, cols: usize) -> Self {
        ParamSpec {
            name,
            rows,
            cols,
            decay: true,
            positive: false,
        }
    }

    /// A step size η (1×1, > 0, no weight decay; eq. 2, App. I).
    pub(crate) fn step_size(name: &'static str) -> Self {
        ParamSpec {
            name,
            rows: 1,
            cols: 1,
            decay: false,
            positive: true,
        }
    }
}

/// The two factors `(A, C)` of a low-rank generator `G = A C` (A n×r, C r×n).
pub type Factors<T> = (DMatrix<T>, DMatrix<T>);

/// The energy of an adapter's generators (eq. 20–21), from r×r Grams.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Energy {
    /// `‖G‖²_F` of the effective generator (double-sided: `‖L‖²_F + ‖R‖²_F`).
    pub frobenius_sq: f64,
    /// `λ‖G‖²_F`, the penalty the gradients include (eq. 20).
    pub penalty: f64,
}

impl Energy {
    /// The energy `(‖G‖²_F, λ‖G‖²_F)` of [`Adapter::energy`], checked finite: the parameters
    /// are finite, so a non-finite energy left the floating-point range
    /// ([`ElraError::Overflow`], the overflow rule of every output).
    pub fn checked(frobenius_sq: f64, penalty: f64) -> Result<Option<Energy>> {
        if !(frobenius_sq.is_finite() && penalty.is_finite()) {
            return Err(ElraError::Overflow {
                what: "the generator energy ‖G‖²_F leaves the floating-point range".into(),
            });
        }
        Ok(Some(Energy {
            frobenius_sq,
            penalty,
        }))
    }
}

/// The interface every adapter implements on every back end: ELRA (single- and double-sided)
/// and LoRA over host matrices ([`nalgebra::DMatrix`]), the GPU layers over device matrices
/// (`cuda::DeviceMatrices`, feature `cuda`), and [`Frozen`] (no adapter). The C ABI, the
/// trainer and the tests hold adapters as `Box<dyn Adapter<…>>`.
///
/// An adapter owns its frozen weight `W0` (d×k, out×in), its trainable parameters (listed by
/// [`params`](Self::params), read and written as host matrices of [`Scalar`](Self::Scalar)),
/// its optimiser step (which drives α and the η multiplier, [`GeneratorConfig::spec_at`]), the
/// tape of its last forward and the gradients of its last backward.
///
/// A training step: [`set_step`](Self::set_step), [`forward`](Self::forward) (keeps the tape),
/// [`backward`](Self::backward) with the same `x` (writes `∂x`, keeps the parameter gradients),
/// [`grad`](Self::grad) per parameter, then [`set_param`](Self::set_param). Setting a
/// parameter, the step or `W0` discards the tape. Batches are row-major in the sense of the
/// layer: `X` is N×k with samples as rows, `Y = X W_newᵀ` is N×d.
pub trait Adapter: std::fmt::Debug + AsAny {
    /// Scalar type of the parameters and gradients.
    type Scalar: Real;
    /// The back end's matrices, for `W0`, activations and merged weights.
    type Matrix;

    /// A short name: `"elra"`, `"elra-psd"`, `"elra-hyb"`, `"elra-double"`, `"lora"`, …
    fn name(&self) -> &'static str;

    /// `(d, k)`: the frozen weight is d×k (out×in).
    fn dims(&self) -> (usize, usize);

    /// The frozen weight `W0` (d×k).
    fn w0(&self) -> &Self::Matrix;

    /// Replaces `W0` (d×k, finite), keeping the parameters and the step.
    fn set_w0(&mut self, w0: &Self::Matrix) -> Result<()>;

    /// The generator settings (eq. 2, eq. 19–20, App. H); `None` for LoRA and [`Frozen`].
    fn generator(&self) -> Option<&GeneratorConfig>;

    /// The trainable parameters, in a fixed order (ELRA `[a, b, eta]` without `b` for PSD;
    /// double-sided `[a_left, b_left, eta_left, a_right, b_right, eta_right]`; LoRA
    /// `[lora_a, lora_b]`).
    fn params(&self) -> Vec<ParamSpec>;

    /// A copy of parameter `index` (η as a 1×1 matrix). Errors: index out of range.
    fn param(&self, index: usize) -> Result<DMatrix<Self::Scalar>>;

    /// Replaces parameter `index`. Errors: index out of range, wrong shape, non-finite values,
    /// η not > 0; the adapter is unchanged on error.
    fn set_param(&mut self, index: usize, value: &DMatrix<Self::Scalar>) -> Result<()>;

    /// The optimiser step.
    fn step(&self) -> usize;

    /// Moves to optimiser step `step`: α and the η multiplier follow their schedules (eq. 75,
    /// App. H). Errors where the back end cannot run that step's settings.
    fn set_step(&mut self, step: usize) -> Result<()>;

    /// `Y = X W_newᵀ` (ELRA: eq. 5 / Algorithm 1 lines 4–8 or eq. 30; LoRA:
    /// `X W0ᵀ + s (X A'ᵀ) B'ᵀ`) for `x` (N×k) into `y` (N×d), keeping the tape for
    /// [`backward`](Self::backward). `dropout` (N×d, entries 0 or `1/(1−p)`, App. H) scales the
    /// adapter's increment where the back end supports it.
    fn forward(
        &mut self,
        x: &Self::Matrix,
        dropout: Option<&Self::Matrix>,
        y: &mut Self::Matrix,
    ) -> Result<()>;

    /// Reverse mode of the last [`forward`](Self::forward), which must have run on this very
    /// `x` (checked by address and shape) with no parameter, step or `W0` change since:
    /// `∂x = ∂L/∂X` (N×k) into `dx` from `dy = ∂L/∂Y` (N×d), and the parameter gradients of
    /// `L = ⟨Y, dy⟩ + λ‖G‖²_F` (eq. 20) kept for [`grad`](Self::grad).
    fn backward(
        &mut self,
        x: &Self::Matrix,
        dy: &Self::Matrix,
        dx: &mut Self::Matrix,
    ) -> Result<()>;

    /// The forward of `x` for its tape only (activation recomputation before a
    /// [`backward`](Self::backward)); the output is discarded.
    fn recompute(&mut self, x: &Self::Matrix) -> Result<()>;

    /// The gradient of parameter `index` from the last [`backward`](Self::backward) (same shape
    /// as the parameter). Errors: no backward yet, index out of range, a failed r×r matrix
    /// function of that step.
    fn grad(&self, index: usize) -> Result<DMatrix<Self::Scalar>>;

    /// The merged weight `W_new` (d×k) into `out` (ELRA: `W0 + A(M(C W0))`, eq. 30; LoRA:
    /// `W0 + s B'A'`).
    fn merge(&mut self, out: &mut Self::Matrix) -> Result<()>;

    /// `W0` recovered from a merged weight with the current parameters (ELRA: `exp(−G) W_new`,
    /// Prop. 3; LoRA: `W_new − s B'A'`) into `out` (d×k).
    fn unmerge(&mut self, w_new: &Self::Matrix, out: &mut Self::Matrix) -> Result<()>;

    /// `‖G‖²_F` and `λ‖G‖²_F` of the current step (eq. 20–21); `None` for LoRA and [`Frozen`].
    fn energy(&mut self) -> Result<Option<Energy>>;

    /// The generator factors `(A, C)` of the last forward, `G = A C` (ELRA: `A` and the
    /// effective `C`; double-sided: `(A_L, C_L)` then `(A_R, C_R)`; LoRA: `(B', s A')`), for the
    /// speed diagnostics of §5.4. Errors: no forward yet.
    fn generator_factors(&self) -> Result<Vec<Factors<Self::Scalar>>>;

    /// α at the current step (eq. 19): the schedule's value for ELRA-Hyb, 1 for PSD, 0 for
    /// general ELRA, LoRA and [`Frozen`].
    fn alpha(&self) -> f64 {
        self.generator().map_or(0.0, |g| g.alpha_at(self.step()))
    }

    /// The index of the parameter called `name`.
    fn param_index(&self, name: &str) -> Option<usize> {
        self.params().iter().position(|p| p.name == name)
    }

    /// Trainable matrix entries (Remark 1): `2rd` (ELRA, ELRA-Hyb), `rd` (ELRA-PSD), `r(d+k)`
    /// (LoRA); the step sizes η are counted by [`scalar_param_count`](Self::scalar_param_count).
    fn param_count(&self) -> usize {
        self.params()
            .iter()
            .filter(|p| !p.positive)
            .map(|p| p.rows * p.cols)
            .sum()
    }

    /// Trainable scalars besides the matrices: the step sizes η (one per generator, App. I).
    fn scalar_param_count(&self) -> usize {
        self.params().iter().filter(|p| p.positive).count()
    }

    /// `param_count() + scalar_param_count()`.
    fn total_param_count(&self) -> usize {
        self.param_count() + self.scalar_param_count()
    }
}

/// The concrete type behind a `dyn Adapter`, for the few places that need a layer's own
/// configuration (the adapter-file writers): `adapter.as_any().downcast_ref::<ElraLayer<T>>()`.
pub trait AsAny: std::any::Any {
    /// `self` as [`std::any::Any`].
    fn as_any(&self) -> &dyn std::any::Any;
}

impl<A: Adapter + 'static> AsAny for A {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// An [`Adapter`] on host matrices of `T` (`Box<dyn HostAdapter<T>>` is what the trainer and
/// the CPU C ABI hold), with the forward that keeps no tape: inference and evaluation only read
/// the adapter.
pub trait HostAdapter<T: Real>: Adapter<Scalar = T, Matrix = DMatrix<T>> + Send {
    /// `Y = X W_newᵀ` for `x` (N×k) without keeping a tape: the same computation as
    /// [`Adapter::forward`] without dropout (ELRA: eq. 5; LoRA: PEFT's forward).
    fn apply(&self, x: &DMatrix<T>) -> Result<DMatrix<T>>;

    /// A copy of the adapter (without its tape and gradients).
    fn clone_box(&self) -> Box<dyn HostAdapter<T>>;
}

impl<T: Real> Clone for Box<dyn HostAdapter<T>> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// Checks a parameter index against [`Adapter::params`] and returns its spec.
pub(crate) fn param_spec(specs: &[ParamSpec], index: usize) -> Result<ParamSpec> {
    specs.get(index).copied().ok_or_else(|| {
        ElraError::invalid(
            "index",
            format!(
                "parameter index {index} out of range (the adapter has {})",
                specs.len()
            ),
        )
    })
}

/// The 1×1 value of a step-size parameter, after checking its shape.
pub(crate) fn scalar_of<T: Real>(spec: &ParamSpec, value: &DMatrix<T>) -> Result<T> {
    if value.shape() != (1, 1) {
        return Err(ElraError::shape(spec.name, (1, 1), value.shape()));
    }
    Ok(value[(0, 0)])
}

/// The address and shape of a forward's input, to check that a backward gets the same `x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InputKey {
    addr: usize,
    rows: usize,
    cols: usize,
}

impl InputKey {
    /// The key of a host matrix (its buffer address; nothing is dereferenced).
    pub(crate) fn of<T: Real>(x: &DMatrix<T>) -> Self {
        InputKey {
            addr: x.as_ptr() as usize,
            rows: x.nrows(),
            cols: x.ncols(),
        }
    }

    /// The key of a matrix elsewhere (a device matrix of the GPU layers): its address and shape.
    #[cfg(feature = "cuda")]
    pub(crate) fn new(addr: usize, rows: usize, cols: usize) -> Self {
        InputKey { addr, rows, cols }
    }
}

/// What a training step keeps inside an adapter between calls: the tape of the last forward
/// (keyed by its input) and the gradients of the last backward. It is scratch, not part of the
/// adapter's value: `==` ignores it and a clone starts without it.
pub(crate) struct TrainState<Tape, Grads> {
    tape: Option<(InputKey, Tape)>,
    grads: Option<Grads>,
}

impl<Tape, Grads> TrainState<Tape, Grads> {
    /// Keeps the tape of a forward on `key`.
    pub(crate) fn set_tape(&mut self, key: InputKey, tape: Tape) {
        self.tape = Some((key, tape));
    }

    /// Discards the tape (parameters, step or `W0` changed).
    pub(crate) fn invalidate(&mut self) {
        self.tape = None;
    }

    /// The tape of the last forward, if it ran on `key`.
    pub(crate) fn tape_for(&self, key: InputKey) -> Result<&Tape> {
        match &self.tape {
            Some((k, t)) if *k == key => Ok(t),
            Some(_) => Err(ElraError::invalid(
                "x",
                "backward needs the x of the last forward (same matrix, same shape)",
            )),
            None => Err(ElraError::invalid(
                "x",
                "backward before forward (or parameters, step or W0 changed since)",
            )),
        }
    }

    /// The tape of the last forward, whatever its input.
    pub(crate) fn tape(&self) -> Result<&Tape> {
        self.tape
            .as_ref()
            .map(|(_, t)| t)
            .ok_or_else(|| ElraError::invalid("self", "no forward has run since the last change"))
    }

    /// Keeps the gradients of a backward.
    pub(crate) fn set_grads(&mut self, g: Grads) {
        self.grads = Some(g);
    }

    /// The gradients of the last backward.
    pub(crate) fn grads(&self) -> Result<&Grads> {
        self.grads
            .as_ref()
            .ok_or_else(|| ElraError::invalid("self", "no backward has run yet"))
    }
}

impl<Tape, Grads> Default for TrainState<Tape, Grads> {
    fn default() -> Self {
        TrainState {
            tape: None,
            grads: None,
        }
    }
}

impl<Tape, Grads> Clone for TrainState<Tape, Grads> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<Tape, Grads> PartialEq for TrainState<Tape, Grads> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<Tape, Grads> std::fmt::Debug for TrainState<Tape, Grads> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainState")
            .field("tape", &self.tape.is_some())
            .field("grads", &self.grads.is_some())
            .finish()
    }
}

/// The overflow rule of every CPU output: inputs and parameters are checked finite on entry, so
/// a non-finite entry in a result means the computation left the floating-point range
/// ([`ElraError::Overflow`] naming `what`), never a silent `Inf`/`NaN`.
pub(crate) fn finite_output<T: Real>(what: &'static str, m: DMatrix<T>) -> Result<DMatrix<T>> {
    if m.iter().all(|v| v.is_finite()) {
        Ok(m)
    } else {
        Err(ElraError::Overflow {
            what: format!("`{what}` leaves the floating-point range (every input is finite)"),
        })
    }
}

/// Checks that an output buffer has the shape the operation writes.
pub(crate) fn check_out<T: Real>(
    arg: &'static str,
    out: &DMatrix<T>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if out.shape() != (rows, cols) {
        return Err(ElraError::shape(arg, (rows, cols), out.shape()));
    }
    Ok(())
}

/// Checks a batch `x` (N×k, finite) against the layer's input width `k`.
pub(crate) fn check_batch<T: Real>(x: &DMatrix<T>, k: usize) -> Result<()> {
    if x.ncols() != k {
        return Err(ElraError::shape("x", (x.nrows(), k), x.shape()));
    }
    check_finite("x", x)
}

/// Checks a d×k weight argument.
pub(crate) fn check_weight<T: Real>(
    arg: &'static str,
    w: &DMatrix<T>,
    d: usize,
    k: usize,
) -> Result<()> {
    if w.shape() != (d, k) {
        return Err(ElraError::shape(arg, (d, k), w.shape()));
    }
    check_finite(arg, w)
}

/// Checks dimensions `d`, `k` ≥ 1 and `1 ≤ r ≤ limit`.
pub(crate) fn check_dims(
    d: usize,
    k: usize,
    r: usize,
    r_arg: &'static str,
    limit: usize,
) -> Result<()> {
    if d == 0 {
        return Err(ElraError::invalid("d", "must be at least 1"));
    }
    if k == 0 {
        return Err(ElraError::invalid("k", "must be at least 1"));
    }
    if r == 0 {
        return Err(ElraError::invalid(
            r_arg,
            "the rank must be at least 1 (got 0)",
        ));
    }
    if r > limit {
        return Err(ElraError::invalid(
            r_arg,
            format!("the rank {r} exceeds the generator dimension {limit}"),
        ));
    }
    Ok(())
}

/// Xavier/Glorot-uniform matrix (Glorot & Bengio 2010; PyTorch `xavier_uniform_`): entries
/// uniform in `±sqrt(6/(fan_in + fan_out))` with `fan_out = rows`, `fan_in = cols`. App. H uses
/// it for the trainable low-rank factors.
pub fn xavier_uniform<T: Real, R: Rng + ?Sized>(
    rng: &mut R,
    rows: usize,
    cols: usize,
) -> DMatrix<T> {
    let bound = (6.0 / (rows + cols).max(1) as f64).sqrt();
    DMatrix::from_fn(rows, cols, |_, _| T::of(rng.random_range(-bound..=bound)))
}

/// Kaiming-uniform matrix with `a = √5` as PyTorch's `nn.Linear` and PEFT's `lora_A` use:
/// entries uniform in `±1/sqrt(fan_in)` with `fan_in = cols`.
pub fn kaiming_uniform<T: Real, R: Rng + ?Sized>(
    rng: &mut R,
    rows: usize,
    cols: usize,
) -> DMatrix<T> {
    let bound = 1.0 / (cols.max(1) as f64).sqrt();
    DMatrix::from_fn(rows, cols, |_, _| T::of(rng.random_range(-bound..=bound)))
}
