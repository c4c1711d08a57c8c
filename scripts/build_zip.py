"""Build the extension zip with the standard library alone, following the manifest's [build] rules.

    python3 scripts/build_zip.py dist          # → dist/msd_panorama-<version>.zip (the folder is created)

The same files as Blender's own builder (`blender --command extension build`) picks: the manifest
first, then every file under the repository root that no `paths_exclude_pattern` excludes, each
pattern read as a .gitignore line (a trailing "/" matches folders only, a leading or inner "/" anchors
it at the root, otherwise it matches a name at any depth; "*" never crosses a "/"). A test compares
the two zips' file lists and validates this one with Blender's validator. Needs Python 3.11+ (tomllib).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "blender_manifest.toml"


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as a regex in which "*" and "?" never match "/" ([…] classes as in fnmatch)."""
    parts, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if char == "*":
            parts.append("[^/]*")
        elif char == "?":
            parts.append("[^/]")
        elif char == "[" and "]" in pattern[index + 2 :]:
            end = pattern.index("]", index + 2)
            body = pattern[index + 1 : end]
            parts.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            index = end
        else:
            parts.append(re.escape(char))
        index += 1
    return re.compile("".join(parts) + r"\Z")


class ExcludePatterns:
    """The manifest's ``paths_exclude_pattern``: ``excludes(path, is_dir)`` for a root-relative path."""

    def __init__(self, patterns: list[str]):
        self.rules = []
        for pattern in patterns:
            if pattern.startswith("!"):
                raise ValueError(f"negated pattern {pattern!r}: not supported by this builder; use Blender's")
            folders_only = pattern.endswith("/")
            body = pattern.rstrip("/")
            anchored = "/" in body
            self.rules.append((_glob_regex(body.lstrip("/")), anchored, folders_only))

    def excludes(self, path: str, is_dir: bool) -> bool:
        name = path.rsplit("/", 1)[-1]
        return any(
            regex.match(path if anchored else name) and (is_dir or not folders_only)
            for regex, anchored, folders_only in self.rules
        )


def manifest_of(root: Path) -> dict:
    with open(root / MANIFEST, "rb") as file:
        return tomllib.load(file)


def zip_members(root: Path, patterns: list[str]) -> list[str]:
    """Root-relative paths (with "/") of the files the zip holds: the manifest, then the rest, sorted."""
    rules = ExcludePatterns(patterns)
    members = []
    for folder, dirs, files in os.walk(root):
        relative = Path(folder).relative_to(root).as_posix()
        prefix = "" if relative == "." else relative + "/"
        dirs[:] = sorted(name for name in dirs if not rules.excludes(prefix + name, is_dir=True))
        members += [prefix + name for name in sorted(files)
                    if prefix + name != MANIFEST and not rules.excludes(prefix + name, is_dir=False)]
    return [MANIFEST, *members]


def build(output_dir: Path, root: Path = REPO_ROOT) -> Path:
    """Write ``<id>-<version>.zip`` into ``output_dir`` (created) atomically; return its path."""
    manifest = manifest_of(root)
    build_rules = manifest.get("build", {})
    if "paths" in build_rules:
        raise ValueError("[build] paths is not supported by this builder; use Blender's")
    members = zip_members(root, build_rules.get("paths_exclude_pattern", ["__pycache__/", ".*", "/*.zip", "*.blend[1-9]"]))
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{manifest['id']}-{manifest['version']}.zip"
    partial = target.with_name("." + target.name)
    try:
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            for member in members:
                archive.write(root / member, member)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", nargs="?", default="dist", help="folder for the zip (created; default dist)")
    args = parser.parse_args(argv)
    try:
        print(build(Path(args.output_dir)))
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"build_zip: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
