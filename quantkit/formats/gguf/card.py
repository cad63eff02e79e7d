"""What GGUF cards and reports say beyond the common table: what each type is for, the importance matrix, the
tensors that fell back to other types and why a bigger file can measure worse."""

from __future__ import annotations

from collections import Counter
from shlex import quote

from ...fsutil import human_size
from ..base import Card
from ...report import public_text_name
from ...results import Built, Judged, Measured, ReportSource
from .imatrix import describe_idle

# What a report must know of the sample's weights: they sit on Q4_1's grid (docs/evaluation.md, Inversions).
SAMPLE_PROVENANCE = ("its fp16 weights were dequantized from a Q4_1 GGUF, so every block of 32 already sits on a "
                     "16-level grid; q5_1 (same blocks, same min and max, 31 steps) splits those levels unevenly and "
                     "stretches every block by about 2%, while q5_0's grid does not line up with them and its error "
                     "averages out. Q5_K_M with Q4_K_M's q5_0 tensors in place of its 166 q5_1 ones measured KLD "
                     "0.0533 against Q4_K_M's 0.0530: the q5_1 fallback is the whole gap")

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


def imatrix_lines(artifacts: list[Judged]) -> list[str]:
    """What the importance matrix is, how it was made, and which files used it."""
    lines = []
    for im in (a for a in artifacts if a.role == "imatrix"):
        d = im.details
        users = [a.variant for a in artifacts if im.filename in a.uses]
        lines.append(f"`{im.filename}` ({human_size(im.size_bytes)}) is the importance matrix, computed by "
                     f"llama.cpp's llama-imatrix on {d.get('chunks', '?')} chunks of {d.get('chunk_tokens', '?')} "
                     f"tokens of `{public_text_name(d.get('text', '?'))}` (calibration text, disjoint from the evaluation "
                     f"text). Quantized with it: {', '.join(users) or 'none'}; the others without."
                     + (f" Calibration routed no token to {describe_idle(idle)}: llama.cpp quantized those experts "
                        "without importance weights." if (idle := d.get("experts_without_data")) else ""))
    return lines


def intermediate_lines(artifacts: list[Judged]) -> list[str]:
    """Which 16-bit (or Q8_0) conversion each file was quantized from: a bf16 source kept as BF16 never passes
    through F16, whose range (±65504) bf16 weights and activations can exceed."""
    lines = []
    for inter in (a for a in artifacts if a.role == "intermediate"):
        users = [a.variant for a in artifacts if a.made_from == inter.filename]
        lines.append(f"`{inter.filename}` is llama.cpp's conversion of the source checkpoint (convert_hf_to_gguf.py, "
                     f"{inter.variant}); every other file was quantized from it: {', '.join(users) or 'none'}."
                     + (" BF16 keeps the source's bfloat16 weights exactly." if inter.variant == "BF16" else ""))
    return lines


class GGUFCard(Card):
    def label(self, variant: str) -> str:
        return variant  # the type names the format: Q4_K_M

    def made_by(self, tools: dict[str, str]) -> str:
        version = tools.get("llama-cpp-python")
        return "llama.cpp's own converter and quantizer" + (f" (llama-cpp-python {version})" if version else "")

    def use_hint(self, variant: str, bits_per_weight: float) -> str:
        return USE_HINTS.get(variant) or super().use_hint(variant, bits_per_weight)

    def file_note(self, artifact: Judged) -> str:
        shards = artifact.details.get("shards")
        return (f"split in {len(shards)} files: llama.cpp and LM Studio load it from the first; Ollama cannot "
                "(ollama#5245)") if shards else ""

    def usage(self, repo_id: str, local_dir: str, artifact: Judged) -> list[str]:
        """llama.cpp on the downloaded file, Ollama and LM Studio from the Hub. Ollama pulls `hf.co/REPO:TAG` by
        finding TAG in a file name (hence `<Model>-<QUANT>.gguf`), and cannot pull a split file."""
        shards = artifact.details.get("shards")
        model = f"{artifact.filename}/{shards[0]}" if shards else artifact.filename
        lines = ["```bash", f"llama-cli -m {quote(model)} -cnv    # llama.cpp, on the downloaded file"]
        if shards:
            lines.append(f"# Ollama cannot pull a split file (ollama#5245): merge it first, then import it\n"
                         f"llama-gguf-split --merge {quote(model)} {quote(artifact.filename + '.gguf')}")
        else:
            lines.append(f"ollama run hf.co/{repo_id}:{quote(artifact.variant)}    # Ollama, from the Hub")
        lines += [f"lms get {repo_id}    # LM Studio's CLI: choose {artifact.variant}", "```"]
        return lines

    def notes(self, artifacts: list[Judged]) -> dict[str, list[str]]:
        sections = {"Intermediate": intermediate_lines(artifacts), "Importance matrix": imatrix_lines(artifacts),
                    "Tensors in other types": self._fallback_lines(artifacts)}
        return {title: lines for title, lines in sections.items() if lines}

    def fallback_summary(self, artifact: Built) -> str:
        """'180 tensors: q4_K→q5_0 ×150, q6_K→q8_0 ×30 (rows of 576 are not a multiple of 256)'."""
        fallbacks = artifact.fallbacks
        if not fallbacks:
            return ""
        moves = Counter(f"{f['wanted']}→{f['used']}" for f in fallbacks)
        cols = sorted({int(f["ncols"]) for f in fallbacks})
        blocks = sorted({int(f["block"]) for f in fallbacks})
        return (f"{len(fallbacks)} tensors: " + ", ".join(f"{k} ×{v}" for k, v in moves.most_common())
                + f" (rows of {', '.join(map(str, cols))} are not a multiple of {', '.join(map(str, blocks))})")

    def _fallback_lines(self, artifacts: list[Judged]) -> list[str]:
        """The report's and the card's paragraph on fallbacks, with one line per file that had any."""
        found = [(a.variant, s) for a in artifacts if (s := self.fallback_summary(a))]
        if not found:
            return []
        return ["Some tensors could not take the asked type, because k-quants and i-quants pack rows in blocks of 256 "
                "values; llama.cpp stored them in the nearest type that fits:\n\n"
                + "\n".join(f"- **{variant}**: {summary}" for variant, summary in found)]

    def explain_inversion(self, big: Measured, small: Measured, source: ReportSource) -> str:
        """What the fallbacks show: llama.cpp stored k-quant tensors whose rows are not a multiple of 256 in legacy
        types, quantized with no error search, so the fallback types (not the names) decide the quality."""
        moves = lambda a: sorted({f"{f['wanted']}→{f['used']}" for f in a.fallbacks})  # noqa: E731
        if not (mb := moves(big)) or not (ms := moves(small)):
            return ""
        why = f": {SAMPLE_PROVENANCE}." if source.sample and any("q5_1" in m for m in mb) \
            else " (docs/evaluation.md, Inversions)."
        return (f"Both fell back from k-quants (rows not a multiple of 256): {big.variant} {', '.join(mb)}; "
                f"{small.variant} {', '.join(ms)}. The fallback types decide the quality here, not the names" + why)

