//! The CPU core: one cheap pass over the labels (counts and the range check), then one fused
//! pass over the logits that yields the loss and writes the gradient, both on Rayon.
//!
//! The fused pass takes each position's row of C logits into a small buffer, so each logit is
//! read from memory once and exponentiated once. Rows whose classes are contiguous ((N, C),
//! channels-last) are taken one at a time; when positions are contiguous instead (NCHW), a
//! block of positions is taken for all classes at once, so the work vectorises along the
//! spatial axis. Sums are made per fixed chunk in double precision and added in chunk order.

use crate::dtype::{Label, Logit, Real};
use crate::layout::{Chunk, Geometry, GRAD, LOGITS, PER_POSITION, TARGET};
use crate::strided::{Sink, Source};
use rayon::prelude::*;

/// Positions per chunk of the label scan.
const SCAN_CHUNK: usize = 1 << 15;
/// Logits per chunk of the fused pass (a chunk holds `FUSED_CHUNK_LOGITS / C` positions).
const FUSED_CHUNK_LOGITS: usize = 1 << 16;
/// Logits per block of the spatial kernel: the block's buffer stays in the L1 cache.
const BLOCK_LOGITS: usize = 4096;

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

impl<'a, T: Logit, L: Label> FusedPass<'a, T, L> {
    /// Runs the pass; returns the sum of all positions' losses (ignored ones count 0).
    pub(crate) fn run(&self) -> f64 {
        let num_classes = self.weights.len();
        let coefficients = Coefficients {
            weights: self.weights.iter().map(|&w| T::Acc::from_f64(w as f64)).collect(),
            weight_total: T::Acc::from_f64(self.weights.iter().map(|&w| w as f64).sum()),
            keep: T::Acc::from_f64(1.0 - self.label_smoothing),
            spread: T::Acc::from_f64(self.label_smoothing / num_classes as f64),
        };
        let chunk_len = (FUSED_CHUNK_LOGITS / num_classes).max(1);
        let spatial = self.logits_class_stride != 1
            && self.geometry.inner_stride(LOGITS) == 1
            && num_classes * 8 <= BLOCK_LOGITS;

        let partials: Vec<f64> = (0..self.geometry.chunk_count(chunk_len))
            .into_par_iter()
            .map_init(Vec::new, |buffer, index| {
                let chunk = self.geometry.chunk(index, chunk_len);
                if spatial {
                    self.spatial_chunk(&chunk, &coefficients, buffer)
                } else {
                    self.row_chunk(&chunk, &coefficients, buffer)
                }
            })
            .collect();
        partials.iter().sum()
    }

    fn label_at(&self, chunk: &Chunk, p: usize) -> i64 {
        let stride = self.geometry.inner_stride(TARGET);
        self.target.get(chunk.offsets[TARGET] + p as isize * stride).to_i64()
    }

    fn upstream_at(&self, chunk: &Chunk, p: usize) -> T::Acc {
        match &self.upstream {
            Upstream::Uniform(value) => T::Acc::from_f64(*value),
            Upstream::PerPosition(source) => {
                let stride = self.geometry.inner_stride(PER_POSITION);
                source.get(chunk.offsets[PER_POSITION] + p as isize * stride).to_acc()
            }
        }
    }

    fn store_loss(&self, chunk: &Chunk, p: usize, loss: T::Acc) {
        if let Some(losses) = &self.losses {
            let stride = self.geometry.inner_stride(PER_POSITION);
            // SAFETY: position p of this chunk belongs to this chunk alone, and the losses
            // tensor's positions do not overlap.
            unsafe {
                losses.put(chunk.offsets[PER_POSITION] + p as isize * stride, T::from_acc(loss))
            }
        }
    }

    /// Positions one at a time, each row of C logits through the buffer.
    fn row_chunk(&self, chunk: &Chunk, k: &Coefficients<T::Acc>, row: &mut Vec<T::Acc>) -> f64 {
        let num_classes = k.weights.len();
        let class_stride = self.logits_class_stride;
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

            let max = row.iter().fold(T::Acc::NEG_INFINITY, |m, &x| m.max(x));
            let shifted_target = if ignored { T::Acc::ZERO } else { row[label as usize] - max };
            let mut weighted_shift = T::Acc::ZERO;
            if self.label_smoothing != 0.0 && !ignored {
                for (x, &w) in row.iter().zip(&k.weights) {
                    weighted_shift = weighted_shift + w * (*x - max);
                }
            }
            let mut total = T::Acc::ZERO;
            for x in row.iter_mut() {
                *x = (*x - max).exp();
                total = total + *x;
            }

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
                let grad_offset =
                    chunk.offsets[GRAD] + p as isize * self.geometry.inner_stride(GRAD);
                for (c, (&e, &w)) in row.iter().zip(&k.weights).enumerate() {
                    let mut g = e * scale - smoothing * w;
                    if c as i64 == label {
                        g = g - target_term;
                    }
                    let offset = grad_offset + c as isize * grad_class_stride;
                    // SAFETY: this row belongs to this chunk alone and the gradient tensor
                    // does not overlap itself.
                    unsafe { grad.put(offset, T::from_acc(g)) }
                }
            }
        }
        sum
    }

    /// Blocks of contiguous positions, all classes of a block through the buffer at once.
    fn spatial_chunk(
        &self,
        chunk: &Chunk,
        k: &Coefficients<T::Acc>,
        buffer: &mut Vec<T::Acc>,
    ) -> f64 {
        let num_classes = k.weights.len();
        let block = (BLOCK_LOGITS / num_classes).min(chunk.len);
        let class_stride = self.logits_class_stride;
        buffer.resize(num_classes * block + 4 * block, T::Acc::ZERO);
        let (values, scratch) = buffer.split_at_mut(num_classes * block);
        let (max, rest) = scratch.split_at_mut(block);
        let (total, rest) = rest.split_at_mut(block);
        let (scale, rest) = rest.split_at_mut(block);
        let (smoothing, _) = rest.split_at_mut(block);
        let mut labels = vec![0i64; block];
        let mut sum = 0.0f64;

        let mut start = 0;
        while start < chunk.len {
            let len = block.min(chunk.len - start);
            let base = chunk.offsets[LOGITS] + start as isize;
            for (p, label) in labels[..len].iter_mut().enumerate() {
                *label = self.label_at(chunk, start + p);
            }

            max[..len].fill(T::Acc::NEG_INFINITY);
            for c in 0..num_classes {
                let row = &mut values[c * block..c * block + len];
                let source = self.logits.slice(base + c as isize * class_stride, len);
                for ((slot, x), m) in row.iter_mut().zip(source).zip(max[..len].iter_mut()) {
                    *slot = x.to_acc();
                    *m = m.max(*slot);
                }
            }

            // Label smoothing needs sum_c w_c (x_c - max) before the exponentials replace x.
            scale[..len].fill(T::Acc::ZERO);
            if self.label_smoothing != 0.0 {
                for (c, &w) in k.weights.iter().enumerate() {
                    let row = &values[c * block..c * block + len];
                    for ((acc, &x), &m) in scale[..len].iter_mut().zip(row).zip(&max[..len]) {
                        *acc = *acc + w * (x - m);
                    }
                }
            }

            total[..len].fill(T::Acc::ZERO);
            for c in 0..num_classes {
                let row = &mut values[c * block..c * block + len];
                for ((x, &m), t) in row.iter_mut().zip(&max[..len]).zip(total[..len].iter_mut()) {
                    *x = (*x - m).exp();
                    *t = *t + *x;
                }
            }

            for p in 0..len {
                let label = labels[p];
                if label == self.ignore_index {
                    // Gradient 0 * softmax: NaN where the softmax is, as in PyTorch.
                    self.store_loss(chunk, start + p, T::Acc::ZERO);
                    scale[p] = T::Acc::ZERO / total[p];
                    smoothing[p] = T::Acc::ZERO;
                    continue;
                }
                let y = label as usize;
                let shifted_target =
                    self.logits.get(base + y as isize * class_stride + p as isize).to_acc()
                        - max[p];
                let log_total = total[p].ln();
                let w_y = k.weights[y];
                let loss = k.keep * w_y * (log_total - shifted_target)
                    + k.spread * (k.weight_total * log_total - scale[p]);
                self.store_loss(chunk, start + p, loss);
                sum += loss.to_f64();

                let coefficient = self.upstream_at(chunk, start + p);
                scale[p] = coefficient * (k.keep * w_y + k.spread * k.weight_total) / total[p];
                smoothing[p] = coefficient * k.spread;
            }

            if let Some((grad, grad_class_stride)) = &self.grad {
                let position_stride = self.geometry.inner_stride(GRAD);
                let grad_base = chunk.offsets[GRAD] + start as isize * position_stride;
                for (c, &w) in k.weights.iter().enumerate() {
                    let row = &values[c * block..c * block + len];
                    let offset = grad_base + c as isize * grad_class_stride;
                    let value = |p: usize| row[p] * scale[p] - smoothing[p] * w;
                    if position_stride == 1 {
                        // SAFETY: these positions belong to this chunk alone, the gradient
                        // tensor does not overlap itself, and the slice dies in this block.
                        let out = unsafe { grad.slice_mut(offset, len) };
                        for (p, g) in out.iter_mut().enumerate() {
                            *g = T::from_acc(value(p));
                        }
                    } else {
                        for p in 0..len {
                            // SAFETY: as above, one element at a time.
                            unsafe {
                                grad.put(
                                    offset + p as isize * position_stride,
                                    T::from_acc(value(p)),
                                )
                            }
                        }
                    }
                }
                for (p, &label) in labels[..len].iter().enumerate() {
                    if label == self.ignore_index {
                        continue;
                    }
                    let y = label as usize;
                    let coefficient = self.upstream_at(chunk, start + p);
                    let g = values[y * block + p] * scale[p]
                        - smoothing[p] * k.weights[y]
                        - coefficient * k.keep * k.weights[y];
                    let offset =
                        grad_base + y as isize * grad_class_stride + p as isize * position_stride;
                    // SAFETY: as above.
                    unsafe { grad.put(offset, T::from_acc(g)) }
                }
            }
            start += len;
        }
        sum
    }
}
