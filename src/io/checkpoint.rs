//! Streaming merge and unmerge of a safetensors checkpoint with an adapter directory.
//!
//! A checkpoint directory holds `model.safetensors`, or shards named by
//! `model.safetensors.index.json` (`weight_map`: tensor → shard file), or one other
//! `*.safetensors` file. [`merge_checkpoint`] writes a new directory with the same files, the same
//! sharding and the same headers, in which every tensor `<module>.weight` of an adapted module is
//! replaced, in its own dtype (f32, f16, bf16 computed in f32; f64 in f64), by
//!
//! - ELRA: `exp(G) W0 = W0 + A (φ1(CA) (C W0))` (eq. 30 with Prop. 1), or for unmerge its exact
//!   inverse `exp(−G) W = W + A (φ1(−CA) (−C W))` (Prop. 3), with the adapter's step for α and
//!   the η multiplier;
//! - PEFT LoRA: `W0 + s·B A` with `s = lora_alpha/r` (`/√r` with rsLoRA; rank and alpha patterns
//!   applied; the transpose for `fan_in_fan_out`), or `W − s·B A`.
//!
//! Every other tensor is copied byte for byte, and the other top-level files of the directory
//! (`config.json`, tokenizer files, …) are copied too — except weight files of other formats
//! (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`, `*.h5`, `*.msgpack`, `*.gguf`, other `*.safetensors` and
//! `*.index.json`), which would carry the unmerged weights; subdirectories are not copied.
//!
//! **Memory.** Tensors are streamed one at a time in file order: an adapted tensor is decoded
//! into one buffer of its own size in the compute dtype, transformed in place
//! ([`crate::ops::merge_in_place`]: r-sized temporaries) and encoded back in chunks; the rest
//! moves through a 4 MiB buffer. The adapter's factors are held in f32 (f64 when an adapted
//! tensor is F64). Peak memory is the largest adapted tensor (in f32) plus the adapter plus a
//! few MiB, whatever the checkpoint's size (BENCHMARKS.md measures it).
//!
//! **Atomic output.** Everything is checked before the first byte is written: every shard's
//! header against its file size (a truncated shard is an error naming it), the index against the
//! shards, and every adapter module against the checkpoint (a module without a `<module>.weight`
//! tensor, a shape that does not fit or a dtype that cannot be merged — all listed in one error).
//! The output is written into a hidden sibling directory and renamed to `out` only when
//! complete, so a crash or an error leaves no partial checkpoint at `out` (the error path
//! removes the temporary; a killed process leaves `.<out>.partial-*` beside it). Every file is
//! synced to disk before the rename. `out` must not exist (checked at the start and again just
//! before the rename; an empty directory created at `out` between the two would be replaced).

use super::adapter_file::{AdapterFile, FileConfig, LoadLimits, ModuleWeights};
use crate::adapter::Variant;
use crate::grad::ops::{gemm_strided_par, Op, Strided, StridedMut};
use crate::linalg::{all_finite, Real};
use crate::ops::{merge_in_place, ElraOp, Generator, Side};
use crate::{ElraError, Result};
use nalgebra::DMatrix;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The index of a sharded checkpoint (Hugging Face's name).
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The file of an unsharded checkpoint (Hugging Face's name).
pub const SINGLE_FILE: &str = "model.safetensors";
/// Largest accepted safetensors header (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;
/// Largest accepted index file.
const MAX_INDEX: u64 = 64 << 20;
/// File bytes moved per read or write.
const CHUNK: usize = 4 << 20;

/// Merge (`W0 → W_new`) or unmerge (`W_new → W0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `exp(G) W0` (ELRA), `W0 + s·B A` (LoRA).
    Merge,
    /// `exp(−G) W` (ELRA, Prop. 3), `W − s·B A` (LoRA).
    Unmerge,
}

/// One tensor of a shard, as the shard's header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// The safetensors dtype string (`"F32"`, `"BF16"`, …).
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// Byte range inside the shard's data section.
    pub begin: u64,
    /// End of the byte range (exclusive).
    pub end: u64,
}

impl TensorInfo {
    /// Bytes of data.
    pub fn bytes(&self) -> u64 {
        self.end - self.begin
    }
}

/// One safetensors file of a checkpoint: its header bytes (kept verbatim) and its tensors in
/// file order.
#[derive(Clone, Debug)]
pub struct Shard {
    /// The file name inside the checkpoint directory.
    pub file: String,
    header: Vec<u8>,
    /// The tensors, sorted by their offsets (contiguous, covering the data section).
    pub tensors: Vec<TensorInfo>,
}

impl Shard {
    /// Bytes of the data section.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.last().map_or(0, |t| t.end)
    }
}

/// A checkpoint directory with every shard's header read and checked against the file sizes.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The directory.
    pub dir: PathBuf,
    /// The raw index file, for sharded checkpoints.
    index: Option<Vec<u8>>,
    /// The shards, in the order of their file names.
    pub shards: Vec<Shard>,
}

fn io_err(path: &Path, e: std::io::Error) -> ElraError {
    ElraError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn bad(file: &str, why: impl std::fmt::Display) -> ElraError {
    ElraError::Format(format!("{file}: {why}"))
}

/// Bytes per element of a safetensors dtype, `None` for dtypes this reader does not size
/// (sub-byte floats; such tensors are still copied through).
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Reads and checks a shard's header: every tensor's offsets inside a contiguous data section
/// that ends exactly at the end of the file, and each size equal to its shape times its dtype.
fn read_shard(dir: &Path, file: &str) -> Result<Shard> {
    let path = dir.join(file);
    let mut f = File::open(&path).map_err(|e| io_err(&path, e))?;
    let len = f.metadata().map_err(|e| io_err(&path, e))?.len();
    let mut n8 = [0u8; 8];
    if len < 8 {
        return Err(bad(
            file,
            format!("{len} bytes: truncated before the header"),
        ));
    }
    f.read_exact(&mut n8).map_err(|e| io_err(&path, e))?;
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER {
        return Err(bad(
            file,
            format!("header of {n} bytes exceeds {MAX_HEADER}"),
        ));
    }
    if 8 + n > len {
        return Err(bad(
            file,
            format!("header of {n} bytes but the file has {len}: truncated"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| io_err(&path, e))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(file, format!("header: {e}")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| bad(file, "header is not a JSON object"))?;
    let mut tensors = Vec::with_capacity(obj.len());
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let short: String = name.chars().take(200).collect();
        let entry = || bad(file, format!("tensor `{short}`: malformed header entry"));
        let dtype = v["dtype"].as_str().ok_or_else(entry)?.to_string();
        let shape = v["shape"]
            .as_array()
            .ok_or_else(entry)?
            .iter()
            .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(entry)?;
        let offs = v["data_offsets"].as_array().ok_or_else(entry)?;
        let (begin, end) = match offs.as_slice() {
            [b, e] => (b.as_u64().ok_or_else(entry)?, e.as_u64().ok_or_else(entry)?),
            _ => return Err(entry()),
        };
        if end < begin {
            return Err(entry());
        }
        if let Some(size) = dtype_size(&dtype) {
            let want = shape
                .iter()
                .try_fold(size, |acc, &s| acc.checked_mul(s as u64));
            if want != Some(end - begin) {
                return Err(bad(
                    file,
                    format!(
                        "tensor `{short}`: {} bytes for shape {shape:?} of {dtype}",
                        end - begin
                    ),
                ));
            }
        }
        tensors.push(TensorInfo {
            name: name.clone(),
            dtype,
            shape,
            begin,
            end,
        });
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut at = 0u64;
    for t in &tensors {
        if t.begin != at {
            return Err(bad(
                file,
                format!(
                    "tensor `{}` starts at byte {} of the data, not {at}",
                    t.name, t.begin
                ),
            ));
        }
        at = t.end;
    }
    if 8 + n + at != len {
        return Err(bad(
            file,
            format!(
                "the header describes {} bytes of data, the file holds {}{}",
                at,
                len - 8 - n,
                if 8 + n + at > len { ": truncated" } else { "" }
            ),
        ));
    }
    Ok(Shard {
        file: file.to_string(),
        header,
        tensors,
    })
}

/// A shard file name from an index: a plain name inside the directory.
fn check_shard_name(name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && name.ends_with(".safetensors");
    if plain {
        Ok(())
    } else {
        Err(bad(
            INDEX_FILE,
            format!("shard name {name:?} is not a plain `*.safetensors` file name"),
        ))
    }
}

impl Checkpoint {
    /// Opens a checkpoint directory and checks every shard's header against its file (module
    /// docs); reads no tensor data.
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint> {
        let dir = dir.as_ref().to_path_buf();
        let meta = fs::metadata(&dir).map_err(|e| io_err(&dir, e))?;
        if !meta.is_dir() {
            return Err(ElraError::invalid(
                "base",
                format!("{} is not a directory", dir.display()),
            ));
        }
        let index_path = dir.join(INDEX_FILE);
        if index_path.exists() {
            let f = File::open(&index_path).map_err(|e| io_err(&index_path, e))?;
            let mut raw = Vec::new();
            f.take(MAX_INDEX + 1)
                .read_to_end(&mut raw)
                .map_err(|e| io_err(&index_path, e))?;
            if raw.len() as u64 > MAX_INDEX {
                return Err(bad(INDEX_FILE, format!("larger than {MAX_INDEX} bytes")));
            }
            let json: serde_json::Value =
                serde_json::from_slice(&raw).map_err(|e| bad(INDEX_FILE, e))?;
            let map = json["weight_map"]
                .as_object()
                .ok_or_else(|| bad(INDEX_FILE, "no `weight_map` object"))?;
            let mut listed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| bad(INDEX_FILE, format!("`{tensor}` maps to a non-string")))?;
                check_shard_name(file)?;
                listed
                    .entry(file.to_string())
                    .or_default()
                    .insert(tensor.clone());
            }
            let mut shards = Vec::with_capacity(listed.len());
            for (file, names) in &listed {
                let shard = read_shard(&dir, file)?;
                let held: BTreeSet<&str> = shard.tensors.iter().map(|t| t.name.as_str()).collect();
                let want: BTreeSet<&str> = names.iter().map(String::as_str).collect();
                if held != want {
                    let missing: Vec<_> = want.difference(&held).take(5).collect();
                    let extra: Vec<_> = held.difference(&want).take(5).collect();
                    return Err(bad(
                        INDEX_FILE,
                        format!(
                            "`{file}` does not hold what the index lists (listed, absent: \
                             {missing:?}; present, unlisted: {extra:?})"
                        ),
                    ));
                }
                shards.push(shard);
            }
            return Ok(Checkpoint {
                dir,
                index: Some(raw),
                shards,
            });
        }
        let file = if dir.join(SINGLE_FILE).is_file() {
            SINGLE_FILE.to_string()
        } else {
            let mut found = Vec::new();
            for e in fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
                let e = e.map_err(|e| io_err(&dir, e))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".safetensors") && e.path().is_file() {
                    found.push(name);
                }
            }
            match found.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(ElraError::invalid(
                        "base",
                        format!(
                            "{} holds neither {INDEX_FILE} nor a *.safetensors file",
                            dir.display()
                        ),
                    ))
                }
                _ => {
                    return Err(ElraError::invalid(
                        "base",
                        format!(
                            "{} holds several *.safetensors files and no {INDEX_FILE}",
                            dir.display()
                        ),
                    ))
                }
            }
        };
        let shard = read_shard(&dir, &file)?;
        Ok(Checkpoint {
            dir,
            index: None,
            shards: vec![shard],
        })
    }

    /// Every tensor of the checkpoint with the shard holding it.
    pub fn tensors(&self) -> impl Iterator<Item = (&Shard, &TensorInfo)> {
        self.shards
            .iter()
            .flat_map(|s| s.tensors.iter().map(move |t| (s, t)))
    }

    /// Bytes of tensor data over all shards.
    pub fn data_bytes(&self) -> u64 {
        self.shards.iter().map(Shard::data_bytes).sum()
    }
}

/// What happens to one adapted tensor: its factors as the adapter file was read (`S`: f32, or
/// f64 when an adapted tensor is F64), cast to the compute type when used.
#[derive(Clone, Debug)]
enum Edit<S: Real> {
    Elra {
        variant: Variant,
        a: DMatrix<S>,
        b: Option<DMatrix<S>>,
        eta: f64,
        spec: crate::adapter::GeneratorSpec,
    },
    Lora {
        lora_a: DMatrix<S>,
        lora_b: DMatrix<S>,
        scale: f64,
        transposed: bool,
    },
}

/// What a merge did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Shard files written.
    pub shards: usize,
    /// Tensors written.
    pub tensors: usize,
    /// Tensors transformed by the adapter.
    pub adapted: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Bytes of the largest adapted tensor in its file dtype.
    pub largest_adapted_bytes: u64,
    /// Other files copied (config, tokenizer, …).
    pub other_files: usize,
    /// Other weight files left out (`*.bin`, `*.pt`, …: they would hold the unmerged weights).
    pub skipped_files: Vec<String>,
}

/// Files of other weight formats (and their indexes), which a merged checkpoint must not carry
/// over unmerged.
fn is_weights_file(name: &str) -> bool {
    const EXT: [&str; 9] = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".msgpack",
        ".gguf",
        ".index.json",
    ];
    EXT.iter().any(|e| name.ends_with(e))
}

/// Matches every adapter module to its tensor `<module>.weight` and checks shape and dtype; all
/// problems are reported together.
fn plan<S: Real>(ck: &Checkpoint, adapter: AdapterFile<S>) -> Result<BTreeMap<String, Edit<S>>> {
    let AdapterFile { config, modules } = adapter;
    let by_name: BTreeMap<&str, &TensorInfo> =
        ck.tensors().map(|(_, t)| (t.name.as_str(), t)).collect();
    let mut edits = BTreeMap::new();
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    for (module, weights) in modules {
        let key = format!("{module}.weight");
        let Some(t) = by_name.get(key.as_str()) else {
            missing.push(module);
            continue;
        };
        if !matches!(t.dtype.as_str(), "F32" | "F16" | "BF16" | "F64") {
            wrong.push(format!(
                "`{key}` is {} (merging needs F32, F16, BF16 or F64)",
                t.dtype
            ));
            continue;
        }
        let (rows, cols) = match t.shape.as_slice() {
            [r, c] => (*r, *c),
            s => {
                wrong.push(format!("`{key}` has shape {s:?}, not a matrix"));
                continue;
            }
        };
        let edit = match (&config, weights) {
            (FileConfig::Elra(c), ModuleWeights::Elra { a, b, eta }) => {
                if a.nrows() != rows {
                    wrong.push(format!(
                        "`{key}` is {rows}×{cols}, the adapter's A is {}×{} (needs {} rows)",
                        a.nrows(),
                        a.ncols(),
                        a.nrows()
                    ));
                    continue;
                }
                Edit::Elra {
                    variant: c.generator.variant,
                    a,
                    b,
                    eta: eta.f64(),
                    spec: c.generator.spec_at(c.step),
                }
            }
            (FileConfig::Lora(c), ModuleWeights::Lora { lora_a, lora_b }) => {
                let want = if c.fan_in_fan_out {
                    (lora_a.ncols(), lora_b.nrows())
                } else {
                    (lora_b.nrows(), lora_a.ncols())
                };
                if want != (rows, cols) {
                    wrong.push(format!(
                        "`{key}` is {rows}×{cols}, the adapter's B A is {}×{}{}",
                        lora_b.nrows(),
                        lora_a.ncols(),
                        if c.fan_in_fan_out {
                            " (fan_in_fan_out: stored transposed)"
                        } else {
                            ""
                        }
                    ));
                    continue;
                }
                Edit::Lora {
                    lora_a,
                    lora_b,
                    scale: c.scaling_for(&module),
                    transposed: c.fan_in_fan_out,
                }
            }
            _ => {
                return Err(ElraError::Format(format!(
                    "module `{module}`: tensors of the wrong kind"
                )))
            }
        };
        edits.insert(key, edit);
    }
    if !missing.is_empty() || !wrong.is_empty() {
        let mut msg = String::new();
        if !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(20).map(String::as_str).collect();
            let sample: Vec<&str> = by_name
                .keys()
                .filter(|k| k.ends_with(".weight"))
                .take(5)
                .copied()
                .collect();
            msg += &format!(
                "{} adapter module(s) have no `<module>.weight` tensor in the checkpoint: {}{} \
                 (checkpoint tensors look like: {})",
                missing.len(),
                shown.join(", "),
                if missing.len() > 20 { ", …" } else { "" },
                sample.join(", ")
            );
        }
        if !wrong.is_empty() {
            if !msg.is_empty() {
                msg += "; ";
            }
            let shown: Vec<&str> = wrong.iter().take(20).map(String::as_str).collect();
            msg += &format!(
                "{} tensor(s) do not fit the adapter: {}{}",
                wrong.len(),
                shown.join("; "),
                if wrong.len() > 20 { "; …" } else { "" }
            );
        }
        return Err(ElraError::invalid("adapter", msg));
    }
    Ok(edits)
}

/// Applies an edit to a row-major `rows×cols` tensor in place, in `T`.
fn apply<T: Real, S: Real>(
    edit: &Edit<S>,
    dir: Direction,
    w: &mut [T],
    rows: usize,
    cols: usize,
    name: &str,
) -> Result<()> {
    let cast = |m: &DMatrix<S>| m.map(|v| T::of(v.f64()));
    let mut wv = StridedMut::row_major(w, rows, cols, cols).expect("sized from the header");
    let inverse = dir == Direction::Unmerge;
    match edit {
        Edit::Elra {
            variant,
            a,
            b,
            eta,
            spec,
        } => {
            let (a, b) = (cast(a), b.as_ref().map(cast));
            let op = ElraOp {
                variant: *variant,
                d: rows,
                k: cols,
                r: a.ncols(),
            };
            let g = Generator {
                a: Strided::of(&a, Op::N),
                b: b.as_ref().map(|b| Strided::of(b, Op::N)),
                eta: T::of(*eta),
            };
            merge_in_place(&op, &g, spec, inverse, Side::Left, &mut wv).map_err(|e| match e {
                ElraError::NonFinite { .. } => {
                    ElraError::Format(format!("tensor `{name}` holds NaN or ±∞"))
                }
                e => e,
            })
        }
        Edit::Lora {
            lora_a,
            lora_b,
            scale,
            transposed,
        } => {
            if !wv.as_ref().all_finite() {
                return Err(ElraError::Format(format!(
                    "tensor `{name}` holds NaN or ±∞"
                )));
            }
            let (la, lb) = (cast(lora_a), cast(lora_b));
            let s = T::of(if inverse { -scale } else { *scale });
            if *transposed {
                // W (in×out) ± s·(B A)ᵀ = W ± s·Aᵀ Bᵀ.
                gemm_strided_par(
                    &mut wv,
                    s,
                    Strided::of(&la, Op::T),
                    Strided::of(&lb, Op::T),
                    T::one(),
                );
            } else {
                gemm_strided_par(
                    &mut wv,
                    s,
                    Strided::of(&lb, Op::N),
                    Strided::of(&la, Op::N),
                    T::one(),
                );
            }
            if all_finite(w) {
                Ok(())
            } else {
                Err(ElraError::Overflow {
                    what: format!("merging `{name}` leaves the floating-point range"),
                })
            }
        }
    }
}

/// Decodes little-endian elements of `dtype` into `out`.
fn decode<T: Real>(dtype: &str, bytes: &[u8], out: &mut [T]) {
    match dtype {
        "F32" => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = T::of(f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64);
            }
        }
        "F64" => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = T::of(f64::from_le_bytes(b.try_into().expect("8 bytes")));
            }
        }
        "F16" => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = T::of(half::f16::from_le_bytes([b[0], b[1]]).to_f64());
            }
        }
        "BF16" => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = T::of(half::bf16::from_le_bytes([b[0], b[1]]).to_f64());
            }
        }
        _ => unreachable!("dtypes are checked by `plan`"),
    }
}

/// Encodes `vals` as little-endian `dtype` (rounding to nearest even) into `out`; `false` when a
/// value leaves the dtype's range.
fn encode<T: Real>(dtype: &str, vals: &[T], out: &mut Vec<u8>) -> bool {
    out.clear();
    let mut finite = true;
    match dtype {
        "F32" => {
            for v in vals {
                let x = v.f64() as f32;
                finite &= x.is_finite();
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        "F64" => {
            for v in vals {
                out.extend_from_slice(&v.f64().to_le_bytes());
            }
        }
        "F16" => {
            for v in vals {
                let x = half::f16::from_f64(v.f64());
                finite &= x.is_finite();
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        "BF16" => {
            for v in vals {
                let x = half::bf16::from_f64(v.f64());
                finite &= x.is_finite();
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        _ => unreachable!("dtypes are checked by `plan`"),
    }
    finite
}

/// Reads, transforms and writes one adapted tensor in the compute type `T`.
#[allow(clippy::too_many_arguments)]
fn transform<T: Real, S: Real>(
    edit: &Edit<S>,
    dir: Direction,
    t: &TensorInfo,
    src: &mut impl Read,
    src_path: &Path,
    dst: &mut impl Write,
    dst_path: &Path,
    chunk: &mut Vec<u8>,
) -> Result<()> {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let n = rows * cols;
    let size = dtype_size(&t.dtype).expect("checked by plan") as usize;
    let mut vals: Vec<T> = Vec::new();
    vals.try_reserve_exact(n).map_err(|_| {
        ElraError::out_of_memory(
            &format!("tensor `{}`", t.name),
            n * std::mem::size_of::<T>(),
        )
    })?;
    vals.resize(n, T::zero());
    let per = (CHUNK / size).max(1);
    for piece in vals.chunks_mut(per) {
        chunk.resize(piece.len() * size, 0);
        src.read_exact(chunk).map_err(|e| io_err(src_path, e))?;
        decode(&t.dtype, chunk, piece);
    }
    apply(edit, dir, &mut vals, rows, cols, &t.name)?;
    for piece in vals.chunks(per) {
        if !encode(&t.dtype, piece, chunk) {
            return Err(ElraError::Overflow {
                what: format!(
                    "a merged value of `{}` leaves the range of {}",
                    t.name, t.dtype
                ),
            });
        }
        dst.write_all(chunk).map_err(|e| io_err(dst_path, e))?;
    }
    Ok(())
}

/// One merge in progress: the checkpoint, the edits, the direction and the output directory.
struct Job<'a, S: Real> {
    ck: &'a Checkpoint,
    edits: &'a BTreeMap<String, Edit<S>>,
    dir: Direction,
    out_dir: &'a Path,
    total: u64,
}

/// Writes one shard of the output: the header verbatim, then every tensor in file order,
/// adapted or copied.
fn write_shard<S: Real>(
    job: &Job<'_, S>,
    shard: &Shard,
    report: &mut MergeReport,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let Job {
        ck,
        edits,
        dir,
        out_dir,
        total,
    } = *job;
    let src_path = ck.dir.join(&shard.file);
    let dst_path = out_dir.join(&shard.file);
    let mut src = File::open(&src_path).map_err(|e| io_err(&src_path, e))?;
    src.seek(SeekFrom::Start(8 + shard.header.len() as u64))
        .map_err(|e| io_err(&src_path, e))?;
    let file = File::create(&dst_path).map_err(|e| io_err(&dst_path, e))?;
    let mut dst = BufWriter::with_capacity(CHUNK, file);
    let w =
        |dst: &mut BufWriter<File>, b: &[u8]| dst.write_all(b).map_err(|e| io_err(&dst_path, e));
    w(&mut dst, &(shard.header.len() as u64).to_le_bytes())?;
    w(&mut dst, &shard.header)?;
    let mut chunk = Vec::new();
    for t in &shard.tensors {
        match edits.get(&t.name) {
            Some(edit) => {
                if t.dtype == "F64" {
                    transform::<f64, S>(
                        edit, dir, t, &mut src, &src_path, &mut dst, &dst_path, &mut chunk,
                    )?;
                } else {
                    transform::<f32, S>(
                        edit, dir, t, &mut src, &src_path, &mut dst, &dst_path, &mut chunk,
                    )?;
                }
                report.adapted += 1;
                report.largest_adapted_bytes = report.largest_adapted_bytes.max(t.bytes());
            }
            None => {
                let mut left = t.bytes();
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    chunk.resize(n, 0);
                    src.read_exact(&mut chunk)
                        .map_err(|e| io_err(&src_path, e))?;
                    w(&mut dst, &chunk)?;
                    left -= n as u64;
                }
            }
        }
        report.tensors += 1;
        report.bytes += t.bytes();
        progress(report.bytes, total);
    }
    let file = dst
        .into_inner()
        .map_err(|e| io_err(&dst_path, e.into_error()))?;
    file.sync_all().map_err(|e| io_err(&dst_path, e))?;
    report.shards += 1;
    Ok(())
}

/// Merges (or unmerges) the adapter directory `adapter` into the checkpoint `base`, writing a
/// new checkpoint directory `out` tensor by tensor (module docs: formulas, memory, atomicity).
/// `progress(done, total)` is called after each tensor with bytes of tensor data.
///
/// Errors: `out` exists; a malformed or truncated shard or index ([`ElraError::Format`]); adapter
/// modules without a matching tensor, or tensors of another shape or dtype
/// ([`ElraError::InvalidArgument`] listing them); a non-finite weight; a merged value outside
/// the tensor's dtype ([`ElraError::Overflow`]); I/O errors. On every error `out` is left
/// absent.
pub fn merge_checkpoint(
    base: impl AsRef<Path>,
    adapter: impl AsRef<Path>,
    out: impl AsRef<Path>,
    dir: Direction,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeReport> {
    let (out, adapter_dir) = (out.as_ref(), adapter.as_ref());
    if fs::symlink_metadata(out).is_ok() {
        return Err(ElraError::invalid(
            "out",
            format!(
                "{} exists (the output must be a new directory)",
                out.display()
            ),
        ));
    }
    let ck = Checkpoint::open(base)?;
    let limits = LoadLimits {
        max_weights_bytes: 64 << 30,
        ..LoadLimits::default()
    };
    // The factors stay in f32 (as PEFT and elra write them) unless an adapted tensor is F64.
    let adapter = AdapterFile::<f32>::load_with(adapter_dir, &limits)?;
    let dtypes: BTreeMap<&str, &str> = ck
        .tensors()
        .map(|(_, t)| (t.name.as_str(), t.dtype.as_str()))
        .collect();
    let wide = adapter
        .modules
        .keys()
        .any(|m| dtypes.get(format!("{m}.weight").as_str()) == Some(&"F64"));
    if wide {
        drop(adapter);
        let adapter = AdapterFile::<f64>::load_with(adapter_dir, &limits)?;
        let edits = plan(&ck, adapter)?;
        return write_out(&ck, &edits, dir, out, progress);
    }
    let edits = plan(&ck, adapter)?;
    write_out(&ck, &edits, dir, out, progress)
}

/// Writes the output into a hidden sibling of `out` and renames it when complete (module docs).
fn write_out<S: Real>(
    ck: &Checkpoint,
    edits: &BTreeMap<String, Edit<S>>,
    dir: Direction,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeReport> {
    let name = out
        .file_name()
        .ok_or_else(|| ElraError::invalid("out", "the output needs a directory name"))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = parent.join(format!(".{name}.partial-{}-{nanos}", std::process::id()));
    fs::create_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
    let result = write_all(ck, edits, dir, &tmp, progress).and_then(|report| {
        // Every file is on disk (synced as written); the directory's entries too, then the
        // rename. `out` is checked again here: a rename would replace an empty directory that
        // appeared there since the start (a race this narrows, without a no-replace rename).
        if let Ok(d) = File::open(&tmp) {
            let _ = d.sync_all();
        }
        if fs::symlink_metadata(out).is_ok() {
            return Err(ElraError::invalid(
                "out",
                format!("{} appeared while the merge ran", out.display()),
            ));
        }
        fs::rename(&tmp, out).map_err(|e| io_err(out, e))?;
        if let Ok(d) = File::open(&parent) {
            let _ = d.sync_all();
        }
        Ok(report)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Flushes a written file to disk.
fn sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(path, e))
}

fn write_all<S: Real>(
    ck: &Checkpoint,
    edits: &BTreeMap<String, Edit<S>>,
    dir: Direction,
    tmp: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeReport> {
    let mut report = MergeReport::default();
    let job = Job {
        ck,
        edits,
        dir,
        out_dir: tmp,
        total: ck.data_bytes(),
    };
    progress(0, job.total);
    for shard in &ck.shards {
        write_shard(&job, shard, &mut report, progress)?;
    }
    let shard_names: BTreeSet<&str> = ck.shards.iter().map(|s| s.file.as_str()).collect();
    if let Some(index) = &ck.index {
        let p = tmp.join(INDEX_FILE);
        fs::write(&p, index).map_err(|e| io_err(&p, e))?;
        sync(&p)?;
    }
    for e in fs::read_dir(&ck.dir).map_err(|e| io_err(&ck.dir, e))? {
        let e = e.map_err(|e| io_err(&ck.dir, e))?;
        let file_name = e.file_name();
        let name = file_name.to_string_lossy();
        if shard_names.contains(name.as_ref()) || name == INDEX_FILE || !e.path().is_file() {
            continue;
        }
        if is_weights_file(&name) {
            report.skipped_files.push(name.into_owned());
            continue;
        }
        let dst = tmp.join(&file_name);
        fs::copy(e.path(), &dst).map_err(|err| io_err(&e.path(), err))?;
        sync(&dst)?;
        report.other_files += 1;
    }
    Ok(report)
}
