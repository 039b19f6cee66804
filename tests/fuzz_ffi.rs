//! A bounded random-input test of the exported functions, run in CI in place of a coverage-
//! guided fuzzer (cargo-fuzz needs a nightly compiler).
//!
//! Each case is drawn from a seeded generator: a valid forward and backward call in a random
//! shape, dtype pair and layout (compared with the float64 reference); the same call with one
//! hostile change to one argument (NULLs, negative, huge and overflowing extents, overflowing
//! strides, misaligned and overflowing byte offsets, overlapping and aliasing outputs, unknown
//! dtypes and devices, out-of-range labels and options), which must fail with the status that
//! change calls for and leave the state and every output as they were; updates and counts from
//! random targets; counts with negative and overflowing values; damaged state blobs; random
//! configurations. Any panic caught at the boundary shows as CBCE_STATUS_PANIC and fails.
//!
//! Budget: `CBCE_FUZZ_CASES` cases (default 3000) or `CBCE_FUZZ_SECONDS` seconds, whichever
//! ends first; `CBCE_FUZZ_SEED` picks the seed (default 0x5eed). A failure names its case's
//! seed, and `CBCE_FUZZ_SEED=<that> CBCE_FUZZ_CASES=1` replays it alone.

mod common;

use cbce::ffi::*;
use cbce::Status;
use common::harness::{same_state, ForwardCase};
use common::reference::Model;
use common::*;
use ndarray::{ArrayD, IxDyn};
use std::collections::BTreeMap;
use std::ptr::{null, null_mut};
use std::time::{Duration, Instant};

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn env_seed() -> u64 {
    let Ok(text) = std::env::var("CBCE_FUZZ_SEED") else { return 0x5eed };
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).expect("CBCE_FUZZ_SEED in hex"),
        None => text.parse().expect("CBCE_FUZZ_SEED as a number"),
    }
}

#[test]
fn random_calls_never_crash_and_agree_with_the_reference() {
    let cases: u64 = env("CBCE_FUZZ_CASES").unwrap_or(3000);
    let seconds: Option<f64> = env("CBCE_FUZZ_SECONDS");
    let limit = seconds.map(Duration::from_secs_f64);
    let seed = env_seed();
    let start = Instant::now();
    let mut kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut done = 0u64;

    let mut seeds = Prng::new(seed);
    while done < cases && limit.is_none_or(|l| start.elapsed() < l) {
        let case_seed = if done == 0 { seed } else { seeds.next_u64() };
        let mut rng = Prng::new(case_seed);
        let (kind, outcome) = match rng.below(10) {
            0..=2 => ("valid forward and backward", valid_forward(&mut rng)),
            3..=5 => ("hostile forward", hostile_forward(&mut rng)),
            6 => ("update and counts", update_and_counts(&mut rng)),
            7 => ("counts with hostile values", hostile_counts(&mut rng)),
            8 => ("damaged state blob", damaged_state(&mut rng)),
            _ => ("random configuration", random_config(&mut rng)),
        };
        match outcome {
            Ok(status) => *statuses.entry(format!("{status:?}")).or_default() += 1,
            Err(e) => panic!(
                "case {done} ({kind}) failed: {e}\nreplay: CBCE_FUZZ_SEED={case_seed:#x} \
                 CBCE_FUZZ_CASES=1"
            ),
        }
        *kinds.entry(kind).or_default() += 1;
        done += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!("fuzz: {done} cases in {elapsed:.1} s, seed {seed:#x}");
    eprintln!("fuzz: kinds {kinds:?}");
    eprintln!("fuzz: statuses {statuses:?}");
    assert!(done > 0, "no case ran");
}

type Outcome = Result<Status, String>;

fn expect(what: &str, actual: Status, expected: Status) -> Result<(), String> {
    if actual == Status::Panic || actual != expected {
        return Err(format!("{what}: {actual:?}, expected {expected:?}: {}", last_message()));
    }
    if expected != Status::Ok && last_message().is_empty() {
        return Err(format!("{what}: {actual:?} without a message"));
    }
    Ok(())
}

/// A valid call, sometimes with NaN and infinite logits, against the reference.
fn valid_forward(rng: &mut Prng) -> Outcome {
    let mut case = ForwardCase::random(rng, 48);
    if rng.chance(0.1) && !case.logits.is_empty() {
        let len = case.logits.len();
        for _ in 0..rng.range(1, 3) {
            let at = rng.below(len as u64) as usize;
            let value = *rng.pick(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
            *case.logits.iter_mut().nth(at).unwrap() = value;
        }
        broadcast_consistent(&mut case.logits, &case.logits_layout);
    }
    case.check().map(|()| Status::Ok).map_err(|e| format!("{e}\n{case:#?}"))
}

/// One hostile change to a valid forward call, and the status it must get.
#[derive(Debug, Clone, Copy)]
enum Hostile {
    NullTensor(usize),
    NullData(usize),
    NullShape(usize),
    Ndim(usize, i32),
    NegativeExtent(usize),
    OverflowingExtents(usize),
    OverflowingStride(usize),
    MisalignedOffset(usize),
    OverflowingOffset(usize),
    BadDtype(usize),
    OtherFloatDtype,
    BadDevice(usize, i32),
    GradStrideZero,
    GradIsLogits,
    LossOutIsTarget,
    LabelOutOfRange,
    Reduction(i32),
    UpdateFlag(i32),
    LabelSmoothing(f64),
    GradScale(f64),
    WeightsLen,
    FewerTargetAxes,
    FewerClasses,
    ShorterTargetAxis,
}

const LOGITS: usize = 0;
const TARGET: usize = 1;
const LOSS_OUT: usize = 2;
const GRAD: usize = 3;

fn hostile_forward(rng: &mut Prng) -> Outcome {
    let case = ForwardCase::random(rng, 24);
    macro_rules! with_target {
        ($t:ty) => {
            match case.target_dtype {
                0 => hostile_typed::<$t, i64>(&case, rng),
                1 => hostile_typed::<$t, i32>(&case, rng),
                _ => hostile_typed::<$t, u8>(&case, rng),
            }
        };
    }
    match case.logits_dtype {
        0 => with_target!(f32),
        1 => with_target!(f64),
        2 => with_target!(cbce::f16),
        _ => with_target!(cbce::bf16),
    }
}

fn pick_hostile(rng: &mut Prng, tensors: &[&dyn TensorInfo; 4]) -> Option<(Hostile, Status)> {
    use Hostile::*;
    let t = rng.below(4) as usize;
    let info = tensors[t];
    let some_axis_of_two = (0..info.rank()).filter(|&a| info.extent(a) >= 2).collect::<Vec<_>>();
    let choice = match rng.below(24) {
        // The gradient is optional: a NULL one is a valid call.
        0 if t != GRAD => (NullTensor(t), Status::NullPointer),
        1 if !info.is_empty() => (NullData(t), Status::NullPointer),
        2 if info.rank() > 0 => (NullShape(t), Status::NullPointer),
        3 => (Ndim(t, *rng.pick(&[-1, -1000, 33, i32::MAX])), Status::InvalidLayout),
        4 if info.rank() > 0 => (NegativeExtent(t), Status::InvalidLayout),
        5 if info.rank() > 1 => (OverflowingExtents(t), Status::InvalidLayout),
        6 if !some_axis_of_two.is_empty() && !info.is_empty() => {
            (OverflowingStride(t), Status::InvalidLayout)
        }
        7 if !info.is_empty() && info.element_size() > 1 => {
            (MisalignedOffset(t), Status::InvalidLayout)
        }
        8 if !info.is_empty() => (OverflowingOffset(t), Status::InvalidLayout),
        9 => (BadDtype(t), Status::UnsupportedDtype),
        10 => (OtherFloatDtype, Status::UnsupportedDtype),
        11 => {
            let device = *rng.pick(&[CBCE_DEVICE_CUDA, 0, 4, 7, 99, -1]);
            (BadDevice(t, device), Status::DeviceMismatch)
        }
        12 if !tensors[GRAD].is_empty() && tensors[GRAD].has_axis_of_two() => {
            (GradStrideZero, Status::InvalidLayout)
        }
        13 if !tensors[LOGITS].is_empty() => (GradIsLogits, Status::InvalidLayout),
        14 if !tensors[TARGET].is_empty() && !tensors[LOSS_OUT].is_empty() => {
            (LossOutIsTarget, Status::InvalidLayout)
        }
        15 if !tensors[TARGET].is_empty() => (LabelOutOfRange, Status::LabelOutOfRange),
        16 => (Reduction(*rng.pick(&[-1, 3, 100, i32::MIN])), Status::InvalidArgument),
        17 => (UpdateFlag(*rng.pick(&[-1, 2, 255])), Status::InvalidArgument),
        18 => {
            let eps = *rng.pick(&[-0.1, 1.0001, 7.0, f64::NAN, f64::INFINITY]);
            (LabelSmoothing(eps), Status::InvalidArgument)
        }
        19 => {
            let g = *rng.pick(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
            (GradScale(g), Status::InvalidArgument)
        }
        20 => (WeightsLen, Status::BufferLength),
        21 if tensors[TARGET].rank() > 0 => (FewerTargetAxes, Status::ShapeMismatch),
        22 if tensors[LOGITS].extent(class_axis(tensors[LOGITS].rank())) >= 2 => {
            (FewerClasses, Status::ShapeMismatch)
        }
        23 if (0..tensors[TARGET].rank()).any(|a| tensors[TARGET].extent(a) >= 1) => {
            (ShorterTargetAxis, Status::ShapeMismatch)
        }
        _ => return None,
    };
    Some(choice)
}

fn class_axis(rank: usize) -> usize {
    usize::from(rank > 1)
}

trait TensorInfo {
    fn rank(&self) -> usize;
    fn extent(&self, axis: usize) -> usize;
    fn is_empty(&self) -> bool {
        (0..self.rank()).any(|a| self.extent(a) == 0)
    }
    fn has_axis_of_two(&self) -> bool {
        (0..self.rank()).any(|a| self.extent(a) >= 2)
    }
    fn element_size(&self) -> usize;
}

impl<T: Copy> TensorInfo for Strided<T> {
    fn rank(&self) -> usize {
        self.shape.len()
    }
    fn extent(&self, axis: usize) -> usize {
        self.shape[axis] as usize
    }
    fn element_size(&self) -> usize {
        std::mem::size_of::<T>()
    }
}

fn hostile_typed<T: Float, L: Label>(case: &ForwardCase, rng: &mut Prng) -> Outcome {
    let handle = Handle::new(case.num_classes as u64, case.ema_decay, case.min_prevalence);
    for counts in &case.prior_counts {
        handle.update_from_counts(&counts.iter().map(|&c| c as i64).collect::<Vec<_>>());
    }
    let logits = logits_tensor(&case.logits.mapv(T::from_f64), &case.logits_layout);
    let mut target = target_tensor(&case.labels.mapv(L::from_i64), &case.target_layout);
    let sentinel = T::from_f64(-1234.0);
    let loss_shape: Vec<usize> =
        if case.reduction == CBCE_REDUCTION_NONE { case.labels.shape().to_vec() } else { vec![] };
    let loss_layout = if case.reduction == CBCE_REDUCTION_NONE {
        case.per_position_layout.clone()
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
    let mut grad = Strided::new(
        &ArrayD::from_elem(case.logits.raw_dim(), sentinel),
        &case.grad_layout,
        sentinel,
        T::CODE,
        T::BITS,
    );
    let infos: [&dyn TensorInfo; 4] = [&logits, &target, &loss_out, &grad];
    // Draw until a change fits this call (not every change fits every shape).
    let Some((hostile, expected)) = (0..100).find_map(|_| pick_hostile(rng, &infos)) else {
        return Err("no hostile change fits the call".into());
    };

    let mut options = CbceForwardOptions {
        reduction: case.reduction,
        update_prevalences: i32::from(case.update),
        ignore_index: case.ignore_index,
        label_smoothing: case.label_smoothing,
        grad_scale: case.grad_scale,
    };
    let mut weights_used = vec![f32::NAN; case.num_classes];
    let mut weights_len = case.num_classes;
    let mut weight_sum = -1234.0f64;
    if let Hostile::LabelOutOfRange = hostile {
        let labels = target.memory.len();
        let at = target.offset;
        let bad = match L::BITS {
            8 if case.ignore_index != 255 && case.num_classes < 255 => 255,
            8 => case.num_classes as i64, // below 255 as C <= 12
            _ => *rng.pick(&[-1, -7, case.num_classes as i64, 1 << 20]),
        };
        let bad = if bad == case.ignore_index { case.num_classes as i64 + 1 } else { bad };
        assert!(at < labels);
        target.memory[at] = L::from_i64(bad);
    }

    // Extents and strides a change may point a descriptor to; they live until the call.
    let mut shapes: [Vec<i64>; 4] =
        [logits.shape.clone(), target.shape.clone(), loss_out.shape.clone(), grad.shape.clone()];
    let mut strides: [Vec<i64>; 4] = [
        logits.strides.clone(),
        target.strides.clone(),
        loss_out.strides.clone(),
        grad.strides.clone(),
    ];
    let mut descriptors = [
        logits.descriptor(),
        target.descriptor(),
        loss_out.descriptor_mut(),
        grad.descriptor_mut(),
    ];
    let mut null_tensor = None;
    let before_state = handle.state();
    let before_outputs = (loss_out.bytes(), grad.bytes());

    use Hostile::*;
    match hostile {
        NullTensor(t) => null_tensor = Some(t),
        NullData(t) => descriptors[t].data = null_mut(),
        NullShape(t) => descriptors[t].shape = null_mut(),
        Ndim(t, ndim) => descriptors[t].ndim = ndim,
        NegativeExtent(t) => {
            let axis = rng.below(shapes[t].len() as u64) as usize;
            shapes[t][axis] = -rng.range(1, 1 << 40);
        }
        OverflowingExtents(t) => {
            shapes[t][0] = 1 << 32;
            shapes[t][1] = *rng.pick(&[1i64 << 32, i64::MAX, 1 << 31]);
        }
        OverflowingStride(t) => {
            let axes: Vec<usize> = (0..shapes[t].len()).filter(|&a| shapes[t][a] >= 2).collect();
            let axis = *rng.pick(&axes);
            strides[t][axis] = *rng.pick(&[i64::MAX, i64::MIN, i64::MAX / 2, -(1 << 62)]);
        }
        MisalignedOffset(t) => {
            let size = (descriptors[t].dtype.bits / 8) as i64;
            descriptors[t].byte_offset += rng.range(1, size - 1) as u64;
        }
        OverflowingOffset(t) => descriptors[t].byte_offset = u64::MAX - rng.below(64),
        BadDtype(t) => {
            descriptors[t].dtype = match rng.below(3) {
                0 => dtype(*rng.pick(&[3u8, 5, 6, 7, 8, 100, 255]), descriptors[t].dtype.bits),
                1 => {
                    CbceDataType { lanes: *rng.pick(&[0u16, 2, 4, 65535]), ..descriptors[t].dtype }
                }
                _ => dtype(descriptors[t].dtype.code, *rng.pick(&[0u8, 1, 7, 12, 24, 128])),
            };
        }
        OtherFloatDtype => {
            let others: Vec<CbceDataType> =
                [dtype(2, 16), dtype(2, 32), dtype(2, 64), dtype(4, 16)]
                    .into_iter()
                    .filter(|d| *d != descriptors[LOGITS].dtype)
                    .collect();
            descriptors[LOGITS].dtype = *rng.pick(&others);
        }
        BadDevice(t, device) => descriptors[t].device.device_type = device,
        GradStrideZero => {
            let axes: Vec<usize> =
                (0..shapes[GRAD].len()).filter(|&a| shapes[GRAD][a] >= 2).collect();
            strides[GRAD][*rng.pick(&axes)] = 0;
        }
        GradIsLogits => {
            descriptors[GRAD] = descriptors[LOGITS];
            strides[GRAD] = strides[LOGITS].clone();
            shapes[GRAD] = shapes[LOGITS].clone();
        }
        LossOutIsTarget => {
            descriptors[LOSS_OUT].data = descriptors[TARGET].data;
            descriptors[LOSS_OUT].byte_offset = descriptors[TARGET].byte_offset;
        }
        LabelOutOfRange => {}
        Reduction(code) => options.reduction = code,
        UpdateFlag(flag) => options.update_prevalences = flag,
        LabelSmoothing(eps) => options.label_smoothing = eps,
        GradScale(g) => options.grad_scale = g,
        WeightsLen => weights_len = case.num_classes + rng.range(1, 3) as usize,
        FewerTargetAxes => descriptors[TARGET].ndim -= 1,
        FewerClasses => {
            let axis = class_axis(shapes[LOGITS].len());
            shapes[LOGITS][axis] -= 1;
        }
        ShorterTargetAxis => {
            let axes: Vec<usize> =
                (0..shapes[TARGET].len()).filter(|&a| shapes[TARGET][a] >= 1).collect();
            shapes[TARGET][*rng.pick(&axes)] -= 1;
        }
    }
    for t in 0..4 {
        if !descriptors[t].shape.is_null() {
            descriptors[t].shape = shapes[t].as_mut_ptr();
        }
        if !descriptors[t].strides.is_null() {
            descriptors[t].strides = strides[t].as_mut_ptr();
        }
    }
    let pointer = |t: usize| -> *const CbceTensor {
        if null_tensor == Some(t) {
            null()
        } else {
            &descriptors[t]
        }
    };
    // A weights buffer long enough for a wrong length.
    weights_used.resize(weights_len.max(case.num_classes), f32::NAN);
    // SAFETY: every descriptor describes memory of the tensors above, except where the change
    // makes it invalid in a way the library documents it detects before any access (its extents,
    // strides, offsets, dtype or device), or points an output at an input's memory.
    let status = unsafe {
        cbce_forward(
            handle.ptr(),
            pointer(LOGITS),
            pointer(TARGET),
            &options,
            pointer(LOSS_OUT),
            pointer(GRAD),
            weights_used.as_mut_ptr(),
            weights_len,
            &mut weight_sum,
        )
    };
    let what = format!("{hostile:?} on {:?}", case.logits_dtype);
    expect(&what, status, expected)?;
    if handle.state() != before_state {
        return Err(format!("{what}: the state changed"));
    }
    if (loss_out.bytes(), grad.bytes()) != before_outputs {
        return Err(format!("{what}: an output was written"));
    }
    if weights_used.iter().any(|w| !w.is_nan()) || weight_sum != -1234.0 {
        return Err(format!("{what}: weights_used or weight_sum was written"));
    }
    Ok(status)
}

/// Counts and updates from a random target in any dtype and layout, with labels in and out
/// of range, against the reference.
fn update_and_counts(rng: &mut Prng) -> Outcome {
    let num_classes = rng.range(1, 300) as usize;
    let rank = rng.below(4) as usize;
    let shape: Vec<usize> = (0..rank).map(|_| rng.below(6) as usize).collect();
    let layout = Layout::random(rng, rank, true);
    let dtype_choice = rng.below(3);
    let ignore_index = *rng.pick(&[-100, -1, 0, 255, 7]);
    let mut labels = ArrayD::from_shape_fn(IxDyn(&shape), |_| match rng.below(8) {
        0 => ignore_index,
        1 => rng.range(-300, 600),
        _ => rng.range(0, num_classes as i64 - 1),
    });
    if dtype_choice == 2 {
        labels.mapv_inplace(|l| l.rem_euclid(256));
    }
    broadcast_consistent(&mut labels, &layout);
    let decay = rng.unit();
    let handle = Handle::new(num_classes as u64, decay, 0.0);
    let mut model = Model::new(num_classes, decay, 0.0);

    let values: Vec<i64> = labels.iter().copied().collect();
    let expected = model.counts(&values, ignore_index);
    let mut counts = vec![-1i64; num_classes];
    let (count_status, update_status) = match dtype_choice {
        0 => {
            count_then_update(&handle, &target_tensor(&labels, &layout), ignore_index, &mut counts)
        }
        1 => count_then_update(
            &handle,
            &target_tensor(&labels.mapv(|l| l as i32), &layout),
            ignore_index,
            &mut counts,
        ),
        _ => count_then_update(
            &handle,
            &target_tensor(&labels.mapv(|l| l as u8), &layout),
            ignore_index,
            &mut counts,
        ),
    };
    expect("cbce_class_counts", count_status, Status::Ok)?;
    expect("cbce_update", update_status, Status::Ok)?;
    let expected_signed: Vec<i64> = expected.iter().map(|&c| c as i64).collect();
    if counts != expected_signed {
        return Err(format!("counts {counts:?}, expected {expected_signed:?}"));
    }
    model.update(&expected);
    same_state(&handle, &model)?;
    Ok(Status::Ok)
}

fn count_then_update<L: Label>(
    handle: &Handle,
    target: &Strided<L>,
    ignore_index: i64,
    counts: &mut [i64],
) -> (Status, Status) {
    let descriptor = target.descriptor();
    // SAFETY: the descriptor describes a live local; `counts` has C writable values.
    let count = unsafe {
        cbce_class_counts(
            handle.ptr(),
            &descriptor,
            ignore_index,
            counts.as_mut_ptr(),
            counts.len(),
        )
    };
    // SAFETY: as above.
    let update = unsafe { cbce_update(handle.ptr(), &descriptor, ignore_index) };
    (count, update)
}

/// Counts with negative or huge values: INVALID_STATE and no change, or the reference's
/// update bit for bit.
fn hostile_counts(rng: &mut Prng) -> Outcome {
    let num_classes = rng.range(1, 16) as usize;
    let decay = *rng.pick(&[0.0, 0.5, 0.99, 1.0]);
    let handle = Handle::new(num_classes as u64, decay, 0.0);
    let mut model = Model::new(num_classes, decay, 0.0);
    let prior: Vec<u64> = (0..num_classes).map(|_| rng.below(5)).collect();
    handle.update_from_counts(&prior.iter().map(|&c| c as i64).collect::<Vec<_>>());
    model.update(&prior);

    let counts: Vec<i64> = (0..num_classes)
        .map(|_| match rng.below(10) {
            0 => -rng.range(1, i64::MAX),
            1 => i64::MAX - rng.range(0, 3),
            2 => rng.range(1 << 40, 1 << 62),
            _ => rng.range(0, 50),
        })
        .collect();
    let negative = counts.iter().any(|&c| c < 0);
    let overflows =
        !negative && counts.iter().try_fold(0u64, |t, &c| t.checked_add(c as u64)).is_none();
    let expected = if negative || overflows { Status::InvalidState } else { Status::Ok };
    let before = handle.state();
    // SAFETY: `counts` has C values.
    let status = unsafe { cbce_update_from_counts(handle.ptr(), counts.as_ptr(), num_classes) };
    expect("cbce_update_from_counts", status, expected)?;
    if expected == Status::Ok {
        model.update(&counts.iter().map(|&c| c as u64).collect::<Vec<_>>());
        same_state(&handle, &model)?;
    } else if handle.state() != before {
        return Err("a rejected count changed the state".into());
    }
    Ok(status)
}

/// A damaged state blob: INVALID_STATE and no change; a resealed one with a random value is
/// accepted exactly when the value is NaN (unseen) or in [0, 1].
fn damaged_state(rng: &mut Prng) -> Outcome {
    let num_classes = rng.range(1, 10) as usize;
    let handle = Handle::new(num_classes as u64, 0.9, 0.0);
    let counts: Vec<i64> = (0..num_classes).map(|_| rng.range(0, 4)).collect();
    handle.update_from_counts(&counts);
    let good = handle.state();
    let mut blob = good.clone();
    let mut expected = Status::InvalidState;
    match rng.below(6) {
        0 => blob.truncate(rng.below(good.len() as u64) as usize),
        1 => blob.extend((0..rng.range(1, 16)).map(|_| rng.below(256) as u8)),
        2 => {
            let at = rng.below(blob.len() as u64) as usize;
            blob[at] ^= 1 << rng.below(8);
        }
        3 => blob.iter_mut().for_each(|b| *b = rng.below(256) as u8),
        4 => {
            let other = Handle::new(num_classes as u64 + rng.range(1, 5) as u64, 0.9, 0.0);
            blob = other.state();
        }
        _ => {
            let class = rng.below(num_classes as u64) as usize;
            let value = match rng.below(3) {
                0 => f64::from_bits(rng.next_u64()),
                1 => rng.unit() * 3.0 - 1.0,
                _ => *rng.pick(&[0.0, 1.0, -0.0, f64::NAN, f64::INFINITY, 1.0 + f64::EPSILON]),
            };
            let at = 24 + 8 * class;
            blob[at..at + 8].copy_from_slice(&value.to_le_bytes());
            reseal(&mut blob);
            if value.is_nan() || (0.0..=1.0).contains(&value) {
                expected = Status::Ok;
            }
        }
    }
    let status = handle.set_state(&blob);
    expect("cbce_set_state", status, expected)?;
    let after = handle.state();
    if expected == Status::Ok {
        let same = state_values(&after)
            .iter()
            .zip(state_values(&blob))
            .all(|(a, b)| (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits());
        if !same {
            return Err("an accepted blob was not restored exactly".into());
        }
    } else if after != good {
        return Err("a rejected blob changed the state".into());
    }
    Ok(status)
}

/// A random configuration: a handle exactly when every field is in its documented domain.
fn random_config(rng: &mut Prng) -> Outcome {
    let num_classes = match rng.below(4) {
        0 => 0,
        1 => (1 << 24) + rng.below(1 << 40),
        2 => u64::MAX - rng.below(4),
        _ => rng.range(1, 4096) as u64,
    };
    let mut real = || match rng.below(4) {
        0 => f64::from_bits(rng.next_u64()),
        1 => *rng.pick(&[f64::NAN, f64::INFINITY, -f64::INFINITY, -0.0, 1.0, 0.0]),
        _ => rng.unit() * 1.4 - 0.2,
    };
    let (ema_decay, min_prevalence) = (real(), real());
    let device = match rng.below(5) {
        0 => CbceDevice { device_type: *rng.pick(&[0, 3, 13, 99, -1]), device_id: 0 },
        _ => CPU,
    };
    let config = CbceConfig { num_classes, ema_decay, min_prevalence, device };
    let valid = (1..=1 << 24).contains(&num_classes)
        && (0.0..=1.0).contains(&ema_decay)
        && (0.0..1.0).contains(&min_prevalence)
        && device == CPU;
    let mut out: *mut CbceLoss = 0x10 as *mut CbceLoss;
    // SAFETY: live config and output.
    let status = unsafe { cbce_new(&config, &mut out) };
    expect(
        &format!("cbce_new({config:?})"),
        status,
        if valid { Status::Ok } else { Status::InvalidConfig },
    )?;
    if valid {
        // SAFETY: a handle just made, freed once.
        unsafe { cbce_free(out) };
    } else if out as usize != 0x10 {
        return Err("a failing cbce_new wrote its output".into());
    }
    Ok(status)
}
