from vlcap.api import DecodingStrategy, decode_token_by_token


class GreedyDecoding(DecodingStrategy):
    name = "greedy"
    description = "Greedy decoding: the most likely next token at every step"

    def generate(self, model, config, *, start_id, end_id, max_length):
        return decode_token_by_token(model, lambda logits: logits.argmax(-1),
                                     start_id=start_id, end_id=end_id, max_length=max_length)
