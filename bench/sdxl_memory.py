"""Activation memory of one window of SDXL-base's UNet, measured without materialising its weights.

SDXL-base's UNet has 2.57 G parameters (10.3 GB in float32), too many for the CPU machines this runs on,
so the UNet of its exact architecture (msd_core/models/configs/sdxl-base/unet/config.json) is built under
PyTorch's FakeTensorMode: every tensor has its shape, dtype and device (the CPU) but no data, and every
operation of the real forward and backward runs on shapes only, through the kernels the CPU would pick
(the flash scaled-dot-product attention: no 4096×4096 attention matrix; the "meta" device would fall
back to the math attention that builds one). Two counts, for one window = one classifier-free-guidance
pair (batch 2) at the native latent size, text of 77 tokens:

- peak live bytes: a TorchDispatchMode sees every tensor an operation creates and adds its storage's
  size; a weak reference to the storage subtracts it when the storage is freed. The highest sum is
  the activation peak of a no-grad forward, or of the exact gradient's forward + backward
  (the weights are created before the count starts and are not in it);
- saved bytes (exact gradient): what autograd keeps for the backward, from
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once, the frozen weights left out).

The same counts for SD-2-base's UNet (whose real activations were measured on the CPU and an H200:
msd_core.sampling.plan) give the calibration: SDXL's figure in the plan = SD-2's measured figure × the ratio
of the two counts. Both models run the same operations (diffusers' UNet2DConditionModel, PyTorch's
scaled-dot-product attention), so the ratio carries over what the count cannot see (allocator
rounding, kernel workspaces).

    .venv/bin/python bench/sdxl_memory.py      # about a minute; writes bench/results/sdxl-memory.json
    .venv/bin/python bench/sdxl_memory.py --wide   # a 2:1 window against a square one: sdxl-wide-window.json

``--wide`` counts, the same way, the no-grad peak and the FLOPs (``torch.utils.flop_counter``) of one SDXL-base
window at 128×128 and at 128×256 latents (the wide global window of a 2:1 world, ``--global-window wide``):
what the plan's rule "a wide window costs its area in square windows" rests on.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from torch.utils._pytree import tree_flatten

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import environment, markdown_table, write_json  # noqa: E402
from device import SD2_BASE_UNET  # noqa: E402

from msd_core.sampling import plan  # noqa: E402

SDXL_CONFIG = ROOT / "msd_core" / "configs" / "sdxl-base"
TOKENS = 77


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors created inside the mode: a storage counts from the first
    tensor that holds it until the last tensor on it (a view, an in-place result) is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tensors: dict[int, int] = {}  # storage → live tensors on it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key, size = storage._cdata, storage.nbytes()
                if key not in self.tensors:
                    self.tensors[key] = 0
                    self.live += size
                    self.peak = max(self.peak, self.live)
                self.tensors[key] += 1
                weakref.finalize(tensor, self._release, key, size)
        return out

    def _release(self, key: int, size: int) -> None:
        self.tensors[key] -= 1
        if not self.tensors[key]:
            del self.tensors[key]
            self.live -= size


def fake_unet(family: str):
    from diffusers import UNet2DConditionModel

    config = (UNet2DConditionModel.load_config(SDXL_CONFIG, subfolder="unet") if family == "sdxl"
              else dict(SD2_BASE_UNET))
    unet = UNet2DConditionModel.from_config(config)
    unet.eval().requires_grad_(False)
    from msd_core.models.loading import prepare_unet

    prepare_unet(unet, channels_last=False)
    return unet


def inputs(unet, dtype: torch.dtype):
    size = unet.config.sample_size
    kwargs = {"encoder_hidden_states": torch.zeros(2, TOKENS, unet.config.cross_attention_dim, dtype=dtype)}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(2, pooled, dtype=dtype),
                                       "time_ids": torch.zeros(2, 6, dtype=dtype)}
    return torch.zeros(2, 4, size, size, dtype=dtype), kwargs


def measure(family: str, dtype: torch.dtype = torch.float32) -> dict:
    with FakeTensorMode():
        return _measure(fake_unet(family), family, dtype)  # float32: the dtype the SD-2 figures are in


def _measure(unet, family: str, dtype: torch.dtype) -> dict:
    sample, kwargs = inputs(unet, dtype)
    timestep = torch.tensor(500.0)
    with torch.no_grad(), LiveBytes() as count:
        unet(sample, timestep, **kwargs)
    no_grad = count.peak

    saved: dict[int, int] = {}
    weights = {p.untyped_storage()._cdata for p in unet.parameters()}

    def pack(tensor):
        key = tensor.untyped_storage()._cdata
        if key not in weights:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    x = sample.clone().requires_grad_(True)
    with torch.enable_grad(), LiveBytes() as count:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = unet(x, timestep, **kwargs).sample
        (grad,) = torch.autograd.grad(output.pow(2).sum(), x)
    return {"family": family, "dtype": str(dtype).removeprefix("torch."), "latent": unet.config.sample_size,
            "parameters": sum(p.numel() for p in unet.parameters()), "no_grad_peak_bytes": no_grad,
            "exact_peak_bytes": count.peak, "exact_saved_bytes": sum(saved.values())}


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU's flash attention kernel, which torch's counter leaves out (it knows the CUDA ones):
    the quadratic part a wider window adds."""
    return sdpa_flop_count(query, key, value)


def wide_window(family: str = "sdxl") -> list[dict]:
    """No-grad peak and FLOPs of one window (CFG pair) at the native latent and at twice its width."""
    attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    rows = []
    with FakeTensorMode():
        unet = fake_unet(family)
        _, kwargs = inputs(unet, torch.float32)
        size = unet.config.sample_size
        for height, width in ((size, size), (size, 2 * size)):
            sample = torch.zeros(2, 4, height, width)
            with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=attention) as flops, LiveBytes() as count:
                unet(sample, torch.tensor(500.0), **kwargs)
            attention_flops = sum(flops.get_flop_counts()["Global"].get(op, 0) for op in attention)
            rows.append({"family": family, "latent": f"{height}×{width}", "tflops": flops.get_total_flops() / 1e12,
                         "attention_tflops": attention_flops / 1e12, "no_grad_peak_gb": count.peak / 1e9})
    for row in rows:
        row["tflops_ratio"] = row["tflops"] / rows[0]["tflops"]
        row["no_grad_ratio"] = row["no_grad_peak_gb"] / rows[0]["no_grad_peak_gb"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wide", action="store_true", help="only a 2:1 window against a square one")
    started = time.perf_counter()
    if parser.parse_args().wide:
        rows = wide_window()
        print(markdown_table(rows, ["family", "latent", "tflops", "attention_tflops", "tflops_ratio", "no_grad_peak_gb",
                                    "no_grad_ratio"]))
        write_json("sdxl-wide-window", {"environment": environment(), "rows": rows,
                                        "seconds": time.perf_counter() - started})
        return
    rows = [measure("sd"), measure("sdxl")]
    sd, xl = rows
    measured = plan.WINDOW_ACTIVATION_BYTES_FP32  # SD-2-base, real (CPU float32 / H200 float16 ×2)
    calibrated = {"no_grad": measured["no_grad"] * xl["no_grad_peak_bytes"] / sd["no_grad_peak_bytes"],
                  "exact": measured["exact"] * xl["exact_peak_bytes"] / sd["exact_peak_bytes"]}
    for row in rows:
        for key in ("no_grad_peak_bytes", "exact_peak_bytes", "exact_saved_bytes"):
            row[key.replace("bytes", "gb")] = round(row[key] / 1e9, 3)
    print(markdown_table(rows, ["family", "dtype", "latent", "parameters", "no_grad_peak_gb", "exact_peak_gb",
                                "exact_saved_gb"]))
    print("SDXL-base per window (CFG pair), float32 terms, calibrated on SD-2-base's measured figures:",
          {key: f"{value / 1e9:.2f} GB" for key, value in calibrated.items()})
    write_json("sdxl-memory", {"environment": environment(), "method": __doc__.split("\n\n")[1], "rows": rows,
                               "sd2_measured_fp32": measured, "sdxl_calibrated_fp32": calibrated,
                               "seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
