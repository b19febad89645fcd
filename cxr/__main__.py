from cxr.cli import app

app()
