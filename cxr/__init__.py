"""The `cxr` command-line interface (a thin layer over `pipeline` and `flows`)."""
