/*
 * Helpers shared by the C examples: describing host arrays as CbceTensor, stopping on a failed
 * call with the library's message, deterministic random data, and a plain double-precision
 * implementation of the loss (the README's formulas) that the examples check the library's
 * results against.
 */
#ifndef CBCE_EXAMPLE_SUPPORT_H
#define CBCE_EXAMPLE_SUPPORT_H

#include <cbce.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Element types of host arrays, as CbceTensor's dtype field takes them. */
#define EXAMPLE_FLOAT32 ((CbceDataType){CBCE_DTYPE_FLOAT, 32, 1})
#define EXAMPLE_FLOAT64 ((CbceDataType){CBCE_DTYPE_FLOAT, 64, 1})
#define EXAMPLE_INT64 ((CbceDataType){CBCE_DTYPE_INT, 64, 1})
#define EXAMPLE_INT32 ((CbceDataType){CBCE_DTYPE_INT, 32, 1})
#define EXAMPLE_UINT8 ((CbceDataType){CBCE_DTYPE_UINT, 8, 1})

/* A descriptor of a host array; strides NULL means contiguous row-major. The descriptor
 * borrows `shape` and `strides`, which must outlive its use. */
CbceTensor example_tensor(void *data, CbceDataType dtype, int32_t ndim, int64_t *shape,
                          int64_t *strides);

/* Stops the program with the status and the library's message if `status` is not OK. */
void example_require_ok(CbceStatus status, const char *call);
#define EXAMPLE_CALL(call) example_require_ok((call), #call)

/* True if `actual` is within max(abs_tol, rel_tol * |expected|) of `expected`; prints the
 * mismatch otherwise. */
bool example_close(const char *what, double actual, double expected, double rel_tol,
                   double abs_tol);

/* Tolerances of float32 results against the double-precision reference. */
#define EXAMPLE_REL_TOL 1e-5
#define EXAMPLE_ABS_TOL 1e-6

/* A deterministic pseudo-random generator (SplitMix64), so every run computes the same. */
typedef struct ExampleRng {
    uint64_t state;
} ExampleRng;

float example_uniform(ExampleRng *rng);
float example_normal(ExampleRng *rng);
/* A class drawn with the given frequencies, which sum to 1. */
int64_t example_class(ExampleRng *rng, const float *frequencies, size_t classes);

/* A loss problem laid out contiguously: logits (batch, classes, positions) and labels
 * (batch, positions), where positions is the product of the spatial extents (1 without). */
typedef struct ExampleProblem {
    size_t batch;
    size_t classes;
    size_t positions;
    int64_t ignore_index;
    double label_smoothing;
    int32_t reduction;
} ExampleProblem;

/* The reduced loss of `problem` with class weights `weights` (for CBCE_REDUCTION_NONE, the sum
 * of the losses). `losses` (batch * positions) and `grad` (the logits' size) are optional
 * outputs: every position's loss, and the gradient of the reduced loss (for "none", of the sum
 * of the losses). `weight_sum` (optional) gets the denominator of "mean". */
double example_reference_loss(const ExampleProblem *problem, const float *logits,
                              const int64_t *labels, const float *weights, double *losses,
                              double *grad, double *weight_sum);

/* Per-class counts of the labels in [0, classes) other than `ignore_index`. */
void example_count_labels(const int64_t *labels, size_t count, int64_t ignore_index, size_t classes,
                          int64_t *counts);

/* One update of running prevalences (NAN for an unseen class) from per-class counts. */
void example_reference_update(double *prevalences, const int64_t *counts, size_t classes,
                              double ema_decay);

/* The class weights of running prevalences (NAN for unseen), without a prevalence floor. */
void example_reference_weights(const double *prevalences, size_t classes, float *weights);

#endif /* CBCE_EXAMPLE_SUPPORT_H */
