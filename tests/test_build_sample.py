"""End to end on the real sample model with real llama.cpp: files, reports, quality numbers, resume."""

import json

import numpy as np

from conftest import PROFILES, run_cli

TYPES = ["F16", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]


def test_all_artifacts_and_both_reports(sample_build):
    folder = sample_build["dir"]
    names = sorted(p.name for p in folder.glob("*.gguf"))
    assert names == sorted(f"SmolLM2-135M-Instruct-{t}.gguf" for t in TYPES)
    report = sample_build["report"]
    assert [a["variant"] for a in report["artifacts"]] == TYPES
    md = (folder / "report.md").read_text()
    for a in report["artifacts"]:
        ev = a["evaluation"]
        assert a["size_bytes"] == (folder / a["filename"]).stat().st_size
        assert 1 < ev["perplexity"] < 1000
        assert 0 <= ev["kld_mean"] and 0 < ev["top1_agreement"] <= 1
        assert ev["smoke_reply"]
        assert a["filename"] in md
    assert not any(folder.glob("*.partial"))


def test_every_file_passes_the_llama_server_checks(sample_build):
    """Each GGUF in llama-server (the same llama.cpp): the four conversations render byte for byte as the source's
    transformers rendering, and the tool call is parsed. The sample's template has no tool-call format (it renders
    no tools), so llama-server's parser hands the call back as plain text: "no", reported, not failed."""
    folder = sample_build["dir"]
    md = (folder / "report.md").read_text()
    for a in sample_build["report"]["artifacts"]:
        engine = a["engine"]
        assert engine["engine"].startswith("llama-server ") and engine["template"] == [], (a["variant"], engine)
        assert engine["tool_calls"] is False and engine["tool_call_detail"].startswith(
            'no tool_calls; the turn came back as content \'<tool_call>\\n{"name": "get_weather"'), engine
        assert 0 < engine["seconds"] < 30 and not a["integrity"]
        assert f"- **{a['variant']}**: template renders like the source; parses tool calls: no" in md
        assert f"| {a['filename']} | {a['variant']} |" in md
    assert md.count("| template ok, tool calls: no |") == len(TYPES)


def test_quality_orders_sensibly(sample_build):
    by = {a["variant"]: a for a in sample_build["report"]["artifacts"]}
    # The reference is the fp16 source run by transformers; llama.cpp's F16 file computes the same model.
    assert by["F16"]["evaluation"]["kld_mean"] < 0.001
    assert by["F16"]["evaluation"]["kld_mean"] < by["Q8_0"]["evaluation"]["kld_mean"]
    # Fewer bits lose more of the reference's distribution.
    assert by["Q8_0"]["evaluation"]["kld_mean"] < by["Q4_K_M"]["evaluation"]["kld_mean"] < by["Q2_K"]["evaluation"]["kld_mean"]
    assert by["Q8_0"]["evaluation"]["top1_agreement"] > by["Q2_K"]["evaluation"]["top1_agreement"]
    assert by["Q8_0"]["size_bytes"] < by["F16"]["size_bytes"] / 1.8
    assert by["Q2_K"]["bits_per_weight"] < by["Q4_K_M"]["bits_per_weight"] < by["Q8_0"]["bits_per_weight"]


def test_reference_and_q8_pass_the_chatml_smoke_test(sample_build):
    by = {a["variant"]: a["evaluation"] for a in sample_build["report"]["artifacts"]}
    for variant in ("F16", "Q8_0"):
        assert by[variant]["smoke_passed"], by[variant]
        assert "Paris" in by[variant]["smoke_reply"]
        assert "<|im_end|>" in by[variant]["smoke_reason"]


def test_576_wide_rows_fall_back_and_the_report_says_so(sample_build):
    by = {a["variant"]: a for a in sample_build["report"]["artifacts"]}
    q4 = by["Q4_K_M"]
    assert q4["fallbacks"], "SmolLM2's 576-wide rows cannot hold 256-value k-quant blocks"
    assert {f["ncols"] for f in q4["fallbacks"]} == {"576"}
    assert all(f["wanted"] in ("q4_K", "q6_K") for f in q4["fallbacks"])
    assert "Q5_0" in q4["tensor_types"]  # where the q4_K tensors went
    assert by["Q8_0"]["fallbacks"] == []
    assert "576" in (sample_build["dir"] / "report.md").read_text()


def test_every_file_loads_and_generates_in_llama_cpp_python(sample_build):
    from llama_cpp import Llama

    for path in sorted(sample_build["dir"].glob("*.gguf")):
        llm = Llama(model_path=str(path), n_ctx=128, verbose=False)
        out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0)
        assert out["choices"][0]["text"].strip(), path.name
        del llm


def test_perplexity_matches_an_independent_llama_cpp_computation(sample_build):
    """Recompute PPL straight from llama-cpp-python logits, without quantkit's scoring code."""
    from llama_cpp import Llama

    folder = sample_build["dir"]
    tokens = np.load(folder / ".quantkit" / "eval-tokens.npy")
    ctx = sample_build["report"]["evaluation"]["window"]
    for variant in ("Q4_K_M", "F16"):
        llm = Llama(model_path=str(folder / f"SmolLM2-135M-Instruct-{variant}.gguf"), n_ctx=ctx, n_batch=ctx,
                    logits_all=True, verbose=False)
        nll, count = 0.0, 0
        for start in range(0, len(tokens) - ctx + 1, ctx):
            window = tokens[start:start + ctx].tolist()
            llm.reset()
            llm.eval(window)
            logits = np.array(llm.scores[:ctx], dtype=np.float64)
            for pos in range(ctx // 2, ctx - 1):
                row = logits[pos]
                nll -= row[window[pos + 1]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
                count += 1
        independent = float(np.exp(nll / count))
        reported = next(a for a in sample_build["report"]["artifacts"] if a["variant"] == variant)["evaluation"]
        assert reported["tokens_scored"] == count
        assert abs(reported["perplexity"] / independent - 1) < 0.005, (variant, reported["perplexity"], independent)


def test_second_identical_build_rebuilds_nothing(sample_build, sample_model):
    folder = sample_build["dir"]
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("*.gguf")}
    proc = run_cli("build", sample_model, "--profile", PROFILES / "fast.yaml", "--out", sample_build["out"], check=True)
    assert "built 0, evaluated 0" in proc.stdout
    assert "in llama-server" not in proc.stderr + proc.stdout  # its verdicts are kept, as the files are
    assert before == {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("*.gguf")}
    assert json.loads((folder / "report.json").read_text())["artifacts"] == sample_build["report"]["artifacts"]


def test_every_step_records_its_planned_and_measured_memory(sample_build):
    report = sample_build["report"]
    ref = report["evaluation"]["reference_result"]
    steps = [("reference", ref)] + [(a["filename"], a) for a in report["artifacts"]] + \
        [(f"evaluate {a['filename']}", a["evaluation"]) for a in report["artifacts"]]
    for name, step in steps:
        planned, measured = step["predicted_peak_bytes"], step["peak_rss_bytes"]
        assert planned > 0 and measured > 0 and step["seconds"] > 0, name
        # The estimates are fitted at 135M, 3B and 7B (docs/benchmarks.md): within these bounds at 135M.
        assert 0.6 * planned < measured < 1.25 * planned, (name, planned, measured)
        # The same peak split into anonymous and file-backed pages (sampled, each its own peak): each at most
        # the whole, together about it.
        anon, mapped = step["peak_anon_bytes"], step["peak_file_bytes"]
        assert 0 < anon <= 1.01 * measured and 0 < mapped <= 1.01 * measured, (name, anon, mapped, measured)
        assert anon + mapped > 0.8 * measured, (name, anon, mapped, measured)
    md = (sample_build["dir"] / "report.md").read_text()
    assert "| Evaluation of | Planned peak memory | Peak memory (measured) | Anonymous / file-backed | Time |" in md
    assert "| reference (fp16 source) |" in md


def test_llama_cpp_reproduces_the_fp16_source(sample_build):
    [parity] = sample_build["report"]["parity"]
    assert parity["runtime"] == "llama.cpp, F16 GGUF" and parity["passed"]
    assert parity["kld_mean"] < 0.001 and parity["top1_agreement"] > 0.99
    assert "## Parity with the fp16 source" in (sample_build["dir"] / "report.md").read_text()
