//! The C example `examples/c/elra_example.c` compiles against `include/elra.h` and the static
//! library `libelra.a` that cargo built for this test run, runs, and passes its own checks:
//! closed-form φ1/exp values, the adjoint Fréchet derivative as a divided difference, an ELRA
//! adapter with a nilpotent generator (exp(G) = I + G exactly) whose forward, merge and backward
//! (dX = dY·W_new, ∂L/∂η in closed form) are checked to 1e-14, a save/load round trip, and the
//! error protocol. Skips with a printed reason only when no C compiler exists.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The profile directory (`target/<profile>`) of this test binary (`…/<profile>/deps/<exe>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// The newest `libelra.a` cargo left in the profile directory (uplifted by `cargo build`) or in
/// its `deps/` (built with every crate type when the library is compiled for the tests).
fn staticlib() -> PathBuf {
    let dir = profile_dir();
    let candidates = [dir.join("libelra.a"), dir.join("deps").join("libelra.a")];
    candidates
        .iter()
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p.clone())))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("no libelra.a in {} or its deps/", dir.display()))
}

fn c_compiler() -> Option<String> {
    let cands = std::env::var("CC")
        .ok()
        .into_iter()
        .chain(["cc", "gcc", "clang"].map(String::from));
    cands.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn c_example_builds_against_the_staticlib_and_passes_its_checks() {
    let Some(cc) = c_compiler() else {
        println!("SKIPPED: no C compiler found ($CC, cc, gcc, clang)");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = staticlib();
    let out_dir = std::env::temp_dir().join(format!("elra-c-example-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join("elra_example");
    let build = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("examples/c/elra_example.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-lrt", "-lutil", "-o"])
        .arg(&exe)
        .output()
        .expect("run the C compiler");
    assert!(
        build.status.success(),
        "{cc} failed on examples/c/elra_example.c with {}:\n{}",
        lib.display(),
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe).output().expect("run the example");
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "the C example failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("elra_example: all checks passed"));
    std::fs::remove_dir_all(&out_dir).unwrap();
}
