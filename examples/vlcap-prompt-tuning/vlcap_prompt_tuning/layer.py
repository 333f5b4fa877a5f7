from torch import nn


class SoftPrompt(nn.Module):
    """``P`` trainable input embeddings, the same for every image. Calling it with a batch size
    gives ``(B, P, n_embd)``: the shape vlcap's ``decoder.input_prefix`` hook point takes."""

    def __init__(self, init):
        super().__init__()
        self.embedding = nn.Parameter(init.detach().clone())

    def forward(self, batch_size):
        return self.embedding.unsqueeze(0).expand(batch_size, -1, -1)
