"""Compiling checkpoints larger than memory, one decoder layer at a time (issue 32, items 1-3).

`moeopt convert CKPT --passes 'importance{calib=...},prune{keep=0.75,cold=0.125},match,merge,
quantize{method=uniform,bits=4},lower{experts=offload,hot=0}' -o OUT --stream [--work-dir DIR]`:

- `reader.LazyCheckpoint`: each tensor read from its shard when needed, in its stored dtype;
- `skeleton.StreamSkeleton`: the IR skeleton (meta weights) whose layers are filled and emptied one at a time,
  experts read one at a time where a forward needs them (`skeleton.LazySlots`);
- `plan.stream_plan`: which passes and options stream (others refused with one line);
- `merge`: `match` and `merge` one layer at a time (merged slots made from their experts when needed);
- `compile.stream_compile`: the per-layer sweep, the export from weightless expert stand-ins, experts.bin
  from the per-layer record files, the streamed parity check, and resuming from a work folder.
"""

from moeopt.stream.compile import StreamReport, stream_compile

__all__ = ["StreamReport", "stream_compile"]
