"""The extension as Blender sees it: manifest, built zip, install/uninstall, register cycle, UI classes."""

import os
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import bpy
import pytest

import addon_utils  # isort: skip  (importable only once bpy is: it lives in Blender's scripts)

import msd_core
from blender_env import (  # noqa: F401  (blender, extension: fixtures)
    MODULE,
    REPO_ROOT,
    addon_module,
    addon_preferences,
    blender,
    ensure_installed,
    extension,
    extension_zip,
    installed_dir,
    is_enabled,
    run_blender_ext,
    uninstall_extension,
)
from msd_core.worker.requirements import WORKER_REQUIREMENTS

OPERATORS = ("generate", "cancel", "install_worker", "check_worker", "restore_settings", "download_model", "cancel_download", "use_model")
PANELS = ("MSD_PT_panorama", "MSD_PT_panorama_sampler", "MSD_PT_panorama_output")


def manifest() -> dict:
    with open(REPO_ROOT / "blender_manifest.toml", "rb") as file:
        return tomllib.load(file)


# -- manifest ---------------------------------------------------------------------------------------


def test_manifest_passes_blenders_validator():
    result = run_blender_ext("validate", str(REPO_ROOT))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


def test_validator_rejects_an_id_with_a_dash(tmp_path):
    shutil.copytree(REPO_ROOT / "msd_core", tmp_path / "msd_core")
    shutil.copy(REPO_ROOT / "__init__.py", tmp_path)
    text = (REPO_ROOT / "blender_manifest.toml").read_text(encoding="utf-8")
    (tmp_path / "blender_manifest.toml").write_text(text.replace('id = "msd_panorama"', 'id = "msd-panorama"'), encoding="utf-8")
    result = run_blender_ext("validate", str(tmp_path))
    assert result.returncode != 0
    assert "key \"id\" invalid: Not a valid Python identifier" in result.stdout + result.stderr


def test_manifest_fields():
    data = manifest()
    assert data["version"] == msd_core.__version__
    assert data["id"] == "msd_panorama" and data["type"] == "add-on"
    assert data["blender_version_min"] == "4.2.0"
    assert data["license"] == ["SPDX:GPL-3.0-or-later"]
    assert len(data["tagline"]) <= 64 and data["tagline"][-1].isalnum()
    assert set(data["permissions"]) == {"network", "files"}


def test_worker_requirements_match_pyproject():
    with open(REPO_ROOT / "pyproject.toml", "rb") as file:
        pyproject = tomllib.load(file)
    assert list(WORKER_REQUIREMENTS) == pyproject["project"]["optional-dependencies"]["worker"]


# -- the built zip ----------------------------------------------------------------------------------


def test_zip_holds_the_add_on_and_msd_core_and_nothing_for_development():
    names = zipfile.ZipFile(extension_zip()).namelist()
    for needed in ("blender_manifest.toml", "__init__.py", "preferences.py", "properties.py",
                   "operators/generate.py", "ui/panel.py", "msd_core/worker/client.py", "msd_core/worker/process.py",
                   "msd_core/worker/requirements.py"):  # fmt: skip
        assert needed in names
    for name in names:
        top = name.split("/")[0]
        assert top not in {"tests", "bench", "docs", "scripts", ".venv", ".git", ".notes", ".ci", "out", "build", "Makefile", "pyproject.toml"}, name
        assert "__pycache__" not in name and not name.endswith(".pyc") and ".egg-info" not in name, name


def test_install_enables_and_uninstall_removes_cleanly(blender):
    ensure_installed()
    assert is_enabled()
    assert (installed_dir() / "msd_core" / "worker" / "client.py").is_file()
    assert hasattr(bpy.types.Scene, "msd_panorama")

    uninstall_extension()
    assert not is_enabled()
    assert not installed_dir().exists()
    assert MODULE not in sys.modules
    assert not hasattr(bpy.types.Scene, "msd_panorama")
    assert not hasattr(bpy.types, "MSD_PT_panorama")

    ensure_installed()  # the other tests need it
    assert is_enabled()


# -- registration -----------------------------------------------------------------------------------


def registered_names() -> set[str]:
    return {name for name in dir(bpy.types) if name.startswith("MSD_")}


def addon_classes() -> list:
    module = addon_module()
    return [*module.preferences.classes, *module.properties.classes, *module.operators.classes, *module.ui.panel.classes]


def our_handlers() -> list:
    return [
        handler
        for name in dir(bpy.app.handlers)
        if isinstance(handlers := getattr(bpy.app.handlers, name), list)
        for handler in handlers
        if getattr(handler, "__module__", "").startswith(MODULE)
    ]


def assert_registered():
    classes = addon_classes()
    assert {f"MSD_OT_{name}" for name in OPERATORS} | set(PANELS) <= {cls.__name__ for cls in classes}
    assert all(cls.is_registered for cls in classes)
    assert addon_preferences().model  # the preferences are there, with their defaults
    assert bpy.context.scene.msd_panorama.aspect == "WORLD_360"
    for name in OPERATORS:
        assert getattr(bpy.ops.msd, name).idname() == f"MSD_OT_{name}"


def assert_nothing_left(classes):
    assert not any(cls.is_registered for cls in classes)
    assert registered_names() == set()
    assert not hasattr(bpy.types.Scene, "msd_panorama")
    assert our_handlers() == []
    worker_env = sys.modules.get(f"{MODULE}.operators.worker_env")
    if worker_env is not None:
        assert not bpy.app.timers.is_registered(worker_env._poll_install)


def test_register_unregister_register_leaves_nothing_behind(extension):
    assert_registered()
    # load_pre: a file load cancels the run; save_pre/save_post: a save stores the user's world, not
    # the live preview; load_post, undo_post, redo_post: a preview world brought back is removed.
    assert len(our_handlers()) == 6
    classes = addon_classes()
    extension.unregister()
    assert_nothing_left(classes)
    extension.register()
    assert_registered()
    assert len(our_handlers()) == 6


def test_disable_and_enable_through_blender(extension):
    classes = addon_classes()
    addon_utils.disable(MODULE, default_set=True)
    assert not is_enabled()
    assert_nothing_left(classes)
    addon_utils.enable(MODULE, default_set=True)
    assert is_enabled()
    assert_registered()


# -- UI ---------------------------------------------------------------------------------------------


def test_panels_live_in_the_sidebar_tab(extension):
    for name in PANELS:
        panel = getattr(bpy.types, name)
        assert (panel.bl_space_type, panel.bl_region_type, panel.bl_category) == ("VIEW_3D", "UI", "Panorama")
    assert bpy.types.MSD_PT_panorama_sampler.bl_parent_id == "MSD_PT_panorama"
    assert "DEFAULT_CLOSED" in bpy.types.MSD_PT_panorama_output.bl_options


class CheckingLayout:
    """Stands in for bpy.types.UILayout, which headless Blender cannot create (it draws nothing).

    It checks what a real layout would reject: prop() names a real property, operator() a registered
    operator, icons exist."""

    icons = set(bpy.types.UILayout.bl_rna.functions["label"].parameters["icon"].enum_items.keys())

    def __init__(self, log):
        self.log = log  # attributes like alert, active, use_property_split are simply set

    def _child(self, *args, **kwargs):
        return CheckingLayout(self.log)

    row = column = box = split = _child

    def _check_icon(self, kwargs):
        assert kwargs.get("icon", "NONE") in self.icons, kwargs["icon"]

    def prop(self, data, name, **kwargs):
        assert name in data.bl_rna.properties, f"{data} has no property {name!r}"
        self._check_icon(kwargs)
        self.log.append(("prop", name))

    def label(self, **kwargs):
        self._check_icon(kwargs)
        self.log.append(("label", kwargs.get("text", "")))

    def operator(self, idname, **kwargs):
        self._check_icon(kwargs)
        module, name = idname.split(".")
        rna = getattr(getattr(bpy.ops, module), name).get_rna_type()  # raises for an unknown operator
        self.log.append(("operator", idname))
        return CheckingOperatorProperties(rna)

    def progress(self, **kwargs):
        assert 0.0 <= kwargs["factor"] <= 1.0
        self.log.append(("progress", kwargs["text"]))

    def template_icon(self, **kwargs):
        self.log.append(("icon", kwargs["icon_value"]))

    def icon(self, data):
        return bpy.types.UILayout.icon(data)


class CheckingOperatorProperties:
    def __init__(self, rna):
        object.__setattr__(self, "rna", rna)

    def __setattr__(self, name, value):
        assert name in self.rna.properties, f"{self.rna.identifier} has no property {name!r}"


def draw(panel_name: str) -> list:
    log = []
    panel = getattr(bpy.types, panel_name)
    panel.draw(type("FakePanel", (), {"layout": CheckingLayout(log)})(), bpy.context)
    return log


def test_panel_draw_code_uses_real_properties_and_operators(extension):
    prefs = addon_preferences()
    prefs.worker_python = ""
    bpy.context.scene.msd_panorama.target = "BACKDROP"
    main = draw("MSD_PT_panorama")
    assert ("label", "Worker not installed") in main
    assert ("operator", "msd.install_worker") in main and ("operator", "msd.generate") in main
    assert ("prop", "backdrop_shape") in main

    prefs.worker_python = sys.executable
    main = draw("MSD_PT_panorama")
    assert ("label", "Ready") in main and ("operator", "msd.install_worker") not in main
    assert ("prop", "omega") in draw("MSD_PT_panorama_sampler")
    assert ("prop", "model") in draw("MSD_PT_panorama_output")


def test_import_msd_core_loads_neither_torch_nor_bpy():
    """Blender's own Python imports msd_core (it has no torch); heavy imports wait for the modules
    that run the model."""
    code = "import sys, msd_core; print(sorted({'torch', 'diffusers', 'bpy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- the commands of the README ---------------------------------------------------------------------


def test_make_dist_builds_the_zip_without_the_venv_as_blenders_builder_does(tmp_path):
    """`make dist` needs only a Python 3.11+ (no venv); its zip passes Blender's validator and holds the
    same files as the zip of Blender's own builder."""
    dist = tmp_path / "not" / "there" / "yet"
    result = subprocess.run(
        ["make", "-C", str(REPO_ROOT), "dist", f"DIST={dist}", f"VENV={tmp_path / 'no-venv'}", f"PYTHON={sys.executable}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "no-venv").exists()
    (zip_path,) = dist.glob("msd_panorama-*.zip")
    assert zip_path.name == f"msd_panorama-{msd_core.__version__}.zip"
    validated = run_blender_ext("validate", str(zip_path))
    assert validated.returncode == 0 and "Success" in validated.stdout, validated.stdout + validated.stderr
    ours = zipfile.ZipFile(zip_path).namelist()
    assert ours[0] == "blender_manifest.toml" and sorted(ours) == sorted(zipfile.ZipFile(extension_zip()).namelist())
    assert "operators/generate.py" in ours and "LICENSE" in ours


def test_build_zip_reads_the_exclude_patterns_as_gitignore_lines(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        from build_zip import ExcludePatterns
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    rules = ExcludePatterns(["__pycache__/", "*.pyc", ".*", "/*.zip", "/tests/", "*.blend[1-9]", "/Makefile"])
    assert rules.excludes("msd_core/__pycache__", is_dir=True) and not rules.excludes("__pycache__", is_dir=False)
    assert rules.excludes("ui/panel.pyc", is_dir=False) and rules.excludes("a/.hidden", is_dir=False)
    assert rules.excludes("old.zip", is_dir=False) and not rules.excludes("msd_core/data.zip", is_dir=False)
    assert rules.excludes("tests", is_dir=True) and not rules.excludes("msd_core/tests", is_dir=True)
    assert rules.excludes("x.blend1", is_dir=False) and not rules.excludes("x.blend", is_dir=False)
    assert rules.excludes("Makefile", is_dir=False) and not rules.excludes("ui/Makefile", is_dir=False)


def test_license_is_the_gpl_3_the_manifest_names():
    text = (REPO_ROOT / "LICENSE").read_text(encoding="utf-8")
    assert manifest()["license"] == ["SPDX:GPL-3.0-or-later"]
    assert text.split()[:7] == ["GNU", "GENERAL", "PUBLIC", "LICENSE", "Version", "3,", "29"]
    assert "How to Apply These Terms to Your New Programs" in text and "END OF TERMS AND CONDITIONS" in text
    debian = Path("/usr/share/common-licenses/GPL-3")
    if debian.is_file():  # the text as Debian ships it, word for word
        assert text == debian.read_text(encoding="utf-8")


def test_make_without_python_3_11_stops_with_one_line_naming_python(tmp_path):
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "-C", str(REPO_ROOT), "--no-print-directory", "test", f"VENV={venv}", "PYTHON=/usr/bin/false"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "need Python 3.11" in result.stderr and "PYTHON=/path/to/python3.11" in result.stderr
    assert not venv.exists()


def test_test_runs_leave_nothing_in_the_temporary_folder(tmp_path):
    """A pytest run (here one test that builds and installs the zip) removes its msd-tests-* and
    msd-ext-zip-* folders when it ends."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'base'}",
         "tests/test_extension.py::test_zip_holds_the_add_on_and_msd_core_and_nothing_for_development"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(temp)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(path.name for path in temp.iterdir()) == []


def test_a_failed_demo_keeps_the_earlier_demo_blend(tmp_path):
    earlier = b"BLENDER an earlier, good demo"
    (tmp_path / "demo.blend").write_bytes(earlier)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--model", str(tmp_path / "no-such-model"),
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is not on this machine" in result.stderr and "make demo MODEL=tiny" in result.stderr
    assert ".venv/bin/msd-panorama models download" in result.stderr
    assert (result.stdout + result.stderr).count("no such file or folder") == 1  # the reason, once
    assert (tmp_path / "demo.blend").read_bytes() == earlier


# Started as a shell in a terminal starts it, with Ctrl+C's default: a suite run as a background job (make test &)
# ignores SIGINT, and a child inherits that, so the demo would never see the press.
AS_FROM_A_TERMINAL = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


# Ctrl+C while it builds the zip (then Blender's installer may take the signal), and while the run goes on.
@pytest.mark.parametrize("after", ["Manifest valid", "Generating"])
def test_ctrl_c_in_the_demo_is_one_line_without_a_traceback(tmp_path, after):
    demo = subprocess.Popen(
        [sys.executable, "-c", AS_FROM_A_TERMINAL, str(REPO_ROOT / "scripts" / "demo.py"), "--model", "tiny",
         "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while not (line := demo.stdout.readline()).startswith(after):
            assert line, "the demo ended before the stage"
        demo.send_signal(signal.SIGINT)
        stdout, stderr = demo.communicate(timeout=120)
    finally:
        demo.kill()
    assert demo.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("Interrupted")
    assert not (tmp_path / "demo.blend").exists()
