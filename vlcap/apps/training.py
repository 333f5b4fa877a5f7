"""What ``vlcap train`` and ``vlcap cache-features`` run besides the trainer itself: the dry run's
parameter report, continuing a stopped run, and caching the encoder's tokens."""
from vlcap.apps import reports
from vlcap.core.errors import VlcapError
from vlcap.core.model.captioner import build_captioner, build_encoder
from vlcap.core.model.peft import MAX_TRAINABLE, check_budget, count_parameters, seeded
from vlcap.core.train.feature_cache import write_feature_cache
from vlcap.core import config as config_lib
from vlcap.core.config import LENGTH_KEYS
from vlcap.core.train.resume import resume_config
from vlcap.core.train.trainer import train


def dry_run(cfg, registry, console):
    """``vlcap train --dry-run``: build ``cfg``'s captioner as shapes only (nothing loads or
    downloads), print its parameters per part on ``console``, then raise a ``VlcapError`` if the
    trainable ones are over the budget. Returns the ``ParameterCount``."""
    captioner = build_captioner(cfg, registry, meta=True).captioner
    counts = count_parameters(captioner)
    title = (f"{cfg.model.encoder} + {cfg.connector.name} + GPT-2 ({cfg.model.decoder.n_layer} layers) + "
             f"{cfg.peft.method}")
    console.print(reports.parameter_report(counts, title, MAX_TRAINABLE))
    check_budget(counts.trainable)
    return counts


def resume_training(run_dir, registry, train_overrides=None, console=None):
    """``vlcap train --resume``: continue the run in ``run_dir`` with its own config.yaml and
    ``train_overrides`` (train key -> value: ``device``, and ``epochs`` / ``max_steps`` to give a
    stopped or finished run a new, longer length; recorded in config.yaml). The learning rate
    continues on the cosine schedule re-planned over the new total, as if the run had been
    planned that long: a finished run's rate rises from its minimum to that schedule's value at
    the step reached, without a new warm-up. Returns the trainer's result."""
    overrides = dict(train_overrides or {})
    new_length = any(key in overrides for key in LENGTH_KEYS)
    return train(resume_config(run_dir, overrides), run_dir, registry, console=console, resume=True,
                 new_length=new_length)


def cache_encoder_features(cfg, image_dir, out, *, dtype="float16", batch_size=32, device="cpu", console=None):
    """``vlcap cache-features``: run ``cfg``'s frozen encoder, built exactly as training builds it,
    over every image in ``image_dir`` on ``device`` and write the feature cache ``out``. Returns the cache."""
    with seeded(cfg.model.init_seed):  # the same random weights a non-pretrained encoder gets in training
        vit = build_encoder(cfg).to(device)
    return write_feature_cache(vit, image_dir, out, dtype=dtype, batch_size=batch_size, device=device,
                               console=console)


def preset_summaries(registry):
    """``vlcap presets``: for each preset, its note, encoder, connector and PEFT method with options, decoding
    and trainable parameters, counted on a shapes-only build as ``--dry-run`` does (no weights,
    no download). A preset whose method is not installed counts as None."""
    rows = []
    for name in config_lib.PRESETS:
        cfg = config_lib.resolve(name)
        try:
            trainable = count_parameters(build_captioner(cfg, registry, meta=True).captioner).trainable
        except VlcapError:
            trainable = None
        options = "".join(f" {key}={value}" for key, value in cfg.peft.options.items())
        connector = cfg.connector.name + "".join(f" {key}={value}" for key, value in cfg.connector.options.items())
        decoding = cfg.decoding.strategy + "".join(f" {k}={v}" for k, v in cfg.decoding.options.items())
        rows.append({"name": name, "note": config_lib.PRESET_NOTES.get(name, ""), "encoder": cfg.model.encoder,
                     "connector": connector, "peft": cfg.peft.method + options, "decoding": decoding, "trainable": trainable})
    return rows
