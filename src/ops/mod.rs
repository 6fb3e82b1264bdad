//! Functional ELRA operations on caller memory: what an engine links to train with ELRA while it
//! owns every buffer (parameters, activations, gradients, saved tensors, workspace), like
//! cuBLASLt or flash-attention kernels. Nothing here keeps state between calls.
//!
//! An [`ElraOp`] describes a layer (variant, `d`, `k`, `r`); a [`Generator`] holds the trained
//! factors `A` (d×r), `B` (r×d, none for PSD) and `η`; a [`GeneratorSpec`] the settings of the
//! step (α, η multiplier, τ, λ — from [`crate::adapter::GeneratorConfig::spec_at`]). Matrices are
//! [`Strided`] views: row-major caller memory with a leading dimension, or any other strides.
//!
//! # The fused layer (eq. 5 without the N×d tape)
//! Forward, with `C` the effective right factor (eq. 2, §4.2.1, eq. 19, App. H clip),
//! `Z = C A`, `M = φ1(Z)` (Prop. 1) and `P = C W0` (r×k):
//!
//! ```text
//! V = X Pᵀ (N×r),  T = V Mᵀ,  Y = X W0ᵀ + 1 biasᵀ + D∘(T Aᵀ)
//! ```
//!
//! (`V = U Cᵀ` with `U = X W0ᵀ`, reassociated). It saves `V`, `Z`, `M` — N×r plus 2·r×r values
//! ([`saved_len`]) besides the input `x` the engine keeps anyway: the activation memory of LoRA
//! (which keeps `x` and the N×r `x A'ᵀ`) plus two r×r matrices, never an N×d tensor. Backward
//! recomputes `C`, `P`, `T` from the parameters (r-sized work) and uses, with `Ȳ = D∘∂Y`:
//!
//! ```text
//! Ā = Ȳᵀ T,  T̄ = Ȳ A,  M̄ = T̄ᵀ V,  V̄ = T̄ M,
//! ∂X = ∂Y W0 + V̄ P,  ∂P = V̄ᵀ X,  C̄ = ∂P W0ᵀ,
//! Z̄ = L_φ1(Zᵀ, M̄),  C̄ += Z̄ Aᵀ,  Ā += Cᵀ Z̄,
//! ```
//!
//! then the chain through the clip, the variant and η ([`FactorChain::backward`]).
//!
//! # The output-side form (any base layer)
//! `y = x W0ᵀ exp(G)ᵀ = u + ((u Cᵀ) Mᵀ) Aᵀ` with `u = x W0ᵀ`: ELRA is a rank-r transform of the
//! base layer's output, so [`forward_out`] takes `u` from the engine's own base layer (a
//! quantised, fused or sharded linear, **without its bias**) and [`backward_out`] returns `∂u`
//! for that layer's backward. Its backward needs `u` (`C̄ = V̄ᵀ u`): the caller keeps the N×d
//! `u`, more than the fused form's `x`; it costs one more N×d pass (`∂u = ∂Y + V̄ C`).
//!
//! # Energy
//! The penalty `λ‖G‖²_F` (eq. 20–21) is a separate operation ([`energy`]): forward and backward
//! above never include it, so an engine adds it to its loss once.
//!
//! # Many adapters in one batch
//! [`multi_forward`] serves a set of adapters of one layer (ELRA of any variant and step, LoRA;
//! ranks may differ) over one batch whose rows each select one: the frozen GEMM once, the
//! rank-r parts grouped by adapter (see [`multi_forward`]).
//!
//! Every input is checked finite ([`ElraError::NonFinite`] names it) and every output after:
//! finite inputs with a non-finite result are [`ElraError::Overflow`]. The small inputs are
//! scanned first; `W0`, `X`, `∂Y` and `u` through the first product that reads each (`P = C W0`,
//! `V = X Pᵀ`, `T̄ = Ȳ A`, `∂P = V̄ᵀ X`, `V = u Cᵀ`, `C̄ = V̄ᵀ u`), which holds a NaN or ±∞ whenever
//! its input does (`0·∞` is NaN), so an N×d input is read once more only when it is bad. Outputs are
//! write-only unless a call adds to them (`accumulate = true` for gradients): what they held
//! before is never read. On an error, outputs written before it was found (e.g. `∂x` before a
//! failing φ1 adjoint) keep what was written; the parameter gradients are written last, after
//! every check. Gradients are written (`accumulate = false`) or added (`accumulate = true`) into
//! the caller's buffers.

use nalgebra::DMatrix;

mod multi;
pub use multi::{multi_forward, multi_workspace_len, MultiAdapter, MULTI_ROWS};

use crate::adapter::{GeneratorSpec, Variant};
use crate::grad::generator::{energy_backward, FactorChain, FactorGrad};
use crate::grad::ops::{gemm_strided_par, Strided, StridedMut};
use crate::linalg::{all_finite, phi1, phi1_frechet_adjoint, Real};
use crate::{ElraError, Result};

/// The shape of an ELRA layer: generator family and dimensions (`W0` is d×k, `A` d×r).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElraOp {
    /// Generator family (eq. 2, §4.2.1, eq. 19).
    pub variant: Variant,
    /// Output dimension (rows of `W0`; the generator is d×d).
    pub d: usize,
    /// Input dimension (columns of `W0`).
    pub k: usize,
    /// Rank, `1 ≤ r ≤ d`.
    pub r: usize,
}

impl ElraOp {
    /// Checks `d, k ≥ 1` and `1 ≤ r ≤ d` (A is d×r, eq. 2: the generator `G = A C` is d×d).
    pub fn validate(&self) -> Result<()> {
        crate::adapter::check_dims(self.d, self.k, self.r, "r", self.d)
    }
}

/// Values a forward saves for its backward, for a batch of `n` rows: `V = X Pᵀ` (n×r) then
/// `Z = C A` and `M = φ1(Z)` (r×r each; Prop. 1, eq. 5), packed.
pub fn saved_len(n: usize, r: usize) -> Option<usize> {
    n.checked_mul(r)?
        .checked_add(r.checked_mul(r)?.checked_mul(2)?)
}

/// Workspace values a backward needs for a batch of `n` rows (`T = V Mᵀ`, `T̄ = Ȳ A`,
/// `V̄ = T̄ M`: n×r each, the reverse mode of eq. 5 in the module docs); forwards need `n·r`
/// (`T`).
pub fn workspace_len(n: usize, r: usize) -> Option<usize> {
    n.checked_mul(r)?.checked_mul(3)
}

/// The trained parameters of a generator: `A` (n×r), `B` (r×n, `None` for PSD), `η > 0`.
#[derive(Debug, Clone, Copy)]
pub struct Generator<'a, T> {
    /// `A`.
    pub a: Strided<'a, T>,
    /// `B`; `None` for ELRA-PSD.
    pub b: Option<Strided<'a, T>>,
    /// The trained step size η (before the multiplier).
    pub eta: T,
}

/// Whether the fused forward includes the frozen layer: `Included` computes
/// `Y = X W0ᵀ + bias + increment` (and `∂X = ∂Y W0 + V̄ P`), `Excluded` only the increment
/// `D∘(((X Pᵀ) Mᵀ) Aᵀ)` (and `∂X = V̄ P`) for an engine that runs the frozen GEMMs with its own
/// BLAS and adds them.
#[derive(Debug, Clone, Copy)]
pub enum Base<'a, T> {
    /// The frozen layer `X W0ᵀ` plus an optional bias (d values) is part of the output.
    Included {
        /// The bias, or `None`.
        bias: Option<&'a [T]>,
    },
    /// Only the adapter's increment.
    Excluded,
}

/// Where parameter gradients go: `∂A`, `∂B` (when the variant has `B`), `∂η`.
#[derive(Debug)]
pub struct GeneratorGrads<'a, 'b, T> {
    /// `∂L/∂A` (n×r).
    pub a: StridedMut<'a, T>,
    /// `∂L/∂B` (r×n); required when the generator has `B`.
    pub b: Option<StridedMut<'a, T>>,
    /// `∂L/∂η`.
    pub eta: &'b mut T,
    /// Add to the buffers (`true`) or overwrite them.
    pub accumulate: bool,
}

/// The generator of a step: `A`, the effective `C` and its chain back to `(A, B, η)`.
struct Eval<T: Real> {
    a: DMatrix<T>,
    c: DMatrix<T>,
    chain: FactorChain<T>,
}

fn check_shape<T: Real>(
    arg: &'static str,
    m: &Strided<'_, T>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if m.shape() != (rows, cols) {
        return Err(ElraError::shape(arg, (rows, cols), m.shape()));
    }
    Ok(())
}

fn check_shape_mut<T: Real>(
    arg: &'static str,
    m: &StridedMut<'_, T>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if m.shape() != (rows, cols) {
        return Err(ElraError::shape(arg, (rows, cols), m.shape()));
    }
    Ok(())
}

/// Checks every entry of a strided input finite.
fn check_finite_strided<T: Real>(arg: &'static str, m: &Strided<'_, T>) -> Result<()> {
    if m.all_finite() {
        Ok(())
    } else {
        Err(ElraError::NonFinite { arg })
    }
}

/// Checks an input through a product computed from it: `derived = f(input, finite factors)`
/// holds a NaN or ±∞ whenever `input` does (every entry of `input` meets every row or column of
/// a finite factor with r ≥ 1 columns, and `0·∞` is NaN), so only a non-finite `derived` calls
/// for the full scan that names `input`. A non-finite `derived` from a finite `input` is an
/// overflow, which the output checks that follow report. Saves a full read of `W0`, `X` and `∂Y`
/// per call.
fn check_finite_via<T: Real>(
    arg: &'static str,
    input: &Strided<'_, T>,
    derived: &Strided<'_, T>,
) -> Result<()> {
    if derived.all_finite() {
        Ok(())
    } else {
        check_finite_strided(arg, input)
    }
}

/// The overflow rule for outputs (module docs).
fn check_output<T: Real>(what: &'static str, m: &StridedMut<'_, T>) -> Result<()> {
    if m.as_ref().all_finite() {
        return Ok(());
    }
    Err(ElraError::Overflow {
        what: format!("`{what}` leaves the floating-point range (every input is finite)"),
    })
}

/// Splits a caller buffer into the saved `V` (n×r), `Z` and `M` (r×r).
fn split_saved<T>(saved: &mut [T], n: usize, r: usize) -> Result<(&mut [T], &mut [T], &mut [T])> {
    let need = saved_len(n, r).ok_or_else(|| ElraError::invalid("n", "n·r overflows"))?;
    if saved.len() < need {
        return Err(ElraError::invalid(
            "saved",
            format!("{} values given, {need} needed (saved_len)", saved.len()),
        ));
    }
    let (v, rest) = saved.split_at_mut(n * r);
    let (z, rest) = rest.split_at_mut(r * r);
    Ok((v, z, &mut rest[..r * r]))
}

/// The first `len` values of a workspace, or an error naming it.
fn take<T>(ws: &mut [T], len: usize) -> Result<(&mut [T], &mut [T])> {
    if ws.len() < len {
        return Err(ElraError::invalid(
            "workspace",
            format!("{} values given, {len} needed (workspace_len)", ws.len()),
        ));
    }
    Ok(ws.split_at_mut(len))
}

impl<T: Real> Eval<T> {
    /// Algorithm 1 line 4 for the parameters of one step: `C` (eq. 2, §4.2.1, eq. 19, App. H
    /// clip) and its chain.
    fn new(op: &ElraOp, g: &Generator<'_, T>, spec: &GeneratorSpec, n: usize) -> Result<Self> {
        op.validate()?;
        spec.validate()?;
        check_shape("a", &g.a, n, op.r)?;
        let a = g.a.to_matrix();
        let b = match (op.variant.uses_b(), &g.b) {
            (true, Some(b)) => {
                check_shape("b", b, op.r, n)?;
                Some(b.to_matrix())
            }
            (true, None) => {
                return Err(ElraError::invalid(
                    "b",
                    format!("variant {} needs the factor B (r×d)", op.variant),
                ))
            }
            (false, Some(_)) => return Err(ElraError::invalid("b", "ELRA-PSD has no factor B")),
            (false, None) => None,
        };
        let alpha = match op.variant {
            Variant::General => 0.0,
            Variant::Psd => 1.0,
            Variant::Hyb => spec.alpha,
        };
        let (c, chain) = FactorChain::new(&a, b.as_ref(), g.eta, spec.eta_mult, alpha, spec.tau)?;
        Ok(Eval { a, c, chain })
    }

    /// `Z = C A` and `M = φ1(Z)` (Prop. 1, Algorithm 1 line 5).
    fn zm(&self) -> Result<(DMatrix<T>, DMatrix<T>)> {
        let z = &self.c * &self.a;
        let m = phi1(&z)?;
        Ok((z, m))
    }

    /// `P = C W0` (r×k), row-major (its rows are the unit-stride operand of `X Pᵀ` and `V̄ P`).
    /// `P = C W0` (r×k), column-major ([`cm`]): its columns are the slow dimension, so the
    /// product splits over threads along k.
    fn p(&self, w0: Strided<'_, T>) -> Vec<T> {
        let (r, k) = (self.c.nrows(), w0.shape().1);
        let mut p = vec![T::zero(); r * k];
        gemm_strided_par(
            &mut scratch_cm(&mut p, r, k),
            T::one(),
            view(&self.c),
            w0,
            T::zero(),
        );
        p
    }

    /// Reads the saved `Z`, `M` back as matrices (row-major r×r).
    fn saved_zm(z: &[T], m: &[T], r: usize) -> (DMatrix<T>, DMatrix<T>) {
        (
            DMatrix::from_row_slice(r, r, &z[..r * r]),
            DMatrix::from_row_slice(r, r, &m[..r * r]),
        )
    }

    /// The chain through `M = φ1(Z)`, `Z = C A` (`Z̄ = L_φ1(Zᵀ, M̄)`, `C̄ += Z̄ Aᵀ`,
    /// `Ā += Cᵀ Z̄`), then from `(Ā, C̄)` to `(∂A, ∂B, ∂η)` and into the caller's buffers.
    fn finish(
        &self,
        z: &DMatrix<T>,
        mbar: &DMatrix<T>,
        mut abar: DMatrix<T>,
        mut cbar: DMatrix<T>,
        out: GeneratorGrads<'_, '_, T>,
    ) -> Result<()> {
        let zbar = phi1_frechet_adjoint(z, mbar)?;
        cbar += &zbar * self.a.transpose();
        abar += self.c.transpose() * &zbar;
        let fg = self.chain.backward(&self.a, abar, cbar)?;
        write_grads(fg, out)
    }
}

/// Writes (or adds) a generator's gradients into caller buffers, checking them finite first.
fn write_grads<T: Real>(fg: FactorGrad<T>, out: GeneratorGrads<'_, '_, T>) -> Result<()> {
    let GeneratorGrads {
        a: mut ga,
        b: gb,
        eta,
        accumulate,
    } = out;
    check_shape_mut("da", &ga, fg.a.nrows(), fg.a.ncols())?;
    let finite = |m: &DMatrix<T>| all_finite(m.as_slice());
    if !finite(&fg.a) || !fg.b.as_ref().is_none_or(finite) || !fg.eta.is_finite() {
        return Err(ElraError::Overflow {
            what: "a parameter gradient leaves the floating-point range".into(),
        });
    }
    let mut gb = match (fg.b.as_ref(), gb) {
        (Some(b), Some(out)) => {
            check_shape_mut("db", &out, b.nrows(), b.ncols())?;
            Some((b, out))
        }
        (Some(_), None) => return Err(ElraError::invalid("db", "the variant has B: db is needed")),
        (None, _) => None,
    };
    let put = |dst: &mut StridedMut<'_, T>, src: &DMatrix<T>| {
        for i in 0..src.nrows() {
            for j in 0..src.ncols() {
                let v = dst.at_mut(i, j);
                *v = if accumulate {
                    *v + src[(i, j)]
                } else {
                    src[(i, j)]
                };
            }
        }
    };
    put(&mut ga, &fg.a);
    if let Some((b, out)) = gb.as_mut() {
        put(out, b);
    }
    *eta = if accumulate { *eta + fg.eta } else { fg.eta };
    Ok(())
}

/// Copies a column-major matrix into row-major caller memory of the same shape.
fn store<T: Real>(dst: &mut [T], m: &DMatrix<T>) {
    let c = m.ncols();
    for i in 0..m.nrows() {
        for j in 0..c {
            dst[i * c + j] = m[(i, j)];
        }
    }
}

/// Row-major n×c scratch over a slice.
fn scratch<T: Real>(s: &mut [T], n: usize, c: usize) -> StridedMut<'_, T> {
    StridedMut::row_major(s, n, c, c).expect("scratch sized by the caller's checks")
}

/// Column-major r×c scratch over a slice (`P`, `∂P`: split over threads by columns).
fn scratch_cm<T: Real>(s: &mut [T], r: usize, c: usize) -> StridedMut<'_, T> {
    StridedMut::new(s, r, c, 1, r).expect("scratch sized by the caller")
}

/// The column-major r×c view of [`scratch_cm`]'s memory.
fn cm<T: Real>(s: &[T], r: usize, c: usize) -> Strided<'_, T> {
    Strided::new(s, r, c, 1, r).expect("sized by the caller")
}

fn view<T: Real>(m: &DMatrix<T>) -> Strided<'_, T> {
    Strided::of(m, crate::grad::ops::Op::N)
}

/// The saved `V` (n×r), `Z`, `M` of a forward ([`saved_len`]).
fn read_saved<T: Real>(
    saved: &[T],
    n: usize,
    r: usize,
) -> Result<(Strided<'_, T>, DMatrix<T>, DMatrix<T>)> {
    let need = saved_len(n, r).ok_or_else(|| ElraError::invalid("n", "n·r overflows"))?;
    if saved.len() < need {
        return Err(ElraError::invalid("saved", format!("{need} values needed")));
    }
    if !all_finite(&saved[..need]) {
        return Err(ElraError::NonFinite { arg: "saved" });
    }
    let v = Strided::row_major(&saved[..n * r], n, r, r).expect("sized above");
    let (z, m) = Eval::saved_zm(&saved[n * r..], &saved[n * r + r * r..], r);
    Ok((v, z, m))
}

/// The rank-r part of both backwards, from `Ȳ = D∘∂Y` (an N×d temporary only with a dropout
/// mask): `T = V Mᵀ`, `T̄ = Ȳ A`, `Ā = Ȳᵀ T`, `M̄ = T̄ᵀ V`, `V̄ = T̄ M`. Returns `Ā`, `M̄` and
/// `V̄` (in the workspace, [`workspace_len`]).
fn rank_r_backward<'w, T: Real>(
    ev: &Eval<T>,
    v: Strided<'_, T>,
    m: &DMatrix<T>,
    dy: Strided<'_, T>,
    dropout: Option<Strided<'_, T>>,
    workspace: &'w mut [T],
) -> Result<(DMatrix<T>, DMatrix<T>, StridedMut<'w, T>)> {
    let (n, d) = dy.shape();
    let r = m.nrows();
    let (ws, _) = take(workspace, 3 * n * r)?;
    let (ts, rest) = ws.split_at_mut(n * r);
    let (tbs, vbs) = rest.split_at_mut(n * r);
    let masked: Option<DMatrix<T>> =
        dropout.map(|mk| DMatrix::from_fn(n, d, |i, j| mk.at(i, j) * dy.at(i, j)));
    let ybar = masked.as_ref().map_or(dy, view);
    let mut t = scratch(ts, n, r);
    gemm_strided_par(&mut t, T::one(), v, view(m).t(), T::zero());
    let mut tbar = scratch(tbs, n, r);
    gemm_strided_par(&mut tbar, T::one(), ybar, view(&ev.a), T::zero());
    check_finite_via("dy", &dy, &tbar.as_ref())?;
    // Āᵀ = Tᵀ Ȳ (r×d, column-major: split over threads along d), then Ā.
    let mut abar_t = DMatrix::zeros(r, d);
    gemm_strided_par(
        &mut StridedMut::of(&mut abar_t),
        T::one(),
        t.as_ref().t(),
        ybar,
        T::zero(),
    );
    let abar = abar_t.transpose();
    let mut mbar = DMatrix::zeros(r, r);
    gemm_strided_par(
        &mut StridedMut::of(&mut mbar),
        T::one(),
        tbar.as_ref().t(),
        v,
        T::zero(),
    );
    let mut vbar = scratch(vbs, n, r);
    gemm_strided_par(&mut vbar, T::one(), tbar.as_ref(), view(m), T::zero());
    Ok((abar, mbar, vbar))
}

/// The fused forward, eq. 5 with `exp(G) = I + A φ1(CA) C` (Prop. 1) reassociated (module
/// docs): `y = x W0ᵀ + bias + D∘(((x Pᵀ) Mᵀ) Aᵀ)` into `y` (N×d)
/// (only the increment with [`Base::Excluded`]),
/// saving `V`, `Z`, `M` into `saved` ([`saved_len`]); `workspace` holds at least N·r values.
///
/// Errors: shapes, non-finite inputs, a φ1 failure, an overflowing output.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    op: &ElraOp,
    w0: Strided<'_, T>,
    base: Base<'_, T>,
    g: &Generator<'_, T>,
    spec: &GeneratorSpec,
    x: Strided<'_, T>,
    dropout: Option<Strided<'_, T>>,
    y: &mut StridedMut<'_, T>,
    saved: &mut [T],
    workspace: &mut [T],
) -> Result<()> {
    let (d, k, r) = (op.d, op.k, op.r);
    let n = x.shape().0;
    check_shape("w0", &w0, d, k)?;
    check_shape("x", &x, n, k)?;
    check_shape_mut("y", y, n, d)?;
    let (with_base, bias) = match base {
        Base::Included { bias } => (true, bias),
        Base::Excluded => (false, None),
    };
    if let Some(b) = bias {
        if b.len() != d {
            return Err(ElraError::shape("bias", (d, 1), (b.len(), 1)));
        }
    }
    if let Some(m) = &dropout {
        check_shape("dropout", m, n, d)?;
        check_finite_strided("dropout", m)?;
    }
    if bias.is_some_and(|b| !all_finite(b)) {
        return Err(ElraError::NonFinite { arg: "bias" });
    }
    let ev = Eval::new(op, g, spec, d)?;
    let (z, m) = ev.zm()?;
    let (vs, zs, ms) = split_saved(saved, n, r)?;
    let (ts, _) = take(workspace, n * r)?;
    // P = C W0 (r×k); V = X Pᵀ (N×r) into `saved`; T = V Mᵀ.
    let p = ev.p(w0);
    check_finite_via("w0", &w0, &cm(&p, r, k))?;
    let mut v = scratch(vs, n, r);
    gemm_strided_par(&mut v, T::one(), x, cm(&p, r, k).t(), T::zero());
    check_finite_via("x", &x, &v.as_ref())?;
    let mut t = scratch(ts, n, r);
    gemm_strided_par(&mut t, T::one(), v.as_ref(), view(&m).t(), T::zero());
    // Y = X W0ᵀ + bias + D∘(T Aᵀ) (the increment alone without the base).
    let keep = if with_base {
        gemm_strided_par(y, T::one(), x, w0.t(), T::zero());
        T::one()
    } else {
        T::zero()
    };
    match &dropout {
        None => gemm_strided_par(y, T::one(), t.as_ref(), view(&ev.a).t(), keep),
        Some(mask) => {
            let tv = t.as_ref();
            for i in 0..n {
                for j in 0..d {
                    let mut inc = T::zero();
                    for q in 0..r {
                        inc += tv.at(i, q) * ev.a[(j, q)];
                    }
                    // Without the base `y` is write-only (never `0·y`: it may hold NaN).
                    let yv = y.at_mut(i, j);
                    let add = mask.at(i, j) * inc;
                    *yv = if with_base { *yv + add } else { add };
                }
            }
        }
    }
    if let Some(b) = bias {
        for i in 0..n {
            for (j, &bj) in b.iter().enumerate() {
                *y.at_mut(i, j) += bj;
            }
        }
    }
    check_output("y", y)?;
    store(zs, &z);
    store(ms, &m);
    Ok(())
}

/// Reverse mode of [`forward`] (eq. 5 and Prop. 1 differentiated; the formulas are in the module
/// docs, φ1's adjoint is `L_φ1(Zᵀ, ·)`) from `dy` (N×d): `∂x` into `dx` (N×k; without
/// the frozen layer's `∂Y W0` unless `with_base`, as the forward's [`Base`]) and the
/// parameter gradients into `grads`. `x`, the parameters, `spec` and `dropout` must be those of
/// the forward that filled `saved`; `workspace` holds at least [`workspace_len`] values. The
/// energy penalty is not included ([`energy`]).
///
/// Errors: shapes, non-finite `dy`, a failed Fréchet adjoint, overflowing outputs.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    op: &ElraOp,
    w0: Strided<'_, T>,
    with_base: bool,
    g: &Generator<'_, T>,
    spec: &GeneratorSpec,
    x: Strided<'_, T>,
    dropout: Option<Strided<'_, T>>,
    saved: &[T],
    dy: Strided<'_, T>,
    dx: &mut StridedMut<'_, T>,
    grads: GeneratorGrads<'_, '_, T>,
    workspace: &mut [T],
) -> Result<()> {
    let (d, k, r) = (op.d, op.k, op.r);
    let n = x.shape().0;
    check_shape("w0", &w0, d, k)?;
    check_shape("dy", &dy, n, d)?;
    check_shape_mut("dx", dx, n, k)?;
    if let Some(m) = &dropout {
        check_shape("dropout", m, n, d)?;
        check_finite_strided("dropout", m)?;
    }
    let ev = Eval::new(op, g, spec, d)?;
    let (v, z, m) = read_saved(saved, n, r)?;
    let (abar, mbar, vbar) = rank_r_backward(&ev, v, &m, dy, dropout, workspace)?;
    // ∂X = ∂Y W0 + V̄ P with P = C W0.
    let p = ev.p(w0);
    check_finite_via("w0", &w0, &cm(&p, r, k))?;
    let keep = if with_base {
        gemm_strided_par(dx, T::one(), dy, w0, T::zero());
        T::one()
    } else {
        T::zero()
    };
    gemm_strided_par(dx, T::one(), vbar.as_ref(), cm(&p, r, k), keep);
    check_output("dx", dx)?;
    // C̄ = (V̄ᵀ X) W0ᵀ, then through M = φ1(Z), Z = C A.
    let mut pbar = vec![T::zero(); r * k];
    gemm_strided_par(
        &mut scratch_cm(&mut pbar, r, k),
        T::one(),
        vbar.as_ref().t(),
        x,
        T::zero(),
    );
    check_finite_via("x", &x, &cm(&pbar, r, k))?;
    let mut cbar = DMatrix::zeros(r, d);
    gemm_strided_par(
        &mut StridedMut::of(&mut cbar),
        T::one(),
        cm(&pbar, r, k),
        w0.t(),
        T::zero(),
    );
    ev.finish(&z, &mbar, abar, cbar, grads)
}

/// The output-side forward, eq. 5 on the base output (module docs): `y = u + ((u Cᵀ) Mᵀ) Aᵀ`
/// for the base layer's output `u` (N×d, without bias) into `y` (N×d), saving `V`, `Z`, `M`
/// ([`saved_len`]); `workspace` holds at least N·r values. `y` may not alias `u` (the backward
/// needs `u`).
///
/// Errors: shapes, non-finite `u`, a φ1 failure, an overflowing output.
#[allow(clippy::too_many_arguments)]
pub fn forward_out<T: Real>(
    op: &ElraOp,
    g: &Generator<'_, T>,
    spec: &GeneratorSpec,
    u: Strided<'_, T>,
    dropout: Option<Strided<'_, T>>,
    y: &mut StridedMut<'_, T>,
    saved: &mut [T],
    workspace: &mut [T],
) -> Result<()> {
    let (d, r) = (op.d, op.r);
    let n = u.shape().0;
    check_shape("u", &u, n, d)?;
    check_shape_mut("y", y, n, d)?;
    if let Some(m) = &dropout {
        check_shape("dropout", m, n, d)?;
        check_finite_strided("dropout", m)?;
    }
    let ev = Eval::new(op, g, spec, d)?;
    let (z, m) = ev.zm()?;
    let (vs, zs, ms) = split_saved(saved, n, r)?;
    let (ts, _) = take(workspace, n * r)?;
    let mut v = scratch(vs, n, r);
    gemm_strided_par(&mut v, T::one(), u, view(&ev.c).t(), T::zero());
    check_finite_via("u", &u, &v.as_ref())?;
    let mut t = scratch(ts, n, r);
    gemm_strided_par(&mut t, T::one(), v.as_ref(), view(&m).t(), T::zero());
    let tv = t.as_ref();
    for i in 0..n {
        for j in 0..d {
            let mut inc = T::zero();
            for q in 0..r {
                inc += tv.at(i, q) * ev.a[(j, q)];
            }
            let keep = dropout.as_ref().map_or(T::one(), |mk| mk.at(i, j));
            *y.at_mut(i, j) = u.at(i, j) + keep * inc;
        }
    }
    check_output("y", y)?;
    store(zs, &z);
    store(ms, &m);
    Ok(())
}

/// Reverse mode of [`forward_out`] (eq. 5 on the base output, differentiated): `∂u = ∂Y + V̄ C`
/// into `du` (N×d) and the parameter gradients into `grads`, from the forward's `u`, `saved`,
/// parameters, spec and dropout; `workspace` holds at least [`workspace_len`] values. The energy penalty is not included ([`energy`]).
///
/// Errors: shapes, non-finite `dy`, a failed Fréchet adjoint, overflowing outputs.
#[allow(clippy::too_many_arguments)]
pub fn backward_out<T: Real>(
    op: &ElraOp,
    g: &Generator<'_, T>,
    spec: &GeneratorSpec,
    u: Strided<'_, T>,
    dropout: Option<Strided<'_, T>>,
    saved: &[T],
    dy: Strided<'_, T>,
    du: &mut StridedMut<'_, T>,
    grads: GeneratorGrads<'_, '_, T>,
    workspace: &mut [T],
) -> Result<()> {
    let (d, r) = (op.d, op.r);
    let n = u.shape().0;
    check_shape("u", &u, n, d)?;
    check_shape("dy", &dy, n, d)?;
    check_shape_mut("du", du, n, d)?;
    if let Some(m) = &dropout {
        check_shape("dropout", m, n, d)?;
        check_finite_strided("dropout", m)?;
    }
    let ev = Eval::new(op, g, spec, d)?;
    let (v, z, m) = read_saved(saved, n, r)?;
    let (abar, mbar, vbar) = rank_r_backward(&ev, v, &m, dy, dropout, workspace)?;
    // ∂u = ∂Y + V̄ C.
    for i in 0..n {
        for j in 0..d {
            *du.at_mut(i, j) = dy.at(i, j);
        }
    }
    gemm_strided_par(du, T::one(), vbar.as_ref(), view(&ev.c), T::one());
    check_output("du", du)?;
    // C̄ = V̄ᵀ u, then through M = φ1(Z), Z = C A.
    let mut cbar = DMatrix::zeros(r, d);
    gemm_strided_par(
        &mut StridedMut::of(&mut cbar),
        T::one(),
        vbar.as_ref().t(),
        u,
        T::zero(),
    );
    check_finite_via("u", &u, &view(&cbar))?;
    ev.finish(&z, &mbar, abar, cbar, grads)
}

/// Which side of a weight a generator's exponential multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `exp(G) W` (single-sided ELRA, eq. 3; the left generator of App. B): `W` is d×k.
    Left,
    /// `W exp(G)` (the right generator of double-sided ELRA, App. B eq. 22): `W` is k×d, the
    /// generator d×d.
    Right,
}

impl Side {
    /// The shape of the weight the generator of `op` multiplies on this side: d×k on the left,
    /// k×d on the right.
    pub fn shape(self, op: &ElraOp) -> (usize, usize) {
        match self {
            Side::Left => (op.d, op.k),
            Side::Right => (op.k, op.d),
        }
    }
}

/// The merged weight `exp(G) W = W + A (M (C W))` (eq. 30; pass `W0` as `w`) into `out`, or
/// with `inverse` the unmerge `exp(−G) W = W + A (φ1(−Z) (−C W))` (Prop. 3 with Prop. 1); with
/// [`Side::Right`] the same on the right, `W exp(±G) = W + ((W A) φ1(±Z)) (±C)` (App. B).
/// `w` and `out` are d×k (left) or k×d (right).
///
/// Errors: shapes, non-finite `w`, a φ1 failure, an overflowing result.
pub fn merge<T: Real>(
    op: &ElraOp,
    g: &Generator<'_, T>,
    spec: &GeneratorSpec,
    w: Strided<'_, T>,
    inverse: bool,
    side: Side,
    out: &mut StridedMut<'_, T>,
) -> Result<()> {
    let (rows, cols) = side.shape(op);
    check_shape("w", &w, rows, cols)?;
    check_shape_mut("out", out, rows, cols)?;
    check_finite_strided("w", &w)?;
    let mm = MergeMaps::new(op, g, spec, inverse)?;
    for i in 0..rows {
        for j in 0..cols {
            *out.at_mut(i, j) = w.at(i, j);
        }
    }
    mm.apply(side, out)
}

/// [`merge`] over the weight's own memory: `w ← exp(±G) w` (left, eq. 30 / Prop. 3) or
/// `w ← w exp(±G)` (right, App. B), with r-sized temporaries only (`C w` is r×k, `w A` k×r), so
/// merging a checkpoint tensor by tensor needs no second copy of the tensor.
///
/// Errors: shapes, non-finite `w`, a φ1 failure, an overflowing result (`w` then holds partial
/// values).
pub fn merge_in_place<T: Real>(
    op: &ElraOp,
    g: &Generator<'_, T>,
    spec: &GeneratorSpec,
    inverse: bool,
    side: Side,
    w: &mut StridedMut<'_, T>,
) -> Result<()> {
    let (rows, cols) = side.shape(op);
    check_shape_mut("w", w, rows, cols)?;
    check_finite_strided("w", &w.as_ref())?;
    MergeMaps::new(op, g, spec, inverse)?.apply(side, w)
}

/// The factors of a merge, `A`, `±C` and `φ1(±Z)` (Prop. 1, Prop. 3), computed before the
/// weight is touched.
struct MergeMaps<T: Real> {
    a: DMatrix<T>,
    c: DMatrix<T>,
    m: DMatrix<T>,
    inverse: bool,
}

impl<T: Real> MergeMaps<T> {
    fn new(op: &ElraOp, g: &Generator<'_, T>, spec: &GeneratorSpec, inverse: bool) -> Result<Self> {
        let ev = Eval::new(op, g, spec, op.d)?;
        let c = if inverse { -&ev.c } else { ev.c };
        let m = phi1(&(&c * &ev.a))?;
        Ok(MergeMaps {
            a: ev.a,
            c,
            m,
            inverse,
        })
    }

    /// `w ← w + A (M (C w))` (left) or `w ← w + ((w A) M) C` (right), then the overflow rule.
    fn apply(&self, side: Side, w: &mut StridedMut<'_, T>) -> Result<()> {
        let (r, (rows, cols)) = (self.a.ncols(), w.shape());
        match side {
            Side::Left => {
                // K = M (C W) (r×k); W += A K.
                let mut p = DMatrix::zeros(r, cols);
                gemm_strided_par(
                    &mut StridedMut::of(&mut p),
                    T::one(),
                    view(&self.c),
                    w.as_ref(),
                    T::zero(),
                );
                let kk = &self.m * &p;
                gemm_strided_par(w, T::one(), view(&self.a), view(&kk), T::one());
            }
            Side::Right => {
                // Q = (W A) M (k×r); W += Q C.
                let mut wa = DMatrix::zeros(rows, r);
                gemm_strided_par(
                    &mut StridedMut::of(&mut wa),
                    T::one(),
                    w.as_ref(),
                    view(&self.a),
                    T::zero(),
                );
                let q = &wa * &self.m;
                gemm_strided_par(w, T::one(), view(&q), view(&self.c), T::one());
            }
        }
        check_output(if self.inverse { "w0" } else { "w_new" }, w)
    }
}

/// The penalty `E = λ‖G‖²_F` of the step's generator (eq. 20–21, from r×r Grams) and, when
/// `grads` is given, `∂E/∂(A, B, η)` written or added into it (through the clip, the variant and
/// η, as the layer's gradient).
///
/// Errors: shapes, non-finite parameters, overflowing results.
pub fn energy<T: Real>(
    op: &ElraOp,
    g: &Generator<'_, T>,
    spec: &GeneratorSpec,
    grads: Option<GeneratorGrads<'_, '_, T>>,
) -> Result<T> {
    op.validate()?;
    spec.validate()?;
    check_shape("a", &g.a, op.d, op.r)?;
    let a = g.a.to_matrix();
    let b = g.b.map(|b| b.to_matrix());
    let alpha = match op.variant {
        Variant::General => 0.0,
        Variant::Psd => 1.0,
        Variant::Hyb => spec.alpha,
    };
    let b = if op.variant.uses_b() { b } else { None };
    let (c, chain) = FactorChain::new(&a, b.as_ref(), g.eta, spec.eta_mult, alpha, spec.tau)?;
    let e = chain.frob_sq() * T::of(spec.lambda);
    if !e.is_finite() {
        return Err(ElraError::Overflow {
            what: "the energy λ‖G‖²_F leaves the floating-point range".into(),
        });
    }
    if let Some(out) = grads {
        let (_, abar, cbar) = energy_backward(&a, &c, spec.lambda)?;
        write_grads(chain.backward(&a, abar, cbar)?, out)?;
    }
    Ok(e)
}
