/*
 * Semantic segmentation in C: the loss of an (N, C, H, W) batch of logits against uint8 masks
 * in which 255 marks pixels without a label (object outlines here), as segmentation datasets
 * store them. It shows:
 *
 *   1. the mean loss and its gradient, updating the class prevalences from the masks (after
 *      cbce_update has counted them for a few epochs);
 *   2. one loss per pixel (reduction "none") with label smoothing, without an update;
 *   3. the same logits in channels-last memory, described by strides instead of copied;
 *   4. a mask with a label out of range, which fails, says where, and changes nothing.
 *
 * Each result is checked against support.c's plain implementation of the loss; the program exits
 * with status 1 on a mismatch.
 */
#include "support.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { N = 2, C = 5, H = 8, W = 10, PIXELS = H * W, IGNORE = 255 };

static const char *const CLASS_NAMES[C] = {"background", "road", "car", "person", "sign"};

/* Masks with a road on the lower half, a car whose outline is unlabelled, a person and, in the
 * first image, a sign. */
static void draw_masks(uint8_t masks[N][H][W]) {
    for (int n = 0; n < N; n++) {
        for (int h = 0; h < H; h++) {
            for (int w = 0; w < W; w++) {
                int left = 1 + 3 * n;
                bool in_car = h >= 2 && h <= 6 && w >= left && w <= left + 4;
                bool on_outline = in_car && (h == 2 || h == 6 || w == left || w == left + 4);
                uint8_t label = h >= H / 2 ? 1 : 0;
                label = in_car ? 2 : label;
                label = on_outline ? IGNORE : label;
                label = (h == 1 && w == 8) ? 3 : label;
                label = (n == 0 && h == 0 && w == 0) ? 4 : label;
                masks[n][h][w] = label;
            }
        }
    }
}

/* Logits of a model that is partly right: noise, plus a margin for the labelled class. */
static void make_logits(float logits[N][C][H][W], uint8_t masks[N][H][W], ExampleRng *rng) {
    for (int n = 0; n < N; n++) {
        for (int c = 0; c < C; c++) {
            for (int h = 0; h < H; h++) {
                for (int w = 0; w < W; w++) {
                    float margin = masks[n][h][w] == c ? 1.5f : 0.0f;
                    logits[n][c][h][w] = example_normal(rng) + margin;
                }
            }
        }
    }
}

/* Checks the gradient of one call: as the reference's, zero on unlabelled pixels, and summing
 * to zero over the classes of every pixel (softmax gradients do). */
static int check_grad(float grad[N][C][H][W], const double *expected, uint8_t masks[N][H][W]) {
    int failures = 0;
    char what[64];
    for (int n = 0; n < N; n++) {
        for (int h = 0; h < H; h++) {
            for (int w = 0; w < W; w++) {
                double over_classes = 0.0;
                for (int c = 0; c < C; c++) {
                    size_t i = (((size_t)n * C + c) * H + h) * W + w;
                    snprintf(what, sizeof what, "gradient at (%d, %d, %d, %d)", n, c, h, w);
                    failures +=
                        !example_close(what, grad[n][c][h][w], expected[i], EXAMPLE_REL_TOL, 1e-8);
                    if (masks[n][h][w] == IGNORE && grad[n][c][h][w] != 0.0f) {
                        fprintf(stderr, "FAILED: nonzero %s on an unlabelled pixel\n", what);
                        failures++;
                    }
                    over_classes += grad[n][c][h][w];
                }
                snprintf(what, sizeof what, "gradient sum over classes at (%d, %d, %d)", n, h, w);
                failures += !example_close(what, over_classes, 0.0, 0.0, 1e-7);
            }
        }
    }
    return failures;
}

int main(void) {
    static uint8_t masks[N][H][W];
    static int64_t labels[N * PIXELS];
    static float logits[N][C][H][W];
    static float logits_channels_last[N][H][W][C];
    static float grad[N][C][H][W];
    static float pixel_losses[N][H][W];
    static double expected_grad[N * C * PIXELS];
    static double expected_losses[N * PIXELS];
    char what[64];
    int failures = 0;

    ExampleRng rng = {2024};
    draw_masks(masks);
    make_logits(logits, masks, &rng);
    for (size_t i = 0; i < N * PIXELS; i++) {
        labels[i] = (&masks[0][0][0])[i];
    }

    CbceConfig config = cbce_config_default();
    config.num_classes = C;
    CbceLoss *loss = NULL;
    EXAMPLE_CALL(cbce_new(&config, &loss));

    int64_t logits_shape[4] = {N, C, H, W};
    int64_t mask_shape[3] = {N, H, W};
    CbceTensor logits_tensor = example_tensor(logits, EXAMPLE_FLOAT32, 4, logits_shape, NULL);
    CbceTensor grad_tensor = example_tensor(grad, EXAMPLE_FLOAT32, 4, logits_shape, NULL);
    CbceTensor mask_tensor = example_tensor(masks, EXAMPLE_UINT8, 3, mask_shape, NULL);

    /* The prevalences as they would be after a few epochs over these masks. */
    for (int epoch = 0; epoch < 200; epoch++) {
        EXAMPLE_CALL(cbce_update(loss, &mask_tensor, IGNORE));
    }

    /* 1. The mean loss and its gradient, updating the prevalences from the masks. */
    float mean_loss = 0.0f;
    float weights[C];
    double weight_sum = 0.0;
    CbceTensor mean_tensor = example_tensor(&mean_loss, EXAMPLE_FLOAT32, 0, NULL, NULL);
    CbceForwardOptions options = cbce_forward_options_default();
    options.ignore_index = IGNORE;
    EXAMPLE_CALL(cbce_forward(loss, &logits_tensor, &mask_tensor, &options, &mean_tensor,
                              &grad_tensor, weights, C, &weight_sum));

    float prevalences[C];
    int64_t counts[C];
    EXAMPLE_CALL(cbce_prevalences(loss, prevalences, C));
    example_count_labels(labels, N * PIXELS, IGNORE, C, counts);
    printf("cbce %s segmentation: logits (%d, %d, %d, %d), uint8 masks, ignore index %d\n",
           cbce_version(), N, C, H, W, IGNORE);
    printf("%-12s %6s %11s %8s\n", "class", "pixels", "prevalence", "weight");
    for (int c = 0; c < C; c++) {
        printf("%-12s %6lld %11.4f %8.3f\n", CLASS_NAMES[c], (long long)counts[c], prevalences[c],
               weights[c]);
    }

    ExampleProblem problem = {N, C, PIXELS, IGNORE, 0.0, CBCE_REDUCTION_MEAN};
    double expected_weight_sum = 0.0;
    double expected = example_reference_loss(&problem, &logits[0][0][0][0], labels, weights, NULL,
                                             expected_grad, &expected_weight_sum);
    printf("mean loss %.6f over %.3f units of weight\n", mean_loss, weight_sum);
    failures += !example_close("mean loss", mean_loss, expected, EXAMPLE_REL_TOL, EXAMPLE_ABS_TOL);
    failures += !example_close("weight sum", weight_sum, expected_weight_sum, 1e-6, 0.0);
    failures += check_grad(grad, expected_grad, masks);

    /* 2. One loss per pixel, with label smoothing and the weights as they are. */
    int64_t losses_shape[3] = {N, H, W};
    CbceTensor losses_tensor = example_tensor(pixel_losses, EXAMPLE_FLOAT32, 3, losses_shape, NULL);
    CbceForwardOptions per_pixel = options;
    per_pixel.reduction = CBCE_REDUCTION_NONE;
    per_pixel.update_prevalences = 0;
    per_pixel.label_smoothing = 0.1;
    EXAMPLE_CALL(cbce_forward(loss, &logits_tensor, &mask_tensor, &per_pixel, &losses_tensor, NULL,
                              NULL, 0, NULL));

    problem.reduction = CBCE_REDUCTION_NONE;
    problem.label_smoothing = per_pixel.label_smoothing;
    example_reference_loss(&problem, &logits[0][0][0][0], labels, weights, expected_losses, NULL,
                           NULL);
    printf("per-pixel losses of image 0 (x10, '.' = unlabelled):\n");
    for (int h = 0; h < H; h++) {
        printf("  ");
        for (int w = 0; w < W; w++) {
            float value = pixel_losses[0][h][w];
            if (masks[0][h][w] == IGNORE) {
                printf("   .");
            } else {
                printf("%4.0f", 10.0f * value);
            }
        }
        printf("\n");
    }
    for (size_t i = 0; i < N * PIXELS; i++) {
        snprintf(what, sizeof what, "loss of pixel %zu", i);
        failures += !example_close(what, (&pixel_losses[0][0][0])[i], expected_losses[i],
                                   EXAMPLE_REL_TOL, EXAMPLE_ABS_TOL);
    }

    /* 3. Channels-last memory (N, H, W, C), described as (N, C, H, W) by its strides. */
    for (int n = 0; n < N; n++) {
        for (int c = 0; c < C; c++) {
            for (int h = 0; h < H; h++) {
                for (int w = 0; w < W; w++) {
                    logits_channels_last[n][h][w][c] = logits[n][c][h][w];
                }
            }
        }
    }
    int64_t channels_last_strides[4] = {H * W * C, 1, W * C, C};
    CbceTensor channels_last = example_tensor(logits_channels_last, EXAMPLE_FLOAT32, 4,
                                              logits_shape, channels_last_strides);
    float channels_last_loss = 0.0f;
    CbceTensor channels_last_loss_tensor =
        example_tensor(&channels_last_loss, EXAMPLE_FLOAT32, 0, NULL, NULL);
    CbceForwardOptions no_update = options;
    no_update.update_prevalences = 0;
    EXAMPLE_CALL(cbce_forward(loss, &channels_last, &mask_tensor, &no_update,
                              &channels_last_loss_tensor, NULL, NULL, 0, NULL));
    printf("channels-last mean loss %.6f\n", channels_last_loss);
    failures += !example_close("channels-last mean loss", channels_last_loss, expected,
                               EXAMPLE_REL_TOL, EXAMPLE_ABS_TOL);

    /* 4. A label out of range fails before anything changes: same state, outputs untouched. */
    static uint8_t bad_masks[N][H][W];
    memcpy(bad_masks, masks, sizeof masks);
    bad_masks[1][3][7] = 7;
    CbceTensor bad_tensor = example_tensor(bad_masks, EXAMPLE_UINT8, 3, mask_shape, NULL);
    float untouched = -1.0f;
    CbceTensor untouched_tensor = example_tensor(&untouched, EXAMPLE_FLOAT32, 0, NULL, NULL);
    CbceStatus status = cbce_forward(loss, &logits_tensor, &bad_tensor, &options, &untouched_tensor,
                                     NULL, NULL, 0, NULL);
    printf("a mask with label 7: %s: %s\n", cbce_status_string(status), cbce_last_error_message());
    float prevalences_after[C];
    EXAMPLE_CALL(cbce_prevalences(loss, prevalences_after, C));
    if (status != CBCE_STATUS_LABEL_OUT_OF_RANGE || untouched != -1.0f ||
        memcmp(prevalences, prevalences_after, sizeof prevalences) != 0) {
        fprintf(stderr,
                "FAILED: the bad mask gave status %d, the output %g, or moved the "
                "prevalences\n",
                (int)status, untouched);
        failures++;
    }

    cbce_free(loss);
    if (failures) {
        fprintf(stderr, "segmentation: %d checks failed\n", failures);
        return EXIT_FAILURE;
    }
    printf("segmentation: every result matches the reference\n");
    return EXIT_SUCCESS;
}
