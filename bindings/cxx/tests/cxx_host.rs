//! Builds `tests/host.cpp`, a C++ host of the bridge that also uses the C ABI through
//! `bindings/cpp/relora.hpp`, against this crate's static library with `-Wall -Wextra -Werror`
//! and AddressSanitizer + UndefinedBehaviorSanitizer, and runs it: bit-for-bit agreement with
//! the C ABI, exact resume, the C API's error messages as exceptions, and data parallelism
//! through a C++ communicator (see the host's own header comment).
//!
//! Needs g++ (or `CXX`); the generated bridge header and the static library are the ones cargo
//! built for this test (`<target>/cxxbridge/`, `<target>/<profile>/deps/librelora_cxx.a`).

#[path = "../../../tests/toolchain/mod.rs"]
mod toolchain;

use std::path::{Path, PathBuf};
use std::process::Command;
use toolchain::{cxx, run, sanitizer_env, tempdir, NATIVE_LIBS, SANITIZERS};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `<target>/<profile>/deps`, where this test runs from.
fn deps() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().expect("deps directory").to_path_buf()
}

/// The static library cargo built from this crate for this test: the newest
/// `librelora_cxx*.a` beside it (cargo names it with a hash).
fn staticlib() -> PathBuf {
    let newest = std::fs::read_dir(deps())
        .expect("deps directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with("librelora_cxx") && name.ends_with(".a")
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    newest.unwrap_or_else(|| {
        panic!(
            "no librelora_cxx*.a in {}: build the crate first (cargo test -p relora-cxx builds \
             it)",
            deps().display()
        )
    })
}

/// Where cxx-build put the generated headers (`relora-cxx/src/lib.rs.h`, `rust/cxx.h`).
fn cxxbridge_include() -> PathBuf {
    let target = deps()
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf();
    let dir = target.join("cxxbridge");
    assert!(
        dir.join("rust/cxx.h").is_file(),
        "{} holds no generated bridge headers",
        dir.display()
    );
    dir
}

#[test]
fn cpp_host_through_the_bridge_agrees_with_the_c_abi_and_reduces_through_its_communicator() {
    let bin = tempdir();
    let exe = bin.path().join("cxx_host");

    let repo = crate_dir().join("../..");
    let mut cmd = Command::new(cxx());
    cmd.args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-g"])
        .args(SANITIZERS)
        .arg("-I")
        .arg(cxxbridge_include())
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg("-I")
        .arg(repo.join("include"))
        .arg("-I")
        .arg(repo.join("bindings/cpp"))
        .arg(crate_dir().join("tests/host.cpp"))
        .arg("-o")
        .arg(&exe)
        .arg(staticlib())
        .args(NATIVE_LIBS);
    run(
        &mut cmd,
        "compiling bindings/cxx/tests/host.cpp (ASan + UBSan)",
    );
    let work = tempdir();
    let mut host = Command::new(&exe);
    host.arg(work.path());
    sanitizer_env(&mut host);
    let out = run(&mut host, "bindings/cxx/tests/host.cpp (ASan + UBSan)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        stdout.contains("cxx host: all checks passed"),
        "the host did not report success:\n{stdout}"
    );
}
