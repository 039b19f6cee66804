"""The reference cases on a CUDA handle, against the recorded vectors and against PyTorch's own
CUDA cross_entropy given the same weights.

Each case of the vectors file is replayed step by step on one handle: update steps through
cbce_update, forward steps through cbce_forward (and cbce_backward for reduction "none"), on
CUDA tensors, on PyTorch's current stream. Then, for every forward step, PyTorch computes
F.cross_entropy with the weights the handle used, and its gradient by autograd. Prints one line
per case and a summary; exits non-zero on any disagreement.

    python3 compare_torch.py --lib libcbce.so --vectors reference.json [--device cuda|cpu]

With --device cpu the same replay runs on a CPU handle (a check of this script and of the
binding where no GPU is present; PyTorch is then used on the CPU, if installed, else skipped).
"""

import argparse
import json
import math
import sys

import cbce_ctypes as cb

LOSS_REL, LOSS_ABS = 1e-5, 1e-6
STATE_REL, STATE_ABS = 4e-7, 1e-9


def floats(values):
    return [math.nan if v is None else float(v) for v in values]


def worst(actual, expected, rel, abs_):
    """The largest error relative to the tolerance (<= 1 passes); NaN must meet NaN."""
    assert len(actual) == len(expected), (len(actual), len(expected))
    ratio = 0.0
    for a, e in zip(actual, expected):
        if math.isnan(e) or math.isnan(a):
            if not (math.isnan(e) and math.isnan(a)):
                return math.inf
            continue
        ratio = max(ratio, abs(a - e) / max(abs_, rel * abs(e)))
    return ratio


class Replay:
    def __init__(self, lib, device, torch):
        self.lib, self.device, self.torch = lib, device, torch
        self.failures = []
        self.worst = {}

    def record(self, what, ratio):
        kind = what.split()[-1]
        self.worst[kind] = max(self.worst.get(kind, 0.0), ratio)
        if ratio > 1.0:
            self.failures.append(f"{what}: {ratio:.3g} times the tolerance")

    def tensor(self, values, shape, dtype):
        t = self.torch
        return t.tensor(values, dtype=dtype).reshape(shape).to(self.device)

    def case(self, case):
        t = self.torch
        num_classes = case["config"]["num_classes"]
        place = (cb.DEVICE_CUDA, 0) if self.device == "cuda" else (cb.DEVICE_CPU, 0)
        loss = cb.Loss(self.lib, num_classes, case["config"]["ema_decay"], place)
        stream = t.cuda.current_stream().cuda_stream if self.device == "cuda" else None
        try:
            if stream is not None:
                loss.set_stream(stream)
            for index, step in enumerate(case["steps"]):
                self.step(loss, f"{case['name']} step {index}", step)
        finally:
            loss.close()

    def step(self, loss, context, step):
        t, F = self.torch, self.torch.nn.functional
        expected = step["expected"]
        target = self.tensor(step["target"], step["target_shape"], t.int64)
        if step["kind"] == "update":
            loss.update(cb.from_torch(target), step["ignore_index"])
        else:
            opts = step["options"]
            reduction = opts["reduction"]
            options = cb.options(
                self.lib, reduction, opts["ignore_index"], opts["label_smoothing"], opts["update_class_prevalences"]
            )
            logits = self.tensor(step["input"], step["input_shape"], t.float32)
            loss_shape = step["target_shape"] if reduction == "none" else []
            loss_out = t.zeros(loss_shape, dtype=t.float32, device=self.device)
            grad = t.zeros_like(logits)
            if reduction == "none":
                used = loss.forward(cb.from_torch(logits), cb.from_torch(target), options, cb.from_torch(loss_out), None, True)
                upstream = self.tensor(step["grad_output"], loss_shape, t.float32)
                loss.backward(cb.from_torch(logits), cb.from_torch(target), options, cb.from_torch(upstream), used, cb.from_torch(grad))
            else:
                used = loss.forward(cb.from_torch(logits), cb.from_torch(target), options, cb.from_torch(loss_out), cb.from_torch(grad), True)
                upstream = None
            loss.synchronize()
            ours_loss = loss_out.flatten().tolist()
            ours_grad = grad.flatten().tolist()
            self.record(f"{context} vs vectors loss", worst(ours_loss, floats(expected["loss"]), LOSS_REL, LOSS_ABS))
            self.record(f"{context} vs vectors grad", worst(ours_grad, floats(expected["grad_input"]), LOSS_REL, LOSS_ABS))
            self.record(f"{context} vs vectors weights_used", worst(used, floats(expected["weights_used"]), STATE_REL, STATE_ABS))

            # PyTorch's own weighted cross-entropy on the same device, with the same weights.
            x = logits.clone().requires_grad_(True)
            weight = t.tensor(used, dtype=t.float32, device=self.device)
            theirs = F.cross_entropy(
                x, target, weight=weight, reduction=reduction,
                ignore_index=opts["ignore_index"], label_smoothing=opts["label_smoothing"],
            )
            theirs.backward(upstream if upstream is not None else None)
            self.record(f"{context} vs torch loss", worst(ours_loss, theirs.detach().flatten().tolist(), LOSS_REL, LOSS_ABS))
            self.record(f"{context} vs torch grad", worst(ours_grad, x.grad.flatten().tolist(), LOSS_REL, LOSS_ABS))
        self.record(f"{context} vs vectors prevalences", worst(loss.prevalences(), floats(expected["class_prevalences"]), STATE_REL, STATE_ABS))
        self.record(f"{context} vs vectors weights", worst(loss.weights(), floats(expected["class_weights"]), STATE_REL, STATE_ABS))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", required=True)
    parser.add_argument("--vectors", required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        print("compare: skipped: PyTorch is not installed here")
        return 0
    lib = cb.load(args.lib)
    if args.device == "cuda" and (not torch.cuda.is_available() or lib.cbce_cuda_available() != 1):
        print("compare: skipped: no CUDA device for PyTorch or for libcbce")
        return 0
    cases = json.load(open(args.vectors))["cases"]
    replay = Replay(lib, args.device, torch)
    for case in cases:
        before = len(replay.failures)
        replay.case(case)
        print(f"compare: {case['name']}: {'ok' if len(replay.failures) == before else 'FAILED'}")
    summary = ", ".join(f"{kind} {ratio:.3g}" for kind, ratio in sorted(replay.worst.items()))
    print(f"compare: worst error as a fraction of the tolerance: {summary}")
    for failure in replay.failures:
        print(f"compare: FAILED {failure}")
    print(f"compare: {len(cases) - len({f.split(' step')[0] for f in replay.failures})} passed, "
          f"{len({f.split(' step')[0] for f in replay.failures})} failed")
    return 1 if replay.failures else 0


if __name__ == "__main__":
    sys.exit(main())
