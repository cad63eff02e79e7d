"""Release gates on the real sample: chat-template and stop-token integrity of real files (edited with
llama.cpp's own gguf-py scripts), tool-call and JSON-mode verdicts, quality bounds that fail a build with exit 7,
and a publish that refuses such a build."""

import json
import os
import shutil
import subprocess
import sys

import yaml

from conftest import PROFILES, run_cli, seed
from quantkit.build import make_plan, run_build
from quantkit.errors import QualityGateFailed
from quantkit.gates import bound_failures, parse_bounds
from quantkit.results import Judged
from quantkit.evaluate.integrity import folder_facts, mismatches
from quantkit.formats.gguf.chat_facts import gguf_facts
from quantkit.formats.gguf.llamacpp import find_tree
from quantkit.profiles import load_profile

# A ChatML template that forgets the newline after each turn's end: the kind of edit that breaks a quant silently.
BROKEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _gguf_script(name: str, *args) -> None:
    gguf_py = find_tree().root / "gguf-py"
    subprocess.run([sys.executable, gguf_py / "gguf" / "scripts" / name, *map(str, args)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(gguf_py)})


def test_a_changed_template_and_a_changed_eos_are_caught_and_named(sample_build, sample_model, tmp_path):
    source = folder_facts(sample_model)
    q8 = sample_build["dir"] / "SmolLM2-135M-Instruct-Q8_0.gguf"
    assert mismatches(source, gguf_facts(q8)) == []  # the build's own file agrees with its source

    template = tmp_path / "template.gguf"
    _gguf_script("gguf_new_metadata.py", "--force", "--chat-template", BROKEN_TEMPLATE, q8, template)
    [m] = mismatches(source, gguf_facts(template))
    assert m.field == "chat template" and "4 of 4 conversations" in m.render()

    eos = tmp_path / "eos.gguf"
    shutil.copy(sample_build["dir"] / "SmolLM2-135M-Instruct-Q4_K_M.gguf", eos)
    _gguf_script("gguf_set_metadata.py", "--force", eos, "tokenizer.ggml.eos_token_id", "0")
    [m] = mismatches(source, gguf_facts(eos))
    assert m.render() == "EOS token: 0 (<|endoftext|>), the source has 2 (<|im_end|>)"

    # A folder format (GPTQ, AWQ, EXL2) is read from its tokenizer files, as transformers reads them.
    folder = tmp_path / "folder"
    shutil.copytree(sample_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(gen | {"eos_token_id": 0}))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg | {"eos_token": "<|endoftext|>"}))
    fields = {m.field: m.render() for m in mismatches(source, folder_facts(folder))}
    assert set(fields) == {"EOS token", "end of turn"}, fields
    assert fields["end of turn"] == ("end of turn: <|im_end|> does not end generation, the source has <|im_end|> as an "
                                     "end-of-generation token")


def test_every_artifact_carries_its_chat_verdicts(sample_build):
    report = sample_build["report"]
    source = report["evaluation"]["reference_result"]["probes"]
    assert set(source) == {"tool_call", "json_mode"} and all(r["agrees"] is None for r in source.values())
    md = (sample_build["dir"] / "report.md").read_text()
    assert "fp16 source, Tool call:" in md and "fp16 source, JSON mode:" in md
    for a in report["artifacts"]:
        assert a["integrity"] == [] and a["failures"] == [], a["filename"]
        probes = a["evaluation"]["probes"]
        for name, r in probes.items():
            assert r["reply"] and isinstance(r["agrees"], bool), (a["filename"], name)
            assert r["agreement"] in {"same as the source", "differs from the source", "none parsed, like the source",
                                      "parsed where the source did not"}
            if r["valid"]:
                assert r["parsed"] and r["error"] == ""
        assert f"- **{a['variant']}**: template and stop tokens match" in md
    # llama.cpp's F16 file computes what transformers computes: same greedy replies.
    f16 = next(a for a in report["artifacts"] if a["variant"] == "F16")["evaluation"]["probes"]
    assert all(r["agrees"] for r in f16.values()), f16


def test_the_sample_profiles_ship_bounds_the_sample_passes(sample_build):
    fast, sample = load_profile(str(PROFILES / "fast.yaml")), load_profile("sample")
    assert fast.bounds == sample.bounds == load_profile("gguf-standard").bounds
    for a in sample_build["report"]["artifacts"]:  # every file of the ladder is held to a bound with a KLD limit
        assert any(b.matches(Judged.from_dict(a)) and b.max_kld is not None for b in sample.bounds), a["variant"]
    assert all(not a["failures"] for a in sample_build["report"]["artifacts"])
    assert len(sample_build["report"]["bounds"]) == len(sample.bounds)


def test_a_strict_bound_fails_the_build_and_publish_refuses_it(sample_model, files_seed, tmp_path):
    profile = yaml.safe_load((PROFILES / "tiny.yaml").read_text())
    profile["evaluation"] |= {"max_tokens": 4096, "precision": "KLD ±10% at 95%"}
    profile["bounds"] = [{"variants": ["Q8_0"], "max_kld": 0.0001}]
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(profile))
    seed(files_seed, tmp_path / "out")
    proc = run_cli("build", sample_model, "--profile", tmp_path / "strict.yaml", "--out", tmp_path / "out")
    assert proc.returncode == 7, proc.stderr[-2000:]
    assert "1 artifact(s) failed their checks: Q8_0" in proc.stderr and "--allow-failed" in proc.stderr
    folder = tmp_path / "out" / sample_model.name
    # From Python, the build returns its result (resumed: nothing is built or scored again), failures and all.
    result = run_build(make_plan(sample_model, str(tmp_path / "strict.yaml"), tmp_path / "out"))
    assert [r.variant for r in result.failed] == ["Q8_0"] and result.failed[0].failures[0].startswith("KLD ")
    assert result.built == [] and result.evaluated == []
    assert isinstance(result.error(), QualityGateFailed) and result.error().exit_code == 7
    report = json.loads((folder / "report.json").read_text())
    by = {a["variant"]: a for a in report["artifacts"]}
    assert by["F16"]["failures"] == []
    [failure] = by["Q8_0"]["failures"]
    assert failure.startswith("KLD ") and "(bound ≤ 0.0001; Q8_0: KLD ≤ 0.0001)" in failure
    assert "## Failed checks" in (folder / "report.md").read_text()
    # The precision target stopped each file early, at the precision it asked for.
    for a in report["artifacts"]:
        e = a["evaluation"]
        assert e["windows"] < 16 and e["tokens_scored"] == e["windows"] * 127
        assert 1.96 * e["kld_se"] <= max(0.10 * e["kld_mean"], 1e-4)
    assert report["evaluation"]["precision"] == "KLD ±10% at 95%"

    refused = run_cli("publish", folder, "--dry-run", "--owner", "alice")
    assert refused.returncode == 8 and "failed their checks" in refused.stderr and "--allow-failed" in refused.stderr
    assert not (folder / "publish").exists()
    allowed = run_cli("publish", folder, "--dry-run", "--owner", "alice", "--allow-failed", check=True)
    assert "nothing was uploaded" in allowed.stdout
    card = (folder / "publish" / "gguf" / "README.md").read_text()
    assert "**FAILED CHECKS**: KLD" in card and "## Chat template, tool calls and JSON mode" in card


def test_a_bound_that_cannot_be_checked_fails_the_file_and_says_why(sample_model, files_seed, tiny_seed, sample_build,
                                                                    tmp_path):
    # Evaluation off: no number to hold to the bound, so the files fail (exit 7) rather than pass unmeasured.
    profile = tmp_path / "unmeasured.yaml"
    profile.write_text((PROFILES / "files.yaml").read_text() + "bounds:\n  - {variants: [Q8_0], max_kld: 0.01}\n")
    folder = seed(files_seed, tmp_path / "out")
    proc = run_cli("build", sample_model, "--profile", profile, "--out", tmp_path / "out")
    assert proc.returncode == 7, proc.stderr[-1500:]
    by = {a["variant"]: a for a in json.loads((folder / "report.json").read_text())["artifacts"]}
    assert by["F16"]["failures"] == []  # no bound names it
    [failure] = by["Q8_0"]["failures"]
    assert failure.startswith("not measured, so its bound cannot be checked (evaluation.enabled is false"), failure
    # A tool-call bound: held by a file whose probe ran (the ladder's Q8_0 calls the tool as the fp16 source does),
    # failed by the same file scored with the chat checks off (tests/profiles/tiny.yaml), saying why.
    [bound] = parse_bounds([{"variants": ["Q8_0"], "tool_calls": True, "min_top1": 0.5}], "bounds")
    probed, unprobed = (Judged.from_dict(next(a for a in json.loads((d / "report.json").read_text())["artifacts"]
                                              if a["variant"] == "Q8_0")) for d in (sample_build["dir"], tiny_seed))
    assert bound_failures(probed, (bound,)) == []
    [failure] = bound_failures(unprobed, (bound,))
    assert failure.startswith("tool call: no probe ran, so its bound cannot be checked (chat_checks are off"), failure


def test_bad_bounds_schemas_and_templates_fail_at_plan_time(sample_model, tmp_path):
    base = yaml.safe_load((PROFILES / "tiny.yaml").read_text())
    cases = {
        "bound": ({"bounds": [{"max_kld": "small"}]}, "bounds[0].max_kld must be a number, got 'small'"),
        "schema": ({"chat_checks": {"json_schema": {"type": "objekt"}}}, "chat_checks.json_schema is not a valid JSON Schema"),
        "tool": ({"chat_checks": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]}},
                 "chat_checks.tools[0].function.parameters is not a valid JSON Schema"),
        "precision": ({"evaluation": {"precision": "about 3%"}}, "is not a precision target"),
    }
    for name, (extra, message) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**base, **extra, "evaluation": {**base["evaluation"],
                                                                                            **extra.get("evaluation", {})}}))
        proc = run_cli("plan", sample_model, "--profile", tmp_path / f"{name}.yaml")
        assert proc.returncode == 4 and message in proc.stderr, (name, proc.stderr[-1500:])
    broken = tmp_path / "broken"
    shutil.copytree(sample_model, broken)
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}")
    proc = run_cli("plan", broken, "--profile", PROFILES / "tiny.yaml")
    assert proc.returncode == 3 and "chat template fails to render" in proc.stderr, proc.stderr[-1500:]
