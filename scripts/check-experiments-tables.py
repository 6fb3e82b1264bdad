#!/usr/bin/env python3
"""Checks that every MSE-vs-rank table of the experiment notes — the summary EXPERIMENTS.md and
the details in docs/experiments/*.md — is exactly what lab/figures/csv_to_md.py prints for one of
the committed CSVs of its setting.

A table starts at a line "frozen model test MSE ..." under a bold setting name
("**tfn_L2_H2_random** ..."); its block runs to the end of the table and the "note:" lines
after it. The candidates are lab/figures/<setting>{,_full,_1000}.csv, each rendered with and
without --best; a table whose first line says "ranks shown 1, 4, 8 of 16 run" (the summary's
headline tables) is rendered with --ranks 1,4,8. A table edited by hand (a row out of order or
missing, a value retyped, a CSV re-run without its table) fails here. The two Prop. 3 tables
(docs/experiments/prop3.md) must be lab/figures/prop3_rank.txt (the prop3_rank example's
output) with its '## ' headings as '#### '. Exit status 1 lists every mismatch.
"""
import glob
import functools
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIG = os.path.join(ROOT, "lab", "figures")


DOCS = [os.path.join(ROOT, "EXPERIMENTS.md")] + sorted(
    glob.glob(os.path.join(ROOT, "docs", "experiments", "*.md"))
)


@functools.lru_cache(maxsize=None)
def render(csv_path, best, ranks=None):
    """csv_to_md.py's output lines for one CSV (cached: several tables share a setting's CSVs);
    `ranks`: the comma-separated ranks of a headline table, None for a whole table. A CSV that
    lacks one of the ranks renders as nothing (no match)."""
    cmd = [sys.executable, os.path.join(FIG, "csv_to_md.py"), csv_path] + (["--best"] if best else [])
    if ranks is not None:
        cmd += ["--ranks", ranks]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.stdout.strip().splitlines() if r.returncode == 0 else []


def shown_ranks(first_line):
    """The ranks of a headline table ("...; ranks shown 1, 4, 8 of 16 run") as "1,4,8", or None."""
    m = re.search(r"; ranks shown ([0-9, ]+) of [0-9]+ run$", first_line)
    return m.group(1).replace(" ", "") if m else None


def blocks(lines):
    """(setting, first line number, block lines) for every table in the document."""
    setting = None
    i = 0
    while i < len(lines):
        m = re.match(r"^\*\*([A-Za-z0-9_]+)\*\*", lines[i])
        if m:
            setting = m.group(1)
        if lines[i].startswith("frozen model test MSE"):
            start = i
            j = i + 1
            while j < len(lines) and not lines[j].startswith("|"):
                j += 1
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            # optional "note:" lines, each after one blank line
            while j + 1 < len(lines) and lines[j] == "" and lines[j + 1].startswith("note:"):
                j += 2
            yield setting, start + 1, lines[start:j]
            i = j
            continue
        i += 1


def prop3_blocks(lines):
    """The "#### DeficientFrozen" / "#### DeficientTarget" blocks of the Prop. 3 section, each to
    the end of its table."""
    out = []
    for i, line in enumerate(lines):
        if line.startswith("#### Deficient"):
            j = i + 1
            while j < len(lines) and lines[j] != "":
                j += 1
            out.append(lines[i:j])
    return out


def prop3_file_blocks():
    """lab/figures/prop3_rank.txt (examples/prop3_rank.rs's output, which a test re-derives)
    split into its blank-line-separated blocks, headings raised to the section's level."""
    text = open(os.path.join(FIG, "prop3_rank.txt"), encoding="utf-8").read()
    blocks = [b.splitlines() for b in text.split("\n\n") if b.strip()]
    return [["##" + b[0]] + b[1:] for b in blocks]


def main():
    bad = 0
    n = 0
    p3 = []
    for doc in DOCS:
        name = os.path.relpath(doc, ROOT)
        lines = open(doc, encoding="utf-8").read().splitlines()
        for setting, lineno, block in blocks(lines):
            n += 1
            if setting is None:
                print(f"{name}:{lineno}: table with no bold setting name above it")
                bad += 1
                continue
            cands = [os.path.join(FIG, f"{setting}{s}.csv") for s in ("", "_full", "_1000")]
            cands = [c for c in cands if os.path.exists(c)]
            ranks = shown_ranks(block[0])
            if not any(render(c, b, ranks) == block for c in cands for b in (False, True)):
                names = ", ".join(os.path.basename(c) for c in cands) or "no CSV found"
                print(f"{name}:{lineno}: the {setting} table matches none of {names}")
                bad += 1
        p3 += prop3_blocks(lines)
    if n == 0:
        print("no tables found in the experiment notes")
        return 1
    want = prop3_file_blocks()
    if p3 != want:
        print(
            f"experiment notes: the Prop. 3 tables ({len(p3)} found) are not lab/figures/prop3_rank.txt"
            f" ({len(want)} blocks) with '## ' headings as '#### '"
        )
        bad += 1
    n += len(p3)
    print(f"{n} tables checked in {len(DOCS)} files, {bad} mismatched")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
