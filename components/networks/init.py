"""Weight initialisation applied from outside the network classes (the networks stay plain modules)."""

from torch import nn


def init_normal_(module: nn.Module, std: float = 0.02) -> nn.Module:
    """pix2pix's `init_weights(init_type="normal")`, which ATME applies to G and W as well.

    Convolution (and transposed) and linear weights N(0, std), their biases 0; batch-norm scales
    N(1, std), shifts 0. Group and instance norms keep their (1, 0) defaults, as the reference,
    whose rule matches only classes named Conv, Linear or BatchNorm2d. Returns `module`.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, std)
            nn.init.zeros_(layer.bias)
    return module
