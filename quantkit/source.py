"""Resolve what the user asked to build into a local, checked Hugging Face checkpoint folder."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NoReturn

import yaml

from . import network, resumable
from .errors import SourceError
from .fsutil import write_text_atomic

# What a conversion needs from a repo: weights as safetensors, configs, tokenizer, chat template.
ALLOW_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "*.tiktoken", "README.md", "LICENSE*",
]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    path: Path  # local folder with config.json and weights
    name: str  # model name used in file names: "SmolLM2-135M-Instruct"
    repo_id: str | None = None  # set when downloaded from the Hub
    revision: str | None = None  # the resolved commit sha of a Hub download
    from_cache: str | None = None  # why the snapshot came from the Hugging Face cache without asking the Hub
    architecture: str = ""
    dtype: str = "float16"
    license: str | None = None
    base_model: str | None = None  # what the checkpoint's own card says it derives from
    chat_template: str | None = None
    converted: str | None = None  # how quantkit made the weights safetensors (pickled .bin: pickled.NOTE); None: as stored
    config: dict = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> str:
        if self.repo_id:
            cached = f" (from the Hugging Face cache: {self.from_cache})" if self.from_cache else ""
            # A converted download is read from quantkit's cache, not from the Hub's snapshot folder: say where.
            converted = f" ({self.converted}, read from {self.path})" if self.converted else ""
            return f"{self.repo_id}@{(self.revision or '')[:12]}{cached}{converted}"
        return f"{self.path} ({self.converted})" if self.converted else str(self.path)


def resolve(spec: str, *, revision: str | None = None, allow_pickle: bool = False, name: str | None = None,
            log: Callable[[str], None] | None = None) -> Source:
    """`spec` is a local folder or a Hub repo id ("ORG/MODEL"). `log` hears of retries, of a cached build and of a
    conversion of pickled weights. quantkit never runs a repo's own code (no trust_remote_code)."""
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise SourceError(f"{spec} is a file, not a checkpoint folder", "pass the folder that holds config.json")
        return inspect(local, allow_pickle=allow_pickle, name=name, log=log)
    if not _REPO_ID.match(spec):
        raise SourceError(f"{spec!r} is neither an existing folder nor a Hub repo id", "use ORG/MODEL or a path to a folder")
    folder, commit, cached = download(spec, revision=revision, allow_pickle=allow_pickle, log=log)
    if cached and log:
        log(f"using {spec}@{commit[:12]} from the Hugging Face cache: {cached}")
    src = inspect(folder, allow_pickle=allow_pickle, name=name or spec.split("/")[-1], log=log)
    return Source(**{**src.__dict__, "repo_id": spec, "revision": commit, "from_cache": cached})


def download(repo_id: str, *, revision: str | None = None, allow_pickle: bool = False,
             log: Callable[[str], None] | None = None) -> tuple[Path, str, str | None]:
    """The snapshot of `revision` (default: main) with the files a conversion needs, in the Hugging Face cache
    (HF_HUB_CACHE, shared with every tool that downloads models); HF_ENDPOINT and HF_TOKEN apply as usual.
    Returns the folder, its commit, and why it came from the cache without the Hub (None: the Hub answered).
    With HF_HUB_OFFLINE, or when the Hub cannot be reached, a cached snapshot is used (never a mix of two)."""
    from huggingface_hub import HfApi, snapshot_download

    from .pickled import DOWNLOAD_PATTERNS

    hub = network.endpoint()
    patterns = ALLOW_PATTERNS + (DOWNLOAD_PATTERNS if allow_pickle else [])
    if network.offline_mode():
        why = "HF_HUB_OFFLINE is set"
        return (*_cached(repo_id, revision, patterns, why), why)
    try:
        # Pin the commit first, so the files and the report's revision are the same snapshot.
        info = network.retrying(lambda: HfApi().model_info(repo_id, revision=revision, timeout=network.timeout_s()),
                                what=f"asking {hub} for {repo_id}", log=log)
        commit = info.sha
    except network.GaveUp as e:
        why = network.outage(e)
        return (*_cached(repo_id, revision, patterns, why), why)
    except Exception as e:
        _refuse(e, repo_id, revision)

    if allow_pickle and any(s.rfilename.endswith(".safetensors") for s in info.siblings or []):
        patterns = ALLOW_PATTERNS  # safetensors are there: the pickled copies would be GBs fetched for nothing

    def fetch() -> str:
        # Files already in the cache are not fetched again; a large file cut off mid-way resumes from its part.
        resumable.prefetch(repo_id, commit, patterns, _cache_folder(repo_id) / "blobs")
        return snapshot_download(repo_id, revision=commit, allow_patterns=patterns, etag_timeout=network.timeout_s())

    try:
        folder = network.retrying(fetch, what=f"downloading {repo_id}", log=log)
    except network.GaveUp as e:
        raise SourceError(f"the download of {repo_id} failed: {network.outage(e)}",
                          "run the same command again later: the download resumes where it stopped", retryable=True) from e
    except Exception as e:
        _refuse(e, repo_id, revision)
    _remember_ref(repo_id, revision, commit)
    return Path(folder), commit, None


def _refuse(e: Exception, repo_id: str, revision: str | None) -> NoReturn:
    """Raise what the Hub's answer means for the user, or `e` itself when it is not the Hub's."""
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    hub = network.endpoint()
    if isinstance(e, GatedRepoError):
        raise SourceError(f"{repo_id} is gated on {hub}", "accept its terms on the Hub, then set HF_TOKEN") from e
    if isinstance(e, RepositoryNotFoundError):
        raise SourceError(f"repo {repo_id} not found on {hub}",
                          "check the name; for a private repo set HF_TOKEN to a token that can read it") from e
    if isinstance(e, RevisionNotFoundError):
        raise SourceError(f"revision {revision!r} not found in {repo_id}", "pass an existing branch, tag or commit") from e
    if isinstance(e, (HfHubHTTPError, LocalEntryNotFoundError, OSError)):
        raise SourceError(f"cannot download {repo_id} from {hub}: {network.short(e)}",
                          "check the name, HF_ENDPOINT and HF_TOKEN, or build from a local folder") from e
    raise e


def _cache_folder(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


def _remember_ref(repo_id: str, revision: str | None, commit: str) -> None:
    """Record which commit a branch or tag named, in the cache's refs/ as huggingface_hub does, so that an offline
    build later finds it (downloading by commit, as quantkit does to pin a snapshot, records no ref)."""
    rev = revision or "main"
    if rev == commit:
        return
    try:
        write_text_atomic(_cache_folder(repo_id) / "refs" / rev, commit)  # no newline: the client reads it raw
    except OSError:
        pass  # best effort: a read-only cache still builds online


def _cached(repo_id: str, revision: str | None, patterns: list[str], why: str) -> tuple[Path, str]:
    """The cached snapshot of `revision` (a branch or tag through the cache's refs/, or a commit), refused unless
    complete by the file list cached with it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    rev = revision or "main"
    try:
        folder = Path(snapshot_download(repo_id, revision=rev, allow_patterns=patterns, local_files_only=True))
    except IncompleteSnapshotError as e:
        missing = re.search(r"is incomplete: (.*?)\. ", str(e))
        raise SourceError(f"{why}, and the cached snapshot of {repo_id} ({rev}) is incomplete"
                          + (f": {missing[1]}" if missing else ""),
                          "build once with the Hub reachable to finish the download (it resumes), "
                          "or build from a complete local folder", retryable=True) from e
    except LocalEntryNotFoundError as e:
        known = _cached_revisions(repo_id)
        raise SourceError(f"{why}, and {repo_id} ({rev}) is not in the Hugging Face cache"
                          + (f" (cached: {known})" if known else ""),
                          "build once with the Hub reachable (unset HF_HUB_OFFLINE), pass --revision with a cached "
                          "commit, or build from a local folder", retryable=not network.offline_mode()) from e
    return folder, folder.name


def _cached_revisions(repo_id: str) -> str:
    """What the cache holds of a repo, for the refusal: "main -> 1a2b3c4d5e6f, snapshot 7a8b...". """
    root = _cache_folder(repo_id)
    refs = {p.relative_to(root / "refs").as_posix(): p.read_text().strip()[:12]
            for p in sorted((root / "refs").rglob("*")) if p.is_file()}
    snaps = [p.name[:12] for p in sorted((root / "snapshots").glob("*")) if p.is_dir()]
    return ", ".join([f"{r} -> {c}" for r, c in refs.items()] + [f"snapshot {c}" for c in snaps if c not in refs.values()])


# Any of these makes a tokenizer transformers and llama.cpp's converter can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def inspect(folder: Path, *, allow_pickle: bool = False, name: str | None = None,
            log: Callable[[str], None] | None = None) -> Source:
    """The checked Source of a local checkpoint folder. With `allow_pickle`, a folder of pickled weights only is
    read through a safetensors copy in quantkit's cache (pickled.py); the folder itself is never written to."""
    folder = folder.resolve()
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"{folder} has no config.json", "pass the folder of a Hugging Face checkpoint (config.json + weights)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{cfg_path} is not valid JSON ({e.msg}, line {e.lineno})", "fix or re-download config.json") from e
    safetensors = list(folder.glob("*.safetensors"))
    pickles = [p for pat in PICKLE_PATTERNS for p in folder.glob(pat)]
    if not safetensors:
        if pickles and not allow_pickle:
            raise SourceError(
                f"{folder} has only pickle weights ({pickles[0].name}); loading them can run arbitrary code",
                "convert them to safetensors, or pass --allow-pickle if you trust this checkpoint (quantkit then "
                "converts a copy, with torch.load(weights_only=True))",
            )
        if not pickles:
            raise SourceError(f"{folder} has no weights (*.safetensors)", "download the weights too")
    if config.get("auto_map"):
        raise SourceError(f"{folder.name} names custom code from its repo (auto_map in config.json), and quantkit "
                          "does not run a model's own code", _remote_code_fix(str(config.get("model_type") or "")))
    archs = config.get("architectures") or []
    if not archs:
        raise SourceError(f"{cfg_path} names no architecture", "add \"architectures\" to config.json")
    for f in sorted(safetensors):
        check_safetensors(f)
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise SourceError(f"{folder.name} has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])})",
                          "download the tokenizer files of the model too")
    if not safetensors:  # pickled weights, allowed: everything else is checked before GBs are converted
        from .pickled import NOTE, converted_copy

        src = inspect(converted_copy(folder, log), name=name or _model_name(folder))
        return replace(src, converted=NOTE)
    return Source(
        path=folder,
        name=name or _model_name(folder),
        architecture=archs[0],
        dtype=str(config.get("torch_dtype") or config.get("dtype") or "float16"),
        license=_card_field(folder, "license"),
        base_model=_card_field(folder, "base_model"),
        chat_template=_chat_template(folder),
        config=config,
    )


def _remote_code_fix(model_type: str) -> str:
    """What to do about an auto_map model: transformers may know its model_type itself (repos keep auto_map after
    their architecture was added to transformers)."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        CONFIG_MAPPING_NAMES = {}
    if model_type in CONFIG_MAPPING_NAMES:
        return (f"transformers supports model_type {model_type!r} natively: build a copy of the folder whose "
                "config.json has no auto_map, or a checkpoint published without custom code")
    return "use a checkpoint whose architecture transformers supports natively (no auto_map in config.json)"


def _model_name(folder: Path) -> str:
    # Hub cache folders are models--ORG--NAME/snapshots/<commit>; the repo name is further up.
    name = folder.name
    if re.fullmatch(r"[0-9a-f]{40}", name) and folder.parent.name == "snapshots":
        name = folder.parent.parent.name.split("--")[-1]
    return name


def _card_field(folder: Path, key: str) -> str | None:
    """A string field of the model card's YAML header (the first entry, if it is a list)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    m = re.search(r"^---\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
    if not m:
        return None
    try:
        value = yaml.safe_load(m.group(1) or "").get(key)
    except (yaml.YAMLError, AttributeError):
        return None
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value) if value else None


def _chat_template(folder: Path) -> str | None:
    """The default chat template: chat_template.jinja (newer layout) or tokenizer_config.json's field."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text()).get("chat_template")
        except json.JSONDecodeError:
            return None
        if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, ...]
            value = next((t["template"] for t in value if t.get("name") == "default"), None)
        return value
    return None


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file: names, dtypes and shapes, without reading any weights."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def check_safetensors(path: Path) -> None:
    """A readable header, and a file long enough for every tensor it lists (downloads get cut short)."""
    size = path.stat().st_size
    try:
        if size < 8:
            raise ValueError("shorter than the 8-byte header length")
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:  # JSONDecodeError is a ValueError
        raise SourceError(f"{path.name} has a corrupt safetensors header ({str(e).splitlines()[0][:120]})",
                          "re-download the file") from e
    if size < 8 + n + end:
        raise SourceError(f"{path.name} is truncated: {size} bytes, its header needs {8 + n + end}",
                          "re-download the file (the download was cut short)")


@dataclass(frozen=True)
class TensorStats:
    """What the safetensors headers say of a checkpoint's size, without reading any weights."""

    params: int
    weight_bytes: int
    largest: int  # values of the largest tensor
    largest_module: int  # values one module holds: the largest tensor, or all experts of one MoE layer when fused
    expert_bytes: int = 0  # bytes of MoE expert weights (a fused load copies them: evaluate/experts.py)
    linear: int = 0  # values of the 2-D weights inside the decoder blocks: what GPTQ, AWQ and EXL2 quantize
    embedding: int = 0  # values of the input embedding
    head: int = 0  # values of an untied output head (0 when tied to the embedding)
    largest_layer: int = 0  # bytes of the largest decoder layer (what the streamed reference reads at once)
    largest_in_layer: int = 0  # values of the largest tensor inside a decoder layer (widened while the layer runs)


def tensor_stats(folder: Path) -> TensorStats:
    params = weight_bytes = largest = experts = linear = embedding = head = 0
    modules: dict[str, int] = {}
    layers: dict[str, int] = {}
    in_layer = 0
    for f in sorted(folder.glob("*.safetensors")):
        for name, t in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            n = math.prod(t["shape"])
            params += n
            weight_bytes += t["data_offsets"][1] - t["data_offsets"][0]
            largest = max(largest, n)
            # transformers runs a MoE layer's experts as one module (fused weights): count them together.
            group = re.sub(r"\.experts\.\d+\..*", ".experts", name)
            modules[group] = modules.get(group, 0) + n
            size = t["data_offsets"][1] - t["data_offsets"][0]
            if group != name:
                experts += size
            if layer := re.match(r".*\.layers\.\d+\.", name):
                layers[layer[0]] = layers.get(layer[0], 0) + size
                in_layer = max(in_layer, n)
            if ".layers." in name and name.endswith(".weight") and len(t["shape"]) == 2:
                linear += n
            embedding += n if name == "model.embed_tokens.weight" else 0
            head += n if name == "lm_head.weight" else 0
    if params == 0:
        raise SourceError(f"no tensors found in {folder}/*.safetensors", "check the download")
    return TensorStats(params, weight_bytes, largest, max(modules.values()), experts, linear, embedding, head,
                       max(layers.values(), default=0), in_layer)


def param_count(folder: Path) -> int:
    return tensor_stats(folder).params
