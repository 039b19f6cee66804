//! The CPU core: one cheap pass over the labels (counts and the range check), then one fused
//! pass over the logits that yields the loss and writes the gradient, both on Rayon.
//!
//! The fused pass takes the logits into a small buffer, so each logit is read from memory once
//! and exponentiated once. Three kernels share the work. Positions contiguous in memory (NCHW)
//! go in tiles of 32 positions with all their classes, on explicit lane vectors ([`simd`]),
//! with the logits prefetched far ahead and the float32 gradient written by streaming stores.
//! Long contiguous rows ((N, C) with many classes) are taken one at a time and vectorised along
//! the classes. Everything else goes in blocks of positions, transposed in tiles when rows of
//! few classes are contiguous (channels-last, small C). Sums are made per fixed chunk in double
//! precision and added in chunk order, so no result depends on the number of threads, on where
//! the buffers start, or on which vector instructions the CPU has.

use crate::dtype::{Label, Logit, Real};
use crate::isa::Isa;
use crate::layout::{Chunk, Geometry, GRAD, LOGITS, PER_POSITION, TARGET};
use crate::simd::{self, F32Lanes};
use crate::strided::{self, Sink, Source, CACHE_LINE};
use rayon::prelude::*;
use std::any::TypeId;

/// Positions per chunk of the label scan.
const SCAN_CHUNK: usize = 1 << 15;
/// Logits per chunk of the fused pass (a chunk holds `FUSED_CHUNK_LOGITS / C` positions).
const FUSED_CHUNK_LOGITS: usize = 1 << 17;
/// Logits per block of the spatial kernel: the block's buffer stays in the L2 cache.
const BLOCK_LOGITS: usize = 16384;

/// What a scan of the labels found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LabelScan {
    /// Count of each class among labels in `[0, C)` that are not the ignore index.
    pub counts: Vec<u64>,
    /// The first label (C order) outside `[0, C)` that is not the ignore index, with its
    /// linear position.
    pub first_out_of_range: Option<(usize, i64)>,
}

/// Counts the labels of `target` over `geometry` (slot TARGET) and finds the first bad one.
pub(crate) fn scan_labels<L: Label>(
    target: &Source<'_, L>,
    geometry: &Geometry,
    num_classes: usize,
    ignore_index: i64,
) -> LabelScan {
    let empty = || LabelScan { counts: vec![0; num_classes], first_out_of_range: None };
    let stride = geometry.inner_stride(TARGET);
    (0..geometry.chunk_count(SCAN_CHUNK))
        .into_par_iter()
        .fold(empty, |mut scan, index| {
            let chunk = geometry.chunk(index, SCAN_CHUNK);
            let mut tally = |p: usize, label: i64| {
                if (label as u64) < num_classes as u64 {
                    scan.counts[label as usize] += 1;
                } else if label != ignore_index && scan.first_out_of_range.is_none() {
                    scan.first_out_of_range = Some((chunk.first_position + p, label));
                }
            };
            let base = chunk.offsets[TARGET];
            if stride == 1 {
                for (p, label) in target.slice(base, chunk.len).iter().enumerate() {
                    tally(p, label.to_i64());
                }
            } else {
                for p in 0..chunk.len {
                    tally(p, target.get(base + p as isize * stride).to_i64());
                }
            }
            scan
        })
        .reduce(empty, |mut a, b| {
            for (total, count) in a.counts.iter_mut().zip(&b.counts) {
                *total += count;
            }
            a.first_out_of_range = match (a.first_out_of_range, b.first_out_of_range) {
                (Some(x), Some(y)) => Some(if x.0 <= y.0 { x } else { y }),
                (x, y) => x.or(y),
            };
            a
        })
}

/// The gradient of the loss with respect to each position's loss.
pub(crate) enum Upstream<'a, T> {
    /// The same coefficient everywhere (mean and sum, and "none" with a scalar scale).
    Uniform(f64),
    /// One coefficient per position, read from slot PER_POSITION.
    PerPosition(Source<'a, T>),
}

/// One fused pass: the loss of every position, and optionally the gradient and the
/// per-position losses.
pub(crate) struct FusedPass<'a, T: Logit, L: Label> {
    pub geometry: Geometry,
    pub logits: Source<'a, T>,
    pub logits_class_stride: isize,
    pub target: Source<'a, L>,
    /// The gradient with its class stride; its position strides are in slot GRAD.
    pub grad: Option<(Sink<'a, T>, isize)>,
    /// Per-position losses (reduction "none"), at slot PER_POSITION.
    pub losses: Option<Sink<'a, T>>,
    /// Coefficients of the gradient; ignored when `grad` is `None`.
    pub upstream: Upstream<'a, T>,
    pub weights: &'a [f32],
    pub label_smoothing: f64,
    pub ignore_index: i64,
}

/// Constants of the loss formula in the precision of the computation.
struct Coefficients<A> {
    weights: Vec<A>,
    weight_total: A,
    /// 1 - label_smoothing.
    keep: A,
    /// label_smoothing / C.
    spread: A,
}

/// Which kernel a pass runs.
#[derive(Clone, Copy, PartialEq)]
enum Kernel {
    /// Rows of many contiguous classes, one at a time.
    Rows,
    /// Tiles of positions contiguous in memory (NCHW), with all their classes.
    Tiles,
    /// Blocks of positions with all their classes, transposed where rows are short.
    Blocks,
}

/// Classes up to which contiguous rows are still taken in blocks of positions: below it a
/// row is too short to vectorise along.
const ROW_KERNEL_MIN_CLASSES: usize = 64;

/// Lanes of the row kernel's reductions. Sums are split over this many accumulators in a
/// fixed order, so results do not depend on the vector width the CPU offers.
const LANES: usize = 8;

/// Positions of a tile of the spatial kernel: one lane vector, two cache lines of float32.
const TILE: usize = simd::LANES;

/// Classes up to which the tile kernel serves float32 logits: its buffer of `TILE * C` values
/// stays within the L2 cache.
const TILE_KERNEL_MAX_CLASSES: usize = 2048;

/// How far ahead of its tile the tile kernel asks for logits, in bytes over all classes: into
/// the L1 cache a little ahead, and into the L2 cache far ahead. NCHW planes are far apart,
/// more streams than the hardware prefetchers follow, so without it loads wait on memory.
const PREFETCH_L1_BYTES: usize = 12 << 10;
const PREFETCH_L2_BYTES: usize = 256 << 10;
/// The bounds of each class's prefetch distance, in bytes.
const PREFETCH_L1_RANGE: (usize, usize) = (2 * CACHE_LINE, 8 * CACHE_LINE);
const PREFETCH_L2_RANGE: (usize, usize) = (8 * CACHE_LINE, 256 * CACHE_LINE);

/// Per-thread working memory of the kernels, reused from chunk to chunk.
pub(crate) struct Scratch<T: Logit> {
    values: Vec<T::Acc>,
    per_position: Vec<T::Acc>,
    labels: Vec<i64>,
    /// One run of gradient values in the logits' type, ready to be written out.
    out_row: Vec<T>,
    /// The tile kernel's C runs of `TILE` values.
    tile: Vec<f32>,
}

impl<T: Logit> Scratch<T> {
    fn new() -> Self {
        Scratch {
            values: Vec::new(),
            per_position: Vec::new(),
            labels: Vec::new(),
            out_row: Vec::new(),
            tile: Vec::new(),
        }
    }
}

impl<'a, T: Logit, L: Label> FusedPass<'a, T, L> {
    /// Runs the pass; returns the sum of all positions' losses (ignored ones count 0).
    pub(crate) fn run(&self) -> f64 {
        self.run_with(Isa::detect())
    }

    /// [`FusedPass::run`] with the kernels built for `isa`, which this CPU must run.
    pub(crate) fn run_with(&self, isa: Isa) -> f64 {
        let num_classes = self.weights.len();
        let coefficients = Coefficients {
            weights: self.weights.iter().map(|&w| T::Acc::from_f64(w as f64)).collect(),
            weight_total: T::Acc::from_f64(self.weights.iter().map(|&w| w as f64).sum()),
            keep: T::Acc::from_f64(1.0 - self.label_smoothing),
            spread: T::Acc::from_f64(self.label_smoothing / num_classes as f64),
        };
        let contiguous_rows = self.logits_class_stride == 1 && num_classes > ROW_KERNEL_MIN_CLASSES;
        let single_precision = TypeId::of::<T::Acc>() == TypeId::of::<f32>();
        let short_rows = self.logits_class_stride == 1 && num_classes <= ROW_KERNEL_MIN_CLASSES;
        let kernel = if single_precision
            && (self.geometry.inner_stride(LOGITS) == 1 || short_rows)
            && num_classes <= TILE_KERNEL_MAX_CLASSES
        {
            Kernel::Tiles
        } else if contiguous_rows || num_classes * 8 > BLOCK_LOGITS {
            Kernel::Rows
        } else {
            Kernel::Blocks
        };
        // Whole tiles per chunk, so that every tile of a line starts where the first does:
        // on a cache line, for aligned planes.
        let chunk_len = match kernel {
            Kernel::Tiles => (FUSED_CHUNK_LOGITS / num_classes / TILE).max(1) * TILE,
            _ => (FUSED_CHUNK_LOGITS / num_classes).max(1),
        };

        let partials: Vec<f64> = (0..self.geometry.chunk_count(chunk_len))
            .into_par_iter()
            .map_init(Scratch::new, |scratch, index| {
                let chunk = self.geometry.chunk(index, chunk_len);
                let sum = self.run_chunk(isa, kernel, &chunk, &coefficients, scratch);
                // The chunk's non-temporal gradient stores complete before its result is seen.
                strided::fence();
                sum
            })
            .collect();
        partials.iter().sum()
    }

    /// Runs one chunk with the kernels built for `isa`.
    fn run_chunk(
        &self,
        isa: Isa,
        kernel: Kernel,
        chunk: &Chunk,
        k: &Coefficients<T::Acc>,
        scratch: &mut Scratch<T>,
    ) -> f64 {
        match isa {
            // SAFETY: the caller passes an instruction set this CPU runs.
            #[cfg(all(target_arch = "x86_64", not(miri)))]
            Isa::Avx512 => unsafe { self.run_chunk_avx512(kernel, chunk, k, scratch) },
            // SAFETY: as above.
            #[cfg(all(target_arch = "x86_64", not(miri)))]
            Isa::Avx2 => unsafe { self.run_chunk_avx2(kernel, chunk, k, scratch) },
            _ => self.run_chunk_portable::<simd::Lanes>(kernel, chunk, k, scratch),
        }
    }

    #[cfg(all(target_arch = "x86_64", not(miri)))]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn run_chunk_avx512(
        &self,
        kernel: Kernel,
        chunk: &Chunk,
        k: &Coefficients<T::Acc>,
        scratch: &mut Scratch<T>,
    ) -> f64 {
        self.run_chunk_portable::<simd::Avx512>(kernel, chunk, k, scratch)
    }

    #[cfg(all(target_arch = "x86_64", not(miri)))]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_chunk_avx2(
        &self,
        kernel: Kernel,
        chunk: &Chunk,
        k: &Coefficients<T::Acc>,
        scratch: &mut Scratch<T>,
    ) -> f64 {
        self.run_chunk_portable::<simd::Avx2>(kernel, chunk, k, scratch)
    }

    /// Runs one chunk, the tile kernel on lane vectors `V`.
    #[inline(always)]
    fn run_chunk_portable<V: F32Lanes>(
        &self,
        kernel: Kernel,
        chunk: &Chunk,
        k: &Coefficients<T::Acc>,
        scratch: &mut Scratch<T>,
    ) -> f64 {
        match kernel {
            Kernel::Rows => self.row_chunk(chunk, k, scratch),
            Kernel::Tiles => self.tile_chunk::<V>(chunk, k, &mut scratch.tile),
            Kernel::Blocks => self.block_chunk(chunk, k, scratch),
        }
    }

    #[inline(always)]
    fn label_at(&self, chunk: &Chunk, p: usize) -> i64 {
        let stride = self.geometry.inner_stride(TARGET);
        self.target.get(chunk.offsets[TARGET] + p as isize * stride).to_i64()
    }

    /// The labels of `labels.len()` positions from `start`.
    #[inline(always)]
    fn load_labels(&self, chunk: &Chunk, start: usize, labels: &mut [i64]) {
        let stride = self.geometry.inner_stride(TARGET);
        let base = chunk.offsets[TARGET] + start as isize * stride;
        if stride == 1 {
            let source = self.target.slice(base, labels.len());
            for (slot, label) in labels.iter_mut().zip(source) {
                *slot = label.to_i64();
            }
        } else {
            for (p, slot) in labels.iter_mut().enumerate() {
                *slot = self.target.get(base + p as isize * stride).to_i64();
            }
        }
    }

    #[inline(always)]
    fn upstream_at(&self, chunk: &Chunk, p: usize) -> T::Acc {
        match &self.upstream {
            Upstream::Uniform(value) => T::Acc::from_f64(*value),
            Upstream::PerPosition(source) => {
                let stride = self.geometry.inner_stride(PER_POSITION);
                source.get(chunk.offsets[PER_POSITION] + p as isize * stride).to_acc()
            }
        }
    }

    #[inline(always)]
    fn store_loss(&self, chunk: &Chunk, p: usize, loss: T::Acc) {
        if let Some(losses) = &self.losses {
            let offset =
                chunk.offsets[PER_POSITION] + p as isize * self.geometry.inner_stride(PER_POSITION);
            // SAFETY: position p of this chunk belongs to this chunk alone, and the losses
            // tensor's positions do not overlap.
            unsafe { losses.put(offset, T::from_acc(loss)) }
        }
    }

    /// Positions one at a time, each row of C logits through the buffer; for long rows.
    #[inline(always)]
    fn row_chunk(&self, chunk: &Chunk, k: &Coefficients<T::Acc>, scratch: &mut Scratch<T>) -> f64 {
        let num_classes = k.weights.len();
        let class_stride = self.logits_class_stride;
        let row = &mut scratch.values;
        row.resize(num_classes, T::Acc::ZERO);
        let mut sum = 0.0f64;

        for p in 0..chunk.len {
            let label = self.label_at(chunk, p);
            let ignored = label == self.ignore_index;
            if ignored && self.grad.is_none() {
                self.store_loss(chunk, p, T::Acc::ZERO);
                continue;
            }

            let logit_offset =
                chunk.offsets[LOGITS] + p as isize * self.geometry.inner_stride(LOGITS);
            if class_stride == 1 {
                for (slot, x) in row.iter_mut().zip(self.logits.slice(logit_offset, num_classes)) {
                    *slot = x.to_acc();
                }
            } else {
                for (c, slot) in row.iter_mut().enumerate() {
                    *slot = self.logits.get(logit_offset + c as isize * class_stride).to_acc();
                }
            }

            let max = lane_max(row);
            let shifted_target = if ignored { T::Acc::ZERO } else { row[label as usize] - max };
            let weighted_shift = if self.label_smoothing != 0.0 && !ignored {
                lane_dot_shifted(row, &k.weights, max)
            } else {
                T::Acc::ZERO
            };
            let total = exp_shifted_in_place(row, max);

            // An ignored position has loss 0 and gradient 0 * softmax, which is NaN where the
            // softmax is, as PyTorch's gradient is.
            let (scale, smoothing, target_term) = if ignored {
                self.store_loss(chunk, p, T::Acc::ZERO);
                (T::Acc::ZERO / total, T::Acc::ZERO, T::Acc::ZERO)
            } else {
                let log_total = total.ln();
                let w_y = k.weights[label as usize];
                let loss = k.keep * w_y * (log_total - shifted_target)
                    + k.spread * (k.weight_total * log_total - weighted_shift);
                self.store_loss(chunk, p, loss);
                sum += loss.to_f64();
                let coefficient = self.upstream_at(chunk, p);
                (
                    coefficient * (k.keep * w_y + k.spread * k.weight_total) / total,
                    coefficient * k.spread,
                    coefficient * k.keep * w_y,
                )
            };

            if let Some((grad, grad_class_stride)) = &self.grad {
                let offset = chunk.offsets[GRAD] + p as isize * self.geometry.inner_stride(GRAD);
                let value = |c: usize| row[c] * scale - smoothing * k.weights[c];
                if *grad_class_stride == 1 {
                    // SAFETY: this row belongs to this chunk alone, the gradient tensor does
                    // not overlap itself, and the slice dies at the end of this block.
                    let out = unsafe { grad.slice_mut(offset, num_classes) };
                    for (c, g) in out.iter_mut().enumerate() {
                        *g = T::from_acc(value(c));
                    }
                } else {
                    for c in 0..num_classes {
                        // SAFETY: as above, one element at a time.
                        unsafe {
                            grad.put(offset + c as isize * grad_class_stride, T::from_acc(value(c)))
                        }
                    }
                }
                if !ignored {
                    let y = label as usize;
                    // SAFETY: as above.
                    unsafe {
                        grad.put(
                            offset + y as isize * grad_class_stride,
                            T::from_acc(value(y) - target_term),
                        )
                    }
                }
            }
        }
        sum
    }

    /// Tiles of `TILE` consecutive positions with all their classes, in float32. Serves
    /// positions contiguous in memory (NCHW), whose class planes are read straight into lane
    /// vectors, and rows of few contiguous classes (channels-last, small C), transposed into
    /// and out of the tile. A tile's C runs of `TILE` values stay in the L1 cache, every step
    /// works on whole lane vectors along the positions, and the gradient goes from there to
    /// memory. The last tile of a chunk, and the first where [`Self::tile_phase`] cuts it, may
    /// be short; missing lanes hold logits 0 and no label, and are never written. Each
    /// position's operations, in their order, are those of [`Self::block_chunk`].
    #[inline(always)]
    fn tile_chunk<V: F32Lanes>(
        &self,
        chunk: &Chunk,
        k: &Coefficients<T::Acc>,
        tile: &mut Vec<f32>,
    ) -> f64 {
        let num_classes = self.weights.len();
        let single = |x: T::Acc| x.to_f64() as f32;
        let (keep, spread) = (V::splat(single(k.keep)), V::splat(single(k.spread)));
        let weight_total = V::splat(single(k.weight_total));
        let zero = V::splat(0.0);
        let smoothing_on = self.label_smoothing != 0.0;
        let class_stride = self.logits_class_stride;
        let position_stride = self.geometry.inner_stride(LOGITS);
        let transposed = position_stride != 1;
        tile.resize(num_classes * TILE, 0.0);
        let (rows, _) = tile.as_chunks_mut::<TILE>();
        let size = std::mem::size_of::<T>();
        let lines_per_tile = (TILE * size).div_ceil(CACHE_LINE);
        let per_line = (CACHE_LINE / size) as isize;
        let distance = |budget: usize, (low, high): (usize, usize)| {
            ((budget / num_classes).clamp(low, high) / CACHE_LINE * per_line as usize) as isize
        };
        let near = distance(PREFETCH_L1_BYTES, PREFETCH_L1_RANGE);
        let far = distance(PREFETCH_L2_BYTES, PREFETCH_L2_RANGE);
        // Loss sums of the positions p of the chunk with the same p % TILE, added in that order
        // at the end: the same sums however the tiles fall.
        let mut sums = [0.0f64; TILE];
        let first_len = self.tile_phase(chunk).min(chunk.len);

        let mut start = 0;
        while start < chunk.len {
            let len =
                if start == 0 && first_len > 0 { first_len } else { TILE.min(chunk.len - start) };
            let base = chunk.offsets[LOGITS] + start as isize * position_stride;

            // Each lane's class (exact in float32), row and weight; class -1, row 0 and weight 0
            // for an ignored position or a missing lane.
            let mut labels = [0i64; TILE];
            self.load_labels(chunk, start, &mut labels[..len]);
            let mut class = [-1.0f32; TILE];
            let mut target_row = [0usize; TILE];
            let mut target_weight = [0.0f32; TILE];
            for (i, &label) in labels[..len].iter().enumerate() {
                if label != self.ignore_index {
                    class[i] = label as f32;
                    target_row[i] = label as usize;
                    target_weight[i] = self.weights[label as usize];
                }
            }

            let mut max = V::splat(f32::NEG_INFINITY);
            if transposed {
                // Rows of few classes, contiguous: a tile is one run of memory, which the
                // hardware prefetcher follows; it is transposed into the class-major buffer.
                for row in rows.iter_mut() {
                    row[len..].fill(0.0);
                }
                for i in 0..len {
                    let offset = base + i as isize * position_stride;
                    for (row, x) in rows.iter_mut().zip(self.logits.slice(offset, num_classes)) {
                        row[i] = strided::to_single(*x);
                    }
                }
                for row in rows.iter() {
                    max = max.larger(V::from_array(row));
                }
            } else {
                for (c, row) in rows.iter_mut().enumerate() {
                    let plane = base + c as isize * class_stride;
                    for line in 0..lines_per_tile as isize {
                        self.logits.prefetch(plane + near + line * per_line);
                        self.logits.prefetch_l2(plane + far + line * per_line);
                    }
                    let x: V = self.logits.read_lanes(plane, len);
                    *row = x.to_array();
                    max = max.larger(x);
                }
            }
            let target_logit: [f32; TILE] = std::array::from_fn(|i| rows[target_row[i]][i]);
            let class_lanes = V::from_array(&class);
            let ignored = class_lanes.less(zero);
            let target_shift = V::select(ignored, zero, V::from_array(&target_logit).sub(max));
            // Label smoothing needs sum_c w_c (x_c - max) before the exponentials replace x.
            let mut shift = zero;
            if smoothing_on {
                for (row, &w) in rows.iter().zip(self.weights) {
                    shift = shift.add(V::splat(w).mul(V::from_array(row).sub(max)));
                }
            }
            let mut total = zero;
            for row in rows.iter_mut() {
                let e = simd::exp(V::from_array(row).sub(max));
                *row = e.to_array();
                total = total.add(e);
            }

            // The loss of each position; an ignored one has loss 0 whatever its logits.
            let target_weight = V::from_array(&target_weight);
            let log_total = simd::ln(total);
            let mut loss = keep.mul(target_weight).mul(log_total.sub(target_shift));
            if smoothing_on {
                loss = loss.add(spread.mul(weight_total.mul(log_total).sub(shift)));
            }
            let loss = V::select(ignored, zero, loss).to_array();
            for (i, &l) in loss[..len].iter().enumerate() {
                sums[(start + i) % TILE] += l as f64;
            }
            if self.losses.is_some() {
                for (i, &l) in loss[..len].iter().enumerate() {
                    self.store_loss(chunk, start + i, T::Acc::from_f64(l as f64));
                }
            }

            if let Some((grad, grad_class_stride)) = &self.grad {
                let upstream = match &self.upstream {
                    Upstream::Uniform(value) => V::splat(*value as f32),
                    Upstream::PerPosition(_) => {
                        let mut lanes = [0.0f32; TILE];
                        for (i, u) in lanes[..len].iter_mut().enumerate() {
                            *u = single(self.upstream_at(chunk, start + i));
                        }
                        V::from_array(&lanes)
                    }
                };
                // Gradient factors; an ignored position gets 0 * softmax, which is NaN where
                // the softmax is, as in PyTorch.
                let factor = upstream.mul(keep.mul(target_weight).add(spread.mul(weight_total)));
                let scale = V::select(ignored, zero, factor).div(total);
                let smoothing = V::select(ignored, zero, upstream.mul(spread));
                let target_term = upstream.mul(keep).mul(target_weight);

                let grad_position_stride = self.geometry.inner_stride(GRAD);
                let grad_base = chunk.offsets[GRAD] + start as isize * grad_position_stride;
                // Rows of few classes, contiguous, are written back transposed from the buffer.
                let rows_out = *grad_class_stride == 1 && grad_position_stride != 1;
                for (c, (row, &w)) in rows.iter_mut().zip(self.weights).enumerate() {
                    let mut g = V::from_array(row).mul(scale);
                    if smoothing_on {
                        g = g.sub(smoothing.mul(V::splat(w)));
                    }
                    let target = class_lanes.equal(V::splat(c as f32));
                    g = V::select(target, g.sub(target_term), g);
                    let offset = grad_base + c as isize * grad_class_stride;
                    if rows_out {
                        *row = g.to_array();
                    } else if grad_position_stride == 1 {
                        // SAFETY: these positions belong to this chunk alone and the gradient
                        // tensor does not overlap itself.
                        unsafe { grad.write_lanes(offset, len, g) }
                    } else {
                        for (i, &value) in g.to_array()[..len].iter().enumerate() {
                            let value = strided::from_single::<T>(value);
                            // SAFETY: as above, one element at a time.
                            unsafe { grad.put(offset + i as isize * grad_position_stride, value) }
                        }
                    }
                }
                if rows_out {
                    for i in 0..len {
                        let offset = grad_base + i as isize * grad_position_stride;
                        // SAFETY: as above; position i's row is this tile's alone.
                        let out = unsafe { grad.slice_mut(offset, num_classes) };
                        for (g, row) in out.iter_mut().zip(rows.iter()) {
                            *g = strided::from_single(row[i]);
                        }
                    }
                }
            }
            start += len;
        }
        sums.iter().sum()
    }

    /// The length of a chunk's first tile that puts the later ones on cache lines of the
    /// gradient (or, without one, of the logits), so that its stores can stream and no load
    /// splits a line; 0 when the first is already there or cannot be.
    fn tile_phase(&self, chunk: &Chunk) -> usize {
        let size = std::mem::size_of::<T>();
        let address = match &self.grad {
            Some((grad, _)) if self.geometry.inner_stride(GRAD) == 1 => {
                grad.address(chunk.offsets[GRAD])
            }
            _ if self.geometry.inner_stride(LOGITS) == 1 => {
                self.logits.address(chunk.offsets[LOGITS])
            }
            _ => return 0,
        };
        if address % size != 0 {
            return 0;
        }
        let per_line = CACHE_LINE / size;
        (per_line - address % CACHE_LINE / size) % per_line
    }

    /// Blocks of positions, all classes of a block through the buffer at once, laid out
    /// class-major so that every step vectorises along the positions. Serves NCHW (positions
    /// contiguous) and rows of few classes (gathered, then scattered back).
    #[inline(always)]
    fn block_chunk(
        &self,
        chunk: &Chunk,
        k: &Coefficients<T::Acc>,
        scratch: &mut Scratch<T>,
    ) -> f64 {
        let num_classes = k.weights.len();
        let block = (BLOCK_LOGITS / num_classes).min(chunk.len).max(1);
        let smoothing_on = self.label_smoothing != 0.0;
        let zero = T::Acc::ZERO;

        scratch.values.resize(num_classes * block, zero);
        scratch.per_position.resize(PER_POSITION_ARRAYS * block, zero);
        scratch.labels.resize(block, 0);
        scratch.out_row.resize(block, T::from_acc(zero));
        let values = &mut scratch.values[..];
        let labels = &mut scratch.labels[..];
        let out_row = &mut scratch.out_row[..];
        let mut arrays = scratch.per_position.chunks_exact_mut(block);
        let mut next = || arrays.next().expect("PER_POSITION_ARRAYS arrays");
        let (max, total, shift, target_shift) = (next(), next(), next(), next());
        let (target_weight, valid, loss, scale) = (next(), next(), next(), next());
        let (smoothing, target_term, upstream) = (next(), next(), next());
        let mut sum = 0.0f64;

        let mut start = 0;
        while start < chunk.len {
            let len = block.min(chunk.len - start);
            let next_len = block.min(chunk.len - start - len);

            self.load_labels(chunk, start, &mut labels[..len]);
            for p in 0..len {
                let label = labels[p];
                let ignored = label == self.ignore_index;
                valid[p] = if ignored { zero } else { T::Acc::ONE };
                target_weight[p] = if ignored { zero } else { k.weights[label as usize] };
            }
            self.load_block(chunk, start, len, next_len, block, values, &mut max[..len]);
            for p in 0..len {
                let label = labels[p];
                target_shift[p] = if label == self.ignore_index {
                    zero
                } else {
                    values[label as usize * block + p] - max[p]
                };
            }
            // Label smoothing needs sum_c w_c (x_c - max) before the exponentials replace x.
            if smoothing_on {
                shift[..len].fill(zero);
                for (c, &w) in k.weights.iter().enumerate() {
                    let row = &values[c * block..c * block + len];
                    for ((acc, &x), &m) in shift[..len].iter_mut().zip(row).zip(&max[..len]) {
                        *acc = *acc + w * (x - m);
                    }
                }
            }
            exp_block(values, block, len, num_classes, &max[..len], &mut total[..len]);

            // The loss of each position; an ignored one has loss 0 whatever its logits.
            let per_position = loss[..len].iter_mut().zip(&total[..len]).zip(&target_shift[..len]);
            let weighted = target_weight[..len].iter().zip(&valid[..len]).zip(&shift[..len]);
            for (((l, &t), &ty), ((&w_y, &v), &sh)) in per_position.zip(weighted) {
                let log_total = t.ln();
                let mut value = k.keep * w_y * (log_total - ty);
                if smoothing_on {
                    value = value + k.spread * (k.weight_total * log_total - sh);
                }
                *l = if v > zero { value } else { zero };
            }
            for &l in &loss[..len] {
                sum += l.to_f64();
            }
            if self.losses.is_some() {
                for (p, &l) in loss[..len].iter().enumerate() {
                    self.store_loss(chunk, start + p, l);
                }
            }

            if let Some((grad, grad_class_stride)) = &self.grad {
                match &self.upstream {
                    Upstream::Uniform(value) => upstream[..len].fill(T::Acc::from_f64(*value)),
                    Upstream::PerPosition(_) => {
                        for (p, u) in upstream[..len].iter_mut().enumerate() {
                            *u = self.upstream_at(chunk, start + p);
                        }
                    }
                }
                // Gradient factors; an ignored position gets 0 * softmax, which is NaN where
                // the softmax is, as in PyTorch.
                let factors = scale[..len].iter_mut().zip(smoothing[..len].iter_mut());
                let inputs = total[..len].iter().zip(&target_weight[..len]).zip(&valid[..len]);
                for (((s, sm), tt), (((&t, &w_y), &v), &u)) in
                    factors.zip(target_term[..len].iter_mut()).zip(inputs.zip(&upstream[..len]))
                {
                    let valid_position = v > zero;
                    let factor = if valid_position {
                        u * (k.keep * w_y + k.spread * k.weight_total)
                    } else {
                        zero
                    };
                    *s = factor / t;
                    *sm = if valid_position { u * k.spread } else { zero };
                    *tt = u * k.keep * w_y;
                }
                let shape = BlockShape { start, len, block };
                let factors = GradFactors { scale, smoothing, target_term, smoothing_on };
                self.store_block_grad(
                    chunk,
                    shape,
                    grad,
                    *grad_class_stride,
                    values,
                    labels,
                    factors,
                    k,
                    out_row,
                );
            }
            start += len;
        }
        sum
    }

    /// Loads `len` positions from `start` into `values`, class-major with row length `block`,
    /// converting to the computation's precision, and their maxima into `max`. NCHW planes are
    /// far apart, more streams than the hardware prefetcher follows, so the next block's
    /// `next_len` positions are requested explicitly.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn load_block(
        &self,
        chunk: &Chunk,
        start: usize,
        len: usize,
        next_len: usize,
        block: usize,
        values: &mut [T::Acc],
        max: &mut [T::Acc],
    ) {
        let num_classes = self.weights.len();
        let class_stride = self.logits_class_stride;
        let position_stride = self.geometry.inner_stride(LOGITS);
        let base = chunk.offsets[LOGITS] + start as isize * position_stride;
        max.fill(T::Acc::NEG_INFINITY);
        if position_stride == 1 {
            let next = base + len as isize;
            for c in 0..num_classes {
                let plane = c as isize * class_stride;
                for line in (0..next_len).step_by(CACHE_LINE / std::mem::size_of::<T>()) {
                    self.logits.prefetch(next + plane + line as isize);
                }
                let source = self.logits.slice(base + plane, len);
                let row = &mut values[c * block..c * block + len];
                for ((slot, x), m) in row.iter_mut().zip(source).zip(max.iter_mut()) {
                    *slot = x.to_acc();
                    *m = m.larger(*slot);
                }
            }
            return;
        }
        if class_stride == 1 {
            // Rows of few classes, transposed TRANSPOSE_TILE positions at a time so that the buffer is
            // written in runs of TRANSPOSE_TILE.
            let mut p = 0;
            while p + TRANSPOSE_TILE <= len {
                let rows: [&[T]; TRANSPOSE_TILE] = std::array::from_fn(|i| {
                    self.logits.slice(base + (p + i) as isize * position_stride, num_classes)
                });
                for (c, column) in values.chunks_exact_mut(block).take(num_classes).enumerate() {
                    let lane: [T::Acc; TRANSPOSE_TILE] =
                        std::array::from_fn(|i| rows[i][c].to_acc());
                    column[p..p + TRANSPOSE_TILE].copy_from_slice(&lane);
                }
                p += TRANSPOSE_TILE;
            }
            for p in p..len {
                let row = self.logits.slice(base + p as isize * position_stride, num_classes);
                for (column, x) in values.chunks_exact_mut(block).zip(row) {
                    column[p] = x.to_acc();
                }
            }
        } else {
            for c in 0..num_classes {
                for p in 0..len {
                    let offset = base + c as isize * class_stride + p as isize * position_stride;
                    values[c * block + p] = self.logits.get(offset).to_acc();
                }
            }
        }
        for c in 0..num_classes {
            for (m, &x) in max.iter_mut().zip(&values[c * block..c * block + len]) {
                *m = m.larger(x);
            }
        }
    }

    /// Writes the gradient of a block: `e * scale - smoothing * w` for every class and
    /// position, less `target_term` for each position's target class.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn store_block_grad(
        &self,
        chunk: &Chunk,
        shape: BlockShape,
        grad: &Sink<'a, T>,
        grad_class_stride: isize,
        values: &mut [T::Acc],
        labels: &[i64],
        factors: GradFactors<'_, T::Acc>,
        k: &Coefficients<T::Acc>,
        out_row: &mut [T],
    ) {
        let BlockShape { start, len, block } = shape;
        let GradFactors { scale, smoothing, target_term, smoothing_on } = factors;
        let grad_position_stride = self.geometry.inner_stride(GRAD);
        let grad_base = chunk.offsets[GRAD] + start as isize * grad_position_stride;
        if grad_position_stride == 1 {
            // Gradients in place of the exponentials, the target classes' corrected, then each
            // class's run written out whole.
            for (c, &w) in k.weights.iter().enumerate() {
                let row = &mut values[c * block..c * block + len];
                if smoothing_on {
                    let factors = scale[..len].iter().zip(&smoothing[..len]);
                    for (e, (&s, &m)) in row.iter_mut().zip(factors) {
                        *e = *e * s - m * w;
                    }
                } else {
                    for (e, &s) in row.iter_mut().zip(&scale[..len]) {
                        *e = *e * s;
                    }
                }
            }
            for p in 0..len {
                if labels[p] != self.ignore_index {
                    let slot = &mut values[labels[p] as usize * block + p];
                    *slot = *slot - target_term[p];
                }
            }
            for c in 0..self.weights.len() {
                let offset = grad_base + c as isize * grad_class_stride;
                let row = &values[c * block..c * block + len];
                // SAFETY: these positions belong to this chunk alone and the gradient tensor
                // does not overlap itself.
                unsafe { grad.write_row(offset, row, out_row, T::from_acc) }
            }
            return;
        }

        let value = |c: usize, p: usize| {
            let g = values[c * block + p] * scale[p];
            if smoothing_on {
                g - smoothing[p] * k.weights[c]
            } else {
                g
            }
        };
        if grad_class_stride == 1 {
            // Rows of few classes, transposed back TRANSPOSE_TILE positions at a time.
            let num_classes = self.weights.len();
            let mut p = 0;
            while p + TRANSPOSE_TILE <= len {
                // SAFETY: as above; the TRANSPOSE_TILE rows are distinct positions, so disjoint.
                let mut rows: [&mut [T]; TRANSPOSE_TILE] = std::array::from_fn(|i| unsafe {
                    grad.slice_mut(grad_base + (p + i) as isize * grad_position_stride, num_classes)
                });
                let tile = |values: &[T::Acc]| -> [T::Acc; TRANSPOSE_TILE] {
                    values[p..p + TRANSPOSE_TILE].try_into().expect("TRANSPOSE_TILE values")
                };
                let (scale_tile, smoothing_tile) = (tile(scale), tile(smoothing));
                for (c, (column, &w)) in values.chunks_exact(block).zip(&k.weights).enumerate() {
                    let column = tile(column);
                    let lane: [T::Acc; TRANSPOSE_TILE] = std::array::from_fn(|i| {
                        let g = column[i] * scale_tile[i];
                        if smoothing_on {
                            g - smoothing_tile[i] * w
                        } else {
                            g
                        }
                    });
                    for (row, g) in rows.iter_mut().zip(lane) {
                        row[c] = T::from_acc(g);
                    }
                }
                p += TRANSPOSE_TILE;
            }
            for p in p..len {
                let offset = grad_base + p as isize * grad_position_stride;
                // SAFETY: as above, one row at a time.
                let out = unsafe { grad.slice_mut(offset, num_classes) };
                for (c, g) in out.iter_mut().enumerate() {
                    *g = T::from_acc(value(c, p));
                }
            }
        } else {
            for c in 0..self.weights.len() {
                for p in 0..len {
                    let offset = grad_base
                        + c as isize * grad_class_stride
                        + p as isize * grad_position_stride;
                    // SAFETY: as above, one element at a time.
                    unsafe { grad.put(offset, T::from_acc(value(c, p))) }
                }
            }
        }
        for (p, &label) in labels[..len].iter().enumerate() {
            if label == self.ignore_index {
                continue;
            }
            let y = label as usize;
            let offset =
                grad_base + y as isize * grad_class_stride + p as isize * grad_position_stride;
            // SAFETY: as above.
            unsafe { grad.put(offset, T::from_acc(value(y, p) - target_term[p])) }
        }
    }
}

/// What the gradient of a block is made from, per position.
#[derive(Clone, Copy)]
struct GradFactors<'s, A> {
    scale: &'s [A],
    smoothing: &'s [A],
    target_term: &'s [A],
    smoothing_on: bool,
}

/// Where a block lies in its chunk: first position, number of positions, row length.
#[derive(Clone, Copy)]
struct BlockShape {
    start: usize,
    len: usize,
    block: usize,
}

/// Positions transposed at once between rows of few classes and the class-major buffer.
const TRANSPOSE_TILE: usize = 8;

/// Number of per-position arrays of the block kernel.
const PER_POSITION_ARRAYS: usize = 11;

/// Replaces each of the first `len` values of the `num_classes` rows of length `block` by
/// e^(value - max) of its position, and writes each position's sum of them (in class order)
/// into `total`. Positions go `REGISTER_TILE` at a time, so that their maxima and sums stay in
/// registers across all classes.
#[inline(always)]
fn exp_block<A: Real>(
    values: &mut [A],
    block: usize,
    len: usize,
    num_classes: usize,
    max: &[A],
    total: &mut [A],
) {
    let tiled = len / REGISTER_TILE * REGISTER_TILE;
    for start in (0..tiled).step_by(REGISTER_TILE) {
        let m: [A; REGISTER_TILE] = max[start..start + REGISTER_TILE].try_into().expect("a tile");
        let mut sums = [A::ZERO; REGISTER_TILE];
        for row in values.chunks_exact_mut(block).take(num_classes) {
            let tile: &mut [A; REGISTER_TILE] =
                (&mut row[start..start + REGISTER_TILE]).try_into().expect("a tile");
            for ((x, &m), sum) in tile.iter_mut().zip(&m).zip(sums.iter_mut()) {
                *x = (*x - m).exp();
                *sum = *sum + *x;
            }
        }
        total[start..start + REGISTER_TILE].copy_from_slice(&sums);
    }
    total[tiled..len].fill(A::ZERO);
    for row in values.chunks_exact_mut(block).take(num_classes) {
        let rest = row[tiled..len].iter_mut().zip(&max[tiled..len]).zip(&mut total[tiled..len]);
        for ((x, &m), sum) in rest {
            *x = (*x - m).exp();
            *sum = *sum + *x;
        }
    }
}

/// Positions whose running maxima and sums [`exp_block`] keeps in registers: one AVX-512
/// register of float32.
const REGISTER_TILE: usize = 16;

/// The largest element (NaN-ignoring), over `LANES` accumulators.
#[inline(always)]
fn lane_max<A: Real>(values: &[A]) -> A {
    let mut lanes = [A::NEG_INFINITY; LANES];
    let mut groups = values.chunks_exact(LANES);
    for group in &mut groups {
        for (lane, &x) in lanes.iter_mut().zip(group) {
            *lane = lane.larger(x);
        }
    }
    let tail = groups.remainder().iter().fold(A::NEG_INFINITY, |m, &x| m.larger(x));
    lanes.iter().fold(tail, |m, &x| m.larger(x))
}

/// Sum over the lanes in a fixed order: lane 0 first, then the tail.
#[inline(always)]
fn lane_total<A: Real>(lanes: &[A; LANES], tail: A) -> A {
    lanes.iter().fold(A::ZERO, |s, &x| s + x) + tail
}

/// sum_c w_c (x_c - max), over `LANES` accumulators.
#[inline(always)]
fn lane_dot_shifted<A: Real>(values: &[A], weights: &[A], max: A) -> A {
    let mut lanes = [A::ZERO; LANES];
    let mut groups = values.chunks_exact(LANES);
    let mut weight_groups = weights.chunks_exact(LANES);
    for (group, weight_group) in (&mut groups).zip(&mut weight_groups) {
        for ((lane, &x), &w) in lanes.iter_mut().zip(group).zip(weight_group) {
            *lane = *lane + w * (x - max);
        }
    }
    let tail = groups
        .remainder()
        .iter()
        .zip(weight_groups.remainder())
        .fold(A::ZERO, |s, (&x, &w)| s + w * (x - max));
    lane_total(&lanes, tail)
}

/// Replaces each x by e^(x - max) and returns their sum, over `LANES` accumulators.
#[inline(always)]
fn exp_shifted_in_place<A: Real>(values: &mut [A], max: A) -> A {
    for x in values.iter_mut() {
        *x = (*x - max).exp();
    }
    let mut lanes = [A::ZERO; LANES];
    let mut groups = values.chunks_exact(LANES);
    for group in &mut groups {
        for (lane, &x) in lanes.iter_mut().zip(group) {
            *lane = *lane + x;
        }
    }
    let tail = groups.remainder().iter().fold(A::ZERO, |s, &x| s + x);
    lane_total(&lanes, tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn, ShapeBuilder};

    /// Logits (N, C, H, W), NCHW or channels-last in memory, labels with some ignored.
    fn batch(shape: [usize; 4], channels_last: bool) -> (ArrayD<f32>, ArrayD<i64>) {
        let [n, c, h, w] = shape;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let values: Vec<f32> =
            (0..n * c * h * w).map(|_| (next() % 20_000) as f32 / 1000.0 - 10.0).collect();
        let nchw = ArrayD::from_shape_vec(IxDyn(&shape), values).unwrap();
        let logits = if channels_last {
            // The same logical values, stored NHWC.
            let nhwc = nchw.permuted_axes(IxDyn(&[0, 2, 3, 1])).as_standard_layout().into_owned();
            nhwc.permuted_axes(IxDyn(&[0, 3, 1, 2]))
        } else {
            nchw
        };
        let labels = (0..n * h * w)
            .map(|_| match next() % 23 {
                0 => -100,
                k => (k % c as u64) as i64,
            })
            .collect();
        (logits, ArrayD::from_shape_vec(IxDyn(&[n, h, w]), labels).unwrap())
    }

    /// Runs the pass with `isa`, writing the gradient into `grad_buffer` from element
    /// `grad_start` on, NCHW or channels-last; returns the loss sum's bits and the gradient's
    /// in logical (NCHW) order.
    fn pass_bits(
        logits: &ArrayD<f32>,
        target: &ArrayD<i64>,
        smoothing: f64,
        isa: Isa,
        grad_buffer: &mut [f32],
        (grad_start, grad_channels_last): (usize, bool),
    ) -> (u64, Vec<u32>) {
        let shape = logits.shape();
        let [_, classes, h, w] = shape.try_into().unwrap();
        let weights: Vec<f32> = (0..classes).map(|c| 0.5 + c as f32 / 7.0).collect();
        let len = logits.len();
        let memory = &mut grad_buffer[grad_start..grad_start + len];
        let mut grad = if grad_channels_last {
            let strides = IxDyn(&[h * w * classes, 1, w * classes, classes]);
            ndarray::ArrayViewMutD::from_shape(IxDyn(shape).strides(strides), memory).unwrap()
        } else {
            ndarray::ArrayViewMutD::from_shape(IxDyn(shape), memory).unwrap()
        };
        let (logits_source, logits_strides) = Source::new(&logits.view());
        let (target_source, target_strides) = Source::new(&target.view());
        let (grad_sink, grad_strides) = Sink::new(&mut grad);
        let positions = |s: &[isize]| vec![s[0], s[2], s[3]];
        let (logit_positions, grad_positions) =
            (positions(&logits_strides), positions(&grad_strides));
        let geometry = Geometry::new(
            target.shape(),
            [Some(&logit_positions), Some(&target_strides), Some(&grad_positions), None],
        );
        let pass = FusedPass {
            geometry,
            logits: logits_source,
            logits_class_stride: logits_strides[1],
            target: target_source,
            grad: Some((grad_sink, grad_strides[1])),
            losses: None,
            upstream: Upstream::Uniform(0.25),
            weights: &weights,
            label_smoothing: smoothing,
            ignore_index: -100,
        };
        let total = pass.run_with(isa).to_bits();
        (total, grad.iter().map(|g| g.to_bits()).collect())
    }

    #[test]
    fn every_build_layout_and_alignment_gives_the_same_bits() {
        // 37 positions per row: tiles and chunks that end short, planes off cache lines. With
        // 70 classes, channels-last rows are long enough for the row kernel, whose sums are
        // ordered differently: there only builds and alignments must agree.
        // Miri, far slower, takes one short row of each kind.
        let shapes: &[[usize; 4]] = if cfg!(miri) {
            &[[1, 19, 1, 37], [1, 70, 1, 3]]
        } else {
            &[[2, 19, 5, 37], [1, 3, 64, 96], [3, 70, 2, 9]]
        };
        let smoothings: &[f64] = if cfg!(miri) { &[0.1] } else { &[0.0, 0.1] };
        for &shape in shapes {
            let same_kernel = shape[1] <= ROW_KERNEL_MIN_CLASSES;
            for &smoothing in smoothings {
                let (nchw, target) = batch(shape, false);
                let (channels_last, _) = batch(shape, true);
                assert_eq!(channels_last, nchw, "the same logits in another layout");
                let mut buffer = vec![0.0f32; nchw.len() + 64];
                let baseline = |logits: &ArrayD<f32>, buffer: &mut [f32]| {
                    pass_bits(logits, &target, smoothing, Isa::Baseline, buffer, (0, false))
                };
                let planar = baseline(&nchw, &mut buffer);
                let transposed = baseline(&channels_last, &mut buffer);
                if same_kernel {
                    assert!(planar == transposed, "{shape:?}: layouts differ");
                }
                for isa in Isa::available() {
                    for (logits, expected) in [(&nchw, &planar), (&channels_last, &transposed)] {
                        for grad in [(0, false), (1, false), (5, false), (16, false), (3, true)] {
                            let got = pass_bits(logits, &target, smoothing, isa, &mut buffer, grad);
                            let context = format!(
                                "{shape:?} smoothing {smoothing} {isa:?} logits strides \
                                 {:?} gradient {grad:?}",
                                logits.strides()
                            );
                            assert_eq!(got.0, expected.0, "loss sum differs: {context}");
                            assert!(got.1 == expected.1, "gradient differs: {context}");
                        }
                    }
                }
            }
        }
    }
}
