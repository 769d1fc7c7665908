"""Evaluation items over processes, and per-item results streamed to a file that a rerun resumes from.

One process (`python -m flexattn eval ...`) or several launched together (`torchrun --nproc_per_node N -m flexattn
eval ...`, or `accelerate launch`): every process builds the same item list and takes its share of the items not
done yet, chunk by chunk; after each chunk the main process gathers the per-item results (accelerate's
`split_between_processes` and `gather_object`) and appends them to the results file. The summary is computed on
the main process from every item's result in item order, so N processes print exactly what one prints.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

CHUNK_PER_PROCESS = 4  # items each process scores between gathers (fewer waits on the slowest process per gather)


class Processes:
    """This process among those launched together; a lone process when none were launched."""

    def __init__(self, state=None):
        self._state = state  # accelerate.PartialState, or None for a lone process

    @classmethod
    def launched(cls, cpu: bool) -> "Processes":
        """Join the processes torchrun or accelerate launch started (gloo with `cpu`, else NCCL on GPUs)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        processes = cls(PartialState(cpu=cpu))
        if not processes.is_main:  # progress shows on the main process only, the libraries' own bars too
            from huggingface_hub.utils import disable_progress_bars
            from transformers.utils import logging

            logging.disable_progress_bar()
            disable_progress_bars()
            os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when datasets is imported
            if "datasets" in sys.modules:
                sys.modules["datasets"].disable_progress_bars()
        return processes

    @property
    def count(self) -> int:
        return self._state.num_processes if self._state is not None else 1

    @property
    def index(self) -> int:
        return self._state.process_index if self._state is not None else 0

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def device(self):
        """This process's device (cuda:<local rank> on GPUs), or None for a lone process."""
        return self._state.device if self._state is not None else None

    def split(self, items: list) -> list:
        if self._state is None:
            return list(items)
        with self._state.split_between_processes(list(items)) as part:
            return list(part)

    def gather(self, rows: list) -> list:
        """Every process's `rows`, concatenated in process order (on every process)."""
        if self._state is None:
            return rows
        from accelerate.utils import gather_object

        return gather_object(rows)

    def broadcast(self, value):
        """The main process's `value`, on every process."""
        if self._state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def close(self) -> None:
        import torch.distributed as dist

        if self._state is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class ResultsFile:
    """Per-item results as JSON lines after one header line naming the run ({"run": {...}}).

    Opening an existing file with the same header resumes: its items count as done. A line cut short by an
    interruption is dropped. A different header is refused, so results of two runs never mix."""

    def __init__(self, path: str | Path, run: dict):
        self.path = Path(path)
        self.run = json.loads(json.dumps(run))  # as it reads back from the file

    def load(self) -> dict[str, dict]:
        """The results already in the file, by item key (the file is created with its header if absent)."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"run": self.run}) + "\n")
            return {}
        text = self.path.read_text()
        complete = text[: text.rfind("\n") + 1]  # drop a last line an interruption cut short
        lines = complete.splitlines()
        try:
            header = json.loads(lines[0]).get("run") if lines else None
        except json.JSONDecodeError:
            header = None
        if header != self.run:
            raise ValueError(f"{self.path} holds results of another run (bench, model, modes or settings differ); "
                             "give another --out file")
        if len(complete) != len(text):
            self.path.write_text(complete)
        done = {}
        for number, line in enumerate(lines[1:], start=2):
            try:
                entry = json.loads(line)
                done[entry["key"]] = entry["result"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{self.path}, line {number}: not a result line") from None
        return done

    def append(self, results: list[tuple[str, dict]]) -> None:
        with self.path.open("a") as f:
            for key, result in results:
                f.write(json.dumps({"key": key, "result": result}) + "\n")
            f.flush()


def run_items(keys: list[str], compute: Callable[[int], dict], processes: Processes | None = None,
              results: ResultsFile | None = None, desc: str = "eval", progress: bool = True) -> list[dict] | None:
    """`compute(i)` (a JSON-able dict) for every item i whose key is not in `results` yet, over the processes.

    Returns every item's result in item order on the main process, None on the others."""
    processes = processes or Processes()
    if len(set(keys)) != len(keys):
        raise ValueError("item keys are not unique")
    done, problem = {}, None
    if results is not None and processes.is_main:  # only the main process reads the file
        try:
            done = results.load()
        except (ValueError, OSError) as err:
            problem = f"cannot use {results.path}: {err}" if isinstance(err, OSError) else str(err)
    problem, done_keys = processes.broadcast((problem, list(done)))
    if problem:  # on every process, or the others would wait for the main one forever
        raise ValueError(problem)
    done_keys = set(done_keys)
    pending = [i for i, key in enumerate(keys) if key not in done_keys]
    step = processes.count * (1 if processes.count == 1 else CHUNK_PER_PROCESS)
    desc += f" ({processes.count} processes)" if processes.count > 1 else ""
    bar = tqdm(total=len(keys), initial=len(keys) - len(pending), desc=desc,
               disable=not (progress and processes.is_main))
    for start in range(0, len(pending), step):
        mine = processes.split(pending[start : start + step])
        gathered = processes.gather([(keys[i], compute(i)) for i in mine])
        if processes.is_main:
            gathered = [(key, json.loads(json.dumps(result))) for key, result in gathered]  # as a resumed run reads
            if results is not None:
                results.append(gathered)
            done.update(gathered)
            bar.update(len(gathered))
    bar.close()
    return [done[key] for key in keys] if processes.is_main else None
