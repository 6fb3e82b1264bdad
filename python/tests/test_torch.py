"""``elra.torch``: the custom ops against torch's own checks (opcheck, gradcheck) and a dense
reference through ``torch.linalg.matrix_exp``; ``torch.compile(fullgraph=True)``; two-process
DDP over gloo on loopback; PEFT-like inject / merge / save / load (a LoRA directory loads in
PEFT); the output-side form on a quantised stand-in base; bad input; saved activation memory."""

import math
import os
import socket

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (scripts/pytest-torch.sh installs it)")
import torch.nn as nn  # noqa: E402

import elra  # noqa: E402
import elra.torch as et  # noqa: E402

F64 = torch.float64


def dense_w_new(m, step=None):
    """``W_new = expm(G) W0`` of an ElraLinear from its parameters (eq. 2, §4.2.1, eq. 19) with
    α and the η multiplier from ``elra_schedule_at`` — the dense reference, never Woodbury."""
    st = et._step(m.cfg, m.step if step is None else step, m.d, m.k, m.r)
    eta = m.log_eta.exp() * st.eta_mult
    variant = int(m.cfg[0])
    if variant == 1:
        C = eta * m.A.t()
    elif variant == 0:
        C = eta * m.B
    else:
        C = eta * (st.alpha * m.A.t() + (1 - st.alpha) * m.B)
    G = m.A @ C
    W = torch.linalg.matrix_exp(G) @ m.base.weight
    if m.variant == "double":
        Cr = m.log_eta_right.exp() * st.eta_mult * (st.alpha * m.A_right.t() + (1 - st.alpha) * m.B_right)
        W = W @ torch.linalg.matrix_exp(m.A_right @ Cr)
    return W


def layer(variant, d=6, k=5, r=2, **kw):
    torch.manual_seed(3)
    base = nn.Linear(k, d).to(F64)
    kw.setdefault("eta", 0.4)
    kw.setdefault("total_steps", 20)
    m = et.ElraLinear(base, variant, r=r, **kw)
    m.step.fill_(3)  # inside the warm-up: 0 < α < 1 for Hyb
    return m


@pytest.mark.parametrize("variant", ["general", "psd", "hyb", "double"])
def test_forward_matches_the_dense_reference_and_gradcheck_passes(variant):
    m = layer(variant)
    x = torch.randn(7, 5, dtype=F64, requires_grad=True)
    y = m(x)
    ref = x @ dense_w_new(m).t() + m.base.bias
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12), (y - ref).abs().max()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p for p in m.parameters() if p.requires_grad]

    # The op's analytic gradients (elra's reverse mode) against finite differences of the op.
    def g(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    inputs = (x,) + tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    # And the dense reference's autograd agrees with elra's on the parameters.
    m.zero_grad()
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    got = [p.grad.clone() for p in params]
    m.zero_grad()
    ((x @ dense_w_new(m).t() + m.base.bias) * dy).sum().backward()
    for a, b in zip(got, [p.grad for p in params]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), (a - b).abs().max()


def test_energy_matches_the_dense_generator_and_gradchecks():
    m = layer("hyb", lambda_=0.3)
    e = m.energy()
    st = et._step(m.cfg, m.step, m.d, m.k, m.r)
    eta = m.log_eta.exp() * st.eta_mult
    G = m.A @ (eta * (st.alpha * m.A.t() + (1 - st.alpha) * m.B))
    ref = 0.3 * (G * G).sum()
    assert torch.allclose(e, ref, rtol=1e-12)
    e.backward()
    got = [m.A.grad.clone(), m.B.grad.clone(), m.log_eta.grad.clone()]
    m.zero_grad()
    ref.backward()
    for a, b in zip(got, [m.A.grad, m.B.grad, m.log_eta.grad]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    a = m.A.detach().clone().requires_grad_(True)
    b = m.B.detach().clone().requires_grad_(True)
    eta = m.log_eta.exp().detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, eta: torch.ops.elra.energy(a, b, eta, m.step, m.cfg),
                                    (a, b, eta))


def test_ops_pass_opcheck():
    m = layer("hyb")
    n = 4
    x = torch.randn(n, m.k, dtype=F64, requires_grad=True)
    u = torch.randn(n, m.d, dtype=F64, requires_grad=True)
    a = m.A.detach().clone().requires_grad_(True)
    b = m.B.detach().clone().requires_grad_(True)
    eta = torch.tensor(0.4, dtype=F64, requires_grad=True)
    w0 = m.base.weight.detach()
    mask = (torch.rand(n, m.d, dtype=F64) > 0.2).to(F64) * 1.25
    psd = layer("psd")
    for args in [
        (x, w0, a, b, eta, m.step, None, m.cfg),
        (x, w0, a, b, eta, m.step, mask, m.cfg),
        (x, w0, psd.A.detach().clone().requires_grad_(True), None, eta, psd.step, None, psd.cfg),
    ]:
        torch.library.opcheck(torch.ops.elra.delta.default, args)
    torch.library.opcheck(torch.ops.elra.rows.default, (u, a, b, eta, m.step, mask, m.cfg))
    torch.library.opcheck(torch.ops.elra.energy.default, (a, b, eta, m.step, m.cfg))


def mlp(variant, seed=0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    return et.inject(model, ["0", "2"], variant, r=2, eta=0.3, total_steps=10, **kw)


def test_compile_fullgraph_gives_the_eager_outputs_and_gradients():
    model = mlp("hyb").float()
    for _, m in et.layers(model):
        m.step.fill_(2)
    x = torch.randn(6, 8)
    y = model(x)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    yc = compiled(x)
    yc.square().sum().backward()
    assert torch.allclose(y, yc, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[n], p.grad, rtol=1e-5, atol=1e-6), n


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, path, steps):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import elra.torch as et_

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = mlp("hyb", dropout=0.0).double()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(8, 8, dtype=F64, generator=g)
        t = torch.randn(8, 4, dtype=F64, generator=g)
        part = slice(rank * 4, rank * 4 + 4)
        loss = (ddp(x[part]) - t[part]).square().mean() + et_.energy(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        et_.advance(model)
    if rank == 0:
        torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, path)
    # Both ranks leave together: tearing gloo down while the peer still talks to it aborted a
    # worker now and then ("terminate called without an active exception", in gloo's threads).
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_over_gloo_equals_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    steps = 3
    path = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), path, steps), nprocs=2, join=True)
    ddp = torch.load(path)
    model = mlp("hyb", dropout=0.0).double()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(8, 8, dtype=F64, generator=g)
        t = torch.randn(8, 4, dtype=F64, generator=g)
        # DDP averages the two halves' gradients: the loss of the whole batch with each half's
        # mean weighted 1/2, and the energy once.
        loss = 0.5 * ((model(x[:4]) - t[:4]).square().mean() + (model(x[4:]) - t[4:]).square().mean())
        loss = loss + et.energy(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        et.advance(model)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(ddp[n], p.detach(), rtol=1e-10, atol=1e-12), n


def test_inject_merge_unload_and_files(tmp_path):
    model = mlp("hyb").double()
    x = torch.randn(5, 8, dtype=F64)
    # A training step so that the adapters matter.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).square().sum().backward()
    opt.step()
    et.advance(model, 4)
    t, a = et.trainable_parameters(model)
    assert t == (2 * 2 * 16 + 1) + (2 * 2 * 4 + 1) and a > t  # 2rd + η per layer (Remark 1)
    et.print_trainable_parameters(model)
    y = model(x)
    et.save_adapter(model, tmp_path / "hyb")
    # Load into a freshly injected copy: the same outputs bit for bit.
    other = mlp("hyb").double()
    et.load_adapter(other, tmp_path / "hyb")
    assert torch.equal(other(x), y)
    # merge / unmerge restore W0; merge_and_unload leaves plain layers with the merged weights.
    w0 = model[0].base.weight.clone()
    et.merge(model)
    assert torch.allclose(model(x), y, rtol=1e-12, atol=1e-12)
    et.unmerge(model)
    assert torch.allclose(model[0].base.weight, w0, rtol=1e-13, atol=1e-13)
    plain = et.merge_and_unload(model)
    assert not et.layers(plain) and isinstance(plain[0], nn.Linear)
    assert torch.allclose(plain(x), y, rtol=1e-12, atol=1e-12)


def test_a_lora_directory_saved_from_an_injected_model_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    model = mlp("lora", lora_alpha=4.0).double()
    with torch.no_grad():
        for _, m in et.layers(model):
            m.lora_B.normal_()
    x = torch.randn(5, 8, dtype=F64)
    y = model(x)
    et.save_adapter(model, tmp_path / "lora")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora"))
    assert torch.allclose(pm(x), y, rtol=1e-12, atol=1e-12)


class Int8Linear(nn.Module):
    """A dequantise-on-the-fly stand-in for a quantised base layer (bitsandbytes-style): int8
    weight with a per-row scale; elra only sees its output."""

    def __init__(self, lin):
        super().__init__()
        w = lin.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("q", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def dequantized(self):
        return self.q.to(self.scale.dtype) * self.scale

    def forward(self, x):
        return x @ self.dequantized().t() + self.bias


def test_output_side_form_wraps_a_quantised_base():
    torch.manual_seed(4)
    q = Int8Linear(nn.Linear(5, 6).to(F64))
    m = et.ElraLinear(q, "hyb", r=2, eta=0.4, total_steps=20, dtype=F64)
    m.step.fill_(3)
    assert not m.fused
    x = torch.randn(7, 5, dtype=F64, requires_grad=True)
    y = m(x)
    st = et._step(m.cfg, m.step, m.d, m.k, m.r)
    eta = m.log_eta.exp() * st.eta_mult
    G = m.A @ (eta * (st.alpha * m.A.t() + (1 - st.alpha) * m.B))
    ref = x @ (torch.linalg.matrix_exp(G) @ q.dequantized()).t() + q.bias
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    got = [x.grad.clone(), m.A.grad.clone(), m.B.grad.clone(), m.log_eta.grad.clone()]
    x.grad = None
    m.zero_grad()
    (ref * dy).sum().backward()
    for a, b in zip(got, [x.grad, m.A.grad, m.B.grad, m.log_eta.grad]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


def test_bad_input_raises_naming_the_argument():
    m = layer("hyb")
    with pytest.raises(ValueError, match="`x`"):
        m(torch.randn(3, 4, dtype=F64))
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.elra.delta(torch.randn(3, 5, dtype=torch.float16), m.base.weight.detach(), m.A, m.B,
                             m.log_eta.exp(), m.step, None, m.cfg)
    with pytest.raises(TypeError, match="`a`"):
        torch.ops.elra.delta(torch.randn(3, 5, dtype=F64), m.base.weight.detach(), m.A.float(), m.B,
                             m.log_eta.exp(), m.step, None, m.cfg)
    with pytest.raises(ValueError, match="`b`"):
        torch.ops.elra.delta(torch.randn(3, 5, dtype=F64), m.base.weight.detach(), m.A, m.B[:, :3],
                             m.log_eta.exp(), m.step, None, m.cfg)
    with pytest.raises(ValueError, match="meta"):
        m(torch.randn(3, 5, dtype=F64, device="meta"))
    with torch.no_grad():
        m.A[0, 0] = float("nan")
    with pytest.raises(elra.ElraError) as e:
        m(torch.randn(3, 5, dtype=F64))
    assert e.value.status == elra.Status.NON_FINITE and "`a`" in e.value.message
    # Non-contiguous and channels-last inputs work (copied where needed).
    m = layer("hyb")
    xt = torch.randn(5, 4, dtype=F64).t()  # 4×5 view, not contiguous
    assert not xt.is_contiguous()
    assert torch.allclose(m(xt), m(xt.contiguous()))
    img = torch.randn(2, 3, 4, 5, dtype=F64).to(memory_format=torch.channels_last)
    assert torch.allclose(m(img), m(img.contiguous()))


def test_saved_activations_are_lora_sized():
    """The bytes autograd keeps for an ELRA layer's backward, measured with saved-tensor hooks:
    no N×d tensor, at most PEFT-style LoRA's plus two r×r matrices."""
    n, d, k, r = 64, 32, 24, 4

    def saved(model, x):
        # Activations only: not the input (the engine keeps it) nor parameters and buffers.
        own = {x.untyped_storage().data_ptr()}
        own |= {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        seen = {}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in own:
                seen[key] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(seen.values())

    torch.manual_seed(0)
    x = torch.randn(n, k, requires_grad=True)
    elra_layer = et.ElraLinear(nn.Linear(k, d), "hyb", r=r)
    lora_layer = et.ElraLinear(nn.Linear(k, d), "lora", r=r)
    s_elra, s_lora = saved(elra_layer, x), saved(lora_layer, x)
    # ELRA: V (n×r) + Z, M (r×r) and η = exp(log η) (one value); LoRA: x A'ᵀ (n×r).
    assert s_lora == n * r * 4, s_lora
    assert s_elra <= s_lora + 2 * r * r * 4 + 4, (s_elra, s_lora)
    assert s_elra < n * d * 4, s_elra
    assert et.saved_bytes(elra_layer, n) == (n * r + 2 * r * r) * 4


def test_ga_initialise_seeds_hyb_ga_from_the_frozen_gradient():
    """``"hyb-ga"`` layers get A = top-r left singular vectors of the mean ∂L/∂G at G = 0 and
    B = −(σᵢ/σ₁) vᵢᵀ (App. H), checked against autograd through a dense d×d probe G."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    batches = [(torch.randn(10, 6, dtype=F64), torch.randn(10, 3, dtype=F64)) for _ in range(3)]
    # Reference: ∂L/∂G at G = 0 for the first layer through W = expm(G) W0.
    w0 = model[0].weight.detach().clone()
    G = torch.zeros(8, 8, dtype=F64, requires_grad=True)
    for x, t in batches:
        h = torch.tanh(x @ (torch.linalg.matrix_exp(G) @ w0).t() + model[0].bias)
        ((h @ model[2].weight.t() + model[2].bias - t) ** 2).mean().backward()
    mean = G.grad / len(batches)
    et.inject(model, ["0"], "hyb-ga", r=2, eta=0.3, total_steps=10)
    n = et.ga_initialise(model, batches, lambda y, t: ((y - t) ** 2).mean())
    assert n == 3
    u, sv, vh = torch.linalg.svd(mean)
    m = model[0]
    assert torch.allclose(m.A.abs(), u[:, :2].abs(), atol=1e-10)
    want_b = -(sv[:2] / sv[0])[:, None] * vh[:2]
    # Singular vectors are defined up to sign: compare the product A B.
    assert torch.allclose(m.A @ m.B, u[:, :2] @ want_b, atol=1e-10)
    assert m.A.grad is None and model(batches[0][0]).shape == (10, 3)


def test_load_adapter_refuses_a_mismatch_before_changing_anything(tmp_path):
    """Another variant (a general file into a PSD model would drop B), rank, schedule or LoRA
    scaling, or a merged model: a ValueError naming the module, and no parameter changed."""
    src = mlp("general").double()
    et.save_adapter(src, tmp_path / "general")
    for variant, kw in [("psd", {}), ("hyb", {}), ("general", {"gamma": 7.0})]:
        dst = mlp(variant, seed=1, **kw).double()
        before = [p.clone() for p in dst.parameters()]
        with pytest.raises(ValueError, match="module `0`"):
            et.load_adapter(dst, tmp_path / "general")
        assert all(torch.equal(a, b) for a, b in zip(before, dst.parameters()))
    lora = mlp("lora", lora_alpha=4.0).double()
    et.save_adapter(lora, tmp_path / "lora")
    with pytest.raises(ValueError, match="lora_alpha"):
        et.load_adapter(mlp("lora", lora_alpha=2.0).double(), tmp_path / "lora")
    with pytest.raises(ValueError, match="rank"):
        et.load_adapter(mlp("general").double(), tmp_path / "lora")
    merged = et.merge(mlp("general").double())
    with pytest.raises(ValueError, match="unmerge"):
        et.load_adapter(merged, tmp_path / "general")
    with pytest.raises(ValueError, match="unmerge"):
        et.advance(merged)


def test_quantised_base_saves_and_loads_without_a_dense_weight(tmp_path):
    torch.manual_seed(6)
    m = et.ElraLinear(Int8Linear(nn.Linear(5, 6).to(F64)), "general", r=2, eta=0.4, dtype=F64)
    model = nn.Sequential(m)
    with torch.no_grad():
        m.A.add_(0.1)
    et.save_adapter(model, tmp_path / "q")
    import copy

    other = nn.Sequential(et.ElraLinear(copy.deepcopy(m.base), "general", r=2, eta=0.4,
                                        dtype=F64, seed=9))
    assert not torch.equal(other[0].A, m.A)
    et.load_adapter(other, tmp_path / "q")
    x = torch.randn(3, 5, dtype=F64)
    assert torch.equal(other[0].A, m.A) and torch.equal(other[0].B, m.B)
    assert torch.equal(other(x), model(x))


def test_merge_unmerge_round_trip_for_double_and_lora():
    x = torch.randn(5, 8, dtype=F64)
    for variant in ("double", "lora"):
        model = mlp(variant).double()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        y = model(x)
        w0 = [m.base.weight.clone() for _, m in et.layers(model)]
        et.merge(model)
        assert torch.allclose(model(x), y, rtol=1e-12, atol=1e-12), variant
        et.unmerge(model)
        for (_, m), w in zip(et.layers(model), w0):
            assert torch.allclose(m.base.weight, w, rtol=1e-12, atol=1e-13), variant
        assert torch.allclose(model(x), y, rtol=1e-12, atol=1e-12), variant


def test_token_inputs_empty_batches_and_a_second_inject():
    """GA seeding through an embedding (integer inputs), zero-row batches, and inject twice."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    et.inject(model, ["1"], "hyb-ga", r=2, eta=0.3, total_steps=10)
    ids = [torch.randint(0, 11, (9,)) for _ in range(2)]
    batches = [(i, torch.randn(9, 3, dtype=F64)) for i in ids]
    model[3].weight.grad = torch.ones_like(model[3].weight)  # the caller's: must survive
    assert et.ga_initialise(model, batches, lambda y, t: ((y - t) ** 2).mean()) == 2
    assert torch.equal(model[3].weight.grad, torch.ones_like(model[3].weight))
    assert model[1].A.abs().sum() > 0
    y = model(torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, 3)
    y.sum().backward()
    et.inject(model, ["3"], "general", r=2, eta=0.3)
    assert model[1].A.requires_grad and model[3].A.requires_grad
    assert not model[0].weight.requires_grad


def test_digits_example_runs_in_its_quick_mode(tmp_path):
    """The real-data example (``examples/digits.py --quick``): every method trains, the table
    has a row per method with its parameter count, and the CSVs and the plot are written."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "digits"
    res = subprocess.run([sys.executable, os.path.join(here, "examples", "digits.py"), "--quick",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    table = {line.split("  ")[0].strip(): line for line in res.stdout.splitlines()}
    for name, params in [("ELRA", 2131), ("ELRA-PSD", 2131), ("ELRA-Hyb", 2131),
                         ("PEFT LoRA", 2344), ("PEFT DoRA", 2610), ("full fine-tune", 26122)]:
        row = next((v for k, v in table.items() if k.startswith(name + " ") or k == name), None)
        assert row is not None, f"no row for {name} in\n{res.stdout}"
        assert int(row.split()[len(name.split())]) == params, row
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 7
    assert (out / "accuracy.svg").read_text().startswith("<svg")
    assert len((out / "curves.csv").read_text().splitlines()) > 7


def test_hot_swap_into_a_compiled_model_does_not_recompile(tmp_path):
    """Issue 31 §3: loading another adapter of the same shapes into an injected,
    ``torch.compile``d model replaces the parameter values in place — no new graph (the compile
    counter stays put) and the outputs of a fresh model holding that adapter — for ELRA (every
    single-sided variant) and LoRA; the step buffer moves with it."""
    from torch._dynamo.testing import CompileCounterWithBackend

    for variant, kw in [("general", {}), ("psd", {}), ("hyb", {}), ("lora", {"lora_alpha": 4.0})]:
        torch._dynamo.reset()
        # One base model (adapter files hold no base weights), two trained-looking adapters.
        first, second = mlp(variant, seed=1, **kw).float(), mlp(variant, seed=1, **kw).float()
        with torch.no_grad():
            for model, scale, step in ((first, 0.1, 2), (second, -0.2, 7)):
                for i, p in enumerate(q for q in model.parameters() if q.requires_grad):
                    p.add_(scale * torch.cos(torch.arange(p.numel(), dtype=p.dtype) + i).reshape(p.shape))
                for _, m in et.layers(model):
                    m.step.fill_(step)
        et.save_adapter(second, tmp_path / variant)
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(first, backend=counter, fullgraph=True)
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
        y_first = compiled(x)
        assert counter.frame_count == 1
        params = {n: p.data_ptr() for n, p in first.named_parameters()}
        et.load_adapter(first, tmp_path / variant)
        y_second = compiled(x)
        assert counter.frame_count == 1, f"{variant}: the swap recompiled"
        assert {n: p.data_ptr() for n, p in first.named_parameters()} == params
        fresh = et.load_adapter(mlp(variant, seed=1, **kw).float(), tmp_path / variant)
        assert torch.allclose(y_second, fresh(x), rtol=1e-5, atol=1e-6), variant
        assert torch.allclose(y_second, second(x), rtol=1e-5, atol=1e-6), variant
        assert not torch.allclose(y_first, y_second, rtol=1e-3, atol=1e-4), variant


def _trained(variant, seed, r=2, step=3, **kw):
    """An ElraLinear on the seed-0 base with trained-looking adapter values."""
    torch.manual_seed(0)
    base = nn.Linear(7, 9).to(F64)
    kw.setdefault("eta", 0.4)
    m = et.ElraLinear(base, variant, r=r, total_steps=20, seed=seed, **kw)
    with torch.no_grad():
        for i, p in enumerate(q for q in m.parameters() if q.requires_grad):
            p.add_(0.2 * torch.sin(torch.arange(p.numel(), dtype=F64) * (seed + 1) + i).reshape(p.shape))
        m.step.fill_(step)
    return m


def test_multi_linear_rows_equal_each_adapter_alone_in_any_order():
    """Issue 31 §1 in elra.torch: every row of an ElraMultiLinear batch equals the ElraLinear
    of its adapter on that row (or the base for −1), for ELRA variants at different steps, LoRA
    and mixed ranks; permuting the rows permutes the output; a 3-D batch takes one index per
    sequence; bad indices raise."""
    adapters = [_trained("general", 1), _trained("psd", 2, r=3, step=0), _trained("hyb", 3, step=7),
                _trained("lora", 4, r=4, lora_alpha=8.0), _trained("hyb", 5, r=1, step=15)]
    multi = et.ElraMultiLinear(adapters[0].base)
    assert [multi.add(m) for m in adapters] == [0, 1, 2, 3, 4]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 7, dtype=F64, generator=g)
    index = torch.randint(-1, 5, (40,), generator=g)
    index[:6] = torch.tensor([-1, 0, 1, 2, 3, 4])
    y = multi(x, index)
    for i in range(40):
        a = int(index[i])
        want = adapters[0].base(x[i:i + 1]) if a < 0 else adapters[a](x[i:i + 1])
        assert torch.allclose(y[i:i + 1], want, rtol=1e-12, atol=1e-13), (i, a)
    perm = torch.randperm(40, generator=g)
    assert torch.equal(multi(x[perm], index[perm]), y[perm])
    x3 = x.reshape(4, 10, 7)
    seq = torch.tensor([2, -1, 3, 0])
    y3 = multi(x3, seq)
    for s in range(4):
        a = int(seq[s])
        want = adapters[0].base(x3[s]) if a < 0 else adapters[a](x3[s])
        assert torch.allclose(y3[s], want, rtol=1e-12, atol=1e-13)
    with pytest.raises(elra.ElraError, match="row 3"):
        multi(x, torch.tensor([0, 1, 2, 5] + [0] * 36))
    with pytest.raises(ValueError, match="index"):
        multi(x, torch.zeros(39, dtype=torch.long))
    # The op itself checks every factor's shape before the library reads it.
    idx = torch.zeros(40, dtype=torch.int32)
    w0 = adapters[0].base.weight
    a0 = adapters[0].A.detach()
    for bad_a, bad_b, what in [(a0[:5], adapters[0].B.detach(), "a\\[0\\]"),
                               (a0, adapters[0].B.detach()[:, :4], "b\\[0\\]"),
                               (a0, None, "factor `b`")]:
        with pytest.raises(ValueError, match=what):
            torch.ops.elra.multi_forward(x, w0, None, idx, [bad_a], [bad_b],
                                         [0.0, 0.4, 0.0, 1.0, 0.0, 0.0])


def test_inject_multi_serves_saved_adapters_per_row_and_compiles_once(tmp_path):
    """Adapter directories (ELRA general, Hyb and PEFT LoRA, one of them adapting one layer
    only) injected into one model: each sequence of a batch gets what a model holding only its
    adapter gives; changing the per-row selection does not recompile a compiled model."""
    from torch._dynamo.testing import CompileCounterWithBackend

    dirs = []
    singles = []
    for i, (variant, targets, kw) in enumerate([("general", ["0", "2"], {}), ("hyb", ["0", "2"], {}),
                                                ("lora", ["0", "2"], {"lora_alpha": 4.0}),
                                                ("psd", ["2"], {})]):
        torch.manual_seed(0)  # one base model for all
        m = et.inject(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double(),
                      targets, variant, r=2, eta=0.3, total_steps=10, **kw)
        with torch.no_grad():
            for j, p in enumerate(q for q in m.parameters() if q.requires_grad):
                p.add_(0.1 * torch.cos(torch.arange(p.numel(), dtype=F64) * (i + 2) + j).reshape(p.shape))
            for _, l in et.layers(m):
                l.step.fill_(2 * i)
        et.save_adapter(m, tmp_path / variant)
        dirs.append(tmp_path / variant)
        singles.append(m)
    torch.manual_seed(0)
    served = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    plain = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    plain.load_state_dict(served.state_dict())
    et.inject_multi(served, ["0", "2"], dirs)
    assert [m.slots for _, m in et.multi_layers(served)] == [[0, 1, 2, -1], [0, 1, 2, 3]]
    x = torch.randn(5, 3, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    sel = torch.tensor([3, -1, 0, 2, 1])
    et.set_adapter_index(served, sel)
    y = served(x)
    for s in range(5):
        a = int(sel[s])
        want = plain(x[s]) if a < 0 else singles[a](x[s])
        assert torch.allclose(y[s], want, rtol=1e-12, atol=1e-12), (s, a)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(served, backend=counter, fullgraph=True)
    assert torch.allclose(compiled(x), y, rtol=1e-12, atol=1e-12)
    et.set_adapter_index(served, sel.flip(0))
    assert torch.allclose(compiled(x), served(x), rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1
    with pytest.raises(ValueError, match="−1 … 3"):
        et.set_adapter_index(served, torch.tensor([4, 0, 0, 0, 0]))
