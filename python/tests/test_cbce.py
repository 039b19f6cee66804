"""Tests of the ctypes binding with NumPy: its declarations against the header, its results
against the plain NumPy reference and the reference's recorded vectors, DLPack borrowing without
copies, errors and state."""

import ctypes
import json
import os
import pathlib
import re
import threading

import numpy as np
import pytest

import cbce
from cbce import _ffi
from cbce._dlpack import borrow

import numpy_reference as reference

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]
# Tolerances of float32 results against the float64 reference.
RTOL, ATOL = 1e-5, 1e-6


def random_problem(rng, shape, num_classes, ignore_index=-100, ignored=0.0, dtype=np.float32):
    """Logits of `shape` (classes on axis 1, or axis 0 for 1-D) and matching labels, a share
    `ignored` of them set to `ignore_index`."""
    logits = rng.normal(size=shape).astype(dtype)
    target_shape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
    target = rng.integers(0, num_classes, size=target_shape)
    target = np.where(rng.random(target_shape) < ignored, ignore_index, target)
    return logits, np.asarray(target, dtype=np.int64)


def test_versions_agree():
    cargo = (REPOSITORY / "Cargo.toml").read_text()
    cargo_version = re.search(r'^version = "([^"]+)"', cargo, re.MULTILINE).group(1)
    pyproject = (REPOSITORY / "python" / "pyproject.toml").read_text()
    package_version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE).group(1)
    assert cbce.version() == cargo_version == cbce.__version__ == package_version


def test_every_function_of_the_header_has_its_prototype():
    header = (REPOSITORY / "include" / "cbce.h").read_text()
    declared = {
        name: [] if params.strip() == "void" else params.split(",")
        for name, params in re.findall(r"\b(cbce_\w+)\(([^)]*)\);", header)
    }
    assert declared, "no function found in cbce.h"
    assert set(declared) == set(_ffi.PROTOTYPES)
    for name, params in declared.items():
        restype, argtypes = _ffi.PROTOTYPES[name]
        assert len(argtypes) == len(params), name
        function = getattr(cbce._lib, name)
        assert function.argtypes == argtypes and function.restype is restype, name


def test_struct_layouts_are_dlpacks():
    # DLTensor on a 64-bit machine: pointer, device (8), ndim (4), dtype (4), two pointers,
    # byte_offset: 48 bytes, shape at 24.
    assert ctypes.sizeof(_ffi.Tensor) == 48
    assert _ffi.Tensor.shape.offset == 24 and _ffi.Tensor.byte_offset.offset == 40
    assert ctypes.sizeof(_ffi.ForwardOptions) == 32


def test_status_names_cover_the_librarys_statuses():
    for status in cbce.Status:
        assert cbce._lib.cbce_status_string(status) != b"unknown status", status
    assert cbce._lib.cbce_status_string(len(cbce.Status)) == b"unknown status"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "shape, smoothing",
    [((6,), 0.0), ((32, 5), 0.0), ((32, 5), 0.2), ((3, 4, 5, 6), 0.1)],
)
def test_forward_matches_the_reference(dtype, reduction, shape, smoothing):
    rng = np.random.default_rng(sum(shape))
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    logits, target = random_problem(rng, shape, num_classes, ignored=0.2, dtype=dtype)
    loss = cbce.ClassBalancedLoss(num_classes, ema_decay=0.7)
    earlier = rng.integers(0, num_classes, size=40) // 2  # classes skewed to the low half
    loss.update(earlier)

    result = loss.forward(
        logits, target, reduction=reduction, label_smoothing=smoothing, grad=True
    )

    prevalences = np.full(num_classes, np.nan)
    for labels in (earlier, target):
        prevalences = reference.update(prevalences, reference.counts_of(labels, num_classes), 0.7)
    np.testing.assert_allclose(result.weights, reference.weights_of(prevalences), rtol=1e-5)
    expected_loss, expected_grad = reference.loss_and_grad(
        logits, target, result.weights, reduction, label_smoothing=smoothing
    )
    assert result.loss.dtype == dtype and result.grad.dtype == dtype
    assert result.loss.shape == (target.shape if reduction == "none" else ())
    np.testing.assert_allclose(result.loss, expected_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(result.grad, expected_grad, rtol=RTOL, atol=1e-7)
    kept = target != -100
    assert result.weight_sum == pytest.approx(result.weights[target[kept]].sum(), rel=1e-6)


def test_state_follows_the_reference():
    rng = np.random.default_rng(5)
    loss = cbce.ClassBalancedLoss(4, ema_decay=0.8)
    prevalences = np.full(4, np.nan)
    np.testing.assert_array_equal(loss.weights(), np.ones(4, dtype=np.float32))
    for step in range(30):
        # Class 3 appears only after step 10; class 2 never.
        classes = [0, 1, 3] if step > 10 else [0, 1]
        target = rng.choice(classes, size=50)
        loss.update(target)
        prevalences = reference.update(prevalences, reference.counts_of(target, 4), 0.8)
        np.testing.assert_allclose(loss.prevalences(), prevalences, rtol=1e-6, equal_nan=True)
        np.testing.assert_allclose(loss.weights(), reference.weights_of(prevalences), rtol=1e-5)
    assert np.isnan(loss.prevalences()[2])


def test_a_rare_class_among_many_has_its_weight_clamped():
    # With few classes no weight can lie 3 standard deviations from the mean; with 40, a class
    # seen once in 4000 labels does, and the clamp brings it back.
    labels = np.concatenate([np.repeat(np.arange(1, 40), 100), [0]])
    loss = cbce.ClassBalancedLoss(40, ema_decay=0.0)
    loss.update(labels)
    prevalences = reference.update(np.full(40, np.nan), reference.counts_of(labels, 40), 0.0)
    weights = loss.weights()
    np.testing.assert_allclose(weights, reference.weights_of(prevalences), rtol=1e-5)
    unclamped = 1.0 / prevalences
    assert weights[0] / weights[1] < 0.6 * unclamped[0] / unclamped[1]


def test_reference_vectors():
    default = REPOSITORY.parent / "shared" / "vectors" / "reference.json"
    path = pathlib.Path(os.environ.get("CBCE_REFERENCE_VECTORS", default))
    cases = json.loads(path.read_text())["cases"]

    def nan(values):
        return np.array([np.nan if v is None else v for v in values], dtype=np.float32)

    steps = 0
    for case in cases:
        config = case["config"]
        loss = cbce.ClassBalancedLoss(config["num_classes"], ema_decay=config["ema_decay"])
        for index, step in enumerate(case["steps"]):
            where = f"{case['name']} step {index}"
            target = np.array(step["target"], dtype=np.int64).reshape(step["target_shape"])
            if step["kind"] == "update":
                loss.update(target, step["ignore_index"])
            else:
                options = step["options"]
                logits = nan(step["input"]).reshape(step["input_shape"])
                result = loss.forward(
                    logits,
                    target,
                    reduction=options["reduction"],
                    update=options["update_class_prevalences"],
                    ignore_index=options["ignore_index"],
                    label_smoothing=options["label_smoothing"],
                    grad=options["reduction"] != "none",
                )
                expected = step["expected"]
                np.testing.assert_allclose(
                    np.ravel(result.loss), nan(expected["loss"]), RTOL, ATOL, True, where
                )
                np.testing.assert_allclose(
                    result.weights, nan(expected["weights_used"]), 4e-7, 1e-9, True, where
                )
                if options["reduction"] != "none":
                    np.testing.assert_allclose(
                        result.grad.ravel(), nan(expected["grad_input"]), RTOL, ATOL, True, where
                    )
                else:
                    grad_output = nan(step["grad_output"]).reshape(target.shape)
                    grad = loss.backward(
                        logits,
                        target,
                        grad_output,
                        result.weights,
                        reduction="none",
                        ignore_index=options["ignore_index"],
                        label_smoothing=options["label_smoothing"],
                    )
                    np.testing.assert_allclose(
                        grad.ravel(), nan(expected["grad_input"]), RTOL, ATOL, True, where
                    )
            expected = step["expected"]
            np.testing.assert_allclose(
                loss.prevalences(), nan(expected["class_prevalences"]), 4e-7, 1e-9, True, where
            )
            np.testing.assert_allclose(
                loss.weights(), nan(expected["class_weights"]), 4e-7, 1e-9, True, where
            )
            steps += 1
    assert steps > 0


def test_tensors_are_borrowed_not_copied():
    logits = np.arange(12, dtype=np.float32).reshape(3, 4)
    borrowed = borrow(logits, "logits")
    assert borrowed.tensor.data + borrowed.tensor.byte_offset == logits.ctypes.data
    assert borrowed.shape == (3, 4) and borrowed.dtype == (_ffi.DTYPE_FLOAT, 32, 1)

    # Outputs are written in place, through their strides: every other column of a buffer.
    rng = np.random.default_rng(0)
    logits, target = random_problem(rng, (8, 4), 4)
    buffer = np.full((8, 8), -7.0, dtype=np.float32)
    loss_out = np.zeros((), dtype=np.float32)
    loss = cbce.ClassBalancedLoss(4)
    weights, _ = loss.forward_into(logits, target, loss_out, buffer[:, ::2])
    expected_loss, expected_grad = reference.loss_and_grad(logits, target, weights)
    np.testing.assert_allclose(loss_out, expected_loss, rtol=RTOL)
    np.testing.assert_allclose(buffer[:, ::2], expected_grad, rtol=RTOL, atol=1e-7)
    assert (buffer[:, 1::2] == -7.0).all()


class CudaLooking:
    """A NumPy array that says it is on a CUDA device, and records the streams that it is
    exported for: what a consumer passes to a CUDA producer, tested without a GPU."""

    def __init__(self, array):
        self.array = array
        self.streams = []

    def __dlpack_device__(self):
        return (_ffi.DEVICE_CUDA, 0)

    def __dlpack__(self, stream=None, **arguments):
        self.streams.append(stream)
        return self.array.__dlpack__(**arguments)


def test_cuda_tensors_are_exported_for_the_handles_stream():
    logits = CudaLooking(np.zeros((2, 3), dtype=np.float32))
    target = np.array([0, 2])
    loss = cbce.ClassBalancedLoss(3)
    result = loss.forward(logits, target)
    assert logits.streams == [1]  # DLPack's legacy default stream: the handle has no other
    np.testing.assert_allclose(result.loss, np.log(3.0), rtol=1e-6)

    with pytest.raises(cbce.CbceError) as error:
        loss.set_stream(0x1234)  # a CPU handle has no stream
    assert error.value.status == cbce.Status.UNSUPPORTED
    assert loss.stream is None
    loss.synchronize()


def test_any_layout_gives_the_contiguous_result():
    rng = np.random.default_rng(1)
    logits, target = random_problem(rng, (2, 5, 4, 3), 5, ignored=0.1)
    loss = cbce.ClassBalancedLoss(5)
    loss.update(target)
    expected = loss.forward(logits, target, update=False, grad=True)

    channels_last = np.ascontiguousarray(logits.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    reversed_width = np.ascontiguousarray(logits[..., ::-1])[..., ::-1]
    read_only = np.broadcast_to(logits[:1], (1,) + logits.shape[1:])
    for variant in (channels_last, reversed_width):
        result = loss.forward(variant, target, update=False, grad=True)
        np.testing.assert_allclose(result.loss, expected.loss, rtol=1e-6)
        np.testing.assert_allclose(result.grad, expected.grad, rtol=1e-6, atol=1e-9)
    assert not read_only.flags.writeable
    result = loss.forward(read_only, target[:1], update=False)
    np.testing.assert_allclose(
        result.loss, reference.loss_and_grad(read_only, target[:1], loss.weights())[0], rtol=RTOL
    )


def test_label_dtypes_and_half_logits():
    rng = np.random.default_rng(2)
    logits, target = random_problem(rng, (16, 3), 3)
    loss = cbce.ClassBalancedLoss(3)
    expected = loss.forward(logits, target, update=False).loss
    for dtype in (np.int32, np.uint8):
        np.testing.assert_array_equal(
            loss.forward(logits, target.astype(dtype), update=False).loss, expected
        )
    half = loss.forward(logits.astype(np.float16), target, update=False)
    assert half.loss.dtype == np.float16
    np.testing.assert_allclose(half.loss, expected, rtol=2e-3)


def test_backward_is_forwards_gradient():
    rng = np.random.default_rng(3)
    logits, target = random_problem(rng, (10, 4), 4, ignored=0.2)
    loss = cbce.ClassBalancedLoss(4)
    for reduction in ("mean", "sum", "none"):
        result = loss.forward(logits, target, reduction=reduction, grad=True)
        grad_loss = np.ones(result.loss.shape, dtype=np.float32)
        grad = loss.backward(logits, target, grad_loss, result.weights, reduction=reduction)
        np.testing.assert_allclose(grad, result.grad, rtol=1e-6, atol=1e-9)

    upstream = rng.normal(size=target.shape).astype(np.float32)
    grad = loss.backward(logits, target, upstream, loss.weights(), reduction="none")
    _, expected = reference.loss_and_grad(
        logits, target, loss.weights(), "none", grad_output=upstream
    )
    np.testing.assert_allclose(grad, expected, rtol=RTOL, atol=1e-7)


def test_errors_carry_the_librarys_message_and_change_nothing():
    loss = cbce.ClassBalancedLoss(3)
    loss.update(np.array([0, 1, 1]))
    before = loss.get_state()
    logits = np.zeros((2, 3), dtype=np.float32)

    with pytest.raises(cbce.CbceError, match=r"label 7 at position \[1\]") as error:
        loss.forward(logits, np.array([0, 7]))
    assert error.value.status == cbce.Status.LABEL_OUT_OF_RANGE
    assert loss.get_state() == before

    with pytest.raises(cbce.CbceError, match="ema_decay") as error:
        cbce.ClassBalancedLoss(3, ema_decay=2.0)
    assert error.value.status == cbce.Status.INVALID_CONFIG
    with pytest.raises(cbce.CbceError, match="shape") as error:
        loss.forward(np.zeros((2, 4), dtype=np.float32), np.array([0, 1]))
    assert error.value.status == cbce.Status.SHAPE_MISMATCH
    with pytest.raises(cbce.CbceError) as error:
        loss.forward(logits, np.array([0.0, 1.0]))
    assert error.value.status == cbce.Status.UNSUPPORTED_DTYPE
    with pytest.raises(cbce.CbceError, match="negative") as error:
        loss.update_from_counts([1, -1, 0])
    assert error.value.status == cbce.Status.INVALID_STATE
    with pytest.raises(ValueError, match="reduction"):
        loss.forward(logits, np.array([0, 1]), reduction="average")
    with pytest.raises(ValueError, match="read-only"):
        loss.forward_into(logits, np.array([0, 1]), np.broadcast_to(np.float32(0), ()))
    with pytest.raises(TypeError, match="__dlpack__"):
        loss.update([0, 1])
    assert loss.get_state() == before

    loss.close()
    with pytest.raises(ValueError, match="closed"):
        loss.weights()


def test_state_round_trip_and_reset():
    loss = cbce.ClassBalancedLoss(5, ema_decay=0.9)
    loss.update(np.array([0, 0, 3, 4, 255], dtype=np.uint8), ignore_index=255)
    state = loss.get_state()

    with cbce.ClassBalancedLoss(5, ema_decay=0.9) as resumed:
        resumed.set_state(state)
        np.testing.assert_array_equal(resumed.prevalences(), loss.prevalences())
        np.testing.assert_array_equal(resumed.weights(), loss.weights())

        damaged = bytearray(state)
        damaged[len(damaged) // 2] ^= 0x10
        with pytest.raises(cbce.CbceError) as error:
            resumed.set_state(damaged)
        assert error.value.status == cbce.Status.INVALID_STATE
        assert resumed.get_state() == state

        resumed.reset()
        assert np.isnan(resumed.prevalences()).all()
    with pytest.raises(cbce.CbceError, match="classes"):
        cbce.ClassBalancedLoss(4).set_state(state)


def test_counts_then_update_equals_update():
    rng = np.random.default_rng(4)
    shards = [rng.integers(0, 6, size=(3, 7)) for _ in range(3)]
    together = cbce.ClassBalancedLoss(6)
    summed = cbce.ClassBalancedLoss(6)
    counts = sum(summed.class_counts(shard) for shard in shards)
    np.testing.assert_array_equal(
        counts, reference.counts_of(np.concatenate([s.ravel() for s in shards]), 6)
    )
    together.update(np.concatenate(shards))
    summed.update_from_counts(counts)
    assert summed.get_state() == together.get_state()


def test_counts_in_tensors_equal_the_pointer_forms():
    rng = np.random.default_rng(5)
    by_pointer = cbce.ClassBalancedLoss(6, ema_decay=0.8)
    by_tensor = cbce.ClassBalancedLoss(6, ema_decay=0.8)
    for _ in range(3):
        target = rng.integers(-1, 8, size=(4, 9))
        memory = np.full(12, -7, dtype=np.int64)
        by_tensor.class_counts_into(target, memory[::2])
        counts = by_pointer.class_counts(target)
        np.testing.assert_array_equal(memory[::2], counts)
        assert (memory[1::2] == -7).all()
        by_pointer.update_from_counts(counts)
        by_tensor.update_from_counts_tensor(memory[::2])
        assert by_tensor.get_state() == by_pointer.get_state()
    before = by_tensor.get_state()
    with pytest.raises(cbce.CbceError, match="count -2 of class 1 is negative"):
        by_tensor.update_from_counts_tensor(np.array([3, -2, 0, 0, 0, 1], dtype=np.int64))
    assert by_tensor.get_state() == before


def test_one_loss_shared_by_threads():
    rng = np.random.default_rng(6)
    logits, target = random_problem(rng, (64, 8), 8)
    loss = cbce.ClassBalancedLoss(8)
    loss.update(target)
    expected = loss.forward(logits, target, update=False, grad=True)
    results = []

    def compute():
        for _ in range(20):
            results.append(loss.forward(logits, target, update=False, grad=True))

    def update():
        for _ in range(20):
            loss.update(target)

    run_threads(compute, 4)
    assert len(results) == 80
    for result in results:
        np.testing.assert_array_equal(result.loss, expected.loss)
        np.testing.assert_array_equal(result.grad, expected.grad)

    # The same update 80 times, from 4 threads at once: none is lost.
    sequential = cbce.ClassBalancedLoss(8)
    sequential.set_state(loss.get_state())
    for _ in range(80):
        sequential.update(target)
    run_threads(update, 4)
    assert loss.get_state() == sequential.get_state()


def run_threads(work, count):
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
