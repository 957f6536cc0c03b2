"""What a run keeps on disk: the checkpoint contract and the run folder
(choosing, locking, saving, the metrics log). The atomic writes under both
are :mod:`charnn.safe_files`'."""
