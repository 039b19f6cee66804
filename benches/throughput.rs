//! Throughput of the fused forward-plus-gradient pass and of the label update, against a plain
//! copy of the same bytes measured in the same run.
//!
//! Run with `cargo bench --bench throughput` (add `-- --quick` for fewer repetitions). The
//! thread count is Rayon's: all cores, or `RAYON_NUM_THREADS`. Each figure is the median of
//! several repetitions after a warm-up.

use cbce::{bf16, ClassBalancedLoss, Config, ForwardOptions, Logit, Real};
use ndarray::{ArrayD, IxDyn, ShapeBuilder};
use std::hint::black_box;
use std::time::{Duration, Instant};

struct Case {
    name: &'static str,
    shape: Vec<usize>,
    channels_last: bool,
}

fn median_time(repetitions: usize, mut work: impl FnMut()) -> Duration {
    work();
    let mut times: Vec<Duration> = (0..repetitions)
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Deterministic pseudo-random values in [-4, 4) (SplitMix64).
fn noise(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0
        })
        .collect()
}

fn logits_array<T: Logit>(case: &Case, values: &[f32]) -> ArrayD<T> {
    let data: Vec<T> = values.iter().map(|&v| T::from_acc(T::Acc::from_f64(v as f64))).collect();
    let shape = &case.shape;
    if case.channels_last {
        // The logical shape is NCHW; the memory is NHWC.
        let (c, h, w) = (shape[1], shape[2], shape[3]);
        let strides = IxDyn(&[h * w * c, 1, w * c, c]);
        ArrayD::from_shape_vec(IxDyn(shape).strides(strides), data).expect("strides fit")
    } else {
        ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape fits")
    }
}

fn run_case<T: Logit>(case: &Case, type_name: &str, repetitions: usize) {
    let classes = case.shape[1];
    let positions: usize = case.shape.iter().product::<usize>() / classes;
    let logits = logits_array::<T>(case, &noise(positions * classes, 1));
    let target_shape: Vec<usize> =
        case.shape.iter().enumerate().filter(|(a, _)| *a != 1).map(|(_, &d)| d).collect();
    let target = ArrayD::from_shape_vec(
        IxDyn(&target_shape),
        noise(positions, 2).iter().map(|v| ((v + 4.0) / 8.0 * classes as f32) as i64).collect(),
    )
    .unwrap();
    let loss = ClassBalancedLoss::new(Config::new(classes)).unwrap();
    let options = ForwardOptions::default();
    let mut grad = logits.clone();
    let mut out = ArrayD::from_elem(IxDyn(&[]), logits.iter().next().copied().unwrap());

    let ours = median_time(repetitions, || {
        loss.forward_into(
            logits.view(),
            target.view(),
            &options,
            out.view_mut(),
            Some(grad.view_mut()),
        )
        .unwrap();
        black_box(&grad);
    });

    if std::env::var_os("NOGRAD").is_some() {
        let t = median_time(repetitions, || {
            loss.forward_into(logits.view(), target.view(), &options, out.view_mut(), None)
                .unwrap();
        });
        println!("without gradient: {:.2} ms", t.as_secs_f64() * 1e3);
    }
    let source = logits.as_slice_memory_order().unwrap();
    let mut destination = source.to_vec();
    let copy = median_time(repetitions, || {
        destination.copy_from_slice(black_box(source));
        black_box(&destination);
    });

    let element = std::mem::size_of::<T>();
    let bytes = (2 * positions * classes * element + positions * 8) as f64;
    let copy_bytes = (2 * positions * classes * element) as f64;
    let gbps = |bytes: f64, time: Duration| bytes / time.as_secs_f64() / 1e9;
    println!(
        "{:<28} {:<6} {:>9.2} ms {:>7.1} GB/s   copy {:>7.2} ms {:>6.1} GB/s   ratio {:.2}",
        case.name,
        type_name,
        ours.as_secs_f64() * 1e3,
        gbps(bytes, ours),
        copy.as_secs_f64() * 1e3,
        gbps(copy_bytes, copy),
        gbps(bytes, ours) / gbps(copy_bytes, copy),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only TEXT` runs only the cases whose name contains TEXT.
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let selected = |name: &str| only.as_deref().is_none_or(|text| name.contains(text));
    let repetitions = if quick { 3 } else { 11 };
    println!("cbce throughput, {} threads", rayon::current_num_threads());
    let cases = [
        Case { name: "segmentation NCHW", shape: vec![8, 19, 256, 512], channels_last: false },
        Case {
            name: "segmentation channels-last",
            shape: vec![8, 19, 256, 512],
            channels_last: true,
        },
        Case { name: "classification (4096, 1000)", shape: vec![4096, 1000], channels_last: false },
        Case { name: "small-C (65536, 10)", shape: vec![65536, 10], channels_last: false },
    ];
    for case in cases.iter().filter(|case| selected(case.name)) {
        run_case::<f32>(case, "f32", repetitions);
    }
    if selected("bf16") {
        run_case::<bf16>(&cases[0], "bf16", repetitions);
    }

    if !selected("update") {
        return;
    }
    let labels: Vec<i64> =
        noise(4 << 20, 3).iter().map(|v| ((v + 4.0) / 8.0 * 19.0) as i64).collect();
    let labels = ndarray::Array1::from(labels);
    let loss = ClassBalancedLoss::new(Config::new(19)).unwrap();
    let update = median_time(repetitions, || loss.update(labels.view(), -100).unwrap());
    println!("update from 4M int64 labels: {:.2} ms", update.as_secs_f64() * 1e3);
}
