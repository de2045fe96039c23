"""The large-batch study, the main job: does large-batch K-FAC + mixup close SGD's large-batch gap?

Run the folder: ``python examples/large_batch_study`` (``--help`` for the options; or
``python -m examples.large_batch_study`` from the repository root). Modules: ``study`` (the
benchmarks, the plan, tuning, the command line, the CPU configurations), ``claims`` (the claims
and their tests, declared before any run), ``training`` (one run and its record), ``report``
(tables, figures, ``docs/study``), ``console`` (the progress display), ``sharpness`` (the top
Hessian eigenvalue), ``wandb_runs`` (the W&B runs, written by the study's process). The results
and their reading are in ``docs/study.md``.
"""
