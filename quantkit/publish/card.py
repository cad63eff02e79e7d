"""The model card of a quant repo, generated from a build's report."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from .. import __version__
from ..report import BITS_LEGEND, PM_LEGEND, artifact_table, chat_lines, imatrix_lines, models

PLOT = "size-vs-kld.png"

# What each llama.cpp type is for, as quant repos usually say it.
USE_HINTS = {
    "F32": "full precision; only for further conversion",
    "F16": "full quality reference; the largest file",
    "BF16": "full quality reference; the largest file",
    "Q8_0": "near-lossless; when memory allows",
    "Q6_K": "very close to the reference",
    "Q5_K_M": "high quality; recommended when it fits",
    "Q5_K_S": "high quality, a little smaller",
    "Q4_K_M": "the usual default: good quality for its size",
    "Q4_K_S": "a little smaller than Q4_K_M, a little worse",
    "IQ4_XS": "4-bit quality at a smaller size",
    "IQ4_NL": "4-bit; for runtimes without k-quant support",
    "IQ3_M": "small; better than Q3_K at its size with an imatrix",
    "IQ3_XXS": "very small; needs the imatrix it was made with to be good",
    "IQ2_M": "tiny; large quality loss",
    "Q3_K_L": "small; noticeable quality loss",
    "Q3_K_M": "small; noticeable quality loss",
    "Q3_K_S": "very small; large quality loss",
    "Q2_K": "smallest; large quality loss, for very constrained devices",
}


def use_hint(variant: str, bpw: float) -> str:
    return USE_HINTS.get(variant) or ("low-bit; check the KL-divergence before use" if bpw < 4 else "")


FORMATS = {"gguf": "GGUF", "gptq": "GPTQ", "awq": "AWQ", "exl2": "exl2"}
RUNTIMES = {
    "gguf": "They load in llama.cpp, LM Studio, Ollama and anything else built on llama.cpp.",
    "gptq": "They load in transformers (with optimum and GPTQModel installed), vLLM and exllama.",
    "awq": "They load in transformers (with GPTQModel installed) and vLLM.",
    "exl2": "They load in exllamav2 and TabbyAPI.",
}


def model_card(report: dict, repo_id: str, backend: str) -> ModelCard:
    """The card of one format's repo. GGUF variants are files on main; folder formats are one branch
    per variant, and main holds this card."""
    src = report["source"]
    fmt = FORMATS.get(backend, backend)
    base = src.get("base_model") or src.get("repo_id")
    data = ModelCardData(
        base_model=base,
        license=src.get("license"),
        pipeline_tag="text-generation",
        tags=[t for t in [backend, "quantized", "llama.cpp" if backend == "gguf" else "", "quantkit",
                          src.get("model_type") or ""] if t],
        base_model_relation="quantized" if base else None,
        quantized_by=report.get("quantized_by") or repo_id.split("/")[0],
    )
    model = report["model"]
    base_link = f"[{base}](https://huggingface.co/{base})" if base else f"`{model}`"
    ev = report["evaluation"]
    everything = report["artifacts"]
    arts = models(everything)
    folders = backend != "gguf"
    first = "branch" if folders else "file_link"
    rows = artifact_table(arts, [first, "type", "bpw", *(["stated"] if folders else []), "size", "ppl", "kld", "top1", "smoke",
                                 "tool", "json"],
                          extra=("Use case", lambda a: ("**FAILED CHECKS**: " + "; ".join(a["failures"])) if a.get("failures")
                                 else use_hint(a["variant"], a["bits_per_weight"]))) + ["", BITS_LEGEND + PM_LEGEND]
    fallbacks = [f"- {a['variant']}: {a['fallback_summary']}" for a in arts if a.get("fallback_summary")]
    pick = next((a for a in arts if a["variant"] in ("Q4_K_M", "4bit-g32", "4bit-g128", "4.0bpw-h6")), arts[-1])
    prompt = report.get("prompt_format")
    tool = ("llama.cpp's own converter and quantizer (llama-cpp-python " + report["llama_cpp_python"] + ")"
            if backend == "gguf" else "GPTQModel" if backend in ("gptq", "awq")
            else "exllamav2's converter" if backend == "exl2" else backend)
    sections = [
        f"# {model} {fmt}",
        "",
        f"{fmt} quantizations of {base_link}, made with quantkit {__version__} using {tool}. {RUNTIMES.get(backend, '')}",
        "",
        "## Prompt format",
        "",
        "Rendered from the model's own chat template:" if prompt else "The model has no chat template.",
        "",
        *(["```", prompt.rstrip("\n"), "```", ""] if prompt else []),
        "## Provided variants" if folders else "## Provided files",
        "",
        *(["Each variant is a branch of this repo; `main` holds only this card.", ""] if folders else []),
        *rows,
        "",
        f"Every variant was tested: perplexity on {ev['tokens']} tokens of `{ev['text']}` (ctx {ev['ctx']}), "
        f"KL-divergence and top-1 agreement against the {ev['reference']} on the same tokens, and a chat smoke test "
        f"({report['smoke']['question']!r} must be answered with {report['smoke']['expect']!r} and the turn must end).",
        "",
        f"![size vs KL-divergence]({PLOT})",
        "",
        *(["## Chat template, tool calls and JSON mode", "", *chat_lines(report), ""] if ev.get("reference_result") else []),
        *[line for text in imatrix_lines(everything) for line in (text, "")],
    ]
    if fallbacks:
        sections += ["Some tensors could not take the asked k-quant type (their rows are not a multiple of 256 "
                     "values) and were stored in the nearest type that fits:", "", *fallbacks, ""]
    sections += ["## Download", "", "```bash"]
    if folders:
        sections += [f"hf download {repo_id} --revision {a['variant']} --local-dir {model}-{fmt}-{a['variant']}"
                     for a in arts]
    else:
        sections.append(f"hf download {repo_id} {pick['filename']} --local-dir .")
    sections += ["```", "", "## Run", ""]
    if backend == "exl2":
        sections += ["With TabbyAPI, put the downloaded folder in its `models/` folder; with exllamav2:", "",
                     "```python", "from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config", "",
                     f'config = ExLlamaV2Config("{model}-{fmt}-{pick["variant"]}")',
                     "model = ExLlamaV2(config)", "model.load_autosplit(ExLlamaV2Cache(model, lazy=True))", "```"]
    elif folders:
        sections += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                     f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", revision="{pick["variant"]}")',
                     f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", revision="{pick["variant"]}")', "```"]
    else:
        sections += ["```bash", f"llama-cli -m {pick['filename']} -cnv", "```"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections) + "\n")
