"""Drafts: several small variations of the panel's panorama in one worker request, shown as thumbnails
as they finish; clicking one applies it and keeps its seed and settings for the full-size run.

A variations run goes through the same worker session and polling as Generate (start_generation with
a ``send`` hook, poll_worker, the Generate operator's modal loop); only its own events are handled
here. The drafts are written to the output folder's "drafts" folder (msd_core.variations has the
size rule). Thumbnails live in a preview collection (bpy.utils.previews), never in the .blend.
"""

import dataclasses
import os
from dataclasses import dataclass

import bpy
import bpy.utils.previews
from bpy.props import IntProperty
from bpy.types import Operator

from ..msd_core import variations as drafts
from ..msd_core.errors import BadInput, MSDError
from ..msd_core.settings import GenerationSettings
from ..preferences import get_preferences, output_folder
from ..properties import SEED_MAX, run_state, settings_to_scene
from . import generate
from .backdrop import add_backdrop, check_shape
from .images import absolute_path, load_panorama
from .world import SOURCE_PROPERTY, apply_world

DRAFTS_FOLDER = "drafts"


@dataclass(frozen=True)
class Variation:
    index: int
    seed: int
    path: str
    icon_key: str


class VariationState:
    """The latest variations run: the settings it was asked with (full size) and its finished drafts."""

    def __init__(self):
        self.settings: GenerationSettings | None = None
        self.count = 0
        self.variations: list[Variation] = []
        self.previews = None  # a bpy.utils.previews collection while the add-on is registered

    def begin(self, settings: GenerationSettings, count: int) -> None:
        self.settings, self.count, self.variations = settings, count, []
        self.previews.clear()

    def add(self, request_id: str, index: int, seed: int, path: str) -> Variation:
        key = f"{request_id}-{index}"
        self.previews.load(key, path, 'IMAGE')
        variation = Variation(index, seed, path, key)
        self.variations.append(variation)
        return variation

    def icon_id(self, variation: Variation) -> int:
        return self.previews[variation.icon_key].icon_id


variation_state = VariationState()


def start_variations(context, count: int) -> generate.Job:
    """Send the panel's settings as a variations request of ``count`` drafts; raises MSDError."""
    drafts.check_count(count)
    folder = os.path.join(output_folder(get_preferences(context)), DRAFTS_FOLDER)

    def send(client, settings: GenerationSettings) -> tuple[str, str]:
        if settings.seed <= SEED_MAX:  # every draft's seed fits the panel's field (a stored large seed stays)
            settings.seed = min(settings.seed, SEED_MAX - count + 1)
        output = generate.unique_output_path(folder, settings.seed, variations=count)
        variation_state.begin(settings, count)
        return client.variations(settings, output, count), output

    job = generate.start_generation(context, send=send)
    job.on_event = handle_variations_event
    return job


def handle_variations_event(context, job: generate.Job, event: dict) -> str | None:
    """A variations run's events: drafts become thumbnails, progress covers all of them, "done" ends
    the run without importing anything; the rest is handled as for a panorama."""
    name = event.get("event")
    if event.get("id") != job.request_id or name not in ("variation", "progress", "done"):
        return generate.handle_event(context, job, event)
    if name == "variation":
        variation_state.add(job.request_id, event["index"], event["seed"], event["path"])
        return None
    if name == "progress":
        generate.handle_event(context, job, event)
        run_state.progress = (event["variation"] + event["step"] / max(1, event["total"])) / event["count"]
        return None
    return 'FINISHED'


def use_variation(context, variation: Variation) -> None:
    """Apply a draft as the panel's target says and put its seed and settings in the panel."""
    scene = context.scene
    group = scene.msd_panorama
    if group.target == 'BACKDROP':
        check_shape(context, group.backdrop_shape)  # before loading anything: a refusal changes nothing
    image = load_panorama(variation.path)
    if group.target == 'WORLD':
        apply_world(context, image, strength=group.world_strength, rotation=group.world_rotation)
    elif group.target == 'BACKDROP':
        _remove_draft_backdrops(keep=image)
        add_backdrop(context, image, shape=group.backdrop_shape, strength=group.backdrop_strength)
    settings_to_scene(dataclasses.replace(variation_state.settings, seed=variation.seed), scene)
    run_state.last_image = image.name
    _remove_unused_drafts(keep=image)


def _remove_draft_backdrops(keep) -> None:
    """Remove the backdrops the add-on made for other drafts of this run (with their mesh and material,
    also ours): using draft after draft replaces the backdrop instead of stacking them."""
    drafts_files = {absolute_path(v.path) for v in variation_state.variations}
    for obj in [o for o in bpy.data.objects if o.get(SOURCE_PROPERTY) is not None]:
        image = obj[SOURCE_PROPERTY]
        if image == keep or absolute_path(image.filepath) not in drafts_files:
            continue
        mesh = obj.data
        materials = [slot.material for slot in obj.material_slots if slot.material is not None]
        bpy.data.objects.remove(obj)
        if mesh is not None and mesh.users == 0:
            bpy.data.meshes.remove(mesh)
        bpy.data.batch_remove([material for material in materials if material.users == 0])


def _remove_unused_drafts(keep) -> None:
    """Drafts tried before (their images and our worlds showing them) that nothing uses any more:
    clicking through the thumbnails leaves only the one in use."""
    drafts_files = {absolute_path(v.path) for v in variation_state.variations}

    def is_unused_draft(image) -> bool:
        return image is not None and image != keep and absolute_path(image.filepath) in drafts_files

    # Our draft worlds only: the fake user that apply_world gives a replaced world is no use here.
    unused_worlds = [w for w in bpy.data.worlds
                     if w.users == int(w.use_fake_user) and is_unused_draft(w.get(SOURCE_PROPERTY))]
    bpy.data.batch_remove(unused_worlds)
    bpy.data.batch_remove([image for image in bpy.data.images if image.users == 0 and is_unused_draft(image)])


class MSD_OT_generate_variations(generate.WorkerRunOperator, Operator):
    """Generate several small drafts of the panorama (consecutive seeds) to choose one for the full-size run"""

    bl_idname = "msd.generate_variations"
    bl_label = "Generate Variations"
    bl_options = set()  # nothing in the scene changes until a variation is used

    count: IntProperty(name="Variations", description="How many drafts", default=4, min=1,
                       max=drafts.MAX_VARIATIONS)

    def start(self, context) -> generate.Job:
        return start_variations(context, self.count)

    def finished_message(self) -> str:
        folder = os.path.dirname(variation_state.variations[-1].path) if variation_state.variations else ""
        return f"{len(variation_state.variations)} variations saved to {folder}"


class MSD_OT_use_variation(Operator):
    """Use this draft: apply it (world or backdrop, as the panel says) and keep its seed and settings"""

    bl_idname = "msd.use_variation"
    bl_label = "Use Variation"
    bl_options = {'REGISTER', 'UNDO'}

    index: IntProperty(name="Index", description="Which draft of the latest variations run (0 = first)", min=0)

    @classmethod
    def poll(cls, context):
        if generate.session.busy and generate.session.job.on_event is None:
            cls.poll_message_set("A panorama is being generated")
            return False
        return bool(variation_state.variations)

    def execute(self, context):
        found = [v for v in variation_state.variations if v.index == self.index]
        try:
            if not found:
                raise BadInput(f"there is no variation {self.index}; generate variations first")
            use_variation(context, found[0])
        except MSDError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        self.report({'INFO'}, f"Using variation {self.index + 1} (seed {found[0].seed})")
        return {'FINISHED'}


classes = (MSD_OT_generate_variations, MSD_OT_use_variation)


def register():
    variation_state.previews = bpy.utils.previews.new()


def unregister():
    bpy.utils.previews.remove(variation_state.previews)
    variation_state.previews = None
    variation_state.variations = []
