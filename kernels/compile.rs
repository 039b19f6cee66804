//! The build script's CUDA part (build.rs includes this file): with the `cuda` feature on,
//! compiles each kernel family `kernels/<family>.cu` with nvcc into `OUT_DIR/<family>.fatbin`,
//! holding machine code for sm_80 and sm_90 (each kernel assembled by ptxas for both) and
//! PTX that drivers compile for newer devices.
//!
//! nvcc is `$NVCC`, else `$CUDA_PATH/bin/nvcc`, else `nvcc` on the PATH. Every `.cu` and
//! `.cuh` file is registered for rebuilds, and a failing compile shows nvcc's whole output.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel families, one `.cu` file and one fatbin each.
const FAMILIES: &[&str] = &["counts", "state", "loss"];

/// Machine code for Ampere (sm_80) and Hopper (sm_90), and sm_90 PTX for later devices.
const GENCODE: &[&str] = &[
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
];

/// Builds the fatbins when the `cuda` feature is on; does nothing otherwise.
pub fn build_if_enabled(manifest_dir: &Path, out_dir: &Path) {
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let kernels = manifest_dir.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .expect("kernels/ exists")
        .map(|entry| entry.expect("kernels/ is readable").path())
        .filter(|path| path.extension().is_some_and(|e| e == "cu" || e == "cuh"))
        .collect();
    sources.sort();
    for source in &sources {
        println!("cargo:rerun-if-changed={}", source.display());
    }

    let nvcc = nvcc();
    // The families compile in parallel; each nvcc also runs its three targets in parallel.
    let jobs: Vec<_> = FAMILIES
        .iter()
        .map(|family| {
            let source = kernels.join(format!("{family}.cu"));
            let output = out_dir.join(format!("{family}.fatbin"));
            let nvcc = nvcc.clone();
            std::thread::spawn(move || compile(&nvcc, &source, &output))
        })
        .collect();
    for job in jobs {
        job.join().expect("an nvcc job panicked");
    }
}

fn nvcc() -> PathBuf {
    if let Some(path) = env::var_os("NVCC") {
        return PathBuf::from(path);
    }
    if let Some(root) = env::var_os("CUDA_PATH") {
        let candidate = PathBuf::from(root).join("bin").join("nvcc");
        if candidate.is_file() {
            return candidate;
        }
    }
    PathBuf::from("nvcc")
}

fn compile(nvcc: &Path, source: &Path, output: &Path) {
    let mut command = Command::new(nvcc);
    command
        .arg("--fatbin")
        .args(["-std=c++17", "-O3", "--threads=2", "--Werror=all-warnings"])
        .args(GENCODE)
        .arg("-o")
        .arg(output)
        .arg(source);
    let result = command.output().unwrap_or_else(|e| {
        panic!(
            "could not run nvcc ({}): {e}\nset NVCC or CUDA_PATH, or run scripts/setup_cuda.sh",
            nvcc.display()
        )
    });
    if !result.status.success() {
        panic!(
            "nvcc failed on {} ({}):\n{command:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            source.display(),
            result.status,
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr),
        );
    }
}
