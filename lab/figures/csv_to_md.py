#!/usr/bin/env python3
"""Markdown table (MSE vs rank per method) from one or more runner CSVs of the same setting (rows
concatenated, e.g. ranks run separately): csv_to_md.py FILE... [--best] (--best adds a column
with each method's chosen learning rate / weight decay)."""
import csv, sys
args = [a for a in sys.argv[1:] if not a.startswith("--")]
best = "--best" in sys.argv
rows = [r for f in args for r in csv.DictReader(open(f))]
methods = []
for r in rows:
    if r["adapter"] not in methods:
        methods.append(r["adapter"])
by = {}
for r in rows:
    by.setdefault(int(r["rank"]), {})["construction"] = float(r["construction_mse"])
    by[int(r["rank"])][r["adapter"]] = (float(r["trained_mse"]), r["best_lr"], r["best_wd"])
r0 = rows[0]
print(f"frozen model test MSE {float(r0['frozen_mse']):.3e}; {r0['iterations']} Adam steps; pretraining steps {r0['pretrain_steps']}")
print()
extra = " best lr/wd (" + ", ".join(methods) + ") |" if best else ""
print("| R | construction | " + " | ".join(methods) + " |" + extra)
print("|---:|---:|" + "---:|" * len(methods) + ("---|" if best else ""))
for k in sorted(by):
    cells = [f"{by[k]['construction']:.2e}"]
    for m in methods:
        v, lr, wd = by[k][m]
        cells.append(f"{v:.2e}")
    if best:
        cells.append("; ".join(f"{float(by[k][m][1]):g}/{float(by[k][m][2]):g}" for m in methods))
    print(f"| {k} | " + " | ".join(cells) + " |")
notes = sorted({r["note"] for r in rows if r["note"]})
for n in notes:
    print(f"\nnote: {n}")
