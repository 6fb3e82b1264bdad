#!/usr/bin/env python3
"""Reproduces the measurements quoted in docs/numerics.md (issue 28). Not run by the tests or CI.

Needs numpy, scipy and mpmath, and the crate's C library through the ctypes client python/elra:
ELRA_LIB=/path/to/libelra.so (`cargo build --release`). The "before" columns of docs/numerics.md
are the same commands with ELRA_LIB pointing at the library built from commit 48083cb (the
parent of the issue-28 branch).

  python3 tests/data/measure_numerics.py structured   # cases of tests/data/expm_phi1_structured.txt
  python3 tests/data/measure_numerics.py families     # 2000 random badly scaled / non-normal f32 matrices
  python3 tests/data/measure_numerics.py divdiff      # the scalar divided differences (no library)

`structured`: per case, the largest relative error of the diagonal and of the first superdiagonal
(subdiagonal for lower cases) in units of the precision's u, over entries whose reference is a
normal number, and the relative Frobenius error, of e^Z and φ1(Z) from elra and of e^Z from
scipy.linalg.expm (φ1 as the top-right block of SciPy's exp([[Z, I], [0, 0]])).

`families`: numpy.random.default_rng(seed) draws, seeds 2, 3, 4 (families dsim, wide, nonnormal,
nnscaled) and 5, 6 (decay, decay_nn, grow, decay_scaled), 100 matrices per family and seed, n in
2..8 (1..8 for the second set), rounded to float32. Reference: mpmath expm (Taylor) at 34 digits
of the float32 matrix; κ: the relative Frobenius condition number ‖K(Z)‖₂‖Z‖_F/‖e^Z‖_F from
scipy.linalg.expm_frechet in float64. Prints, per family, the geometric mean of elra/scipy errors
and how often elra is more accurate or 2x / 6.5x worse, then the geometric mean, 90th/99th
percentile and maximum of the relative Frobenius error and of error/(κ·2⁻²⁴), for elra float32 and
scipy float32. Takes about 15 minutes.

`divdiff`: the f64 formulas of src/linalg/expm.rs (`exp_divdiff`, `phi1_divdiff`, `phi1_scalar`),
re-typed here with Python floats (the same libm exp/expm1), against mpmath at 60 digits.
"""
import math
import os
import random
import sys

import mpmath
from mpmath import mp, mpf

HERE = os.path.dirname(os.path.abspath(__file__))


def elra_lib():
    sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))
    import elra  # noqa: E402  (ctypes client; ELRA_LIB selects the library)

    return elra


# ---- structured -------------------------------------------------------------------------------

def read_cases(path):
    lines = [l for l in open(path) if not l.startswith("#")]
    for k in range(0, len(lines), 4):
        h = lines[k].split()
        n = int(h[3])
        z = [float(v) for v in lines[k + 1].split()[1:]]
        e = [mpf(v) for v in lines[k + 2].split()[1:]]
        p = [mpf(v) for v in lines[k + 3].split()[1:]]
        yield h[1], h[2], n, z, e, p


def band_and_frob(x, ref, n, dtype, lower):
    import numpy as np

    u = 2.0 ** -24 if dtype == "f32" else 2.0 ** -53
    tiny = float(np.finfo(np.float32 if dtype == "f32" else np.float64).tiny)
    with mp.workdps(40):
        num = sum((mpf(float(a)) - b) ** 2 for a, b in zip(x, ref))
        den = sum(b ** 2 for b in ref)
        frob = float(mpmath.sqrt(num / den))
        band = [0.0, 0.0]
        for off in (0, 1):
            for i in range(n - off):
                r, k = (i + off, i) if lower else (i, i + off)
                b = ref[r * n + k]
                if abs(b) < tiny:
                    continue
                band[off] = max(band[off], float(abs(mpf(float(x[r * n + k])) - b) / abs(b)) / u)
    return band[0], band[1], frob


def structured():
    import numpy as np
    import scipy.linalg as sl
    import warnings

    warnings.simplefilter("ignore")
    elra = elra_lib()
    path = os.path.join(HERE, "expm_phi1_structured.txt")
    print("case dtype | elra exp: diag[u] super[u] frob | elra phi1: diag[u] super[u] frob "
          "| scipy exp: diag[u] super[u] frob | scipy phi1 (block): frob")
    for name, dtype, n, z, e, p in read_cases(path):
        dt = np.float32 if dtype == "f32" else np.float64
        za = np.array(z, dtype=dt).reshape(n, n)
        lower = "lower" in name
        try:
            ee, pe = elra.expm_phi1(za)
            ours = band_and_frob(ee.ravel(), e, n, dtype, lower) + band_and_frob(pe.ravel(), p, n, dtype, lower)
            ours = " ".join(f"{v:.3g}" for v in ours)
        except elra.ElraError as err:
            ours = f"error: {err}"
        se = sl.expm(za).ravel()
        aug = np.zeros((2 * n, 2 * n), dtype=dt)
        aug[:n, :n] = za
        aug[:n, n:] = np.eye(n, dtype=dt)
        sp = sl.expm(aug)[:n, n:].ravel()
        theirs = band_and_frob(se, e, n, dtype, lower) + (band_and_frob(sp, p, n, dtype, lower)[2],)
        print(f"{name} {dtype} | {ours} | " + " ".join(f"{v:.3g}" for v in theirs))


# ---- families ---------------------------------------------------------------------------------

def families_a(rng, count):
    import numpy as np

    out = []
    for k in range(count):
        n = int(rng.integers(2, 9))
        e = [1.0, 2.0, 3.0][k % 3]
        a = rng.uniform(-1, 1, (n, n)) * rng.uniform(0.5, 5)
        d = 10.0 ** rng.uniform(-e, e, n)
        out.append(("dsim", a * d[None, :] / d[:, None]))
        out.append(("wide", rng.uniform(-1, 1, (n, n)) * 10.0 ** rng.uniform(-3, 1.5, (n, n))))
        t = np.triu(rng.uniform(-1, 1, (n, n)) * 10.0 ** rng.uniform(0.5, 1.5), 1) + np.diag(rng.uniform(-2, 1, n))
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        out.append(("nonnormal", q @ t @ q.T))
        d = 10.0 ** rng.uniform(-2, 2, n)
        out.append(("nnscaled", (q @ t @ q.T) * d[None, :] / d[:, None]))
    return [(f, m.astype(np.float32)) for f, m in out]


def families_b(rng, count):
    import numpy as np

    out = []
    for k in range(count):
        n = int(rng.integers(1, 9))
        m = rng.uniform(-1, 1, (n, n))
        m *= rng.uniform(0.5, 5) / np.abs(m).sum(0).max()
        c = rng.uniform(1, 15)
        out.append(("decay", m - c * np.eye(n)))
        t = np.triu(rng.uniform(-1, 1, (n, n)) * 10.0 ** rng.uniform(0, 1), 1) + np.diag(rng.uniform(-1, 1, n))
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        out.append(("decay_nn", q @ (t - rng.uniform(1, 10) * np.eye(n)) @ q.T))
        out.append(("grow", m + rng.uniform(1, 8) * np.eye(n)))
        d = 10.0 ** rng.uniform(-2, 2, n)
        out.append(("decay_scaled", (m - c * np.eye(n)) * d[None, :] / d[:, None]))
    return [(f, mm.astype(np.float32)) for f, mm in out]


def families():
    import numpy as np
    import scipy.linalg as sl
    import warnings

    warnings.simplefilter("ignore")
    elra = elra_lib()
    mats = []
    for seed in (2, 3, 4):
        mats += families_a(np.random.default_rng(seed), 100)
    for seed in (5, 6):
        mats += families_b(np.random.default_rng(seed), 100)
    rows = {"elra": [], "scipy": []}
    for fam, a in mats:
        n = a.shape[0]
        with mp.workdps(34):
            ref = mpmath.expm(mpmath.matrix(a.astype(np.float64).tolist()), method="taylor")
            den = sum(ref[i, j] ** 2 for i in range(n) for j in range(n))

            def err(x):
                num = sum((mpf(float(x[i, j])) - ref[i, j]) ** 2 for i in range(n) for j in range(n))
                return float(mpmath.sqrt(num / den))

            errs = {"elra": err(elra.expm(a)), "scipy": err(sl.expm(a))}
        a64 = a.astype(np.float64)
        kron = np.zeros((n * n, n * n))
        for j in range(n * n):
            e = np.zeros(n * n)
            e[j] = 1
            kron[:, j] = sl.expm_frechet(a64, e.reshape(n, n), compute_expm=False).ravel()
        kappa = np.linalg.norm(kron, 2) * np.linalg.norm(a64) / np.linalg.norm(sl.expm(a64))
        for k in rows:
            rows[k].append((fam, errs[k], errs[k] / (kappa * 2.0 ** -24)))
    fams = sorted(set(f for f, _ in mats))
    for fam in fams + ["all"]:
        ratio = np.array([a[1] / b[1] for a, b in zip(rows["elra"], rows["scipy"]) if fam in ("all", a[0])])
        print(f"elra/scipy {fam:12s} geometric mean {np.exp(np.mean(np.log(ratio))):.2f}, "
              f"elra more accurate on {np.mean(ratio < 1) * 100:.1f}%, "
              f"> 2x worse on {np.mean(ratio > 2) * 100:.1f}%, > 6.5x worse on {np.mean(ratio > 6.5) * 100:.1f}%")
    for k, r in rows.items():
        for fam in fams + ["all"]:
            e = np.array([x[1] for x in r if fam in ("all", x[0])])
            q = np.array([x[2] for x in r if fam in ("all", x[0])])
            print(f"{k:5s} {fam:12s} N={len(e):4d} error: gm {np.exp(np.mean(np.log(e))):.2e} "
                  f"p90 {np.percentile(e, 90):.2e} p99 {np.percentile(e, 99):.2e} max {e.max():.2e} "
                  f"| error/(κu): median {np.median(q):.3f} p90 {np.percentile(q, 90):.2f} "
                  f"p99 {np.percentile(q, 99):.1f} max {q.max():.1f}")


# ---- divdiff ----------------------------------------------------------------------------------

def phi1_scalar(x):
    return 1.0 if x == 0.0 else math.expm1(x) / x


def exp_divdiff(x, y):
    m, d = (x, x - y) if x >= y else (y, y - x)
    return math.exp(m) * phi1_scalar(-d)


def phi1_divdiff(x, y):
    if abs(x) < abs(y):
        x, y = y, x
    if abs(x) < 1.0 or (x >= 0.0 and y >= 0.0 and x < 2.0):
        terms, h, yk, fact = [], 1.0, 1.0, 1.0
        for k in range(30):
            if k > 0:
                yk *= y
                h = x * h + yk
            fact *= k + 2
            terms.append(h / fact)
        acc = 0.0
        for t in reversed(terms):
            acc = acc + t
        return acc
    if x < 0.0 and y >= 1.0:
        return (exp_divdiff(x, y) - phi1_scalar(x)) / y
    return (exp_divdiff(x, y) - phi1_scalar(y)) / x


def divdiff():
    mp.dps = 60

    def ref_phi1(x):
        return mpf(1) if x == 0 else mpmath.expm1(x) / x

    def ref_exp_dd(x, y):
        x, y = mpf(x), mpf(y)
        return mpmath.exp(x) if x == y else (mpmath.exp(x) - mpmath.exp(y)) / (x - y)

    def ref_phi1_dd(x, y):
        x, y = mpf(x), mpf(y)
        if x == y:
            return mpf(1) / 2 if x == 0 else mpmath.diff(ref_phi1, x)
        return (ref_phi1(x) - ref_phi1(y)) / (x - y)

    u = 2.0 ** -53
    rng = random.Random(7)
    worst_p = worst_e = worst_s = (0.0, None)
    for region in ("small", "1to4", "pos", "neg", "wide", "big"):
        for _ in range(10000):
            if region == "small":
                x, y = rng.uniform(-1, 1), rng.uniform(-1, 1)
            elif region == "1to4":
                x = rng.choice([-1, 1]) * rng.uniform(1, 4)
                y = rng.uniform(-abs(x), abs(x))
            elif region == "pos":
                x, y = rng.uniform(0, 6), rng.uniform(0, 6)
            elif region == "neg":
                x, y = -rng.uniform(0, 6), rng.uniform(-6, 6)
            elif region == "big":
                x, y = rng.uniform(-700, 700), rng.uniform(-700, 700)
            else:
                x = rng.choice([-1, 1]) * 10 ** rng.uniform(-10, 2.8)
                y = rng.choice([x, -x, rng.uniform(-abs(x), abs(x)), x * (1 + rng.uniform(-1e-8, 1e-8))])
            if abs(x) > 700 or abs(y) > 700:
                continue
            rp, re = ref_phi1_dd(x, y), ref_exp_dd(x, y)
            ep = float(abs((mpf(phi1_divdiff(x, y)) - rp) / rp)) / u
            if ep > worst_p[0]:
                worst_p = (ep, (x, y))
            if abs(re) > 2.3e-308:
                ee = float(abs((mpf(exp_divdiff(x, y)) - re) / re)) / u
                if ee > worst_e[0]:
                    worst_e = (ee, (x, y))
            es = float(abs((mpf(phi1_scalar(x)) - ref_phi1(x)) / ref_phi1(x))) / u
            if es > worst_s[0]:
                worst_s = (es, (x,))
    print(f"phi1[x,y]: max {worst_p[0]:.2f} u at {worst_p[1]}")
    print(f"exp[x,y] (normal results): max {worst_e[0]:.2f} u at {worst_e[1]}")
    print(f"phi1(x): max {worst_s[0]:.2f} u at {worst_s[1]}")


if __name__ == "__main__":
    {"structured": structured, "families": families, "divdiff": divdiff}[sys.argv[1]]()
