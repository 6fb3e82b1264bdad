"""One training step (forward, backward, AdamW) of one adapted linear layer, timed in one process:
the frozen layer alone, PEFT's LoRA, ELRA-Hyb written by hand in PyTorch (the Woodbury form with
autograd through ``torch.linalg.matrix_exp`` of the 2r×2r block that gives φ1), and
``elra.torch``'s ELRA-Hyb — fused (an ``nn.Linear`` base) and in the output-side form (a base
elra cannot see into). The methods' repeats are interleaved so that drifting machine load hits
them alike. Prints the median time per step of each and the ratios.

    python python/examples/bench_step.py [--d 1024] [--k 1024] [--n 512] [--r 8] [--threads 2]
                                         [--steps 30] [--repeats 5] [--device cpu|cuda]

With ``--device cuda`` (a libelra built with ``--features cuda``; ELRA's parameters float32, the
activations ``--dtype``) every method runs on the GPU and each repeat ends with a
``torch.cuda.synchronize``.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

# The package next to this folder (python/elra), without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def hand_written_elra_hyb(base, r, eta0=1e-3, alpha=0.5):
    """ELRA-Hyb as a PyTorch user would write it: C = η(αAᵀ + (1−α)B), Z = CA,
    φ1(Z) = top-right block of expm([[Z, I], [0, 0]]), y = base(x) + ((x (C W0)ᵀ) φ1ᵀ) Aᵀ."""
    d, k = base.out_features, base.in_features

    class Hand(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            bound = (6 / (d + r)) ** 0.5
            self.A = nn.Parameter(torch.empty(d, r).uniform_(-bound, bound))
            self.B = nn.Parameter(torch.empty(r, d).uniform_(-bound, bound))
            self.log_eta = nn.Parameter(torch.tensor(float(torch.tensor(eta0).log())))

        def forward(self, x):
            # In the parameters' float32; only the N-sized products in the activations' dtype.
            eta = self.log_eta.exp()
            C = eta * (alpha * self.A.t() + (1 - alpha) * self.B)
            Z = C @ self.A
            big = torch.cat([torch.cat([Z, torch.eye(r, dtype=Z.dtype, device=Z.device)], 1),
                             torch.zeros(r, 2 * r, dtype=Z.dtype, device=Z.device)], 0)
            M = torch.linalg.matrix_exp(big)[:r, r:]
            P = C @ self.base.weight.to(C.dtype)
            dt = x.dtype
            return self.base(x) + ((x @ P.t().to(dt)) @ M.t().to(dt)) @ self.A.t().to(dt)

    return Hand()


def step_fn(model, x, dy):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3) if params else None

    def step():
        y = model(x)
        (y * dy).sum().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        x.grad = None  # ∂x is computed by every method; none accumulates it
    return step


class OpaqueLinear(nn.Module):
    """A linear layer elra cannot see into (as a quantised or tensor-parallel one): ElraLinear
    wraps it with the output-side form ``elra::rows``."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight, self.bias = lin.weight, lin.bias

    def forward(self, x):
        return self.lin(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    import peft
    import elra.torch as et

    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    if a.device == "cpu" and dt != torch.float32:
        ap.error("--dtype other than float32 needs --device cuda")

    def base():
        lin = nn.Linear(a.k, a.d).to(dev, dt)
        lin.weight.requires_grad_(False)
        lin.bias.requires_grad_(False)
        return lin

    def on_device(layer):
        # Parameters to the device; the step stays a CPU tensor, so that α and the η multiplier
        # (host scalars of the C ABI) are read without waiting for the GPU.
        step = layer.step
        layer.to(dev)
        layer.step = step
        return layer

    x = torch.randn(a.n, a.k, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(a.n, a.d, device=dev, dtype=dt)
    models = {}
    models["frozen layer"] = base()
    wrapper = nn.Sequential(base())
    models["PEFT LoRA"] = peft.get_peft_model(
        wrapper, peft.LoraConfig(r=a.r, lora_alpha=a.r, target_modules=["0"], lora_dropout=0.0))
    models["hand-written torch ELRA-Hyb"] = hand_written_elra_hyb(base(), a.r).to(dev)
    elra_layer = on_device(et.ElraLinear(base(), "hyb", r=a.r, total_steps=1000,
                                         dtype=torch.float32))
    elra_layer.step.fill_(100)  # inside the warm-up: 0 < α < 1
    models["elra.torch ELRA-Hyb"] = elra_layer
    side = on_device(et.ElraLinear(OpaqueLinear(base()), "hyb", r=a.r, total_steps=1000,
                                   dtype=torch.float32))
    side.step.fill_(100)
    models["elra.torch ELRA-Hyb, output side"] = side
    where = (torch.cuda.get_device_name(dev) if a.device == "cuda"
             else f"CPU, {a.threads} threads")
    print(f"one step (forward, backward, AdamW) of a {a.d}×{a.k} layer, N = {a.n}, r = {a.r}, "
          f"{a.dtype} activations, {where}, torch {torch.__version__}, peft {peft.__version__}")
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    res = {}
    # Interleave the repeats of the methods so that machine load drifts hit them alike.
    steps = {name: step_fn(m, x, dy) for name, m in models.items()}
    for s in steps.values():
        for _ in range(3):
            s()
    runs = {name: [] for name in models}
    for _ in range(a.repeats):
        for name, s in steps.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                s()
            sync()
            runs[name].append((time.perf_counter() - t0) / a.steps * 1e3)
    for name in models:
        res[name] = statistics.median(runs[name])
    base_ms = res["frozen layer"]
    lora_ms = res["PEFT LoRA"]
    hand_ms = res["hand-written torch ELRA-Hyb"]
    print(f"{'method':34s} {'ms/step':>9s} {'÷ frozen':>9s} {'÷ PEFT LoRA':>12s} {'÷ hand ELRA':>12s}")
    for name, ms in res.items():
        print(f"{name:34s} {ms:9.2f} {ms / base_ms:9.2f} {ms / lora_ms:12.3f} {ms / hand_ms:12.3f}")
    print("runs (ms/step): " + "; ".join(f"{n}: " + ", ".join(f"{v:.2f}" for v in r)
                                         for n, r in runs.items()))


if __name__ == "__main__":
    main()
