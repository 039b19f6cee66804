// The running state and the class weights, each computed by one block: the moving average
// of the prevalences in double precision, and the weights in float32 with their reductions
// in double precision, as src/prevalence.rs and src/weights.rs compute them on the host.
//
// The arithmetic uses the explicitly rounded intrinsics (__dmul_rn, __fadd_rn, ...) so that
// the compiler cannot fuse a multiplication and an addition: each operation rounds exactly as
// the host's does. Only the order of the reductions differs (a fixed tree here, a sequential
// sum there), which moves a double-precision sum by a few units of its last place before it
// is rounded once to float32.
#include "common.cuh"

#define CBCE_STATE_THREADS 1024

struct UpdateArgs {
    u64 state;   // double[num_classes]; NaN marks a class never seen
    u64 counts;  // u64[num_classes]
    u64 scalars; // Scalars*: skip the update when first_bad is set; 0 to update anyway
    i64 num_classes;
    double ema_decay;
    double keep;       // 1 - ema_decay, as the host rounds it
    double first_seen; // 1 / num_classes, as the host rounds it
};
static_assert(sizeof(UpdateArgs) == 56, "UpdateArgs is mirrored in src/cuda/kernels.rs");

// prevalence = prevalence * d + (count / total) * (1 - d) for every seen class; a class seen
// for the first time starts at 1 / C. Every thread of the block must call it.
__device__ void update_state(const UpdateArgs &a) {
    __shared__ u64 scratch[32];
    double *state = reinterpret_cast<double *>(a.state);
    const u64 *counts = reinterpret_cast<const u64 *>(a.counts);
    const Scalars *scalars = reinterpret_cast<const Scalars *>(a.scalars);

    u64 partial = 0;
    for (i64 c = threadIdx.x; c < a.num_classes; c += blockDim.x)
        partial += counts[c];
    const u64 total = block_sum(partial, scratch);
    if (scalars != nullptr && scalars->first_bad != CBCE_NO_POSITION)
        return;

    const double total_d = __ull2double_rn(total);
    for (i64 c = threadIdx.x; c < a.num_classes; c += blockDim.x) {
        double value = state[c];
        const u64 count = counts[c];
        if (isnan(value)) {
            if (count == 0)
                continue;
            value = a.first_seen;
        }
        const double batch = total > 0 ? __ddiv_rn(__ull2double_rn(count), total_d) : 0.0;
        state[c] = __dadd_rn(__dmul_rn(value, a.ema_decay), __dmul_rn(batch, a.keep));
    }
    __syncthreads();
}

struct WeightArgs {
    u64 state;   // double[num_classes]
    u64 weights; // float[num_classes], written
    i64 num_classes;
    double floor; // min_prevalence rounded to float32
};
static_assert(sizeof(WeightArgs) == 32, "WeightArgs is mirrored in src/cuda/kernels.rs");

// The weights from the state: inverse prevalence, mean imputation, a clamp to mean +- 3
// standard deviations, NaN to 1, normalisation to sum C. Every thread of the block must call
// it.
__device__ void compute_weights(const WeightArgs &a) {
    __shared__ u64 count_scratch[32];
    __shared__ double sum_scratch[32];
    const double *state = reinterpret_cast<const double *>(a.state);
    float *weights = reinterpret_cast<float *>(a.weights);
    const float floor = (float)a.floor;

    u64 seen = 0;
    for (i64 c = threadIdx.x; c < a.num_classes; c += blockDim.x)
        seen += isnan(state[c]) ? 0 : 1;
    const bool none_seen = block_sum(seen, count_scratch) == 0;
    // 1 / p of class c, NaN for a class never seen.
    auto inverse = [&](i64 c) {
        const float reported = __double2float_rn(state[c]);
        const float p = none_seen ? 1.0f : (isnan(reported) ? reported : fmaxf(reported, floor));
        return __fdiv_rn(1.0f, p);
    };

    u64 observed = 0;
    double observed_sum = 0.0;
    for (i64 c = threadIdx.x; c < a.num_classes; c += blockDim.x) {
        const float w = inverse(c);
        if (isnan(w))
            continue;
        observed += 1;
        observed_sum = __dadd_rn(observed_sum, (double)w);
    }
    const u64 n = block_sum(observed, count_scratch);
    const double sum = block_sum(observed_sum, sum_scratch);
    const float mean = __fdiv_rn(__double2float_rn(sum), __ull2float_rn(n));

    float std = nan_acc<float>();
    if (n >= 2) {
        const double mean_d = __ddiv_rn(sum, __ull2double_rn(n));
        double squares = 0.0;
        for (i64 c = threadIdx.x; c < a.num_classes; c += blockDim.x) {
            const float w = inverse(c);
            if (isnan(w))
                continue;
            const double d = __dsub_rn((double)w, mean_d);
            squares = __dadd_rn(squares, __dmul_rn(d, d));
        }
        squares = block_sum(squares, sum_scratch);
        std = __double2float_rn(__dsqrt_rn(__ddiv_rn(squares, __dsub_rn(__ull2double_rn(n), 1.0))));
    }
    const float three_std = __fmul_rn(3.0f, std);
    const float low = __fsub_rn(mean, three_std);
    const float high = __fadd_rn(mean, three_std);

    double clamped_sum = 0.0;
    for (i64 c = threadIdx.x; c < a.num_classes; c += blockDim.x) {
        const float w = inverse(c);
        const float imputed = isfinite(w) ? w : mean;
        float value = (isnan(imputed) || isnan(low) || isnan(high))
                          ? nan_acc<float>()
                          : fminf(fmaxf(imputed, low), high);
        if (isnan(value))
            value = 1.0f;
        weights[c] = value;
        clamped_sum = __dadd_rn(clamped_sum, (double)value);
    }
    const float total = __double2float_rn(block_sum(clamped_sum, sum_scratch));
    const float scale = __ll2float_rn(a.num_classes);
    for (i64 c = threadIdx.x; c < a.num_classes; c += blockDim.x)
        weights[c] = __fdiv_rn(__fmul_rn(scale, weights[c]), total);
    __syncthreads();
}

// How the uniform upstream gradient of each position's loss is made.
#define CBCE_UPSTREAM_SCALE 0              // grad_scale (reductions "sum" and "none")
#define CBCE_UPSTREAM_SCALE_OVER_SUM 1     // grad_scale / weight_sum ("mean")
#define CBCE_UPSTREAM_GRAD_LOSS 2          // grad_loss[0] (backward, "sum")
#define CBCE_UPSTREAM_GRAD_LOSS_OVER_SUM 3 // grad_loss[0] * (1 / weight_sum) (backward, "mean")
#define CBCE_UPSTREAM_PER_POSITION 4       // read per position by the loss kernel

struct SumArgs {
    u64 weights;   // float[num_classes]
    u64 counts;    // u64[num_classes]
    u64 scalars;   // Scalars*: weight_total, weight_sum and upstream are written
    u64 grad_loss; // address of the upstream gradient's element 0 (modes 2 and 3)
    i64 num_classes;
    i64 upstream_mode;
    double grad_scale;
};
static_assert(sizeof(SumArgs) == 56, "SumArgs is mirrored in src/cuda/kernels.rs");

// weight_total = sum of the weights; weight_sum = sum over classes of count * weight; and the
// upstream gradient. Every thread of the block must call it.
template <typename T> __device__ void weight_sums(const SumArgs &a) {
    __shared__ double scratch[32];
    const float *weights = reinterpret_cast<const float *>(a.weights);
    const u64 *counts = reinterpret_cast<const u64 *>(a.counts);
    Scalars *scalars = reinterpret_cast<Scalars *>(a.scalars);

    double total = 0.0, weighted = 0.0;
    for (i64 c = threadIdx.x; c < a.num_classes; c += blockDim.x) {
        const double w = (double)weights[c];
        total = __dadd_rn(total, w);
        weighted = __dadd_rn(weighted, __dmul_rn(__ull2double_rn(counts[c]), w));
    }
    total = block_sum(total, scratch);
    weighted = block_sum(weighted, scratch);
    if (threadIdx.x != 0)
        return;
    scalars->weight_total = total;
    scalars->weight_sum = weighted;
    double upstream = a.grad_scale;
    if (a.upstream_mode == CBCE_UPSTREAM_SCALE_OVER_SUM)
        upstream = __ddiv_rn(a.grad_scale, weighted);
    if (a.upstream_mode == CBCE_UPSTREAM_GRAD_LOSS ||
        a.upstream_mode == CBCE_UPSTREAM_GRAD_LOSS_OVER_SUM) {
        upstream = (double)to_acc(reinterpret_cast<const T *>(a.grad_loss)[0]);
        if (a.upstream_mode == CBCE_UPSTREAM_GRAD_LOSS_OVER_SUM)
            upstream = __dmul_rn(upstream, __ddiv_rn(1.0, weighted));
    }
    scalars->upstream = upstream;
}

struct ForwardWeightArgs {
    UpdateArgs update;
    WeightArgs weights;
    SumArgs sums;
    i64 update_first; // 1 to update the state before computing the weights
};
static_assert(sizeof(ForwardWeightArgs) == 152,
              "ForwardWeightArgs is mirrored in src/cuda/kernels.rs");

extern "C" __global__ void __launch_bounds__(CBCE_STATE_THREADS)
    state_update_f64(const __grid_constant__ UpdateArgs a) {
    update_state(a);
}

extern "C" __global__ void __launch_bounds__(CBCE_STATE_THREADS)
    class_weights_f32(const __grid_constant__ WeightArgs a) {
    compute_weights(a);
}

// A forward call's state work in one launch: the update (unless a label was bad), the weights,
// and their sums.
extern "C" __global__ void __launch_bounds__(CBCE_STATE_THREADS)
    forward_weights_f32(const __grid_constant__ ForwardWeightArgs a) {
    if (a.update_first != 0)
        update_state(a.update);
    compute_weights(a.weights);
    weight_sums<float>(a.sums);
}

#define CBCE_BACKWARD_WEIGHTS(T, NAME)                                                             \
    extern "C" __global__ void __launch_bounds__(CBCE_STATE_THREADS)                               \
        backward_weights_##NAME(const __grid_constant__ SumArgs a) {                               \
        weight_sums<T>(a);                                                                         \
    }

CBCE_BACKWARD_WEIGHTS(float, f32)
CBCE_BACKWARD_WEIGHTS(double, f64)
CBCE_BACKWARD_WEIGHTS(f16, f16)
CBCE_BACKWARD_WEIGHTS(bf16, bf16)

struct ResetArgs {
    u64 state;
    i64 num_classes;
};
static_assert(sizeof(ResetArgs) == 16, "ResetArgs is mirrored in src/cuda/kernels.rs");

// Every class unseen.
extern "C" __global__ void state_reset_f64(const __grid_constant__ ResetArgs a) {
    double *state = reinterpret_cast<double *>(a.state);
    for (i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x; c < a.num_classes;
         c += (i64)gridDim.x * blockDim.x) {
        state[c] = nan_acc<double>();
    }
}
