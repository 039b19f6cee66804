/*
 * Saving the running state in a checkpoint and resuming from it, in C. A training run updates
 * the class prevalences for a few steps and writes them with cbce_get_state to a file; a resumed
 * run makes a new loss with the same configuration and reads them back with cbce_set_state.
 * The batches have float64 logits and int32 labels.
 *
 * Checks: the resumed loss reports exactly the prevalences and weights of the original, and
 * the two give bit-identical losses on the steps that follow, where a fresh loss does not; a
 * damaged or truncated state, or one for another number of classes, is refused with
 * CBCE_STATUS_INVALID_STATE and changes nothing. Exits with status 1 on a failed check.
 *
 * Usage: checkpoint [FILE]    (default: cbce_checkpoint.bin in the current directory)
 */
#include "support.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { CLASSES = 6, BATCH = 64, STEPS_BEFORE = 8, STEPS_AFTER = 5 };

static const float FREQUENCIES[CLASSES] = {0.4f, 0.25f, 0.15f, 0.1f, 0.07f, 0.03f};

/* One batch of random logits and labels drawn with FREQUENCIES. */
static void draw_batch(ExampleRng *rng, double logits[BATCH][CLASSES], int32_t labels[BATCH]) {
    for (size_t i = 0; i < BATCH; i++) {
        labels[i] = (int32_t)example_class(rng, FREQUENCIES, CLASSES);
        for (size_t c = 0; c < CLASSES; c++) {
            logits[i][c] = example_normal(rng) + ((int32_t)c == labels[i] ? 1.0 : 0.0);
        }
    }
}

/* The mean loss of one batch, updating the prevalences. */
static double train_step(CbceLoss *loss, double logits[BATCH][CLASSES], int32_t labels[BATCH]) {
    int64_t logits_shape[2] = {BATCH, CLASSES};
    int64_t labels_shape[1] = {BATCH};
    CbceTensor logits_tensor = example_tensor(logits, EXAMPLE_FLOAT64, 2, logits_shape, NULL);
    CbceTensor labels_tensor = example_tensor(labels, EXAMPLE_INT32, 1, labels_shape, NULL);
    double value = 0.0;
    CbceTensor value_tensor = example_tensor(&value, EXAMPLE_FLOAT64, 0, NULL, NULL);
    EXAMPLE_CALL(cbce_forward(loss, &logits_tensor, &labels_tensor, NULL, &value_tensor, NULL, NULL,
                              0, NULL));
    return value;
}

static int save_state(const CbceLoss *loss, const char *path) {
    size_t size = 0;
    EXAMPLE_CALL(cbce_state_size(loss, &size));
    uint8_t *blob = malloc(size);
    size_t written = 0;
    EXAMPLE_CALL(cbce_get_state(loss, blob, size, &written));
    FILE *file = fopen(path, "wb");
    int ok = file && fwrite(blob, 1, written, file) == written;
    ok = file && fclose(file) == 0 && ok;
    free(blob);
    printf("saved %zu bytes of state to %s\n", written, path);
    return ok;
}

/* Reads a whole file into a new buffer; NULL if it cannot. */
static uint8_t *read_file(const char *path, size_t *len) {
    FILE *file = fopen(path, "rb");
    if (!file) {
        return NULL;
    }
    uint8_t *data = NULL;
    long end = fseek(file, 0, SEEK_END) == 0 ? ftell(file) : -1;
    if (end > 0 && fseek(file, 0, SEEK_SET) == 0) {
        data = malloc((size_t)end);
        if (data && fread(data, 1, (size_t)end, file) != (size_t)end) {
            free(data);
            data = NULL;
        }
    }
    fclose(file);
    *len = end > 0 ? (size_t)end : 0;
    return data;
}

/* True if the two losses of `classes` (at most CLASSES) classes report the same prevalences
 * and weights, bit for bit. */
static bool same_state(const CbceLoss *a, const CbceLoss *b, size_t classes) {
    float prevalences[2][CLASSES];
    float weights[2][CLASSES];
    EXAMPLE_CALL(cbce_prevalences(a, prevalences[0], classes));
    EXAMPLE_CALL(cbce_prevalences(b, prevalences[1], classes));
    EXAMPLE_CALL(cbce_weights(a, weights[0], classes));
    EXAMPLE_CALL(cbce_weights(b, weights[1], classes));
    return memcmp(prevalences[0], prevalences[1], classes * sizeof(float)) == 0 &&
           memcmp(weights[0], weights[1], classes * sizeof(float)) == 0;
}

/* Tries to restore a state that must be refused; returns the number of failed checks. */
static int expect_refused(CbceLoss *loss, const CbceLoss *unchanged_twin, const uint8_t *blob,
                          size_t len, const char *what) {
    CbceConfig config;
    EXAMPLE_CALL(cbce_get_config(loss, &config));
    CbceStatus status = cbce_set_state(loss, blob, len);
    printf("restoring %s: refused: %s\n", what, cbce_last_error_message());
    if (status != CBCE_STATUS_INVALID_STATE ||
        !same_state(loss, unchanged_twin, config.num_classes)) {
        fprintf(stderr, "FAILED: %s gave status %d or changed the state\n", what, (int)status);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "cbce_checkpoint.bin";
    static double logits[BATCH][CLASSES];
    static int32_t labels[BATCH];
    ExampleRng rng = {99};
    int failures = 0;

    CbceConfig config = cbce_config_default();
    config.num_classes = CLASSES;
    config.ema_decay = 0.95;
    CbceLoss *original = NULL;
    EXAMPLE_CALL(cbce_new(&config, &original));
    printf("cbce %s checkpoint: %d classes, batches of %d\n", cbce_version(), CLASSES, BATCH);
    for (int step = 0; step < STEPS_BEFORE; step++) {
        draw_batch(&rng, logits, labels);
        printf("step %2d  loss %.6f\n", step, train_step(original, logits, labels));
    }
    if (!save_state(original, path)) {
        fprintf(stderr, "FAILED: cannot write %s\n", path);
        return EXIT_FAILURE;
    }

    /* The resumed run: a loss made from the same configuration, then the saved state. */
    CbceConfig saved_config;
    EXAMPLE_CALL(cbce_get_config(original, &saved_config));
    CbceLoss *resumed = NULL;
    CbceLoss *fresh = NULL;
    EXAMPLE_CALL(cbce_new(&saved_config, &resumed));
    EXAMPLE_CALL(cbce_new(&saved_config, &fresh));
    size_t len = 0;
    uint8_t *blob = read_file(path, &len);
    if (!blob) {
        fprintf(stderr, "FAILED: cannot read %s\n", path);
        return EXIT_FAILURE;
    }
    EXAMPLE_CALL(cbce_set_state(resumed, blob, len));
    if (!same_state(original, resumed, CLASSES) || same_state(original, fresh, CLASSES)) {
        fprintf(stderr, "FAILED: the resumed state differs from the saved one, or a fresh loss "
                        "already has it\n");
        failures++;
    }

    for (int step = STEPS_BEFORE; step < STEPS_BEFORE + STEPS_AFTER; step++) {
        draw_batch(&rng, logits, labels);
        double continued = train_step(original, logits, labels);
        double from_checkpoint = train_step(resumed, logits, labels);
        double from_scratch = train_step(fresh, logits, labels);
        printf("step %2d  loss %.6f continued, %.6f resumed, %.6f from scratch\n", step, continued,
               from_checkpoint, from_scratch);
        if (memcmp(&continued, &from_checkpoint, sizeof continued) != 0 ||
            continued == from_scratch) {
            fprintf(stderr, "FAILED: the resumed loss differs from the continued one, or the "
                            "fresh one does not\n");
            failures++;
        }
    }

    /* States that must be refused, each leaving `resumed` as `original` is. */
    uint8_t *damaged = malloc(len);
    memcpy(damaged, blob, len);
    damaged[len / 2] ^= 0x40;
    failures += expect_refused(resumed, original, damaged, len, "a damaged state");
    failures += expect_refused(resumed, original, blob, len - 1, "a truncated state");
    CbceConfig other_config = saved_config;
    other_config.num_classes = CLASSES - 1;
    CbceLoss *other = NULL;
    CbceLoss *other_twin = NULL;
    EXAMPLE_CALL(cbce_new(&other_config, &other));
    EXAMPLE_CALL(cbce_new(&other_config, &other_twin));
    failures +=
        expect_refused(other, other_twin, blob, len, "a state for another number of classes");

    free(damaged);
    free(blob);
    cbce_free(other_twin);
    cbce_free(other);
    cbce_free(fresh);
    cbce_free(resumed);
    cbce_free(original);
    remove(path);
    if (failures) {
        fprintf(stderr, "checkpoint: %d checks failed\n", failures);
        return EXIT_FAILURE;
    }
    printf("checkpoint: the resumed run matches the original exactly\n");
    return EXIT_SUCCESS;
}
