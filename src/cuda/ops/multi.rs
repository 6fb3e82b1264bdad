//! The multi-adapter forward on the GPU ([`crate::ops::multi_forward`]'s twin): many adapters of
//! one layer in one batch, each row selecting one by a device index (−1: the base alone).
//!
//! ```text
//! y = X W0ᵀ                                   cuBLAS, once for the batch
//! segments, permutation                       multi_count_i32, multi_perm_i32 (stable)
//! Cᵀ_a, Z_a = C_a A_a  (ELRA adapters)        multi_prep_f32, 8 adapters per launch
//! M_a = φ1(Z_a)                               expm_phi1, one batched launch per rank
//! y_i += A_a M_a C_a y_i  (ELRA, y_i = u_i)   rows_multi_*, 8 adapters per launch, each
//! y_i += s B_a A_a x_i    (LoRA)                block over its own segment
//! y_i += bias; NaN rows for bad indices       multi_finish_*
//! ```
//!
//! (eq. 3, eq. 5 on the base output, Prop. 1.) Everything is enqueued on the device's stream
//! without a host wait or an allocation; the workspace ([`multi_sizes`]) holds the segments,
//! the permutation, every adapter's `Cᵀ`, `Z`, `M`, the φ1 statuses and work matrices. As in the
//! other functional calls, errors found on the device are not read back: a row whose index lies
//! outside `[−1, count)` is written as NaN, and a failed φ1 writes NaN into `M`, which reaches the
//! adapter's rows. Not here (typed errors): the spectral clip, ranks above
//! [`MAX_RANK`](crate::cuda::MAX_RANK), more than [`MAX_GPU_ADAPTERS`] adapters.

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::plan::align4;
use super::{check_mat, GpuGenerator};
use crate::adapter::{GeneratorSpec, Variant};
use crate::cuda::buffer::{BorrowedMatrices, BorrowedSlice};
use crate::cuda::device::BLOCK_THREADS;
use crate::cuda::gemm::gemm_shared;
use crate::cuda::kernels::launch_expm_phi1_in;
use crate::cuda::skinny::{check_rank, int};
use crate::cuda::{Activation, CudaDevice, DeviceMatrices, Transpose};
use crate::{ElraError, Result};

/// Most adapters one GPU call serves (one block per adapter counts and places its rows).
pub const MAX_GPU_ADAPTERS: usize = 1024;
/// Adapters per launch of the batched kernels (`ELRA_MULTI_PER_LAUNCH` in `cuda/skinny.cu`).
const PER_LAUNCH: usize = 8;
/// Warps per block.
const NWARPS: usize = BLOCK_THREADS as usize / 32;

/// One adapter of a layer's set on the device.
#[derive(Clone, Copy)]
pub enum GpuMultiAdapter<'a> {
    /// ELRA at the settings of its step: `A` (d×r), `B` (r×d, not for PSD), η (device scalar).
    Elra {
        /// Generator family.
        variant: Variant,
        /// The factors and η.
        generator: GpuGenerator<'a>,
        /// α, η multiplier of its step (τ must be `None`).
        spec: GeneratorSpec,
    },
    /// LoRA: `lora_A` (r×k), `lora_B` (d×r), scaling `s`.
    Lora {
        /// `lora_A`.
        a: &'a DeviceMatrices<f32>,
        /// `lora_B`.
        b: &'a DeviceMatrices<f32>,
        /// `s = lora_alpha / r`.
        scale: f32,
    },
}

impl GpuMultiAdapter<'_> {
    fn rank(&self) -> usize {
        match self {
            GpuMultiAdapter::Elra { generator, .. } => generator.a.cols(),
            GpuMultiAdapter::Lora { a, .. } => a.rows(),
        }
    }
}

/// The ELRA adapters of one rank: their `Z`, `e^Z`, `M` batches (b·r² values each) and φ1
/// statuses (b words), offsets in 4-byte values; `members[slot]` is an adapter number.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RankGroup {
    r: usize,
    members: Vec<usize>,
    z: usize,
    e: usize,
    m: usize,
    status: usize,
}

/// The workspace regions of one call (offsets in 4-byte values).
#[derive(Clone, Debug, PartialEq, Eq)]
struct MultiLayout {
    counts: usize,
    seg: usize,
    perm: usize,
    /// Per adapter: `Cᵀ` (ELRA; 0 for LoRA).
    ct: Vec<usize>,
    /// Per adapter: its slot in its rank group.
    slot: Vec<usize>,
    /// The ELRA adapters by rank, each group's r×r matrices in contiguous batches.
    groups: Vec<RankGroup>,
    work: usize,
    work_len: usize,
    len: usize,
}

impl MultiLayout {
    /// `ranks[a] = (r, is_elra)`.
    fn new(n: usize, d: usize, ranks: &[(usize, bool)]) -> Option<MultiLayout> {
        let mut at = 0usize;
        let mut take = |len: usize| -> Option<usize> {
            let start = at;
            at = align4(at.checked_add(len.max(1))?)?;
            Some(start)
        };
        let count = ranks.len();
        let counts = take(count)?;
        let seg = take(count + 1)?;
        let perm = take(n)?;
        let mut ct = vec![0; count];
        for (a, &(r, elra)) in ranks.iter().enumerate() {
            if elra {
                ct[a] = take(d.checked_mul(r)?)?;
            }
        }
        let mut group_ranks: Vec<usize> = ranks.iter().filter(|x| x.1).map(|x| x.0).collect();
        group_ranks.sort_unstable();
        group_ranks.dedup();
        let mut slot = vec![0; count];
        let mut groups = Vec::new();
        let mut work_len = 0usize;
        for r in group_ranks {
            let members: Vec<usize> = (0..count).filter(|&a| ranks[a] == (r, true)).collect();
            for (s, &a) in members.iter().enumerate() {
                slot[a] = s;
            }
            let rr = r.checked_mul(r)?.checked_mul(members.len())?;
            let (z, e, m) = (take(rr)?, take(rr)?, take(rr)?);
            let status = take(members.len())?;
            work_len = work_len.max(rr.checked_mul(12)?);
            groups.push(RankGroup {
                r,
                members,
                z,
                e,
                m,
                status,
            });
        }
        let work = take(work_len)?;
        Some(MultiLayout {
            counts,
            seg,
            perm,
            ct,
            slot,
            groups,
            work,
            work_len,
            len: at,
        })
    }
}

/// The workspace (in f32 values) [`multi_forward`] needs for `n` rows of a d-row layer and a
/// set of adapters given as `(rank, is_elra)`: segments and permutation (2·count + n + 1
/// integers), every ELRA adapter's `Cᵀ` (d×r) and `Z`, `e^Z`, `M` (r×r), φ1 statuses and work.
pub fn multi_sizes(n: usize, d: usize, ranks: &[(usize, bool)]) -> Result<usize> {
    MultiLayout::new(n, d, ranks)
        .map(|l| l.len)
        .ok_or_else(|| ElraError::invalid("n", "the workspace size overflows"))
}

/// `MultiRowsAdapter` of `cuda/skinny.cu` (same field order and C layout).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RowsAdapterC {
    cm: u64,
    cs0: i64,
    cs1: i64,
    mm: u64,
    ms0: i64,
    ms1: i64,
    m_scale: f32,
    am: u64,
    as0: i64,
    as1: i64,
    adapter: i32,
    r: i32,
    from_x: i32,
}

/// `MultiRowsBatch` of `cuda/skinny.cu`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RowsBatchC {
    count: i32,
    a: [RowsAdapterC; PER_LAUNCH],
}

/// `MultiPrepAdapter` of `cuda/skinny.cu`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PrepAdapterC {
    a: u64,
    lda: i64,
    b: u64,
    ldb: i64,
    eta: u64,
    mult: f32,
    alpha: f32,
    r: i32,
    ct: u64,
    z: u64,
}

/// `MultiPrepBatch` of `cuda/skinny.cu`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PrepBatchC {
    count: i32,
    d: i32,
    a: [PrepAdapterC; PER_LAUNCH],
}

// The C layouts the kernels read (checked here so that a change on either side fails to build).
const _: () = assert!(std::mem::size_of::<RowsAdapterC>() == 96);
const _: () = assert!(std::mem::size_of::<RowsBatchC>() == 8 + 96 * PER_LAUNCH);
const _: () = assert!(std::mem::size_of::<PrepAdapterC>() == 72);
const _: () = assert!(std::mem::size_of::<PrepBatchC>() == 8 + 72 * PER_LAUNCH);

// SAFETY: plain `#[repr(C)]` data (integers, floats and device addresses) with the layout of the
// kernels' parameter structs (sizes asserted above), passed by value.
unsafe impl DeviceRepr for RowsBatchC {}
// SAFETY: as above.
unsafe impl DeviceRepr for PrepBatchC {}

fn cfg(gx: usize, gy: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (gx.clamp(1, 65_535) as u32, gy.max(1) as u32, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The multi-adapter forward on the device (module docs): `y_i = x_i W0ᵀ + bias + Δ_{index[i]}(x_i)`
/// for the n rows of `x` (n×k) into `y` (n×d), with `index` n device integers (−1: base only),
/// `bias` a 1×d matrix or `None`, and `workspace` at least [`multi_sizes`] f32 values.
/// Asynchronous on `dev`'s stream.
///
/// Errors (before anything is enqueued): shapes, devices, sizes, ranks, the clip, the number of
/// adapters.
#[allow(clippy::too_many_arguments)]
pub fn multi_forward<T: Activation>(
    dev: &CudaDevice,
    w0: &DeviceMatrices<T>,
    bias: Option<&DeviceMatrices<T>>,
    adapters: &[GpuMultiAdapter<'_>],
    index: &CudaSlice<i32>,
    x: &DeviceMatrices<T>,
    y: &mut DeviceMatrices<T>,
    workspace: &mut DeviceMatrices<f32>,
) -> Result<()> {
    let (d, k, n) = (w0.rows(), w0.cols(), x.rows());
    if n == 0 {
        return Err(ElraError::invalid("n", "the batch is empty"));
    }
    check_mat(dev, "w0", w0, d, k)?;
    check_mat(dev, "x", x, n, k)?;
    check_mat(dev, "y", y, n, d)?;
    if let Some(b) = bias {
        check_mat(dev, "bias", b, 1, d)?;
    }
    if index.len() < n {
        return Err(ElraError::invalid(
            "index",
            format!("{} entries for {n} rows", index.len()),
        ));
    }
    let count = adapters.len();
    if count > MAX_GPU_ADAPTERS {
        return Err(ElraError::invalid(
            "adapters",
            format!("{count} adapters; the GPU call serves at most {MAX_GPU_ADAPTERS}"),
        ));
    }
    let about =
        |a: usize, e: ElraError| ElraError::invalid("adapters", format!("adapter {a}: {e}"));
    for (a, ad) in adapters.iter().enumerate() {
        let r = ad.rank();
        check_rank(r).map_err(|e| about(a, e))?;
        match ad {
            GpuMultiAdapter::Elra {
                variant,
                generator: g,
                spec,
            } => {
                let op = crate::ops::ElraOp {
                    variant: *variant,
                    d,
                    k,
                    r,
                };
                op.validate().map_err(|e| about(a, e))?;
                spec.validate().map_err(|e| about(a, e))?;
                spec.require_no_clip().map_err(|e| about(a, e))?;
                check_mat(dev, "a", g.a, d, r).map_err(|e| about(a, e))?;
                check_mat(dev, "eta", g.eta, 1, 1).map_err(|e| about(a, e))?;
                match (variant.uses_b(), g.b) {
                    (true, Some(b)) => check_mat(dev, "b", b, r, d).map_err(|e| about(a, e))?,
                    (true, None) => return Err(about(a, ElraError::invalid("b", "B is needed"))),
                    (false, Some(_)) => {
                        return Err(about(a, ElraError::invalid("b", "ELRA-PSD has no B")))
                    }
                    (false, None) => {}
                }
            }
            GpuMultiAdapter::Lora {
                a: la,
                b: lb,
                scale,
            } => {
                if r > d.min(k) {
                    return Err(about(
                        a,
                        ElraError::invalid("r", format!("{r} > min(d, k)")),
                    ));
                }
                check_mat(dev, "lora_a", la, r, k).map_err(|e| about(a, e))?;
                check_mat(dev, "lora_b", lb, d, r).map_err(|e| about(a, e))?;
                if !scale.is_finite() {
                    return Err(about(a, ElraError::NonFinite { arg: "scale" }));
                }
            }
        }
    }
    let ranks: Vec<(usize, bool)> = adapters
        .iter()
        .map(|ad| (ad.rank(), matches!(ad, GpuMultiAdapter::Elra { .. })))
        .collect();
    let lay = MultiLayout::new(n, d, &ranks)
        .ok_or_else(|| ElraError::invalid("n", "the workspace size overflows"))?;
    workspace.check_device(dev, "workspace")?;
    if workspace.len() < lay.len {
        return Err(ElraError::invalid(
            "workspace",
            format!(
                "{} values given, {} needed (multi_sizes)",
                workspace.len(),
                lay.len
            ),
        ));
    }
    let (n_i, d_i, k_i, count_i) = (
        int("n", n)?,
        int("d", d)?,
        int("k", k)?,
        int("count", count)?,
    );
    // y = X W0ᵀ (u, the base output without bias).
    gemm_shared(dev, 1.0, x, Transpose::No, w0, Transpose::Yes, 0.0, y)?;
    let ws = workspace.device_addr() as u64;
    let at = |off: usize| ws + 4 * off as u64;
    let stream = dev.stream();
    let (idx_p, _g_idx) = index.device_ptr(stream);
    if count > 0 {
        let (counts_p, seg_p, perm_p) = (at(lay.counts), at(lay.seg), at(lay.perm));
        let mut args = stream.launch_builder(&dev.kernels().multi_count);
        args.arg(&n_i).arg(&idx_p).arg(&counts_p);
        // SAFETY: `multi_count_i32(int n, const int* index, int* counts)`: block a < count reads
        // index[0..n) (the caller's n ≥ n entries, checked) and writes counts[a] (count words of
        // the workspace region `counts`, inside the workspace checked to hold `lay.len` values).
        unsafe { args.launch(cfg(count, 1)) }?;
        let mut args = stream.launch_builder(&dev.kernels().multi_perm);
        args.arg(&n_i)
            .arg(&idx_p)
            .arg(&count_i)
            .arg(&counts_p)
            .arg(&seg_p)
            .arg(&perm_p);
        // SAFETY: `multi_perm_i32(int n, const int* index, int count, const int* counts, int*
        // seg, int* perm)`: block a < count reads index[0..n) and counts[0..a], writes seg[a]
        // (and seg[count]) and at most n entries of perm at positions < Σ counts ≤ n — regions
        // of count + 1 and n words of the checked workspace.
        unsafe { args.launch(cfg(count, 1)) }?;
    }
    // Cᵀ and Z of every ELRA adapter, 8 per launch.
    let elra: Vec<usize> = (0..count).filter(|&a| ranks[a].1).collect();
    // Adapter a's Z or M (`m`) in its rank group's batch.
    let rr_of = |a: usize, m: bool| -> u64 {
        let (r, _) = ranks[a];
        let g = lay
            .groups
            .iter()
            .find(|g| g.r == r)
            .expect("every ELRA rank has a group");
        at(if m { g.m } else { g.z } + lay.slot[a] * r * r)
    };
    let (z_of, m_of) = (|a| rr_of(a, false), |a| rr_of(a, true));
    for chunk in elra.chunks(PER_LAUNCH) {
        let mut batch = PrepBatchC {
            count: chunk.len() as i32,
            d: d_i,
            ..Default::default()
        };
        for (i, &a) in chunk.iter().enumerate() {
            let GpuMultiAdapter::Elra {
                variant,
                generator: g,
                spec,
            } = &adapters[a]
            else {
                unreachable!("filtered to ELRA")
            };
            let r = ranks[a].0;
            let alpha = match variant {
                Variant::General => 0.0,
                Variant::Psd => 1.0,
                Variant::Hyb => spec.alpha,
            };
            let reads_b = variant.uses_b() && alpha < 1.0;
            batch.a[i] = PrepAdapterC {
                a: g.a.device_addr() as u64,
                lda: r as i64,
                b: if reads_b {
                    g.b.map_or(0, |b| b.device_addr() as u64)
                } else {
                    0
                },
                ldb: d as i64,
                eta: g.eta.device_addr() as u64,
                mult: spec.eta_mult as f32,
                alpha: alpha as f32,
                r: r as i32,
                ct: at(lay.ct[a]),
                z: z_of(a),
            };
        }
        let mut args = stream.launch_builder(&dev.kernels().multi_prep);
        args.arg(&batch);
        // SAFETY: `multi_prep_f32(MultiPrepBatch p)` with the struct's C layout (asserted
        // sizes); block i < p.count reads A (d×r, lda = r), B (r×d, ldb = d; null unless read),
        // η of adapter i — device matrices of exactly those shapes on this device (checked
        // above) — and writes its Cᵀ (d·r values) and Z (r² values), disjoint regions of the
        // checked workspace (`MultiLayout`).
        unsafe { args.launch(cfg(chunk.len(), 1)) }?;
    }
    // M = φ1(Z), one batched launch per rank (e^Z and the statuses stay in the workspace).
    for RankGroup {
        r,
        members,
        z,
        e,
        m,
        status,
    } in &lay.groups
    {
        let b = members.len();
        // SAFETY: regions of b·r² (Z, e^Z, M), b (statuses) and `work_len` values of the checked
        // workspace, disjoint (`MultiLayout`), 16-byte aligned; borrowed for this call only and
        // used by launches on the device's stream.
        let (zm, mut em, mut mm, mut st, work) = unsafe {
            (
                BorrowedMatrices::<f32>::new(dev, at(*z), b, *r, *r)?,
                BorrowedMatrices::<f32>::new(dev, at(*e), b, *r, *r)?,
                BorrowedMatrices::<f32>::new(dev, at(*m), b, *r, *r)?,
                BorrowedSlice::<i32>::new(dev, at(*status), b),
                BorrowedSlice::<f32>::new(dev, at(lay.work), lay.work_len.max(1)),
            )
        };
        launch_expm_phi1_in(
            dev,
            zm.get(),
            em.get_mut(),
            mm.get_mut(),
            st.get_mut(),
            Some(work.get()),
        )?;
    }
    // The row passes, 8 adapters per launch; each adapter's blocks stride over its segment.
    let per_adapter = n.div_ceil(count.max(1));
    let rpw = if per_adapter >= 4 * NWARPS * 64 {
        4
    } else if per_adapter >= 2 * NWARPS * 16 {
        2
    } else {
        1
    };
    let gx = per_adapter.div_ceil(NWARPS * rpw).clamp(1, 1024);
    let (x_p, y_p) = (x.device_addr() as u64, y.device_addr() as u64);
    let (ld_x, ld_y) = (k as i64, d as i64);
    let (seg_p, perm_p) = (at(lay.seg), at(lay.perm));
    let rpw_i = rpw as i32;
    for (c0, chunk) in adapters.chunks(PER_LAUNCH).enumerate() {
        let mut batch = RowsBatchC {
            count: chunk.len() as i32,
            ..Default::default()
        };
        for (i, ad) in chunk.iter().enumerate() {
            let a = c0 * PER_LAUNCH + i;
            let r = ranks[a].0 as i64;
            batch.a[i] = match ad {
                GpuMultiAdapter::Elra { generator: g, .. } => RowsAdapterC {
                    cm: at(lay.ct[a]),
                    cs0: 1,
                    cs1: r,
                    mm: m_of(a),
                    ms0: r,
                    ms1: 1,
                    m_scale: 1.0,
                    am: g.a.device_addr() as u64,
                    as0: r,
                    as1: 1,
                    adapter: a as i32,
                    r: r as i32,
                    from_x: 0,
                },
                GpuMultiAdapter::Lora {
                    a: la,
                    b: lb,
                    scale,
                } => RowsAdapterC {
                    cm: la.device_addr() as u64,
                    cs0: k as i64,
                    cs1: 1,
                    mm: 0,
                    ms0: 0,
                    ms1: 0,
                    m_scale: *scale,
                    am: lb.device_addr() as u64,
                    as0: r,
                    as1: 1,
                    adapter: a as i32,
                    r: r as i32,
                    from_x: 1,
                },
            };
        }
        let mut args = stream.launch_builder(&dev.kernels().rows_multi[T::INDEX]);
        args.arg(&batch)
            .arg(&seg_p)
            .arg(&perm_p)
            .arg(&rpw_i)
            .arg(&d_i)
            .arg(&k_i)
            .arg(&x_p)
            .arg(&ld_x)
            .arg(&y_p)
            .arg(&ld_y);
        // SAFETY: `rows_multi_{dtype}(MultiRowsBatch p, const int* seg, const int* perm, int
        // rows_per_warp, int d, int k, const T* x, long long ld_x, T* y, long long ld_y)` with the
        // struct's C layout (asserted sizes) and T the element type of x and y (kernel picked by
        // T::INDEX); rows_per_warp ∈ {1, 2, 4}. Block (·, i) serves adapter p.a[i].adapter < count:
        // its segment perm[seg[a] .. seg[a+1]) (written by multi_perm_i32 above: row numbers < n)
        // — rows of x (n×k, dense, checked) for LoRA and of y (n×d, checked) for ELRA, each row
        // in exactly one segment, so no two blocks write the same row; the factors it reads are
        // Cᵀ (d×r) and M (r×r) in the checked workspace or the adapter's own A (d×r), lora_A
        // (r×k), lora_B (d×r) matrices, checked above; r ≤ MAX_RANK bounds the shared vectors.
        // In-place rows (ELRA reads and writes y) are allowed by the row pass (a warp reads its
        // row before the barriers that precede its writes).
        unsafe { args.launch(cfg(gx, chunk.len())) }?;
    }
    // The bias, and NaN rows for indices outside [−1, count).
    let bias_p = bias.map_or(0u64, |b| b.device_addr() as u64);
    let mut args = stream.launch_builder(&dev.kernels().multi_finish[T::INDEX]);
    args.arg(&n_i)
        .arg(&d_i)
        .arg(&y_p)
        .arg(&ld_y)
        .arg(&bias_p)
        .arg(&idx_p)
        .arg(&count_i);
    // SAFETY: `multi_finish_{dtype}(int n, int d, T* y, long long ld_y, const T* bias, const int*
    // index, int count)`: a grid-stride loop over the n·d entries of y (n×d, checked), reading
    // bias[j] (1×d, checked, or null) and index[i] (≥ n entries, checked).
    unsafe { args.launch(cfg((n * d).div_ceil(BLOCK_THREADS as usize).min(4096), 1)) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_regions_are_disjoint_and_grouped_by_rank() {
        let ranks = [(4, true), (2, false), (4, true), (8, true), (3, false)];
        let l = MultiLayout::new(100, 16, &ranks).unwrap();
        // Z, e^Z, M of one rank are contiguous batches; slots number the group's members.
        assert_eq!(l.groups.len(), 2);
        assert_eq!(
            (l.groups[0].r, l.groups[0].members.clone()),
            (4, vec![0, 2])
        );
        assert_eq!((l.slot[0], l.slot[2], l.slot[3]), (0, 1, 0));
        let mut regions = vec![
            (l.counts, 5),
            (l.seg, 6),
            (l.perm, 100),
            (l.work, l.work_len),
        ];
        for a in [0, 2, 3] {
            regions.push((l.ct[a], 16 * ranks[a].0));
        }
        for g in &l.groups {
            let b = g.members.len() * g.r * g.r;
            regions.extend([(g.z, b), (g.e, b), (g.m, b), (g.status, g.members.len())]);
        }
        regions.sort();
        for w in regions.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{w:?} overlap");
        }
        assert!(regions
            .iter()
            .all(|(o, len)| o % 4 == 0 && o + len <= l.len));
        assert_eq!(multi_sizes(100, 16, &ranks).unwrap(), l.len);
    }
}
