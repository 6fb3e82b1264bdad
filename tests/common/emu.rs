//! Building and driving the host emulation of the CUDA kernels (`cuda/emu/`), shared by
//! `tests/cuda_phi1.rs` and `tests/cuda_layer.rs`.
//!
//! The kernel sources are embedded by the caller (`include_str!`), written to a per-process
//! temporary directory and compiled with the host C++20 compiler (`$CXX`, `g++` or `c++`) with
//! one OS thread per CUDA thread (`ELRA_BLOCK = 8`) and no floating-point contraction, so the
//! device code runs unchanged on the CPU. A job is sent on the harness's standard input; its
//! standard output is returned.
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Compiles `main_cpp` (a key of `sources`) with every source written beside it; returns the
/// executable, or `Err(reason)` to skip when no C++ compiler (or no `_Float16`) is available.
/// A compiler that exists but fails for another reason is a test failure (panic), not a skip.
pub fn build_harness(
    tag: &str,
    sources: &[(&str, &str)],
    main_cpp: &str,
    opt: &str,
) -> Result<PathBuf, String> {
    let cxx = std::env::var("CXX")
        .ok()
        .into_iter()
        .chain(["g++".to_string(), "c++".to_string()])
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .ok_or("no C++ compiler ($CXX, g++, c++) to build the kernel emulation")?;
    let dir = std::env::temp_dir().join(format!("elra-{tag}-emu-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("emu")).map_err(|e| e.to_string())?;
    for (name, text) in sources {
        std::fs::write(dir.join(name), text).map_err(|e| e.to_string())?;
    }
    let exe = dir.join(format!("{tag}_harness"));
    let out = Command::new(&cxx)
        .args([
            "-std=c++20",
            opt,
            "-ffp-contract=off",
            "-pthread",
            "-DELRA_BLOCK=8",
        ])
        .arg("-I")
        .arg(dir.join("emu"))
        .arg("-I")
        .arg(&dir)
        .arg("-include")
        .arg(dir.join("emu/cuda_emu.hpp"))
        .arg(dir.join(main_cpp))
        .arg("-o")
        .arg(&exe)
        .output()
        .map_err(|e| format!("{cxx}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("_Float16") {
            return Err(format!("{cxx} lacks _Float16, needed for the f16 stand-in"));
        }
        panic!("{cxx} failed to build the {tag} kernel emulation:\n{err}");
    }
    Ok(exe)
}

/// Runs one job on the harness and returns its standard output; panics if the harness fails.
pub fn run_job(exe: &PathBuf, job: &str) -> String {
    let mut child = Command::new(exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the emulation");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin of the emulation");
        stdin.write_all(job.as_bytes()).expect("write the job");
    }
    let out = child.wait_with_output().expect("wait for the emulation");
    assert!(
        out.status.success(),
        "emulation failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}
