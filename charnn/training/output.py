"""The run folder a training run owns: chosen and locked before the text is
read (so the corpus never includes it and no other run can take it
meanwhile), the metrics it logs there, and the checkpoints it saves there.
Rank 0 alone writes; under torchrun the other ranks only learn its path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..errors import FolderLockedError, FolderTakenError, RunFolderError
from ..safe_files import serialize
from ..storage import checkpoint as ckpt_mod
from ..storage.runfolder import RunFolder, choose_out_dir
from .runtime import DistInfo

MAX_METRIC_ROWS = ckpt_mod.MAX_METRIC_ROWS  # the checkpoint keeps a short history; the JSONL log keeps all
TRAINING_ONLY_KEYS = ("optimizer_state", "scheduler_state")  # in last.pt and step files, not best.pt


class RunOutput:
    def __init__(self, dist_info: DistInfo):
        self.dist = dist_info
        self.folder: RunFolder | None = None  # rank 0's, once open
        self.out_dir: Path | None = None
        self.notes: list[str] = []  # what opening it has to say (a new folder, stale files removed)
        self.metrics: list[dict[str, Any]] = []  # the checkpoint's short history
        self.saved = False  # a checkpoint was written by this run

    def open(self, requested: Path | None, default: Path, resumed: ckpt_mod.Checkpoint | None,
             overwrite: bool) -> Path:
        """Rank 0 chooses, locks and checks the output folder; under torchrun
        the other ranks take its choice (or its error). Checking the folder
        themselves raced with rank 0's opening it: a busy machine made rank 1
        find the folder rank 0 had just taken, and it refused ("already holds
        a training run") or, for the default folder, chose the next one."""
        failure: BaseException | None = None
        if self.dist.is_main:
            try:
                self._open_main(requested, default, resumed, overwrite)
            except BaseException as e:  # the other ranks must hear of it, not wait for the folder
                failure = e
        if self.dist.enabled:
            shared: list[str | None] = [None, None]
            if self.dist.is_main:
                shared = [None, str(failure)] if failure is not None else [str(self.out_dir), None]
            dist.broadcast_object_list(shared, src=0)
            if not self.dist.is_main:
                if shared[1] is not None:
                    raise RunFolderError(shared[1])  # (rank 0 says it)
                self.out_dir = Path(shared[0])
        if failure is not None:
            raise failure
        return self.out_dir

    def _open_main(self, requested: Path | None, default: Path, resumed: ckpt_mod.Checkpoint | None,
                   overwrite: bool) -> None:
        for _ in range(100):
            self.out_dir, note = choose_out_dir(requested, default, resuming=resumed is not None,
                                                overwrite=overwrite)
            step = int(resumed.train_state.get("step", 0)) if resumed is not None else None
            try:
                self.folder = RunFolder(self.out_dir, resuming_at_step=step, overwrite=overwrite).open()
            except (FolderTakenError, FolderLockedError):
                if requested is not None or resumed is not None:
                    raise
                continue  # another new run took the default folder a moment ago: the next one
            self.notes.extend([note] if note else [])
            self.notes.extend(self.folder.notes)
            return
        raise RunFolderError(f"could not find a free output folder next to {default}; pass --out")

    def log(self, row: dict[str, Any]) -> str | None:
        """Append to the checkpoint's short history and the JSONL log; a
        problem with the log, to warn about."""
        self.metrics.append(row)
        if len(self.metrics) > MAX_METRIC_ROWS:
            # Thin the older half of the train rows; keep every eval row.
            head, tail = self.metrics[: MAX_METRIC_ROWS // 2], self.metrics[MAX_METRIC_ROWS // 2 :]
            thinned = [r for i, r in enumerate(head) if "val_loss" in r or i % 2 == 0]
            if len(thinned) + len(tail) > MAX_METRIC_ROWS:  # eval rows alone fill it (--eval-every 1)
                thinned = head[::2]
            self.metrics = thinned + tail
        return self.folder.log(row) if self.folder is not None else None

    def save(self, payload: dict[str, Any], step: int, *, best: bool, keep: int) -> list[Path] | None:
        """last.pt always, best.pt with ``best``, step-N.pt with ``keep``; the
        paths written (None on the ranks that do not write)."""
        if self.folder is None:
            return None
        self.saved = True
        data = serialize(payload)  # once, for last.pt and the step file
        written = [self.folder.save(data, "last.pt")]
        if best:
            # best.pt is for sampling and evaluation: without the optimizer's
            # moments it is a third of the size. Runs resume from last.pt.
            model_only = {k: v for k, v in payload.items() if k not in TRAINING_ONLY_KEYS}
            written.append(self.folder.save(serialize(model_only), "best.pt"))
        if keep:
            written.append(self.folder.save_step(data, step, keep))
        return written

    def close(self) -> None:
        """Release the folder. A run that wrote no checkpoint leaves no trace
        of itself in it."""
        if self.folder is not None:
            if self.saved:
                self.folder.close()
            else:  # undoes only what opening it added (a resumed run's folder keeps its files)
                self.folder.abandon()
