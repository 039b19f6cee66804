//! The committed header is what cbindgen generates now, its version macros match Cargo.toml,
//! and every exported function runs inside the panic boundary.
//!
//! `CBCE_BLESS_HEADER=1 cargo test --test header` rewrites `include/cbce.h` instead of failing.

use std::path::Path;

const GENERATED: &str = include_str!(concat!(env!("OUT_DIR"), "/cbce.h"));

fn committed_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include/cbce.h")
}

#[test]
fn committed_header_matches_cbindgen() {
    let path = committed_path();
    if std::env::var_os("CBCE_BLESS_HEADER").is_some() {
        std::fs::write(&path, GENERATED).expect("write include/cbce.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).expect("include/cbce.h exists");
    assert!(
        committed == GENERATED,
        "include/cbce.h differs from what cbindgen generates; run \
         `CBCE_BLESS_HEADER=1 cargo test --test header` and commit the result"
    );
}

fn macro_value<'a>(header: &'a str, name: &str) -> &'a str {
    header
        .lines()
        .find_map(|line| line.strip_prefix("#define ")?.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("the header defines no {name}"))
        .trim()
}

#[test]
fn version_macros_match_the_package() {
    let header = std::fs::read_to_string(committed_path()).expect("include/cbce.h exists");
    assert_eq!(macro_value(&header, "CBCE_VERSION_MAJOR"), env!("CARGO_PKG_VERSION_MAJOR"));
    assert_eq!(macro_value(&header, "CBCE_VERSION_MINOR"), env!("CARGO_PKG_VERSION_MINOR"));
    assert_eq!(macro_value(&header, "CBCE_VERSION_PATCH"), env!("CARGO_PKG_VERSION_PATCH"));
    let quoted = format!("\"{}\"", env!("CARGO_PKG_VERSION"));
    assert_eq!(macro_value(&header, "CBCE_VERSION_STRING"), quoted);

    // SAFETY: cbce_version returns a static NUL-terminated string.
    let runtime = unsafe { std::ffi::CStr::from_ptr(cbce::ffi::cbce_version()) };
    assert_eq!(runtime.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn every_export_runs_inside_the_panic_boundary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut exports = std::collections::BTreeSet::new();
    for entry in walk(&root) {
        let source = std::fs::read_to_string(&entry).unwrap();
        let mut rest = source.as_str();
        while let Some(at) = rest.find("extern \"C\" fn ") {
            let after = &rest[at + "extern \"C\" fn ".len()..];
            let name: String =
                after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            let body_start = after.find('{').expect("a function body");
            let body = &after[body_start..];
            let first_statement = body[1..].trim_start();
            assert!(
                first_statement.starts_with("boundary::status(")
                    || first_statement.starts_with("boundary::value("),
                "{}: `{name}` does not start inside the panic boundary",
                entry.display()
            );
            exports.insert(name);
            rest = after;
        }
    }
    // Every function the header declares was among those checked.
    let header = std::fs::read_to_string(committed_path()).unwrap();
    let declared: std::collections::BTreeSet<String> = header
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '('))
        .filter_map(|word| word.strip_suffix('('))
        .filter(|name| name.starts_with("cbce_"))
        .map(str::to_string)
        .collect();
    assert!(!declared.is_empty(), "no function found in the header");
    let unchecked: Vec<_> = declared.difference(&exports).collect();
    assert!(unchecked.is_empty(), "declared but not checked: {unchecked:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}
