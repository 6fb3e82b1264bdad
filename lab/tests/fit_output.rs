//! The files of `elra fit` (`lab/src/fit_output.rs`): `loss.csv` and `loss.svg` from the
//! library's `fit` report. That two runs with the same seed give the same curves is the library
//! test `training_fit_is_reproducible_and_learns`; here, the same report written twice gives
//! byte-identical files, the CSV has one row per method and step, the SVG is a complete
//! document, and nothing else is left in the directory (no temporaries).

use elra::train::fit::{fit, FitMethod, FitOptions};
use elra_lab::fit_output::{loss_csv, write_fit_outputs};

#[test]
fn fit_outputs_are_reproducible_and_complete() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fit_outputs");
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
