"""What charnn writes to disk: the checkpoint contract, the run folder, safe (atomic) files."""
