"""Operators (bpy.ops.msd.*): generating, importing and applying panoramas, and the worker's set-up."""

import bpy

from . import backdrop, generate, images, models, settings_restore, worker_env, world

_modules = (images, world, backdrop, generate, settings_restore, worker_env, models)
classes = tuple(cls for module in _modules for cls in module.classes)

_register_classes, _unregister_classes = bpy.utils.register_classes_factory(classes)


def register():
    _register_classes()
    generate.register()


def unregister():
    generate.unregister()
    worker_env.unregister()
    models.unregister()
    _unregister_classes()
