"""--allow-pickle: a checkpoint with pickled weights only (pytorch_model.bin, or its shards and index) is read through
a safetensors copy that quantkit makes once in its cache, with torch.load(weights_only=True) in a child process; the
user's folder is never written to, and a pickle that holds more than tensors is refused, not run."""

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import safetensors
import torch
from gguf import GGUFReader
from safetensors.torch import load_file

from conftest import PROFILES, REPO, TOKEN, run_cli
from quantkit.fsutil import parse_bytes
from quantkit.paths import cache_dir
from quantkit.pickled import CONVERT_FIXED, ORIGINS, _origin, _retire_older, conversion_memory

TIED = ("lm_head.weight", "model.embed_tokens.weight")


@pytest.fixture(scope="module")
def made():
    """The converted copies the tests made, removed when the module is done (270 MB each)."""
    folders: list[Path] = []
    yield folders
    for folder in folders:
        if folder.parent == cache_dir() / "pickled":
            shutil.rmtree(folder, ignore_errors=True)


def _state_dict(sample_model):
    """What a tied model's state_dict() holds, as torch.save writes it: lm_head.weight and the embedding are one
    tensor (the safetensors sample stores the embedding alone)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sample_model, dtype=torch.float16)
    state = model.state_dict()
    assert state[TIED[0]].data_ptr() == state[TIED[1]].data_ptr()
    return state


def _pickled_copy(sample_model, folder: Path) -> Path:
    """The sample's configuration and tokenizer files without its safetensors. A README line of its own gives the
    copy a cache key of its own, so each run converts afresh."""
    folder.mkdir(parents=True)
    for p in sample_model.iterdir():
        if p.suffix != ".safetensors" and p.name != "quantkit-sample.json":
            shutil.copy(p, folder / p.name)
    with open(folder / "README.md", "a") as f:
        f.write(f"\ntest copy {uuid.uuid4()}\n")
    return folder


def _converted(proc, made) -> Path:
    """The copy the plan says it reads: a local folder's line names it first, a download's after "read from"."""
    note = r"\(weights converted from pickled \.bin with torch\.load\(weights_only=True\)"
    m = re.search(rf"^source\s+(?:(/\S+) {note}\)|\S+ {note}, read from (/\S+)\))", proc.stdout + proc.stderr, re.M)
    assert m, proc.stdout[-3000:] + proc.stderr[-3000:]
    made.append(Path(m[1] or m[2]))
    return made[-1]


def _listing(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _assert_same_tensors(converted: dict, original: dict) -> None:
    assert sorted(converted) == sorted(original)
    for name, t in original.items():
        assert converted[name].dtype == t.dtype and torch.equal(converted[name], t), name


@pytest.fixture(scope="module")
def pickled_build(sample_model, module_dir, made):
    root = module_dir("pickled")
    src = _pickled_copy(sample_model, root / "SmolLM2-135M-Instruct")
    torch.save(_state_dict(sample_model), src / "pytorch_model.bin")
    before = _listing(src)
    proc = run_cli("build", src, "--allow-pickle", "--profile", PROFILES / "files.yaml", "--out", root / "out",
                   check=True)
    return {"src": src, "before": before, "proc": proc, "out": root / "out" / src.name,
            "converted": _converted(proc, made)}


def test_pickled_weights_build_through_an_exact_safetensors_copy(sample_model, pickled_build, files_seed):
    b = pickled_build
    assert "converting the pickled weights of SmolLM2-135M-Instruct to safetensors (once)" in b["proc"].stderr
    # The conversion's memory, predicted before it ran and measured: the prediction is not below the peak.
    m = re.search(r"peak memory ([\d.]+ [KMG]B) \(predicted ([\d.]+ [KMG]B)\)", b["proc"].stderr)
    assert m, b["proc"].stderr[-3000:]
    measured, predicted = parse_bytes(m[1].replace(" ", "")), parse_bytes(m[2].replace(" ", ""))
    assert 0 < measured <= predicted < measured * 1.5, m[0]
    assert _listing(b["src"]) == b["before"]  # the user's folder as it was: nothing added, nothing touched
    converted = b["converted"]
    assert converted.parent == cache_dir() / "pickled"
    # As save_pretrained stores a tied model: the embedding once, the tied head left for from_pretrained to tie.
    assert sorted(p.name for p in converted.iterdir()) == sorted(
        ["model.safetensors"] + [n for n in b["before"] if n != "pytorch_model.bin"])
    _assert_same_tensors(load_file(converted / "model.safetensors"), load_file(sample_model / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (converted / name).read_bytes() == (sample_model / name).read_bytes()
    # The same GGUF files as a build from the safetensors sample: every tensor's name, type, shape and bytes.
    for variant in ("F16", "Q8_0"):
        ours = GGUFReader(b["out"] / f"SmolLM2-135M-Instruct-{variant}.gguf").tensors
        theirs = GGUFReader(files_seed / f"SmolLM2-135M-Instruct-{variant}.gguf").tensors
        assert len(ours) == len(theirs) > 200
        for a, t in zip(ours, theirs):
            assert (a.name, a.tensor_type, list(a.shape)) == (t.name, t.tensor_type, list(t.shape))
            assert a.data.tobytes() == t.data.tobytes(), a.name
    report = json.loads((b["out"] / "report.json").read_text())
    assert report["source"]["converted"] == "weights converted from pickled .bin with torch.load(weights_only=True)"


def test_the_copy_is_made_once(pickled_build, made):
    b = pickled_build
    weights = b["converted"] / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    proc = run_cli("plan", b["src"], "--allow-pickle", "--profile", PROFILES / "files.yaml", check=True)
    assert _converted(proc, made) == b["converted"]
    assert "converting the pickled weights" not in proc.stderr
    assert weights.stat().st_mtime_ns == stamp


def test_sharded_pickles_with_shared_storage(sample_model, tmp_path, made):
    state = _state_dict(sample_model)
    original = load_file(sample_model / "model.safetensors")
    # Two views of one storage that are not a tie (a fused projection split in two): safetensors refuses shared
    # storage, so each must come out as a tensor of its own, equal to the view.
    q, k = "model.layers.29.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight"
    fused = torch.cat([state[q], state[k]])
    state[q], state[k] = fused[: len(state[q])], fused[len(state[q]):]
    assert state[q].untyped_storage().data_ptr() == state[k].untyped_storage().data_ptr()
    names = list(state)
    first = [n for n in names if ".layers." not in n or int(n.split(".")[2]) < 15]
    second = [n for n in names if n not in first]
    assert TIED[0] in first and TIED[1] in first and q in second
    src = _pickled_copy(sample_model, tmp_path / "sharded")
    files = {"pytorch_model-00001-of-00002.bin": first, "pytorch_model-00002-of-00002.bin": second}
    for file, keys in files.items():
        torch.save({n: state[n] for n in keys}, src / file)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, keys in files.items() for n in keys}}))
    proc = run_cli("plan", src, "--allow-pickle", "--profile", PROFILES / "files.yaml", check=True)
    converted = _converted(proc, made)
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(set(index["weight_map"].values())) == shards
    tensors = {}
    for shard in shards:
        part = load_file(converted / shard)
        assert all(index["weight_map"][n] == shard for n in part)
        tensors |= part
    _assert_same_tensors(tensors, original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert not list(converted.glob("*.bin")) and not (converted / "pytorch_model.bin.index.json").exists()
    # transformers reads every weight of the copy and ties the head back, as it does for save_pretrained's output.
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(model.lm_head.weight, original[TIED[1]])


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(sample_model, tmp_path):
    src = _pickled_copy(sample_model, tmp_path / "evil")
    marker = tmp_path / "ran"
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": _RunsCode(marker)}, src / "pytorch_model.bin")
    proc = run_cli("plan", src, "--allow-pickle", "--profile", PROFILES / "files.yaml")
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith(("error:", "  fix:"))]
    assert len(lines) == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("error: pytorch_model.bin is not plain tensors, and torch.load(weights_only=True) "
                               "refuses it"), lines[0]
    assert "safetensors release" in lines[1]
    assert not marker.exists()
    assert not list((cache_dir() / "pickled").glob("*.partial"))


def test_a_conversion_that_cannot_fit_is_refused_before_it_runs(sample_model, tmp_path):
    src = _pickled_copy(sample_model, tmp_path / "small-machine")
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, src / "pytorch_model.bin")
    proc = run_cli("plan", src, "--allow-pickle", "--profile", PROFILES / "files.yaml", env={"QUANTKIT_MEMORY": "500M"})
    assert proc.returncode == 5, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith(("error:", "  fix:"))]
    assert len(lines) == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("error: converting the pickled weights of small-machine needs about 1.0 GB of memory "), lines[0]
    assert "this machine has 500.0 MB" in lines[0] and "safetensors release" in lines[1]
    assert "converting the pickled weights" not in proc.stderr.replace(lines[0], "")  # it never started


def test_the_predicted_conversion_memory_follows_the_shard_format(tmp_path):
    """torch.load maps a zip-format shard (the kernel may drop its pages), and reads a legacy one into memory."""
    state = {"w": torch.zeros(256, 1024)}
    torch.save(state, tmp_path / "zip.bin")
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    zipped, legacy = conversion_memory([tmp_path / "zip.bin"]), conversion_memory([tmp_path / "legacy.bin"])
    size, legacy_size = (tmp_path / "zip.bin").stat().st_size, (tmp_path / "legacy.bin").stat().st_size
    # safetensors before 0.8 copies the shard into bytes to save it; 0.8 writes from the tensors.
    copies = int(safetensors.__version__.split(".")[1]) < 8 and safetensors.__version__.startswith("0.")
    assert zipped.mapped_bytes == size and zipped.anonymous_bytes == CONVERT_FIXED + copies * size
    assert legacy.mapped_bytes == 0 and legacy.anonymous_bytes == CONVERT_FIXED + (1 + copies) * legacy_size
    # Of several shards, the one that needs the most decides.
    assert conversion_memory([tmp_path / "zip.bin", tmp_path / "legacy.bin"]) == legacy


def test_a_new_copy_replaces_older_copies_of_its_source_except_those_in_use(tmp_path):
    """Two snapshots of one Hub repo are versions of one source; another folder is another source. A copy that a
    running process holds is kept, and goes at the next conversion once that process has ended."""
    root = tmp_path / "pickled"
    hub = tmp_path / "hub" / "models--alice--m" / "snapshots"
    old, held, new = (_origin(hub / c) for c in ("a" * 40, "b" * 40, "c" * 40))
    assert old == held == new == str(hub.parent) != _origin(tmp_path / "elsewhere")
    for name in ("old", "held", "other", "new"):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"x")
    (root / ORIGINS).write_text(json.dumps({"old": old, "held": held, "other": _origin(tmp_path / "elsewhere")}))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from quantkit.pickled import _hold; assert _hold(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(root / "held")],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _retire_older(root, root / "new", new)
        assert sorted(p.name for p in root.iterdir()) == ["held", "new", "origins.json", "other"]
        assert json.loads((root / ORIGINS).read_text()) == {"held": held, "other": _origin(tmp_path / "elsewhere"),
                                                              "new": new}
    finally:
        holder.kill()
        holder.wait()
    _retire_older(root, root / "new", new)
    assert sorted(p.name for p in root.iterdir()) == ["new", "origins.json", "other"]


def test_pickles_outside_transformers_layout_are_refused(sample_model, tmp_path):
    src = _pickled_copy(sample_model, tmp_path / "other")
    torch.save({"w": torch.zeros(2)}, src / "consolidated.00.pth")
    proc = run_cli("plan", src, "--allow-pickle", "--profile", PROFILES / "files.yaml")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "error: other has pickle files but neither pytorch_model.bin nor pytorch_model.bin.index.json" in proc.stderr


def test_a_hub_download_fetches_the_pickled_weights_only_where_needed(sample_model, hub, tmp_path, made):
    """--allow-pickle fetches transformers' pickled weights (not training_args.bin and the like), and none of them
    from a repo that has safetensors too."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    src = _pickled_copy(sample_model, tmp_path / "pickled")
    torch.save(_state_dict(sample_model), src / "pytorch_model.bin")
    torch.save({"lr": torch.tensor(0.1)}, src / "training_args.bin")
    api.create_repo("alice/pickled")
    api.upload_folder(repo_id="alice/pickled", folder_path=src)
    both = tmp_path / "both"
    shutil.copytree(sample_model, both)
    shutil.copy(src / "pytorch_model.bin", both / "pytorch_model.bin")
    api.create_repo("alice/both")
    api.upload_folder(repo_id="alice/both", folder_path=both)

    since = len(hub.requests)
    proc = run_cli("plan", "alice/pickled", "--allow-pickle", "--profile", PROFILES / "files.yaml", env=hub.env,
                   check=True)
    converted = _converted(proc, made)
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests[since:] if r.method == "GET" and "/resolve/" in r.path}
    assert "pytorch_model.bin" in fetched and "training_args.bin" not in fetched
    _assert_same_tensors(load_file(converted / "model.safetensors"), load_file(sample_model / "model.safetensors"))

    since = len(hub.requests)
    proc = run_cli("plan", "alice/both", "--allow-pickle", "--profile", PROFILES / "files.yaml", env=hub.env,
                   check=True)
    assert "weights converted" not in proc.stdout + proc.stderr
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests[since:] if r.method == "GET" and "/resolve/" in r.path}
    assert "model.safetensors" in fetched and not any(f.endswith(".bin") for f in fetched)
