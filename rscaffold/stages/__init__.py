"""The six pipeline stages, one module each: its pure ``run_<stage>`` function (resume, failure
policy, outputs) over the library parts below it, and its ``STAGE`` declaration
(:class:`rscaffold.stages.declare.Stage`: upstream stages, outputs, fingerprint parts, shard
functions, whether it loads a model). No Prefect here: ``rscaffold_tasks`` makes a Prefect task of
each declaration, :mod:`rscaffold.stages.registry` lists them in order, and
:mod:`rscaffold.stages.plan` derives every stage's fingerprint from the config alone.

Kept empty on purpose: importing one stage must not import the others (a stage's code version is
computed from what its module imports, see :mod:`rscaffold.code_version`).
"""
