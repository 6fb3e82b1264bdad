//! The dense n×n kernels of the Padé run on row-major workspace slices (plain or block-pair
//! `[[X, Y], [0, X]]` for the Fréchet derivatives): products, the exact 1-norm, the `‖|X|^p‖₁`
//! iteration, LU with partial pivoting and its solve. Fixed summation orders, no allocation;
//! `cuda/phi1.cu` ports them for the emulation parity tests.

use crate::linalg::Real;

/// `c = a·b` (or `c += a·b` when `acc`), all n×n row-major. 4×4 register tiles over the
/// bulk (each tile accumulates over the full k range in registers), plain row loops for the
/// remainder rows/columns when n is not a multiple of 4. The summation order over k is the
/// natural one (k = 0, 1, …, n−1) for every entry, in tiles and remainders alike.
pub(super) fn gemm<T: Real>(n: usize, a: &[T], b: &[T], c: &mut [T], acc: bool) {
    let nn = n * n;
    let (a, b, c) = (&a[..nn], &b[..nn], &mut c[..nn]);
    let n4 = n / 4 * 4;
    for i0 in (0..n4).step_by(4) {
        let (a0, a1, a2, a3) = (
            &a[i0 * n..(i0 + 1) * n],
            &a[(i0 + 1) * n..(i0 + 2) * n],
            &a[(i0 + 2) * n..(i0 + 3) * n],
            &a[(i0 + 3) * n..(i0 + 4) * n],
        );
        for j0 in (0..n4).step_by(4) {
            let mut t = [[T::zero(); 4]; 4];
            for ((((&x0, &x1), &x2), &x3), brow) in
                a0.iter().zip(a1).zip(a2).zip(a3).zip(b.chunks_exact(n))
            {
                let bb = &brow[j0..j0 + 4];
                let bv = [bb[0], bb[1], bb[2], bb[3]];
                for u in 0..4 {
                    t[0][u] += x0 * bv[u];
                    t[1][u] += x1 * bv[u];
                    t[2][u] += x2 * bv[u];
                    t[3][u] += x3 * bv[u];
                }
            }
            for (r, tr) in t.iter().enumerate() {
                let cr = &mut c[(i0 + r) * n + j0..(i0 + r) * n + j0 + 4];
                for (cv, &tv) in cr.iter_mut().zip(tr) {
                    *cv = if acc { *cv + tv } else { tv };
                }
            }
        }
        // remainder columns of these rows
        for r in 0..4 {
            let ar = &a[(i0 + r) * n..(i0 + r + 1) * n];
            for j in n4..n {
                let mut s = T::zero();
                for (&x, brow) in ar.iter().zip(b.chunks_exact(n)) {
                    s += x * brow[j];
                }
                let cv = &mut c[(i0 + r) * n + j];
                *cv = if acc { *cv + s } else { s };
            }
        }
    }
    // remainder rows
    for i in n4..n {
        let ar = &a[i * n..(i + 1) * n];
        for j in 0..n {
            let mut s = T::zero();
            for (&x, brow) in ar.iter().zip(b.chunks_exact(n)) {
                s += x * brow[j];
            }
            let cv = &mut c[i * n + j];
            *cv = if acc { *cv + s } else { s };
        }
    }
}

/// Pair-aware product `c = a·b`: plain when the slices hold n² entries, block `(X, Y)` pairs
/// when they hold 2n²: `(X₁X₂, X₁Y₂ + Y₁X₂)`.
pub(super) fn mul<T: Real>(n: usize, a: &[T], b: &[T], c: &mut [T]) {
    let nn = n * n;
    gemm(n, &a[..nn], &b[..nn], &mut c[..nn], false);
    if c.len() == 2 * nn {
        gemm(n, &a[..nn], &b[nn..], &mut c[nn..], false);
        gemm(n, &a[nn..], &b[..nn], &mut c[nn..], true);
    }
}

/// Adds `v` to the diagonal of the main block.
pub(super) fn add_diag<T: Real>(n: usize, x: &mut [T], v: T) {
    for i in 0..n {
        x[i * n + i] += v;
    }
}

/// Exact 1-norm of the (block) matrix: `max_j Σ_i |X_ij| (+ |Y_ij|)`. `col` has ≥ n entries.
pub(super) fn norm1<T: Real>(n: usize, x: &[T], col: &mut [T]) -> f64 {
    let col = &mut col[..n];
    col.fill(T::zero());
    for row in x.chunks_exact(n) {
        for (c, &v) in col.iter_mut().zip(row) {
            *c += v.abs();
        }
    }
    col.iter().fold(0.0f64, |m, &c| {
        let c = c.f64();
        if c.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(c)
        }
    })
}

/// One step `w = v·|X|` of the row-vector iteration for `‖|X|^p‖₁` (pair-aware: for
/// `X = [[X, Y], [0, X]]`, `[a, b]·|X| = [a|X|, a|Y| + b|X|]`). Returns `max_j w_j`.
pub(super) fn abs_vecmat_step<T: Real>(n: usize, x: &[T], v: &[T], w: &mut [T]) -> T {
    let nn = n * n;
    let pair = x.len() == 2 * nn;
    let len = if pair { 2 * n } else { n };
    let w = &mut w[..len];
    w.fill(T::zero());
    for i in 0..n {
        let xi = &x[i * n..(i + 1) * n];
        let vi = v[i];
        for (wj, &xij) in w[..n].iter_mut().zip(xi) {
            *wj += vi * xij.abs();
        }
        if pair {
            let yi = &x[nn + i * n..nn + (i + 1) * n];
            let vbi = v[n + i];
            for ((wj, &yij), &xij) in w[n..].iter_mut().zip(yi).zip(xi) {
                *wj += vi * yij.abs() + vbi * xij.abs();
            }
        }
    }
    w.iter().fold(T::zero(), |m, &c| if c > m { c } else { m })
}

/// In-place LU with partial pivoting of the n×n row-major `d`; `false` if a pivot is zero.
pub(super) fn lu_factor<T: Real>(n: usize, d: &mut [T], piv: &mut [usize]) -> bool {
    for k in 0..n {
        let mut p = k;
        let mut best = d[k * n + k].abs();
        for i in k + 1..n {
            let v = d[i * n + k].abs();
            if v > best {
                best = v;
                p = i;
            }
        }
        piv[k] = p;
        if best == T::zero() || !best.is_finite() {
            return false;
        }
        if p != k {
            for j in 0..n {
                d.swap(k * n + j, p * n + j);
            }
        }
        let (top, bot) = d.split_at_mut((k + 1) * n);
        let rowk = &top[k * n..];
        let inv = T::one() / rowk[k];
        for rowi in bot.chunks_exact_mut(n) {
            let l = rowi[k] * inv;
            rowi[k] = l;
            if l != T::zero() {
                for (dij, &dkj) in rowi[k + 1..].iter_mut().zip(&rowk[k + 1..]) {
                    *dij -= l * dkj;
                }
            }
        }
    }
    true
}

/// Solves `D X = B` in place on the n×n row-major `b` (n right-hand sides) with the factors of
/// [`lu_factor`].
pub(super) fn lu_solve<T: Real>(n: usize, lu: &[T], piv: &[usize], b: &mut [T]) {
    let b = &mut b[..n * n];
    for (k, &p) in piv.iter().enumerate().take(n) {
        if p != k {
            for j in 0..n {
                b.swap(k * n + j, p * n + j);
            }
        }
    }
    // Forward (unit lower) then backward (upper) substitution, 4 columns of the right-hand
    // sides at a time held in registers; k runs in increasing order for every entry.
    let n4 = n / 4 * 4;
    for i in 1..n {
        let li = &lu[i * n..i * n + i];
        for j0 in (0..n4).step_by(4) {
            let mut t = [
                b[i * n + j0],
                b[i * n + j0 + 1],
                b[i * n + j0 + 2],
                b[i * n + j0 + 3],
            ];
            for (&l, bk) in li.iter().zip(b.chunks_exact(n)) {
                let bk = &bk[j0..j0 + 4];
                for u in 0..4 {
                    t[u] -= l * bk[u];
                }
            }
            b[i * n + j0..i * n + j0 + 4].copy_from_slice(&t);
        }
        for j in n4..n {
            let mut t = b[i * n + j];
            for (&l, bk) in li.iter().zip(b.chunks_exact(n)) {
                t -= l * bk[j];
            }
            b[i * n + j] = t;
        }
    }
    for i in (0..n).rev() {
        let ui = &lu[i * n + i + 1..(i + 1) * n];
        let inv = T::one() / lu[i * n + i];
        let below = (i + 1) * n;
        for j0 in (0..n4).step_by(4) {
            let mut t = [
                b[i * n + j0],
                b[i * n + j0 + 1],
                b[i * n + j0 + 2],
                b[i * n + j0 + 3],
            ];
            for (&u_ik, bk) in ui.iter().zip(b[below..].chunks_exact(n)) {
                let bk = &bk[j0..j0 + 4];
                for u in 0..4 {
                    t[u] -= u_ik * bk[u];
                }
            }
            for v in t.iter_mut() {
                *v *= inv;
            }
            b[i * n + j0..i * n + j0 + 4].copy_from_slice(&t);
        }
        for j in n4..n {
            let mut t = b[i * n + j];
            for (&u_ik, bk) in ui.iter().zip(b[below..].chunks_exact(n)) {
                t -= u_ik * bk[j];
            }
            b[i * n + j] = t * inv;
        }
    }
}
