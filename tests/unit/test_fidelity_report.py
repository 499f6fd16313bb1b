"""The fidelity study's statistics and plan (benchmarks/fidelity_report.py, benchmarks/fidelity_study.py).

Bootstrap intervals are checked against cases derived by hand: the resampled mean of n seeds is
(number of ones drawn)/n, with the count binomial, so its quantiles follow from the binomial CDF."""

import pytest

from benchmarks.fidelity_report import (bootstrap_mean_ci, comparisons, first_step, intervals_overlap, markdown,
                                       study_groups)
from benchmarks.fidelity_study import ABLATIONS, SWEEP_LRS, VARIANTS, best_lr, plan


def test_bootstrap_all_seeds_equal_gives_a_zero_width_interval():
    assert bootstrap_mean_ci([0.7] * 5) == pytest.approx((0.7, 0.7, 0.7), abs=1e-12)
    assert bootstrap_mean_ci([0.42]) == pytest.approx((0.42, 0.42, 0.42), abs=1e-12)


def test_bootstrap_two_values():
    # n = 2, values {0, 1}: resampled means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4. The 2.5 % and
    # 97.5 % quantiles fall inside the 1/4 masses at 0 and at 1: the interval is [0, 1].
    assert bootstrap_mean_ci([0.0, 1.0]) == pytest.approx((0.5, 0.0, 1.0), abs=1e-12)
    # the same shifted and scaled: [a, b]
    assert bootstrap_mean_ci([0.6, 0.8]) == pytest.approx((0.7, 0.6, 0.8), abs=1e-12)


def test_bootstrap_five_values_one_outlier():
    # n = 5, values {0, 0, 0, 0, 1}: the number of ones drawn is Binomial(5, 0.2), CDF at 0, 1, 2, 3 =
    # 0.328, 0.737, 0.942, 0.993. The 2.5 % quantile is 0 ones (0.328 > 0.025) and the 97.5 % quantile
    # is 3 ones (0.942 < 0.975 <= 0.993): mean 0.2, interval [0, 0.6]. The quantiles are 0.03 or more
    # away from a CDF jump, far beyond the Monte-Carlo error of 10,000 resamples (~0.002).
    for seed in range(3):
        assert bootstrap_mean_ci([0.0, 0.0, 1.0, 0.0, 0.0], seed=seed) == pytest.approx((0.2, 0.0, 0.6), abs=1e-12)
    # a 50 % interval: quantiles 0.25 (0 ones, 0.328 > 0.25) and 0.75 (2 ones, 0.737 < 0.75 <= 0.942)
    assert bootstrap_mean_ci([0.0, 0.0, 1.0, 0.0, 0.0], level=0.5) == pytest.approx((0.2, 0.0, 0.4), abs=1e-12)


def test_bootstrap_is_seeded_and_refuses_bad_input():
    x = [0.61, 0.70, 0.74, 0.66, 0.80]
    assert bootstrap_mean_ci(x, seed=3) == bootstrap_mean_ci(x, seed=3)
    m, lo, hi = bootstrap_mean_ci(x)
    assert lo < m < hi and min(x) <= lo and hi <= max(x)
    for bad, match in (([], "non-empty"), ([0.5, float("nan")], "finite"), ([[0.5]], "1-D")):
        with pytest.raises(ValueError, match=match):
            bootstrap_mean_ci(bad)
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_ci(x, level=95)


def test_first_step_reaching_a_threshold():
    curve = [[25, 0.4], [50, 0.6], [75, 0.55], [100, 0.7]]
    assert (first_step(curve, 0.5), first_step(curve, 0.6), first_step(curve, 0.65), first_step(curve, 0.71)) == \
        (50, 50, 100, None)


def test_intervals_overlap():
    assert intervals_overlap((0.1, 0.3), (0.3, 0.5))
    assert intervals_overlap((0.1, 0.5), (0.2, 0.3))
    assert not intervals_overlap((0.1, 0.29), (0.3, 0.5))
    assert not intervals_overlap((0.6, 0.7), (0.1, 0.5))


def _row(variant, seed, lr, final, curve=None, steps_to_80=None):
    curve = curve or [[25, 0.4], [50, final], [75, final]]
    return {"variant": variant, "seed": seed, "lr": lr, "final_accuracy": final, "best_accuracy": max(a for _, a in curve),
            "steps_to_80": steps_to_80, "steps_to_90": None, "tokens_per_step": 1000.0, "wall_s": 300.0,
            "curve": curve, "steps": 75, "threads": 1, "commit": "0" * 40}


def test_plan_runs_the_sweep_first_then_picks_the_best_lr_by_the_last_three_evaluations():
    todo = plan([])
    assert len(todo) == 16 and {t[0] for t in todo} == {"sweep"}
    assert [t[1] for t in todo[:4]] == list(VARIANTS)                      # centre lrs first, one per variant
    rows = [_row(v, 1, lr, 0.5) for v, lrs in SWEEP_LRS.items() for lr in lrs]
    # popo: its lowest-lr run ends lower but has the better last three evaluations (0.9, 0.9, 0.6 vs 0.5 x 3)
    popo_lr = min(SWEEP_LRS["popo"])
    rows = [r for r in rows if not (r["variant"] == "popo" and r["lr"] == popo_lr)]
    rows.append(_row("popo", 1, popo_lr, 0.6, curve=[[25, 0.9], [50, 0.9], [75, 0.6]]))
    assert best_lr(rows, "popo") == popo_lr
    edge_note = next(x for x in markdown(rows, {"sweep": "s", "main": "m", "ablations": "a"}).splitlines()
                     if x.startswith("Best lr at the edge"))
    assert f"popo ({popo_lr:g})" in edge_note and "grpo" not in edge_note   # the others tie and keep the centre lr
    assert best_lr([r for r in rows if r["lr"] != SWEEP_LRS["popo"][2]], "popo") is None  # a sweep run missing
    todo = plan(rows)
    assert len(todo) == 4 * 4 + 6 * 5 + 1                                  # 62 in all, minus the 16 done, + a probe
    assert todo[-1] == ("probe", "popo", 1, popo_lr / 2)                   # popo's best is its grid's lowest lr
    assert todo[:4] == [("main", v, 2, best_lr(rows, v)) for v in VARIANTS]
    assert {t[3] for t in todo if t[0] == "ablation"} == {popo_lr}
    assert [t[1] for t in todo if t[0] == "ablation"][:6] == list(ABLATIONS)
    rows.append(_row("grpo", 2, best_lr(rows, "grpo"), 0.5))
    assert ("main", "grpo", 2, best_lr(rows, "grpo")) not in plan(rows)   # a finished run is never planned again


def test_report_says_how_many_seeds_and_which_differences_exceed_the_noise():
    rows = [_row(v, 1, lr, 0.5) for v, lrs in SWEEP_LRS.items() for lr in lrs]
    lr = {v: best_lr(rows, v) for v in VARIANTS}
    rows = [r for r in rows if not (r["variant"] in ("popo", "grpo") and r["lr"] == lr[r["variant"]])]
    rows += [_row("popo", s, lr["popo"], f) for s, f in zip((1, 2, 3), (0.80, 0.82, 0.84))]
    rows += [_row("grpo", s, lr["grpo"], f) for s, f in zip((1, 2, 3), (0.60, 0.62, 0.64))]
    rows += [_row("popo-no-is", s, lr["popo"], f) for s, f in zip((1, 2, 3), (0.79, 0.85, 0.80))]
    rows += [_row("popo-no-similarity", s, lr["popo"], f) for s, f in zip((1, 2), (0.50, 0.51))]  # 2 seeds: not judged
    groups = study_groups(rows)
    lines = comparisons(groups)
    popo_grpo = next(x for x in lines if x.startswith("popo (") and " vs grpo " in x)
    assert "popo is better, beyond the seed noise" in popo_grpo and "3 seeds" in popo_grpo
    assert "within the seed noise" in next(x for x in lines if "vs popo-no-is" in x)
    assert "not compared" in next(x for x in lines if x.startswith("popo (") and " vs a3po " in x)  # a3po: 1 seed
    # two seeds give the interval [0.50, 0.51], far from POPO's, but two seeds are not enough to judge
    assert "not compared" in next(x for x in lines if "vs popo-no-similarity" in x)
    md = markdown(rows, {"sweep": "s.png", "main": "m.png", "ablations": "a.png"})
    assert "| popo | " in md and "| 3 (1, 2, 3) |" in md and "| 2 (1, 2) |" in md
    assert "the similarity term (alpha 0.1): not judged yet" in md


def test_write_study_report_replaces_only_its_section(tmp_path):
    from benchmarks.fidelity_report import BEGIN, END, write_study_report

    rows = [_row(v, 1, lr, 0.5) for v, lrs in SWEEP_LRS.items() for lr in lrs]
    rows.append(_row("popo", 2, best_lr(rows, "popo"), 0.7))
    md = tmp_path / "results.md"
    md.write_text(f"# before\nkept\n{BEGIN}\nold text\n{END}\nafter, kept\n")
    write_study_report(rows, results_path="rows.json", md_path=str(md), img_dir=str(tmp_path / "img"))
    text = md.read_text()
    assert text.startswith(f"# before\nkept\n{BEGIN}\n") and text.endswith(f"{END}\nafter, kept\n")
    assert "old text" not in text and "Rows so far: 17 of the 62 runs" in text
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [f"fidelity_{k}.png" for k in ("ablations", "main", "sweep")]
    md.write_text("no markers\n")
    with pytest.raises(SystemExit, match="marker"):
        write_study_report(rows, results_path="rows.json", md_path=str(md), img_dir=str(tmp_path / "img"))


def _bare_row(variant, seed, lr):
    return {"variant": variant, "seed": seed, "lr": lr}


def test_two_runners_never_take_the_same_run_and_never_lose_a_row(tmp_path):
    """Runner B's claims and rows as a second process would leave them: A skips what B holds, takes
    over a dead runner's claim, lets go of a run B finished between A's read and A's claim, and
    merges its row with B's instead of overwriting them."""
    import subprocess
    import sys

    from benchmarks.fidelity_study import add_row, claim, load_rows, next_run, run_name, unclaim

    out, results = str(tmp_path / "out"), str(tmp_path / "rows.json")
    (tmp_path / "out").mkdir()
    first = plan([])[0]                                       # the first sweep run
    second = plan([])[1]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # runner B, alive
    try:
        (tmp_path / "out" / f"{run_name(*first[1:])}.claim").write_text(str(other.pid))
        assert next_run(results, out) == second               # B holds the first: A takes the second
        assert not claim(out, run_name(*first[1:]))
    finally:
        other.kill()
        other.wait()
    # B died (kill -9 leaves its claim): A takes its run over
    unclaim(out, run_name(*second[1:]))
    assert next_run(results, out) == first
    unclaim(out, run_name(*first[1:]))
    # B finished the first run and wrote its row: A's next pick is the second, and A's row joins B's
    assert add_row(results, _bare_row(*first[1:])) == [_bare_row(*first[1:])]
    assert next_run(results, out) == second
    add_row(results, _bare_row(*second[1:]))
    assert load_rows(results) == [_bare_row(*first[1:]), _bare_row(*second[1:])]


def test_a_run_finished_between_the_read_and_the_claim_is_let_go(tmp_path, monkeypatch):
    import benchmarks.fidelity_study as study

    out, results = str(tmp_path), str(tmp_path / "rows.json")
    first, second = plan([])[:2]
    real_claim = study.claim

    def claim_after_the_other_runner_wrote(out_, name):  # B writes the first run's row just before A's claim
        if name == study.run_name(*first[1:]) and not study.load_rows(results):
            study.add_row(results, _bare_row(*first[1:]))
        return real_claim(out_, name)

    monkeypatch.setattr(study, "claim", claim_after_the_other_runner_wrote)
    assert study.next_run(results, out) == second
    assert not (tmp_path / f"{study.run_name(*first[1:])}.claim").exists()


def test_an_edge_probe_is_reported_and_never_moves_the_best_lr():
    """popo's best is the lowest lr of its grid: one seed-1 probe at half of it is planned; its row,
    even with a higher score, leaves the best lr (and so every planned seed and ablation) where it was,
    and the report says the optimum may lie below the grid; a lower score says the edge stands."""
    low = min(SWEEP_LRS["popo"])
    rows = [_row(v, 1, lr, 0.5) for v, lrs in SWEEP_LRS.items() for lr in lrs if (v, lr) != ("popo", low)]
    rows.append(_row("popo", 1, low, 0.6, curve=[[25, 0.6], [50, 0.6], [75, 0.6]]))
    assert ("probe", "popo", 1, low / 2) in plan(rows)
    before = plan(rows)
    for probe_final, says in [(0.7, "the optimum may lie below the grid"), (0.55, "the grid's lowest lr stands")]:
        with_probe = rows + [_row("popo", 1, low / 2, probe_final, curve=[[25, probe_final]] * 3)]
        assert best_lr(with_probe, "popo") == low
        assert plan(with_probe) == [t for t in before if t[0] != "probe" or t[1] != "popo"]
        md = markdown(with_probe, {"sweep": "s", "main": "m", "ablations": "a"})
        line = next(x for x in md.splitlines() if x.startswith("Edge probe popo"))
        assert f"score {100 * probe_final:.1f}% against 60.0% at {low:g}" in line and says in line
        assert f"| popo | {low / 2:g} (edge probe) |" in md
    # the count line: 16 sweep rows of the matrix, the probe, and a seed-2 run at an lr not picked
    orphan = _row("popo", 2, max(SWEEP_LRS["popo"]), 0.3)
    md = markdown(with_probe + [orphan], {"sweep": "s", "main": "m", "ablations": "a"})
    assert md.startswith("Rows so far: 16 of the 62 runs, 1 of 1 edge probes, and 1 run(s) at an lr the sweep")


def test_two_processes_racing_for_the_same_runs_never_both_take_one(tmp_path):
    """Two runner processes claim the same 200 names from the same instant: each name goes to exactly
    one of them (both stay alive until both are done, so no claim is taken over from a dead one)."""
    import os
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from benchmarks.fidelity_study import claim\n"
            "start = float(sys.argv[3])\n"
            "while time.time() < start: pass\n"
            "got = [i for i in range(200) if claim(sys.argv[2], f'run{i}')]\n"
            "print(' '.join(map(str, got)), flush=True); time.sleep(2.0)")
    start = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", code, root, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    got = [set(map(int, p.communicate(timeout=60)[0].split())) for p in procs]
    assert not got[0] & got[1] and got[0] | got[1] == set(range(200))
