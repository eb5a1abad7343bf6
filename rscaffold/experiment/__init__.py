"""Experiments: a grid of pipeline configs (:mod:`.grid`), paired statistics (:mod:`.stats`) and
the experiment's report (:mod:`.report`)."""
