"""Evaluation data sets: the five benchmarks' loaders (published local files or the Hugging Face
hub) in :mod:`.loaders`, final-answer extraction and checking in :mod:`.answers` (math_verify
runs in the helper process of :mod:`.verify_worker`), and training problems that are also
evaluation problems in :mod:`.overlap`."""
