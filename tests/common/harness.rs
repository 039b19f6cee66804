//! One valid forward-and-backward call through the C API, described as data, run in any dtype
//! and layout, and compared with the float64 reference of `reference.rs`.
//!
//! Tolerances (all checked with `close`, which also requires NaN where NaN is expected):
//! - Weights: the library computes them in float32 with its reductions in float64, about five
//!   float32 roundings (6e-8 each) of values no larger than the largest weight, so 2e-6 of the
//!   largest weight covers them, including the clamp bound mu - 3 sigma where it cancels.
//! - Losses and gradients are linear in the weights, so the weights' error alone moves a loss
//!   by 2e-6 * w_max * (2A + ln C + 1), where A bounds |logit| (each -log softmax term is at most
//!   2A + ln C). Computing in float32 (float32, float16 and bfloat16 logits) adds about C + 4
//!   roundings of terms of that size: C <= 12 gives at most 1e-6 * w_max * (2A + ln C + 1), and
//!   4e-6 in all covers both. A gradient entry is bounded by 2 * w_max * |upstream|, with the same
//!   relative budget.
//! - Each value written in the logits' dtype is rounded once more: half an ulp of the type
//!   (2^-11 for float16, 2^-8 for bfloat16) of the value, plus the type's smallest subnormal.
//! - A reduced sum adds the bounds of its terms; "mean" divides them by the weight sum.
//! - The running state itself is compared bit for bit: the reference updates it with the same
//!   float64 operations in the same order, which is what SEMANTICS.md prescribes.

use super::reference::{class_axis, Model, Problem};
use super::*;
use cbce::ffi::*;

/// Everything one call needs, independent of the element types.
#[derive(Debug, Clone)]
pub struct ForwardCase {
    pub num_classes: usize,
    pub ema_decay: f64,
    pub min_prevalence: f64,
    /// Updates applied from counts before the call.
    pub prior_counts: Vec<Vec<u64>>,
    /// Logit values; they are rounded to the logits' dtype before anything else.
    pub logits: ArrayD<f64>,
    pub labels: ArrayD<i64>,
    pub logits_layout: Layout,
    pub target_layout: Layout,
    pub grad_layout: Layout,
    /// Layout of the loss output for "none" and of the upstream gradient given to backward.
    pub per_position_layout: Layout,
    /// Upstream gradient of every position for backward with "none".
    pub upstream: ArrayD<f64>,
    pub reduction: i32,
    pub label_smoothing: f64,
    pub ignore_index: i64,
    pub update: bool,
    pub grad_scale: f64,
    /// 0 float32, 1 float64, 2 float16, 3 bfloat16.
    pub logits_dtype: usize,
    /// 0 int64, 1 int32, 2 uint8.
    pub target_dtype: usize,
}

/// The structure of a call: what proptest draws and shrinks.
#[derive(Debug, Clone)]
pub struct Knobs {
    pub num_classes: usize,
    /// The target's shape: () for logits (C), (N) for (N, C), (N, d1, ..., dk) otherwise.
    pub dims: Vec<usize>,
    pub logits_dtype: usize,
    pub target_dtype: usize,
    pub reduction: i32,
    pub label_smoothing: f64,
    pub ema_decay: f64,
    pub min_prevalence: f64,
    pub update: bool,
    pub grad_scale: f64,
}

pub const LOGITS_DTYPES: [&str; 4] = ["float32", "float64", "float16", "bfloat16"];
pub const TARGET_DTYPES: [&str; 3] = ["int64", "int32", "uint8"];

impl ForwardCase {
    /// A random valid call of at most `max_positions` positions.
    pub fn random(rng: &mut Prng, max_positions: usize) -> ForwardCase {
        let num_classes = rng.range(1, 12) as usize;
        let rank = rng.range(1, 5) as usize;
        let mut dims: Vec<usize> = (1..rank)
            .map(|_| if rng.chance(0.05) { 0 } else { rng.range(1, 4) as usize })
            .collect();
        while dims.iter().product::<usize>() > max_positions {
            let largest = (0..dims.len()).max_by_key(|&a| dims[a]).expect("dims not empty");
            dims[largest] /= 2;
        }
        let knobs = Knobs {
            num_classes,
            dims,
            logits_dtype: rng.below(4) as usize,
            target_dtype: rng.below(3) as usize,
            reduction: rng.below(3) as i32,
            label_smoothing: *rng.pick(&[0.0, 0.0, 0.1, 0.5, 1.0]),
            ema_decay: *rng.pick(&[0.0, 0.5, 0.9, 0.99, 1.0]),
            min_prevalence: *rng.pick(&[0.0, 0.0, 0.01, 0.2]),
            update: rng.chance(0.5),
            grad_scale: *rng.pick(&[1.0, 1.0, 0.5, -2.0]),
        };
        ForwardCase::from_knobs(&knobs, rng)
    }

    /// A call with the given structure, its values and layouts drawn from `rng`.
    pub fn from_knobs(knobs: &Knobs, rng: &mut Prng) -> ForwardCase {
        let num_classes = knobs.num_classes;
        let target_shape = knobs.dims.clone();
        let mut shape = target_shape.clone();
        shape.insert(class_axis(target_shape.len() + 1), num_classes);
        let rank = shape.len();

        let target_dtype = knobs.target_dtype;
        let ignore_index = match rng.below(4) {
            0 => -100,
            1 if target_dtype == 2 => 255,
            1 => -1,
            2 => rng.range(0, num_classes as i64 - 1),
            _ => 1000,
        };
        let ignorable = target_dtype != 2 || (0..256).contains(&ignore_index);
        let ignore_share = if ignorable { rng.unit() * 0.4 } else { 0.0 };
        let mut labels = ArrayD::from_shape_fn(IxDyn(&target_shape), |_| {
            if rng.chance(ignore_share) {
                ignore_index
            } else {
                rng.range(0, num_classes as i64 - 1)
            }
        });
        let scale = *rng.pick(&[1.0, 4.0, 8.0]);
        let mut logits = ArrayD::from_shape_fn(IxDyn(&shape), |_| (rng.unit() * 2.0 - 1.0) * scale);
        let logits_layout = Layout::random(rng, rank, true);
        let target_layout = Layout::random(rng, target_shape.len(), true);
        broadcast_consistent(&mut logits, &logits_layout);
        broadcast_consistent(&mut labels, &target_layout);
        let upstream = ArrayD::from_shape_fn(IxDyn(&target_shape), |_| rng.unit() * 4.0 - 2.0);

        let prior_counts = (0..rng.below(4))
            .map(|_| {
                (0..num_classes).map(|_| if rng.chance(0.3) { 0 } else { rng.below(20) }).collect()
            })
            .collect();
        ForwardCase {
            num_classes,
            ema_decay: knobs.ema_decay,
            min_prevalence: knobs.min_prevalence,
            prior_counts,
            logits,
            labels,
            logits_layout,
            target_layout,
            grad_layout: Layout::random(rng, rank, false),
            per_position_layout: Layout::random(rng, target_shape.len(), false),
            upstream,
            reduction: knobs.reduction,
            label_smoothing: knobs.label_smoothing,
            ignore_index,
            update: knobs.update,
            grad_scale: knobs.grad_scale,
            logits_dtype: knobs.logits_dtype,
            target_dtype,
        }
    }

    /// Runs the call in its dtypes; `Err` describes the first disagreement.
    pub fn check(&self) -> Result<(), String> {
        macro_rules! with_target {
            ($t:ty) => {
                match self.target_dtype {
                    0 => self.check_typed::<$t, i64>(),
                    1 => self.check_typed::<$t, i32>(),
                    _ => self.check_typed::<$t, u8>(),
                }
            };
        }
        match self.logits_dtype {
            0 => with_target!(f32),
            1 => with_target!(f64),
            2 => with_target!(cbce::f16),
            _ => with_target!(cbce::bf16),
        }
    }

    fn check_typed<T: Float, L: Label>(&self) -> Result<(), String> {
        let handle = Handle::new(self.num_classes as u64, self.ema_decay, self.min_prevalence);
        let mut model = Model::new(self.num_classes, self.ema_decay, self.min_prevalence);
        for counts in &self.prior_counts {
            let signed: Vec<i64> = counts.iter().map(|&c| c as i64).collect();
            handle.update_from_counts(&signed);
            model.update(counts);
        }

        let logits_typed = self.logits.mapv(T::from_f64);
        let logits = logits_tensor(&logits_typed, &self.logits_layout);
        let target = target_tensor(&self.labels.mapv(L::from_i64), &self.target_layout);
        let loss_shape: Vec<usize> = if self.reduction == CBCE_REDUCTION_NONE {
            self.labels.shape().to_vec()
        } else {
            Vec::new()
        };
        let sentinel = T::from_f64(-1234.0);
        let loss_layout = if self.reduction == CBCE_REDUCTION_NONE {
            self.per_position_layout.clone()
        } else {
            Layout::contiguous(0)
        };
        let mut loss_out = Strided::new(
            &ArrayD::from_elem(IxDyn(&loss_shape), sentinel),
            &loss_layout,
            sentinel,
            T::CODE,
            T::BITS,
        );
        let mut grad_out = Strided::new(
            &ArrayD::from_elem(self.logits.raw_dim(), sentinel),
            &self.grad_layout,
            sentinel,
            T::CODE,
            T::BITS,
        );
        let options = CbceForwardOptions {
            reduction: self.reduction,
            update_prevalences: i32::from(self.update),
            ignore_index: self.ignore_index,
            label_smoothing: self.label_smoothing,
            grad_scale: self.grad_scale,
        };
        let mut weights_used = vec![f32::NAN; self.num_classes];
        let mut weight_sum = f64::NAN;
        let (logits_d, target_d) = (logits.descriptor(), target.descriptor());
        let (loss_d, grad_d) = (loss_out.descriptor_mut(), grad_out.descriptor_mut());
        // SAFETY: every descriptor describes memory owned by a live local of its size.
        let status = unsafe {
            cbce_forward(
                handle.ptr(),
                &logits_d,
                &target_d,
                &options,
                &loss_d,
                &grad_d,
                weights_used.as_mut_ptr(),
                weights_used.len(),
                &mut weight_sum,
            )
        };
        if status != cbce::Status::Ok {
            return Err(format!("forward failed: {status:?}: {}", last_message()));
        }

        if self.update {
            let labels: Vec<i64> = self.labels.iter().copied().collect();
            let counts = model.counts(&labels, self.ignore_index);
            model.update(&counts);
        }
        let weights = model.weights();
        let w_max = weights.iter().cloned().fold(0.0, f64::max);
        let weights_used: Vec<f64> = weights_used.iter().map(|&w| w as f64).collect();
        close("weights_used", &weights_used, &weights, |_| 2e-6 * w_max + 1e-12)?;
        same_state(&handle, &model)?;

        let problem = Problem {
            logits: logits_typed.mapv(T::to_f64),
            labels: self.labels.clone(),
            weights: weights.clone(),
            label_smoothing: self.label_smoothing,
            ignore_index: self.ignore_index,
            reduction: self.reduction,
        };
        let amplitude = problem.logits.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let per_position_bound = w_max * (2.0 * amplitude + (self.num_classes as f64).ln() + 1.0);
        let budget = if T::BITS == 64 { 2e-6 } else { 4e-6 };
        let round = |value: f64| T::ROUNDING * value.abs() + T::TINY;

        close("weight_sum", &[weight_sum], &[problem.weight_sum()], |e| {
            2e-6 * w_max * problem.labels.len() as f64 + 1e-12 * e.abs()
        })?;
        let losses = problem.losses();
        if self.reduction == CBCE_REDUCTION_NONE {
            let actual: Vec<f64> = loss_out.logical().iter().map(|x| x.to_f64()).collect();
            let expected: Vec<f64> = losses.iter().copied().collect();
            close("loss", &actual, &expected, |e| budget * per_position_bound + round(e))?;
        } else {
            let mut bound = budget * per_position_bound * problem.labels.len() as f64;
            if self.reduction == CBCE_REDUCTION_MEAN {
                bound /= problem.weight_sum();
            }
            let actual = loss_out.logical().iter().next().expect("one element").to_f64();
            close("loss", &[actual], &[problem.reduced()], |e| bound + round(e))?;
        }

        let upstream = problem.uniform_upstream(self.grad_scale);
        let expected = problem.gradient(&upstream);
        let u_max = upstream.iter().fold(0.0f64, |m, u| m.max(u.abs()));
        let grad_bound = budget * 2.0 * w_max * u_max;
        let actual: Vec<f64> = grad_out.logical().iter().map(|x| x.to_f64()).collect();
        let expected: Vec<f64> = expected.iter().copied().collect();
        close("grad", &actual, &expected, |e| grad_bound + round(e))?;

        self.check_backward::<T, L>(&handle, &logits, &target, &options, &problem)?;
        same_state(&handle, &model)
    }

    /// `cbce_backward` with the weights the forward call used (rounded to float32 as the
    /// library reports them) and an upstream gradient tensor.
    fn check_backward<T: Float, L: Label>(
        &self,
        handle: &Handle,
        logits: &Strided<T>,
        target: &Strided<L>,
        options: &CbceForwardOptions,
        problem: &Problem,
    ) -> Result<(), String> {
        let weights: Vec<f32> = problem.weights.iter().map(|&w| w as f32).collect();
        let (upstream, grad_loss) = if self.reduction == CBCE_REDUCTION_NONE {
            let values = self.upstream.mapv(T::from_f64);
            let tensor = Strided::new(
                &values,
                &self.per_position_layout,
                T::from_f64(0.0),
                T::CODE,
                T::BITS,
            );
            (values.mapv(T::to_f64), tensor)
        } else {
            let g = T::from_f64(self.grad_scale);
            let tensor = contiguous(&ArrayD::from_elem(IxDyn(&[1]), g), g, T::CODE, T::BITS);
            (problem.uniform_upstream(g.to_f64()), tensor)
        };
        let sentinel = T::from_f64(-1234.0);
        let mut grad_out = Strided::new(
            &ArrayD::from_elem(self.logits.raw_dim(), sentinel),
            &self.grad_layout,
            sentinel,
            T::CODE,
            T::BITS,
        );
        let (logits_d, target_d, grad_loss_d) =
            (logits.descriptor(), target.descriptor(), grad_loss.descriptor());
        let grad_d = grad_out.descriptor_mut();
        // SAFETY: every descriptor describes memory owned by a live local of its size.
        let status = unsafe {
            cbce_backward(
                handle.ptr(),
                &logits_d,
                &target_d,
                options,
                &grad_loss_d,
                weights.as_ptr(),
                weights.len(),
                &grad_d,
            )
        };
        if status != cbce::Status::Ok {
            return Err(format!("backward failed: {status:?}: {}", last_message()));
        }
        let expected = problem.gradient(&upstream);
        let w_max = problem.weights.iter().cloned().fold(0.0, f64::max);
        let u_max = upstream.iter().fold(0.0f64, |m, u| m.max(u.abs()));
        let budget = if T::BITS == 64 { 2e-6 } else { 4e-6 };
        let bound = budget * 2.0 * w_max * u_max;
        let actual: Vec<f64> = grad_out.logical().iter().map(|x| x.to_f64()).collect();
        let expected: Vec<f64> = expected.iter().copied().collect();
        close("backward grad", &actual, &expected, |e| bound + T::ROUNDING * e.abs() + T::TINY)
    }
}

/// The handle's running state equals the model's bit for bit (NaN marks unseen in both).
pub fn same_state(handle: &Handle, model: &Model) -> Result<(), String> {
    let actual = state_values(&handle.state());
    let expected = model.values_or_nan();
    for (class, (a, e)) in actual.iter().zip(&expected).enumerate() {
        let same = (a.is_nan() && e.is_nan()) || a.to_bits() == e.to_bits();
        if !same {
            return Err(format!("state of class {class}: {a:e} but the reference has {e:e}"));
        }
    }
    Ok(())
}

/// Element-wise `|actual - expected| <= tolerance(expected)`; NaN must meet NaN and an
/// infinity the same infinity.
pub fn close(
    what: &str,
    actual: &[f64],
    expected: &[f64],
    tolerance: impl Fn(f64) -> f64,
) -> Result<(), String> {
    if actual.len() != expected.len() {
        return Err(format!("{what}: {} values, expected {}", actual.len(), expected.len()));
    }
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let agrees = if e.is_nan() {
            a.is_nan()
        } else if e.is_infinite() {
            a == e
        } else {
            (a - e).abs() <= tolerance(e)
        };
        if !agrees {
            return Err(format!(
                "{what}[{i}]: {a:e}, expected {e:e} (tolerance {:e})",
                tolerance(e)
            ));
        }
    }
    Ok(())
}
