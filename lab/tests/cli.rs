//! The `elra` command line as a user runs it: the built binary (`CARGO_BIN_EXE_elra`) on good
//! and bad arguments. Bad arguments must end in exit status 2 and one `elra: …` line on stderr —
//! never a panic, an abort or a run without end; good ones in status 0 and the files the README
//! promises. Every call runs the binary as a child process with a time limit, so an input that
//! aborts or hangs fails the test instead of the test process.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs the binary with `args`; kills it and fails after 120 s.
fn elra(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_elra"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the elra binary starts");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for elra") {
            break st;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("elra {args:?} ran for more than 120 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
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

/// [`assert_usage_error`] with a message of exactly one line and nothing on stdout (the work
/// did not start).
fn assert_one_line_error(args: &[&str], needle: &str) {
    assert_usage_error(args, needle);
    let out = elra(args);
    let err = text(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err:?}");
    assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
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
            "elra merge --base",
            "elra unmerge --base",
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
        (&["verify", "--quick"], "unknown flag --quick"),
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

/// Issue 28 (4, 6): every numeric flag has a range, printed by `elra help`; values outside it —
/// the largest u64, values that overflowed allocations or ran for minutes before — and values
/// beyond u64, repeated flags, repeated methods or ranks, an unknown flag given last, a switch
/// given a value, a value flag followed by another flag: one line, status 2, before any work.
#[test]
fn cli_numeric_flags_are_bounded_and_flags_are_checked() {
    let max = u64::MAX.to_string();
    let over = "18446744073709551616";
    let cases: &[(&[&str], &str)] = &[
        (&["--steps", &max], "--steps must be at most 100000"),
        (
            &["fit", "--steps", "1000000000000"],
            "--steps must be at most 100000",
        ),
        (&["fit", "--steps", over], "--steps: cannot parse"),
        (&["fit", "--steps", "0"], "--steps must be at least 1"),
        (
            &["fit", "--width", "100000"],
            "--width must be at most 1024",
        ),
        (&["fit", "--width", "0"], "--width must be at least 1"),
        (&["fit", "--width", "4"], "width"),
        (&["fit", "--depth", "100000"], "--depth must be at most 16"),
        (&["fit", "--depth", "0"], "--depth must be at least 1"),
        (&["fit", "--seed", over], "--seed: cannot parse"),
        (
            &["verify", "--max-dim", "100000"],
            "--max-dim must be at most 256",
        ),
        (&["verify", "--cases", &max], "--cases must be at most 1000"),
        (&["verify", "--seed", "-1"], "--seed: cannot parse"),
        (
            &["expressivity", "linear", "--iterations", "1000001"],
            "--iterations must be at most 1000000",
        ),
        (
            &["expressivity", "linear", "--threads", "100000"],
            "--threads must be at most 256",
        ),
        (
            &["expressivity", "linear", "--ranks", "17"],
            "--ranks must be at most 16",
        ),
        (
            &["expressivity", "linear", "--ranks", &max],
            "--ranks must be at most 16",
        ),
        (
            &["expressivity", "linear", "--ranks", "3,1,3"],
            "3 given twice",
        ),
        (&["fit", "--methods", "lora,elra,lora"], "lora given twice"),
        (
            &["fit", "--methods", "psd,elra-psd"],
            "elra-psd given twice",
        ),
        (&["fit", "--methods", ""], "--methods"),
        (
            &["fit", "--steps", "5", "--steps", "6"],
            "flag --steps given twice",
        ),
        (
            &["fit", "--seed=1", "--seed", "1"],
            "flag --seed given twice",
        ),
        (
            &["fit", "--no-progress", "--no-progress"],
            "flag --no-progress given twice",
        ),
        (
            &["fit", "--no-progress=yes"],
            "flag --no-progress takes no value",
        ),
        (&["fit", "--steps", "5", "--bogus"], "unknown flag --bogus"),
        (&["verify", "--frobnicate"], "unknown flag --frobnicate"),
        (
            &["expressivity", "linear", "--quick", "--quick"],
            "flag --quick given twice",
        ),
        (
            &["expressivity", "linear", "--bogus"],
            "unknown flag --bogus",
        ),
        (
            &["expressivity", "merge", "--ranks", "1"],
            "unknown flag --ranks",
        ),
        (
            &["fit", "--out", "--steps", "3"],
            "flag --out needs a value",
        ),
        (&["fit", "--out="], "--out: needs a path"),
    ];
    for (args, needle) in cases {
        assert_one_line_error(args, needle);
    }
    let help = text(&elra(&["help"]).stdout);
    for range in [
        "1 … 100000",
        "1 … 1024",
        "1 … 16",
        "1 … 1000",
        "2 … 256",
        "1 … 1000000",
        "0 … 256",
        "0 … 18446744073709551615",
    ] {
        assert!(help.contains(range), "help lacks the range {range}");
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Issue 28 (5): a directory where `elra fit` writes `loss.csv` or `loss.svg`, or an `--out`
/// that is a file, ends with status 2 and one line before the training, leaves no temporary,
/// and the other file keeps its old content; the same for a setting directory of `elra
/// expressivity` (its `mse_vs_rank.csv` + `.svg` are a set too). (That a rename failing at any
/// point of the set restores the old files is the unit test of `lab/src/output.rs`.)
#[test]
fn cli_outputs_in_the_way_change_nothing() {
    for blocked in ["loss.csv", "loss.svg"] {
        let dir = scratch(&format!("blocked-{blocked}"));
        std::fs::create_dir_all(dir.join(blocked)).unwrap();
        let other = if blocked == "loss.csv" {
            "loss.svg"
        } else {
            "loss.csv"
        };
        std::fs::write(dir.join(other), "old").unwrap();
        let d = dir.to_str().unwrap();
        assert_one_line_error(
            &["fit", "--steps", "5", "--no-progress", "--out", d],
            blocked,
        );
        assert_eq!(names_in(&dir), {
            let mut v = vec![blocked.to_string(), other.to_string()];
            v.sort();
            v
        });
        assert_eq!(std::fs::read(dir.join(other)).unwrap(), b"old");
        let _ = std::fs::remove_dir_all(&dir);
    }
    let file = scratch("out-is-a-file");
    std::fs::write(&file, "x").unwrap();
    let f = file.to_str().unwrap();
    assert_one_line_error(&["fit", "--steps", "5", "--out", f], f);
    let sub = format!("{f}/sub");
    assert_one_line_error(&["fit", "--steps", "5", "--out", &sub], f);
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    let _ = std::fs::remove_file(&file);
    let dir = scratch("expr-blocked");
    let setting = dir.join("linear_L2_pretrained");
    std::fs::create_dir_all(setting.join("mse_vs_rank.svg")).unwrap();
    std::fs::write(setting.join("mse_vs_rank.csv"), "old").unwrap();
    let d = dir.to_str().unwrap();
    for args in [
        &[
            "expressivity",
            "linear",
            "--quick",
            "--ranks",
            "1",
            "--out",
            d,
        ][..],
        &[
            "expressivity",
            "merge",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/figures/linear_L2_pretrained.csv"
            ),
            "--out",
            d,
        ][..],
    ] {
        assert_one_line_error(args, "mse_vs_rank.svg");
        assert_eq!(names_in(&dir), ["linear_L2_pretrained"], "{args:?}");
        assert_eq!(names_in(&setting), ["mse_vs_rank.csv", "mse_vs_rank.svg"]);
        assert_eq!(
            std::fs::read(setting.join("mse_vs_rank.csv")).unwrap(),
            b"old"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
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

#[test]
fn cli_merge_and_unmerge_a_checkpoint() {
    use elra::adapter::{ElraConfig, ElraLayer, Variant};
    use elra::io::{load_merged, save_merged, AdapterFile, LoadLimits};
    use nalgebra::DMatrix;

    let root = scratch("merge");
    let (base, adapter) = (root.join("base"), root.join("adapter"));
    std::fs::create_dir_all(&base).unwrap();
    let w0 = |d: usize, k: usize| {
        DMatrix::<f32>::from_fn(d, k, |i, j| ((i * 5 + j * 3) % 7) as f32 / 7.0 - 0.5)
    };
    let (wq, wv, other) = (w0(12, 8), w0(10, 8), w0(3, 3));
    save_merged(
        base.join("model.safetensors"),
        &[("blk.q", &wq), ("blk.v", &wv), ("head", &other)],
    )
    .unwrap();
    let layer = |w: &DMatrix<f32>| {
        let mut c = ElraConfig::new(Variant::General, w.nrows(), w.ncols(), 2, 100);
        c.generator.eta = 0.5;
        ElraLayer::new(c, w.clone()).unwrap()
    };
    let (lq, lv) = (layer(&wq), layer(&wv));
    AdapterFile::from_elra_layers(&[("blk.q", &lq), ("blk.v", &lv)])
        .unwrap()
        .save(&adapter)
        .unwrap();
    let (b, a) = (base.to_str().unwrap(), adapter.to_str().unwrap());
    let merged = root.join("merged");
    let out = elra(&[
        "merge",
        "--base",
        b,
        "--adapter",
        a,
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("merged 2 of 3 tensors") && said.contains("peak resident memory"),
        "{said}"
    );
    let got = load_merged::<f32>(merged.join("model.safetensors"), &LoadLimits::default()).unwrap();
    for (name, l) in [("blk.q", &lq), ("blk.v", &lv)] {
        let want = l.merge().unwrap();
        assert!((&got[name] - &want).amax() <= 1e-6 * want.amax(), "{name}");
    }
    assert_eq!(got["head"], other);
    let back = root.join("back");
    let out = elra(&[
        "unmerge",
        "--base",
        merged.to_str().unwrap(),
        "--adapter",
        a,
        "--out",
        back.to_str().unwrap(),
        "--no-progress",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = load_merged::<f32>(back.join("model.safetensors"), &LoadLimits::default()).unwrap();
    assert!((&got["blk.q"] - &wq).amax() <= 1e-6);
    // The output in the way (status 2, before any work); a missing flag; a checkpoint without
    // the adapter's modules (status 1, one line naming them; no output).
    let m = merged.to_str().unwrap();
    assert_one_line_error(
        &["merge", "--base", b, "--adapter", a, "--out", m],
        "exists",
    );
    assert_one_line_error(&["unmerge", "--base", b, "--out", m], "--adapter");
    let lone = root.join("lone");
    std::fs::create_dir_all(&lone).unwrap();
    save_merged(lone.join("model.safetensors"), &[("head", &other)]).unwrap();
    let none = root.join("none");
    let out = elra(&[
        "merge",
        "--base",
        lone.to_str().unwrap(),
        "--adapter",
        a,
        "--out",
        none.to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("elra: merge: ") && err.contains("blk.q") && err.contains("blk.v"),
        "{err}"
    );
    assert!(!none.exists());
    let _ = std::fs::remove_dir_all(&root);
}
