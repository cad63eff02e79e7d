"""The llama.cpp source tree that matches the installed llama-cpp-python.

The converter (convert_hf_to_gguf.py, conversion/, gguf-py) must come from the same llama.cpp
commit as the quantizer and runtime compiled into the bindings, or the GGUF it writes may use
keys or tensor layouts the runtime does not know. The llama-cpp-python sdist carries exactly
that tree, so quantkit extracts it from there (once, into the cache) unless the user points at
their own checkout with --llama-cpp or QUANTKIT_LLAMA_CPP.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

from ...errors import ToolError
from ...fsutil import sha256_file
from ...paths import cache_dir
from ...procs import child_env
from ...pypi import pip_download

# Only what the converter needs; the full tree is ~300 MB of sources and tests.
_NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")

# The sha256 of each llama-cpp-python sdist quantkit takes llama.cpp's converter from, as PyPI publishes it
# (https://pypi.org/pypi/llama-cpp-python/json, "digests"). The converter runs as this user on every build, so an
# sdist from a tampered index, mirror or cache must not reach it. ./scripts/setup.sh reads this table too (one
# `"VERSION": "SHA256",` line per version) before it builds the bindings and tools from the same file.
SDIST_SHA256 = {
    "0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
}


@dataclass(frozen=True)
class LlamaCppTree:
    root: Path
    version: str  # llama-cpp-python version the tree came with, or "user" for a user checkout

    @property
    def converter(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    def supported_architectures(self) -> frozenset[str]:
        """Hugging Face `architectures` names the converter accepts, asked from the converter itself."""
        return _supported_architectures(self.root)

    def identity(self) -> str:
        """What the converter's output depends on: the tree's origin and a hash of its Python sources (the
        converter, conversion/ and gguf-py), so an edited or updated checkout remakes the F16/BF16 file."""
        origin = "a user checkout" if self.version == "user" else f"llama-cpp-python {self.version}"
        return f"from {origin} (sources {_sources_sha256(self.root)[:16]})"


def find_tool(name: str) -> Path:
    """A llama.cpp program (llama-imatrix, llama-gguf-split, llama-perplexity) built from the same tree as
    the bindings: QUANTKIT_LLAMA_TOOLS, else the ones ./scripts/setup.sh built for this environment, else PATH."""
    folders = [Path(p) for p in (os.environ.get("QUANTKIT_LLAMA_TOOLS"),) if p] + [Path(sys.prefix) / "llama-tools"]
    for folder in folders:
        if os.access(folder / name, os.X_OK):
            return folder / name
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ToolError(f"{name} (from llama.cpp) is not installed",
                    "run ./scripts/setup.sh (it builds llama.cpp's tools from the llama-cpp-python source), "
                    "or set QUANTKIT_LLAMA_TOOLS to a folder holding them")


def tool_version(name: str) -> str:
    """A llama.cpp program's identity: its `--version` line and a hash of the binary. Built from an sdist, every
    llama.cpp program says "0.5.0-dev (build 0, commit unknown)", so the version alone tells no two apart."""
    tool = find_tool(name)
    st = tool.stat()
    return _tool_version(str(tool), st.st_size, st.st_mtime_ns)


@cache
def _tool_version(tool: str, size: int, mtime_ns: int) -> str:
    proc = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60, env=child_env())
    line = next((l.strip() for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("version:")), "")
    if not line:
        raise ToolError(f"{tool} --version printed no version", "run ./scripts/setup.sh to rebuild llama.cpp's tools")
    with open(tool, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return f"{line.removeprefix('version:').strip()}, sha256 {digest[:16]}"


def bindings_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError as e:
        raise ToolError("llama-cpp-python is not installed", "run ./scripts/setup.sh") from e


def find_tree(user_path: str | Path | None = None) -> LlamaCppTree:
    user_path = user_path or os.environ.get("QUANTKIT_LLAMA_CPP")
    if user_path:
        root = Path(user_path).expanduser().resolve()
        if not (root / "convert_hf_to_gguf.py").is_file():
            raise ToolError(
                f"{root} is not a llama.cpp checkout (no convert_hf_to_gguf.py)",
                "point --llama-cpp at the root of a llama.cpp clone, or leave it out to use the bundled one",
            )
        return LlamaCppTree(root, "user")
    version = bindings_version()
    root = cache_dir() / "llama.cpp" / version
    if not (root / ".complete").exists():
        _extract(version, root)
    return LlamaCppTree(root, version)


def _sdist(version: str) -> Path:
    """The llama-cpp-python sdist of `version`, from the cache or downloaded, checked against SDIST_SHA256."""
    expected = SDIST_SHA256.get(version)
    if expected is None:
        raise ToolError(f"quantkit has no sha256 for the llama-cpp-python {version} source, so it cannot check the "
                        "llama.cpp converter it would run",
                        "pass --llama-cpp PATH to a llama.cpp checkout, or add that version's sdist sha256 (from "
                        "https://pypi.org/pypi/llama-cpp-python/json) to SDIST_SHA256 in quantkit/formats/gguf/llamacpp.py")
    folder = cache_dir() / "sdist"
    path = folder / f"llama_cpp_python-{version}.tar.gz"
    if path.exists():
        # Checked on every extraction, not only after a download: the cache may be shared or restored from elsewhere.
        return _checked(path, version, expected, "the cached")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        got = pip_download(f"llama-cpp-python=={version}", Path(tmp), sdist=True)
        if got is None:
            raise ToolError(
                f"cannot download the llama-cpp-python {version} source that carries llama.cpp's converter",
                "connect to PyPI once, or pass --llama-cpp PATH to a llama.cpp checkout",
            )
        _checked(got, version, expected, "the downloaded")
        os.replace(got, path)
    return path


def _checked(path: Path, version: str, expected: str, which: str) -> Path:
    """`path` if its sha256 is `expected`; otherwise the file is deleted (so no later run takes it) and refused."""
    digest = sha256_file(path)
    if digest != expected:
        path.unlink()
        raise ToolError(f"{which} llama-cpp-python {version} source has sha256 {digest[:16]}…, not PyPI's "
                        f"{expected[:16]}…; it was deleted",
                        "check the package index pip uses (pip config list) and run the command again, or pass "
                        "--llama-cpp PATH to a llama.cpp checkout")
    return path


def _extract(version: str, root: Path) -> None:
    sdist = _sdist(version)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel and any(rel == n or rel.startswith(n) for n in _NEEDED) and (m.isfile() or m.isdir()):
                m.name = rel
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    if not (tmp / "convert_hf_to_gguf.py").exists():
        raise ToolError(f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py", "pass --llama-cpp PATH")
    (tmp / ".complete").touch()
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)


@cache
def _sources_sha256(root: Path) -> str:
    files = [root / "convert_hf_to_gguf.py"] + sorted(p for d in ("conversion", "gguf-py/gguf") if (root / d).is_dir()
                                                       for p in (root / d).rglob("*.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@cache
def _supported_architectures(root: Path) -> frozenset[str]:
    marker = root / ".supported-architectures.json"
    if marker.exists():
        return frozenset(json.loads(marker.read_text()))
    proc = subprocess.run(
        [sys.executable, str(root / "convert_hf_to_gguf.py"), "--print-supported-models"],
        capture_output=True, text=True, cwd=root, env=child_env(),
    )
    names, section = set(), ""
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip().endswith("models:"):
            section = line.strip()
        elif line.strip().startswith("- ") and section.startswith("TEXT"):
            names.add(line.strip()[2:].strip())
    names = sorted(names)
    if proc.returncode != 0 or not names:
        raise ToolError(f"llama.cpp's converter in {root} did not list its models", proc.stderr.strip()[-300:])
    try:
        marker.write_text(json.dumps(names))
    except OSError:
        pass  # a read-only user checkout: just ask again next time
    return frozenset(names)
