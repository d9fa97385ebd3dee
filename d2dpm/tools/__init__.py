"""The workshop: what made and measures the demo, beside the method core in `d2dpm/`.

Training the embedded models (`train`, `datasets`), the results table (`evaluate`, `distances`) and
the speed figures (`bench`). These modules import the core; the core never imports them
(docs/design.md). Their commands are `d2dpm train`, `d2dpm evaluate` and `d2dpm bench`.
"""
