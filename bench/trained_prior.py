"""A trained model for the bench: a small CNN ε-predictor learned on dead-leaves images (docs/layout.md 6.8).

The analytic priors have exact denoisers: the Gaussian ones are linear, the mixtures score layout by sign. Neither
behaves like a trained network, which takes a sharp edge it is handed for signal and keeps it. This one is learned
on the dead-leaves model (occluding discs of power-law radii: a natural image's 1/f² spectrum with sharp edges, not
Gaussian), on Stable Diffusion's noise schedule, one 16×16 window at a time, with zero padding at the window's edges
as a UNet has. It answers what the exact priors cannot: how much fine detail a sampler setting leaves, and whether the
level above's blocks show, under a learned denoiser.

    .venv/bin/python bench/trained_prior.py train [--minutes 18]   # writes bench/results/dead-leaves-cnn.safetensors
    .venv/bin/python bench/trained_prior.py detail [--seeds 16]    # writes bench/results/trained-detail.json

The stored weights were trained for 18 minutes on a loaded 2-core CPU (about 3,800 steps of 128 images; the ε loss
averaged over the schedule 0.163 at the end), so the figures reproduce from them; training itself is time-boxed and
not bit-reproducible.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from common import RESULTS, environment, write_json
from horizon import PRIOR_FACTOR, sample_with_settings
from safetensors.torch import load_file, save_file
from spectrum import band_power, block_edge_ratio
from torch import nn

from msd_core.models.loading import sd_ddim_scheduler
from msd_core.sampling.sampler import alpha_at
from msd_core.settings import GenerationSettings

WINDOW = 16
WEIGHTS = RESULTS / "dead-leaves-cnn.safetensors"
DEAD_LEAVES_SCALE = 0.7  # the raw images' standard deviation: divided out, so the data has about unit variance


def dead_leaves(count: int, generator: torch.Generator, discs: int = 48) -> torch.Tensor:
    """``count`` dead-leaves images (count, 16, 16): discs painted over each other, centres uniform over the image
    and 4 px around it, radii with density ∝ r⁻³ on [0.7, 10] px (scale invariance), grey levels N(0, 1)."""
    image = torch.zeros(count, WINDOW, WINDOW)
    rows, columns = torch.meshgrid(torch.arange(WINDOW).float(), torch.arange(WINDOW).float(), indexing="ij")
    smallest, largest = 0.7, 10.0
    for _ in range(discs):
        centre_row, centre_column = torch.rand(2, count, 1, 1, generator=generator) * (WINDOW + 8) - 4
        share = torch.rand(count, 1, 1, generator=generator)
        radius = (smallest**-2 - share * (smallest**-2 - largest**-2)) ** -0.5
        grey = torch.randn(count, 1, 1, generator=generator)
        inside = (rows - centre_row) ** 2 + (columns - centre_column) ** 2 < radius**2
        image = torch.where(inside, grey, image)
    return image / DEAD_LEAVES_SCALE


class DenoiserNet(nn.Module):
    """ε from (x_t, log SNR): two scales, residual 3×3 convolutions with group norm, a dilated one at the coarse
    scale, zero padding (so a window's edge is an edge to it, as to a UNet)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        c = channels
        self.inner = nn.ModuleList([nn.Conv2d(2, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)])
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.coarse = nn.ModuleList([nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.Conv2d(2 * c, 2 * c, 3, padding=2, dilation=2)])
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.outer = nn.ModuleList([nn.Conv2d(2 * c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)])
        self.out = nn.Conv2d(c, 1, 3, padding=1)
        self.norms = nn.ModuleList(nn.GroupNorm(8, k) for k in (c, c, 2 * c, 2 * c, 2 * c, c, c))

    def forward(self, x: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
        n = iter(self.norms)
        h = torch.cat([x, log_snr.view(-1, 1, 1, 1).expand_as(x) / 8], 1)
        a = F.silu(next(n)(self.inner[0](h)))
        a = F.silu(next(n)(self.inner[1](a))) + a
        b = F.silu(next(n)(self.down(a)))
        for conv in self.coarse:
            b = F.silu(next(n)(conv(b))) + b
        c = F.silu(next(n)(self.outer[0](torch.cat([self.up(b), a], 1))))
        c = F.silu(next(n)(self.outer[1](c))) + c
        return self.out(c)


def train(minutes: float, seed: int = 0, batch: int = 128) -> tuple[DenoiserNet, dict]:
    """Train on fresh dead-leaves images with SD's schedule (t uniform over 0…999, ε loss) for ``minutes``."""
    generator = torch.Generator().manual_seed(seed)
    alphas = sd_ddim_scheduler().alphas_cumprod.float()
    net = DenoiserNet()
    optimiser = torch.optim.AdamW(net.parameters(), 2e-3)
    started, steps, loss_average = time.time(), 0, None
    while time.time() - started < minutes * 60:
        x0 = dead_leaves(batch, generator)[:, None]
        alpha = alphas[torch.randint(0, len(alphas), (batch,), generator=generator)].view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=generator)
        loss = F.mse_loss(net(alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise, torch.log(alpha / (1 - alpha)).flatten()), noise)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        steps += 1
        loss_average = loss.item() if loss_average is None else 0.99 * loss_average + 0.01 * loss.item()
        if steps % 500 == 0:
            for group in optimiser.param_groups:
                group["lr"] = max(2e-4, group["lr"] * 0.9)
            print(f"step {steps}: loss {loss_average:.4f} after {time.time() - started:.0f} s", flush=True)
    return net, {"steps": steps, "loss": loss_average, "minutes": minutes}


class TrainedPrior:
    """The bench's model interface (``horizon.sample_with_settings``) around a trained ``DenoiserNet``: windows of
    any channel count (the bench stacks seeds as channels) are denoised one channel at a time."""

    name = "dead leaves (trained CNN)"

    def __init__(self, net: DenoiserNet):
        self.net = net.eval()
        self.window = self.width = WINDOW
        self.alphas_cumprod = sd_ddim_scheduler().alphas_cumprod.double()
        self.work = {"forwards": 0, "backwards": 0}

    @classmethod
    def stored(cls) -> "TrainedPrior":
        net = DenoiserNet()
        net.load_state_dict(load_file(WEIGHTS))
        return cls(net)

    def for_width(self, width: int) -> "TrainedPrior":
        if width != self.width:
            raise ValueError(f"the trained prior has no {self.window}×{width} version")
        return self

    def denoiser(self, alpha_map=lambda alpha: alpha):
        def denoise(x: torch.Tensor, t: float) -> torch.Tensor:
            alpha = alpha_map(alpha_at(self.alphas_cumprod, t))
            count, channels, height, width = x.shape
            flat = x.reshape(count * channels, 1, height, width).float()
            # A graph only for the exact gradient's windows: the network's own weights are never trained here.
            with torch.set_grad_enabled(x.requires_grad and torch.is_grad_enabled()):
                output = self.net(flat, torch.full((count * channels,), math.log(alpha / (1 - alpha))))
            return output.reshape(x.shape).to(x.dtype)

        return denoise

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Draws from the data it was trained on (not from the model)."""
        return dead_leaves(count, generator).double()


V07 = {"omega": 10.0, "tile_starts": "even"}  # v0.7's Standard, the base the others are compared with
DETAIL_SETTINGS = {
    "every level": V07, "MultiDiffusion": {"method": "multidiffusion"}, "ω 3": {**V07, "omega": 3.0},
    "fine start 0.6, deterministic join": {**V07, "fine_start": 0.6, "fine_join": "deterministic"},
    "fine start 0.6, stochastic join": {**V07, "fine_start": 0.6}, "fine start 0.3, stochastic join": {**V07, "fine_start": 0.3},
    "any tile starts": {**V07, "tile_starts": "any"}, "ω 12": {**V07, "omega": 12.0}, "ω 14": {**V07, "omega": 14.0},
    "ω 14, any tile starts (v0.8's Standard)": {},
}


def detail(seeds: int, settings: dict = DETAIL_SETTINGS, around=lambda name: contextlib.nullcontext()) -> list[dict]:
    """Standard at 64×64 and the 360° world's 32×64 wrap: each ring's power over the data's and over the first
    setting's (paired, the same seeds), and the 2×2 block-edge ratio (``spectrum``), for ``settings`` (name: changes),
    each sampled inside ``around(name)``."""
    prior = TrainedPrior.stored()
    data = band_power(prior.sample(4000, torch.Generator().manual_seed(1)), WINDOW)
    seeds_ = list(range(seeds))
    rows = []
    alone, _ = sample_with_settings(prior, GenerationSettings(prompt="bench", width=WINDOW * PRIOR_FACTOR,
                                                              height=WINDOW * PRIOR_FACTOR, wrap=False), seeds_)
    rows.append({"setting": "one window", "bands_vs_data": (band_power(alone, WINDOW) / data).tolist(),
                 "block_edge_ratio": float(torch.tensor([block_edge_ratio(image, (2, 2)) for image in alone]).mean())})
    for height, width, wrap in ((64, 64, False), (32, 64, True)):
        base = None
        for name, changes in settings.items():
            world = dataclasses.replace(GenerationSettings(prompt="bench", width=width * PRIOR_FACTOR,
                                                           height=height * PRIOR_FACTOR, wrap=wrap), **changes)
            with around(name):
                images, _ = sample_with_settings(prior, world, seeds_)
            per_seed = torch.stack([band_power(image, WINDOW) for image in images])
            edges = torch.tensor([block_edge_ratio(image, (2, 2)) for image in images])
            base = per_seed if base is None else base
            paired = (per_seed / base).log()
            rows.append({"panorama": f"{height}×{width}{' wrap' if wrap else ''}", "setting": name, "seeds": seeds,
                         "bands_vs_data": (per_seed.mean(0) / data).tolist(),
                         "bands_vs_every_level": paired.mean(0).exp().tolist(),
                         "bands_se_log": (paired.std(0) / math.sqrt(seeds)).tolist(),
                         "block_edge_ratio": float(edges.mean()), "block_edge_se": float(edges.std() / math.sqrt(seeds))})
            print(f"{rows[-1]['panorama']:>11} {name:<36} /{next(iter(settings))} "
                  + " ".join(f"{v:.3f}" for v in rows[-1]["bands_vs_every_level"])
                  + f"  block edges {rows[-1]['block_edge_ratio']:.3f} ± {rows[-1]['block_edge_se']:.3f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("train", "detail"))
    parser.add_argument("--minutes", type=float, default=18.0)
    parser.add_argument("--seeds", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "train":
        net, log = train(args.minutes)
        save_file(net.state_dict(), str(WEIGHTS), metadata={key: str(value) for key, value in log.items()})
        print(f"wrote {WEIGHTS} ({log})")
    else:
        write_json("trained-detail", {"environment": environment(), "detail": detail(args.seeds)})


if __name__ == "__main__":
    main()
