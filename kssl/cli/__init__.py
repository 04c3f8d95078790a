"""The command-line tools, one module each, with one entry: `kssl.cli.<tool>:run`.

`bin/<tool>` (the documented route), the `kssl-<tool>` console script of setup.cfg and
`python -m kssl.cli.<tool>` all call that same `run`.
"""
