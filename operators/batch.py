"""Add to Batch: the panel's settings as one job line of a queue file for `msd-panorama batch`.

A TD prepares a night's queue from Blender: each click appends the current settings (a generate request of
the worker protocol) to the .jsonl file picked in the file browser; the lines already there stay as they are.
"""

import bpy
from bpy.props import StringProperty
from bpy.types import Operator

from ..msd_core.batch import append_job
from ..msd_core.errors import BadInput
from ..preferences import get_preferences
from ..properties import settings_from_scene


class MSD_OT_add_to_batch(Operator):
    """Append the panel's settings as a job to a batch file (run it with `msd-panorama batch FILE`)"""

    bl_idname = "msd.add_to_batch"
    bl_label = "Add to Batch"

    filepath: StringProperty(name="Batch File", subtype='FILE_PATH', options={'SKIP_SAVE'})
    filename_ext = ".jsonl"
    filter_glob: StringProperty(default="*.jsonl", options={'HIDDEN'})

    def invoke(self, context, event):
        if not self.filepath:
            self.filepath = "panoramas.jsonl"
        context.window_manager.fileselect_add(self)
        return {'RUNNING_MODAL'}

    def execute(self, context):
        path = bpy.path.abspath(self.filepath)
        try:
            settings = settings_from_scene(context.scene, get_preferences(context))
            line, output = append_job(path, settings.to_dict())
        except BadInput as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        except OSError as exc:
            self.report({'ERROR'}, f"Could not write the batch file {path}: {exc.strerror or exc}")
            return {'CANCELLED'}
        self.report({'INFO'}, f"Added job {line} to {path} (writes {output}, seed {settings.seed})")
        return {'FINISHED'}


classes = (MSD_OT_add_to_batch,)
