//! Launches of the fused skinny kernels of `cuda/skinny.cu` and of the non-finite scan of
//! `cuda/finite.cu` (the only `unsafe` of the GPU layer), on strided views whose extents are
//! checked before every launch.
//!
//! The layer ([`super::layer`]) describes each operand as a [`View`]: a buffer, an offset and a
//! `rows × cols` shape with element strides `(s0, s1)`, so transposes and sub-matrices cost
//! nothing. Every wrapper checks that each view lies inside its allocation and has the shape the
//! kernel reads or writes, so the kernels only touch memory the views describe.
//!
//! Outputs are views too, taken from a shared borrow: device memory is outside Rust's aliasing
//! model, and the kernels document which operands may alias (the in-place row pass reads a row
//! before any thread writes it; the element-wise kernels read and write each entry from one
//! thread). Everything is ordered on the device's single stream.
#![allow(non_snake_case)]

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg, SyncOnDrop};

use super::device::BLOCK_THREADS;
use super::{Activation, CudaDevice};
use crate::{ElraError, Result};

/// Largest adapter rank of the row kernel (`ELRA_SKINNY_MAX_R` in `cuda/skinny.cu`).
pub const MAX_RANK: usize = 64;

/// Warps per block (`ELRA_NWARPS` for blocks of [`BLOCK_THREADS`] threads, 32 lanes a warp).
const NWARPS: usize = BLOCK_THREADS as usize / 32;
/// Columns per block of `col_reduce_partial` (`ELRA_CR_COLS`: 32 column threads × 4 columns).
const CR_COLS: usize = 128;
/// Columns per block of `merge_apply` (`ELRA_MA_COLS`: 32 lanes × 4 columns).
const MA_COLS: usize = 128;
/// Rows per step of a `merge_apply` block (`ELRA_NWARPS · ELRA_MA_RW`).
const MA_ROWS: usize = NWARPS * 4;
/// Blocks the launches aim for: several resident blocks per SM on a 132-SM GPU.
const TARGET_BLOCKS: usize = 1024;
/// Largest grid dimension used (the kernels loop over what a smaller grid leaves).
const MAX_GRID: usize = 65_535;

/// A strided `rows × cols` view of a device buffer: entry `(i, j)` is `buf[off + i·s0 + j·s1]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a, T> {
    buf: &'a CudaSlice<T>,
    off: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    s0: usize,
    s1: usize,
}

impl<'a, T> View<'a, T> {
    /// A row-major contiguous `rows × cols` matrix at offset `off`.
    pub(crate) fn at(buf: &'a CudaSlice<T>, off: usize, rows: usize, cols: usize) -> Self {
        View {
            buf,
            off,
            rows,
            cols,
            s0: cols,
            s1: 1,
        }
    }
    /// A `rows × cols` view at offset `off` with element strides `(s0, s1)` (checked against
    /// the buffer by every launch).
    pub(crate) fn strided(
        buf: &'a CudaSlice<T>,
        off: usize,
        (rows, cols): (usize, usize),
        (s0, s1): (usize, usize),
    ) -> Self {
        View {
            buf,
            off,
            rows,
            cols,
            s0,
            s1,
        }
    }
    /// A row-major contiguous `rows × cols` matrix at the start of `buf`.
    pub(crate) fn mat(buf: &'a CudaSlice<T>, rows: usize, cols: usize) -> Self {
        Self::at(buf, 0, rows, cols)
    }
    /// The transpose (no copy).
    pub(crate) fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            s0: self.s1,
            s1: self.s0,
            ..self
        }
    }
    /// Errors unless the view has shape `rows × cols` and lies inside its buffer.
    fn check(&self, arg: &'static str, rows: usize, cols: usize) -> Result<()> {
        if (self.rows, self.cols) != (rows, cols) {
            return Err(ElraError::shape(arg, (rows, cols), (self.rows, self.cols)));
        }
        if rows == 0 || cols == 0 {
            return Err(ElraError::invalid(arg, "empty matrix"));
        }
        let last = (rows - 1)
            .checked_mul(self.s0)
            .and_then(|a| (cols - 1).checked_mul(self.s1).map(|b| (a, b)))
            .and_then(|(a, b)| a.checked_add(b))
            .and_then(|x| x.checked_add(self.off))
            .ok_or_else(|| ElraError::invalid(arg, "view extent overflows"))?;
        if last >= self.buf.len() {
            return Err(ElraError::invalid(
                arg,
                format!(
                    "view reaches entry {last} of a buffer of {}",
                    self.buf.len()
                ),
            ));
        }
        Ok(())
    }
    /// As [`Self::check`] and additionally unit column stride (`s1 = 1`), as the activation
    /// operands of the kernels require; returns the row stride.
    fn check_rows(&self, arg: &'static str, rows: usize, cols: usize) -> Result<i64> {
        self.check(arg, rows, cols)?;
        if self.s1 != 1 && cols > 1 {
            return Err(ElraError::invalid(arg, "rows must be contiguous"));
        }
        ll(arg, self.s0)
    }
    fn strides(&self, arg: &'static str) -> Result<(i64, i64)> {
        Ok((ll(arg, self.s0)?, ll(arg, self.s1)?))
    }
}

fn ll(arg: &'static str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| ElraError::invalid(arg, "stride exceeds 64 bits"))
}

pub(crate) fn int(arg: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| ElraError::invalid(arg, format!("{v} exceeds 32 bits")))
}

fn grid(total: usize) -> Result<LaunchConfig> {
    let blocks = total.div_ceil(BLOCK_THREADS as usize).max(1);
    Ok(LaunchConfig {
        grid_dim: (int("grid", blocks)? as u32, 1, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Device address of a view's first entry, with the buffer's stream guard (kept alive until the
/// launch has been enqueued).
fn dptr<'a, T>(dev: &'a CudaDevice, v: &View<'a, T>) -> (u64, SyncOnDrop<'a>) {
    let (p, guard) = v.buf.device_ptr(dev.stream());
    (p + (v.off * std::mem::size_of::<T>()) as u64, guard)
}

/// Optional pointer argument (0 is a null pointer in the kernel).
fn opt_ptr<'a, T>(dev: &'a CudaDevice, v: &Option<View<'a, T>>) -> (u64, Option<SyncOnDrop<'a>>) {
    match v {
        Some(v) => {
            let (p, g) = dptr(dev, v);
            (p, Some(g))
        }
        None => (0, None),
    }
}

pub(crate) fn check_rank(r: usize) -> Result<()> {
    if r == 0 || r > MAX_RANK {
        return Err(ElraError::invalid(
            "r",
            format!("the GPU layer supports ranks 1..={MAX_RANK}, got {r}"),
        ));
    }
    Ok(())
}

/// Operands of one fused row pass ([`rows_fused`]).
pub(crate) struct RowPass<'a, T> {
    /// Input rows (n_rows × n_in, contiguous rows).
    pub input: View<'a, T>,
    /// Rows added to the output (n_rows × n_out), or none (zero).
    pub base: Option<View<'a, T>>,
    /// Output rows (n_rows × n_out), or none (only v/t are produced).
    pub out: Option<View<'a, T>>,
    /// `Cm` (r × n_in): `v = Cm · input_i`.
    pub cm: View<'a, f32>,
    /// `Mm` (r × r): `t = Mm · v`; none means `t = m_scale · v`.
    pub mm: Option<View<'a, f32>>,
    /// Scale of `t` when `mm` is none.
    pub m_scale: f32,
    /// `Am` (n_out × r): `out_i = base_i + Am · t` (required when `out` is set).
    pub am: Option<View<'a, f32>>,
    /// Receives `v` (n_rows × r, contiguous).
    pub v_out: Option<View<'a, f32>>,
    /// Receives `t` (n_rows × r, contiguous).
    pub t_out: Option<View<'a, f32>>,
}

/// Rows per warp of [`rows_fused`] for `n_rows` rows: 4 (each staged `Cm`/`Am` value serves four
/// rows) while that still gives at least 256 blocks of `NWARPS` warps, else 2, else 1.
fn rows_per_warp(n_rows: usize) -> usize {
    [4, 2]
        .into_iter()
        .find(|&rpw| n_rows.div_ceil(NWARPS * rpw) >= 256)
        .unwrap_or(1)
}

/// Per row (a warp owns 1, 2 or 4 rows, [`rows_per_warp`]): `v = Cm x_i`, `t = Mm v`,
/// `out_i = base_i + Am t` (`cuda/skinny.cu` `rows_fused`): the Woodbury row pass `y = u + A M C u` of Prop. 1 / eq. (5), its reverse
/// mode with transposed roles (`T̄ = Ȳ A`, `V̄ = T̄ M`, `X̄ = Ȳ + V̄ C`, module docs of
/// [`crate::grad::rows`]), the LoRA branch, and skinny products `v = X Cmᵀ` (no output).
pub(crate) fn rows_fused<T: Activation>(dev: &CudaDevice, p: &RowPass<'_, T>) -> Result<()> {
    let (n_rows, n_in) = (p.input.rows, p.input.cols);
    let r = p.cm.rows;
    check_rank(r)?;
    let ld_in = p.input.check_rows("input", n_rows, n_in)?;
    p.cm.check("cm", r, n_in)?;
    if let Some(m) = &p.mm {
        m.check("mm", r, r)?;
    }
    let n_out = p.out.as_ref().map_or(1, |o| o.cols);
    let ld_out = match &p.out {
        Some(o) => o.check_rows("out", n_rows, n_out)?,
        None => 0,
    };
    let ld_base = match (&p.base, &p.out) {
        (Some(b), Some(_)) => b.check_rows("base", n_rows, n_out)?,
        (Some(_), None) => return Err(ElraError::invalid("base", "given without an output")),
        (None, _) => 0,
    };
    let (as0, as1) = match (&p.am, &p.out) {
        (Some(a), Some(_)) => {
            a.check("am", n_out, r)?;
            a.strides("am")?
        }
        (None, Some(_)) => return Err(ElraError::invalid("am", "required with an output")),
        (_, None) => (0, 0),
    };
    for (arg, v) in [("v_out", &p.v_out), ("t_out", &p.t_out)] {
        if let Some(v) = v {
            v.check_rows(arg, n_rows, r)?;
            if v.s0 != r {
                return Err(ElraError::invalid(arg, "must be contiguous n_rows × r"));
            }
        }
    }
    let (cs0, cs1) = p.cm.strides("cm")?;
    let (ms0, ms1) = match &p.mm {
        Some(m) => m.strides("mm")?,
        None => (0, 0),
    };
    let (n_in_i, n_out_i, r_i) = (int("n_in", n_in)?, int("n_out", n_out)?, int("r", r)?);
    let n_rows_i = int("n_rows", n_rows)?;
    let rpw = rows_per_warp(n_rows);
    let rpw_i = rpw as i32;
    let cfg = LaunchConfig {
        grid_dim: (n_rows.div_ceil(NWARPS * rpw).min(MAX_GRID) as u32, 1, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (in_p, _g1) = dptr(dev, &p.input);
    let (base_p, _g2) = opt_ptr(dev, &p.base);
    let (out_p, _g3) = opt_ptr(dev, &p.out);
    let (cm_p, _g4) = dptr(dev, &p.cm);
    let (mm_p, _g5) = opt_ptr(dev, &p.mm);
    let (am_p, _g6) = opt_ptr(dev, &p.am);
    let (v_p, _g7) = opt_ptr(dev, &p.v_out);
    let (t_p, _g8) = opt_ptr(dev, &p.t_out);
    let mut args = dev
        .stream()
        .launch_builder(&dev.kernels().rows_fused[T::INDEX]);
    args.arg(&n_rows_i)
        .arg(&rpw_i)
        .arg(&n_in_i)
        .arg(&n_out_i)
        .arg(&r_i)
        .arg(&in_p)
        .arg(&ld_in)
        .arg(&base_p)
        .arg(&ld_base)
        .arg(&out_p)
        .arg(&ld_out)
        .arg(&cm_p)
        .arg(&cs0)
        .arg(&cs1)
        .arg(&mm_p)
        .arg(&ms0)
        .arg(&ms1)
        .arg(&p.m_scale)
        .arg(&am_p)
        .arg(&as0)
        .arg(&as1)
        .arg(&v_p)
        .arg(&t_p);
    // SAFETY: the arguments match `rows_fused_{dtype}(int n_rows, int rows_per_warp, int n_in,
    // int n_out, int r, const T* in, long long ld_in, const T* base, long long ld_base, T* out,
    // long long ld_out, const float* Cm, long long cs0, long long cs1, const float* Mm, long long
    // ms0, long long ms1, float m_scale, const float* Am, long long as0, long long as1, float*
    // v_out, float* t_out)` for the element type T (kernel picked by T::INDEX); rows_per_warp ∈
    // {1, 2, 4}. Blocks of BLOCK_THREADS step over rows i < n_rows (grid-stride; the kernel clamps
    // every row index to n_rows) and touch columns < n_in of row i of in and < n_out of rows i
    // of base/out (extents checked above with unit column stride; vector accesses are used only
    // for whole aligned chunks inside those extents), entries (q, l) of Cm for q < r, l < n_in,
    // (q, p) of Mm, (j, q) of Am for j < n_out, and row i of v_out/t_out (n_rows × r contiguous):
    // every view was checked to lie inside its allocation. r ≤ MAX_RANK bounds the kernel's
    // shared vectors. Null pointers (0) are passed exactly for the outputs/operands the kernel
    // skips. in/base/out may alias (a row is owned by one warp, which reads all of `in` before
    // the barriers that precede its writes; each base/out chunk is read and then written by one
    // lane). All accesses are ordered on dev's stream, on which the guards `_g*` are recorded.
    unsafe { args.launch(cfg) }?;
    Ok(())
}

/// Rows per chunk of [`col_reduce`] for `n_rows` rows and `n` columns: enough chunks to give
/// about [`TARGET_BLOCKS`] blocks of `CR_COLS` columns, at most 256 chunks and at least 64 rows
/// each (the partial scratch, chunks·n·r floats, stays a small fraction of the data read).
/// Returns `(rows_per_chunk, chunks)`.
pub(crate) fn chunking(n_rows: usize, n: usize) -> (usize, usize) {
    let tiles = n.div_ceil(CR_COLS).max(1);
    let want = TARGET_BLOCKS
        .div_ceil(tiles)
        .clamp(1, (n_rows / 64).clamp(1, 256));
    let rpc = n_rows.div_ceil(want).max(1);
    (rpc, n_rows.div_ceil(rpc))
}

/// Scratch entries [`col_reduce`] needs for `n_rows × n` data and rank `r`.
pub(crate) fn col_reduce_scratch(n_rows: usize, n: usize, r: usize) -> usize {
    chunking(n_rows, n).1 * n * r
}

/// `out = α Yᵀ S + β out` with `Y` n_rows×n (activation type, contiguous rows), `S` n_rows×r and
/// `out` n×r (f32, any strides): the reductions over rows of the backward pass (e.g. `Ā = Ȳᵀ T`,
/// `∂P = sᵀ x`) and of `P = C W0` (eq. 30). Two launches: per-chunk partial sums, then the sum
/// over chunks in chunk order (deterministic; no atomics). `β = 0` does not read `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn col_reduce<T: Activation>(
    dev: &CudaDevice,
    y: View<'_, T>,
    s: View<'_, f32>,
    alpha: f32,
    beta: f32,
    out: View<'_, f32>,
    scratch: &CudaSlice<f32>,
) -> Result<()> {
    let (n_rows, n) = (y.rows, y.cols);
    let r = s.cols;
    if r == 0 {
        return Err(ElraError::invalid("s", "no columns"));
    }
    let ldy = y.check_rows("y", n_rows, n)?;
    s.check("s", n_rows, r)?;
    out.check("out", n, r)?;
    let (rpc, chunks) = chunking(n_rows, n);
    let need = chunks * n * r;
    if scratch.len() < need {
        return Err(ElraError::invalid(
            "scratch",
            format!("{} entries, need {need}", scratch.len()),
        ));
    }
    let (ss0, ss1) = s.strides("s")?;
    let (os0, os1) = out.strides("out")?;
    let (n_rows_i, n_i, r_i, rpc_i, chunks_i) = (
        int("n_rows", n_rows)?,
        int("n", n)?,
        int("r", r)?,
        int("rows_per_chunk", rpc)?,
        int("chunks", chunks)?,
    );
    let scratch_view = View::mat(scratch, 1, need);
    {
        let (y_p, _g1) = dptr(dev, &y);
        let (s_p, _g2) = dptr(dev, &s);
        let (w_p, _g3) = dptr(dev, &scratch_view);
        let cfg = LaunchConfig {
            grid_dim: (int("n", n.div_ceil(CR_COLS))? as u32, chunks_i as u32, 1),
            block_dim: (BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = dev
            .stream()
            .launch_builder(&dev.kernels().col_reduce_partial[T::INDEX]);
        args.arg(&n_rows_i)
            .arg(&n_i)
            .arg(&r_i)
            .arg(&rpc_i)
            .arg(&y_p)
            .arg(&ldy)
            .arg(&s_p)
            .arg(&ss0)
            .arg(&ss1)
            .arg(&w_p);
        // SAFETY: matches `col_reduce_partial_{dtype}(int n_rows, int n, int r, int
        // rows_per_chunk, const T* Y, long long ldy, const float* S, long long ss0, long long ss1,
        // float* partial)`. Block (column block x < ⌈n / CR_COLS⌉, chunk c < chunks) reads Y(i, j)
        // for j < n (vector loads only for whole aligned chunks inside the row) and S(i, q) for
        // rows i of its chunk (< n_rows, as chunks·rows_per_chunk ≥ n_rows and the kernel
        // clamps), all inside the views checked above, and writes partial[(c·n + j)·r + q] for
        // j < n, q < r: < chunks·n·r ≤ scratch.len(). The scratch is not aliased by Y or S (distinct buffers by construction in
        // the layer). Ordered on dev's stream.
        unsafe { args.launch(cfg) }?;
    }
    let (w_p, _g3) = dptr(dev, &scratch_view);
    let (o_p, _g4) = dptr(dev, &out);
    let mut args = dev
        .stream()
        .launch_builder(&dev.kernels().col_reduce_finish);
    args.arg(&n_i)
        .arg(&r_i)
        .arg(&chunks_i)
        .arg(&w_p)
        .arg(&alpha)
        .arg(&beta)
        .arg(&o_p)
        .arg(&os0)
        .arg(&os1);
    // SAFETY: matches `col_reduce_finish_f32(int n, int r, int n_chunks, const float* partial,
    // float alpha, float beta, float* out, long long os0, long long os1)`; thread idx < n·r reads
    // partial entries < chunks·n·r (checked) and writes out(j, q) inside the checked view.
    unsafe { args.launch(grid(n * r)?) }?;
    Ok(())
}

/// `W_out = W_in + scale · L R` with `L` d×r and `R` r×k in f32, accumulated in f32 and rounded
/// once: the rank-r merge `W_new = W0 + (A M)(C W0)` (eq. 30) and its inverse, and the LoRA
/// merge `W0 + s B'A'`. `w_out` may be `w_in` (in place).
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge_apply<T: Activation>(
    dev: &CudaDevice,
    w_in: View<'_, T>,
    w_out: View<'_, T>,
    scale: f32,
    l: View<'_, f32>,
    r_mat: View<'_, f32>,
) -> Result<()> {
    let (d, kk) = (w_in.rows, w_in.cols);
    let r = l.cols;
    check_rank(r)?;
    let ld_in = w_in.check_rows("w_in", d, kk)?;
    let ld_out = w_out.check_rows("w_out", d, kk)?;
    l.check("l", d, r)?;
    r_mat.check("r", r, kk)?;
    let (ls0, ls1) = l.strides("l")?;
    let (rs0, rs1) = r_mat.strides("r")?;
    let (d_i, k_i, r_i) = (int("d", d)?, int("k", kk)?, int("r", r)?);
    let (wi, _g1) = dptr(dev, &w_in);
    let (wo, _g2) = dptr(dev, &w_out);
    let (lp, _g3) = dptr(dev, &l);
    let (rp, _g4) = dptr(dev, &r_mat);
    let tiles = kk.div_ceil(MA_COLS);
    let cfg = LaunchConfig {
        grid_dim: (
            int("k", tiles)? as u32,
            TARGET_BLOCKS
                .div_ceil(tiles)
                .clamp(1, d.div_ceil(MA_ROWS).min(MAX_GRID)) as u32,
            1,
        ),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut args = dev
        .stream()
        .launch_builder(&dev.kernels().merge_apply[T::INDEX]);
    args.arg(&d_i)
        .arg(&k_i)
        .arg(&r_i)
        .arg(&wi)
        .arg(&ld_in)
        .arg(&wo)
        .arg(&ld_out)
        .arg(&scale)
        .arg(&lp)
        .arg(&ls0)
        .arg(&ls1)
        .arg(&rp)
        .arg(&rs0)
        .arg(&rs1);
    // SAFETY: matches `merge_apply_{dtype}(int d, int k, int r, const T* W_in, long long ld_in,
    // T* W_out, long long ld_out, float scale, const float* L, long long ls0, long long ls1, const
    // float* R, long long rs0, long long rs1)`. Block x stages R(q, j) for q < r ≤ MAX_RANK (its
    // shared tile holds MAX_RANK × MA_COLS floats) and j < k of its MA_COLS columns, then steps
    // over rows i < d (grid-stride in y, clamped): it touches (i, j) of W_in/W_out (vector
    // accesses only for whole aligned chunks inside the row) and L(i, q), all inside the views
    // checked above; W_out may alias W_in (each entry is read and then written by one lane).
    unsafe { args.launch(cfg) }?;
    Ok(())
}

/// `C = α A B + β C` for small f32 operands with any strides (`β = 0` does not read `C`); one
/// thread per entry, the inner index in order. Used for the d×r and r×r products of the layer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn small_gemm(
    dev: &CudaDevice,
    alpha: f32,
    a: View<'_, f32>,
    b: View<'_, f32>,
    beta: f32,
    c: View<'_, f32>,
) -> Result<()> {
    let (m, kk, n) = (a.rows, a.cols, b.cols);
    a.check("a", m, kk)?;
    b.check("b", kk, n)?;
    c.check("c", m, n)?;
    let (as0, as1) = a.strides("a")?;
    let (bs0, bs1) = b.strides("b")?;
    let (cs0, cs1) = c.strides("c")?;
    let (m_i, n_i, k_i) = (int("m", m)?, int("n", n)?, int("k", kk)?);
    let (ap, _g1) = dptr(dev, &a);
    let (bp, _g2) = dptr(dev, &b);
    let (cp, _g3) = dptr(dev, &c);
    let mut args = dev.stream().launch_builder(&dev.kernels().small_gemm);
    args.arg(&m_i)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&alpha)
        .arg(&ap)
        .arg(&as0)
        .arg(&as1)
        .arg(&bp)
        .arg(&bs0)
        .arg(&bs1)
        .arg(&beta)
        .arg(&cp)
        .arg(&cs0)
        .arg(&cs1);
    // SAFETY: matches `small_gemm_f32(int m, int n, int kk, float alpha, const float* A, long long
    // as0, long long as1, const float* B, long long bs0, long long bs1, float beta, float* C, long
    // long cs0, long long cs1)`; thread idx < m·n reads row i of A and column j of B and writes
    // C(i, j), all inside the views checked above. The layer never passes a C that overlaps A or B.
    unsafe { args.launch(grid(m * n)?) }?;
    Ok(())
}

/// `Cᵀ = η m (α A + (1−α) Bᵀ)` (d×r), i.e. the effective right factor `C = η m (αAᵀ + (1−α)B)`
/// of eq. (2), §4.2.1 and eq. (19) stored transposed; `b = None` is ELRA-PSD (α = 1).
#[allow(clippy::too_many_arguments)]
pub(crate) fn factor_c(
    dev: &CudaDevice,
    a: View<'_, f32>,
    b: Option<View<'_, f32>>,
    eta: View<'_, f32>,
    mult: f32,
    alpha: f32,
    ct: View<'_, f32>,
) -> Result<()> {
    let (d, r) = (a.rows, a.cols);
    if a.check_rows("a", d, r)? != r as i64 {
        return Err(ElraError::invalid("a", "must be contiguous"));
    }
    if let Some(b) = &b {
        if b.check_rows("b", r, d)? != d as i64 {
            return Err(ElraError::invalid("b", "must be contiguous"));
        }
    }
    eta.check("eta", 1, 1)?;
    if ct.check_rows("ct", d, r)? != r as i64 {
        return Err(ElraError::invalid("ct", "must be contiguous"));
    }
    let (d_i, r_i) = (int("d", d)?, int("r", r)?);
    let (ap, _g1) = dptr(dev, &a);
    let (bp, _g2) = opt_ptr(dev, &b);
    let (ep, _g3) = dptr(dev, &eta);
    let (cp, _g4) = dptr(dev, &ct);
    let mut args = dev.stream().launch_builder(&dev.kernels().factor_c);
    args.arg(&d_i)
        .arg(&r_i)
        .arg(&ap)
        .arg(&bp)
        .arg(&ep)
        .arg(&mult)
        .arg(&alpha)
        .arg(&cp);
    // SAFETY: matches `factor_c_f32(int d, int r, const float* A, const float* B, const float*
    // eta, float mult, float alpha, float* Ct)`; thread idx < d·r reads A[idx], B[q·d + l] (B
    // r×d contiguous or null), eta[0], and writes Ct[idx] — all checked above (contiguous views).
    unsafe { args.launch(grid(d * r)?) }?;
    Ok(())
}

/// Operands of [`factor_backward`].
pub(crate) struct FactorBackward<'a> {
    pub a: View<'a, f32>,
    pub ct: View<'a, f32>,
    pub s: View<'a, f32>,
    pub k: View<'a, f32>,
    pub lambda: f32,
    pub alpha: f32,
    pub eta: View<'a, f32>,
    pub mult: f32,
    pub abar: View<'a, f32>,
    pub cbar_t: View<'a, f32>,
    pub bbar: Option<View<'a, f32>>,
    pub etabar: View<'a, f32>,
    /// Add `B̄` and `∂η` to `bbar` and `etabar` (`true`) or overwrite them without reading.
    pub accumulate: bool,
}

/// The energy gradient `Ā += 2λ A K`, `C̄ += 2λ S C` (eq. 20–21, `S = AᵀA`, `K = CCᵀ`) and the
/// chain through eq. (19): `Ā += η_eff α C̄ᵀ`, `B̄ = η_eff (1−α) C̄` (one thread per entry, a grid
/// over d·r), then `∂η = m⟨C̄, C⟩/η_eff` (one block) ([`crate::grad::FactorChain::backward`]
/// without the clip). `Ā` is always updated in place; `B̄` and `∂η` are added to `bbar`/`etabar`
/// with [`FactorBackward::accumulate`], else overwritten.
pub(crate) fn factor_backward(dev: &CudaDevice, f: &FactorBackward<'_>) -> Result<()> {
    let (d, r) = (f.a.rows, f.a.cols);
    for (arg, v) in [
        ("a", &f.a),
        ("ct", &f.ct),
        ("abar", &f.abar),
        ("cbar_t", &f.cbar_t),
    ] {
        if v.check_rows(arg, d, r)? != r as i64 {
            return Err(ElraError::invalid(arg, "must be contiguous d×r"));
        }
    }
    for (arg, v) in [("s", &f.s), ("k", &f.k)] {
        if v.check_rows(arg, r, r)? != r as i64 {
            return Err(ElraError::invalid(arg, "must be contiguous r×r"));
        }
    }
    if let Some(b) = &f.bbar {
        if b.check_rows("bbar", r, d)? != d as i64 {
            return Err(ElraError::invalid("bbar", "must be contiguous r×d"));
        }
    }
    f.eta.check("eta", 1, 1)?;
    f.etabar.check("etabar", 1, 1)?;
    let (d_i, r_i) = (int("d", d)?, int("r", r)?);
    let (ap, _g1) = dptr(dev, &f.a);
    let (cp, _g2) = dptr(dev, &f.ct);
    let (sp, _g3) = dptr(dev, &f.s);
    let (kp, _g4) = dptr(dev, &f.k);
    let (ep, _g5) = dptr(dev, &f.eta);
    let (abp, _g6) = dptr(dev, &f.abar);
    let (cbp, _g7) = dptr(dev, &f.cbar_t);
    let (bbp, _g8) = opt_ptr(dev, &f.bbar);
    let (ebp, _g9) = dptr(dev, &f.etabar);
    let acc = i32::from(f.accumulate);
    let mut args = dev.stream().launch_builder(&dev.kernels().factor_backward);
    args.arg(&d_i)
        .arg(&r_i)
        .arg(&ap)
        .arg(&cp)
        .arg(&sp)
        .arg(&kp)
        .arg(&f.lambda)
        .arg(&f.alpha)
        .arg(&ep)
        .arg(&f.mult)
        .arg(&abp)
        .arg(&cbp)
        .arg(&bbp)
        .arg(&acc);
    // SAFETY: matches `factor_backward_f32(int d, int r, const float* A, const float* Ct, const
    // float* S, const float* K, float lambda, float alpha, const float* eta, float mult, float*
    // Abar, float* CbarT, float* Bbar, int accumulate)`; thread t < d·r (the grid covers d·r, the rest return)
    // reads/writes entry (t mod d)·r + t/d of the d×r views, entry t of Bbar (r×d, or null), row
    // and column entries < r² of S and K and entry 0 of eta, all checked contiguous and in bounds
    // above. Each entry is read and written by one thread only. Outputs are buffers distinct from
    // the inputs.
    unsafe { args.launch(grid(d * r)?) }?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut args = dev.stream().launch_builder(&dev.kernels().factor_eta);
    args.arg(&d_i)
        .arg(&r_i)
        .arg(&cp)
        .arg(&cbp)
        .arg(&ep)
        .arg(&f.mult)
        .arg(&ebp)
        .arg(&acc);
    // SAFETY: matches `factor_eta_f32(int d, int r, const float* Ct, const float* CbarT, const
    // float* eta, float mult, float* etabar, int accumulate)`: one block reads entries < d·r of the two d×r views
    // (checked above) and eta[0], writes (and with accumulate first reads) etabar[0]; ordered after factor_backward_f32 on the
    // stream, whose C̄ᵀ it reads.
    unsafe { args.launch(cfg) }?;
    Ok(())
}

/// Elements of `T` per 16-byte access of `check_finite` (`V` in `cuda/finite.cu`).
fn per_16_bytes<T: Activation>() -> usize {
    16 / T::BYTES
}

/// The overflow rule on the GPU (the CPU's `check_output` of [`crate::ops`]; `cuda/finite.cu`):
/// ORs 1 into `flag` (one u32) when the view `x` holds NaN or ±Inf, reading each entry once and
/// writing the flag only then. Columns past `x.cols` of a strided view are not read. One launch,
/// no host wait: the caller zeroes the flag before and reads it when it wants.
pub(crate) fn check_finite<T: Activation>(
    dev: &CudaDevice,
    x: View<'_, T>,
    flag: View<'_, u32>,
) -> Result<()> {
    let ld = x.check_rows("x", x.rows, x.cols)?;
    flag.check("flag", 1, 1)?;
    // A contiguous matrix is scanned as one row (no per-row bookkeeping).
    let (rows, cols, ld) = if ld == x.cols as i64 || x.rows == 1 {
        (1, x.rows * x.cols, (x.rows * x.cols) as i64)
    } else {
        (x.rows, x.cols, ld)
    };
    let chunk = BLOCK_THREADS as usize * per_16_bytes::<T>();
    let gx = cols.div_ceil(chunk).clamp(1, TARGET_BLOCKS);
    let gy = (TARGET_BLOCKS / gx).clamp(1, rows.min(MAX_GRID));
    let (rows_i, cols_i) = (ll("rows", rows)?, ll("cols", cols)?);
    let cfg = LaunchConfig {
        grid_dim: (gx as u32, gy as u32, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (xp, _g1) = dptr(dev, &x);
    let (fp, _g2) = dptr(dev, &flag);
    let mut args = dev
        .stream()
        .launch_builder(&dev.kernels().check_finite[T::INDEX]);
    args.arg(&rows_i).arg(&cols_i).arg(&xp).arg(&ld).arg(&fp);
    // SAFETY: matches `check_finite_{dtype}(long long rows, long long cols, const T* X, long long
    // ld, unsigned* flag)` for the element type T (kernel picked by T::INDEX). Block (x, y) reads
    // entries (i, j) with i < rows (grid-stride in y) and j < cols (grid-stride in x; 16-byte
    // loads only for whole aligned chunks inside the row) at X + i·ld + j: the view `x` was
    // checked to lie inside its buffer with unit column stride, and a contiguous view is read as
    // one row of rows·cols entries, which is the same memory. One thread per block may OR into
    // flag[0], a checked one-entry view. Ordered on dev's stream, on which the guards are recorded.
    unsafe { args.launch(cfg) }?;
    Ok(())
}
