//! Runs a plan ([`super::plan`]) on the device: every [`Step`] is one checked launch of an
//! existing kernel (`cuda/skinny.cu`, `cuda/phi1.cu`), one cuBLAS GEMM or one driver memset,
//! enqueued on the device's stream. Nothing is allocated and the host never waits: the workspace
//! regions that kernels take as buffers of their own (reduction partials, φ1 work matrices,
//! statuses, the ones of the bias GEMM) are lent to them as non-owning slices.

use cudarc::driver::sys::{self as cu, CUdeviceptr};
use cudarc::driver::CudaSlice;

use super::plan::{Layout, Loc, Step, V};
use crate::cuda::buffer::BorrowedSlice;
use crate::cuda::gemm::gemm_shared;
use crate::cuda::kernels::{launch_expm_phi1_in, launch_phi1_adjoint_in};
use crate::cuda::skinny::{
    col_reduce, factor_backward, factor_c, merge_apply, rows_fused, small_gemm, FactorBackward,
    RowPass, View,
};
use crate::cuda::{Activation, BorrowedMatrices, CudaDevice, DeviceMatrices, Transpose};
use crate::{ElraError, Result};

/// The buffers of one call, by location: activation-typed caller matrices and f32 ones (the
/// workspace is [`Loc::Ws`]).
pub(crate) struct Bound<'a, T: Activation> {
    pub(crate) act: Vec<(Loc, &'a DeviceMatrices<T>)>,
    pub(crate) f32s: Vec<(Loc, &'a DeviceMatrices<f32>)>,
}

impl<'a, T: Activation> Bound<'a, T> {
    fn act_mat(&self, loc: Loc) -> Result<&'a DeviceMatrices<T>> {
        self.act
            .iter()
            .find(|(l, _)| *l == loc)
            .map(|(_, m)| *m)
            .ok_or_else(|| ElraError::Cuda(format!("plan reads unbound buffer {loc:?}")))
    }
    fn f32_mat(&self, loc: Loc) -> Result<&'a DeviceMatrices<f32>> {
        self.f32s
            .iter()
            .find(|(l, _)| *l == loc)
            .map(|(_, m)| *m)
            .ok_or_else(|| ElraError::Cuda(format!("plan reads unbound buffer {loc:?}")))
    }
}

/// The workspace regions lent to kernels as buffers of their own.
struct Lent<T: Activation> {
    ws_addr: CUdeviceptr,
    ones: Option<BorrowedMatrices<T>>,
    scratch: BorrowedSlice<f32>,
    work: BorrowedSlice<f32>,
}

fn unbound(v: &V) -> ElraError {
    ElraError::Cuda(format!("plan view {v:?} of the wrong element type"))
}

/// Checks that a view lies inside a buffer of `len` elements (the launches check again).
fn inside(v: &V, len: usize) -> Result<()> {
    let end = (v.rows.max(1) - 1)
        .checked_mul(v.s0)
        .and_then(|a| (v.cols.max(1) - 1).checked_mul(v.s1).map(|b| (a, b)))
        .and_then(|(a, b)| a.checked_add(b))
        .and_then(|x| x.checked_add(v.off))
        .ok_or_else(|| ElraError::Cuda(format!("plan view {v:?} overflows")))?;
    if v.rows == 0 || v.cols == 0 || end >= len {
        return Err(ElraError::Cuda(format!(
            "plan view {v:?} outside its buffer of {len}"
        )));
    }
    Ok(())
}

struct Exec<'a, 'l, T: Activation> {
    dev: &'a CudaDevice,
    b: &'l Bound<'a, T>,
    lay: &'l Layout,
    lent: &'l Lent<T>,
}

impl<'a, 'l, T: Activation> Exec<'a, 'l, T> {
    /// An activation-typed view.
    fn act(&self, v: &V) -> Result<View<'l, T>> {
        let buf: &'l CudaSlice<T> = match v.loc {
            Loc::Ones => self
                .lent
                .ones
                .as_ref()
                .ok_or_else(|| unbound(v))?
                .get()
                .slice(),
            l if l.is_act() => self.b.act_mat(l)?.slice(),
            _ => return Err(unbound(v)),
        };
        Ok(View::strided(buf, v.off, (v.rows, v.cols), (v.s0, v.s1)))
    }

    /// An f32 view.
    fn f32v(&self, v: &V) -> Result<View<'l, f32>> {
        if v.loc.is_act() {
            return Err(unbound(v));
        }
        let buf = self.b.f32_mat(v.loc)?.slice();
        Ok(View::strided(buf, v.off, (v.rows, v.cols), (v.s0, v.s1)))
    }

    /// A whole activation matrix for cuBLAS (the view must be all of it).
    fn whole(&self, v: &V) -> Result<&'l DeviceMatrices<T>> {
        let m: &'l DeviceMatrices<T> = match v.loc {
            Loc::Ones => self.lent.ones.as_ref().ok_or_else(|| unbound(v))?.get(),
            l if l.is_act() => self.b.act_mat(l)?,
            _ => return Err(unbound(v)),
        };
        if v.off != 0 || !v.dense() || (m.rows(), m.cols()) != (v.rows, v.cols) {
            return Err(ElraError::Cuda(format!(
                "plan GEMM operand {v:?} is not the whole {}×{} matrix",
                m.rows(),
                m.cols()
            )));
        }
        Ok(m)
    }

    /// Device address and element count of the buffer behind `v`, and the element size.
    fn raw(&self, v: &V) -> Result<(CUdeviceptr, usize, usize)> {
        Ok(match v.loc {
            Loc::Ones => {
                let m = self.lent.ones.as_ref().ok_or_else(|| unbound(v))?.get();
                (m.device_addr() as CUdeviceptr, m.len(), T::BYTES)
            }
            l if l.is_act() => {
                let m = self.b.act_mat(l)?;
                (m.device_addr() as CUdeviceptr, m.len(), T::BYTES)
            }
            l => {
                let m = self.b.f32_mat(l)?;
                (m.device_addr() as CUdeviceptr, m.len(), 4)
            }
        })
    }

    /// An r×r f32 matrix of the saved values or the workspace as a [`DeviceMatrices`] of its
    /// own (the φ1 kernels take whole batches).
    fn rr(&self, v: &V) -> Result<BorrowedMatrices<f32>> {
        if v.loc.is_act() || !v.dense() {
            return Err(unbound(v));
        }
        let (addr, len, _) = self.raw(v)?;
        inside(v, len)?;
        // SAFETY: the view is dense and lies inside the f32 buffer behind it (checked just above),
        // which the call borrows for its whole duration; the wrapper only lends the memory
        // (never frees it) and is used by launches on the device's stream.
        unsafe { BorrowedMatrices::new(self.dev, addr + 4 * v.off as u64, 1, v.rows, v.cols) }
    }

    /// The i32 status word `i` of the workspace as a slice of its own.
    fn status(&self, i: usize) -> BorrowedSlice<i32> {
        let addr = self.lent.ws_addr + 4 * (self.lay.status + i) as u64;
        // SAFETY: word `i < 2` of the status region (two 4-byte words inside the workspace,
        // checked to hold `lay.len` values by `execute`), 4-byte aligned; only kernels on the
        // device's stream touch it during the call.
        unsafe { BorrowedSlice::new(self.dev, addr, 1) }
    }

    fn fill(&self, v: &V, value: f32) -> Result<()> {
        if !v.dense() {
            return Err(ElraError::Cuda(format!("plan fills a strided view {v:?}")));
        }
        let (addr, len, size) = self.raw(v)?;
        inside(v, len)?;
        let count = v.rows * v.cols;
        let ptr = addr + (v.off * size) as u64;
        let stream = self.dev.stream().cu_stream();
        let bits = if v.loc.is_act() {
            T::from_f64(value as f64).to_bits_u32()
        } else {
            value.to_bits()
        };
        // SAFETY: `count` elements of `size` bytes from element `off` of the buffer behind `v`
        // (a caller buffer or the workspace, borrowed for the call) lie inside it (checked just
        // above); the pointer is aligned to the element size (buffers are aligned to their type,
        // workspace regions to 16 bytes). The memset is ordered on the device's stream with every
        // other access of the call.
        let r = unsafe {
            if size == 4 {
                cu::cuMemsetD32Async(ptr, bits, count, stream)
            } else {
                cu::cuMemsetD16Async(ptr, bits as u16, count, stream)
            }
        };
        r.result()?;
        Ok(())
    }

    fn step(&self, s: &Step) -> Result<()> {
        let dev = self.dev;
        match *s {
            Step::Fill { v, value } => self.fill(&v, value),
            Step::FactorC {
                a,
                b,
                eta,
                mult,
                alpha,
                ct,
            } => factor_c(
                dev,
                self.f32v(&a)?,
                b.map(|b| self.f32v(&b)).transpose()?,
                self.f32v(&eta)?,
                mult,
                alpha,
                self.f32v(&ct)?,
            ),
            Step::ColReduce {
                y,
                s,
                alpha,
                beta,
                out,
            } => {
                let (sv, ov) = (self.f32v(&s)?, self.f32v(&out)?);
                let scratch = self.lent.scratch.get();
                if y.loc.is_act() {
                    col_reduce::<T>(dev, self.act(&y)?, sv, alpha, beta, ov, scratch)
                } else {
                    col_reduce::<f32>(dev, self.f32v(&y)?, sv, alpha, beta, ov, scratch)
                }
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
                let cm = self.f32v(&cm)?;
                let mm = mm.map(|m| self.f32v(&m)).transpose()?;
                let am = am.map(|m| self.f32v(&m)).transpose()?;
                let v_out = v_out.map(|m| self.f32v(&m)).transpose()?;
                let t_out = t_out.map(|m| self.f32v(&m)).transpose()?;
                if input.loc.is_act() {
                    rows_fused::<T>(
                        dev,
                        &RowPass {
                            input: self.act(&input)?,
                            base: base.map(|m| self.act(&m)).transpose()?,
                            out: out.map(|m| self.act(&m)).transpose()?,
                            cm,
                            mm,
                            m_scale: 1.0,
                            am,
                            v_out,
                            t_out,
                        },
                    )
                } else {
                    rows_fused::<f32>(
                        dev,
                        &RowPass {
                            input: self.f32v(&input)?,
                            base: base.map(|m| self.f32v(&m)).transpose()?,
                            out: out.map(|m| self.f32v(&m)).transpose()?,
                            cm,
                            mm,
                            m_scale: 1.0,
                            am,
                            v_out,
                            t_out,
                        },
                    )
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
                let t = |x: bool| if x { Transpose::Yes } else { Transpose::No };
                gemm_shared(
                    dev,
                    1.0,
                    self.whole(&a)?,
                    t(ta),
                    self.whole(&b)?,
                    t(tb),
                    beta as f64,
                    self.whole(&c)?,
                )
            }
            Step::MergeApply {
                w_in,
                w_out,
                scale,
                l,
                r,
            } => merge_apply::<T>(
                dev,
                self.act(&w_in)?,
                self.act(&w_out)?,
                scale,
                self.f32v(&l)?,
                self.f32v(&r)?,
            ),
            Step::SmallGemm {
                alpha,
                a,
                b,
                beta,
                c,
            } => small_gemm(
                dev,
                alpha,
                self.f32v(&a)?,
                self.f32v(&b)?,
                beta,
                self.f32v(&c)?,
            ),
            Step::Phi { z, e, m, status } => {
                let (zm, mut em, mut mm) = (self.rr(&z)?, self.rr(&e)?, self.rr(&m)?);
                let mut st = self.status(status);
                launch_expm_phi1_in(
                    dev,
                    zm.get(),
                    em.get_mut(),
                    mm.get_mut(),
                    st.get_mut(),
                    Some(self.lent.work.get()),
                )
            }
            Step::Adjoint { z, g, out, status } => {
                let (zm, gm, mut om) = (self.rr(&z)?, self.rr(&g)?, self.rr(&out)?);
                let mut st = self.status(status);
                launch_phi1_adjoint_in(
                    dev,
                    zm.get(),
                    gm.get(),
                    om.get_mut(),
                    st.get_mut(),
                    Some(self.lent.work.get()),
                )
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
            } => factor_backward(
                dev,
                &FactorBackward {
                    a: self.f32v(&a)?,
                    ct: self.f32v(&ct)?,
                    s: self.f32v(&s)?,
                    k: self.f32v(&k)?,
                    lambda,
                    alpha,
                    eta: self.f32v(&eta)?,
                    mult,
                    abar: self.f32v(&abar)?,
                    cbar_t: self.f32v(&cbar_t)?,
                    bbar: bbar.map(|b| self.f32v(&b)).transpose()?,
                    etabar: self.f32v(&etabar)?,
                    accumulate,
                },
            ),
        }
    }
}

/// Enqueues `steps` on `dev`'s stream over the buffers `b`, whose workspace ([`Loc::Ws`]) is laid
/// out as `lay` for a batch of `n` rows. Asynchronous; allocates nothing.
pub(crate) fn execute<T: Activation>(
    dev: &CudaDevice,
    steps: &[Step],
    b: &Bound<'_, T>,
    lay: &Layout,
    n: usize,
) -> Result<()> {
    let ws = b.f32_mat(Loc::Ws)?;
    if ws.len() < lay.len {
        return Err(ElraError::invalid(
            "workspace",
            format!("{} values, the call needs {}", ws.len(), lay.len),
        ));
    }
    let ws_addr = ws.device_addr() as CUdeviceptr;
    let at = |off: usize| ws_addr + 4 * off as u64;
    // SAFETY: (all three wrappers) regions of the workspace laid out by `Layout::new` (disjoint,
    // 16-byte aligned, inside its `len` values, which the workspace holds — checked above); the
    // workspace is borrowed for the call and only launches on the device's stream touch it.
    let lent = unsafe {
        Lent {
            ws_addr,
            ones: if n > 0 {
                Some(BorrowedMatrices::<T>::new(dev, at(lay.ones), 1, n, 1)?)
            } else {
                None
            },
            scratch: BorrowedSlice::new(dev, at(lay.scratch), lay.scratch_len),
            work: BorrowedSlice::new(dev, at(lay.work), lay.work_len),
        }
    };
    let ex = Exec {
        dev,
        b,
        lay,
        lent: &lent,
    };
    steps.iter().try_for_each(|s| ex.step(s))
}
