"""GAN objectives (vanilla / LSGAN / hinge, one-sided label smoothing) and the R1 penalty."""

import torch
from torch.nn import functional as F

from components.config.model import LossParams


class GANLoss:
    """D and G losses on logit maps.

    `discriminator_scale` multiplies D's loss: 0.5 for pix2pix and ATME (pix2pix halves it so D
    learns at half G's rate), 1 for DDGAN, whose official loss is the plain sum; the lazy R1
    penalty is added on that scale, so halving it there would double the effective r1_gamma.
    """

    def __init__(self, params: LossParams, discriminator_scale: float = 0.5):
        self.kind = params.gan_loss
        self.real_label = 1.0 - params.label_smoothing
        self.discriminator_scale = discriminator_scale

    def discriminator(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        real_logits, fake_logits = real_logits.float(), fake_logits.float()
        if self.kind == "vanilla":
            # BCE with target y: y softplus(-l) + (1 - y) softplus(l).
            label = self.real_label
            real = label * F.softplus(-real_logits) + (1 - label) * F.softplus(real_logits)
            fake = F.softplus(fake_logits)
        elif self.kind == "lsgan":
            real = (real_logits - self.real_label).square()
            fake = fake_logits.square()
        else:
            real = F.relu(self.real_label - real_logits)
            fake = F.relu(1.0 + fake_logits)
        return self.discriminator_scale * (real.mean() + fake.mean())

    def generator(self, fake_logits: torch.Tensor) -> torch.Tensor:
        fake_logits = fake_logits.float()
        if self.kind == "vanilla":
            return F.softplus(-fake_logits).mean()  # non-saturating: -log D(G)
        if self.kind == "lsgan":
            return (fake_logits - 1.0).square().mean()
        return -fake_logits.mean()


def r1_penalty(logits: torch.Tensor, real_input: torch.Tensor) -> torch.Tensor:
    """R1 per logit: |grad_{real_input} logit|^2 averaged over D's logits and the batch.

    `real_input` must require grad; `logits` is D's output on it (N x 1 x H x W for a PatchGAN,
    N x 1 for a D with one output). Each patch logit of a PatchGAN is judged like the single
    output of the D a published gamma was tuned for, so gamma means the same at every image
    size (the R1 of the map's *sum*, the usual code, grows with the number of patches: 32x,
    176x and 827x the per-patch R1 at 64, 128 and 256 px for a norm-free PatchGAN at
    initialisation). One backward pass gives an unbiased estimate: with
    independent random signs v = +-1 per logit, E_v |grad sum_p v_p l_p|^2 = sum_p |grad l_p|^2
    (the cross terms cancel, including those through a norm layer's statistics), divided by
    the number of logits per sample. With one logit per sample it is the usual R1 exactly.
    """
    logits = logits.float()
    signs = torch.randint(0, 2, logits.shape, device=logits.device).mul_(2).sub_(1).to(logits.dtype)
    (gradient,) = torch.autograd.grad((logits * signs).sum(), real_input, create_graph=True)
    logits_per_sample = logits[0].numel()
    return gradient.float().square().sum(dim=tuple(range(1, gradient.dim()))).mean() / logits_per_sample
