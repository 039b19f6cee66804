//! The loss object of the Rust API: running prevalences behind a lock, and the forward and
//! backward computations over ndarray views of any layout.
//!
//! Every method checks all of its input before it changes anything: a call that returns an
//! error leaves the state exactly as it was and writes no output.

use crate::config::{Config, Device};
use crate::cpu::{scan_labels, FusedPass, LabelScan, Upstream};
use crate::dtype::{Label, Logit};
use crate::error::{Error, Result};
use crate::layout::{unravel, Geometry};
use crate::prevalence::Prevalences;
use crate::strided::{Sink, Source};
use crate::weights::class_weights;
use ndarray::{ArrayD, ArrayView, ArrayViewD, ArrayViewMutD, Dimension, IxDyn};
use std::sync::{Mutex, MutexGuard};

/// How per-position losses are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reduction {
    /// Sum of losses divided by the sum of the target classes' weights.
    #[default]
    Mean,
    /// Sum of losses.
    Sum,
    /// One loss per position, in the target's shape.
    None,
}

/// Options of one forward (and its backward) call; the defaults are PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardOptions {
    pub reduction: Reduction,
    /// Positions whose label equals this are skipped (default -100).
    pub ignore_index: i64,
    /// Label smoothing in `[0, 1]` (default 0).
    pub label_smoothing: f64,
    /// Whether the forward call first updates the prevalences from the target (default true).
    /// Not used by backward.
    pub update_prevalences: bool,
    /// The upstream gradient of the reduced loss, for the gradient the forward call writes
    /// (default 1); for reduction "none", every position's upstream gradient. Not used by
    /// backward, which takes the upstream gradient as a tensor.
    pub grad_scale: f64,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        ForwardOptions {
            reduction: Reduction::Mean,
            ignore_index: -100,
            label_smoothing: 0.0,
            update_prevalences: true,
            grad_scale: 1.0,
        }
    }
}

impl ForwardOptions {
    /// Checks the options that have a domain: label smoothing in [0, 1], a finite grad_scale.
    pub(crate) fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            return Err(Error::invalid_argument(
                "label_smoothing",
                format!("{} is not in [0, 1]", self.label_smoothing),
            ));
        }
        if !self.grad_scale.is_finite() {
            return Err(Error::invalid_argument(
                "grad_scale",
                format!("{} is not finite", self.grad_scale),
            ));
        }
        Ok(())
    }
}

/// What a forward call reports besides the tensors it writes.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardSummary {
    /// The class weights the call used (after its update, if it made one).
    pub weights_used: Vec<f32>,
    /// Sum of the weights of the labels that are not ignored: the denominator of "mean".
    pub weight_sum: f64,
    /// The reduced loss in double precision (for "none", the sum of the losses).
    pub loss: f64,
}

/// What [`ClassBalancedLoss::forward`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardOutput<T> {
    /// The loss: a 0-dimensional array for "mean" and "sum", the target's shape for "none".
    pub loss: ArrayD<T>,
    /// The gradient with respect to the logits, when it was asked for.
    pub grad: Option<ArrayD<T>>,
    pub summary: ForwardSummary,
}

/// A class-balanced cross-entropy loss with running class prevalences.
///
/// It is `Send` and `Sync`: threads may share one loss, and each update is applied atomically.
#[derive(Debug)]
pub struct ClassBalancedLoss {
    config: Config,
    state: Mutex<Prevalences>,
}

impl ClassBalancedLoss {
    /// A loss with every class unseen.
    pub fn new(config: Config) -> Result<Self> {
        config.validate()?;
        if let Device::Cuda(_) = config.device {
            return Err(Error::Unsupported(
                "the rust api computes on host memory; use the c api's cuda entry points".into(),
            ));
        }
        Ok(ClassBalancedLoss { config, state: Mutex::new(Prevalences::unseen(config.num_classes)) })
    }

    /// The configuration the loss was made from.
    pub fn config(&self) -> Config {
        self.config
    }

    /// Number of classes C.
    pub fn num_classes(&self) -> usize {
        self.config.num_classes
    }

    fn state(&self) -> MutexGuard<'_, Prevalences> {
        // Updates replace the state whole, so a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts the labels of `target` in `[0, C)` other than `ignore_index`; others are dropped.
    pub fn class_counts<L: Label, D: Dimension>(
        &self,
        target: ArrayView<'_, L, D>,
        ignore_index: i64,
    ) -> Result<Vec<u64>> {
        Ok(scan_target(&target.into_dyn(), self.num_classes(), ignore_index).counts)
    }

    /// Updates the prevalences from the labels of `target` (any shape); labels outside
    /// `[0, C)` and `ignore_index` are dropped, as the reference's documentation says.
    pub fn update<L: Label, D: Dimension>(
        &self,
        target: ArrayView<'_, L, D>,
        ignore_index: i64,
    ) -> Result<()> {
        let counts = self.class_counts(target, ignore_index)?;
        self.update_from_counts(&counts)
    }

    /// Updates the prevalences from per-class counts, such as counts summed over data-parallel
    /// ranks; gives exactly the state that [`update`](Self::update) over all of the labels
    /// gives.
    pub fn update_from_counts(&self, counts: &[u64]) -> Result<()> {
        self.check_counts(counts)?;
        let mut state = self.state();
        *state = state.updated(counts, self.config.ema_decay);
        Ok(())
    }

    fn check_counts(&self, counts: &[u64]) -> Result<()> {
        if counts.len() != self.num_classes() {
            return Err(Error::BufferLength {
                name: "counts",
                expected: self.num_classes(),
                actual: counts.len(),
            });
        }
        if counts.iter().try_fold(0u64, |total, &c| total.checked_add(c)).is_none() {
            return Err(Error::InvalidState("the counts' total overflows 64 bits".into()));
        }
        Ok(())
    }

    /// The prevalences as float32, NaN for classes never seen.
    pub fn prevalences(&self) -> Vec<f32> {
        self.state().reported()
    }

    /// The class weights the next forward call without update would use.
    pub fn weights(&self) -> Vec<f32> {
        class_weights(&self.prevalences(), self.config.min_prevalence)
    }

    /// The full running state, in double precision.
    pub fn running_state(&self) -> Prevalences {
        self.state().clone()
    }

    /// Replaces the running state, for example from a checkpoint.
    pub fn set_running_state(&self, state: Prevalences) -> Result<()> {
        if state.num_classes() != self.num_classes() {
            return Err(Error::InvalidState(format!(
                "state has {} classes but the loss has {}",
                state.num_classes(),
                self.num_classes()
            )));
        }
        *self.state() = state;
        Ok(())
    }

    /// The running state as a portable blob (see [`Prevalences::to_bytes`]).
    pub fn state_bytes(&self) -> Vec<u8> {
        self.state().to_bytes()
    }

    /// Restores the running state from [`state_bytes`](Self::state_bytes); a blob that is
    /// truncated, damaged or made for another number of classes is rejected.
    pub fn restore_state_bytes(&self, bytes: &[u8]) -> Result<()> {
        let state = Prevalences::from_bytes(bytes, self.num_classes())?;
        *self.state() = state;
        Ok(())
    }

    /// Forgets every update: all classes unseen again.
    pub fn reset(&self) {
        *self.state() = Prevalences::unseen(self.num_classes());
    }

    /// Computes the loss of `logits` ((C), (N, C) or (N, C, d1, ..., dk)) against `target`
    /// ((), (N) or (N, d1, ..., dk)), and the gradient when `with_grad` is set.
    pub fn forward<T: Logit, L: Label, D: Dimension, E: Dimension>(
        &self,
        logits: ArrayView<'_, T, D>,
        target: ArrayView<'_, L, E>,
        options: &ForwardOptions,
        with_grad: bool,
    ) -> Result<ForwardOutput<T>> {
        let logits = logits.into_dyn();
        let target = target.into_dyn();
        let zero = T::from_acc(<T::Acc as crate::dtype::Real>::ZERO);
        let loss_shape = match options.reduction {
            Reduction::None => target.raw_dim(),
            Reduction::Mean | Reduction::Sum => IxDyn(&[]),
        };
        let mut loss = ArrayD::from_elem(loss_shape, zero);
        let mut grad = with_grad.then(|| ArrayD::from_elem(logits.raw_dim(), zero));
        let summary = self.forward_into(
            logits,
            target,
            options,
            loss.view_mut(),
            grad.as_mut().map(|g| g.view_mut()),
        )?;
        Ok(ForwardOutput { loss, grad, summary })
    }

    /// [`forward`](Self::forward) into caller-owned arrays of any layout: `loss` has one
    /// element for "mean" and "sum" and the target's shape for "none"; `grad`, if given, has
    /// the logits' shape.
    pub fn forward_into<T: Logit, L: Label>(
        &self,
        logits: ArrayViewD<'_, T>,
        target: ArrayViewD<'_, L>,
        options: &ForwardOptions,
        loss: ArrayViewMutD<'_, T>,
        grad: Option<ArrayViewMutD<'_, T>>,
    ) -> Result<ForwardSummary> {
        options.validate()?;
        let shapes = Shapes::check(&logits, &target, self.num_classes())?;
        shapes.check_loss(&loss, options.reduction)?;
        if let Some(grad) = &grad {
            shapes.check_grad(grad.shape())?;
        }
        let scan = checked_scan(&target, self.num_classes(), options.ignore_index)?;

        let weights_used = {
            let mut state = self.state();
            if options.update_prevalences {
                *state = state.updated(&scan.counts, self.config.ema_decay);
            }
            class_weights(&state.reported(), self.config.min_prevalence)
        };
        let weight_sum = weight_sum(&scan.counts, &weights_used);
        let upstream = match options.reduction {
            Reduction::Mean => options.grad_scale / weight_sum,
            Reduction::Sum | Reduction::None => options.grad_scale,
        };
        let (losses, mut reduced_loss) = match options.reduction {
            Reduction::None => (Some(loss), None),
            Reduction::Mean | Reduction::Sum => (None, Some(loss)),
        };
        let total = run_pass(
            &shapes,
            &logits,
            &target,
            losses,
            grad,
            PassUpstream::Uniform(upstream),
            &weights_used,
            options,
        );
        let reduced = match options.reduction {
            Reduction::Mean => total / weight_sum,
            Reduction::Sum | Reduction::None => total,
        };
        if let Some(loss) = reduced_loss.as_mut() {
            write_reduced(loss, reduced);
        }
        Ok(ForwardSummary { weights_used, weight_sum, loss: reduced })
    }
}

/// Writes the reduced loss of a forward call into its one-element output.
fn write_reduced<T: Logit>(loss: &mut ArrayViewMutD<'_, T>, value: f64) {
    use crate::dtype::Real;
    if let Some(slot) = loss.iter_mut().next() {
        *slot = T::from_acc(T::Acc::from_f64(value));
    }
}

/// The gradient of the loss with respect to `logits`, from the upstream gradient `grad_loss`
/// (one element for "mean" and "sum", the target's shape for "none") and the `weights` that the
/// forward call used, written into `grad` (the logits' shape, any layout).
pub fn backward_into<T: Logit, L: Label>(
    logits: ArrayViewD<'_, T>,
    target: ArrayViewD<'_, L>,
    grad_loss: ArrayViewD<'_, T>,
    weights: &[f32],
    options: &ForwardOptions,
    grad: ArrayViewMutD<'_, T>,
) -> Result<()> {
    options.validate()?;
    let num_classes = weights.len();
    if num_classes == 0 {
        return Err(Error::BufferLength { name: "weights", expected: 1, actual: 0 });
    }
    let shapes = Shapes::check(&logits, &target, num_classes)?;
    shapes.check_grad(grad.shape())?;
    match options.reduction {
        Reduction::None if grad_loss.shape() != target.shape() => {
            return Err(Error::ShapeMismatch(format!(
                "grad_loss has shape {:?} but reduction \"none\" needs the target's {:?}",
                grad_loss.shape(),
                target.shape()
            )))
        }
        Reduction::Mean | Reduction::Sum if grad_loss.len() != 1 => {
            return Err(Error::ShapeMismatch(format!(
                "grad_loss has shape {:?} but a reduced loss has one element",
                grad_loss.shape()
            )))
        }
        _ => {}
    }
    if let Some((class, w)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite()) {
        return Err(Error::invalid_argument(
            "weights",
            format!("weight {w} of class {class} is not finite"),
        ));
    }
    let scan = checked_scan(&target, num_classes, options.ignore_index)?;

    let upstream = match options.reduction {
        Reduction::None => PassUpstream::PerPosition(grad_loss),
        reduced => {
            use crate::dtype::Real;
            let value = grad_loss.iter().next().expect("one element").to_acc().to_f64();
            let scale = if reduced == Reduction::Mean {
                1.0 / weight_sum(&scan.counts, weights)
            } else {
                1.0
            };
            PassUpstream::Uniform(value * scale)
        }
    };
    run_pass(&shapes, &logits, &target, None, Some(grad), upstream, weights, options);
    Ok(())
}

/// [`backward_into`] into a new array in standard layout.
pub fn backward<T: Logit, L: Label, D: Dimension, E: Dimension, F: Dimension>(
    logits: ArrayView<'_, T, D>,
    target: ArrayView<'_, L, E>,
    grad_loss: ArrayView<'_, T, F>,
    weights: &[f32],
    options: &ForwardOptions,
) -> Result<ArrayD<T>> {
    let logits = logits.into_dyn();
    let zero = T::from_acc(<T::Acc as crate::dtype::Real>::ZERO);
    let mut grad = ArrayD::from_elem(logits.raw_dim(), zero);
    backward_into(
        logits,
        target.into_dyn(),
        grad_loss.into_dyn(),
        weights,
        options,
        grad.view_mut(),
    )?;
    Ok(grad)
}

/// Sum over classes of count times weight: the sum of the target classes' weights.
pub(crate) fn weight_sum(counts: &[u64], weights: &[f32]) -> f64 {
    counts.iter().zip(weights).map(|(&n, &w)| n as f64 * w as f64).sum()
}

fn scan_target<L: Label>(
    target: &ArrayViewD<'_, L>,
    num_classes: usize,
    ignore_index: i64,
) -> LabelScan {
    let (source, strides) = Source::new(target);
    let geometry = Geometry::new(target.shape(), [None, Some(&strides), None, None]);
    let mut scan = scan_labels(&source, &geometry, num_classes, ignore_index);
    // The scan counts every label in [0, C); an ignore index that is itself a class must be
    // dropped from the counts too (from the update and from the "mean" denominator).
    if let Some(count) = usize::try_from(ignore_index).ok().and_then(|k| scan.counts.get_mut(k)) {
        *count = 0;
    }
    scan
}

/// [`scan_target`] for a loss computation, where a label outside `[0, C)` that is not the
/// ignore index is an error, as in PyTorch.
fn checked_scan<L: Label>(
    target: &ArrayViewD<'_, L>,
    num_classes: usize,
    ignore_index: i64,
) -> Result<LabelScan> {
    let scan = scan_target(target, num_classes, ignore_index);
    if let Some((position, label)) = scan.first_out_of_range {
        return Err(Error::LabelOutOfRange {
            label,
            position: unravel(position, target.shape()),
            num_classes,
            ignore_index,
        });
    }
    Ok(scan)
}

/// The shapes of a call, checked against each other: where the class axis is.
struct Shapes {
    class_axis: usize,
    logits_shape: Vec<usize>,
    target_shape: Vec<usize>,
}

impl Shapes {
    fn check<T, L>(
        logits: &ArrayViewD<'_, T>,
        target: &ArrayViewD<'_, L>,
        num_classes: usize,
    ) -> Result<Shapes> {
        let logits_shape = logits.shape().to_vec();
        let target_shape = target.shape().to_vec();
        if logits_shape.is_empty() {
            return Err(Error::ShapeMismatch(
                "logits are 0-dimensional; expected (C), (N, C) or (N, C, d1, ..., dk)".into(),
            ));
        }
        let class_axis = usize::from(logits_shape.len() > 1);
        if logits_shape[class_axis] != num_classes {
            return Err(Error::ShapeMismatch(format!(
                "logits of shape {logits_shape:?} have {} classes along axis {class_axis} but \
                 the loss has {num_classes}",
                logits_shape[class_axis]
            )));
        }
        let mut expected = logits_shape.clone();
        expected.remove(class_axis);
        if target_shape != expected {
            return Err(Error::ShapeMismatch(format!(
                "target has shape {target_shape:?} but logits of shape {logits_shape:?} need \
                 {expected:?}"
            )));
        }
        Ok(Shapes { class_axis, logits_shape, target_shape })
    }

    fn check_grad(&self, shape: &[usize]) -> Result<()> {
        if shape != self.logits_shape.as_slice() {
            return Err(Error::ShapeMismatch(format!(
                "gradient has shape {shape:?} but the logits have {:?}",
                self.logits_shape
            )));
        }
        Ok(())
    }

    fn check_loss<T>(&self, loss: &ArrayViewMutD<'_, T>, reduction: Reduction) -> Result<()> {
        match reduction {
            Reduction::None if loss.shape() != self.target_shape.as_slice() => {
                Err(Error::ShapeMismatch(format!(
                    "loss output has shape {:?} but reduction \"none\" needs the target's {:?}",
                    loss.shape(),
                    self.target_shape
                )))
            }
            Reduction::Mean | Reduction::Sum if loss.len() != 1 => {
                Err(Error::ShapeMismatch(format!(
                    "loss output has shape {:?} but a reduced loss has one element",
                    loss.shape()
                )))
            }
            _ => Ok(()),
        }
    }

    /// `strides` of a tensor of the logits' shape, without the class axis, and the class
    /// axis' own stride.
    fn split_class_axis(&self, strides: &[isize]) -> (Vec<isize>, isize) {
        let mut positions = strides.to_vec();
        let class_stride = positions.remove(self.class_axis);
        (positions, class_stride)
    }
}

enum PassUpstream<'a, T> {
    Uniform(f64),
    PerPosition(ArrayViewD<'a, T>),
}

/// Runs the fused pass over checked arrays; returns the sum of the losses.
#[allow(clippy::too_many_arguments)]
fn run_pass<T: Logit, L: Label>(
    shapes: &Shapes,
    logits: &ArrayViewD<'_, T>,
    target: &ArrayViewD<'_, L>,
    losses: Option<ArrayViewMutD<'_, T>>,
    grad: Option<ArrayViewMutD<'_, T>>,
    upstream: PassUpstream<'_, T>,
    weights: &[f32],
    options: &ForwardOptions,
) -> f64 {
    let (logits_source, logits_strides) = Source::new(logits);
    let (logits_positions, logits_class_stride) = shapes.split_class_axis(&logits_strides);
    let (target_source, target_strides) = Source::new(target);

    let mut grad = grad;
    let grad = grad.as_mut().map(|view| {
        let (sink, strides) = Sink::new(view);
        let (positions, class_stride) = shapes.split_class_axis(&strides);
        (sink, class_stride, positions)
    });
    let mut losses = losses;
    let losses = losses.as_mut().map(Sink::new);
    let (upstream, upstream_strides) = match &upstream {
        PassUpstream::Uniform(value) => (Upstream::Uniform(*value), None),
        PassUpstream::PerPosition(view) => {
            let (source, strides) = Source::new(view);
            (Upstream::PerPosition(source), Some(strides))
        }
    };
    let per_position = losses.as_ref().map(|(_, s)| s.as_slice()).or(upstream_strides.as_deref());

    let geometry = Geometry::new(
        &shapes.target_shape,
        [
            Some(logits_positions.as_slice()),
            Some(target_strides.as_slice()),
            grad.as_ref().map(|(_, _, positions)| positions.as_slice()),
            per_position,
        ],
    );
    let pass = FusedPass {
        geometry,
        logits: logits_source,
        logits_class_stride,
        target: target_source,
        grad: grad.map(|(sink, class_stride, _)| (sink, class_stride)),
        losses: losses.map(|(sink, _)| sink),
        upstream,
        weights,
        label_smoothing: options.label_smoothing,
        ignore_index: options.ignore_index,
    };
    pass.run()
}
