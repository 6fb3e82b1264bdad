"""``elra.torch`` on CUDA tensors (the functional GPU ABI, ``elra_gpu_op_*``) against the same
module on CPU tensors in float64 (itself checked by ``gradcheck`` against
``torch.linalg.matrix_exp`` in test_torch.py): outputs and the gradients of A, B, log η and x of
``ElraLinear`` (fused and output-side, every variant), the energy, merge/unmerge, ``opcheck`` of
the CUDA ops, ``torch.compile(fullgraph=True)`` and bad input.

Tolerances (max-norm relative), set before any GPU run of this file (not yet calibrated on a
device): outputs and ∂x with f32 activations ≤ 1e-4 — the GPU computes in f32 (GEMMs over
k = 40, φ1 of an r×r matrix) against a float64 reference, errors of a few 1e-7 relative per
operation; bf16/f16 ≤ 3e-2 — one rounding of the activations (2⁻⁹ for bf16) plus the rounding of
the output and of ∂x. Parameter gradients (reductions over the 64 rows) ten times those.

Skipped (with the reason) without torch, without CUDA, or with a libelra built without the
``cuda`` feature: ``ELRA_LIB=$PWD/libelra.so python3 -m pytest -q tests/test_torch_cuda_ops.py``
on a GPU machine (``scripts/gpu-check.sh`` stages and runs it).
"""

import copy

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible to PyTorch", allow_module_level=True)

from torch import nn  # noqa: E402

from elra import gpu  # noqa: E402

if not gpu.available():
    pytest.skip(
        "libelra was built without the `cuda` feature (set ELRA_LIB to a cuda build)",
        allow_module_level=True,
    )

import elra.torch as et  # noqa: E402

DEV = torch.device("cuda", torch.cuda.current_device())
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}


class Opaque(nn.Module):
    """A linear layer elra cannot see into: ElraLinear takes the output-side form."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight, self.bias = lin.weight, lin.bias

    def forward(self, x):
        return self.lin(x)


def rel(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def pair(variant, fused, dtype, step=3, lam=1e-2):
    """The same layer twice: float64 on the CPU (reference) and on the GPU (float32 parameters,
    base weight of the activation type, rounded the same way in the reference)."""
    torch.manual_seed(5)
    lin = nn.Linear(40, 48)
    lin.weight.data = lin.weight.data.to(dtype).double()
    lin.bias.data = lin.bias.data.to(dtype).double()
    base = lin if fused else Opaque(lin)
    kw = dict(r=4, eta=0.3, lambda_=lam, total_steps=10, seed=1)
    cpu = et.ElraLinear(base.double(), variant, dtype=torch.float64, **kw)
    cpu.step.fill_(step)
    gpu_layer = copy.deepcopy(cpu)
    gpu_layer.base.to(DEV, dtype)
    for name, p in gpu_layer.named_parameters():
        if p.requires_grad:
            p.data = p.data.float().to(DEV)
            getattr(cpu, name).data = p.data.double().cpu()  # the reference sees f32 values
    return cpu, gpu_layer


def run(layer, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    loss = (y * dy).sum() + layer.energy()
    loss.backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    return y, x.grad, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["general", "psd", "hyb", "double"])
@pytest.mark.parametrize("fused", [True, False])
def test_elra_linear_on_cuda_matches_the_cpu(dtype, variant, fused):
    if variant == "double" and not fused:
        pytest.skip("double is its own output-side composition")
    cpu, gl = pair(variant, fused, dtype)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 40, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(64, 48, generator=g, dtype=torch.float64).to(dtype)
    y_ref, dx_ref, g_ref = run(cpu, x.double(), dy.double())
    y, dx, grads = run(gl, x.to(DEV), dy.to(DEV))
    torch.cuda.synchronize()
    assert y.dtype == dtype and dx.dtype == dtype
    tol = TOL[dtype]
    assert rel(y, y_ref) < tol, ("y", rel(y, y_ref))
    assert rel(dx, dx_ref) < tol, ("dx", rel(dx, dx_ref))
    for n, ref in g_ref.items():
        assert grads[n].dtype == torch.float32
        assert rel(grads[n], ref) < 10 * tol, (n, rel(grads[n], ref))


@pytest.mark.parametrize("variant", ["general", "psd", "hyb"])
def test_energy_and_merge_on_cuda_match_the_cpu(variant):
    cpu, gl = pair(variant, True, torch.float32, lam=0.5)
    assert rel(gl.energy(), cpu.energy()) < 1e-5
    w_ref = cpu._transform(cpu.base.weight, inverse=False)
    w = gl._transform(gl.base.weight, inverse=False)
    assert w.is_cuda and rel(w, w_ref) < 1e-5
    w0 = gl.base.weight.detach().clone()
    gl.merge()
    gl.unmerge()  # Prop. 3: exp(−G) exp(G) W0 = W0
    assert rel(gl.base.weight, w0) < 1e-5


def test_opcheck_of_the_cuda_ops():
    _, gl = pair("hyb", True, torch.float32)
    x = torch.randn(16, 40, device=DEV)
    w0 = gl.base.weight.detach()
    eta = gl.log_eta.detach().exp()
    a = gl.A.detach().requires_grad_(True)
    b = gl.B.detach().requires_grad_(True)
    for op, args in (
        (torch.ops.elra.delta.default, (x, w0, a, b, eta, gl.step, None, gl.cfg)),
        (torch.ops.elra.rows.default, (torch.randn(16, 48, device=DEV), a, b, eta, gl.step, None,
                                       gl.cfg)),
        (torch.ops.elra.energy.default, (a, b, eta, gl.step, gl.cfg)),
    ):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                    "test_autograd_registration"))


def test_compile_fullgraph_on_cuda_gives_the_eager_result():
    _, gl = pair("hyb", True, torch.float32)
    x = torch.randn(32, 40, device=DEV)
    y = gl(x)
    y.square().sum().backward()
    ga = gl.A.grad.clone()
    gl.zero_grad()
    yc = torch.compile(gl, fullgraph=True)(x)
    yc.square().sum().backward()
    assert rel(yc, y) < 1e-6 and rel(gl.A.grad, ga) < 1e-6


def test_bad_cuda_input_names_the_argument():
    _, gl = pair("hyb", True, torch.float32)
    x = torch.randn(8, 40, device=DEV)
    w0 = gl.base.weight.detach()
    a, b, eta = gl.A.detach(), gl.B.detach(), gl.log_eta.detach().exp()
    with pytest.raises(ValueError, match="eta"):
        torch.ops.elra.delta(x, w0, a, b, eta.cpu(), gl.step, None, gl.cfg)
    with pytest.raises(TypeError, match="`a`"):
        torch.ops.elra.delta(x, w0, a.double(), b, eta, gl.step, None, gl.cfg)
    with pytest.raises(TypeError, match="`x`"):
        torch.ops.elra.delta(x.double(), w0.double(), a, b, eta, gl.step, None, gl.cfg)
    with pytest.raises(ValueError, match="w0"):
        torch.ops.elra.delta(x, w0[:, :30], a, b, eta, gl.step, None, gl.cfg)
    with pytest.raises(ValueError, match="dropout"):
        torch.ops.elra.delta(x, w0, a, b, eta, gl.step, torch.ones(8, 48, device=DEV), gl.cfg)
    with pytest.raises(ValueError, match="is on"):
        gl(x.cpu())


def test_half_activations_over_a_float32_base_keep_their_dtype():
    torch.manual_seed(3)
    x = torch.randn(16, 40, device=DEV, dtype=torch.bfloat16)
    # A float32 nn.Linear base (fused and double), and an opaque base of the activation type
    # (it runs itself) under float32 adapter weights.
    for variant, base in (("hyb", nn.Linear(40, 48)),
                          ("hyb", Opaque(nn.Linear(40, 48).to(torch.bfloat16))),
                          ("double", nn.Linear(40, 40))):
        layer = et.ElraLinear(base, variant, r=4, total_steps=10).to(DEV)
        xin = x if variant != "double" else torch.randn(16, 40, device=DEV, dtype=torch.bfloat16)
        y = layer(xin)
        assert y.dtype == torch.bfloat16, (variant, type(base).__name__, y.dtype)
        y.float().square().sum().backward()
        assert layer.A.grad.dtype == torch.float32


def test_double_sided_merge_on_cuda_round_trips():
    torch.manual_seed(4)
    layer = et.ElraLinear(nn.Linear(24, 24), "double", r=3, eta=0.3, total_steps=10).to(DEV)
    cpu = copy.deepcopy(layer).to("cpu", torch.float64)
    w0 = layer.base.weight.detach().clone()
    w_ref = cpu._transform(cpu.base.weight, inverse=False)
    w = layer._transform(layer.base.weight, inverse=False)
    assert rel(w, w_ref) < 1e-5
    layer.merge()
    layer.unmerge()  # exp(−L) exp(L) W0 exp(R) exp(−R) = W0 (App. B, Prop. 3)
    assert rel(layer.base.weight, w0) < 1e-5


def test_a_step_on_the_gpu_gives_the_same_result():
    _, gl = pair("hyb", True, torch.float32)
    x = torch.randn(8, 40, device=DEV)
    y_cpu_step = gl(x)
    gl.step = gl.step.to(DEV)  # read back to the host by the op (one small copy per call)
    assert torch.equal(gl(x), y_cpu_step)


def test_dropout_on_cuda_is_applied_to_the_fused_increment_only():
    torch.manual_seed(6)
    fused = et.ElraLinear(nn.Linear(40, 48), "hyb", r=4, eta=0.3, dropout=0.5,
                          total_steps=10).to(DEV)
    x = torch.randn(64, 40, device=DEV)
    fused.eval()
    y_eval = fused(x)
    fused.train()
    y_train = fused(x)
    base = fused.base(x)
    inc_eval, inc_train = y_eval - base, y_train - base
    # Each entry of the increment is dropped (0) or scaled by 1/(1−p) = 2.
    kept = inc_train.abs() > 1e-6 * inc_eval.abs().max()
    assert 0.3 < kept.float().mean() < 0.7
    assert rel(inc_train[kept], 2 * inc_eval[kept]) < 1e-4
    for variant, base_layer in (("double", nn.Linear(40, 40)), ("hyb", Opaque(nn.Linear(40, 48)))):
        layer = et.ElraLinear(base_layer, variant, r=4, dropout=0.5, total_steps=10).to(DEV)
        with pytest.raises(ValueError, match="dropout"):
            layer(torch.randn(8, 40, device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_linear_on_cuda_matches_the_cpu(dtype):
    """ElraMultiLinear on CUDA tensors (``elra_gpu_op_multi_forward``: the grouped kernels)
    against the same module on CPU tensors in float64."""
    torch.manual_seed(0)
    base = nn.Linear(40, 24).double()
    layers = [et.ElraLinear(copy.deepcopy(base), v, r=r, eta=0.3, total_steps=20, seed=i,
                            dtype=torch.float64, **kw)
              for i, (v, r, kw) in enumerate([("general", 4, {}), ("psd", 3, {}), ("hyb", 2, {}),
                                              ("lora", 4, {"lora_alpha": 8.0})])]
    with torch.no_grad():
        for m in layers:
            m.step.fill_(5)
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    cpu = et.ElraMultiLinear(copy.deepcopy(base))
    for m in layers:
        cpu.add(m)
    gpu_base = copy.deepcopy(base).to(DEV, dtype)
    dev = et.ElraMultiLinear(gpu_base)
    for m in layers:
        dev.add(m)
    x = torch.randn(64, 40, dtype=torch.float64)
    index = torch.randint(-1, 4, (64,))
    want = cpu(x, index)
    got = dev(x.to(DEV, dtype), index.to(DEV))
    assert rel(got, want) <= TOL[dtype]
