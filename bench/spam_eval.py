"""How well mailkit.spam separates spam from ham, and how fast it scores.

    .venv/bin/python bench/spam_eval.py                 # 5-fold CV on ../shared/corpus/spam/dev
    .venv/bin/python bench/spam_eval.py FOLDER          # the trained model on FOLDER/{spam,ham}
    .venv/bin/python bench/spam_eval.py --cv FOLDER     # 5-fold CV on another labelled folder

Cross-validation never scores a message with a model that saw it, nor one
whose near-duplicate body (spam_train.near_duplicate_groups) it saw: folds keep
groups whole and each class evenly spread, and are the same on every run.
Each training part fits its own calibration and strict threshold on its own
out-of-fold scores, exactly as `python -m mailkit.spam_train` does.

Printed: precision, recall, F1 and false-positive rate at the default
THRESHOLD and at the strict threshold (the service's: where a 95 % upper bound of the training folds' FPR is 0.5 %,
with 95 % intervals), the reliability table (do scores mean probabilities?), how often each
indicator fires, and scoring throughput: `Model.score` on parsed messages,
one core, per CPU second (the wall-clock rate beside it). The baseline in
the same run is multinomial naive Bayes over the words of every header and
the body (each counted once per message): the classic filter, and one that
reads all the corpus's collection artifacts.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mailkit import mime, spam, spam_train  # noqa: E402  (the project root is not on sys.path for a plain script)

DEV = ROOT.parent / 'shared' / 'corpus' / 'spam' / 'dev'
FOLDS = 5
TARGET_FPR = 0.005
TARGET_RECALL = 0.97
TARGET_RATE = 500          # messages/s, one core


# ------------------------------------------------------------ corpus

class Corpus:
    """A labelled folder parsed once, with everything the folds reuse."""

    def __init__(self, folder: Path):
        examples = spam_train.read_labelled(folder)
        self.names = [name for name, _, _ in examples]
        self.labels = [label for _, label, _ in examples]
        self.raw = [raw for _, _, raw in examples]
        self.parsed = [mime.parse(raw) for raw in self.raw]
        self.groups = spam_train.near_duplicate_groups(self.parsed)

    def features(self):
        self.tokens = [spam.tokens(p) for p in self.parsed]
        self.offsets = [spam_train.rule_log_odds(p) for p in self.parsed]

    def __len__(self) -> int:
        return len(self.labels)


# ----------------------------------------------------------- figures

def confusion(scores, labels, threshold):
    tp = sum(1 for s, y in zip(scores, labels) if y and s >= threshold)
    fp = sum(1 for s, y in zip(scores, labels) if not y and s >= threshold)
    positives = sum(labels)
    return tp, fp, positives - tp, len(labels) - positives - fp


def figures(tp, fp, fn, tn) -> str:
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    fpr = fp / (fp + tn) if fp + tn else 0.0
    return (f'precision {precision:.4f}  recall {recall:.4f}  F1 {f1:.4f}  FPR {fpr:.4f}'
            f'  (spam caught {tp}/{tp + fn}, ham flagged {fp}/{fp + tn})')


def interval(hits: int, total: int) -> str:
    """hits/total as a percentage with its two-sided 95 % Clopper-Pearson interval."""
    low = 1 - spam_train.fpr_upper_bound(total - hits, total, 0.975) if hits else 0.0
    high = spam_train.fpr_upper_bound(hits, total, 0.975)
    return f'{hits / total:.2%} (95 % CI {low:.2%} - {high:.2%}, {hits} of {total})'


def recall_at_fpr(scores, labels, max_fpr) -> float:
    """Recall at the best threshold with FPR <= max_fpr, chosen on these scores (an upper bound)."""
    threshold = spam_train.threshold_for_fpr(scores, labels, max_fpr)
    tp, _, fn, _ = confusion(scores, labels, threshold)
    return tp / (tp + fn)


def reliability(scores, labels, bins=10) -> list[str]:
    lines = ['  score bin     messages  mean score  spam share']
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = [(s, y) for s, y in zip(scores, labels) if low <= s < high or (b == bins - 1 and s == 1.0)]
        if not inside:
            lines.append(f'  {low:.1f} - {high:.1f}   {0:8d}')
            continue
        mean = sum(s for s, _ in inside) / len(inside)
        share = sum(y for _, y in inside) / len(inside)
        lines.append(f'  {low:.1f} - {high:.1f}   {len(inside):8d}  {mean:10.3f}  {share:10.3f}')
    brier = sum((s - y) ** 2 for s, y in zip(scores, labels)) / len(labels)
    lines.append(f'  Brier score {brier:.4f} (0 is perfect; always saying the base rate gives '
                 f'{_base_rate_brier(labels):.4f})')
    return lines


def _base_rate_brier(labels) -> float:
    rate = sum(labels) / len(labels)
    return rate * (1 - rate)


def throughput(model, parsed) -> tuple[float, float]:
    """Messages per second through Model.score, best of three passes: (by CPU time, by wall time).

    The CPU-time rate is what one core gives and is the one held to the target: on this shared
    2-core machine the wall-time rate is the share of a core the other engineers' jobs leave
    (414 msg/s at load ~10 for the same scorer that does ~1,300 quiet).
    """
    best_cpu = best_wall = math.inf
    for _ in range(3):
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        for p in parsed:
            model.score(p)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return len(parsed) / best_cpu, len(parsed) / best_wall


# ---------------------------------------------------------- baseline

_BASELINE_WORD = re.compile(r"[a-z0-9$'!-]{2,20}")


def baseline_tokens(raw: bytes) -> list[str]:
    """Words of the whole message: every header (collection artifacts included) and the body."""
    parsed = mime.parse(raw)
    text = ' '.join(f'{name} {value}' for name, value in parsed.headers)
    text += ' ' + (parsed.text or '') + ' ' + spam._html_text(parsed.html or '')
    return _BASELINE_WORD.findall(text[:200_000].lower())


def baseline_cv(corpus: Corpus, folds) -> list[float]:
    """Out-of-fold multinomial naive Bayes log-odds (Laplace smoothing), each word counted once per message.

    Counting every occurrence instead ranked worse here (56 % recall at 0.5 % FPR against 78 %).
    """
    bags = [Counter(dict.fromkeys(baseline_tokens(raw), 1)) for raw in corpus.raw]
    scores = [0.0] * len(corpus)
    for fold in range(FOLDS):
        counts = (Counter(), Counter())
        docs = [0, 0]
        for i, bag in enumerate(bags):
            if folds[i] != fold:
                counts[corpus.labels[i]].update(bag)
                docs[corpus.labels[i]] += 1
        vocabulary = len(set(counts[0]) | set(counts[1]))
        totals = [sum(c.values()) + vocabulary for c in counts]
        prior = math.log(docs[1] / docs[0])
        for i, bag in enumerate(bags):
            if folds[i] == fold:
                scores[i] = prior + sum(n * (math.log((counts[1][w] + 1) / totals[1])
                                             - math.log((counts[0][w] + 1) / totals[0]))
                                        for w, n in bag.items())
    return scores


# ------------------------------------------------------- evaluations

def cross_validate(folder: Path) -> int:
    start = time.perf_counter()
    corpus = Corpus(folder)
    corpus.features()
    folds = spam_train.group_folds(corpus.labels, corpus.groups, FOLDS)
    grouped = len(corpus) - len(set(corpus.groups))
    print(f'{folder}: {sum(corpus.labels)} spam, {len(corpus) - sum(corpus.labels)} ham; '
          f'{grouped} near-duplicate messages kept in their group\'s fold; {FOLDS} folds')

    scores = [0.0] * len(corpus)
    strict_hits = [False] * len(corpus)
    indicators: list[list[str]] = [[] for _ in range(len(corpus))]
    test_parsed, models = [], []
    fit_seconds = 0.0
    for fold in range(FOLDS):
        inside = [i for i in range(len(corpus)) if folds[i] != fold]
        outside = [i for i in range(len(corpus)) if folds[i] == fold]
        began = time.perf_counter()
        model = spam_train.fit([corpus.tokens[i] for i in inside], [corpus.labels[i] for i in inside],
                               [corpus.groups[i] for i in inside], [corpus.offsets[i] for i in inside])
        fit_seconds += time.perf_counter() - began
        for i in outside:
            verdict = model.score(corpus.parsed[i])
            scores[i], indicators[i] = verdict.spam_score, verdict.indicators
            strict_hits[i] = scores[i] >= model.strict_threshold
        models.append((model, [corpus.parsed[i] for i in outside]))
        test_parsed.extend(corpus.parsed[i] for i in outside)
    labels = corpus.labels

    print(f'\nAt THRESHOLD {spam.THRESHOLD}:')
    print('  ' + figures(*confusion(scores, labels, spam.THRESHOLD)))
    print(f'At each fold\'s strict threshold (the service threshold; chosen on its training folds so that a 95 % upper bound of '
          f'their FPR is <= {TARGET_FPR:.1%}), on the held-out fold:')
    tp = sum(1 for h, y in zip(strict_hits, labels) if h and y)
    fp = sum(1 for h, y in zip(strict_hits, labels) if h and not y)
    strict = (tp, fp, sum(labels) - tp, len(labels) - sum(labels) - fp)
    print('  ' + figures(*strict))
    print(f'  FPR {interval(strict[1], strict[1] + strict[3])}   recall {interval(strict[0], strict[0] + strict[2])}')
    print(f'  thresholds: {", ".join(f"{m.strict_threshold:.3f}" for m, _ in models)}')
    ours = recall_at_fpr(scores, labels, TARGET_FPR)
    base = recall_at_fpr(baseline_cv(corpus, folds), labels, TARGET_FPR)
    print(f'Recall at FPR <= {TARGET_FPR:.1%}, threshold picked on the pooled test scores (ranking only): '
          f'{ours:.4f}  (baseline multinomial NB over all headers + body: {base:.4f})')

    print('\nReliability (pooled out-of-fold scores):')
    print('\n'.join(reliability(scores, labels)))

    print('\nIndicators (out-of-fold verdicts; messages each fired on, and the log-odds it adds):')
    for code, fired_spam, fired_ham in indicator_counts(indicators, labels):
        weight = spam.RULE_WEIGHTS.get(code)
        print(f'  {code:26s} spam {fired_spam:5d}   ham {fired_ham:5d}   '
              + (f'{weight:+.1f}' if weight is not None else 'calibrated'))

    rate, wall_rate = throughput(models[0][0], test_parsed)
    base_rate = baseline_rate(corpus)
    print(f'\nspam.score  {rate:.0f} msg/s of CPU time ({wall_rate:.0f} msg/s by the wall clock, load '
          f'{os.getloadavg()[0]:.1f}); {rate / base_rate:.2f}x the baseline\'s tokenize+score, {base_rate:.0f} '
          f'msg/s; one core, parsed message in, verdict out')
    print(f'training: {fit_seconds / FOLDS:.1f} s per fold; whole run {time.perf_counter() - start:.0f} s')

    strict_recall = strict[0] / sum(labels)
    strict_fpr = strict[1] / (len(labels) - sum(labels))
    met = strict_fpr <= TARGET_FPR and strict_recall >= TARGET_RECALL and rate >= TARGET_RATE
    print()
    for target, ok in ((f'strict FPR <= {TARGET_FPR:.1%}', strict_fpr <= TARGET_FPR),
                       (f'recall >= {TARGET_RECALL:.0%}', strict_recall >= TARGET_RECALL),
                       (f'>= {TARGET_RATE} msg/s', rate >= TARGET_RATE)):
        print(f'{target} {"met" if ok else "NOT MET"}')
    return 0 if met else 1


def indicator_counts(indicators, labels):
    fired = {code: [0, 0] for code in spam.INDICATORS}
    for codes, label in zip(indicators, labels):
        for code in codes:
            fired[code][label] += 1
    return [(code, counts[1], counts[0]) for code, counts in fired.items()]


def baseline_rate(corpus: Corpus) -> float:
    """Messages per CPU second of the baseline's tokenizer plus a dict-lookup score, for the ratio."""
    weights = {}
    start = time.process_time()
    for raw in corpus.raw[:1000]:
        sum(weights.get(w, 0.0) for w in baseline_tokens(raw))
    return min(1000, len(corpus)) / (time.process_time() - start)


def evaluate_model(folder: Path, model_path: Path) -> int:
    model = spam.Model.load(model_path)
    corpus = Corpus(folder)
    scores = [model.score(p).spam_score for p in corpus.parsed]
    labels = corpus.labels
    print(f'{model_path.name} on {folder}: {sum(labels)} spam, {len(labels) - sum(labels)} ham')
    if model.training.get('source') == folder.resolve().name:
        print(f'  (the model was trained on a folder named {folder.resolve().name!r}: if it is this one, '
              f'these figures are in-sample; run without FOLDER for cross-validation)')
    print(f'At THRESHOLD {spam.THRESHOLD}:')
    print('  ' + figures(*confusion(scores, labels, spam.THRESHOLD)))
    print(f'At the model\'s strict threshold {model.strict_threshold:.3f}:')
    print('  ' + figures(*confusion(scores, labels, model.strict_threshold)))
    print('Reliability:')
    print('\n'.join(reliability(scores, labels)))
    rate, wall_rate = throughput(model, corpus.parsed)
    print(f'spam.score  {rate:.0f} msg/s of CPU time, {wall_rate:.0f} by the wall clock (one core)')
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('folder', nargs='?', type=Path, help='labelled folder with spam/ and ham/')
    parser.add_argument('--cv', action='store_true', help='cross-validate on FOLDER instead')
    parser.add_argument('--model', type=Path, default=spam.DEFAULT_MODEL)
    args = parser.parse_args(argv)
    if args.folder is None or args.cv:
        folder = args.folder or DEV
        if not folder.is_dir():
            print(f'no labelled corpus at {folder}: see ../shared/corpus/README.md', file=sys.stderr)
            return 2
        return cross_validate(folder)
    return evaluate_model(args.folder, args.model)


if __name__ == '__main__':
    sys.exit(main())
