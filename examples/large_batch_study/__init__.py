"""The large-batch study, the main job: does K-FAC + mixup close the large-batch gap?

Run the folder: ``python examples/large_batch_study`` (``--help`` for the options; or
``python -m examples.large_batch_study`` from the repository root). Modules: ``study`` (the
plan, the runs, the command line), ``report`` (tables, figures, checks against the papers,
``docs/study``), ``console`` (the progress display), ``sharpness`` (the top Hessian eigenvalue at
matched training loss). The results and their reading are in ``docs/study.md``.
"""
