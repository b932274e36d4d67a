"""The scores: CIDEr (captioning), VQA accuracy, ROC AUC (HatefulMemes), top-1 accuracy.

CIDEr is pycocoevalcap's: its PTB tokenizer (Stanford CoreNLP's, run with Java) over references
and predictions, then its ``Cider`` scorer (CIDEr-D), with the document frequencies of the
references of the images scored, as ``COCOEvalCap`` computes it (SPICE, which downloads models,
is not run). ROC AUC is scikit-learn's.

VQA accuracy is the official one, written here as OpenFlamingo's ``vqa_metric.py`` applies it:
both the prediction and every human answer are normalised (punctuation, number words, articles,
contractions); a prediction scores, for each human answer in turn, min(1, matches among the
*other* answers / 3), averaged over the answers; the set's score is 100 x the mean, rounded to 2
decimals. Two quirks kept for parity: the period-stripping substitution is capped at 32 matches
(the official code passes ``re.UNICODE`` where ``count`` goes), and answers are compared as whole
records, so identical records without ``answer_id`` (VizWiz, TextVQA) leave out each other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit
COMMA_IN_NUMBER = re.compile(r"\d,\d")
PERIOD_STRIP_LIMIT = 32  # re.UNICODE's value, passed as count= by the official code

# The official evaluation's contraction table, as "written:restored" pairs. Lower-case keys only:
# answers are lower-cased before the table is read, so its capitalised keys can never match.
CONTRACTION_PAIRS = """
    aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
    couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
    hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
    howd:how'd howll:how'll hows:how's isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll
    let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've
    mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock
    oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't
    shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
    shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
    somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd
    someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's
    somethingd:something'd somethingd've:something'd've something'dve:something'd've
    somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've
    therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've
    theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've
    we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's
    whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd
    whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll
    whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've
    wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
    y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've
    youll:you'll youre:you're youve:you've
"""
CONTRACTIONS = dict(pair.split(":") for pair in CONTRACTION_PAIRS.split())


def strip_punctuation(text: str) -> str:
    """Drop or space out punctuation, as the official VQA evaluation does (decided on the input text)."""
    out = text
    drop_all = COMMA_IN_NUMBER.search(text) is not None
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if drop_all or touches_space else " ")
    return PERIOD.sub("", out, count=PERIOD_STRIP_LIMIT)


def normalize_words(text: str) -> str:
    """Lower case; number words to digits; articles dropped; contractions restored."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """An answer as the VQA accuracy compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return normalize_words(strip_punctuation(answer))


def question_accuracy(prediction: str, answers: Sequence[Mapping]) -> float:
    """Accuracy of one prediction against the human answer records ({"answer": ...}), in [0, 1]."""
    records = [{**record, "answer": normalize_answer(record["answer"])} for record in answers]
    predicted = normalize_answer(prediction)
    scores = []
    for record in records:
        matches = sum(other["answer"] == predicted for other in records if other != record)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def vqa_accuracy(predictions: Sequence[Mapping], annotations: Mapping[object, Mapping]) -> float:
    """VQA accuracy in percent, rounded to 2 decimals, as OpenFlamingo reports it.

    Args:
        predictions: [{"question_id", "answer"}]; each question counts once (its last prediction).
        annotations: question_id -> the official annotation record ({"answers": [{"answer", ...}], ...}).
    """
    answered = {prediction["question_id"]: prediction["answer"] for prediction in predictions}
    if not answered:
        raise ValueError("predictions is empty")
    missing = [qid for qid in answered if qid not in annotations]
    if missing:
        raise ValueError(f"{len(missing)} predicted question ids have no annotation, e.g. {missing[0]!r}")
    scores = [question_accuracy(answer, annotations[qid]["answers"]) for qid, answer in answered.items()]
    return round(100 * sum(scores) / len(scores), 2)


def cider(predictions: Mapping[object, str], references: Mapping[object, Sequence[str]]) -> float:
    """CIDEr-D of the predicted captions (image id -> caption) against their references (image id ->
    captions), pycocoevalcap's, over the images predicted (in the references' order). Not x 100."""
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as error:
        raise ImportError("CIDEr needs pycocoevalcap (and Java): pip install 'flamingo-pytorch[eval]'") from error
    missing = [image_id for image_id in predictions if image_id not in references]
    if missing:
        raise ValueError(f"{len(missing)} predicted image ids have no references, e.g. {missing[0]!r}")
    ids = [image_id for image_id in references if image_id in predictions]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": caption} for caption in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve of ``scores`` (higher: label 1) for binary ``labels`` (scikit-learn's)."""
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError as error:
        raise ImportError("ROC AUC needs scikit-learn: pip install 'flamingo-pytorch[eval]'") from error
    return float(roc_auc_score(list(labels), list(scores)))


def top1_accuracy(labels: Sequence, predicted: Sequence) -> float:
    """The fraction of predictions equal to their label."""
    if len(labels) != len(predicted) or not labels:
        raise ValueError(f"labels ({len(labels)}) and predicted ({len(predicted)}) must be non-empty, of one length")
    return sum(label == guess for label, guess in zip(labels, predicted)) / len(labels)
