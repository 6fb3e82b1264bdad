//! Exponential low-rank adapters (ELRA, seed paper `000`) in the [`WeightAdapter`] interface, so
//! they train in exactly the App. G settings LoRA does.
//!
//! `W_eff = exp(G) W0` with the low-rank generator `G = A C` (`A` `d×r`, `C` `r×d`, `d` the
//! output width: the adapter acts on the output side, as in the ELRA paper), where
//! `C = η(α Aᵀ + (1−α) B)` (eq. 19, Algorithm 1 line 4) is the library's generator factor
//! ([`FactorChain`], which also carries the chain rule back to `A`, `B` and `η`):
//! * general ELRA (§3, eq. 1): `α = 0`, `G = η A B`;
//! * ELRA-PSD (§4.2.1): `α = 1`, `G = η A Aᵀ` (symmetric positive semidefinite);
//! * ELRA-Hyb (§4.2.2, eq. 19): `α` decays from 1 to 0 with the library's exponential schedule
//!   of App. H eq. (75) ([`AlphaSchedule::exponential`]: `α_t = exp(−γ t/T_warm)` for
//!   `t ≤ T_warm`, 0 after, `T_warm` = 25 % of the steps rounded to a whole step, `γ = 5`).
//!   (App. H eq. 74 writes the roles of α swapped; the main text's eq. 19 is followed: training
//!   starts PSD, see `docs/DESIGN.md`.)
//!
//! `η > 0` is trainable through `log η` (so it stays positive whatever the optimiser does).
//!
//! Evaluation uses the Woodbury form of Prop. 1, `exp(A C) = I + A φ1(C A) C`:
//! `W_eff = W0 + A (M P)` with `M = φ1(Z)`, `Z = C A` (`r×r`), `P = C W0` (`r×k`); only `r×r`
//! matrices are exponentiated. The pull-back of `W̄ = ∂L/∂W_eff` is exact reverse mode through
//! that formula (see [`Elra::pullback`](WeightAdapter::pullback)).
//!
//! **Against the lab's former copy** (until the lab was split from the library it had its own
//! `ElraVariant` and `hyb_alpha`, computing `α = exp((−γ t)/T_warm)` with a fractional `T_warm`
//! and `C = (αAᵀ + (1−α)B) η`): general ELRA and ELRA-PSD train to the same bits (their `C` is
//! `ηB` / `ηAᵀ` either way; `∂L/∂log η` is `⟨C̄, C⟩` as before). ELRA-Hyb differs in the last bits
//! of `α` and `C` during the warm-up (the library computes `exp(−γ (t/T_warm))` and
//! `η(1−α) B + ηα Aᵀ`; both agree with the copy wherever `α ∈ {0, 1}`, and `T_warm` is a whole
//! number of steps for every run made, 0.25 × {20, 1000, 1500, 3000, 5000}). Training amplifies
//! such differences where the optimum is not attained (measured in EXPERIMENTS.md's Prop. 3
//! note: docs/experiments/).
//!
//! Not used here (the ELRA paper's large-model recipe, App. H.1.1): the energy penalty
//! `λ tr(GᵀG)` (eq. 20), the spectral clip of `G`, the η multiplier, dropout and mixed
//! precision. The App. G protocol regularises through the weight-decay grid only, for every
//! method alike.
#![allow(non_snake_case)]

use super::adapter::{AdapterFamily, WeightAdapter};
use elra::adapter::schedule::{DEFAULT_GAMMA, DEFAULT_WARMUP_FRACTION};
use elra::adapter::{AlphaSchedule, Variant};
use elra::grad::FactorChain;
use elra::linalg::{check_finite, phi1, phi1_frechet_adjoint};
use elra::{ElraError, Result};
use nalgebra::DMatrix;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// `"elra"`, `"elra_psd"` or `"elra_hyb"`: the names of the ELRA variants in the App. G CSVs,
/// plots and summaries (the library's [`Variant::name`] spells them with hyphens).
pub fn csv_name(variant: Variant) -> &'static str {
    match variant {
        Variant::General => "elra",
        Variant::Psd => "elra_psd",
        Variant::Hyb => "elra_hyb",
    }
}

/// The generator rank that gives `variant` the same number of trainable matrix entries as LoRA
/// of rank `lora_rank` on a `d×d` weight (`2·R·d`): `R` for general and Hyb (`A` `d×R`, `B`
/// `R×d`), `min(2R, d)` for PSD (`A` alone, `d×2R`; ELRA paper §5: "r = 16 for ELRA-PSD" against
/// `r = 8`). Plus one scalar `η` each.
pub fn matched_rank(variant: Variant, lora_rank: usize, d: usize) -> usize {
    if variant.uses_b() {
        lora_rank
    } else {
        (2 * lora_rank).min(d)
    }
}

/// One ELRA adapter on a frozen `d×k` weight: `W_eff = exp(A C) W0`,
/// `C = η(α Aᵀ + (1−α) B)` (eq. 19).
#[derive(Debug, Clone, PartialEq)]
pub struct Elra {
    /// Which generator.
    pub variant: Variant,
    /// `A`, `d×r`.
    pub A: DMatrix<f64>,
    /// `B`, `r×d` (`r×0`, unused, for PSD).
    pub B: DMatrix<f64>,
    /// `log η` as a `1×1` matrix (a trainable parameter like the others).
    pub log_eta: DMatrix<f64>,
    /// The current interpolation weight `α ∈ [0, 1]` (fixed 0 for general, 1 for PSD; set by
    /// [`WeightAdapter::set_step`] for Hyb).
    pub alpha: f64,
    /// Hyb schedule: `T_warm / T` (App. H: 0.25).
    pub warm_fraction: f64,
    /// Hyb schedule: `γ` (App. H: 5).
    pub gamma: f64,
}

/// The intermediate matrices of the Woodbury evaluation, kept for the pull-back.
struct Fwd {
    C: DMatrix<f64>,
    chain: FactorChain<f64>,
    Z: DMatrix<f64>,
    M: DMatrix<f64>,
    P: DMatrix<f64>,
}

impl Elra {
    /// `η = exp(log η)`.
    pub fn eta(&self) -> f64 {
        self.log_eta[(0, 0)].exp()
    }

    /// The Hyb schedule for a run of `total` steps ([`AlphaSchedule::exponential`], App. H
    /// eq. 75). Errors: a warm-up fraction outside `[0, 1]`, `γ` negative or non-finite.
    pub fn schedule(&self, total: usize) -> Result<AlphaSchedule> {
        AlphaSchedule::exponential(total, self.warm_fraction, self.gamma)
    }

    /// Checks the (public) fields: shapes, finiteness, `α ∈ [0, 1]`, the schedule's parameters,
    /// and that `W0` is `d×k`.
    pub fn validate(&self, W0: &DMatrix<f64>) -> Result<()> {
        let (d, r) = self.A.shape();
        if r == 0 {
            return Err(ElraError::invalid("A", "rank r must be ≥ 1"));
        }
        if W0.nrows() != d {
            return Err(ElraError::shape("W0", (d, W0.ncols()), W0.shape()));
        }
        if self.variant.uses_b() && self.B.shape() != (r, d) {
            return Err(ElraError::shape("B", (r, d), self.B.shape()));
        }
        if self.log_eta.shape() != (1, 1) {
            return Err(ElraError::shape("log_eta", (1, 1), self.log_eta.shape()));
        }
        check_finite("A", &self.A)?;
        check_finite("B", &self.B)?;
        check_finite("log_eta", &self.log_eta)?;
        check_finite("W0", W0)?;
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(ElraError::invalid("alpha", "must be in [0, 1]"));
        }
        self.schedule(1)?;
        if !self.eta().is_finite() || self.eta() <= 0.0 {
            return Err(ElraError::invalid(
                "log_eta",
                "η = exp(log η) must be finite and > 0",
            ));
        }
        Ok(())
    }

    /// `α` of the generator: 1 for PSD, the current `alpha` otherwise.
    fn alpha_now(&self) -> f64 {
        if self.variant.uses_b() {
            self.alpha
        } else {
            1.0
        }
    }

    /// `C = η(α Aᵀ + (1−α) B)` and its chain (eq. 19; the library's [`FactorChain`], no η
    /// multiplier, no clip).
    fn factor(&self) -> Result<(DMatrix<f64>, FactorChain<f64>)> {
        let b = self.variant.uses_b().then_some(&self.B);
        FactorChain::new(&self.A, b, self.eta(), 1.0, self.alpha_now(), None)
    }

    /// The dense generator `G = A C` (`d×d`; for reports and tests only — training never forms
    /// it).
    ///
    /// Errors: invalid factors (see [`Elra::validate`]).
    pub fn generator(&self) -> Result<DMatrix<f64>> {
        Ok(&self.A * self.factor()?.0)
    }

    fn forward(&self, W0: &DMatrix<f64>) -> Result<Fwd> {
        self.validate(W0)?;
        let (C, chain) = self.factor()?;
        let Z = &C * &self.A;
        let M = phi1(&Z)?;
        let P = &C * W0;
        Ok(Fwd { C, chain, Z, M, P })
    }
}

impl WeightAdapter for Elra {
    fn rank(&self) -> usize {
        self.A.ncols()
    }

    /// `W_eff = exp(A C) W0 = W0 + A (φ1(C A) (C W0))` (Prop. 1, Woodbury form; eq. 4).
    fn effective_weight(&self, W0: &DMatrix<f64>) -> Result<DMatrix<f64>> {
        let f = self.forward(W0)?;
        Ok(W0 + &self.A * (&f.M * &f.P))
    }

    /// Exact reverse mode through `W_eff = W0 + A K`, `K = M P`, `M = φ1(Z)`, `Z = C A`,
    /// `P = C W0`: with `W̄ = ∂L/∂W_eff`, `Ā = W̄ Kᵀ`, `K̄ = Aᵀ W̄`, `M̄ = K̄ Pᵀ`, `P̄ = Mᵀ K̄`,
    /// `C̄ = P̄ W0ᵀ`, `Z̄ = L_φ1(Z)*(M̄) = L_φ1(Zᵀ, M̄)` ([`phi1_frechet_adjoint`]), `C̄ += Z̄ Aᵀ`,
    /// `Ā += Cᵀ Z̄`; then through `C = η(αAᵀ + (1−α)B)` by the library's
    /// [`FactorChain::backward`] (`Ā += ηα C̄ᵀ`, `B̄ = η(1−α) C̄`), and
    /// `∂L/∂log η = η ∂L/∂η = ⟨C̄, C⟩`. Returned in the order of [`WeightAdapter::params`]:
    /// `[Ā, B̄, ∂log η]` (PSD: `[Ā, ∂log η]`).
    fn pullback(&self, W0: &DMatrix<f64>, d_weff: &DMatrix<f64>) -> Result<Vec<DMatrix<f64>>> {
        if d_weff.shape() != W0.shape() {
            return Err(ElraError::shape("d_weff", W0.shape(), d_weff.shape()));
        }
        check_finite("d_weff", d_weff)?;
        let f = self.forward(W0)?;
        let K = &f.M * &f.P;
        let mut dA = d_weff * K.transpose();
        let dK = self.A.transpose() * d_weff;
        let dM = &dK * f.P.transpose();
        let dP = f.M.transpose() * &dK;
        let mut dC = dP * W0.transpose();
        let dZ = phi1_frechet_adjoint(&f.Z, &dM)?;
        dC += &dZ * self.A.transpose();
        dA += f.C.transpose() * &dZ;
        // ∂L/∂log η = η ∂L/∂η = ⟨C̄, C⟩ (C is linear in η). Taken from C̄ and C directly: the
        // chain's ∂L/∂η = ⟨C̄, C⟩/η times η would round twice more (see the module docs).
        let d_log_eta = DMatrix::from_element(1, 1, dC.dot(&f.C));
        let g = f.chain.backward(&self.A, dA, dC)?;
        Ok(match g.b {
            None => vec![g.a, d_log_eta],
            Some(dB) => vec![g.a, dB, d_log_eta],
        })
    }

    fn params(&self) -> Vec<&DMatrix<f64>> {
        if self.variant.uses_b() {
            vec![&self.A, &self.B, &self.log_eta]
        } else {
            vec![&self.A, &self.log_eta]
        }
    }

    fn params_mut(&mut self) -> Vec<&mut DMatrix<f64>> {
        if self.variant.uses_b() {
            vec![&mut self.A, &mut self.B, &mut self.log_eta]
        } else {
            vec![&mut self.A, &mut self.log_eta]
        }
    }

    /// Hyb: `α ← α_step` of the library's schedule for a run of `total` steps (App. H eq. 75);
    /// general and PSD keep their fixed `α`. An invalid schedule (hand-edited fields) leaves `α`
    /// as it is; [`Elra::validate`] reports it at the next evaluation.
    fn set_step(&mut self, step: usize, total: usize) {
        if self.variant == Variant::Hyb {
            if let Ok(s) = self.schedule(total) {
                self.alpha = self.variant.alpha_at(&s, step);
            }
        }
    }
}

/// Creates [`Elra`] adapters. Initialisation (chosen for the `D = 16` models of App. G, see
/// EXPERIMENTS.md): `A` i.i.d. `N(0, σ²)` with `σ = 0.5/(√d + √r)` unless `init_std` is given,
/// so `‖A‖₂ ≈ σ(√d + √r) = 0.5` (Gordon's bound) and the initial PSD generator `η AAᵀ` has
/// spectral norm ≈ 0.25 at `η0 = 1`; `B = 0`, so general ELRA starts exactly at `W0` as LoRA does
/// (Hu et al.: one factor zero); `η = η0`; Hyb starts at `α = 1` (PSD), general at `α = 0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ElraFamily {
    /// Generator family.
    pub variant: Variant,
    /// Initial `η` (> 0). The ELRA paper uses 1e-3 with Xavier `A`, `B` in `d ≈ 4096` layers;
    /// here 1 (see the type's docs and EXPERIMENTS.md).
    pub eta0: f64,
    /// `σ` of `A`'s entries; `None`: `0.5/(√d + √r)`.
    pub init_std: Option<f64>,
    /// Hyb: `T_warm / T` (App. H eq. 75: 0.25).
    pub warm_fraction: f64,
    /// Hyb: `γ` (App. H eq. 75: 5).
    pub gamma: f64,
    /// Interpret the rank handed to [`AdapterFamily::init`] as a LoRA rank and use
    /// [`matched_rank`] (matched trainable parameters); `false`: use it as is.
    pub match_lora_params: bool,
}

impl ElraFamily {
    /// The App. G defaults for `variant`: `η0 = 1`, default `σ`, the library's default schedule
    /// (`T_warm = 25 %`, `γ = 5`), parameter-matched rank.
    pub fn new(variant: Variant) -> Self {
        ElraFamily {
            variant,
            eta0: 1.0,
            init_std: None,
            warm_fraction: DEFAULT_WARMUP_FRACTION,
            gamma: DEFAULT_GAMMA,
            match_lora_params: true,
        }
    }
}

impl AdapterFamily for ElraFamily {
    type Adapter = Elra;

    fn name(&self) -> String {
        csv_name(self.variant).to_string()
    }

    fn init(&self, W0: &DMatrix<f64>, rank: usize, rng: &mut ChaCha8Rng) -> Result<Elra> {
        let d = W0.nrows();
        if rank == 0 || rank > d {
            return Err(ElraError::invalid(
                "rank",
                format!("must be in [1, {d}], got {rank}"),
            ));
        }
        if !(self.eta0.is_finite() && self.eta0 > 0.0) {
            return Err(ElraError::invalid("eta0", "must be finite and > 0"));
        }
        let r = if self.match_lora_params {
            matched_rank(self.variant, rank, d)
        } else {
            rank
        };
        let std = self
            .init_std
            .unwrap_or(0.5 / ((d as f64).sqrt() + (r as f64).sqrt()));
        let normal =
            Normal::new(0.0, std).map_err(|e| ElraError::invalid("init_std", e.to_string()))?;
        let A = DMatrix::from_fn(d, r, |_, _| normal.sample(rng));
        let (B, alpha) = match self.variant {
            Variant::General => (DMatrix::zeros(r, d), 0.0),
            Variant::Psd => (DMatrix::zeros(r, 0), 1.0),
            Variant::Hyb => (DMatrix::zeros(r, d), 1.0),
        };
        let a = Elra {
            variant: self.variant,
            A,
            B,
            log_eta: DMatrix::from_element(1, 1, self.eta0.ln()),
            alpha,
            warm_fraction: self.warm_fraction,
            gamma: self.gamma,
        };
        a.schedule(1)?;
        Ok(a)
    }
}
