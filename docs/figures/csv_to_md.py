#!/usr/bin/env python3
"""Markdown table (MSE vs rank per method) from a runner CSV: csv_to_md.py mse_vs_rank.csv"""
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
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
print("| R | construction | " + " | ".join(methods) + " |")
print("|---:|---:|" + "---:|" * len(methods))
for k in sorted(by):
    cells = [f"{by[k]['construction']:.2e}"]
    for m in methods:
        v, lr, wd = by[k][m]
        cells.append(f"{v:.2e}")
    print(f"| {k} | " + " | ".join(cells) + " |")
notes = sorted({r["note"] for r in rows if r["note"]})
for n in notes:
    print(f"\nnote: {n}")
