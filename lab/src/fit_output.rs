//! The files of `elra fit`: `loss.csv` (`method,step,train_loss,speed,grad_norm,lr`, one row per
//! step; no timings, so the bytes depend on the seed only) and `loss.svg` (the training-loss
//! curves, [`crate::plot::loss_curves_svg`]), written into the output directory as one set
//! ([`crate::output::write_set`]: both files or neither). The training itself is the library's
//! [`elra::train::fit`].

use crate::output::{check_set, write_set};
use crate::plot::loss_curves_svg;
use elra::train::fit::{Curve, FitReport};
use elra::Result;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The text of `loss.csv`: a header, then one row per method and step (floats in `{:e}`
/// notation, the speed empty where it is not defined).
pub fn loss_csv(curves: &[Curve]) -> String {
    let mut s = String::from("method,step,train_loss,speed,grad_norm,lr\n");
    for c in curves {
        for t in 0..c.loss.len() {
            let speed = c.speed[t].map(|v| format!("{v:e}")).unwrap_or_default();
            let _ = writeln!(
                s,
                "{},{},{:e},{},{:e},{:e}",
                c.method.name(),
                t,
                c.loss[t],
                speed,
                c.grad_norm[t],
                c.lr[t]
            );
        }
    }
    s
}

/// The files [`write_fit_outputs`] writes into its directory.
pub const FIT_FILES: [&str; 2] = ["loss.csv", "loss.svg"];

/// Checks, writing nothing, that [`write_fit_outputs`] can write into `dir`
/// ([`crate::output::check_set`]); `elra fit` calls it before training.
///
/// Errors: [`elra::ElraError::Io`] naming the path in the way.
pub fn check_fit_outputs(dir: &Path) -> Result<()> {
    check_set(dir, &FIT_FILES)
}

/// Writes `loss.csv` and `loss.svg` of `report` into `dir` (created if missing) as one set and
/// returns their paths.
///
/// Errors: drawing failures ([`elra::ElraError::Format`]); [`elra::ElraError::Io`] when the
/// files cannot be written — then neither file was changed and no temporary is left.
pub fn write_fit_outputs(dir: &Path, report: &FitReport) -> Result<(PathBuf, PathBuf)> {
    let csv = loss_csv(&report.curves);
    let svg = loss_curves_svg(&report.curves)?;
    let mut paths = write_set(
        dir,
        &[
            (FIT_FILES[0], csv.as_bytes()),
            (FIT_FILES[1], svg.as_bytes()),
        ],
    )?;
    let svg_path = paths.pop().unwrap_or_default();
    let csv_path = paths.pop().unwrap_or_default();
    Ok((csv_path, svg_path))
}
