//! The App. G runner behind `elra expressivity <linear|fnn|tfn|all>`: for each setting of the
//! group and every rank `R = 1..=D`, the construction's test MSE, LoRA, ELRA, ELRA-PSD and
//! ELRA-Hyb trained with the App. G protocol ([`super::experiment`]), written as
//! `<out>/<setting>/mse_vs_rank.csv` and `<out>/<setting>/mse_vs_rank.svg` (one set of files:
//! both or neither, [`elra::io::write_files_in`]), with a summary of the smallest rank that reaches
//! `MSE < 1e-8` per method.
#![allow(non_snake_case)]

use crate::adapter::{AdapterFamily, Lora, LoraFamily, WeightAdapter};
use crate::elra_adapter::{csv_name, Elra, ElraFamily};
use crate::experiment::{
    app_g_settings, run_setting_families, to_csv, Architecture, Opts, Row, Setting,
};
use crate::plot::mse_vs_rank_svg;
use elra::adapter::Variant;
use elra::io::{check_files as check_set, write_files_in as write_set};
use elra::{ElraError, Result};
use nalgebra::DMatrix;
use rand_chacha::ChaCha8Rng;
use std::fmt;
use std::path::{Path, PathBuf};

/// A trained method of the comparison: LoRA or one of the ELRA variants, at matched trainable
/// parameters (see [`crate::elra_adapter::matched_rank`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// LoRA, `W0 + B A` (Hu et al.; App. G).
    Lora,
    /// ELRA, `exp(G) W0` (ELRA paper eq. 1 / eq. 19).
    Elra(Variant),
}

impl Method {
    /// LoRA, ELRA, ELRA-PSD, ELRA-Hyb — the methods of the runner, in CSV order.
    pub fn all() -> [Method; 4] {
        [
            Method::Lora,
            Method::Elra(Variant::General),
            Method::Elra(Variant::Psd),
            Method::Elra(Variant::Hyb),
        ]
    }

    /// `"lora"`, `"elra"`, `"elra_psd"`, `"elra_hyb"`.
    pub fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Elra(v) => csv_name(v),
        }
    }
}

/// An adapter of any [`Method`].
#[derive(Debug, Clone, PartialEq)]
pub enum AnyAdapter {
    /// A LoRA adapter.
    Lora(Lora),
    /// An ELRA adapter.
    Elra(Elra),
}

impl WeightAdapter for AnyAdapter {
    fn rank(&self) -> usize {
        match self {
            AnyAdapter::Lora(a) => a.rank(),
            AnyAdapter::Elra(a) => a.rank(),
        }
    }
    /// LoRA: Hu et al. eq. (3); ELRA: Prop. 1 (Woodbury form of eq. 1).
    fn effective_weight(&self, W0: &DMatrix<f64>) -> Result<DMatrix<f64>> {
        match self {
            AnyAdapter::Lora(a) => a.effective_weight(W0),
            AnyAdapter::Elra(a) => a.effective_weight(W0),
        }
    }
    fn pullback(&self, W0: &DMatrix<f64>, d_weff: &DMatrix<f64>) -> Result<Vec<DMatrix<f64>>> {
        match self {
            AnyAdapter::Lora(a) => a.pullback(W0, d_weff),
            AnyAdapter::Elra(a) => a.pullback(W0, d_weff),
        }
    }
    fn params(&self) -> Vec<&DMatrix<f64>> {
        match self {
            AnyAdapter::Lora(a) => a.params(),
            AnyAdapter::Elra(a) => a.params(),
        }
    }
    fn params_mut(&mut self) -> Vec<&mut DMatrix<f64>> {
        match self {
            AnyAdapter::Lora(a) => a.params_mut(),
            AnyAdapter::Elra(a) => a.params_mut(),
        }
    }
    fn set_step(&mut self, step: usize, total: usize) {
        if let AnyAdapter::Elra(a) = self {
            a.set_step(step, total);
        }
    }
}

impl AdapterFamily for Method {
    type Adapter = AnyAdapter;

    fn name(&self) -> String {
        Method::name(*self).to_string()
    }

    /// LoRA: [`LoraFamily`] defaults; ELRA: [`ElraFamily::new`] (η0 = 1, parameter-matched rank).
    fn init(&self, W0: &DMatrix<f64>, rank: usize, rng: &mut ChaCha8Rng) -> Result<AnyAdapter> {
        Ok(match self {
            Method::Lora => AnyAdapter::Lora(LoraFamily { init_std: None }.init(W0, rank, rng)?),
            Method::Elra(v) => AnyAdapter::Elra(ElraFamily::new(*v).init(W0, rank, rng)?),
        })
    }
}

/// Options of [`run_cli`] (the `elra expressivity` command line).
#[derive(Debug, Clone, PartialEq)]
pub struct CliOpts {
    /// Reduced protocol for smoke tests ([`Opts::quick`]: 20 iterations, one grid point, small
    /// sample sets).
    pub quick: bool,
    /// Master seed.
    pub seed: u64,
    /// Output directory (one sub-directory per setting).
    pub out: PathBuf,
    /// Worker threads (0: all available cores).
    pub threads: usize,
    /// Adam iterations per configuration instead of App. G's 5000 (in quick mode, at most 20).
    pub iterations: Option<usize>,
    /// Only these ranks (`None`: `1..=D`) — a shard of the run; [`merge_csvs`] joins shards.
    pub ranks: Option<Vec<usize>>,
}

/// The settings of a group: `linear`, `fnn`, `tfn` or `all` (App. G.1, G.2, G.3), each with a
/// random and a pretrained frozen model.
///
/// Errors: an unknown group name.
pub fn settings_of_group(group: &str) -> Result<Vec<Setting>> {
    let all = app_g_settings();
    let keep = |s: &Setting| match group {
        "all" => true,
        "linear" => matches!(s.arch, Architecture::Linear { .. }),
        "fnn" => matches!(s.arch, Architecture::Fnn { .. }),
        "tfn" => matches!(s.arch, Architecture::Tfn { .. }),
        _ => false,
    };
    if !matches!(group, "all" | "linear" | "fnn" | "tfn") {
        return Err(ElraError::invalid(
            "setting",
            format!("expected linear, fnn, tfn or all, got {group:?}"),
        ));
    }
    Ok(all.into_iter().filter(keep).collect())
}

/// The rank from which the paper's theorem guarantees exact representation: `⌈D/M⌉` with
/// `M = ⌊L/L̄⌋` for linear models (Lemma 9 / Corollary 4, `L̄ = 1`) and FNNs (Theorem 3 /
/// Corollary 4), `⌈D/2⌉` for TFNs (Corollary 20).
pub fn threshold_rank(setting: &Setting) -> usize {
    let d = setting.dim;
    let m = match setting.arch {
        Architecture::Linear { frozen_layers } => frozen_layers.max(1),
        Architecture::Fnn {
            target_layers,
            frozen_layers,
        } => (frozen_layers / target_layers.max(1)).max(1),
        Architecture::Tfn { .. } => 2,
    };
    d.div_ceil(m)
}

/// `<name>_<random|pretrained>`: the directory name of a setting.
pub fn setting_id(setting: &Setting) -> String {
    id_of(&setting.name, setting.frozen.name())
}

/// The one spelling of a setting id, shared by [`setting_id`] and the CSV rows read back by
/// [`merge_csvs`] (which store the name and the frozen initialisation in separate columns).
fn id_of(name: &str, frozen_init: &str) -> String {
    format!("{name}_{frozen_init}")
}

/// The MSE threshold of the summary ("exact up to optimisation/rounding").
pub const EXACT_MSE: f64 = 1e-8;

/// One line of [`Summary`]: a setting and, per method, the smallest rank with `MSE < 1e-8`.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryLine {
    /// [`setting_id`].
    pub setting: String,
    /// [`threshold_rank`].
    pub threshold: usize,
    /// `(method, smallest rank with MSE < EXACT_MSE)` among [`SummaryLine::ranks`]; the
    /// construction is listed first.
    pub first_exact: Vec<(String, Option<usize>)>,
    /// The ranks the rows cover, ascending (all of `1..=D` for a whole run; a shard or a merge
    /// of shards may leave gaps, and "smallest rank" is then among these).
    pub ranks: Vec<usize>,
    /// Where the CSV was written.
    pub csv: PathBuf,
}

/// What [`run_cli`] returns: one [`SummaryLine`] per setting, and all rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Per-setting summary.
    pub lines: Vec<SummaryLine>,
    /// Every result row of every setting.
    pub rows: Vec<Row>,
}

impl fmt::Display for Summary {
    /// A table: setting, the theorem's threshold rank, then the smallest rank with
    /// `MSE < 1e-8` per method (`-` when no rank reaches it), then the ranks run (as ranges,
    /// e.g. `1-3,5,8-16`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let methods: Vec<String> = self
            .lines
            .first()
            .map(|l| l.first_exact.iter().map(|(m, _)| m.clone()).collect())
            .unwrap_or_default();
        writeln!(f, "smallest rank R with test MSE < {EXACT_MSE:e}")?;
        write!(f, "{:<26} {:>9}", "setting", "threshold")?;
        for m in &methods {
            write!(f, " {m:>12}")?;
        }
        writeln!(f, "  ranks run")?;
        for l in &self.lines {
            write!(f, "{:<26} {:>9}", l.setting, l.threshold)?;
            for (_, r) in &l.first_exact {
                match r {
                    Some(r) => write!(f, " {r:>12}")?,
                    None => write!(f, " {:>12}", "-")?,
                }
            }
            writeln!(f, "  {}", rank_ranges(&l.ranks))?;
        }
        Ok(())
    }
}

/// Ascending ranks as ranges: `[1, 2, 3, 5, 8, 9]` → `"1-3,5,8-9"`.
fn rank_ranges(ranks: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ranks.len() {
        let mut j = i;
        while j + 1 < ranks.len() && ranks[j + 1] == ranks[j] + 1 {
            j += 1;
        }
        parts.push(if j == i {
            ranks[i].to_string()
        } else {
            format!("{}-{}", ranks[i], ranks[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

fn io_err(path: &Path, e: impl fmt::Display) -> ElraError {
    ElraError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// The runner of App. G with the ELRA comparison: for each setting of `group`
/// ([`settings_of_group`]) and every rank `R = 1..=D` (or the ranks of `opts.ranks`, a shard
/// that [`merge_csvs`] can join with the others), the construction and every
/// [`Method::all`] trained with the App. G protocol (lr {1e-2, 1e-3, 1e-4} × wd {0, 1e-2, 1e-3,
/// 1e-4}, 5000 Adam steps on 256 fresh `N(0, I)` samples, best validation MSE on 256 samples,
/// test MSE on 5000), unless `opts.quick` or `opts.iterations` reduce it. Writes
/// `<out>/<setting>/mse_vs_rank.csv` and `.svg` (each pair as a set: both or neither); shows a
/// progress bar on stderr.
///
/// Errors: an unknown group; an output in the way (found before any training); I/O errors;
/// training errors other than divergence.
pub fn run_cli(setting: &str, opts: &CliOpts) -> Result<Summary> {
    let settings = settings_of_group(setting)?;
    let mut o = Opts {
        quick: opts.quick,
        seed: opts.seed,
        ..Opts::default()
    };
    if opts.threads > 0 {
        o.threads = opts.threads;
    }
    if let Some(it) = opts.iterations {
        if it == 0 {
            return Err(ElraError::invalid("iterations", "must be ≥ 1"));
        }
        o.iterations = it;
    }
    run_settings(
        &settings,
        opts.ranks.as_deref(),
        &o,
        &Method::all(),
        &opts.out,
    )
}

/// [`run_cli`] with explicit settings, ranks (`None`: `1..=D`), protocol and methods (the
/// driver uses it for reduced protocols).
///
/// Errors: as [`run_cli`]; no methods; an empty or repeated rank list, or a rank outside
/// `[1, D]`.
pub fn run_settings(
    settings: &[Setting],
    ranks: Option<&[usize]>,
    opts: &Opts,
    methods: &[Method],
    out: &Path,
) -> Result<Summary> {
    if methods.is_empty() {
        return Err(ElraError::invalid("methods", "no method to train"));
    }
    // Rows (CSV lines, plot points) come in ascending rank order whatever order was asked.
    let sorted: Option<Vec<usize>> = match ranks {
        None => None,
        Some(rs) => {
            let mut sorted = rs.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            if rs.is_empty() || sorted.len() != rs.len() {
                return Err(ElraError::invalid(
                    "ranks",
                    format!("expected distinct ranks, got {rs:?}"),
                ));
            }
            Some(sorted)
        }
    };
    let ranks = sorted.as_deref();
    // Report an output in the way before the training, not after it.
    for st in settings {
        check_set(&out.join(setting_id(st)), &SETTING_FILES)?;
    }
    let configs = if opts.quick {
        1
    } else {
        opts.lr_grid.len() * opts.wd_grid.len()
    };
    let total: usize = settings
        .iter()
        .map(|s| ranks.map_or(s.dim, |r| r.len()) * methods.len() * configs)
        .sum();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:28} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})",
        )
        .map_err(|e| ElraError::invalid("progress template", e.to_string()))?,
    );
    let mut summary = Summary {
        lines: Vec::new(),
        rows: Vec::new(),
    };
    for s in settings {
        let id = setting_id(s);
        bar.set_message(id.clone());
        let all: Vec<usize> = (1..=s.dim).collect();
        let rs = ranks.unwrap_or(&all);
        let tick = || bar.inc(1);
        let rows = run_setting_families(s, rs, opts, methods, &tick)?;
        let names: Vec<String> = methods.iter().map(|m| m.name()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        summary
            .lines
            .push(write_setting(out, &id, threshold_rank(s), &rows, &names)?);
        summary.rows.extend(rows);
    }
    bar.finish_and_clear();
    Ok(summary)
}

/// The files of one setting's directory `<out>/<setting id>/`, written as a set.
pub const SETTING_FILES: [&str; 2] = ["mse_vs_rank.csv", "mse_vs_rank.svg"];

/// Writes one setting's rows as `<out>/<id>/mse_vs_rank.csv` and `.svg` (both or neither) and
/// returns its summary line (`methods`: the adapter names, in column order).
fn write_setting(
    out: &Path,
    id: &str,
    threshold: usize,
    rows: &[Row],
    methods: &[&str],
) -> Result<SummaryLine> {
    let svg = mse_vs_rank_svg(id, rows, threshold)?;
    let csv_text = to_csv(rows);
    let csv = write_set(
        &out.join(id),
        &[
            (SETTING_FILES[0], csv_text.as_bytes()),
            (SETTING_FILES[1], svg.as_bytes()),
        ],
    )?
    .swap_remove(0);
    let mut first_exact = vec![(
        "construction".to_string(),
        first_below(rows, EXACT_MSE, |r| {
            (r.adapter == methods[0]).then_some(r.construction_mse)
        }),
    )];
    for &m in methods {
        first_exact.push((
            m.to_string(),
            first_below(rows, EXACT_MSE, |r| {
                (r.adapter == m).then_some(r.trained_mse)
            }),
        ));
    }
    let mut ranks: Vec<usize> = rows.iter().map(|r| r.rank).collect();
    ranks.sort_unstable();
    ranks.dedup();
    Ok(SummaryLine {
        setting: id.to_string(),
        threshold,
        first_exact,
        ranks,
        csv,
    })
}

/// Merges runner CSVs made rank by rank (`--ranks`) into one CSV, SVG plot and summary line per
/// setting, as one run over all those ranks would have written them. This is sound because a
/// row depends only on (seed, setting, rank): every rank draws its initialisation, samples and
/// pretraining from streams seeded by those three (test
/// `app_g_rows_do_not_depend_on_the_other_ranks`), so concatenating shards gives the rows of the
/// single run bit for bit (test `merging_rank_shards_gives_the_single_run`).
///
/// Rows are grouped by [`setting_id`] (first appearance order) and sorted by rank, methods in
/// first-appearance order. The summary's "smallest rank with MSE < 1e-8" is over the ranks
/// present. Everything is checked before anything is written.
///
/// What is checked is what the CSV records: dimension, iterations, pretraining steps, the frozen
/// model's test MSE (bit for bit — it changes with the seed, the test-sample count and the
/// code's rounding), one construction MSE per rank, every method at every rank, the same
/// methods in every setting. The learning-rate and weight-decay grids, the batch and the
/// validation-sample count are not in the CSV: shards must be run with the same options for
/// the merge to mean one run.
///
/// Errors: [`ElraError::Io`] for a file that cannot be read or written; `InvalidArgument` for no
/// files, an output CSV that is also an input, a file that is not a runner CSV
/// ([`crate::experiment::from_csv`]), an unknown setting, shards that disagree on any of the
/// recorded items above, or a (rank, method) present twice.
pub fn merge_csvs(paths: &[PathBuf], out: &Path) -> Result<Summary> {
    if paths.is_empty() {
        return Err(ElraError::invalid("csv files", "nothing to merge"));
    }
    let mut rows = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(|e| io_err(p, e))?;
        rows.extend(crate::experiment::from_csv(&text).map_err(|e| match e {
            ElraError::InvalidArgument { arg, reason } => ElraError::InvalidArgument {
                arg,
                reason: format!("{}: {reason}", p.display()),
            },
            e => e,
        })?);
    }
    let settings = app_g_settings();
    let row_id = |r: &Row| id_of(&r.setting, &r.frozen_init);
    let ids = first_appearance(rows.iter().map(row_id));
    let same = |a: f64, b: f64| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
    let mut groups: Vec<(String, usize, Vec<Row>, Vec<String>)> = Vec::new();
    for id in ids {
        let bad = |what: String| ElraError::invalid("csv", format!("{id}: {what}"));
        let setting = settings
            .iter()
            .find(|s| setting_id(s) == id)
            .ok_or_else(|| bad("unknown setting".into()))?;
        check_set(&out.join(&id), &SETTING_FILES)?;
        let dest = out.join(&id).join(SETTING_FILES[0]);
        let dest_c = std::fs::canonicalize(&dest).ok();
        if paths
            .iter()
            .any(|p| *p == dest || (dest_c.is_some() && std::fs::canonicalize(p).ok() == dest_c))
        {
            return Err(bad(format!(
                "the merged CSV {} would overwrite an input",
                dest.display()
            )));
        }
        let mut group: Vec<Row> = rows.iter().filter(|r| row_id(r) == id).cloned().collect();
        let methods = first_appearance(group.iter().map(|r| r.adapter.clone()));
        if let Some((_, _, _, first)) = groups.first() {
            if *first != methods {
                return Err(bad(format!(
                    "methods {methods:?} differ from the first setting's {first:?}"
                )));
            }
        }
        let order = |r: &Row| methods.iter().position(|m| *m == r.adapter);
        group.sort_by_key(|r| (r.rank, order(r)));
        let first = &group[0];
        for r in &group {
            let mismatch = |what: &str| {
                bad(format!(
                    "rank {} {} disagrees with rank {} {} on {what} — shards of different protocols, seeds or code?",
                    r.rank, r.adapter, first.rank, first.adapter
                ))
            };
            if r.dim != first.dim {
                return Err(mismatch("the dimension"));
            }
            if r.iterations != first.iterations {
                return Err(mismatch("the iterations"));
            }
            if r.pretrain_steps != first.pretrain_steps {
                return Err(mismatch("the pretraining steps"));
            }
            if !same(r.frozen_mse, first.frozen_mse) {
                return Err(mismatch("the frozen model's test MSE"));
            }
        }
        for rank_rows in group.chunk_by(|a, b| a.rank == b.rank) {
            let rank = rank_rows[0].rank;
            for w in rank_rows.windows(2) {
                if w[0].adapter == w[1].adapter {
                    return Err(bad(format!("rank {rank} {} appears twice", w[0].adapter)));
                }
                if !same(w[0].construction_mse, w[1].construction_mse) {
                    return Err(bad(format!("two construction MSEs at rank {rank}")));
                }
            }
            if rank_rows.len() != methods.len() {
                return Err(bad(format!(
                    "rank {rank} has {} of the {} methods",
                    rank_rows.len(),
                    methods.len()
                )));
            }
        }
        groups.push((id, threshold_rank(setting), group, methods));
    }
    let mut summary = Summary {
        lines: Vec::new(),
        rows: Vec::new(),
    };
    for (id, threshold, group, methods) in groups {
        let names: Vec<&str> = methods.iter().map(String::as_str).collect();
        summary
            .lines
            .push(write_setting(out, &id, threshold, &group, &names)?);
        summary.rows.extend(group);
    }
    Ok(summary)
}

/// The distinct items, in the order they first appear.
fn first_appearance(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for x in items {
        if !seen.contains(&x) {
            seen.push(x);
        }
    }
    seen
}

/// The smallest rank whose selected value is `< tol`.
fn first_below(rows: &[Row], tol: f64, sel: impl Fn(&Row) -> Option<f64>) -> Option<usize> {
    rows.iter()
        .filter_map(|r| sel(r).map(|v| (r.rank, v)))
        .filter(|&(_, v)| v < tol)
        .map(|(r, _)| r)
        .min()
}
