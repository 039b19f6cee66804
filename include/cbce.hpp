/*
 * The C++ interface of cbce, over its C interface (cbce.h), header-only.
 *
 * - cbce::Loss owns a loss handle and releases it; it moves but does not copy.
 * - Every failed call throws cbce::Error, which carries the status and the library's message.
 * - cbce::Tensor describes memory the caller owns (any strides, on the host or a device),
 *   without copying it. Buffers go in and out as pointer and length, or as std::span in C++20.
 *
 * Needs C++17. The library's threading rules hold: one Loss may be used by several threads at
 * once, except that moving, assigning or destroying it must not race with any other use.
 */
#ifndef CBCE_HPP
#define CBCE_HPP

#include "cbce.h"

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if __cplusplus >= 202002L && __has_include(<span>)
#include <span>
#endif

namespace cbce {

/// A failed call into the library: its status and the message naming what was wrong.
class Error : public std::runtime_error {
public:
    Error(CbceStatus status, const std::string &message)
        : std::runtime_error(message), status_(status) {}

    /// The status the C function returned.
    CbceStatus status() const noexcept { return status_; }

private:
    CbceStatus status_;
};

namespace detail {

/// Throws Error with this thread's last error message unless `status` is CBCE_STATUS_OK.
inline void check(CbceStatus status) {
    if (status == CBCE_STATUS_OK) {
        return;
    }
    const char *message = cbce_last_error_message();
    throw Error(status,
                message != nullptr && *message != '\0' ? message : cbce_status_string(status));
}

template <class T> struct DTypeOf {
    static_assert(sizeof(T) == 0, "cbce::Tensor takes float, double, std::int64_t, std::int32_t "
                                  "or std::uint8_t; pass a CbceDataType for other types");
};
template <> struct DTypeOf<float> { static constexpr CbceDataType value{CBCE_DTYPE_FLOAT, 32, 1}; };
template <> struct DTypeOf<double> {
    static constexpr CbceDataType value{CBCE_DTYPE_FLOAT, 64, 1};
};
template <> struct DTypeOf<std::int64_t> {
    static constexpr CbceDataType value{CBCE_DTYPE_INT, 64, 1};
};
template <> struct DTypeOf<std::int32_t> {
    static constexpr CbceDataType value{CBCE_DTYPE_INT, 32, 1};
};
template <> struct DTypeOf<std::uint8_t> {
    static constexpr CbceDataType value{CBCE_DTYPE_UINT, 8, 1};
};

} // namespace detail

/// The dtype of arrays of T: float, double, std::int64_t, std::int32_t or std::uint8_t.
template <class T> constexpr CbceDataType dtype_of() {
    return detail::DTypeOf<std::remove_cv_t<T>>::value;
}

/// The host device, where tensors are by default.
constexpr CbceDevice host_device() {
    return CbceDevice{CBCE_DEVICE_CPU, 0};
}

/// A description of memory the caller owns: its address, element type, shape and strides in
/// elements (empty strides: contiguous row-major). It copies neither the data nor ownership;
/// the data must stay alive while a call that was given the tensor runs.
class Tensor {
public:
    /// A tensor of elements of type T (see dtype_of) at `data`.
    template <class T>
    Tensor(T *data, std::vector<std::int64_t> shape, std::vector<std::int64_t> strides = {},
           CbceDevice device = host_device())
        : Tensor(const_cast<void *>(static_cast<const void *>(data)), dtype_of<T>(),
                 std::move(shape), std::move(strides), device) {}

    /// A tensor of any element type the library takes, for example bfloat16 logits as
    /// CbceDataType{CBCE_DTYPE_BFLOAT, 16, 1}.
    Tensor(void *data, CbceDataType dtype, std::vector<std::int64_t> shape,
           std::vector<std::int64_t> strides = {}, CbceDevice device = host_device())
        : data_(data), dtype_(dtype), device_(device), shape_(std::move(shape)),
          strides_(std::move(strides)) {
        if (!strides_.empty() && strides_.size() != shape_.size()) {
            throw std::invalid_argument("cbce::Tensor: " + std::to_string(strides_.size()) +
                                        " strides for " + std::to_string(shape_.size()) + " axes");
        }
    }

    /// The C descriptor. It points into this object, so it is valid while this object is.
    CbceTensor raw() const noexcept {
        CbceTensor tensor{};
        tensor.data = data_;
        tensor.device = device_;
        tensor.ndim = static_cast<std::int32_t>(shape_.size());
        tensor.dtype = dtype_;
        tensor.shape = shape_.empty() ? nullptr : const_cast<std::int64_t *>(shape_.data());
        tensor.strides = strides_.empty() ? nullptr : const_cast<std::int64_t *>(strides_.data());
        tensor.byte_offset = 0;
        return tensor;
    }

    const std::vector<std::int64_t> &shape() const noexcept { return shape_; }
    const std::vector<std::int64_t> &strides() const noexcept { return strides_; }

private:
    void *data_;
    CbceDataType dtype_;
    CbceDevice device_;
    std::vector<std::int64_t> shape_;
    std::vector<std::int64_t> strides_;
};

/// The library's default forward options: mean reduction, update on, ignore index -100, no
/// label smoothing, grad_scale 1.
inline CbceForwardOptions forward_options() {
    return cbce_forward_options_default();
}

/// What a forward call reports besides the tensors it writes.
struct ForwardSummary {
    /// The class weights the call used (after its update, if it made one).
    std::vector<float> weights_used;
    /// The sum of the weights of the labels that are not ignored: the denominator of "mean".
    double weight_sum = 0.0;
};

/// A class-balanced cross-entropy loss: its configuration and running class prevalences.
class Loss {
public:
    /// A loss of `num_classes` classes on the host.
    explicit Loss(std::uint64_t num_classes, double ema_decay = 0.99, double min_prevalence = 0.0) {
        CbceConfig config = cbce_config_default();
        config.num_classes = num_classes;
        config.ema_decay = ema_decay;
        config.min_prevalence = min_prevalence;
        detail::check(cbce_new(&config, &handle_));
    }

    /// A loss from a full configuration (start from cbce_config_default()).
    explicit Loss(const CbceConfig &config) { detail::check(cbce_new(&config, &handle_)); }

    Loss(const Loss &) = delete;
    Loss &operator=(const Loss &) = delete;

    /// Takes the other loss's handle; the other is left empty, and any call on it throws.
    Loss(Loss &&other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}

    Loss &operator=(Loss &&other) noexcept {
        if (this != &other) {
            cbce_free(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }

    ~Loss() { cbce_free(handle_); }

    /// The handle, for C functions; this object still owns it.
    CbceLoss *get() const noexcept { return handle_; }

    /// Gives up ownership of the handle, which the caller then frees with cbce_free.
    CbceLoss *release() noexcept { return std::exchange(handle_, nullptr); }

    /// False once the handle was moved out or released.
    explicit operator bool() const noexcept { return handle_ != nullptr; }

    CbceConfig config() const {
        CbceConfig config{};
        detail::check(cbce_get_config(handle_, &config));
        return config;
    }

    std::size_t num_classes() const { return static_cast<std::size_t>(config().num_classes); }

    /// Updates the prevalences from the labels of `target`; labels outside [0, C) and
    /// `ignore_index` are dropped.
    void update(const Tensor &target, std::int64_t ignore_index = CBCE_DEFAULT_IGNORE_INDEX) {
        CbceTensor raw = target.raw();
        detail::check(cbce_update(handle_, &raw, ignore_index));
    }

    /// Counts the labels of `target` per class into `counts` (`len` = C) without changing the
    /// state; with update_from_counts, data-parallel ranks can sum their counts first.
    void class_counts(const Tensor &target, std::int64_t ignore_index, std::int64_t *counts,
                      std::size_t len) const {
        CbceTensor raw = target.raw();
        detail::check(cbce_class_counts(handle_, &raw, ignore_index, counts, len));
    }

    std::vector<std::int64_t>
    class_counts(const Tensor &target,
                 std::int64_t ignore_index = CBCE_DEFAULT_IGNORE_INDEX) const {
        std::vector<std::int64_t> counts(num_classes());
        class_counts(target, ignore_index, counts.data(), counts.size());
        return counts;
    }

    /// Updates the prevalences from per-class counts (`len` = C), as update would from the
    /// labels counted.
    void update_from_counts(const std::int64_t *counts, std::size_t len) {
        detail::check(cbce_update_from_counts(handle_, counts, len));
    }

    /// The prevalences (NaN for classes never seen) into `out` (`len` = C).
    void prevalences(float *out, std::size_t len) const {
        detail::check(cbce_prevalences(handle_, out, len));
    }

    std::vector<float> prevalences() const {
        std::vector<float> out(num_classes());
        prevalences(out.data(), out.size());
        return out;
    }

    /// The weights a forward call without update would use, into `out` (`len` = C).
    void weights(float *out, std::size_t len) const {
        detail::check(cbce_weights(handle_, out, len));
    }

    std::vector<float> weights() const {
        std::vector<float> out(num_classes());
        weights(out.data(), out.size());
        return out;
    }

    /// The loss of `logits` against `target` into `loss` (one element for "mean" and "sum",
    /// the target's shape for "none"), updating the prevalences first if the options say so.
    ForwardSummary forward(const Tensor &logits, const Tensor &target, const Tensor &loss,
                           const CbceForwardOptions &options = forward_options()) {
        return forward_impl(logits, target, loss, nullptr, options);
    }

    /// As above, and the gradient with respect to the logits into `grad` (their shape).
    ForwardSummary forward(const Tensor &logits, const Tensor &target, const Tensor &loss,
                           const Tensor &grad,
                           const CbceForwardOptions &options = forward_options()) {
        return forward_impl(logits, target, loss, &grad, options);
    }

    /// The gradient with respect to `logits` into `grad`, from the upstream gradient
    /// `grad_loss` and the weights (`len` = C) the forward call used. Reads no state.
    void backward(const Tensor &logits, const Tensor &target, const Tensor &grad_loss,
                  const float *weights, std::size_t len, const Tensor &grad,
                  const CbceForwardOptions &options = forward_options()) const {
        CbceTensor raw_logits = logits.raw();
        CbceTensor raw_target = target.raw();
        CbceTensor raw_grad_loss = grad_loss.raw();
        CbceTensor raw_grad = grad.raw();
        detail::check(cbce_backward(handle_, &raw_logits, &raw_target, &options, &raw_grad_loss,
                                    weights, len, &raw_grad));
    }

    /// The running state, for a checkpoint; set_state restores it exactly.
    std::vector<std::uint8_t> state() const {
        std::size_t size = 0;
        detail::check(cbce_state_size(handle_, &size));
        std::vector<std::uint8_t> blob(size);
        std::size_t written = 0;
        detail::check(cbce_get_state(handle_, blob.data(), blob.size(), &written));
        blob.resize(written);
        return blob;
    }

    /// Restores a state from state(); a damaged one or one for another C throws and changes
    /// nothing.
    void set_state(const std::uint8_t *blob, std::size_t len) {
        detail::check(cbce_set_state(handle_, blob, len));
    }

    /// Forgets every update: all classes unseen.
    void reset() { detail::check(cbce_reset(handle_)); }

    /// For a CUDA handle: enqueue work on `stream` (a CUstream or cudaStream_t; nullptr for the
    /// legacy default stream) from now on. Throws on a CPU handle (CBCE_STATUS_UNSUPPORTED).
    void set_stream(void *stream) { detail::check(cbce_set_stream(handle_, stream)); }

    /// Waits for the work a CUDA handle enqueued, and throws the error of a label out of range
    /// it found. Returns at once on a CPU handle.
    void synchronize() { detail::check(cbce_synchronize(handle_)); }

#ifdef __cpp_lib_span
    void class_counts(const Tensor &target, std::int64_t ignore_index,
                      std::span<std::int64_t> counts) const {
        class_counts(target, ignore_index, counts.data(), counts.size());
    }
    void update_from_counts(std::span<const std::int64_t> counts) {
        update_from_counts(counts.data(), counts.size());
    }
    void prevalences(std::span<float> out) const {
        prevalences(out.data(), out.size());
    }
    void weights(std::span<float> out) const {
        weights(out.data(), out.size());
    }
    void backward(const Tensor &logits, const Tensor &target, const Tensor &grad_loss,
                  std::span<const float> weights, const Tensor &grad,
                  const CbceForwardOptions &options = forward_options()) const {
        backward(logits, target, grad_loss, weights.data(), weights.size(), grad, options);
    }
    void set_state(std::span<const std::uint8_t> blob) {
        set_state(blob.data(), blob.size());
    }
#endif

private:
    ForwardSummary forward_impl(const Tensor &logits, const Tensor &target, const Tensor &loss,
                                const Tensor *grad, const CbceForwardOptions &options) {
        CbceTensor raw_logits = logits.raw();
        CbceTensor raw_target = target.raw();
        CbceTensor raw_loss = loss.raw();
        CbceTensor raw_grad = grad != nullptr ? grad->raw() : CbceTensor{};
        ForwardSummary summary;
        summary.weights_used.resize(num_classes());
        detail::check(cbce_forward(handle_, &raw_logits, &raw_target, &options, &raw_loss,
                                   grad != nullptr ? &raw_grad : nullptr,
                                   summary.weights_used.data(), summary.weights_used.size(),
                                   &summary.weight_sum));
        return summary;
    }

    CbceLoss *handle_ = nullptr;
};

} // namespace cbce

#endif // CBCE_HPP
