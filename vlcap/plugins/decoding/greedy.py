import torch

from vlcap.core.decoding import DecodingStrategy


class GreedyDecoding(DecodingStrategy):
    name = "greedy"
    description = "Greedy decoding: the most likely next token at every step"

    def generate(self, captioner, memory, config, *, start_id, end_id, max_length):
        batch = memory.size(0)
        ids = torch.full((batch, 1), start_id, dtype=torch.long, device=memory.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=memory.device)
        for _ in range(max_length):
            next_ids = captioner.decoder(ids, memory)[:, -1].argmax(-1)
            next_ids = next_ids.masked_fill(finished, end_id)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            finished |= next_ids == end_id
            if finished.all():
                break
        return [_until(row[1:].tolist(), end_id) for row in ids]


def _until(tokens, end_id):
    return tokens[:tokens.index(end_id)] if end_id in tokens else tokens
