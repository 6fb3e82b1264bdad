//! Prop. 3 of the ELRA paper (rank(exp(G) W0) = rank(W0)) in the App. G.1 linear setting:
//! `cargo run --release --example prop3_rank -- [D] [ITERATIONS] [LR] [SEED]`
//! (defaults 16, 5000, 1e-2, 0). Prints one table per case (EXPERIMENTS.md).

use elra::expressivity::elra::{prop3_rank_experiment, RankCase};

#[allow(dead_code)] // each example uses a subset of the shared parsers
mod common;
use common::positional;

fn main() -> elra::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let d: usize = positional(&a, 0, "D", 16)?;
    let it: usize = positional(&a, 1, "ITERATIONS", 5000)?;
    let lr: f64 = positional(&a, 2, "LR", 1e-2)?;
    let seed: u64 = positional(&a, 3, "SEED", 0)?;
    let ranks: Vec<usize> = (1..=d).collect();
    for case in [RankCase::DeficientFrozen, RankCase::DeficientTarget] {
        let (frozen, floor, rows) = prop3_rank_experiment(case, d, &ranks, it, lr, seed)?;
        println!("## {case:?}: D = {d}, {it} Adam steps, lr {lr:e}, seed {seed}");
        println!("frozen population MSE {frozen:.4e}; ELRA floor ‖T V0‖²_F/D = {floor:?}");
        println!("| R | LoRA optimum (Lemma 9 error) | LoRA trained | ELRA trained | ELRA-Hyb trained | rank(ELRA product) | σ_min(ELRA product) | ‖G‖₂ ≥ |");
        println!("|---|---|---|---|---|---|---|---|");
        for r in rows {
            println!(
                "| {} | {:.3e} | {:.3e} | {:.3e} | {:.3e} | {} | {:.3e} | {:.2} |",
                r.rank,
                r.lora_optimum,
                r.lora_trained,
                r.elra_trained,
                r.elra_hyb_trained,
                r.elra_product_rank,
                r.elra_sigma_min,
                r.elra_generator_norm
            );
        }
        println!();
    }
    Ok(())
}
