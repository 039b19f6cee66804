//! Throughput of the fused forward-plus-gradient pass and of the label update, against a plain
//! copy of the same bytes by the same threads, measured in the same run.
//!
//! Run with `cargo bench --bench throughput`. Options after `--`: `--quick` for fewer
//! repetitions, `--only TEXT` for the cases whose name contains TEXT, `--dtype f32|bf16`,
//! `--batch N` to replace every case's batch size, `--csv` for one machine-readable line per case (used by
//! `benches/compare_torch.py`). The thread count is Rayon's: all cores, or
//! `RAYON_NUM_THREADS`. Each figure is the median of several repetitions after a warm-up.

use cbce::{bf16, ClassBalancedLoss, Config, ForwardOptions, Logit, Real};
use ndarray::{ArrayD, IxDyn, ShapeBuilder};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Elements per task of the parallel copy.
const COPY_RUN: usize = 1 << 17;

struct Case {
    name: &'static str,
    shape: Vec<usize>,
    channels_last: bool,
    /// "f32" or "bf16".
    dtype: &'static str,
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

/// How results are printed.
#[derive(Clone, Copy, PartialEq)]
enum Output {
    Table,
    Csv,
}

fn run_case<T: Logit>(case: &Case, repetitions: usize, output: Output) {
    let type_name = case.dtype;
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
    // The copy floor: the same bytes copied by the same threads, in runs as long as the pass's.
    let source = logits.as_slice_memory_order().unwrap();
    let mut destination = source.to_vec();
    let copy = median_time(repetitions, || {
        destination
            .par_chunks_mut(COPY_RUN)
            .zip(black_box(source).par_chunks(COPY_RUN))
            .for_each(|(to, from)| to.copy_from_slice(from));
        black_box(&destination);
    });

    let element = std::mem::size_of::<T>();
    let bytes = (2 * positions * classes * element + positions * 8) as f64;
    let copy_bytes = (2 * positions * classes * element) as f64;
    let gbps = |bytes: f64, time: Duration| bytes / time.as_secs_f64() / 1e9;
    if output == Output::Csv {
        println!(
            "{},{type_name},{:?},{:.4},{:.4}",
            case.name,
            case.shape,
            ours.as_secs_f64() * 1e3,
            copy.as_secs_f64() * 1e3
        );
        return;
    }
    println!(
        "{:<27} {:<19} {:<5} {:>8.2} ms {:>6.1} GB/s   copy {:>6.2} ms {:>5.1} GB/s   ratio {:.2}",
        case.name,
        format!("{:?}", case.shape),
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
    let batch = args.iter().position(|a| a == "--batch").and_then(|i| args.get(i + 1));
    let batch: Option<usize> = batch.map(|n| n.parse().expect("--batch takes a number"));
    let output = if args.iter().any(|a| a == "--csv") { Output::Csv } else { Output::Table };
    let repetitions = if quick { 3 } else { 11 };
    if output == Output::Table {
        println!("cbce throughput, {} threads", rayon::current_num_threads());
    }
    let case = |name, shape: &[usize], channels_last, dtype| Case {
        name,
        shape: shape.to_vec(),
        channels_last,
        dtype,
    };
    let segmentation = [8, 19, 256, 512];
    let mut cases = [
        case("segmentation NCHW", &segmentation, false, "f32"),
        case("segmentation channels-last", &segmentation, true, "f32"),
        case("classification", &[4096, 1000], false, "f32"),
        case("small-C", &[65536, 10], false, "f32"),
        case("segmentation NCHW", &segmentation, false, "bf16"),
    ];
    if let Some(batch) = batch {
        for case in &mut cases {
            case.shape[0] = batch;
        }
    }
    let dtype = args.iter().position(|a| a == "--dtype").and_then(|i| args.get(i + 1));
    for case in cases.iter().filter(|case| selected(case.name)) {
        if dtype.is_some_and(|wanted| wanted != case.dtype) {
            continue;
        }
        match case.dtype {
            "bf16" => run_case::<bf16>(case, repetitions, output),
            _ => run_case::<f32>(case, repetitions, output),
        }
    }

    if !selected("update") {
        return;
    }
    let labels: Vec<i64> =
        noise(4 << 20, 3).iter().map(|v| ((v + 4.0) / 8.0 * 19.0) as i64).collect();
    let labels = ndarray::Array1::from(labels);
    let loss = ClassBalancedLoss::new(Config::new(19)).unwrap();
    let update = median_time(repetitions, || loss.update(labels.view(), -100).unwrap());
    match output {
        Output::Table => {
            println!("update from 4M int64 labels: {:.2} ms", update.as_secs_f64() * 1e3)
        }
        Output::Csv => println!("update,int64,[4194304],{:.4},", update.as_secs_f64() * 1e3),
    }
}
