"""The six pipeline stages, one module each: its pure ``run_<stage>`` function (resume, failure
policy, outputs) over the library parts below it. No Prefect here: ``rscaffold_tasks`` wraps each
``run_<stage>`` in a Prefect task, and :mod:`rscaffold.stages.plan` derives every stage's
fingerprint from the config alone.

Kept empty on purpose: importing one stage must not import the others (a stage's code version is
computed from what its module imports, see :mod:`rscaffold.code_version`).
"""
