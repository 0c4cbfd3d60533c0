//! Builds the C and C++ host programs against the library as C and C++ projects would, and runs
//! them: `tests/c/` (a training host, a misuse suite, a data-safety suite, a two-thread
//! all-reduce) and `tests/cpp/` (the C++ wrapper from two translation units), each against the
//! static and the shared library with `-Wall -Wextra -Werror` and AddressSanitizer +
//! UndefinedBehaviorSanitizer; the C host and the misuse and data-safety suites under valgrind;
//! `tests/cpp/mpi_host.cpp` (a host passing its MPI communicator through the reduce callback)
//! under `mpirun -np 2`; and `tests/cmake-host/` plus a pkg-config build against a prefix laid
//! out by `scripts/install.sh`.
//!
//! Needs gcc and g++ (or `CC` / `CXX`), valgrind, cmake, pkg-config and Open MPI (`mpicxx`,
//! `mpirun`); a missing tool fails the test that needs it with a message saying what to install.
//! The libraries are the ones cargo built from the same sources as this test (see [`libs`]). The
//! training text is `../shared/data/austen-train.txt` when it exists, else the built-in corpus.

mod toolchain;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use toolchain::{cc, cxx, require, run, sanitizer_env, tempdir, NATIVE_LIBS, SANITIZERS, WARNINGS};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The built libraries.
struct Libs {
    dir: PathBuf,
    staticlib: PathBuf,
    shared: PathBuf,
}

/// The libraries built from the same sources as this test: cargo compiles the library with all
/// its crate types (rlib, cdylib, staticlib) into `<target>/<profile>/deps/` before building the
/// tests. When they are not there (an unusual build layout), `cargo build -p relora --lib` for
/// this profile provides them.
fn libs() -> &'static Libs {
    static LIBS: OnceLock<Libs> = OnceLock::new();
    LIBS.get_or_init(|| {
        // This test runs from <target-dir>/<profile-dir>/deps/.
        let exe = std::env::current_exe().expect("test executable path");
        let deps = exe.parent().expect("deps directory");
        let (staticlib, shared) = (deps.join("librelora.a"), deps.join("librelora.so"));
        if staticlib.is_file() && shared.is_file() {
            return Libs {
                dir: deps.to_path_buf(),
                staticlib,
                shared,
            };
        }
        build_libs(deps)
    })
}

/// Runs `cargo build -p relora --lib` for the profile and target directory of this test and
/// returns the libraries it reports.
fn build_libs(deps: &Path) -> Libs {
    let profile_dir = deps.parent().expect("profile directory");
    let target_dir = profile_dir.parent().expect("target directory");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo())
        .args(["build", "-p", "relora", "--lib"])
        .arg("--message-format=json-render-diagnostics")
        .arg("--target-dir")
        .arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => panic!("unexpected test location {}", deps.display()),
    }
    if cfg!(feature = "cuda") {
        cmd.args(["--features", "cuda"]);
    }
    let out = cmd.output().expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build -p relora --lib failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut files = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "relora" {
            for f in msg["filenames"].as_array().into_iter().flatten() {
                files.push(PathBuf::from(f.as_str().unwrap_or_default()));
            }
        }
    }
    let find = |ext: &str| {
        files
            .iter()
            .find(|f| f.extension().is_some_and(|e| e == ext))
            .cloned()
            .unwrap_or_else(|| panic!("cargo built no librelora.{ext}: {files:?}"))
    };
    let shared = find("so");
    Libs {
        dir: shared.parent().expect("library directory").to_path_buf(),
        staticlib: find("a"),
        shared,
    }
}

/// The training text: Jane Austen from the shared data when present, else the built-in corpus.
fn corpus() -> &'static Path {
    static CORPUS: OnceLock<PathBuf> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let austen = repo().join("../shared/data/austen-train.txt");
        if austen.is_file() {
            return austen;
        }
        let path =
            std::env::temp_dir().join(format!("relora-ffi-corpus-{}.txt", std::process::id()));
        std::fs::write(&path, relora::data::builtin_train_text()).expect("write the corpus");
        path
    })
}

/// How a host program is linked.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Link {
    Static,
    Shared,
}

/// Compiles `sources` into `out` with the warning flags, optionally the sanitizers, linked to
/// the library.
fn build(lang_cpp: bool, sources: &[&str], out: &Path, link: Link, sanitize: bool) {
    let compiler = if lang_cpp { cxx() } else { cc() };
    build_with(&compiler, lang_cpp, sources, out, link, sanitize);
}

/// [`build`] with a given compiler driver (e.g. `mpicxx`).
fn build_with(
    compiler: &str,
    lang_cpp: bool,
    sources: &[&str],
    out: &Path,
    link: Link,
    sanitize: bool,
) {
    let mut cmd = Command::new(compiler);
    cmd.arg(if lang_cpp { "-std=c++17" } else { "-std=c99" })
        .args(WARNINGS)
        .arg("-I")
        .arg(repo().join("include"))
        .arg("-I")
        .arg(repo().join("bindings/cpp"))
        .arg("-I")
        .arg(repo().join("tests/c"));
    if sanitize {
        cmd.args(SANITIZERS);
    }
    for s in sources {
        cmd.arg(repo().join(s));
    }
    cmd.arg("-o").arg(out);
    let libs = libs();
    match link {
        Link::Static => {
            cmd.arg(&libs.staticlib).args(NATIVE_LIBS);
        }
        Link::Shared => {
            cmd.arg("-L").arg(&libs.dir).arg("-lrelora");
        }
    }
    run(&mut cmd, &format!("compiling {sources:?} ({link:?})"));
}

/// A command for a built host, with the environment its link and the sanitizers need.
fn host_command(exe: &Path, link: Link) -> Command {
    let mut cmd = Command::new(exe);
    if link == Link::Shared {
        cmd.env("LD_LIBRARY_PATH", &libs().dir);
    }
    sanitizer_env(&mut cmd);
    cmd
}

/// Builds a host and runs it against each library form with the sanitizers; `args` gets the
/// run's scratch directory.
fn sanitized_runs(lang_cpp: bool, sources: &[&str], args: impl Fn(&Path) -> Vec<String>) {
    for link in [Link::Static, Link::Shared] {
        let bin = tempdir();
        let exe = bin.path().join("host");
        build(lang_cpp, sources, &exe, link, true);
        let work = tempdir();
        let out = run(
            host_command(&exe, link).args(args(work.path())),
            &format!("{sources:?} ({link:?}, ASan + UBSan)"),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("all checks passed"),
            "{sources:?} ({link:?}) did not report success:\n{stdout}"
        );
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn c_host_trains_saves_resumes_and_exports() {
    sanitized_runs(false, &["tests/c/host.c"], |work| {
        vec![s(corpus()), s(work)]
    });
}

#[test]
fn c_misuse_gives_statuses_and_messages_not_crashes() {
    sanitized_runs(false, &["tests/c/misuse.c"], |work| vec![s(work)]);
}

#[test]
fn c_data_safety_nothing_foreign_replaced_no_hangs_exact_host_state() {
    sanitized_runs(false, &["tests/c/data_safety.c"], |work| vec![s(work)]);
}

#[test]
fn c_allreduce_of_two_trainers_matches_one_trainer_on_the_whole_batch() {
    sanitized_runs(false, &["tests/c/allreduce.c"], |_| vec![s(corpus())]);
}

#[test]
fn cpp_host_through_the_wrapper_from_two_translation_units() {
    sanitized_runs(
        true,
        &["tests/cpp/host.cpp", "tests/cpp/second_tu.cpp"],
        |work| vec![s(corpus()), s(work)],
    );
}

#[test]
fn cpp_host_passing_its_mpi_communicator_matches_one_process() {
    require("mpicxx", "libopenmpi-dev");
    require("mpirun", "openmpi-bin");
    let bin = tempdir();
    let exe = bin.path().join("mpi_host");
    build_with(
        "mpicxx",
        true,
        &["tests/cpp/mpi_host.cpp"],
        &exe,
        Link::Static,
        false,
    );
    // Two ranks on this machine, as root if need be, one compute thread each; `timeout` ends
    // a hung collective instead of the test run.
    let out = run(
        Command::new("timeout")
            .args(["300", "mpirun", "--oversubscribe", "-np", "2"])
            .arg(&exe)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("RAYON_NUM_THREADS", "1"),
        "tests/cpp/mpi_host.cpp under mpirun -np 2",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("all checks passed") && stdout.contains("2 ranks"),
        "the MPI host did not report success:\n{stdout}"
    );
}

#[test]
fn c_host_misuse_and_data_safety_are_clean_under_valgrind() {
    require("valgrind", "valgrind");
    let bin = tempdir();
    for (source, name) in [
        ("tests/c/misuse.c", "misuse"),
        ("tests/c/data_safety.c", "data_safety"),
        ("tests/c/host.c", "host"),
    ] {
        let exe = bin.path().join(name);
        build(false, &[source], &exe, Link::Static, false);
        let work = tempdir();
        let mut cmd = Command::new("valgrind");
        cmd.args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite",
        ])
        .arg(&exe);
        if name == "host" {
            // Fewer steps: valgrind runs the numeric kernels about 100 times slower.
            cmd.arg(corpus()).arg(work.path()).arg("quick");
        } else {
            cmd.arg(work.path());
        }
        let out = run(&mut cmd, &format!("{source} under valgrind"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("ERROR SUMMARY: 0 errors"),
            "{source}: valgrind reported errors:\n{stderr}"
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("all checks passed"),
            "{source} did not report success under valgrind"
        );
    }
}

#[test]
fn installed_prefix_works_with_cmake_find_package_and_pkg_config() {
    require("cmake", "cmake");
    require("pkg-config", "pkg-config");
    require("bash", "bash");
    let libs = libs();
    let prefix = tempdir();
    run(
        Command::new("bash")
            .arg(repo().join("scripts/install.sh"))
            .arg("--prefix")
            .arg(prefix.path())
            .arg("--lib-dir")
            .arg(&libs.dir),
        "scripts/install.sh",
    );
    for f in [
        "lib/librelora.a",
        "lib/librelora.so",
        "include/relora.h",
        "include/relora.hpp",
        "lib/pkgconfig/relora.pc",
        "lib/pkgconfig/relora-static.pc",
        "lib/cmake/relora/relora-config.cmake",
        "lib/cmake/relora/relora-config-version.cmake",
    ] {
        assert!(
            prefix.path().join(f).is_file(),
            "install.sh did not install {f}"
        );
    }

    // CMake: find_package(relora 0.1) and the imported targets.
    let build_dir = tempdir();
    run(
        Command::new("cmake")
            .arg("-S")
            .arg(repo().join("tests/cmake-host"))
            .arg("-B")
            .arg(build_dir.path())
            .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.path().display()))
            .env("CC", cc())
            .env("CXX", cxx()),
        "cmake configure of tests/cmake-host",
    );
    run(
        Command::new("cmake").arg("--build").arg(build_dir.path()),
        "cmake build of tests/cmake-host",
    );
    for exe in ["cmake_host_cpp", "cmake_host_c_static"] {
        let out = run(
            &mut Command::new(build_dir.path().join(exe)),
            &format!("{exe} built by CMake"),
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("relora"));
    }

    // pkg-config: the shared and the static flavour.
    let pc_path = prefix.path().join("lib/pkgconfig");
    for (package, link) in [("relora", Link::Shared), ("relora-static", Link::Static)] {
        let flags = run(
            Command::new("pkg-config")
                .args(["--cflags", "--libs", package])
                .env("PKG_CONFIG_PATH", &pc_path),
            &format!("pkg-config {package}"),
        );
        let flags = String::from_utf8_lossy(&flags.stdout).into_owned();
        let exe = build_dir.path().join(format!("pkg-{package}"));
        run(
            Command::new(cc())
                .args(["-std=c99"])
                .args(WARNINGS)
                .arg(repo().join("tests/cmake-host/main.c"))
                .arg("-o")
                .arg(&exe)
                .args(flags.split_whitespace()),
            &format!("compiling with pkg-config {package}"),
        );
        let mut cmd = Command::new(&exe);
        if link == Link::Shared {
            cmd.env("LD_LIBRARY_PATH", prefix.path().join("lib"));
        }
        run(
            &mut cmd,
            &format!("program linked with pkg-config {package}"),
        );
    }
    // The shared library installed is the one built.
    assert_eq!(
        std::fs::metadata(prefix.path().join("lib/librelora.so"))
            .unwrap()
            .len(),
        std::fs::metadata(&libs.shared).unwrap().len()
    );
}
