"""Many adapters in one batch, timed (issue 31): ``ElraMultiLinear`` (the grouped forward) against
a loop of single-adapter ``ElraLinear`` calls on each adapter's rows and against the frozen
layer alone, for 1, 8 and 64 ELRA-general adapters of rank r spread evenly over N rows.

    python bench_multi.py                                   # CPU, f32, N = d = k = 1024
    python bench_multi.py --device cuda --dtype bfloat16 --n 4096 --d 4096 --k 4096 --r 16

Prints the median of ``--repeats`` timings (CUDA events on the GPU) per configuration and the
ratios to the frozen layer. Inference (``torch.no_grad``). Without a GPU, ``--device cuda``
prints why and exits 0.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import elra.torch as et  # noqa: E402


def timer(device):
    if device.type == "cuda":
        def run(f, reps):
            f()
            torch.cuda.synchronize(device)
            out = []
            for _ in range(reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                f()
                e.record()
                torch.cuda.synchronize(device)
                out.append(s.elapsed_time(e) / 1e3)
            return statistics.median(out)
    else:
        def run(f, reps):
            f()
            out = []
            for _ in range(reps):
                t = time.perf_counter()
                f()
                out.append(time.perf_counter() - t)
            return statistics.median(out)
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--counts", default="1,8,64")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("skipping: no CUDA device visible to PyTorch")
        return 0
    dev = torch.device(a.device)
    dt = getattr(torch, a.dtype)
    torch.manual_seed(0)
    base = nn.Linear(a.k, a.d, bias=True).to(dev, dt)
    x = torch.randn(a.n, a.k, device=dev, dtype=dt)
    run = timer(dev)
    with torch.no_grad():
        t_base = run(lambda: base(x), a.repeats)
        print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), "
              f"{a.dtype}, N = {a.n}, d = {a.d}, k = {a.k}, r = {a.r}")
        print(f"frozen layer: {t_base * 1e3:.3f} ms")
        print(f"{'adapters':>8} {'grouped ms':>11} {'loop ms':>9} {'grouped/base':>13} "
              f"{'loop/base':>10}")
        for count in [int(c) for c in a.counts.split(",")]:
            layers = []
            for i in range(count):
                m = et.ElraLinear(base, "general", r=a.r, eta=0.1, seed=i, total_steps=10,
                                  dtype=torch.float32)
                m.to(dev)
                layers.append(m)
            multi = et.ElraMultiLinear(base)
            for m in layers:
                multi.add(m)
            index = (torch.arange(a.n, device=dev) * count // a.n).to(torch.int32)
            rows = [(index == i).nonzero().squeeze(1) for i in range(count)]

            def looped():
                y = torch.empty(a.n, a.d, device=dev, dtype=dt)
                for m, rr in zip(layers, rows):
                    y[rr] = m(x[rr])
                return y

            t_g = run(lambda: multi(x, index), a.repeats)
            t_l = run(looped, a.repeats)
            print(f"{count:>8} {t_g * 1e3:>11.3f} {t_l * 1e3:>9.3f} {t_g / t_base:>13.3f} "
                  f"{t_l / t_base:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
