"""Answer scoring as the benchmarks' authors score: TextVQA's VQA accuracy and MagnifierBench's option letters.

TextVQA (the evaluator LLaVA-1.5 and FlexAttention report with, the EvalAI answer processor of the VQA challenge):
every answer, predicted or human, is normalised (`normalise_vqa`: lower case, punctuation, number words to
digits, articles dropped, contractions restored), and a prediction scores the mean, over the 10 ways of leaving
one human answer out, of min(1, matching remaining answers / 3) (`vqa_accuracy`).

MagnifierBench (the OtterHD authors' evaluation): the multiple-choice answer is a letter read from the generated
text by `option_letter`; the free-form answer is judged by GPT-4 in the paper, which is not reproduced here
(`freeform_match` is a local, stricter stand-in: the correct option's text inside the response).
"""

from __future__ import annotations

import re

# The VQA challenge's contractions map: a word written without its apostrophe -> the written form.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
# The official pattern is "(?!<=\d)(\.)(?!\d)": its look-behind is written as a look-ahead and never applies, so a
# period is dropped unless a digit follows it ("3.5" stays).
PERIOD = re.compile(r"\.(?!\d)")
DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # Punctuation next to a space, or any when the text has a digit comma ("1,000"), goes; otherwise it splits.
        if p + " " in text or " " + p in text or DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalise_vqa(answer: str) -> str:
    """The EvalAI answer processor: what "the same answer" means for VQA accuracy."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Mean over the human answers left out in turn of min(1, remaining answers equal to the prediction / 3)."""
    if not human_answers:
        raise ValueError("VQA accuracy needs the human answers")
    humans = [normalise_vqa(a) for a in human_answers]
    predicted = normalise_vqa(prediction)
    matches = sum(h == predicted for h in humans)
    # Leaving out a matching answer leaves matches - 1 others; leaving out any other leaves all of them.
    scores = [min(1.0, (matches - (h == predicted)) / 3) for h in humans]
    return sum(scores) / len(scores)


# ---- MagnifierBench ----------------------------------------------------------------------------------------------

LETTERS = "ABCD"
OPTION = re.compile(r"([A-D])\.\s*(.*?)\s*(?=,\s*[A-D]\.|$)", re.S)
MULTIPLE_CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


def split_instruction(instruction: str) -> tuple[str, dict[str, str]]:
    """A MagnifierBench instruction, "Question? A. x, B. y, C. z, D. w", as (question, {letter: option text})."""
    question, _, rest = instruction.partition("?")
    options = {letter: text.rstrip(".,?").strip() for letter, text in OPTION.findall(rest)}
    return question.strip() + "?", options


def multiple_choice_prompt(instruction: str) -> str:
    """The question with one option per line and the letter instruction, as FlexAttention's evaluation asks it."""
    for sep, letter in ((" ", "A"), (", ", "B"), (", ", "C"), (", ", "D")):
        instruction = instruction.replace(f"{sep}{letter}.", f"\n{letter}.")
    return instruction + MULTIPLE_CHOICE_SUFFIX


def option_letter(response: str, options: dict[str, str]) -> str:
    """The letter a response picks, in the benchmark authors' order of rules: "The answer is X"; else the first of
    A-D written in capitals anywhere; else the first option whose text the response contains; else the first of
    A-D in the upper-cased response; else "other"."""
    match = re.search(r"The answer is ([A-D])", response)
    if match:
        return match.group(1)
    for letter in LETTERS:
        if letter in response:
            return letter
    upper = response.upper()
    for letter, text in options.items():
        if text and text.upper() in upper:
            return letter
    return next((letter for letter in LETTERS if letter in upper), "other")


def freeform_match(response: str, answer: str) -> bool:
    """The correct option's text, normalised, as whole words inside the normalised free-form response."""
    truth = normalise_vqa(answer)
    return bool(truth) and f" {truth} " in f" {normalise_vqa(response)} "
