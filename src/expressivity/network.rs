//! Exact reverse mode for the three model families ([`LinearModel`], [`Fnn`], [`Tfn`]) behind
//! one trait, so a trainer can treat their weights as a flat list of "slots".
//!
//! [`Network::vjp`] returns the gradient of `⟨dY, f(X)⟩` with respect to every weight and bias
//! (a vector–Jacobian product); [`mse_loss_and_grads`] builds the gradient of the per-entry mean
//! squared error (PyTorch's `nn.MSELoss`, the loss App. G trains with) on top of it.
#![allow(non_snake_case)]

use super::fnn::{affine, relu_mut, Fnn};
use super::linear::LinearModel;
use super::tfn::{attention_backward, to_position_major, Tfn};
use crate::{ElraError, Result};
use nalgebra::{DMatrix, DVector};

/// Gradients of a scalar with respect to every weight and bias of a [`Network`], in the order of
/// [`Network::weights`] and [`Network::biases`].
#[derive(Debug, Clone, PartialEq)]
pub struct Grads {
    /// `∂/∂W` for each weight slot.
    pub weights: Vec<DMatrix<f64>>,
    /// `∂/∂b` for each bias slot.
    pub biases: Vec<DVector<f64>>,
}

/// A model whose weights (all `D×D`) and biases form flat, ordered lists of slots, with an
/// exact reverse mode.
pub trait Network: Clone + Send + Sync + std::fmt::Debug {
    /// Width `D`.
    fn dim(&self) -> usize;
    /// Rows of the input batch per sample: 1 for [`LinearModel`] and [`Fnn`], `seq_len` for
    /// [`Tfn`] (a sample is a sequence).
    fn rows_per_sample(&self) -> usize;
    /// Human-readable names of the weight slots (`"W1"`, `"l1.h2.Q"`, …).
    fn weight_names(&self) -> Vec<String>;
    /// The weight slots.
    fn weights(&self) -> Vec<&DMatrix<f64>>;
    /// The bias slots.
    fn biases(&self) -> Vec<&DVector<f64>>;
    /// The weight and bias slots, mutable, at the same time (for an optimiser step).
    #[allow(clippy::type_complexity)]
    fn params_mut(&mut self) -> (Vec<&mut DMatrix<f64>>, Vec<&mut DVector<f64>>);
    /// The weight slots, mutable.
    fn weights_mut(&mut self) -> Vec<&mut DMatrix<f64>> {
        self.params_mut().0
    }
    /// The bias slots, mutable.
    fn biases_mut(&mut self) -> Vec<&mut DVector<f64>> {
        self.params_mut().1
    }
    /// The forward pass on a batch whose rows are samples (tokens for [`Tfn`]).
    fn forward(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>>;
    /// Reverse mode: the gradient of `⟨dy, f(x)⟩ = Σ dy ⊙ f(x)` w.r.t. every weight and bias.
    fn vjp(&self, x: &DMatrix<f64>, dy: &DMatrix<f64>) -> Result<Grads>;
    /// The per-entry MSE between `f(x)` and `y` and its gradient with respect to every weight
    /// and bias ([`mse_loss_and_grads`]); a model may override it to share one forward pass
    /// between the loss and the reverse mode.
    fn mse_loss_and_grads(&self, x: &DMatrix<f64>, y: &DMatrix<f64>) -> Result<(f64, Grads)> {
        let (loss, dy) = mse_and_seed(&self.forward(x)?, y)?;
        Ok((loss, self.vjp(x, &dy)?))
    }
    /// The weight slots that carry adapters in the paper's setting (every layer for linear
    /// models and FNNs — §2.1; attention weights, `W_2L` and `W_o` for TFNs — Thm. 6).
    fn adapted_slots(&self) -> Vec<usize>;
}

/// Per-entry mean squared error `‖A − B‖_F² / (rows·cols)` (PyTorch's `nn.MSELoss`).
///
/// Errors: shape mismatch, empty input.
pub fn mse(a: &DMatrix<f64>, b: &DMatrix<f64>) -> Result<f64> {
    if a.shape() != b.shape() {
        return Err(ElraError::shape("b", a.shape(), b.shape()));
    }
    if a.is_empty() {
        return Err(ElraError::invalid("a", "empty batch"));
    }
    Ok((a - b).norm_squared() / a.len() as f64)
}

/// The per-entry MSE between `net(x)` and `y` and its gradient with respect to every weight and
/// bias (`∂L/∂f = 2 (f − y) / (rows·cols)`, then [`Network::vjp`]).
///
/// Errors: shape mismatch; [`ElraError::NonFinite`] if the loss is not finite.
pub fn mse_loss_and_grads<N: Network>(
    net: &N,
    x: &DMatrix<f64>,
    y: &DMatrix<f64>,
) -> Result<(f64, Grads)> {
    raise_allocator_reuse_threshold();
    net.mse_loss_and_grads(x, y)
}

/// The per-entry MSE of `f` against `y` and the reverse-mode seed `∂L/∂f = 2 (f − y) /
/// (rows·cols)`. Errors: shape mismatch; [`ElraError::NonFinite`] if the loss is not finite.
fn mse_and_seed(f: &DMatrix<f64>, y: &DMatrix<f64>) -> Result<(f64, DMatrix<f64>)> {
    let loss = mse(f, y)?;
    if !loss.is_finite() {
        return Err(ElraError::NonFinite { arg: "loss" });
    }
    Ok((loss, (f - y) * (2.0 / y.len() as f64)))
}

/// A training step allocates and frees a few dozen `(B·N)×D` matrices (≈ 0.3 MB each at
/// App. G's sizes). With glibc's default allocator settings such blocks are served by `mmap`
/// or by heap growth that is trimmed again on free, so every step re-faults ≈ 15 MB of fresh
/// pages (measured: 40 % of a TFN step in the kernel). glibc raises its (process-wide) mmap
/// threshold to the size of any mmap-served block that is freed (up to 32 MB) and keeps twice
/// that much at the top of the heap before trimming; allocating and freeing one 16 MB block, once
/// per process, moves both thresholds past this working set. Other allocators are unaffected.
fn raise_allocator_reuse_threshold() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| drop(std::hint::black_box(Vec::<u8>::with_capacity(16 << 20))));
}

fn col_sums(m: &DMatrix<f64>) -> DVector<f64> {
    DVector::from_fn(m.ncols(), |j, _| m.column(j).sum())
}

fn check_dy(y_shape: (usize, usize), dy: &DMatrix<f64>) -> Result<()> {
    if dy.shape() != y_shape {
        return Err(ElraError::shape("dy", y_shape, dy.shape()));
    }
    Ok(())
}

impl Network for LinearModel {
    fn dim(&self) -> usize {
        LinearModel::dim(self)
    }
    fn rows_per_sample(&self) -> usize {
        1
    }
    fn weight_names(&self) -> Vec<String> {
        (1..=self.layers()).map(|l| format!("W{l}")).collect()
    }
    fn weights(&self) -> Vec<&DMatrix<f64>> {
        self.weights.iter().collect()
    }
    fn biases(&self) -> Vec<&DVector<f64>> {
        Vec::new()
    }
    fn params_mut(&mut self) -> (Vec<&mut DMatrix<f64>>, Vec<&mut DVector<f64>>) {
        (self.weights.iter_mut().collect(), Vec::new())
    }
    fn forward(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>> {
        LinearModel::forward(self, x)
    }
    fn vjp(&self, x: &DMatrix<f64>, dy: &DMatrix<f64>) -> Result<Grads> {
        self.validate()?;
        let d = LinearModel::dim(self);
        if x.ncols() != d {
            return Err(ElraError::shape("x", (x.nrows(), d), x.shape()));
        }
        check_dy((x.nrows(), d), dy)?;
        let mut acts = vec![x.clone()];
        for w in &self.weights {
            let next = acts.last().expect("non-empty") * w.transpose();
            acts.push(next);
        }
        let mut g = dy.clone();
        let mut gw = vec![DMatrix::zeros(0, 0); self.layers()];
        for l in (0..self.layers()).rev() {
            gw[l] = g.tr_mul(&acts[l]);
            g = &g * &self.weights[l];
        }
        Ok(Grads {
            weights: gw,
            biases: Vec::new(),
        })
    }
    fn adapted_slots(&self) -> Vec<usize> {
        (0..self.layers()).collect()
    }
}

impl Network for Fnn {
    fn dim(&self) -> usize {
        Fnn::dim(self)
    }
    fn rows_per_sample(&self) -> usize {
        1
    }
    fn weight_names(&self) -> Vec<String> {
        (1..=self.layers()).map(|l| format!("W{l}")).collect()
    }
    fn weights(&self) -> Vec<&DMatrix<f64>> {
        self.weights.iter().collect()
    }
    fn biases(&self) -> Vec<&DVector<f64>> {
        self.biases.iter().collect()
    }
    fn params_mut(&mut self) -> (Vec<&mut DMatrix<f64>>, Vec<&mut DVector<f64>>) {
        (
            self.weights.iter_mut().collect(),
            self.biases.iter_mut().collect(),
        )
    }
    fn forward(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>> {
        Fnn::forward(self, x)
    }
    fn vjp(&self, x: &DMatrix<f64>, dy: &DMatrix<f64>) -> Result<Grads> {
        self.validate()?;
        let d = Fnn::dim(self);
        if x.ncols() != d {
            return Err(ElraError::shape("x", (x.nrows(), d), x.shape()));
        }
        check_dy((x.nrows(), d), dy)?;
        // acts[l] = input of layer l; pre[l] = its pre-activation.
        let mut acts = vec![x.clone()];
        let mut pre = Vec::with_capacity(self.layers());
        for (w, b) in self.weights.iter().zip(&self.biases) {
            let u = affine(acts.last().expect("non-empty"), w, b);
            let mut z = u.clone();
            relu_mut(&mut z);
            pre.push(u);
            acts.push(z);
        }
        let mut g = dy.clone();
        let mut gw = vec![DMatrix::zeros(0, 0); self.layers()];
        let mut gb = vec![DVector::zeros(0); self.layers()];
        for l in (0..self.layers()).rev() {
            g.zip_apply(&pre[l], |gi, ui| {
                if ui <= 0.0 {
                    *gi = 0.0
                }
            });
            gw[l] = g.tr_mul(&acts[l]);
            gb[l] = col_sums(&g);
            g = &g * &self.weights[l];
        }
        Ok(Grads {
            weights: gw,
            biases: gb,
        })
    }
    fn adapted_slots(&self) -> Vec<usize> {
        (0..self.layers()).collect()
    }
}

/// Row-wise softmax backward: `dT = Y ⊙ (dY − rowsum(dY ⊙ Y))`.
fn softmax_rows_backward(y: &DMatrix<f64>, dy: &DMatrix<f64>) -> DMatrix<f64> {
    let mut dt = dy.clone();
    for i in 0..y.nrows() {
        let s = y.row(i).dot(&dy.row(i));
        for j in 0..y.ncols() {
            dt[(i, j)] = y[(i, j)] * (dy[(i, j)] - s);
        }
    }
    dt
}

impl Tfn {
    /// Number of weight slots per block (`4H + 2`).
    fn slots_per_block(&self) -> usize {
        4 * self.heads() + 2
    }

    /// Flat weight index of `W_Q^h` (`part = 0`), `W_K^h` (1), `W_V^h` (2), `W_O^h` (3) of block
    /// `l`; `W_1l` is `head_slot(l, H, 0)`, `W_2l` is `+1`.
    fn head_slot(&self, l: usize, h: usize, part: usize) -> usize {
        l * self.slots_per_block() + 4 * h + part
    }

    /// Reverse mode from a position-major forward pass ([`Tfn::forward_pm`]): the gradient of
    /// `⟨dY, f(X)⟩` with respect to every weight and bias, `dY` position-major too.
    fn backward_pm(
        &self,
        caches: &[super::tfn::BlockCache],
        zl: &DMatrix<f64>,
        y: &DMatrix<f64>,
        dy: &DMatrix<f64>,
    ) -> Grads {
        let n = self.seq_len;
        let nslots = self.layers() * self.slots_per_block() + 1;
        let mut gw = vec![DMatrix::zeros(0, 0); nslots];
        let mut gb = vec![DVector::zeros(0); 2 * self.layers()];
        // Output layer: Y = softmax_rows(Z_L W_oᵀ).
        let dt = softmax_rows_backward(y, dy);
        gw[nslots - 1] = dt.transpose() * zl;
        let mut dz = &dt * &self.Wo;
        for l in (0..self.layers()).rev() {
            let (c, b) = (&caches[l], &self.blocks[l]);
            // Z_l = H W_2ᵀ + 1 b_2ᵀ.
            let w2 = self.head_slot(l, self.heads(), 1);
            gw[w2] = dz.tr_mul(&c.h);
            gb[2 * l + 1] = col_sums(&dz);
            let mut du = &dz * &b.W2;
            du.zip_apply(&c.u, |g, u| {
                if u <= 0.0 {
                    *g = 0.0
                }
            });
            // U = A W_1ᵀ + 1 b_1ᵀ.
            gw[w2 - 1] = du.tr_mul(&c.attn);
            gb[2 * l] = col_sums(&du);
            let dattn = &du * &b.W1;
            let mut dzin = DMatrix::zeros(c.z_in.nrows(), c.z_in.ncols());
            for (h, head) in b.heads.iter().enumerate() {
                // A += (P V) W_Oᵀ.
                gw[self.head_slot(l, h, 3)] = dattn.tr_mul(&c.pv[h]);
                let dpv = &dattn * &head.O;
                // PV = P V, P = softmax_rows(S), S = Q Kᵀ per sequence.
                let (dq, dk, dv) = attention_backward(&c.p[h], &c.q[h], &c.k[h], &c.v[h], &dpv, n);
                // q = Z W_Qᵀ, k = Z W_Kᵀ, v = Z W_Vᵀ.
                gw[self.head_slot(l, h, 0)] = dq.tr_mul(&c.z_in);
                gw[self.head_slot(l, h, 1)] = dk.tr_mul(&c.z_in);
                gw[self.head_slot(l, h, 2)] = dv.tr_mul(&c.z_in);
                dzin += &dq * &head.Q + &dk * &head.K + &dv * &head.V;
            }
            dz = dzin;
        }
        Grads {
            weights: gw,
            biases: gb,
        }
    }
}

impl Network for Tfn {
    fn dim(&self) -> usize {
        Tfn::dim(self)
    }
    fn rows_per_sample(&self) -> usize {
        self.seq_len
    }
    fn weight_names(&self) -> Vec<String> {
        let mut v = Vec::new();
        for l in 1..=self.layers() {
            for h in 1..=self.heads() {
                for p in ["Q", "K", "V", "O"] {
                    v.push(format!("l{l}.h{h}.{p}"));
                }
            }
            v.push(format!("l{l}.W1"));
            v.push(format!("l{l}.W2"));
        }
        v.push("Wo".to_string());
        v
    }
    fn weights(&self) -> Vec<&DMatrix<f64>> {
        let mut v = Vec::new();
        for b in &self.blocks {
            for h in &b.heads {
                v.extend([&h.Q, &h.K, &h.V, &h.O]);
            }
            v.push(&b.W1);
            v.push(&b.W2);
        }
        v.push(&self.Wo);
        v
    }
    fn biases(&self) -> Vec<&DVector<f64>> {
        self.blocks.iter().flat_map(|b| [&b.b1, &b.b2]).collect()
    }
    fn params_mut(&mut self) -> (Vec<&mut DMatrix<f64>>, Vec<&mut DVector<f64>>) {
        let mut w = Vec::new();
        let mut bs = Vec::new();
        for b in &mut self.blocks {
            let super::tfn::Block {
                heads,
                W1,
                b1,
                W2,
                b2,
            } = b;
            for h in heads {
                w.extend([&mut h.Q, &mut h.K, &mut h.V, &mut h.O]);
            }
            w.push(W1);
            w.push(W2);
            bs.push(b1);
            bs.push(b2);
        }
        w.push(&mut self.Wo);
        (w, bs)
    }
    fn forward(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>> {
        Tfn::forward(self, x)
    }
    fn vjp(&self, x: &DMatrix<f64>, dy: &DMatrix<f64>) -> Result<Grads> {
        self.check_input(x)?;
        check_dy(x.shape(), dy)?;
        let n = self.seq_len;
        let (caches, zl, y) = self.forward_pm(&to_position_major(x, n));
        Ok(self.backward_pm(&caches, &zl, &y, &to_position_major(dy, n)))
    }
    fn mse_loss_and_grads(&self, x: &DMatrix<f64>, y: &DMatrix<f64>) -> Result<(f64, Grads)> {
        self.check_input(x)?;
        check_dy(x.shape(), y)?;
        // One forward pass serves the loss and the reverse mode (the per-entry MSE does not
        // depend on the order of rows, so it is taken in the position-major order).
        let n = self.seq_len;
        let (caches, zl, f) = self.forward_pm(&to_position_major(x, n));
        let (loss, dy) = mse_and_seed(&f, &to_position_major(y, n))?;
        Ok((loss, self.backward_pm(&caches, &zl, &f, &dy)))
    }
    fn adapted_slots(&self) -> Vec<usize> {
        let mut v = Vec::new();
        for l in 0..self.layers() {
            for h in 0..self.heads() {
                for p in 0..4 {
                    v.push(self.head_slot(l, h, p));
                }
            }
        }
        v.push(self.head_slot(self.layers() - 1, self.heads(), 1));
        v.push(self.layers() * self.slots_per_block());
        v
    }
}

/// The flat weight-slot index of a [`TfnSlot`](super::tfn::TfnSlot) in [`Network::weights`]
/// order for a model with `heads` heads.
pub fn tfn_slot_index(slot: super::tfn::TfnSlot, layers: usize, heads: usize) -> usize {
    use super::tfn::TfnSlot::*;
    let per = 4 * heads + 2;
    match slot {
        Q(l, h) => l * per + 4 * h,
        K(l, h) => l * per + 4 * h + 1,
        V(l, h) => l * per + 4 * h + 2,
        O(l, h) => l * per + 4 * h + 3,
        W1(l) => l * per + 4 * heads,
        W2(l) => l * per + 4 * heads + 1,
        Wo => layers * per,
    }
}
