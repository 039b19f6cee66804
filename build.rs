//! Generates the C header from the C-facing sources into OUT_DIR (`cbce.h`). The committed
//! `include/cbce.h` is checked against it by `tests/header.rs`.
//! With the `cuda` feature, also compiles the kernels of `kernels/` (see kernels/compile.rs).

use std::env;
use std::path::PathBuf;

#[path = "kernels/compile.rs"]
mod kernels;

/// Sources cbindgen reads: the exported functions and types, and the status enum.
const HEADER_SOURCES: &[&str] = &["src/ffi/api.rs", "src/ffi/types.rs", "src/error.rs"];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    println!("cargo:rerun-if-changed=cbindgen.toml");
    for source in HEADER_SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }

    generate_header(&manifest_dir, &out_dir.join("cbce.h"));
    kernels::build_if_enabled(&manifest_dir, &out_dir);
    link_soname();
}

/// Gives the shared library on ELF systems the SONAME that the installed files are named after
/// (CMakeLists.txt): `libcbce.so.<major>`, or `libcbce.so.0.<minor>` while the major version is
/// 0, because a 0.x minor release may break the ABI.
fn link_soname() {
    let target_os = env::var("CARGO_CFG_TARGET_OS").expect("set by cargo");
    if !matches!(target_os.as_str(), "linux" | "android" | "freebsd" | "netbsd" | "openbsd") {
        return;
    }
    let major = env::var("CARGO_PKG_VERSION_MAJOR").expect("set by cargo");
    let minor = env::var("CARGO_PKG_VERSION_MINOR").expect("set by cargo");
    let abi_version = if major == "0" { format!("0.{minor}") } else { major };
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcbce.so.{abi_version}");
}

fn generate_header(manifest_dir: &std::path::Path, out: &std::path::Path) {
    let mut config = cbindgen::Config::from_file(manifest_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is valid");
    let version = env::var("CARGO_PKG_VERSION").expect("set by cargo");
    let part = |name: &str| env::var(name).expect("set by cargo");
    config.after_includes = Some(format!(
        "\n#define CBCE_VERSION_MAJOR {}\n#define CBCE_VERSION_MINOR {}\n\
         #define CBCE_VERSION_PATCH {}\n#define CBCE_VERSION_STRING \"{version}\"\n",
        part("CARGO_PKG_VERSION_MAJOR"),
        part("CARGO_PKG_VERSION_MINOR"),
        part("CARGO_PKG_VERSION_PATCH"),
    ));
    let mut builder = cbindgen::Builder::new().with_config(config);
    for source in HEADER_SOURCES {
        builder = builder.with_src(manifest_dir.join(source));
    }
    builder
        .generate()
        .unwrap_or_else(|e| panic!("cbindgen could not generate the header: {e}"))
        .write_to_file(out);
}
