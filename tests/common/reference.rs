//! A plain, slow float64 implementation of the whole loss, written from SEMANTICS.md and
//! PyTorch's definition of weighted `cross_entropy`, for the tests to compare the library with.
//!
//! It shares no code with the crate. Only two things are done in float32 on purpose, because
//! the reference does them in float32 and they decide discrete outcomes: the reported
//! prevalences are rounded to float32, and the inverse 1/p is taken in float32 (a prevalence
//! whose inverse overflows float32 gives +inf there, which turns every weight into 1).

use cbce::ffi::{CBCE_REDUCTION_MEAN, CBCE_REDUCTION_NONE, CBCE_REDUCTION_SUM};
use ndarray::{ArrayD, Dimension, IxDyn};

/// The running state of the reference: one prevalence per class, `None` while unseen.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub ema_decay: f64,
    pub min_prevalence: f64,
    pub values: Vec<Option<f64>>,
}

impl Model {
    pub fn new(num_classes: usize, ema_decay: f64, min_prevalence: f64) -> Model {
        Model { ema_decay, min_prevalence, values: vec![None; num_classes] }
    }

    pub fn num_classes(&self) -> usize {
        self.values.len()
    }

    /// Counts of labels in [0, C) other than the ignore index; every other label is dropped.
    pub fn counts(&self, labels: &[i64], ignore_index: i64) -> Vec<u64> {
        let mut counts = vec![0u64; self.num_classes()];
        for &label in labels {
            if label != ignore_index && (0..self.num_classes() as i64).contains(&label) {
                counts[label as usize] += 1;
            }
        }
        counts
    }

    /// SEMANTICS.md, "Update": first seen starts at 1/C, then p = p * d + batch * (1 - d).
    pub fn update(&mut self, counts: &[u64]) {
        let total: u64 = counts.iter().sum();
        let num_classes = self.num_classes() as f64;
        let d = self.ema_decay;
        for (value, &count) in self.values.iter_mut().zip(counts) {
            if value.is_none() && count > 0 {
                *value = Some(1.0 / num_classes);
            }
            if let Some(p) = value {
                let batch = if total > 0 { count as f64 / total as f64 } else { 0.0 };
                *p = *p * d + batch * (1.0 - d);
            }
        }
    }

    /// The prevalences as reported: float32, NaN for unseen.
    pub fn reported(&self) -> Vec<f32> {
        self.values.iter().map(|v| v.map_or(f32::NAN, |p| p as f32)).collect()
    }

    pub fn weights(&self) -> Vec<f64> {
        weights_from_reported(&self.reported(), self.min_prevalence)
    }

    /// The state as the library's blob stores it: NaN for unseen.
    pub fn values_or_nan(&self) -> Vec<f64> {
        self.values.iter().map(|v| v.unwrap_or(f64::NAN)).collect()
    }
}

/// SEMANTICS.md, "Weights", with the floor `min_prevalence` on each seen prevalence first.
pub fn weights_from_reported(reported: &[f32], min_prevalence: f64) -> Vec<f64> {
    let num_classes = reported.len();
    let prevalences: Vec<f32> = if reported.iter().all(|p| p.is_nan()) {
        vec![1.0; num_classes]
    } else {
        reported
            .iter()
            .map(|&p| if p.is_nan() { p } else { (p as f64).max(min_prevalence) as f32 })
            .collect()
    };
    let inverse: Vec<f64> = prevalences.iter().map(|&p| (1.0f32 / p) as f64).collect();
    let observed: Vec<f64> = inverse.iter().copied().filter(|w| !w.is_nan()).collect();
    let n = observed.len() as f64;
    let mean = observed.iter().sum::<f64>() / n;
    let std = if observed.len() < 2 {
        f64::NAN
    } else {
        (observed.iter().map(|w| (w - mean) * (w - mean)).sum::<f64>() / (n - 1.0)).sqrt()
    };
    let (low, high) = (mean - 3.0 * std, mean + 3.0 * std);
    let clamped: Vec<f64> = inverse
        .iter()
        .map(|&w| {
            let w = if w.is_finite() { w } else { mean };
            if w.is_nan() || low.is_nan() || high.is_nan() {
                1.0
            } else {
                w.max(low).min(high)
            }
        })
        .collect();
    let total: f64 = clamped.iter().sum();
    clamped.iter().map(|w| num_classes as f64 * w / total).collect()
}

/// The class axis of logits of rank `rank`: 0 for (C), 1 otherwise.
pub fn class_axis(rank: usize) -> usize {
    usize::from(rank > 1)
}

/// The logits' index of class `class` at target position `position`.
fn logit_index(position: &[usize], class: usize, rank: usize) -> Vec<usize> {
    let mut index = position.to_vec();
    index.insert(class_axis(rank), class);
    index
}

/// Every position of a target shape, in C order.
pub fn positions(shape: &[usize]) -> Vec<Vec<usize>> {
    let total: usize = shape.iter().product();
    (0..total)
        .map(|mut linear| {
            let mut index = vec![0; shape.len()];
            for axis in (0..shape.len()).rev() {
                index[axis] = linear % shape[axis];
                linear /= shape[axis];
            }
            index
        })
        .collect()
}

/// One problem: logits of shape (C), (N, C) or (N, C, d1, ..., dk), labels of the matching
/// target shape, and the class weights, with the options of the loss.
#[derive(Debug, Clone)]
pub struct Problem {
    pub logits: ArrayD<f64>,
    pub labels: ArrayD<i64>,
    pub weights: Vec<f64>,
    pub label_smoothing: f64,
    pub ignore_index: i64,
    pub reduction: i32,
}

impl Problem {
    fn row(&self, position: &[usize]) -> Vec<f64> {
        let rank = self.logits.ndim();
        (0..self.weights.len())
            .map(|c| self.logits[IxDyn(&logit_index(position, c, rank))])
            .collect()
    }

    /// log_softmax of a row, computed directly: x_c - log(sum_k exp(x_k)), with the maximum
    /// taken out first so that large logits do not overflow.
    fn log_softmax(row: &[f64]) -> Vec<f64> {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let log_total = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        row.iter().map(|x| x - log_total).collect()
    }

    /// loss_i = (1 - eps) w[y] (-lp[y]) + (eps / C) sum_c w[c] (-lp[c]); 0 where ignored.
    pub fn losses(&self) -> ArrayD<f64> {
        let eps = self.label_smoothing;
        let num_classes = self.weights.len() as f64;
        ArrayD::from_shape_fn(self.labels.raw_dim(), |position| {
            let label = self.labels[&position];
            if label == self.ignore_index {
                return 0.0;
            }
            let lp = Self::log_softmax(&self.row(position.slice()));
            let target_term = (1.0 - eps) * self.weights[label as usize] * -lp[label as usize];
            if eps == 0.0 {
                // PyTorch computes no smoothing term then, so a -inf logit of another class
                // (-lp = inf) does not turn the loss into 0 * inf = NaN.
                return target_term;
            }
            let smooth: f64 = self.weights.iter().zip(&lp).map(|(w, l)| w * -l).sum();
            target_term + eps / num_classes * smooth
        })
    }

    /// The sum of the weights of the labels that are not ignored: the "mean" denominator.
    pub fn weight_sum(&self) -> f64 {
        self.labels
            .iter()
            .filter(|&&label| label != self.ignore_index)
            .map(|&label| self.weights[label as usize])
            .sum()
    }

    /// The reduced loss ("mean" or "sum"); for "none", the sum of the losses.
    pub fn reduced(&self) -> f64 {
        let sum: f64 = self.losses().iter().sum();
        if self.reduction == CBCE_REDUCTION_MEAN {
            sum / self.weight_sum()
        } else {
            sum
        }
    }

    /// The upstream gradient of each position's loss, for a scalar upstream gradient `g` of
    /// the reduced loss (or of every loss, for "none").
    pub fn uniform_upstream(&self, g: f64) -> ArrayD<f64> {
        let per_position = match self.reduction {
            CBCE_REDUCTION_MEAN => g / self.weight_sum(),
            CBCE_REDUCTION_SUM | CBCE_REDUCTION_NONE => g,
            other => panic!("reduction {other}"),
        };
        ArrayD::from_elem(self.labels.raw_dim(), per_position)
    }

    /// The analytic gradient of sum_i upstream_i * loss_i with respect to the logits:
    /// d loss_i / d x_c = s_c ((1 - eps) w[y] + (eps / C) W) - (1 - eps) w[y] [c = y]
    /// - (eps / C) w[c], with s the softmax and W the sum of the weights; 0 * s where ignored.
    pub fn gradient(&self, upstream: &ArrayD<f64>) -> ArrayD<f64> {
        let eps = self.label_smoothing;
        let num_classes = self.weights.len();
        let spread = eps / num_classes as f64;
        let weight_total: f64 = self.weights.iter().sum();
        let rank = self.logits.ndim();
        let mut grad = ArrayD::zeros(self.logits.raw_dim());
        for position in positions(self.labels.shape()) {
            let label = self.labels[IxDyn(&position)];
            let lp = Self::log_softmax(&self.row(&position));
            if label == self.ignore_index {
                // PyTorch back-propagates 0 into the ignored row's log_softmax, whose backward
                // then gives 0 - softmax * 0: NaN where the row's softmax is NaN (a NaN or +inf
                // logit), 0 elsewhere, whatever the upstream gradient.
                for (c, l) in lp.iter().enumerate() {
                    grad[IxDyn(&logit_index(&position, c, rank))] = 0.0 * l.exp();
                }
                continue;
            }
            let y = label as usize;
            let u = upstream[IxDyn(&position)];
            for (c, l) in lp.iter().enumerate() {
                let s = l.exp();
                let mut g = s * ((1.0 - eps) * self.weights[y] + spread * weight_total)
                    - spread * self.weights[c];
                if c == y {
                    g -= (1.0 - eps) * self.weights[y];
                }
                grad[IxDyn(&logit_index(&position, c, rank))] = u * g;
            }
        }
        grad
    }

    /// sum_i upstream_i * loss_i, the function whose gradient `gradient` is.
    pub fn objective(&self, upstream: &ArrayD<f64>) -> f64 {
        self.losses().iter().zip(upstream.iter()).map(|(l, u)| l * u).sum()
    }

    /// Central finite differences of `objective` with step `h` (the weights held fixed, as
    /// they do not depend on the logits).
    pub fn finite_difference_gradient(&self, upstream: &ArrayD<f64>, h: f64) -> ArrayD<f64> {
        let mut grad = ArrayD::zeros(self.logits.raw_dim());
        let mut shifted = self.clone();
        for index in positions(self.logits.shape()) {
            let index = IxDyn(&index);
            let x = self.logits[&index];
            shifted.logits[&index] = x + h;
            let up = shifted.objective(upstream);
            shifted.logits[&index] = x - h;
            let down = shifted.objective(upstream);
            shifted.logits[&index] = x;
            grad[&index] = (up - down) / (2.0 * h);
        }
        grad
    }
}
