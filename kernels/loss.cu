// The fused loss and gradient: each position's row of C logits is read, its softmax taken,
// and its loss and gradient written in the same pass, following src/cpu.rs term for term.
//
// Three shapes of work, chosen by the host from the layout:
// - loss_pixels_*: one thread per position. For NCHW the positions are contiguous, so a warp
//   reads 32 neighbouring pixels of one class at a time (coalesced). Rows of up to
//   CBCE_PIXEL_CACHE classes are held in registers; longer ones are read again per step.
// - loss_warp_rows_*: one warp per row, for rows of contiguous classes up to 1024.
// - loss_block_rows_*: one block per row, for large C (vocabularies): the row is kept in
//   dynamic shared memory when the device has room for it (the host decides), and read from
//   device memory again for each step otherwise.
// Each tile's losses are summed in double precision into partials[tile] in a fixed order, and
// loss_reduce_* adds the partials in a fixed order: no floating-point atomics, and the same
// bits on every run. Half-precision logits compute in float32; indexing is 64-bit throughout.
#include "common.cuh"

#define CBCE_PIXEL_THREADS 256
#define CBCE_PIXEL_CACHE 32
#define CBCE_WARP_ROWS_THREADS 256
#define CBCE_BLOCK_ROWS_THREADS 1024
#define CBCE_REDUCE_THREADS 1024

struct LossArgs {
    Positions positions;
    Tiling tiling;
    u64 logits; // addresses of element 0; 0 for an absent operand
    u64 target;
    u64 grad;
    u64 per_position; // losses (write_losses) or the upstream gradient (per_position_upstream)
    u64 weights;      // float[num_classes]
    u64 scalars;      // Scalars*
    u64 partials;     // double[tiles], or 0 when the losses need no sum
    i64 logits_class_stride;
    i64 grad_class_stride;
    i64 num_classes;
    i64 ignore_index;
    double keep;   // 1 - label_smoothing
    double spread; // label_smoothing / C
    i64 smoothing; // 1 when label_smoothing is not 0
    i64 write_losses;
    i64 per_position_upstream;
    i64 row_cache; // 1 when a block-per-row launch has C values of dynamic shared memory
};
static_assert(sizeof(LossArgs) == 1448, "LossArgs is mirrored in src/cuda/kernels.rs");

// What a row's softmax gives the loss and the gradient.
template <typename A> struct Row {
    A max;
    A total;          // sum of exp(x - max)
    A shifted_target; // x[label] - max
    A weighted_shift; // sum of w[c] * (x[c] - max), with label smoothing
};

// The constants of one row's gradient: g[c] = e[c] * scale - smoothing * w[c], minus
// target_term at the label.
template <typename A> struct Gradient {
    A scale;
    A smoothing;
    A target_term;
};

// The loss of a row that is not ignored, and its gradient's constants; an ignored row has loss
// 0 and gradient 0 * softmax, which is NaN where the softmax is, as PyTorch's gradient is.
template <typename T, typename L>
__device__ __forceinline__ typename AccOf<T>::type
row_loss(const LossArgs &a, const Row<typename AccOf<T>::type> &row, i64 label, bool ignored,
         typename AccOf<T>::type upstream, Gradient<typename AccOf<T>::type> &g) {
    typedef typename AccOf<T>::type A;
    if (ignored) {
        g.scale = (A)0 / row.total;
        g.smoothing = 0;
        g.target_term = 0;
        return 0;
    }
    const float *weights = reinterpret_cast<const float *>(a.weights);
    const Scalars *scalars = reinterpret_cast<const Scalars *>(a.scalars);
    const A keep = (A)a.keep, spread = (A)a.spread, weight_total = (A)scalars->weight_total;
    const A log_total = log_acc(row.total);
    const A w_y = (A)weights[label];
    A loss = keep * w_y * (log_total - row.shifted_target);
    if (a.smoothing != 0)
        loss += spread * (weight_total * log_total - row.weighted_shift);
    g.scale = upstream * (keep * w_y + spread * weight_total) / row.total;
    g.smoothing = upstream * spread;
    g.target_term = upstream * keep * w_y;
    return loss;
}

template <typename T>
__device__ __forceinline__ typename AccOf<T>::type
upstream_at(const LossArgs &a, const i64 (&offsets)[CBCE_OPERANDS]) {
    typedef typename AccOf<T>::type A;
    if (a.per_position_upstream != 0)
        return to_acc(reinterpret_cast<const T *>(a.per_position)[offsets[CBCE_PER_POSITION]]);
    return (A) reinterpret_cast<const Scalars *>(a.scalars)->upstream;
}

template <typename T>
__device__ __forceinline__ void store_loss(const LossArgs &a, const i64 (&offsets)[CBCE_OPERANDS],
                                           typename AccOf<T>::type loss) {
    if (a.write_losses != 0)
        reinterpret_cast<T *>(a.per_position)[offsets[CBCE_PER_POSITION]] = from_acc<T>(loss);
}

// One position by one thread; returns its loss (NaN for a bad label).
template <typename T, typename L>
__device__ double pixel(const LossArgs &a, const i64 (&offsets)[CBCE_OPERANDS]) {
    typedef typename AccOf<T>::type A;
    const i64 num_classes = a.num_classes;
    const i64 label = load_label<L>(a.target, offsets[CBCE_TARGET]);
    const bool ignored = label == a.ignore_index;
    const bool bad = !ignored && (u64)label >= (u64)num_classes;
    const bool with_grad = a.grad != 0;
    if (ignored && !with_grad) {
        store_loss<T>(a, offsets, 0);
        return 0.0;
    }
    const T *x = reinterpret_cast<const T *>(a.logits) + offsets[CBCE_LOGITS];
    T *grad = with_grad ? reinterpret_cast<T *>(a.grad) + offsets[CBCE_GRAD] : nullptr;
    const i64 cs = a.logits_class_stride, gs = a.grad_class_stride;
    const float *weights = reinterpret_cast<const float *>(a.weights);
    if (bad) {
        store_loss<T>(a, offsets, nan_acc<A>());
        if (with_grad) {
            for (i64 c = 0; c < num_classes; ++c)
                grad[c * gs] = from_acc<T>(nan_acc<A>());
        }
        return (double)nan_acc<A>();
    }

    Row<A> row;
    row.max = -INFINITY;
    row.total = 0;
    row.shifted_target = 0;
    row.weighted_shift = 0;
    Gradient<A> g;
    A loss;
    if (num_classes <= CBCE_PIXEL_CACHE) {
        A v[CBCE_PIXEL_CACHE];
        A x_y = 0;
#pragma unroll
        for (int c = 0; c < CBCE_PIXEL_CACHE; ++c) {
            if (c < num_classes) {
                v[c] = to_acc(x[c * cs]);
                row.max = max_acc(row.max, v[c]);
                if (c == label)
                    x_y = v[c];
            }
        }
        if (!ignored)
            row.shifted_target = x_y - row.max;
        if (a.smoothing != 0 && !ignored) {
#pragma unroll
            for (int c = 0; c < CBCE_PIXEL_CACHE; ++c) {
                if (c < num_classes)
                    row.weighted_shift += (A)weights[c] * (v[c] - row.max);
            }
        }
#pragma unroll
        for (int c = 0; c < CBCE_PIXEL_CACHE; ++c) {
            if (c < num_classes) {
                v[c] = exp_acc(v[c] - row.max);
                row.total += v[c];
            }
        }
        const A upstream = ignored ? (A)0 : upstream_at<T>(a, offsets);
        loss = row_loss<T, L>(a, row, label, ignored, upstream, g);
        if (with_grad) {
#pragma unroll
            for (int c = 0; c < CBCE_PIXEL_CACHE; ++c) {
                if (c < num_classes) {
                    A value = v[c] * g.scale;
                    if (a.smoothing != 0)
                        value -= g.smoothing * (A)weights[c];
                    if (c == label)
                        value -= g.target_term;
                    grad[c * gs] = from_acc<T>(value);
                }
            }
        }
    } else {
        for (i64 c = 0; c < num_classes; ++c)
            row.max = max_acc(row.max, to_acc(x[c * cs]));
        for (i64 c = 0; c < num_classes; ++c) {
            const A shifted = to_acc(x[c * cs]) - row.max;
            if (a.smoothing != 0 && !ignored)
                row.weighted_shift += (A)weights[c] * shifted;
            if (c == label)
                row.shifted_target = shifted;
            row.total += exp_acc(shifted);
        }
        const A upstream = ignored ? (A)0 : upstream_at<T>(a, offsets);
        loss = row_loss<T, L>(a, row, label, ignored, upstream, g);
        if (with_grad) {
            for (i64 c = 0; c < num_classes; ++c) {
                A value = exp_acc(to_acc(x[c * cs]) - row.max) * g.scale;
                if (a.smoothing != 0)
                    value -= g.smoothing * (A)weights[c];
                if (c == label)
                    value -= g.target_term;
                grad[c * gs] = from_acc<T>(value);
            }
        }
    }
    store_loss<T>(a, offsets, loss);
    return (double)loss;
}

template <typename T, typename L> __device__ void loss_pixels(const LossArgs &a) {
    __shared__ double scratch[32];
    const Positions &p = a.positions;
    const i64 inner = p.dims[p.axes - 1];
    for (i64 tile = blockIdx.x; tile < a.tiling.tiles; tile += gridDim.x) {
        const u64 line = (u64)(tile / a.tiling.tiles_per_line);
        const i64 i = (tile % a.tiling.tiles_per_line) * a.tiling.tile_len + threadIdx.x;
        double loss = 0.0;
        if (i < inner) {
            i64 offsets[CBCE_OPERANDS];
            line_offsets(p, line, offsets);
#pragma unroll
            for (int k = 0; k < CBCE_OPERANDS; ++k)
                offsets[k] += i * p.strides[k][p.axes - 1];
            loss = pixel<T, L>(a, offsets);
        }
        if (a.partials != 0) {
            const double sum = block_sum(loss, scratch);
            if (threadIdx.x == 0)
                reinterpret_cast<double *>(a.partials)[tile] = sum;
        }
    }
}

// One warp per row; a lane holds classes lane, lane + 32, ... (up to CBCE_WARP_VALUES of them)
// in registers. Every lane takes part in every reduction, also those whose row is past the
// end, so the warp's shuffles always see 32 lanes.
#define CBCE_WARP_VALUES 32

template <typename T, typename L> __device__ void loss_warp_rows(const LossArgs &a) {
    typedef typename AccOf<T>::type A;
    __shared__ double row_losses[CBCE_WARP_ROWS_THREADS / 32];
    const Positions &p = a.positions;
    const i64 inner = p.dims[p.axes - 1];
    const int rows_per_block = blockDim.x / 32;
    const int group = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const i64 num_classes = a.num_classes;
    const i64 cs = a.logits_class_stride, gs = a.grad_class_stride;
    const float *weights = reinterpret_cast<const float *>(a.weights);
    const bool with_grad = a.grad != 0;

    for (i64 tile = blockIdx.x; tile < a.tiling.tiles; tile += gridDim.x) {
        const u64 line = (u64)(tile / a.tiling.tiles_per_line);
        const i64 i = (tile % a.tiling.tiles_per_line) * a.tiling.tile_len + group;
        const bool present = i < inner;
        i64 offsets[CBCE_OPERANDS];
        line_offsets(p, line, offsets);
#pragma unroll
        for (int k = 0; k < CBCE_OPERANDS; ++k)
            offsets[k] += (present ? i : 0) * p.strides[k][p.axes - 1];

        const i64 label = present ? load_label<L>(a.target, offsets[CBCE_TARGET]) : a.ignore_index;
        const bool ignored = label == a.ignore_index;
        const bool bad = !ignored && (u64)label >= (u64)num_classes;
        // Rows that need no reading: past the end, ignored without a gradient, or bad.
        const bool skip = !present || (ignored && !with_grad) || bad;
        const T *x = reinterpret_cast<const T *>(a.logits) + offsets[CBCE_LOGITS];

        A v[CBCE_WARP_VALUES];
        Row<A> row;
        row.max = -INFINITY;
#pragma unroll
        for (int j = 0; j < CBCE_WARP_VALUES; ++j) {
            const i64 c = lane + (i64)j * 32;
            v[j] = (!skip && c < num_classes) ? to_acc(x[c * cs]) : (A)-INFINITY;
            row.max = max_acc(row.max, v[j]);
        }
        row.max = warp_max(row.max);

        A total = 0, weighted_shift = 0, x_y = 0;
#pragma unroll
        for (int j = 0; j < CBCE_WARP_VALUES; ++j) {
            const i64 c = lane + (i64)j * 32;
            if (skip || c >= num_classes)
                continue;
            const A shifted = v[j] - row.max;
            if (a.smoothing != 0 && !ignored)
                weighted_shift += (A)weights[c] * shifted;
            if (c == label)
                x_y = shifted;
            v[j] = exp_acc(shifted);
            total += v[j];
        }
        row.total = warp_sum(total);
        row.shifted_target = warp_sum(x_y);
        row.weighted_shift = a.smoothing != 0 ? warp_sum(weighted_shift) : (A)0;

        double loss = 0.0;
        if (present) {
            Gradient<A> g;
            A row_value = 0;
            if (bad) {
                row_value = nan_acc<A>();
                g.scale = g.smoothing = g.target_term = nan_acc<A>();
            } else if (!skip) {
                const A upstream = ignored ? (A)0 : upstream_at<T>(a, offsets);
                row_value = row_loss<T, L>(a, row, label, ignored, upstream, g);
            }
            loss = (double)row_value;
            if (lane == 0)
                store_loss<T>(a, offsets, row_value);
            if (with_grad && (bad || !skip)) {
                T *grad = reinterpret_cast<T *>(a.grad) + offsets[CBCE_GRAD];
#pragma unroll
                for (int j = 0; j < CBCE_WARP_VALUES; ++j) {
                    const i64 c = lane + (i64)j * 32;
                    if (c >= num_classes)
                        continue;
                    A value = v[j] * g.scale;
                    if (a.smoothing != 0)
                        value -= g.smoothing * (A)weights[c];
                    if (c == label)
                        value -= g.target_term;
                    grad[c * gs] = from_acc<T>(value);
                }
            }
        }

        if (a.partials != 0) {
            __syncthreads();
            if (lane == 0)
                row_losses[group] = loss;
            __syncthreads();
            if (threadIdx.x == 0) {
                double sum = 0.0;
                for (int r = 0; r < rows_per_block; ++r)
                    sum += row_losses[r];
                reinterpret_cast<double *>(a.partials)[tile] = sum;
            }
        }
    }
}

// One block per row. With row_cache, each thread keeps the values of its classes (tid,
// tid + 1024, ...) in dynamic shared memory between the steps; only that thread reads them
// back, so the cache needs no barrier. Without it, the row is read again for each step.
template <typename T, typename L> __device__ void loss_block_rows(const LossArgs &a) {
    typedef typename AccOf<T>::type A;
    extern __shared__ __align__(16) unsigned char row_cache_bytes[];
    A *cache = reinterpret_cast<A *>(row_cache_bytes);
    __shared__ A scratch[32];
    const Positions &p = a.positions;
    const i64 num_classes = a.num_classes;
    const i64 cs = a.logits_class_stride, gs = a.grad_class_stride;
    const float *weights = reinterpret_cast<const float *>(a.weights);
    const bool with_grad = a.grad != 0;
    const bool cached = a.row_cache != 0;
    const i64 step = blockDim.x;

    for (i64 tile = blockIdx.x; tile < a.tiling.tiles; tile += gridDim.x) {
        const u64 line = (u64)(tile / a.tiling.tiles_per_line);
        const i64 i = tile % a.tiling.tiles_per_line;
        i64 offsets[CBCE_OPERANDS];
        line_offsets(p, line, offsets);
#pragma unroll
        for (int k = 0; k < CBCE_OPERANDS; ++k)
            offsets[k] += i * p.strides[k][p.axes - 1];

        const i64 label = load_label<L>(a.target, offsets[CBCE_TARGET]);
        const bool ignored = label == a.ignore_index;
        const bool bad = !ignored && (u64)label >= (u64)num_classes;
        const bool skip = (ignored && !with_grad) || bad;
        const T *x = reinterpret_cast<const T *>(a.logits) + offsets[CBCE_LOGITS];

        Row<A> row;
        row.max = -INFINITY;
        if (!skip) {
#pragma unroll 8
            for (i64 c = threadIdx.x; c < num_classes; c += step) {
                const A value = to_acc(x[c * cs]);
                if (cached)
                    cache[c] = value;
                row.max = max_acc(row.max, value);
            }
        }
        row.max = block_max(row.max, scratch, (A)-INFINITY);

        A total = 0, weighted_shift = 0, x_y = 0;
        if (!skip) {
#pragma unroll 8
            for (i64 c = threadIdx.x; c < num_classes; c += step) {
                const A shifted = (cached ? cache[c] : to_acc(x[c * cs])) - row.max;
                if (a.smoothing != 0 && !ignored)
                    weighted_shift += (A)weights[c] * shifted;
                if (c == label)
                    x_y = shifted;
                const A e = exp_acc(shifted);
                if (cached)
                    cache[c] = e;
                total += e;
            }
        }
        row.total = block_sum(total, scratch);
        row.shifted_target = block_sum(x_y, scratch);
        row.weighted_shift = a.smoothing != 0 ? block_sum(weighted_shift, scratch) : (A)0;

        Gradient<A> g;
        A row_value = 0;
        if (bad) {
            row_value = nan_acc<A>();
            g.scale = g.smoothing = g.target_term = nan_acc<A>();
        } else if (!skip) {
            const A upstream = ignored ? (A)0 : upstream_at<T>(a, offsets);
            row_value = row_loss<T, L>(a, row, label, ignored, upstream, g);
        }
        if (threadIdx.x == 0) {
            store_loss<T>(a, offsets, row_value);
            if (a.partials != 0)
                reinterpret_cast<double *>(a.partials)[tile] = (double)row_value;
        }
        if (with_grad && (bad || !skip)) {
            T *grad = reinterpret_cast<T *>(a.grad) + offsets[CBCE_GRAD];
#pragma unroll 8
            for (i64 c = threadIdx.x; c < num_classes; c += step) {
                const A e =
                    bad ? nan_acc<A>() : (cached ? cache[c] : exp_acc(to_acc(x[c * cs]) - row.max));
                A value = e * g.scale;
                if (a.smoothing != 0)
                    value -= g.smoothing * (A)weights[c];
                if (c == label)
                    value -= g.target_term;
                grad[c * gs] = from_acc<T>(value);
            }
        }
    }
}

struct ReduceArgs {
    u64 partials; // double[count]
    i64 count;
    u64 scalars; // Scalars*: weight_sum, for "mean"
    u64 loss;    // address of the loss output's element 0
    i64 mean;    // 1 to divide the sum by weight_sum
};
static_assert(sizeof(ReduceArgs) == 40, "ReduceArgs is mirrored in src/cuda/kernels.rs");

// The reduced loss: the partials added in a fixed order, written in the logits' type.
template <typename T> __device__ void loss_reduce(const ReduceArgs &a) {
    typedef typename AccOf<T>::type A;
    __shared__ double scratch[32];
    const double *partials = reinterpret_cast<const double *>(a.partials);
    double sum = 0.0;
    for (i64 k = threadIdx.x; k < a.count; k += blockDim.x)
        sum += partials[k];
    sum = block_sum(sum, scratch);
    if (threadIdx.x != 0)
        return;
    if (a.mean != 0)
        sum = sum / reinterpret_cast<const Scalars *>(a.scalars)->weight_sum;
    reinterpret_cast<T *>(a.loss)[0] = from_acc<T>((A)sum);
}

#define CBCE_LOSS_KERNELS(T, TNAME, L, LNAME)                                                      \
    extern "C" __global__ void __launch_bounds__(CBCE_PIXEL_THREADS)                               \
        loss_pixels_##TNAME##_##LNAME(const __grid_constant__ LossArgs a) {                        \
        loss_pixels<T, L>(a);                                                                      \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(CBCE_WARP_ROWS_THREADS)                           \
        loss_warp_rows_##TNAME##_##LNAME(const __grid_constant__ LossArgs a) {                     \
        loss_warp_rows<T, L>(a);                                                                   \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(CBCE_BLOCK_ROWS_THREADS, 1)                       \
        loss_block_rows_##TNAME##_##LNAME(const __grid_constant__ LossArgs a) {                    \
        loss_block_rows<T, L>(a);                                                                  \
    }

#define CBCE_LOSS_KERNELS_FOR(T, TNAME)                                                            \
    CBCE_LOSS_KERNELS(T, TNAME, i64, i64)                                                          \
    CBCE_LOSS_KERNELS(T, TNAME, int, i32)                                                          \
    CBCE_LOSS_KERNELS(T, TNAME, unsigned char, u8)                                                 \
    extern "C" __global__ void __launch_bounds__(CBCE_REDUCE_THREADS)                              \
        loss_reduce_##TNAME(const __grid_constant__ ReduceArgs a) {                                \
        loss_reduce<T>(a);                                                                         \
    }

CBCE_LOSS_KERNELS_FOR(float, f32)
CBCE_LOSS_KERNELS_FOR(double, f64)
CBCE_LOSS_KERNELS_FOR(f16, f16)
CBCE_LOSS_KERNELS_FOR(bf16, bf16)
