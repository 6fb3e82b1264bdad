//! The `elra` command line as a user runs it: the built binary (`CARGO_BIN_EXE_elra`) on good
//! and bad arguments. Bad arguments must end in exit status 2 and one `elra: …` line on stderr —
//! never a panic; good ones in status 0 and the files the README promises.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn elra(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_elra"))
        .args(args)
        .output()
        .expect("the elra binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("elra-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Exit status 2, the message on stderr prefixed `elra: `, containing `needle`, and no panic.
fn assert_usage_error(args: &[&str], needle: &str) {
    let out = elra(args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: stderr {err:?}");
    assert!(err.starts_with("elra: "), "{args:?}: stderr {err:?}");
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    assert!(!err.contains("panicked"), "{args:?}: {err:?}");
}

#[test]
fn cli_help_prints_the_usage_of_every_subcommand() {
    let asks: &[&[&str]] = &[
        &["help"],
        &["-h"],
        &["--help"],
        &["fit", "--help"],
        &["verify", "--seed", "1", "--help"],
        &["expressivity", "merge", "--help"],
    ];
    for flag in asks {
        let out = elra(flag);
        assert!(out.status.success(), "{flag:?}: {}", text(&out.stderr));
        let usage = text(&out.stdout);
        for sub in [
            "elra [fit]",
            "elra verify",
            "elra expressivity",
            "merge CSV",
        ] {
            assert!(usage.contains(sub), "{flag:?}: usage lacks {sub:?}");
        }
    }
}

#[test]
fn cli_bad_arguments_are_errors_with_status_2_not_panics() {
    let cases: &[(&[&str], &str)] = &[
        (&["frobnicate"], "unknown subcommand \"frobnicate\""),
        (&["fit", "--bogus", "1"], "unknown flag --bogus"),
        (&["--bogus", "1"], "unknown flag --bogus"),
        (&["fit", "--steps"], "flag --steps needs a value"),
        (
            &["fit", "--steps", "many"],
            "--steps: cannot parse \"many\"",
        ),
        (&["fit", "--width=-3"], "--width: cannot parse \"-3\""),
        (&["fit", "extra"], "fit takes no positional argument"),
        (&["fit", "--methods", "lora,nope"], "nope"),
        (&["verify", "--cases", "0"], "--cases must be at least 1"),
        (
            &["verify", "--max-dim", "1"],
            "--max-dim must be at least 2",
        ),
        (&["verify", "extra"], "verify takes no positional argument"),
        (&["verify", "--quick"], "flag --quick needs a value"),
        (&["expressivity"], "expressivity needs one of"),
        (&["expressivity", "linear", "fnn"], "one setting group"),
        (&["expressivity", "nonsense", "--quick"], "nonsense"),
        (
            &["expressivity", "linear", "--ranks", "1,x"],
            "--ranks: \"x\" is not a rank",
        ),
        (
            &["expressivity", "linear", "--ranks", "0", "--quick"],
            "rank",
        ),
        (
            &["expressivity", "linear", "--ranks", "2,2", "--quick"],
            "distinct ranks",
        ),
        (
            &["expressivity", "linear", "--iterations", "0"],
            "iterations",
        ),
        (
            &["expressivity", "linear", "--seed", "-1"],
            "--seed: cannot parse",
        ),
        (
            &["expressivity", "merge", "--quick"],
            "merge takes no --quick",
        ),
        (
            &["expressivity", "merge", "--seed", "1"],
            "unknown flag --seed",
        ),
        (
            &["expressivity", "merge", "/nonexistent/elra.csv"],
            "elra.csv",
        ),
    ];
    for (args, needle) in cases {
        assert_usage_error(args, needle);
    }
}

fn assert_csv_and_svg(dir: &Path, stem: &str) {
    let csv = std::fs::read_to_string(dir.join(format!("{stem}.csv"))).expect("csv written");
    assert!(csv.lines().count() > 1, "{}: header only", dir.display());
    let svg = std::fs::read_to_string(dir.join(format!("{stem}.svg"))).expect("svg written");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{}: svg incomplete",
        dir.display()
    );
}

/// `elra verify` on a small budget passes every claim and prints the table's last line.
#[test]
fn cli_verify_passes_on_a_small_budget() {
    let out = elra(&["verify", "--cases", "3", "--max-dim", "6", "--seed", "7"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("all claims pass"), "{stdout}");
}

/// `elra fit` writes `loss.csv` and `loss.svg` where `--out` says, and exits 0 when every method's loss
/// dropped (the library test `training_fit_is_reproducible_and_learns` checks the numbers).
#[test]
fn cli_fit_writes_its_files() {
    let dir = scratch("fit");
    let d = dir.to_str().unwrap();
    let out = elra(&[
        "fit",
        "--steps",
        "200",
        "--seed",
        "3",
        "--width",
        "16",
        "--depth",
        "2",
        "--methods",
        "lora,elra",
        "--no-progress",
        "--out",
        d,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_csv_and_svg(&dir, "loss");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `--quick` rank shard writes `<out>/<setting>/mse_vs_rank.{csv,svg}`, and `merge` of that
/// CSV reproduces it byte for byte (a one-shard merge is the identity).
#[test]
fn cli_expressivity_shard_then_merge_round_trips() {
    let dir = scratch("expr");
    let merged = scratch("merged");
    let out = elra(&[
        "expressivity",
        "linear",
        "--quick",
        "--ranks",
        "8,1",
        "--threads",
        "1",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let csv = dir.join("linear_L2_random/mse_vs_rank.csv");
    assert_csv_and_svg(&dir.join("linear_L2_random"), "mse_vs_rank");
    assert_csv_and_svg(&dir.join("linear_L2_pretrained"), "mse_vs_rank");
    let summary = text(&out.stdout);
    assert!(summary.contains("linear_L2_random"), "{summary}");
    let out = elra(&[
        "expressivity",
        "merge",
        csv.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again = merged.join("linear_L2_random/mse_vs_rank.csv");
    assert_eq!(
        std::fs::read(&csv).unwrap(),
        std::fs::read(&again).unwrap(),
        "a one-shard merge must reproduce its CSV"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&merged);
}
