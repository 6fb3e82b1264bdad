#!/usr/bin/env python3
"""Markdown table (MSE vs rank per method) from one or more runner CSVs of the same setting (rows
concatenated, e.g. ranks run separately): csv_to_md.py FILE... [--best] [--ranks R1,R2,..]
(--best adds a column with each method's chosen learning rate / weight decay; --ranks keeps only
those ranks and says so on the first line, as the summary's headline tables do)."""
import csv, sys
argv = sys.argv[1:]
shown = None
if "--ranks" in argv:
    i = argv.index("--ranks")
    shown = [int(x) for x in argv[i + 1].split(",")]
    del argv[i : i + 2]
args = [a for a in argv if not a.startswith("--")]
best = "--best" in argv
rows = [r for f in args for r in csv.DictReader(open(f))]
run = sorted({int(r["rank"]) for r in rows})
if shown is not None:
    missing = [k for k in shown if k not in run]
    if missing:
        sys.exit(f"csv_to_md.py: ranks {missing} are not in the CSV")
    rows = [r for r in rows if int(r["rank"]) in shown]
methods = []
for r in rows:
    if r["adapter"] not in methods:
        methods.append(r["adapter"])
by = {}
for r in rows:
    by.setdefault(int(r["rank"]), {})["construction"] = float(r["construction_mse"])
    by[int(r["rank"])][r["adapter"]] = (float(r["trained_mse"]), r["best_lr"], r["best_wd"])
r0 = rows[0]
subset = ""
if shown is not None:
    subset = f"; ranks shown {', '.join(str(k) for k in sorted(shown))} of {len(run)} run"
print(f"frozen model test MSE {float(r0['frozen_mse']):.3e}; {r0['iterations']} Adam steps; pretraining steps {r0['pretrain_steps']}{subset}")
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
