//! Compiles the `.cu` sources with nvcc when the `cuda` feature is on. No
//! source exists yet, so there is nothing to compile; the script only makes
//! cargo rebuild when the sources change.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src");
}
