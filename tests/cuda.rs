//! CPU and CUDA twins: each test body below runs through the C API on a CPU handle with host
//! tensors (module `cpu`), and on a CUDA handle with device tensors (module `cuda`), where its
//! results must equal the CPU handle's within the precision of the logits' type. A body
//! checks its own expectations on both (the reference vectors, statuses, messages).
//!
//! Without a CUDA device, or in a build without the `cuda` feature, each CUDA twin prints
//! that it was skipped and why, and passes.

use cbce::ffi::*;
use cbce::{bf16, f16, Status};
use serde_json::Value;
use std::ffi::{c_void, CStr};
use std::path::PathBuf;
use std::ptr::{null, null_mut};

// ---------------------------------------------------------------------------------------------
// Where a body runs: the CPU, or a CUDA device through a small driver of the tests' own.

#[derive(Clone, Copy)]
enum Place {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(&'static device::Driver),
}

/// Bytes of one tensor, in host memory or device memory.
enum Memory {
    Host(Vec<u8>),
    #[cfg(feature = "cuda")]
    Device(device::Buffer),
}

impl Memory {
    fn address(&self) -> *mut c_void {
        match self {
            Memory::Host(bytes) => bytes.as_ptr() as *mut c_void,
            #[cfg(feature = "cuda")]
            Memory::Device(buffer) => buffer.ptr as *mut c_void,
        }
    }
}

impl Place {
    fn is_cuda(self) -> bool {
        !matches!(self, Place::Cpu)
    }

    fn device(self) -> CbceDevice {
        match self {
            Place::Cpu => CbceDevice { device_type: CBCE_DEVICE_CPU, device_id: 0 },
            #[cfg(feature = "cuda")]
            Place::Cuda(_) => CbceDevice { device_type: CBCE_DEVICE_CUDA, device_id: 0 },
        }
    }

    fn memory(self, bytes: Vec<u8>) -> Memory {
        match self {
            Place::Cpu => Memory::Host(bytes),
            #[cfg(feature = "cuda")]
            Place::Cuda(driver) => Memory::Device(driver.upload(&bytes)),
        }
    }

    fn read(self, memory: &Memory) -> Vec<u8> {
        match memory {
            Memory::Host(bytes) => bytes.clone(),
            #[cfg(feature = "cuda")]
            Memory::Device(buffer) => match self {
                Place::Cuda(driver) => driver.download(buffer),
                Place::Cpu => unreachable!("device memory on a cpu place"),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Element types and tensors.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Elem {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    U8,
}

impl Elem {
    fn dtype(self) -> CbceDataType {
        let (code, bits) = match self {
            Elem::F32 => (CBCE_DTYPE_FLOAT, 32),
            Elem::F64 => (CBCE_DTYPE_FLOAT, 64),
            Elem::F16 => (CBCE_DTYPE_FLOAT, 16),
            Elem::BF16 => (CBCE_DTYPE_BFLOAT, 16),
            Elem::I64 => (CBCE_DTYPE_INT, 64),
            Elem::I32 => (CBCE_DTYPE_INT, 32),
            Elem::U8 => (CBCE_DTYPE_UINT, 8),
        };
        CbceDataType { code, bits, lanes: 1 }
    }

    fn size(self) -> usize {
        self.dtype().bits as usize / 8
    }

    fn encode(self, value: f64) -> Vec<u8> {
        match self {
            Elem::F32 => (value as f32).to_le_bytes().to_vec(),
            Elem::F64 => value.to_le_bytes().to_vec(),
            Elem::F16 => f16::from_f64(value).to_bits().to_le_bytes().to_vec(),
            Elem::BF16 => bf16::from_f64(value).to_bits().to_le_bytes().to_vec(),
            Elem::I64 => (value as i64).to_le_bytes().to_vec(),
            Elem::I32 => (value as i32).to_le_bytes().to_vec(),
            Elem::U8 => vec![value as u8],
        }
    }

    fn decode(self, bytes: &[u8]) -> f64 {
        match self {
            Elem::F32 => f32::from_le_bytes(bytes.try_into().unwrap()) as f64,
            Elem::F64 => f64::from_le_bytes(bytes.try_into().unwrap()),
            Elem::F16 => f16::from_bits(u16::from_le_bytes(bytes.try_into().unwrap())).to_f64(),
            Elem::BF16 => bf16::from_bits(u16::from_le_bytes(bytes.try_into().unwrap())).to_f64(),
            Elem::I64 => i64::from_le_bytes(bytes.try_into().unwrap()) as f64,
            Elem::I32 => i32::from_le_bytes(bytes.try_into().unwrap()) as f64,
            Elem::U8 => bytes[0] as f64,
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    /// Relative and absolute tolerance between the CPU's and the GPU's results in this type:
    /// a few units of the last place of a result rounded to it.
    fn tolerance(self) -> (f64, f64) {
        match self {
            Elem::F64 => (1e-10, 1e-12),
            Elem::F32 => (2e-5, 2e-6),
            Elem::F16 => (4e-3, 1e-4),
            Elem::BF16 => (3e-2, 1e-3),
            _ => (0.0, 0.0),
        }
    }
}

/// A tensor with its own shape, strides and memory; `descriptor` points into them.
struct Tensor {
    elem: Elem,
    shape: Vec<i64>,
    strides: Vec<i64>,
    /// Elements from the start of the memory to element 0 (for negative strides).
    origin: usize,
    memory: Memory,
    place: Place,
}

impl Tensor {
    /// `values` in C order of `shape`, laid out with `strides` (None: contiguous).
    fn new(
        place: Place,
        elem: Elem,
        shape: &[usize],
        strides: Option<&[i64]>,
        values: &[f64],
    ) -> Tensor {
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let strides = strides.map(<[i64]>::to_vec).unwrap_or_else(|| row_major(&shape));
        let (low, high) = extent(&shape, &strides);
        let span = (high - low + 1).max(1) as usize;
        let origin = (-low) as usize;
        let mut bytes = vec![0u8; span * elem.size()];
        for (linear, &value) in values.iter().enumerate() {
            let at = origin as i64 + offset_of(linear, &shape, &strides);
            let at = at as usize * elem.size();
            bytes[at..at + elem.size()].copy_from_slice(&elem.encode(value));
        }
        assert_eq!(values.len(), shape.iter().product::<i64>() as usize);
        Tensor { elem, shape, strides, origin, memory: place.memory(bytes), place }
    }

    fn filled(place: Place, elem: Elem, shape: &[usize], value: f64) -> Tensor {
        let count: usize = shape.iter().product();
        Tensor::new(place, elem, shape, None, &vec![value; count])
    }

    fn descriptor(&mut self) -> CbceTensor {
        CbceTensor {
            data: self.memory.address(),
            device: self.place.device(),
            ndim: self.shape.len() as i32,
            dtype: self.elem.dtype(),
            shape: self.shape.as_mut_ptr(),
            strides: self.strides.as_mut_ptr(),
            byte_offset: (self.origin * self.elem.size()) as u64,
        }
    }

    /// The values in C order of the shape.
    fn values(&self) -> Vec<f64> {
        let bytes = self.place.read(&self.memory);
        let count = self.shape.iter().product::<i64>() as usize;
        (0..count)
            .map(|linear| {
                let at = self.origin as i64 + offset_of(linear, &self.shape, &self.strides);
                let at = at as usize * self.elem.size();
                self.elem.decode(&bytes[at..at + self.elem.size()])
            })
            .collect()
    }
}

fn row_major(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1; shape.len()];
    for axis in (0..shape.len().saturating_sub(1)).rev() {
        strides[axis] = strides[axis + 1] * shape[axis + 1].max(1);
    }
    strides
}

fn extent(shape: &[i64], strides: &[i64]) -> (i64, i64) {
    let (mut low, mut high) = (0, 0);
    for (&len, &stride) in shape.iter().zip(strides) {
        let reach = (len - 1).max(0) * stride;
        if reach < 0 {
            low += reach;
        } else {
            high += reach;
        }
    }
    (low, high)
}

fn offset_of(mut linear: usize, shape: &[i64], strides: &[i64]) -> i64 {
    let mut offset = 0;
    for axis in (0..shape.len()).rev() {
        let len = shape[axis] as usize;
        offset += (linear % len) as i64 * strides[axis];
        linear /= len;
    }
    offset
}

/// Deterministic pseudo-random values (xorshift), uniform in [low, high).
fn uniform(seed: u64, count: usize, low: f64, high: f64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            low + (high - low) * ((state >> 11) as f64 / (1u64 << 53) as f64)
        })
        .collect()
}

fn labels(seed: u64, count: usize, num_classes: usize, ignore: Option<(i64, f64)>) -> Vec<f64> {
    let draws = uniform(seed, count, 0.0, 1.0);
    let classes = uniform(seed ^ 0xabcd, count, 0.0, num_classes as f64);
    draws
        .iter()
        .zip(classes)
        .map(|(&d, c)| match ignore {
            Some((index, share)) if d < share => index as f64,
            // Skewed: low classes are frequent, so the weights differ.
            _ => (c * c / num_classes as f64).floor(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Handles and calls.

fn last_message() -> String {
    // SAFETY: the library returns this thread's live NUL-terminated message.
    unsafe { CStr::from_ptr(cbce_last_error_message()) }.to_string_lossy().into_owned()
}

struct Handle {
    loss: *mut CbceLoss,
    place: Place,
    num_classes: usize,
}

impl Handle {
    fn new(place: Place, num_classes: usize, ema_decay: f64) -> Handle {
        let mut config = cbce_config_default();
        config.num_classes = num_classes as u64;
        config.ema_decay = ema_decay;
        config.device = place.device();
        let mut loss = null_mut();
        // SAFETY: live config and output.
        let status = unsafe { cbce_new(&config, &mut loss) };
        assert_eq!(status, Status::Ok, "cbce_new: {}", last_message());
        Handle { loss, place, num_classes }
    }

    fn check(&self, what: &str, status: Status) {
        assert_eq!(status, Status::Ok, "{what}: {}", last_message());
    }

    fn prevalences(&self) -> Vec<f64> {
        let mut out = vec![0f32; self.num_classes];
        // SAFETY: a live handle and C writable floats.
        self.check("prevalences", unsafe {
            cbce_prevalences(self.loss, out.as_mut_ptr(), out.len())
        });
        out.iter().map(|&p| p as f64).collect()
    }

    fn weights(&self) -> Vec<f64> {
        let mut out = vec![0f32; self.num_classes];
        // SAFETY: as above.
        self.check("weights", unsafe { cbce_weights(self.loss, out.as_mut_ptr(), out.len()) });
        out.iter().map(|&p| p as f64).collect()
    }

    fn state(&self) -> Vec<u8> {
        let mut size = 0;
        // SAFETY: live handle and outputs.
        self.check("state_size", unsafe { cbce_state_size(self.loss, &mut size) });
        let mut bytes = vec![0u8; size];
        // SAFETY: `size` writable bytes.
        let status = unsafe { cbce_get_state(self.loss, bytes.as_mut_ptr(), size, null_mut()) };
        self.check("get_state", status);
        bytes
    }

    fn synchronize(&self) -> Status {
        // SAFETY: a live handle.
        unsafe { cbce_synchronize(self.loss) }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        logits: &mut Tensor,
        target: &mut Tensor,
        options: &CbceForwardOptions,
        loss_out: &mut Tensor,
        grad: Option<&mut Tensor>,
        weights_used: Option<&mut Vec<f32>>,
    ) -> Status {
        let (logits, target, loss_out) =
            (logits.descriptor(), target.descriptor(), loss_out.descriptor());
        let grad = grad.map(|g| g.descriptor());
        let (weights_ptr, weights_len) =
            weights_used.map_or((null_mut(), 0), |w| (w.as_mut_ptr(), w.len()));
        // SAFETY: live descriptors of live memory, outputs disjoint from inputs.
        unsafe {
            cbce_forward(
                self.loss,
                &logits,
                &target,
                options,
                &loss_out,
                grad.as_ref().map_or(null(), |g| g as *const CbceTensor),
                weights_ptr,
                weights_len,
                null_mut(),
            )
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from cbce_new and is freed once.
        unsafe { cbce_free(self.loss) };
    }
}

fn options(
    reduction: i32,
    ignore_index: i64,
    label_smoothing: f64,
    update: bool,
) -> CbceForwardOptions {
    let mut options = cbce_forward_options_default();
    options.reduction = reduction;
    options.ignore_index = ignore_index;
    options.label_smoothing = label_smoothing;
    options.update_prevalences = i32::from(update);
    options
}

/// Named results of a body, each with the tolerance of its type.
#[derive(Default)]
struct Outputs(Vec<(String, Elem, Vec<f64>)>);

impl Outputs {
    fn add(&mut self, name: impl Into<String>, elem: Elem, values: Vec<f64>) {
        self.0.push((name.into(), elem, values));
    }
}

/// A forward call with a gradient on `place`; records the loss, the gradient, the weights it
/// used, and the state after it.
#[allow(clippy::too_many_arguments)]
fn forward_step(
    out: &mut Outputs,
    name: &str,
    handle: &Handle,
    logits: &mut Tensor,
    target: &mut Tensor,
    options: &CbceForwardOptions,
    with_host_outputs: bool,
) {
    let elem = logits.elem;
    let loss_shape: Vec<usize> = if options.reduction == CBCE_REDUCTION_NONE {
        target.shape.iter().map(|&d| d as usize).collect()
    } else {
        Vec::new()
    };
    let logits_shape: Vec<usize> = logits.shape.iter().map(|&d| d as usize).collect();
    let mut loss_out = Tensor::filled(handle.place, elem, &loss_shape, 0.0);
    let mut grad = Tensor::filled(handle.place, elem, &logits_shape, 0.0);
    let mut weights = vec![0f32; handle.num_classes];
    let status = handle.forward(
        logits,
        target,
        options,
        &mut loss_out,
        Some(&mut grad),
        with_host_outputs.then_some(&mut weights),
    );
    handle.check(name, status);
    handle.check(name, handle.synchronize());
    out.add(format!("{name} loss"), elem, loss_out.values());
    out.add(format!("{name} grad"), elem, grad.values());
    if with_host_outputs {
        out.add(
            format!("{name} weights_used"),
            Elem::F32,
            weights.iter().map(|&w| w as f64).collect(),
        );
    }
    out.add(format!("{name} prevalences"), Elem::F32, handle.prevalences());
}

// ---------------------------------------------------------------------------------------------
// The test bodies.

fn vectors_path() -> PathBuf {
    match std::env::var_os("CBCE_REFERENCE_VECTORS") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors/reference.json"),
    }
}

fn json_floats(value: &Value) -> Vec<f64> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect()
}

fn json_shape(value: &Value) -> Vec<usize> {
    value.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()
}

fn assert_close(what: &str, actual: &[f64], expected: &[f64], rel: f64, abs: f64) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        if e.is_nan() {
            assert!(a.is_nan(), "{what}[{i}]: expected NaN, got {a}");
            continue;
        }
        let tolerance = abs.max(rel * e.abs());
        assert!(
            (a - e).abs() <= tolerance,
            "{what}[{i}]: expected {e}, got {a} (tolerance {tolerance})"
        );
    }
}

/// Every case of the reference's recorded vectors, step by step, against the vectors.
fn reference_vectors(place: Place) -> Outputs {
    let text = std::fs::read_to_string(vectors_path()).expect("the reference vectors");
    let document: Value = serde_json::from_str(&text).unwrap();
    let mut out = Outputs::default();
    for case in document["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let num_classes = case["config"]["num_classes"].as_u64().unwrap() as usize;
        let handle = Handle::new(place, num_classes, case["config"]["ema_decay"].as_f64().unwrap());
        for (index, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let context = format!("{name} step {index}");
            let target_shape = json_shape(&step["target_shape"]);
            let mut target =
                Tensor::new(place, Elem::I64, &target_shape, None, &json_floats(&step["target"]));
            let expected = &step["expected"];
            if step["kind"] == "update" {
                let descriptor = target.descriptor();
                let ignore = step["ignore_index"].as_i64().unwrap();
                // SAFETY: a live descriptor.
                handle.check(&context, unsafe { cbce_update(handle.loss, &descriptor, ignore) });
            } else {
                let opts = &step["options"];
                let reduction = match opts["reduction"].as_str().unwrap() {
                    "mean" => CBCE_REDUCTION_MEAN,
                    "sum" => CBCE_REDUCTION_SUM,
                    _ => CBCE_REDUCTION_NONE,
                };
                let options = options(
                    reduction,
                    opts["ignore_index"].as_i64().unwrap(),
                    opts["label_smoothing"].as_f64().unwrap(),
                    opts["update_class_prevalences"].as_bool().unwrap(),
                );
                let input_shape = json_shape(&step["input_shape"]);
                let mut logits =
                    Tensor::new(place, Elem::F32, &input_shape, None, &json_floats(&step["input"]));
                let loss_shape =
                    if reduction == CBCE_REDUCTION_NONE { target_shape.clone() } else { vec![] };
                let mut loss_out = Tensor::filled(place, Elem::F32, &loss_shape, 0.0);
                let mut grad = Tensor::filled(place, Elem::F32, &input_shape, 0.0);
                let mut weights = vec![0f32; num_classes];
                let status = handle.forward(
                    &mut logits,
                    &mut target,
                    &options,
                    &mut loss_out,
                    None,
                    Some(&mut weights),
                );
                handle.check(&context, status);
                let weights_used: Vec<f64> = weights.iter().map(|&w| w as f64).collect();
                assert_close(
                    &format!("{context} loss"),
                    &loss_out.values(),
                    &json_floats(&expected["loss"]),
                    1e-5,
                    1e-6,
                );
                assert_close(
                    &format!("{context} weights_used"),
                    &weights_used,
                    &json_floats(&expected["weights_used"]),
                    4e-7,
                    1e-9,
                );
                // The gradient: of the reduced loss, or of sum(loss * grad_output) for "none".
                let upstream = if reduction == CBCE_REDUCTION_NONE {
                    json_floats(&step["grad_output"])
                } else {
                    vec![1.0]
                };
                let mut grad_loss = Tensor::new(place, Elem::F32, &loss_shape, None, &upstream);
                let (l, t, g, gl) = (
                    logits.descriptor(),
                    target.descriptor(),
                    grad.descriptor(),
                    grad_loss.descriptor(),
                );
                // SAFETY: live descriptors; the gradient is disjoint from the inputs.
                let status = unsafe {
                    cbce_backward(
                        handle.loss,
                        &l,
                        &t,
                        &options,
                        &gl,
                        weights.as_ptr(),
                        weights.len(),
                        &g,
                    )
                };
                handle.check(&context, status);
                handle.check(&context, handle.synchronize());
                let grad_values = grad.values();
                assert_close(
                    &format!("{context} grad_input"),
                    &grad_values,
                    &json_floats(&expected["grad_input"]),
                    1e-5,
                    1e-6,
                );
                out.add(format!("{context} loss"), Elem::F32, loss_out.values());
                out.add(format!("{context} grad"), Elem::F32, grad_values);
            }
            let prevalences = handle.prevalences();
            assert_close(
                &format!("{context} prevalences"),
                &prevalences,
                &json_floats(&expected["class_prevalences"]),
                4e-7,
                1e-9,
            );
            assert_close(
                &format!("{context} weights"),
                &handle.weights(),
                &json_floats(&expected["class_weights"]),
                4e-7,
                1e-9,
            );
            out.add(format!("{context} prevalences"), Elem::F32, prevalences);
        }
    }
    out
}

/// NCHW segmentation in every logits and label type, with an ignore index, label smoothing
/// and every reduction: one thread per pixel.
fn segmentation_every_dtype(place: Place) -> Outputs {
    let (n, c, h, w) = (2, 19, 5, 7);
    let mut out = Outputs::default();
    for (seed, elem) in [Elem::F32, Elem::F64, Elem::F16, Elem::BF16].into_iter().enumerate() {
        for label_elem in [Elem::I64, Elem::I32, Elem::U8] {
            let ignore = if label_elem == Elem::U8 { 255 } else { -100 };
            let handle = Handle::new(place, c, 0.9);
            for (step, (reduction, smoothing)) in
                [(CBCE_REDUCTION_MEAN, 0.0), (CBCE_REDUCTION_SUM, 0.1), (CBCE_REDUCTION_NONE, 0.05)]
                    .into_iter()
                    .enumerate()
            {
                let seed = (seed * 10 + step) as u64;
                let mut logits = Tensor::new(
                    place,
                    elem,
                    &[n, c, h, w],
                    None,
                    &uniform(seed, n * c * h * w, -4.0, 4.0),
                );
                let mut target = Tensor::new(
                    place,
                    label_elem,
                    &[n, h, w],
                    None,
                    &labels(seed, n * h * w, c, Some((ignore, 0.1))),
                );
                let options = options(reduction, ignore, smoothing, true);
                let name = format!("{elem:?} {label_elem:?} step {step}");
                forward_step(
                    &mut out,
                    &name,
                    &handle,
                    &mut logits,
                    &mut target,
                    &options,
                    step == 0,
                );
            }
        }
    }
    out
}

/// Rows of contiguous classes, from a few classes to a vocabulary: one thread, one warp, and
/// one block per row, with the row in shared memory and (float64, 40000 classes) without.
fn rows_of_every_width(place: Place) -> Outputs {
    let mut out = Outputs::default();
    let cases = [
        (Elem::F32, 5, 64),
        (Elem::F32, 33, 40),
        (Elem::BF16, 100, 40),
        (Elem::F32, 1500, 12),
        (Elem::BF16, 3000, 8),
        (Elem::F32, 40000, 4),
        (Elem::F64, 40000, 3),
    ];
    for (seed, (elem, c, n)) in cases.into_iter().enumerate() {
        let handle = Handle::new(place, c, 0.5);
        let seed = seed as u64 + 100;
        let mut logits = Tensor::new(place, elem, &[n, c], None, &uniform(seed, n * c, -8.0, 8.0));
        let mut target =
            Tensor::new(place, Elem::I64, &[n], None, &labels(seed, n, c, Some((-100, 0.2))));
        let options = options(CBCE_REDUCTION_MEAN, -100, 0.05, true);
        forward_step(
            &mut out,
            &format!("{elem:?} C={c}"),
            &handle,
            &mut logits,
            &mut target,
            &options,
            true,
        );
    }
    out
}

/// Channels-last logits, a gradient with other strides, and a target with a negative stride.
fn strided_layouts(place: Place) -> Outputs {
    let (n, c, h, w) = (3, 7, 4, 6);
    let mut out = Outputs::default();
    let handle = Handle::new(place, c, 0.9);
    let values = uniform(7, n * c * h * w, -3.0, 3.0);
    let nhwc = [(h * w * c) as i64, 1, (w * c) as i64, c as i64];
    let mut logits = Tensor::new(place, Elem::F32, &[n, c, h, w], Some(&nhwc), &values);
    let reversed = [(h * w) as i64, w as i64, -1];
    let mut target =
        Tensor::new(place, Elem::I32, &[n, h, w], Some(&reversed), &labels(8, n * h * w, c, None));
    for reduction in [CBCE_REDUCTION_MEAN, CBCE_REDUCTION_NONE] {
        let options = options(reduction, -100, 0.0, true);
        forward_step(
            &mut out,
            &format!("nhwc reduction {reduction}"),
            &handle,
            &mut logits,
            &mut target,
            &options,
            false,
        );
    }
    // Rows with a class stride of 2 (every other column of a wider buffer).
    let mut wide =
        Tensor::new(place, Elem::F32, &[10, 40], Some(&[80, 2]), &uniform(9, 400, -2.0, 2.0));
    let mut rows_target = Tensor::new(place, Elem::I64, &[10], None, &labels(10, 10, 40, None));
    let wide_handle = Handle::new(place, 40, 0.9);
    let options = options(CBCE_REDUCTION_SUM, -100, 0.2, true);
    forward_step(
        &mut out,
        "class stride 2",
        &wide_handle,
        &mut wide,
        &mut rows_target,
        &options,
        false,
    );
    out
}

/// The state operations: update, counts, update from counts, get and set state, reset.
fn state_operations(place: Place) -> Outputs {
    let c = 6;
    let mut out = Outputs::default();
    let handle = Handle::new(place, c, 0.8);
    let mut target =
        Tensor::new(place, Elem::U8, &[4, 9], None, &labels(11, 36, c, Some((255, 0.2))));
    let descriptor = target.descriptor();
    // SAFETY: a live descriptor.
    handle.check("update", unsafe { cbce_update(handle.loss, &descriptor, 255) });
    out.add("after update", Elem::F32, handle.prevalences());

    let mut counts = vec![0i64; c];
    // SAFETY: a live descriptor and C writable counts.
    let status =
        unsafe { cbce_class_counts(handle.loss, &descriptor, 255, counts.as_mut_ptr(), c) };
    handle.check("class_counts", status);
    out.add("counts", Elem::F64, counts.iter().map(|&n| n as f64).collect());
    // SAFETY: C counts.
    handle.check("update_from_counts", unsafe {
        cbce_update_from_counts(handle.loss, counts.as_ptr(), c)
    });
    out.add("after counts", Elem::F32, handle.prevalences());
    out.add("weights", Elem::F32, handle.weights());

    let state = handle.state();
    let other = Handle::new(place, c, 0.8);
    // SAFETY: a live blob.
    handle.check("set_state", unsafe { cbce_set_state(other.loss, state.as_ptr(), state.len()) });
    assert_eq!(other.state(), state, "a state survives a round trip exactly");
    // SAFETY: a live handle.
    handle.check("reset", unsafe { cbce_reset(handle.loss) });
    assert!(handle.prevalences().iter().all(|p| p.is_nan()), "reset forgets every class");
    out
}

/// Counts into a strided int64 tensor of the handle's place and an update from it: the same
/// counts and the same state bytes as the pointer forms, without a host wait on CUDA; bad
/// counts change nothing and are reported (by the call on the CPU, by the next synchronising
/// call on CUDA).
fn counts_in_tensors(place: Place) -> Outputs {
    let c = 6;
    let mut out = Outputs::default();
    let by_pointer = Handle::new(place, c, 0.8);
    let by_tensor = Handle::new(place, c, 0.8);
    for step in 0..3u64 {
        let mut target = Tensor::new(
            place,
            Elem::I32,
            &[5, 7],
            Some(&[1, 5]),
            &labels(61 + step, 35, c, Some((-100, 0.2))),
        );
        let descriptor = target.descriptor();
        let mut host = vec![0i64; c];
        // SAFETY: a live descriptor and C writable counts.
        let status =
            unsafe { cbce_class_counts(by_pointer.loss, &descriptor, -100, host.as_mut_ptr(), c) };
        by_pointer.check("class_counts", status);
        let mut counts = Tensor::new(place, Elem::I64, &[c], Some(&[-2]), &vec![-7.0; c]);
        let counts_descriptor = counts.descriptor();
        // SAFETY: live descriptors; the counts are disjoint from the target.
        let status = unsafe {
            cbce_class_counts_tensor(by_tensor.loss, &descriptor, -100, &counts_descriptor)
        };
        by_tensor.check("class_counts_tensor", status);
        // SAFETY: a live descriptor of C int64 counts, read in stream order after the counting.
        let status = unsafe { cbce_update_from_counts_tensor(by_tensor.loss, &counts_descriptor) };
        by_tensor.check("update_from_counts_tensor", status);
        // SAFETY: C counts.
        by_pointer.check("update_from_counts", unsafe {
            cbce_update_from_counts(by_pointer.loss, host.as_ptr(), c)
        });
        by_tensor.check("synchronize", by_tensor.synchronize());
        let got = counts.values();
        assert_eq!(got, host.iter().map(|&n| n as f64).collect::<Vec<_>>(), "step {step}");
        assert_eq!(by_tensor.state(), by_pointer.state(), "step {step}: the same state bytes");
        out.add(format!("counts {step}"), Elem::F64, got);
    }
    out.add("prevalences", Elem::F32, by_tensor.prevalences());

    let before = by_tensor.state();
    for (values, needle) in [
        ([4.0, 1.0, -3.0, 0.0, -1.0, 2.0], "count -3 of class 2 is negative"),
        ([i64::MAX as f64; 6], "overflows"),
    ] {
        let mut counts = Tensor::new(place, Elem::I64, &[c], None, &values);
        let counts_descriptor = counts.descriptor();
        // SAFETY: a live descriptor of C int64 counts.
        let mut status =
            unsafe { cbce_update_from_counts_tensor(by_tensor.loss, &counts_descriptor) };
        if place.is_cuda() {
            assert_eq!(status, Status::Ok, "a cuda update only enqueues: {}", last_message());
            status = by_tensor.synchronize();
        }
        assert_eq!(status, Status::InvalidState, "{}", last_message());
        assert!(last_message().contains(needle), "{}", last_message());
        assert_eq!(by_tensor.synchronize(), Status::Ok, "the error is reported once");
        assert_eq!(by_tensor.state(), before, "bad counts leave the state unchanged");
    }
    out
}

/// Backward with an upstream gradient per position ("none") and a reduced one ("mean").
fn backward_calls(place: Place) -> Outputs {
    let (n, c) = (16, 9);
    let mut out = Outputs::default();
    let handle = Handle::new(place, c, 0.9);
    let mut logits = Tensor::new(place, Elem::F32, &[n, c], None, &uniform(21, n * c, -3.0, 3.0));
    let mut target =
        Tensor::new(place, Elem::I64, &[n], None, &labels(22, n, c, Some((-100, 0.25))));
    let weights: Vec<f32> = (0..c).map(|k| 0.5 + k as f32 * 0.125).collect();
    for (reduction, upstream) in
        [(CBCE_REDUCTION_NONE, uniform(23, n, -1.0, 1.0)), (CBCE_REDUCTION_MEAN, vec![0.75])]
    {
        let shape = if reduction == CBCE_REDUCTION_NONE { vec![n] } else { vec![] };
        let mut grad_loss = Tensor::new(place, Elem::F32, &shape, None, &upstream);
        let mut grad = Tensor::filled(place, Elem::F32, &[n, c], 0.0);
        let options = options(reduction, -100, 0.1, false);
        let (l, t, g, gl) =
            (logits.descriptor(), target.descriptor(), grad.descriptor(), grad_loss.descriptor());
        // SAFETY: live descriptors; the gradient is disjoint from the inputs.
        let status =
            unsafe { cbce_backward(handle.loss, &l, &t, &options, &gl, weights.as_ptr(), c, &g) };
        handle.check("backward", status);
        handle.check("backward", handle.synchronize());
        out.add(format!("backward reduction {reduction}"), Elem::F32, grad.values());
    }
    out
}

/// A label outside [0, C): reported (by the call on the CPU, by the next synchronising call
/// on CUDA), with the label and its position, and the state stays as it was.
fn bad_label_changes_nothing(place: Place) -> Outputs {
    let c = 4;
    let mut out = Outputs::default();
    let handle = Handle::new(place, c, 0.9);
    let mut counts = [5i64, 1, 0, 2];
    // SAFETY: C counts.
    handle.check("update_from_counts", unsafe {
        cbce_update_from_counts(handle.loss, counts.as_mut_ptr(), c)
    });
    let before = handle.state();
    let mut logits =
        Tensor::new(place, Elem::F32, &[2, c, 3], None, &uniform(31, 2 * c * 3, -1.0, 1.0));
    let mut target = Tensor::new(place, Elem::I64, &[2, 3], None, &[0.0, 1.0, 2.0, 3.0, 9.0, 1.0]);
    let mut loss_out = Tensor::filled(place, Elem::F32, &[], 0.0);
    let options = options(CBCE_REDUCTION_MEAN, -100, 0.0, true);
    let mut status = handle.forward(&mut logits, &mut target, &options, &mut loss_out, None, None);
    if place.is_cuda() {
        assert_eq!(status, Status::Ok, "a cuda forward only enqueues: {}", last_message());
        status = handle.synchronize();
    }
    assert_eq!(status, Status::LabelOutOfRange, "{}", last_message());
    let message = last_message();
    assert!(message.contains("label 9") && message.contains("[1, 1]"), "{message}");
    assert_eq!(handle.synchronize(), Status::Ok, "the error is reported once");
    assert_eq!(handle.state(), before, "the state is unchanged");
    out.add("prevalences", Elem::F32, handle.prevalences());
    out
}

/// A target without elements, and a batch whose labels are all ignored.
fn empty_and_ignored_batches(place: Place) -> Outputs {
    let c = 3;
    let mut out = Outputs::default();
    let handle = Handle::new(place, c, 0.5);
    let mut counts = [1i64, 1, 0];
    // SAFETY: C counts.
    handle.check("update_from_counts", unsafe {
        cbce_update_from_counts(handle.loss, counts.as_mut_ptr(), c)
    });
    let mut logits = Tensor::new(place, Elem::F32, &[0, c], None, &[]);
    let mut target = Tensor::new(place, Elem::I64, &[0], None, &[]);
    for reduction in [CBCE_REDUCTION_SUM, CBCE_REDUCTION_MEAN] {
        forward_step(
            &mut out,
            &format!("empty {reduction}"),
            &handle,
            &mut logits,
            &mut target,
            &options(reduction, -100, 0.0, true),
            false,
        );
    }
    let mut logits = Tensor::new(place, Elem::F32, &[4, c], None, &uniform(41, 4 * c, -1.0, 1.0));
    let mut target = Tensor::new(place, Elem::I64, &[4], None, &[-100.0; 4]);
    forward_step(
        &mut out,
        "all ignored",
        &handle,
        &mut logits,
        &mut target,
        &options(CBCE_REDUCTION_MEAN, -100, 0.0, true),
        false,
    );
    out
}

/// Work on a stream the caller made: the handle follows `cbce_set_stream`.
fn on_a_caller_stream(place: Place) -> Outputs {
    let c = 5;
    let mut out = Outputs::default();
    let handle = Handle::new(place, c, 0.9);
    #[cfg(feature = "cuda")]
    let stream = match place {
        Place::Cuda(driver) => {
            let stream = driver.stream();
            // SAFETY: a live handle and a live stream of its device.
            handle.check("set_stream", unsafe {
                cbce_set_stream(handle.loss, stream as *mut c_void)
            });
            Some((driver, stream))
        }
        Place::Cpu => None,
    };
    let mut logits =
        Tensor::new(place, Elem::BF16, &[8, c, 33], None, &uniform(51, 8 * c * 33, -2.0, 2.0));
    let mut target = Tensor::new(place, Elem::I64, &[8, 33], None, &labels(52, 8 * 33, c, None));
    forward_step(
        &mut out,
        "stream",
        &handle,
        &mut logits,
        &mut target,
        &options(CBCE_REDUCTION_MEAN, -100, 0.0, true),
        true,
    );
    #[cfg(feature = "cuda")]
    if let Some((driver, stream)) = stream {
        // SAFETY: a live handle; NULL is the default stream.
        handle.check("set_stream", unsafe { cbce_set_stream(handle.loss, null_mut()) });
        driver.destroy_stream(stream);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The twins.

/// Says on the test's stderr, past the test harness' capture, that a twin did not run.
fn skipped(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {what}");
}

/// Runs `body` on the CPU and on CUDA device 0 and compares every output.
fn on_cuda(name: &str, body: fn(Place) -> Outputs) {
    #[cfg(not(feature = "cuda"))]
    {
        let _ = body;
        skipped(&format!("the cuda twin of {name}: this build has no cuda feature"));
    }
    #[cfg(feature = "cuda")]
    {
        let Some(driver) = device::driver() else {
            skipped(&format!("the cuda twin of {name}: no usable cuda device"));
            return;
        };
        let expected = body(Place::Cpu);
        let actual = body(Place::Cuda(driver));
        assert_eq!(actual.0.len(), expected.0.len(), "{name}: outputs differ in number");
        for ((what, elem, got), (_, _, want)) in actual.0.iter().zip(&expected.0) {
            let (rel, abs) = elem.tolerance();
            assert_close(
                &format!("{name}: {what} (cuda against cpu)"),
                got,
                want,
                rel.max(4e-7),
                abs.max(1e-9),
            );
        }
    }
}

macro_rules! twins {
    ($($body:ident),* $(,)?) => {
        mod cpu {
            $(#[test] fn $body() { let _ = super::$body(super::Place::Cpu); })*
        }
        mod cuda {
            $(#[test] fn $body() { super::on_cuda(stringify!($body), super::$body); })*
        }
    };
}

twins!(
    reference_vectors,
    segmentation_every_dtype,
    rows_of_every_width,
    strided_layouts,
    state_operations,
    counts_in_tensors,
    backward_calls,
    bad_label_changes_nothing,
    empty_and_ignored_batches,
    on_a_caller_stream,
);

#[test]
fn streams_apply_to_cuda_handles_only() {
    let handle = Handle::new(Place::Cpu, 3, 0.9);
    // SAFETY: a live handle; the stream is never used by a cpu handle.
    let status = unsafe { cbce_set_stream(handle.loss, null_mut()) };
    assert_eq!(status, Status::Unsupported);
    assert!(last_message().contains("stream"), "{}", last_message());
    assert_eq!(handle.synchronize(), Status::Ok, "nothing is pending on a cpu handle");
    // SAFETY: NULL is checked.
    assert_eq!(unsafe { cbce_synchronize(null()) }, Status::NullPointer);
    if cfg!(not(feature = "cuda")) {
        assert_eq!(cbce_cuda_available(), 0);
    }
}

#[test]
fn a_cuda_handle_without_a_device_is_unsupported() {
    if cbce_cuda_available() == 1 {
        return;
    }
    let mut config = cbce_config_default();
    config.num_classes = 3;
    config.device = CbceDevice { device_type: CBCE_DEVICE_CUDA, device_id: 0 };
    let mut loss = 0x10 as *mut CbceLoss;
    // SAFETY: live config and output.
    let status = unsafe { cbce_new(&config, &mut loss) };
    let message = last_message();
    assert_eq!(status, Status::Unsupported, "{message}");
    assert!(message.contains("cuda"), "{message}");
    assert_eq!(loss as usize, 0x10, "nothing written on failure");
    skipped(&format!("the cuda twins, because a cuda handle cannot be made: {message}"));
}

// ---------------------------------------------------------------------------------------------
// The tests' own access to the device: memory and streams, through the driver.

#[cfg(feature = "cuda")]
mod device {
    use std::ffi::c_void;
    use std::sync::OnceLock;

    /// The few driver entry points the tests use, with the primary context of device 0.
    pub struct Driver {
        context: usize,
        set_current: unsafe extern "C" fn(usize) -> i32,
        alloc: unsafe extern "C" fn(*mut u64, usize) -> i32,
        free: unsafe extern "C" fn(u64) -> i32,
        to_device: unsafe extern "C" fn(u64, *const c_void, usize) -> i32,
        to_host: unsafe extern "C" fn(*mut c_void, u64, usize) -> i32,
        stream_create: unsafe extern "C" fn(*mut usize, u32) -> i32,
        stream_destroy: unsafe extern "C" fn(usize) -> i32,
        synchronize: unsafe extern "C" fn() -> i32,
        _library: libloading::Library,
    }

    /// Device memory the tests own.
    pub struct Buffer {
        driver: &'static Driver,
        pub ptr: u64,
        bytes: usize,
    }

    impl Drop for Buffer {
        fn drop(&mut self) {
            self.driver.current();
            // SAFETY: allocated by `upload`, freed once, after the handle's work (the bodies
            // synchronise before they read or drop their tensors).
            unsafe { (self.driver.free)(self.ptr) };
        }
    }

    static DRIVER: OnceLock<Option<Driver>> = OnceLock::new();

    /// The driver, when the library says a device is usable.
    pub fn driver() -> Option<&'static Driver> {
        DRIVER.get_or_init(|| (cbce::ffi::cbce_cuda_available() == 1).then(load)).as_ref()
    }

    fn load() -> Driver {
        // SAFETY: libcuda's initialisers have no preconditions.
        let library = unsafe { libloading::Library::new("libcuda.so.1") }.expect("libcuda");
        macro_rules! get {
            ($name:literal) => {
                // SAFETY: the types are cuda.h's prototypes with CUresult as i32; the library
                // stays loaded in the Driver that holds the pointers.
                unsafe { *library.get(concat!($name, "\0").as_bytes()).expect($name) }
            };
        }
        let retain: unsafe extern "C" fn(*mut usize, i32) -> i32 = get!("cuDevicePrimaryCtxRetain");
        let device_get: unsafe extern "C" fn(*mut i32, i32) -> i32 = get!("cuDeviceGet");
        let mut device = 0;
        let mut context = 0;
        // SAFETY: writes one device and one context; the library initialised the driver.
        unsafe {
            assert_eq!(device_get(&mut device, 0), 0);
            assert_eq!(retain(&mut context, device), 0);
        }
        Driver {
            context,
            set_current: get!("cuCtxSetCurrent"),
            alloc: get!("cuMemAlloc_v2"),
            free: get!("cuMemFree_v2"),
            to_device: get!("cuMemcpyHtoD_v2"),
            to_host: get!("cuMemcpyDtoH_v2"),
            stream_create: get!("cuStreamCreate"),
            stream_destroy: get!("cuStreamDestroy_v2"),
            synchronize: get!("cuCtxSynchronize"),
            _library: library,
        }
    }

    impl Driver {
        fn current(&self) {
            // SAFETY: the retained primary context of device 0, on this test's thread.
            assert_eq!(unsafe { (self.set_current)(self.context) }, 0);
        }

        /// Device memory holding `bytes`, with the copy finished (a handle's stream need not
        /// wait for the default stream).
        pub fn upload(&'static self, bytes: &[u8]) -> Buffer {
            self.current();
            let mut ptr = 0;
            // SAFETY: writes one device address; then copies `bytes` into the new allocation
            // and waits for the device.
            unsafe {
                assert_eq!((self.alloc)(&mut ptr, bytes.len().max(1)), 0);
                if !bytes.is_empty() {
                    assert_eq!((self.to_device)(ptr, bytes.as_ptr().cast(), bytes.len()), 0);
                }
                assert_eq!((self.synchronize)(), 0);
            }
            Buffer { driver: self, ptr, bytes: bytes.len() }
        }

        pub fn download(&self, buffer: &Buffer) -> Vec<u8> {
            self.current();
            let mut bytes = vec![0u8; buffer.bytes];
            if !bytes.is_empty() {
                // SAFETY: the allocation holds `bytes.len()` bytes.
                let status =
                    unsafe { (self.to_host)(bytes.as_mut_ptr().cast(), buffer.ptr, bytes.len()) };
                assert_eq!(status, 0);
            }
            bytes
        }

        /// A stream that does not synchronise with the default stream.
        pub fn stream(&self) -> usize {
            self.current();
            let mut stream = 0;
            // SAFETY: writes one stream; flag 1 is CU_STREAM_NON_BLOCKING.
            assert_eq!(unsafe { (self.stream_create)(&mut stream, 1) }, 0);
            stream
        }

        pub fn destroy_stream(&self, stream: usize) {
            self.current();
            // SAFETY: a stream from `stream`, no longer any handle's.
            assert_eq!(unsafe { (self.stream_destroy)(stream) }, 0);
        }
    }
}
