"""The engine words `bench offline --engine` and a bench recipe's `engine:` take, read from the engine registry
(engines/base.py), so an engine registered as docs/bench.md says is chosen by its name without another list.

Names and families: `bench offline` runs an engine in this process, `bench run` serves vLLM and runs the others
in processes of their own. A family whose own name is registered to an engine that does not run in this process
(`vllm`: vLLM's server) lends that word to its one in-process engine on `bench offline` (`--engine vllm` is
`vllm-offline`, which is also taken by name), and that engine stays out of `bench run`, which measures the family
served. Importing the registry imports no vLLM or torch: listing words stays instant (`--help`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmfast.errors import UserError
from llmfast.registry import did_you_mean

if TYPE_CHECKING:
    from llmfast.bench.engines.base import OfflineEngine


def _in_process() -> tuple[dict[str, "OfflineEngine"], dict[str, str]]:
    """The in-process engines by name, and the family words lent to one of them ({family: engine name})."""
    from llmfast.bench.engines import ENGINES, OfflineEngine

    offline = {n: e for n, e in ENGINES.items() if isinstance(e, OfflineEngine)}
    lent = {}
    for family in sorted({e.family for e in offline.values()}):
        members = [n for n, e in offline.items() if e.family == family]
        if family in ENGINES and family not in offline and len(members) == 1:
            lent[family] = members[0]
    return offline, lent


def offline_words() -> list[str]:
    """What `bench offline --engine` lists: each in-process engine once, by its family's word where it has one."""
    offline, lent = _in_process()
    return sorted(set(offline) - set(lent.values()) | set(lent))


def offline_engine(word: str) -> tuple[str, "OfflineEngine"]:
    """The in-process engine `--engine WORD` names, and the word results record for it (the family's where it
    lends one: `vllm`); an unknown word is one line with a did-you-mean."""
    offline, lent = _in_process()
    name = lent.get(word, word)
    if name not in offline:
        words = offline_words()
        served = f" ('{word}' does not run in this process: `bench run` measures it)" if word in run_words() else ""
        raise UserError(f"--engine {word}: unknown engine{did_you_mean(word, words)}; choose from {', '.join(words)}"
                        f"{served}")
    shown = next((f for f, n in lent.items() if n == name), name)
    return shown, offline[name]


def run_words() -> list[str]:
    """What a bench recipe's `engine:` takes: auto and every engine but the in-process ones of a served family."""
    from llmfast.bench.engines import ENGINES

    lent = set(_in_process()[1].values())
    return ["auto", *(n for n in ENGINES.names() if n not in lent)]


def run_engine_word(word: str) -> str:
    """A recipe's `engine:` checked (pydantic validator: a ValueError becomes the recipe's one-line error)."""
    words = run_words()
    if word in words:
        return word
    family = next((f for f, n in _in_process()[1].items() if n == word), None)
    if family is not None:
        raise ValueError(f"an engine in this process, for `llmfast bench offline` only (bench run measures the {family} "
                         f"family served: engine: {family}); choose from {', '.join(words)}")
    raise ValueError(f"unknown bench engine{did_you_mean(word, words)}; choose from {', '.join(words)}")

