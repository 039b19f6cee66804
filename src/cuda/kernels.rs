//! The kernels of `kernels/`: their fatbins (built by build.rs into OUT_DIR), the `#[repr(C)]`
//! mirrors of their parameter structs, and a table of the loaded functions.
//!
//! Each mirror has the field order and sizes of its struct in the `.cu` or `.cuh` file; both
//! sides check the total size, and every field is 8 bytes wide so that no padding can differ.

use super::driver::{Api, DevicePtr, Function, Module};
use crate::error::Result;

/// Bytes kept at an alignment of 64, as nvcc aligns the fatbins it embeds itself (the
/// container's fields are 8-byte integers).
#[repr(C, align(64))]
pub(crate) struct Aligned<T: ?Sized>(pub T);

/// The fatbins: machine code for sm_80 and sm_90 and PTX for newer devices.
pub(crate) static COUNTS_FATBIN: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/counts.fatbin")));
pub(crate) static STATE_FATBIN: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/state.fatbin")));
pub(crate) static LOSS_FATBIN: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/loss.fatbin")));

pub(crate) const MAX_AXES: usize = 32;
pub(crate) const OPERANDS: usize = 4;

/// Threads per block of each kernel, as their `__launch_bounds__` say.
pub(crate) const COUNT_THREADS: u32 = 256;
pub(crate) const COUNT_TILE: usize = 4096;
pub(crate) const SHARED_BINS: usize = 8192;
pub(crate) const COUNTS_LOAD_THREADS: u32 = 1024;
pub(crate) const STATE_THREADS: u32 = 1024;
pub(crate) const PIXEL_THREADS: u32 = 256;
pub(crate) const PIXEL_CACHE: usize = 32;
pub(crate) const WARP_ROWS_THREADS: u32 = 256;
pub(crate) const WARP_ROWS_MAX_CLASSES: usize = 1024;
pub(crate) const BLOCK_ROWS_THREADS: u32 = 1024;
pub(crate) const REDUCE_THREADS: u32 = 1024;

/// `CBCE_UPSTREAM_*` of state.cu.
#[derive(Debug, Clone, Copy)]
pub(crate) enum UpstreamMode {
    Scale = 0,
    ScaleOverSum = 1,
    GradLoss = 2,
    GradLossOverSum = 3,
    PerPosition = 4,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Positions {
    pub axes: i64,
    pub dims: [i64; MAX_AXES],
    pub strides: [[i64; MAX_AXES]; OPERANDS],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Tiling {
    pub tile_len: i64,
    pub tiles_per_line: i64,
    pub tiles: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Scalars {
    pub first_bad: u64,
    pub weight_total: f64,
    pub weight_sum: f64,
    pub upstream: f64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct LabelRecord {
    pub set: u64,
    pub position: u64,
    pub label: i64,
    pub ignore_index: i64,
    pub ndim: i64,
    pub shape: [i64; MAX_AXES],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct CountArgs {
    pub positions: Positions,
    pub tiling: Tiling,
    pub target: DevicePtr,
    pub counts: DevicePtr,
    pub scalars: DevicePtr,
    pub num_classes: i64,
    pub ignore_index: i64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct CountsMoveArgs {
    pub tensor: DevicePtr,
    pub counts: DevicePtr,
    pub tensor_stride: i64,
    pub num_classes: i64,
    pub scalars: DevicePtr,
    pub record: DevicePtr,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct LabelCheckArgs {
    pub positions: Positions,
    pub target: DevicePtr,
    pub scalars: DevicePtr,
    pub record: DevicePtr,
    pub ignore_index: i64,
    pub ndim: i64,
    pub shape: [i64; MAX_AXES],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UpdateArgs {
    pub state: DevicePtr,
    pub counts: DevicePtr,
    pub scalars: DevicePtr,
    pub num_classes: i64,
    pub ema_decay: f64,
    pub keep: f64,
    pub first_seen: f64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct WeightArgs {
    pub state: DevicePtr,
    pub weights: DevicePtr,
    pub num_classes: i64,
    pub floor: f64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SumArgs {
    pub weights: DevicePtr,
    pub counts: DevicePtr,
    pub scalars: DevicePtr,
    pub grad_loss: DevicePtr,
    pub num_classes: i64,
    pub upstream_mode: i64,
    pub grad_scale: f64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ForwardWeightArgs {
    pub update: UpdateArgs,
    pub weights: WeightArgs,
    pub sums: SumArgs,
    pub update_first: i64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ResetArgs {
    pub state: DevicePtr,
    pub num_classes: i64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct LossArgs {
    pub positions: Positions,
    pub tiling: Tiling,
    pub logits: DevicePtr,
    pub target: DevicePtr,
    pub grad: DevicePtr,
    pub per_position: DevicePtr,
    pub weights: DevicePtr,
    pub scalars: DevicePtr,
    pub partials: DevicePtr,
    pub logits_class_stride: i64,
    pub grad_class_stride: i64,
    pub num_classes: i64,
    pub ignore_index: i64,
    pub keep: f64,
    pub spread: f64,
    pub smoothing: i64,
    pub write_losses: i64,
    pub per_position_upstream: i64,
    pub row_cache: i64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ReduceArgs {
    pub partials: DevicePtr,
    pub count: i64,
    pub scalars: DevicePtr,
    pub loss: DevicePtr,
    pub mean: i64,
}

// The sizes the kernels' static_asserts name.
const _: () = {
    assert!(std::mem::size_of::<Positions>() == 1288);
    assert!(std::mem::size_of::<Tiling>() == 24);
    assert!(std::mem::size_of::<Scalars>() == 32);
    assert!(std::mem::size_of::<LabelRecord>() == 296);
    assert!(std::mem::size_of::<CountArgs>() == 1352);
    assert!(std::mem::size_of::<CountsMoveArgs>() == 48);
    assert!(std::mem::size_of::<LabelCheckArgs>() == 1584);
    assert!(std::mem::size_of::<UpdateArgs>() == 56);
    assert!(std::mem::size_of::<WeightArgs>() == 32);
    assert!(std::mem::size_of::<SumArgs>() == 56);
    assert!(std::mem::size_of::<ForwardWeightArgs>() == 152);
    assert!(std::mem::size_of::<ResetArgs>() == 16);
    assert!(std::mem::size_of::<LossArgs>() == 1448);
    assert!(std::mem::size_of::<ReduceArgs>() == 40);
};

/// Logits types in the order of the tables below.
pub(crate) const LOGIT_NAMES: [&str; 4] = ["f32", "f64", "f16", "bf16"];
/// Label types in the order of the tables below.
pub(crate) const LABEL_NAMES: [&str; 3] = ["i64", "i32", "u8"];

/// Every kernel, resolved from the loaded modules, which it keeps loaded.
pub(crate) struct Kernels {
    pub class_counts: [Function; 3],
    pub label_check: [Function; 3],
    pub counts_store: Function,
    pub counts_load: Function,
    pub state_update: Function,
    pub state_reset: Function,
    pub class_weights: Function,
    pub forward_weights: Function,
    pub backward_weights: [Function; 4],
    pub loss_pixels: [[Function; 3]; 4],
    pub loss_warp_rows: [[Function; 3]; 4],
    pub loss_block_rows: [[Function; 3]; 4],
    pub loss_reduce: [Function; 4],
    _modules: [Module; 3],
}

impl Kernels {
    /// Loads the three fatbins into the current context and looks every kernel up.
    pub(crate) fn load(api: &'static Api) -> Result<Kernels> {
        let counts = Module::load(api, &COUNTS_FATBIN.0)?;
        let state = Module::load(api, &STATE_FATBIN.0)?;
        let loss = Module::load(api, &LOSS_FATBIN.0)?;
        let by_label = |module: &Module, operation: &str| -> Result<[Function; 3]> {
            let [a, b, c] =
                LABEL_NAMES.map(|label| module.function(&format!("{operation}_{label}")));
            Ok([a?, b?, c?])
        };
        let by_logits = |module: &Module, operation: &str| -> Result<[Function; 4]> {
            let [a, b, c, d] = LOGIT_NAMES.map(|t| module.function(&format!("{operation}_{t}")));
            Ok([a?, b?, c?, d?])
        };
        let by_both = |operation: &str| -> Result<[[Function; 3]; 4]> {
            let [a, b, c, d] = LOGIT_NAMES.map(|t| by_label(&loss, &format!("{operation}_{t}")));
            Ok([a?, b?, c?, d?])
        };
        Ok(Kernels {
            class_counts: by_label(&counts, "class_counts")?,
            label_check: by_label(&counts, "label_check")?,
            counts_store: counts.function("counts_store_i64")?,
            counts_load: counts.function("counts_load_i64")?,
            state_update: state.function("state_update_f64")?,
            state_reset: state.function("state_reset_f64")?,
            class_weights: state.function("class_weights_f32")?,
            forward_weights: state.function("forward_weights_f32")?,
            backward_weights: by_logits(&state, "backward_weights")?,
            loss_pixels: by_both("loss_pixels")?,
            loss_warp_rows: by_both("loss_warp_rows")?,
            loss_block_rows: by_both("loss_block_rows")?,
            loss_reduce: by_logits(&loss, "loss_reduce")?,
            _modules: [counts, state, loss],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (kind, architecture) of every entry of a fatbin: kind 1 is PTX, 2 is machine code.
    ///
    /// The container's layout, as nvcc 13.0 writes it: a 16-byte header (magic 0xba55ed50,
    /// version, header size, payload size), then entries, each with a u16 kind, a u32 header
    /// size at byte 4, a u32 payload size at byte 8 and the architecture as a u32 at byte 28.
    fn entries(fatbin: &[u8]) -> Vec<(u16, u32)> {
        let u16_at = |at: usize| u16::from_le_bytes(fatbin[at..at + 2].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(fatbin[at..at + 4].try_into().unwrap());
        assert_eq!(u32_at(0), 0xba55_ed50, "not a fatbin");
        let header = u16_at(6) as usize;
        let end = header + u64::from_le_bytes(fatbin[8..16].try_into().unwrap()) as usize;
        let mut found = Vec::new();
        let mut at = header;
        while at < end {
            found.push((u16_at(at), u32_at(at + 28)));
            at += u32_at(at + 4) as usize + u32_at(at + 8) as usize;
        }
        found.sort_unstable();
        found
    }

    #[test]
    fn fatbins_hold_sm80_and_sm90_code_and_sm90_ptx() {
        for fatbin in [COUNTS_FATBIN, STATE_FATBIN, LOSS_FATBIN] {
            assert_eq!(fatbin.0.as_ptr() as usize % 64, 0, "aligned");
            assert_eq!(entries(&fatbin.0), vec![(1, 90), (2, 80), (2, 90)]);
        }
    }
}
