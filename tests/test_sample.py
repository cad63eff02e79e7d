"""The sample checkpoint, rebuilt offline: two processes that need it at once on a fresh machine both get it whole."""

import os
import shutil
import subprocess
import sys

from quantkit.paths import cache_dir
from quantkit.sample import NAME, SAMPLE_MARKER, ensure_sample


def test_two_processes_building_the_sample_at_once_both_get_it_whole(sample_model, tmp_path):
    cache = tmp_path / "cache"
    gguf = cache_dir() / "sdist" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ensure_sample()  # the session's sample, so that its GGUF is in the cache: no download here
    (cache / "sdist").mkdir(parents=True)
    shutil.copy(gguf, cache / "sdist" / gguf.name)
    env = {**os.environ, "QUANTKIT_CACHE": str(cache)}
    code = "from quantkit.sample import ensure_sample; print(ensure_sample())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == str(cache / "models" / NAME)
    built = cache / "models" / NAME
    # Built once, by one of them (the other waited for it), with nothing left of the build but the sample's own files.
    assert sum("building the sample model" in out for out, _ in outs) == 1
    assert sorted(p.name for p in built.iterdir()) == sorted(p.name for p in sample_model.iterdir())
    assert (built / SAMPLE_MARKER).read_text() == (sample_model / SAMPLE_MARKER).read_text()
    assert sorted(p.name for p in (cache / "models").iterdir()) == [NAME, f"{NAME}.lock"]
