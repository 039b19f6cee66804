//! The loss, its gradient and the counts are the same bits whatever the number of threads:
//! every pass is cut into chunks that depend only on the shapes, and partial sums are added in
//! chunk order. Checked with Rayon pools of 1, 2 and 8 threads on shapes of eight chunks or
//! more.

use cbce::{ClassBalancedLoss, Config, ForwardOptions, Reduction};
use ndarray::{ArrayD, IxDyn, ShapeBuilder};

mod common;

/// `len` seeded uniform values in [0, 1).
fn data(len: usize, seed: u64) -> Vec<f64> {
    let mut rng = common::Prng::new(seed);
    (0..len).map(|_| rng.unit()).collect()
}

struct Outcome {
    loss_bits: Vec<u32>,
    grad_bits: Vec<u32>,
    weights: Vec<u32>,
}

fn run(shape: &[usize], channels_last: bool, options: &ForwardOptions, threads: usize) -> Outcome {
    let classes = shape[1];
    let len: usize = shape.iter().product();
    let values: Vec<f32> = data(len, 1).iter().map(|u| (u * 12.0 - 6.0) as f32).collect();
    let logits = if channels_last {
        let (c, h, w) = (shape[1], shape[2], shape[3]);
        let strides = IxDyn(&[h * w * c, 1, w * c, c]);
        ArrayD::from_shape_vec(IxDyn(shape).strides(strides), values).unwrap()
    } else {
        ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
    };
    let target_shape: Vec<usize> =
        shape.iter().enumerate().filter(|(axis, _)| *axis != 1).map(|(_, &d)| d).collect();
    let positions: usize = target_shape.iter().product();
    let labels: Vec<i64> = data(positions, 2)
        .iter()
        .map(|u| if *u < 0.05 { -100 } else { (u * classes as f64) as i64 % classes as i64 })
        .collect();
    let target = ArrayD::from_shape_vec(IxDyn(&target_shape), labels).unwrap();

    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let loss = ClassBalancedLoss::new(Config::new(classes).with_ema_decay(0.9)).unwrap();
        // A first update so that the weights are not uniform.
        loss.update(target.view(), -100).unwrap();
        let out = loss.forward(logits.view(), target.view(), options, true).unwrap();
        Outcome {
            loss_bits: out.loss.iter().map(|v| v.to_bits()).collect(),
            grad_bits: out.grad.unwrap().iter().map(|v| v.to_bits()).collect(),
            weights: out.summary.weights_used.iter().map(|v| v.to_bits()).collect(),
        }
    })
}

fn assert_same_bits_on_any_thread_count(
    shape: &[usize],
    channels_last: bool,
    options: ForwardOptions,
) {
    let one = run(shape, channels_last, &options, 1);
    for threads in [2, 8] {
        let many = run(shape, channels_last, &options, threads);
        let context =
            format!("{shape:?} channels_last={channels_last} {options:?}, {threads} threads");
        assert_eq!(one.weights, many.weights, "weights differ: {context}");
        assert_eq!(one.loss_bits, many.loss_bits, "loss differs: {context}");
        let differing = one.grad_bits.iter().zip(&many.grad_bits).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{differing} gradient elements differ: {context}");
    }
}

#[test]
fn segmentation_nchw_is_thread_count_independent() {
    let options = ForwardOptions { label_smoothing: 0.1, ..ForwardOptions::default() };
    assert_same_bits_on_any_thread_count(&[2, 19, 128, 192], false, options);
}

#[test]
fn segmentation_channels_last_is_thread_count_independent() {
    let options = ForwardOptions { reduction: Reduction::Sum, ..ForwardOptions::default() };
    assert_same_bits_on_any_thread_count(&[2, 19, 128, 192], true, options);
}

#[test]
fn classification_rows_are_thread_count_independent() {
    assert_same_bits_on_any_thread_count(&[4000, 300], false, ForwardOptions::default());
    let options = ForwardOptions { reduction: Reduction::None, ..ForwardOptions::default() };
    assert_same_bits_on_any_thread_count(&[100_000, 10], false, options);
}
