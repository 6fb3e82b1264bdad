//! The files of `elra fit`: `loss.csv` (`method,step,train_loss,speed,grad_norm,lr`, one row per
//! step; no timings, so the bytes depend on the seed only) and `loss.svg` (the training-loss
//! curves, [`crate::plot::loss_curves_svg`]), written into the output directory as one set
//! ([`elra::io::write_files_in`]: both files or neither). The training itself is the library's
//! [`elra::train::fit`].

use crate::plot::loss_curves_svg;
use elra::io::{check_files as check_set, write_files_in as write_set};
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
/// ([`elra::io::check_files`]); `elra fit` calls it before training.
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

#[cfg(test)]
mod tests {
    use super::*;
    use elra::train::fit::{fit, FitMethod, FitOptions};

    /// `loss.csv` and `loss.svg` from the library's `fit` report. That two runs with the same
    /// seed give the same curves is the library test `training_fit_is_reproducible_and_learns`;
    /// here, the same report written twice gives byte-identical files, the CSV has one row per
    /// method and step, the SVG is a complete document, and nothing else is left in the
    /// directory (no temporaries).
    #[test]
    fn fit_outputs_are_reproducible_and_complete() {
        let dir = std::env::temp_dir().join(format!("elra-lab-fit-outputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = FitOptions {
            steps: 200,
            seed: 3,
            width: 16,
            depth: 2,
            batch: 32,
            methods: vec![
                FitMethod::Lora,
                FitMethod::Elra,
                FitMethod::ElraPsd,
                FitMethod::ElraHyb,
                FitMethod::ElraHybGa,
                FitMethod::ElraDouble,
            ],
            ga_steps: 10,
            ..FitOptions::default()
        };
        let report = fit(&opts).unwrap();
        let (csv_a, svg_a) = write_fit_outputs(&dir.join("a"), &report).unwrap();
        let (csv_b, svg_b) = write_fit_outputs(&dir.join("b"), &report).unwrap();
        assert_eq!(csv_a, dir.join("a/loss.csv"));
        assert_eq!(svg_a, dir.join("a/loss.svg"));
        let c1 = std::fs::read(&csv_a).unwrap();
        assert!(!c1.is_empty());
        assert_eq!(c1, std::fs::read(&csv_b).unwrap());
        assert_eq!(
            std::fs::read(&svg_a).unwrap(),
            std::fs::read(&svg_b).unwrap()
        );
        let text = String::from_utf8(c1).unwrap();
        assert_eq!(text, loss_csv(&report.curves));
        assert_eq!(text.lines().count(), 1 + 6 * 200);
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("elra-double,"))
                .count(),
            200
        );
        let svg = std::fs::read_to_string(&svg_a).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(dir.join("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
