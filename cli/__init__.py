"""`tessera`, the command line (main.py, built from typed signatures) and its rich output (console.py), over the
client (`from flows import foundation_model as fm`)."""
