"""Flags that say what they do: quantkit never runs code from a model's repo, so a model that names such code
(auto_map) is refused with what to do instead, and there is no flag that asks for remote code."""

import json
import shutil

import pytest

from conftest import run_cli
from quantkit.errors import SourceError
from quantkit.source import resolve


def _with_auto_map(sample_model, dst, model_type=None):
    dst.mkdir()
    for p in sample_model.iterdir():
        (dst / p.name).symlink_to(p) if p.suffix == ".safetensors" else shutil.copy(p, dst / p.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    if model_type:
        cfg["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "modeling_x.py").write_text(f"open({str(dst / 'ran')!r}, 'w').close()\n")
    return dst


def test_an_auto_map_model_is_refused_with_what_to_do(sample_model, tmp_path):
    src = _with_auto_map(sample_model, tmp_path / "m", model_type="frobnicator")
    proc = run_cli("plan", src)
    assert proc.returncode == 3
    lines = [l for l in proc.stderr.splitlines() if l.startswith(("error:", "  fix:"))]
    assert lines == [
        "error: m names custom code from its repo (auto_map in config.json), and quantkit does not run a model's own code",
        "  fix: use a checkpoint whose architecture transformers supports natively (no auto_map in config.json)",
    ], proc.stderr
    assert not (src / "ran").exists()


def test_a_leftover_auto_map_on_a_native_model_type_says_so(sample_model, tmp_path):
    # Repos keep auto_map after transformers gained the architecture (the sample's is llama).
    src = _with_auto_map(sample_model, tmp_path / "m")
    with pytest.raises(SourceError) as e:
        resolve(str(src))
    assert "transformers supports model_type 'llama' natively" in e.value.hint
    assert "config.json has no auto_map" in e.value.hint


def test_the_remote_code_flag_is_gone(sample_model, tmp_path):
    # Not accepted and then ignored: the model would run without the code it was asked to run with.
    src = _with_auto_map(sample_model, tmp_path / "m")
    proc = run_cli("plan", src, "--trust-remote-code")
    assert proc.returncode == 2 and "No such option: --trust-remote-code" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (src / "ran").exists()
