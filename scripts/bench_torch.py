#!/usr/bin/env python3
"""PyTorch / PEFT side of the GPU layer benchmark (issue 5), on the shapes of benches/cuda_layer.rs.

Run it in the same GPU session as `cargo bench --features cuda --bench cuda_layer` so the ratios
compare like with like. bf16 activations and weights, r = 8:

  N=8192 d=4096 k=4096,  N=8192 d=4096 k=11008,  N=2048 d=1024 k=1024

Timed per shape (CUDA events around `ITERS` steps after warm-up, median of `REPEATS`):
  base_fwd        y = x W0^T                        (torch.matmul; cuBLAS)
  base_fwd_bwd    y = x W0^T and dx = dy W0         (two matmuls, no autograd: the issue's "base")
  torch_frozen    autograd fwd+bwd of nn.Linear with a frozen weight
  torch_lora      hand-written LoRA with autograd: y = x W0^T + s (x A^T) B^T, fwd+bwd
  peft_lora       peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0) on nn.Linear, fwd+bwd
and the ratio of each to base_fwd_bwd (fwd-only rows to base_fwd).

Requirements: Python 3 with torch (CUDA build) and, for the PEFT row, peft. The script says
clearly what is missing and exits with status 2 when torch or a CUDA device is absent; without
peft it times everything else and marks the PEFT row as missing.
"""

import sys

SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008), (2048, 1024, 1024)]
R = 8
ITERS = 20
REPEATS = 5


def main() -> int:
    try:
        import torch
    except ImportError as e:  # noqa: F841
        print("bench_torch: PyTorch is not installed (pip install torch); nothing measured.")
        return 2
    if not torch.cuda.is_available():
        print(f"bench_torch: torch {torch.__version__} sees no CUDA device; nothing measured.")
        return 2
    try:
        import peft  # noqa: F401
        from peft import LoraConfig, get_peft_model

        have_peft = True
    except ImportError:
        print("bench_torch: peft is not installed (pip install peft); the peft_lora row is skipped.")
        have_peft = False

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    dt = torch.bfloat16
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0)}, bf16, r={R}")

    def timed(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(REPEATS):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(ITERS):
                fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / ITERS)  # µs per step
        samples.sort()
        return samples[len(samples) // 2]

    for n, d, k in SHAPES:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(n, k, generator=g).to(dev, dt)
        dy = torch.randn(n, d, generator=g).to(dev, dt)
        w0 = (torch.randn(d, k, generator=g) / k**0.5).to(dev, dt)
        rows = {}

        rows["base_fwd"] = timed(lambda: x @ w0.t())
        rows["base_fwd_bwd"] = timed(lambda: (x @ w0.t(), dy @ w0))

        lin = torch.nn.Linear(k, d, bias=False, device=dev, dtype=dt)
        with torch.no_grad():
            lin.weight.copy_(w0)
        lin.weight.requires_grad_(False)
        xg = x.clone().requires_grad_(True)

        def frozen():
            y = lin(xg)
            y.backward(dy)

        rows["torch_frozen"] = timed(frozen)

        la = (torch.randn(R, k, generator=g) / k**0.5).to(dev, torch.float32).requires_grad_(True)
        lb = (torch.randn(d, R, generator=g) * 0.01).to(dev, torch.float32).requires_grad_(True)
        s = 16.0 / R

        def torch_lora():
            y = xg @ w0.t() + s * ((xg @ la.to(dt).t()) @ lb.to(dt).t())
            y.backward(dy)

        rows["torch_lora"] = timed(torch_lora)

        if have_peft:
            base = torch.nn.Sequential(torch.nn.Linear(k, d, bias=False, device=dev, dtype=dt))
            with torch.no_grad():
                base[0].weight.copy_(w0)
            cfg = LoraConfig(r=R, lora_alpha=16, lora_dropout=0.0, target_modules=["0"])
            model = get_peft_model(base, cfg)

            def peft_lora():
                y = model(xg)
                y.backward(dy)

            rows["peft_lora"] = timed(peft_lora)
        else:
            rows["peft_lora"] = None

        print(f"\nN={n} d={d} k={k} r={R} bf16:")
        for name, t in rows.items():
            if t is None:
                print(f"  {name:<16} missing (peft not installed)")
                continue
            ref = rows["base_fwd"] if name == "base_fwd" else rows["base_fwd_bwd"]
            print(f"  {name:<16} {t:>10.1f} µs  {t / ref:.3f}× base")
        del x, dy, w0, xg, lin
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
