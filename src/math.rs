//! Elementary functions for the softmax that the compiler can vectorise: branch-free, no calls
//! into libm, within two ulps of the correctly rounded result over the range the loss uses.

/// e^x in float32 by range reduction x = n ln2 + r, |r| <= ln2 / 2, and a degree-5 polynomial
/// for e^r (coefficients fitted for the least relative error on that interval), scaled by 2^n
/// through the exponent bits. Products and sums are fused (`mul_add`), which is one instruction
/// on CPUs with FMA and an exact library call elsewhere, so every CPU gets the same bits.
///
/// Exact to within two ulps for x in [-87.33, 88.37]; below about -87.7 it returns 0 (the true
/// value is a float32 subnormal), above 88.37 it returns e^88.37 (the softmax only evaluates it
/// at x - max(x) <= 0, so no test is spent on large x); NaN gives NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // Clamping here makes n = -127, whose scale 2^-127 is encoded as 0: e^x below about -87.7
    // comes out as 0 with no test of its own.
    const LOWEST: f32 = -88.0;
    const HIGHEST: f32 = 88.376_26;
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, the first with trailing zero bits.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
    const ROUNDER: f32 = 12_582_912.0;

    // Each comparison keeps a NaN x, and each is one min or max instruction.
    let clamped = if x > HIGHEST { HIGHEST } else { x };
    let clamped = if clamped < LOWEST { LOWEST } else { clamped };
    let shifted = clamped.mul_add(LOG2_E, ROUNDER);
    let n = shifted - ROUNDER;
    let r = n.mul_add(-LN2_HIGH, clamped);
    let r = n.mul_add(-LN2_LOW, r);

    // e^r = 1 + r (1 + r (c2 + r (c3 + r (c4 + r c5)))).
    let mut p = 8.312_535e-3f32;
    p = p.mul_add(r, 4.189_01e-2);
    p = p.mul_add(r, 0.166_671_14);
    p = p.mul_add(r, 0.499_992_3);
    p = p.mul_add(r, 1.0);
    let e_r = p.mul_add(r, 1.0);

    // `shifted` has ROUNDER's exponent, so its bits are ROUNDER's bits plus n.
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127).wrapping_shl(23));
    e_r * scale
}

/// ln(x) in float32: x = m 2^e with m in [sqrt(1/2), sqrt(2)), and a degree-9 polynomial for
/// ln(m) (Cephes' coefficients), plus e ln 2 in two parts.
///
/// Within two ulps for positive normal x; 0 gives -infinity, infinity gives infinity, and
/// negative numbers and NaN give NaN. Subnormal inputs are not accurate; the softmax only takes
/// the logarithm of a sum of exponentials, which is at least 1.
#[inline(always)]
pub fn ln_f32(x: f32) -> f32 {
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;

    let bits = x.to_bits();
    let exponent = ((bits >> 23) & 0xff) as i32 - 126;
    let mantissa = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let (e, m) = if mantissa < SQRT_HALF {
        ((exponent - 1) as f32, mantissa + mantissa - 1.0)
    } else {
        (exponent as f32, mantissa - 1.0)
    };

    let z = m * m;
    let mut p = 7.037_683_6e-2f32;
    p = p * m - 1.151_461e-1;
    p = p * m + 1.167_699_9e-1;
    p = p * m - 1.242_014_1e-1;
    p = p * m + 1.424_932_3e-1;
    p = p * m - 1.666_805_8e-1;
    p = p * m + 2.000_071_4e-1;
    p = p * m - 2.499_999_4e-1;
    p = p * m + 3.333_333e-1;
    let y = p * m * z + e * LN2_LOW - 0.5 * z;
    let value = m + y + e * LN2_HIGH;

    if x.is_nan() || x < 0.0 {
        f32::NAN
    } else if x == 0.0 {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        f32::INFINITY
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulps_over_the_softmax_range() {
        let mut x = -87.33f32;
        let mut worst = 0;
        while x < 88.3 {
            let expected = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp_f32(x), expected));
            x += 0.000_731;
        }
        assert!(worst <= 2, "worst error {worst} ulps");
    }

    #[test]
    fn ln_is_within_two_ulps_over_sums_of_exponentials() {
        let mut x = 1.0e-30f32;
        let mut worst = 0;
        while x < 1.0e30 {
            let expected = (x as f64).ln() as f32;
            worst = worst.max(ulps(ln_f32(x), expected));
            x *= 1.000_37;
        }
        assert!(worst <= 2, "worst error {worst} ulps");
    }

    #[test]
    fn ln_edges() {
        assert_eq!(ln_f32(1.0), 0.0);
        assert_eq!(ln_f32(0.0), f32::NEG_INFINITY);
        assert_eq!(ln_f32(f32::INFINITY), f32::INFINITY);
        assert!(ln_f32(-1.0).is_nan());
        assert!(ln_f32(f32::NAN).is_nan());
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(-87.8), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), exp_f32(88.376_26));
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
