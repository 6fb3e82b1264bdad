//! [`Adapter`] for the CPU layers ([`ElraLayer`], [`DoubleSidedLayer`], [`LoraLayer`]) on host
//! matrices, built on the reverse mode of this module: `forward` runs the functional forward
//! ([`elra_forward`], [`double_forward`], [`lora_forward`]) and keeps its tape in the layer,
//! `backward` runs the matching reverse mode on that tape and keeps the parameter gradients.
//! ELRA runs the Woodbury route (eq. 5), as Algorithm 1 does.

use nalgebra::DMatrix;

use super::double::{double_backward, double_forward};
use super::elra::{elra_backward, elra_forward, GeneratorTape, Route};
use super::generator::{FactorChain, FactorGrad};
use super::lora::{lora_backward, lora_forward};
use crate::adapter::{
    check_out, finite_output, param_spec, scalar_of, Adapter, DoubleSidedLayer, ElraLayer, Energy,
    Factors, GeneratorConfig, GeneratorSpec, HostAdapter, InputKey, LoraLayer, ParamSpec,
};
use crate::linalg::Real;
use crate::Result;

/// The parameters of one generator side: `[a, b, eta]` (no `b` for ELRA-PSD).
fn side_specs(names: [&'static str; 3], n: usize, r: usize, has_b: bool) -> Vec<ParamSpec> {
    let mut v = vec![ParamSpec::factor(names[0], n, r)];
    if has_b {
        v.push(ParamSpec::factor(names[1], r, n));
    }
    v.push(ParamSpec::step_size(names[2]));
    v
}

/// One gradient of a generator side by parameter name suffix (`a`, `b`, `eta`).
fn side_grad<T: Real>(g: &FactorGrad<T>, spec: &ParamSpec) -> DMatrix<T> {
    match spec.name.split('_').next() {
        Some("a") => g.a.clone(),
        Some("b") => g.b.clone().unwrap_or_default(),
        _ => DMatrix::from_element(1, 1, g.eta),
    }
}

/// `‖G‖²_F` (eq. 21) of one generator at the step's settings, through the same
/// [`FactorChain`] the forward builds (so the value is the forward's, bit for bit), and the
/// penalty `λ‖G‖²_F` (eq. 20) rounded as the forward's tape rounds it.
fn side_energy<T: Real>(
    a: &DMatrix<T>,
    b: Option<&DMatrix<T>>,
    eta: T,
    spec: &GeneratorSpec,
) -> Result<(f64, f64)> {
    let (_, chain) = FactorChain::new(a, b, eta, spec.eta_mult, spec.alpha, spec.tau)?;
    let f = chain.frob_sq();
    Ok((f.f64(), (f * T::of(spec.lambda)).f64()))
}

/// `‖G‖²_F` and `λ‖G‖²_F` of a generator tape (the current step's, since any change of the
/// parameters or the step discards the tape).
fn tape_energy<T: Real>(g: &GeneratorTape<T>) -> (f64, f64) {
    (g.chain.frob_sq().f64(), g.energy.f64())
}

/// The gradients of one generator side, checked finite ([`finite_output`]).
fn finite_grads<T: Real>(g: FactorGrad<T>) -> Result<FactorGrad<T>> {
    Ok(FactorGrad {
        a: finite_output("a gradient", g.a)?,
        b: g.b.map(|b| finite_output("b gradient", b)).transpose()?,
        eta: finite_output("eta gradient", DMatrix::from_element(1, 1, g.eta))?[(0, 0)],
    })
}

/// `(A, C)` of a generator tape.
fn factors<T: Real>(g: &GeneratorTape<T>) -> Factors<T> {
    (g.a.clone(), g.c.clone())
}

impl<T: Real> Adapter for ElraLayer<T> {
    type Scalar = T;
    type Matrix = DMatrix<T>;

    fn name(&self) -> &'static str {
        ElraLayer::name(self)
    }
    fn dims(&self) -> (usize, usize) {
        (self.config().d, self.config().k)
    }
    fn w0(&self) -> &DMatrix<T> {
        ElraLayer::w0(self)
    }
    fn set_w0(&mut self, w0: &DMatrix<T>) -> Result<()> {
        ElraLayer::set_w0(self, w0.clone())
    }
    fn generator(&self) -> Option<&GeneratorConfig> {
        Some(&self.config().generator)
    }
    fn params(&self) -> Vec<ParamSpec> {
        let c = self.config();
        side_specs(["a", "b", "eta"], c.d, c.r, c.generator.variant.uses_b())
    }
    fn param(&self, index: usize) -> Result<DMatrix<T>> {
        let spec = param_spec(&self.params(), index)?;
        Ok(match spec.name {
            "a" => self.a().clone(),
            "eta" => DMatrix::from_element(1, 1, self.eta()),
            _ => self.b().cloned().unwrap_or_default(),
        })
    }
    fn set_param(&mut self, index: usize, value: &DMatrix<T>) -> Result<()> {
        let spec = param_spec(&self.params(), index)?;
        match spec.name {
            "a" => self.set_a(value.clone()),
            "b" => self.set_b(value.clone()),
            _ => self.set_eta(scalar_of(&spec, value)?),
        }
    }
    fn step(&self) -> usize {
        ElraLayer::step(self)
    }
    fn set_step(&mut self, step: usize) -> Result<()> {
        ElraLayer::set_step(self, step);
        Ok(())
    }
    /// eq. 5 / Algorithm 1 lines 4–8 ([`elra_forward`], Woodbury route).
    fn forward(
        &mut self,
        x: &DMatrix<T>,
        dropout: Option<&DMatrix<T>>,
        y: &mut DMatrix<T>,
    ) -> Result<()> {
        check_out("y", y, x.nrows(), self.config().d)?;
        let (out, tape) = elra_forward(self, x, Route::Woodbury, dropout)?;
        *y = finite_output("y", out)?;
        self.train.set_tape(InputKey::of(x), tape);
        Ok(())
    }
    /// [`elra_backward`] on the kept tape (Algorithm 1 line 12).
    fn backward(&mut self, x: &DMatrix<T>, dy: &DMatrix<T>, dx: &mut DMatrix<T>) -> Result<()> {
        check_out("dx", dx, x.nrows(), self.config().k)?;
        let tape = self.train.tape_for(InputKey::of(x))?;
        let g = elra_backward(self, x, tape, dy.clone())?;
        let grads = finite_grads(FactorGrad {
            a: g.a,
            b: g.b,
            eta: g.eta,
        })?;
        *dx = finite_output("dx", g.x)?;
        self.train.set_grads(grads);
        Ok(())
    }
    fn recompute(&mut self, x: &DMatrix<T>) -> Result<()> {
        let mut y = DMatrix::zeros(x.nrows(), self.config().d);
        Adapter::forward(self, x, None, &mut y)
    }
    fn grad(&self, index: usize) -> Result<DMatrix<T>> {
        let spec = param_spec(&self.params(), index)?;
        Ok(side_grad(self.train.grads()?, &spec))
    }
    fn merge(&mut self, out: &mut DMatrix<T>) -> Result<()> {
        check_out("out", out, self.config().d, self.config().k)?;
        *out = ElraLayer::merge(self)?;
        Ok(())
    }
    fn unmerge(&mut self, w_new: &DMatrix<T>, out: &mut DMatrix<T>) -> Result<()> {
        check_out("out", out, self.config().d, self.config().k)?;
        *out = ElraLayer::unmerge(self, w_new)?;
        Ok(())
    }
    fn energy(&mut self) -> Result<Option<Energy>> {
        let (f, p) = match self.train.tape() {
            Ok(t) => tape_energy(&t.generator),
            Err(_) => side_energy(self.a(), self.b(), self.eta(), &self.spec())?,
        };
        Energy::checked(f, p)
    }
    fn generator_factors(&self) -> Result<Vec<Factors<T>>> {
        Ok(vec![factors(&self.train.tape()?.generator)])
    }
}

impl<T: Real> Adapter for DoubleSidedLayer<T> {
    type Scalar = T;
    type Matrix = DMatrix<T>;

    fn name(&self) -> &'static str {
        DoubleSidedLayer::name(self)
    }
    fn dims(&self) -> (usize, usize) {
        (self.config().d, self.config().k)
    }
    fn w0(&self) -> &DMatrix<T> {
        DoubleSidedLayer::w0(self)
    }
    fn set_w0(&mut self, w0: &DMatrix<T>) -> Result<()> {
        DoubleSidedLayer::set_w0(self, w0.clone())
    }
    fn generator(&self) -> Option<&GeneratorConfig> {
        Some(&self.config().generator)
    }
    fn params(&self) -> Vec<ParamSpec> {
        let c = self.config();
        let has_b = c.generator.variant.uses_b();
        let mut v = side_specs(["a_left", "b_left", "eta_left"], c.d, c.r_left, has_b);
        v.extend(side_specs(
            ["a_right", "b_right", "eta_right"],
            c.k,
            c.r_right,
            has_b,
        ));
        v
    }
    fn param(&self, index: usize) -> Result<DMatrix<T>> {
        let spec = param_spec(&self.params(), index)?;
        // `b_*` is listed only when the variant has it, so the `unwrap_or_default` never fires.
        Ok(match spec.name {
            "a_left" => self.a_left().clone(),
            "b_left" => self.b_left().cloned().unwrap_or_default(),
            "eta_left" => DMatrix::from_element(1, 1, self.eta_left()),
            "a_right" => self.a_right().clone(),
            "b_right" => self.b_right().cloned().unwrap_or_default(),
            _ => DMatrix::from_element(1, 1, self.eta_right()),
        })
    }
    fn set_param(&mut self, index: usize, value: &DMatrix<T>) -> Result<()> {
        let spec = param_spec(&self.params(), index)?;
        match spec.name {
            "a_left" => self.set_a_left(value.clone()),
            "b_left" => self.set_b_left(value.clone()),
            "eta_left" => self.set_eta_left(scalar_of(&spec, value)?),
            "a_right" => self.set_a_right(value.clone()),
            "b_right" => self.set_b_right(value.clone()),
            _ => self.set_eta_right(scalar_of(&spec, value)?),
        }
    }
    fn step(&self) -> usize {
        DoubleSidedLayer::step(self)
    }
    fn set_step(&mut self, step: usize) -> Result<()> {
        DoubleSidedLayer::set_step(self, step);
        Ok(())
    }
    /// App. B eq. 22 through the rows primitive twice ([`double_forward`]).
    fn forward(
        &mut self,
        x: &DMatrix<T>,
        dropout: Option<&DMatrix<T>>,
        y: &mut DMatrix<T>,
    ) -> Result<()> {
        check_out("y", y, x.nrows(), self.config().d)?;
        let (out, tape) = double_forward(self, x, dropout)?;
        *y = finite_output("y", out)?;
        self.train.set_tape(InputKey::of(x), tape);
        Ok(())
    }
    /// [`double_backward`] on the kept tape.
    fn backward(&mut self, x: &DMatrix<T>, dy: &DMatrix<T>, dx: &mut DMatrix<T>) -> Result<()> {
        check_out("dx", dx, x.nrows(), self.config().k)?;
        let tape = self.train.tape_for(InputKey::of(x))?;
        let g = double_backward(self, x, tape, dy.clone())?;
        let grads = (finite_grads(g.left)?, finite_grads(g.right)?);
        *dx = finite_output("dx", g.x)?;
        self.train.set_grads(grads);
        Ok(())
    }
    fn recompute(&mut self, x: &DMatrix<T>) -> Result<()> {
        let mut y = DMatrix::zeros(x.nrows(), self.config().d);
        Adapter::forward(self, x, None, &mut y)
    }
    fn grad(&self, index: usize) -> Result<DMatrix<T>> {
        let spec = param_spec(&self.params(), index)?;
        let (l, r) = self.train.grads()?;
        Ok(side_grad(
            if spec.name.ends_with("left") { l } else { r },
            &spec,
        ))
    }
    fn merge(&mut self, out: &mut DMatrix<T>) -> Result<()> {
        check_out("out", out, self.config().d, self.config().k)?;
        *out = DoubleSidedLayer::merge(self)?;
        Ok(())
    }
    fn unmerge(&mut self, w_new: &DMatrix<T>, out: &mut DMatrix<T>) -> Result<()> {
        check_out("out", out, self.config().d, self.config().k)?;
        *out = DoubleSidedLayer::unmerge(self, w_new)?;
        Ok(())
    }
    /// `‖L‖²_F + ‖R‖²_F` and `λ(‖L‖²_F + ‖R‖²_F)` (eq. 21 per side, eq. 20).
    fn energy(&mut self) -> Result<Option<Energy>> {
        let ((fl, pl), (fr, pr)) = match self.train.tape() {
            Ok(t) => (tape_energy(&t.left), tape_energy(&t.right)),
            Err(_) => {
                let spec = self.spec();
                (
                    side_energy(self.a_left(), self.b_left(), self.eta_left(), &spec)?,
                    side_energy(self.a_right(), self.b_right(), self.eta_right(), &spec)?,
                )
            }
        };
        Energy::checked(fl + fr, pl + pr)
    }
    fn generator_factors(&self) -> Result<Vec<Factors<T>>> {
        let t = self.train.tape()?;
        Ok(vec![factors(&t.left), factors(&t.right)])
    }
}

impl<T: Real> Adapter for LoraLayer<T> {
    type Scalar = T;
    type Matrix = DMatrix<T>;

    fn name(&self) -> &'static str {
        "lora"
    }
    fn dims(&self) -> (usize, usize) {
        (self.config().d, self.config().k)
    }
    fn w0(&self) -> &DMatrix<T> {
        LoraLayer::w0(self)
    }
    fn set_w0(&mut self, w0: &DMatrix<T>) -> Result<()> {
        LoraLayer::set_w0(self, w0.clone())
    }
    fn generator(&self) -> Option<&GeneratorConfig> {
        None
    }
    fn params(&self) -> Vec<ParamSpec> {
        let c = self.config();
        vec![
            ParamSpec::factor("lora_a", c.r, c.k),
            ParamSpec::factor("lora_b", c.d, c.r),
        ]
    }
    fn param(&self, index: usize) -> Result<DMatrix<T>> {
        let spec = param_spec(&self.params(), index)?;
        Ok(match spec.name {
            "lora_a" => self.lora_a().clone(),
            _ => self.lora_b().clone(),
        })
    }
    fn set_param(&mut self, index: usize, value: &DMatrix<T>) -> Result<()> {
        let spec = param_spec(&self.params(), index)?;
        match spec.name {
            "lora_a" => self.set_lora_a(value.clone()),
            _ => self.set_lora_b(value.clone()),
        }
    }
    /// LoRA has no schedule: always step 0.
    fn step(&self) -> usize {
        0
    }
    fn set_step(&mut self, _: usize) -> Result<()> {
        Ok(())
    }
    /// PEFT's `Linear.forward` with dropout on the increment ([`lora_forward`]).
    fn forward(
        &mut self,
        x: &DMatrix<T>,
        dropout: Option<&DMatrix<T>>,
        y: &mut DMatrix<T>,
    ) -> Result<()> {
        check_out("y", y, x.nrows(), self.config().d)?;
        let (out, tape) = lora_forward(self, x, dropout)?;
        *y = finite_output("y", out)?;
        self.train.set_tape(InputKey::of(x), tape);
        Ok(())
    }
    /// [`lora_backward`] on the kept tape.
    fn backward(&mut self, x: &DMatrix<T>, dy: &DMatrix<T>, dx: &mut DMatrix<T>) -> Result<()> {
        check_out("dx", dx, x.nrows(), self.config().k)?;
        let tape = self.train.tape_for(InputKey::of(x))?;
        let mut g = lora_backward(self, x, tape, dy.clone())?;
        let gx = std::mem::replace(&mut g.x, DMatrix::zeros(0, 0));
        g.lora_a = finite_output("lora_a gradient", g.lora_a)?;
        g.lora_b = finite_output("lora_b gradient", g.lora_b)?;
        *dx = finite_output("dx", gx)?;
        self.train.set_grads(g);
        Ok(())
    }
    fn recompute(&mut self, x: &DMatrix<T>) -> Result<()> {
        let mut y = DMatrix::zeros(x.nrows(), self.config().d);
        Adapter::forward(self, x, None, &mut y)
    }
    fn grad(&self, index: usize) -> Result<DMatrix<T>> {
        let spec = param_spec(&self.params(), index)?;
        let g = self.train.grads()?;
        Ok(match spec.name {
            "lora_a" => g.lora_a.clone(),
            _ => g.lora_b.clone(),
        })
    }
    fn merge(&mut self, out: &mut DMatrix<T>) -> Result<()> {
        check_out("out", out, self.config().d, self.config().k)?;
        *out = LoraLayer::merge(self)?;
        Ok(())
    }
    fn unmerge(&mut self, w_new: &DMatrix<T>, out: &mut DMatrix<T>) -> Result<()> {
        check_out("out", out, self.config().d, self.config().k)?;
        *out = LoraLayer::unmerge(self, w_new)?;
        Ok(())
    }
    fn energy(&mut self) -> Result<Option<Energy>> {
        Ok(None)
    }
    /// `(B', s A')`: LoRA's update `s B'A'` as a product of two factors.
    fn generator_factors(&self) -> Result<Vec<Factors<T>>> {
        self.train.tape()?;
        let s = T::of(self.config().scaling());
        Ok(vec![(self.lora_b().clone(), self.lora_a() * s)])
    }
}

impl<T: Real> HostAdapter<T> for ElraLayer<T> {
    fn apply(&self, x: &DMatrix<T>) -> Result<DMatrix<T>> {
        self.forward(x)
    }

    fn clone_box(&self) -> Box<dyn HostAdapter<T>> {
        Box::new(self.clone())
    }
}

impl<T: Real> HostAdapter<T> for DoubleSidedLayer<T> {
    fn apply(&self, x: &DMatrix<T>) -> Result<DMatrix<T>> {
        self.forward(x)
    }

    fn clone_box(&self) -> Box<dyn HostAdapter<T>> {
        Box::new(self.clone())
    }
}

impl<T: Real> HostAdapter<T> for LoraLayer<T> {
    fn apply(&self, x: &DMatrix<T>) -> Result<DMatrix<T>> {
        self.forward(x)
    }

    fn clone_box(&self) -> Box<dyn HostAdapter<T>> {
        Box::new(self.clone())
    }
}
