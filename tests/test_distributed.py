"""torchrun with 2 gloo processes on CPU trains exactly what one process does with the same global batch."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from conftest import tiny_config
from vlcap.core.train.distributed import Context, LengthBucketBatchSampler, per_rank_batch, sync_gradients
from vlcap.core.errors import VlcapError
from vlcap.core.train.trainer import train

SETTINGS = ["--preset", "tiny", "--peft", "adapter", "--max-steps", 4, "--batch-size", 8, "--device", "cpu",
            "--set", "train.warmup_steps=1", "--set", "train.grad_accum=2"]


@pytest.mark.parametrize("connector", ["cross-attention", "visual-tokens"])
def test_two_gloo_processes_match_one_process(tmp_path, synthetic, registry, connector):
    """With gradient accumulation: the processes all-reduce once per optimizer step (no_sync on
    the first micro-batch) and still train what one process does, with either connector."""
    data = {"train_json": str(synthetic / "train.json"), "train_images": str(synthetic / "images_train")}
    cfg = tiny_config("adapter", data=data, train={"max_steps": 4, "batch_size": 8, "device": "cpu", "grad_accum": 2,
                                                    "warmup_steps": 1, "epochs": 1}, connector={"name": connector})
    single = train(cfg, tmp_path / "one", registry)

    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vlcap", "train", *map(str, SETTINGS), "--connector", connector, "--train-json", data["train_json"],
               "--train-images", data["train_images"], "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes" in done.stderr and done.stdout.count("trained 4 steps") == 1  # rank 0 alone reports

    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [4]
    assert history[0]["train_loss"] == pytest.approx(single.history[0]["train_loss"], rel=1e-5)
    one, two = load_file(single.last_checkpoint), load_file(out / "last.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)


def test_a_process_with_no_readable_image_does_not_stall_the_others(tmp_path, synthetic):
    """Four photos with one caption each, global batch 2: each process gets one caption per batch.
    One photo is corrupt, so in one batch a process has nothing to train on. DDP needs every
    process in each backward; all of them skip that batch, and the run finishes (no hang)."""
    images = tmp_path / "images"
    images.mkdir()
    captions = {"images": [], "annotations": []}
    for i in range(4):
        shutil.copy(synthetic / "images_train" / f"train_{i:04d}.png", images / f"{i}.png")
        captions["images"].append({"id": i, "file_name": f"{i}.png"})
        captions["annotations"].append({"id": i, "image_id": i, "caption": "a shape"})
    (images / "3.png").write_bytes(b"not a png")
    (tmp_path / "train.json").write_text(json.dumps(captions))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vlcap", "train", "--preset", "tiny", "--peft", "adapter", "--max-steps", "2", "--batch-size", "2",
               "--device", "cpu", "--train-json", str(tmp_path / "train.json"), "--train-images", str(images),
               "--out", str(tmp_path / "run")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "1 batch(es) were skipped by every process" in output and "3.png" in output
    assert (tmp_path / "run" / "last.safetensors").is_file()


def test_accumulation_all_reduces_once_per_optimizer_step(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(torch.nn.Linear(4, 1))
        reductions = []

        def count(state, bucket):
            reductions.append(bucket.buffer().numel())
            done = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done
        model.register_comm_hook(None, count)
        ctx = Context(rank=0, world_size=2)  # what a rank of a 2-process run sees
        for last in (False, False, True):  # grad_accum=3
            with sync_gradients(model, ctx, last):
                model(torch.ones(2, 4)).sum().backward()
        assert reductions == [5]  # one all-reduce of the 4 weights + bias, at the last micro-batch
        torch.testing.assert_close(model.module.weight.grad, torch.full((1, 4), 6.0))  # 3 micro-batches x 2 rows
    finally:
        dist.destroy_process_group()


def test_the_global_batch_must_split_evenly():
    assert per_rank_batch(32, Context(rank=1, world_size=4)) == 8
    with pytest.raises(VlcapError, match="pass --batch-size 12"):
        per_rank_batch(10, Context(rank=0, world_size=4))


def test_length_buckets_cover_every_caption_once_and_cut_padding():
    lengths = [int(n) for n in torch.randint(3, 40, (203,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthBucketBatchSampler(lengths, batch_size=8, seed=3, window=5)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(203))
        assert len(batches) == len(sampler) and all(len(b) <= 8 for b in batches)
    sampler.set_epoch(1)
    again = LengthBucketBatchSampler(lengths, batch_size=8, seed=3, window=5)
    again.set_epoch(1)
    assert list(again) == list(sampler)  # deterministic: seed + epoch decide the order
    again.set_epoch(2)
    assert list(again) != list(sampler)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    shuffled = torch.randperm(203, generator=torch.Generator().manual_seed(3)).tolist()
    assert padding(list(sampler)) < padding([shuffled[i:i + 8] for i in range(0, 203, 8)]) / 3

    # Two processes: each takes half of every global batch of 16; together they cover everything
    # (a last global batch smaller than the process count would be dropped; none is here).
    ranks = [LengthBucketBatchSampler(lengths, 8, seed=3, rank=r, world_size=2, window=5) for r in (0, 1)]
    parts = [list(s) for s in ranks]
    assert len(parts[0]) == len(parts[1])
    assert sorted(i for part in parts for b in part for i in b) == list(range(203))
