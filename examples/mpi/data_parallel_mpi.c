/*
 * Data-parallel training with MPI: every rank holds its own loss handle and its own slice of
 * each (N, C, H, W) segmentation batch, and all of them train with the weights that one process
 * seeing the whole batch would use. A step on each rank:
 *
 *   1. counts the labels of its slice (cbce_class_counts; ignored pixels are not counted);
 *   2. sums the counts over the ranks (MPI_Allreduce, MPI_INT64_T, MPI_SUM);
 *   3. applies the summed counts (cbce_update_from_counts): every rank now holds the state that
 *      one update over the whole batch gives, bit for bit;
 *   4. takes the denominator of the global "mean", sum over classes of count * weight, from the
 *      summed counts and the weights (cbce_weights), the way the library computes it, so it is
 *      exactly the single-process denominator and needs no further communication;
 *   5. runs the forward pass with reduction "sum", no update of its own and
 *      grad_scale = 1 / denominator: its gradient is its slice of the global mean's gradient;
 *   6. sums the loss over the ranks (MPI_Allreduce): global mean = sum of local sums / denominator.
 *
 * Rank 0 also rebuilds the whole batch and runs one loss over it, the single-process run, and
 * checks every step: each rank's weights and state blob equal that run's bit for bit, the
 * denominator equals its weight sum exactly, and the mean loss and the gathered gradient equal
 * its own within float32 rounding. Every rank exits with status 1 when a check failed.
 *
 * `--local-counts` skips step 2, as a trainer that forgets the all-reduce would: the ranks then
 * drift apart, and the checks report it (the test suite expects that failure).
 */
#include <cbce.h>
#include <mpi.h>

#include <float.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    BATCH = 8,
    CLASSES = 5,
    HEIGHT = 13,
    WIDTH = 17,
    PIXELS = HEIGHT * WIDTH,
    STEPS = 4,
    IGNORE = 255,
};
static const double EMA_DECAY = 0.9;

/* Tolerances of the float32 results against the single-process run, in units of FLT_EPSILON
 * (2^-23). Both runs compute every pixel's loss from the same logits and weights, and the
 * gradient with the same double-precision scale, 1 / denominator. The mean loss differs by how
 * it is rounded: each rank's sum is written as a float32 (at most 2^-24 relative) before the
 * ranks add them, and the single-process mean is written as a float32 once; the sums inside the
 * library are double precision and differ only in their order. The loss tolerance is twice that
 * bound. The gradient elements need not differ at all, but the library does not promise the
 * same bits for a pixel at another position in a tensor (its vector code groups pixels), so an
 * element may differ by a few float32 roundings of the softmax: 4 FLT_EPSILON of the element's
 * scale, grad_scale * the weight of its label, which bounds its magnitude. */
#define LOSS_TOLERANCE_PER_RANK (2.0 * FLT_EPSILON)
#define GRAD_TOLERANCE (4.0 * FLT_EPSILON)

static int rank = 0;

/* Stops every rank if a call into the library failed, with the library's message. */
static void require_ok(CbceStatus status, const char *call) {
    if (status != CBCE_STATUS_OK) {
        fprintf(stderr, "rank %d: %s failed: %s: %s\n", rank, call, cbce_status_string(status),
                cbce_last_error_message());
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
}
#define CALL(call) require_ok((call), #call)

static void *allocate(size_t bytes) {
    void *memory = malloc(bytes > 0 ? bytes : 1);
    if (memory == NULL) {
        fprintf(stderr, "rank %d: out of memory\n", rank);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    return memory;
}

/* A pseudo-random value in [0, 1) of the element `index` of image `image` at `step`
 * (SplitMix64's finaliser), so that any rank can build any image without communication. */
static float uniform(int step, int image, uint64_t index) {
    uint64_t z = ((uint64_t)step << 56) ^ ((uint64_t)image << 40) ^ index;
    z += 0x9e3779b97f4a7c15u;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return (float)((z ^ (z >> 31)) >> 40) / 16777216.0f;
}

/* Builds images [first, first + count) of the batch of `step`: masks (count, H, W) and logits
 * (count, C, H, W). Each image is mostly its own class, image % C, so that the slices of
 * different ranks have different class frequencies; about a tenth of the pixels are ignored. */
static void build_images(int step, int first, int count, uint8_t *masks, float *logits) {
    for (int i = 0; i < count; i++) {
        int image = first + i;
        for (int p = 0; p < PIXELS; p++) {
            float u = uniform(step, image, (uint64_t)p);
            uint8_t label = (uint8_t)(image % CLASSES);
            if (u >= 0.9f) {
                label = IGNORE;
            } else if (u >= 0.5f) {
                label = (uint8_t)((int)(u * 100.0f) % CLASSES);
            }
            masks[(size_t)i * PIXELS + p] = label;
            for (int c = 0; c < CLASSES; c++) {
                float noise = 2.0f * uniform(step, image, ((uint64_t)(c + 1) << 20) | (uint64_t)p);
                float margin = c == label ? 1.0f : 0.0f;
                logits[((size_t)i * CLASSES + c) * PIXELS + p] = noise - 1.0f + margin;
            }
        }
    }
}

/* The first image of `rank`'s slice when BATCH images are split over `ranks` as evenly as
 * possible; rank `ranks` gives the end of the batch. */
static int first_image(int of_rank, int ranks) {
    return (int)((long)of_rank * BATCH / ranks);
}

static CbceLoss *new_loss(void) {
    CbceConfig config = cbce_config_default();
    config.num_classes = CLASSES;
    config.ema_decay = EMA_DECAY;
    CbceLoss *loss = NULL;
    CALL(cbce_new(&config, &loss));
    return loss;
}

/* What one step leaves on a rank: its slice's gradient and what rank 0 compares. */
typedef struct RankStep {
    float weights[CLASSES];
    uint8_t *state;
    size_t state_size;
    float *grad;
    double weight_sum;
    double mean_loss;
} RankStep;

/* One data-parallel step of this rank on images [first, first + count). */
static void rank_step(CbceLoss *loss, int step, int first, int count, bool all_reduce,
                      RankStep *out) {
    uint8_t *masks = allocate((size_t)count * PIXELS);
    float *logits = allocate((size_t)count * CLASSES * PIXELS * sizeof(float));
    build_images(step, first, count, masks, logits);
    int64_t logits_shape[4] = {count, CLASSES, HEIGHT, WIDTH};
    int64_t masks_shape[3] = {count, HEIGHT, WIDTH};
    CbceTensor logits_tensor = {
        logits, {CBCE_DEVICE_CPU, 0}, 4, {CBCE_DTYPE_FLOAT, 32, 1}, logits_shape, NULL, 0};
    CbceTensor masks_tensor = {
        masks, {CBCE_DEVICE_CPU, 0}, 3, {CBCE_DTYPE_UINT, 8, 1}, masks_shape, NULL, 0};

    int64_t counts[CLASSES];
    CALL(cbce_class_counts(loss, &masks_tensor, IGNORE, counts, CLASSES));
    if (all_reduce) {
        MPI_Allreduce(MPI_IN_PLACE, counts, CLASSES, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    }
    CALL(cbce_update_from_counts(loss, counts, CLASSES));

    float weights[CLASSES];
    CALL(cbce_weights(loss, weights, CLASSES));
    double weight_sum = 0.0;
    for (int c = 0; c < CLASSES; c++) {
        weight_sum += (double)counts[c] * (double)weights[c];
    }

    /* A batch without a labelled pixel has no mean (PyTorch's is NaN): its gradient is zero. */
    CbceForwardOptions options = cbce_forward_options_default();
    options.reduction = CBCE_REDUCTION_SUM;
    options.update_prevalences = 0;
    options.ignore_index = IGNORE;
    options.grad_scale = weight_sum > 0.0 ? 1.0 / weight_sum : 0.0;
    float loss_sum = 0.0f;
    CbceTensor loss_tensor = {
        &loss_sum, {CBCE_DEVICE_CPU, 0}, 0, {CBCE_DTYPE_FLOAT, 32, 1}, NULL, NULL, 0};
    CbceTensor grad_tensor = logits_tensor;
    grad_tensor.data = out->grad;
    double local_weight_sum = 0.0;
    CALL(cbce_forward(loss, &logits_tensor, &masks_tensor, &options, &loss_tensor, &grad_tensor,
                      out->weights, CLASSES, &local_weight_sum));

    double global_loss_sum = loss_sum;
    MPI_Allreduce(MPI_IN_PLACE, &global_loss_sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);

    CALL(cbce_get_state(loss, out->state, out->state_size, NULL));
    out->weight_sum = weight_sum;
    out->mean_loss = global_loss_sum / weight_sum;
    free(masks);
    free(logits);
}

/* The single-process run of a step, on rank 0: the whole batch, mean reduction with update. */
typedef struct WholeStep {
    float weights[CLASSES];
    uint8_t *state;
    size_t state_size;
    uint8_t *masks;
    float *grad;
    float mean_loss;
    double weight_sum;
} WholeStep;

static void whole_step(CbceLoss *loss, int step, WholeStep *out) {
    float *logits = allocate((size_t)BATCH * CLASSES * PIXELS * sizeof(float));
    build_images(step, 0, BATCH, out->masks, logits);
    int64_t logits_shape[4] = {BATCH, CLASSES, HEIGHT, WIDTH};
    int64_t masks_shape[3] = {BATCH, HEIGHT, WIDTH};
    CbceTensor logits_tensor = {
        logits, {CBCE_DEVICE_CPU, 0}, 4, {CBCE_DTYPE_FLOAT, 32, 1}, logits_shape, NULL, 0};
    CbceTensor masks_tensor = {
        out->masks, {CBCE_DEVICE_CPU, 0}, 3, {CBCE_DTYPE_UINT, 8, 1}, masks_shape, NULL, 0};
    CbceTensor loss_tensor = {
        &out->mean_loss, {CBCE_DEVICE_CPU, 0}, 0, {CBCE_DTYPE_FLOAT, 32, 1}, NULL, NULL, 0};
    CbceTensor grad_tensor = logits_tensor;
    grad_tensor.data = out->grad;
    CbceForwardOptions options = cbce_forward_options_default();
    options.ignore_index = IGNORE;

    CALL(cbce_forward(loss, &logits_tensor, &masks_tensor, &options, &loss_tensor, &grad_tensor,
                      out->weights, CLASSES, &out->weight_sum));
    CALL(cbce_get_state(loss, out->state, out->state_size, NULL));
    free(logits);
}

/* What rank 0 gathered from every rank at one step. */
typedef struct Gathered {
    float *weights;  /* ranks * CLASSES */
    uint8_t *states; /* ranks * state_size */
    float *grad;     /* the whole batch's gradient, slices in rank order */
    double *weight_sums;
    double *mean_losses;
} Gathered;

/* Rank 0's checks of one step against the single-process run; returns the failures. */
/* The largest differences seen over the steps, in FLT_EPSILON (of the loss; of each gradient
 * element's scale), and the number of gradient elements whose bits differ. */
typedef struct Differences {
    double loss;
    double grad;
    size_t grad_elements;
} Differences;

static int check_step(int step, int ranks, size_t state_size, const Gathered *got,
                      const WholeStep *whole, Differences *seen) {
    int failures = 0;
    for (int r = 0; r < ranks; r++) {
        if (memcmp(&got->weights[r * CLASSES], whole->weights, sizeof whole->weights) != 0) {
            fprintf(stderr, "FAILED: step %d: the weights of rank %d differ:", step, r);
            for (int c = 0; c < CLASSES; c++) {
                fprintf(stderr, " %.9g/%.9g", got->weights[r * CLASSES + c], whole->weights[c]);
            }
            fprintf(stderr, " (rank/whole batch)\n");
            failures++;
        }
        if (memcmp(&got->states[r * state_size], whole->state, state_size) != 0) {
            fprintf(stderr, "FAILED: step %d: the state blob of rank %d differs\n", step, r);
            failures++;
        }
        if (got->weight_sums[r] != whole->weight_sum) {
            fprintf(stderr, "FAILED: step %d: rank %d's denominator %.17g is not %.17g\n", step, r,
                    got->weight_sums[r], whole->weight_sum);
            failures++;
        }
    }

    double loss_error = fabs(got->mean_losses[0] - whole->mean_loss);
    double loss_tolerance = (ranks + 1) * LOSS_TOLERANCE_PER_RANK * fabs(whole->mean_loss);
    if (!(loss_error <= loss_tolerance)) {
        fprintf(stderr, "FAILED: step %d: the ranks' mean loss %.9g is not %.9g\n", step,
                got->mean_losses[0], whole->mean_loss);
        failures++;
    }
    seen->loss = fmax(seen->loss, loss_error / fabs(whole->mean_loss) / FLT_EPSILON);

    double scale = 1.0 / whole->weight_sum;
    for (size_t i = 0; i < (size_t)BATCH * CLASSES * PIXELS; i++) {
        size_t image = i / (CLASSES * PIXELS);
        uint8_t label = whole->masks[image * PIXELS + i % PIXELS];
        double element_scale = label == IGNORE ? 0.0 : scale * whole->weights[label];
        double error = fabs((double)got->grad[i] - (double)whole->grad[i]);
        seen->grad_elements += memcmp(&got->grad[i], &whole->grad[i], sizeof(float)) != 0;
        if (!(error <= GRAD_TOLERANCE * element_scale)) {
            if (failures < 10) {
                fprintf(stderr, "FAILED: step %d: gradient element %zu is %.9g, not %.9g\n", step,
                        i, got->grad[i], whole->grad[i]);
            }
            failures++;
        } else if (element_scale > 0.0) {
            seen->grad = fmax(seen->grad, error / element_scale / FLT_EPSILON);
        }
    }
    return failures;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int ranks = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ranks);
    bool all_reduce = !(argc > 1 && strcmp(argv[1], "--local-counts") == 0);

    CbceLoss *loss = new_loss();
    size_t state_size = 0;
    CALL(cbce_state_size(loss, &state_size));
    int first = first_image(rank, ranks);
    int count = first_image(rank + 1, ranks) - first;
    RankStep mine = {.state = allocate(state_size),
                     .state_size = state_size,
                     .grad = allocate((size_t)count * CLASSES * PIXELS * sizeof(float))};

    /* Rank 0's single-process run and the receive buffers of what it gathers. */
    CbceLoss *whole_loss = NULL;
    WholeStep whole = {0};
    Gathered got = {0};
    int *grad_counts = NULL;
    int *grad_offsets = NULL;
    if (rank == 0) {
        whole_loss = new_loss();
        whole.state = allocate(state_size);
        whole.state_size = state_size;
        whole.masks = allocate((size_t)BATCH * PIXELS);
        whole.grad = allocate((size_t)BATCH * CLASSES * PIXELS * sizeof(float));
        got.weights = allocate((size_t)ranks * CLASSES * sizeof(float));
        got.states = allocate((size_t)ranks * state_size);
        got.grad = allocate((size_t)BATCH * CLASSES * PIXELS * sizeof(float));
        got.weight_sums = allocate((size_t)ranks * sizeof(double));
        got.mean_losses = allocate((size_t)ranks * sizeof(double));
        grad_counts = allocate((size_t)ranks * sizeof(int));
        grad_offsets = allocate((size_t)ranks * sizeof(int));
        for (int r = 0; r < ranks; r++) {
            grad_offsets[r] = first_image(r, ranks) * CLASSES * PIXELS;
            grad_counts[r] = first_image(r + 1, ranks) * CLASSES * PIXELS - grad_offsets[r];
        }
        printf("cbce %s, MPI data-parallel: %d ranks, batch (%d, %d, %d, %d), %s\n", cbce_version(),
               ranks, BATCH, CLASSES, HEIGHT, WIDTH,
               all_reduce ? "counts summed over the ranks" : "each rank's own counts only");
        printf("step  mean loss    weights\n");
    }

    int failures = 0;
    Differences seen = {0};
    for (int step = 0; step < STEPS; step++) {
        rank_step(loss, step, first, count, all_reduce, &mine);

        MPI_Gather(mine.weights, CLASSES, MPI_FLOAT, got.weights, CLASSES, MPI_FLOAT, 0,
                   MPI_COMM_WORLD);
        MPI_Gather(mine.state, (int)state_size, MPI_BYTE, got.states, (int)state_size, MPI_BYTE, 0,
                   MPI_COMM_WORLD);
        MPI_Gather(&mine.weight_sum, 1, MPI_DOUBLE, got.weight_sums, 1, MPI_DOUBLE, 0,
                   MPI_COMM_WORLD);
        MPI_Gather(&mine.mean_loss, 1, MPI_DOUBLE, got.mean_losses, 1, MPI_DOUBLE, 0,
                   MPI_COMM_WORLD);
        MPI_Gatherv(mine.grad, count * CLASSES * PIXELS, MPI_FLOAT, got.grad, grad_counts,
                    grad_offsets, MPI_FLOAT, 0, MPI_COMM_WORLD);

        if (rank == 0) {
            whole_step(whole_loss, step, &whole);
            failures += check_step(step, ranks, state_size, &got, &whole, &seen);
            printf("%4d  %.7f   ", step, got.mean_losses[0]);
            for (int c = 0; c < CLASSES; c++) {
                printf(" %.4f", got.weights[c]);
            }
            printf("\n");
        }
    }

    MPI_Bcast(&failures, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        if (failures != 0) {
            fprintf(stderr, "mpi_data_parallel: %d checks failed\n", failures);
        } else {
            printf("mpi_data_parallel: %d ranks hold the single-process weights and state bit for "
                   "bit; their mean loss is within %.2f FLT_EPSILON of its (tolerance %.0f); "
                   "%zu of %d gradient elements differ, by at most %.2f FLT_EPSILON of their "
                   "scale (tolerance %.0f)\n",
                   ranks, seen.loss, (ranks + 1) * LOSS_TOLERANCE_PER_RANK / FLT_EPSILON,
                   seen.grad_elements, STEPS * BATCH * CLASSES * PIXELS, seen.grad,
                   GRAD_TOLERANCE / FLT_EPSILON);
        }
    }

    cbce_free(loss);
    cbce_free(whole_loss);
    free(mine.state);
    free(mine.grad);
    free(whole.state);
    free(whole.masks);
    free(whole.grad);
    free(got.weights);
    free(got.states);
    free(got.grad);
    free(got.weight_sums);
    free(got.mean_losses);
    free(grad_counts);
    free(grad_offsets);
    MPI_Finalize();
    return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
