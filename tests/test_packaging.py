"""The package's metadata lists every package of the source tree, so that a wheel (what a user
installing from an index gets) carries all of it; an editable install would hide a missing one.
CI also builds the wheel and runs the main job from it (``ci/wheel-check.sh``)."""
from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_of_the_tree_is_in_the_wheel_list():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    in_tree = {".".join(init.parent.relative_to(ROOT).parts)
               for init in (ROOT / "gpumpiad").rglob("__init__.py")}
    mapped = {name for name, folder in config.get("package-dir", {}).items()
              if (ROOT / folder / "__init__.py").is_file()}
    assert in_tree, "no package found"
    assert in_tree | mapped == listed, (f"not listed: {sorted(in_tree | mapped - listed)}; "
                                        f"listed but absent: {sorted(listed - in_tree - mapped)}")
    for name, patterns in config.get("package-data", {}).items():
        folder = ROOT / config.get("package-dir", {}).get(name, name.replace(".", "/"))
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{name}: no file matches {pattern}"
