"""Adversarial VAE (AVAE; Plumerault, Le Borgne, Hudelot, ICPR 2020, arXiv 2012.11551).

Four networks, each trained only by its own loss (official code ``AntoinePlumerault/AVAE``,
``src/frameworks/avae.py`` and ``src/frameworks/utils/losses.py``):

- encoder E: x -> (mu(x), log sigma). In the official code sigma is **one learned global vector** (a
  ``LogSigma`` layer initialised to 0), not a function of x; ``input_dependent_sigma=True`` makes it one.
- decoder D: z -> image mean (tanh). The plain VAE half of the model.
- generator G: [z, xi] -> image (tanh), with extra noise xi ~ N(0, I_d) of the latent size d.
- discriminator C: image -> one logit.

One training step draws eps, xi, z_f ~ N(0, I) and computes, on images x_c in [-1, 1] with sigma_x = 1::

    z_r = mu(x) + sigma * eps;   x_bar = D(z_r);   x_tilde = G([z_f, xi]);   (mu_t, log sigma_t) = E(x_tilde)
    L_KL  = mean_b sum_j [(mu_j^2 + sigma_j^2) / 2 - 1/2 - log sigma_j]
    L_NLL = mean_b sum_pixels 1/2 (x_c - x_bar)^2
    L_gen = mean_b (-C(x_tilde))                               raw logit, not the saturating BCE form
    L_dis = mean_b [BCE(1, C(x_c)) + BCE(0, C(x_tilde))]       sigmoid cross-entropy on logits
    L_Z   = sum_b sum_j 1/2 (z_f - mu_t)_j^2 w_j,  w = stopgrad(softmax_j(-2 log sigma_t))   (summed over batch)

    E <- beta L_KL + L_NLL;   D <- L_NLL;   G <- L_gen + latent_weight L_Z;   C <- L_dis

All four gradients come from the same forward pass and are applied together (the official code takes them from
one persistent ``GradientTape``). L_Z reaches G through E(x_tilde) but only G is updated by it: E never receives
a gradient from L_Z or from the adversarial losses.

L_Z here is the official code's ``latent_loss`` (Plumerault et al. 2020, official implementation), not the
paper's formula L_Z = 1/2 ||(mu_e(x_tilde) - sqrt(1 - sigma_e^2) z) / sigma_e||^2. They differ twice: the
official target is z itself, without the paper's sqrt(1 - sigma_e^2) shrinkage of z, and each dimension is
weighted by softmax_j(-2 log sigma_e) (the precisions normalised to sum 1 over the latent dimensions, no
gradient) instead of 1 / sigma_e^2. With sigma_e -> 0 the two targets agree; for sigma_e near 1 the paper's
target shrinks towards 0 while the official one does not.

Reconstructions used for metrics are G([mu(x) + sigma * eps, xi]) with fresh xi (official ``forward`` with
``training=False``), not D(z); samples are G([z, xi]).

Images: the public methods take and return float (B, C, R, R) in [0, 1] like the rest of the library; inside,
images are mapped to [-1, 1] (x_c = 2x - 1) so that the NLL with sigma_x = 1 is the official one. Networks reuse
the library's DCGAN blocks (:func:`study.models.vae.encoder_trunk`, :class:`study.models.vae.Decoder`: 4 x 4
kernels) rather than the official 5 x 5 ones, and are initialised as DCGAN / the official code: weights
N(0, 0.02), batch-norm scales N(1, 0.02), biases 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from study.models.vae import Decoder, encoder_trunk

#: Names of the four networks, the keys of :meth:`AVAE.networks`, of optimisers and of objectives.
NETWORKS: tuple[str, ...] = ("encoder", "decoder", "generator", "discriminator")


def to_centred(x: Tensor) -> Tensor:
    """[0, 1] images -> [-1, 1] (the official code's data range)."""
    return x * 2.0 - 1.0


def from_centred(x_c: Tensor) -> Tensor:
    """[-1, 1] images -> [0, 1]."""
    return (x_c + 1.0) * 0.5


# ------------------------------------------------------------------------------------------------ losses
def kl_loss(mu: Tensor, log_sigma: Tensor) -> Tensor:
    """L_KL = mean_b sum_j [(mu_j^2 + sigma_j^2)/2 - 1/2 - log sigma_j] = mean_b KL(N(mu, sigma^2) || N(0, I)).

    Args:
        mu: float (B, d). log_sigma: float (B, d) or (d,) (global sigma, broadcast).

    Returns:
        Scalar float tensor, nats per image, >= 0. Source: official ``kl_divergence`` + ``reduce_mean``.
    """
    log_sigma = log_sigma.expand_as(mu)
    return ((mu.square() + torch.exp(2.0 * log_sigma)) / 2.0 - 0.5 - log_sigma).sum(dim=1).mean()


def reconstruction_nll(x_c: Tensor, mean_c: Tensor) -> Tensor:
    """L_NLL = mean_b sum_pixels 1/2 (x - x_bar)^2: Gaussian NLL with sigma_x = 1, constants dropped.

    Args:
        x_c, mean_c: float (B, C, H, W) in [-1, 1] (both on the official code's scale).

    Returns:
        Scalar float tensor (nats per image up to the dropped constant D/2 log 2 pi).

    Raises:
        ValueError: shapes differ.
    """
    if x_c.shape != mean_c.shape:
        raise ValueError(f"x {tuple(x_c.shape)} and reconstruction {tuple(mean_c.shape)} differ in shape")
    return 0.5 * (x_c - mean_c).square().flatten(1).sum(dim=1).mean()


def generator_loss(fake_logits: Tensor) -> Tensor:
    """L_gen = mean_b(-C(x_tilde)): the official raw-logit generator loss (not -log sigmoid).

    Args:
        fake_logits: float (B,), discriminator logits of generated images.

    Returns:
        Scalar float tensor (unbounded below).
    """
    return (-fake_logits).mean()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """L_dis = mean_b [BCE(1, C(x)) + BCE(0, C(x_tilde))], sigmoid cross-entropy on logits (nats).

    Args:
        real_logits: float (B,), logits of data images. fake_logits: float (B,), logits of generated images.

    Returns:
        Scalar float tensor >= 0; 2 log 2 ~ 1.386 for a discriminator at chance.
    """
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits), reduction="none")
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits), reduction="none")
    return (real + fake).mean()


def latent_reconstruction_loss(z: Tensor, mu_tilde: Tensor, log_sigma_tilde: Tensor) -> Tensor:
    """L_Z = sum_b sum_j 1/2 (z - mu_tilde)_j^2 w_j with w = stopgrad(softmax_j(-2 log sigma_tilde)).

    The weights are the encoder's precisions normalised over latent dimensions; they carry no gradient. This
    is the official code's ``latent_loss`` (Plumerault et al. 2020, official implementation): the target is z,
    not the paper's sqrt(1 - sigma^2) z, and the weights are not the paper's 1 / sigma^2 (module docstring).
    The loss is **summed** over the batch as in the official code (its ``reduce_mean`` acts on an
    already-reduced scalar), so its scale grows with the batch size.

    Args:
        z: float (B, d), the latents the images were generated from.
        mu_tilde: float (B, d), encoder means of the generated images.
        log_sigma_tilde: float (B, d) or (d,), encoder log standard deviations of the generated images.

    Returns:
        Scalar float tensor >= 0.
    """
    w = torch.softmax(-2.0 * log_sigma_tilde.expand_as(mu_tilde).detach(), dim=-1)  # (B, d), rows sum to 1
    return (0.5 * (z - mu_tilde).square() * w).sum()


# ---------------------------------------------------------------------------------------------- networks
class AVAEEncoder(nn.Module):
    """E: x (B, C, R, R) in [-1, 1] -> (mu, log_sigma), each float (B, d).

    ``log_sigma`` is a learned global vector (d,) initialised to 0 (official ``LogSigma``), expanded to (B, d);
    with ``input_dependent_sigma`` it is a second linear head on the trunk's features instead.
    """

    def __init__(
        self, image_channels: int, resolution: int, latent_dim: int, width: int, input_dependent_sigma: bool = False
    ) -> None:
        super().__init__()
        self.input_dependent_sigma = input_dependent_sigma
        self.trunk, features = encoder_trunk(image_channels, resolution, width)
        self.head = nn.Linear(features, 2 * latent_dim if input_dependent_sigma else latent_dim)
        if not input_dependent_sigma:
            self.log_sigma = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, x_c: Tensor) -> tuple[Tensor, Tensor]:
        h = self.head(self.trunk(x_c).flatten(1))  # (B, d) or (B, 2d)
        if self.input_dependent_sigma:
            mu, log_sigma = h.chunk(2, dim=1)  # (B, d) each
            return mu, log_sigma
        return h, self.log_sigma.expand_as(h)  # (B, d) each


class TanhImageDecoder(nn.Module):
    """Latent (B, latent_in) -> image (B, C, R, R) in (-1, 1): the library's DCGAN :class:`Decoder` + tanh.

    Used for the decoder D (latent_in = d) and the generator G (latent_in = 2d, input [z, xi]).
    """

    def __init__(self, latent_in: int, image_channels: int, resolution: int, width: int) -> None:
        super().__init__()
        self.net = Decoder(latent_in, image_channels, resolution, width)

    def forward(self, z: Tensor) -> Tensor:
        return torch.tanh(self.net(z))  # (B, C, R, R)


class Discriminator(nn.Module):
    """C: image (B, C, R, R) in [-1, 1] -> one logit per image, float (B,)."""

    def __init__(self, image_channels: int, resolution: int, width: int) -> None:
        super().__init__()
        self.trunk, features = encoder_trunk(image_channels, resolution, width)
        self.head = nn.Linear(features, 1)

    def forward(self, x_c: Tensor) -> Tensor:
        return self.head(self.trunk(x_c).flatten(1)).squeeze(1)  # (B,)


def _dcgan_init(module: nn.Module) -> None:
    """N(0, 0.02) weights, N(1, 0.02) batch-norm scales, zero biases (Radford et al. 2016; official code)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


@dataclass
class AVAELosses:
    """The five AVAE loss values of one batch, scalar float tensors (see the module docstring).

    ``kl``, ``nll``, ``generator``, ``discriminator`` are means over the batch; ``latent`` is a sum over it.
    """

    kl: Tensor
    nll: Tensor
    generator: Tensor
    discriminator: Tensor
    latent: Tensor

    def stacked(self) -> Tensor:
        """float (5,): kl, nll, generator, discriminator, latent (detached)."""
        return torch.stack([self.kl, self.nll, self.generator, self.discriminator, self.latent]).detach()


class AVAE(nn.Module):
    """The four AVAE networks.

    Args:
        image_channels: C of the images (3 for RGB).
        resolution: R, square R x R images, a power of two >= 8 (the study uses 32 and 64).
        latent_dim: d, size of z and of the generator's extra noise xi (official default 100).
        width: channels of the first block of every network, doubled per block (official ``ch``, 64 or 128).
        input_dependent_sigma: sigma(x) from the encoder instead of the official global learned vector.

    Raises:
        ValueError: unsupported resolution.
    """

    def __init__(
        self,
        image_channels: int = 3,
        resolution: int = 64,
        latent_dim: int = 128,
        width: int = 32,
        input_dependent_sigma: bool = False,
    ) -> None:
        super().__init__()
        self.image_channels = image_channels
        self.resolution = resolution
        self.latent_dim = latent_dim
        self.encoder = AVAEEncoder(image_channels, resolution, latent_dim, width, input_dependent_sigma)
        self.decoder = TanhImageDecoder(latent_dim, image_channels, resolution, width)
        self.generator = TanhImageDecoder(2 * latent_dim, image_channels, resolution, width)
        self.discriminator = Discriminator(image_channels, resolution, width)
        _dcgan_init(self)
        if not input_dependent_sigma:
            nn.init.zeros_(self.encoder.log_sigma)  # official LogSigma starts at sigma = 1

    def networks(self) -> dict[str, nn.Module]:
        """The four networks by name (:data:`NETWORKS` order)."""
        return {name: getattr(self, name) for name in NETWORKS}

    def _noise(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        p = next(self.parameters())
        return torch.randn(shape, generator=generator, device=p.device, dtype=p.dtype)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z | x) = N(mu, diag(sigma^2)): (mu, log_sigma), each float (B, d); x float (B, C, R, R) in [0, 1]."""
        return self.encoder(to_centred(x))

    @torch.no_grad()
    def reconstruct_decoder(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """D(mu(x)), or D(mu + sigma * eps) with ``sample``: float (B, C, R, R) in (0, 1); x in [0, 1]."""
        mu, log_sigma = self.encode(x)
        z = mu + log_sigma.exp() * self._noise(mu.shape, generator) if sample else mu  # (B, d)
        return from_centred(self.decoder(z))

    @torch.no_grad()
    def reconstruct_generator(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """G([mu(x) + sigma * eps, xi]) with fresh eps, xi ~ N(0, I): the AVAE reconstruction used for metrics.

        Args:
            x: float (B, C, R, R) in [0, 1].
            generator: source of eps then xi (on the model's device); None uses the global RNG.

        Returns:
            float (B, C, R, R) in (0, 1). Source: official ``AVAE.forward`` with ``training=False``.
        """
        mu, log_sigma = self.encode(x)
        eps = self._noise(mu.shape, generator)
        xi = self._noise(mu.shape, generator)
        z = mu + log_sigma.exp() * eps  # (B, d)
        return from_centred(self.generator(torch.cat([z, xi], dim=1)))  # input (B, 2d)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """G([z, xi]) with z, xi ~ N(0, I): float (n, C, R, R) in (0, 1) (official ``generate``)."""
        z = self._noise((n, self.latent_dim), generator)
        xi = self._noise((n, self.latent_dim), generator)
        return from_centred(self.generator(torch.cat([z, xi], dim=1)))

    def losses(self, x: Tensor, generator: torch.Generator | None = None) -> AVAELosses:
        """One training forward pass (official ``forward`` with ``training=True``), graph attached.

        Noise is drawn in the order eps, xi, z_f from ``generator``. Networks run in the official order
        E(x), D, G, C(x), C(x_tilde), E(x_tilde); in train mode each call updates its batch-norm statistics.

        Args:
            x: float (B, C, R, R) in [0, 1].
            generator: RNG on the model's device, or None for the global one.

        Returns:
            :class:`AVAELosses` whose tensors still hold the graph (for :func:`network_gradients`).
        """
        x_c = to_centred(x)  # (B, C, R, R) in [-1, 1]
        mu, log_sigma = self.encoder(x_c)  # (B, d) each
        eps = self._noise(mu.shape, generator)
        xi = self._noise(mu.shape, generator)
        z_fake = self._noise(mu.shape, generator)
        z_real = mu + log_sigma.exp() * eps  # (B, d)
        x_bar = self.decoder(z_real)  # (B, C, R, R)
        x_tilde = self.generator(torch.cat([z_fake, xi], dim=1))  # input (B, 2d) -> (B, C, R, R)
        real_logits = self.discriminator(x_c)  # (B,)
        fake_logits = self.discriminator(x_tilde)  # (B,)
        mu_tilde, log_sigma_tilde = self.encoder(x_tilde)  # (B, d) each
        return AVAELosses(
            kl=kl_loss(mu, log_sigma),
            nll=reconstruction_nll(x_c, x_bar),
            generator=generator_loss(fake_logits),
            discriminator=discriminator_loss(real_logits, fake_logits),
            latent=latent_reconstruction_loss(z_fake, mu_tilde, log_sigma_tilde),
        )


# ----------------------------------------------------------------------------------------------- updates
def network_objectives(losses: AVAELosses, beta: float, latent_weight: float = 1.0) -> dict[str, Tensor]:
    """Each network's own objective: E: beta L_KL + L_NLL; D: L_NLL; G: L_gen + latent_weight L_Z; C: L_dis."""
    return {
        "encoder": beta * losses.kl + losses.nll,
        "decoder": losses.nll,
        "generator": losses.generator + latent_weight * losses.latent,
        "discriminator": losses.discriminator,
    }


def network_gradients(
    model: AVAE, objectives: dict[str, Tensor], networks: Iterable[str] = NETWORKS
) -> dict[str, list[Tensor | None]]:
    """d objective[name] / d weights(name) for each named network, and nothing else.

    ``torch.autograd.grad`` restricted to one network's parameters means a loss can never leak into another
    network (e.g. L_Z into E, or L_dis into G), whatever the graph connects. The graph is kept so that the
    four objectives of one forward pass can be differentiated in turn. Unused parameters get None.
    """
    grads: dict[str, list[Tensor | None]] = {}
    for name in networks:
        weights = list(model.networks()[name].parameters())
        grads[name] = list(torch.autograd.grad(objectives[name], weights, retain_graph=True, allow_unused=True))
    return grads


def make_optimisers(
    model: AVAE,
    lr: float,
    generator_lr: float,
    discriminator_lr: float,
    beta1: float = 0.5,
) -> dict[str, torch.optim.Adam]:
    """One Adam per network: E and D at ``lr``, G at ``generator_lr``, C at ``discriminator_lr``, betas (beta1, 0.999).

    Official code: Adam(2e-4, beta_1 = 0.5) for all four, with an exponential learning-rate decay over 50k steps
    that this library does not apply (constant rates).
    """
    rates = {"encoder": lr, "decoder": lr, "generator": generator_lr, "discriminator": discriminator_lr}
    return {
        name: torch.optim.Adam(net.parameters(), lr=rates[name], betas=(beta1, 0.999))
        for name, net in model.networks().items()
    }


def train_step(
    model: AVAE,
    optimisers: dict[str, torch.optim.Optimizer],
    x: Tensor,
    beta: float,
    latent_weight: float = 1.0,
    generator: torch.Generator | None = None,
    networks: Sequence[str] = NETWORKS,
) -> AVAELosses:
    """One AVAE update: a single forward pass, then each listed network steps on its own objective only.

    All gradients are taken before any parameter moves (simultaneous updates, as the official persistent
    ``GradientTape``). ``networks`` restricts which networks are updated (for tests and ablations); the forward
    pass, the noise drawn and batch-norm statistics are the same whatever it holds.

    Args:
        model: the AVAE, in train mode.
        optimisers: by network name (:func:`make_optimisers`).
        x: float (B, C, R, R) in [0, 1].
        beta: KL weight in the encoder's objective (1 in the official code).
        latent_weight: weight of L_Z in the generator's objective (1 in the official code).
        generator: RNG on the model's device for eps, xi, z_f.
        networks: names from :data:`NETWORKS` to update.

    Returns:
        The batch's :class:`AVAELosses`, detached.

    Raises:
        KeyError: an unknown network name.
    """
    unknown = set(networks) - set(NETWORKS)
    if unknown:
        raise KeyError(f"unknown networks {sorted(unknown)}; choose from {NETWORKS}")
    losses = model.losses(x, generator=generator)
    grads = network_gradients(model, network_objectives(losses, beta, latent_weight), networks)
    for name in networks:
        for p, g in zip(model.networks()[name].parameters(), grads[name], strict=True):
            p.grad = g
        optimisers[name].step()
        optimisers[name].zero_grad(set_to_none=True)
    values = (losses.kl, losses.nll, losses.generator, losses.discriminator, losses.latent)
    return AVAELosses(*(t.detach() for t in values))
