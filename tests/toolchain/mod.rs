//! The toolchain side of the tests that build real C and C++ hosts (`tests/ffi_hosts.rs`,
//! `bindings/cxx/tests/cxx_host.rs`): compilers, flags, sanitizers, and running what was built.
#![allow(dead_code)]

use std::process::{Command, Output};

/// The system libraries a Rust static library needs on Linux (`rustc --print
/// native-static-libs`); the same list is in `scripts/install.sh`.
pub const NATIVE_LIBS: &[&str] = &[
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

/// Warnings, all errors, with debug information.
pub const WARNINGS: &[&str] = &["-Wall", "-Wextra", "-Wpedantic", "-Werror", "-g"];

/// AddressSanitizer and UndefinedBehaviorSanitizer, stopping at the first report.
pub const SANITIZERS: &[&str] = &[
    "-fsanitize=address,undefined",
    "-fno-omit-frame-pointer",
    "-fno-sanitize-recover=undefined",
];

/// Runs a command, failing the test with its output when it cannot start or exits non-zero.
pub fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {:?}: {e}", cmd.get_program()));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n--- command: {cmd:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Fails the test unless `tool` runs, naming the package to install.
pub fn require(tool: &str, package: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "this test needs `{tool}`, which was not found: install it (Debian: apt-get install -y \
         {package})"
    );
}

/// The C compiler (`CC`, else gcc).
pub fn cc() -> String {
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".into());
    require(&cc, "gcc");
    cc
}

/// The C++ compiler (`CXX`, else g++).
pub fn cxx() -> String {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    require(&cxx, "g++");
    cxx
}

/// The environment a sanitized host runs with: leaks reported, a distinct exit code.
pub fn sanitizer_env(cmd: &mut Command) {
    cmd.env(
        "ASAN_OPTIONS",
        "detect_leaks=1:abort_on_error=0:exitcode=86",
    )
    .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1");
}

/// A fresh scratch directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}
