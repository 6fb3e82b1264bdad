//! What the lab's examples share: the argument parsers of the library's examples
//! (`examples/common/mod.rs`, re-exported) and [`peakedness`], [`one_hot_mse`], the output
//! statistics of the TFN probes (`tfn_floor`, `seed_spread`; `tests/expressivity_elra.rs`
//! includes this file to check their committed lines).

#[path = "../../../examples/common/mod.rs"]
mod args;
pub use args::*;

/// Per-entry MSE of the output that is one-hot in `class` for every row against `y` (the TFN
/// collapse floor when `class` is the target's most frequent one, EXPERIMENTS.md).
pub fn one_hot_mse(y: &nalgebra::DMatrix<f64>, class: usize) -> elra::Result<f64> {
    let one_hot =
        nalgebra::DMatrix::from_fn(
            y.nrows(),
            y.ncols(),
            |_, c| {
                if c == class {
                    1.0
                } else {
                    0.0
                }
            },
        );
    elra::expressivity::network::mse(&one_hot, y)
}

/// Peakedness of probability rows: (mean largest probability, share of rows above 0.99,
/// share of the most frequent argmax class, that class).
pub fn peakedness(y: &nalgebra::DMatrix<f64>) -> (f64, f64, f64, usize) {
    let mut counts = vec![0usize; y.ncols()];
    let (mut sum_max, mut above) = (0.0, 0usize);
    for row in y.row_iter() {
        let (arg, m) =
            row.iter().enumerate().fold(
                (0, f64::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            );
        counts[arg] += 1;
        sum_max += m;
        above += usize::from(m > 0.99);
    }
    let rows = y.nrows() as f64;
    let (class, top) = counts
        .iter()
        .enumerate()
        .fold((0, 0), |b, (i, &c)| if c > b.1 { (i, c) } else { b });
    (
        sum_max / rows,
        above as f64 / rows,
        top as f64 / rows,
        class,
    )
}
