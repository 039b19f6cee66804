// Class counts of a target: labels in [0, C) other than the ignore index, tallied per block in
// a shared-memory histogram and added into 64-bit global counts with integer atomics (exact,
// so the counts do not depend on the order of the additions). The same pass finds the lowest
// position of a label outside [0, C) that is not the ignore index; `label_check_*` then keeps
// that label and its position for the host, which reports it when it next synchronises.
#include "common.cuh"

// Classes up to which a block keeps its histogram in shared memory (32 KiB of 32-bit bins).
#define CBCE_SHARED_BINS 8192
#define CBCE_COUNT_THREADS 256

struct CountArgs {
    Positions positions; // the target's strides in slot CBCE_TARGET
    Tiling tiling;
    u64 target;  // address of element 0
    u64 counts;  // u64[num_classes], zeroed before the launch
    u64 scalars; // Scalars*, or 0 not to look for bad labels
    i64 num_classes;
    i64 ignore_index;
};
static_assert(sizeof(CountArgs) == 1352, "CountArgs is mirrored in src/cuda/kernels.rs");

template <typename L> __device__ void class_counts(const CountArgs &a) {
    extern __shared__ unsigned int bins[];
    const Positions &p = a.positions;
    const i64 inner = p.dims[p.axes - 1];
    const i64 inner_stride = p.strides[CBCE_TARGET][p.axes - 1];
    const u64 num_classes = (u64)a.num_classes;
    const bool shared_bins = num_classes <= CBCE_SHARED_BINS;
    u64 *counts = reinterpret_cast<u64 *>(a.counts);
    Scalars *scalars = reinterpret_cast<Scalars *>(a.scalars);

    for (i64 tile = blockIdx.x; tile < a.tiling.tiles; tile += gridDim.x) {
        if (shared_bins) {
            for (u64 c = threadIdx.x; c < num_classes; c += blockDim.x)
                bins[c] = 0;
            __syncthreads();
        }
        const u64 line = (u64)(tile / a.tiling.tiles_per_line);
        const i64 first = (tile % a.tiling.tiles_per_line) * a.tiling.tile_len;
        const i64 last = min(first + a.tiling.tile_len, inner);
        i64 offsets[CBCE_OPERANDS];
        line_offsets(p, line, offsets);
        u64 first_bad = CBCE_NO_POSITION;
        for (i64 i = first + threadIdx.x; i < last; i += blockDim.x) {
            const i64 label = load_label<L>(a.target, offsets[CBCE_TARGET] + i * inner_stride);
            if (label == a.ignore_index)
                continue;
            if ((u64)label < num_classes) {
                if (shared_bins) {
                    atomicAdd(&bins[label], 1u);
                } else {
                    atomicAdd(&counts[label], 1ull);
                }
            } else if (first_bad == CBCE_NO_POSITION) {
                first_bad = line * (u64)inner + (u64)i;
            }
        }
        if (scalars != nullptr && first_bad != CBCE_NO_POSITION)
            atomicMin(&scalars->first_bad, first_bad);
        if (shared_bins) {
            __syncthreads();
            for (u64 c = threadIdx.x; c < num_classes; c += blockDim.x) {
                if (bins[c] != 0)
                    atomicAdd(&counts[c], (u64)bins[c]);
            }
            __syncthreads();
        }
    }
}

struct LabelCheckArgs {
    Positions positions; // as for the counts
    u64 target;
    u64 scalars; // Scalars*: first_bad was found by the counts
    u64 record;  // LabelRecord*: written if first_bad is set and the record is empty
    i64 ignore_index;
    i64 ndim; // the target's own shape, for the host's message
    i64 shape[CBCE_MAX_AXES];
};
static_assert(sizeof(LabelCheckArgs) == 1584, "LabelCheckArgs is mirrored in src/cuda/kernels.rs");

// One thread: keeps the first bad label of this call unless an earlier call's is still kept.
template <typename L> __device__ void label_check(const LabelCheckArgs &a) {
    const Scalars *scalars = reinterpret_cast<const Scalars *>(a.scalars);
    LabelRecord *record = reinterpret_cast<LabelRecord *>(a.record);
    const u64 position = scalars->first_bad;
    if (position == CBCE_NO_POSITION || record->set != 0)
        return;
    record->position = position;
    record->label = load_label<L>(a.target, position_offset(a.positions, CBCE_TARGET, position));
    record->ignore_index = a.ignore_index;
    record->ndim = a.ndim;
    for (i64 axis = 0; axis < a.ndim; ++axis)
        record->shape[axis] = a.shape[axis];
    record->set = 1;
}

#define CBCE_COUNT_KERNELS(L, NAME)                                                                \
    extern "C" __global__ void __launch_bounds__(CBCE_COUNT_THREADS)                               \
        class_counts_##NAME(const __grid_constant__ CountArgs a) {                                 \
        class_counts<L>(a);                                                                        \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(1)                                                \
        label_check_##NAME(const __grid_constant__ LabelCheckArgs a) {                             \
        label_check<L>(a);                                                                         \
    }

CBCE_COUNT_KERNELS(i64, i64)
CBCE_COUNT_KERNELS(int, i32)
CBCE_COUNT_KERNELS(unsigned char, u8)

// Per-class counts between the handle's own buffer (u64[num_classes], contiguous) and a
// caller's int64 tensor of shape (C) with any stride: stored after counting, and loaded (and
// checked) before an update from counts.
#define CBCE_COUNTS_LOAD_THREADS 1024

struct CountsMoveArgs {
    u64 tensor;        // address of the caller's element 0 (int64)
    u64 counts;        // u64[num_classes]: the handle's counts
    i64 tensor_stride; // in elements
    i64 num_classes;
    u64 scalars; // Scalars*: first_bad is set when the loaded counts are invalid (load only)
    u64 record;  // LabelRecord*: written when they are and the record is empty (load only)
};
static_assert(sizeof(CountsMoveArgs) == 48, "CountsMoveArgs is mirrored in src/cuda/kernels.rs");

extern "C" __global__ void __launch_bounds__(CBCE_COUNT_THREADS)
    counts_store_i64(const __grid_constant__ CountsMoveArgs a) {
    i64 *tensor = reinterpret_cast<i64 *>(a.tensor);
    const u64 *counts = reinterpret_cast<const u64 *>(a.counts);
    for (i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x; c < a.num_classes;
         c += (i64)gridDim.x * blockDim.x)
        tensor[c * a.tensor_stride] = (i64)counts[c];
}

// One block: copies the counts in and checks them as the host does, lowest negative class
// first, then a total of 2^64 or more. Invalid counts set first_bad, so that the update that
// follows leaves the state unchanged, and are kept in the record (set 2) for the host.
extern "C" __global__ void __launch_bounds__(CBCE_COUNTS_LOAD_THREADS)
    counts_load_i64(const __grid_constant__ CountsMoveArgs a) {
    __shared__ u64 scratch[32];
    __shared__ u64 first_negative;
    const i64 *tensor = reinterpret_cast<const i64 *>(a.tensor);
    u64 *counts = reinterpret_cast<u64 *>(a.counts);
    Scalars *scalars = reinterpret_cast<Scalars *>(a.scalars);
    LabelRecord *record = reinterpret_cast<LabelRecord *>(a.record);
    if (threadIdx.x == 0)
        first_negative = CBCE_NO_POSITION;
    __syncthreads();

    // The total as two sums of 32-bit halves, which cannot wrap for C up to 2^24.
    u64 low = 0, high = 0;
    for (i64 c = threadIdx.x; c < a.num_classes; c += blockDim.x) {
        const i64 count = tensor[c * a.tensor_stride];
        counts[c] = (u64)count;
        if (count < 0) {
            atomicMin(&first_negative, (u64)c);
            continue;
        }
        low += (u64)count & 0xffffffffull;
        high += (u64)count >> 32;
    }
    low = block_sum(low, scratch);
    high = block_sum(high, scratch);
    __syncthreads();
    if (threadIdx.x != 0)
        return;
    const bool overflows = ((high + (low >> 32)) >> 32) != 0;
    const bool negative = first_negative != CBCE_NO_POSITION;
    scalars->first_bad = (negative || overflows) ? 0 : CBCE_NO_POSITION;
    if (!(negative || overflows) || record->set != 0)
        return;
    record->position = negative ? first_negative : CBCE_NO_POSITION;
    record->label = negative ? tensor[(i64)first_negative * a.tensor_stride] : 0;
    record->ignore_index = 0;
    record->ndim = 0;
    record->set = 2;
}
