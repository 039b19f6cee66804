/*
 * The helpers of support.h. The reference loss and weights follow the README's formulas
 * directly, one position at a time in double precision, without any of the library's code.
 */
#include "support.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

CbceTensor example_tensor(void *data, CbceDataType dtype, int32_t ndim, int64_t *shape,
                          int64_t *strides) {
    CbceTensor tensor = {0};
    tensor.data = data;
    tensor.device.device_type = CBCE_DEVICE_CPU;
    tensor.device.device_id = 0;
    tensor.ndim = ndim;
    tensor.dtype = dtype;
    tensor.shape = shape;
    tensor.strides = strides;
    tensor.byte_offset = 0;
    return tensor;
}

void example_require_ok(CbceStatus status, const char *call) {
    if (status == CBCE_STATUS_OK) {
        return;
    }
    fprintf(stderr, "FAILED: %s\n  status %d (%s): %s\n", call, (int)status,
            cbce_status_string(status), cbce_last_error_message());
    exit(EXIT_FAILURE);
}

bool example_close(const char *what, double actual, double expected, double rel_tol,
                   double abs_tol) {
    double tolerance = fmax(abs_tol, rel_tol * fabs(expected));
    if (fabs(actual - expected) <= tolerance) {
        return true;
    }
    fprintf(stderr, "FAILED: %s is %.9g, expected %.9g (tolerance %.3g)\n", what, actual, expected,
            tolerance);
    return false;
}

static uint64_t next_u64(ExampleRng *rng) {
    rng->state += 0x9e3779b97f4a7c15u;
    uint64_t z = rng->state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

float example_uniform(ExampleRng *rng) {
    return (float)(next_u64(rng) >> 40) / 16777216.0f;
}

float example_normal(ExampleRng *rng) {
    float u = fmaxf(example_uniform(rng), 1e-7f);
    float v = example_uniform(rng);
    return sqrtf(-2.0f * logf(u)) * cosf(6.28318530718f * v);
}

int64_t example_class(ExampleRng *rng, const float *frequencies, size_t classes) {
    float u = example_uniform(rng);
    for (size_t c = 0; c + 1 < classes; c++) {
        if (u < frequencies[c]) {
            return (int64_t)c;
        }
        u -= frequencies[c];
    }
    return (int64_t)classes - 1;
}

/* The share of class `c` in the smoothed target distribution of a position labelled `label`. */
static double target_share(size_t c, int64_t label, size_t classes, double smoothing) {
    return smoothing / (double)classes + ((int64_t)c == label ? 1.0 - smoothing : 0.0);
}

double example_reference_loss(const ExampleProblem *problem, const float *logits,
                              const int64_t *labels, const float *weights, double *losses,
                              double *grad, double *weight_sum) {
    const size_t classes = problem->classes;
    const size_t positions = problem->positions;
    const double smoothing = problem->label_smoothing;
    double total = 0.0;
    double denominator = 0.0;

    for (size_t n = 0; n < problem->batch; n++) {
        for (size_t s = 0; s < positions; s++) {
            const float *x = logits + n * classes * positions + s;
            double *g = grad ? grad + n * classes * positions + s : NULL;
            int64_t label = labels[n * positions + s];
            if (label == problem->ignore_index) {
                for (size_t c = 0; g && c < classes; c++) {
                    g[c * positions] = 0.0;
                }
                if (losses) {
                    losses[n * positions + s] = 0.0;
                }
                continue;
            }

            double max = -INFINITY;
            for (size_t c = 0; c < classes; c++) {
                max = fmax(max, x[c * positions]);
            }
            double sum_exp = 0.0;
            for (size_t c = 0; c < classes; c++) {
                sum_exp += exp(x[c * positions] - max);
            }
            double log_sum_exp = max + log(sum_exp);
            double loss = 0.0;
            double target_weight = 0.0;
            for (size_t c = 0; c < classes; c++) {
                double q = target_share(c, label, classes, smoothing);
                loss += q * weights[c] * (log_sum_exp - x[c * positions]);
                target_weight += q * weights[c];
            }
            for (size_t c = 0; g && c < classes; c++) {
                double q = target_share(c, label, classes, smoothing);
                double probability = exp(x[c * positions] - log_sum_exp);
                g[c * positions] = probability * target_weight - q * weights[c];
            }

            if (losses) {
                losses[n * positions + s] = loss;
            }
            total += loss;
            denominator += weights[label];
        }
    }

    if (weight_sum) {
        *weight_sum = denominator;
    }
    if (problem->reduction == CBCE_REDUCTION_MEAN) {
        for (size_t i = 0; grad && i < problem->batch * classes * positions; i++) {
            grad[i] /= denominator;
        }
        return total / denominator;
    }
    return total;
}

void example_count_labels(const int64_t *labels, size_t count, int64_t ignore_index, size_t classes,
                          int64_t *counts) {
    for (size_t c = 0; c < classes; c++) {
        counts[c] = 0;
    }
    for (size_t i = 0; i < count; i++) {
        if (labels[i] != ignore_index && labels[i] >= 0 && labels[i] < (int64_t)classes) {
            counts[labels[i]]++;
        }
    }
}

void example_reference_update(double *prevalences, const int64_t *counts, size_t classes,
                              double ema_decay) {
    int64_t total = 0;
    for (size_t c = 0; c < classes; c++) {
        total += counts[c];
    }
    for (size_t c = 0; c < classes; c++) {
        if (isnan(prevalences[c]) && counts[c] > 0) {
            prevalences[c] = 1.0 / (double)classes;
        }
        if (!isnan(prevalences[c])) {
            double batch = total > 0 ? (double)counts[c] / (double)total : 0.0;
            prevalences[c] = prevalences[c] * ema_decay + batch * (1.0 - ema_decay);
        }
    }
}

void example_reference_weights(const double *prevalences, size_t classes, float *weights) {
    size_t seen = 0;
    for (size_t c = 0; c < classes; c++) {
        seen += !isnan(prevalences[c]);
    }
    double sum = 0.0;
    for (size_t c = 0; c < classes; c++) {
        float prevalence = seen ? (float)prevalences[c] : 1.0f;
        weights[c] = 1.0f / prevalence;
        sum += isnan(weights[c]) ? 0.0 : weights[c];
    }
    size_t n = seen ? seen : classes;
    float mean = (float)(sum / (double)n);
    double squares = 0.0;
    for (size_t c = 0; c < classes; c++) {
        squares += isnan(weights[c]) ? 0.0 : (weights[c] - mean) * (weights[c] - mean);
    }
    float deviation = n > 1 ? (float)sqrt(squares / (double)(n - 1)) : NAN;
    float low = mean - 3.0f * deviation;
    float high = mean + 3.0f * deviation;

    double total = 0.0;
    for (size_t c = 0; c < classes; c++) {
        float w = isfinite(weights[c]) ? weights[c] : mean;
        w = (isnan(low) || isnan(high)) ? NAN : fminf(fmaxf(w, low), high);
        weights[c] = isnan(w) ? 1.0f : w;
        total += weights[c];
    }
    for (size_t c = 0; c < classes; c++) {
        weights[c] = (float)((double)classes * weights[c] / total);
    }
}
