"""What a task of a `--store` build is given (quantkit/cluster/stored.py), pickled as Ray pickles it: references,
never a path of the driver's. The builds on a cluster whose nodes share no filesystem are in tests/test_jobs.py
(tests/unshared.py: nodes in unshare --mount namespaces)."""

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import seed

pytest.importorskip("ray")
NAME = "SmolLM2-135M-Instruct"


def test_no_task_argument_names_a_path_of_the_driver(tiny_seed, tmp_path):
    """What the store-mode executor gives its tasks, pickled as Ray pickles them: the driver's folders appear
    nowhere (tasks get references; their nodes have none of those paths)."""
    from ray import cloudpickle  # what Ray pickles task arguments with

    from quantkit.cluster.executor import RayExecutor
    from quantkit.cluster.stored import SourceRef
    from quantkit.build import make_plan
    from quantkit.evaluate.protocol import EvalSpec
    from quantkit.executors import HelperRun
    from quantkit.formats import BuildContext
    from quantkit.manifest import Manifest
    from quantkit.sample import ensure_sample
    from quantkit.store import ArtifactStore

    folder = seed(tiny_seed, tmp_path / "out")
    source = tmp_path / "src" / NAME
    shutil.copytree(ensure_sample(), source)
    plan = make_plan(str(source), str(Path(__file__).parent / "profiles" / "tiny.yaml"), tmp_path / "out")
    manifest = Manifest(folder)
    executor = object.__new__(RayExecutor)  # its task arguments, without a cluster
    executor.store_url = f"file://{tempfile.mkdtemp(prefix='qkstore')}"  # the one path they share: not under tmp_path
    executor.store = ArtifactStore(executor.store_url)
    executor.manifest, executor._where = manifest, {}
    executor._source = SourceRef.of(plan.source, executor.store)
    tokens = folder / ".quantkit" / "eval-tokens.npy"
    context = BuildContext(source=plan.source, out_dir=folder, reporter=None, threads=2,
                           evaluation=EvalSpec(tokens=str(tokens), window=256))
    q8 = next(i for i in plan.artifacts if i.variant == "Q8_0")
    spec = folder / ".quantkit" / "eval-x.spec.json"
    spec.write_text(json.dumps(replace(EvalSpec(tokens=str(tokens), window=256),
                                       ref_read=str(folder / ".quantkit" / "reference-logprobs.npy")).to_json()))
    helper = HelperRun("evaluate Q8_0", ("-m", "quantkit.evaluate.hf_runner", "evaluate", str(folder / q8.filename),
                                         str(spec), str(folder / ".quantkit" / "eval-x.result.json")), folder / ".quantkit")
    pickled = cloudpickle.dumps(([q8], executor._recipe([q8], context))) + cloudpickle.dumps(executor._stored_eval(helper))
    # A Path pickles as its parts: the test's own folder name is in every path of the driver's here.
    assert tmp_path.name.encode() in cloudpickle.dumps(context.out_dir)
    assert tmp_path.name.encode() not in pickled
    shutil.rmtree(executor.store.root, ignore_errors=True)


def test_an_upload_hashes_through_the_builds_hash_cache(tmp_path):
    """A store upload (a local source with --store, an artifact built here) reads no file whose hash the build's
    cache holds for its size and mtime: a local Mixtral's 93 GB are hashed once, for the source's key."""
    from quantkit.fsutil import HashCache, sha256_file
    from quantkit.store import ArtifactStore

    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a" * 4096)
    (folder / "b.txt").write_text("b")
    hashes = HashCache(root=tmp_path / "build")
    first = ArtifactStore(f"file://{tmp_path / 'one'}").put(folder, hashes)
    real = sha256_file(folder / "a.bin")
    assert sorted(e[2] for e in hashes.entries.values()) == sorted([real, sha256_file(folder / "b.txt")])
    # What the cache says is what the upload names the object by: the file was not read again.
    next(e for e in hashes.entries.values() if e[2] == real)[2] = "0" * 64
    store = ArtifactStore(f"file://{tmp_path / 'two'}")
    second = store.put(folder, hashes)
    assert second.digest != first.digest and store.tree(second.digest)["files"][0]["sha256"] == "0" * 64
    # Without the cache the file is read: the real hash.
    assert ArtifactStore(f"file://{tmp_path / 'three'}").put(folder).digest == first.digest
