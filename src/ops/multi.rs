//! Many adapters of one layer in one batch (serving several fine-tunes of one base model at
//! once, as Punica/S-LoRA do for LoRA): row `i` of the batch carries an adapter index `a_i` into
//! a set of adapters of the layer, `−1` for the base layer alone, and
//!
//! ```text
//! y_i = x_i W0ᵀ + bias + Δ_{a_i}(x_i),
//! ELRA (eq. 3, eq. 5 on the base output):  Δ(x) = ((u Cᵀ) φ1(C A)ᵀ) Aᵀ,  u = x W0ᵀ,
//! LoRA:                                    Δ(x) = s·(x Aᵀ) Bᵀ  (A r×k, B d×r),
//! ```
//!
//! with each ELRA adapter's `C` from its own variant, η and step (eq. 2, §4.2.1, eq. 19, App. H
//! clip); ranks may differ. The frozen GEMM `U = X W0ᵀ` runs once for the whole batch; each ELRA
//! adapter then works on the base output of its rows (`u Cᵀ`: n_a·d·r), so the adapters add
//! `O(N·d·r)` work in total whatever their number — no per-adapter `C W0` (r·d·k each). All r×r
//! matrix functions `φ1(C A)` are evaluated first, one per adapter; then the rows are grouped by
//! adapter (segments, as SGMV) in blocks of [`MULTI_ROWS`] gathered into the workspace, and each
//! block's increment is added to its rows of `y`. Forward only (inference).
//!
//! Every input is checked finite, the output by the overflow rule of the module above.

use nalgebra::DMatrix;

use super::{
    check_finite_strided, check_output, check_shape, scratch, view, ElraOp, Eval, Generator,
};
use crate::adapter::{GeneratorSpec, Variant};
use crate::grad::ops::{gemm_strided_par, Strided, StridedMut};
use crate::linalg::{all_finite, phi1, Real};
use crate::{ElraError, Result};

/// Rows gathered per block of one adapter's segment.
pub const MULTI_ROWS: usize = 256;

/// One adapter of a layer's set, over the layer's `W0` (d×k).
#[derive(Debug, Clone, Copy)]
pub enum MultiAdapter<'a, T> {
    /// ELRA: `exp(G) W0` with `G = A C` (eq. 2, §4.2.1, eq. 19) at the settings `spec` of its
    /// own step.
    Elra {
        /// Generator family.
        variant: Variant,
        /// `A` (d×r), `B` (r×d, `None` for PSD), trained η.
        generator: Generator<'a, T>,
        /// α, η multiplier, τ of its step ([`crate::adapter::GeneratorConfig::spec_at`]).
        spec: GeneratorSpec,
    },
    /// LoRA: `W0 + s·B A` (PEFT's `lora_A` r×k, `lora_B` d×r, `s = lora_alpha/r`).
    Lora {
        /// `lora_A`, r×k.
        a: Strided<'a, T>,
        /// `lora_B`, d×r.
        b: Strided<'a, T>,
        /// The scaling `s`.
        scale: T,
    },
}

impl<T: Real> MultiAdapter<'_, T> {
    /// The adapter's rank r (columns of ELRA's `A`, rows of LoRA's `A`).
    pub fn rank(&self) -> usize {
        match self {
            MultiAdapter::Elra { generator, .. } => generator.a.shape().1,
            MultiAdapter::Lora { a, .. } => a.shape().0,
        }
    }
}

/// The workspace, in values of the call's type, that [`multi_forward`] needs for `n` rows of a
/// d×k layer whose largest adapter rank is `max_r`: one gathered block of rows
/// (`min(n, MULTI_ROWS)·(max(d, k) + 2·max_r)`).
pub fn multi_workspace_len(n: usize, d: usize, k: usize, max_r: usize) -> Option<usize> {
    n.min(MULTI_ROWS)
        .checked_mul(d.max(k).checked_add(max_r.checked_mul(2)?)?)
}

/// An adapter ready for its rows: ELRA's `A`, `C`, `M = φ1(C A)` (Prop. 1), or LoRA's factors.
enum Ready<T: Real> {
    Elra {
        a: DMatrix<T>,
        c: DMatrix<T>,
        m: DMatrix<T>,
    },
    Lora {
        a: DMatrix<T>,
        b: DMatrix<T>,
        scale: T,
    },
}

/// Adds the adapter's number to an error about it.
fn about(i: usize, e: ElraError) -> ElraError {
    match e {
        ElraError::InvalidArgument { reason, arg } => ElraError::InvalidArgument {
            arg: "adapters",
            reason: format!("adapter {i}: `{arg}`: {reason}"),
        },
        ElraError::Shape { .. } | ElraError::NonFinite { .. } => ElraError::InvalidArgument {
            arg: "adapters",
            reason: format!("adapter {i}: {e}"),
        },
        ElraError::Overflow { what } => ElraError::Overflow {
            what: format!("adapter {i}: {what}"),
        },
        ElraError::Numerical(m) => ElraError::Numerical(format!("adapter {i}: {m}")),
        e => e,
    }
}

fn prepare<T: Real>(ad: &MultiAdapter<'_, T>, d: usize, k: usize) -> Result<Ready<T>> {
    match ad {
        MultiAdapter::Elra {
            variant,
            generator,
            spec,
        } => {
            let op = ElraOp {
                variant: *variant,
                d,
                k,
                r: generator.a.shape().1,
            };
            let ev = Eval::new(&op, generator, spec, d)?;
            let m = phi1(&(&ev.c * &ev.a))?;
            Ok(Ready::Elra {
                a: ev.a,
                c: ev.c,
                m,
            })
        }
        MultiAdapter::Lora { a, b, scale } => {
            let r = a.shape().0;
            if r == 0 || r > d.min(k) {
                return Err(ElraError::invalid(
                    "r",
                    format!("LoRA rank {r} is not in 1 … {}", d.min(k)),
                ));
            }
            check_shape("a", a, r, k)?;
            check_shape("b", b, d, r)?;
            check_finite_strided("a", a)?;
            check_finite_strided("b", b)?;
            if !scale.is_finite() {
                return Err(ElraError::NonFinite { arg: "scale" });
            }
            Ok(Ready::Lora {
                a: a.to_matrix(),
                b: b.to_matrix(),
                scale: *scale,
            })
        }
    }
}

/// The multi-adapter forward (module docs): `y_i = x_i W0ᵀ + bias + Δ_{a_i}(x_i)` for every row
/// `i` of `x` (n×k) into `y` (n×d), with `index[i]` ∈ {−1, 0, …, adapters.len()−1} (−1: the
/// base layer only). `workspace` holds at least [`multi_workspace_len`] values. The result for
/// each row equals running its adapter alone on it ([`super::forward`] with the base included,
/// or LoRA's `x W0ᵀ + bias + s (x Aᵀ) Bᵀ`), in any order of the rows.
///
/// Errors: an index outside the set ([`ElraError::InvalidArgument`] naming the row), shapes,
/// an adapter's bad factors or settings (named by number), non-finite inputs, a φ1 failure, an
/// overflowing output.
#[allow(clippy::too_many_arguments)]
pub fn multi_forward<T: Real>(
    w0: Strided<'_, T>,
    bias: Option<&[T]>,
    adapters: &[MultiAdapter<'_, T>],
    index: &[i32],
    x: Strided<'_, T>,
    y: &mut StridedMut<'_, T>,
    workspace: &mut [T],
) -> Result<()> {
    let (d, k) = w0.shape();
    let n = x.shape().0;
    if d == 0 || k == 0 {
        return Err(ElraError::shape("w0", (d.max(1), k.max(1)), (d, k)));
    }
    check_shape("x", &x, n, k)?;
    if y.shape() != (n, d) {
        return Err(ElraError::shape("y", (n, d), y.shape()));
    }
    if index.len() != n {
        return Err(ElraError::invalid(
            "index",
            format!("{} entries for {n} rows", index.len()),
        ));
    }
    if let Some(row) = index
        .iter()
        .position(|&i| i < -1 || i as i64 >= adapters.len() as i64)
    {
        return Err(ElraError::invalid(
            "index",
            format!(
                "row {row} selects adapter {} of a set of {} (−1 = base only)",
                index[row],
                adapters.len()
            ),
        ));
    }
    if let Some(b) = bias {
        if b.len() != d {
            return Err(ElraError::shape("bias", (d, 1), (b.len(), 1)));
        }
        if !all_finite(b) {
            return Err(ElraError::NonFinite { arg: "bias" });
        }
    }
    let max_r = adapters.iter().map(MultiAdapter::rank).max().unwrap_or(0);
    let need = multi_workspace_len(n, d, k, max_r)
        .ok_or_else(|| ElraError::invalid("n", "the workspace size overflows"))?;
    if workspace.len() < need {
        return Err(ElraError::invalid(
            "workspace",
            format!(
                "{} values given, {need} needed (multi_workspace_len)",
                workspace.len()
            ),
        ));
    }
    // Every adapter's r×r matrix function first (one pass over the set), then the rows.
    let ready = adapters
        .iter()
        .enumerate()
        .map(|(i, ad)| prepare(ad, d, k).map_err(|e| about(i, e)))
        .collect::<Result<Vec<_>>>()?;
    // U = X W0ᵀ once for the batch, into y.
    gemm_strided_par(y, T::one(), x, w0.t(), T::zero());
    let rows_per = n.min(MULTI_ROWS);
    let width = d.max(k);
    let (gather, rest) = workspace.split_at_mut(rows_per * width);
    let (vs, ts) = rest.split_at_mut(rows_per * max_r);
    let mut rows = [0usize; MULTI_ROWS];
    for (ai, ad) in ready.iter().enumerate() {
        let mut next = 0;
        loop {
            // The next block of this adapter's rows (a segment, in batch order).
            let mut len = 0;
            while next < n && len < rows_per {
                if index[next] == ai as i32 {
                    rows[len] = next;
                    len += 1;
                }
                next += 1;
            }
            if len == 0 {
                break;
            }
            block(ad, &rows[..len], &x, y, gather, vs, ts, d, k);
        }
    }
    // The bias and the check of every output row in one pass. A NaN or ±∞ in `x` or `W0`
    // reaches `U` (0·∞ is NaN), so only a non-finite output calls for the scans that name them.
    let mut finite = true;
    for i in 0..n {
        match y.row_mut(i) {
            Some(row) => {
                if let Some(b) = bias {
                    row.iter_mut().zip(b).for_each(|(v, &bj)| *v += bj);
                }
                finite &= all_finite(row);
            }
            None => {
                for j in 0..d {
                    let v = y.at_mut(i, j);
                    *v += bias.map_or(T::zero(), |b| b[j]);
                    finite &= v.is_finite();
                }
            }
        }
    }
    if !finite {
        check_finite_strided("x", &x)?;
        check_finite_strided("w0", &w0)?;
        return check_output("y", y);
    }
    Ok(())
}

/// Copies rows `rows` of `src` into the first `rows.len()` rows of `dst` (dense, row-major).
fn gather_rows<T: Real>(src: Strided<'_, T>, rows: &[usize], dst: &mut [T]) {
    let w = src.shape().1;
    for (q, &row) in rows.iter().enumerate() {
        let out = &mut dst[q * w..(q + 1) * w];
        match src.row(row) {
            Some(r) => out.copy_from_slice(r),
            None => out
                .iter_mut()
                .enumerate()
                .for_each(|(j, v)| *v = src.at(row, j)),
        }
    }
}

/// One block of an adapter's rows: gathers their `u` (ELRA) or `x` (LoRA), computes the
/// increment into the gather buffer and adds it to the rows of `y`.
#[allow(clippy::too_many_arguments)]
fn block<T: Real>(
    ad: &Ready<T>,
    rows: &[usize],
    x: &Strided<'_, T>,
    y: &mut StridedMut<'_, T>,
    gather: &mut [T],
    vs: &mut [T],
    ts: &mut [T],
    d: usize,
    k: usize,
) {
    let len = rows.len();
    match ad {
        Ready::Elra { a, c, m } => {
            let r = a.ncols();
            // G = U[rows] (len×d); V = G Cᵀ; T = V Mᵀ; increment T Aᵀ over G.
            gather_rows(y.as_ref(), rows, gather);
            let g = Strided::row_major(&gather[..len * d], len, d, d).expect("sized");
            let mut v = scratch(&mut vs[..len * r], len, r);
            gemm_strided_par(&mut v, T::one(), g, view(c).t(), T::zero());
            let mut t = scratch(&mut ts[..len * r], len, r);
            gemm_strided_par(&mut t, T::one(), v.as_ref(), view(m).t(), T::zero());
            let mut inc = scratch(&mut gather[..len * d], len, d);
            gemm_strided_par(&mut inc, T::one(), t.as_ref(), view(a).t(), T::zero());
        }
        Ready::Lora { a, b, scale } => {
            let r = a.nrows();
            // G = X[rows] (len×k); V = G Aᵀ; increment s·V Bᵀ over G.
            gather_rows(*x, rows, gather);
            let g = Strided::row_major(&gather[..len * k], len, k, k).expect("sized");
            let mut v = scratch(&mut vs[..len * r], len, r);
            gemm_strided_par(&mut v, T::one(), g, view(a).t(), T::zero());
            let mut inc = scratch(&mut gather[..len * d], len, d);
            gemm_strided_par(&mut inc, *scale, v.as_ref(), view(b).t(), T::zero());
        }
    }
    for (q, &row) in rows.iter().enumerate() {
        let inc = &gather[q * d..(q + 1) * d];
        match y.row_mut(row) {
            Some(dst) => dst.iter_mut().zip(inc).for_each(|(v, &a)| *v += a),
            None => inc
                .iter()
                .enumerate()
                .for_each(|(j, &a)| *y.at_mut(row, j) += a),
        }
    }
}
