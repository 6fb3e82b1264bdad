"""ELRA beside PEFT on real data: scikit-learn's bundled handwritten digits (1797 8×8 images,
no download).

A small MLP (64 → 128 → 128 → 10) is pretrained on the digits as they are; the shifted task is
the same digits rotated by 90°. Every linear layer is then adapted — the base frozen — by
``elra.torch`` (ELRA general, PSD, Hyb) and by PEFT (LoRA, DoRA, OFT) at close parameter
counts, each with its best learning rate of a small grid chosen on a validation split, over
several seeds. Full fine-tuning is shown for reference. Prints a table (test accuracy on the
shifted task, trainable parameters, time per step) and writes ``results.csv``, ``curves.csv``
and ``accuracy.svg`` (validation accuracy during training) into ``--out``.

    python python/examples/digits.py [--steps 600] [--seeds 3] [--out digits-out] [--quick]
                                     [--eta 1e-3] [--methods ELRA,ELRA-PSD,...]

``--quick`` (what CI runs) is one seed, 300 pretraining and 40 adaptation steps and one learning
rate: it checks that the example works, not which method wins.
"""

import argparse
import csv
import os
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The package next to this folder (python/elra), without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional
    tqdm = None

TARGETS = ["fc1", "fc2", "fc3"]
# Ranks chosen so that every method trains about 2.1k–2.6k parameters on this network
# (ELRA general/Hyb: 2dr + 1 per layer, PSD: dr + 1, LoRA: r(d + k), DoRA: LoRA + d, OFT: blocks
# of b(b−1)/2 on the input side).
METHODS = OrderedDict([
    ("ELRA", dict(kind="elra", variant="general", r=4)),
    ("ELRA-PSD", dict(kind="elra", variant="psd", r=8)),
    ("ELRA-Hyb", dict(kind="elra", variant="hyb", r=4)),
    ("PEFT LoRA", dict(kind="lora", r=4)),
    ("PEFT DoRA", dict(kind="dora", r=4)),
    ("PEFT OFT", dict(kind="oft", block=16)),
    ("full fine-tune", dict(kind="full")),
])
LRS = [3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]


def load(seed):
    """Digits scaled to [0, 1]; train/validation/test splits (60/20/20, stratified by a seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.images.astype(np.float32) / 16.0
    y = data.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=seed)
    va, te = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    return x, y, tr, va, te


def tensors(images, labels, idx, rotate):
    im = images[idx]
    if rotate:
        im = np.rot90(im, k=1, axes=(1, 2))
    return torch.from_numpy(np.ascontiguousarray(im).reshape(len(idx), 64)), torch.from_numpy(labels[idx])


def mlp():
    return nn.Sequential(OrderedDict([("fc1", nn.Linear(64, 128)), ("act1", nn.ReLU()),
                                      ("fc2", nn.Linear(128, 128)), ("act2", nn.ReLU()),
                                      ("fc3", nn.Linear(128, 10))]))


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def batches(n, batch, steps, gen):
    """`steps` minibatch index sets, reshuffling every epoch."""
    out, perm, pos = [], torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        out.append(perm[pos:pos + batch])
        pos += batch
    return out


def pretrain(seed, data, steps=1500):
    images, labels, tr, va, te = data
    torch.manual_seed(seed)
    model = mlp()
    x, y = tensors(images, labels, tr, rotate=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for idx in batches(len(y), 64, steps, torch.Generator().manual_seed(seed)):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def adapt(base_model, name, spec, steps, lr, seed, data, eval_every, eta=1e-3):
    """Adapts a copy of the pretrained model to the rotated task; returns the trained model,
    its trainable parameter count, ms per step and the validation curve."""
    import copy

    import peft

    import elra.torch as et

    images, labels, tr, va, te = data
    model = copy.deepcopy(base_model)
    kind = spec["kind"]
    torch.manual_seed(seed)
    if kind == "elra":
        et.inject(model, TARGETS, variant=spec["variant"], r=spec["r"], total_steps=steps, seed=seed,
                  eta=eta)
    elif kind in ("lora", "dora"):
        cfg = peft.LoraConfig(r=spec["r"], lora_alpha=spec["r"], target_modules=TARGETS,
                              lora_dropout=0.0, use_dora=kind == "dora")
        model = peft.get_peft_model(model, cfg)
    elif kind == "oft":
        model = peft.get_peft_model(model, peft.OFTConfig(r=0, oft_block_size=spec["block"],
                                                          target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    x, y = tensors(images, labels, tr, rotate=True)
    xv, yv = tensors(images, labels, va, rotate=True)
    curve = [(0, accuracy(model, xv, yv))]
    plan = batches(len(y), 64, steps, torch.Generator().manual_seed(seed + 1))
    elapsed = 0.0
    for step, idx in enumerate(plan, 1):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if kind == "elra":
            loss = loss + et.energy(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if kind == "elra":
            et.advance(model)
        elapsed += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            curve.append((step, accuracy(model, xv, yv)))
    return model, n_params, elapsed / steps * 1e3, curve


def svg(curves, path, title):
    """A line chart of validation accuracy against step, one line a method (mean over seeds)."""
    w, h, left, right, top, bottom = 720, 420, 60, 170, 40, 50
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f"]
    xmax = max(s for c in curves.values() for s, _ in c) or 1

    def px(s):
        return left + (w - left - right) * s / xmax

    def py(a):
        return top + (h - top - bottom) * (1 - a)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']
    for a in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{py(a):.1f}" y2="{py(a):.1f}" '
                   f'stroke="#ddd"/><text x="{left - 8}" y="{py(a) + 4:.1f}" '
                   f'text-anchor="end">{a:.1f}</text>')
    for i in range(5):
        s = xmax * i / 4
        out.append(f'<text x="{px(s):.1f}" y="{h - bottom + 18}" text-anchor="middle">{s:.0f}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">step</text>')
    out.append(f'<text x="16" y="{(top + h - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(top + h - bottom) / 2})">validation accuracy</text>')
    for i, (name, c) in enumerate(curves.items()):
        col = colours[i % len(colours)]
        pts = " ".join(f"{px(s):.1f},{py(a):.1f}" for s, a in c)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{col}" stroke-width="2"/>')
        ly = top + 18 * i + 10
        out.append(f'<line x1="{w - right + 10}" x2="{w - right + 30}" y1="{ly}" y2="{ly}" '
                   f'stroke="{col}" stroke-width="2"/><text x="{w - right + 36}" y="{ly + 4}">'
                   f'{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--out", default="digits-out")
    ap.add_argument("--eta", type=float, default=1e-3,
                    help="initial η of the ELRA methods (the paper's 1e-3 by default)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="one seed, 300 + 40 steps, one learning rate")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.seeds, a.pretrain_steps = 40, 1, 300
    if min(a.steps, a.seeds, a.threads, a.pretrain_steps) < 1:
        ap.error("--steps, --seeds, --threads and --pretrain-steps must be at least 1")
    if not (a.eta > 0 and a.eta < float("inf")):
        ap.error("--eta must be finite and > 0")
    chosen = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        ap.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    methods = OrderedDict((m, METHODS[m]) for m in METHODS if m in chosen)
    lrs = [3e-2] if a.quick else LRS
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    import peft

    eval_every = max(1, a.steps // 30)
    runs = [(name, spec, seed, lr) for seed in range(a.seeds) for name, spec in methods.items()
            for lr in lrs]
    bar = tqdm(total=len(runs), desc="adapting", unit="run") if tqdm else None
    rows, curves = [], {name: [] for name in methods}
    frozen = []
    for seed in range(a.seeds):
        data = load(seed)
        images, labels, tr, va, te = data
        base = pretrain(seed, data, a.pretrain_steps)
        xs, ys = tensors(images, labels, te, rotate=False)
        xt, yt = tensors(images, labels, te, rotate=True)
        frozen.append((accuracy(base, xs, ys), accuracy(base, xt, yt)))
        for name, spec in methods.items():
            best = None
            for lr in lrs:
                model, n, ms, curve = adapt(base, name, spec, a.steps, lr, seed, data, eval_every,
                                            a.eta)
                val = curve[-1][1]
                if best is None or val > best[0]:
                    best = (val, lr, accuracy(model, xt, yt), n, ms, curve)
                if bar:
                    bar.update(1)
                    bar.set_postfix_str(f"seed {seed} {name} lr {lr:g}")
            val, lr, test, n, ms, curve = best
            rows.append(dict(seed=seed, method=name, lr=lr, params=n, val_acc=val, test_acc=test,
                             ms_per_step=ms))
            curves[name].append(curve)
    if bar:
        bar.close()

    with open(os.path.join(a.out, "results.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    mean_curves = {}
    with open(os.path.join(a.out, "curves.csv"), "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["method", "step", "mean_val_acc"])
        for name, cs in curves.items():
            mean_curves[name] = [(cs[0][i][0], statistics.mean(c[i][1] for c in cs))
                                 for i in range(len(cs[0]))]
            wr.writerows([name, s, f"{v:.4f}"] for s, v in mean_curves[name])
    svg(mean_curves, os.path.join(a.out, "accuracy.svg"),
        f"digits rotated 90°: validation accuracy (mean of {a.seeds} seed(s))")

    print(f"digits (scikit-learn, 1797 images), MLP 64-128-128-10 pretrained on upright digits, "
          f"adapted to digits rotated by 90°; {a.steps} AdamW steps of batch 64, learning rate "
          f"from {lrs} by validation accuracy, {a.seeds} seed(s), torch {torch.__version__}, "
          f"peft {peft.__version__}, {a.threads} thread(s), ELRA's initial η {a.eta:g}")
    up = statistics.mean(f[0] for f in frozen)
    rot = statistics.mean(f[1] for f in frozen)
    print(f"pretrained network, test accuracy: upright {up:.3f}, rotated {rot:.3f} (before adapting)")
    print(f"{'method':16s} {'params':>7s} {'test acc (mean ± sd)':>22s} {'ms/step':>8s}  lr chosen")
    for name in methods:
        rs = [r for r in rows if r["method"] == name]
        accs = [r["test_acc"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ms = statistics.median(r["ms_per_step"] for r in rs)
        lr_s = ",".join(f"{r['lr']:g}" for r in rs)
        print(f"{name:16s} {rs[0]['params']:7d} {statistics.mean(accs):14.3f} ± {sd:5.3f} "
              f"{ms:8.2f}  {lr_s}")
    print(f"wrote {a.out}/results.csv, curves.csv, accuracy.svg")


if __name__ == "__main__":
    main()
