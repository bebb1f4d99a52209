"""``emu bench debate``: the virtio-comment STOP thread (shared/seed/) answered with numbers.

Four experiments, each a module returning plain data (lists of dicts) for the report:
``stops`` (stop latency by interface against queue depth), ``policies`` (drain against
report as backend latency grows, reads and writes apart, the write fence, a migration
downtime model), ``state`` (what the virtio 1.4 standard parts carry per device, what
needs emu's parts, what cannot move) and ``restore`` (cross-implementation restores,
pass/fail). ``report`` writes the Markdown, HTML, PNG plots, JSON and CSV and the
conclusions drawn from the figures. ``measure`` is the stop timing shared with
``bench/stop_latency.py``.
"""
