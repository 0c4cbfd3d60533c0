#!/usr/bin/env bash
# Installs librelora for C and C++ hosts under a prefix:
#
#   PREFIX/lib/librelora.a  PREFIX/lib/librelora.so
#   PREFIX/include/relora.h  PREFIX/include/relora.hpp (the header-only C++17 wrapper)
#   PREFIX/lib/pkgconfig/relora.pc  PREFIX/lib/pkgconfig/relora-static.pc
#   PREFIX/lib/cmake/relora/relora-config.cmake  relora-config-version.cmake
#
# usage: scripts/install.sh --prefix DIR [--profile release|dev|NAME] [--features LIST]
#                           [--lib-dir DIR]
#   --profile   cargo profile to build (default: release)
#   --features  cargo features of the relora crate, e.g. cuda
#   --lib-dir   take librelora.a and librelora.so from DIR instead of building them
#
# Hosts then use find_package(relora) (CMAKE_PREFIX_PATH=DIR) or
# pkg-config --cflags --libs relora (PKG_CONFIG_PATH=DIR/lib/pkgconfig).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix=""
profile="release"
features=""
lib_dir=""

die() {
    echo "install.sh: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="${2:-}"; shift 2 ;;
        --profile) profile="${2:-}"; shift 2 ;;
        --features) features="${2:-}"; shift 2 ;;
        --lib-dir) lib_dir="${2:-}"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[ -n "$prefix" ] || die "--prefix DIR is required"
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"

# The system libraries a Rust static library needs on Linux (rustc --print native-static-libs).
native_libs="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"
cmake_native_libs="gcc_s;util;rt;pthread;m;dl;c"

if [ -z "$lib_dir" ]; then
    command -v cargo >/dev/null || die "cargo is needed to build the library (or pass --lib-dir)"
    args=(build --manifest-path "$here/Cargo.toml" -p relora --lib --profile "$profile")
    [ -n "$features" ] && args+=(--features "$features")
    cargo "${args[@]}"
    target_dir="${CARGO_TARGET_DIR:-$here/target}"
    case "$profile" in
        dev) lib_dir="$target_dir/debug" ;;
        *) lib_dir="$target_dir/$profile" ;;
    esac
fi
for f in librelora.a librelora.so; do
    [ -f "$lib_dir/$f" ] || die "$lib_dir/$f not found"
done

header="$here/include/relora.h"
version_part() {
    sed -n "s/^#define RELORA_$1 \([0-9][0-9]*\)$/\1/p" "$header"
}
major="$(version_part VERSION_MAJOR)"
minor="$(version_part VERSION_MINOR)"
patch="$(version_part VERSION_PATCH)"
abi="$(version_part ABI_VERSION)"
[ -n "$major" ] && [ -n "$minor" ] && [ -n "$patch" ] && [ -n "$abi" ] ||
    die "cannot read the version macros from $header"
version="$major.$minor.$patch"

install -d "$prefix/lib/pkgconfig" "$prefix/lib/cmake/relora" "$prefix/include"
install -m 644 "$lib_dir/librelora.a" "$prefix/lib/librelora.a"
install -m 755 "$lib_dir/librelora.so" "$prefix/lib/librelora.so"
install -m 644 "$header" "$prefix/include/relora.h"
install -m 644 "$here/bindings/cpp/relora.hpp" "$prefix/include/relora.hpp"

fill() {
    sed -e "s|@PREFIX@|$prefix|g" \
        -e "s|@VERSION@|$version|g" \
        -e "s|@VERSION_MAJOR@|$major|g" \
        -e "s|@VERSION_MINOR@|$minor|g" \
        -e "s|@ABI_VERSION@|$abi|g" \
        -e "s|@NATIVE_LIBS@|$native_libs|g" \
        -e "s|@CMAKE_NATIVE_LIBS@|$cmake_native_libs|g" \
        "$1" > "$2"
}
fill "$here/packaging/relora.pc.in" "$prefix/lib/pkgconfig/relora.pc"
fill "$here/packaging/relora-static.pc.in" "$prefix/lib/pkgconfig/relora-static.pc"
fill "$here/packaging/relora-config.cmake.in" "$prefix/lib/cmake/relora/relora-config.cmake"
fill "$here/packaging/relora-config-version.cmake.in" \
    "$prefix/lib/cmake/relora/relora-config-version.cmake"

echo "installed relora $version (ABI $abi) into $prefix"
