import math
from dataclasses import dataclass
from typing import Optional

import torch

from vlcap.api import DecodingStrategy, VlcapError, ban_repeated_ngrams, length_normalised


@dataclass
class BeamConfig:
    num_beams: int = 3
    length_penalty: float = 1.0  # finished captions rank by log-prob / length ** length_penalty
    min_length: int = 0  # the end token is banned before this many tokens
    max_length: Optional[int] = None  # None: decoding.max_length
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size appears twice in a caption
    early_stopping: bool = False  # stop an image as soon as it has num_beams finished captions


class BeamSearch(DecodingStrategy):
    name = "beam"
    description = "Beam search (num_beams, length_penalty, min/max_length, no_repeat_ngram_size, early_stopping)"
    config_class = BeamConfig

    def generate(self, model, config, *, start_id, end_id, max_length):
        if config.num_beams < 1:
            raise VlcapError(f"decoding.options.num_beams: must be >= 1, got {config.num_beams}")
        max_length = config.max_length or max_length
        B, K = model.images, config.num_beams
        model.expand(K)
        ids = torch.full((B * K, 1), start_id, dtype=torch.long, device=model.device)
        # All beams of an image start identical: only the first may extend at the first step.
        scores = [[0.0] + [-math.inf] * (K - 1) for _ in range(B)]
        finished = [[] for _ in range(B)]  # per image: (normalised score, tokens), best first
        done = [False] * B
        for step in range(max_length):
            length = step + 1  # generated tokens once this step's token is appended
            logprobs = torch.log_softmax(model.logits(ids).float(), dim=-1)
            if step < config.min_length:
                logprobs[:, end_id] = -math.inf
            ban_repeated_ngrams(logprobs, ids, config.no_repeat_ngram_size)
            vocab = logprobs.size(-1)
            candidates = (torch.tensor(scores, device=logprobs.device).view(-1, 1) + logprobs).view(B, K * vocab)
            # 2K candidates always hold K that do not end (at most one end token per beam).
            top_scores, top_index = (t.tolist() for t in candidates.topk(2 * K, dim=1))
            rows, tokens = [], []
            for b in range(B):
                if done[b]:  # keep its rows in place; they are never read again
                    rows += range(b * K, (b + 1) * K)
                    tokens += [end_id] * K
                    continue
                alive = []
                for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b])):
                    beam, token = divmod(index, vocab)
                    if token == end_id:
                        if rank < K:  # an ending ranked below K live beams cannot win
                            caption = ids[b * K + beam, 1:].tolist()
                            finished[b].append((length_normalised(score, length, config.length_penalty), caption))
                    else:
                        alive.append((score, b * K + beam, token))
                        if len(alive) == K:
                            break
                finished[b] = sorted(finished[b], key=lambda h: h[0], reverse=True)[:K]
                scores[b] = [score for score, _, _ in alive]
                rows += [row for _, row, _ in alive]
                tokens += [token for _, _, token in alive]
                if len(finished[b]) == K:
                    best_alive = length_normalised(alive[0][0], length, config.length_penalty)
                    done[b] = config.early_stopping or best_alive <= finished[b][-1][0]
            if all(done):
                break
            index = torch.tensor(rows, device=model.device)
            model.reorder(index)
            ids = torch.cat([ids.index_select(0, index), torch.tensor(tokens, device=model.device)[:, None]], dim=1)
        for b in range(B):
            if not done[b]:  # out of length: the live beams compete with the finished captions
                for j in range(K):
                    finished[b].append((length_normalised(scores[b][j], ids.size(1) - 1, config.length_penalty),
                                        ids[b * K + j, 1:].tolist()))
        return [max(hypotheses, key=lambda h: h[0])[1] for hypotheses in finished]
