"""Find new or updated model repos on the Hub and queue one build job per new source commit; a commit that
changed only tokenizer or chat-template files since the last finished build gets a `retemplate` job instead.

One pass lists each organisation's models through huggingface_hub (HF_ENDPOINT and HF_TOKEN apply),
with the commit sha, config, safetensors parameter counts and card data in the same request, so a
pass costs one listing per organisation however many models it holds. Idempotence comes from the
queue: a (repo, commit, profile) that was ever queued is not queued again.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import formats, network
from ..errors import QuantkitError, SourceError
from ..fsutil import parse_scaled
from ..memory import job_peak
from ..profiles import Profile, load_profile
from .queue import Job, JobQueue, is_store

_EXPAND = ["sha", "lastModified", "config", "safetensors", "cardData", "tags", "gated", "private"]


@dataclass(frozen=True)
class WatchFilters:
    architectures: tuple[str, ...] = ()  # config.json "architectures", e.g. LlamaForCausalLM
    licenses: tuple[str, ...] = ()  # card licence ids, e.g. apache-2.0
    match: str = ""  # glob on the model name (the part after ORG/), e.g. "*-Instruct"
    min_params: int = 0
    max_params: int = 0  # 0: no limit

    def reject(self, info: Any) -> str | None:
        """Why a listed model is not for us, or None if it is."""
        name = info.id.split("/", 1)[-1]
        config = info.config or {}
        card = info.card_data.to_dict() if info.card_data else {}
        tags = set(info.tags or [])
        if "quantization_config" in config or card.get("base_model_relation") == "quantized" or "quantized" in tags:
            return "already a quantized model"
        params = info.safetensors.total if info.safetensors else 0
        if not params:
            return "no safetensors weights on its main branch"
        if self.match and not fnmatch.fnmatchcase(name, self.match):
            return f"name does not match {self.match!r}"
        archs = config.get("architectures") or []
        if self.architectures and not set(archs) & set(self.architectures):
            return f"architecture {', '.join(archs) or 'unknown'} is not one of {', '.join(self.architectures)}"
        licence = card.get("license") or next((t[8:] for t in tags if t.startswith("license:")), None)
        if self.licenses and licence not in self.licenses:
            return f"licence {licence or 'unknown'} is not one of {', '.join(self.licenses)}"
        if self.min_params and params < self.min_params:
            return f"{params:,} parameters, fewer than {self.min_params:,}"
        if self.max_params and params > self.max_params:
            return f"{params:,} parameters, more than {self.max_params:,}"
        return None


@dataclass
class WatchResult:
    enqueued: list[Job] = field(default_factory=list)
    known: list[str] = field(default_factory=list)  # repo@commit already queued or built
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (repo, why)

    def render(self) -> str:
        lines = [f"queued   {j.render()}" for j in self.enqueued]
        lines += [f"known    {r}" for r in self.known]
        lines += [f"skipped  {r}: {why}" for r, why in self.skipped]
        lines.append(f"{len(self.enqueued)} new job(s), {len(self.known)} already queued or built, {len(self.skipped)} skipped")
        return "\n".join(lines)


def parse_count(text: str) -> int:
    """"135M", "7B", "1.5b", "2000000" -> a parameter count."""
    count = parse_scaled(text, "KMBT")
    if count is None:
        raise QuantkitError(f"not a parameter count: {text!r}", "use a number such as 500M, 7B or 1500000000")
    return count


def template_only(api, repo_id: str, old: str, new: str) -> bool:
    """Whether commit `new` changed only tokenizer or chat-template files since `old` (docs aside): then the build
    of `old` needs only `quantkit retemplate`, not a new build. Two tree listings; any doubt means a build."""
    from ..evaluate.integrity import TOKENIZER_FILES

    def tree(rev: str) -> dict[str, str]:
        return {e.path: (e.lfs.sha256 if getattr(e, "lfs", None) else getattr(e, "blob_id", None) or e.path)
                for e in api.list_repo_tree(repo_id, revision=rev, recursive=True)}

    try:
        with network.quiet_client():
            before, after = tree(old), tree(new)
    except Exception:
        return False
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    tokenizer = {p for p in changed if p in TOKENIZER_FILES}
    return bool(tokenizer) and all(p in tokenizer or p.endswith(".md") for p in changed)


def profile_ref(profile: str) -> str:
    """How a job names its profile: a name as given, a file by its absolute path (what makes a job unique)."""
    return str(Path(profile).absolute()) if Path(profile).is_file() else profile


def profile_text(profile: str) -> str | None:
    """A profile file's YAML, kept in the job: a worker on another machine has no such file."""
    return Path(profile).read_text(encoding="utf-8") if Path(profile).is_file() else None


def job_needs(profile: Profile, params: int) -> tuple[bool, int]:
    """Whether the job needs a GPU worker, and its memory: the heaviest step, by the formulas `quantkit plan`
    uses, from the Hub's parameter count alone (the build plans exactly once it has the checkpoint)."""
    gpu = any(formats.get(name).gpus and (opts or {}).get("if_unavailable", "fail") == "fail"
              for name, opts in profile.formats.items())
    return gpu, job_peak(profile, params, [formats.get(name) for name in profile.formats])


def watch_once(queue: JobQueue, orgs: list[str], profile: str, *, out: str | Path = "builds",
               filters: WatchFilters = WatchFilters(), max_attempts: int = 3) -> WatchResult:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    prof = load_profile(profile)  # a bad profile fails the pass, not every job later
    if network.offline_mode():
        raise SourceError("watch lists models on the Hub, and HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE")
    result = WatchResult()
    api = HfApi()
    hub = network.endpoint()
    listed = []  # every organisation first: a pass that fails queues nothing
    for org in orgs:
        try:
            # huggingface_hub retries a listing itself (5 times, backing off to 8 s); quietly, so that a pass
            # that fails says so in one line.
            network.bound_requests()
            with network.quiet_client():
                listed += api.list_models(author=org, expand=_EXPAND)
        except Exception as e:
            if network.is_transient(e):
                raise SourceError(f"cannot list the models of {org!r}: {network.outage(e)}",
                                  "check the network and HF_ENDPOINT; nothing was queued, and the next pass tries again",
                                  retryable=True) from e
            if isinstance(e, HfHubHTTPError):
                raise SourceError(f"cannot list the models of {org!r} on {hub}: {network.short(e)}",
                                  "check the organisation name, HF_ENDPOINT and your network "
                                  "(HF_TOKEN for private repos)") from e
            raise
    ref, text = profile_ref(profile), profile_text(profile)  # once a pass: the same for every job it queues
    for info in listed:
        if why := filters.reject(info):
            result.skipped.append((info.id, why))
            continue
        gpu, memory = job_needs(prof, info.safetensors.total)
        kind, job_out = "build", out
        # A template-only change is retemplated in the earlier build's folder; a build kept in a store has no folder
        # a worker can count on, so the new revision is built again.
        if (prev := queue.last_done(info.id, ref)) and prev.revision != info.sha and not is_store(prev.out) \
                and template_only(api, info.id, prev.revision, info.sha):
            kind, job_out, gpu, memory = "retemplate", prev.out, False, 0
        job = queue.enqueue(info.id, info.sha, ref, job_out, needs_gpu=gpu, memory_bytes=memory,
                            max_attempts=max_attempts, kind=kind, profile_text=text)
        if job:
            result.enqueued.append(job)
        else:
            result.known.append(f"{info.id}@{info.sha[:12]}")
    return result
