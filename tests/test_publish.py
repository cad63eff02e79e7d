"""Publishing to a real HTTP server that speaks the Hub API (tests/hub_server.py), through the real
huggingface_hub client in quantkit's own child process; and building from a Hub repo id."""

import hashlib
import json
import re
import time

from huggingface_hub import HfApi, ModelCard, snapshot_download

from conftest import OTHER, PROFILES, SAMPLE_REPO, TOKEN, run_cli, seed


def _api(hub):
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


def _sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _commits(hub, repo):
    return len(_api(hub).list_repo_commits(repo))


def test_build_publish_round_trip_card_and_idempotence(sample_build, hub, tmp_path):
    folder = sample_build["dir"]
    repo = "alice/SmolLM2-135M-Instruct-GGUF"
    proc = run_cli("build", "--sample", "--profile", PROFILES / "fast.yaml", "--out", sample_build["out"], "--publish",
                   env=hub.env, check=True)
    assert "built 0, evaluated 0" in proc.stdout  # the build itself was resumed
    assert f"{repo}@main: new commit" in proc.stdout

    # Every file comes back byte-identical.
    got = snapshot_download(repo, endpoint=hub.endpoint, token=TOKEN, local_dir=tmp_path / "dl")
    for gguf in folder.glob("*.gguf"):
        assert _sha(tmp_path / got / gguf.name) == _sha(gguf), gguf.name
    for name in ("README.md", "size-vs-kld.png"):
        assert _sha(tmp_path / got / name) == _sha(folder / "publish" / "gguf" / name)

    # The card parses with huggingface_hub and carries the metadata a quant repo needs.
    card = ModelCard.load(tmp_path / got / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "quantized"
    assert meta["quantized_by"] == "alice" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation" and "gguf" in meta["tags"]
    assert "<|im_start|>system\n{system_prompt}<|im_end|>" in card.text  # ChatML, from the model's own template
    assert "(size-vs-kld.png)" in card.text
    # What users of Ollama, LM Studio and llama.cpp paste, and what llama-server made of each file
    assert f"ollama run hf.co/{repo}:Q4_K_M" in card.text and f"lms get {repo}" in card.text
    assert "llama-cli -m SmolLM2-135M-Instruct-Q4_K_M.gguf -cnv" in card.text
    assert "## In the runtime's own engine" in card.text and "- **Q4_K_M**: template renders like the source" in card.text
    assert "`SmolLM2-135M-Instruct-F16.gguf` is llama.cpp's conversion of the source checkpoint" in card.text
    for a in sample_build["report"]["artifacts"]:
        assert f"| [{a['filename']}](./{a['filename']}) | {a['variant']} |" in card.text
    with open(tmp_path / got / "size-vs-kld.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # No token and no absolute local path in any published text file.
    for path in (tmp_path / got).rglob("*"):
        if path.is_file() and path.suffix not in (".gguf", ".png"):
            text = path.read_text()
            assert TOKEN not in text and OTHER not in text
            assert not re.search(r"(/tmp/|/root/|/home/|/work/)", text), path.name
    assert TOKEN not in proc.stdout + proc.stderr

    # Publishing the same build again makes no commit.
    commits = _commits(hub, repo)
    assert commits == 2  # the repo's initial commit + ours
    again = run_cli("publish", folder, env=hub.env, check=True)
    assert "up to date" in again.stdout
    assert _commits(hub, repo) == commits


def test_failure_mid_upload_leaves_head_unchanged_then_retry_succeeds(sample_build, hub):
    folder = sample_build["dir"]
    env = {**hub.env}
    repo = "alice/SmolLM2-135M-Instruct-GGUF"
    _api(hub).create_repo(repo)
    head = _api(hub).model_info(repo).sha
    # The Hub keeps failing the commit: every retry fails, the command fails cleanly.
    hub.fail_next("POST", r"/commit/", status=500, count=5)
    proc = run_cli("publish", folder, env=env)
    assert proc.returncode == 8
    assert "error: the Hub kept failing after 5 attempts" in proc.stderr and "unchanged" in proc.stderr
    assert _api(hub).model_info(repo).sha == head

    # One 500 and one dropped large-file upload: quantkit's and the client's retries get through.
    hub.fail_next("POST", r"/commit/", status=500, count=1)
    hub.drop_next("PUT", r"^/_lfs/", count=1)
    proc = run_cli("publish", folder, env=env, check=True)
    assert "retrying" in proc.stderr
    assert _api(hub).model_info(repo).sha != head
    assert _commits(hub, repo) == 2

    # A commit made but whose answer is lost: the retry finds everything in place and commits nothing more.
    report_path = folder / "report.json"
    original = report_path.read_text()
    report = json.loads(original)
    report["publish"]["quantized_by"] = "alice-quant-team"  # a card change to commit
    report_path.write_text(json.dumps(report))
    try:
        hub.drop_next("POST", r"/commit/", count=1, after_handling=True)
        run_cli("publish", folder, env=env, check=True)
    finally:
        report_path.write_text(original)
    assert _commits(hub, repo) == 3
    assert "alice-quant-team" in (folder / "publish" / "gguf" / "README.md").read_text()


def test_dry_run_prints_the_plan_without_network(sample_build, hub):
    hub.requests.clear()
    proc = run_cli("publish", sample_build["dir"], "--dry-run", "--owner", "alice", env=hub.env, check=True)
    assert not hub.requests
    assert "repo alice/SmolLM2-135M-Instruct-GGUF (branch main)" in proc.stdout
    for a in sample_build["report"]["artifacts"]:
        assert a["filename"] in proc.stdout and a["sha256"][:16] in proc.stdout
    assert "README.md" in proc.stdout and "dry run: nothing was uploaded" in proc.stdout


def test_bad_token_and_foreign_namespace(sample_build, hub):
    proc = run_cli("publish", sample_build["dir"], env={**hub.env, "HF_TOKEN": "qk-test-token-invalid-000000"})
    assert proc.returncode == 8 and "rejected the token (401)" in proc.stderr
    assert "qk-test-token-invalid" not in proc.stdout + proc.stderr
    proc = run_cli("publish", sample_build["dir"], "--owner", "bob", env=hub.env)
    assert proc.returncode == 8 and "may not write there (403)" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr


def test_build_from_a_hub_repo_id(hub, tmp_path):
    # The sample is on the session's test Hub as alice/SmolLM2-135M-Instruct (conftest.session_hub).
    proc = run_cli("build", SAMPLE_REPO, "--profile", PROFILES / "files.yaml", "--out", tmp_path / "out",
                   env=hub.env, check=True)
    report = json.loads((tmp_path / "out" / "SmolLM2-135M-Instruct" / "report.json").read_text())
    assert report["source"]["repo_id"] == SAMPLE_REPO
    assert report["source"]["revision"] == hub.commit
    assert [a["variant"] for a in report["artifacts"]] == ["F16", "Q8_0"]
    assert "built 2" in proc.stdout


def test_gated_repo_without_a_token(sample_model, hub, tmp_path):
    api = _api(hub)
    api.create_repo("alice/Gated-Model")
    api.upload_folder(repo_id="alice/Gated-Model", folder_path=sample_model)
    api.update_repo_settings("alice/Gated-Model", gated="auto")
    env = {k: v for k, v in hub.env.items() if k != "HF_TOKEN"}
    proc = run_cli("build", "alice/Gated-Model", "--profile", PROFILES / "tiny.yaml", "--out", tmp_path / "out", env=env)
    assert proc.returncode == 3, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith(("error:", "  fix:"))]
    assert lines == [f"error: alice/Gated-Model is gated on {hub.endpoint}",
                     "  fix: accept its terms on the Hub, then set HF_TOKEN"]
    assert not (tmp_path / "out").exists()


def test_invalid_repo_name_and_no_token_leak(sample_build, hub):
    proc = run_cli("publish", sample_build["dir"], "--owner", "bad owner!", "--dry-run", env=hub.env)
    assert proc.returncode == 8
    assert "error: invalid repo name 'bad owner!/SmolLM2-135M-Instruct-GGUF'" in proc.stderr
    # A token the Hub refuses: the failure names the problem, never the token, here or in any file written.
    secret = "qk-test-token-secret-5f3a9c0d1e"
    proc = run_cli("publish", sample_build["dir"], env={**hub.env, "HF_TOKEN": secret})
    assert proc.returncode == 8 and secret not in proc.stdout + proc.stderr
    for path in sample_build["dir"].rglob("*"):
        if path.is_file() and path.suffix not in (".gguf", ".npy", ".png"):
            assert secret not in path.read_text(errors="replace"), path


def test_folder_variant_goes_to_its_own_branch(hub, tmp_path):
    """The layout for folder formats (GPTQ/AWQ/EXL2): one branch per variant, main untouched."""
    from quantkit.progress import Reporter
    from quantkit.publish.hub import RepoCommit, folder_files, publish

    variant = tmp_path / "4bit-g128"
    (variant / "sub").mkdir(parents=True)
    (variant / "config.json").write_text('{"quantization_config": {"bits": 4}}')
    (variant / "sub" / "model.safetensors").write_bytes(bytes(range(256)) * 45_000)  # 11.5 MB: LFS
    commit = RepoCommit("alice/M-GPTQ", "4bit-g128", False, folder_files(variant), "quantkit: 4bit-g128")
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    first = publish([commit], token=TOKEN, reporter=Reporter(quiet=True), backoff_s=0.01, api=api)[0]
    assert first.commit
    assert {b.name for b in api.list_repo_refs("alice/M-GPTQ").branches} == {"main", "4bit-g128"}
    assert api.list_repo_files("alice/M-GPTQ") == [".gitattributes"]  # main is not touched
    got = snapshot_download("alice/M-GPTQ", revision="4bit-g128", endpoint=hub.endpoint, token=TOKEN,
                            local_dir=tmp_path / "dl")
    for f in commit.files:
        assert _sha(tmp_path / got / f.path_in_repo) == f.sha256
    again = publish([commit], token=TOKEN, reporter=Reporter(quiet=True), backoff_s=0.01, api=api)[0]
    assert again.commit is None and again.head == first.commit


def _tensor_digest(path):
    from gguf import GGUFReader

    h = hashlib.sha256()
    for t in GGUFReader(path).tensors:
        h.update(t.name.encode() + t.data.tobytes())
    return h.hexdigest()


def test_retemplate_rewrites_every_file_without_quantizing_and_publish_sends_only_what_changed(
        sample_build, sample_model, hub, tmp_path):
    """A template fix after release: every GGUF gets the new template through gguf-py's metadata writer (tensors
    untouched), the checks run again, and publish makes one commit of the changed files, the card saying why."""
    from quantkit.formats.gguf.chat_facts import gguf_facts

    folder = seed(sample_build["dir"], tmp_path / "out")
    repo = "alice/SmolLM2-135M-Instruct-GGUF"
    run_cli("publish", folder, env=hub.env, check=True)
    api = _api(hub)
    remote = {e.path: e for e in api.list_repo_tree(repo, recursive=True)}
    commits = _commits(hub, repo)
    q4 = folder / "SmolLM2-135M-Instruct-Q4_K_M.gguf"
    tensors = _tensor_digest(q4)
    fixed = (sample_model / "chat_template.jinja").read_text().replace(
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face", "You are SmolLM, a helpful assistant")
    (tmp_path / "fixed.jinja").write_text(fixed)

    start = time.monotonic()
    proc = run_cli("retemplate", folder, "--chat-template", tmp_path / "fixed.jinja", check=True)
    seconds = time.monotonic() - start
    assert seconds < 30, seconds
    assert "retemplated 7 file(s)" in proc.stdout and "quantize" not in proc.stderr
    assert _tensor_digest(q4) == tensors  # the same tensors, bit for bit: nothing was quantized again
    report = json.loads((folder / "report.json").read_text())
    for a in report["artifacts"]:
        path = folder / a["filename"]
        assert gguf_facts(path).template == fixed and a["sha256"] == _sha(path)
        assert a["integrity"] == [] and a["engine"]["template"] == [] and a["failures"] == [], a
    assert report["changelog"] == [report["changelog"][0]] and "from the file fixed.jinja in 7 file(s)" in report["changelog"][0]
    assert not list(folder.glob("*.partial"))

    pushed = run_cli("publish", folder, env=hub.env, check=True)
    assert _commits(hub, repo) == commits + 1
    stage = folder / "publish" / "gguf"
    local = {a["filename"]: folder / a["filename"] for a in report["artifacts"]}
    local |= {p.name: p for p in stage.iterdir()}
    changed = [name for name, path in local.items()
               if not (remote[name].lfs and remote[name].lfs.sha256 == _sha(path)) and
               remote[name].blob_id != _git_blob_sha1(path)]
    assert f"{repo}@main: {len(changed)} file(s) in commit" in pushed.stderr + pushed.stdout, (changed, pushed.stderr)
    assert set(local[n].suffix for n in changed) >= {".gguf", ".md"}
    card = (stage / "README.md").read_text()
    assert "## Changelog" in card and report["changelog"][0] in card


def _git_blob_sha1(path):
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
