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
