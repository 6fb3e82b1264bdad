"""The CUDA half of the C ABI on PyTorch CUDA tensors, against an independent PyTorch autograd
implementation of ELRA built on ``torch.linalg.matrix_exp`` of the dense d×d generator.

Reference (float64, src/adapter/generator.rs and eq. 19–21): ``η_eff = η·m(t)``,
``G = η_eff (α A Aᵀ + (1−α) A B)`` (α = 0 general, 1 PSD, the schedule's value for Hyb),
``W_new = exp(G) W0`` (eq. 3), ``y = x W_newᵀ``; the loss whose gradients the library returns is
``L = ⟨y, ∂y⟩ + λ‖G‖²_F`` (eq. 20). LoRA (PEFT): ``y = x W0ᵀ + s (x Aᵀ) Bᵀ``, ``s = lora_alpha/r``.
The reference sees exactly the values the library sees (inputs rounded to the activation type
first, parameters rounded to float32), so the comparison measures only the library's arithmetic.

Skipped (with the reason) without torch, without CUDA, or with a libelra built without the
``cuda`` feature. Run on a GPU machine with a cuda build, e.g.
``ELRA_LIB=$PWD/libelra.so python3 -m pytest -q tests/test_torch_gpu.py``.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible to PyTorch", allow_module_level=True)

import elra  # noqa: E402
from elra import gpu  # noqa: E402

if not gpu.available():
    pytest.skip(
        "libelra was built without the `cuda` feature (set ELRA_LIB to a cuda build)",
        allow_module_level=True,
    )

DEV = torch.device("cuda", torch.cuda.current_device())
N, D, K, R = 64, 48, 40, 4

# Tolerances (max-norm relative, ‖got − ref‖_∞ / ‖ref‖_∞), fixed by the task: f32 activations
# ≤ 1e-5 — f32 GEMMs over k = 40 and the r×r φ1 in f32 give errors of a few 1e-7 relative, so
# 1e-5 leaves an order of magnitude; bf16 ≤ 2e-2 — one bf16 rounding of y (2⁻⁹ ≈ 2e-3) plus the
# rounding of the bf16 tape u = x W0ᵀ and of ū in the backward stays well below. f16 (2⁻¹¹) is
# held to the bf16 bound.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel(got, ref):
    got = torch.as_tensor(np.asarray(got) if not isinstance(got, torch.Tensor) else got)
    got = got.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    return float((got - ref).abs().max() / ref.abs().max())


def rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def elra_reference(x, w0, dy, a, b, eta, alpha, eta_mult, lam):
    """Forward and gradients of ELRA by autograd through the dense matrix exponential."""
    x = x.detach().clone().requires_grad_(True)
    a = a.detach().clone().requires_grad_(True)
    eta_t = torch.tensor(eta, dtype=torch.float64, requires_grad=True)
    if b is not None:
        b = b.detach().clone().requires_grad_(True)
    core = alpha * (a @ a.T)
    if b is not None and alpha < 1.0:
        core = core + (1.0 - alpha) * (a @ b)
    g = eta_t * eta_mult * core
    g.retain_grad()
    w_new = torch.linalg.matrix_exp(g) @ w0
    y = x @ w_new.T
    loss = (y * dy).sum() + lam * (g * g).sum()
    loss.backward()
    # ∂η is a sum of d² terms (∂L/∂G)ᵢⱼ Gᵢⱼ / η that cancel; judge it by the size of its terms.
    eta_scale = float((g.grad.abs() * g.detach().abs()).sum() / eta)
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dA": a.grad,
        "dB": None if b is None else b.grad,
        "deta": float(eta_t.grad),
        "deta_scale": eta_scale,
        "w_new": w_new.detach(),
        # κ(e^G) = ‖e^G‖₂‖e^{−G}‖₂: unmerge applies e^{−G} to a W_new rounded to the activation
        # type, so it cannot be more accurate than κ times that rounding (conditioning, not code).
        "kappa": float(torch.linalg.cond(torch.linalg.matrix_exp(g.detach()), 2)),
    }


def lora_reference(x, w0, dy, la, lb, scaling):
    x = x.detach().clone().requires_grad_(True)
    la = la.detach().clone().requires_grad_(True)
    lb = lb.detach().clone().requires_grad_(True)
    y = x @ w0.T + scaling * (x @ la.T) @ lb.T
    (y * dy).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dA": la.grad, "dB": lb.grad,
            "w_new": (w0 + scaling * lb @ la).detach()}


def setup(dtype, seed):
    """Inputs in the activation type on the GPU and their exact float64 values."""
    gen = torch.Generator().manual_seed(seed)
    x = rand(gen, N, K).to(dtype)
    w0 = rand(gen, D, K, scale=1.0 / math.sqrt(K)).to(dtype)
    dy = rand(gen, N, D).to(dtype)
    return gen, [t.to(DEV) for t in (x, w0, dy)], [t.to(torch.float64) for t in (x, w0, dy)]


VARIANTS = [
    # (variant, config fields, step): α and η_mult come from the handle's schedule at `step`.
    ("general", {}, 0),
    ("psd", {}, 0),
    ("hyb", {"schedule": "constant", "alpha": 0.3}, 0),
    ("hyb", {"schedule": "exponential", "warmup_steps": 20, "gamma": 5.0,
             "eta_multiplier": "cosine", "total_steps": 100}, 7),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant,fields,step", VARIANTS)
def test_elra_forward_backward_matches_torch_autograd(dtype, variant, fields, step):
    gen, (x, w0, dy), (x64, w064, dy64) = setup(dtype, 11)
    lam = 1e-2
    ad = gpu.GpuAdapter(w0, variant, r=R, lambda_=lam, **fields)
    ad.step = step
    # Parameters: random, so that G is O(1) and every term matters; rounded to float32 as the
    # library stores them.
    # PSD: A Aᵀ has eigenvalues ≈ D·s², so the general scale 0.4 would give ‖G‖ ≈ 5 and
    # κ(e^G) ≈ 10³–10⁴, and unmerge would lose that factor to conditioning alone (measured on the
    # H100, 2026-11-22: 4.3e-4 in f32); 0.12 keeps G = O(1) as for the other variants.
    a = rand(gen, D, R, scale=0.4 if variant != "psd" else 0.12).to(torch.float32)
    b = rand(gen, R, D, scale=0.4).to(torch.float32) if variant != "psd" else None
    eta = float(np.float32(0.7))
    ad.set("A", a.numpy())
    if b is not None:
        ad.set("B", b.numpy())
    ad.set("eta", eta)
    np.testing.assert_array_equal(ad.get("A"), a.numpy())
    assert ad.get("eta") == eta
    # α of eq. 19 / eq. 75 and the η multiplier of App. H, written out independently.
    if variant == "general":
        alpha = 0.0
    elif variant == "psd":
        alpha = 1.0
    elif fields["schedule"] == "constant":
        alpha = fields["alpha"]
    else:  # exponential: α(t) = exp(−γ t / T_warm) during the warm-up (eq. 75)
        alpha = math.exp(-fields["gamma"] * step / fields["warmup_steps"])
    assert abs(ad.alpha - alpha) <= 1e-15
    eta_mult = 1.0
    if fields.get("eta_multiplier") == "cosine":  # m(t) = 0.75 + 0.25 cos(π t / T)
        eta_mult = 0.75 + 0.25 * math.cos(math.pi * step / fields["total_steps"])
    ref = elra_reference(x64, w064, dy64, a.double(), None if b is None else b.double(),
                         eta, alpha, eta_mult, lam)

    y = ad.forward(x)
    dx = ad.backward(x, dy)
    g = ad.grads()
    torch.cuda.synchronize()
    tol = TOL[dtype]
    errs = {
        "y": rel(y, ref["y"]),
        "dx": rel(dx, ref["dx"]),
        "dA": rel(torch.from_numpy(g["dA"]), ref["dA"]),
        "deta": abs(g["deta"] - ref["deta"]) / ref["deta_scale"],
    }
    if b is not None:
        errs["dB"] = rel(torch.from_numpy(g["dB"]), ref["dB"])
    else:
        assert g["dB"] is None
    print(f"{variant} {fields} {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    for k, v in errs.items():
        assert v <= tol, f"{k}: relative error {v:.3e} > {tol:.0e}"

    # The tape reuse of the last forward gives the same gradients as the recomputation.
    ad.forward(x)
    dx2 = ad.backward(x, dy, reuse_forward=True)
    g2 = ad.grads()
    assert rel(dx2, dx.double()) <= tol
    assert rel(torch.from_numpy(g2["dA"]), torch.from_numpy(g["dA"]).double()) <= tol

    # Merge (eq. 30) against exp(G) W0, and unmerge back to W0 (Prop. 3).
    w_new = ad.merge()
    w_back = ad.unmerge(w_new)
    torch.cuda.synchronize()
    assert rel(w_new, ref["w_new"]) <= tol
    # Two roundings (W_new, then W0) to the activation type, amplified at most by κ(e^G)
    # (measured 122 for the general variant here: e^G of a non-normal G).
    err_back = rel(w_back, w064)
    print(f"  unmerge: {err_back:.1e} (κ(e^G) = {ref['kappa']:.0f})")
    assert err_back <= 4 * tol * ref["kappa"]
    ad.synchronize()
    if dtype == torch.float32:
        e, p = ad.energy()
        with torch.no_grad():
            core = alpha * (a.double() @ a.double().T)
            if b is not None and alpha < 1.0:
                core = core + (1 - alpha) * (a.double() @ b.double())
            e_ref = float(((eta * eta_mult * core) ** 2).sum())
        assert abs(e - e_ref) <= 1e-5 * e_ref
        assert abs(p - lam * e) <= 1e-12 * max(1.0, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_matches_torch_autograd(dtype):
    gen, (x, w0, dy), (x64, w064, dy64) = setup(dtype, 23)
    ad = gpu.GpuAdapter(w0, "lora", r=R, lora_alpha=8.0)
    la = rand(gen, R, K, scale=0.3).to(torch.float32)
    lb = rand(gen, D, R, scale=0.3).to(torch.float32)
    ad.set("A", la.numpy())
    ad.set("B", lb.numpy())
    ref = lora_reference(x64, w064, dy64, la.double(), lb.double(), 8.0 / R)
    y = ad.forward(x)
    dx = ad.backward(x, dy)
    g = ad.grads()
    w_new = ad.merge()
    torch.cuda.synchronize()
    tol = TOL[dtype]
    errs = {
        "y": rel(y, ref["y"]),
        "dx": rel(dx, ref["dx"]),
        "dA": rel(torch.from_numpy(g["dA"]), ref["dA"]),
        "dB": rel(torch.from_numpy(g["dB"]), ref["dB"]),
        "w_new": rel(w_new, ref["w_new"]),
    }
    print(f"lora {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert g["deta"] is None
    for k, v in errs.items():
        assert v <= tol, f"{k}: relative error {v:.3e} > {tol:.0e}"


def test_work_on_a_side_stream_is_ordered_with_that_stream():
    """The calls are ordered on the caller's stream in both directions: the input written on a
    side stream after a long sleep must be read (not the stale zeros), and a side-stream kernel
    after the call must see the output. Only the side stream is synchronised."""
    gen, (x, w0, dy), (x64, w064, dy64) = setup(torch.float32, 31)
    ad = gpu.GpuAdapter(w0, "hyb", r=R, schedule="constant", alpha=0.5, lambda_=0.0)
    a = rand(gen, D, R, scale=0.4).to(torch.float32)
    b = rand(gen, R, D, scale=0.4).to(torch.float32)
    ad.set("A", a.numpy())
    ad.set("B", b.numpy())
    ad.set("eta", 0.5)
    ref = elra_reference(x64, w064, dy64, a.double(), b.double(), float(np.float32(0.5)), 0.5,
                         1.0, 0.0)
    torch.cuda.synchronize()
    side = torch.cuda.Stream(device=DEV)
    with torch.cuda.stream(side):
        xs = torch.zeros_like(x)
        dys = torch.zeros_like(dy)
        torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning on `side` before x is written
        xs.copy_(x)
        dys.copy_(dy)
        y = ad.forward(xs)  # current stream = side
        y2 = y * 2.0  # a side-stream kernel that consumes the output
        dx = ad.backward(xs, dys, reuse_forward=True)
        dx2 = dx * 2.0
    side.synchronize()
    assert rel(y2 / 2.0, ref["y"]) <= 1e-5
    assert rel(dx2 / 2.0, ref["dx"]) <= 1e-5
    assert rel(torch.from_numpy(ad.grads()["dA"]), ref["dA"]) <= 1e-5
    # The explicit-stream form (stream=) on tensors of the default stream.
    other = torch.cuda.Stream(device=DEV)
    torch.cuda.synchronize()
    other.wait_stream(torch.cuda.current_stream())
    y3 = ad.forward(x, stream=other)
    other.synchronize()
    assert rel(y3, ref["y"]) <= 1e-5


def test_bad_device_arguments_return_status_codes():
    gen, (x, w0, dy), _ = setup(torch.float32, 41)
    ad = gpu.GpuAdapter(w0, "general", r=R)
    y = torch.empty(N, D, device=DEV)
    raw = elra.lib.elra_gpu_adapter_forward
    cur = torch.cuda.current_stream().cuda_stream
    # Host memory instead of device memory.
    host = np.zeros((N, K), dtype=np.float32)
    s = raw(ad.handle, N, host.ctypes.data, K, y.data_ptr(), D, cur)
    assert s == elra.Status.INVALID_ARGUMENT and "device memory" in elra.last_error_message()
    # Strided (ld ≠ cols), zero rows, NULL, overlapping output.
    assert raw(ad.handle, N, x.data_ptr(), K + 1, y.data_ptr(), D, cur) == elra.Status.INVALID_ARGUMENT
    assert raw(ad.handle, 0, x.data_ptr(), K, y.data_ptr(), D, cur) == elra.Status.INVALID_ARGUMENT
    assert raw(ad.handle, N, None, K, y.data_ptr(), D, cur) == elra.Status.NULL_POINTER
    big = torch.empty(N * (D + K), device=DEV)
    assert raw(ad.handle, N, big.data_ptr(), K, big.data_ptr() + 4, D, cur) == elra.Status.INVALID_ARGUMENT
    assert "overlaps" in elra.last_error_message()
    # Gradients before any backward; reuse without a matching forward.
    with pytest.raises(elra.ElraError) as e:
        ad.grads()
    assert e.value.status == elra.Status.INVALID_ARGUMENT
    with pytest.raises(elra.ElraError):
        ad.backward(x, dy, reuse_forward=True)
    # A GPU config the GPU cannot run: the spectral clip, f64.
    with pytest.raises(elra.ElraError) as e:
        gpu.GpuAdapter(w0, "general", r=R, tau=2.0)
    assert e.value.status == elra.Status.INVALID_ARGUMENT and "tau" in e.value.message
    # Nothing above broke the handle or the context.
    ad.forward(x)
    ad.synchronize()
    assert gpu.device_count() >= 1


def test_overflow_rule_on_request():
    """The overflow rule on the GPU is opt-in: off (the default) a non-finite output passes; on,
    forward, backward, merge and unmerge raise OVERFLOW naming the output. ``gpu.check_finite``
    ORs 1 into a device flag and never reads the padding of strided rows."""
    gen, (x, w0, dy), _ = setup(torch.float32, 51)
    ad = gpu.GpuAdapter(w0, "general", r=R)
    assert not ad.check_finite
    x_inf = x.clone()
    x_inf[1, 2] = float("inf")
    ad.forward(x_inf)
    ad.check_finite = True
    with pytest.raises(elra.ElraError) as e:
        ad.forward(x_inf)
    assert e.value.status == elra.Status.OVERFLOW and "`y`" in e.value.message
    ad.forward(x)
    dy_nan = dy.clone()
    dy_nan[0, 0] = float("nan")
    with pytest.raises(elra.ElraError) as e:
        ad.backward(x, dy_nan)
    assert e.value.status == elra.Status.OVERFLOW and "`dx`" in e.value.message
    lora = gpu.GpuAdapter(w0, "lora", r=R, check_finite=True)
    assert lora.check_finite
    w = lora.merge()
    w[0, 0] = float("inf")
    with pytest.raises(elra.ElraError) as e:
        lora.unmerge(w)
    assert e.value.status == elra.Status.OVERFLOW and "`w0`" in e.value.message
    lora.check_finite = False
    lora.unmerge(w)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        big = torch.full((7, 40), float("nan"), dtype=dtype, device=DEV)
        t = big[:, :33]
        t.copy_(torch.randn(7, 33, generator=gen, dtype=torch.float64).to(dtype))
        flag = torch.zeros(1, dtype=torch.int32, device=DEV)
        gpu.check_finite(t, flag)
        torch.cuda.synchronize()
        assert flag.item() == 0, dtype
        t[6, 32] = float("-inf")
        gpu.check_finite(t, flag)
        torch.cuda.synchronize()
        assert flag.item() == 1, dtype
