//! A million updates of one handle, with a class that vanishes after 1,000 steps and a class
//! that appears only after 100,000, with and without `min_prevalence`: the running state
//! follows the float64 reference bit for bit, the weights stay finite and follow SEMANTICS.md,
//! and a state saved and restored half way continues bit for bit.
//!
//! `CBCE_LONG_RUN_STEPS` changes the number of steps (default 1,000,000).

mod common;

use common::harness::{close, same_state};
use common::reference::Model;
use common::*;

const C: usize = 4;
const DECAY: f64 = 0.99;
const VANISHES_AT: usize = 1_000;
const APPEARS_AT: usize = 100_000;

fn steps() -> usize {
    std::env::var("CBCE_LONG_RUN_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000)
}

/// The counts of step `step`: class 0 always (10 to 12), class 1 until `VANISHES_AT`,
/// class 2 always (3), class 3 from `APPEARS_AT` on.
fn counts(step: usize) -> [i64; C] {
    [
        10 + (step % 3) as i64,
        if step < VANISHES_AT { 5 } else { 0 },
        3,
        if step >= APPEARS_AT { 2 } else { 0 },
    ]
}

fn is_checkpoint(step: usize) -> bool {
    step.is_multiple_of(9_973)
        || (VANISHES_AT - 2..VANISHES_AT + 2).contains(&step)
        || (APPEARS_AT - 2..APPEARS_AT + 2).contains(&step)
}

/// What SEMANTICS.md says of the weights in this run, checked at one step.
fn check_semantics(step: usize, handle: &Handle, model: &Model, floor: f64) {
    let weights = handle.weights();
    assert!(weights.iter().all(|w| w.is_finite() && *w > 0.0), "step {step}: {weights:?}");
    let sum: f32 = weights.iter().sum();
    assert!((sum - C as f32).abs() < 1e-4, "step {step}: weights sum to {sum}");
    let expected = model.weights();
    let actual: Vec<f64> = weights.iter().map(|&w| w as f64).collect();
    close(&format!("step {step} weights"), &actual, &expected, |_| 2e-6 * C as f64).unwrap();

    let reported = handle.prevalences();
    assert_eq!(reported[3].is_nan(), step < APPEARS_AT, "step {step}: class 3 seen or not");
    let vanished_inverse = 1.0f32 / reported[1].max(floor as f32);
    if vanished_inverse.is_infinite() {
        // A seen prevalence of 0 (or one whose float32 inverse overflows) makes the mean
        // weight infinite, and then every weight is 1.
        assert!(weights.iter().all(|&w| w == 1.0), "step {step}: {weights:?}");
    } else if step > VANISHES_AT + 500 {
        // The vanished class is now the rarest: it weighs the most.
        let heaviest = (0..C).max_by(|&a, &b| weights[a].total_cmp(&weights[b])).unwrap();
        assert_eq!(heaviest, 1, "step {step}: {weights:?}");
    }
    if floor > 0.0 {
        let (low, high) =
            weights.iter().fold((f32::INFINITY, 0f32), |(l, h), &w| (l.min(w), h.max(w)));
        assert!(high / low <= (1.0 / floor as f32) * 1.0001, "step {step}: {weights:?}");
    }
}

fn long_run(floor: f64) {
    let steps = steps();
    let handle = Handle::new(C as u64, DECAY, floor);
    let mut model = Model::new(C, DECAY, floor);
    let mut restored: Option<Handle> = None;
    let mut all_ones_seen = false;

    for step in 0..steps {
        let counts = counts(step);
        handle.update_from_counts(&counts);
        if let Some(restored) = &restored {
            restored.update_from_counts(&counts);
        }
        model.update(&counts.map(|c| c as u64));

        if step == steps / 2 {
            let copy = Handle::new(C as u64, DECAY, floor);
            ok(copy.set_state(&handle.state()));
            restored = Some(copy);
        }
        if step == APPEARS_AT {
            // First seen at 1/C, then one step: 1/4 * 0.99 + (2 / 15) * 0.01.
            let total = counts.iter().sum::<i64>() as f64;
            let expected = 0.25 * DECAY + (2.0 / total) * (1.0 - DECAY);
            assert_eq!(state_values(&handle.state())[3], expected);
        }
        if is_checkpoint(step) || step + 1 == steps {
            same_state(&handle, &model).unwrap_or_else(|e| panic!("step {step}: {e}"));
            check_semantics(step, &handle, &model, floor);
            all_ones_seen |= handle.weights().iter().all(|&w| w == 1.0);
        }
    }

    let restored = restored.expect("restored half way");
    assert_eq!(restored.state(), handle.state(), "the restored handle continued bit for bit");
    let bits = |w: Vec<f32>| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(restored.weights()), bits(handle.weights()));
    if steps >= 20_000 {
        // Without a floor the vanished class reaches a float32 prevalence of 0 after about
        // 10,000 steps (0.99^n * 0.3 < 1.4e-45), which makes every weight 1; with a floor it
        // never does.
        assert_eq!(all_ones_seen, floor == 0.0, "floor {floor}");
    }
}

#[test]
fn a_million_updates_without_a_floor() {
    long_run(0.0);
}

#[test]
fn a_million_updates_with_a_floor() {
    long_run(1e-3);
}
