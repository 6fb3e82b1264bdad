//! Driver for the App. G runs with the ELRA comparison (EXPERIMENTS.md):
//! `cargo run --release --example app_g_elra -- <linear|fnn|tfn|all|SETTING_ID...>
//!  [--quick] [--seed S] [--out DIR] [--iterations N] [--threads T] [--ranks 1,2,..]
//!  [--lr 1e-2,1e-3] [--wd 0,1e-3] [--test-samples N] [--batch N] [--pretrain-max-steps N]`
//! A group name runs the whole group; otherwise the arguments name settings by
//! `<name>_<random|pretrained>` (e.g. `tfn_L1_H2_random`). Prints the summary table.

use elra::ElraError;
use elra_lab::experiment::{app_g_settings, Opts};
use elra_lab::runner::{run_settings, setting_id, settings_of_group, Method};
use std::path::PathBuf;

#[allow(dead_code)] // each example uses a subset of the shared parsers
mod common;
use common::{flag, flag_list, flag_value};

fn main() -> elra::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = Opts::default();
    let mut out = PathBuf::from("runs");
    let mut ranks: Option<Vec<usize>> = None;
    let mut names = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "--quick" => opts.quick = true,
            "--seed" => opts.seed = flag(&args, &mut i, "--seed")?,
            "--out" => out = PathBuf::from(flag_value(&args, &mut i, "--out")?),
            "--iterations" => opts.iterations = flag(&args, &mut i, "--iterations")?,
            "--threads" => opts.threads = flag(&args, &mut i, "--threads")?,
            "--ranks" => ranks = Some(flag_list(&args, &mut i, "--ranks")?),
            "--lr" => opts.lr_grid = flag_list(&args, &mut i, "--lr")?,
            "--wd" => opts.wd_grid = flag_list(&args, &mut i, "--wd")?,
            "--test-samples" => opts.test_samples = flag(&args, &mut i, "--test-samples")?,
            "--batch" => opts.batch = flag(&args, &mut i, "--batch")?,
            "--pretrain-max-steps" => {
                opts.pretrain_max_steps = flag(&args, &mut i, "--pretrain-max-steps")?
            }
            _ => names.push(a.to_string()),
        }
        i += 1;
    }
    let mut settings = Vec::new();
    for n in &names {
        match settings_of_group(n) {
            Ok(s) => settings.extend(s),
            Err(_) => {
                let before = settings.len();
                settings.extend(app_g_settings().into_iter().filter(|s| &setting_id(s) == n));
                if settings.len() == before {
                    let ids: Vec<String> = app_g_settings().iter().map(setting_id).collect();
                    return Err(ElraError::invalid(
                        "SETTING",
                        format!(
                            "{n:?} is neither a group (linear, fnn, tfn, all) nor a setting id ({})",
                            ids.join(", ")
                        ),
                    ));
                }
            }
        }
    }
    if settings.is_empty() {
        eprintln!("no settings selected");
        std::process::exit(2);
    }
    let t0 = std::time::Instant::now();
    let s = run_settings(&settings, ranks.as_deref(), &opts, &Method::all(), &out)?;
    println!("{s}");
    println!(
        "wall time {:.1} s; options {:?}",
        t0.elapsed().as_secs_f64(),
        opts
    );
    Ok(())
}
