from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class Adapter(nn.Module):
    """``x + up(act(down(x)))``. The up-projection starts at zero, so a freshly added adapter is
    the identity and the captioner starts exactly where the pretrained model is."""

    def __init__(self, width, bottleneck, activation):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(self.act(self.down(x)))
