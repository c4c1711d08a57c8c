"""CUDA graphs of the UNet's small calls (msd_core.models.graphs): which calls they take, and the way back to
eager calls when a capture fails. The replay itself needs a GPU: bench/device.py's correctness part compares
every case with and without graphs there (docs/speed.md)."""

import dataclasses
import logging

import pytest
import torch

from msd_core.models import graphs
from msd_core.pipeline import MSDPanoramaPipeline
from msd_core.settings import GenerationSettings

SETTINGS = GenerationSettings(prompt="a harbour at dawn", model="tiny", width=128, height=64, wrap=True, steps=3,
                              seed=3, device="cpu")


@pytest.fixture(scope="module")
def pipe():
    return MSDPanoramaPipeline.from_settings(SETTINGS)


class CountedCalls:
    def __init__(self, call):
        self.call, self.count = call, 0

    def __call__(self, *inputs):
        self.count += 1
        return self.call(*inputs)


def windows_and_denoisers(pipe, count, largest=graphs.GRAPHED_PIXELS):
    embeddings, _ = pipe.encode_prompt(SETTINGS.prompt, "", SETTINGS.guidance)
    windows = torch.randn(count, 4, 8, 8, generator=torch.Generator().manual_seed(count))
    unet = CountedCalls(pipe.unet_output)
    graphed = graphs.GraphedCalls(unet, largest)
    return windows, pipe.make_denoiser(embeddings, SETTINGS.guidance), pipe.make_denoiser(embeddings, SETTINGS.guidance,
                                                                                          graphed=graphed), graphed, unet


@pytest.mark.parametrize("count, grad", [(3, False), (1, True)])
def test_large_calls_and_calls_with_autograd_run_eagerly_and_record_nothing(pipe, count, grad):
    # the tiny model's 8×8-latent windows, with at most two windows' CFG pairs recorded
    windows, eager, denoise, graphed, unet = windows_and_denoisers(pipe, count, largest=2 * 2 * 8 * 8)
    with torch.set_grad_enabled(grad):
        output = denoise(windows.requires_grad_(grad), 500.0)
    assert torch.equal(output.detach(), eager(windows, 500.0).detach())
    assert unet.count == 1  # no warm-up, no capture
    assert graphed.release() == {"recorded": 0, "replays": 0, "failed": None}


def test_a_capture_that_fails_falls_back_to_the_eager_call_for_the_rest_of_the_run(pipe, caplog):
    windows, eager, denoise, graphed, unet = windows_and_denoisers(pipe, 2, largest=2 * 2 * 8 * 8)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger=graphs.__name__):
        first = denoise(windows, 500.0)  # a small no-grad call: recorded, which this CPU cannot do
        tried = unet.count
        second = denoise(windows, 300.0)
        expected = [eager(windows, 500.0), eager(windows, 300.0)]
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])
    assert unet.count == tried + 1  # once failed, a call is one eager call: no second attempt
    stats = graphed.release()
    assert stats["recorded"] == stats["replays"] == 0 and stats["failed"]
    assert "CUDA graphs off for this run" in caplog.text and stats["failed"] in caplog.text


def test_graphs_are_on_by_default_off_by_environment_and_for_a_compiled_unet(pipe, monkeypatch):
    assert pipe.cuda_graphs
    for value in ("0", "off", "No"):
        monkeypatch.setenv("MSD_CUDA_GRAPHS", value)
        assert not graphs.wanted()
    monkeypatch.setenv("MSD_CUDA_GRAPHS", "1")
    assert graphs.wanted()
    assert not MSDPanoramaPipeline.from_settings(dataclasses.replace(SETTINGS, compile=True)).cuda_graphs


def test_a_run_off_cuda_records_no_graphs_and_says_so(pipe):
    pipe(SETTINGS, decode=False)
    assert pipe.graph_stats is None
