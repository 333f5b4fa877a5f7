"""The trainer's parts: schedule and accumulation, the resume state's contents, validation."""
import json
import shutil

import torch
from timm.scheduler import CosineLRScheduler

from conftest import data_overrides, tiny_config
from vlcap.core.train import resume as resume_lib
from vlcap.core.train.trainer import Schedule, Selection, make_loaders, prepare_model, train, validation_metrics

RESUME_KEYS = {"trainable", "optimizer", "scheduler", "scaler", "rng", "epoch", "batches", "step", "running",
               "seen", "tokens", "skipped_batches", "best_value", "history", "unreadable"}


def test_schedule_steps_every_grad_accum_micro_batches_and_at_the_epoch_end():
    cfg = tiny_config(train={"grad_accum": 2, "epochs": 3}).train
    schedule = Schedule.plan(5, cfg)
    assert [i for i in range(5) if schedule.steps_after(i)] == [1, 3, 4]
    assert (schedule.total_steps, schedule.epochs) == (9, 3)
    limited = Schedule.plan(5, tiny_config(train={"grad_accum": 2, "epochs": 3, "max_steps": 4}).train)
    assert (limited.total_steps, limited.epochs) == (4, 2)
    assert float(schedule.micro_loss(torch.tensor(3.0), 0.5)) == 0.75


def test_selection_prefers_the_earlier_epoch_on_a_tie():
    lower, higher = Selection("val_loss", False), Selection("cider", True)
    assert lower.improves({"val_loss": 2.0}, None) and lower.improves({"val_loss": 1.0}, 2.0)
    assert not lower.improves({"val_loss": 2.0}, 2.0) and not higher.improves({"cider": 0.5}, 0.5)
    assert higher.improves({"cider": 0.6}, 0.5)


def tiny_run_parts():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = CosineLRScheduler(optimizer, t_initial=10, t_in_epochs=False)
    return model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


def test_resume_state_keys_and_an_older_state_without_skipped_batches(tmp_path):
    model, optimizer, scheduler, scaler = tiny_run_parts()
    state = resume_lib.TrainState(epoch=1, batches=3, step=8, running=1.5, seen=12, tokens=40, skipped_batches=2,
                                  best_value=0.25, history=[{"epoch": 1}], unreadable={"b.png", "a.png"})
    resume_lib.save_training(tmp_path, state, list(model.named_parameters()), optimizer, scheduler, scaler)
    saved = resume_lib.load_state(tmp_path)
    assert set(saved) == RESUME_KEYS and saved["unreadable"] == ["a.png", "b.png"]

    del saved["skipped_batches"]  # states written before it was counted
    fresh = tiny_run_parts()
    restored = resume_lib.restore_training(saved, *fresh, path=tmp_path)
    assert restored == resume_lib.TrainState(1, 3, 8, 1.5, 12, 40, 0, 0.25, [{"epoch": 1}], {"a.png", "b.png"})
    assert torch.equal(fresh[0].weight, model.weight)


def test_next_epoch_starts_at_its_first_batch_with_fresh_counters():
    state = resume_lib.TrainState(epoch=2, batches=5, step=9, running=3.0, seen=4, tokens=7)
    state.next_epoch()
    assert (state.epoch, state.batches, state.step, state.running, state.seen, state.tokens) == (3, 0, 9, 0.0, 0, 0)


def with_uncaptioned_image(data, out):
    """A copy of ``data``'s validation split whose annotation file also lists two images without
    any caption (one sorted before every captioned image, one after)."""
    shutil.copytree(data / "images_val", out / "images_val")
    captions = json.loads((data / "val.json").read_text())
    for i, name in enumerate(["aaa_uncaptioned.png", "zzz_uncaptioned.png"]):
        shutil.copy(out / "images_val" / captions["images"][0]["file_name"], out / "images_val" / name)
        captions["images"].append({"id": 900_000 + i, "file_name": name})
    (out / "val.json").write_text(json.dumps(captions))
    return {"data": {**data_overrides(data)["data"], "val_json": str(out / "val.json"),
                     "val_images": str(out / "images_val")}}


def test_validation_file_listing_an_image_without_captions_trains_and_scores_cider(tmp_path, small_synthetic,
                                                                                    registry):
    overrides = with_uncaptioned_image(small_synthetic, tmp_path)
    cfg = tiny_config("lora", **overrides, train={"max_steps": 1, "batch_size": 40, "metrics": ["cider"],
                                                  "max_val_images": 2})
    result = train(cfg, tmp_path / "run", registry)
    history = [json.loads(line) for line in (tmp_path / "run/history.jsonl").read_text().splitlines()]
    assert history == result.history and len(history) == 1
    assert isinstance(history[0]["cider"], float) and history[0]["cider"] >= 0 and history[0]["val_loss"] > 0


class RecordingProgress:
    """Stands in for a rich Progress: records what validation shows on it."""

    def __init__(self):
        self.tasks, self.removed = {}, []

    def add_task(self, description, total, **fields):
        self.tasks[len(self.tasks)] = {"description": description, "total": total, "completed": 0}
        return len(self.tasks) - 1

    def advance(self, task, n):
        self.tasks[task]["completed"] += n

    def remove_task(self, task):
        self.removed.append(task)


def test_validation_captioning_shows_progress_and_skips_uncaptioned_images(tmp_path, small_synthetic, registry):
    cfg = tiny_config("lora", **with_uncaptioned_image(small_synthetic, tmp_path), train={"metrics": ["cider"]})
    tokenizer, captioner, _, cfg = prepare_model(cfg, registry, tmp_path)
    device = torch.device("cpu")
    _, val = make_loaders(cfg, captioner, tokenizer, device)
    assert sorted(val.paths) == ["val_0000", "val_0001", "val_0002", "val_0003"]
    progress = RecordingProgress()
    scores = validation_metrics(captioner.eval(), val, tokenizer, cfg, registry, device, None, set(), progress)
    assert set(scores) == {"cider"}
    assert progress.tasks == {0: {"description": "validate", "total": 4, "completed": 4}} and progress.removed == [0]
