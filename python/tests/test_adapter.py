"""Adapters through the C ABI against an independent NumPy + SciPy implementation (dense
``scipy.linalg.expm`` of the d×d generator, never the Woodbury form), gradients against central
differences of that reference, status codes, and adapter files read and written independently."""

import ctypes
import os
import json
import struct

import numpy as np
import pytest
import scipy.linalg

import elra
from conftest import read_safetensors


def generator(variant, A, B, eta, alpha, tau):
    """Effective generator G (d×d): eq. 2 (general), §4.2.1 (psd), eq. 19 (hyb), then the
    spectral clip of App. H (G ← τG/‖G‖₂ when ‖G‖₂ > τ; τ = 0 disables it)."""
    if variant == "general":
        C = eta * B
    elif variant == "psd":
        C = eta * A.T
    else:
        C = eta * (alpha * A.T + (1 - alpha) * B)
    G = A @ C
    if tau > 0:
        s = np.linalg.norm(G, 2)
        if s > tau:
            G = G * (tau / s)
    return G


def ref_loss(variant, W0, A, B, eta, alpha, tau, lam, X, dY):
    """L = <X W_newᵀ, dY> + λ‖G‖²_F with W_new = expm(G) W0 (eq. 3, eq. 20)."""
    G = generator(variant, A, B, eta, alpha, tau)
    Y = X @ (scipy.linalg.expm(G) @ W0).T
    return np.sum(Y * dY) + lam * np.sum(G * G)


def fd(f, x, h=1e-6):
    """Central differences of the scalar f at the array x (all entries)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


def rel(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


@pytest.mark.parametrize("variant", ["general", "psd", "hyb"])
@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_elra_forward_merge_backward_match_dense_reference(rng, variant, tau):
    d, k, r, n = 6, 5, 2, 4
    W0 = rng.standard_normal((d, k))
    ad = elra.Adapter(W0, variant, r=r, eta=0.35, tau=tau, lambda_=0.03,
                      eta_multiplier="none", schedule="constant", alpha=0.3, seed=9)
    ad.step = 4
    A = ad.get("A")
    B = ad.get("B") if variant != "psd" else None
    eta = ad.get("eta")
    alpha = {"general": 0.0, "psd": 1.0, "hyb": 0.3}[variant]
    assert ad.alpha == pytest.approx(alpha, abs=0)
    X = rng.standard_normal((n, k))
    G = generator(variant, A, B, eta, alpha, tau)
    W_new = scipy.linalg.expm(G) @ W0
    # Woodbury (library) vs dense expm (SciPy): both backward stable, ‖G‖ ≲ 2, so 1e-12.
    assert rel(ad.merge(), W_new) < 1e-12
    assert rel(ad.forward(X), X @ W_new.T) < 1e-12
    assert rel(ad.unmerge(W_new), W0) < 1e-12
    e, p = ad.energy()
    assert e == pytest.approx(np.sum(G * G), rel=1e-12)
    assert p == pytest.approx(0.03 * e, rel=1e-15)
    assert ad.param_count() == ((1 if variant == "psd" else 2) * r * d, 1)

    dY = rng.standard_normal((n, d))
    g = ad.backward(X, dY)
    L = lambda **kw: ref_loss(variant, W0, kw.get("A", A), kw.get("B", B), kw.get("eta", eta),
                              alpha, tau, 0.03, kw.get("X", X), dY)
    # Central differences (h = 1e-6) of the dense reference: truncation ~1e-12, rounding
    # ~1e-10 relative; 1e-6 leaves room for the clip's curvature.
    assert rel(g["dx"], fd(lambda v: L(X=v), X)) < 1e-6
    assert rel(g["dA"], fd(lambda v: L(A=v), A)) < 1e-6
    if variant != "psd":
        assert rel(g["dB"], fd(lambda v: L(B=v), B)) < 1e-6
    else:
        assert g["dB"] is None
    fd_eta = (L(eta=eta + 1e-6) - L(eta=eta - 1e-6)) / 2e-6
    # When the clip is active G = τG/‖G‖₂ does not depend on η, so ∂L/∂η is 0 and the central
    # difference is pure rounding noise, u·|L|/h ≈ 1e-9 for |L| ≲ 10: hence abs = 1e-8.
    assert g["deta"] == pytest.approx(fd_eta, rel=1e-6, abs=1e-8)


def test_lora_matches_peft_formula(rng):
    d, k, r = 5, 7, 3
    W0 = rng.standard_normal((d, k))
    ad = elra.Adapter(W0, "lora", r=r, lora_alpha=6.0)
    A, B = rng.standard_normal((r, k)), rng.standard_normal((d, r))
    ad.set("A", A)
    ad.set("B", B)
    W_new = W0 + (6.0 / r) * B @ A
    X = rng.standard_normal((3, k))
    assert rel(ad.merge(), W_new) < 1e-14
    assert rel(ad.forward(X), X @ W_new.T) < 1e-14
    dY = rng.standard_normal((3, d))
    g = ad.backward(X, dY)
    assert rel(g["dx"], dY @ W_new) < 1e-14
    assert rel(g["dA"], (6.0 / r) * B.T @ dY.T @ X) < 1e-14
    assert rel(g["dB"], (6.0 / r) * dY.T @ X @ A.T) < 1e-14
    assert g["deta"] is None


def test_f32_adapter_tracks_f64(rng):
    W0 = rng.standard_normal((8, 6))
    a64 = elra.Adapter(W0, "hyb", r=3, eta=0.2, seed=4)
    a32 = elra.Adapter(W0.astype(np.float32), "hyb", r=3, eta=0.2, seed=4)
    X = rng.standard_normal((5, 6))
    y32 = a32.forward(X)
    assert y32.dtype == np.float32
    # Same seeded init rounded to f32; f32 arithmetic: relative error ~1e-6.
    assert rel(y32.astype(np.float64), a64.forward(X)) < 1e-5


def test_status_codes_on_bad_input(rng):
    W0 = rng.standard_normal((4, 3))
    with pytest.raises(elra.ElraError) as e:
        elra.Adapter(W0, "general", r=5)
    assert e.value.status == elra.Status.INVALID_ARGUMENT and "`r`" in e.value.message
    with pytest.raises(elra.ElraError) as e:
        elra.Adapter(W0, "general", r=2, eta=-1.0)
    assert e.value.status == elra.Status.INVALID_ARGUMENT
    bad = W0.copy()
    bad[1, 1] = np.inf
    with pytest.raises(elra.ElraError) as e:
        elra.Adapter(bad, "psd", r=2)
    assert e.value.status == elra.Status.NON_FINITE
    ad = elra.Adapter(W0, "psd", r=2)
    with pytest.raises(elra.ElraError) as e:
        ad.get("B")
    assert e.value.status == elra.Status.INVALID_ARGUMENT
    with pytest.raises(elra.ElraError) as e:
        ad.set("A", np.full((4, 2), np.nan))
    assert e.value.status == elra.Status.NON_FINITE
    x = np.ones((2, 3))
    x[0, 0] = np.nan
    with pytest.raises(elra.ElraError) as e:
        ad.forward(x)
    assert e.value.status == elra.Status.NON_FINITE
    # Raw ABI: wrong dtype function, ld < k, NULL handle, shape mismatch.
    f32p = ctypes.POINTER(ctypes.c_float)
    xf = np.ones((2, 3), dtype=np.float32)
    yf = np.zeros((2, 4), dtype=np.float32)
    s = elra.lib.elra_adapter_forward_f32(ad.handle, 2, xf.ctypes.data_as(f32p), 3, yf.ctypes.data_as(f32p), 4)
    assert s == elra.Status.INVALID_ARGUMENT and "f32" in elra.last_error_message()
    xd, yd = np.ones((2, 3)), np.full((2, 4), 7.0)
    dp = ctypes.POINTER(ctypes.c_double)
    s = elra.lib.elra_adapter_forward_f64(ad.handle, 2, xd.ctypes.data_as(dp), 2, yd.ctypes.data_as(dp), 4)
    assert s == elra.Status.INVALID_ARGUMENT
    s = elra.lib.elra_adapter_forward_f64(None, 2, xd.ctypes.data_as(dp), 3, yd.ctypes.data_as(dp), 4)
    assert s == elra.Status.NULL_POINTER
    s = elra.lib.elra_adapter_set_param_f64(ad.handle, 0, xd.ctypes.data_as(dp), 2, 3, 3)
    assert s == elra.Status.SHAPE_MISMATCH
    assert (yd == 7.0).all()


def write_safetensors(path, tensors):
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for key, a in tensors.items():
        b = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_elra_directory_round_trip_and_layout(rng, tmp_path):
    mods = {"model.layers.0.q_proj": (6, 4), "model.layers.0.v_proj": (5, 4)}
    ads = {m: elra.Adapter(rng.standard_normal(s), "hyb", r=2, seed=1) for m, s in mods.items()}
    for a in ads.values():
        a.step = 11
        a.set("eta", 0.07)
    elra.save(tmp_path, ads)
    tensors, meta = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert meta == {"format": "pt"}
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["peft_type"] == "ELRA" and cfg["variant"] == "hyb" and cfg["r"] == 2
    assert cfg["step"] == 11 and sorted(cfg["target_modules"]) == sorted(mods)
    for m, a in ads.items():
        np.testing.assert_array_equal(tensors[f"base_model.model.{m}.elra_A.weight"], a.get("A"))
        np.testing.assert_array_equal(tensors[f"base_model.model.{m}.elra_B.weight"], a.get("B"))
        assert tensors[f"base_model.model.{m}.elra_eta"].shape == ()
        assert float(tensors[f"base_model.model.{m}.elra_eta"]) == 0.07
        back = elra.Adapter.load(tmp_path, m, a.get("W0"))
        assert back.step == 11
        np.testing.assert_array_equal(back.merge(), a.merge())
    elra.save_merged(tmp_path / "merged.safetensors", ads)
    merged, _ = read_safetensors(tmp_path / "merged.safetensors")
    for m, a in ads.items():
        np.testing.assert_array_equal(merged[f"{m}.weight"], a.merge())
    # A truncated weights file is a FORMAT error naming the file.
    p = tmp_path / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(elra.ElraError) as e:
        elra.Adapter.load(tmp_path, "model.layers.0.q_proj", np.ones((6, 4)))
    assert e.value.status == elra.Status.FORMAT
    assert "adapter_model.safetensors" in e.value.message
    with pytest.raises(elra.ElraError) as e:
        elra.Adapter.load(tmp_path / "missing", "m", np.ones((6, 4)))
    assert e.value.status == elra.Status.IO


def test_loads_an_independently_written_peft_lora_directory(rng, tmp_path):
    d, k, r, alpha = 6, 5, 2, 16
    A = rng.standard_normal((r, k)).astype(np.float32)
    B = rng.standard_normal((d, r)).astype(np.float32)
    write_safetensors(tmp_path / "adapter_model.safetensors", {
        "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight": A,
        "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_B.weight": B,
    })
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"],
               "lora_dropout": 0.1, "bias": "none", "fan_in_fan_out": False, "task_type": "CAUSAL_LM",
               "base_model_name_or_path": "facebook/opt-125m", "inference_mode": True,
               "init_lora_weights": True, "use_dora": False, "use_rslora": False,
               "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}},
              open(tmp_path / "adapter_config.json", "w"))
    W0 = rng.standard_normal((d, k))
    ad = elra.Adapter.load(tmp_path, "model.decoder.layers.0.self_attn.q_proj", W0)
    assert ad.variant == "lora"
    want = W0 + (alpha / r) * B.astype(np.float64) @ A.astype(np.float64)
    assert rel(ad.merge(), want) < 1e-14
    # Saving it again writes PEFT's keys and shapes (lora_A r×in, lora_B out×r).
    out = tmp_path / "again"
    elra.save(out, {"model.decoder.layers.0.self_attn.q_proj": ad})
    tensors, _ = read_safetensors(out / "adapter_model.safetensors")
    key = "base_model.model.model.decoder.layers.0.self_attn.q_proj"
    assert tensors[f"{key}.lora_A.weight"].shape == (r, k)
    assert tensors[f"{key}.lora_B.weight"].shape == (d, r)
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == alpha and cfg["bias"] == "none"


def test_finite_inputs_with_an_overflowing_result_raise_overflow(rng):
    """Issue 28: finite inputs whose result leaves the floating-point range give OVERFLOW (as
    the matrix functions do), never Inf/NaN with status OK."""
    d, k, r = 6, 5, 2
    W0 = rng.standard_normal((d, k))
    big = np.full((3, k), 1e308)
    a = elra.Adapter(W0, "hyb", r=r)
    with pytest.raises(elra.ElraError) as e:
        a.forward(big)
    assert e.value.status == elra.Status.OVERFLOW
    for dtype, alpha in [(np.float64, 1e308), (np.float32, 1e38)]:
        lora = elra.Adapter(W0, "lora", r=r, dtype=dtype, lora_alpha=alpha)
        lora.set("B", np.full((d, r), 100.0))
        with pytest.raises(elra.ElraError) as e:
            lora.forward(np.ones((3, k)))
        assert e.value.status == elra.Status.OVERFLOW, e.value
        assert "floating-point range" in e.value.message


def test_oversized_requests_return_a_status_not_an_abort():
    """Issue 28: layouts are checked before anything is allocated and caller-sized working sets
    are reserved fallibly, so these calls return a status. Each runs in a child interpreter, so
    a regression (an abort) fails this test instead of killing pytest."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import ctypes, sys
        import numpy as np
        import elra
        r = int(sys.argv[1])
        z = np.zeros(16)
        out = np.zeros(16)
        p = lambda a: a.ctypes.data_as(ctypes.POINTER(ctypes.c_double))
        s = elra.lib.elra_expm_f64(1, r, p(z), r, 0, p(out), r, 0)
        print(int(s), elra.last_error_message())
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    for r, status, text in [
        (2**32, elra.Status.INVALID_ARGUMENT, "address space"),
        (2**62, elra.Status.INVALID_ARGUMENT, "address space"),
        (2**22, elra.Status.OUT_OF_MEMORY, "out of memory"),
    ]:
        p = subprocess.run([sys.executable, "-c", code, str(r)], capture_output=True, text=True,
                           env=env, timeout=120)
        assert p.returncode == 0, (r, p.returncode, p.stderr)
        got, msg = p.stdout.strip().split(" ", 1)
        assert int(got) == status and text in msg, (r, p.stdout)
