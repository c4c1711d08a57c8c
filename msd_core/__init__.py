"""MSD Panorama core: Multi-Scale Diffusion panoramas, usable without Blender.

Importing this package is cheap on purpose: Blender's own Python (which has no torch) imports the
client, protocol and settings modules. torch and diffusers are imported only by the modules that run
the model (``sampler``, ``windows``, ``models``, ``lora``, ``pipeline``, ``distributed``, ``worker``).
"""

__version__ = "0.1.0"
