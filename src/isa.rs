//! The vector instruction sets the CPU kernels are compiled for. A pass detects the widest one
//! once and runs every chunk with it; each variant performs the same floating-point operations
//! in the same order, so all of them give the same bits.

/// One build of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
// Only x86_64 builds the vector variants (and Miri runs none of them).
#[cfg_attr(any(not(target_arch = "x86_64"), miri), allow(dead_code))]
pub(crate) enum Isa {
    /// AVX-512F with FMA (x86_64).
    Avx512,
    /// AVX2 with FMA (x86_64).
    Avx2,
    /// Whatever the target offers without run-time detection.
    Baseline,
}

impl Isa {
    /// The widest build this CPU runs.
    pub(crate) fn detect() -> Isa {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        {
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    /// Every build this CPU runs, widest first.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let widest = Isa::detect();
        [Isa::Avx512, Isa::Avx2, Isa::Baseline]
            .into_iter()
            .skip_while(|&isa| isa != widest)
            .collect()
    }
}
