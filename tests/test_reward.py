"""Tests of rl.reward: answer pairs scored by hand, extraction, the never-raise / 1 s guarantee
(measured), the symbolic worker's hard limit, the registry and the batch API."""

import time

import pytest

from rl.reward import (REWARDS, SymbolicChecker, compute_score, compute_scores, default_checker, get_reward,
                       last_boxed, normalize_answer)


def B(x: str) -> str:
    return f"Let me work it out. The final answer is $\\boxed{{{x}}}$."


# (response, ground truth, expected reward of "math"): expected values are the MATH rules'
# verdicts, decided by hand; "0" rows mark what string matching deliberately does not accept.
PAIRS = [
    # fractions
    (B("\\frac{1}{2}"), "\\frac{1}{2}", 1), (B("\\dfrac{1}{2}"), "\\frac{1}{2}", 1),
    (B("\\tfrac{1}{2}"), "\\frac12", 1), (B("\\frac12"), "\\frac{1}{2}", 1),
    (B("1/2"), "\\frac{1}{2}", 1), (B("3/4"), "\\dfrac{3}{4}", 1), (B("\\frac{3}{4}"), "\\frac{4}{3}", 0),
    (B("\\frac{2}{4}"), "\\frac{1}{2}", 0), (B("\\frac{a}{b}"), "\\frac ab", 1), (B("-\\frac{1}{3}"), "-\\frac13", 1),
    (B("\\frac{-1}{3}"), "-\\frac{1}{3}", 0), (B("\\frac{\\sqrt{3}}{2}"), "\\frac{\\sqrt3}{2}", 1),
    (B("\\frac 3 4"), "\\frac{3}{4}", 1), (B("\\frac{\\sqrt{2}}{2}"), "\\frac{\\sqrt2}2", 1),
    (B("\\frac{\\frac{1}{2}}{3}"), "\\frac{\\frac12}{3}", 1), (B("1/-2"), "\\frac{1}{-2}", 0),
    # square roots
    (B("\\sqrt{2}"), "\\sqrt2", 1), (B("2\\sqrt{3}"), "2\\sqrt3", 1), (B("\\sqrt{12}"), "2\\sqrt{3}", 0),
    (B("\\sqrt[3]{2}"), "\\sqrt[3]{2}", 1), (B("3\\sqrt{2}"), "\\sqrt{2}", 0),
    # decimals vs fractions
    (B("0.5"), "\\frac{1}{2}", 1), (B(".5"), "\\frac12", 1), (B("0.50"), "\\frac{1}{2}", 0),
    (B("0.25"), "\\frac{1}{4}", 0), (B("3.14"), "3.14", 1), (B(".75"), "0.75", 1), (B("-.5"), "-0.5", 1),
    # units and \text{}
    (B("5 \\text{ cm}"), "5", 1), (B("5\\text{ cm}"), "5", 1), (B("5 \\text{cm}"), "5", 1),
    (B("12\\mbox{ inches}"), "12", 1), (B("\\text{Monday}"), "\\text{Monday}", 1), (B("Monday"), "\\text{Monday}", 1),
    (B("\\text{Tuesday}"), "\\text{Monday}", 0), (B("\\$18.90"), "18.90", 1), (B("\\$5"), "5", 1),
    (B("10 \\text{ square units}"), "10", 1), (B("5 \\, \\text{cm}"), "5", 1), (B("6 \\text{ cm}"), "5", 0),
    # degrees
    (B("45^\\circ"), "45", 1), (B("45^{\\circ}"), "45^\\circ", 1), (B("45°"), "45", 1), (B("90^\\circ"), "45^\\circ", 0),
    # percent
    (B("15\\%"), "15", 1), (B("15%"), "15\\%", 1), (B("25\\%"), "15", 0),
    # negatives
    (B("-5"), "-5", 1), (B("- 5"), "-5", 1), (B("5"), "-5", 0), (B("-3"), "3", 0),
    # `x = ` prefixes
    (B("x = 5"), "5", 1), (B("x=5"), "5", 1), (B("k = -2"), "-2", 1), (B("5"), "x=5", 1),
    (B("xyz = 5"), "5", 0), (B("y = 2x + 3"), "2x+3", 1),
    # intervals
    (B("(2, 3)"), "(2,3)", 1), (B("[2, 3)"), "(2,3)", 0), (B("(-\\infty, 3]"), "(-\\infty,3]", 1),
    (B("\\left(-\\infty, 3\\right]"), "(-\\infty,3]", 1), (B("[0, \\infty)"), "[0,\\infty)", 1),
    (B("(-\\infty, -1) \\cup (1, \\infty)"), "(-\\infty,-1)\\cup(1,\\infty)", 1),
    # multiple choice letters
    (B("\\text{(B)}"), "\\text{(B)}", 1), (B("B"), "\\text{(B)}", 1), (B("(B)"), "\\text{(B)}", 1),
    (B("\\textbf{(B)}"), "\\text{(B)}", 1), (B("C"), "\\text{(B)}", 0), (B("\\text{(A)}"), "A", 1),
    # matrices
    (B("\\begin{pmatrix} 11 \\\\ 4 \\end{pmatrix}"), "\\begin{pmatrix}11\\\\4\\end{pmatrix}", 1),
    (B("\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}"), "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", 1),
    (B("\\begin{pmatrix} 4 \\\\ 11 \\end{pmatrix}"), "\\begin{pmatrix} 11 \\\\ 4 \\end{pmatrix}", 0),
    # missing or malformed boxes
    ("The answer is 5.", "5", 0), ("The answer is \\boxed{5", "5", 0), ("\\boxed{}", "5", 0), ("", "5", 0),
    ("\\boxed5", "5", 1), ("so $\\boxed 5$.", "5", 1), ("\\boxedfoo{5}", "5", 0),
    ("\\boxed{5} and then \\boxed{6", "5", 0), ("\\boxed{ }", "5", 0),
    # several boxes: the last one wins; \fbox counts as a box
    ("\\boxed{4} no wait \\boxed{5}", "5", 1), ("\\boxed{5} no wait \\boxed{4}", "5", 0), ("\\fbox{5}", "5", 1),
    ("\\boxed{3} then \\fbox{5}", "5", 1), ("\\fbox{3} then \\boxed{5}", "5", 1),
    # thousands separators, tuples, sets, constants, whitespace, expressions
    (B("1,000"), "1000", 1), (B("10,\\!000"), "10000", 1), (B("(2, -3)"), "(2,-3)", 1),
    (B("\\left( 2, -3 \\right)"), "(2,-3)", 1), (B("2, 3"), "3, 2", 0), (B("\\pi"), "\\pi", 1), (B("2\\pi"), "\\pi", 0),
    (B("\\{1, 2\\}"), "\\{1,2\\}", 1), ("\\boxed{\n\\dfrac{1}{2}\n}", "\\frac12", 1),
    (B("\\displaystyle \\frac{1}{2}"), "\\frac12", 1), (B("x^2+2x+1"), "x^2 + 2x + 1", 1),
    (B("(x+1)^2"), "x^2+2x+1", 0), (B("a"), "A", 0), (B("$\\sqrt{3}$"), "$\\sqrt{3}$", 1),
]


def test_there_are_at_least_80_pairs():
    assert len(PAIRS) >= 80


@pytest.mark.parametrize("response, ground_truth, expected", PAIRS)
def test_math_reward_pairs(response, ground_truth, expected):
    assert compute_score(response, ground_truth) == float(expected)
    assert get_reward("math")(response, ground_truth) == float(expected)


# Pairs that string rules reject and the symbolic second opinion accepts (or still rejects).
SYMBOLIC = [
    (B("0.25"), "\\frac{1}{4}", 1), (B("0.50"), "\\frac{1}{2}", 1), (B("\\frac{2}{4}"), "\\frac{1}{2}", 1),
    (B("\\sqrt{12}"), "2\\sqrt{3}", 1), (B("(x+1)^2"), "x^2+2x+1", 1), (B("\\frac{-1}{3}"), "-\\frac{1}{3}", 1),
    (B("3"), "4", 0), (B("\\sqrt{11}"), "2\\sqrt{3}", 0), ("no box, 0.25", "\\frac14", 0),
]


@pytest.fixture(scope="module")
def warm_checker():
    checker = default_checker()
    assert checker.warmup(timeout_s=60), "math-verify worker did not start (is math-verify installed?)"
    return checker


@pytest.mark.parametrize("response, ground_truth, expected", SYMBOLIC)
def test_math_verify_reward_pairs(warm_checker, response, ground_truth, expected):
    assert compute_score(response, ground_truth, symbolic=True) == float(expected)


# -- extraction -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("a \\boxed{1} b \\boxed{{2}}", "{2}"),
    ("\\boxed{\\{1\\}}", "\\{1\\}"), ("\\fbox{x}", "x"), ("\\boxed{a", None), ("nothing", None),
    ("\\boxed 7 and more", "7"), ("\\boxed{1}\\boxedx", "1"), ("\\boxed{\\\\}", "\\\\"),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("raw, expected", [
    ("\\left( 1,2 \\right)", "(1,2)"), ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("0.5", "\\frac{1}{2}"),
    ("\\sqrt2", "\\sqrt{2}"), ("x = 3", "3"), ("7/8", "\\frac{7}{8}"), ("30^\\circ", "30"), ("5\\%", "5"),
    (".3", "0.3"), ("\\frac1b", "\\frac{1}{b}"), ("1,234,567", "1234567"), ("(1,234)", "(1,234)"),
])
def test_normalize_answer_rules(raw, expected):
    assert normalize_answer(raw) == expected


# -- the guarantee: any input returns within 1 s and never raises (measured) ----------------------
def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


ADVERSARIAL = {
    "1MB_text_box_at_end": ("lorem ipsum " * 87_400 + "\\boxed{42}", "42", 1.0),
    "1MB_no_box": ("x" * 1_000_000, "42", 0.0),
    "10k_nested_braces": ("\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "1", 0.0),
    "10k_unclosed_braces": ("\\boxed{" + "{" * 10_000 + "1", "1", 0.0),
    "1MB_unclosed_braces": ("\\boxed{" + "{" * 1_000_000, "1", 0.0),
    "1MB_of_box_commands": ("\\boxed{" * 150_000, "1", 0.0),
    "1MB_of_near_miss_boxes": ("\\boxedx\\fboxy" * 80_000, "1", 0.0),
    "1MB_of_fracs_in_box": ("\\boxed{" + "\\frac" * 200_000 + "}", "1", 0.0),
    "1MB_of_sqrt_in_box": ("\\boxed{" + "\\sqrt" * 200_000 + "}", "1", 0.0),
    "1MB_of_slashes": ("\\boxed{" + "1/" * 500_000 + "}", "1", 0.0),
    "1MB_of_text_wrappers": ("\\boxed{" + "\\text{" * 100_000 + "}" * 100_000 + "}", "1", 0.0),
    "huge_ground_truth": ("\\boxed{1}", "{" * 500_000, 0.0),
}


@pytest.mark.parametrize("symbolic", [False, True])
@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_adversarial_inputs_return_within_1s(warm_checker, case, symbolic):
    response, gt, expected = ADVERSARIAL[case]
    score, seconds = _timed(compute_score, response, gt, symbolic=symbolic)
    assert score == expected
    assert seconds < 1.0, f"{case}: {seconds:.2f} s"


PATHOLOGICAL = [  # make sympy work for a very long time (huge powers, factorials, expansions)
    "9^{9^{9^{9}}}", "(10^{10^{8}})!", "2^{2^{40}}", "\\sqrt{2}^{10^{9}}", "(x+1)^{10^{7}}",
    "10^{10^{10}} - 10^{10^{10}} + 1",
]


@pytest.mark.parametrize("pred", PATHOLOGICAL)
def test_pathological_latex_for_the_symbolic_checker_returns_within_1s(warm_checker, pred):
    score, seconds = _timed(compute_score, B(pred), "1", symbolic=True)
    assert score in (0.0, 1.0)
    assert seconds < 1.0, f"{pred}: {seconds:.2f} s"


def test_hard_limit_kills_a_stuck_worker_and_recovers():
    # inner_s=30 disables the worker's own soft limit: only the caller's hard kill can stop it.
    checker = SymbolicChecker(timeout_s=0.5, inner_s=30.0)
    try:
        assert checker.warmup(timeout_s=60)
        verdict, seconds = _timed(checker.equivalent, "9^{9^{9^{9}}}", "1")
        assert verdict is None and checker.kills == 1
        assert seconds < 1.0, f"{seconds:.2f} s"
        assert checker.warmup(timeout_s=60)  # a fresh worker answers again
        assert checker.equivalent("0.25", "\\frac{1}{4}") is True
    finally:
        checker.close()


def test_concurrent_callers_each_return_within_1s():
    import threading

    checker = SymbolicChecker(timeout_s=0.5, inner_s=30.0)
    try:
        assert checker.warmup(timeout_s=60)
        seconds = []

        def call():
            seconds.append(_timed(checker.equivalent, "9^{9^{9^{9}}}", "1")[1])

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(seconds) == 3 and max(seconds) < 1.0, seconds
    finally:
        checker.close()


def test_cold_worker_does_not_block_the_caller():
    checker = SymbolicChecker(timeout_s=0.5)
    try:
        verdict, seconds = _timed(checker.equivalent, "0.25", "\\frac14")
        assert verdict in (True, None) and seconds < 1.0
    finally:
        checker.close()


# -- never raises; errors are counted, logged, scored 0 ---------------------------------------------
@pytest.mark.parametrize("bad", [None, b"\\boxed{5}", 5, ["\\boxed{5}"]])
def test_compute_score_never_raises(bad, caplog):
    assert compute_score(bad, "5") == 0.0
    assert "raised on a sample" in caplog.text  # logged, not swallowed


def test_batch_api_scores_and_counts_errors(monkeypatch):
    scores, errors = compute_scores([B("5"), B("4"), None, "no box"], ["5", "5", "5", "5"])
    assert scores == [1.0, 0.0, 0.0, 0.0] and errors == 1

    def flaky(response, gt):
        if "boom" in response:
            raise RuntimeError("boom")
        return 1.0

    monkeypatch.setitem(REWARDS, "flaky", flaky)
    scores, errors = compute_scores(["ok", "boom", "ok", "boom"], ["1"] * 4, name="flaky")
    assert scores == [1.0, 0.0, 1.0, 0.0] and errors == 2


def test_batch_api_with_math_verify(warm_checker):
    scores, errors = compute_scores([B("0.25"), B("0.3")], ["\\frac14", "\\frac14"], name="math_verify")
    assert scores == [1.0, 0.0] and errors == 0


def test_registry_errors_name_the_choices():
    with pytest.raises(KeyError, match="math_verify"):
        get_reward("gsm8k")
    with pytest.raises(KeyError, match="math_verify"):
        compute_scores(["a"], ["b"], name="gsm8k")
    with pytest.raises(ValueError, match="one ground truth per response"):
        compute_scores(["a", "b"], ["c"])
