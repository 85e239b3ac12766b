"""The autoencoder fine-tuning loss of DiAD: LDM's ``LPIPSWithDiscriminator``, re-implemented.

The authors fine-tune the KL autoencoder with ``finetune_autoencoder.py`` and
``models/autoencoder_kl_32x32x4.yaml``: LDM's ``AutoencoderKL`` trained by Lightning with two
optimisers and the loss ``ldm.modules.losses.LPIPSWithDiscriminator(disc_start=50001,
kl_weight=1e-6, disc_weight=0.5)`` (other arguments at their defaults). Per batch, with
``global_step`` the number of optimiser steps made so far:

Generator (autoencoder) pass
    ``rec = |x - x_hat| + w_p LPIPS(x, x_hat)`` per pixel (LPIPS-VGG, one value per image,
    broadcast), ``nll = sum(rec) / B`` (the learned log-variance is 0 and not trained:
    ``learn_logvar=False``), ``kl = sum(KL(q(z|x) || N(0, I))) / B``,
    ``g = -mean(D(x_hat))`` and ``loss = nll + w_kl kl + lambda f g`` where the adaptive weight
    ``lambda = clamp(|grad_L nll| / (|grad_L g| + 1e-4), 0, 1e4) * disc_weight`` uses the
    gradients at the decoder's last convolution ``L`` and ``f = disc_factor`` once
    ``global_step >= disc_start``, else 0.
Discriminator pass
    ``f * 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))`` (hinge loss) on detached
    images, its own Adam (lr as the autoencoder's, betas 0.5, 0.9).
Discriminator (taming's ``NLayerDiscriminator``, pix2pix's PatchGAN)
    ``n_layers = 3``: conv 4x4 stride 2 (64 ch) + LeakyReLU(0.2), then per layer conv 4x4 stride 2
    without bias + BatchNorm + LeakyReLU with the width doubling up to 8x, then one stride-1 conv
    of that kind, then a 4x4 stride-1 conv to one channel; convolutions initialised
    N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0.

Before ``disc_start`` the adversarial terms are multiplied by zero in the authors' code: the
generator loss is exactly ``nll + w_kl kl`` and the discriminator optimiser steps with zero
gradients. Here the discriminator is not run before the start (the gate is on the step, as
theirs), and at the first adversarial step its Adam step counter is set to the global step, the
state Adam reaches after that many zero-gradient steps (moments zero, bias correction of a late
step), so the first adversarial updates are sized as the authors'. In the discriminator pass the
authors' Lightning loop runs the autoencoder a second time (a new posterior sample); here the
generator pass's reconstruction is reused, detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """taming's ``NLayerDiscriminator`` (see the module docstring).

    Parameters
    ----------
    in_channels : int
        Image channels (3).
    channels : int
        Width of the first layer (64).
    layers : int
        Stride-2 layers (3).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers):
            previous, mult = mult, min(2 ** n, 8)
            modules += [nn.Conv2d(channels * previous, channels * mult, 4, stride=2, padding=1, bias=False),
                        nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        previous, mult = mult, min(2 ** layers, 8)
        modules += [nn.Conv2d(channels * previous, channels * mult, 4, stride=1, padding=1, bias=False),
                    nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True),
                    nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*modules)

    @torch.no_grad()
    def initialise(self, seed: int) -> None:
        """taming's ``weights_init``, seeded: convolutions N(0, 0.02), BatchNorm N(1, 0.02) and 0."""
        generator = torch.Generator().manual_seed(int(seed))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
                if module.bias is not None:
                    # PyTorch's default bias init (taming leaves it), drawn from the same generator.
                    bound = 1 / max(1, module.in_channels * module.kernel_size[0] * module.kernel_size[1]) ** 0.5
                    module.bias.copy_((torch.rand(module.bias.shape, generator=generator) * 2 - 1) * bound)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(1 + torch.randn(module.weight.shape, generator=generator) * 0.02)
                module.bias.zero_()
                module.reset_running_stats()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch logits (B, 1, h, w)."""
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, weight: float) -> torch.Tensor:
    """``clamp(|grad nll| / (|grad g| + 1e-4), 0, 1e4) * weight`` at ``last_layer`` (detached)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * weight


def fast_forward_adam(optimiser: torch.optim.Optimizer, steps: int) -> None:
    """Give a fresh Adam the state ``steps`` zero-gradient steps leave: moments 0, step counter ``steps``."""
    for group in optimiser.param_groups:
        for p in group["params"]:
            state = optimiser.state[p]
            if state:
                continue
            state["step"] = torch.tensor(float(steps), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


__all__ = ["PatchDiscriminator", "hinge_d_loss", "adaptive_weight", "fast_forward_adam"]
