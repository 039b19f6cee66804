// Data-parallel training in C++ with cbce.hpp: each rank holds its own cbce::Loss and its own
// shard of the batch, and the shards have different class frequencies. For every rank to use
// the same weights, and for their gradients to be those of the whole batch's mean loss, a step:
//
//   1. counts each shard's labels (class_counts), and sums the counts over the ranks (the
//      all-reduce a framework would do; here a loop);
//   2. updates every rank's prevalences from the summed counts (update_from_counts);
//   3. takes the global denominator of "mean", sum over classes of count * weight, and has each
//      rank compute its loss sum with grad_scale = 1 / denominator, so that the gradients are
//      those of the global mean; the global mean loss is the sum of the ranks' sums over it.
//
// The program checks every step against one loss computing on the whole batch, and shows that
// a rank updating from its own shard alone would weigh the classes differently. Exits with
// status 1 on a failed check.
#include <cbce.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <vector>

namespace {

constexpr int kRanks = 2;
constexpr std::int64_t kClasses = 3;
constexpr std::int64_t kShard = 48;
constexpr int kSteps = 6;

// Rank 0 sees mostly class 0, rank 1 mostly class 2.
constexpr float kFrequencies[kRanks][kClasses] = {{0.7f, 0.25f, 0.05f}, {0.1f, 0.3f, 0.6f}};

// A deterministic pseudo-random generator (SplitMix64).
struct Rng {
    std::uint64_t state;

    float uniform() {
        state += 0x9e3779b97f4a7c15u;
        std::uint64_t z = state;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
        return static_cast<float>((z ^ (z >> 31)) >> 40) / 16777216.0f;
    }

    std::int64_t label(std::span<const float> frequencies) {
        float u = uniform();
        for (std::size_t c = 0; c + 1 < frequencies.size(); c++) {
            if (u < frequencies[c]) {
                return static_cast<std::int64_t>(c);
            }
            u -= frequencies[c];
        }
        return static_cast<std::int64_t>(frequencies.size()) - 1;
    }
};

struct Shard {
    std::vector<float> logits = std::vector<float>(kShard * kClasses);
    std::vector<std::int64_t> labels = std::vector<std::int64_t>(kShard);
    std::vector<float> grad = std::vector<float>(kShard * kClasses);
};

bool near(double actual, double expected, double rel_tol, double abs_tol) {
    return std::fabs(actual - expected) <= std::fmax(abs_tol, rel_tol * std::fabs(expected));
}

} // namespace

int main() {
    std::vector<cbce::Loss> ranks;
    for (int r = 0; r < kRanks; r++) {
        ranks.emplace_back(kClasses, 0.9);
    }
    cbce::Loss whole_batch(kClasses, 0.9);
    cbce::Loss rank0_alone(kClasses, 0.9);
    std::vector<Shard> shards(kRanks);
    Rng rng{11};
    int failures = 0;

    std::printf("cbce %s data-parallel: %d ranks, shards of %lld, %lld classes\n", cbce_version(),
                kRanks, static_cast<long long>(kShard), static_cast<long long>(kClasses));
    std::printf("step  global loss  weights\n");
    for (int step = 0; step < kSteps; step++) {
        std::vector<std::int64_t> counts(kClasses, 0);
        for (int r = 0; r < kRanks; r++) {
            Shard &shard = shards[r];
            for (std::int64_t i = 0; i < kShard; i++) {
                shard.labels[i] = rng.label(kFrequencies[r]);
                for (std::int64_t c = 0; c < kClasses; c++) {
                    shard.logits[i * kClasses + c] =
                        2.0f * rng.uniform() - 1.0f + (c == shard.labels[i] ? 0.5f : 0.0f);
                }
            }
            std::vector<std::int64_t> shard_counts =
                ranks[r].class_counts(cbce::Tensor(shard.labels.data(), {kShard}));
            for (std::int64_t c = 0; c < kClasses; c++) {
                counts[c] += shard_counts[c];
            }
        }

        double denominator = 0.0;
        std::vector<float> weights;
        for (cbce::Loss &rank : ranks) {
            rank.update_from_counts(counts);
            weights = rank.weights();
        }
        for (std::int64_t c = 0; c < kClasses; c++) {
            denominator += static_cast<double>(counts[c]) * weights[c];
        }

        double global_loss = 0.0;
        CbceForwardOptions options = cbce::forward_options();
        options.reduction = CBCE_REDUCTION_SUM;
        options.update_prevalences = 0;
        options.grad_scale = 1.0 / denominator;
        for (int r = 0; r < kRanks; r++) {
            Shard &shard = shards[r];
            float loss_sum = 0.0f;
            cbce::ForwardSummary summary = ranks[r].forward(
                cbce::Tensor(shard.logits.data(), {kShard, kClasses}),
                cbce::Tensor(shard.labels.data(), {kShard}), cbce::Tensor(&loss_sum, {}),
                cbce::Tensor(shard.grad.data(), {kShard, kClasses}), options);
            global_loss += loss_sum / denominator;
            failures += summary.weights_used != weights;
        }
        rank0_alone.update(cbce::Tensor(shards[0].labels.data(), {kShard}));

        // The same step on one process: the whole batch, its mean loss and gradient.
        std::vector<float> logits;
        std::vector<std::int64_t> labels;
        for (const Shard &shard : shards) {
            logits.insert(logits.end(), shard.logits.begin(), shard.logits.end());
            labels.insert(labels.end(), shard.labels.begin(), shard.labels.end());
        }
        const std::int64_t batch = kRanks * kShard;
        std::vector<float> grad(logits.size());
        float mean_loss = 0.0f;
        cbce::ForwardSummary summary = whole_batch.forward(
            cbce::Tensor(logits.data(), {batch, kClasses}), cbce::Tensor(labels.data(), {batch}),
            cbce::Tensor(&mean_loss, {}), cbce::Tensor(grad.data(), {batch, kClasses}));

        if (summary.weights_used != weights || !near(global_loss, mean_loss, 1e-6, 0.0) ||
            !near(summary.weight_sum, denominator, 1e-12, 0.0)) {
            std::fprintf(stderr,
                         "FAILED: step %d: the ranks' weights or loss %.7f differ from "
                         "the whole batch's, %.7f\n",
                         step, global_loss, mean_loss);
            failures++;
        }
        for (int r = 0; r < kRanks; r++) {
            for (std::size_t i = 0; i < shards[r].grad.size(); i++) {
                const float expected = grad[r * shards[r].grad.size() + i];
                if (!near(shards[r].grad[i], expected, 1e-5, 1e-9)) {
                    std::fprintf(stderr, "FAILED: step %d: rank %d gradient %zu is %g, not %g\n",
                                 step, r, i, shards[r].grad[i], expected);
                    failures++;
                }
            }
        }
        std::printf("%4d  %11.6f  %.3f %.3f %.3f\n", step, global_loss, weights[0], weights[1],
                    weights[2]);
    }

    std::vector<float> alone = rank0_alone.weights();
    std::printf("rank 0 updating from its shard alone would weigh %.3f %.3f %.3f\n", alone[0],
                alone[1], alone[2]);
    if (alone == ranks[0].weights()) {
        std::fprintf(stderr, "FAILED: the shard's own weights equal the synchronised ones\n");
        failures++;
    }
    if (failures != 0) {
        std::fprintf(stderr, "data_parallel: %d checks failed\n", failures);
        return EXIT_FAILURE;
    }
    std::printf("data_parallel: the ranks reproduce the whole batch's loss and gradients\n");
    return EXIT_SUCCESS;
}
