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
