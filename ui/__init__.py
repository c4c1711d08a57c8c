"""User interface: the Panorama tab in the 3D Viewport's sidebar."""

import bpy

from . import panel

register, unregister = bpy.utils.register_classes_factory(panel.classes)
