//! How much one App. G row depends on its seeds:
//! `cargo run --release --example seed_spread -- SETTING_ID METHOD RANK LR WD [SEEDS] [THREADS]`
//! (e.g. `tfn_L2_H2_random elra_psd 3 1e-3 0 4 1`; METHOD is `lora`, `elra`, `elra_psd` or
//! `elra_hyb`; defaults SEEDS = 4, THREADS = 1).
//!
//! App. G trains each (rank, learning rate, weight decay) configuration once, from one adapter
//! initialisation and one stream of training samples ([`rank_seeds`]). This example retrains one
//! configuration of a TFN setting (App. G.3, the runner's frozen/target pair and test set via
//! [`tfn_setting_models`] and [`setting_test_inputs`], biases trained, 5000 Adam steps on 256
//! fresh sequences — [`Opts::default`]) with
//! - the runner's two seeds — its test MSE must equal the CSV row's `trained_mse` when that
//!   configuration was the row's best (checked by eye against `figures`);
//! - `SEEDS` other adapter initialisations, the sample stream kept;
//! - `SEEDS` other sample streams, the initialisation kept;
//!
//! and prints the test MSE of the one-hot output of each class k (every token mapped to class k),
//! then, for each retraining, the test MSE, its distance to the MSE of the one-hot output of the
//! target's most frequent class (the collapse floor, EXPERIMENTS.md "Where the TFN floor comes
//! from"), and how collapsed the outputs are ([`peakedness`]: mean largest probability, share of
//! tokens whose argmax is the most frequent class).

use elra::expressivity::network::mse;
use elra::{ElraError, Result};
use elra_lab::experiment::{
    app_g_settings, rank_seeds, run_grid, setting_test_inputs, tfn_setting_models, train_adapters,
    Architecture, Opts,
};
use elra_lab::optim::AdamConfig;
use elra_lab::runner::{setting_id, Method};

#[allow(dead_code)] // each example uses a subset of the shared parsers
mod common;
use common::{one_hot_mse, parse, peakedness, positional};

/// One retraining: a label, the (initialisation, data) seeds.
struct Variant {
    label: String,
    init_seed: u64,
    data_seed: u64,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "SETTING_ID METHOD RANK LR WD [SEEDS] [THREADS]";
    if args.len() < 5 {
        return Err(ElraError::invalid("arguments", format!("usage: {usage}")));
    }
    let setting = app_g_settings()
        .into_iter()
        .find(|s| setting_id(s) == args[0])
        .ok_or_else(|| ElraError::invalid("SETTING_ID", format!("unknown {:?}", args[0])))?;
    if !matches!(setting.arch, Architecture::Tfn { .. }) {
        return Err(ElraError::invalid("SETTING_ID", "not a TFN setting"));
    }
    let method = Method::all()
        .into_iter()
        .find(|m| m.name() == args[1])
        .ok_or_else(|| ElraError::invalid("METHOD", format!("unknown {:?}", args[1])))?;
    let rank: usize = parse("RANK", &args[2])?;
    let lr: f64 = parse("LR", &args[3])?;
    let wd: f64 = parse("WD", &args[4])?;
    let seeds: u64 = positional(&args, 5, "SEEDS", 4)?;
    let threads: usize = positional(&args, 6, "THREADS", 1)?;

    let opts = Opts::default();
    let (frozen, target) = tfn_setting_models(&setting, &opts)?;
    let x = setting_test_inputs(&setting, &opts, &frozen)?;
    let y = target.forward(&x)?;
    let (_, _, _, top_class) = peakedness(&y);
    // Test MSE of the output that is one-hot in class k for every token, for each k.
    let one_hot = (0..y.ncols())
        .map(|k| one_hot_mse(&y, k))
        .collect::<Result<Vec<f64>>>()?;
    let floor = one_hot[top_class];
    println!(
        "{} {} R = {rank}, lr {lr:e}, wd {wd:e}, {} steps; frozen test MSE {:.4e}; floor (one-hot class {top_class}) {floor:e}",
        args[0],
        method.name(),
        opts.iterations,
        mse(&frozen.forward(&x)?, &y)?
    );
    let per_class: Vec<String> = one_hot.iter().map(|v| format!("{v:.4e}")).collect();
    println!(
        "  test MSE of the one-hot output of class k = 0 … {}: {}",
        y.ncols() - 1,
        per_class.join(", ")
    );

    let (init0, data0) = rank_seeds(&setting, &opts, rank);
    let mut variants = vec![Variant {
        label: "runner seeds".into(),
        init_seed: init0,
        data_seed: data0,
    }];
    for k in 1..=seeds {
        variants.push(Variant {
            label: format!("init seed +{k}"),
            init_seed: init0.wrapping_add(k),
            data_seed: data0,
        });
    }
    for k in 1..=seeds {
        variants.push(Variant {
            label: format!("data seed +{k}"),
            init_seed: init0,
            data_seed: data0.wrapping_add(k),
        });
    }
    // Validation only ranks configurations inside the runner; here it is unused, so the first
    // 256 test sequences stand in for it.
    let n_val = 256 * frozen.seq_len;
    let val = (x.rows(0, n_val).into_owned(), y.rows(0, n_val).into_owned());
    let run = |v: &Variant| -> Result<String> {
        let t = train_adapters(
            &frozen,
            &target,
            &method,
            rank,
            AdamConfig::adam(lr, wd),
            opts.iterations,
            opts.batch,
            opts.train_biases,
            v.init_seed,
            v.data_seed,
            (&val.0, &val.1),
        );
        Ok(match t {
            Ok(t) => {
                let y_tr = t.model.forward(&x)?;
                let m = mse(&y_tr, &y)?;
                let (mean_max, _, top, class) = peakedness(&y_tr);
                format!(
                    "  {:<14} test MSE {m:.6e} (floor {:+.3e}); last training loss {:.4e}; mean max prob {mean_max:.3}; argmax class {class} for {top:.3} of tokens (one-hot class {class}: {:.6e})",
                    v.label,
                    m - floor,
                    t.last_loss,
                    one_hot[class]
                )
            }
            Err(ElraError::Training { step, reason }) => {
                format!("  {:<14} diverged at step {step}: {reason}", v.label)
            }
            Err(e) => return Err(e),
        })
    };
    if threads <= 1 {
        // Sequential: print each line as it finishes (a run is minutes).
        for v in &variants {
            println!("{}", run(v)?);
        }
    } else {
        // The runner's own worker pool; lines in variant order once all have run.
        for line in run_grid(&variants, threads, run) {
            println!("{}", line?);
        }
    }
    Ok(())
}
