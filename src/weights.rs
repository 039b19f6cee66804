//! Class weights from reported prevalences, in float32 as the reference computes them.
//!
//! The steps are SEMANTICS.md's "Weights": inverse prevalence, mean imputation, a clamp to
//! mean +- 3 standard deviations, the NaN failsafe, and normalisation to sum C. Each float32
//! operation of the reference is one float32 operation here; its reductions (mean, standard
//! deviation, sum) are accumulated in double precision and rounded once, which is what
//! PyTorch's reductions give for vectors of this size to within their last bit.

/// Weights for prevalences `reported` (float32, NaN for unseen), with each seen prevalence first
/// raised to at least `min_prevalence` (0 keeps the reference's behaviour exactly).
pub fn class_weights(reported: &[f32], min_prevalence: f64) -> Vec<f32> {
    let num_classes = reported.len();
    let floor = min_prevalence as f32;
    let prevalences: Vec<f32> = if reported.iter().all(|p| p.is_nan()) {
        vec![1.0; num_classes]
    } else {
        reported.iter().map(|&p| if p.is_nan() { p } else { p.max(floor) }).collect()
    };

    let inverse: Vec<f32> = prevalences.iter().map(|&p| 1.0 / p).collect();
    let observed: Vec<f64> = inverse.iter().filter(|w| !w.is_nan()).map(|&w| w as f64).collect();
    let mean = mean_f32(&observed);
    let std = sample_std_f32(&observed);

    let three_std = 3.0f32 * std;
    let (low, high) = (mean - three_std, mean + three_std);
    let clamped: Vec<f32> = inverse
        .iter()
        .map(|&w| {
            let imputed = if w.is_finite() { w } else { mean };
            let value = clamp_propagating_nan(imputed, low, high);
            if value.is_nan() {
                1.0
            } else {
                value
            }
        })
        .collect();

    let total = clamped.iter().map(|&w| w as f64).sum::<f64>() as f32;
    let scale = num_classes as f32;
    clamped.iter().map(|&w| scale * w / total).collect()
}

/// The float32 mean of `values`: their sum rounded to float32, divided by their count.
fn mean_f32(values: &[f64]) -> f32 {
    let sum = values.iter().sum::<f64>() as f32;
    sum / values.len() as f32
}

/// The float32 standard deviation with Bessel's correction; NaN for fewer than two values.
fn sample_std_f32(values: &[f64]) -> f32 {
    if values.len() < 2 {
        return f32::NAN;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let squares: f64 = values.iter().map(|&w| (w - mean) * (w - mean)).sum();
    (squares / (n - 1.0)).sqrt() as f32
}

/// `clamp` as PyTorch defines it: a NaN value or a NaN bound gives NaN.
fn clamp_propagating_nan(value: f32, low: f32, high: f32) -> f32 {
    if value.is_nan() || low.is_nan() || high.is_nan() {
        return f32::NAN;
    }
    value.max(low).min(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_any_update_weights_are_one() {
        assert_eq!(class_weights(&[f32::NAN; 4], 0.0), vec![1.0; 4]);
    }

    #[test]
    fn one_seen_class_gives_uniform_weights() {
        // One observed weight: the standard deviation is NaN, so every clamped weight is NaN,
        // replaced by 1, and the normalised weights are all 1.
        assert_eq!(class_weights(&[0.5, f32::NAN, f32::NAN], 0.0), vec![1.0; 3]);
    }

    #[test]
    fn two_classes_weigh_inversely_to_prevalence() {
        // p = [0.25, 0.75]: w = [4, 4/3], mean 8/3, std 1.8856 (bounds do not bind);
        // sum 16/3, so w = 2 * [4, 4/3] / (16/3) = [1.5, 0.5].
        let w = class_weights(&[0.25, 0.75], 0.0);
        assert!((w[0] - 1.5).abs() < 1e-6 && (w[1] - 0.5).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn unseen_class_takes_the_mean_weight() {
        // p = [0.25, 0.75, NaN]: w = [4, 4/3, mean = 8/3]; sum 8, so w = 3 * w / 8
        // = [1.5, 0.5, 1.0].
        let w = class_weights(&[0.25, 0.75, f32::NAN], 0.0);
        assert!((w[0] - 1.5).abs() < 1e-6, "{w:?}");
        assert!((w[1] - 0.5).abs() < 1e-6, "{w:?}");
        assert!((w[2] - 1.0).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn zero_prevalence_makes_every_weight_one() {
        // 1/0 = inf makes the mean infinite and the standard deviation NaN.
        assert_eq!(class_weights(&[0.0, 0.5, 0.5], 0.0), vec![1.0; 3]);
    }

    #[test]
    fn min_prevalence_floors_a_vanished_class() {
        // With the floor 0.1, p = [0.1, 0.5, 0.5]: w = [10, 2, 2], finite and ordered.
        let w = class_weights(&[0.0, 0.5, 0.5], 0.1);
        assert!(w[0] > w[1] && (w[1] - w[2]).abs() < 1e-7, "{w:?}");
        assert!((w.iter().sum::<f32>() - 3.0).abs() < 1e-5, "{w:?}");
    }

    #[test]
    fn clamp_binds_on_an_outlier() {
        // Twenty classes at p = 0.05 (w = 20) and one at 1e-6 (w = 1e6): mean 47638.1,
        // std 218214, so the upper bound is 702280 and the outlier is clamped down to it.
        let mut p = vec![0.05f32; 20];
        p.push(1e-6);
        let w = class_weights(&p, 0.0);
        let ratio = w[20] / w[0];
        assert!((ratio - 702_280.0 / 20.0).abs() < 5.0, "{ratio} from {w:?}");
    }
}
