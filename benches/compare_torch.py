#!/usr/bin/env python3
"""Times PyTorch's weighted cross_entropy, forward plus backward, on the shapes of the throughput
benchmark and the same number of threads, side by side with this library and a plain copy of
the same bytes measured in the same run, and prints the ratios.

    python benches/compare_torch.py [--threads 2] [--plot scaling.png]

Needs torch (and matplotlib for --plot) in the running Python; builds the Rust benchmark with
cargo. Each case runs PyTorch and then this library right after it, so both see the same load.
With --plot it also times the segmentation shape at batch sizes 1, 2, 4 and 8 and draws time
against batch size for this library, PyTorch and the copy floor.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
CASES = [
    ("segmentation NCHW", (8, 19, 256, 512), "f32", False),
    ("segmentation channels-last", (8, 19, 256, 512), "f32", True),
    ("classification", (4096, 1000), "f32", False),
    ("small-C", (65536, 10), "f32", False),
    ("segmentation NCHW", (8, 19, 256, 512), "bf16", False),
]


def benchmark_binary():
    """Builds the Rust benchmark and returns the path of its executable."""
    out = subprocess.run(
        ["cargo", "bench", "--bench", "throughput", "--no-run", "--message-format=json"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    for line in out.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "throughput":
            if message.get("executable"):
                return message["executable"]
    sys.exit("could not find the throughput benchmark's executable")


def time_torch(shape, dtype, channels_last, repetitions):
    classes = shape[1]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=generator).to(dtype)
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, classes, (shape[0],) + tuple(shape[2:]), generator=generator)
    weight = (torch.rand(classes, generator=generator) + 0.5).to(dtype)

    def step():
        x = logits.detach().requires_grad_()
        F.cross_entropy(x, target, weight=weight).backward()

    step()
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_ours(binary, name, dtype, batch, threads):
    # PyTorch's OpenMP workers spin for a while after a parallel region; let them go to sleep
    # so that they do not take the cores from the benchmark.
    time.sleep(1.0)
    command = [binary, "--csv", "--only", name, "--dtype", dtype, "--batch", str(batch)]
    # Fewer repetitions for the large float32 cases; short cases need more to settle.
    if dtype == "f32" and name.startswith("segmentation"):
        command.append("--quick")
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    lines = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    for line in lines.splitlines():
        fields = line.split(",")
        if fields[0] == name and fields[1] == dtype:
            return float(fields[-2]), float(fields[-1])
    sys.exit(f"the benchmark printed no {name} {dtype} line")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--plot", type=Path, help="write a PNG of time against batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    binary = benchmark_binary()
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}

    print(f"forward + backward, {args.threads} threads, torch {torch.__version__}")
    print(f"{'case':<27} {'shape':<19} {'dtype':<5} {'torch ms':>9} {'cbce ms':>8} "
          f"{'copy ms':>8} {'speed-up':>9}")
    for name, shape, dtype, channels_last in CASES:
        torch_ms = time_torch(shape, dtypes[dtype], channels_last, args.repetitions)
        ours_ms, copy_ms = time_ours(binary, name, dtype, shape[0], args.threads)
        print(f"{name:<27} {str(shape):<19} {dtype:<5} {torch_ms:>9.2f} {ours_ms:>8.2f} "
              f"{copy_ms:>8.2f} {torch_ms / ours_ms:>8.1f}x")

    if args.plot:
        plot_scaling(binary, args)


def plot_scaling(binary, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [1, 2, 4, 8]
    rows = []
    for batch in batches:
        shape = (batch, 19, 256, 512)
        torch_ms = time_torch(shape, torch.float32, False, args.repetitions)
        ours_ms, copy_ms = time_ours(binary, "segmentation NCHW", "f32", batch, args.threads)
        rows.append((torch_ms, ours_ms, copy_ms))
        print(f"batch {batch}: torch {torch_ms:.2f} ms, cbce {ours_ms:.2f} ms, copy {copy_ms:.2f} ms")
    figure, axes = plt.subplots(figsize=(6, 4))
    for index, label in enumerate(["PyTorch cross_entropy", "cbce", "copy of the same bytes"]):
        axes.plot(batches, [row[index] for row in rows], marker="o", label=label)
    axes.set_xlabel("batch size N of (N, 19, 256, 512) float32 logits")
    axes.set_ylabel("forward + backward time (ms)")
    axes.set_title(f"Time against batch size, {args.threads} threads")
    axes.set_xticks(batches)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
