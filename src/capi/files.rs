//! Adapter directories through the C ABI: save handles as one PEFT-layout directory, load a
//! module of a directory into a new handle, save merged weights ([`crate::io`]).

use std::ffi::{c_char, c_void};

use nalgebra::DMatrix;

use super::adapter::{ElraAdapter, HostReal};
use super::config::{dtype_of, ElraAdapterConfig, ElraDtype};
use super::handle;
use super::layout::{c_path, c_utf8, check_scalar_out, read_matrix};
use super::{guard, CError, CResult, ElraStatus};
use crate::adapter::{ElraLayer, HostAdapter, LoraLayer};
use crate::io::{save_merged, AdapterFile, FileConfig, ModuleWeights};
use crate::ElraError;

/// Reads `n` handles and module names.
///
/// # Safety
/// `adapters` and `modules` must point to `n` readable entries each.
unsafe fn named_handles<'a>(
    n: usize,
    adapters: *const *const ElraAdapter,
    modules: *const *const c_char,
) -> CResult<Vec<(&'a str, &'a ElraAdapter)>> {
    if n == 0 {
        return Err(ElraError::invalid("n", "at least one adapter is needed").into());
    }
    if adapters.is_null() {
        return Err(CError::Null("adapters"));
    }
    if modules.is_null() {
        return Err(CError::Null("modules"));
    }
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for i in 0..n {
        // SAFETY: the caller guarantees n readable entries in both arrays.
        let (h, m) = unsafe {
            (
                adapters.add(i).read_unaligned(),
                modules.add(i).read_unaligned(),
            )
        };
        // SAFETY: each entry must be a live handle (caller contract).
        let a = unsafe { handle::live_ref(h)? };
        out.push((c_utf8("modules", m)?, a));
    }
    Ok(out)
}

/// One module of a file from a handle's adapter: ELRA (config, step, A, B, η) or LoRA (config,
/// `lora_A`, `lora_B`).
enum Module<T: HostReal> {
    Elra(crate::adapter::ElraConfig, usize, ModuleWeights<T>),
    Lora(crate::adapter::LoraConfig, ModuleWeights<T>),
}

/// The file contents of one handle (locked only while it is read, so a handle listed twice is
/// fine).
fn module_of<T: HostReal>(a: &ElraAdapter) -> CResult<Module<T>> {
    a.with::<T, _>(|l| {
        let any = l.as_any();
        if let Some(e) = any.downcast_ref::<ElraLayer<T>>() {
            let w = ModuleWeights::Elra {
                a: e.a().clone(),
                b: e.b().cloned(),
                eta: e.eta(),
            };
            Ok(Module::Elra(e.config().clone(), e.step(), w))
        } else if let Some(lo) = any.downcast_ref::<LoraLayer<T>>() {
            let w = ModuleWeights::Lora {
                lora_a: lo.lora_a().clone(),
                lora_b: lo.lora_b().clone(),
            };
            Ok(Module::Lora(lo.config().clone(), w))
        } else {
            Err(ElraError::invalid(
                "adapters",
                format!("{} adapters have no file layout", l.name()),
            )
            .into())
        }
    })
}

fn file_of<T: HostReal>(list: &[(&str, &ElraAdapter)]) -> CResult<AdapterFile<T>> {
    let mut elra = Vec::new();
    let mut lora = Vec::new();
    for (name, a) in list {
        match module_of::<T>(a)? {
            Module::Elra(c, s, w) => elra.push((name.to_string(), c, s, w)),
            Module::Lora(c, w) => lora.push((name.to_string(), c, w)),
        }
    }
    match (elra.is_empty(), lora.is_empty()) {
        (false, true) => Ok(AdapterFile::from_elra_modules(elra)?),
        (true, false) => Ok(AdapterFile::from_lora_modules(lora)?),
        _ => Err(
            ElraError::invalid("adapters", "cannot mix ELRA and LoRA adapters in one file").into(),
        ),
    }
}

/// Saves `n` adapters (one per module, names like `model.layers.0.self_attn.q_proj`) as one
/// adapter directory `dir` (`adapter_model.safetensors` + `adapter_config.json`, PEFT layout;
/// created if missing; each file written atomically). All adapters must have the same dtype and
/// kind (ELRA or LoRA) and share their settings (variant, r, η₀, λ, τ, schedules, step / r,
/// lora_alpha); W0 is not saved.
///
/// # Safety
/// `adapters` and `modules` must point to `n` live handles and `n` NUL-terminated strings; `dir`
/// to a NUL-terminated path.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_save(
    n: usize,
    adapters: *const *const ElraAdapter,
    modules: *const *const c_char,
    dir: *const c_char,
) -> ElraStatus {
    guard(|| {
        let dir = c_path("dir", dir)?;
        // SAFETY: caller contract.
        let list = unsafe { named_handles(n, adapters, modules)? };
        match list[0].1.dtype() {
            ElraDtype::ELRA_DTYPE_F32 => file_of::<f32>(&list)?.save(&dir)?,
            ElraDtype::ELRA_DTYPE_F64 => file_of::<f64>(&list)?.save(&dir)?,
        }
        Ok(())
    })
}

/// Loads module `module` of the adapter directory `dir` onto the frozen weight `w0` (d×k
/// elements of `dtype`, leading dimension `ld_w0 ≥ k`; copied) and returns a new handle in
/// `*out`. The directory may hold an ELRA or a PEFT LoRA adapter (F16/BF16/F32/F64 tensors are
/// converted to `dtype`). Every problem with the files is `ELRA_FORMAT` (or `ELRA_IO`) with a
/// message naming it; d (and k for LoRA) must match the stored tensors (`ELRA_SHAPE_MISMATCH`).
/// On error `*out` is untouched.
///
/// # Safety
/// `dir` and `module` must be NUL-terminated strings, `w0` must cover d×k elements of `dtype` as
/// described, `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_load(
    dir: *const c_char,
    module: *const c_char,
    dtype: u32,
    d: usize,
    k: usize,
    w0: *const c_void,
    ld_w0: usize,
    out: *mut *mut ElraAdapter,
) -> ElraStatus {
    guard(|| {
        let dir = c_path("dir", dir)?;
        let module = c_utf8("module", module)?;
        check_scalar_out("out", out)?;
        let h = match dtype_of(dtype)? {
            // SAFETY: caller contract.
            ElraDtype::ELRA_DTYPE_F32 => unsafe {
                load::<f32>(&dir, module, d, k, w0.cast(), ld_w0)?
            },
            // SAFETY: caller contract.
            ElraDtype::ELRA_DTYPE_F64 => unsafe {
                load::<f64>(&dir, module, d, k, w0.cast(), ld_w0)?
            },
        };
        // SAFETY: validated; caller guarantees writability.
        unsafe { out.write(handle::into_raw(h)) };
        Ok(())
    })
}

/// # Safety
/// `w0` must cover d×k with leading dimension `ld_w0`.
unsafe fn load<T: HostReal>(
    dir: &std::path::Path,
    module: &str,
    d: usize,
    k: usize,
    w0: *const T,
    ld_w0: usize,
) -> CResult<ElraAdapter> {
    // SAFETY: forwarded contract.
    let w0 = unsafe { read_matrix("w0", w0, d, k, ld_w0)? };
    let file = AdapterFile::<T>::load(dir)?;
    let dt = T::DTYPE as u32;
    let (config, layer): (ElraAdapterConfig, Box<dyn HostAdapter<T>>) = match &file.config {
        FileConfig::Elra(_) => {
            let l = file.elra_layer(module, w0)?;
            (ElraAdapterConfig::of_elra(l.config(), dt), Box::new(l))
        }
        FileConfig::Lora(_) => {
            let l = file.lora_layer(module, w0)?;
            (ElraAdapterConfig::of_lora(l.config(), dt), Box::new(l))
        }
    };
    Ok(ElraAdapter::new(config, layer))
}

/// Writes the merged weights `W_new` of `n` adapters as one safetensors file at `path` with keys
/// `<module>.weight` (d×k, the adapters' dtype), atomically — the base model's own key layout.
///
/// # Safety
/// As [`elra_adapter_save`], with `path` a NUL-terminated file path.
#[no_mangle]
pub unsafe extern "C" fn elra_adapter_save_merged(
    n: usize,
    adapters: *const *const ElraAdapter,
    modules: *const *const c_char,
    path: *const c_char,
) -> ElraStatus {
    guard(|| {
        let path = c_path("path", path)?;
        // SAFETY: caller contract.
        let list = unsafe { named_handles(n, adapters, modules)? };
        match list[0].1.dtype() {
            ElraDtype::ELRA_DTYPE_F32 => merged_of::<f32>(&list, &path),
            ElraDtype::ELRA_DTYPE_F64 => merged_of::<f64>(&list, &path),
        }
    })
}

fn merged_of<T: HostReal>(list: &[(&str, &ElraAdapter)], path: &std::path::Path) -> CResult<()> {
    let mut merged = Vec::with_capacity(list.len());
    for (name, a) in list {
        let m = a.with::<T, _>(|l| {
            let (d, k) = l.dims();
            let mut m = DMatrix::zeros(d, k);
            l.merge(&mut m)?;
            Ok(m)
        })?;
        merged.push((*name, m));
    }
    let refs: Vec<(&str, &DMatrix<T>)> = merged.iter().map(|(n, m)| (*n, m)).collect();
    save_merged(path, &refs)?;
    Ok(())
}
