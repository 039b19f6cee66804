/*
 * The C ABI driven from C with valid and hostile arguments, for the sanitizer and valgrind runs
 * of scripts/test_reliability.sh.
 *
 * Checks: every hostile call returns its status with a message naming the data, and leaves the
 * handle's state (its cbce_get_state bytes) and every output exactly as they were; a valid
 * forward call gives the hand-worked loss and gradient; channels-last and reversed strides give
 * what contiguous memory gives; eight threads updating and reading one handle at once leave a
 * state that one serial order gives, and read only such states; every handle is freed.
 *
 * Prints "abi_check: N passed, M failed" and exits with status 1 if any check failed.
 */
#include "cbce.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int passed, failed;

static void check(int ok, const char *what) {
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAILED: %s (last message: \"%s\")\n", what, cbce_last_error_message());
    }
}

/* The status is `expected` and the message contains `needle`. */
static void check_status(CbceStatus status, CbceStatus expected, const char *needle,
                         const char *what) {
    char text[512];
    snprintf(text, sizeof text, "%s: status %d, expected %d", what, (int)status, (int)expected);
    check(status == expected, text);
    if (needle != NULL) {
        snprintf(text, sizeof text, "%s: message names \"%s\"", what, needle);
        check(strstr(cbce_last_error_message(), needle) != NULL, text);
    }
}

static CbceTensor tensor(void *data, uint8_t code, uint8_t bits, int32_t ndim, int64_t *shape,
                         int64_t *strides) {
    CbceTensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.device.device_type = CBCE_DEVICE_CPU;
    t.ndim = ndim;
    t.dtype.code = code;
    t.dtype.bits = bits;
    t.dtype.lanes = 1;
    t.shape = shape;
    t.strides = strides;
    return t;
}

static CbceLoss *make(uint64_t classes, double decay) {
    CbceConfig config = cbce_config_default();
    config.num_classes = classes;
    config.ema_decay = decay;
    CbceLoss *loss = NULL;
    check_status(cbce_new(&config, &loss), CBCE_STATUS_OK, NULL, "cbce_new");
    return loss;
}

enum { STATE_MAX = 24 + 8 * 16 + 8 };

static size_t state_of(const CbceLoss *loss, uint8_t out[STATE_MAX]) {
    size_t size = 0;
    memset(out, 0, STATE_MAX);
    if (cbce_state_size(loss, &size) != CBCE_STATUS_OK || size > STATE_MAX) {
        return 0;
    }
    size_t written = 0;
    cbce_get_state(loss, out, size, &written);
    return written;
}

static void check_new(void) {
    CbceConfig config = cbce_config_default();
    CbceLoss *out = (CbceLoss *)(uintptr_t)0x10;
    check_status(cbce_new(NULL, &out), CBCE_STATUS_NULL_POINTER, "`config`", "new: NULL config");
    check_status(cbce_new(&config, &out), CBCE_STATUS_INVALID_CONFIG, "num_classes is 0",
                 "new: num_classes 0");
    config.num_classes = 3;
    config.ema_decay = NAN;
    check_status(cbce_new(&config, &out), CBCE_STATUS_INVALID_CONFIG, "ema_decay is NaN",
                 "new: decay NaN");
    config.ema_decay = 0.9;
    config.min_prevalence = 1.0;
    check_status(cbce_new(&config, &out), CBCE_STATUS_INVALID_CONFIG, "min_prevalence is 1",
                 "new: floor 1");
    config.min_prevalence = 0.0;
    config.device.device_type = 7;
    check_status(cbce_new(&config, &out), CBCE_STATUS_INVALID_CONFIG, "device type 7",
                 "new: device 7");
    check(out == (CbceLoss *)(uintptr_t)0x10, "new: out untouched by failures");
    check_status(cbce_new(&config, NULL), CBCE_STATUS_NULL_POINTER, "`out`", "new: NULL out");
}

/* Valid inputs of a forward call over (2, 2) logits, with sentinel-filled outputs. */
typedef struct {
    float logits[4];
    int64_t labels[2];
    int64_t logits_shape[2];
    int64_t labels_shape[1];
    float loss;
    float grad[4];
    float weights[2];
    double weight_sum;
    CbceTensor logits_t, labels_t, loss_t, grad_t;
    CbceForwardOptions options;
} Forward;

static void forward_init(Forward *f) {
    const float values[4] = {logf(3.0f), 0.0f, 0.0f, 0.0f};
    memcpy(f->logits, values, sizeof values);
    f->labels[0] = 0;
    f->labels[1] = 1;
    f->logits_shape[0] = 2;
    f->logits_shape[1] = 2;
    f->labels_shape[0] = 2;
    f->loss = -77.0f;
    for (int i = 0; i < 4; i++) {
        f->grad[i] = -77.0f;
    }
    f->weights[0] = f->weights[1] = -77.0f;
    f->weight_sum = -77.0;
    f->logits_t = tensor(f->logits, CBCE_DTYPE_FLOAT, 32, 2, f->logits_shape, NULL);
    f->labels_t = tensor(f->labels, CBCE_DTYPE_INT, 64, 1, f->labels_shape, NULL);
    f->loss_t = tensor(&f->loss, CBCE_DTYPE_FLOAT, 32, 0, NULL, NULL);
    f->grad_t = tensor(f->grad, CBCE_DTYPE_FLOAT, 32, 2, f->logits_shape, NULL);
    f->options = cbce_forward_options_default();
}

static CbceStatus forward_call(const CbceLoss *loss, Forward *f) {
    return cbce_forward(loss, &f->logits_t, &f->labels_t, &f->options, &f->loss_t, &f->grad_t,
                        f->weights, 2, &f->weight_sum);
}

static int outputs_untouched(const Forward *f) {
    int same = f->loss == -77.0f && f->weights[0] == -77.0f && f->weights[1] == -77.0f &&
               f->weight_sum == -77.0;
    for (int i = 0; i < 4; i++) {
        same = same && f->grad[i] == -77.0f;
    }
    return same;
}

/* Runs a forward call that must fail; checks status, message, state and outputs. */
static void failing_forward(const CbceLoss *loss, Forward *f, CbceStatus expected,
                            const char *needle, const char *what) {
    uint8_t before[STATE_MAX], after[STATE_MAX];
    size_t size = state_of(loss, before);
    check_status(forward_call(loss, f), expected, needle, what);
    check(state_of(loss, after) == size && memcmp(before, after, size) == 0, what);
    check(outputs_untouched(f), what);
}

static void check_forward(void) {
    /* Decay 0 and counts [1, 3]: prevalences [1/4, 3/4], weights [1.5, 0.5]. Row 0 has logits
     * [ln 3, 0] and label 0 (softmax [3/4, 1/4]), row 1 [0, 0] and label 1: the mean is
     * (1.5 ln(4/3) + 0.5 ln 2) / 2 and its gradient [-0.1875, 0.1875, 0.125, -0.125]. */
    CbceLoss *loss = make(2, 0.0);
    const int64_t counts[2] = {1, 3};
    check_status(cbce_update_from_counts(loss, counts, 2), CBCE_STATUS_OK, NULL, "counts");
    Forward f;
    forward_init(&f);
    f.options.update_prevalences = 0;
    check_status(forward_call(loss, &f), CBCE_STATUS_OK, NULL, "valid forward");
    double expected = (1.5 * log(4.0 / 3.0) + 0.5 * log(2.0)) / 2.0;
    check(fabs(f.loss - expected) < 1e-6, "hand-worked mean");
    const float grad[4] = {-0.1875f, 0.1875f, 0.125f, -0.125f};
    for (int i = 0; i < 4; i++) {
        check(fabsf(f.grad[i] - grad[i]) < 1e-6f, "hand-worked gradient");
    }
    check(fabsf(f.weights[0] - 1.5f) < 1e-6f && fabsf(f.weights[1] - 0.5f) < 1e-6f, "weights");

    /* Hostile arguments, one at a time; each call would also update (update_prevalences 1). */
    forward_init(&f);
    f.logits_t.dtype.code = 9;
    failing_forward(loss, &f, CBCE_STATUS_UNSUPPORTED_DTYPE, "code 9", "dtype code 9");
    forward_init(&f);
    f.logits_t.ndim = 33;
    failing_forward(loss, &f, CBCE_STATUS_INVALID_LAYOUT, "ndim is 33", "ndim 33");
    forward_init(&f);
    f.logits_shape[0] = -2;
    failing_forward(loss, &f, CBCE_STATUS_INVALID_LAYOUT, "extent -2", "negative extent");
    forward_init(&f);
    int64_t huge[2] = {INT64_C(1) << 40, INT64_C(1) << 40};
    f.logits_t.shape = huge;
    failing_forward(loss, &f, CBCE_STATUS_INVALID_LAYOUT, "overflows", "overflowing shape");
    forward_init(&f);
    f.logits_t.byte_offset = 2;
    failing_forward(loss, &f, CBCE_STATUS_INVALID_LAYOUT, "not aligned", "misaligned offset");
    forward_init(&f);
    f.logits_t.byte_offset = UINT64_MAX - 1;
    failing_forward(loss, &f, CBCE_STATUS_INVALID_LAYOUT, "overflows", "offset overflow");
    forward_init(&f);
    f.labels[1] = 5;
    failing_forward(loss, &f, CBCE_STATUS_LABEL_OUT_OF_RANGE, "label 5 at position [1]",
                    "int64 label 5");
    forward_init(&f);
    int32_t labels32[2] = {-1, 0};
    f.labels_t = tensor(labels32, CBCE_DTYPE_INT, 32, 1, f.labels_shape, NULL);
    failing_forward(loss, &f, CBCE_STATUS_LABEL_OUT_OF_RANGE, "label -1 at position [0]",
                    "int32 label -1");
    forward_init(&f);
    uint8_t labels8[2] = {0, 255};
    f.labels_t = tensor(labels8, CBCE_DTYPE_UINT, 8, 1, f.labels_shape, NULL);
    failing_forward(loss, &f, CBCE_STATUS_LABEL_OUT_OF_RANGE, "label 255", "uint8 label 255");
    forward_init(&f);
    int64_t zero_strides[2] = {0, 1};
    f.grad_t.strides = zero_strides;
    failing_forward(loss, &f, CBCE_STATUS_INVALID_LAYOUT, "overlap", "overlapping grad");
    forward_init(&f);
    f.grad_t.data = f.logits;
    failing_forward(loss, &f, CBCE_STATUS_INVALID_LAYOUT, "`logits`", "grad aliasing logits");
    forward_init(&f);
    f.logits_t.data = NULL;
    failing_forward(loss, &f, CBCE_STATUS_NULL_POINTER, "`logits`", "NULL logits data");
    forward_init(&f);
    f.options.reduction = 7;
    failing_forward(loss, &f, CBCE_STATUS_INVALID_ARGUMENT, "reduction", "reduction 7");
    forward_init(&f);
    f.options.label_smoothing = 2.0;
    failing_forward(loss, &f, CBCE_STATUS_INVALID_ARGUMENT, "label_smoothing", "smoothing 2");
    forward_init(&f);
    f.logits_t.device.device_type = CBCE_DEVICE_CUDA;
    failing_forward(loss, &f, CBCE_STATUS_DEVICE_MISMATCH, "device type 2", "cuda logits");
    forward_init(&f);
    f.labels_shape[0] = 1;
    failing_forward(loss, &f, CBCE_STATUS_SHAPE_MISMATCH, "target has shape [1]", "shape");

    forward_init(&f);
    uint8_t before[STATE_MAX], after[STATE_MAX];
    size_t size = state_of(loss, before);
    check_status(
        cbce_forward(loss, &f.logits_t, &f.labels_t, NULL, &f.loss_t, NULL, f.weights, 3, NULL),
        CBCE_STATUS_BUFFER_LENGTH, "`weights_used` has length 3", "weights length");
    check(state_of(loss, after) == size && memcmp(before, after, size) == 0, "weights length");
    cbce_free(loss);
}

static void check_strided(void) {
    /* (N, C, H, W) = (2, 3, 2, 2) logits, contiguous and channels-last, and reversed labels. */
    float contiguous[24], channels_last[24];
    int64_t labels[8], reversed[8];
    for (int i = 0; i < 24; i++) {
        contiguous[i] = (float)((i * 7) % 11) * 0.3f - 1.5f;
    }
    for (int n = 0; n < 2; n++) {
        for (int c = 0; c < 3; c++) {
            for (int p = 0; p < 4; p++) {
                channels_last[n * 12 + p * 3 + c] = contiguous[n * 12 + c * 4 + p];
            }
        }
    }
    for (int i = 0; i < 8; i++) {
        labels[i] = (i * 5) % 3;
        reversed[7 - i] = labels[i];
    }
    int64_t shape[4] = {2, 3, 2, 2}, nhwc[4] = {12, 1, 6, 3};
    int64_t labels_shape[3] = {2, 2, 2}, backwards[3] = {-4, -2, -1};
    CbceLoss *a = make(3, 0.9), *b = make(3, 0.9);
    float loss_a = 0, loss_b = 0;
    CbceTensor la = tensor(contiguous, CBCE_DTYPE_FLOAT, 32, 4, shape, NULL);
    CbceTensor lb = tensor(channels_last, CBCE_DTYPE_FLOAT, 32, 4, shape, nhwc);
    CbceTensor ta = tensor(labels, CBCE_DTYPE_INT, 64, 3, labels_shape, NULL);
    /* Element 0 of the reversed labels is the last of the buffer: byte_offset 7 * 8. */
    CbceTensor tb = tensor(reversed, CBCE_DTYPE_INT, 64, 3, labels_shape, backwards);
    tb.byte_offset = 7 * sizeof(int64_t);
    CbceTensor oa = tensor(&loss_a, CBCE_DTYPE_FLOAT, 32, 0, NULL, NULL);
    CbceTensor ob = tensor(&loss_b, CBCE_DTYPE_FLOAT, 32, 0, NULL, NULL);
    check_status(cbce_forward(a, &la, &ta, NULL, &oa, NULL, NULL, 0, NULL), CBCE_STATUS_OK, NULL,
                 "contiguous forward");
    check_status(cbce_forward(b, &lb, &tb, NULL, &ob, NULL, NULL, 0, NULL), CBCE_STATUS_OK, NULL,
                 "strided forward");
    check(fabsf(loss_a - loss_b) <= 1e-6f * fabsf(loss_a), "strided loss equals contiguous");
    uint8_t sa[STATE_MAX], sb[STATE_MAX];
    size_t na = state_of(a, sa), nb = state_of(b, sb);
    check(na == nb && memcmp(sa, sb, na) == 0, "strided update equals contiguous");
    cbce_free(a);
    cbce_free(b);
}

static void check_state_and_counts(void) {
    CbceLoss *loss = make(3, 0.9), *other = make(4, 0.9);
    const int64_t counts[3] = {2, 1, 0};
    cbce_update_from_counts(loss, counts, 3);
    uint8_t good[STATE_MAX], blob[STATE_MAX], now[STATE_MAX];
    size_t size = state_of(loss, good);
    memcpy(blob, good, size);
    check_status(cbce_set_state(loss, blob, size - 1), CBCE_STATUS_INVALID_STATE, "bytes",
                 "truncated state");
    blob[30] ^= 0x20;
    check_status(cbce_set_state(loss, blob, size), CBCE_STATUS_INVALID_STATE, "checksum",
                 "corrupted state");
    size_t other_size = state_of(other, blob);
    check_status(cbce_set_state(loss, blob, other_size), CBCE_STATUS_INVALID_STATE, "for 4 classes",
                 "state of another C");
    check_status(cbce_set_state(loss, NULL, size), CBCE_STATUS_NULL_POINTER, "`buffer`",
                 "NULL state");
    const int64_t negative[3] = {1, -4, 0};
    check_status(cbce_update_from_counts(loss, negative, 3), CBCE_STATUS_INVALID_STATE,
                 "count -4 of class 1", "negative count");
    const int64_t overflowing[3] = {INT64_MAX, INT64_MAX, INT64_MAX};
    check_status(cbce_update_from_counts(loss, overflowing, 3), CBCE_STATUS_INVALID_STATE,
                 "overflows", "overflowing counts");
    float out[3];
    check_status(cbce_weights(loss, out, 2), CBCE_STATUS_BUFFER_LENGTH, "length 2 but 3",
                 "weights length");
    check(state_of(loss, now) == size && memcmp(good, now, size) == 0, "state unchanged");
    check_status(cbce_set_state(loss, good, size), CBCE_STATUS_OK, NULL, "restore state");
    cbce_free(loss);
    cbce_free(other);
    cbce_free(NULL);
}

/* Eight threads on one handle with decay 0: each update makes the state the one-hot vector of
 * its batch's class, so every state read, and the final one, has exactly one class at 1 and the
 * others at 0 (a torn update would mix two batches). */
enum { THREADS = 8, ITERATIONS = 200 };

typedef struct {
    CbceLoss *loss;
    int class_index;
    int bad_reads;
    int failures;
} Worker;

static int is_one_hot(const uint8_t *state, size_t size) {
    int ones = 0;
    for (size_t at = 24; at + 8 < size; at += 8) {
        double p;
        memcpy(&p, state + at, sizeof p);
        if (p == 1.0) {
            ones++;
        } else if (p != 0.0) {
            return 0;
        }
    }
    return ones == 1;
}

static void *work(void *argument) {
    Worker *w = argument;
    int64_t counts[THREADS] = {0};
    counts[w->class_index] = 1 + w->class_index;
    float logits[4 * THREADS];
    int64_t labels[4], shape[2] = {4, THREADS}, labels_shape[1] = {4};
    for (int i = 0; i < 4 * THREADS; i++) {
        logits[i] = (float)(i % 5) * 0.5f;
    }
    for (int i = 0; i < 4; i++) {
        labels[i] = w->class_index;
    }
    CbceTensor lt = tensor(logits, CBCE_DTYPE_FLOAT, 32, 2, shape, NULL);
    CbceTensor tt = tensor(labels, CBCE_DTYPE_INT, 64, 1, labels_shape, NULL);
    for (int i = 0; i < ITERATIONS; i++) {
        float loss = 0.0f;
        CbceTensor ot = tensor(&loss, CBCE_DTYPE_FLOAT, 32, 0, NULL, NULL);
        CbceForwardOptions options = cbce_forward_options_default();
        options.update_prevalences = i % 2;
        uint8_t state[24 + 8 * THREADS + 8];
        w->failures += cbce_update_from_counts(w->loss, counts, THREADS) != CBCE_STATUS_OK;
        w->failures +=
            cbce_forward(w->loss, &lt, &tt, &options, &ot, NULL, NULL, 0, NULL) != CBCE_STATUS_OK;
        w->failures += cbce_update(w->loss, &tt, -100) != CBCE_STATUS_OK;
        w->failures += cbce_get_state(w->loss, state, sizeof state, NULL) != CBCE_STATUS_OK;
        w->bad_reads += !is_one_hot(state, sizeof state);
    }
    return NULL;
}

static void check_threads(void) {
    CbceLoss *loss = make(THREADS, 0.0);
    int64_t every[THREADS];
    for (int t = 0; t < THREADS; t++) {
        every[t] = 1; /* Every class seen, so that each later state is one-hot. */
    }
    cbce_update_from_counts(loss, every, THREADS);
    pthread_t threads[THREADS];
    Worker workers[THREADS];
    for (int t = 0; t < THREADS; t++) {
        workers[t] = (Worker){loss, t, 0, 0};
        pthread_create(&threads[t], NULL, work, &workers[t]);
    }
    int bad = 0, failures = 0;
    for (int t = 0; t < THREADS; t++) {
        pthread_join(threads[t], NULL);
        bad += workers[t].bad_reads;
        failures += workers[t].failures;
    }
    check(failures == 0, "threads: every call succeeded");
    check(bad == 0, "threads: every state read is one serial state");
    uint8_t state[STATE_MAX];
    check(is_one_hot(state, state_of(loss, state)), "threads: final state is one serial state");
    cbce_free(loss);
}

int main(void) {
    check_new();
    check_forward();
    check_strided();
    check_state_and_counts();
    check_threads();
    printf("abi_check: %d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
