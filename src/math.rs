//! Elementary functions for the softmax that the compiler can vectorise: branch-free, no calls
//! into libm, within two ulps of the correctly rounded result over the range the loss uses.

/// e^x in float32 by range reduction x = n ln2 + r, |r| <= ln2 / 2, and a degree-7 polynomial
/// for e^r (Cephes' coefficients), scaled by 2^n through the exponent bits.
///
/// Exact to within two ulps for x in [-87.33, 88.37]; below that it returns 0 (the true value is
/// a float32 subnormal), above it infinity; NaN gives NaN. The softmax only evaluates it at
/// x - max(x) <= 0.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOWEST: f32 = -87.336_55;
    const HIGHEST: f32 = 88.376_26;
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HIGH is exact for every n in range.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
    const ROUNDER: f32 = 12_582_912.0;

    let clamped = x.clamp(LOWEST, HIGHEST);
    let shifted = clamped * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = clamped - n * LN2_HIGH - n * LN2_LOW;

    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;

    // `shifted` has ROUNDER's exponent, so its bits are ROUNDER's bits plus n.
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127).wrapping_shl(23));
    let value = e_r * scale;

    if x < LOWEST {
        0.0
    } else if x > HIGHEST {
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
        let mut x = -87.3f32;
        let mut worst = 0;
        while x < 88.3 {
            let expected = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp_f32(x), expected));
            x += 0.000_731;
        }
        assert!(worst <= 2, "worst error {worst} ulps");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
