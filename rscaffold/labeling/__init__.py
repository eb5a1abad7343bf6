"""Signal labeling (the paper's two stages): the taxonomy, keyword pre-labels, the LLM labeling
request and its answer parser, the labeler, and the quality statistics and report.

Modules: :mod:`.taxonomy`, :mod:`.keywords` (stage 1), :mod:`.prompts` and :mod:`.parsing`
(stage 2's request and answer), :mod:`.labeler` (both stages over traces), :mod:`.quality` and
:mod:`.report` (agreement, transitions, the markdown report and heatmap).
"""
