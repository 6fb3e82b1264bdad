//! The pluggable adapter parameterisation: a per-layer effective weight `W_eff(θ; W0)` and the
//! pull-back `∂L/∂W_eff ↦ ∂L/∂θ`. LoRA (`W_eff = W0 + B A`, Hu et al. 2021) is implemented here;
//! ELRA (`W_eff = exp(G) W0`, [`super::elra_adapter`]) plugs into the same trait.
#![allow(non_snake_case)]

use elra::{ElraError, Result};
use nalgebra::DMatrix;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// An adapter on one frozen weight `W0`: parameters `θ` (a list of matrices), the effective
/// weight `W_eff(θ; W0)`, and the chain rule through it.
pub trait WeightAdapter: Clone + Send + Sync + std::fmt::Debug {
    /// The rank budget `r` of the adapter.
    fn rank(&self) -> usize;
    /// `W_eff(θ; W0)`.
    fn effective_weight(&self, W0: &DMatrix<f64>) -> Result<DMatrix<f64>>;
    /// `∂L/∂θ` from `∂L/∂W_eff`, in the order of [`WeightAdapter::params`].
    fn pullback(&self, W0: &DMatrix<f64>, d_weff: &DMatrix<f64>) -> Result<Vec<DMatrix<f64>>>;
    /// The parameters `θ`.
    fn params(&self) -> Vec<&DMatrix<f64>>;
    /// The parameters `θ`, mutable (the optimiser updates them in place).
    fn params_mut(&mut self) -> Vec<&mut DMatrix<f64>>;
    /// Tells the adapter that training step `step` of `total` comes next (`step = total`: training
    /// is over). Adapters with a schedule (ELRA-Hyb's `α_t`, ELRA App. H eq. 75) update it here;
    /// the default does nothing.
    fn set_step(&mut self, _step: usize, _total: usize) {}
}

/// A family of adapters: how to create one for a frozen weight at a given rank.
pub trait AdapterFamily: Send + Sync {
    /// The adapter type.
    type Adapter: WeightAdapter;
    /// A short name for reports and CSV files (`"lora"`, `"elra"`).
    fn name(&self) -> String;
    /// A fresh adapter for frozen weight `W0` with rank budget `rank`.
    fn init(&self, W0: &DMatrix<f64>, rank: usize, rng: &mut ChaCha8Rng) -> Result<Self::Adapter>;
}

/// LoRA (Hu et al. 2021, eq. 3): `W_eff = W0 + B A`, `B` `d_out×r`, `A` `r×d_in`.
#[derive(Debug, Clone, PartialEq)]
pub struct Lora {
    /// `B`, `d_out×r` (zero at initialisation).
    pub B: DMatrix<f64>,
    /// `A`, `r×d_in` (Gaussian at initialisation).
    pub A: DMatrix<f64>,
}

impl WeightAdapter for Lora {
    fn rank(&self) -> usize {
        self.A.nrows()
    }

    /// `W0 + B A`.
    fn effective_weight(&self, W0: &DMatrix<f64>) -> Result<DMatrix<f64>> {
        if self.B.ncols() != self.A.nrows() {
            return Err(ElraError::shape(
                "A",
                (self.B.ncols(), self.A.ncols()),
                self.A.shape(),
            ));
        }
        if W0.shape() != (self.B.nrows(), self.A.ncols()) {
            return Err(ElraError::shape(
                "W0",
                (self.B.nrows(), self.A.ncols()),
                W0.shape(),
            ));
        }
        Ok(W0 + &self.B * &self.A)
    }

    /// `∂L/∂B = (∂L/∂W) Aᵀ`, `∂L/∂A = Bᵀ (∂L/∂W)`.
    fn pullback(&self, W0: &DMatrix<f64>, d_weff: &DMatrix<f64>) -> Result<Vec<DMatrix<f64>>> {
        if self.B.ncols() != self.A.nrows() {
            return Err(ElraError::shape(
                "A",
                (self.B.ncols(), self.A.ncols()),
                self.A.shape(),
            ));
        }
        if d_weff.shape() != W0.shape() || W0.shape() != (self.B.nrows(), self.A.ncols()) {
            return Err(ElraError::shape(
                "d_weff",
                (self.B.nrows(), self.A.ncols()),
                d_weff.shape(),
            ));
        }
        Ok(vec![
            d_weff * self.A.transpose(),
            self.B.transpose() * d_weff,
        ])
    }

    fn params(&self) -> Vec<&DMatrix<f64>> {
        vec![&self.B, &self.A]
    }

    fn params_mut(&mut self) -> Vec<&mut DMatrix<f64>> {
        vec![&mut self.B, &mut self.A]
    }
}

/// Creates [`Lora`] adapters as Hu et al. do: `B = 0`, `A` i.i.d. `N(0, σ²)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraFamily {
    /// `σ` of `A`'s entries; `None` means `1/√d_in` (= 0.25 at `D = 16`, the value the
    /// paper's released code uses).
    pub init_std: Option<f64>,
}

impl AdapterFamily for LoraFamily {
    type Adapter = Lora;

    fn name(&self) -> String {
        "lora".to_string()
    }

    fn init(&self, W0: &DMatrix<f64>, rank: usize, rng: &mut ChaCha8Rng) -> Result<Lora> {
        let (d_out, d_in) = W0.shape();
        if rank == 0 || rank > d_out.min(d_in) {
            return Err(ElraError::invalid(
                "rank",
                format!("must be in [1, {}], got {rank}", d_out.min(d_in)),
            ));
        }
        let std = self.init_std.unwrap_or(1.0 / (d_in as f64).sqrt());
        let normal =
            Normal::new(0.0, std).map_err(|e| ElraError::invalid("init_std", e.to_string()))?;
        Ok(Lora {
            B: DMatrix::zeros(d_out, rank),
            A: DMatrix::from_fn(rank, d_in, |_, _| normal.sample(rng)),
        })
    }
}
