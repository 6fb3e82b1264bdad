//! App. F — transformer networks with multi-head attention, no skip connections and no layer
//! norm (§3.1), and the construction of Theorem 6 / Corollary 20.
//!
//! Block `l` (paper, tokens as columns of `Z ∈ ℝ^{D×N}`):
//! `Attn_l(Z) = Σ_h W_O^h W_V^h Z · softmax((W_K^h Z)ᵀ W_Q^h Z)` (softmax column-wise),
//! `Z_l = W_2l ReLU(W_1l Attn_l(Z_{l−1}) + b_1l 1ᵀ) + b_2l 1ᵀ`, output `softmax(W_o Z_L)`.
//!
//! Here tokens are **rows** (the crate convention): a sequence is `Z ∈ ℝ^{N×D}` (the paper's
//! `Zᵀ`), the score matrix is `S = (Z W_Qᵀ)(Z W_Kᵀ)ᵀ` with `S[j, i] = q_j·k_i` (the transpose of
//! the paper's `(W_K Z)ᵀ W_Q Z`), so the paper's column-wise softmax is a row-wise softmax of
//! `S`, the head output is `softmax(S) (Z W_Vᵀ) W_Oᵀ`, and the model output is the row-wise
//! `softmax(Z_L W_oᵀ)`. There is no `1/√D` scaling (the paper has none).
#![allow(non_snake_case)]

use super::fnn::{affine, relu_mut};
use super::linear::{lemma_9, ProductApprox};
use super::{bias_uniform, check_square, check_vec, standard_normal, CheckedLu, LowRank};
use crate::adapter::xavier_uniform;
use crate::{ElraError, Result};
use nalgebra::{DMatrix, DVector};
use rand_chacha::ChaCha8Rng;

/// One attention head's weights, each `D×D`.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// Query weight `W_Q^h`.
    pub Q: DMatrix<f64>,
    /// Key weight `W_K^h`.
    pub K: DMatrix<f64>,
    /// Value weight `W_V^h`.
    pub V: DMatrix<f64>,
    /// Output projection `W_O^h`.
    pub O: DMatrix<f64>,
}

/// One transformer block: multi-head attention then the token-wise feed-forward
/// `W_2 ReLU(W_1 · + b_1) + b_2`.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// The heads `h = 1..H`.
    pub heads: Vec<Head>,
    /// First feed-forward weight `W_1l`.
    pub W1: DMatrix<f64>,
    /// First feed-forward bias `b_1l`.
    pub b1: DVector<f64>,
    /// Second feed-forward weight `W_2l`.
    pub W2: DMatrix<f64>,
    /// Second feed-forward bias `b_2l`.
    pub b2: DVector<f64>,
}

/// `TFN_{L,D}` of §3.1: `L` blocks and the output layer `softmax(W_o ·)`.
///
/// `forward` takes a batch of sequences stacked as rows: `X` is `(B·seq_len)×D`, rows
/// `[s·seq_len, (s+1)·seq_len)` being the tokens of sequence `s`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tfn {
    /// Blocks `l = 1..L`.
    pub blocks: Vec<Block>,
    /// Output weight `W_o`.
    pub Wo: DMatrix<f64>,
    /// Tokens per sequence `N` (how `forward` splits the rows of its input).
    pub seq_len: usize,
}

/// Row-wise softmax (numerically stable: the row maximum is subtracted), computed a column at a
/// time (the matrix is column-major, so every pass is a contiguous sweep).
pub(crate) fn softmax_rows(s: &DMatrix<f64>) -> DMatrix<f64> {
    let mut p = s.clone();
    let rows = p.nrows();
    softmax_across_slices(p.as_mut_slice(), rows);
    p
}

/// Softmax across the consecutive slices of length `len` of `data`, separately for each
/// position within a slice: for every `t < len`, `data[i·len + t]` over `i` becomes
/// `exp(x_i − max) / Σ exp(x_j − max)`. Every pass is a contiguous sweep of length `len`. Serves
/// the row-wise softmax of a column-major matrix (slices = columns) and the attention softmax
/// of [`attention_forward`] (slices = key positions, `len` = sequences).
fn softmax_across_slices(data: &mut [f64], len: usize) {
    if len == 0 {
        return;
    }
    let mut m = vec![f64::NEG_INFINITY; len];
    for sl in data.chunks_exact(len) {
        for (mi, &x) in m.iter_mut().zip(sl) {
            *mi = mi.max(x);
        }
    }
    let mut z = vec![0.0; len];
    for sl in data.chunks_exact_mut(len) {
        for ((x, &mi), zi) in sl.iter_mut().zip(&m).zip(z.iter_mut()) {
            *x = exp_nonpos(*x - mi);
            *zi += *x;
        }
    }
    for sl in data.chunks_exact_mut(len) {
        for (x, &zi) in sl.iter_mut().zip(&z) {
            *x /= zi;
        }
    }
}

/// `eˣ` for `x ≤ 0`, returning 0 directly below the underflow threshold (saturated softmax
/// rows are common with the N(0,1) attention weights of App. G.3, and libm's underflow path is
/// slow).
#[inline]
fn exp_nonpos(x: f64) -> f64 {
    if x < -745.2 {
        0.0
    } else {
        x.exp()
    }
}

/// Rows of a sequence-major batch (`row = s·N + j`, token `j` of sequence `s`) reordered
/// position-major (`row = j·B + s`), the layout of the attention core below: for a fixed feature
/// and position the `B` sequences are contiguous, so every attention operation is a
/// vectorisable sweep of length `B` instead of a loop of length `N`. Every other operation of
/// the model is token-wise, so the order of rows does not matter to it.
pub(crate) fn to_position_major(x: &DMatrix<f64>, n: usize) -> DMatrix<f64> {
    let b = x.nrows() / n;
    DMatrix::from_fn(x.nrows(), x.ncols(), |r, c| x[((r % b) * n + r / b, c)])
}

/// The inverse of [`to_position_major`].
pub(crate) fn from_position_major(x: &DMatrix<f64>, n: usize) -> DMatrix<f64> {
    let b = x.nrows() / n;
    DMatrix::from_fn(x.nrows(), x.ncols(), |r, c| x[((r % n) * b + r / n, c)])
}

/// `o += x ⊙ y` over one contiguous sweep.
#[inline]
fn fma_into(o: &mut [f64], x: &[f64], y: &[f64]) {
    for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
        *o += x * y;
    }
}

/// The attention core of one head on a position-major batch of `B` sequences of `N` tokens
/// (§3.1, tokens as rows): `S[j, i] = q_j·k_i`, `P = softmax_i(S)`, `PV_j = Σ_i P[j, i] v_i`.
/// Returns `P` (entry `(j, i)` of sequence `s` at `(j·N + i)·B + s`) and `PV` (position-major,
/// like `q`, `k`, `v`).
pub(crate) fn attention_forward(
    q: &DMatrix<f64>,
    k: &DMatrix<f64>,
    v: &DMatrix<f64>,
    n: usize,
) -> (Vec<f64>, DMatrix<f64>) {
    let (rows, d) = q.shape();
    let b = rows / n;
    let (qs, ks, vs) = (q.as_slice(), k.as_slice(), v.as_slice());
    let at = |c: usize, j: usize| c * rows + j * b..c * rows + (j + 1) * b;
    let mut p = vec![0.0; n * n * b];
    for j in 0..n {
        let pj = &mut p[j * n * b..(j + 1) * n * b];
        for i in 0..n {
            let sji = &mut pj[i * b..(i + 1) * b];
            for c in 0..d {
                fma_into(sji, &qs[at(c, j)], &ks[at(c, i)]);
            }
        }
        // Row-wise softmax over i, for all sequences at once.
        softmax_across_slices(pj, b);
    }
    let mut pv = DMatrix::zeros(rows, d);
    let pvs = pv.as_mut_slice();
    for c in 0..d {
        for j in 0..n {
            let o = &mut pvs[at(c, j)];
            for i in 0..n {
                fma_into(o, &p[(j * n + i) * b..(j * n + i + 1) * b], &vs[at(c, i)]);
            }
        }
    }
    (p, pv)
}

/// Reverse mode of [`attention_forward`]: from `dPV` (position-major) the gradients
/// `(dQ, dK, dV)`: `dP[j, i] = dPV_j·v_i`, `dv_i = Σ_j P[j, i] dPV_j`,
/// `dS[j, i] = P[j, i] (dP[j, i] − Σ_i' dP[j, i'] P[j, i'])` (softmax), `dq_j = Σ_i dS[j, i] k_i`,
/// `dk_i = Σ_j dS[j, i] q_j`.
pub(crate) fn attention_backward(
    p: &[f64],
    q: &DMatrix<f64>,
    k: &DMatrix<f64>,
    v: &DMatrix<f64>,
    dpv: &DMatrix<f64>,
    n: usize,
) -> (DMatrix<f64>, DMatrix<f64>, DMatrix<f64>) {
    let (rows, d) = q.shape();
    let b = rows / n;
    let (qs, ks, vs, gs) = (q.as_slice(), k.as_slice(), v.as_slice(), dpv.as_slice());
    let at = |c: usize, j: usize| c * rows + j * b..c * rows + (j + 1) * b;
    let pat = |j: usize, i: usize| (j * n + i) * b..(j * n + i + 1) * b;
    let mut dq = DMatrix::zeros(rows, d);
    let mut dk = DMatrix::zeros(rows, d);
    let mut dv = DMatrix::zeros(rows, d);
    let (dqs, dks, dvs) = (dq.as_mut_slice(), dk.as_mut_slice(), dv.as_mut_slice());
    // One query position j at a time: row j of dS (all sequences) is all the scratch needed.
    let mut ds = vec![0.0; n * b];
    let mut r = vec![0.0; b];
    for j in 0..n {
        ds.fill(0.0);
        for (i, o) in ds.chunks_exact_mut(b).enumerate() {
            for c in 0..d {
                fma_into(o, &gs[at(c, j)], &vs[at(c, i)]);
            }
        }
        r.fill(0.0);
        for (i, o) in ds.chunks_exact(b).enumerate() {
            fma_into(&mut r, o, &p[pat(j, i)]);
        }
        for (i, o) in ds.chunks_exact_mut(b).enumerate() {
            for ((o, &pp), &r) in o.iter_mut().zip(&p[pat(j, i)]).zip(&r) {
                *o = pp * (*o - r);
            }
        }
        for c in 0..d {
            let o = &mut dqs[at(c, j)];
            for (i, dsi) in ds.chunks_exact(b).enumerate() {
                fma_into(o, dsi, &ks[at(c, i)]);
            }
            let qcj = &qs[at(c, j)];
            let gcj = &gs[at(c, j)];
            for (i, dsi) in ds.chunks_exact(b).enumerate() {
                fma_into(&mut dks[at(c, i)], dsi, qcj);
                fma_into(&mut dvs[at(c, i)], &p[pat(j, i)], gcj);
            }
        }
    }
    (dq, dk, dv)
}

/// Intermediate values of one block's forward pass, kept for the reverse mode.
#[derive(Debug, Clone)]
pub(crate) struct BlockCache {
    /// Block input `Z_{l−1}`.
    pub z_in: DMatrix<f64>,
    /// Per head: projected queries, keys, values (all tokens).
    pub q: Vec<DMatrix<f64>>,
    pub k: Vec<DMatrix<f64>>,
    pub v: Vec<DMatrix<f64>>,
    /// Per head: attention probabilities `softmax(S)` of every sequence, `P[j, i]` of sequence
    /// `s` at `(j·N + i)·B + s` (see [`attention_forward`]).
    pub p: Vec<Vec<f64>>,
    /// Per head: `softmax(S) V` for all tokens (before `W_O`).
    pub pv: Vec<DMatrix<f64>>,
    /// Attention output `Σ_h (P V) W_Oᵀ`.
    pub attn: DMatrix<f64>,
    /// Pre-activation `attn W_1ᵀ + b_1`.
    pub u: DMatrix<f64>,
    /// `ReLU(u)`.
    pub h: DMatrix<f64>,
}

impl Block {
    fn dim(&self) -> usize {
        self.W1.nrows()
    }

    /// One block on a position-major batch (see [`to_position_major`]), every intermediate
    /// kept for the reverse mode.
    pub(crate) fn forward_cached(
        &self,
        z: &DMatrix<f64>,
        seq_len: usize,
    ) -> (DMatrix<f64>, BlockCache) {
        let d = self.dim();
        let rows = z.nrows();
        let mut attn = DMatrix::zeros(rows, d);
        let (mut qs, mut ks, mut vs, mut ps, mut pvs) = (vec![], vec![], vec![], vec![], vec![]);
        for head in &self.heads {
            let q = z * head.Q.transpose();
            let k = z * head.K.transpose();
            let v = z * head.V.transpose();
            let (p_h, pv) = attention_forward(&q, &k, &v, seq_len);
            attn += &pv * head.O.transpose();
            qs.push(q);
            ks.push(k);
            vs.push(v);
            ps.push(p_h);
            pvs.push(pv);
        }
        let u = affine(&attn, &self.W1, &self.b1);
        let mut h = u.clone();
        relu_mut(&mut h);
        let out = affine(&h, &self.W2, &self.b2);
        (
            out,
            BlockCache {
                z_in: z.clone(),
                q: qs,
                k: ks,
                v: vs,
                p: ps,
                pv: pvs,
                attn,
                u,
                h,
            },
        )
    }
}

impl Tfn {
    /// A model from its parts. Errors: no blocks or heads, unequal head counts, shape mismatch,
    /// non-finite entries, `seq_len = 0`.
    pub fn new(blocks: Vec<Block>, Wo: DMatrix<f64>, seq_len: usize) -> Result<Self> {
        let m = Tfn {
            blocks,
            Wo,
            seq_len,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks the invariants (≥ 1 block, ≥ 1 head, equal head counts, `D×D` weights with
    /// `D ≥ 1`, length-`D` biases, finite entries, `seq_len ≥ 1`); every public function taking a
    /// model calls it, since the fields are public.
    pub fn validate(&self) -> Result<()> {
        if self.seq_len == 0 {
            return Err(ElraError::invalid("seq_len", "must be ≥ 1"));
        }
        let d = self.Wo.nrows();
        if d == 0 {
            return Err(ElraError::invalid("Wo", "width must be ≥ 1"));
        }
        check_square("Wo", &self.Wo, d)?;
        let first = self
            .blocks
            .first()
            .ok_or_else(|| ElraError::invalid("blocks", "a TFN needs ≥ 1 block"))?;
        let nh = first.heads.len();
        if nh == 0 {
            return Err(ElraError::invalid("blocks", "a block needs ≥ 1 head"));
        }
        for b in &self.blocks {
            if b.heads.len() != nh {
                return Err(ElraError::invalid(
                    "blocks",
                    "every block needs the same number of heads",
                ));
            }
            for h in &b.heads {
                for m in [&h.Q, &h.K, &h.V, &h.O] {
                    check_square("blocks.heads", m, d)?;
                }
            }
            check_square("blocks.W1", &b.W1, d)?;
            check_square("blocks.W2", &b.W2, d)?;
            check_vec("blocks.b1", &b.b1, d)?;
            check_vec("blocks.b2", &b.b2, d)?;
        }
        Ok(())
    }

    /// A random model as in App. G.3: attention weights standard normal, feed-forward and output
    /// weights Xavier uniform, biases `U(−1/√D, 1/√D)` (PyTorch's `nn.Linear` default).
    pub fn random(
        d: usize,
        layers: usize,
        heads: usize,
        seq_len: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        if d == 0 || layers == 0 || heads == 0 || seq_len == 0 {
            return Err(ElraError::invalid("d/layers/heads/seq_len", "must be ≥ 1"));
        }
        let blocks = (0..layers)
            .map(|_| {
                let heads = (0..heads)
                    .map(|_| Head {
                        Q: standard_normal(d, d, rng),
                        K: standard_normal(d, d, rng),
                        V: standard_normal(d, d, rng),
                        O: standard_normal(d, d, rng),
                    })
                    .collect();
                let W1 = xavier_uniform(rng, d, d);
                let b1 = bias_uniform(d, d, rng);
                let W2 = xavier_uniform(rng, d, d);
                let b2 = bias_uniform(d, d, rng);
                Block {
                    heads,
                    W1,
                    b1,
                    W2,
                    b2,
                }
            })
            .collect();
        let Wo = xavier_uniform(rng, d, d);
        Ok(Tfn {
            blocks,
            Wo,
            seq_len,
        })
    }

    /// Embedding size `D`.
    pub fn dim(&self) -> usize {
        self.Wo.nrows()
    }

    /// Number of blocks `L`.
    pub fn layers(&self) -> usize {
        self.blocks.len()
    }

    /// Number of heads `H`.
    pub fn heads(&self) -> usize {
        self.blocks.first().map_or(0, |b| b.heads.len())
    }

    pub(crate) fn check_input(&self, x: &DMatrix<f64>) -> Result<()> {
        self.validate()?;
        let d = self.dim();
        if x.ncols() != d || x.nrows() % self.seq_len != 0 {
            return Err(ElraError::Shape {
                arg: "x",
                expected: format!("(B·{})×{d}", self.seq_len),
                got: format!("{}×{}", x.nrows(), x.ncols()),
            });
        }
        Ok(())
    }

    /// Forward pass on a **position-major** batch (see [`to_position_major`]) with every
    /// intermediate kept: (block caches, `Z_L`, output), all position-major. The input must have
    /// passed [`Tfn::check_input`].
    pub(crate) fn forward_pm(
        &self,
        xp: &DMatrix<f64>,
    ) -> (Vec<BlockCache>, DMatrix<f64>, DMatrix<f64>) {
        let mut z = xp.clone();
        let mut caches = Vec::with_capacity(self.layers());
        for b in &self.blocks {
            let (out, c) = b.forward_cached(&z, self.seq_len);
            caches.push(c);
            z = out;
        }
        let y = softmax_rows(&(&z * self.Wo.transpose()));
        (caches, z, y)
    }

    /// `softmax(W_o Z_L)` for a batch of sequences (`(B·seq_len)×D`, tokens as rows; §3.1).
    pub fn forward(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>> {
        self.check_input(x)?;
        let (_, _, y) = self.forward_pm(&to_position_major(x, self.seq_len));
        Ok(from_position_major(&y, self.seq_len))
    }

    /// The output layer's logits `W_o Z_L` (before the softmax), tokens as rows. Theorem 6's
    /// construction matches these exactly, not only their softmax.
    pub fn logits(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>> {
        self.check_input(x)?;
        let (_, zl, _) = self.forward_pm(&to_position_major(x, self.seq_len));
        Ok(from_position_major(
            &(zl * self.Wo.transpose()),
            self.seq_len,
        ))
    }
}

/// Which weight of a [`Tfn`] an adapter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TfnSlot {
    /// `W_Q^h` of block `l` (0-based `(l, h)`).
    Q(usize, usize),
    /// `W_K^h` of block `l`.
    K(usize, usize),
    /// `W_V^h` of block `l`.
    V(usize, usize),
    /// `W_O^h` of block `l`.
    O(usize, usize),
    /// `W_1l`.
    W1(usize),
    /// `W_2l`.
    W2(usize),
    /// `W_o`.
    Wo,
}

/// The adapted TFN of Theorem 6 and its parameters.
#[derive(Debug, Clone)]
pub struct TfnConstruction {
    /// The adapted model.
    pub model: Tfn,
    /// The non-zero-by-construction adapters `(ΔW_K^h, ΔW_Q^h, ΔW_V^h, ΔW_O^h)` of every block,
    /// `ΔW_2L` and `ΔW_o`, each with rank budget `R`; all other adapters are `O`.
    pub adapters: Vec<(TfnSlot, LowRank)>,
    /// The Lemma 9 problems solved, with a label (`"l1.h1.KQ"`, `"l1.h1.OV"`, `"out"`).
    pub approx: Vec<(String, ProductApprox)>,
}

/// Theorem 6 (App. F.2) / Corollary 20: rank-`R` adapters on the attention weights of every
/// block, on `W_2L` and on `W_o`, plus updated biases, built as in the proof:
/// * block `l`: `b̂_1l = b̄_1l` (eq. 23/25); with `C = W̄_{2,l−1} W_{2,l−1}⁻¹` (`C = I` for
///   `l = 1`), Lemma 9 on `[W_Q^h, W_K^hᵀ]` for the target `Cᵀ W̄_K^hᵀ W̄_Q^h C` and on
///   `[W_V^h, W_O^h]` for `W_1l⁻¹ W̄_1l W̄_O^h W̄_V^h C`;
/// * `b̂_2l = W_2l W̄_2l⁻¹ b̄_2l` for `l < L` (eq. 22/24);
/// * output: Lemma 9 on `[W_2L, W_o]` for `W̄_o W̄_2L`, and `b̂_2L = (W_o+ΔW_o)⁻¹ W̄_o b̄_2L`.
///
/// With `R ≥ max_i ⌈G_i/2⌉` (random models: `R ≥ ⌈D/2⌉`) the adapted model equals the target
/// for every input. For smaller `R` the same recipe gives the (inexact) construction plotted in
/// App. G.3.
///
/// Errors: `rank ∉ [1, D]`, mismatched architectures, and [`ElraError::Numerical`] when an
/// inverse the proof needs does not exist (Assumption 4: `W_1l`, `W_2l`, `W̄_2l`, the Lemma 9
/// matrices, `W_o + ΔW_o`).
pub fn construct(frozen: &Tfn, target: &Tfn, rank: usize) -> Result<TfnConstruction> {
    frozen.validate()?;
    target.validate()?;
    let d = frozen.dim();
    if rank == 0 || rank > d {
        return Err(ElraError::invalid(
            "rank",
            format!("must be in [1, D = {d}], got {rank}"),
        ));
    }
    if target.dim() != d || target.layers() != frozen.layers() || target.heads() != frozen.heads() {
        return Err(ElraError::invalid(
            "target",
            "must have the frozen model's width, depth and number of heads (Thm. 6)",
        ));
    }
    let L = frozen.layers();
    let mut model = frozen.clone();
    let mut adapters = Vec::new();
    let mut approx = Vec::new();
    for l in 0..L {
        let fb = &frozen.blocks[l];
        let tb = &target.blocks[l];
        // C = W̄_{2,l−1} W_{2,l−1}⁻¹ = (W_{2,l−1}⁻ᵀ W̄_{2,l−1}ᵀ)ᵀ.
        let C = if l == 0 {
            DMatrix::identity(d, d)
        } else {
            let lu = CheckedLu::new(
                "frozen",
                &format!("frozen W_2 of block {l} (Assumption 4)"),
                &frozen.blocks[l - 1].W2,
            )?;
            lu.solve_transpose(&target.blocks[l - 1].W2.transpose())?
                .transpose()
        };
        let lu_w1 = CheckedLu::new(
            "frozen",
            &format!("frozen W_1 of block {} (Assumption 4)", l + 1),
            &fb.W1,
        )?;
        let w1inv_w1bar = lu_w1.solve(&tb.W1)?;
        for (h, (fh, th)) in fb.heads.iter().zip(&tb.heads).enumerate() {
            // Query and key: (W_K + ΔW_K)ᵀ (W_Q + ΔW_Q) = Cᵀ W̄_Kᵀ W̄_Q C.
            let t_qk = C.transpose() * th.K.transpose() * &th.Q * &C;
            let qk = lemma_9(&[fh.Q.clone(), fh.K.transpose()], &t_qk, rank)?;
            let dq = qk.adapters[0].clone();
            let dk = qk.adapters[1].transposed();
            // Value and output projection: (W_O + ΔW_O)(W_V + ΔW_V) = W_1⁻¹ W̄_1 W̄_O W̄_V C.
            let t_ov = &w1inv_w1bar * &th.O * &th.V * &C;
            let ov = lemma_9(&[fh.V.clone(), fh.O.clone()], &t_ov, rank)?;
            let dv = ov.adapters[0].clone();
            let dout = ov.adapters[1].clone();
            let mh = &mut model.blocks[l].heads[h];
            mh.Q += dq.dense()?;
            mh.K += dk.dense()?;
            mh.V += dv.dense()?;
            mh.O += dout.dense()?;
            adapters.push((TfnSlot::Q(l, h), dq));
            adapters.push((TfnSlot::K(l, h), dk));
            adapters.push((TfnSlot::V(l, h), dv));
            adapters.push((TfnSlot::O(l, h), dout));
            approx.push((format!("l{}.h{}.KQ", l + 1, h + 1), qk));
            approx.push((format!("l{}.h{}.OV", l + 1, h + 1), ov));
        }
        model.blocks[l].b1 = tb.b1.clone();
        if l + 1 < L {
            // b̂_2l = W_2l W̄_2l⁻¹ b̄_2l.
            let lu_t = CheckedLu::new(
                "target",
                &format!("target W̄_2 of block {} (Assumption 4)", l + 1),
                &tb.W2,
            )?;
            let y = lu_t.solve(&DMatrix::from_column_slice(d, 1, tb.b2.as_slice()))?;
            model.blocks[l].b2 = DVector::from_column_slice((&fb.W2 * y).as_slice());
        } else {
            // Output layer: (W_o + ΔW_o)(W_2L + ΔW_2L) = W̄_o W̄_2L.
            let t_out = &target.Wo * &tb.W2;
            let out = lemma_9(&[fb.W2.clone(), frozen.Wo.clone()], &t_out, rank)?;
            let d2 = out.adapters[0].clone();
            let dwo = out.adapters[1].clone();
            model.blocks[l].W2 = out.adapted[0].clone();
            model.Wo = out.adapted[1].clone();
            let lu_o = CheckedLu::new(
                "frozen",
                "W_o + ΔW_o (the proof of Thm. 6 inverts it to align b̂_2L)",
                &model.Wo,
            )?;
            let rhs = &target.Wo * DMatrix::from_column_slice(d, 1, tb.b2.as_slice());
            model.blocks[l].b2 = DVector::from_column_slice(lu_o.solve(&rhs)?.as_slice());
            adapters.push((TfnSlot::W2(l), d2));
            adapters.push((TfnSlot::Wo, dwo));
            approx.push(("out".to_string(), out));
        }
    }
    Ok(TfnConstruction {
        model,
        adapters,
        approx,
    })
}

/// The rank-based functionality gaps `G_1, …, G_{L+1}` of Theorem 6 (numerical ranks).
///
/// Errors: mismatched architectures; [`ElraError::Numerical`] if an SVD fails.
pub fn functionality_gaps(frozen: &Tfn, target: &Tfn) -> Result<Vec<usize>> {
    frozen.validate()?;
    target.validate()?;
    let d = frozen.dim();
    if target.dim() != d || target.layers() != frozen.layers() || target.heads() != frozen.heads() {
        return Err(ElraError::invalid(
            "target",
            "architecture differs from the frozen model's",
        ));
    }
    let rank = |m: &DMatrix<f64>| -> Result<usize> {
        Ok(super::SortedSvd::new("gap", m)?.numerical_rank())
    };
    let L = frozen.layers();
    let mut g = Vec::with_capacity(L + 1);
    for l in 0..L {
        let (fb, tb) = (&frozen.blocks[l], &target.blocks[l]);
        let mut gl = 0;
        for (fh, th) in fb.heads.iter().zip(&tb.heads) {
            let (qk, ov) = if l == 0 {
                (
                    th.K.transpose() * &th.Q - fh.K.transpose() * &fh.Q,
                    &tb.W1 * &th.O * &th.V - &fb.W1 * &fh.O * &fh.V,
                )
            } else {
                let (f2, t2) = (&frozen.blocks[l - 1].W2, &target.blocks[l - 1].W2);
                (
                    t2.transpose() * th.K.transpose() * &th.Q * t2
                        - f2.transpose() * fh.K.transpose() * &fh.Q * f2,
                    &tb.W1 * &th.O * &th.V * t2 - &fb.W1 * &fh.O * &fh.V * f2,
                )
            };
            gl = gl.max(rank(&qk)?).max(rank(&ov)?);
        }
        g.push(gl);
    }
    let last = L - 1;
    g.push(rank(
        &(&target.Wo * &target.blocks[last].W2 - &frozen.Wo * &frozen.blocks[last].W2),
    )?);
    Ok(g)
}
