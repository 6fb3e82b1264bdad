//! The `elra` command line.
//!
//! - `elra fit` (the default when no subcommand is given): the teacher–student adaptation demo —
//!   LoRA, ELRA, ELRA-PSD and ELRA-Hyb adapt a frozen network toward a target (the training is
//!   the library's `elra::train::fit`; this file shows its progress and writes its files).
//! - `elra verify`: seeded random instances of Propositions 1–7 (and Lemma 1, eq. 21, merge/unmerge)
//!   checked against the dense nalgebra oracle, printed as a table.
//! - `elra expressivity <linear|fnn|tfn|all>`: the App. G experiments of the expressive-power paper
//!   (`--ranks` runs a shard of the ranks; `elra expressivity merge CSV...` joins shards).
//! - `elra merge` / `elra unmerge --base DIR --adapter DIR --out DIR`: an adapter directory (ELRA
//!   or PEFT LoRA) merged into, or taken out of, a safetensors checkpoint, streamed tensor by
//!   tensor (`elra::io::checkpoint`).
//!
//! Every numeric flag has a range (the [`Range`] constants, printed by `elra help`); a value
//! outside it, a value that does not parse, an unknown, repeated or valueless flag, a repeated
//! method or rank, or an output in the way ends the command with status 2 and one line on stderr
//! starting `elra: ` — before any work is done. Outputs are written as sets (both files or
//! neither, no temporaries left: `elra_lab::output`).
use elra::io::{merge_checkpoint, Direction};
use elra::train::fit::{fit_with_progress, FitMethod, FitOptions};
use elra_lab::fit_output::{check_fit_outputs, write_fit_outputs};
use elra_lab::runner::{merge_csvs, run_cli, CliOpts};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fmt::Display;
use std::path::PathBuf;
use std::process::ExitCode;

/// The accepted values of a numeric flag, both ends included.
struct Range {
    flag: &'static str,
    lo: u64,
    hi: u64,
}

impl Range {
    const fn new(flag: &'static str, lo: u64, hi: u64) -> Range {
        Range { flag, lo, hi }
    }
}

/// `fit --steps`: optimiser steps per method (default 800).
const STEPS: Range = Range::new("steps", 1, 100_000);
/// `fit --width`: the width of every layer (default 64); also at least the largest adapter
/// rank of the chosen methods (8; 16 with elra-psd).
const WIDTH: Range = Range::new("width", 1, 1024);
/// `fit --depth`: the number of layers (default 3).
const DEPTH: Range = Range::new("depth", 1, 16);
/// `verify --cases`: instances per claim (default 64).
const CASES: Range = Range::new("cases", 1, 1000);
/// `verify --max-dim`: the largest d and k of an instance (default 32).
const MAX_DIM: Range = Range::new("max-dim", 2, 256);
/// `expressivity --iterations`: Adam steps per configuration (default App. G's 5000).
const ITERATIONS: Range = Range::new("iterations", 1, 1_000_000);
/// `expressivity --threads`: worker threads, 0 for all cores (default 0).
const THREADS: Range = Range::new("threads", 0, 256);
/// `expressivity --ranks`: LoRA-equivalent ranks, distinct (default 1 … D).
const RANKS: Range = Range::new("ranks", 1, 16);
/// `--seed` of every subcommand (defaults: fit 0, verify 2024, expressivity 0).
const SEED: Range = Range::new("seed", 0, u64::MAX);

/// The usage text, with every numeric flag's range from the constants above.
fn usage() -> String {
    let r = |x: &Range| format!("{} … {}", x.lo, x.hi);
    format!(
        "\
elra — exponential low-rank adapters

USAGE:
    elra [fit] [--steps N] [--seed S] [--width W] [--depth D] [--methods LIST] [--out DIR]
               [--no-progress]
    elra verify [--seed S] [--cases N] [--max-dim D]
    elra expressivity <linear|fnn|tfn|all> [--quick] [--seed S] [--out DIR] [--iterations N]
               [--threads T] [--ranks R1,R2,..]
    elra expressivity merge CSV... [--out DIR]
    elra merge --base DIR --adapter DIR --out DIR [--no-progress]
    elra unmerge --base DIR --adapter DIR --out DIR [--no-progress]
    elra help

With no subcommand, `elra` runs `fit` with its defaults. `--methods` takes a comma-separated
list of lora, elra, elra-psd, elra-hyb, elra-hyb-ga, elra-double (default: the first four).
`expressivity --ranks` runs only those ranks (a shard: rows depend only on seed, setting and
rank); `expressivity merge` joins the shards' mse_vs_rank.csv files into one CSV, plot and
summary per setting.

`merge` writes a new checkpoint directory --out (which must not exist) holding --base's
safetensors checkpoint (model.safetensors, or shards with model.safetensors.index.json) with
the adapter directory --adapter (ELRA: exp(G) W0; PEFT LoRA: W0 + s·BA) applied to every
`<module>.weight` it names, in each tensor's dtype; `unmerge` applies the inverse (exp(−G) W,
W − s·BA). Other tensors and files are copied (weight files of other formats are not); the
output appears complete or not at all. Memory stays near the largest adapted tensor.

FLAGS (numbers are whole numbers; ranges include both ends):
    --seed S          {seed} (defaults: fit 0, verify 2024, expressivity 0)
    fit --steps N     {steps} (default 800)
    fit --width W     {width}, and at least the largest rank of the methods: 8, 16 with
                      elra-psd (default 64)
    fit --depth D     {depth} (default 3)
    fit --methods     distinct names from the list above (default lora,elra,elra-psd,elra-hyb)
    fit --out DIR     where loss.csv and loss.svg go (default elra-out)
    verify --cases N  {cases} (default 64)
    verify --max-dim D  {max_dim} (default 32)
    expressivity --iterations N  {iterations} (default 5000; at most 20 with --quick)
    expressivity --threads T     {threads}, 0 = all cores (default 0)
    expressivity --ranks LIST    distinct ranks in {ranks} (default all)
    expressivity --out DIR       one directory per setting (default elra-out/expressivity)

A flag may be given once, as `--flag value` or `--flag=value`. Bad arguments, or an output
file in the way (a directory called loss.csv, say), end with status 2 and one line on stderr,
before any work; a failing claim (verify), a loss that did not fall (fit) or a checkpoint or
adapter that cannot be merged (merge, unmerge: one `elra: ` line naming every problem found)
ends with status 1.
Output files are replaced as a set: all of them or none.",
        seed = r(&SEED),
        steps = r(&STEPS),
        width = r(&WIDTH),
        depth = r(&DEPTH),
        cases = r(&CASES),
        max_dim = r(&MAX_DIM),
        iterations = r(&ITERATIONS),
        threads = r(&THREADS),
        ranks = r(&RANKS),
    )
}

/// The flags a subcommand knows: those that take a value and the switches.
struct Spec {
    values: &'static [&'static str],
    switches: &'static [&'static str],
}

/// Parsed flags of one subcommand: each known flag at most once.
struct Flags {
    values: Vec<(&'static str, String)>,
    switches: Vec<&'static str>,
    positional: Vec<String>,
}

impl Flags {
    /// Splits `args` into flags (`--name value`, `--name=value`, switches) and positional
    /// arguments. Errors: an unknown flag, a flag given twice, a value flag without a value (or
    /// followed by another flag), a switch given a value.
    fn parse(args: &[String], spec: &Spec) -> Result<Flags, String> {
        let mut flags = Flags {
            values: Vec::new(),
            switches: Vec::new(),
            positional: Vec::new(),
        };
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            i += 1;
            let Some(body) = a.strip_prefix("--") else {
                flags.positional.push(a.clone());
                continue;
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let seen =
                flags.values.iter().any(|(k, _)| *k == name) || flags.switches.contains(&name);
            if let Some(&known) = spec.switches.iter().find(|&&s| s == name) {
                if inline.is_some() {
                    return Err(format!("flag --{name} takes no value"));
                }
                if seen {
                    return Err(format!("flag --{name} given twice"));
                }
                flags.switches.push(known);
            } else if let Some(&known) = spec.values.iter().find(|&&s| s == name) {
                let value = match inline {
                    Some(v) => v,
                    None => match args.get(i) {
                        Some(v) if !v.starts_with("--") => {
                            i += 1;
                            v.clone()
                        }
                        _ => return Err(format!("flag --{name} needs a value")),
                    },
                };
                if seen {
                    return Err(format!("flag --{name} given twice"));
                }
                flags.values.push((known, value));
            } else {
                return Err(format!("unknown flag --{name}"));
            }
        }
        Ok(flags)
    }

    fn str(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    fn switch(&self, name: &str) -> bool {
        self.switches.contains(&name)
    }

    /// The value of numeric flag `range.flag` (`default` when absent), checked against its range.
    fn num(&self, range: &Range, default: u64) -> Result<u64, String> {
        match self.str(range.flag) {
            None => Ok(default),
            Some(v) => parse_in(range, v),
        }
    }

    /// [`Flags::num`] for a count; every range's upper end fits a `usize` on the 64-bit targets
    /// the crate builds for, and a larger one is refused rather than truncated.
    fn count(&self, range: &Range, default: usize) -> Result<usize, String> {
        let x = self.num(range, default as u64)?;
        usize::try_from(x).map_err(|_| format!("--{}: {x} does not fit this machine", range.flag))
    }

    /// The value of a path flag (`default` when absent); an empty path is refused.
    fn path(&self, name: &str, default: &str) -> Result<PathBuf, String> {
        match self.str(name) {
            None => Ok(PathBuf::from(default)),
            Some("") => Err(format!("--{name}: needs a path, got an empty one")),
            Some(v) => Ok(PathBuf::from(v)),
        }
    }
}

/// `v` parsed as a whole number in `range` (errors name the flag and the range).
fn parse_in(range: &Range, v: &str) -> Result<u64, String> {
    let Range { flag, lo, hi } = *range;
    let x: u64 = v.trim().parse().map_err(|_| {
        format!("--{flag}: cannot parse {v:?} (expected a whole number in {lo} … {hi})")
    })?;
    if x < lo {
        return Err(format!(
            "--{flag} must be at least {lo} (range {lo} … {hi}), got {x}"
        ));
    }
    if x > hi {
        return Err(format!(
            "--{flag} must be at most {hi} (range {lo} … {hi}), got {x}"
        ));
    }
    Ok(x)
}

/// A comma-separated list whose items must be distinct (`what` names them in the errors).
fn distinct_list<T: PartialEq + Display>(
    flag: &str,
    what: &str,
    list: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let mut out: Vec<T> = Vec::new();
    for item in list.split(',') {
        let x = parse(item)?;
        if out.contains(&x) {
            return Err(format!(
                "--{flag}: {x} given twice (expected distinct {what})"
            ));
        }
        out.push(x);
    }
    Ok(out)
}

fn verify(flags: &Flags) -> Result<bool, String> {
    if let Some(p) = flags.positional.first() {
        return Err(format!("verify takes no positional argument, got {p:?}"));
    }
    let seed = flags.num(&SEED, 2024)?;
    let cases = flags.count(&CASES, 64)?;
    let max_dim = flags.count(&MAX_DIM, 32)?;
    println!("elra verify: seed {seed}, {cases} cases per claim, dimensions up to {max_dim}");
    println!(
        "{:<44} {:>6} {:>12} {:>10}  pass",
        "claim", "cases", "worst error", "tolerance"
    );
    let mut all = true;
    for (i, claim) in elra::verify::claims().iter().enumerate() {
        let report = claim
            .run(seed.wrapping_add(i as u64), cases, max_dim)
            .map_err(|e| format!("{}: {e}", claim.name))?;
        all &= report.pass;
        println!(
            "{:<44} {:>6} {:>12.3e} {:>10.1e}  {}",
            report.name,
            report.cases,
            report.worst,
            report.tolerance,
            if report.pass { "pass" } else { "FAIL" }
        );
    }
    println!(
        "{}",
        if all {
            "all claims pass"
        } else {
            "SOME CLAIMS FAIL"
        }
    );
    Ok(all)
}

fn fit(flags: &Flags) -> Result<bool, String> {
    if let Some(p) = flags.positional.first() {
        return Err(format!("fit takes no positional argument, got {p:?}"));
    }
    let defaults = FitOptions::default();
    let methods = match flags.str("methods") {
        None => defaults.methods.clone(),
        Some(list) => distinct_list("methods", "methods", list, |m| {
            m.parse::<FitMethod>()
                .map_err(|e| format!("--methods: {e}"))
        })?,
    };
    let opts = FitOptions {
        steps: flags.count(&STEPS, defaults.steps)?,
        seed: flags.num(&SEED, defaults.seed)?,
        width: flags.count(&WIDTH, defaults.width)?,
        depth: flags.count(&DEPTH, defaults.depth)?,
        methods,
        ..defaults
    };
    opts.validate().map_err(|e| e.to_string())?;
    let out = flags.path("out", "elra-out")?;
    check_fit_outputs(&out).map_err(|e| e.to_string())?;
    println!(
        "elra fit: teacher–student adaptation, width {}, depth {}, {} steps, seed {}",
        opts.width, opts.depth, opts.steps, opts.seed
    );
    let bar = if flags.switch("no-progress") {
        ProgressBar::hidden()
    } else {
        let total = (opts.steps * opts.methods.len()) as u64;
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    };
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} steps ({eta})")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let report = fit_with_progress(&opts, &mut |method, step| {
        if step == 1 {
            bar.set_message(method.name());
        }
        bar.inc(1);
    })
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let (csv, svg) = write_fit_outputs(&out, &report).map_err(|e| e.to_string())?;
    println!("{report}");
    println!("wrote {} and {}", csv.display(), svg.display());
    let improved = report.rows.iter().all(|r| r.final_loss < r.first_loss);
    if !improved {
        eprintln!("elra fit: some method's final loss is not below its first loss");
    }
    Ok(improved)
}

fn expressivity(flags: &Flags) -> Result<bool, String> {
    let out = flags.path("out", "elra-out/expressivity")?;
    if flags.positional.first().map(String::as_str) == Some("merge") {
        if flags.switch("quick") {
            return Err("expressivity merge takes no --quick".into());
        }
        if let Some((k, _)) = flags.values.iter().find(|(k, _)| *k != "out") {
            return Err(format!("unknown flag --{k}"));
        }
        let files: Vec<PathBuf> = flags.positional[1..].iter().map(Into::into).collect();
        let summary = merge_csvs(&files, &out).map_err(|e| e.to_string())?;
        println!("{summary}");
        return Ok(true);
    }
    let group = match flags.positional.as_slice() {
        [g] => g.clone(),
        [] => return Err("expressivity needs one of linear, fnn, tfn, all, merge".into()),
        more => {
            return Err(format!(
                "expressivity takes one setting group, got {more:?}"
            ))
        }
    };
    let ranks = match flags.str("ranks") {
        None => None,
        Some(list) => Some(distinct_list("ranks", "ranks", list, |r| {
            let x = parse_in(&RANKS, r).map_err(|e| {
                if e.contains("cannot parse") {
                    let (lo, hi) = (RANKS.lo, RANKS.hi);
                    format!("--ranks: {:?} is not a rank ({lo} … {hi})", r.trim())
                } else {
                    e
                }
            })?;
            usize::try_from(x).map_err(|e| e.to_string())
        })?),
    };
    let opts = CliOpts {
        quick: flags.switch("quick"),
        seed: flags.num(&SEED, 0)?,
        out,
        threads: flags.count(&THREADS, 0)?,
        iterations: match flags.str("iterations") {
            None => None,
            Some(_) => Some(flags.count(&ITERATIONS, 0)?),
        },
        ranks,
    };
    let summary = run_cli(&group, &opts).map_err(|e| e.to_string())?;
    println!("{summary}");
    Ok(true)
}

/// `elra merge` / `elra unmerge`: the streaming checkpoint merge of `elra::io::checkpoint`.
fn merge(flags: &Flags, direction: Direction) -> Result<bool, String> {
    let verb = match direction {
        Direction::Merge => "merge",
        Direction::Unmerge => "unmerge",
    };
    if let Some(p) = flags.positional.first() {
        return Err(format!("{verb} takes no positional argument, got {p:?}"));
    }
    let need = |name: &str| match flags.str(name) {
        None => Err(format!("{verb} needs --{name} DIR")),
        Some(_) => flags.path(name, ""),
    };
    let (base, adapter, out) = (need("base")?, need("adapter")?, need("out")?);
    if std::fs::symlink_metadata(&out).is_ok() {
        return Err(format!(
            "--out {} exists; {verb} writes a new directory",
            out.display()
        ));
    }
    let bar = if flags.switch("no-progress") {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    bar.set_message(verb);
    let start = std::time::Instant::now();
    let result = merge_checkpoint(&base, &adapter, &out, direction, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("elra: {verb}: {e}");
            return Ok(false);
        }
    };
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "{verb}d {} of {} tensors ({} shard{}, {:.1} MiB of tensors; largest adapted {:.1} MiB) \
         into {} in {:.2} s",
        report.adapted,
        report.tensors,
        report.shards,
        if report.shards == 1 { "" } else { "s" },
        mib(report.bytes),
        mib(report.largest_adapted_bytes),
        out.display(),
        start.elapsed().as_secs_f64()
    );
    if !report.skipped_files.is_empty() {
        println!(
            "not copied (weights of another format, unmerged): {}",
            report.skipped_files.join(", ")
        );
    }
    if let Some(kib) = peak_rss_kib() {
        println!("peak resident memory: {:.1} MiB", kib as f64 / 1024.0);
    }
    Ok(true)
}

/// The process's peak resident set (`VmHWM` of `/proc/self/status`), where Linux reports it.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

const MERGE: Spec = Spec {
    values: &["base", "adapter", "out"],
    switches: &["no-progress"],
};
const FIT: Spec = Spec {
    values: &["steps", "seed", "width", "depth", "methods", "out"],
    switches: &["no-progress"],
};
const VERIFY: Spec = Spec {
    values: &["seed", "cases", "max-dim"],
    switches: &[],
};
const EXPRESSIVITY: Spec = Spec {
    values: &["seed", "out", "threads", "iterations", "ranks"],
    switches: &["quick"],
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `--help` anywhere (`elra --help`, `elra fit --help`) asks for the usage, before any
    // subcommand's flag parser could read it as a flag wanting a value.
    let asks_help = args.iter().any(|a| a == "--help")
        || matches!(args.first().map(String::as_str), Some("help" | "-h"));
    let (cmd, rest) = match args.first().map(String::as_str) {
        _ if asks_help => ("help", &args[..0]),
        None => ("fit", &args[..]),
        Some(a) if a.starts_with("--") => ("fit", &args[..]),
        Some(a) => (a, &args[1..]),
    };
    let result = match cmd {
        "help" => {
            println!("{}", usage());
            Ok(true)
        }
        "verify" => Flags::parse(rest, &VERIFY).and_then(|f| verify(&f)),
        "fit" => Flags::parse(rest, &FIT).and_then(|f| fit(&f)),
        "expressivity" => Flags::parse(rest, &EXPRESSIVITY).and_then(|f| expressivity(&f)),
        "merge" => Flags::parse(rest, &MERGE).and_then(|f| merge(&f, Direction::Merge)),
        "unmerge" => Flags::parse(rest, &MERGE).and_then(|f| merge(&f, Direction::Unmerge)),
        other => Err(format!("unknown subcommand {other:?}\n\n{}", usage())),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(msg) => {
            eprintln!("elra: {msg}");
            ExitCode::from(2)
        }
    }
}
