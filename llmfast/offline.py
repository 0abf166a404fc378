"""llmfast and the network, in one place: what a verb reaches for, and when it does not.

Every verb runs on local folders, and only a hub id not yet in Hugging Face's cache needs the network. Two libraries
would reach out anyway:
- huggingface_hub asks the hub for a repository's newest commit before it uses a copy already in its cache, with no
  time limit: with the network down that is a refused connection (and the cached copy), with a network that drops
  packets (a captive portal, a firewall, a train) it is the system's TCP timeout, about two minutes, per model.
  `hub_model` uses the cached copy without asking; only a model that is not there is fetched, and the hub is first
  asked whether it answers within $HF_HUB_ETAG_TIMEOUT seconds (huggingface_hub's own setting, default 10).
- vLLM's process sends usage statistics to stats.vllm.ai from a thread, and resolves what its flags name as hub ids
  when they are not local folders. `vllm_env` is what its process gets: usage statistics off, and HF_HUB_OFFLINE=1
  when every model it is given is a local folder (which `resolve_model` makes of every model llmfast serves).
  The caller's environment wins (a variable the user set is left as set), and nothing here writes os.environ.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from llmfast.errors import UserError

# what llmfast takes from a hub repository: weights, configs, tokenizer, chat template (not other formats' weights)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
# vLLM's own switches for its usage statistics (vllm/usage/usage_lib.py reads both)
NO_USAGE_STATS = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
_HUB_ID_IN = re.compile(r"(?<![\w./-])[A-Za-z0-9][\w.-]*/[\w.-]+(?![\w./-])")


def hub_wait() -> float:
    """Seconds to wait for the hub to answer: $HF_HUB_ETAG_TIMEOUT as huggingface_hub reads it, default 10."""
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT)


def cached_hub_model(repo_id: str, cache: Path | None = None) -> Path | None:
    """The copy of `repo_id` in Hugging Face's cache (`cache`: another hub-layout cache folder), found without the
    network, or None: a snapshot of its main branch that holds a config.json and its weights (every shard its index
    names). A config and tokenizer alone are what an interrupted download, or a tool that read only those
    (AutoConfig, AutoTokenizer, vLLM's lookups by id), leaves: fetched, as snapshot_download resumes it."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True,
                                      cache_dir=None if cache is None else str(cache)))
    except Exception:  # noqa: BLE001 - not cached, or an incomplete snapshot: either way not usable as it is
        return None
    return path if (path / "config.json").is_file() and _has_weights(path) else None


def _has_weights(path: Path) -> bool:
    from llmfast.modelfiles import MissingShards, model_weight_files, weight_files

    try:  # the weights transformers loads (stray *.safetensors are none), and every shard an index names (vLLM's)
        return bool(weight_files(path, "fetch it again")) and bool(model_weight_files(path, "fetch it again"))
    except MissingShards:  # an interrupted download: fetched again
        return False
    except UserError:  # a broken index (an empty weight_map too) is the same fetched again: check_model_dir names it
        return True


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _fetch_refusal(error: Exception, wait: float) -> str:
    """Why `repo_id` could not be fetched, in the words a user acts on."""
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        return "it is gated: accept its terms on the hub, then `hf auth login`"
    if isinstance(error, errors.RepositoryNotFoundError):
        return "no such model on the hub, or a private one (`hf auth login`): check the id"
    if isinstance(error, errors.HfHubHTTPError):
        return f"the hub answered {type(error).__name__}: try again later"
    if isinstance(error, OSError) and error.errno:  # a full or read-only disk (httpx's errors are no OSErrors)
        return f"writing it into Hugging Face's cache failed ({error.strerror or error})"
    name = type(error).__name__
    if "Timeout" in name:
        return (f"no answer from the hub within {wait:g} s ({name}): check your connection "
                "(HF_HUB_ETAG_TIMEOUT sets the wait)")
    return f"the hub could not be reached ({name}): check your connection"


def hub_model(repo_id: str, older: Path | None = None) -> Path:
    """A local folder for hub id `repo_id`: Hugging Face's cached copy (HF_HUB_CACHE / HF_HOME, as transformers and
    vLLM keep it), else the one in `older` (llmfast's former hub/ folder), both without the network; else
    downloaded into Hugging Face's cache, where the hub answers within `hub_wait()` seconds. One line otherwise.

    A cached copy is used as it is, online too: to take a newer commit of the repository, `hf download` it."""
    caches = [None] + ([older] if older and (older / f"models--{repo_id.replace('/', '--')}").is_dir() else [])
    for cache in caches:
        found = cached_hub_model(repo_id, cache)
        if found is not None:
            return found
    how = "pass a local model directory, or download it where there is a network (`hf download " + repo_id + "`)"
    if _offline():
        from huggingface_hub import constants

        raise UserError(f"could not fetch '{repo_id}' from the Hugging Face hub: HF_HUB_OFFLINE is set and it is not "
                        f"(with its weights) in Hugging Face's cache ({constants.HF_HUB_CACHE}): {how}")
    from huggingface_hub import HfApi, snapshot_download

    wait = hub_wait()
    try:  # snapshot_download's own first request has no time limit: a network that drops packets held it ~2 min
        files = [s.rfilename for s in HfApi().model_info(repo_id, timeout=wait, files_metadata=False).siblings or []]
        patterns = hub_patterns(files, lambda: _hub_index(repo_id, wait))
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=wait))
    except UserError:  # the repository's index is not what it should be: its own line, naming it
        raise
    except Exception as e:  # offline, unknown repo, gated, a full disk: all one line for the user
        raise UserError(f"could not fetch '{repo_id}' from the Hugging Face hub: {_fetch_refusal(e, wait)}; "
                        f"or {how}") from None


def hub_patterns(files: Sequence[str], read_index: Callable[[], Any]) -> list[str]:
    """What to download of a repository holding `files`: HUB_PATTERNS, with the safetensors narrowed to the weights
    transformers and vLLM load (the shards its index names, `read_index()` giving the index, else model.safetensors)
    and llmfast's own beside them (a TEAL artifact's thresholds, a Deja Vu one's predictors). Mistral's repositories
    ship a consolidated.safetensors beside the shards, a second copy of the model (14.5 GB for
    Mistral-7B-Instruct-v0.3). A repository with neither takes every *.safetensors, as before."""
    from llmfast.modelfiles import INDEX
    from llmfast.sparse.predictors import PREDICTORS_FILE
    from llmfast.sparse.thresholds import THRESHOLDS_FILE

    if INDEX in files:
        index = read_index()
        shards = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(shards, dict) and shards and all(isinstance(v, str) for v in shards.values())):
            return HUB_PATTERNS  # an index of another shape: everything, for check_model_dir to name what is wrong
        weights = set(shards.values())
    elif "model.safetensors" in files:
        weights = {"model.safetensors"}
    else:
        return HUB_PATTERNS
    own = {PREDICTORS_FILE, THRESHOLDS_FILE} & set(files)
    # names, not patterns: a shard named w[1].safetensors is matched by its escaped name only
    return [p for p in HUB_PATTERNS if p != "*.safetensors"] + [glob.escape(n) for n in sorted(weights | own)]


def _hub_index(repo_id: str, wait: float) -> Any:
    from huggingface_hub import hf_hub_download

    from llmfast.modelfiles import INDEX, read_json_file

    path = Path(hf_hub_download(repo_id, INDEX, etag_timeout=wait))
    return read_json_file(path, "weight index", f"fetch '{repo_id}' again")


def names_hub_ids(args: Sequence[str]) -> bool:
    """Whether any of `args` (vLLM flags and values, JSON ones too) names something ORG/NAME that is not a local
    path: vLLM then needs the hub (a draft model for speculative decoding, a tokenizer given by id)."""
    return any(not Path(m.group(0)).exists() for a in args for m in _HUB_ID_IN.finditer(str(a)))


def vllm_env(args: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment additions for a vLLM process: usage statistics off; hub lookups off unless one of `args`
    (the flags the user passes on to vLLM; llmfast's own name local folders) names a hub id. A variable set in
    `environ` (default: os.environ) is left to it: someone who set HF_HUB_OFFLINE=0 or DO_NOT_TRACK=0 meant it."""
    environ = os.environ if environ is None else environ
    env = dict(NO_USAGE_STATS)
    if not names_hub_ids(args):
        env["HF_HUB_OFFLINE"] = "1"
    return {k: v for k, v in env.items() if k not in environ}
