//! A small demonstration of the loss over a few training steps: a linear classifier on
//! synthetic, imbalanced data whose class frequencies shift half-way, trained by gradient
//! descent with the loss and gradient that one `forward` call returns. It prints the loss,
//! the running prevalences and the class weights as they adapt.
//!
//! Run with `cargo run --release --example training_demo`.

use cbce::{ClassBalancedLoss, Config, ForwardOptions};
use ndarray::{Array1, Array2, Axis};

const CLASSES: usize = 4;
const FEATURES: usize = 8;
const BATCH: usize = 256;
const STEPS: usize = 40;

/// A deterministic pseudo-random generator (SplitMix64), so every run prints the same.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }

    fn class(&mut self, frequencies: &[f32]) -> usize {
        let mut u = self.uniform();
        for (class, &f) in frequencies.iter().enumerate() {
            if u < f {
                return class;
            }
            u -= f;
        }
        frequencies.len() - 1
    }
}

fn main() -> Result<(), cbce::Error> {
    let mut rng = Rng(7);
    let centres = Array2::from_shape_fn((CLASSES, FEATURES), |_| 2.0 * rng.normal());
    let mut weights = Array2::<f32>::zeros((FEATURES, CLASSES));
    let mut bias = Array1::<f32>::zeros(CLASSES);
    let loss = ClassBalancedLoss::new(Config::new(CLASSES).with_ema_decay(0.9))?;
    let learning_rate = 0.5;

    println!(
        "cbce {} demonstration: {CLASSES} classes, batches of {BATCH}",
        env!("CARGO_PKG_VERSION")
    );
    println!("{:>4}  {:>8}  {:>31}  {:>31}", "step", "loss", "prevalences", "weights");
    for step in 0..STEPS {
        // Class 3 is rare at first; half-way it becomes common and class 0 rare.
        let frequencies: [f32; CLASSES] =
            if step < STEPS / 2 { [0.6, 0.25, 0.13, 0.02] } else { [0.02, 0.25, 0.13, 0.6] };
        let target: Array1<i64> = (0..BATCH).map(|_| rng.class(&frequencies) as i64).collect();
        let features = Array2::from_shape_fn((BATCH, FEATURES), |(i, j)| {
            centres[[target[i] as usize, j]] + 1.5 * rng.normal()
        });

        let logits = features.dot(&weights) + &bias;
        let out = loss.forward(logits.view(), target.view(), &ForwardOptions::default(), true)?;
        let grad = out.grad.expect("the gradient was asked for");
        let grad = grad.into_dimensionality::<ndarray::Ix2>().expect("two axes");
        weights -= &(features.t().dot(&grad) * learning_rate);
        bias -= &(grad.sum_axis(Axis(0)) * learning_rate);

        if step.is_multiple_of(4) || step == STEPS - 1 {
            let prevalences = loss.prevalences();
            println!(
                "{step:>4}  {:>8.4}  {}  {}",
                out.summary.loss,
                format_row(&prevalences),
                format_row(&out.summary.weights_used)
            );
        }
    }
    Ok(())
}

fn format_row(values: &[f32]) -> String {
    values.iter().map(|v| format!("{v:>7.3}")).collect::<Vec<_>>().join(" ")
}
