//! Links the check binary with no C runtime and no C library at all, so anything that needs
//! them (i.e. `std`) cannot link.
fn main() {
    for arg in ["-nostartfiles", "-nostdlib", "-static"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
