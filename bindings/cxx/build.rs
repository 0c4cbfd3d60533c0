//! Generates the C++ side of the bridge (`relora-cxx/src/lib.rs.h` and its source) and compiles
//! it into this crate, so that the static library holds everything a C++ host links.

fn main() {
    cxx_build::bridge("src/lib.rs")
        .std("c++17")
        .include("include")
        .compile("relora-cxx-bridge");
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=include/relora_cxx/communicator.h");
}
