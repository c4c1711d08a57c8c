"""The Panorama tab of the 3D Viewport's sidebar (N panel)."""

import os
import textwrap

import bpy
from bpy.types import Panel, UIList

from ..msd_core.models import hub
from ..operators.generate import preview_image, session, worker_status
from ..operators.history import cached_history, history_buttons, history_cache
from ..operators.refine import refine_target_size, source_image
from ..operators.models import cached_models, download_state, needs_download
from ..operators.variations import variation_state
from ..operators.worker_env import install_state
from ..preferences import get_preferences, output_folder
from ..properties import effective_wrap, estimate_text, run_state

STATUS_WORDS = {
    "NOT_INSTALLED": ("Worker not installed", 'ERROR'),
    "STARTING": ("Starting the worker…", 'TIME'),
    "READY": ("Ready", 'CHECKMARK'),
    "BUSY": ("Generating", 'RENDER_STILL'),
    "ERROR": ("The last run failed", 'ERROR'),
}
FAMILY_LABELS = {"sd": "SD", "sdxl": "SDXL"}  # a cached model's family, from its UNet's config
WRAP_CHARS = 48  # characters per line of long messages in the sidebar
PREVIEW_SCALE = 8.0
THUMBNAIL_SCALE = 4.0  # drafts and history entries
THUMBNAILS_PER_ROW = 2


def draw_wrapped(layout, text: str, icon: str = 'NONE') -> None:
    """A long message as several labels (a label does not wrap)."""
    col = layout.column(align=True)
    indent = 'NONE' if icon == 'NONE' else 'BLANK1'  # continuation lines line up with the first
    for number, line in enumerate(textwrap.wrap(text, WRAP_CHARS) or [""]):
        col.label(text=line, icon=icon if number == 0 else indent)


def progress_text() -> str:
    if not run_state.total:
        return run_state.message or "Waiting…"
    parts = [f"Step {run_state.step}/{run_state.total}"]
    if run_state.levels > 1:
        parts.append(f"level {run_state.level}/{run_state.levels}")
    if run_state.eta is not None:
        parts.append(format_eta(run_state.eta) + " left")
    return " · ".join(parts)


def format_eta(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def draw_worker_status(layout, context) -> None:
    """The worker's state in words, with Install/Check buttons when it is not ready to use."""
    status = worker_status(get_preferences(context))
    words, icon = STATUS_WORDS[status]
    row = layout.row()
    row.label(text=words, icon=icon)
    if status != "NOT_INSTALLED" and install_state.job is None and not install_state.message:
        row.operator("msd.check_worker", text="", icon='VIEWZOOM')
        return
    box = layout.box()
    job = install_state.job
    if job is not None:
        box.progress(factor=job.progress, type='BAR', text=job.description + "…")
        draw_wrapped(box, job.last_log_line())
    elif install_state.message:
        draw_wrapped(box, install_state.message, icon='ERROR' if install_state.failed else 'INFO')
    elif status == "NOT_INSTALLED":
        draw_wrapped(box, "Generation runs in a separate Python with PyTorch. Install it (several GB), "
                          "or set Worker Python in the add-on preferences.")
    row = box.row(align=True)
    row.operator("msd.install_worker", icon='IMPORT')
    row.operator("msd.check_worker", icon='VIEWZOOM')


def draw_model_download(layout, context) -> None:
    """The download in progress (bar, bytes, speed, time left, Cancel), or a Download button when the
    chosen Hugging Face model is not in the cache, or how the last download ended."""
    model = get_preferences(context).model
    if download_state.busy:
        box = layout.box()
        box.label(text=f"Downloading {download_state.model}", icon='IMPORT')
        box.progress(factor=download_state.progress, type='BAR', text=download_state.text)
        if download_state.file:
            box.label(text=download_state.file, icon='FILE')
        box.operator("msd.cancel_download", icon='CANCEL')
        return
    if download_state.message and (download_state.failed or download_state.model == model):
        draw_wrapped(layout, download_state.message, icon='ERROR' if download_state.failed else 'CHECKMARK')
    if needs_download(model):
        box = layout.box()
        draw_wrapped(box, f"{model} is not downloaded yet (a Stable Diffusion model is 2–5 GB).", icon='INFO')
        box.operator("msd.download_model", icon='IMPORT')


def draw_cached_models(layout, context) -> None:
    """The models in the local Hugging Face cache: id, size on disk, complete or not, and Use."""
    models = cached_models()
    col = layout.column(align=True)
    if not models:
        col.label(text=f"No models in the Hugging Face cache ({hub.cache_dir()})", icon='INFO')
        return
    current = get_preferences(context).model
    for model in models:
        row = col.row(align=True)
        icon = 'CHECKMARK' if model.complete else 'ERROR'
        row.label(text=f"{model.id} ({FAMILY_LABELS[model.family]})" if model.family in FAMILY_LABELS else model.id,
                  icon=icon)
        row.label(text=hub.format_bytes(model.size_on_disk) + ("" if model.complete else " (incomplete)"))
        if model.id != current:
            row.operator("msd.use_model", text="Use").model = model.id
        else:
            row.label(text="In use")


class SidebarPanel:
    """Where every panel of the add-on lives: the 3D viewport's sidebar, tab "Panorama"."""

    bl_space_type = 'VIEW_3D'
    bl_region_type = 'UI'
    bl_category = "Panorama"


class MSD_PT_panorama(SidebarPanel, Panel):
    bl_label = "MSD Panorama"

    @classmethod
    def poll(cls, context):
        return context.scene is not None

    def draw(self, context):
        layout = self.layout
        group = context.scene.msd_panorama
        draw_worker_status(layout, context)

        col = layout.column(align=True)
        col.label(text="Prompt")
        col.prop(group, "prompt", text="")
        col.label(text="Negative Prompt")
        col.prop(group, "negative_prompt", text="")

        layout.use_property_split = True
        layout.use_property_decorate = False
        layout.prop(group, "aspect")
        col = layout.column(align=True)
        col.prop(group, "width")
        col.prop(group, "height")
        if group.aspect == 'CUSTOM':
            layout.prop(group, "wrap")
        layout.prop(group, "target")
        if group.target == 'WORLD':
            layout.prop(group, "world_strength")
            layout.prop(group, "world_rotation")
        elif group.target == 'BACKDROP':
            layout.prop(group, "backdrop_shape")
            layout.prop(group, "backdrop_strength")
        layout.prop(group, "hdr")
        if effective_wrap(group) and group.width == 2 * group.height:
            layout.prop(group, "cubemap")

        layout.use_property_split = False
        draw_model_download(layout, context)
        if session.busy:
            layout.progress(factor=run_state.progress, type='BAR', text=progress_text())
            layout.operator("msd.cancel", icon='CANCEL')
        else:
            layout.prop(group, "quality")
            row = layout.row(align=True)
            row.operator("msd.generate", icon='RENDER_STILL')
            row.operator("msd.add_to_batch", text="", icon='ADD')
            estimate = estimate_text(context.scene, get_preferences(context))
            if estimate:
                layout.label(text=estimate, icon='TIME')
        if run_state.last_error:
            box = layout.box()
            box.alert = True
            draw_wrapped(box, run_state.last_error, icon='ERROR')

        image = preview_image() or bpy.data.images.get(run_state.last_image)
        if image is not None:
            layout.template_icon(icon_value=layout.icon(image), scale=PREVIEW_SCALE)


class SettingsSubPanel(SidebarPanel):
    """A collapsed sub-panel of MSD_PT_panorama."""

    bl_parent_id = "MSD_PT_panorama"
    bl_options = {'DEFAULT_CLOSED'}


def split_layout(layout):
    """Labels beside the fields, no animation decorators: the layout of a settings list."""
    layout.use_property_split = True
    layout.use_property_decorate = False
    return layout


class MSD_PT_panorama_sampler(SettingsSubPanel, Panel):
    bl_label = "Sampler"

    def draw(self, context):
        layout = split_layout(self.layout)
        group = context.scene.msd_panorama
        layout.prop(group, "random_seed")
        row = layout.row()
        row.active = not group.random_seed
        row.prop(group, "seed")
        if group.large_seed and not group.random_seed:
            layout.label(text=f"Seed {group.large_seed} (from a file; setting Seed replaces it)")
        if run_state.last_seed is not None:
            layout.label(text=f"Last seed: {run_state.last_seed}")
        layout.prop(group, "steps")
        layout.prop(group, "scheduler")
        layout.prop(group, "guidance")
        layout.prop(group, "method")
        col = layout.column()
        col.active = group.method == "msd"
        col.prop(group, "omega")
        col.prop(group, "gradient")
        col.prop(group, "guided_fraction")
        col.prop(group, "late_gradient")
        col.prop(group, "coarse_gradient")
        row = col.row()
        row.active = "exact" in (group.gradient, group.late_gradient)
        row.prop(group, "pull_through")
        col.prop(group, "windows")
        col.prop(group, "pyramid")
        row = col.row()
        row.active = group.pyramid == "global"
        row.prop(group, "global_window")
        row.prop(group, "global_move")
        col.prop(group, "coarse_noise")
        row = col.row()
        row.prop(group, "fine_start")
        sub = row.row()
        sub.active = group.fine_start > 0
        sub.prop(group, "fine_join", text="")
        row = col.row()
        row.active = group.windows == "shifted"
        row.prop(group, "tile_starts")
        col.prop(group, "fine_steps")
        col.prop(group, "scales")
        layout.prop(group, "poles")  # MultiDiffusion too
        col = layout.column()
        col.active = group.hdr
        col.prop(group, "hdr_knee")
        col.prop(group, "hdr_peak")


class MSD_PT_panorama_output(SettingsSubPanel, Panel):
    bl_label = "Model & Output"

    def draw(self, context):
        layout = split_layout(self.layout)
        prefs = get_preferences(context)
        layout.prop(prefs, "model")
        layout.prop(prefs, "device")
        layout.prop(prefs, "output_folder")
        layout.label(text=f"Writes to {output_folder(prefs)}")
        layout.prop(prefs, "keep_worker_warm")
        if run_state.last_output:
            draw_wrapped(layout, f"Last: {run_state.last_output}", icon='FILE_IMAGE')
        if run_state.last_image in bpy.data.images:
            op = layout.operator("msd.restore_settings", text="Use Settings of Last Panorama", icon='RECOVER_LAST')
            op.image_name = run_state.last_image


class MSD_UL_loras(UIList):
    """One row per LoRA: its file and weight."""

    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index):
        row = layout.row(align=True)
        row.alert = bool(item.path.strip()) and not lora_file_exists(item.path)
        row.prop(item, "path", text="", emboss=True)
        row.prop(item, "weight", text="")


def lora_file_exists(path: str) -> bool:
    return os.path.isfile(bpy.path.abspath(path.strip()))


class MSD_PT_panorama_loras(SettingsSubPanel, Panel):
    bl_label = "LoRAs"

    def draw(self, context):
        layout = self.layout
        group = context.scene.msd_panorama
        row = layout.row()
        row.template_list("MSD_UL_loras", "", group, "loras", group, "lora_index", rows=2)
        col = row.column(align=True)
        col.operator("msd.lora_add", text="", icon='ADD')
        col.operator("msd.lora_remove", text="", icon='REMOVE')
        if not group.loras:
            draw_wrapped(layout, "LoRAs steer the model's style: add .safetensors files made for this model's family.",
                         icon='INFO')


class MSD_PT_panorama_variations(SettingsSubPanel, Panel):
    bl_label = "Drafts"

    def draw(self, context):
        layout = self.layout
        group = context.scene.msd_panorama
        row = layout.row(align=True)
        row.prop(group, "variation_count", text="")
        row.operator("msd.generate_variations", icon='IMGDISPLAY').count = group.variation_count
        running = session.busy and session.job.on_event is not None
        if running:
            layout.label(text=f"{len(variation_state.variations)} of {variation_state.count} drafts done")
        if not variation_state.variations:
            return
        shown = variation_state.variations
        for start in range(0, len(shown), THUMBNAILS_PER_ROW):
            row = layout.row(align=True)
            for variation in shown[start:start + THUMBNAILS_PER_ROW]:
                col = row.column(align=True)
                col.template_icon(icon_value=variation_state.icon_id(variation), scale=THUMBNAIL_SCALE)
                col.operator("msd.use_variation", text=f"Use seed {variation.seed}").index = variation.index


class MSD_PT_history(SettingsSubPanel, Panel):
    bl_label = "History"

    def draw(self, context):
        layout = self.layout
        group = context.scene.msd_panorama
        entries = cached_history(context)
        row = layout.row()
        row.label(text=f"{len(entries)} panoramas" + (" · reading the folder…" if history_cache.scanning else ""))
        row.operator("msd.refresh_history", text="", icon='FILE_REFRESH')
        for entry in entries:
            box = layout.box()
            row = box.row()
            row.template_icon(icon_value=history_cache.icon_id(entry, layout), scale=THUMBNAIL_SCALE)
            col = row.column(align=True)
            draw_wrapped(col, entry.prompt or "(no prompt)")
            col.label(text=f"Seed {entry.seed} · {entry.size_text}",
                      icon='FILE_BLEND' if entry.image_name else 'FILE_IMAGE')
            buttons = box.row(align=True)
            for operator, label, icon, arguments in history_buttons(entry, group):
                properties = buttons.operator(operator, text=label, icon=icon)
                for name, value in arguments.items():
                    setattr(properties, name, value)


class MSD_PT_panorama_refine(SettingsSubPanel, Panel):
    bl_label = "Refine"

    def draw(self, context):
        layout = split_layout(self.layout)
        group = context.scene.msd_panorama
        image = source_image(context)
        if image is None:
            draw_wrapped(layout, "Show a panorama as the world, or select a backdrop, to refine or upscale it.",
                         icon='INFO')
            return
        layout.label(text=image.name, icon='IMAGE_DATA')
        layout.prop(group, "refine_strength")
        layout.prop(group, "refine_scale")
        width, height = refine_target_size(image, group.refine_scale)
        layout.label(text=f"{image.size[0]}×{image.size[1]} → {width}×{height}")
        row = layout.row()
        row.enabled = not session.busy
        row.operator("msd.refine", icon='SHADERFX')


classes = (MSD_UL_loras, MSD_PT_panorama, MSD_PT_panorama_variations, MSD_PT_panorama_sampler, MSD_PT_panorama_loras,
           MSD_PT_panorama_output, MSD_PT_panorama_refine, MSD_PT_history)
