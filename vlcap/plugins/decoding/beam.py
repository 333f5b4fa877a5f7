import math
from dataclasses import dataclass
from typing import Annotated, Optional

import torch

from vlcap.api import DecodingStrategy, Ge, Le, ban_repeated_ngrams, length_normalised


@dataclass
class BeamConfig:
    num_beams: Annotated[int, Ge(1), Le(256)] = 3
    length_penalty: float = 1.0  # finished captions rank by log-prob / length ** length_penalty
    min_length: Annotated[int, Ge(0)] = 0  # the end token is banned before this many tokens
    max_length: Optional[Annotated[int, Ge(1), Le(65536)]] = None  # None: decoding.max_length
    no_repeat_ngram_size: Annotated[int, Ge(0)] = 0  # > 0: no n-gram of this size appears twice in a caption
    early_stopping: bool = False  # stop an image as soon as it has num_beams finished captions


class BeamSearch(DecodingStrategy):
    name = "beam"
    description = "Beam search (num_beams, length_penalty, min/max_length, no_repeat_ngram_size, early_stopping)"
    config_class = BeamConfig

    def generate(self, model, config, *, start_id, end_id, max_length):
        max_length = config.max_length or max_length
        B, K = model.images, config.num_beams
        model.expand(K)
        ids = torch.full((B * K, 1), start_id, dtype=torch.long, device=model.device)
        # All beams of an image start identical: only the first may extend at the first step.
        beams = [ImageBeams([0.0] + [-math.inf] * (K - 1)) for _ in range(B)]
        for step in range(max_length):
            length = step + 1  # generated tokens once this step's token is appended
            logprobs = torch.log_softmax(model.logits(ids).float(), dim=-1)
            if step < config.min_length:
                logprobs[:, end_id] = -math.inf
            ban_repeated_ngrams(logprobs, ids, config.no_repeat_ngram_size)
            vocab = logprobs.size(-1)
            scores = torch.tensor([score for image in beams for score in image.scores], device=logprobs.device)
            candidates = (scores.view(-1, 1) + logprobs).view(B, K * vocab)
            # 2K candidates always hold K that do not end (at most one end token per beam).
            top_scores, top_index = (t.tolist() for t in candidates.topk(2 * K, dim=1))
            rows, tokens = [], []
            for b, image in enumerate(beams):
                image_rows, image_tokens = image.advance(b, K, vocab, top_scores[b], top_index[b], ids, end_id,
                                                         length, config)
                rows += image_rows
                tokens += image_tokens
            if all(image.done for image in beams):
                break
            index = torch.tensor(rows, device=model.device)
            model.reorder(index)
            ids = torch.cat([ids.index_select(0, index), torch.tensor(tokens, device=model.device)[:, None]], dim=1)
        return [image.best(ids[b * K:(b + 1) * K], config.length_penalty) for b, image in enumerate(beams)]


class ImageBeams:
    """One image's search: its ``K`` live beams' summed log-probabilities, its finished captions
    (normalised score, tokens), best first, at most ``K``, and whether it is decided."""

    def __init__(self, scores):
        self.scores = scores
        self.finished = []
        self.done = False

    def advance(self, b, K, vocab, top_scores, top_index, ids, end_id, length, config):
        """Take this step's best candidates of image ``b`` (rows ``b*K .. b*K+K-1``): candidates
        that end become finished captions, the best ``K`` others the new live beams. Returns the
        rows they continue and the tokens they append (a decided image keeps its rows in place;
        they are never read again)."""
        if self.done:
            return list(range(b * K, (b + 1) * K)), [end_id] * K
        alive = []
        for rank, (score, index) in enumerate(zip(top_scores, top_index)):
            beam, token = divmod(index, vocab)
            if token != end_id:
                alive.append((score, b * K + beam, token))
                if len(alive) == K:
                    break
            elif rank < K:  # an ending ranked below K live beams cannot win
                caption = ids[b * K + beam, 1:].tolist()
                self.finished.append((length_normalised(score, length, config.length_penalty), caption))
        self.finished = sorted(self.finished, key=lambda h: h[0], reverse=True)[:K]
        self.scores = [score for score, _, _ in alive]
        if len(self.finished) == K:
            best_alive = length_normalised(alive[0][0], length, config.length_penalty)
            self.done = config.early_stopping or best_alive <= self.finished[-1][0]
        return [row for _, row, _ in alive], [token for _, _, token in alive]

    def best(self, rows, length_penalty):
        """The winning caption: if the search ran out of length undecided, the live beams
        (``rows``: this image's token rows) compete with the finished captions."""
        hypotheses = list(self.finished)
        if not self.done:
            hypotheses += [(length_normalised(score, rows.size(1) - 1, length_penalty), row[1:].tolist())
                           for score, row in zip(self.scores, rows)]
        return max(hypotheses, key=lambda h: h[0])[1]
