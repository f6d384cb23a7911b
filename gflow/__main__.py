from gflow.cli import entry

entry()
