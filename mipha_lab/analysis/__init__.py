"""The study's analysis: run folders -> cells and axes (study), each benchmark's headline figure from its
per-question records (figures), intervals of deltas (intervals, compare), the tables and the paper's
claims judged (verdicts), notebook helpers (notebook), and a simulation that checks the intervals
(simulate). Notebooks in analysis/ call these and stay thin.

The statistical model. A run's figure on a benchmark is
    Y(cell, seed) = mu(cell) + u(cell, seed) + e(cell, seed),
where u is the seed's luck (variance s_u^2, the same draw for every benchmark of that run) and e is the
sampling error of the finite question set, shared in part by both cells (the same questions: paired)
and in part the seed x question interaction. The delta a - b is the difference of the seed means, and
    Var(delta) = Q + sum over cells of Var(Y | questions) / seeds,
where Q is the question-level variance of the paired delta that does not average out over seeds. Q is
the spread of the delta over paired resamples of the benchmark's units (questions; MME images; MMBench
circular groups; within POPE splits and MME subtasks) less the run-level noise those resamples carry,
which the spread of the seeds already counts; Var(Y | questions) is the sample variance of each cell's
run figures. The interval is delta +/- t(df) sqrt(Var), with Welch-Satterthwaite degrees of freedom
(few seeds give a wide t). With one seed on a side Var(Y | questions) is unmeasured and no interval is
given, unless question-only intervals (Q with the interaction, seeds ignored) are asked for; those are
labelled. The mean over benchmarks (0-100 points each; MME's 0-2000 divided by 20) is formed run by
run before the same formula, so a seed's luck stays shared across benchmarks. Simulated coverage:
python -m mipha_lab.analysis.simulate.
"""
