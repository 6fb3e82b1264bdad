//! Tests of the plans of the functional GPU calls without a GPU: every [`Step`] is run on the CPU
//! in f64 exactly as its kernel's stated formula (the kernels themselves are tested against the
//! same formulas in the host emulation, `tests/cuda_skinny_emu.rs` and `tests/cuda_phi1.rs`), and
//! the result of each plan is compared with the CPU functional operation of [`crate::ops`] at the
//! same inputs. This checks the composition — which kernel reads which view of which buffer,
//! transposes, offsets, the workspace layout, the accumulate/overwrite rule, the memsets — and,
//! per step, that every view lies inside its buffer, has the layout its kernel needs, and that
//! no output overlaps an input it may not alias.

use std::collections::HashMap;

use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::plan::{plan, saved_len, GenParams, Kind, Layout, Loc, Step, V};
use crate::adapter::{GeneratorSpec, Variant};
use crate::grad::ops::{Op, Strided, StridedMut};
use crate::linalg::{phi1, phi1_frechet_adjoint};
use crate::ops::{self, Base, ElraOp, Generator, GeneratorGrads, Side};

/// The buffers of one interpreted call, row-major f64 (`Ones` is a buffer of its own, as the
/// executor lends it; the reduction partials, φ1 work matrices and statuses are implicit).
struct Mem {
    bufs: HashMap<Loc, Vec<f64>>,
    lay: Layout,
}

impl Mem {
    fn get(&self, v: &V) -> &Vec<f64> {
        let b = self
            .bufs
            .get(&v.loc)
            .unwrap_or_else(|| panic!("{:?} not bound", v.loc));
        assert!(v.rows > 0 && v.cols > 0, "{v:?}: empty view");
        assert!(
            v.end() <= b.len(),
            "{v:?} outside its buffer of {}",
            b.len()
        );
        if v.loc == Loc::Ws {
            assert!(v.end() <= self.lay.len, "{v:?} past the workspace layout");
        }
        b
    }
    fn at(&self, v: &V, i: usize, j: usize) -> f64 {
        self.get(v)[v.off + i * v.s0 + j * v.s1]
    }
    fn read(&self, v: &V) -> DMatrix<f64> {
        self.get(v);
        DMatrix::from_fn(v.rows, v.cols, |i, j| self.at(v, i, j))
    }
    fn write(&mut self, v: &V, m: &DMatrix<f64>) {
        assert_eq!((v.rows, v.cols), m.shape(), "{v:?}");
        self.get(v);
        let b = self.bufs.get_mut(&v.loc).expect("bound");
        for i in 0..v.rows {
            for j in 0..v.cols {
                b[v.off + i * v.s0 + j * v.s1] = m[(i, j)];
            }
        }
    }
}

/// The element range a view spans in its buffer.
fn span(v: &V) -> (Loc, usize, usize) {
    (v.loc, v.off, v.end())
}

/// Panics when output `o` overlaps input `i` (different views of the same memory).
fn disjoint(o: &V, i: &V, what: &str) {
    let (lo, a0, a1) = span(o);
    let (li, b0, b1) = span(i);
    assert!(
        lo != li || a1 <= b0 || b1 <= a0,
        "{what}: output {o:?} overlaps input {i:?}"
    );
}

/// Rows-kernel operands must have contiguous rows (`s1 = 1`); v/t outputs dense N×r.
fn rows_contig(v: &V, what: &str) {
    assert!(
        v.s1 == 1 || v.cols == 1,
        "{what}: {v:?} rows not contiguous"
    );
}

/// Runs one step by its kernel's formula.
fn step(mem: &mut Mem, s: &Step) {
    match *s {
        Step::Fill { v, value } => {
            assert!(v.dense(), "fill of a strided view {v:?}");
            mem.write(&v, &DMatrix::from_element(v.rows, v.cols, value as f64));
        }
        Step::FactorC {
            a,
            b,
            eta,
            mult,
            alpha,
            ct,
        } => {
            for x in [&a, &ct] {
                assert!(x.dense(), "factor_c: {x:?}");
            }
            let (a_m, eta_v) = (mem.read(&a), mem.at(&eta, 0, 0));
            let e = eta_v * mult as f64;
            let al = alpha as f64;
            let mut c = DMatrix::zeros(a.rows, a.cols);
            if let Some(b) = b {
                assert!(b.dense());
                c = mem.read(&b).transpose() * (e * (1.0 - al));
            }
            if alpha > 0.0 {
                c += a_m * (e * al);
            }
            disjoint(&ct, &a, "factor_c");
            mem.write(&ct, &c);
        }
        Step::ColReduce {
            y,
            s,
            alpha,
            beta,
            out,
        } => {
            rows_contig(&y, "col_reduce y");
            assert_eq!(
                (y.rows, s.rows, out.rows, out.cols),
                (s.rows, y.rows, y.cols, s.cols)
            );
            disjoint(&out, &y, "col_reduce");
            disjoint(&out, &s, "col_reduce");
            let mut o = mem.read(&y).transpose() * mem.read(&s) * alpha as f64;
            if beta != 0.0 {
                o += mem.read(&out) * beta as f64;
            }
            mem.write(&out, &o);
        }
        Step::Rows {
            input,
            base,
            out,
            cm,
            mm,
            am,
            v_out,
            t_out,
        } => {
            rows_contig(&input, "rows input");
            let x = mem.read(&input);
            let v = x * mem.read(&cm).transpose();
            let t = match mm {
                Some(mm) => &v * mem.read(&mm).transpose(),
                None => v.clone(),
            };
            for (o, val) in [(v_out, &v), (t_out, &t)] {
                if let Some(o) = o {
                    assert!(o.dense() && o.cols == cm.rows, "rows v/t output {o:?}");
                    for i in [Some(input), base, Some(cm), mm, am].into_iter().flatten() {
                        disjoint(&o, &i, "rows v/t");
                    }
                    mem.write(&o, val);
                }
            }
            if let Some(out) = out {
                rows_contig(&out, "rows out");
                let am = am.expect("am with out");
                let mut y = &t * mem.read(&am).transpose();
                if let Some(b) = base {
                    rows_contig(&b, "rows base");
                    y += mem.read(&b);
                }
                for i in [cm, am].into_iter().chain(mm) {
                    disjoint(&out, &i, "rows out");
                }
                mem.write(&out, &y);
            } else {
                assert!(base.is_none() && am.is_none());
            }
        }
        Step::Gemm {
            a,
            ta,
            b,
            tb,
            beta,
            c,
        } => {
            for x in [&a, &b, &c] {
                assert!(
                    x.dense() && x.off == 0 && x.loc.is_act(),
                    "gemm operand {x:?}"
                );
            }
            let op = |m: DMatrix<f64>, t: bool| if t { m.transpose() } else { m };
            let mut r = op(mem.read(&a), ta) * op(mem.read(&b), tb);
            if beta != 0.0 {
                r += mem.read(&c) * beta as f64;
            }
            disjoint(&c, &a, "gemm");
            disjoint(&c, &b, "gemm");
            mem.write(&c, &r);
        }
        Step::MergeApply {
            w_in,
            w_out,
            scale,
            l,
            r,
        } => {
            rows_contig(&w_in, "merge w_in");
            rows_contig(&w_out, "merge w_out");
            assert!(w_in == w_out || w_in.loc != w_out.loc, "partial alias");
            disjoint(&w_out, &l, "merge");
            disjoint(&w_out, &r, "merge");
            let o = mem.read(&w_in) + mem.read(&l) * mem.read(&r) * scale as f64;
            mem.write(&w_out, &o);
        }
        Step::SmallGemm {
            alpha,
            a,
            b,
            beta,
            c,
        } => {
            disjoint(&c, &a, "small_gemm");
            disjoint(&c, &b, "small_gemm");
            let mut o = mem.read(&a) * mem.read(&b) * alpha as f64;
            if beta != 0.0 {
                o += mem.read(&c) * beta as f64;
            }
            mem.write(&c, &o);
        }
        Step::Phi { z, e, m, status } => {
            assert!(status < 2);
            for x in [&e, &m] {
                disjoint(x, &z, "phi");
            }
            let zm = mem.read(&z);
            mem.write(&m, &phi1(&zm).expect("φ1"));
            mem.write(&e, &crate::linalg::expm(&zm).expect("exp"));
        }
        Step::Adjoint { z, g, out, status } => {
            assert!(status < 2);
            disjoint(&out, &z, "adjoint");
            disjoint(&out, &g, "adjoint");
            let r = phi1_frechet_adjoint(&mem.read(&z), &mem.read(&g)).expect("adjoint");
            mem.write(&out, &r);
        }
        Step::FactorBackward {
            a,
            ct,
            s,
            k,
            lambda,
            alpha,
            eta,
            mult,
            abar,
            cbar_t,
            bbar,
            etabar,
            accumulate,
        } => {
            for x in [&a, &ct, &abar, &cbar_t, &s, &k] {
                assert!(x.dense(), "factor_backward {x:?}");
            }
            let (am, ctm) = (mem.read(&a), mem.read(&ct));
            let mut ab = mem.read(&abar);
            let mut cb = mem.read(&cbar_t);
            if lambda > 0.0 {
                let two = 2.0 * lambda as f64;
                ab += &am * mem.read(&k) * two;
                cb += &ctm * mem.read(&s) * two;
            }
            let e = mem.at(&eta, 0, 0) * mult as f64;
            let al = alpha as f64;
            if alpha > 0.0 {
                ab += &cb * (e * al);
            }
            mem.write(&abar, &ab);
            mem.write(&cbar_t, &cb);
            if let Some(bb) = bbar {
                assert!(bb.dense());
                let mut g = cb.transpose() * (e * (1.0 - al));
                if accumulate {
                    g += mem.read(&bb);
                }
                mem.write(&bb, &g);
            }
            let dot: f64 = cb.iter().zip(ctm.iter()).map(|(x, y)| x * y).sum();
            let mut ge = dot / e * mult as f64;
            if accumulate {
                ge += mem.at(&etabar, 0, 0);
            }
            mem.write(&etabar, &DMatrix::from_element(1, 1, ge));
        }
    }
}

fn run(mem: &mut Mem, steps: &[Step]) {
    for s in steps {
        step(mem, s);
    }
}

// ---------------------------------------------------------------------------------------------
// Plans against the CPU functional operations
// ---------------------------------------------------------------------------------------------

fn rand_mat(rows: usize, cols: usize, scale: f64, rng: &mut ChaCha8Rng) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |_, _| rng.random_range(-1.0..1.0) * scale)
}

fn flat(m: &DMatrix<f64>) -> Vec<f64> {
    (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
        .collect()
}

fn rel(g: &DMatrix<f64>, c: &DMatrix<f64>) -> f64 {
    assert!(g.iter().all(|x| x.is_finite()), "non-finite plan output");
    (g - c).norm() / c.norm().max(1e-300)
}

/// One problem: `W0`, `x`, `∂y`, `u`, factors and a bias; spec values exact in f32.
struct Problem {
    op: ElraOp,
    w0: DMatrix<f64>,
    x: DMatrix<f64>,
    dy: DMatrix<f64>,
    u: DMatrix<f64>,
    bias: DMatrix<f64>,
    a: DMatrix<f64>,
    b: DMatrix<f64>,
    eta: f64,
    spec: GeneratorSpec,
    da0: DMatrix<f64>,
    db0: DMatrix<f64>,
    deta0: f64,
}

fn problem(variant: Variant, (n, d, k, r): (usize, usize, usize, usize), seed: u64) -> Problem {
    let mut g = ChaCha8Rng::seed_from_u64(seed);
    Problem {
        op: ElraOp { variant, d, k, r },
        w0: rand_mat(d, k, 1.0 / (k as f64).sqrt(), &mut g),
        x: rand_mat(n, k, 1.0, &mut g),
        dy: rand_mat(n, d, 1.0, &mut g),
        u: rand_mat(n, d, 1.0, &mut g),
        bias: rand_mat(1, d, 1.0, &mut g),
        a: rand_mat(d, r, 1.0 / (d as f64).sqrt(), &mut g),
        b: rand_mat(r, d, 1.0 / (r as f64).sqrt(), &mut g),
        eta: 0.625,
        spec: GeneratorSpec {
            alpha: 0.375,
            eta_mult: 0.75,
            tau: None,
            lambda: 0.125,
        },
        da0: rand_mat(d, r, 1.0, &mut g),
        db0: rand_mat(r, d, 1.0, &mut g),
        deta0: 0.5,
    }
}

impl Problem {
    fn gen(&self) -> Generator<'_, f64> {
        Generator {
            a: Strided::of(&self.a, Op::N),
            b: self
                .op
                .variant
                .uses_b()
                .then(|| Strided::of(&self.b, Op::N)),
            eta: self.eta,
        }
    }

    fn params(&self) -> GenParams {
        GenParams::new(&self.op, &self.spec)
    }

    /// A memory with the problem's inputs bound; outputs and the workspace poisoned with NaN
    /// (gradients hold `da0`, `db0`, `deta0` when `accumulate`).
    fn mem(&self, n: usize, accumulate: bool) -> Mem {
        let lay = Layout::new(&self.op, n).expect("layout");
        let (d, k, r) = (self.op.d, self.op.k, self.op.r);
        let nan = |len: usize| vec![f64::NAN; len];
        let mut bufs = HashMap::new();
        bufs.insert(Loc::X, flat(&self.x));
        bufs.insert(Loc::W0, flat(&self.w0));
        bufs.insert(Loc::Bias, flat(&self.bias));
        bufs.insert(Loc::Dy, flat(&self.dy));
        bufs.insert(Loc::U, flat(&self.u));
        bufs.insert(Loc::A, flat(&self.a));
        bufs.insert(Loc::Eta, vec![self.eta]);
        if self.op.variant.uses_b() {
            bufs.insert(Loc::B, flat(&self.b));
        }
        for l in [Loc::Y, Loc::Du] {
            bufs.insert(l, nan(n * d));
        }
        bufs.insert(Loc::Dx, nan(n * k));
        let (da, db, deta) = if accumulate {
            (flat(&self.da0), flat(&self.db0), vec![self.deta0])
        } else {
            (nan(d * r), nan(r * d), nan(1))
        };
        bufs.insert(Loc::Da, da);
        if self.op.variant.uses_b() {
            bufs.insert(Loc::Db, db);
        }
        bufs.insert(Loc::Deta, deta);
        bufs.insert(Loc::Energy, nan(1));
        bufs.insert(Loc::Saved, nan(saved_len(n, r).expect("saved")));
        bufs.insert(Loc::Ws, nan(lay.len));
        bufs.insert(Loc::Ones, nan(n.max(1)));
        Mem { bufs, lay }
    }

    /// The CPU gradients with the accumulate rule applied: `(∂A, ∂B, ∂η)`.
    fn cpu_grads(
        &self,
        f: impl FnOnce(GeneratorGrads<'_, '_, f64>),
        accumulate: bool,
    ) -> (DMatrix<f64>, DMatrix<f64>, f64) {
        let (mut da, mut db, mut deta) = if accumulate {
            (self.da0.clone(), self.db0.clone(), self.deta0)
        } else {
            (
                DMatrix::zeros(self.op.d, self.op.r),
                DMatrix::zeros(self.op.r, self.op.d),
                0.0,
            )
        };
        let has_b = self.op.variant.uses_b();
        f(GeneratorGrads {
            a: StridedMut::of(&mut da),
            b: if has_b {
                Some(StridedMut::of(&mut db))
            } else {
                None
            },
            eta: &mut deta,
            accumulate,
        });
        (da, db, deta)
    }

    fn check_grads(&self, mem: &Mem, want: &(DMatrix<f64>, DMatrix<f64>, f64), label: &str) {
        let (d, r) = (self.op.d, self.op.r);
        let e = rel(&mem.read(&V::mat(Loc::Da, d, r)), &want.0);
        assert!(e < 1e-10, "{label}: ∂A {e:.2e}");
        if self.op.variant.uses_b() {
            let e = rel(&mem.read(&V::mat(Loc::Db, r, d)), &want.1);
            assert!(e < 1e-10, "{label}: ∂B {e:.2e}");
        }
        let g = mem.at(&V::mat(Loc::Deta, 1, 1), 0, 0);
        assert!(
            (g - want.2).abs() <= 1e-10 * want.2.abs().max(1.0),
            "{label}: ∂η {g} vs {}",
            want.2
        );
    }
}

const SHAPES: [(usize, usize, usize, usize); 3] = [(7, 5, 4, 2), (3, 6, 9, 3), (10, 4, 4, 4)];

#[test]
fn plans_of_the_fused_layer_match_the_cpu_ops() {
    for (si, &shape) in SHAPES.iter().enumerate() {
        for variant in [Variant::General, Variant::Psd, Variant::Hyb] {
            for (base, bias) in [(true, true), (true, false), (false, false)] {
                for accumulate in [false, true] {
                    let p = problem(variant, shape, 10 + si as u64);
                    let (n, d, k, r) = shape;
                    let label =
                        format!("{variant:?} {shape:?} base={base} bias={bias} acc={accumulate}");
                    // CPU
                    let mut y = DMatrix::zeros(n, d);
                    let mut saved = vec![0.0; ops::saved_len(n, r).unwrap()];
                    let mut ws = vec![0.0; ops::workspace_len(n, r).unwrap()];
                    let bias_v = flat(&p.bias);
                    let cpu_base = if base {
                        Base::Included {
                            bias: bias.then_some(&bias_v[..]),
                        }
                    } else {
                        Base::Excluded
                    };
                    ops::forward(
                        &p.op,
                        Strided::of(&p.w0, Op::N),
                        cpu_base,
                        &p.gen(),
                        &p.spec,
                        Strided::of(&p.x, Op::N),
                        None,
                        &mut StridedMut::of(&mut y),
                        &mut saved,
                        &mut ws,
                    )
                    .unwrap();
                    let mut dx = DMatrix::zeros(n, k);
                    let want = p.cpu_grads(
                        |g| {
                            ops::backward(
                                &p.op,
                                Strided::of(&p.w0, Op::N),
                                base,
                                &p.gen(),
                                &p.spec,
                                Strided::of(&p.x, Op::N),
                                None,
                                &saved,
                                Strided::of(&p.dy, Op::N),
                                &mut StridedMut::of(&mut dx),
                                g,
                                &mut ws,
                            )
                            .unwrap()
                        },
                        accumulate,
                    );
                    // Plan
                    let mut mem = p.mem(n, accumulate);
                    let lay = mem.lay;
                    run(
                        &mut mem,
                        &plan(&p.op, n, &p.params(), Kind::Forward { base, bias }, &lay),
                    );
                    let e = rel(&mem.read(&V::mat(Loc::Y, n, d)), &y);
                    assert!(e < 1e-10, "{label}: y {e:.2e}");
                    let sv = &mem.bufs[&Loc::Saved];
                    let se = saved
                        .iter()
                        .zip(sv)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max);
                    assert!(se < 1e-10, "{label}: saved {se:.2e}");
                    run(
                        &mut mem,
                        &plan(
                            &p.op,
                            n,
                            &p.params(),
                            Kind::Backward { base, accumulate },
                            &lay,
                        ),
                    );
                    let e = rel(&mem.read(&V::mat(Loc::Dx, n, k)), &dx);
                    assert!(e < 1e-10, "{label}: dx {e:.2e}");
                    p.check_grads(&mem, &want, &label);
                }
            }
        }
    }
}

#[test]
fn plans_of_the_output_side_form_match_the_cpu_ops() {
    for (si, &shape) in SHAPES.iter().enumerate() {
        for variant in [Variant::General, Variant::Psd, Variant::Hyb] {
            for accumulate in [false, true] {
                let p = problem(variant, shape, 20 + si as u64);
                let (n, d, _, r) = shape;
                let label = format!("{variant:?} {shape:?} acc={accumulate}");
                let mut y = DMatrix::zeros(n, d);
                let mut saved = vec![0.0; ops::saved_len(n, r).unwrap()];
                let mut ws = vec![0.0; ops::workspace_len(n, r).unwrap()];
                ops::forward_out(
                    &p.op,
                    &p.gen(),
                    &p.spec,
                    Strided::of(&p.u, Op::N),
                    None,
                    &mut StridedMut::of(&mut y),
                    &mut saved,
                    &mut ws,
                )
                .unwrap();
                let mut du = DMatrix::zeros(n, d);
                let want = p.cpu_grads(
                    |g| {
                        ops::backward_out(
                            &p.op,
                            &p.gen(),
                            &p.spec,
                            Strided::of(&p.u, Op::N),
                            None,
                            &saved,
                            Strided::of(&p.dy, Op::N),
                            &mut StridedMut::of(&mut du),
                            g,
                            &mut ws,
                        )
                        .unwrap()
                    },
                    accumulate,
                );
                let mut mem = p.mem(n, accumulate);
                let lay = mem.lay;
                run(
                    &mut mem,
                    &plan(&p.op, n, &p.params(), Kind::ForwardOut, &lay),
                );
                let e = rel(&mem.read(&V::mat(Loc::Y, n, d)), &y);
                assert!(e < 1e-10, "{label}: y {e:.2e}");
                run(
                    &mut mem,
                    &plan(
                        &p.op,
                        n,
                        &p.params(),
                        Kind::BackwardOut { accumulate },
                        &lay,
                    ),
                );
                let e = rel(&mem.read(&V::mat(Loc::Du, n, d)), &du);
                assert!(e < 1e-10, "{label}: du {e:.2e}");
                p.check_grads(&mem, &want, &label);
            }
        }
    }
}

#[test]
fn plans_of_merge_and_energy_match_the_cpu_ops() {
    for (si, &shape) in SHAPES.iter().enumerate() {
        for variant in [Variant::General, Variant::Psd, Variant::Hyb] {
            let p = problem(variant, shape, 30 + si as u64);
            let (_, d, k, _) = shape;
            for side in [Side::Left, Side::Right] {
                for inverse in [false, true] {
                    let (rows, cols) = match side {
                        Side::Left => (d, k),
                        Side::Right => (k, d),
                    };
                    let w = if side == Side::Left {
                        p.w0.clone()
                    } else {
                        p.w0.transpose()
                    };
                    let mut want = DMatrix::zeros(rows, cols);
                    ops::merge(
                        &p.op,
                        &p.gen(),
                        &p.spec,
                        Strided::of(&w, Op::N),
                        inverse,
                        side,
                        &mut StridedMut::of(&mut want),
                    )
                    .unwrap();
                    let mut mem = p.mem(0, false);
                    mem.bufs.insert(Loc::W, flat(&w));
                    mem.bufs.insert(Loc::Out, vec![f64::NAN; rows * cols]);
                    let lay = mem.lay;
                    run(
                        &mut mem,
                        &plan(&p.op, 0, &p.params(), Kind::Merge { inverse, side }, &lay),
                    );
                    let e = rel(&mem.read(&V::mat(Loc::Out, rows, cols)), &want);
                    assert!(e < 1e-10, "{variant:?} {side:?} inverse={inverse}: {e:.2e}");
                }
            }
            for grads in [None, Some(false), Some(true)] {
                let label = format!("{variant:?} {shape:?} energy grads={grads:?}");
                let mut e_cpu = 0.0;
                let want = p.cpu_grads(
                    |g| e_cpu = ops::energy(&p.op, &p.gen(), &p.spec, grads.map(|_| g)).unwrap(),
                    grads.unwrap_or(false),
                );
                let mut mem = p.mem(0, grads.unwrap_or(false));
                let lay = mem.lay;
                run(
                    &mut mem,
                    &plan(&p.op, 0, &p.params(), Kind::Energy { grads }, &lay),
                );
                let e = mem.at(&V::mat(Loc::Energy, 1, 1), 0, 0);
                assert!(
                    (e - e_cpu).abs() <= 1e-12 * e_cpu.abs(),
                    "{label}: {e} vs {e_cpu}"
                );
                if grads.is_some() {
                    p.check_grads(&mem, &want, &label);
                }
            }
        }
    }
}

#[test]
fn workspace_regions_are_disjoint_aligned_and_cover_the_layout() {
    for &(n, d, k, r) in &[
        (7usize, 5, 4, 2),
        (1, 1, 1, 1),
        (4096, 1024, 4096, 64),
        (0, 3, 2, 3),
    ] {
        let op = ElraOp {
            variant: Variant::Hyb,
            d,
            k,
            r,
        };
        let l = Layout::new(&op, n).unwrap();
        let mut regions = vec![
            (l.status, 2),
            (l.ct, d * r),
            (l.pt, k * r),
            (l.pbar_t, k * r),
            (l.q, d * r),
            (l.e, r * r),
            (l.z, r * r),
            (l.m, r * r),
            (l.mbar, r * r),
            (l.zbar, r * r),
            (l.s, r * r),
            (l.k, r * r),
            (l.cbar_t, d * r),
            (l.t, n * r),
            (l.tbar, n * r),
            (l.vbar, n * r),
            (l.ones, n),
            (l.scratch, l.scratch_len),
            (l.work, l.work_len),
        ];
        regions.sort();
        for w in regions.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{w:?} overlap");
        }
        assert!(regions.iter().all(|(o, _)| o % 4 == 0));
        let (o, len) = regions.last().copied().unwrap();
        assert!(o + len <= l.len);
        assert!(l.work_len >= 24 * r * r);
        // Column-reduction scratch for every reduction of the calls.
        for (rows, cols) in [(d, r), (d, k), (n, d), (n, r), (n, k)] {
            if rows > 0 {
                assert!(l.scratch_len >= crate::cuda::skinny::col_reduce_scratch(rows, cols, r));
            }
        }
        // A workspace sized for n rows serves merge and energy (n = 0).
        assert!(Layout::new(&op, 0).unwrap().len <= l.len);
    }
    let huge = ElraOp {
        variant: Variant::General,
        d: usize::MAX / 2,
        k: 2,
        r: 4,
    };
    assert!(Layout::new(&huge, 1).is_none());
}
