//! The loss on a CUDA device: the running state kept in device memory, and every operation
//! enqueued on the caller's stream in the primary context of the handle's device.
//!
//! Nothing here waits for the device except the calls that hand results to the host
//! (prevalences, weights, state, host counts, and a forward call's optional host outputs) and
//! [`CudaLoss::synchronize`]. A label outside [0, C) is found by the counting kernel, and
//! invalid counts from a device tensor by the kernel that loads them; either then keeps the
//! state unchanged and leaves a record in device memory, and the next of those synchronising
//! calls reads the record and fails with its error.

use super::driver::{
    driver, Api, Attribute, DeviceBuffer, DevicePtr, Event, Launch, PinnedBuffer, PrimaryContext,
    Stream,
};
use super::kernels::*;
use super::tensor::{
    address, check_device, check_grad_shape, check_per_call_shape, class_axis, label_index,
    logit_index, split_class_axis, Pass,
};
use crate::config::{Config, Device};
use crate::error::{Error, Result};
use crate::ffi::ptr::{check_disjoint, Tensor};
use crate::layout::{unravel, LOGITS};
use crate::loss::{ForwardOptions, Reduction};
use crate::prevalence::Prevalences;
use std::mem::{size_of, ManuallyDrop};
use std::sync::{Mutex, MutexGuard};

/// Element sizes and compute sizes of the logits types, in the kernel tables' order.
const LOGIT_SIZES: [usize; 4] = [4, 8, 2, 2];
const ACC_SIZES: [usize; 4] = [4, 8, 4, 4];
const LABEL_SIZES: [usize; 3] = [8, 4, 1];
/// Shared memory a block-per-row kernel keeps for its own variables.
const BLOCK_ROWS_STATIC_SHARED: usize = 1024;
/// The most blocks a launch asks for; kernels stride over further tiles.
const MAX_BLOCKS: usize = 1 << 30;

/// A class-balanced loss whose state lives on a CUDA device.
pub(crate) struct CudaLoss {
    config: Config,
    ordinal: i32,
    inner: ManuallyDrop<Mutex<Inner>>,
    context: PrimaryContext,
}

/// What a forward call hands back to the host when asked (and waits for).
pub(crate) struct HostSummary {
    pub weights_used: Vec<f32>,
    pub weight_sum: f64,
}

/// Device memory and kernels of one handle, and the stream its work goes to.
struct Inner {
    api: &'static Api,
    kernels: Kernels,
    stream: Stream,
    num_classes: usize,
    /// double[C]: the prevalences, NaN for classes never seen.
    state: DeviceBuffer,
    /// u64[C]: the counts of the call in progress.
    counts: DeviceBuffer,
    /// float[C]: the weights of the call in progress.
    weights: DeviceBuffer,
    scalars: DeviceBuffer,
    record: DeviceBuffer,
    /// double[tiles] of the last reduced pass; grows as needed.
    partials: Option<DeviceBuffer>,
    /// Page-locked bytes for uploads, and the event after the last copy out of them.
    staging: PinnedBuffer,
    staging_free: Event,
    /// Recorded after every call's work, so that the host and other streams can wait for it.
    done: Event,
    /// Dynamic shared memory a block-per-row launch may take, in bytes.
    row_cache_limit: usize,
}

impl CudaLoss {
    /// A loss with every class unseen, on the device of `config.device`.
    pub(crate) fn new(config: Config) -> Result<CudaLoss> {
        config.validate()?;
        let Device::Cuda(ordinal) = config.device else {
            return Err(Error::InvalidConfig("a cuda loss needs a cuda device".into()));
        };
        let api = driver()?;
        let count = api.device_count()?;
        if ordinal >= count {
            return Err(Error::InvalidConfig(format!(
                "cuda device ordinal is {ordinal} but this machine has {count} cuda devices"
            )));
        }
        let device = api.device(ordinal)?;
        let context = PrimaryContext::retain(api, device)?;

        let inner = {
            let _current = context.enter()?;
            Inner::new(api, device, config.num_classes)?
        };
        Ok(CudaLoss { config, ordinal, inner: ManuallyDrop::new(Mutex::new(inner)), context })
    }

    pub(crate) fn config(&self) -> Config {
        self.config
    }

    pub(crate) fn num_classes(&self) -> usize {
        self.config.num_classes
    }

    /// Runs `body` with the context current and the handle's device state locked.
    fn with<R>(&self, body: impl FnOnce(&mut Inner) -> Result<R>) -> Result<R> {
        let _current = self.context.enter()?;
        let mut inner: MutexGuard<'_, Inner> =
            self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        body(&mut inner)
    }

    /// Makes later calls enqueue on `stream` (0: the legacy default stream), after all the
    /// work already enqueued on the previous one.
    pub(crate) fn set_stream(&self, stream: usize) -> Result<()> {
        self.with(|inner| {
            let stream = Stream(stream);
            if stream != inner.stream {
                inner.done.order_before(stream)?;
                inner.stream = stream;
            }
            Ok(())
        })
    }

    /// Waits for the handle's work and reports a bad label found since the last such wait.
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.with(|inner| inner.synchronize(self.config.num_classes))
    }

    /// Counts the labels of `target` into the device counts.
    fn enqueue_counts(
        &self,
        inner: &mut Inner,
        target: &Tensor<'_>,
        ignore_index: i64,
        checked: bool,
    ) -> Result<()> {
        check_device(target, self.ordinal)?;
        let label = label_index(target)?;
        let target_address = address(target, LABEL_SIZES[label])?;
        let pass = Pass::new(&target.shape, [None, Some(&target.strides), None, None]);
        inner.enqueue_counts(&pass, label, target_address, ignore_index, checked)?;
        if checked {
            inner.enqueue_label_check(&pass, label, target_address, ignore_index, &target.shape)?;
        }
        Ok(())
    }

    /// Updates the prevalences from the labels of `target`; labels outside [0, C) and the
    /// ignore index are dropped.
    pub(crate) fn update(&self, target: &Tensor<'_>, ignore_index: i64) -> Result<()> {
        self.with(|inner| {
            self.enqueue_counts(inner, target, ignore_index, false)?;
            inner.enqueue_update(&self.config, false)?;
            inner.finish()
        })
    }

    /// The counts of the labels of `target`, read back to the host.
    pub(crate) fn class_counts(&self, target: &Tensor<'_>, ignore_index: i64) -> Result<Vec<u64>> {
        self.with(|inner| {
            inner.synchronize(self.config.num_classes)?;
            self.enqueue_counts(inner, target, ignore_index, false)?;
            inner.finish()?;
            inner.read_words(inner.counts.ptr, inner.num_classes)
        })
    }

    /// Counts the labels of `target` into the caller's device tensor `counts` (int64, shape
    /// (C), checked by the caller), enqueued without waiting.
    pub(crate) fn class_counts_into(
        &self,
        target: &Tensor<'_>,
        ignore_index: i64,
        counts: &Tensor<'_>,
    ) -> Result<()> {
        check_device(counts, self.ordinal)?;
        let tensor = address(counts, 8)?;
        let stride = counts.strides[0] as i64;
        self.with(|inner| {
            self.enqueue_counts(inner, target, ignore_index, false)?;
            inner.enqueue_counts_store(tensor, stride)?;
            inner.finish()
        })
    }

    /// Updates the prevalences from the caller's device tensor `counts` (int64, shape (C),
    /// checked by the caller), enqueued without waiting; invalid counts are found on the
    /// device, leave the state unchanged, and are reported by the next synchronising call.
    pub(crate) fn update_from_counts_tensor(&self, counts: &Tensor<'_>) -> Result<()> {
        check_device(counts, self.ordinal)?;
        let tensor = address(counts, 8)?;
        let stride = counts.strides[0] as i64;
        self.with(|inner| {
            inner.enqueue_counts_load(tensor, stride)?;
            inner.enqueue_update(&self.config, true)?;
            inner.finish()
        })
    }

    /// Updates the prevalences from host counts (checked by the caller).
    pub(crate) fn update_from_counts(&self, counts: &[u64]) -> Result<()> {
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
        let bytes: Vec<u8> = counts.iter().flat_map(|c| c.to_le_bytes()).collect();
        self.with(|inner| {
            inner.upload(inner.counts.ptr, &bytes)?;
            inner.enqueue_update(&self.config, false)?;
            inner.finish()
        })
    }

    /// The running state, read back to the host.
    pub(crate) fn running_state(&self) -> Result<Prevalences> {
        self.with(|inner| {
            inner.synchronize(self.config.num_classes)?;
            let words = inner.read_words(inner.state.ptr, inner.num_classes)?;
            let values = words
                .into_iter()
                .map(|bits| Some(f64::from_bits(bits)).filter(|p| !p.is_nan()))
                .collect();
            Prevalences::from_values(values)
        })
    }

    /// The prevalences as float32, NaN for classes never seen.
    pub(crate) fn prevalences(&self) -> Result<Vec<f32>> {
        Ok(self.running_state()?.reported())
    }

    /// The weights the next forward call without update would use, computed on the device.
    pub(crate) fn weights(&self) -> Result<Vec<f32>> {
        self.with(|inner| {
            inner.synchronize(self.config.num_classes)?;
            inner.enqueue_weights(&self.config)?;
            inner.finish()?;
            inner.read_floats(inner.weights.ptr, inner.num_classes)
        })
    }

    /// Replaces the running state.
    pub(crate) fn set_running_state(&self, state: &Prevalences) -> Result<()> {
        let bytes: Vec<u8> =
            state.values().iter().flat_map(|v| v.unwrap_or(f64::NAN).to_le_bytes()).collect();
        self.with(|inner| {
            inner.upload(inner.state.ptr, &bytes)?;
            inner.finish()
        })
    }

    /// Forgets every update.
    pub(crate) fn reset(&self) -> Result<()> {
        self.with(|inner| {
            inner.enqueue_reset()?;
            inner.finish()
        })
    }

    /// The forward pass (and the gradient, when `grad` is given), enqueued; with `summary`,
    /// waits and returns the weights used and the weight sum.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        logits: &Tensor<'_>,
        target: &Tensor<'_>,
        options: &ForwardOptions,
        loss_out: &Tensor<'_>,
        grad: Option<&Tensor<'_>>,
        summary: bool,
    ) -> Result<Option<HostSummary>> {
        options.validate()?;
        let call = self.checked_call(logits, target, grad)?;
        check_device(loss_out, self.ordinal)?;
        loss_out.check_dtype_matches(logits)?;
        check_per_call_shape("loss output", loss_out, &target.shape, options.reduction)?;
        let size = LOGIT_SIZES[call.logit];
        for output in std::iter::once(loss_out).chain(grad) {
            output.check_no_self_overlap()?;
            check_disjoint(output, logits, size)?;
            check_disjoint(output, target, size)?;
        }
        if let Some(grad) = grad {
            check_disjoint(grad, loss_out, size)?;
        }
        let loss_address = address(loss_out, size)?;
        let per_position = match options.reduction {
            Reduction::None => PerPosition::Losses(&loss_out.strides, loss_address),
            Reduction::Mean | Reduction::Sum => PerPosition::Absent,
        };
        let upstream = match options.reduction {
            Reduction::Mean => UpstreamMode::ScaleOverSum,
            Reduction::Sum | Reduction::None => UpstreamMode::Scale,
        };

        self.with(|inner| {
            self.enqueue_counts(inner, target, options.ignore_index, true)?;
            inner.enqueue_forward_weights(&self.config, options, upstream)?;
            let partials = options.reduction != Reduction::None;
            let tiles =
                inner.enqueue_loss(&call, logits, target, grad, options, per_position, partials)?;
            if partials {
                inner.enqueue_reduce(call.logit, tiles, loss_address, options.reduction)?;
            }
            inner.finish()?;
            if !summary {
                return Ok(None);
            }
            inner.synchronize(self.config.num_classes)?;
            let weights_used = inner.read_floats(inner.weights.ptr, inner.num_classes)?;
            let scalars = inner.read_words(inner.scalars.ptr, 4)?;
            Ok(Some(HostSummary { weights_used, weight_sum: f64::from_bits(scalars[2]) }))
        })
    }

    /// The gradient from the upstream gradient `grad_loss` and host `weights`, enqueued.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        logits: &Tensor<'_>,
        target: &Tensor<'_>,
        options: &ForwardOptions,
        grad_loss: &Tensor<'_>,
        weights: &[f32],
        grad: &Tensor<'_>,
    ) -> Result<()> {
        options.validate()?;
        let call = self.checked_call(logits, target, Some(grad))?;
        check_device(grad_loss, self.ordinal)?;
        grad_loss.check_dtype_matches(logits)?;
        check_per_call_shape("grad_loss", grad_loss, &target.shape, options.reduction)?;
        if let Some((class, w)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite()) {
            return Err(Error::invalid_argument(
                "weights",
                format!("weight {w} of class {class} is not finite"),
            ));
        }
        let size = LOGIT_SIZES[call.logit];
        grad.check_no_self_overlap()?;
        for input in [logits, target, grad_loss] {
            check_disjoint(grad, input, size)?;
        }
        let grad_loss_address = address(grad_loss, size)?;
        let (upstream, per_position) = match options.reduction {
            Reduction::Mean => (UpstreamMode::GradLossOverSum, PerPosition::Absent),
            Reduction::Sum => (UpstreamMode::GradLoss, PerPosition::Absent),
            Reduction::None => (
                UpstreamMode::PerPosition,
                PerPosition::Upstream(&grad_loss.strides, grad_loss_address),
            ),
        };
        let bytes: Vec<u8> = weights.iter().flat_map(|w| w.to_le_bytes()).collect();

        self.with(|inner| {
            inner.upload(inner.weights.ptr, &bytes)?;
            self.enqueue_counts(inner, target, options.ignore_index, true)?;
            inner.enqueue_backward_weights(call.logit, upstream, grad_loss_address)?;
            inner.enqueue_loss(&call, logits, target, Some(grad), options, per_position, false)?;
            inner.finish()
        })
    }

    /// Checks what forward and backward share: devices, dtypes and shapes of the logits, the
    /// target and the gradient.
    fn checked_call(
        &self,
        logits: &Tensor<'_>,
        target: &Tensor<'_>,
        grad: Option<&Tensor<'_>>,
    ) -> Result<Call> {
        check_device(logits, self.ordinal)?;
        check_device(target, self.ordinal)?;
        let logit = logit_index(logits)?;
        let label = label_index(target)?;
        if let Some(grad) = grad {
            check_device(grad, self.ordinal)?;
            grad.check_dtype_matches(logits)?;
        }
        let class_axis = class_axis(&logits.shape, &target.shape, self.num_classes())?;
        if let Some(grad) = grad {
            check_grad_shape(&grad.shape, &logits.shape)?;
        }
        Ok(Call { logit, label, class_axis })
    }
}

impl Drop for CudaLoss {
    fn drop(&mut self) {
        // Frees the device memory and unloads the modules with the context current, after
        // the handle's work has finished; the primary context is released last.
        let current = self.context.enter().ok();
        // SAFETY: `inner` is taken once, here, and never used again.
        let inner = unsafe { ManuallyDrop::take(&mut self.inner) };
        let inner = inner.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = inner.done.synchronize();
        drop(inner);
        drop(current);
    }
}

/// The tensor of one value per position that a pass reads or writes, if any: its strides
/// over the target's shape and the address of its element 0.
#[derive(Clone, Copy)]
enum PerPosition<'a> {
    Absent,
    /// The losses of reduction "none", written.
    Losses(&'a [isize], DevicePtr),
    /// The upstream gradient of each position's loss, read.
    Upstream(&'a [isize], DevicePtr),
}

impl<'a> PerPosition<'a> {
    fn strides(self) -> Option<&'a [isize]> {
        match self {
            PerPosition::Absent => None,
            PerPosition::Losses(strides, _) | PerPosition::Upstream(strides, _) => Some(strides),
        }
    }

    fn address(self) -> DevicePtr {
        match self {
            PerPosition::Absent => 0,
            PerPosition::Losses(_, ptr) | PerPosition::Upstream(_, ptr) => ptr,
        }
    }
}

/// The element types and class axis of a checked forward or backward call.
struct Call {
    logit: usize,
    label: usize,
    class_axis: usize,
}

/// The `set` value of a record of invalid counts (a bad label's is 1).
const COUNTS_RECORD: u64 = 2;

fn blocks(tiles: i64) -> u32 {
    (tiles.max(0) as usize).min(MAX_BLOCKS) as u32
}

impl Inner {
    fn new(api: &'static Api, device: i32, num_classes: usize) -> Result<Inner> {
        let kernels = Kernels::load(api)?;
        let optin = api.attribute(device, Attribute::MaxSharedPerBlockOptin)? as usize;
        let row_cache_limit = optin.saturating_sub(BLOCK_ROWS_STATIC_SHARED);
        for function in kernels.loss_block_rows.iter().flatten() {
            api.allow_shared(*function, row_cache_limit as i32)?;
        }
        let inner = Inner {
            api,
            stream: Stream::default(),
            num_classes,
            state: DeviceBuffer::new(api, 8 * num_classes)?,
            counts: DeviceBuffer::new(api, 8 * num_classes)?,
            weights: DeviceBuffer::new(api, 4 * num_classes)?,
            scalars: DeviceBuffer::new(api, size_of::<Scalars>())?,
            record: DeviceBuffer::new(api, size_of::<LabelRecord>())?,
            partials: None,
            staging: PinnedBuffer::new(api, 8 * num_classes)?,
            staging_free: Event::new(api)?,
            done: Event::new(api)?,
            row_cache_limit,
            kernels,
        };
        api.memset_8(inner.record.ptr, 0, size_of::<LabelRecord>(), inner.stream)?;
        inner.enqueue_reset()?;
        inner.finish()?;
        inner.done.synchronize()?;
        Ok(inner)
    }

    /// Marks the end of a call's work.
    fn finish(&self) -> Result<()> {
        self.done.record(self.stream)
    }

    /// Waits for every call's work; fails with the first bad label since the last wait, and
    /// forgets it.
    fn synchronize(&mut self, num_classes: usize) -> Result<()> {
        self.done.synchronize()?;
        let words = self.read_words(self.record.ptr, size_of::<LabelRecord>() / 8)?;
        if words[0] == 0 {
            return Ok(());
        }
        self.api.memset_8(self.record.ptr, 0, 8, self.stream)?;
        self.finish()?;
        let (position, label, ignore_index) = (words[1], words[2] as i64, words[3] as i64);
        if words[0] == COUNTS_RECORD {
            // The messages of the host's checks of the same counts.
            return Err(Error::InvalidState(match usize::try_from(position) {
                Ok(class) if position != u64::MAX => {
                    format!("count {label} of class {class} is negative")
                }
                _ => "the counts' total overflows 64 bits".into(),
            }));
        }
        let ndim = words[4] as usize;
        let shape: Vec<usize> =
            words[5..5 + ndim.min(MAX_AXES)].iter().map(|&d| d as usize).collect();
        Err(Error::LabelOutOfRange {
            label,
            position: unravel(position as usize, &shape),
            num_classes,
            ignore_index,
        })
    }

    fn read_bytes(&self, source: DevicePtr, len: usize) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; len];
        self.api.copy_to_host(&mut bytes, source, self.stream)?;
        Ok(bytes)
    }

    fn read_words(&self, source: DevicePtr, count: usize) -> Result<Vec<u64>> {
        let bytes = self.read_bytes(source, 8 * count)?;
        Ok(bytes.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("8"))).collect())
    }

    fn read_floats(&self, source: DevicePtr, count: usize) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(source, 4 * count)?;
        Ok(bytes.chunks_exact(4).map(|w| f32::from_le_bytes(w.try_into().expect("4"))).collect())
    }

    /// Copies `bytes` to `destination` in stream order, through the page-locked staging
    /// buffer, without waiting for the device unless the previous upload is still in flight.
    fn upload(&mut self, destination: DevicePtr, bytes: &[u8]) -> Result<()> {
        self.staging_free.synchronize()?;
        let source = self.staging.fill(bytes);
        // SAFETY: `source` holds `bytes.len()` page-locked bytes that stay unchanged until
        // `staging_free`, recorded next, has passed (every later fill waits for it); the
        // destination is one of this handle's buffers of at least that size.
        unsafe { self.api.copy_to_device(destination, source, bytes.len(), self.stream)? };
        self.staging_free.record(self.stream)
    }

    fn enqueue_reset(&self) -> Result<()> {
        let args = ResetArgs { state: self.state.ptr, num_classes: self.num_classes as i64 };
        let shape = Launch {
            blocks: self.num_classes.div_ceil(256).min(4096) as u32,
            threads: 256,
            shared_bytes: 0,
        };
        // SAFETY: ResetArgs mirrors state.cu's; the state buffer holds C doubles.
        unsafe {
            self.api.launch(self.kernels.state_reset, shape, self.stream, &args, "state_reset")
        }
    }

    fn enqueue_counts(
        &self,
        pass: &Pass,
        label: usize,
        target: DevicePtr,
        ignore_index: i64,
        checked: bool,
    ) -> Result<()> {
        let stream = self.stream;
        self.api.memset_8(self.counts.ptr, 0, 8 * self.num_classes, stream)?;
        if checked {
            self.api.memset_32(self.scalars.ptr, u32::MAX, 2, stream)?;
        }
        let tiling = pass.tiling(COUNT_TILE);
        if tiling.tiles == 0 {
            return Ok(());
        }
        let args = CountArgs {
            positions: pass.positions,
            tiling,
            target,
            counts: self.counts.ptr,
            scalars: if checked { self.scalars.ptr } else { 0 },
            num_classes: self.num_classes as i64,
            ignore_index,
        };
        let shared = if self.num_classes <= SHARED_BINS { 4 * self.num_classes } else { 0 };
        let shape = Launch {
            blocks: blocks(tiling.tiles),
            threads: COUNT_THREADS,
            shared_bytes: shared as u32,
        };
        // SAFETY: CountArgs mirrors counts.cu's; the target was checked to be device memory
        // of this device whose elements the positions' strides reach, and the counts and
        // scalars are this handle's.
        unsafe {
            self.api.launch(self.kernels.class_counts[label], shape, stream, &args, "class_counts")
        }
    }

    /// Writes the handle's counts into the caller's int64 tensor at `tensor` (element 0)
    /// with stride `stride`.
    fn enqueue_counts_store(&self, tensor: DevicePtr, stride: i64) -> Result<()> {
        let args = self.counts_move_args(tensor, stride);
        let shape = Launch {
            blocks: self.num_classes.div_ceil(COUNT_THREADS as usize).min(4096) as u32,
            threads: COUNT_THREADS,
            shared_bytes: 0,
        };
        // SAFETY: CountsMoveArgs mirrors counts.cu's; `tensor` is the caller's checked int64
        // device tensor of C elements at `stride`, which overlap neither one another nor the
        // target, and the counts are this handle's C-element buffer.
        unsafe {
            self.api.launch(self.kernels.counts_store, shape, self.stream, &args, "counts_store")
        }
    }

    /// Copies the caller's int64 tensor at `tensor` (element 0, stride `stride`) into the
    /// handle's counts, checking them; an update with `checked` then skips invalid counts.
    fn enqueue_counts_load(&self, tensor: DevicePtr, stride: i64) -> Result<()> {
        let args = CountsMoveArgs {
            scalars: self.scalars.ptr,
            record: self.record.ptr,
            ..self.counts_move_args(tensor, stride)
        };
        let one = Launch { blocks: 1, threads: COUNTS_LOAD_THREADS, shared_bytes: 0 };
        // SAFETY: CountsMoveArgs mirrors counts.cu's; `tensor` is the caller's checked int64
        // device tensor of C elements at `stride`, only read; counts, scalars and record are
        // this handle's.
        unsafe { self.api.launch(self.kernels.counts_load, one, self.stream, &args, "counts_load") }
    }

    fn counts_move_args(&self, tensor: DevicePtr, stride: i64) -> CountsMoveArgs {
        CountsMoveArgs {
            tensor,
            counts: self.counts.ptr,
            tensor_stride: stride,
            num_classes: self.num_classes as i64,
            scalars: 0,
            record: 0,
        }
    }

    fn enqueue_label_check(
        &self,
        pass: &Pass,
        label: usize,
        target: DevicePtr,
        ignore_index: i64,
        shape: &[usize],
    ) -> Result<()> {
        let mut target_shape = [0i64; MAX_AXES];
        for (slot, &len) in target_shape.iter_mut().zip(shape) {
            *slot = len as i64;
        }
        let args = LabelCheckArgs {
            positions: pass.positions,
            target,
            scalars: self.scalars.ptr,
            record: self.record.ptr,
            ignore_index,
            ndim: shape.len().min(MAX_AXES) as i64,
            shape: target_shape,
        };
        let one = Launch { blocks: 1, threads: 1, shared_bytes: 0 };
        // SAFETY: LabelCheckArgs mirrors counts.cu's; it reads one label of the checked
        // target at a position the counts found in it.
        unsafe {
            self.api.launch(self.kernels.label_check[label], one, self.stream, &args, "label_check")
        }
    }

    fn update_args(&self, config: &Config, checked: bool) -> UpdateArgs {
        UpdateArgs {
            state: self.state.ptr,
            counts: self.counts.ptr,
            scalars: if checked { self.scalars.ptr } else { 0 },
            num_classes: self.num_classes as i64,
            ema_decay: config.ema_decay,
            keep: 1.0 - config.ema_decay,
            first_seen: 1.0 / self.num_classes as f64,
        }
    }

    fn weight_args(&self, config: &Config) -> WeightArgs {
        WeightArgs {
            state: self.state.ptr,
            weights: self.weights.ptr,
            num_classes: self.num_classes as i64,
            floor: config.min_prevalence as f32 as f64,
        }
    }

    fn one_block(&self) -> Launch {
        Launch { blocks: 1, threads: STATE_THREADS, shared_bytes: 0 }
    }

    fn enqueue_update(&self, config: &Config, checked: bool) -> Result<()> {
        let args = self.update_args(config, checked);
        // SAFETY: UpdateArgs mirrors state.cu's; state and counts are this handle's C-element
        // buffers.
        unsafe {
            self.api.launch(
                self.kernels.state_update,
                self.one_block(),
                self.stream,
                &args,
                "state_update",
            )
        }
    }

    fn enqueue_weights(&self, config: &Config) -> Result<()> {
        let args = self.weight_args(config);
        // SAFETY: WeightArgs mirrors state.cu's; state and weights are this handle's.
        unsafe {
            self.api.launch(
                self.kernels.class_weights,
                self.one_block(),
                self.stream,
                &args,
                "class_weights",
            )
        }
    }

    fn enqueue_forward_weights(
        &self,
        config: &Config,
        options: &ForwardOptions,
        upstream: UpstreamMode,
    ) -> Result<()> {
        let args = ForwardWeightArgs {
            update: self.update_args(config, true),
            weights: self.weight_args(config),
            sums: self.sum_args(upstream, 0, options.grad_scale),
            update_first: i64::from(options.update_prevalences),
        };
        // SAFETY: ForwardWeightArgs mirrors state.cu's; every address is this handle's.
        unsafe {
            self.api.launch(
                self.kernels.forward_weights,
                self.one_block(),
                self.stream,
                &args,
                "forward_weights",
            )
        }
    }

    fn sum_args(&self, upstream: UpstreamMode, grad_loss: DevicePtr, grad_scale: f64) -> SumArgs {
        SumArgs {
            weights: self.weights.ptr,
            counts: self.counts.ptr,
            scalars: self.scalars.ptr,
            grad_loss,
            num_classes: self.num_classes as i64,
            upstream_mode: upstream as i64,
            grad_scale,
        }
    }

    fn enqueue_backward_weights(
        &self,
        logit: usize,
        upstream: UpstreamMode,
        grad_loss: DevicePtr,
    ) -> Result<()> {
        let args = self.sum_args(upstream, grad_loss, 1.0);
        // SAFETY: SumArgs mirrors state.cu's; grad_loss is the checked upstream gradient of
        // the logits' type (read only in the reduced modes, where it has one element).
        unsafe {
            self.api.launch(
                self.kernels.backward_weights[logit],
                self.one_block(),
                self.stream,
                &args,
                "backward_weights",
            )
        }
    }

    /// The fused pass; returns the number of tiles whose partial sums it wrote.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_loss(
        &mut self,
        call: &Call,
        logits: &Tensor<'_>,
        target: &Tensor<'_>,
        grad: Option<&Tensor<'_>>,
        options: &ForwardOptions,
        per_position: PerPosition<'_>,
        partials: bool,
    ) -> Result<i64> {
        let num_classes = self.num_classes;
        let size = LOGIT_SIZES[call.logit];
        let (logit_positions, logits_class_stride) =
            split_class_axis(&logits.strides, call.class_axis);
        let grad_split = grad.map(|g| split_class_axis(&g.strides, call.class_axis));
        let pass = Pass::new(
            &target.shape,
            [
                Some(&logit_positions),
                Some(&target.strides),
                grad_split.as_ref().map(|(positions, _)| positions.as_slice()),
                per_position.strides(),
            ],
        );

        let pixels = num_classes <= PIXEL_CACHE
            || (logits_class_stride != 1 && pass.inner_stride(LOGITS) == 1);
        let row_cache_bytes = ACC_SIZES[call.logit] * num_classes;
        let (functions, tile_len, threads, shared) = if pixels {
            (&self.kernels.loss_pixels, PIXEL_THREADS as usize, PIXEL_THREADS, 0)
        } else if num_classes <= WARP_ROWS_MAX_CLASSES {
            (&self.kernels.loss_warp_rows, (WARP_ROWS_THREADS / 32) as usize, WARP_ROWS_THREADS, 0)
        } else {
            let shared = if row_cache_bytes <= self.row_cache_limit { row_cache_bytes } else { 0 };
            (&self.kernels.loss_block_rows, 1, BLOCK_ROWS_THREADS, shared)
        };
        let function = functions[call.logit][call.label];
        let tiling = pass.tiling(tile_len);
        if tiling.tiles == 0 {
            return Ok(0);
        }

        let partials_ptr = if partials { self.partials_for(tiling.tiles as usize)? } else { 0 };
        let args = LossArgs {
            positions: pass.positions,
            tiling,
            logits: address(logits, size)?,
            target: address(target, LABEL_SIZES[call.label])?,
            grad: grad.map(|g| address(g, size)).transpose()?.unwrap_or(0),
            per_position: per_position.address(),
            weights: self.weights.ptr,
            scalars: self.scalars.ptr,
            partials: partials_ptr,
            logits_class_stride: logits_class_stride as i64,
            grad_class_stride: grad_split.as_ref().map_or(0, |(_, stride)| *stride as i64),
            num_classes: num_classes as i64,
            ignore_index: options.ignore_index,
            keep: 1.0 - options.label_smoothing,
            spread: options.label_smoothing / num_classes as f64,
            smoothing: i64::from(options.label_smoothing != 0.0),
            write_losses: i64::from(matches!(per_position, PerPosition::Losses(..))),
            per_position_upstream: i64::from(matches!(per_position, PerPosition::Upstream(..))),
            row_cache: i64::from(shared > 0),
        };
        let shape = Launch { blocks: blocks(tiling.tiles), threads, shared_bytes: shared as u32 };
        // SAFETY: LossArgs mirrors loss.cu's. The logits, target, gradient and per-position
        // tensors were checked to be device memory of this device, of the right dtypes and
        // shapes, with outputs that overlap neither themselves nor the inputs; the pass's
        // strides reach only their elements; weights, scalars and partials are this handle's.
        unsafe { self.api.launch(function, shape, self.stream, &args, "loss") }?;
        Ok(tiling.tiles)
    }

    /// The partials buffer, with room for `tiles` doubles.
    fn partials_for(&mut self, tiles: usize) -> Result<DevicePtr> {
        let needed = 8 * tiles;
        if self.partials.as_ref().is_none_or(|buffer| buffer.bytes < needed) {
            // The old buffer may still be read by enqueued work; wait before freeing it.
            if self.partials.is_some() {
                self.done.synchronize()?;
            }
            self.partials = None;
            self.partials = Some(DeviceBuffer::new(self.api, needed.next_power_of_two())?);
        }
        Ok(self.partials.as_ref().expect("just made").ptr)
    }

    fn enqueue_reduce(
        &self,
        logit: usize,
        tiles: i64,
        loss: DevicePtr,
        reduction: Reduction,
    ) -> Result<()> {
        let args = ReduceArgs {
            partials: self.partials.as_ref().map_or(0, |buffer| buffer.ptr),
            count: tiles,
            scalars: self.scalars.ptr,
            loss,
            mean: i64::from(reduction == Reduction::Mean),
        };
        let shape = Launch { blocks: 1, threads: REDUCE_THREADS, shared_bytes: 0 };
        // SAFETY: ReduceArgs mirrors loss.cu's; `loss` is the checked one-element output of
        // the logits' type, and the partials hold `tiles` sums written by the pass before.
        unsafe {
            self.api.launch(
                self.kernels.loss_reduce[logit],
                shape,
                self.stream,
                &args,
                "loss_reduce",
            )
        }
    }
}
