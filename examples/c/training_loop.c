/*
 * A training loop in C: a linear classifier on synthetic, imbalanced data whose class
 * frequencies shift half-way, trained by gradient descent with the loss and the gradient that
 * one cbce_forward call returns. It prints the loss, the running prevalences and the class
 * weights as they adapt.
 *
 * Every step is checked against support.c's plain implementation of the README's formulas:
 * the prevalences, the weights, the loss and the gradient. The program exits with status 1 on a
 * mismatch, so CTest runs it as a test.
 */
#include "support.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { CLASSES = 4, FEATURES = 8, BATCH = 256, STEPS = 40, SHIFT_STEP = STEPS / 2 };

/* Class 3 is rare at first; from SHIFT_STEP on it is common and class 0 is rare. */
static const float FREQUENCIES_BEFORE[CLASSES] = {0.6f, 0.25f, 0.13f, 0.02f};
static const float FREQUENCIES_AFTER[CLASSES] = {0.02f, 0.25f, 0.13f, 0.6f};

static void print_row(const float *values) {
    for (size_t c = 0; c < CLASSES; c++) {
        printf(" %6.3f", values[c]);
    }
}

/* Compares this step's results with the reference; returns the number of mismatches. */
static int check_step(int step, const float *logits, const int64_t *target, float loss_value,
                      const float *grad, const float *weights_used, const double *prevalences,
                      CbceLoss *loss) {
    int failures = 0;
    char what[64];

    float reported[CLASSES];
    float expected_weights[CLASSES];
    EXAMPLE_CALL(cbce_prevalences(loss, reported, CLASSES));
    example_reference_weights(prevalences, CLASSES, expected_weights);
    for (size_t c = 0; c < CLASSES; c++) {
        snprintf(what, sizeof what, "step %d prevalence of class %zu", step, c);
        failures += !example_close(what, reported[c], prevalences[c], 1e-6, 1e-9);
        snprintf(what, sizeof what, "step %d weight of class %zu", step, c);
        failures += !example_close(what, weights_used[c], expected_weights[c], 1e-5, 1e-7);
    }

    const ExampleProblem problem = {
        BATCH, CLASSES, 1, CBCE_DEFAULT_IGNORE_INDEX, 0.0, CBCE_REDUCTION_MEAN};
    static double expected_grad[BATCH * CLASSES];
    double expected =
        example_reference_loss(&problem, logits, target, weights_used, NULL, expected_grad, NULL);
    snprintf(what, sizeof what, "step %d loss", step);
    failures += !example_close(what, loss_value, expected, EXAMPLE_REL_TOL, EXAMPLE_ABS_TOL);
    for (size_t i = 0; i < BATCH * CLASSES; i++) {
        snprintf(what, sizeof what, "step %d gradient element %zu", step, i);
        failures += !example_close(what, grad[i], expected_grad[i], EXAMPLE_REL_TOL, 1e-8);
    }
    return failures;
}

int main(void) {
    CbceConfig config = cbce_config_default();
    config.num_classes = CLASSES;
    config.ema_decay = 0.9;
    CbceLoss *loss = NULL;
    EXAMPLE_CALL(cbce_new(&config, &loss));

    /* The model, the data of one batch, and the loss's outputs, all in host arrays. */
    static float centres[CLASSES][FEATURES];
    static float model[FEATURES][CLASSES];
    static float bias[CLASSES];
    static float features[BATCH][FEATURES];
    static float logits[BATCH][CLASSES];
    static float grad[BATCH][CLASSES];
    static int64_t target[BATCH];
    float loss_value = 0.0f;
    float weights_used[CLASSES];
    const float learning_rate = 0.5f;

    int64_t logits_shape[2] = {BATCH, CLASSES};
    int64_t target_shape[1] = {BATCH};
    CbceTensor logits_tensor = example_tensor(logits, EXAMPLE_FLOAT32, 2, logits_shape, NULL);
    CbceTensor grad_tensor = example_tensor(grad, EXAMPLE_FLOAT32, 2, logits_shape, NULL);
    CbceTensor target_tensor = example_tensor(target, EXAMPLE_INT64, 1, target_shape, NULL);
    CbceTensor loss_tensor = example_tensor(&loss_value, EXAMPLE_FLOAT32, 0, NULL, NULL);
    CbceForwardOptions options = cbce_forward_options_default();

    ExampleRng rng = {7};
    for (size_t c = 0; c < CLASSES; c++) {
        for (size_t j = 0; j < FEATURES; j++) {
            centres[c][j] = 2.0f * example_normal(&rng);
        }
    }
    double prevalences[CLASSES] = {NAN, NAN, NAN, NAN};
    float weights_before_shift[CLASSES] = {0};
    float first_loss = 0.0f;
    double late_loss = 0.0;
    int failures = 0;

    printf("cbce %s training loop: %d classes, batches of %d\n", cbce_version(), CLASSES, BATCH);
    printf("step     loss   prevalences                    weights\n");
    for (int step = 0; step < STEPS; step++) {
        const float *frequencies = step < SHIFT_STEP ? FREQUENCIES_BEFORE : FREQUENCIES_AFTER;
        for (size_t i = 0; i < BATCH; i++) {
            target[i] = example_class(&rng, frequencies, CLASSES);
            for (size_t j = 0; j < FEATURES; j++) {
                features[i][j] = centres[target[i]][j] + 1.5f * example_normal(&rng);
            }
            for (size_t c = 0; c < CLASSES; c++) {
                float z = bias[c];
                for (size_t j = 0; j < FEATURES; j++) {
                    z += features[i][j] * model[j][c];
                }
                logits[i][c] = z;
            }
        }

        EXAMPLE_CALL(cbce_forward(loss, &logits_tensor, &target_tensor, &options, &loss_tensor,
                                  &grad_tensor, weights_used, CLASSES, NULL));

        int64_t counts[CLASSES];
        example_count_labels(target, BATCH, CBCE_DEFAULT_IGNORE_INDEX, CLASSES, counts);
        example_reference_update(prevalences, counts, CLASSES, config.ema_decay);
        failures += check_step(step, &logits[0][0], target, loss_value, &grad[0][0], weights_used,
                               prevalences, loss);

        /* Gradient descent on the model: d(loss)/d(model) = features^T grad. */
        for (size_t c = 0; c < CLASSES; c++) {
            float bias_grad = 0.0f;
            for (size_t i = 0; i < BATCH; i++) {
                bias_grad += grad[i][c];
            }
            bias[c] -= learning_rate * bias_grad;
            for (size_t j = 0; j < FEATURES; j++) {
                float model_grad = 0.0f;
                for (size_t i = 0; i < BATCH; i++) {
                    model_grad += features[i][j] * grad[i][c];
                }
                model[j][c] -= learning_rate * model_grad;
            }
        }

        if (step == 0) {
            first_loss = loss_value;
        }
        if (step == SHIFT_STEP - 1) {
            for (size_t c = 0; c < CLASSES; c++) {
                weights_before_shift[c] = weights_used[c];
            }
        }
        if (step >= STEPS - 5) {
            late_loss += loss_value / 5.0;
        }
        if (step % 4 == 0 || step == STEPS - 1) {
            float reported[CLASSES];
            EXAMPLE_CALL(cbce_prevalences(loss, reported, CLASSES));
            printf("%4d  %7.4f  ", step, loss_value);
            print_row(reported);
            printf("  ");
            print_row(weights_used);
            printf("\n");
        }
    }

    /* With a zero model every class has probability 1/C, so the first loss is ln(C) whatever
     * the weights; training must bring it well below that. */
    failures += !example_close("first loss", first_loss, log((double)CLASSES), 1e-6, 0.0);
    if (!(late_loss < 0.5 * first_loss)) {
        fprintf(stderr,
                "FAILED: the mean loss of the last 5 steps, %.4f, is not below half of "
                "the first, %.4f\n",
                late_loss, first_loss);
        failures++;
    }
    /* The rare class takes the larger weight, before the shift and after it. */
    if (!(weights_before_shift[3] > weights_before_shift[0] && weights_used[0] > weights_used[3])) {
        fprintf(stderr,
                "FAILED: the weights did not follow the shift: class 0 and 3 weighed "
                "%.3f and %.3f before it, %.3f and %.3f at the end\n",
                weights_before_shift[0], weights_before_shift[3], weights_used[0], weights_used[3]);
        failures++;
    }

    cbce_free(loss);
    if (failures) {
        fprintf(stderr, "training_loop: %d checks failed\n", failures);
        return EXIT_FAILURE;
    }
    printf("training_loop: every step matches the reference\n");
    return EXIT_SUCCESS;
}
