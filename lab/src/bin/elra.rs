//! The `elra` command line.
//!
//! - `elra fit` (the default when no subcommand is given): the teacher–student adaptation demo of
//!   issue 3 — LoRA, ELRA, ELRA-PSD and ELRA-Hyb adapt a frozen network toward a target.
//! - `elra verify`: seeded random instances of Propositions 1–7 (and Lemma 1, eq. 21, merge/unmerge)
//!   checked against the dense nalgebra oracle, printed as a table.
//! - `elra expressivity <linear|fnn|tfn|all>`: the App. G experiments of the expressive-power paper
//!   (`--ranks` runs a shard of the ranks; `elra expressivity merge CSV...` joins shards).
use elra_lab::fit_output::write_fit_outputs;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::process::ExitCode;

const USAGE: &str = "\
elra — exponential low-rank adapters

USAGE:
    elra [fit] [--steps N] [--seed S] [--width W] [--depth D] [--methods LIST] [--out DIR]
               [--no-progress]
    elra verify [--seed S] [--cases N] [--max-dim D]
    elra expressivity <linear|fnn|tfn|all> [--quick] [--seed S] [--out DIR] [--iterations N]
               [--threads T] [--ranks R1,R2,..]
    elra expressivity merge CSV... [--out DIR]
    elra help

With no subcommand, `elra` runs `fit` with its defaults. `--methods` takes a comma-separated
list of lora, elra, elra-psd, elra-hyb, elra-hyb-ga, elra-double (default: the first four).
`expressivity --ranks` runs only those ranks (a shard: rows depend only on seed, setting and
rank); `expressivity merge` joins the shards' mse_vs_rank.csv files into one CSV, plot and
summary per setting.";

/// Parsed `--flag value` pairs of one subcommand.
struct Flags {
    pairs: Vec<(String, String)>,
    switches: Vec<String>,
    positional: Vec<String>,
}

impl Flags {
    fn parse(args: &[String], switch_names: &[&str]) -> Result<Flags, String> {
        let mut flags = Flags {
            pairs: Vec::new(),
            switches: Vec::new(),
            positional: Vec::new(),
        };
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            if let Some(name) = a.strip_prefix("--") {
                if let Some((k, v)) = name.split_once('=') {
                    flags.pairs.push((k.to_string(), v.to_string()));
                } else if switch_names.contains(&name) {
                    flags.switches.push(name.to_string());
                } else {
                    let v = args
                        .get(i + 1)
                        .ok_or_else(|| format!("flag --{name} needs a value"))?;
                    flags.pairs.push((name.to_string(), v.clone()));
                    i += 1;
                }
            } else {
                flags.positional.push(a.clone());
            }
            i += 1;
        }
        Ok(flags)
    }

    fn str(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    fn check_known(&self, known: &[&str]) -> Result<(), String> {
        for (k, _) in &self.pairs {
            if !known.contains(&k.as_str()) {
                return Err(format!("unknown flag --{k}"));
            }
        }
        Ok(())
    }

    fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.pairs.iter().rev().find(|(k, _)| k == name) {
            None => Ok(default),
            Some((_, v)) => v
                .parse()
                .map_err(|_| format!("--{name}: cannot parse {v:?}")),
        }
    }
}

fn verify(flags: &Flags) -> Result<bool, String> {
    flags.check_known(&["seed", "cases", "max-dim"])?;
    if let Some(p) = flags.positional.first() {
        return Err(format!("verify takes no positional argument, got {p:?}"));
    }
    let seed: u64 = flags.get("seed", 2024)?;
    let cases: usize = flags.get("cases", 64)?;
    let max_dim: usize = flags.get("max-dim", 32)?;
    if cases == 0 {
        return Err("--cases must be at least 1".into());
    }
    if max_dim < 2 {
        return Err("--max-dim must be at least 2".into());
    }
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
    flags.check_known(&["steps", "seed", "width", "depth", "methods", "out"])?;
    if let Some(p) = flags.positional.first() {
        return Err(format!("fit takes no positional argument, got {p:?}"));
    }
    let defaults = elra::train::fit::FitOptions::default();
    let methods = match flags.str("methods") {
        None => defaults.methods.clone(),
        Some(list) => list
            .split(',')
            .map(|m| m.parse().map_err(|e: elra::ElraError| e.to_string()))
            .collect::<Result<Vec<_>, String>>()?,
    };
    let opts = elra::train::fit::FitOptions {
        steps: flags.get("steps", defaults.steps)?,
        seed: flags.get("seed", defaults.seed)?,
        width: flags.get("width", defaults.width)?,
        depth: flags.get("depth", defaults.depth)?,
        methods,
        ..defaults
    };
    let out: std::path::PathBuf = flags.get("out", std::path::PathBuf::from("elra-out"))?;
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
    let report = elra::train::fit::fit_with_progress(&opts, &mut |method, _| {
        bar.set_message(method.name());
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
    let out = flags.get("out", std::path::PathBuf::from("elra-out/expressivity"))?;
    if flags.positional.first().map(String::as_str) == Some("merge") {
        flags.check_known(&["out"])?;
        if flags.switch("quick") {
            return Err("expressivity merge takes no --quick".into());
        }
        let files: Vec<std::path::PathBuf> = flags.positional[1..].iter().map(Into::into).collect();
        let summary = elra_lab::runner::merge_csvs(&files, &out).map_err(|e| e.to_string())?;
        println!("{summary}");
        return Ok(true);
    }
    flags.check_known(&["seed", "out", "threads", "iterations", "ranks"])?;
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
        Some(list) => Some(
            list.split(',')
                .map(|r| {
                    r.trim()
                        .parse::<usize>()
                        .map_err(|_| format!("--ranks: {r:?} is not a rank"))
                })
                .collect::<Result<Vec<_>, String>>()?,
        ),
    };
    let opts = elra_lab::runner::CliOpts {
        quick: flags.switch("quick"),
        seed: flags.get("seed", 0)?,
        out,
        threads: flags.get("threads", 0)?,
        iterations: match flags.str("iterations") {
            None => None,
            Some(_) => Some(flags.get("iterations", 0usize)?),
        },
        ranks,
    };
    let summary = elra_lab::runner::run_cli(&group, &opts).map_err(|e| e.to_string())?;
    println!("{summary}");
    Ok(true)
}

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
            println!("{USAGE}");
            Ok(true)
        }
        "verify" => Flags::parse(rest, &[]).and_then(|f| verify(&f)),
        "fit" => Flags::parse(rest, &["no-progress"]).and_then(|f| fit(&f)),
        "expressivity" => Flags::parse(rest, &["quick"]).and_then(|f| expressivity(&f)),
        other => Err(format!("unknown subcommand {other:?}\n\n{USAGE}")),
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
