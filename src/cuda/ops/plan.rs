//! The plan of a functional GPU call: the workspace [`Layout`] and the list of kernel and cuBLAS
//! steps ([`Step`]) each operation enqueues, on views ([`V`]) of named buffers ([`Loc`]).
//!
//! Building a plan is plain host arithmetic: no device, no allocation on the device. The
//! executor (`exec.rs`) maps every step to one checked launch of the existing kernels of
//! `cuda/skinny.cu` and `cuda/phi1.cu`, one cuBLAS GEMM or one driver memset; the unit tests
//! (`interp.rs`) run the very same plans on the CPU in f64 and compare them with the CPU
//! functional operations of [`crate::ops`], so the composition is tested without a GPU.
//!
//! Equations (module docs of [`crate::ops`]): `C` of eq. (2), §4.2.1, eq. (19) (stored as `Cᵀ`,
//! d×r), `Z = C A`, `M = φ1(Z)` (Prop. 1), `P = C W0` (stored as `Pᵀ`, k×r).

use crate::adapter::{GeneratorSpec, Variant};
use crate::cuda::skinny::chunking;
use crate::ops::{ElraOp, Side};

/// Where a view's entries live: a caller buffer of the activation type (`X` … `Out`), a caller
/// f32 buffer (`A` … `Saved`), or a region of the caller's workspace (`Ws`, `Ones`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Loc {
    /// Input `x` (N×k).
    X,
    /// Frozen weight `W0` (d×k).
    W0,
    /// Bias (1×d).
    Bias,
    /// Output `y` (N×d).
    Y,
    /// `∂L/∂y` (N×d).
    Dy,
    /// `∂L/∂x` (N×k).
    Dx,
    /// The base layer's output `u` (N×d) of the output-side form.
    U,
    /// `∂L/∂u` (N×d).
    Du,
    /// The weight a merge reads (d×k left, k×d right).
    W,
    /// The weight a merge writes.
    Out,
    /// Factor `A` (d×r, f32).
    A,
    /// Factor `B` (r×d, f32).
    B,
    /// `∂A` (d×r, f32).
    Da,
    /// `∂B` (r×d, f32).
    Db,
    /// η (1×1, f32), read on the device.
    Eta,
    /// `∂η` (1×1, f32).
    Deta,
    /// The energy `λ‖G‖²_F` (1×1, f32).
    Energy,
    /// The saved values `V` (N×r), `Z`, `M` (r×r), f32.
    Saved,
    /// The f32 regions of the workspace.
    Ws,
    /// N ones of the activation type (the bias GEMM), a workspace region the executor lends
    /// as a matrix of its own (as it lends the reduction partials, the φ1 work matrices and the
    /// status words, which the steps use implicitly).
    Ones,
}

impl Loc {
    /// Whether the entries have the activation type (else f32).
    pub(crate) fn is_act(self) -> bool {
        matches!(
            self,
            Loc::X
                | Loc::W0
                | Loc::Bias
                | Loc::Y
                | Loc::Dy
                | Loc::Dx
                | Loc::U
                | Loc::Du
                | Loc::W
                | Loc::Out
                | Loc::Ones
        )
    }
}

/// A strided `rows × cols` view: entry `(i, j)` is element `off + i·s0 + j·s1` of `loc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct V {
    pub(crate) loc: Loc,
    pub(crate) off: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) s0: usize,
    pub(crate) s1: usize,
}

impl V {
    /// A row-major contiguous matrix at element `off` of `loc`.
    pub(crate) fn at(loc: Loc, off: usize, rows: usize, cols: usize) -> V {
        V {
            loc,
            off,
            rows,
            cols,
            s0: cols,
            s1: 1,
        }
    }
    /// A row-major contiguous matrix at the start of `loc`.
    pub(crate) fn mat(loc: Loc, rows: usize, cols: usize) -> V {
        V::at(loc, 0, rows, cols)
    }
    /// The transpose (no copy).
    pub(crate) fn t(self) -> V {
        V {
            rows: self.cols,
            cols: self.rows,
            s0: self.s1,
            s1: self.s0,
            ..self
        }
    }
    /// One past the last element the view reaches.
    #[cfg(test)]
    pub(crate) fn end(&self) -> usize {
        self.off + (self.rows - 1) * self.s0 + (self.cols - 1) * self.s1 + 1
    }
    /// Whether the view is row-major contiguous (`s1 = 1`, `s0 = cols`).
    pub(crate) fn dense(&self) -> bool {
        (self.s1 == 1 || self.cols == 1) && (self.s0 == self.cols || self.rows == 1)
    }
}

/// One step of a plan; every field is a view or a scalar the kernel takes by value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Step {
    /// Every entry of a dense view set to `value` (rounded to the location's type): a driver
    /// memset on the stream.
    Fill { v: V, value: f32 },
    /// `Cᵀ = η m (α A + (1−α) Bᵀ)` (eq. 2, §4.2.1, eq. 19; `factor_c_f32`).
    FactorC {
        a: V,
        b: Option<V>,
        eta: V,
        mult: f32,
        alpha: f32,
        ct: V,
    },
    /// `out = α Yᵀ S + β out` (`col_reduce_*`; `β = 0` does not read `out`).
    ColReduce {
        y: V,
        s: V,
        alpha: f32,
        beta: f32,
        out: V,
    },
    /// Per row: `v = Cm·inᵢ`, `t = Mm·v` (or `v`), `outᵢ = baseᵢ + Am·t` (`rows_fused_*`).
    Rows {
        input: V,
        base: Option<V>,
        out: Option<V>,
        cm: V,
        mm: Option<V>,
        am: Option<V>,
        v_out: Option<V>,
        t_out: Option<V>,
    },
    /// `C = op(A) op(B) + β C` on whole activation matrices (cuBLAS).
    Gemm {
        a: V,
        ta: bool,
        b: V,
        tb: bool,
        beta: f32,
        c: V,
    },
    /// `W_out = W_in + scale · L R` (`merge_apply_*`).
    MergeApply {
        w_in: V,
        w_out: V,
        scale: f32,
        l: V,
        r: V,
    },
    /// `C = α A B + β C` on small f32 operands (`small_gemm_f32`).
    SmallGemm {
        alpha: f32,
        a: V,
        b: V,
        beta: f32,
        c: V,
    },
    /// `e = e^Z`, `m = φ1(Z)` (Prop. 1; `expm_phi1_f32`), status into word `status`.
    Phi { z: V, e: V, m: V, status: usize },
    /// `out = L_φ1(Zᵀ, G)` (`phi1_adjoint_f32`), status into word `status`.
    Adjoint { z: V, g: V, out: V, status: usize },
    /// Energy gradient (eq. 20–21) and the chain through eq. (19) (`factor_backward_f32`,
    /// `factor_eta_f32`).
    FactorBackward {
        a: V,
        ct: V,
        s: V,
        k: V,
        lambda: f32,
        alpha: f32,
        eta: V,
        mult: f32,
        abar: V,
        cbar_t: V,
        bbar: Option<V>,
        etabar: V,
        accumulate: bool,
    },
}

/// Rounds up to a multiple of 4 values (16 bytes), so every region is aligned for vector access.
pub(crate) fn align4(x: usize) -> Option<usize> {
    x.checked_add(3).map(|v| v / 4 * 4)
}

/// Entries of the column-reduction scratch for `n_rows × n` data and rank `r`
/// ([`crate::cuda::skinny::col_reduce_scratch`], with overflow checks).
fn scratch_for(n_rows: usize, n: usize, r: usize) -> Option<usize> {
    if n_rows == 0 {
        return Some(0);
    }
    chunking(n_rows, n).1.checked_mul(n)?.checked_mul(r)
}

/// The regions of a call's workspace (offsets in f32 values, each 16-byte aligned) for a batch
/// of `n` rows (`n = 0` for merge and energy, which have none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Two i32 statuses.
    pub(crate) status: usize,
    /// `Cᵀ` (d×r).
    pub(crate) ct: usize,
    /// `Pᵀ` (k×r); `W A` of a right merge.
    pub(crate) pt: usize,
    /// `∂Pᵀ` (k×r); `(W A) M` of a right merge.
    pub(crate) pbar_t: usize,
    /// `Q = A M` (d×r) of a left merge.
    pub(crate) q: usize,
    /// `e^Z` (r×r, unused output of the φ1 kernel).
    pub(crate) e: usize,
    /// `±Z`, `φ1(±Z)` of a merge (r×r each).
    pub(crate) z: usize,
    pub(crate) m: usize,
    /// `M̄`, `Z̄` (r×r).
    pub(crate) mbar: usize,
    pub(crate) zbar: usize,
    /// Grams `S = AᵀA`, `K = CCᵀ` (r×r, eq. 21).
    pub(crate) s: usize,
    pub(crate) k: usize,
    /// `C̄ᵀ` (d×r).
    pub(crate) cbar_t: usize,
    /// `T`, `T̄`, `V̄` (N×r).
    pub(crate) t: usize,
    pub(crate) tbar: usize,
    pub(crate) vbar: usize,
    /// N ones of the activation type (N values reserved).
    pub(crate) ones: usize,
    /// Column-reduction partials.
    pub(crate) scratch: usize,
    pub(crate) scratch_len: usize,
    /// φ1 work matrices: 24·r² values (the adjoint's 12 work matrices of 2r² entries).
    pub(crate) work: usize,
    pub(crate) work_len: usize,
    /// Total values.
    pub(crate) len: usize,
}

impl Layout {
    /// The layout for `op` and `n` rows; `None` when a size overflows.
    pub(crate) fn new(op: &ElraOp, n: usize) -> Option<Layout> {
        let (d, k, r) = (op.d, op.k, op.r);
        let dr = d.checked_mul(r)?;
        let kr = k.checked_mul(r)?;
        let rr = r.checked_mul(r)?;
        let nr = n.checked_mul(r)?;
        let scratch_len = [
            scratch_for(d, r, r)?,
            scratch_for(d, k, r)?,
            scratch_for(n, d, r)?,
            scratch_for(n, r, r)?,
            scratch_for(n, k, r)?,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
        .max(1);
        let work_len = rr.checked_mul(24)?;
        let mut at = 0usize;
        let mut take = |len: usize| -> Option<usize> {
            let start = at;
            at = align4(at.checked_add(len.max(1))?)?;
            Some(start)
        };
        let status = take(2)?;
        let ct = take(dr)?;
        let pt = take(kr)?;
        let pbar_t = take(kr)?;
        let q = take(dr)?;
        let e = take(rr)?;
        let z = take(rr)?;
        let m = take(rr)?;
        let mbar = take(rr)?;
        let zbar = take(rr)?;
        let s = take(rr)?;
        let kk = take(rr)?;
        let cbar_t = take(dr)?;
        let t = take(nr)?;
        let tbar = take(nr)?;
        let vbar = take(nr)?;
        let ones = take(n)?;
        let scratch = take(scratch_len)?;
        let work = take(work_len)?;
        Some(Layout {
            status,
            ct,
            pt,
            pbar_t,
            q,
            e,
            z,
            m,
            mbar,
            zbar,
            s,
            k: kk,
            cbar_t,
            t,
            tbar,
            vbar,
            ones,
            scratch,
            scratch_len,
            work,
            work_len,
            len: at,
        })
    }
}

/// Values a forward saves for its backward: `V` (N×r), `Z`, `M` (r×r) — N·r + 2r², as
/// [`crate::ops::saved_len`].
pub(crate) fn saved_len(n: usize, r: usize) -> Option<usize> {
    crate::ops::saved_len(n, r)
}

/// The generator settings of a call: whether `B` enters `C` (the variant has it and α < 1),
/// α by variant (0 general, 1 PSD, the step's α for Hyb), the η multiplier and λ (η itself is
/// the caller's device scalar, [`Loc::Eta`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct GenParams {
    pub(crate) has_b: bool,
    pub(crate) reads_b: bool,
    pub(crate) alpha: f32,
    pub(crate) mult: f32,
    pub(crate) lambda: f32,
}

impl GenParams {
    /// The settings of `op` at `spec` (as the CPU's `Eval::new`).
    pub(crate) fn new(op: &ElraOp, spec: &GeneratorSpec) -> GenParams {
        let alpha = match op.variant {
            Variant::General => 0.0,
            Variant::Psd => 1.0,
            Variant::Hyb => spec.alpha,
        };
        let has_b = op.variant.uses_b();
        GenParams {
            has_b,
            reads_b: has_b && alpha < 1.0,
            alpha: alpha as f32,
            mult: spec.eta_mult as f32,
            lambda: spec.lambda as f32,
        }
    }
}

/// Which functional operation a plan is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The fused forward: with the frozen layer (`base`) and a bias, or the increment alone.
    Forward { base: bool, bias: bool },
    /// Its reverse mode.
    Backward { base: bool, accumulate: bool },
    /// The output-side forward.
    ForwardOut,
    /// Its reverse mode.
    BackwardOut { accumulate: bool },
    /// `exp(±G) W` or `W exp(±G)`.
    Merge { inverse: bool, side: Side },
    /// `λ‖G‖²_F`, with its gradient when `grads` is `Some(accumulate)`.
    Energy { grads: Option<bool> },
}

/// A plan's views of one call's buffers.
struct Views {
    n: usize,
    d: usize,
    k: usize,
    r: usize,
    lay: Layout,
}

impl Views {
    fn ws(&self, off: usize, rows: usize, cols: usize) -> V {
        V::at(Loc::Ws, off, rows, cols)
    }
    fn a(&self) -> V {
        V::mat(Loc::A, self.d, self.r)
    }
    fn ct(&self) -> V {
        self.ws(self.lay.ct, self.d, self.r)
    }
    fn pt(&self) -> V {
        self.ws(self.lay.pt, self.k, self.r)
    }
    fn saved_v(&self) -> V {
        V::mat(Loc::Saved, self.n, self.r)
    }
    fn saved_z(&self) -> V {
        V::at(Loc::Saved, self.n * self.r, self.r, self.r)
    }
    fn saved_m(&self) -> V {
        V::at(
            Loc::Saved,
            self.n * self.r + self.r * self.r,
            self.r,
            self.r,
        )
    }
    fn rr(&self, off: usize) -> V {
        self.ws(off, self.r, self.r)
    }
    fn nr(&self, off: usize) -> V {
        self.ws(off, self.n, self.r)
    }
}

/// Algorithm 1 line 4 (and line 5 with `zm`): `Cᵀ` (eq. 19) from the caller's device η, then, with
/// `zm = Some((z, m))`, `z = ±C A` and `m = φ1(z)` (Prop. 1; `neg` for the unmerge's `−Z`).
fn prelude(s: &mut Vec<Step>, v: &Views, g: &GenParams, zm: Option<(V, V)>, neg: bool) {
    let eta = V::mat(Loc::Eta, 1, 1);
    s.push(Step::FactorC {
        a: v.a(),
        b: g.reads_b.then(|| V::mat(Loc::B, v.r, v.d)),
        eta,
        mult: g.mult,
        alpha: g.alpha,
        ct: v.ct(),
    });
    if let Some((z, m)) = zm {
        // Z[p, q] = Σ_l C[p, l] A[l, q] = Σ_l Cᵀ[l, p] A[l, q].
        s.push(Step::ColReduce {
            y: v.ct(),
            s: v.a(),
            alpha: if neg { -1.0 } else { 1.0 },
            beta: 0.0,
            out: z,
        });
        s.push(Step::Phi {
            z,
            e: v.rr(v.lay.e),
            m,
            status: 0,
        });
    }
}

/// `T = V Mᵀ` from the saved `V` and `M` (one row pass over N×r).
fn recompute_t(s: &mut Vec<Step>, v: &Views) {
    s.push(Step::Rows {
        input: v.saved_v(),
        base: None,
        out: None,
        cm: v.saved_m(),
        mm: None,
        am: None,
        v_out: Some(v.nr(v.lay.t)),
        t_out: None,
    });
}

/// The end of every backward, given `Ā` (in `Da`), `C̄ᵀ` and `M̄`: `Z̄ = L_φ1(Zᵀ, M̄)`,
/// `Ā += Cᵀ Z̄`, `C̄ᵀ += A Z̄ᵀ`, then the chain through eq. (19) to `(∂A, ∂B, ∂η)`.
fn tail(s: &mut Vec<Step>, v: &Views, g: &GenParams, accumulate: bool) {
    let zbar = v.rr(v.lay.zbar);
    let cbar_t = v.ws(v.lay.cbar_t, v.d, v.r);
    s.push(Step::Adjoint {
        z: v.saved_z(),
        g: v.rr(v.lay.mbar),
        out: zbar,
        status: 1,
    });
    s.push(Step::SmallGemm {
        alpha: 1.0,
        a: v.ct(),
        b: zbar,
        beta: 1.0,
        c: V::mat(Loc::Da, v.d, v.r),
    });
    s.push(Step::SmallGemm {
        alpha: 1.0,
        a: v.a(),
        b: zbar.t(),
        beta: 1.0,
        c: cbar_t,
    });
    chain(s, v, g, 0.0, accumulate);
}

/// `factor_backward` + `factor_eta` with energy weight `lambda` into the caller's gradients.
fn chain(s: &mut Vec<Step>, v: &Views, g: &GenParams, lambda: f32, accumulate: bool) {
    s.push(Step::FactorBackward {
        a: v.a(),
        ct: v.ct(),
        s: v.rr(v.lay.s),
        k: v.rr(v.lay.k),
        lambda,
        alpha: g.alpha,
        eta: V::mat(Loc::Eta, 1, 1),
        mult: g.mult,
        abar: V::mat(Loc::Da, v.d, v.r),
        cbar_t: v.ws(v.lay.cbar_t, v.d, v.r),
        bbar: g.has_b.then(|| V::mat(Loc::Db, v.r, v.d)),
        etabar: V::mat(Loc::Deta, 1, 1),
        accumulate,
    });
}

/// The steps of `kind` for `op` on a batch of `n` rows (`n` is ignored by merge and energy)
/// with the workspace laid out as `lay` (from [`Layout::new`] with the same `n`).
pub(crate) fn plan(op: &ElraOp, n: usize, g: &GenParams, kind: Kind, lay: &Layout) -> Vec<Step> {
    let (d, k, r) = (op.d, op.k, op.r);
    let v = Views {
        n,
        d,
        k,
        r,
        lay: *lay,
    };
    let mut s = Vec::new();
    let saved_zm = || (v.saved_z(), v.saved_m());
    match kind {
        Kind::Forward { base, bias } => {
            prelude(&mut s, &v, g, Some(saved_zm()), false);
            // Pᵀ = W0ᵀ Cᵀ (k×r): a reduction over the rows of W0.
            s.push(Step::ColReduce {
                y: V::mat(Loc::W0, d, k),
                s: v.ct(),
                alpha: 1.0,
                beta: 0.0,
                out: v.pt(),
            });
            let y = V::mat(Loc::Y, n, d);
            let xw0 = |beta| Step::Gemm {
                a: V::mat(Loc::X, n, k),
                ta: false,
                b: V::mat(Loc::W0, d, k),
                tb: true,
                beta,
                c: y,
            };
            if base && bias {
                // Y = 1 biasᵀ, then Y += X W0ᵀ (one rounding of the sum).
                let ones = V::mat(Loc::Ones, n, 1);
                s.push(Step::Fill {
                    v: ones,
                    value: 1.0,
                });
                s.push(Step::Gemm {
                    a: ones,
                    ta: false,
                    b: V::mat(Loc::Bias, 1, d),
                    tb: false,
                    beta: 0.0,
                    c: y,
                });
                s.push(xw0(1.0));
            } else if base {
                s.push(xw0(0.0));
            }
            // V = X Pᵀ (saved), Y (+)= ((X Pᵀ) Mᵀ) Aᵀ.
            s.push(Step::Rows {
                input: V::mat(Loc::X, n, k),
                base: base.then_some(y),
                out: Some(y),
                cm: v.pt().t(),
                mm: Some(v.saved_m()),
                am: Some(v.a()),
                v_out: Some(v.saved_v()),
                t_out: None,
            });
        }
        Kind::Backward { base, accumulate } => {
            prelude(&mut s, &v, g, None, false);
            s.push(Step::ColReduce {
                y: V::mat(Loc::W0, d, k),
                s: v.ct(),
                alpha: 1.0,
                beta: 0.0,
                out: v.pt(),
            });
            recompute_t(&mut s, &v);
            // T̄ = Ȳ A, V̄ = T̄ M.
            let (tbar, vbar) = (v.nr(v.lay.tbar), v.nr(v.lay.vbar));
            let dy = V::mat(Loc::Dy, n, d);
            s.push(Step::Rows {
                input: dy,
                base: None,
                out: None,
                cm: v.a().t(),
                mm: Some(v.saved_m().t()),
                am: None,
                v_out: Some(tbar),
                t_out: Some(vbar),
            });
            // ∂X = ∂Y W0 + V̄ P (the increment's V̄ P alone without the base).
            let dx = V::mat(Loc::Dx, n, k);
            if base {
                s.push(Step::Gemm {
                    a: dy,
                    ta: false,
                    b: V::mat(Loc::W0, d, k),
                    tb: false,
                    beta: 0.0,
                    c: dx,
                });
            } else {
                s.push(Step::Fill { v: dx, value: 0.0 });
            }
            s.push(Step::MergeApply {
                w_in: dx,
                w_out: dx,
                scale: 1.0,
                l: vbar,
                r: v.pt().t(),
            });
            // Ā = Ȳᵀ T, M̄ = T̄ᵀ V, ∂Pᵀ = Xᵀ V̄, C̄ᵀ = W0 ∂Pᵀ.
            s.push(Step::ColReduce {
                y: dy,
                s: v.nr(v.lay.t),
                alpha: 1.0,
                beta: if accumulate { 1.0 } else { 0.0 },
                out: V::mat(Loc::Da, d, r),
            });
            s.push(Step::ColReduce {
                y: tbar,
                s: v.saved_v(),
                alpha: 1.0,
                beta: 0.0,
                out: v.rr(v.lay.mbar),
            });
            let pbar_t = v.ws(v.lay.pbar_t, k, r);
            s.push(Step::ColReduce {
                y: V::mat(Loc::X, n, k),
                s: vbar,
                alpha: 1.0,
                beta: 0.0,
                out: pbar_t,
            });
            s.push(Step::Rows {
                input: V::mat(Loc::W0, d, k),
                base: None,
                out: None,
                cm: pbar_t.t(),
                mm: None,
                am: None,
                v_out: Some(v.ws(v.lay.cbar_t, d, r)),
                t_out: None,
            });
            tail(&mut s, &v, g, accumulate);
        }
        Kind::ForwardOut => {
            prelude(&mut s, &v, g, Some(saved_zm()), false);
            let u = V::mat(Loc::U, n, d);
            s.push(Step::Rows {
                input: u,
                base: Some(u),
                out: Some(V::mat(Loc::Y, n, d)),
                cm: v.ct().t(),
                mm: Some(v.saved_m()),
                am: Some(v.a()),
                v_out: Some(v.saved_v()),
                t_out: None,
            });
        }
        Kind::BackwardOut { accumulate } => {
            prelude(&mut s, &v, g, None, false);
            recompute_t(&mut s, &v);
            // T̄ = Ȳ A, V̄ = T̄ M, ∂u = ∂Y + V̄ C (one pass).
            let (tbar, vbar) = (v.nr(v.lay.tbar), v.nr(v.lay.vbar));
            let dy = V::mat(Loc::Dy, n, d);
            s.push(Step::Rows {
                input: dy,
                base: Some(dy),
                out: Some(V::mat(Loc::Du, n, d)),
                cm: v.a().t(),
                mm: Some(v.saved_m().t()),
                am: Some(v.ct()),
                v_out: Some(tbar),
                t_out: Some(vbar),
            });
            // Ā = Ȳᵀ T, C̄ᵀ = uᵀ V̄, M̄ = T̄ᵀ V.
            s.push(Step::ColReduce {
                y: dy,
                s: v.nr(v.lay.t),
                alpha: 1.0,
                beta: if accumulate { 1.0 } else { 0.0 },
                out: V::mat(Loc::Da, d, r),
            });
            s.push(Step::ColReduce {
                y: V::mat(Loc::U, n, d),
                s: vbar,
                alpha: 1.0,
                beta: 0.0,
                out: v.ws(v.lay.cbar_t, d, r),
            });
            s.push(Step::ColReduce {
                y: tbar,
                s: v.saved_v(),
                alpha: 1.0,
                beta: 0.0,
                out: v.rr(v.lay.mbar),
            });
            tail(&mut s, &v, g, accumulate);
        }
        Kind::Merge { inverse, side } => {
            let (z, m) = (v.rr(v.lay.z), v.rr(v.lay.m));
            prelude(&mut s, &v, g, Some((z, m)), inverse);
            let sign = if inverse { -1.0 } else { 1.0 };
            match side {
                Side::Left => {
                    // W + sign (A M)(C W) with M = φ1(±Z).
                    let w = V::mat(Loc::W, d, k);
                    let q = v.ws(v.lay.q, d, r);
                    s.push(Step::ColReduce {
                        y: w,
                        s: v.ct(),
                        alpha: 1.0,
                        beta: 0.0,
                        out: v.pt(),
                    });
                    s.push(Step::SmallGemm {
                        alpha: 1.0,
                        a: v.a(),
                        b: m,
                        beta: 0.0,
                        c: q,
                    });
                    s.push(Step::MergeApply {
                        w_in: w,
                        w_out: V::mat(Loc::Out, d, k),
                        scale: sign,
                        l: q,
                        r: v.pt().t(),
                    });
                }
                Side::Right => {
                    // W + sign ((W A) M) C with M = φ1(±Z); W is k×d.
                    let w = V::mat(Loc::W, k, d);
                    let (l1, l2) = (v.pt(), v.ws(v.lay.pbar_t, k, r));
                    s.push(Step::Rows {
                        input: w,
                        base: None,
                        out: None,
                        cm: v.a().t(),
                        mm: None,
                        am: None,
                        v_out: Some(l1),
                        t_out: None,
                    });
                    s.push(Step::SmallGemm {
                        alpha: 1.0,
                        a: l1,
                        b: m,
                        beta: 0.0,
                        c: l2,
                    });
                    s.push(Step::MergeApply {
                        w_in: w,
                        w_out: V::mat(Loc::Out, k, d),
                        scale: sign,
                        l: l2,
                        r: v.ct().t(),
                    });
                }
            }
        }
        Kind::Energy { grads } => {
            prelude(&mut s, &v, g, None, false);
            let (sg, kg) = (v.rr(v.lay.s), v.rr(v.lay.k));
            s.push(Step::ColReduce {
                y: v.a(),
                s: v.a(),
                alpha: 1.0,
                beta: 0.0,
                out: sg,
            });
            s.push(Step::ColReduce {
                y: v.ct(),
                s: v.ct(),
                alpha: 1.0,
                beta: 0.0,
                out: kg,
            });
            // λ tr(S K) = λ Σ S∘K (both symmetric): a 1×r² by r²×1 product.
            s.push(Step::SmallGemm {
                alpha: g.lambda,
                a: v.ws(v.lay.s, 1, r * r),
                b: v.ws(v.lay.k, r * r, 1),
                beta: 0.0,
                c: V::mat(Loc::Energy, 1, 1),
            });
            if let Some(accumulate) = grads {
                s.push(Step::Fill {
                    v: v.ws(v.lay.cbar_t, d, r),
                    value: 0.0,
                });
                if !accumulate {
                    s.push(Step::Fill {
                        v: V::mat(Loc::Da, d, r),
                        value: 0.0,
                    });
                }
                chain(&mut s, &v, g, g.lambda, accumulate);
            }
        }
    }
    s
}
