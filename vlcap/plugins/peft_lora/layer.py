import loralib
import torch
import torch.nn.functional as F


class MergedLinear(loralib.MergedLinear):
    """loralib's ``MergedLinear`` (LoRA on some slices of a fused q/k/v Linear) with a low-rank
    forward. loralib 0.1.2 rebuilds the full ``(out, in)`` update ``B @ A`` (a grouped conv1d and
    a zero pad) on every forward and multiplies the input by it: three extra full-size matmuls
    per layer in training, to apply an update of rank ``r``. Here the input goes through ``A``,
    then each enabled slice's ``B``, and is added to that slice of the output: the same sum,
    with rank-sized matmuls. Parameters, init, merging and state-dict keys stay loralib's."""

    def forward(self, x):
        if self.merged or self.r == 0 or not any(self.enable_lora) or self.fan_in_fan_out:
            return super().forward(x)
        result = F.linear(x, self.weight, self.bias)
        enabled = [i for i, on in enumerate(self.enable_lora) if on]
        low_rank = (self.lora_dropout(x) @ self.lora_A.t()).unflatten(-1, (len(enabled), self.r))
        # lora_B stacks each enabled slice's (slice_width, r) block, as loralib's grouped conv1d reads it.
        update = torch.einsum("...gr,gor->...go", low_rank, self.lora_B.unflatten(0, (len(enabled), -1)))
        slices = result.unflatten(-1, (len(self.enable_lora), -1))
        index = torch.tensor(enabled, device=x.device)
        return slices.index_add(-2, index, update, alpha=self.scaling).flatten(-2)
