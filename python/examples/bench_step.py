"""One training step (forward, backward, AdamW) of one adapted linear layer, timed in one process:
the frozen layer alone, PEFT's LoRA, ELRA-Hyb written by hand in PyTorch (the Woodbury form with
autograd through ``torch.linalg.matrix_exp`` of the 2r×2r block that gives φ1), and
``elra.torch``'s ELRA-Hyb — fused (an ``nn.Linear`` base) and in the output-side form (a base
elra cannot see into). The methods' repeats are interleaved so that drifting machine load hits
them alike. Prints the median time per step of each and the ratios.

    python python/examples/bench_step.py [--d 1024] [--k 1024] [--n 512] [--r 8] [--threads 2]
                                         [--steps 30] [--repeats 5]
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
            eta = self.log_eta.exp()
            C = eta * (alpha * self.A.t() + (1 - alpha) * self.B)
            Z = C @ self.A
            big = torch.cat([torch.cat([Z, torch.eye(r, dtype=x.dtype)], 1),
                             torch.zeros(r, 2 * r, dtype=x.dtype)], 0)
            M = torch.linalg.matrix_exp(big)[:r, r:]
            P = C @ self.base.weight
            return self.base(x) + ((x @ P.t()) @ M.t()) @ self.A.t()

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
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    import peft
    import elra.torch as et

    def base():
        lin = nn.Linear(a.k, a.d)
        lin.weight.requires_grad_(False)
        lin.bias.requires_grad_(False)
        return lin

    x = torch.randn(a.n, a.k, requires_grad=True)
    dy = torch.randn(a.n, a.d)
    models = {}
    models["frozen layer"] = base()
    wrapper = nn.Sequential(base())
    models["PEFT LoRA"] = peft.get_peft_model(
        wrapper, peft.LoraConfig(r=a.r, lora_alpha=a.r, target_modules=["0"], lora_dropout=0.0))
    models["hand-written torch ELRA-Hyb"] = hand_written_elra_hyb(base(), a.r)
    elra_layer = et.ElraLinear(base(), "hyb", r=a.r, total_steps=1000)
    elra_layer.step.fill_(100)  # inside the warm-up: 0 < α < 1
    models["elra.torch ELRA-Hyb"] = elra_layer
    side = et.ElraLinear(OpaqueLinear(base()), "hyb", r=a.r, total_steps=1000)
    side.step.fill_(100)
    models["elra.torch ELRA-Hyb, output side"] = side
    print(f"one step (forward, backward, AdamW) of a {a.d}×{a.k} layer, N = {a.n}, r = {a.r}, "
          f"f32, {a.threads} threads, torch {torch.__version__}, peft {peft.__version__}")
    res = {}
    # Interleave the repeats of the methods so that machine load drifts hit them alike.
    steps = {name: step_fn(m, x, dy) for name, m in models.items()}
    for s in steps.values():
        for _ in range(3):
            s()
    runs = {name: [] for name in models}
    for _ in range(a.repeats):
        for name, s in steps.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                s()
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
