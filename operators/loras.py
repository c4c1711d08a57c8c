"""The panel's LoRA list: add a slot (optionally with a file), remove the active one."""

import bpy
from bpy.props import StringProperty
from bpy.types import Operator

from ..msd_core.settings import MAX_LORAS
from ..properties import BLEND_RELATIVE


class MSD_OT_lora_add(Operator):
    """Add a LoRA to the list (choose its .safetensors file in the new row)"""

    bl_idname = "msd.lora_add"
    bl_label = "Add LoRA"
    bl_options = {'REGISTER', 'UNDO'}

    filepath: StringProperty(name="File", description="The LoRA's .safetensors file (may be chosen later)",
                             subtype='FILE_PATH', options=BLEND_RELATIVE)

    def execute(self, context):
        group = context.scene.msd_panorama
        if len(group.loras) >= MAX_LORAS:
            self.report({'ERROR'}, f"At most {MAX_LORAS} LoRAs at once")
            return {'CANCELLED'}
        slot = group.loras.add()
        slot.path = self.filepath
        group.lora_index = len(group.loras) - 1
        return {'FINISHED'}


class MSD_OT_lora_remove(Operator):
    """Remove the selected LoRA from the list"""

    bl_idname = "msd.lora_remove"
    bl_label = "Remove LoRA"
    bl_options = {'REGISTER', 'UNDO'}

    @classmethod
    def poll(cls, context):
        group = context.scene.msd_panorama
        return 0 <= group.lora_index < len(group.loras)

    def execute(self, context):
        group = context.scene.msd_panorama
        group.loras.remove(group.lora_index)
        group.lora_index = min(group.lora_index, max(0, len(group.loras) - 1))
        return {'FINISHED'}


classes = (MSD_OT_lora_add, MSD_OT_lora_remove)
