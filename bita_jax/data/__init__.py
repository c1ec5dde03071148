"""The data layer: prompt sources with a stable held-out split, and self-distilled datasets.

Modules: `prompts` (named sources: sharegpt, humaneval, and code-alpaca / alpaca-seeds from
`prompt_files/`; JSON / JSONL files; the stable split: `is_heldout`, and `heldout_part` for its
selection and test halves), `run_dir` (a distillation run's resumable raw directory), `distill`
(the base model answers the prompts) and `dataset` (the array_record tfds dataset and
`load_records`, what training reads).

Nothing is imported here: `prompts` is light, `dataset` pulls in tensorflow_datasets.
"""
