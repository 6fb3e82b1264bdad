//! What the App. G.3 TFN error floor is made of (EXPERIMENTS.md, "Where the TFN floor comes
//! from"): `cargo run --release --example tfn_floor -- [STEPS,..] [RANK] [LR,..]` (defaults
//! `10,100,1000`, 8, `1e-2,1e-3,1e-4`).
//!
//! For each TFN setting, on the runner's own frozen/target pair and test set
//! ([`tfn_setting_models`], [`setting_test_inputs`]; 5000 sequences of 10 tokens), it prints
//! - the per-entry test MSE of the frozen model (the CSVs' `frozen_mse`, as a check), of the
//!   uniform output `1/D` and of the best input-independent output (the test-set mean of the
//!   target's outputs, `ȳ`): every output is a probability vector (the model ends in a softmax),
//!   so `E‖y − ȳ‖²/D ≤ (1 − 1/D)/D` — no constant output can be worse than the uniform one;
//! - the per-entry test MSE, to every digit, of the one-hot output of the target's most frequent
//!   class for every token (what a trained model whose output softmax has saturated to exact
//!   0/1 scores: rows of the CSVs that equal it bit for bit are such models);
//! - how peaked the outputs are (mean largest probability, share of tokens whose largest
//!   probability exceeds 0.99) and how concentrated their argmax is (share of the most frequent
//!   class);
//! - per block and head, the share of attention rows whose largest weight exceeds 0.99
//!   (saturated softmax);
//! - how saturated the output softmax is (median gap between the two largest logits);
//! - for LoRA runs of each `STEPS` count at rank `RANK` and each learning rate (no weight decay,
//!   biases trained, 256 fresh sequences per step — the App. G recipe, one configuration): the
//!   trained model's test MSE and the same statistics of its outputs, plus the spread of its
//!   outputs over inputs (per-entry variance across test tokens) and their distance to `ȳ`.
//!
//! The block forward is recomputed here from the public weights (§3.1, tokens as rows) to read
//! the attention weights; it is checked against [`Tfn::forward`] first.

use elra::expressivity::network::mse;
use elra::expressivity::tfn::Tfn;
use elra_lab::adapter::LoraFamily;
use elra_lab::experiment::{
    app_g_settings, setting_test_inputs, tfn_setting_models, train_adapters, Architecture, Opts,
};
use elra_lab::optim::AdamConfig;
use elra_lab::runner::setting_id;
use nalgebra::DMatrix;

#[allow(dead_code)] // each example uses a subset of the shared parsers
mod common;
use common::{one_hot_mse, parse_list, peakedness, positional};

/// Row-wise softmax of a small matrix.
fn softmax_rows(s: &DMatrix<f64>) -> DMatrix<f64> {
    let mut p = s.clone();
    for mut row in p.row_iter_mut() {
        let m = row.max();
        row.apply(|x| *x = (*x - m).exp());
        let z = row.sum();
        row /= z;
    }
    p
}

/// Output of `net` on `x` (rows = tokens, `seq_len` per sequence) and, per block and head,
/// the share of attention rows whose largest weight exceeds 0.99.
fn forward_with_saturation(net: &Tfn, x: &DMatrix<f64>) -> (DMatrix<f64>, Vec<Vec<f64>>) {
    let n = net.seq_len;
    let seqs = x.nrows() / n;
    let mut out = DMatrix::zeros(x.nrows(), net.dim());
    let mut saturated = vec![vec![0usize; net.heads()]; net.layers()];
    for s in 0..seqs {
        let mut z = x.rows(s * n, n).into_owned();
        for (l, b) in net.blocks.iter().enumerate() {
            let mut attn = DMatrix::zeros(n, net.dim());
            for (h, hd) in b.heads.iter().enumerate() {
                let q = &z * hd.Q.transpose();
                let k = &z * hd.K.transpose();
                let v = &z * hd.V.transpose();
                let p = softmax_rows(&(&q * k.transpose()));
                saturated[l][h] += p.row_iter().filter(|r| r.max() > 0.99).count();
                attn += p * v * hd.O.transpose();
            }
            let mut hid = attn * b.W1.transpose();
            for mut row in hid.row_iter_mut() {
                row += b.b1.transpose();
                row.apply(|x| *x = x.max(0.0));
            }
            z = hid * b.W2.transpose();
            for mut row in z.row_iter_mut() {
                row += b.b2.transpose();
            }
        }
        out.rows_mut(s * n, n)
            .copy_from(&softmax_rows(&(z * net.Wo.transpose())));
    }
    let rows = x.nrows() as f64;
    let shares = saturated
        .into_iter()
        .map(|v| v.into_iter().map(|c| c as f64 / rows).collect())
        .collect();
    (out, shares)
}

/// Mean over entries of the variance across rows (the MSE of the best constant output, when
/// the constant is the column mean).
fn mean_column_variance(y: &DMatrix<f64>) -> f64 {
    let rows = y.nrows() as f64;
    y.column_iter()
        .map(|c| {
            let m = c.mean();
            c.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / rows
        })
        .sum::<f64>()
        / y.ncols() as f64
}

/// Median over tokens of the gap between the two largest logits (how saturated the output
/// softmax is: a gap `g` leaves the runner-up at most `e^{−g}` of the winner's probability).
fn median_logit_gap(logits: &DMatrix<f64>) -> f64 {
    let mut gaps: Vec<f64> = logits
        .row_iter()
        .map(|row| {
            let (mut a, mut b) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
            for &v in row.iter() {
                if v > a {
                    b = a;
                    a = v;
                } else if v > b {
                    b = v;
                }
            }
            a - b
        })
        .collect();
    gaps.sort_by(f64::total_cmp);
    gaps[gaps.len() / 2]
}

fn describe(label: &str, y: &DMatrix<f64>, logits: &DMatrix<f64>, sat: Option<&[Vec<f64>]>) {
    let (mean_max, above, top, class) = peakedness(y);
    print!(
        "  {label:<8} mean max prob {mean_max:.3}, share max > 0.99 {above:.3}, \
         most frequent argmax {top:.3} (class {class}), median logit gap {:.3e}",
        median_logit_gap(logits)
    );
    if let Some(sat) = sat {
        let sat: Vec<String> = sat
            .iter()
            .map(|heads| {
                heads
                    .iter()
                    .map(|s| format!("{s:.3}"))
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect();
        print!(
            "; attention rows with max weight > 0.99, per block (heads): {}",
            sat.join(", ")
        );
    }
    println!();
}

fn main() -> elra::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps: Vec<usize> = match args.first() {
        Some(s) => parse_list("STEPS", s)?,
        None => vec![10, 100, 1000],
    };
    let rank: usize = positional(&args, 1, "RANK", 8)?;
    let lrs: Vec<f64> = match args.get(2) {
        Some(s) => parse_list("LR", s)?,
        None => vec![1e-2, 1e-3, 1e-4],
    };
    let opts = Opts::default();
    for setting in app_g_settings() {
        if !matches!(setting.arch, Architecture::Tfn { .. }) {
            continue;
        }
        let (frozen, target) = tfn_setting_models(&setting, &opts)?;
        let x = setting_test_inputs(&setting, &opts, &frozen)?;
        let y = target.forward(&x)?;
        let (y_check, sat_target) = forward_with_saturation(&target, &x);
        let dev = (&y_check - &y).abs().max();
        // Different summation orders through saturated softmaxes: agreement to 1e-8 on outputs
        // in [0, 1] is far below every effect reported here.
        assert!(dev < 1e-8, "re-computed forward deviates by {dev:e}");
        let d = y.ncols() as f64;
        let y_frozen = frozen.forward(&x)?;
        let (_, sat_frozen) = forward_with_saturation(&frozen, &x);
        let ybar = y.row_mean();
        let constant = DMatrix::from_fn(y.nrows(), y.ncols(), |_, c| ybar[c]);
        let uniform = DMatrix::from_element(y.nrows(), y.ncols(), 1.0 / d);
        println!(
            "{} (re-computed forward within {dev:.1e} of Tfn::forward)",
            setting_id(&setting)
        );
        println!(
            "  test MSE: frozen {:.4e}; uniform output {:.4e}; best constant ȳ {:.4e} (bound (1 − 1/D)/D = {:.4e})",
            mse(&y_frozen, &y)?,
            mse(&uniform, &y)?,
            mse(&constant, &y)?,
            (1.0 - 1.0 / d) / d
        );
        let (_, _, _, top_class) = peakedness(&y);
        println!(
            "  test MSE of the one-hot output of class {top_class} for every token: {:e}",
            one_hot_mse(&y, top_class)?
        );
        describe("target", &y, &target.logits(&x)?, Some(&sat_target));
        describe("frozen", &y_frozen, &frozen.logits(&x)?, Some(&sat_frozen));
        let val_x = x.rows(0, 256 * frozen.seq_len).into_owned();
        let val_y = y.rows(0, 256 * frozen.seq_len).into_owned();
        for &lr in &lrs {
            for &n in &steps {
                // Same seeds for every step count: the n-step run is the prefix of the longer ones.
                let trained = train_adapters(
                    &frozen,
                    &target,
                    &LoraFamily { init_std: None },
                    rank,
                    AdamConfig::adam(lr, 0.0),
                    n,
                    256,
                    true,
                    1,
                    2,
                    (&val_x, &val_y),
                )?;
                let y_tr = trained.model.forward(&x)?;
                println!(
                    "  LoRA R = {rank}, lr {lr:e}, {n} steps: test MSE {:.4e}; output variance over inputs {:.3e}; MSE to ȳ {:.4e}",
                    mse(&y_tr, &y)?,
                    mean_column_variance(&y_tr),
                    mse(&y_tr, &constant)?
                );
                describe("trained", &y_tr, &trained.model.logits(&x)?, None);
            }
        }
    }
    Ok(())
}
