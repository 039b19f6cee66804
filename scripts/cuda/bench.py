"""Throughput of the CUDA path against PyTorch on the same device, with the device's copy
bandwidth measured in the same run as the ceiling.

For each shape and dtype it times, with CUDA events over repeated calls after warm-up:
- cbce: one cbce_forward with the gradient (counts, state update, weights, fused loss and
  gradient, reduction), on PyTorch's current stream;
- torch: F.cross_entropy(weight=...) forward plus backward through autograd;
- copy: a device-to-device copy of a buffer as large as the logits.
Effective bandwidth counts the bytes a fused pass must move at least once: the logits read,
the gradient written and the target read; the copy's counts its read and its write.

    python3 bench.py --lib libcbce.so [--repeats 20] [--markdown report.md]
"""

import argparse
import sys

import cbce_ctypes as cb

SHAPES = [((16, 19, 512, 1024), "segmentation (16, 19, 512, 1024)"), ((16384, 32000), "vocabulary (16384, 32000)")]


def timed(torch, function, repeats):
    """Milliseconds per call: the median of `repeats` event-timed calls after 3 warm-ups."""
    for _ in range(3):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--markdown")
    args = parser.parse_args()

    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("bench: skipped: PyTorch is not installed here")
        return 0
    lib = cb.load(args.lib)
    if not torch.cuda.is_available() or lib.cbce_cuda_available() != 1:
        print("bench: skipped: no CUDA device for PyTorch or for libcbce")
        return 0

    device = torch.device("cuda", 0)
    rows = []
    print(f"bench: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    for shape, label in SHAPES:
        num_classes = shape[1]
        target_shape = (shape[0],) + shape[2:]
        generator = torch.Generator(device=device).manual_seed(0)
        target = torch.randint(0, num_classes, target_shape, device=device, generator=generator)
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(shape, device=device, dtype=dtype, generator=generator)
            grad = torch.empty_like(logits)
            loss_out = torch.empty((), device=device, dtype=dtype)
            handle = cb.Loss(lib, num_classes, 0.99, (cb.DEVICE_CUDA, 0))
            handle.set_stream(torch.cuda.current_stream().cuda_stream)
            options = cb.options(lib, "mean")
            described = [cb.from_torch(t) for t in (logits, target, loss_out, grad)]

            def ours():
                handle.forward(described[0], described[1], options, described[2], described[3])

            weight = torch.tensor(handle.weights(), device=device, dtype=dtype)
            x = logits.clone().requires_grad_(True)

            def theirs():
                value = F.cross_entropy(x, target, weight=weight)
                (grad_x,) = torch.autograd.grad(value, x)
                return grad_x

            source = torch.empty_like(logits)
            destination = torch.empty_like(logits)

            def copy():
                destination.copy_(source)

            ours_ms = timed(torch, ours, args.repeats)
            handle.synchronize()
            theirs_ms = timed(torch, theirs, args.repeats)
            copy_ms = timed(torch, copy, args.repeats)
            handle.close()

            moved = logits.numel() * logits.element_size() * 2 + target.numel() * target.element_size()
            copied = logits.numel() * logits.element_size() * 2
            ours_bw = moved / ours_ms / 1e6  # GB/s
            copy_bw = copied / copy_ms / 1e6
            row = {
                "case": label, "dtype": str(dtype).replace("torch.", ""),
                "cbce_ms": ours_ms, "torch_ms": theirs_ms, "copy_ms": copy_ms,
                "cbce_gbs": ours_bw, "copy_gbs": copy_bw,
                "of_copy": ours_bw / copy_bw, "speedup": theirs_ms / ours_ms,
            }
            rows.append(row)
            print(
                f"bench: {label} {row['dtype']}: cbce {ours_ms:.3f} ms ({ours_bw:.0f} GB/s, "
                f"{100 * row['of_copy']:.0f}% of copy {copy_bw:.0f} GB/s), torch {theirs_ms:.3f} ms, "
                f"{row['speedup']:.2f}x torch"
            )
            del logits, grad, x, source, destination
            torch.cuda.empty_cache()

    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write("| case | dtype | cbce ms | GB/s | % of copy | copy GB/s | torch ms | cbce vs torch |\n")
            out.write("| --- | --- | --- | --- | --- | --- | --- | --- |\n")
            for r in rows:
                out.write(
                    f"| {r['case']} | {r['dtype']} | {r['cbce_ms']:.3f} | {r['cbce_gbs']:.0f} | "
                    f"{100 * r['of_copy']:.0f}% | {r['copy_gbs']:.0f} | {r['torch_ms']:.3f} | {r['speedup']:.2f}x |\n"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
