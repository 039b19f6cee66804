//! The tile kernel's float32 lane vectors, in three builds: two AVX-512 registers, four AVX2
//! registers, and plain arrays. Two or four registers rather than one let the long dependency
//! chains of [`exp`] on different registers overlap. Each operation is the same IEEE operation on every lane in every
//! build, and [`exp`] and [`ln`] are written once over the operations, so the builds give the
//! same bits as each other and as the scalar [`crate::math`] functions.
//!
//! The x86 builds call the intrinsics from `#[inline(always)]` methods without target features
//! of their own: they are only ever inlined into the kernels' `#[target_feature]` variants
//! (see `cpu.rs`), which a pass runs only after detecting those features.

/// Lanes of a vector.
pub(crate) const LANES: usize = 32;

/// `LANES` float32 lanes; also read as 32-bit integers by the `bits_*` operations.
pub(crate) trait F32Lanes: Copy {
    /// One flag per lane.
    type Mask: Copy;

    fn splat(value: f32) -> Self;
    /// # Safety
    /// `source` points to `LANES` readable float32 (any alignment).
    unsafe fn load(source: *const f32) -> Self;
    /// # Safety
    /// `target` points to `LANES` writable float32 (any alignment).
    unsafe fn store(self, target: *mut f32);
    /// Stores without first reading the destination's cache line, where the build can.
    ///
    /// # Safety
    /// `target` points to `LANES` writable float32 on a 64-byte boundary.
    unsafe fn stream(self, target: *mut f32);
    fn to_array(self) -> [f32; LANES] {
        let mut lanes = [0.0; LANES];
        // SAFETY: `lanes` holds `LANES` float32.
        unsafe { self.store(lanes.as_mut_ptr()) };
        lanes
    }
    fn from_array(lanes: &[f32; LANES]) -> Self {
        // SAFETY: `lanes` holds `LANES` float32.
        unsafe { Self::load(lanes.as_ptr()) }
    }

    fn add(self, other: Self) -> Self;
    fn sub(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    fn div(self, other: Self) -> Self;
    /// `self * factor + addend`, rounded once.
    fn mul_add(self, factor: Self, addend: Self) -> Self;
    /// `candidate` where it is larger than `self`, else `self`, as [`crate::Real::larger`].
    fn larger(self, candidate: Self) -> Self;
    /// `limit` where `self` is above it, else `self` (so NaN stays NaN).
    fn at_most(self, limit: Self) -> Self;
    /// `limit` where `self` is below it, else `self` (so NaN stays NaN).
    fn at_least(self, limit: Self) -> Self;

    fn less(self, other: Self) -> Self::Mask;
    fn equal(self, other: Self) -> Self::Mask;
    /// Lanes that are not >= 0: negative or NaN.
    fn negative_or_nan(self) -> Self::Mask;
    /// `if_true` where `mask` is set, else `if_false`.
    fn select(mask: Self::Mask, if_true: Self, if_false: Self) -> Self;

    /// The lanes' bits plus `value`, wrapping.
    fn bits_add(self, value: u32) -> Self;
    fn bits_and(self, value: u32) -> Self;
    fn bits_or(self, value: u32) -> Self;
    fn bits_shl23(self) -> Self;
    fn bits_shr23(self) -> Self;
    /// The lanes' bits as signed integers, converted to float32.
    fn bits_to_float(self) -> Self;
}

/// e^x on every lane: the operations of [`crate::math::exp_f32`], in its order.
#[inline(always)]
pub(crate) fn exp<V: F32Lanes>(x: V) -> V {
    const LOWEST: f32 = -88.0;
    const HIGHEST: f32 = 88.376_26;
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    const ROUNDER: f32 = 12_582_912.0;

    let clamped = x.at_most(V::splat(HIGHEST)).at_least(V::splat(LOWEST));
    let shifted = clamped.mul_add(V::splat(std::f32::consts::LOG2_E), V::splat(ROUNDER));
    let n = shifted.sub(V::splat(ROUNDER));
    let r = n.mul_add(V::splat(-LN2_HIGH), clamped);
    let r = n.mul_add(V::splat(-LN2_LOW), r);

    let mut e_r = V::splat(8.312_535e-3);
    for c in [4.189_01e-2, 0.166_671_14, 0.499_992_3, 1.0, 1.0] {
        e_r = e_r.mul_add(r, V::splat(c));
    }

    let scale = shifted.bits_add(127u32.wrapping_sub(ROUNDER.to_bits())).bits_shl23();
    e_r.mul(scale)
}

/// ln(x) on every lane: the operations of [`crate::math::ln_f32`], in its order.
#[inline(always)]
pub(crate) fn ln<V: F32Lanes>(x: V) -> V {
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;

    let exponent = x.bits_shr23().bits_and(0xff).bits_add(126u32.wrapping_neg()).bits_to_float();
    let mantissa = x.bits_and(0x007f_ffff).bits_or(0x3f00_0000);
    let one = V::splat(1.0);
    let low = mantissa.less(V::splat(std::f32::consts::FRAC_1_SQRT_2));
    let e = V::select(low, exponent.sub(one), exponent);
    let m = V::select(low, mantissa.add(mantissa).sub(one), mantissa.sub(one));

    let z = m.mul(m);
    let mut p = V::splat(7.037_683_6e-2);
    for c in [
        -1.151_461e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_4e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ] {
        p = p.mul(m).add(V::splat(c));
    }
    let y = p.mul(m).mul(z).add(e.mul(V::splat(LN2_LOW))).sub(V::splat(0.5).mul(z));
    let value = m.add(y).add(e.mul(V::splat(LN2_HIGH)));

    let value = V::select(x.equal(V::splat(f32::INFINITY)), V::splat(f32::INFINITY), value);
    let value = V::select(x.equal(V::splat(0.0)), V::splat(f32::NEG_INFINITY), value);
    V::select(x.negative_or_nan(), V::splat(f32::NAN), value)
}

/// The portable build: an array, one lane at a time.
#[derive(Clone, Copy)]
pub(crate) struct Lanes([f32; LANES]);

impl Lanes {
    #[inline(always)]
    fn map(self, f: impl Fn(f32) -> f32) -> Self {
        Lanes(self.0.map(f))
    }
    #[inline(always)]
    fn zip(self, other: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Lanes(std::array::from_fn(|i| f(self.0[i], other.0[i])))
    }
    #[inline(always)]
    fn test(self, other: Self, f: impl Fn(f32, f32) -> bool) -> [bool; LANES] {
        std::array::from_fn(|i| f(self.0[i], other.0[i]))
    }
    #[inline(always)]
    fn map_bits(self, f: impl Fn(u32) -> u32) -> Self {
        self.map(|x| f32::from_bits(f(x.to_bits())))
    }
}

impl F32Lanes for Lanes {
    type Mask = [bool; LANES];

    #[inline(always)]
    fn splat(value: f32) -> Self {
        Lanes([value; LANES])
    }
    #[inline(always)]
    unsafe fn load(source: *const f32) -> Self {
        // SAFETY: the caller passes `LANES` readable float32; any alignment is allowed.
        Lanes(unsafe { source.cast::<[f32; LANES]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, target: *mut f32) {
        // SAFETY: the caller passes `LANES` writable float32.
        unsafe { target.cast::<[f32; LANES]>().write_unaligned(self.0) }
    }
    #[inline(always)]
    unsafe fn stream(self, target: *mut f32) {
        // SAFETY: as store.
        unsafe { self.store(target) }
    }
    #[inline(always)]
    fn to_array(self) -> [f32; LANES] {
        self.0
    }
    #[inline(always)]
    fn from_array(lanes: &[f32; LANES]) -> Self {
        Lanes(*lanes)
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        self.zip(other, |a, b| a + b)
    }
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        self.zip(other, |a, b| a - b)
    }
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        self.zip(other, |a, b| a * b)
    }
    #[inline(always)]
    fn div(self, other: Self) -> Self {
        self.zip(other, |a, b| a / b)
    }
    #[inline(always)]
    fn mul_add(self, factor: Self, addend: Self) -> Self {
        Lanes(std::array::from_fn(|i| self.0[i].mul_add(factor.0[i], addend.0[i])))
    }
    #[inline(always)]
    fn larger(self, candidate: Self) -> Self {
        self.zip(candidate, |a, c| if c > a { c } else { a })
    }
    #[inline(always)]
    fn at_most(self, limit: Self) -> Self {
        self.zip(limit, |a, l| if a > l { l } else { a })
    }
    #[inline(always)]
    fn at_least(self, limit: Self) -> Self {
        self.zip(limit, |a, l| if a < l { l } else { a })
    }
    #[inline(always)]
    fn less(self, other: Self) -> [bool; LANES] {
        self.test(other, |a, b| a < b)
    }
    #[inline(always)]
    fn equal(self, other: Self) -> [bool; LANES] {
        self.test(other, |a, b| a == b)
    }
    #[inline(always)]
    fn negative_or_nan(self) -> [bool; LANES] {
        self.0.map(|a| a < 0.0 || a.is_nan())
    }
    #[inline(always)]
    fn select(mask: [bool; LANES], if_true: Self, if_false: Self) -> Self {
        Lanes(std::array::from_fn(|i| if mask[i] { if_true.0[i] } else { if_false.0[i] }))
    }
    #[inline(always)]
    fn bits_add(self, value: u32) -> Self {
        self.map_bits(|b| b.wrapping_add(value))
    }
    #[inline(always)]
    fn bits_and(self, value: u32) -> Self {
        self.map_bits(|b| b & value)
    }
    #[inline(always)]
    fn bits_or(self, value: u32) -> Self {
        self.map_bits(|b| b | value)
    }
    #[inline(always)]
    fn bits_shl23(self) -> Self {
        self.map_bits(|b| b << 23)
    }
    #[inline(always)]
    fn bits_shr23(self) -> Self {
        self.map_bits(|b| b >> 23)
    }
    #[inline(always)]
    fn bits_to_float(self) -> Self {
        self.map(|x| x.to_bits() as i32 as f32)
    }
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(all(target_arch = "x86_64", not(miri)))]
mod x86 {
    // Every `unsafe` block below only runs instructions of the build's feature set, which the
    // caller of a kernel variant has detected (see the module documentation); pointer
    // arguments carry the trait's documented contracts.

    use super::{F32Lanes, LANES};
    use std::arch::x86_64::*;

    /// Defines a build over `$count` registers `$reg` of `$width` lanes: each operation runs
    /// on every register in turn, so the registers' dependency chains interleave.
    macro_rules! build {
        (
            $name:ident, $reg:ty, $int:ty, $width:literal, $mask:ty,
            set1: $set1:ident, loadu: $loadu:ident, storeu: $storeu:ident, stream: $stream:ident,
            add: $add:ident, sub: $sub:ident, mul: $mul:ident, div: $div:ident, fma: $fma:ident,
            max: $max:ident, min: $min:ident, cast_int: $to_int:ident, cast_float: $to_float:ident,
            set1_int: $set1_int:ident, add_int: $add_int:ident, and_int: $and_int:ident,
            or_int: $or_int:ident, shl: $shl:ident, shr: $shr:ident, convert: $convert:ident,
            compare: $compare:ident, blend: $blend:ident,
        ) => {
            #[derive(Clone, Copy)]
            pub(crate) struct $name([$reg; LANES / $width]);

            impl $name {
                #[inline(always)]
                fn each(self, other: Self, f: impl Fn($reg, $reg) -> $reg) -> Self {
                    $name(std::array::from_fn(|i| f(self.0[i], other.0[i])))
                }
                #[inline(always)]
                fn each_int(self, f: impl Fn($int) -> $int) -> Self {
                    $name(self.0.map(|x| unsafe { $to_float(f($to_int(x))) }))
                }
                #[inline(always)]
                fn test<const P: i32>(self, other: Self) -> [$mask; LANES / $width] {
                    std::array::from_fn(|i| unsafe { $compare::<P>(self.0[i], other.0[i]) })
                }
            }

            impl F32Lanes for $name {
                type Mask = [$mask; LANES / $width];

                #[inline(always)]
                fn splat(value: f32) -> Self {
                    $name([unsafe { $set1(value) }; LANES / $width])
                }
                #[inline(always)]
                unsafe fn load(source: *const f32) -> Self {
                    $name(std::array::from_fn(|i| unsafe { $loadu(source.add(i * $width)) }))
                }
                #[inline(always)]
                unsafe fn store(self, target: *mut f32) {
                    for (i, &x) in self.0.iter().enumerate() {
                        unsafe { $storeu(target.add(i * $width), x) }
                    }
                }
                #[inline(always)]
                unsafe fn stream(self, target: *mut f32) {
                    for (i, &x) in self.0.iter().enumerate() {
                        unsafe { $stream(target.add(i * $width), x) }
                    }
                }
                #[inline(always)]
                fn add(self, other: Self) -> Self {
                    self.each(other, |a, b| unsafe { $add(a, b) })
                }
                #[inline(always)]
                fn sub(self, other: Self) -> Self {
                    self.each(other, |a, b| unsafe { $sub(a, b) })
                }
                #[inline(always)]
                fn mul(self, other: Self) -> Self {
                    self.each(other, |a, b| unsafe { $mul(a, b) })
                }
                #[inline(always)]
                fn div(self, other: Self) -> Self {
                    self.each(other, |a, b| unsafe { $div(a, b) })
                }
                #[inline(always)]
                fn mul_add(self, factor: Self, addend: Self) -> Self {
                    $name(std::array::from_fn(|i| unsafe {
                        $fma(self.0[i], factor.0[i], addend.0[i])
                    }))
                }
                // max(a, b) and min(a, b) return b unless a compares larger (smaller): the
                // ordered comparison the scalar code makes, NaN falling to b.
                #[inline(always)]
                fn larger(self, candidate: Self) -> Self {
                    candidate.each(self, |c, x| unsafe { $max(c, x) })
                }
                #[inline(always)]
                fn at_most(self, limit: Self) -> Self {
                    limit.each(self, |l, x| unsafe { $min(l, x) })
                }
                #[inline(always)]
                fn at_least(self, limit: Self) -> Self {
                    limit.each(self, |l, x| unsafe { $max(l, x) })
                }
                #[inline(always)]
                fn less(self, other: Self) -> Self::Mask {
                    self.test::<_CMP_LT_OQ>(other)
                }
                #[inline(always)]
                fn equal(self, other: Self) -> Self::Mask {
                    self.test::<_CMP_EQ_OQ>(other)
                }
                #[inline(always)]
                fn negative_or_nan(self) -> Self::Mask {
                    self.test::<_CMP_NGE_UQ>(Self::splat(0.0))
                }
                #[inline(always)]
                fn select(mask: Self::Mask, if_true: Self, if_false: Self) -> Self {
                    $name(std::array::from_fn(|i| unsafe {
                        $blend(mask[i], if_false.0[i], if_true.0[i])
                    }))
                }
                #[inline(always)]
                fn bits_add(self, value: u32) -> Self {
                    self.each_int(|x| unsafe { $add_int(x, $set1_int(value as i32)) })
                }
                #[inline(always)]
                fn bits_and(self, value: u32) -> Self {
                    self.each_int(|x| unsafe { $and_int(x, $set1_int(value as i32)) })
                }
                #[inline(always)]
                fn bits_or(self, value: u32) -> Self {
                    self.each_int(|x| unsafe { $or_int(x, $set1_int(value as i32)) })
                }
                #[inline(always)]
                fn bits_shl23(self) -> Self {
                    self.each_int(|x| unsafe { $shl::<23>(x) })
                }
                #[inline(always)]
                fn bits_shr23(self) -> Self {
                    self.each_int(|x| unsafe { $shr::<23>(x) })
                }
                #[inline(always)]
                fn bits_to_float(self) -> Self {
                    $name(self.0.map(|x| unsafe { $convert($to_int(x)) }))
                }
            }
        };
    }

    build!(
        Avx512, __m512, __m512i, 16, __mmask16,
        set1: _mm512_set1_ps, loadu: _mm512_loadu_ps, storeu: _mm512_storeu_ps,
        stream: _mm512_stream_ps,
        add: _mm512_add_ps, sub: _mm512_sub_ps, mul: _mm512_mul_ps, div: _mm512_div_ps,
        fma: _mm512_fmadd_ps,
        max: _mm512_max_ps, min: _mm512_min_ps,
        cast_int: _mm512_castps_si512, cast_float: _mm512_castsi512_ps,
        set1_int: _mm512_set1_epi32, add_int: _mm512_add_epi32, and_int: _mm512_and_si512,
        or_int: _mm512_or_si512, shl: _mm512_slli_epi32, shr: _mm512_srli_epi32,
        convert: _mm512_cvtepi32_ps,
        compare: _mm512_cmp_ps_mask, blend: blend_avx512,
    );

    build!(
        Avx2, __m256, __m256i, 8, __m256,
        set1: _mm256_set1_ps, loadu: _mm256_loadu_ps, storeu: _mm256_storeu_ps,
        stream: _mm256_stream_ps,
        add: _mm256_add_ps, sub: _mm256_sub_ps, mul: _mm256_mul_ps, div: _mm256_div_ps,
        fma: _mm256_fmadd_ps,
        max: _mm256_max_ps, min: _mm256_min_ps,
        cast_int: _mm256_castps_si256, cast_float: _mm256_castsi256_ps,
        set1_int: _mm256_set1_epi32, add_int: _mm256_add_epi32, and_int: _mm256_and_si256,
        or_int: _mm256_or_si256, shl: _mm256_slli_epi32, shr: _mm256_srli_epi32,
        convert: _mm256_cvtepi32_ps,
        compare: _mm256_cmp_ps, blend: blend_avx2,
    );

    /// `if_true` where `mask` is set, else `if_false`.
    #[inline(always)]
    unsafe fn blend_avx512(mask: __mmask16, if_false: __m512, if_true: __m512) -> __m512 {
        unsafe { _mm512_mask_blend_ps(mask, if_false, if_true) }
    }

    /// `if_true` where `mask` is set, else `if_false`.
    #[inline(always)]
    unsafe fn blend_avx2(mask: __m256, if_false: __m256, if_true: __m256) -> __m256 {
        unsafe { _mm256_blendv_ps(if_false, if_true, mask) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::Isa;
    use crate::math::{exp_f32, ln_f32};

    /// Inputs that reach every branch of exp and ln: ordinary values, both clamps, zeros,
    /// infinities, NaN, subnormals and negatives.
    fn inputs() -> Vec<f32> {
        let mut values = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -87.9,
            -88.5,
            88.3,
            88.5,
            1.0e-40,
            f32::MIN_POSITIVE,
            f32::MAX,
            std::f32::consts::FRAC_1_SQRT_2,
            f32::from_bits(std::f32::consts::FRAC_1_SQRT_2.to_bits() - 1),
        ];
        let mut x = -100.0f32;
        while x < 100.0 {
            values.push(x);
            values.push(x.abs() * 1.0e-3);
            x += 0.173;
        }
        values.resize(values.len().next_multiple_of(LANES), 0.5);
        values
    }

    fn check<V: F32Lanes>(name: &str) {
        for lanes in inputs().chunks_exact(LANES) {
            let v = V::from_array(lanes.try_into().unwrap());
            for (i, (&x, (e, l))) in
                lanes.iter().zip(exp(v).to_array().iter().zip(ln(v).to_array())).enumerate()
            {
                assert_eq!(e.to_bits(), exp_f32(x).to_bits(), "{name} exp({x}), lane {i}");
                assert_eq!(l.to_bits(), ln_f32(x).to_bits(), "{name} ln({x}), lane {i}");
            }
        }
    }

    #[test]
    fn every_build_gives_the_scalar_bits() {
        check::<Lanes>("portable");
        for isa in Isa::available() {
            match isa {
                #[cfg(all(target_arch = "x86_64", not(miri)))]
                // SAFETY: the CPU runs this build, as Isa::available checked.
                Isa::Avx512 => unsafe { check_avx512() },
                #[cfg(all(target_arch = "x86_64", not(miri)))]
                // SAFETY: as above.
                Isa::Avx2 => unsafe { check_avx2() },
                _ => {}
            }
        }
    }

    #[cfg(all(target_arch = "x86_64", not(miri)))]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn check_avx512() {
        check::<Avx512>("avx512");
    }

    #[cfg(all(target_arch = "x86_64", not(miri)))]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn check_avx2() {
        check::<Avx2>("avx2");
    }
}
