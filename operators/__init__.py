"""Operators (bpy.ops.msd.*): generating, importing and applying panoramas, and the worker's set-up."""

import bpy

from . import backdrop, batch, generate, history, images, loras, models, refine, settings_restore, variations, worker_env, world

_modules = (images, world, backdrop, generate, refine, settings_restore, worker_env, models, variations, history, loras, batch)
classes = tuple(cls for module in _modules for cls in module.classes)

_register_classes, _unregister_classes = bpy.utils.register_classes_factory(classes)


def register():
    _register_classes()
    generate.register()
    variations.register()
    history.register()


def unregister():
    history.unregister()
    variations.unregister()
    generate.unregister()
    worker_env.unregister()
    models.unregister()
    _unregister_classes()
