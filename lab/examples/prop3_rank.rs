//! Prop. 3 of the ELRA paper (rank(exp(G) W0) = rank(W0)) in the App. G.1 linear setting:
//! `cargo run --release --example prop3_rank -- [D] [ITERATIONS] [LR] [SEED]`
//! (defaults 16, 5000, 1e-2, 0). Prints one table per case (EXPERIMENTS.md); the output of
//! `16 3000 1e-2 0` is committed as `figures/prop3_rank.txt`.

use elra_lab::prop3::{prop3_rank_table, RankCase};

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
        println!("{}", prop3_rank_table(case, d, &ranks, it, lr, seed)?);
    }
    Ok(())
}
