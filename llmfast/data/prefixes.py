"""A chat example's texts (each a prefix of the next, `chat._chat_plans`) encoded from one encoding of the last text
and a short window a text, in time linear in the row's length: encoding every prefix in full tokenized O(turns^2)
characters (3.4 s for one 200-turn row).

Why a prefix's ids can be read off the whole text's: a `tokenizers` backend first splits a text at its added tokens'
matches (leftmost-longest, on the raw text), then normalizes, pre-tokenizes and models each piece between them on its
own. Take an added token X whose match cannot depend on the characters around it (not normalized, no lstrip/rstrip, not
single_word, no surrounding spaces in its content, no single_word token's text able to overlap it: a dropped match of
one leaves X's text to the model) and which is a token of the whole text T at characters [a, e). Any prefix T[:c] with
c >= e has the same matches as T before X and X at a (a match of T[:c] is one of T; leftmost-longest keeps T's, which
end by a), so its pieces before X are T's, the same text tokenized the same; and its pieces from X on are those of
T[a:c] encoded alone, the same text, where the one rule that looks at a piece's place (Metaspace's prepend_scheme
"first": a piece at offset 0) applies in neither. So encode(T[:c]) is T's ids before X followed by encode(T[a:c]): a
window from the last such token, about a turn where a template brackets turns with special tokens. A tokenizer whose
encoding is not the backend's own (a slow one, a subclass that overrides it, split_special_tokens) keeps the caller's
full path, and so does a row whose last window, encoded alone, is not the whole text's ids after its token (a check that
costs one window).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class PrefixIds:
    """The encodings of a row's texts without holding them: text k's is `base[:i] + window` for its (i, window) in
    `parts`, `base` being the last text's ids."""

    __slots__ = ("base", "parts", "_agree", "_seen")

    def __init__(self, base: list[int], parts: list[tuple[int, list[int]]]) -> None:
        self.base, self.parts = base, parts
        self._agree = self._seen = 0  # how many of the ids given so far agree with `base`, and how many were given

    def after(self, k: int, ids: list[int]) -> list[int] | None:
        """Text k's ids after `ids`, where they start with `ids` (else None); `ids` only grows from call to call, so
        the whole row costs the length of its ids and windows, not of every prefix."""
        self._follow(ids)
        i, window = self.parts[k]
        m = len(ids)
        if m <= i:
            return self.base[m:i] + window if self._agree >= m else None
        if self._agree >= i and len(window) >= m - i and ids[i:] == window[: m - i]:
            return window[m - i:]
        return None

    def _follow(self, ids: list[int]) -> None:
        n, base = self._seen, self.base
        if self._agree == n:  # else they parted before, and stay parted: `ids` only grows
            if base[n: len(ids)] == ids[n:]:
                n = len(ids)
            else:
                while n < min(len(ids), len(base)) and ids[n] == base[n]:
                    n += 1
            self._agree = n
        self._seen = len(ids)


def backend_encodes(tokenizer: "PreTrainedTokenizerBase") -> bool:
    """Whether `tokenizer`'s encoding is its `tokenizers` backend's own, which `prefix_ids` reasons about."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return False
    if not isinstance(tokenizer, PreTrainedTokenizerFast) or getattr(tokenizer, "split_special_tokens", False) \
            or getattr(tokenizer.backend_tokenizer, "encode_special_tokens", False):
        return False
    cls = type(tokenizer)
    return all(getattr(cls, name, None) is getattr(PreTrainedTokenizerFast, name, None)
               for name in ("__call__", "_call_one", "_encode_plus", "_batch_encode_plus"))


def _anchors(tokenizer: "PreTrainedTokenizerBase") -> dict[int, str]:
    """The added tokens whose matches depend on no character around them, by id (their content)."""
    added = tokenizer.added_tokens_decoder
    # A single_word token's match with a letter next to it is dropped and the characters it spans stay text: an
    # anchor's text inside them is then not split off, and the model may still give the anchor's id for it (a
    # vocabulary that holds it), at the anchor's offsets. No token whose text such a match can cover is an anchor.
    loose = [t.content for t in added.values() if t.single_word and not t.normalized]
    return {i: t.content for i, t in added.items()
            if not (t.normalized or t.lstrip or t.rstrip or t.single_word) and t.content == t.content.strip() != ""
            and not any(_overlaps(y, t.content) for y in loose)}


def _overlaps(y: str, x: str) -> bool:
    """Whether a match of `y` starting at or before one of `x` can cover x's first character."""
    return any(y[k:].startswith(x) or x.startswith(y[k:]) for k in range(len(y)))


def prefix_ids(tokenizer: "PreTrainedTokenizerBase", rows: Sequence[Sequence[str]]) -> list[PrefixIds | None]:
    """Each row's texts (each a prefix of the next) as `PrefixIds`, two tokenizer calls for all rows; None for a row
    to encode text by text (no anchor token in it, windows more than twice its last text's length, or its last
    window disagrees). `backend_encodes` must hold."""
    anchors = _anchors(tokenizer)
    last = [texts[-1] if texts else "" for texts in rows]
    whole = tokenizer(last, add_special_tokens=False, return_offsets_mapping=True) if rows else None
    plans: list[tuple[list[int], list[tuple[int, int]]] | None] = []
    windows: dict[str, list[int]] = {}
    for r, texts in enumerate(rows):
        text, ids, offsets = last[r], whole["input_ids"][r], whole["offset_mapping"][r]
        found = [(e, j, s) for j, (t, (s, e)) in enumerate(zip(ids, offsets))
                 if t in anchors and text[s:e] == anchors[t]]
        if not texts or not found:
            plans.append(None)
            continue
        ends = [e for e, _, _ in found]
        cuts = []
        for t in texts:
            n = bisect_right(ends, len(t)) - 1
            cuts.append((found[n][1], found[n][2]) if n >= 0 else (0, 0))
        if sum(len(t) - s for t, (_, s) in zip(texts, cuts)) > 2 * len(text):
            # anchors too sparse (a template whose only special token opens the row): the windows are the prefixes
            # again, quadratic in the row's length, and a batch's are tokenized at once; the full path encodes them,
            # rows grouped by chat._BATCH_CHARS, which counts a row read off one encoding as 3 * len(text)
            plans.append(None)
            continue
        windows.update((t[s:], []) for t, (_, s) in zip(texts, cuts))
        plans.append((ids, cuts))
    if windows:
        windows = dict(zip(windows, tokenizer(list(windows), add_special_tokens=False).input_ids))
    out: list[PrefixIds | None] = []
    for plan, texts in zip(plans, rows):
        if plan is None:
            out.append(None)
            continue
        ids, cuts = plan
        j, s = cuts[-1]
        if windows[texts[-1][s:]] != ids[j:]:  # the reasoning above does not hold for this tokenizer: the full path
            out.append(None)
            continue
        out.append(PrefixIds(ids, [(j, windows[t[s:]]) for t, (j, s) in zip(texts, cuts)]))
    return out
