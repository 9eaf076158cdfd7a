"""Task metrics over generated replies: document extraction, VQA and captions.

Every metric takes the predictions (one string per sample) and the references (a list of
acceptable strings per sample) and returns a :class:`MetricResult`: corpus-level scores and one
dict of scores per sample (for the predictions file). ``compute_metrics`` runs several by name.

| name | scores | scale |
|---|---|---|
| ``cord`` | ``field_f1``, ``field_precision``, ``field_recall``, ``nted_accuracy``, ``json_valid`` | 0-1 |
| ``exact_match`` | ``exact_match`` (normalised) | 0-1 |
| ``anls`` | ``anls`` (average normalised Levenshtein similarity, threshold 0.5) | 0-1 |
| ``bleu4`` | ``bleu4`` (sacrebleu, 13a tokenizer) | 0-100 |
| ``cider`` | ``cider`` (CIDEr-D as in the COCO caption toolkit) | 0-10 |

``vqa`` is ``exact_match`` + ``anls``; ``caption`` is ``bleu4`` + ``cider``.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from automodel.errors import UsageError


@dataclass
class MetricResult:
    """Corpus-level scores and one score dict per sample."""

    scores: dict[str, float]
    per_sample: list[dict[str, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Document extraction (CORD): JSON validity, field-level F1, tree-edit-distance accuracy
# ----------------------------------------------------------------------------------------------


def _donut_tokens_to_json(text: str) -> Any:
    from transformers.models.donut.processing_donut import DonutProcessor

    class _Parser:
        # DonutProcessor.token2json needs only `self.token2json` for its recursion; borrowing it
        # keeps the Donut paper's exact token grammar without building a tokenizer.
        token2json = DonutProcessor.token2json

    return _Parser().token2json(text, added_vocab={})


def parse_prediction(text: str) -> dict | None:
    """Parses a generated extraction: JSON, or Donut tokens (``<s_menu><s_nm>...``).

    Args:
        text: the generated reply.

    Returns:
        The parsed object, or ``None`` when the text is neither a JSON object nor Donut tokens.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
    if "<s_" in text:
        value = _donut_tokens_to_json(text)
        if isinstance(value, dict) and set(value) != {"text_sequence"}:
            return value
    return None


def normalize_tree(data: Any) -> Any:
    """Donut's ``normalize_dict``: drops empty values, wraps scalars in lists, strips strings.

    Dict keys are sorted (by length, then name), so key order never counts; list order does.
    """
    if not data:
        return {}
    if isinstance(data, dict):
        out = {}
        for key in sorted(data, key=lambda k: (len(str(k)), str(k))):
            value = normalize_tree(data[key])
            if value:
                out[key] = value if isinstance(value, list) else [value]
        return out
    if isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            return [item for item in (normalize_tree(i) for i in data) if item]
        return [
            str(item).strip()
            for item in data
            if isinstance(item, (str, int, float)) and str(item).strip()
        ]
    return [str(data).strip()]


def flatten_fields(data: Any, path: str = "") -> list[tuple[str, str]]:
    """The leaves of a normalised tree as ``(path, value)`` pairs, list indices dropped.

    ``{"menu": [{"nm": ["Tea"]}, {"nm": ["Latte"]}]}`` -> ``[("menu.nm", "Tea"), ("menu.nm",
    "Latte")]``.
    """
    if isinstance(data, dict):
        return [
            pair
            for key, value in data.items()
            for pair in flatten_fields(value, f"{path}.{key}" if path else str(key))
        ]
    if isinstance(data, list):
        return [pair for item in data for pair in flatten_fields(item, path)]
    return [(path, str(data))]


def _tree(data: Any, label: str = "<root>"):
    from zss import Node

    node = Node(label)
    if isinstance(data, dict):
        for key, value in data.items():
            node.addkid(_tree(value, str(key)))
    elif isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            for item in data:
                node.addkid(_tree(item, "<subtree>"))
        else:
            for item in data:
                node.addkid(Node(f"<leaf>{item}"))
    return node


def _node_cost(node) -> int:
    label = node.label
    return len(label) - len("<leaf>") if label.startswith("<leaf>") else 1


def _update_cost(a, b) -> int:
    from rapidfuzz.distance import Levenshtein

    a_leaf, b_leaf = a.label.startswith("<leaf>"), b.label.startswith("<leaf>")
    if a_leaf and b_leaf:
        return Levenshtein.distance(a.label[6:], b.label[6:])
    if a_leaf or b_leaf:
        leaf = a if a_leaf else b
        return 1 + len(leaf.label) - 6
    return int(a.label != b.label)


def tree_edit_distance(pred: Any, ref: Any) -> float:
    """Zhang-Shasha tree edit distance between two normalised trees, with Donut's costs.

    Inner nodes cost 1 to insert, delete or relabel; a leaf costs its length to insert or
    delete, and the Levenshtein distance between the strings to relabel.
    """
    import zss

    return float(
        zss.distance(
            _tree(pred),
            _tree(ref),
            get_children=zss.Node.get_children,
            insert_cost=_node_cost,
            remove_cost=_node_cost,
            update_cost=_update_cost,
        )
    )


def nted_accuracy(pred: Any, ref: Any) -> float:
    """Donut's normalised tree-edit-distance accuracy: ``max(0, 1 - TED(pred, ref) / TED({}, ref))``.

    Both trees are normalised with :func:`normalize_tree` first.
    """
    pred, ref = normalize_tree(pred), normalize_tree(ref)
    worst = tree_edit_distance({}, ref)
    if worst == 0:
        return 1.0 if tree_edit_distance(pred, ref) == 0 else 0.0
    return max(0.0, 1.0 - tree_edit_distance(pred, ref) / worst)


def cord_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult:
    """Extraction metrics for CORD-style JSON (or Donut-token) replies, as in the Donut paper.

    - ``json_valid``: share of predictions that parse (JSON object or Donut tokens).
    - ``field_precision / field_recall / field_f1``: fields are the leaves of the normalised tree
      as ``(path, value)`` pairs with list indices dropped (``menu.nm = "Latte"``). List items are
      not aligned one to one: a sample's predicted and reference fields are matched as
      multisets, so a field counts as correct when the same path and value occur in the
      reference (each reference field matched at most once), wherever its item sits in the list.
      Values are compared exactly after stripping surrounding spaces. Counts are summed over all
      samples before dividing (micro average); an unparsable prediction has no fields.
    - ``nted_accuracy``: mean over samples of :func:`nted_accuracy`; unlike the field scores it
      sees the tree's structure and the order of list items.

    Only the first reference of each sample is used.
    """
    true_pos = pred_total = ref_total = 0
    valid = 0
    per_sample = []
    for prediction, refs in zip(predictions, references, strict=True):
        ref_tree = parse_prediction(refs[0])
        if ref_tree is None:
            raise UsageError(
                f"cord metric: the reference {refs[0][:80]!r} is not JSON or Donut tokens; "
                "set eval.metrics to a text metric such as exact_match"
            )
        pred_tree = parse_prediction(prediction)
        valid += pred_tree is not None
        pred_fields = Counter(flatten_fields(normalize_tree(pred_tree or {})))
        ref_fields = Counter(flatten_fields(normalize_tree(ref_tree)))
        hits = sum((pred_fields & ref_fields).values())
        n_pred, n_ref = sum(pred_fields.values()), sum(ref_fields.values())
        true_pos, pred_total, ref_total = true_pos + hits, pred_total + n_pred, ref_total + n_ref
        per_sample.append(
            {
                "json_valid": float(pred_tree is not None),
                "field_f1": _f1(hits, n_pred, n_ref),
                "nted_accuracy": nted_accuracy(pred_tree or {}, ref_tree),
            }
        )
    n = max(1, len(per_sample))
    scores = {
        "field_f1": _f1(true_pos, pred_total, ref_total),
        "field_precision": true_pos / pred_total if pred_total else 0.0,
        "field_recall": true_pos / ref_total if ref_total else 0.0,
        "nted_accuracy": sum(s["nted_accuracy"] for s in per_sample) / n,
        "json_valid": valid / n,
    }
    return MetricResult(scores, per_sample)


def _f1(hits: int, n_pred: int, n_ref: int) -> float:
    if n_pred + n_ref == 0:
        return 1.0
    return 2 * hits / (n_pred + n_ref)


# ----------------------------------------------------------------------------------------------
# VQA: normalised exact match, ANLS
# ----------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style answer normalisation: lower case, no punctuation, articles or extra spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult:
    """Share of predictions equal to one of their references after :func:`normalize_answer`."""
    per_sample = [
        {"exact_match": float(any(normalize_answer(p) == normalize_answer(r) for r in refs))}
        for p, refs in zip(predictions, references, strict=True)
    ]
    return MetricResult({"exact_match": _mean(per_sample, "exact_match")}, per_sample)


def anls(
    predictions: Sequence[str], references: Sequence[Sequence[str]], threshold: float = 0.5
) -> MetricResult:
    """Average Normalised Levenshtein Similarity (Biten et al., 2019, as in DocVQA).

    Per sample: the best over references of ``1 - lev(p, r) / max(len(p), len(r))``, set to 0
    when the normalised distance is ``threshold`` or more; strings are lower-cased and stripped
    of surrounding and repeated spaces first.
    """
    from rapidfuzz.distance import Levenshtein

    def similarity(p: str, r: str) -> float:
        p, r = " ".join(p.lower().split()), " ".join(r.lower().split())
        if not p and not r:
            return 1.0
        distance = Levenshtein.distance(p, r) / max(len(p), len(r))
        return 1.0 - distance if distance < threshold else 0.0

    per_sample = [
        {"anls": max(similarity(p, r) for r in refs)}
        for p, refs in zip(predictions, references, strict=True)
    ]
    return MetricResult({"anls": _mean(per_sample, "anls")}, per_sample)


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else 0.0


# ----------------------------------------------------------------------------------------------
# Captions: BLEU-4, CIDEr-D
# ----------------------------------------------------------------------------------------------


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult:
    """Corpus BLEU-4 from sacrebleu (0-100, 13a tokenizer); per-sample sentence BLEU."""
    import sacrebleu

    predictions = list(predictions)
    width = max((len(r) for r in references), default=1)
    # sacrebleu takes one stream per reference position; a sample with fewer references
    # repeats its first one, which leaves BLEU's clipped counts and closest length unchanged.
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    corpus = sacrebleu.corpus_bleu(predictions, streams)
    per_sample = [
        {"bleu4": sacrebleu.sentence_bleu(p, list(refs)).score}
        for p, refs in zip(predictions, references, strict=True)
    ]
    return MetricResult({"bleu4": corpus.score}, per_sample)


def caption_tokens(text: str) -> list[str]:
    """Lower-cased words with punctuation removed: a Java-free stand-in for the PTB tokenizer."""
    return text.lower().translate(_PUNCTUATION).split()


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(
        tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)
    )


def cider_d(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
) -> MetricResult:
    """CIDEr-D (Vedantam et al., 2015) as computed by the COCO caption toolkit.

    n-grams of 1..n words are weighted by TF-IDF, with document frequencies counted over the
    references of this corpus (``idf = log(#samples) - log(max(1, df))``). For each n and each
    reference: the cosine similarity of the candidate and reference vectors, with the
    candidate's weights clipped to the reference's, times a Gaussian length penalty
    ``exp(-(len_c - len_r)^2 / (2 sigma^2))``. A sample's score is the mean over n, averaged
    over its references, times 10; the corpus score is the mean over samples. Text is
    tokenised with :func:`caption_tokens`.
    """
    refs_grams = [[_ngrams(caption_tokens(r), n) for r in refs] for refs in references]
    document_frequency: Counter = Counter()
    for grams in refs_grams:
        document_frequency.update({g for ref in grams for g in ref})
    log_samples = math.log(max(1, len(refs_grams)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (
                log_samples - math.log(max(1.0, document_frequency[gram]))
            )
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        length = sum(tf for gram, tf in counts.items() if len(gram) == 1)
        return vec, norms, length

    per_sample = []
    for prediction, grams in zip(predictions, refs_grams, strict=True):
        vec, norms, length = vector(_ngrams(caption_tokens(prediction), n))
        total = 0.0
        for ref in grams:
            ref_vec, ref_norms, ref_length = vector(ref)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(
                    min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0)
                    for g, w in vec[k].items()
                )
                if norms[k] and ref_norms[k]:
                    dot /= norms[k] * ref_norms[k]
                total += dot * penalty / n
        per_sample.append({"cider": 10.0 * total / max(1, len(grams))})
    return MetricResult({"cider": _mean(per_sample, "cider")}, per_sample)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

MetricFn = Callable[[Sequence[str], Sequence[Sequence[str]]], MetricResult]

METRICS: dict[str, MetricFn] = {
    "cord": cord_metrics,
    "exact_match": exact_match,
    "anls": anls,
    "bleu4": bleu4,
    "cider": cider_d,
}

GROUPS: dict[str, tuple[str, ...]] = {"vqa": ("exact_match", "anls"), "caption": ("bleu4", "cider")}

# The scores each metric produces, in order (for checking ``best_metric`` before a run).
SCORES: dict[str, tuple[str, ...]] = {
    "cord": ("field_f1", "field_precision", "field_recall", "nted_accuracy", "json_valid"),
    "exact_match": ("exact_match",),
    "anls": ("anls",),
    "bleu4": ("bleu4",),
    "cider": ("cider",),
}


def expand_metric_names(names: str | Sequence[str]) -> list[str]:
    """Expands groups (``vqa``, ``caption``) and checks every name.

    Raises:
        UsageError: an unknown name.
    """
    names = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for name in names:
        for member in GROUPS.get(name, (name,)):
            if member not in METRICS:
                known = ", ".join([*METRICS, *GROUPS])
                raise UsageError(f"eval.metrics: unknown metric {name!r}; known: {known}")
            if member not in out:
                out.append(member)
    return out


def score_names(names: str | Sequence[str]) -> list[str]:
    """The score names the given metrics produce (the first is the headline score)."""
    return [score for name in expand_metric_names(names) for score in SCORES[name]]


def compute_metrics(
    names: str | Sequence[str], predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> MetricResult:
    """Runs the named metrics and merges their scores.

    Args:
        names: metric or group names (see the module table).
        predictions: one generated string per sample.
        references: the acceptable answers of each sample (at least one).

    Returns:
        All scores, and one merged dict of per-sample scores per sample.
    """
    merged = MetricResult({}, [{} for _ in predictions])
    for name in expand_metric_names(names):
        result = METRICS[name](predictions, references)
        merged.scores.update(result.scores)
        for row, extra in zip(merged.per_sample, result.per_sample):
            row.update(extra)
    return merged
