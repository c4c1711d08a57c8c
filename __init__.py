# SPDX-License-Identifier: GPL-3.0-or-later
"""MSD Panorama: panoramic worlds and backdrops from a text prompt (Multi-Scale Diffusion).

The model runs in a separate worker process (msd_core.worker) so Blender never freezes and Blender's
own Python needs no torch; see operators/generate.py.
"""

from . import operators, preferences, properties, ui

_modules = (preferences, properties, operators, ui)


def register():
    for module in _modules:
        module.register()


def unregister():
    for module in reversed(_modules):
        module.unregister()
