"""Data: datasets and the resumable, seeded batch stream (``datasets``), pre-tokenised code
caches (``code_cache``), image reading (``image_io``), class maps (``classes``), condition
payloads from files and datasets (``payloads``) and fitting a tokenizer to a dataset
(``tokenizer_fit``). The batch types themselves are contract
(``sar_core.batch``).

May import: the contract modules only (``batch``, ``schedule``, ``plugins`` for the dataset
registry). Never ``sar``, ``train``, ``evaluate`` or ``study``.
"""

from sar_core._moved import names_from

# ``sar_core.data`` was one module before the sub-packages: its names stay importable from here
__getattr__ = names_from({
    **dict.fromkeys(("Batch", "Padded", "collate", "split_target"), "sar_core.batch"),
    **dict.fromkeys(("item_seed", "SeededItems", "ResumableSampler", "AspectGrouped", "size_buckets",
                     "GroupedBatchSampler", "BatchStream", "is_code_cache", "image_hw", "parse_image_size",
                     "size_option", "dataset_at", "open_training_data", "open_dataset"),
                    "sar_core.data.datasets"),
})
