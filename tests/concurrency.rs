//! One handle shared by 8 threads doing updates, forward calls and reads at once: the final
//! state is the state of one serial order of the same updates, and every read saw one of that
//! order's states, in an order consistent with each thread's own program order.
//!
//! The updates are chosen so that the final state tells the order they were applied in. With
//! decay d = 1/2 and every batch holding one class only (batch prevalence 1 for it, 0 for the
//! others), one update maps p to p/2 + 1/2 for the class of the batch and to p/2 for the rest.
//! Starting from p = 1/8 for all 8 classes, after n <= 48 updates every p is a sum of distinct
//! powers of two between 2^-1 and 2^-51, so float64 holds each step exactly and each step can
//! be undone exactly: the class updated last is the one with p >= 1/2 (any other is at most
//! half of a value below 1). Undoing the steps one by one recovers the serial order, which must
//! contain each thread's updates exactly once and lead back to the starting state. A lost or
//! torn update could not be undone this way.

mod common;

use cbce::ffi::*;
use common::*;
use ndarray::{ArrayD, IxDyn};
use std::ptr::null_mut;
use std::sync::Barrier;

const THREADS: usize = 8;
const UPDATES_PER_THREAD: usize = 6;
const ROUNDS: usize = 40;

/// What one thread saw, in its program order.
#[derive(Debug, Default)]
struct Observed {
    /// State blobs read with `cbce_get_state`, each with how many of this thread's own
    /// updates had returned before the read.
    states: Vec<(Vec<u8>, usize)>,
    /// Weights from forward calls without update and from `cbce_weights`.
    weights: Vec<Vec<f32>>,
    /// Weights from forward calls with update: those of the state right after that update.
    weights_after_update: Vec<Vec<f32>>,
}

fn one_class_target(class: usize, len: usize) -> Strided<i64> {
    let labels = ArrayD::from_elem(IxDyn(&[len]), class as i64);
    target_tensor(&labels, &Layout::contiguous(1))
}

/// `cbce_forward` over 16 rows whose labels are all `class`; returns the weights used.
fn forward(handle: &Handle, class: usize, update: bool) -> Vec<f32> {
    let logits =
        ArrayD::from_shape_fn(IxDyn(&[16, THREADS]), |i| (i[0] * 7 + i[1] * 3) as f32 * 0.1);
    let logits = logits_tensor(&logits, &Layout::contiguous(2));
    let target = one_class_target(class, 16);
    let mut loss = contiguous(&ArrayD::zeros(IxDyn(&[])), 0f32, CBCE_DTYPE_FLOAT, 32);
    let mut grad = contiguous(&ArrayD::zeros(IxDyn(&[16, THREADS])), 0f32, CBCE_DTYPE_FLOAT, 32);
    let mut weights = vec![0f32; THREADS];
    let options = CbceForwardOptions {
        update_prevalences: i32::from(update),
        ..cbce_forward_options_default()
    };
    let (l, t) = (logits.descriptor(), target.descriptor());
    let (o, g) = (loss.descriptor_mut(), grad.descriptor_mut());
    // SAFETY: the descriptors describe live locals; `weights` has C floats.
    ok(unsafe {
        cbce_forward(
            handle.ptr(),
            &l,
            &t,
            &options,
            &o,
            &g,
            weights.as_mut_ptr(),
            THREADS,
            null_mut(),
        )
    });
    weights
}

/// Thread `class`'s work: its updates (all of batches of its own class, by three different
/// calls) with reads in between.
fn work(handle: &Handle, class: usize, barrier: &Barrier) -> Observed {
    let mut seen = Observed::default();
    barrier.wait();
    for update in 0..UPDATES_PER_THREAD {
        seen.states.push((handle.state(), update));
        seen.weights.push(forward(handle, class, false));
        match (update + class) % 3 {
            0 => {
                let target = one_class_target(class, 3 + class);
                // SAFETY: the descriptor describes a live local.
                ok(unsafe { cbce_update(handle.ptr(), &target.descriptor(), -100) });
            }
            1 => {
                let mut counts = vec![0i64; THREADS];
                counts[class] = 1 + class as i64;
                handle.update_from_counts(&counts);
            }
            _ => seen.weights_after_update.push(forward(handle, class, true)),
        }
        seen.weights.push(handle.weights());
    }
    seen.states.push((handle.state(), UPDATES_PER_THREAD));
    seen
}

/// Undoes the updates of a final state one by one; returns the classes in the order they were
/// applied.
fn serial_order(final_values: &[f64], updates: usize) -> Vec<usize> {
    let mut values = final_values.to_vec();
    let mut order = Vec::with_capacity(updates);
    for step in (0..updates).rev() {
        let last: Vec<usize> = (0..values.len()).filter(|&c| values[c] >= 0.5).collect();
        assert_eq!(last.len(), 1, "step {step}: not one class at >= 1/2 in {values:?}");
        for (class, p) in values.iter_mut().enumerate() {
            *p = if class == last[0] { (*p - 0.5) * 2.0 } else { *p * 2.0 };
        }
        order.push(last[0]);
    }
    assert!(values.iter().all(|&p| p == 0.125), "undoing does not lead back: {values:?}");
    order.reverse();
    order
}

#[test]
fn eight_threads_share_one_handle_as_if_in_some_serial_order() {
    for round in 0..ROUNDS {
        let handle = Handle::new(THREADS as u64, 0.5, 0.0);
        handle.update_from_counts(&[1; THREADS]);
        assert!(state_values(&handle.state()).iter().all(|&p| p == 0.125));

        let barrier = Barrier::new(THREADS);
        let observed: Vec<Observed> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..THREADS)
                .map(|class| {
                    let (handle, barrier) = (&handle, &barrier);
                    scope.spawn(move || work(handle, class, barrier))
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });

        let updates = THREADS * UPDATES_PER_THREAD;
        let final_state = handle.state();
        let order = serial_order(&state_values(&final_state), updates);
        for class in 0..THREADS {
            let count = order.iter().filter(|&&c| c == class).count();
            assert_eq!(count, UPDATES_PER_THREAD, "round {round}: class {class} in {order:?}");
        }

        // Replaying that order serially gives the same bytes, and every state along the way.
        let replay = Handle::new(THREADS as u64, 0.5, 0.0);
        replay.update_from_counts(&[1; THREADS]);
        let mut states = vec![replay.state()];
        let mut weights = vec![replay.weights()];
        for &class in &order {
            let mut counts = vec![0i64; THREADS];
            counts[class] = 1;
            replay.update_from_counts(&counts);
            states.push(replay.state());
            weights.push(replay.weights());
        }
        assert_eq!(states.last().unwrap(), &final_state, "round {round}");

        for (class, seen) in observed.iter().enumerate() {
            // Where this thread's k-th update stands in the serial order (1-based state index).
            let own: Vec<usize> =
                order.iter().enumerate().filter(|(_, &c)| c == class).map(|(i, _)| i + 1).collect();
            let mut previous = 0;
            for (blob, done) in &seen.states {
                let at = states.iter().position(|s| s == blob);
                let at = at.unwrap_or_else(|| {
                    panic!("round {round}: a state read by {class} is in no serial state")
                });
                assert!(at >= previous, "round {round}: thread {class} read states out of order");
                if *done > 0 {
                    assert!(at >= own[done - 1], "round {round}: {class} missed its own update");
                }
                if *done < UPDATES_PER_THREAD {
                    assert!(at < own[*done], "round {round}: {class} saw its update too early");
                }
                previous = at;
            }
            for w in &seen.weights {
                assert!(weights.contains(w), "round {round}: weights {w:?} of no serial state");
            }
            for w in &seen.weights_after_update {
                let after_own = own.iter().any(|&i| &weights[i] == w);
                assert!(after_own, "round {round}: weights {w:?} not right after an update");
            }
        }
    }
}
