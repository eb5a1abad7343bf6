"""Student training: the dual-objective TRL trainer (``trainer``), the signal tokens added to the
student's vocabulary (``signal_tokens``), one process or N (``processes``), each student's
training-example lengths against ``training.max_length``, measured before any model loads
(``lengths``). The training text format is the student's own (:mod:`rscaffold.student_format`),
and so is its directory (:mod:`rscaffold.student`).

Submodules are imported explicitly (``rscaffold.training.trainer`` imports TRL, which is slow to
import; the others do not).
"""
