"""Answer scoring: the standard VQA answer normalisation and accuracy against several accepted answers.

The one answer normalisation of vtrlab (notebooks, reduction sweeps, the lmms-eval task export).

``normalize_answer`` follows the official VQA evaluation (``vqaEval.py``, Antol et al. 2015):
newlines/tabs to spaces, punctuation removed or replaced by a space (commas inside numbers
dropped, periods kept only between digits), lower case, number words zero..ten → digits,
articles (a, an, the) dropped, contractions written with their apostrophe ("dont" → "don't").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

METRICS = ("exact", "vqa")
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _punctuation(text: str) -> str:
    out = text
    comma_number = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma_number:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The VQA evaluation's normalisation of one answer string (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"answer {text!r} is {type(text).__name__}, not a string")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def answer_accuracy(prediction: str, answers: Sequence[str], metric: str = "exact") -> float:
    """Accuracy of one predicted answer against the accepted ``answers`` (both normalised).

    ``exact``: 1.0 if the prediction equals any accepted answer, else 0.0. ``vqa``: the VQA
    consensus score, the mean over leave-one-out subsets of min(1, #matches / 3); it needs the
    human answers with their repeats (VQA gives 10 per question), at least 4.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; accepted: {', '.join(METRICS)}")
    if isinstance(answers, str) or not len(answers):
        raise ValueError(f"answers={answers!r}: need a non-empty list of accepted answers")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if metric == "exact":
        return float(pred in gts)
    if len(gts) < 4:
        raise ValueError(
            f"metric='vqa' needs the human answers with repeats (at least 4, VQA has 10); got "
            f"{len(gts)}: {list(answers)}. Use metric='exact' for a list of accepted answers"
        )
    scores = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return float(np.mean(scores))


def accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]], metric: str = "exact") -> np.ndarray:
    """Per-sample ``answer_accuracy`` (float array); ``answers[i]`` lists sample i's accepted answers."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists")
    return np.array([answer_accuracy(p, a, metric) for p, a in zip(predictions, answers)], dtype=np.float64)
