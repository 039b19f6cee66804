// Tests of cbce.hpp: ownership (moves, release, no copies), errors as cbce::Error with the
// library's status and message, buffers in and out, and that the wrapper's results are the C
// functions' results. Built as C++17 and as C++20 (which adds the std::span overloads); exits
// with status 1 if a check fails.
#include <cbce.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

int failures = 0;

void expect(bool condition, const char *what, int line) {
    if (!condition) {
        std::fprintf(stderr, "FAILED (line %d): %s\n", line, what);
        failures++;
    }
}

#define EXPECT(condition) expect((condition), #condition, __LINE__)

// Bitwise equality, under which NaN (an unseen class's prevalence) equals itself.
bool identical(const std::vector<float> &a, const std::vector<float> &b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Runs `body`, which must throw cbce::Error with `status` and a message containing `needle`.
template <class Body>
void expect_error(CbceStatus status, const char *needle, Body body, int line) {
    try {
        body();
        expect(false, "an exception", line);
    } catch (const cbce::Error &error) {
        expect(error.status() == status, "the expected status", line);
        expect(std::string(error.what()).find(needle) != std::string::npos,
               "the message names what was wrong", line);
        std::printf("  thrown as expected: %s\n", error.what());
    }
}

#define EXPECT_ERROR(status, needle, body) expect_error((status), (needle), [&] { body; }, __LINE__)

static_assert(!std::is_copy_constructible_v<cbce::Loss>);
static_assert(!std::is_copy_assignable_v<cbce::Loss>);
static_assert(std::is_nothrow_move_constructible_v<cbce::Loss>);
static_assert(std::is_nothrow_move_assignable_v<cbce::Loss>);
static_assert(cbce::dtype_of<const float>().code == CBCE_DTYPE_FLOAT &&
              cbce::dtype_of<const float>().bits == 32);
static_assert(cbce::dtype_of<std::uint8_t>().code == CBCE_DTYPE_UINT &&
              cbce::dtype_of<std::uint8_t>().bits == 8);
static_assert(cbce::dtype_of<std::int32_t>().code == CBCE_DTYPE_INT &&
              cbce::dtype_of<std::int32_t>().bits == 32);

// Logits of two samples of three classes, and their labels.
const std::vector<float> kLogits = {1.0f, 2.0f, 0.5f, -1.0f, 0.0f, 3.0f};
const std::vector<std::int64_t> kLabels = {1, 2};

void test_ownership() {
    cbce::Loss first(3);
    CbceLoss *handle = first.get();
    EXPECT(handle != nullptr && static_cast<bool>(first));

    cbce::Loss second(std::move(first));
    EXPECT(second.get() == handle && !first);

    cbce::Loss third(4);
    third = std::move(second); // frees third's own handle; valgrind sees a leak otherwise
    EXPECT(third.get() == handle && !second && third.num_classes() == 3);

    cbce::Loss &alias = third;
    third = std::move(alias);
    EXPECT(third.get() == handle);

    std::vector<cbce::Loss> many;
    for (int i = 0; i < 10; i++) {
        many.emplace_back(2 + i);
    }
    EXPECT(many[9].num_classes() == 11);

    CbceLoss *released = third.release();
    EXPECT(released == handle && !third);
    cbce_free(released);

    EXPECT_ERROR(CBCE_STATUS_NULL_POINTER, "loss", third.weights());
}

void test_errors() {
    EXPECT_ERROR(CBCE_STATUS_INVALID_CONFIG, "num_classes", cbce::Loss(0));
    EXPECT_ERROR(CBCE_STATUS_INVALID_CONFIG, "ema_decay", cbce::Loss(3, 1.5));

    cbce::Loss loss(3);
    float value = 0.0f;
    std::vector<std::int64_t> bad_labels = {1, 9};
    EXPECT_ERROR(CBCE_STATUS_LABEL_OUT_OF_RANGE, "label 9 at position [1]",
                 loss.forward(cbce::Tensor(kLogits.data(), {2, 3}),
                              cbce::Tensor(bad_labels.data(), {2}), cbce::Tensor(&value, {})));
    EXPECT(std::isnan(loss.prevalences()[1])); // the failed call changed nothing
    EXPECT(value == 0.0f);

    EXPECT_ERROR(CBCE_STATUS_UNSUPPORTED, "", loss.set_stream(nullptr));
    loss.synchronize(); // nothing is ever pending on a CPU handle

    std::vector<float> short_buffer(2);
    EXPECT_ERROR(CBCE_STATUS_BUFFER_LENGTH, "length 2", loss.weights(short_buffer.data(), 2));
    EXPECT_ERROR(CBCE_STATUS_SHAPE_MISMATCH, "",
                 loss.forward(cbce::Tensor(kLogits.data(), {3, 2}),
                              cbce::Tensor(kLabels.data(), {2}), cbce::Tensor(&value, {})));

    bool rejected = false;
    try {
        cbce::Tensor(kLogits.data(), {2, 3}, {3});
    } catch (const std::invalid_argument &) {
        rejected = true;
    }
    EXPECT(rejected);
}

void test_results_match_the_c_functions() {
    cbce::Loss loss(3, 0.5);
    CbceLoss *c_loss = nullptr;
    CbceConfig config = cbce_config_default();
    config.num_classes = 3;
    config.ema_decay = 0.5;
    EXPECT(cbce_new(&config, &c_loss) == CBCE_STATUS_OK);

    float value = 0.0f;
    std::vector<float> grad(6);
    cbce::ForwardSummary summary =
        loss.forward(cbce::Tensor(kLogits.data(), {2, 3}), cbce::Tensor(kLabels.data(), {2}),
                     cbce::Tensor(&value, {}), cbce::Tensor(grad.data(), {2, 3}));

    std::int64_t logits_shape[2] = {2, 3};
    std::int64_t labels_shape[1] = {2};
    CbceTensor logits{const_cast<float *>(kLogits.data()),
                      {CBCE_DEVICE_CPU, 0},
                      2,
                      {CBCE_DTYPE_FLOAT, 32, 1},
                      logits_shape,
                      nullptr,
                      0};
    CbceTensor labels{const_cast<std::int64_t *>(kLabels.data()),
                      {CBCE_DEVICE_CPU, 0},
                      1,
                      {CBCE_DTYPE_INT, 64, 1},
                      labels_shape,
                      nullptr,
                      0};
    float c_value = 0.0f;
    CbceTensor c_value_tensor{
        &c_value, {CBCE_DEVICE_CPU, 0}, 0, {CBCE_DTYPE_FLOAT, 32, 1}, nullptr, nullptr, 0};
    std::vector<float> c_grad(6);
    CbceTensor c_grad_tensor = logits;
    c_grad_tensor.data = c_grad.data();
    std::vector<float> c_weights(3);
    double c_weight_sum = 0.0;
    EXPECT(cbce_forward(c_loss, &logits, &labels, nullptr, &c_value_tensor, &c_grad_tensor,
                        c_weights.data(), 3, &c_weight_sum) == CBCE_STATUS_OK);

    EXPECT(value == c_value && grad == c_grad);
    EXPECT(summary.weights_used == c_weights && summary.weight_sum == c_weight_sum);
    EXPECT(summary.weights_used == loss.weights());
    std::vector<float> c_prevalences(3);
    EXPECT(cbce_prevalences(c_loss, c_prevalences.data(), 3) == CBCE_STATUS_OK);
    EXPECT(identical(loss.prevalences(), c_prevalences));
    // Class 0 is unseen; classes 1 and 2 moved from 1/3 half-way towards 1/2.
    EXPECT(std::isnan(c_prevalences[0]) && std::fabs(c_prevalences[1] - 5.0f / 12.0f) < 1e-6f);

    // backward with an upstream gradient of 1 gives forward's gradient of the mean.
    float one = 1.0f;
    std::vector<float> backward_grad(6);
    loss.backward(cbce::Tensor(kLogits.data(), {2, 3}), cbce::Tensor(kLabels.data(), {2}),
                  cbce::Tensor(&one, {}), summary.weights_used.data(), 3,
                  cbce::Tensor(backward_grad.data(), {2, 3}));
    for (std::size_t i = 0; i < grad.size(); i++) {
        EXPECT(std::fabs(backward_grad[i] - grad[i]) <= 1e-6f * std::fabs(grad[i]) + 1e-9f);
    }

    // Per-class counts, as cbce_class_counts gives them.
    std::vector<std::int64_t> counts = loss.class_counts(cbce::Tensor(kLabels.data(), {2}));
    EXPECT((counts == std::vector<std::int64_t>{0, 1, 1}));
    cbce_free(c_loss);
}

void test_state() {
    cbce::Loss loss(3, 0.9);
    std::vector<std::uint8_t> labels = {0, 0, 2, 255};
    loss.update(cbce::Tensor(labels.data(), {4}), 255);
    std::vector<std::uint8_t> blob = loss.state();

    cbce::Loss resumed(loss.config());
    resumed.set_state(blob.data(), blob.size());
    EXPECT(identical(resumed.prevalences(), loss.prevalences()));
    EXPECT(resumed.weights() == loss.weights());

    blob[blob.size() / 2] ^= 1;
    EXPECT_ERROR(CBCE_STATUS_INVALID_STATE, "checksum",
                 resumed.set_state(blob.data(), blob.size()));
    EXPECT(identical(resumed.prevalences(), loss.prevalences()));

    resumed.reset();
    for (float prevalence : resumed.prevalences()) {
        EXPECT(std::isnan(prevalence));
    }
}

#ifdef __cpp_lib_span
void test_spans() {
    cbce::Loss loss(3);
    std::vector<std::int64_t> counts = {5, 0, 1};
    loss.update_from_counts(counts);
    float prevalences[3];
    loss.prevalences(std::span<float>(prevalences));
    EXPECT(prevalences[0] > prevalences[2] && std::isnan(prevalences[1]));
    std::vector<float> weights(3);
    loss.weights(weights);
    EXPECT(weights == loss.weights());

    std::vector<std::uint8_t> blob = loss.state();
    cbce::Loss resumed(3);
    resumed.set_state(blob);
    EXPECT(resumed.weights() == weights);
}
#endif

} // namespace

int main() {
    std::printf("cbce.hpp tests against cbce %s (C++ %ld)\n", cbce_version(), __cplusplus);
    test_ownership();
    test_errors();
    test_results_match_the_c_functions();
    test_state();
#ifdef __cpp_lib_span
    test_spans();
#endif
    if (failures != 0) {
        std::fprintf(stderr, "hpp_test: %d checks failed\n", failures);
        return EXIT_FAILURE;
    }
    std::printf("hpp_test: every check passed\n");
    return EXIT_SUCCESS;
}
