"""Evaluation of exported and fine-tuned students (``lrc-eval``, :mod:`lrc.cli.eval`).

* :mod:`lrc.eval.suites` -- the suites (``paper``, ``safety``, ``fewshot``, ``offline``): tasks, shots, metrics;
* :mod:`lrc.eval.paper_results` -- the paper's published rows, each naming its source table;
* :mod:`lrc.eval.mc` -- local multiple-choice files and lrc's own log-likelihood scorer (lm-eval's rules);
* :mod:`lrc.eval.pydoc_mc` -- the embedded multiple-choice task built from the standard library;
* :mod:`lrc.eval.heldout` -- held-out CE / perplexity, KL and top-1 agreement against the teacher;
* :mod:`lrc.eval.harness` -- the lm-evaluation-harness adapter (optional extra ``eval``);
* :mod:`lrc.eval.table` -- results as Markdown, beside the paper's rows.
"""
