"""ATG: CODER's knowledge generated through an OpenAI-compatible chat endpoint with the
paper's prompts, and the label-free choice of one-vs-one pairs.

Follows methods.md §5.2 and YCaigogogo/CVPR24-CODER ``ATG/ATG.py``.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from nolabels.errors import InputError
from nolabels.llm import DEFAULT_API_KEY_ENV, ChatClient, LLMError
from nolabels.methods.coder.knowledge import Knowledge
from nolabels.methods.coder.text_bank import TextEncoder

#: The chat endpoint gave no usable answer (kept name; the one LLM client's error).
ChatError = LLMError


ATT_PROMPT = (
    "Q: What are useful visual features for distinguishing a lemur in a photo? \n"
    "A: There are several useful visual features to tell there is a lemur in a photo:\n"
    "_four-limbed primate\n_black, grey, white, brown, or red-brown\n"
    "_wet and hairless nose with curved nostrils\n_long tail\n_large eyes\n_furry bodies\n"
    "_clawed hands and feet\n"
    "Q: What are useful visual features for distinguishing a {c} in a photo?\n"
    "A: There are several useful visual features to tell there is a {c} in a photo:\n_"
)
ANA_PROMPT = (
    "Q:What other objects are cats visually similar to?\nA:\n_Tiger\n_Lion\n_Leopard\n"
    "_Garfield Cat\n_Cat-themed Products\n_Cat Toys\n"
    "Q:What other objects are {c} visually similar to?\nA:\n_"
)
ANA_REASK_PROMPT = (
    "Q: Helicopter has already appeared in the class set. Please give one more other classes "
    "which are visually similar to airplanes. Give me the class name without other words.\n"
    "A:\n_Drone\n"
    "Q: {rejected} has already appeared in the class set. Please give {n} more other classes "
    "which are visually similar to {c}. Give me the class name without other words.\nA:\n_"
)
SYN_PROMPT = (
    "Q:What are the synonyms for forest?\nA:\n_Woodland\n_Woods\n_Thicket\n_Jungle\n"
    "_Timberland\n_Rainforest\nQ:What are the synonyms for {c}?\nA:\n_"
)
OVO_PROMPT = (
    "Q: What are different visual features between the river and the lake in a photo? Focus on "
    "their key differences.\nA: For River:\n_Flowing water\n_Narrow and elongated body of water\n"
    "For Lake:\n_Still or calm water\n_Larger and more circular or irregular in shape\n"
    "Q: What are different visual features between the {c1} and the {c2} in a photo? Focus on "
    "their key differences. You should decide the number of attributes to output based on the "
    "actual situation, not just 2. You should follow the format of the examples given above.\n"
    "A: For {c1}:\n_"
)


def split_items(response: str) -> list[str]:
    """The authors' parsing: drop newlines, split on "_", strip, drop empties; de-duplicated
    keeping the first occurrence (the authors' ``set`` lost the order)."""
    items = [s.strip() for s in response.replace("\n", "").split("_")]
    return list(dict.fromkeys(s for s in items if s))


def split_ovo(response: str) -> tuple[list[str], list[str]]:
    """Split a one-vs-one answer into (attributes of c1, attributes of c2) at "For <c2>:"."""
    text = response.replace("\n", "")
    m = re.search(r"For\s[^_:]*:", text)
    if m is None:
        return split_items(text), []
    return split_items(text[: m.start()]), split_items(text[m.end():])


class KnowledgeGenerator:
    """ATG: fill a :class:`Knowledge` through an OpenAI-compatible chat endpoint.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` (``/chat/completions`` is appended).
        model: the chat model name.
        api_key_env: the environment variable holding the API key (default
            ``OPENAI_API_KEY``; keys come from the environment only, never printed).
        encoder: optional text encoder for the analogous-class rejection rule: a candidate
            whose "a photo of {x}" embedding has cosine > ``reject_threshold`` with
            "a photo of {other class}" for any *other* class of the dataset is rejected and
            the model is re-asked for that many more, up to ``max_reasks`` times, stopping
            as soon as an answer has no rejection (the authors' loop never stopped early).
            Without an encoder nothing is rejected.
        retries: attempts per request on network errors, HTTP 408, 429 and 5xx (exponential
            backoff from ``backoff`` seconds; a ``Retry-After`` header is honoured).
    """

    def __init__(self, base_url: str, model: str, *,
                 api_key_env: str | None = DEFAULT_API_KEY_ENV,
                 encoder: TextEncoder | None = None, reject_threshold: float = 0.9,
                 max_reasks: int = 6, retries: int = 4, backoff: float = 1.0,
                 timeout: float = 120.0, temperature: float | None = None,
                 sleep: Callable[[float], None] | None = None):
        if not base_url:
            raise InputError("KnowledgeGenerator: base_url is required")
        if not model:
            raise InputError("KnowledgeGenerator: model is required")
        self.client = ChatClient(base_url, model, api_key_env=api_key_env,
                                 max_attempts=retries, backoff=backoff, timeout=timeout,
                                 sleep=sleep)
        self.url, self.model = self.client.url, model
        self.encoder, self.reject_threshold, self.max_reasks = encoder, reject_threshold, max_reasks
        self.temperature = temperature

    @property
    def requests(self) -> int:
        """HTTP requests sent so far (retries included)."""
        return self.client.requests

    def chat(self, prompt: str) -> str:
        """One user message -> the assistant's text (retries: :class:`nolabels.llm.ChatClient`)."""
        return self.client.chat(prompt, temperature=self.temperature)

    # -- the four text types ---------------------------------------------------
    def attributes(self, c: str) -> list[str]:
        return split_items(self.chat(ATT_PROMPT.format(c=c)))

    def synonyms(self, c: str) -> list[str]:
        return [s for s in split_items(self.chat(SYN_PROMPT.format(c=c))) if s.lower() != c.lower()]

    def ovo(self, c1: str, c2: str) -> tuple[list[str], list[str]]:
        return split_ovo(self.chat(OVO_PROMPT.format(c1=c1, c2=c2)))

    def _rejected(self, candidates: list[str], others: torch.Tensor | None) -> list[bool]:
        if self.encoder is None or others is None or others.shape[0] == 0 or not candidates:
            return [False] * len(candidates)
        e = F.normalize(torch.as_tensor(self.encoder.encode_text(
            [f"a photo of {x}" for x in candidates])).float(), dim=1)
        return ((e @ others.T).max(dim=1).values > self.reject_threshold).tolist()

    def analogous(self, c: str, class_names: Sequence[str] = ()) -> list[str]:
        """Analogous classes of ``c``, with the rejection rule against the other classes."""
        others = None
        if self.encoder is not None:
            other = [o for o in class_names if Knowledge._key(o) != Knowledge._key(c)]
            if other:
                others = F.normalize(torch.as_tensor(self.encoder.encode_text(
                    [f"a photo of {Knowledge._key(o)}" for o in other])).float(), dim=1)
        kept: list[str] = []
        cands = split_items(self.chat(ANA_PROMPT.format(c=c)))
        for attempt in range(self.max_reasks + 1):
            rej = self._rejected(cands, others)
            kept += [x for x, r in zip(cands, rej) if not r and x not in kept]
            rejected = [x for x, r in zip(cands, rej) if r]
            if not rejected or attempt == self.max_reasks:
                break  # fixed: stop as soon as an answer is clean
            cands = split_items(self.chat(ANA_REASK_PROMPT.format(
                rejected=",".join(rejected), n=len(rejected), c=c)))
        return kept

    def generate(self, class_names: Sequence[str], *, pairs: Iterable[tuple[str, str]] = (),
                 dataset: str | None = None, types: Iterable[str] = ("att", "ana", "syno"),
                 progress: Callable[[str], None] | None = None) -> Knowledge:
        """Knowledge for every class (and one-vs-one attributes for ``pairs``)."""
        types = set(types)
        kn = Knowledge(dataset=dataset)
        for c in class_names:
            name = Knowledge._key(c)
            if progress:
                progress(name)
            kn.classes[name] = {
                "attributes": self.attributes(name) if "att" in types else [],
                "analogous": self.analogous(name, class_names) if "ana" in types else [],
                "synonyms": self.synonyms(name) if "syno" in types else [],
            }
        for c1, c2 in pairs:
            a, b = Knowledge._key(c1), Knowledge._key(c2)
            if progress:
                progress(f"{a} vs {b}")
            attrs1, attrs2 = self.ovo(a, b)
            kn.ovo.setdefault(a, {})[b] = attrs1
            kn.ovo.setdefault(b, {})[a] = attrs2
        return kn


def confusing_pairs(class_emb: torch.Tensor, class_names: Sequence[str], per_class: int = 2
                    ) -> list[tuple[str, str]]:
    """Label-free choice of one-vs-one pairs: each class with its ``per_class`` nearest
    other classes by text-embedding cosine (unordered pairs, each once)."""
    if per_class < 1 or len(class_names) < 2:
        return []
    e = F.normalize(class_emb.float(), dim=1)
    s = e @ e.T
    s.fill_diagonal_(float("-inf"))
    k = min(per_class, len(class_names) - 1)
    nn = s.topk(k, dim=1).indices
    seen, out = set(), []
    for i, row in enumerate(nn.tolist()):
        for j in row:
            key = (min(i, j), max(i, j))
            if key not in seen:
                seen.add(key)
                out.append((class_names[key[0]], class_names[key[1]]))
    return out
