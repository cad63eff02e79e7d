"""A checkpoint whose weights are pickled (transformers' pytorch_model.bin, or its shards and index), as safetensors
in a folder of quantkit's cache, for `--allow-pickle`. The user's folder is never written to.

  python -m quantkit.pickled SRC_FOLDER OUT_FOLDER SHARD...     (the child that converts)

The child reads each shard with torch.load(weights_only=True): the unpickler builds tensors and plain containers
and refuses any other object, so a pickle that would run code fails the conversion instead of running. Shards are
converted one at a time (each read memory-mapped where its format allows), so memory stays about one shard. Tensors
that share storage (tied embeddings: a model's state dict holds lm_head.weight and model.embed_tokens.weight as one
tensor) are stored as transformers' save_pretrained stores them: the tied copy that the model's class names
(`_tied_weights_keys`, when its config ties word embeddings) is dropped, since from_pretrained ties it back; any
other sharing is cloned, because safetensors refuses shared storage.

The copies live in QUANTKIT_CACHE/pickled/ (default ~/.cache/quantkit/pickled/), one folder per version of a
source, named by a hash of its files; origins.json says which source each is a version of. A source is a Hub repo
(every snapshot of it in the Hugging Face cache) or a local folder. Making a new copy of a source removes its older
copies (another revision, an edited config), except one that a running process reads: each process that uses a copy
holds a shared lock on its folder until it exits, and that copy goes at a later conversion of the source. Copies of
other sources stay; with no build running, removing the whole folder is safe (each is made again when needed).
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

from .errors import DiskSpaceError, NotEnoughMemory, SourceError, ToolError
from .fsutil import HashCache, atomic_dir, human_size, sha256_file, sha256_text, write_json_atomic
from .memory import StepMemory, machine_memory
from .paths import cache_dir

WEIGHTS = "pytorch_model.bin"
INDEX = "pytorch_model.bin.index.json"
# What a Hub download fetches with --allow-pickle: the pickled weights this module can convert, nothing else
# (training_args.bin, optimizer.pt and the like are pickles too, and no use).
DOWNLOAD_PATTERNS = [WEIGHTS, "pytorch_model-*.bin", INDEX]
NOTE = "weights converted from pickled .bin with torch.load(weights_only=True)"
# Part of the cache key: a change to what the conversion writes must not reuse older copies.
RECIPE = "pickled-to-safetensors 1"
ORIGINS = "origins.json"  # in the cache folder: the source each copy is a version of
TRASH = ".removing-"  # a copy being removed, renamed first so that no half-removed copy keeps its name
# The conversion child's peak with a shard of four numbers: 0.97 GB resident (ru_maxrss), measured with torch 2.14 and
# transformers 5.25 (their imports, AutoConfig, safetensors). Counted as its own memory, as memory.REFERENCE_FIXED is,
# though about half is pages of their shared libraries. The sample's 269 MB shard: predicted 1.27 GB, measured 1.11 GB.
CONVERT_FIXED = 1_000_000_000


def shards(folder: Path) -> list[Path]:
    """The pickled weight files of `folder`, in order: those its index names, or pytorch_model.bin."""
    index = folder / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SourceError(f"{folder.name}/{INDEX} is not a weight index ({type(e).__name__}: {e})",
                              "re-download it") from e
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise SourceError(f"{folder.name} lacks {missing[0]}, which {INDEX} names",
                              "download every shard the index lists")
        return [folder / n for n in names]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    raise SourceError(f"{folder.name} has pickle files but neither {WEIGHTS} nor {INDEX}",
                      "quantkit converts pickled weights in transformers' layout only: save the model with "
                      "save_pretrained (safetensors) yourself, if you trust it")


def _beside(folder: Path) -> list[Path]:
    """The configuration, tokenizer and card files a conversion copies beside the weights."""
    from .source import ALLOW_PATTERNS

    patterns = [p for p in ALLOW_PATTERNS if ".safetensors" not in p]
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))


def converted_copy(folder: Path, log=None) -> Path:
    """The safetensors copy of `folder`'s pickled weights with its other files, made once: it is kept in the cache
    under a hash of the pickled files and of the files copied beside them, so a changed config is copied anew.
    This process holds the copy until it exits (_hold); a new copy replaces the source's older ones (_retire_older)."""
    pickled = shards(folder)
    beside = _beside(folder)
    root = cache_dir() / "pickled"
    hashes = _Hashes(root / "hashes.json")
    key = sha256_text(RECIPE, *(f"{p.name}:{hashes.sha256(p)}" for p in pickled),
                      *((f"{INDEX}:{sha256_file(folder / INDEX)}",) if (folder / INDEX).is_file() else ()),
                      *(f"{p.name}:{sha256_file(p)}" for p in beside))
    hashes.save()
    out = root / key[:32]
    if out.is_dir() and _hold(out):
        return out
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "w")
    except OSError as e:
        raise SourceError(f"cannot write the converted copy of {folder.name} to {root}: {e.strerror}",
                          "set QUANTKIT_CACHE to a writable folder with room for the model") from e
    # One conversion at a time: two builds sharing a .partial folder would wreck each other's files (one lock for
    # all, so that failed conversions leave no lock files behind; converting two models at once is rare).
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_dir():
            _convert_into(folder, out, pickled, beside, log)
            _retire_older(root, out, _origin(folder), log)
        _hold(out)  # under the lock, which every removal takes: it cannot fail here
    return out


def _convert_into(folder: Path, out: Path, pickled: list[Path], beside: list[Path], log) -> None:
    from .procs import run_python

    memory = conversion_memory(pickled)
    _check_memory(folder, memory)
    # The copy is about as large as the pickles (less a tied head); a full disk would fail it at the last shard.
    needed = sum(p.stat().st_size for p in pickled + beside)
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise DiskSpaceError(f"not enough disk space in {out.parent}: the safetensors copy of {folder.name}'s pickled "
                             f"weights needs {human_size(needed)}, {human_size(free)} free",
                             "free some space, or set QUANTKIT_CACHE to a folder on a larger disk")
    if log:
        log(f"converting the pickled weights of {folder.name} to safetensors (once): {out}; predicted peak memory "
            f"{_describe(memory)}")
    with atomic_dir(out) as tmp:
        try:
            done = run_python(["-m", "quantkit.pickled", str(folder), str(tmp), *map(str, pickled)],
                              what=f"the conversion of {folder.name}'s pickled weights")
        except ToolError as e:
            # The child's own "error: " line, when it refused a file; else the tool's failure as it stands.
            said = [l.removeprefix("error: ") for l in e.hint.splitlines() if l.startswith("error: ")]
            raise SourceError(said[-1] if said else str(e), "use a safetensors release of the model, or convert "
                              "it yourself if you trust the checkpoint") from e
        for p in beside:
            shutil.copy2(p, tmp / p.name)
    if log:
        log(f"converted the pickled weights of {folder.name}: peak memory {human_size(done.peak_rss_bytes)} "
            f"(predicted {human_size(memory.peak_bytes)})")


def conversion_memory(pickled: list[Path]) -> StepMemory:
    """The conversion child's predicted peak: it holds one shard at a time, so the largest decides. torch.load
    (mmap=True) maps a zip-format shard's tensors from the file, pages the kernel can drop and read again; the
    legacy format cannot be mapped and is read into memory. safetensors before 0.8 copies every tensor of the shard
    into bytes before it writes (save_file's _flatten); 0.8 writes from the tensors themselves. The clones of
    _unshared (tensors sharing storage that are not a tie) are not counted: transformers' own saves have none."""
    copies = _save_copies()

    def one(path: Path) -> StepMemory:
        size = path.stat().st_size
        mapped = size if zipfile.is_zipfile(path) else 0
        return StepMemory("conversion of the pickled weights", path.name,
                          CONVERT_FIXED + size + (size if copies else 0), mapped)

    return max((one(p) for p in pickled), key=lambda m: (m.anonymous_bytes, m.peak_bytes))


def _save_copies() -> bool:
    """Whether the installed safetensors copies tensors into bytes to save them (before 0.8)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        numbers = [int(n) for n in re.findall(r"\d+", version("safetensors"))[:2]]
    except PackageNotFoundError:
        return True  # the child will fail to import it anyway; assume the costlier kind
    return tuple(numbers) < (0, 8)


def _describe(memory: StepMemory) -> str:
    mapped = f" ({human_size(memory.mapped_bytes)} of it {memory.target} memory-mapped)" if memory.mapped_bytes else ""
    return human_size(memory.peak_bytes) + mapped


def _check_memory(folder: Path, memory: StepMemory) -> None:
    """Refuse, before it starts, a conversion whose own (anonymous) memory cannot fit this machine: as the plan
    refuses a step (memory.too_large), its memory-mapped shard need not fit, it is read again instead."""
    limit = machine_memory()
    if limit and memory.anonymous_bytes > limit:
        largest = f"its largest file, {memory.target}"
        how = (f"besides {largest}, {human_size(memory.mapped_bytes)}, memory-mapped" if memory.mapped_bytes else
               f"with {largest}, read into it")
        raise NotEnoughMemory(
            f"converting the pickled weights of {folder.name} needs about {human_size(memory.anonymous_bytes)} of "
            f"memory ({how}) and this machine has {human_size(limit)}",
            f"use a safetensors release of the model, or convert it on a machine with at least "
            f"{human_size(memory.anonymous_bytes)} and build from that copy")


def _origin(folder: Path) -> str:
    """What a copy is a version of: a Hub repo, whose snapshots the Hugging Face cache keeps as
    models--ORG--NAME/snapshots/COMMIT, or else the local folder."""
    folder = folder.resolve()
    repo = folder.parent.parent
    if folder.parent.name == "snapshots" and repo.name.startswith("models--"):
        return str(repo)
    return str(folder)


_HELD: dict[Path, int] = {}  # copies this process reads: a shared lock on each folder, released when it exits


def _hold(copy: Path) -> bool:
    """Mark `copy` in use until this process ends (the kernel drops the lock however it ends), so that another
    process's _retire_older leaves it. False: it was removed meanwhile, and must be made again."""
    if copy in _HELD:
        return True
    try:
        fd = os.open(copy, os.O_RDONLY | os.O_DIRECTORY)  # not inherited: children read it, this process holds it
    except OSError:
        return False
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits out a removal under way
    try:
        still = os.stat(copy).st_ino == os.fstat(fd).st_ino
    except OSError:
        still = False
    if not still:
        os.close(fd)
        return False
    _HELD[copy] = fd
    return True


def _retire_older(root: Path, new: Path, origin: str, log=None) -> None:
    """Record `new` as the copy of `origin` and remove that source's other copies that no process holds (one in
    use goes at a later conversion). Called under the conversion lock, the only writer of origins.json."""
    try:
        recorded = json.loads((root / ORIGINS).read_text())
    except (OSError, ValueError):
        recorded = {}
    origins = {n: o for n, o in (recorded if isinstance(recorded, dict) else {}).items() if (root / n).is_dir()}
    origins[new.name] = origin
    for left in root.glob(TRASH + "*"):  # a removal that a crash cut short
        shutil.rmtree(left, ignore_errors=True)
    for name in [n for n, o in origins.items() if o == origin and n != new.name]:
        if _remove_unused(root / name):
            del origins[name]
            if log:
                log(f"removed the older converted copy {root / name}")
    try:
        write_json_atomic(root / ORIGINS, origins)
    except OSError:
        pass  # the copies are kept; only their cleanup waits


def _remove_unused(copy: Path) -> bool:
    """Remove `copy` unless a process holds it (_hold); True when it is gone."""
    try:
        fd = os.open(copy, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a running build reads it
        trash = copy.with_name(TRASH + copy.name)
        try:
            os.rename(copy, trash)
        except OSError:
            return False  # kept: a later conversion tries again
        shutil.rmtree(trash, ignore_errors=True)
        return True
    finally:
        os.close(fd)


class _Hashes(HashCache):
    """sha256 of the pickled files, re-read only when a file's size or mtime changed (they are GBs)."""

    def __init__(self, path: Path) -> None:
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        super().__init__(entries if isinstance(entries, dict) else {})
        self.path = path

    def save(self, keep: int = 256) -> None:
        try:
            write_json_atomic(self.path, dict(list(self.entries.items())[-keep:]))  # the newest: it never grows
        except OSError:
            pass  # the next run hashes the files again


# The child.

def convert(src: Path, out: Path, pickled: list[Path]) -> None:
    import torch
    from safetensors.torch import save_file

    tied = _tied_patterns(src)
    names = ["model.safetensors"] if len(pickled) == 1 else \
        [f"model-{i:05d}-of-{len(pickled):05d}.safetensors" for i in range(1, len(pickled) + 1)]
    weight_map: dict[str, str] = {}
    total = 0
    for i, (path, name) in enumerate(zip(pickled, names), 1):
        print(f"[{i}/{len(pickled)}] {path.name} -> {name}", flush=True)
        state = _load(torch, path)
        state = _unshared(state, tied)
        save_file(state, str(out / name), metadata={"format": "pt"})
        for key, t in state.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        del state
    if len(pickled) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def _load(torch, path: Path) -> dict:
    import pickle

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        # weights_only's refusal: the file holds objects other than tensors, which unpickling would construct. Of
        # torch's paragraph, the line that names the object; the rest is advice to load it unsafely.
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        why = next((l for l in lines if re.search(r"global|unsupported|unpickler error", l, re.I)), lines[0])
        raise SystemExit(f"error: {path.name} is not plain tensors, and torch.load(weights_only=True) refuses it: "
                         f"{why[:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"error: {path.name} is not a state dict of tensors (as transformers saves pytorch_model.bin)")
    return state


def _tied_patterns(src: Path) -> list[str]:
    """The names transformers ties back on load (targets of the class's `_tied_weights_keys`), as regular
    expressions, when the config ties word embeddings; [] when the architecture is unknown to transformers."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src)  # never remote code: an auto_map model was refused before
    if not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return []
    arch = (config.architectures or [""])[0]
    try:
        keys = getattr(transformers, arch, None)
    except Exception:  # transformers' lazy module raises for a class whose backend is missing
        keys = None
    keys = getattr(keys, "_tied_weights_keys", None) or {}
    return ["^" + k for k in keys]  # a dict (target -> source) in transformers 5, a list of targets before


def _unshared(state: dict, tied: list[str]) -> dict:
    """`state` with no two tensors on one storage, as safetensors requires: of the tensors that are one and the same
    view, the tied ones transformers restores are dropped (one always stays); everything else still sharing is
    cloned."""
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    out = dict(state)
    for names in groups.values():
        if len(names) < 2:
            continue
        views: dict[tuple, list[str]] = {}
        for name in sorted(names):
            t = state[name]
            views.setdefault((t.data_ptr(), t.dtype, tuple(t.shape), t.stride()), []).append(name)
        for same in views.values():
            drop = [n for n in same if any(re.search(p, n) for p in tied)][: len(same) - 1]
            for n in drop:
                del out[n]
        kept = [n for n in names if n in out]
        if len(kept) > 1:
            for n in kept:
                out[n] = out[n].clone()
    return {k: v.contiguous() for k, v in out.items()}


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit("usage: python -m quantkit.pickled SRC_FOLDER OUT_FOLDER SHARD...")
    convert(Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
