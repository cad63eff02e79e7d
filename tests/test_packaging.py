"""What a wheel of quantkit holds: the package, its bundled texts and the built-in profiles, so an installed
quantkit finds `gguf-standard` without a checkout; and what pyproject.toml declares is what is there."""

import os
import shutil
import subprocess
import sys
import zipfile

from conftest import REPO


def test_the_wheel_carries_the_profiles_and_an_installed_quantkit_finds_them(tmp_path):
    # A copy of the checkout: building in place would leave build/ and *.egg-info in it.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "builds", "__pycache__", "*.egg-info",
                                                               "build", ".pytest_cache", "logs",
                                                               "test-output"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=600)
    [wheel] = (tmp_path / "dist").glob("quantkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    profiles = {p.name for p in (REPO / "profiles").glob("*.yaml")}
    assert {"gguf-standard.yaml", "sample.yaml"} <= profiles
    assert {f"quantkit/builtin_profiles/{p}" for p in profiles} <= names
    assert {"quantkit/data/botchan-eval.txt", "quantkit/data/botchan-calibration.txt"} <= names
    assert "quantkit/py.typed" not in names  # not declared: quantkit does not claim to be checked by a type checker
    assert {"quantkit/formats/gguf/__init__.py", "quantkit/formats/mlx/tool.py"} <= names  # every format folder
    assert {"quantkit/dashboard/templates/build.html", "quantkit/dashboard/static/dashboard.js"} <= names  # serve
    assert not any(n.startswith(("tests/", "scripts/", "profiles/")) for n in names)

    # Installed on its own, run from a folder with no profiles/: the built-in profiles come from the wheel.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import quantkit; from quantkit.profiles import available_profiles, load_profile; "
            "p = load_profile('gguf-standard'); print(quantkit.__file__); print(p.source_file); "
            "print(','.join(available_profiles()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, check=True,
                          env={**os.environ, "PYTHONPATH": str(target)}, timeout=120)
    module, source, names_found = proc.stdout.split()
    assert module.startswith(str(target)) and source.startswith(str(target / "quantkit" / "builtin_profiles"))
    assert set(names_found.split(",")) == {p.removesuffix(".yaml") for p in profiles}
