// Helpers shared by every kernel family: element types and their conversions, the positions
// of a pass (the target's elements) as merged axes with each operand's strides, and
// deterministic reductions within a warp or a block.
//
// Reductions run in a fixed tree order that depends only on the launch shape the host chose
// from the tensor shapes, never on timing, and nothing here uses floating-point atomics: the
// same inputs give the same bits on every run. The parameter structs are mirrored field for
// field in src/cuda/kernels.rs; every field is 8 bytes wide so that no padding can differ.
#pragma once

typedef long long i64;
typedef unsigned long long u64;

#define CBCE_MAX_AXES 32
#define CBCE_OPERANDS 4
#define CBCE_LOGITS 0
#define CBCE_TARGET 1
#define CBCE_GRAD 2
// The per-position tensor: the losses of reduction "none", or the upstream gradient of a
// backward call with reduction "none".
#define CBCE_PER_POSITION 3

// No position: the initial value of the first-bad-label slot.
#define CBCE_NO_POSITION 0xffffffffffffffffull

// Half-precision storage types; the kernels compute in float32 and convert with the PTX
// instructions, round to nearest even, exactly as the host's `half` crate rounds.
struct f16 {
    unsigned short bits;
};
struct bf16 {
    unsigned short bits;
};

template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float x) {
    return x;
}
__device__ __forceinline__ double to_acc(double x) {
    return x;
}
__device__ __forceinline__ float to_acc(f16 x) {
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(x.bits));
    return value;
}
__device__ __forceinline__ float to_acc(bf16 x) {
    return __uint_as_float(((unsigned)x.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type value);
template <> __device__ __forceinline__ float from_acc<float>(float value) {
    return value;
}
template <> __device__ __forceinline__ double from_acc<double>(double value) {
    return value;
}
template <> __device__ __forceinline__ f16 from_acc<f16>(float value) {
    f16 out;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out.bits) : "f"(value));
    return out;
}
template <> __device__ __forceinline__ bf16 from_acc<bf16>(float value) {
    bf16 out;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(out.bits) : "f"(value));
    return out;
}

__device__ __forceinline__ float exp_acc(float x) {
    return expf(x);
}
__device__ __forceinline__ double exp_acc(double x) {
    return exp(x);
}
__device__ __forceinline__ float log_acc(float x) {
    return logf(x);
}
__device__ __forceinline__ double log_acc(double x) {
    return log(x);
}
// The larger of two values, ignoring a NaN like Rust's `max` (a NaN still reaches the loss
// through the sum of exponentials).
__device__ __forceinline__ float max_acc(float a, float b) {
    return fmaxf(a, b);
}
__device__ __forceinline__ double max_acc(double a, double b) {
    return fmax(a, b);
}

template <typename A> __device__ __forceinline__ A nan_acc();
template <> __device__ __forceinline__ float nan_acc<float>() {
    return __int_as_float(0x7fc00000);
}
template <> __device__ __forceinline__ double nan_acc<double>() {
    return __longlong_as_double(0x7ff8000000000000ll);
}

template <typename L> __device__ __forceinline__ i64 load_label(u64 base, i64 offset) {
    return (i64)(reinterpret_cast<const L *>(base)[offset]);
}

// The positions of a pass as merged axes, outermost first, with each operand's element
// strides along them (0 for an absent operand). The innermost axis is walked by threads; the
// outer ones are unravelled once per tile.
struct Positions {
    i64 axes;
    i64 dims[CBCE_MAX_AXES];
    i64 strides[CBCE_OPERANDS][CBCE_MAX_AXES];
};

// A pass is cut into tiles of `tile_len` consecutive positions along the innermost axis; a
// line is one run of the innermost axis. Tile t is in line t / tiles_per_line.
struct Tiling {
    i64 tile_len;
    i64 tiles_per_line;
    i64 tiles;
};

// Each operand's element offset at the first position of line `line`.
__device__ __forceinline__ void line_offsets(const Positions &p, u64 line,
                                             i64 (&offsets)[CBCE_OPERANDS]) {
#pragma unroll
    for (int k = 0; k < CBCE_OPERANDS; ++k)
        offsets[k] = 0;
    for (i64 axis = p.axes - 2; axis >= 0; --axis) {
        const u64 extent = (u64)p.dims[axis];
        const i64 coordinate = (i64)(line % extent);
        line /= extent;
#pragma unroll
        for (int k = 0; k < CBCE_OPERANDS; ++k)
            offsets[k] += coordinate * p.strides[k][axis];
    }
}

// Operand k's element offset at linear position `position` (C order of the merged axes).
__device__ __forceinline__ i64 position_offset(const Positions &p, int k, u64 position) {
    i64 offset = 0;
    for (i64 axis = p.axes - 1; axis >= 0; --axis) {
        const u64 extent = (u64)p.dims[axis];
        offset += (i64)(position % extent) * p.strides[k][axis];
        position /= extent;
    }
    return offset;
}

template <typename V> __device__ __forceinline__ V warp_sum(V value) {
#pragma unroll
    for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1)
        value += __shfl_xor_sync(0xffffffffu, value, lane_mask);
    return value;
}

template <typename V> __device__ __forceinline__ V warp_max(V value) {
#pragma unroll
    for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1)
        value = max_acc(value, __shfl_xor_sync(0xffffffffu, value, lane_mask));
    return value;
}

// The sum of `value` over the block, returned to every thread. Every thread of the block must
// call it; `scratch` holds one value per warp (at most 32).
template <typename V> __device__ __forceinline__ V block_sum(V value, V *scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    value = warp_sum(value);
    __syncthreads();
    if (lane == 0)
        scratch[warp] = value;
    __syncthreads();
    if (warp == 0) {
        V partial = lane < warps ? scratch[lane] : (V)0;
        partial = warp_sum(partial);
        if (lane == 0)
            scratch[0] = partial;
    }
    __syncthreads();
    return scratch[0];
}

// As `block_sum`, for the maximum (NaN-ignoring).
template <typename V> __device__ __forceinline__ V block_max(V value, V *scratch, V lowest) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    value = warp_max(value);
    __syncthreads();
    if (lane == 0)
        scratch[warp] = value;
    __syncthreads();
    if (warp == 0) {
        V partial = lane < warps ? scratch[lane] : lowest;
        partial = warp_max(partial);
        if (lane == 0)
            scratch[0] = partial;
    }
    __syncthreads();
    return scratch[0];
}

// Per-call and per-state values that kernels pass to each other in device memory.
struct Scalars {
    // Lowest linear position of a label outside [0, C) that is not the ignore index, in the
    // call now running; CBCE_NO_POSITION when there is none.
    u64 first_bad;
    // Sum of the class weights.
    double weight_total;
    // Sum over positions that are not ignored of the weight of their label: the denominator
    // of reduction "mean".
    double weight_sum;
    // The uniform upstream gradient of each position's loss.
    double upstream;
};

// The first bad label (or bad counts) since the host last synchronised, kept for the host to
// report.
struct LabelRecord {
    u64 set; // 0: nothing kept; 1: a label outside [0, C); 2: counts that were negative (the
             // lowest such class in `position`, its count in `label`) or whose total overflows
             // (`position` CBCE_NO_POSITION)
    u64 position;
    i64 label;
    i64 ignore_index;
    i64 ndim;
    i64 shape[CBCE_MAX_AXES];
};

// The sizes src/cuda/kernels.rs checks its mirrors against.
static_assert(sizeof(Positions) == 1288, "Positions is mirrored in src/cuda/kernels.rs");
static_assert(sizeof(Tiling) == 24, "Tiling is mirrored in src/cuda/kernels.rs");
static_assert(sizeof(Scalars) == 32, "Scalars is mirrored in src/cuda/kernels.rs");
static_assert(sizeof(LabelRecord) == 296, "LabelRecord is mirrored in src/cuda/kernels.rs");
