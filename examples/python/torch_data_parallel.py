"""Data-parallel training with torch.distributed and cbce: every process trains a small
segmentation model (a 1x1 convolution) wrapped in DistributedDataParallel on its own slice of
each batch, and all of them weigh the classes as one process seeing the whole batch would.

A step on each rank:

1. count the labels of its slice (`ClassBalancedLoss.class_counts`; ignored pixels are not
   counted), sum the counts over the ranks (`dist.all_reduce`, int64) and apply the sum
   (`update_from_counts`): every rank now holds the same state, bit for bit;
2. take the denominator of the global "mean", sum over classes of count * weight, from the
   summed counts and the weights, as the library computes it: it is exactly the single-process
   denominator and needs no further communication;
3. compute the loss with reduction "sum" and no update of its own, and back-propagate
   `loss_sum * world_size / denominator`: DDP averages the gradients over the ranks, so that
   average is the gradient of the global mean loss;
4. sum the loss over the ranks: global mean = sum of the local sums / denominator.

Rank 0 checks every step against one process: the ranks' weights and state blobs against a
loss that sees the whole batch (bit for bit), the mean loss and the gathered gradient of the
logits against that loss over the gathered logits (within float32 rounding), and the averaged
parameter gradients against a copy of the model run on the whole batch.

    PYTHONPATH=python python examples/python/torch_data_parallel.py [--world-size 2]

It uses the gloo backend on this machine's loopback interface, with processes started by
torch.multiprocessing. `--local-counts` skips the all-reduce of the counts, as a trainer that
forgets it would: the ranks then drift apart and the checks say so. Exits with status 1 when a
check fails.
"""

import argparse
import datetime
import json
import os
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cbce
from cbce.pytorch import ClassBalancedCrossEntropyLoss

BATCH, CHANNELS, CLASSES, HEIGHT, WIDTH = 8, 3, 5, 13, 17
STEPS = 4
IGNORE = 255
EMA_DECAY = 0.9
LEARNING_RATE = 0.5

EPS32 = float(np.finfo(np.float32).eps)
# The mean loss and the logits' gradient come from the same logits and weights on both sides;
# they differ by float32 roundings only: each rank's loss sum is rounded to float32 before the
# ranks add them (at most 2^-24 relative each) and the single-process mean once, so the loss is
# allowed twice that bound. The gradient's upstream value, world_size / denominator, is rounded
# to float32 by autograd; a gradient element is allowed 4 EPS32 of its scale, the upstream value
# times the weight of its label, which bounds its magnitude.
LOSS_TOLERANCE_PER_RANK = 2 * EPS32
GRAD_TOLERANCE = 4 * EPS32
# The parameters' gradients are sums over pixels of the model's own float32 arithmetic, which
# PyTorch groups differently for another batch size: each is compared within 1e-5 of its largest
# element.
PARAMETER_RTOL = 1e-5


def build_images(step, first, count):
    """Images [first, first + count) of the batch of `step`: inputs (count, CHANNELS, H, W) and
    uint8 masks (count, H, W), each image from its own seed so that any rank can build any image.
    Each image is mostly its own class, image % CLASSES, so the slices of different ranks have
    different class frequencies; about a tenth of the pixels are ignored."""
    inputs = torch.empty(count, CHANNELS, HEIGHT, WIDTH)
    masks = torch.empty(count, HEIGHT, WIDTH, dtype=torch.uint8)
    for i in range(count):
        image = first + i
        generator = torch.Generator().manual_seed(1000 * step + image)
        u = torch.rand(HEIGHT, WIDTH, generator=generator)
        labels = torch.full((HEIGHT, WIDTH), image % CLASSES, dtype=torch.int64)
        labels = torch.where(u >= 0.5, (u * 100).long() % CLASSES, labels)
        labels = torch.where(u >= 0.9, IGNORE, labels)
        masks[i] = labels.to(torch.uint8)
        inputs[i] = torch.randn(CHANNELS, HEIGHT, WIDTH, generator=generator)
    return inputs, masks


def first_image(rank, world_size):
    """The first image of `rank`'s slice of BATCH images split as evenly as possible."""
    return rank * BATCH // world_size


def new_model():
    torch.manual_seed(0)
    return torch.nn.Conv2d(CHANNELS, CLASSES, kernel_size=1)


def synchronised_step(model, criterion, inputs, masks, world_size, all_reduce_counts):
    """One data-parallel step of this rank; returns its logits (with their gradient), the
    weights it used, and the global mean loss and denominator."""
    loss = criterion.loss
    counts = torch.from_numpy(loss.class_counts(masks, ignore_index=IGNORE))
    if all_reduce_counts:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    loss.update_from_counts(counts.numpy())
    weights = loss.weights()
    weight_sum = sum(float(n) * float(w) for n, w in zip(counts.tolist(), weights.tolist()))

    logits = model(inputs)
    logits.retain_grad()
    loss_sum, weights_used = criterion(
        logits, masks, update_class_prevalences=False, return_class_weights=True, reduction="sum"
    )
    (loss_sum * (world_size / weight_sum)).backward()

    total = loss_sum.detach().to(torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return logits, weights_used.numpy(), float(total) / weight_sum, weight_sum


def single_process_step(loss, model, inputs, masks, logits):
    """The whole batch on one process, with `loss` (a cbce.ClassBalancedLoss): the mean loss
    (with update) over the ranks' gathered logits, its gradient, weights and denominator, and the
    gradients of the parameters of `model` run on the whole batch."""
    result = loss.forward(logits.numpy(), masks.numpy(), ignore_index=IGNORE, grad=True)
    model.zero_grad()
    model_logits = model(inputs)
    one = np.ones((), dtype=np.float32)
    grad = loss.backward(model_logits.detach(), masks, one, result.weights, ignore_index=IGNORE)
    model_logits.backward(torch.from_numpy(grad))
    return dict(
        mean=float(result.loss),
        weights=result.weights,
        weight_sum=result.weight_sum,
        logits_grad=torch.from_numpy(result.grad),
        parameter_grads=[p.grad for p in model.parameters()],
        state=loss.get_state(),
        masks=masks,
    )


def check_step(step, world_size, gathered, whole, ddp_grads, failures):
    """Rank 0's checks of one step; appends a message per failed check, returns the largest
    differences seen: of the loss and of the logits' gradient in EPS32 (of each element's scale),
    of the parameters' gradients relative."""
    weights, weight_sum, masks = whole["weights"], whole["weight_sum"], whole["masks"]
    for rank, got in enumerate(gathered):
        if got["weights"].tobytes() != weights.tobytes():
            failures.append(
                f"step {step}: the weights of rank {rank} differ: {got['weights']} against "
                f"{weights}"
            )
        if got["state"] != whole["state"]:
            failures.append(f"step {step}: the state blob of rank {rank} differs")
        if got["weight_sum"] != weight_sum:
            failures.append(
                f"step {step}: rank {rank}'s denominator {got['weight_sum']!r} is not "
                f"{weight_sum!r}"
            )

    global_mean, mean = gathered[0]["mean"], whole["mean"]
    loss_error = abs(global_mean - mean) / abs(mean)
    if not loss_error <= (world_size + 1) * LOSS_TOLERANCE_PER_RANK:
        failures.append(f"step {step}: the ranks' mean loss {global_mean!r} is not {mean!r}")

    # DDP's average over the ranks divides by world_size what each rank scaled by it.
    ranks_grad = torch.cat([got["logits_grad"] for got in gathered]).to(torch.float64)
    ranks_grad /= world_size
    label = masks.long().clamp(max=CLASSES - 1).unsqueeze(1)
    scale = torch.from_numpy(weights).to(torch.float64)[label] / weight_sum
    scale = torch.where(masks.unsqueeze(1) == IGNORE, 0.0, scale)
    error = (ranks_grad - whole["logits_grad"].to(torch.float64)).abs()
    bad = error > GRAD_TOLERANCE * scale
    if bad.any():
        failures.append(
            f"step {step}: {int(bad.sum())} elements of the logits' gradient differ beyond the "
            f"tolerance, by up to {float(error.max())!r}"
        )
    grad_error = float((error / scale.clamp(min=1e-300)).max()) / EPS32

    parameter_error = 0.0
    for index, (got, expected) in enumerate(zip(ddp_grads, whole["parameter_grads"])):
        relative = float((got - expected).abs().max() / expected.abs().max())
        parameter_error = max(parameter_error, relative)
        if not relative <= PARAMETER_RTOL:
            failures.append(
                f"step {step}: the gradient of parameter {index} differs: "
                f"{got.flatten().tolist()} against {expected.flatten().tolist()}"
            )
    return loss_error / EPS32, grad_error, parameter_error


def worker(rank, world_size, init_file, report_path, all_reduce_counts):
    # One thread per process: the ranks share this machine's cores.
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    model = torch.nn.parallel.DistributedDataParallel(new_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    criterion = ClassBalancedCrossEntropyLoss(CLASSES, ema_decay=EMA_DECAY, ignore_index=IGNORE)
    first = first_image(rank, world_size)
    count = first_image(rank + 1, world_size) - first
    if rank == 0:
        whole_loss = cbce.ClassBalancedLoss(CLASSES, ema_decay=EMA_DECAY)
        whole_model = new_model()
        counting = "counts summed over the ranks" if all_reduce_counts else "own counts only"
        print(
            f"cbce {cbce.version()}, torch.distributed (gloo) data-parallel: {world_size} ranks, "
            f"batch ({BATCH}, {CLASSES}, {HEIGHT}, {WIDTH}), {counting}"
        )
        print("step  mean loss    weights")

    failures = []
    worst = dict(loss_eps=0.0, grad_eps=0.0, parameter_rtol=0.0)
    for step in range(STEPS):
        inputs, masks = build_images(step, first, count)
        optimizer.zero_grad()
        logits, weights, global_mean, weight_sum = synchronised_step(
            model, criterion, inputs, masks, world_size, all_reduce_counts
        )
        mine = dict(
            weights=weights,
            state=criterion.loss.get_state(),
            weight_sum=weight_sum,
            mean=global_mean,
            logits_grad=logits.grad,
        )
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        all_logits = [None] * world_size if rank == 0 else None
        dist.gather_object(logits.detach(), all_logits, dst=0)

        if rank == 0:
            whole_model.load_state_dict(model.module.state_dict())
            whole_inputs, whole_masks = build_images(step, 0, BATCH)
            whole = single_process_step(
                whole_loss, whole_model, whole_inputs, whole_masks, torch.cat(all_logits)
            )
            ddp_grads = [p.grad for p in model.parameters()]
            errors = check_step(step, world_size, gathered, whole, ddp_grads, failures)
            for key, error in zip(worst, errors):
                worst[key] = max(worst[key], error)
            print(f"{step:4d}  {global_mean:.7f}    " + " ".join(f"{w:.4f}" for w in weights))
        optimizer.step()

    if rank == 0:
        for failure in failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        if not failures:
            print(
                f"torch_data_parallel: {world_size} ranks hold the single-process weights and "
                f"state bit for bit; mean loss within {worst['loss_eps']:.2f} EPS32, logits' "
                f"gradient within {worst['grad_eps']:.2f} EPS32 of its scale, parameters' "
                f"gradients within {worst['parameter_rtol']:.1e} of their largest element"
            )
        with open(report_path, "w") as report:
            json.dump(dict(world_size=world_size, failures=failures, **worst), report)
    dist.destroy_process_group()


def run(world_size=2, all_reduce_counts=True):
    """Runs the example on `world_size` processes; returns rank 0's report: world_size, the
    failed checks' messages, and the largest differences seen."""
    with tempfile.TemporaryDirectory() as work:
        init_file = os.path.join(work, "init")
        report_path = os.path.join(work, "report.json")
        mp.spawn(
            worker,
            args=(world_size, init_file, report_path, all_reduce_counts),
            nprocs=world_size,
            join=True,
        )
        with open(report_path) as report:
            return json.load(report)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument(
        "--local-counts",
        action="store_true",
        help="skip the all-reduce of the counts (the checks then fail)",
    )
    arguments = parser.parse_args()
    report = run(arguments.world_size, not arguments.local_counts)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
