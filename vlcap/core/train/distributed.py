"""Multi-process training under ``torchrun``: process group, samplers, loss weighting, rank-0 work.

``torchrun --nproc_per_node N -m vlcap train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; without
them everything here degrades to one process (world size 1, no process group). ``train.batch_size``
is the *global* batch: each of N processes loads batch_size / N items per step, and the gradient
is the token mean over the global batch, as one process would compute it.
"""
import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from vlcap.core.errors import VlcapError
from vlcap.core.model.tokenizer import IGNORE_INDEX


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def sum(self, *values):
        """Sum floats over all processes (the logged loss and item count)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.reduce_device)
        dist.all_reduce(t)
        return tuple(t.tolist())

    @property
    def reduce_device(self):
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def is_main_process():
    return int(os.environ.get("RANK", 0)) == 0


def init(device):
    """Join the torchrun process group if there is one (NCCL for CUDA, gloo for CPU); returns the
    context and the device this process trains on (``cuda:LOCAL_RANK`` on GPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Context(), device
    ctx = Context(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def cleanup(ctx):
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(batch_size, ctx):
    if batch_size % ctx.world_size:
        raise VlcapError(f"train.batch_size={batch_size} is the global batch and must divide evenly over "
                         f"{ctx.world_size} processes; pass --batch-size {math.ceil(batch_size / ctx.world_size) * ctx.world_size}")
    return batch_size // ctx.world_size


def wrap(module, ctx, device):
    """DistributedDataParallel around the training-loss module (no-op for one process)."""
    if not ctx.enabled:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def sync_gradients(module, ctx, sync):
    """Around a micro-batch's forward + backward: DDP all-reduces the gradients only when
    ``sync`` (the last micro-batch before an optimizer step); the others accumulate locally
    (``no_sync``), so gradient accumulation costs one all-reduce per step, not one per micro-batch."""
    if not ctx.enabled or sync:
        return contextlib.nullcontext()
    return module.no_sync()


def loss_weight(labels, ctx):
    """This process's weight for its token-mean loss in a micro-batch (``labels`` None: it has
    no readable image in it), so that DDP's gradient *average* over processes equals the gradient
    of the token mean over the global batch, even when the processes hold different numbers of
    caption tokens. None: skip the micro-batch. Every process skips it when any one has nothing
    to train on, because DDP's backward needs all of them (one would otherwise wait forever)."""
    if not ctx.enabled:
        return None if labels is None else 1.0
    tokens = 0.0 if labels is None else float((labels != IGNORE_INDEX).sum())
    total, with_data = ctx.sum(tokens, float(labels is not None))
    if with_data < ctx.world_size:
        return None
    return tokens * ctx.world_size / total


def train_sampler(dataset, batch_size, ctx, seed, length_buckets=False):
    """``(sampler, batch_sampler)`` for the training DataLoader (one of them None). Each epoch's
    order depends only on ``seed`` and the epoch (``set_epoch``), and every process takes its
    share of each global batch, so N processes see the batches one process would."""
    if length_buckets:
        lengths = [len(item[1]) for item in dataset.items]
        return None, LengthBucketBatchSampler(lengths, batch_size, seed, ctx.rank, ctx.world_size)
    return EpochSampler(len(dataset), batch_size, seed, ctx.rank, ctx.world_size), None


def set_epoch(loader, epoch, skip_batches=0):
    """Start ``epoch``'s order, ``skip_batches`` batches in (a resumed run; nothing is read)."""
    sampler = loader.batch_sampler if isinstance(loader.batch_sampler, LengthBucketBatchSampler) else loader.sampler
    sampler.set_epoch(epoch, skip_batches)


class EpochSampler(Sampler):
    """A shuffled order that is a function of (seed, epoch) alone, so a resumed run rebuilds the
    interrupted epoch's exact order and starts ``skip_batches`` in without reading them.

    With N processes each takes every N-th item (the order padded with its head to a multiple of
    N, as ``DistributedSampler`` does), so the N per-process batches k together hold exactly the
    items of one process's batch k.
    """

    def __init__(self, size, batch_size, seed, rank=0, world_size=1):
        self.size, self.batch_size, self.seed, self.rank, self.world_size = size, batch_size, seed, rank, world_size
        self.per_rank = math.ceil(size / world_size)
        self.epoch = self.skip = 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip = epoch, min(skip_batches * self.batch_size, self.per_rank)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)  # distinct per (seed, epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[:self.per_rank * self.world_size - self.size]
        yield from order[self.rank::self.world_size][self.skip:]

    def __len__(self):
        return self.per_rank - self.skip


class LengthBucketBatchSampler(Sampler):
    """Batches of captions of similar token length (less padding, so faster steps).

    Per epoch: a seeded shuffle, then within windows of ``window`` global batches the items are
    sorted by length and cut into global batches, and the batch order is shuffled again. Each
    process takes every ``world_size``-th item of each global batch. Covers every item exactly once
    per epoch with one process; with N processes a last batch smaller than N is dropped.
    """

    def __init__(self, lengths, batch_size, seed, rank=0, world_size=1, window=50):
        self.lengths, self.seed, self.rank, self.world_size = lengths, seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.window = window * self.global_batch
        self.epoch = self.skip = 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip = epoch, skip_batches

    def global_batches(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start:start + self.window], key=self.lengths.__getitem__)
            batches += [window[i:i + self.global_batch] for i in range(0, len(window), self.global_batch)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return [b for b in batches if len(b) >= self.world_size]

    def __iter__(self):
        for batch in self.global_batches()[self.skip:]:
            yield batch[self.rank::self.world_size]

    def __len__(self):
        return len(self.global_batches()) - self.skip
