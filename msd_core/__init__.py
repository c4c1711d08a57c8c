"""MSD Panorama core: Multi-Scale Diffusion panoramas, usable without Blender.

Grouped by role: ``sampling`` (the method's math, window grids, the plan, the sphere's caps), ``models``
(loading, the Hub cache, LoRAs, the VAE), ``worker`` (the generator process, its protocol and client) and
``imageio`` (PNG/EXR output and metadata, HDR, cube maps); the CLI, the settings, the errors, the pipeline
that wires them together, refine and drafts stand at the top.

Importing this package is cheap on purpose: Blender's own Python (which has no torch) imports the
client, protocol and settings modules. torch and diffusers are imported only by the modules that run
the model (``sampling.sampler``, ``sampling.windows``, ``models.loading``, ``models.lora``, ``pipeline``,
``sampling.distributed``, ``worker.process``).
"""

__version__ = "0.1.0"
