"""Offline means offline: the verbs run as a user runs them (HF_HUB_OFFLINE and the like unset, as conftest.py does
not leave them) in a process whose network is down, and must not try to reach it when all they need is local.

The network is taken away by a sitecustomize.py on PYTHONPATH (so vLLM's and torch's child processes lose it too):
every DNS lookup and TCP connect to an address other than loopback (which vLLM and llmfast's server use) is written
to a log and refused, as on a machine without a network; `NET_HANG=1` makes it a network that drops packets
instead: a name resolves, and a connect waits out its time limit (logged; one with no time limit, which would wait
for the system's TCP timeout, about two minutes, fails at once so the test does not wait).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from llmfast.testing import VERB_IMPORTS, run_forked

NO_NETWORK = '''
import ipaddress, json, os, socket, time, traceback

_real_connect, _real_connect_ex, _real_gai = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
_HANG = bool(os.environ.get("NET_HANG"))


def _loopback(host):
    if host in ("localhost", "", None) or str(host).endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _log(**entry):
    stack = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-2]
             if not any(k in f.filename for k in ("httpx", "httpcore", "socket.py", "sitecustomize"))]
    with open(os.environ["NET_LOG"], "a") as f:
        f.write(json.dumps({**entry, "pid": os.getpid(), "stack": stack[-6:]}) + "\\n")


def getaddrinfo(host, port, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if _loopback(name):
        return _real_gai(host, port, *args, **kwargs)
    _log(kind="dns", host=str(name), port=port)
    if _HANG:
        return _real_gai("192.0.2.1", port, *args, **kwargs)  # TEST-NET-1: nothing answers there
    raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


def _refuse(sock, address):
    # a UDP connect sends nothing (vLLM uses one to learn its own address): only TCP reaches anything
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return
    if _loopback(address[0]):
        return
    _log(kind="connect", host=str(address[0]), port=address[1], timeout=sock.gettimeout())
    if _HANG and sock.gettimeout():
        time.sleep(sock.gettimeout())
        raise socket.timeout("timed out")
    raise OSError(101, "Network is unreachable")


def connect(self, address):
    _refuse(self, address)
    return _real_connect(self, address)


def connect_ex(self, address):
    _refuse(self, address)
    return _real_connect_ex(self, address)


if os.environ.get("NET_LOG"):
    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
'''

# what a user's shell does not have, and the test suite's does (conftest.py), or a developer's might
_NOT_THE_USERS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "VLLM_NO_USAGE_STATS",
                  "DO_NOT_TRACK", "VLLM_DO_NOT_TRACK", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_CACHE", "HF_HOME")


def _users_env(tmp_path: Path, log: Path, **extra: str) -> dict[str, str]:
    """A user's environment without a network (the harness in tmp_path/no-network); Hugging Face's home (its cache,
    and the list of agents huggingface_hub keeps there) a new folder."""
    site = tmp_path / "no-network"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    env = {k: v for k, v in os.environ.items() if k not in _NOT_THE_USERS}
    env.update(HF_HOME=str(tmp_path / "hf-home"), NET_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), **extra)
    return env


@pytest.fixture
def offline(tmp_path: Path):
    """run(*args, **env) -> (CompletedProcess, the network attempts it made): the CLI as a user without a network
    runs it."""
    log = tmp_path / "network.jsonl"

    def run(*args: str, **extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
        log.unlink(missing_ok=True)
        p = subprocess.run([sys.executable, "-m", "llmfast.cli", *args], env=_users_env(tmp_path, log, **extra),
                           capture_output=True, text=True, cwd=tmp_path, timeout=900)
        tries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return p, tries

    return run


def _hub_cache(tmp_path: Path, tiny_dir: Path) -> Path:
    """Hugging Face's cache layout holding tiny_dir as someorg/tiny's main branch (files linked into blobs/)."""
    repo = tmp_path / "hf-home" / "hub" / "models--someorg--tiny"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in tiny_dir.iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    return snap


def test_the_harness_takes_the_network_away(offline):
    """The harness itself: a lookup is logged and refused, loopback still works (vLLM and our server need it)."""
    p, tries = offline("models", "--prepare", "someorg/not-cached-anywhere")
    assert p.returncode == 2 and tries and {t["host"] for t in tries} == {"huggingface.co"}, (p.stderr, tries)


def test_every_verb_on_local_models_reaches_for_no_network(tiny_dir, tmp_path):
    """Fine-tune, export, merge, quantize (int4, bitsandbytes), sparsify, eval and bench on local folders and the
    built-in model, with the user's environment: not one lookup or connection."""
    rows = "".join(json.dumps({"messages": [{"role": "user", "content": f"Repeat: {w}"},
                                            {"role": "assistant", "content": w}]}) + "\n" for w in "abcdefgh")
    (tmp_path / "train.jsonl").write_text(rows)
    text = REPO / "eval" / "text" / "persuasion.txt"
    recipes = {
        "ft.yaml": f"model: {tiny_dir}\ndata: {{train: train.jsonl, max_length: 32}}\nlora: {{r: 4, alpha: 8}}\n"
                   "train: {steps: 1, batch_size: 2}\noutput: ft\n",
        "merge.yaml": f"merge_method: task_arithmetic\nbase_model: {tiny_dir}\n"
                      "models: [{model: ft/adapter, parameters: {weight: 1.0}}]\n",
        "w4.yaml": f"model: {tiny_dir}\nquantization: {{method: w4, group_size: 32}}\n"
                   f"data: {{text: {text}, calibration_tokens: 256, window: 64}}\noutput: w4\n",
        "nf4.yaml": f"model: {tiny_dir}\nquantization: {{method: bnb4, type: nf4}}\noutput: nf4\n",
        "teal.yaml": f"model: {tiny_dir}\nsparsify: {{method: teal, config: {{target: 0.5}}}}\n"
                     f"data: {{text: {text}, calibration_tokens: 256, heldout_tokens: 128, window: 64}}\n"
                     "output: teal\n",
        "eval.yaml": "model: nf4\neval:\n  perplexity: {text: " + str(text) + ", max_tokens: 128, context: 64, "
                     "stride: 64}\n  tasks: [{name: dates, path: " + str(REPO / "eval/tasks/dates/test.jsonl")
                     + ", limit: 2}]\n  max_new_tokens: 4\noutput: eval.json\n",
    }
    for name, body in recipes.items():
        (tmp_path / name).write_text(body)
    runs = [("models", "--prepare", "builtin:smollm2-135m"), ("finetune", "ft.yaml"), ("export", "ft", "exported"),
            ("merge", "merge.yaml", "merged"), ("quantize", "w4.yaml"), ("quantize", "nf4.yaml"),
            ("sparsify", "teal.yaml"), ("eval", "eval.yaml"),
            ("bench", "offline", str(tiny_dir), "--engine", "hf", "--num-prompts", "2",
             "--random-input-len", "8", "--random-output-len", "2", "--output", "bench.json")]
    # each verb a process of its own, forked from one that imported the libraries once (network down there too)
    logs = [tmp_path / f"network-{i}.jsonl" for i in range(len(runs) + 1)]
    done = run_forked([{"module": "llmfast.cli", "argv": args, "env": {"NET_LOG": str(log)}}
                       for args, log in zip(runs, logs[1:])], VERB_IMPORTS, tmp_path / "jobs",
                      env=_users_env(tmp_path, logs[0]), cwd=tmp_path)
    for args, (code, _, err), log in zip([("imports",), *runs], [(0, "", ""), *done], logs):
        assert code == 0, (args, err[-2000:])
        tries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        assert tries == [], (args, tries)


@pytest.mark.parametrize("hang", ["", "1"])
def test_a_hub_id_in_hugging_faces_cache_is_used_without_asking_the_hub(offline, tiny_dir, tmp_path, hang):
    """A model the user has in Hugging Face's cache: huggingface_hub asked the hub for its newest commit first, with
    no time limit (and built its user agent from a list it fetched too): with the network down, two refused
    lookups; with one that drops packets, the system's TCP timeout (about two minutes) before every verb."""
    snap = _hub_cache(tmp_path, tiny_dir)
    p, tries = offline("models", "--prepare", "someorg/tiny", NET_HANG=hang)
    assert p.returncode == 0 and p.stdout.startswith(f"someorg/tiny: {snap} (LlamaForCausalLM"), p.stderr
    assert tries == [], tries


def test_hub_model_uses_the_cached_copy_without_the_network(tiny_dir, tmp_path):
    """llmfast.offline.hub_model itself (what resolve_model's hub ids go through), in a process without a network."""
    snap = _hub_cache(tmp_path, tiny_dir)
    log = tmp_path / "network.jsonl"
    code = "from llmfast.offline import hub_model; print(hub_model('someorg/tiny'))"
    p = subprocess.run([sys.executable, "-c", code], env=_users_env(tmp_path, log), capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == str(snap), p.stderr
    assert not log.exists(), log.read_text()


def test_a_copy_without_its_weights_in_the_cache_is_not_taken_for_the_model(tiny_dir, tmp_path):
    """What an interrupted download, or AutoConfig/AutoTokenizer by id, leaves in the cache (config and tokenizer
    files): taken for the model, it was used as it was for good (online too: `check_model_dir` needs no weights, and
    the load failed later); now it is fetched, or offline the one line saying it is not in the cache."""
    snap = _hub_cache(tmp_path, tiny_dir)
    (snap / "model.safetensors").unlink()
    log = tmp_path / "network.jsonl"
    code = "from llmfast.offline import cached_hub_model as c; print(c('someorg/tiny'))"
    env = _users_env(tmp_path, log)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "None", p.stderr
    code = "from llmfast.offline import hub_model; hub_model('someorg/tiny')"
    p = subprocess.run([sys.executable, "-c", code], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                       text=True)
    assert "HF_HUB_OFFLINE is set and it is not (with its weights) in Hugging Face's cache" in p.stderr, p.stderr


def test_a_hub_id_not_cached_fails_in_one_line_after_one_try(offline):
    """Network down: one line that says the hub could not be reached (it said LocalEntryNotFoundError, a name
    from inside huggingface_hub), after one request for the model (no retry loop)."""
    p, tries = offline("models", "--prepare", "someorg/not-cached")
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert "could not fetch 'someorg/not-cached'" in err[0] and "the hub could not be reached" in err[0], err
    assert "hf download someorg/not-cached" in err[0], err
    assert len([t for t in tries if t["kind"] == "dns"]) <= 2, tries  # the model, and huggingface_hub's agent list


def test_a_hub_id_not_cached_on_a_network_that_drops_packets_waits_a_bounded_time(offline):
    """A network that drops packets: every connection attempt has a time limit, HF_HUB_ETAG_TIMEOUT's for the
    model (huggingface_hub's first request had none: the system's TCP timeout, about two minutes); the error
    says so in one line."""
    p, tries = offline("models", "--prepare", "someorg/not-cached", NET_HANG="1", HF_HUB_ETAG_TIMEOUT="1")
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "no answer from the hub within 1 s" in err[0], p.stderr
    connects = [t for t in tries if t["kind"] == "connect"]
    assert connects and all(t["timeout"] for t in connects), connects


def test_hf_hub_offline_and_a_hub_id_not_cached_names_the_cache(offline, tmp_path):
    p, tries = offline("models", "--prepare", "someorg/not-cached", HF_HUB_OFFLINE="1")
    err = p.stderr.strip()
    assert p.returncode == 2 and "\n" not in err and "HF_HUB_OFFLINE is set" in err, err
    assert str(tmp_path / "hf-home" / "hub") in err and tries == [], (err, tries)


def test_vllm_env_turns_off_what_vllm_reaches_for_and_leaves_the_callers_environment(tmp_path, monkeypatch):
    from llmfast.offline import vllm_env

    for name in _NOT_THE_USERS:
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    assert vllm_env([]) == {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    assert dict(os.environ) == before  # returned, never written
    monkeypatch.chdir(tmp_path)
    (tmp_path / "drafts" / "small").mkdir(parents=True)
    # a flag naming a local folder (relative, absolute, inside JSON) keeps the hub off; a hub id turns it back on
    for local in (["--tokenizer", "drafts/small"], ["--speculative-config", json.dumps({"model": str(tmp_path)})]):
        assert vllm_env(local)["HF_HUB_OFFLINE"] == "1", local
    for hub in (["--tokenizer", "org/tok"], ["--speculative-config", '{"model": "org/draft-1.5b"}']):
        assert "HF_HUB_OFFLINE" not in vllm_env(hub), hub
    # the user's own setting wins, whichever way it points
    assert vllm_env([], {"HF_HUB_OFFLINE": "0", "DO_NOT_TRACK": "0"}) == {"VLLM_NO_USAGE_STATS": "1"}


def test_the_vllm_server_sends_no_usage_statistics_and_asks_no_hub(tiny_dir, monkeypatch):
    """vLLM's server on a GPU sends usage statistics to stats.vllm.ai; the model llmfast gives it is a local folder,
    so it has nothing to ask the hub either, unless a flag passed on to it names a hub id."""
    from llmfast.serve.machine import Machine
    from llmfast.serve.server import ServerSpec, server_command

    for name in _NOT_THE_USERS:
        monkeypatch.delenv(name, raising=False)
    m = Machine(cuda=False, cores=[0, 1], cpu_flags=frozenset(), available_gib=8.0)
    _, env = server_command(ServerSpec(model=tiny_dir), m)
    assert {k: env.get(k) for k in ("VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "HF_HUB_OFFLINE")} == {
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}, env
    _, env = server_command(ServerSpec(model=tiny_dir, extra_args=["--tokenizer", "someorg/tok"]), m)
    assert "HF_HUB_OFFLINE" not in env and env["DO_NOT_TRACK"] == "1", env
    monkeypatch.setenv("DO_NOT_TRACK", "0")
    assert "DO_NOT_TRACK" not in server_command(ServerSpec(model=tiny_dir), m)[1]


MISTRAL_FILES = [".gitattributes", "README.md", "config.json", "consolidated.safetensors", "generation_config.json",
                 "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                 "model-00003-of-00003.safetensors", "model.safetensors.index.json", "params.json",
                 "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer.model.v3",
                 "tokenizer_config.json"]
MISTRAL_INDEX = {"metadata": {}, "weight_map": {f"layer.{i}": f"model-0000{i % 3 + 1}-of-00003.safetensors"
                                                for i in range(9)}}


def _taken(files, patterns):
    return {f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)}


def test_a_hub_download_takes_the_weights_the_index_names_not_a_consolidated_copy():
    """Mistral-7B-Instruct-v0.3 lists consolidated.safetensors (14.5 GB, the mistral-inference format) beside its
    three shards: "*.safetensors" downloaded the model twice. Its real file list, and the index's shard names."""
    from llmfast.offline import HUB_PATTERNS, hub_patterns

    taken = _taken(MISTRAL_FILES, hub_patterns(MISTRAL_FILES, lambda: MISTRAL_INDEX))
    assert "consolidated.safetensors" not in taken
    assert {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)} | {
        "model.safetensors.index.json", "config.json", "tokenizer.json", "tokenizer.model"} <= taken
    # one file: that file, and the index is not read; neither: every *.safetensors, as before
    one = ["config.json", "model.safetensors", "consolidated.safetensors"]
    assert _taken(one, hub_patterns(one, lambda: 1 / 0)) == {"config.json", "model.safetensors"}
    assert hub_patterns(["config.json", "weights.safetensors"], lambda: 1 / 0) == HUB_PATTERNS
    # an index of another shape is left to check_model_dir, which names it, after a download of everything
    assert hub_patterns(MISTRAL_FILES, lambda: {"weight_map": []}) == HUB_PATTERNS
    # llmfast's own files beside the weights (a TEAL artifact's thresholds, a Deja Vu one's predictors) come too,
    # and a shard's name is matched as a name, not as a pattern ("w[1]" as a pattern matches "w1", not itself)
    mine = ["config.json", "w[1].safetensors", "model.safetensors.index.json", "sparsity.safetensors",
            "predictors.safetensors", "consolidated.safetensors"]
    assert _taken(mine, hub_patterns(mine, lambda: {"weight_map": {"a": "w[1].safetensors"}})) == set(mine) - {
        "consolidated.safetensors"}


def test_hub_model_downloads_what_hub_patterns_chooses(tmp_path, monkeypatch):
    """hub_model's own download: the repository's file list and index go through hub_patterns, and a broken index
    is its own line, not "the hub could not be reached". The hub is the one part replaced here (no network)."""
    import huggingface_hub
    from huggingface_hub import constants

    from llmfast.errors import UserError
    from llmfast.offline import hub_model

    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps(MISTRAL_INDEX))
    asked = []

    def snapshot(repo_id, allow_patterns=None, local_files_only=False, **kw):
        if local_files_only:
            raise FileNotFoundError("not cached")
        asked.append(allow_patterns)
        return str(tmp_path)

    class Info:
        siblings = [type("S", (), {"rfilename": f})() for f in MISTRAL_FILES]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, name, **kw: str(tmp_path / name))
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kw: Info())
    assert hub_model("mistralai/Mistral-7B-Instruct-v0.3") == tmp_path
    assert "consolidated.safetensors" not in _taken(MISTRAL_FILES, asked[0])
    index.write_text("{not json")
    with pytest.raises(UserError, match=r"model.safetensors.index.json: the weight index is not valid JSON .*"
                                        r"fetch 'mistralai/Mistral-7B-Instruct-v0.3' again"):
        hub_model("mistralai/Mistral-7B-Instruct-v0.3")
