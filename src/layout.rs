//! The geometry of one pass over a batch: the positions (every element of the target) as a
//! few merged axes, each operand's strides along them, and the fixed chunks the pass is cut
//! into.
//!
//! Chunks depend only on the shapes and strides, never on the number of threads, and partial
//! results are combined in chunk order, so a pass gives the same bits on any thread count.

/// Operands of a pass, by slot; an absent operand has stride 0 everywhere.
pub(crate) const LOGITS: usize = 0;
pub(crate) const TARGET: usize = 1;
pub(crate) const GRAD: usize = 2;
/// The per-position tensor: the loss for reduction "none", or the upstream gradient.
pub(crate) const PER_POSITION: usize = 3;
pub(crate) const OPERANDS: usize = 4;

/// Positions as merged axes, outermost first, with each operand's strides along them.
#[derive(Debug, Clone)]
pub(crate) struct Geometry {
    dims: Vec<usize>,
    strides: [Vec<isize>; OPERANDS],
}

/// A run of consecutive positions along the innermost merged axis.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Chunk {
    /// Index of the first position in C order of the target's shape.
    pub first_position: usize,
    /// Each operand's element offset at the first position.
    pub offsets: [isize; OPERANDS],
    /// Number of positions.
    pub len: usize,
}

impl Geometry {
    /// The geometry of positions of `shape`, where operand `k` has strides `strides[k]` (one
    /// per axis of `shape`) or is absent.
    pub(crate) fn new(shape: &[usize], strides: [Option<&[isize]>; OPERANDS]) -> Geometry {
        let stride_of = |k: usize, axis: usize| strides[k].map_or(0, |s| s[axis]);
        if shape.contains(&0) {
            return Geometry { dims: vec![0], strides: std::array::from_fn(|_| vec![0]) };
        }

        let mut dims: Vec<usize> = Vec::new();
        let mut merged: [Vec<isize>; OPERANDS] = Default::default();
        for axis in (0..shape.len()).filter(|&axis| shape[axis] != 1) {
            // The previous (outer) axis absorbs this one when, for every operand, stepping it
            // once is the same as stepping this axis through its whole length.
            let continues_outer = !dims.is_empty()
                && (0..OPERANDS).all(|k| {
                    merged[k].last().copied() == Some(stride_of(k, axis) * shape[axis] as isize)
                });
            if continues_outer {
                *dims.last_mut().expect("checked non-empty") *= shape[axis];
                for (k, operand) in merged.iter_mut().enumerate() {
                    *operand.last_mut().expect("as many strides as dims") = stride_of(k, axis);
                }
            } else {
                dims.push(shape[axis]);
                for (k, operand) in merged.iter_mut().enumerate() {
                    operand.push(stride_of(k, axis));
                }
            }
        }
        Geometry { dims, strides: merged }
    }

    /// The merged axes, outermost first, and each operand's strides along them.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn axes(&self) -> (&[usize], &[Vec<isize>; OPERANDS]) {
        (&self.dims, &self.strides)
    }

    /// Number of positions.
    pub(crate) fn positions(&self) -> usize {
        self.dims.iter().product()
    }

    /// Length of the innermost merged axis (1 when there is a single position).
    pub(crate) fn inner_len(&self) -> usize {
        self.dims.last().copied().unwrap_or(1)
    }

    /// Operand `k`'s stride along the innermost merged axis.
    pub(crate) fn inner_stride(&self, k: usize) -> isize {
        self.strides[k].last().copied().unwrap_or(0)
    }

    /// Number of chunks of at most `chunk_len` positions.
    pub(crate) fn chunk_count(&self, chunk_len: usize) -> usize {
        let inner = self.inner_len();
        if inner == 0 || self.positions() == 0 {
            return 0;
        }
        (self.positions() / inner) * inner.div_ceil(chunk_len)
    }

    /// Chunk `index` of the cut into chunks of at most `chunk_len` positions.
    pub(crate) fn chunk(&self, index: usize, chunk_len: usize) -> Chunk {
        let inner = self.inner_len();
        let per_line = inner.div_ceil(chunk_len);
        let (line, start) = (index / per_line, (index % per_line) * chunk_len);

        let mut offsets = [0isize; OPERANDS];
        let mut rest = line;
        for axis in (0..self.dims.len().saturating_sub(1)).rev() {
            let coordinate = (rest % self.dims[axis]) as isize;
            rest /= self.dims[axis];
            for (k, offset) in offsets.iter_mut().enumerate() {
                *offset += coordinate * self.strides[k][axis];
            }
        }
        for (k, offset) in offsets.iter_mut().enumerate() {
            *offset += start as isize * self.inner_stride(k);
        }

        Chunk { first_position: line * inner + start, offsets, len: chunk_len.min(inner - start) }
    }
}

/// The multi-index of position `linear` (C order) in `shape`.
pub(crate) fn unravel(mut linear: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for axis in (0..shape.len()).rev() {
        index[axis] = linear % shape[axis];
        linear /= shape[axis];
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_nchw_merges_spatial_axes() {
        // Logits (2, 3, 4, 5) seen with the class axis moved last: positions (2, 4, 5) with
        // strides (60, 5, 1); the target (2, 4, 5) is contiguous, strides (20, 5, 1).
        let g = Geometry::new(&[2, 4, 5], [Some(&[60, 5, 1]), Some(&[20, 5, 1]), None, None]);
        assert_eq!(g.dims, vec![2, 20]);
        assert_eq!(g.inner_stride(LOGITS), 1);
        assert_eq!(g.chunk_count(8), 2 * 3);
        let c = g.chunk(4, 8);
        // Line 1, start 8: logits 60 + 8, target 20 + 8, 8 positions... of the last 4 left.
        assert_eq!((c.first_position, c.offsets[LOGITS], c.offsets[TARGET]), (28, 68, 28));
        assert_eq!(g.chunk(5, 8).len, 4);
    }

    #[test]
    fn rows_merge_into_one_axis() {
        // (N, C) = (6, 3) logits: positions (6) with stride 3.
        let g = Geometry::new(&[6], [Some(&[3]), Some(&[1]), None, None]);
        assert_eq!(g.dims, vec![6]);
        // Channels-last (2, 4, 5) positions with strides (60, 15, 3): all merge.
        let g = Geometry::new(&[2, 4, 5], [Some(&[60, 15, 3]), Some(&[20, 5, 1]), None, None]);
        assert_eq!(g.dims, vec![40]);
    }

    #[test]
    fn unit_and_empty_axes() {
        let g = Geometry::new(&[], [Some(&[]), Some(&[]), None, None]);
        assert_eq!((g.positions(), g.chunk_count(4)), (1, 1));
        let g = Geometry::new(&[3, 0], [Some(&[1, 1]), Some(&[1, 1]), None, None]);
        assert_eq!((g.positions(), g.chunk_count(4)), (0, 0));
    }

    #[test]
    fn unravel_is_c_order() {
        assert_eq!(unravel(23, &[2, 3, 4]), vec![1, 2, 3]);
        assert_eq!(unravel(0, &[]), Vec::<usize>::new());
    }
}
