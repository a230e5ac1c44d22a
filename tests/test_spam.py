"""mailkit.spam and mailkit.spam_train: each indicator on a crafted message, tenant learning, the model
file and its training, then the corpora.

The base model is data/spam_base.json, made by
`python -m mailkit.spam_train ../shared/corpus/spam/dev data/spam_base.json`.
The corpora live outside the project (see shared/corpus/README.md); only the
tests that read them skip when that folder is absent.
"""
import base64
import io
import json
import os
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from mailkit import mime, spam, spam_train

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / 'shared' / 'corpus'
DEV = CORPUS / 'spam' / 'dev'
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f'mail corpus not found at {CORPUS}')


@pytest.fixture(scope='module')
def model():
    path = ROOT / 'data' / 'spam_base.json'
    assert path.is_file(), f'{path} is missing: python -m mailkit.spam_train ../shared/corpus/spam/dev {path}'
    return spam.Model.load(path)


def build(subject='Lunch on Friday?', sender='Ann Example <ann@example.com>', to='bob@example.org',
          text='Shall we try the new place? It opens at noon.\n\nAnn\n', html=None,
          headers=(), attachments=()) -> mime.ParsedMessage:
    """A parsed message from parts: multipart when there is HTML or an attachment."""
    head = [f'From: {sender}', f'To: {to}', f'Subject: {subject}',
            'Date: Tue, 04 Mar 2025 10:00:00 +0100', 'Message-ID: <m1@example.com>', 'MIME-Version: 1.0',
            *headers]
    parts = []
    if text is not None:
        parts.append('Content-Type: text/plain; charset=utf-8\n\n' + text)
    if html is not None:
        parts.append('Content-Type: text/html; charset=utf-8\n\n' + html)
    for filename, content_type, data in attachments:
        encoded = base64.encodebytes(data).decode()
        parts.append(f'Content-Type: {content_type}; name="{filename}"\nContent-Transfer-Encoding: base64\n'
                     f'Content-Disposition: attachment; filename="{filename}"\n\n{encoded}')
    if len(parts) == 1:
        raw = '\n'.join(head) + '\n' + parts[0]
    else:
        body = ''.join(f'--b0undary\n{part}\n' for part in parts) + '--b0undary--\n'
        raw = '\n'.join(head) + '\nContent-Type: multipart/mixed; boundary="b0undary"\n\n' + body
    return mime.parse(raw.encode('utf-8'))


CLEAN = dict()   # build() defaults: a short personal note


def test_clean_message_has_no_indicators(model):
    verdict = model.score(build(**CLEAN))
    assert verdict.indicators == []
    # Two lines carry little evidence either way, so the score stays near the training
    # corpus's base rate (31 % spam): calibrated, not confident.
    assert not verdict.is_spam and verdict.spam_score < 0.45
    assert set(verdict.details) >= {'statistical', 'rules', 'log_odds', 'threshold'}


# --------------------------------------------------------------- indicators

def html_link(href, text):
    return f'<html><body><p>Please review your statement.</p><a href="{href}">{text}</a></body></html>'


INDICATOR_CASES = {
    'ip_url': dict(html=html_link('http://185.23.4.7/statement', 'View statement')),
    'url_text_mismatch': dict(html=html_link('http://track.evil-example.net/x', 'https://www.mybank.com/login')),
    'punycode_domain': dict(html=html_link('http://xn--mnchen-3ya.example/', 'Open')),
    'lookalike_domain': dict(html=html_link('https://www.paypa1.com/signin', 'Open')),
    'potential_phishing_url': dict(html=html_link('http://paypal.com.account-check.example/', 'Open')),
    'reply_to_mismatch': dict(headers=('Reply-To: payments@freemail.example',)),
    'display_name_spoof': dict(sender='"PayPal Service" <notice@mailer.example>'),
    'dangerous_attachment': dict(attachments=[('invoice.pdf.exe', 'application/octet-stream', b'MZ' + b'\0' * 64)]),
    'auth_failed': dict(headers=('Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=example.com; '
                                 'dkim=fail header.d=example.com; dmarc=fail header.from=example.com',)),
    'credential_request': dict(text='Your account has been suspended. Verify your account within 24 hours.\n'),
    'bulk_without_unsubscribe': dict(headers=('Precedence: bulk',)),
}


@pytest.mark.parametrize('code', sorted(INDICATOR_CASES))
def test_indicator_fires_on_its_crafted_message(model, code):
    verdict = model.score(build(**INDICATOR_CASES[code]))
    assert code in verdict.indicators, verdict.details
    assert verdict.details['rules'][code] == {'log_odds': spam.RULE_WEIGHTS[code],
                                              'evidence': verdict.details['rules'][code]['evidence']}
    assert verdict.details['rules'][code]['evidence']
    if spam.RULE_WEIGHTS[code] > 0:     # bulk_without_unsubscribe only reports (see the module docstring)
        assert verdict.spam_score > model.score(build(**CLEAN)).spam_score


def test_every_indicator_has_a_crafted_case():
    assert set(INDICATOR_CASES) | {'statistical'} == set(spam.INDICATORS)


def test_statistical_indicator_fires_on_spammy_text(model):
    verdict = model.score(build(
        subject='LOSE 30 POUNDS IN 30 DAYS... GUARANTEED!!!', sender='Diet Offers <offers4u@example.com>',
        text=None, html='<html><body><center><font color="red" size="5"><b>LOSE WEIGHT FAST! GUARANTEED!'
                        '</b></font><br>All natural, no diet. Order now and get a FREE bonus bottle! '
                        '<a href="http://www.example.com/order">Click here to order</a><br><font size="1">'
                        'To be removed from our mailing list click here.</font></center></body></html>'))
    assert 'statistical' in verdict.indicators and verdict.is_spam, verdict.details


@pytest.mark.parametrize('href,text', [
    ('https://www.paypal.com/signin', 'https://www.paypal.com/signin'),   # the real thing
    ('https://click.example.com/r/1', 'www.example.com'),                 # the sender's own click tracker
    ('https://www.google-analytics.com/x', 'Open'),                       # a brand's other domain
    ('https://username:password@example.com/', 'example'),                # userinfo without a lure
])
def test_link_rules_do_not_fire_on_honest_links(model, href, text):
    verdict = model.score(build(html=html_link(href, text)))
    assert not {'ip_url', 'url_text_mismatch', 'punycode_domain', 'lookalike_domain',
                'potential_phishing_url'} & set(verdict.indicators), verdict.details['rules']


def test_mailing_list_reply_to_is_not_a_mismatch(model):
    parsed = build(to='fans@lists.example.org', headers=('Reply-To: fans@lists.example.org',
                                                         'List-Unsubscribe: <mailto:leave@lists.example.org>'))
    assert 'reply_to_mismatch' not in model.score(parsed).indicators


def test_a_person_called_chase_is_not_a_bank(model):
    assert model.score(build(sender='Chase Miller <chase@example.com>')).indicators == []


@pytest.mark.parametrize('filename,content_type,data', [
    ('report.docm', 'application/octet-stream', b'PK\x03\x04 not really a zip'),
    ('setup.bin', 'application/octet-stream', b'MZ\x90\x00' + b'\0' * 56 + b'PE\0\0' + b'\0' * 64),
    ('invoice.zip', 'application/zip', None),        # a ZIP holding a script
])
def test_dangerous_attachments_by_name_and_by_content(model, filename, content_type, data):
    if data is None:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, 'w') as archive:
            archive.writestr('invoice.js', 'WScript.Echo(1)')
        data = buffer.getvalue()
    verdict = model.score(build(attachments=[(filename, content_type, data)]))
    assert 'dangerous_attachment' in verdict.indicators


def test_double_extension_is_named_in_the_evidence(model):
    verdict = model.score(build(**INDICATOR_CASES['dangerous_attachment']))
    assert 'double extension' in verdict.details['rules']['dangerous_attachment']['evidence']


def test_harmless_attachments_are_not_dangerous(model):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as archive:
        archive.writestr('photos/beach.jpg', b'\xff\xd8\xff')
    verdict = model.score(build(attachments=[('minutes.pdf', 'application/pdf', b'%PDF-1.7\n'),
                                             ('photos.zip', 'application/zip', buffer.getvalue()),
                                             ('export.csv.gz', 'application/gzip', b'\x1f\x8b\x08\x00')]))
    assert 'dangerous_attachment' not in verdict.indicators


def test_softfail_and_pass_are_not_auth_failures(model):
    parsed = build(headers=('Authentication-Results: mx.example.org; spf=softfail; dkim=pass; dmarc=pass',
                            'Received-SPF: Pass (mx.example.org: domain of example.com designates 192.0.2.1)'))
    assert 'auth_failed' not in model.score(parsed).indicators


def test_received_spf_fail_is_an_auth_failure(model):
    parsed = build(headers=('Received-SPF: Fail (mx.example.org: domain of example.com does not designate '
                            '192.0.2.1 as permitted sender)',))
    assert 'auth_failed' in model.score(parsed).indicators


# ---------------------------------------------------------- tenant learning

NEWSLETTER = dict(subject='Exclusive offer: 40% off garden furniture this weekend only',
                  sender='Garden World <news@gardenworld.example>',
                  html='<html><body><h1>Summer sale!</h1><p>Save 40% on all garden furniture. Free delivery '
                       'on orders over $50. Limited time offer, order now!</p>'
                       '<a href="http://www.gardenworld.example/sale">Shop the sale</a>'
                       '<p>To unsubscribe click here.</p></body></html>', text=None)
OTHER = dict(subject='Minutes of the board meeting', sender='Carol <carol@example.net>',
             text='Attached are the minutes. The next meeting is on the 14th.\n')


def test_reports_move_only_the_tenant_that_made_them(model):
    newsletter, other = build(**NEWSLETTER), build(**OTHER)
    weights_before = dict(model.weights)
    base = model.score(newsletter)
    assert base.is_spam                           # a sales mail, by its words
    tenant_a, tenant_b = spam.Delta(), spam.Delta()
    tenant_a.learn(newsletter, 'ham', model)      # tenant A subscribed to this newsletter
    a_after_own_report = tenant_a.to_dict()
    tenant_b.learn(other, 'spam', model)          # tenant B reports something else
    with_a = model.score(newsletter, delta=tenant_a)
    with_b = model.score(newsletter, delta=tenant_b)
    assert not with_a.is_spam and with_a.spam_score < 0.1, with_a.spam_score
    assert model.score(newsletter).spam_score == base.spam_score      # without a Delta: the base, untouched
    assert model.weights == weights_before
    assert tenant_a.to_dict() == a_after_own_report                   # B's report did not reach A
    # B's Delta only knows B's report: the newsletter stays spam for B.
    assert with_b.is_spam and abs(with_b.details['log_odds'] - base.details['log_odds']) < 1.0
    assert model.score(other, delta=tenant_b).spam_score > model.score(other).spam_score


def test_a_spam_report_makes_the_same_campaign_spam(model):
    campaign = dict(OTHER, subject='Your parcel is waiting', sender='Parcel Desk <desk@parcels.example>',
                    text='We tried to deliver parcel 88231 today. Book a new delivery slot at parcels.example '
                         'before Friday or it goes back to the depot.\n')
    second_text = campaign['text'].replace('today', 'this morning').replace('Friday', 'Monday')
    first, second = build(**campaign), build(**dict(campaign, text=second_text))
    tenant = spam.Delta()
    assert not model.score(second).is_spam
    tenant.learn(first, 'spam', model)
    assert model.score(second, delta=tenant).is_spam
    assert tenant.reports == {'spam': 1, 'ham': 0}


def test_a_report_already_agreed_with_changes_nothing(model):
    newsletter = build(**NEWSLETTER)
    assert model.score(newsletter).details['log_odds'] > spam.TENANT_MARGIN
    tenant = spam.Delta()
    tenant.learn(newsletter, 'spam', model)
    assert tenant.weights == {} and tenant.reports == {'spam': 1, 'ham': 0}


def test_delta_round_trips_through_json(model):
    tenant = spam.Delta()
    tenant.learn(build(**NEWSLETTER), 'ham', model)
    stored = json.loads(json.dumps(tenant.to_dict()))
    again = spam.Delta.from_dict(stored)
    newsletter = build(**NEWSLETTER)
    assert again.to_dict() == tenant.to_dict()
    assert model.score(newsletter, delta=again).spam_score == pytest.approx(
        model.score(newsletter, delta=tenant).spam_score, abs=1e-4)   # weights stored to 6 decimals
    assert spam.Delta.from_dict({}).to_dict()['weights'] == {}
    with pytest.raises(ValueError):
        spam.Delta.from_dict({'format': 'something else'})
    with pytest.raises(ValueError):
        tenant.learn(newsletter, 'phishing', model)


def test_sender_tokens_are_learned_per_tenant_but_not_in_the_base(model):
    assert not any(token.startswith(spam_train.BASE_EXCLUDED_PREFIXES) for token in model.weights)
    tenant = spam.Delta()
    tenant.learn(build(**NEWSLETTER), 'ham', model)
    assert 'sender:gardenworld.example' in tenant.weights


# ------------------------------------------------------------ robustness

@needs_corpus
def test_every_mime_corpus_message_scores(model):
    paths = sorted((CORPUS / 'mime').rglob('*.eml'))
    assert len(paths) == 426
    for path in paths:
        verdict = model.score(mime.parse(path.read_bytes()))
        assert 0.0 <= verdict.spam_score <= 1.0, path
        assert set(verdict.indicators) <= set(spam.INDICATORS), path
        json.dumps(verdict.details)     # details are JSON-able for the API and the database


def big_message(megabytes: int = 25) -> bytes:
    """A hostile message: megabytes of text, HTML full of links and tags, and a big attachment."""
    size = megabytes << 20
    text = ('buy now http://example.com/x?id=1 cheap pills ' * (size // 3 // 46)).encode()
    html = ('<a href="http://192.0.2.1/x">www.bank.example</a><font color=red><b>free</b></font>'
            * (size // 3 // 80)).encode()
    blob = base64.encodebytes(os.urandom(size // 4))
    return (b'From: "Big" <big@example.com>\nSubject: big\nMIME-Version: 1.0\n'
            b'Content-Type: multipart/mixed; boundary="x"\n\n'
            b'--x\nContent-Type: text/plain\n\n' + text + b'\n--x\nContent-Type: text/html\n\n' + html
            + b'\n--x\nContent-Type: application/octet-stream; name="a.bin"\nContent-Transfer-Encoding: base64\n\n'
            + blob + b'\n--x--\n')


def test_a_25_mb_message_scores_in_bounded_time_and_memory(model):
    raw = big_message(25)
    assert len(raw) >= 25 << 20
    parsed = mime.parse(raw)
    # CPU time of this process: the work the caps bound, not the other processes sharing the cores
    # (wall time failed the ratio below once while other test suites loaded this 2-core machine).
    start = time.process_time()
    tracemalloc.start()
    verdict = model.score(parsed)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    elapsed = time.process_time() - start
    assert elapsed < 2.0, elapsed
    assert peak < 32 << 20, peak       # the caps hold: no copy of the whole 25 MB
    assert {'ip_url', 'url_text_mismatch'} <= set(verdict.indicators)
    # It costs about what the first MAX_PART_CHARS would: the caps, not the size, set the price.
    small = mime.parse(big_message(1))
    start = time.process_time()
    model.score(small)
    assert elapsed < 5 * (time.process_time() - start) + 0.2


# ------------------------------------------------------------ the model file

def test_model_file_loads_and_says_how_it_was_made(model):
    assert model.training['source'] == 'dev'
    assert model.training['spam'] == 1138 and model.training['ham'] == 2490
    assert 0.5 < model.strict_threshold < 1.0
    a, _ = model.calibration
    assert a > 0


def test_model_file_for_another_tokenizer_is_refused(tmp_path):
    data = json.loads((ROOT / 'data' / 'spam_base.json').read_text(encoding='utf-8'))
    data['tokenizer'] = spam.TOKENIZER_VERSION + 1
    with pytest.raises(ValueError, match='retrain'):
        spam.Model.from_dict(data)


def small_labelled_folder(root: Path, per_class: int = 30) -> Path:
    for label in ('spam', 'ham'):
        (root / label).mkdir(parents=True)
        for path in sorted((DEV / label).glob('*.eml'))[:per_class]:
            (root / label / path.name).write_bytes(path.read_bytes())
    return root


@needs_corpus
def test_training_writes_the_same_bytes_every_time(tmp_path):
    folder = small_labelled_folder(tmp_path / 'corpus')
    outputs = []
    for hash_seed in ('1', '2'):     # set and dict orders must not leak into the file
        out = tmp_path / f'model-{hash_seed}.json'
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        subprocess.run([sys.executable, '-m', 'mailkit.spam_train', str(folder), str(out)],
                       cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert spam.Model.load(tmp_path / 'model-1.json').training['messages'] == 60


@needs_corpus
def test_score_command_prints_a_verdict():
    path = sorted((DEV / 'spam').glob('*.eml'))[0]
    result = subprocess.run([sys.executable, '-m', 'mailkit.spam', 'score', str(path)],
                            cwd=ROOT, check=True, capture_output=True, text=True, timeout=60)
    verdict = json.loads(result.stdout)
    assert set(verdict) == {'is_spam', 'spam_score', 'indicators', 'details'}


# ------------------------------------------------------ threshold margin

def test_fpr_upper_bound_matches_closed_forms():
    # No false positive in n: the bound solves (1 - p)^n = 1 - confidence exactly.
    assert spam_train.fpr_upper_bound(0, 2490, 0.95) == pytest.approx(1 - 0.05 ** (1 / 2490), rel=1e-9)
    # Five in 2,490: chi-square(0.95, 12 dof) / (2 n) = 21.026 / 4980, the Poisson limit (n large).
    assert spam_train.fpr_upper_bound(5, 2490, 0.95) == pytest.approx(21.026 / 4980, rel=0.01)
    assert spam_train.fpr_upper_bound(5, 2490, 0.95) > spam_train.fpr_upper_bound(5, 2490, 0.90) > 5 / 2490


def test_threshold_with_confidence_keeps_a_margin_under_the_rate():
    ham = [i / 2000 for i in range(2000)]               # 2,000 ham, scores 0 .. 0.9995
    labels = [0] * 2000
    plain = spam_train.threshold_for_fpr(ham, labels, 0.005)
    margin = spam_train.threshold_for_fpr(ham, labels, 0.005, confidence=0.95)
    flagged = lambda t: sum(1 for s in ham if s >= t)  # noqa: E731
    assert flagged(plain) == 10                         # 0.5 % of 2,000, as seen
    assert flagged(margin) < flagged(plain)
    assert spam_train.fpr_upper_bound(flagged(margin), 2000, 0.95) <= 0.005
    assert spam_train.fpr_upper_bound(flagged(margin) + 1, 2000, 0.95) > 0.005


def test_shipped_threshold_has_the_margin(model):
    """The model file's threshold lets through few enough out-of-fold ham that 0.5 % is a 95 % bound."""
    if not DEV.is_dir():
        pytest.skip(f'labelled corpus not found at {DEV}')
    assert model.training['strict_confidence'] == spam_train.STRICT_CONFIDENCE
    flagged, ham = model.training['strict_out_of_fold_ham']
    assert ham == 2490
    assert spam_train.fpr_upper_bound(flagged, ham, spam_train.STRICT_CONFIDENCE) <= spam_train.STRICT_FPR


def test_shipped_model_keeps_the_margin_on_the_corpus(model):
    """The shipped file and threshold, scored on the corpus they came from, agree with what the file records.

    In-sample figures, so only a check that file, tokenizer and corpus match: the ham the threshold flags
    here are at most the out-of-fold count the threshold was chosen on, whose 95 % bound is <= 0.5 %.
    What new mail sees is bench/spam_eval.py's cross-validation (and the floors below).
    """
    if not DEV.is_dir():
        pytest.skip(f'labelled corpus not found at {DEV} (../shared/corpus beside the project)')
    flagged = caught = spam_count = 0
    for _, label, raw in spam_train.read_labelled(DEV):
        is_spam = model.score(mime.parse(raw)).spam_score >= model.strict_threshold
        spam_count += label
        caught += label and is_spam
        flagged += not label and is_spam
    out_of_fold_flagged, ham = model.training['strict_out_of_fold_ham']
    assert flagged <= out_of_fold_flagged
    assert spam_train.fpr_upper_bound(flagged, ham, spam_train.STRICT_CONFIDENCE) <= spam_train.STRICT_FPR
    assert caught / spam_count >= 0.97, caught / spam_count


# --------------------------------------------------- cross-validated floors

CV_FOLDS = 5
# bench/spam_eval.py uses spam_train.CALIBRATION_FOLDS (10); 3 keeps this test near 30 s. Fewer
# calibration folds pick a more cautious strict threshold, so its recall is lower here.
CV_CALIBRATION_FOLDS = 3
# Measured with these settings: strict threshold (95 % upper bound of the training folds' FPR <= 0.5 %)
# recall 0.9130, FPR 0.0012 (3 of 2,490); at THRESHOLD recall 0.9824, FPR 0.0076. The floors sit a few
# messages under them; the FPR ceiling is the margin: without it the strict threshold let 0.40 % through.
FLOOR_STRICT_RECALL = 0.90
CEILING_STRICT_FPR = 0.003
FLOOR_RECALL_AT_HALF = 0.975
CEILING_FPR_AT_HALF = 0.009


@pytest.fixture(scope='module')
def cross_validated():
    if not DEV.is_dir():
        pytest.skip(f'labelled corpus not found at {DEV}')
    return cross_validate()


def cross_validate():
    """Out-of-fold scores and strict-threshold verdicts for the dev corpus (see bench/spam_eval.py)."""
    examples = spam_train.read_labelled(DEV)
    parsed = [mime.parse(raw) for _, _, raw in examples]
    labels = [label for _, label, _ in examples]
    token_lists = [spam.tokens(p) for p in parsed]
    offsets = [spam_train.rule_log_odds(p) for p in parsed]
    groups = spam_train.near_duplicate_groups(parsed)
    folds = spam_train.group_folds(labels, groups, CV_FOLDS)
    scores, strict = [0.0] * len(labels), [False] * len(labels)
    for fold in range(CV_FOLDS):
        inside = [i for i in range(len(labels)) if folds[i] != fold]
        fold_model = spam_train.fit([token_lists[i] for i in inside], [labels[i] for i in inside],
                                    [groups[i] for i in inside], [offsets[i] for i in inside],
                                    calibration_folds=CV_CALIBRATION_FOLDS)
        a, b = fold_model.calibration
        for i in range(len(labels)):
            if folds[i] == fold:
                # Model.score's arithmetic on the tokens already made; test_score_matches_its_parts checks it.
                scores[i] = spam._sigmoid(a * fold_model.logit(token_lists[i]) + b + offsets[i])
                strict[i] = scores[i] >= fold_model.strict_threshold
    return labels, scores, strict


@needs_corpus
def test_cross_validated_recall_and_false_positives_hold(cross_validated):
    labels, scores, strict = cross_validated
    spam_count, ham_count = sum(labels), len(labels) - sum(labels)
    strict_recall = sum(1 for h, y in zip(strict, labels) if h and y) / spam_count
    strict_fpr = sum(1 for h, y in zip(strict, labels) if h and not y) / ham_count
    assert strict_fpr <= CEILING_STRICT_FPR and strict_recall >= FLOOR_STRICT_RECALL, (strict_recall, strict_fpr)
    recall = sum(1 for s, y in zip(scores, labels) if y and s >= spam.THRESHOLD) / spam_count
    fpr = sum(1 for s, y in zip(scores, labels) if not y and s >= spam.THRESHOLD) / ham_count
    assert recall >= FLOOR_RECALL_AT_HALF and fpr <= CEILING_FPR_AT_HALF, (recall, fpr)


@needs_corpus
def test_scores_are_calibrated(cross_validated):
    labels, scores, _ = cross_validated
    for low, high in ((0.9, 1.01), (0.0, 0.1)):
        inside = [(s, y) for s, y in zip(scores, labels) if low <= s < high]
        mean = sum(s for s, _ in inside) / len(inside)
        share = sum(y for _, y in inside) / len(inside)
        assert abs(mean - share) < 0.03, (low, mean, share)
    high = [y for s, y in zip(scores, labels) if s >= 0.9]
    assert sum(high) / len(high) > 0.95


@needs_corpus
def test_score_matches_its_parts(model):
    for path in sorted((DEV / 'spam').glob('*.eml'))[:20] + sorted((DEV / 'ham').glob('*.eml'))[:20]:
        parsed = mime.parse(path.read_bytes())
        a, b = model.calibration
        expected = spam._sigmoid(a * model.logit(spam.tokens(parsed)) + b + spam_train.rule_log_odds(parsed))
        assert model.score(parsed).spam_score == pytest.approx(expected, abs=1e-12)
