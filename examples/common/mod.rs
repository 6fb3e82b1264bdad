//! Command-line parsing shared by the examples (`examples/gpu_layer_step.rs` here, and the lab's
//! examples through `lab/examples/common/mod.rs`): a malformed or missing value is an
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
