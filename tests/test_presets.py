"""Presets: the recipes from the course's reports, listed with their trainable parameters."""
import json
import re

import pytest

from conftest import vlcap_cli
from vlcap.core import config as config_lib
from vlcap.core.config import plugin_config

RECIPES = ("lora-clip-l14", "prefix-clip-l14", "adapter-cross-clip-l14", "visual-tokens-lora-clip-l14")


def test_presets_list_every_preset_with_its_source_and_the_dry_run_count(registry):
    listed = json.loads(vlcap_cli("presets", "--json").output)
    assert [row["name"] for row in listed] == list(config_lib.PRESETS)
    rows = {row["name"]: row for row in listed}
    assert rows["tiny"]["trainable"] == 41_792
    for name in RECIPES:
        assert re.search(r"CIDEr [~0-9.-]+, CLIPScore [~0-9.-]+", rows[name]["note"]), rows[name]["note"]
        dry = vlcap_cli("train", "--preset", name, "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert f"trainable: {rows[name]['trainable']:,} of the 35,000,000 budget" in dry.output
    assert rows["lora-clip-l14"]["trainable"] == 29_448_960  # the README's budget table


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_are_valid_configs_with_beam_3(name, registry):
    cfg = config_lib.resolve(name)
    assert cfg.model.encoder == "vit_large_patch14_clip_224.openai"
    assert (cfg.decoding.strategy, cfg.decoding.options) == ("beam", {"num_beams": 3})
    plugin_config(registry.get("peft", cfg.peft.method), cfg.peft.options, "peft.options")
    plugin_config(registry.get("decoding", cfg.decoding.strategy), cfg.decoding.options, "decoding.options")
