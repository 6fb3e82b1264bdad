//! Command-line parsing shared by the examples (and [`peakedness`], [`one_hot_mse`], the output
//! statistics of the TFN probes): a malformed or missing value is an
//! [`ElraError::InvalidArgument`] naming the flag or position, never a panic (each example uses
//! a subset of these).

use elra::{ElraError, Result};
use std::fmt::Display;
use std::str::FromStr;

/// `s` parsed as a `T`; the error names `what` and quotes `s`.
pub fn parse<T: FromStr>(what: &'static str, s: &str) -> Result<T>
where
    T::Err: Display,
{
    s.trim()
        .parse()
        .map_err(|e| ElraError::invalid(what, format!("{s:?}: {e}")))
}

/// A comma-separated list (`1,2,4`), every element parsed as a `T`.
pub fn parse_list<T: FromStr>(what: &'static str, s: &str) -> Result<Vec<T>>
where
    T::Err: Display,
{
    s.split(',').map(|x| parse(what, x)).collect()
}

/// Positional argument `i` of `args` parsed as a `T`, or `default` when there are fewer.
pub fn positional<T: FromStr>(
    args: &[String],
    i: usize,
    what: &'static str,
    default: T,
) -> Result<T>
where
    T::Err: Display,
{
    args.get(i).map_or(Ok(default), |s| parse(what, s))
}

/// The value after the flag at `args[*i]`, advancing `*i` to it; an error when the flag is last.
pub fn flag_value<'a>(args: &'a [String], i: &mut usize, flag: &'static str) -> Result<&'a str> {
    *i += 1;
    args.get(*i)
        .map(String::as_str)
        .ok_or_else(|| ElraError::invalid(flag, "needs a value"))
}

/// The value after the flag at `args[*i]` parsed as a `T` (see [`flag_value`]).
pub fn flag<T: FromStr>(args: &[String], i: &mut usize, name: &'static str) -> Result<T>
where
    T::Err: Display,
{
    parse(name, flag_value(args, i, name)?)
}

/// The value after the flag at `args[*i]` parsed as a comma-separated list (see [`flag_value`]).
pub fn flag_list<T: FromStr>(args: &[String], i: &mut usize, name: &'static str) -> Result<Vec<T>>
where
    T::Err: Display,
{
    parse_list(name, flag_value(args, i, name)?)
}

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
