//! Properties of the C API against the plain float64 reference of `common/reference.rs`:
//! forward and backward in every dtype, shape and layout; the reference's own gradient against
//! finite differences; counts summed over batches against one update; state save and restore;
//! the prevalence floor. Then small cases whose expected values are worked out by hand.
//!
//! The tolerances of the comparisons are derived in `common/harness.rs`. `PROPTEST_CASES`
//! sets the number of cases of each property (256 by default).

mod common;

use cbce::ffi::*;
use cbce::Status;
use common::harness::{close, same_state, ForwardCase, Knobs};
use common::reference::{weights_from_reported, Model, Problem};
use common::*;
use ndarray::{arr1, arr2, ArrayD, IxDyn};
use proptest::prelude::*;

fn knobs() -> impl Strategy<Value = Knobs> {
    (
        1usize..=12,
        prop::collection::vec(0usize..=4, 0..=4),
        0usize..4,
        0usize..3,
        0i32..3,
        prop::sample::select(vec![0.0, 0.1, 0.5, 1.0]),
        prop::sample::select(vec![0.0, 0.5, 0.9, 0.99, 1.0]),
        prop::sample::select(vec![0.0, 0.01, 0.2]),
        any::<bool>(),
        prop::sample::select(vec![1.0, 0.5, -2.0]),
    )
        .prop_map(|(c, dims, ld, td, reduction, eps, decay, floor, update, g)| Knobs {
            num_classes: c,
            dims,
            logits_dtype: ld,
            target_dtype: td,
            reduction,
            label_smoothing: eps,
            ema_decay: decay,
            min_prevalence: floor,
            update,
            grad_scale: g,
        })
}

proptest! {
    /// Forward (loss, gradient, weights used, weight sum, state) and backward agree with the
    /// reference for random shapes, dtypes, layouts (permuted, strided, reversed, broadcast,
    /// offset), reductions, label smoothing and ignore indices.
    #[test]
    fn forward_and_backward_match_the_reference(knobs in knobs(), seed in any::<u64>()) {
        let case = ForwardCase::from_knobs(&knobs, &mut Prng::new(seed));
        if let Err(disagreement) = case.check() {
            return Err(TestCaseError::fail(format!("{disagreement}\n{case:#?}")));
        }
    }

    /// The reference's analytic gradient is the derivative of its own loss: central
    /// differences with h = 1e-5 have truncation error h^2 |f'''| / 6 (about 1e-10 times the
    /// weights here) and rounding error 1e-16 |f| / h (about 1e-10), so 1e-6 is a wide margin.
    #[test]
    fn reference_gradient_matches_finite_differences(knobs in knobs(), seed in any::<u64>()) {
        let case = ForwardCase::from_knobs(&knobs, &mut Prng::new(seed));
        let mut model = Model::new(case.num_classes, case.ema_decay, case.min_prevalence);
        for counts in &case.prior_counts {
            model.update(counts);
        }
        let problem = Problem {
            logits: case.logits.clone(),
            labels: case.labels.clone(),
            weights: model.weights(),
            label_smoothing: case.label_smoothing,
            ignore_index: case.ignore_index,
            reduction: case.reduction,
        };
        let upstream = if case.reduction == CBCE_REDUCTION_NONE {
            case.upstream.clone()
        } else {
            problem.uniform_upstream(case.grad_scale)
        };
        if problem.weight_sum() == 0.0 && case.reduction == CBCE_REDUCTION_MEAN {
            return Ok(()); // The mean over no position is NaN, and so is its derivative.
        }
        let analytic: Vec<f64> = problem.gradient(&upstream).iter().copied().collect();
        let numeric: Vec<f64> =
            problem.finite_difference_gradient(&upstream, 1e-5).iter().copied().collect();
        close("finite differences", &analytic, &numeric, |e| 1e-6 * (1.0 + e.abs()))
            .map_err(TestCaseError::fail)?;
    }

    /// The library's own float64 gradient is the derivative of its own float64 loss.
    #[test]
    fn library_gradient_matches_its_finite_differences(
        num_classes in 1usize..=6,
        dims in prop::collection::vec(1usize..=3, 0..=3),
        reduction in 0i32..2,
        eps in prop::sample::select(vec![0.0, 0.3]),
        seed in any::<u64>(),
    ) {
        let mut rng = Prng::new(seed);
        let handle = Handle::new(num_classes as u64, 0.5, 0.0);
        let counts: Vec<i64> = (0..num_classes).map(|_| rng.range(0, 9)).collect();
        handle.update_from_counts(&counts);
        let mut shape = dims.clone();
        shape.insert(usize::from(!dims.is_empty()), num_classes);
        let logits = ArrayD::from_shape_fn(IxDyn(&shape), |_| rng.unit() * 6.0 - 3.0);
        let labels =
            ArrayD::from_shape_fn(IxDyn(&dims), |_| rng.range(0, num_classes as i64 - 1));
        let options = CbceForwardOptions {
            reduction,
            update_prevalences: 0,
            ignore_index: -100,
            label_smoothing: eps,
            grad_scale: 1.0,
        };
        let (loss, grad) = forward_f64(&handle, &logits, &labels, &options, true);
        let h = 1e-6;
        for index in common::reference::positions(&shape) {
            let mut shifted = logits.clone();
            shifted[IxDyn(&index)] += h;
            let (up, _) = forward_f64(&handle, &shifted, &labels, &options, false);
            shifted[IxDyn(&index)] -= 2.0 * h;
            let (down, _) = forward_f64(&handle, &shifted, &labels, &options, false);
            let numeric = (up - down) / (2.0 * h);
            let analytic = grad[IxDyn(&index)];
            // Rounding error 1e-16 * |loss| / h is about 1e-9 here; truncation h^2 less.
            prop_assert!(
                (numeric - analytic).abs() <= 1e-6 * (1.0 + loss.abs()),
                "at {index:?}: analytic {analytic}, finite differences {numeric}"
            );
        }
    }

    /// Counting each batch, adding the counts and applying them once gives exactly the state
    /// that one `cbce_update` over the concatenated batches gives, in every target dtype.
    #[test]
    fn summed_counts_equal_one_update_of_the_concatenation(
        num_classes in 1usize..=8,
        batches in prop::collection::vec(0usize..=20, 1..=5),
        target_dtype in 0usize..3,
        decay in prop::sample::select(vec![0.0, 0.3, 0.9, 0.99, 1.0]),
        seed in any::<u64>(),
    ) {
        let mut rng = Prng::new(seed);
        let ignore_index = if target_dtype == 2 { 255 } else { -100 };
        let one = Handle::new(num_classes as u64, decay, 0.0);
        let summed = Handle::new(num_classes as u64, decay, 0.0);
        let prior: Vec<i64> = (0..num_classes).map(|_| rng.range(0, 3)).collect();
        one.update_from_counts(&prior);
        summed.update_from_counts(&prior);

        let mut all_labels = Vec::new();
        let mut total = vec![0i64; num_classes];
        let model = Model::new(num_classes, decay, 0.0);
        for &len in &batches {
            // Labels in range, the ignore index, and labels out of range, which updates drop.
            let labels: Vec<i64> = (0..len)
                .map(|_| match rng.below(10) {
                    0 => ignore_index,
                    1 => num_classes as i64 + rng.range(0, 3),
                    _ => rng.range(0, num_classes as i64 - 1),
                })
                .collect();
            let counts = class_counts(&summed, &labels, target_dtype, ignore_index);
            let expected: Vec<i64> =
                model.counts(&labels, ignore_index).iter().map(|&c| c as i64).collect();
            prop_assert_eq!(&counts, &expected);
            for (t, c) in total.iter_mut().zip(&counts) {
                *t += c;
            }
            all_labels.extend(labels);
        }
        summed.update_from_counts(&total);
        update_with_labels(&one, &all_labels, target_dtype, ignore_index);
        prop_assert_eq!(one.state(), summed.state());
    }

    /// A state saved with `cbce_get_state` and restored with `cbce_set_state` into a new
    /// handle continues bit for bit: the same later calls give the same bytes.
    #[test]
    fn saved_state_continues_bit_for_bit(
        num_classes in 1usize..=8,
        before in prop::collection::vec(prop::collection::vec(0i64..50, 8), 0..6),
        after in prop::collection::vec(prop::collection::vec(0i64..50, 8), 1..6),
        decay in prop::sample::select(vec![0.0, 0.5, 0.99, 1.0]),
        floor in prop::sample::select(vec![0.0, 0.05]),
    ) {
        let original = Handle::new(num_classes as u64, decay, floor);
        for counts in &before {
            original.update_from_counts(&counts[..num_classes]);
        }
        let blob = original.state();
        let restored = Handle::new(num_classes as u64, decay, floor);
        ok(restored.set_state(&blob));
        prop_assert_eq!(restored.state(), blob);
        for (step, counts) in after.iter().enumerate() {
            if step.is_multiple_of(2) {
                original.update_from_counts(&counts[..num_classes]);
                restored.update_from_counts(&counts[..num_classes]);
            } else {
                let labels: Vec<i64> = (0..num_classes as i64)
                    .flat_map(|c| std::iter::repeat_n(c, counts[c as usize] as usize % 7))
                    .collect();
                update_with_labels(&original, &labels, 0, -100);
                update_with_labels(&restored, &labels, 0, -100);
            }
            prop_assert_eq!(original.state(), restored.state());
        }
        let bits = |w: Vec<f32>| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(original.weights()), bits(restored.weights()));
        prop_assert_eq!(bits(original.prevalences()), bits(restored.prevalences()));
    }

    /// With a floor m > 0, every weight is finite and the largest is at most 1/m times the
    /// smallest: before normalisation each weight is 1/max(p, m) in [1, 1/m], and imputing the
    /// mean or clamping to mean +- 3 sigma stays inside that range. The weights also agree
    /// with the reference.
    #[test]
    fn min_prevalence_bounds_the_weights(
        num_classes in 2usize..=10,
        updates in prop::collection::vec(prop::collection::vec(0i64..30, 10), 1..30),
        decay in prop::sample::select(vec![0.0, 0.5, 0.9]),
        floor in prop::sample::select(vec![0.001, 0.05, 0.3]),
    ) {
        let handle = Handle::new(num_classes as u64, decay, floor);
        let mut model = Model::new(num_classes, decay, floor);
        for counts in &updates {
            handle.update_from_counts(&counts[..num_classes]);
            let counts: Vec<u64> = counts[..num_classes].iter().map(|&c| c as u64).collect();
            model.update(&counts);
        }
        let weights = handle.weights();
        prop_assert!(weights.iter().all(|w| w.is_finite() && *w > 0.0), "{:?}", weights);
        let (low, high) = weights
            .iter()
            .fold((f32::INFINITY, 0f32), |(l, h), &w| (l.min(w), h.max(w)));
        prop_assert!(high / low <= (1.0 / floor as f32) * (1.0 + 1e-5), "{:?}", weights);
        let expected = model.weights();
        let actual: Vec<f64> = weights.iter().map(|&w| w as f64).collect();
        close("weights", &actual, &expected, |_| 2e-6 * num_classes as f64)
            .map_err(TestCaseError::fail)?;
    }
}

/// `cbce_forward` on contiguous float64 logits and int64 labels: the loss (summed for "none")
/// and, when asked, the gradient.
fn forward_f64(
    handle: &Handle,
    logits: &ArrayD<f64>,
    labels: &ArrayD<i64>,
    options: &CbceForwardOptions,
    with_grad: bool,
) -> (f64, ArrayD<f64>) {
    let logits = contiguous(logits, 0.0, CBCE_DTYPE_FLOAT, 64);
    let target = contiguous(labels, 0, CBCE_DTYPE_INT, 64);
    let loss_shape: &[usize] =
        if options.reduction == CBCE_REDUCTION_NONE { labels.shape() } else { &[] };
    let mut loss = contiguous(&ArrayD::zeros(IxDyn(loss_shape)), 0.0, CBCE_DTYPE_FLOAT, 64);
    let mut grad =
        contiguous(&ArrayD::zeros(logits.logical().raw_dim()), 0.0, CBCE_DTYPE_FLOAT, 64);
    let (l, t) = (logits.descriptor(), target.descriptor());
    let (o, g) = (loss.descriptor_mut(), grad.descriptor_mut());
    let grad_ptr: *const CbceTensor = if with_grad { &g } else { std::ptr::null() };
    // SAFETY: the descriptors describe live locals; optional outputs are NULL or live.
    ok(unsafe {
        cbce_forward(
            handle.ptr(),
            &l,
            &t,
            options,
            &o,
            grad_ptr,
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        )
    });
    (loss.logical().sum(), grad.logical())
}

/// `labels` as a 1-d target of dtype `target_dtype` (0 int64, 1 int32, 2 uint8).
fn with_target<R>(labels: &[i64], target_dtype: usize, f: impl FnOnce(&CbceTensor) -> R) -> R {
    let values = ArrayD::from_shape_vec(IxDyn(&[labels.len()]), labels.to_vec()).unwrap();
    match target_dtype {
        0 => f(&target_tensor(&values, &Layout::contiguous(1)).descriptor()),
        1 => f(&target_tensor(&values.mapv(|l| l as i32), &Layout::contiguous(1)).descriptor()),
        _ => f(&target_tensor(&values.mapv(|l| l as u8), &Layout::contiguous(1)).descriptor()),
    }
}

fn class_counts(handle: &Handle, labels: &[i64], target_dtype: usize, ignore: i64) -> Vec<i64> {
    let mut counts = vec![-1i64; handle.num_classes()];
    with_target(labels, target_dtype, |target| {
        // SAFETY: the target describes a live local; `counts` has C writable values.
        ok(unsafe {
            cbce_class_counts(handle.ptr(), target, ignore, counts.as_mut_ptr(), counts.len())
        })
    });
    counts
}

fn update_with_labels(handle: &Handle, labels: &[i64], target_dtype: usize, ignore: i64) {
    with_target(labels, target_dtype, |target| {
        // SAFETY: the target describes a live local.
        ok(unsafe { cbce_update(handle.ptr(), target, ignore) })
    });
}

struct Forward {
    loss: Vec<f64>,
    grad: Vec<f64>,
    weights_used: Vec<f32>,
    weight_sum: f64,
}

/// `cbce_forward` on float32 (N, C) logits, through the C API.
fn forward_f32(
    handle: &Handle,
    logits: ndarray::Array2<f32>,
    labels: &[i64],
    options: &CbceForwardOptions,
) -> Forward {
    let logits = logits.into_dyn();
    let labels = ArrayD::from_shape_vec(IxDyn(&[labels.len()]), labels.to_vec()).unwrap();
    let logits_t = logits_tensor(&logits, &Layout::contiguous(2));
    let target = target_tensor(&labels, &Layout::contiguous(1));
    let loss_shape: &[usize] =
        if options.reduction == CBCE_REDUCTION_NONE { labels.shape() } else { &[] };
    let mut loss = contiguous(&ArrayD::zeros(IxDyn(loss_shape)), 0f32, CBCE_DTYPE_FLOAT, 32);
    let mut grad = contiguous(&ArrayD::zeros(logits.raw_dim()), 0f32, CBCE_DTYPE_FLOAT, 32);
    let mut weights_used = vec![0f32; handle.num_classes()];
    let mut weight_sum = 0f64;
    let (l, t) = (logits_t.descriptor(), target.descriptor());
    let (o, g) = (loss.descriptor_mut(), grad.descriptor_mut());
    // SAFETY: the descriptors describe live locals; the buffers have their stated lengths.
    ok(unsafe {
        cbce_forward(
            handle.ptr(),
            &l,
            &t,
            options,
            &o,
            &g,
            weights_used.as_mut_ptr(),
            weights_used.len(),
            &mut weight_sum,
        )
    });
    Forward {
        loss: loss.logical().iter().map(|&x| x as f64).collect(),
        grad: grad.logical().iter().map(|&x| x as f64).collect(),
        weights_used,
        weight_sum,
    }
}

fn options(reduction: i32, update: bool) -> CbceForwardOptions {
    CbceForwardOptions {
        reduction,
        update_prevalences: i32::from(update),
        ..cbce_forward_options_default()
    }
}

#[track_caller]
fn assert_near(actual: &[f64], expected: &[f64], tolerance: f64) {
    close("value", actual, expected, |_| tolerance).unwrap_or_else(|e| panic!("{e}"));
}

/// Prevalences [0.25, 0.75]: C = 2, decay 0, counts [1, 3]. Both classes are first seen
/// (1/2), then p = 1/2 * 0 + [1/4, 3/4] * 1. The weights are then [1.5, 0.5]: w = [4, 4/3],
/// mean 8/3 and standard deviation (8/3) / sqrt(2) = 1.886, so the bounds
/// 8/3 +- 5.66 do not bind, and 2 * w / (16/3) = [1.5, 0.5].
fn quarter_and_three_quarters() -> Handle {
    let handle = Handle::new(2, 0.0, 0.0);
    handle.update_from_counts(&[1, 3]);
    handle
}

#[test]
fn first_update_and_one_seen_class() {
    // C = 2, decay 0.5, logits [0, 0] for label 0 with the update on. The update sees class 0
    // first (1/2), then p0 = 1/2 * 0.5 + 1 * 0.5 = 0.75; class 1 stays unseen. With one class
    // seen the standard deviation is NaN, so every weight is 1. The loss is
    // -log(1/2) = ln 2 and its gradient softmax - onehot = [-1/2, 1/2].
    let handle = Handle::new(2, 0.5, 0.0);
    let out = forward_f32(&handle, arr2(&[[0.0, 0.0]]), &[0], &options(CBCE_REDUCTION_MEAN, true));
    assert_near(&out.loss, &[std::f64::consts::LN_2], 1e-7);
    assert_near(&out.grad, &[-0.5, 0.5], 1e-7);
    assert_eq!(out.weights_used, vec![1.0, 1.0]);
    assert_eq!(out.weight_sum, 1.0);
    assert_eq!(state_values(&handle.state())[0], 0.75);
    assert!(state_values(&handle.state())[1].is_nan());
}

#[test]
fn weighted_mean_sum_and_gradient_by_hand() {
    // Weights [1.5, 0.5] (see `quarter_and_three_quarters`). Row 0: logits [ln 3, 0], label 0,
    // softmax [3/4, 1/4], loss 1.5 ln(4/3). Row 1: logits [0, 0], label 1, loss 0.5 ln 2.
    // Sum 1.5 ln(4/3) + 0.5 ln 2; mean = sum / (1.5 + 0.5). Mean gradient: row 0
    // 1.5 ([3/4, 1/4] - [1, 0]) / 2 = [-0.1875, 0.1875]; row 1 0.5 ([1/2, 1/2] - [0, 1]) / 2
    // = [0.125, -0.125].
    let handle = quarter_and_three_quarters();
    let logits = arr2(&[[3f32.ln(), 0.0], [0.0, 0.0]]);
    let sum = 1.5 * (4.0f64 / 3.0).ln() + 0.5 * 2f64.ln();

    let mean = forward_f32(&handle, logits.clone(), &[0, 1], &options(CBCE_REDUCTION_MEAN, false));
    assert_near(&mean.loss, &[sum / 2.0], 1e-6);
    assert_near(&mean.grad, &[-0.1875, 0.1875, 0.125, -0.125], 1e-6);
    assert_near(
        &mean.weights_used.iter().map(|&w| w as f64).collect::<Vec<_>>(),
        &[1.5, 0.5],
        1e-6,
    );
    assert_near(&[mean.weight_sum], &[2.0], 1e-6);

    let total = forward_f32(&handle, logits.clone(), &[0, 1], &options(CBCE_REDUCTION_SUM, false));
    assert_near(&total.loss, &[sum], 1e-6);
    assert_near(&total.grad, &[-0.375, 0.375, 0.25, -0.25], 1e-6);

    let none = forward_f32(&handle, logits, &[0, 1], &options(CBCE_REDUCTION_NONE, false));
    assert_near(&none.loss, &[1.5 * (4.0f64 / 3.0).ln(), 0.5 * 2f64.ln()], 1e-6);
}

#[test]
fn label_smoothing_by_hand() {
    // eps = 0.2, weights [1.5, 0.5], C = 2. Row 1 (logits [0, 0], label 1): both -lp are ln 2,
    // loss = 0.8 * 0.5 ln 2 + 0.1 * (1.5 + 0.5) ln 2 = 0.6 ln 2. Row 0 (logits [ln 3, 0], label
    // 0): -lp = [ln(4/3), ln 4], loss = 0.8 * 1.5 ln(4/3) + 0.1 (1.5 ln(4/3) + 0.5 ln 4)
    // = 1.35 ln(4/3) + 0.1 ln 2. Gradient of row 1 (sum): softmax * (0.8 * 0.5 + 0.1 * 2)
    // - 0.8 * 0.5 [c = 1] - 0.1 w_c = [0.3 - 0.15, 0.3 - 0.4 - 0.05] = [0.15, -0.15].
    let handle = quarter_and_three_quarters();
    let mut opts = options(CBCE_REDUCTION_NONE, false);
    opts.label_smoothing = 0.2;
    let out = forward_f32(&handle, arr2(&[[3f32.ln(), 0.0], [0.0, 0.0]]), &[0, 1], &opts);
    let ln2 = 2f64.ln();
    assert_near(&out.loss, &[1.35 * (4.0f64 / 3.0).ln() + 0.1 * ln2, 0.6 * ln2], 1e-6);
    assert_near(&out.grad[2..], &[0.15, -0.15], 1e-6);
}

#[test]
fn ignore_index_that_is_a_class_is_left_out_of_the_mean_and_the_counts() {
    // Ignore index 1 with labels [0, 1]: only row 0 counts, so the mean is
    // 1.5 ln(4/3) / 1.5 = ln(4/3), its gradient row 0 ([3/4, 1/4] - [1, 0]) = [-1/4, 1/4],
    // row 1 zero, and the weight sum 1.5. Updating from the target [0, 1, 1] counts one label
    // of class 0 only (total 1), so with decay 0, p = [0.25 * 0 + 1, 0.75 * 0 + 0] = [1, 0].
    let handle = quarter_and_three_quarters();
    let mut opts = options(CBCE_REDUCTION_MEAN, false);
    opts.ignore_index = 1;
    let out = forward_f32(&handle, arr2(&[[3f32.ln(), 0.0], [0.0, 0.0]]), &[0, 1], &opts);
    assert_near(&out.loss, &[(4.0f64 / 3.0).ln()], 1e-6);
    assert_near(&out.grad, &[-0.25, 0.25, 0.0, 0.0], 1e-6);
    assert_near(&[out.weight_sum], &[1.5], 1e-6);

    let counts = class_counts(&handle, &[0, 1, 1], 0, 1);
    assert_eq!(counts, vec![1, 0]);
    update_with_labels(&handle, &[0, 1, 1], 0, 1);
    assert_eq!(state_values(&handle.state()), vec![1.0, 0.0]);
}

#[test]
fn min_prevalence_by_hand() {
    // C = 3, decay 0: counts [2, 1, 1] see every class (p = [1/2, 1/4, 1/4]), then counts
    // [0, 1, 1] give p = [0, 1/2, 1/2]. Without a floor 1/0 = inf makes the mean infinite
    // and every weight 1. With the floor 0.1: p = [0.1, 0.5, 0.5], w = [10, 2, 2], mean 14/3,
    // standard deviation sqrt(((16/3)^2 + 2 (8/3)^2) / 2) = 4.62 (bounds do not bind), sum 14,
    // so w = 3 * [10, 2, 2] / 14 = [15/7, 3/7, 3/7].
    for (floor, expected) in [(0.0, [1.0, 1.0, 1.0]), (0.1, [15.0 / 7.0, 3.0 / 7.0, 3.0 / 7.0])] {
        let handle = Handle::new(3, 0.0, floor);
        handle.update_from_counts(&[2, 1, 1]);
        handle.update_from_counts(&[0, 1, 1]);
        assert_eq!(state_values(&handle.state()), vec![0.0, 0.5, 0.5]);
        let weights: Vec<f64> = handle.weights().iter().map(|&w| w as f64).collect();
        assert_near(&weights, &expected, 1e-6);
    }
}

#[test]
fn clamp_binds_on_an_outlier_by_hand() {
    // Twenty classes at p = 0.05 (w = 20) and one at 1e-6 (w = 1e6), set through a state blob.
    // mean m = (20 * 20 + 1e6) / 21; the sample standard deviation s of those 21 values, then
    // the outlier is clamped to m + 3 s (about 702278), and the weights are normalised to sum
    // 21: 21 * 20 / (400 + m + 3 s) for the common classes.
    let handle = Handle::new(21, 0.99, 0.0);
    let mut blob = handle.state();
    for class in 0..21 {
        let p: f64 = if class == 20 { 1e-6 } else { 0.05 };
        let at = 24 + 8 * class;
        blob[at..at + 8].copy_from_slice(&p.to_le_bytes());
    }
    reseal(&mut blob);
    ok(handle.set_state(&blob));

    let inverse: Vec<f64> = (0..21).map(|c| if c == 20 { 1e6 } else { 20.0 }).collect();
    let m = inverse.iter().sum::<f64>() / 21.0;
    let s = (inverse.iter().map(|w| (w - m) * (w - m)).sum::<f64>() / 20.0).sqrt();
    let high = m + 3.0 * s;
    assert!((high - 702_278.0).abs() < 1.0, "{high}");
    let total = 400.0 + high;
    let weights = handle.weights();
    let relative = |a: f32, e: f64| ((a as f64 - e) / e).abs();
    assert!(relative(weights[0], 21.0 * 20.0 / total) < 1e-5, "{weights:?}");
    assert!(relative(weights[20], 21.0 * high / total) < 1e-5, "{weights:?}");
}

#[test]
fn reference_weights_by_hand() {
    // The reference's own weights on the hand cases above, so that a slip in it shows here.
    let w = weights_from_reported(&[0.25, 0.75], 0.0);
    assert_near(&w, &[1.5, 0.5], 1e-7);
    let w = weights_from_reported(&[0.25, 0.75, f32::NAN], 0.0);
    assert_near(&w, &[1.5, 0.5, 1.0], 1e-7);
    assert_eq!(weights_from_reported(&[f32::NAN; 3], 0.0), vec![1.0; 3]);
    assert_eq!(weights_from_reported(&[0.0, 0.5, 0.5], 0.0), vec![1.0; 3]);
}

#[test]
fn reference_model_matches_a_hand_update() {
    // C = 4, d = 0.5, counts [2, 0, 2, 0]: classes 0 and 2 start at 1/4, then
    // 1/4 * 0.5 + 1/2 * 0.5 = 0.375; the library gives the same bits.
    let mut model = Model::new(4, 0.5, 0.0);
    model.update(&[2, 0, 2, 0]);
    assert_eq!(model.values, vec![Some(0.375), None, Some(0.375), None]);
    let handle = Handle::new(4, 0.5, 0.0);
    handle.update_from_counts(&[2, 0, 2, 0]);
    same_state(&handle, &model).unwrap();
}

#[test]
fn one_dimensional_logits_and_a_zero_dimensional_target() {
    // Logits (C) = [0, ln 3] with target () = 1 under weights [1.5, 0.5]: softmax [1/4, 3/4],
    // the mean is 0.5 ln(4/3) / 0.5 = ln(4/3).
    let handle = quarter_and_three_quarters();
    let logits = logits_tensor(&arr1(&[0.0f32, 3f32.ln()]).into_dyn(), &Layout::contiguous(1));
    let target = target_tensor(&ArrayD::from_elem(IxDyn(&[]), 1i64), &Layout::contiguous(0));
    let mut loss = contiguous(&ArrayD::zeros(IxDyn(&[])), 0f32, CBCE_DTYPE_FLOAT, 32);
    let (l, t, o) = (logits.descriptor(), target.descriptor(), loss.descriptor_mut());
    let opts = options(CBCE_REDUCTION_MEAN, false);
    // SAFETY: the descriptors describe live locals.
    let status = unsafe {
        cbce_forward(
            handle.ptr(),
            &l,
            &t,
            &opts,
            &o,
            std::ptr::null(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(status, Status::Ok, "{}", last_message());
    assert_near(&[loss.logical()[IxDyn(&[])] as f64], &[(4.0f64 / 3.0).ln()], 1e-6);
}
