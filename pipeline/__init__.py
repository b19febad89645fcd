"""The library that does the work: one module per pipeline stage.

Nothing here imports Prefect, DVC or the CLI, so every stage is a plain function that the CLI,
the Prefect flow, DVC (through the CLI) and the tests call in exactly the same way.
"""
